"""fedsim/deploy.py without a SuperLink: outputs framed on the ServerApp's log stream and
reassembled by the launcher; the SuperLink connection it hands to `flwr`."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from fedsim import deploy


def test_outputs_shipped_on_the_log_stream_arrive_byte_for_byte(tmp_path: Path) -> None:
    src = tmp_path / "server_side"
    (src / "checkpoints").mkdir(parents=True)
    (src / "report").mkdir()
    (src / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    (src / "report" / "figure.png").write_bytes(os.urandom(200_000))  # several frames
    (src / "checkpoints" / "round_000002.pt").write_bytes(b"resume is for the simulation engine")
    (src / "empty.txt").write_bytes(b"")
    stream = io.StringIO()
    stream.write("[fedsim] round 1/2 | ...\n")
    deploy.ship_outputs(src, out=stream)
    stream.write("11/29/2026 12:00:00:DEBUG:ServerApp finished running.\n")
    lines = stream.getvalue().splitlines(keepends=True)
    assert sum(deploy.FRAME in line for line in lines) > 3
    framed = [line.split()[1] for line in lines if line.startswith(deploy.FRAME)]
    assert framed.index("metrics.jsonl") < framed.index("report/figure.png")  # small files first

    dst = tmp_path / "launcher_side"
    dst.mkdir()
    (dst / "metrics.jsonl").write_text("mine\n")  # already there (same file system): left alone
    echo = io.StringIO()
    collector = deploy.Collector()
    collector.feed(lines, echo=echo)
    assert sorted(collector.write(dst)) == ["empty.txt", "report/figure.png"]  # no checkpoints
    assert (dst / "report" / "figure.png").read_bytes() == (src / "report" / "figure.png").read_bytes()
    assert (dst / "empty.txt").read_bytes() == b"" and (dst / "metrics.jsonl").read_text() == "mine\n"
    assert echo.getvalue() == "[fedsim] round 1/2 | ...\n"  # frames and Flower's DEBUG chatter are not echoed
    assert collector.error is None


def test_an_incomplete_file_is_not_written_and_an_error_line_stops_the_echo(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.pt").write_bytes(os.urandom(150_000))
    stream = io.StringIO()
    deploy.ship_outputs(src, out=stream)
    lines = stream.getvalue().splitlines(keepends=True)[:-1]  # the last frame was lost
    deploy.ship_error("round 3: every worker failed: worker 7: worker setup failed: DataError", out=stream)
    tail = stream.getvalue().splitlines(keepends=True)[-1:]
    echo = io.StringIO()
    collector = deploy.Collector()
    collector.feed([*lines, *tail, "Traceback (most recent call last):\n"], echo=echo)
    assert collector.write(tmp_path / "dst") == [] and not (tmp_path / "dst" / "model.pt").exists()
    assert collector.error == "round 3: every worker failed: worker 7: worker setup failed: DataError"
    assert "Traceback" not in echo.getvalue()


def test_superlink_connection_is_insecure_or_tls_with_the_given_ca(tmp_path: Path) -> None:
    assert deploy.superlink_toml("10.0.0.5:8000", None) == (
        '[superlink]\ndefault = "fedsim"\n\n[superlink.fedsim]\naddress = "10.0.0.5:8000"\ninsecure = true\n'
    )
    ca = tmp_path / "ca.pem"
    text = deploy.superlink_toml("link.example.org:8000", str(ca))
    assert f'root-certificates = "{ca}"' in text and "insecure = false" in text


def test_flwr_stop_that_hangs_holding_its_pipe_through_a_grandchild_is_given_up_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C on the deployment engine runs `flwr stop`; one that never answers (and whose
    grandchild keeps the output pipe open, which made subprocess.run(timeout=) wait forever)
    must not keep fedsim from exiting."""
    import time

    fake = tmp_path / "flwr"
    fake.write_text("#!/bin/sh\nsleep 600 &\nsleep 600\n")
    fake.chmod(0o755)
    monkeypatch.setattr(deploy, "STOP_TIMEOUT_S", 1.0)
    start = time.monotonic()
    line = deploy.stop_run(str(fake), 7, "fedsim", dict(os.environ), "127.0.0.1:9093")
    assert time.monotonic() - start < 10
    assert line.startswith("interrupted, but run 7 could not be stopped") and "no answer within 1 s" in line
