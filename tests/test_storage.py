"""Storage faults: failed writes, two runs on one directory, resuming with another config.

The round loop runs for real (training, DP-SGD, ledger, checkpoints) on `fake_grid.LocalGrid`,
fedsim's ClientApp answering in this process, so a fault can be injected at an exact round
without Ray; the command-line checks stop before Ray would start.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fake_grid import LocalGrid, set_flower_identity
from fedsim import checkpoint
from fedsim.config import from_dict
from fedsim.errors import ConfigError, StorageError
from fedsim.privacy.sample_level import SampleLevelDP
from fedsim.run import changed_keys, run
from fedsim.runlog import LOCK, SUMMARY, locked
from fedsim.server_app import prepare, run_rounds

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def flower_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_flower_identity(monkeypatch)


def small(**over: object) -> dict:
    raw = {
        "seed": 3, "population": 30, "rounds": 4, "cohort": {"size": 6, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 40}, "model": {"name": "mlp", "hidden_sizes": [8]},
        "privacy": {"dpsgd": {"noise_multiplier": 1.0}}, "checkpoint": {"every": 1, "keep": 2},
        "simulation": {"num_workers": 2, "vectorize": "off"}, "output": {"progress": False},
    }  # fmt: skip
    raw.update(over)
    return raw


def run_local(raw: dict, run_dir: Path, resume: dict | None = None) -> dict:
    cfg = from_dict(raw)
    cfg.output.dir = str(run_dir)
    return run_rounds(cfg, LocalGrid(2), run_dir, prepare(cfg, resume=resume))


def enospc_at_round(monkeypatch: pytest.MonkeyPatch, round_num: int) -> None:
    """torch.save of the round's checkpoint writes part of the file, then the disk is full."""
    real = torch.save

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if isinstance(obj, dict) and obj.get("round") == round_num and "server_optimizer" in obj:
            f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_checkpoint_write_that_fails_stops_with_one_line_and_the_previous_checkpoint_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = run_local(small(), tmp_path / "whole")
    with monkeypatch.context() as m:
        enospc_at_round(m, 3)
        with pytest.raises(StorageError) as err:
            run_local(small(), tmp_path / "full")
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message and "round_000003.pt" in message
    assert f"the newest valid checkpoint is {tmp_path / 'full' / 'checkpoints' / 'round_000002.pt'}" in message
    folder = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["round_000001.pt", "round_000002.pt"]  # no partial file
    assert not (tmp_path / "full" / SUMMARY).exists()  # the run does not look finished
    state = checkpoint.load(tmp_path / "full")
    assert state["round"] == 2
    resumed = run_local(small(), tmp_path / "full", resume=state)
    assert resumed["model_sha256"] == whole["model_sha256"]
    assert resumed["privacy"]["sample_level"]["epsilon_max"] == whole["privacy"]["sample_level"]["epsilon_max"]


def test_a_ledger_write_that_fails_stops_before_the_update_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = SampleLevelDP.save, []

    def save(self: SampleLevelDP, run_dir: Path) -> None:
        calls.append(1)
        if len(calls) == 3:  # the ledger of round 3, written before round 3's update
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(self, run_dir)

    monkeypatch.setattr(SampleLevelDP, "save", save)
    with pytest.raises(StorageError, match=r"cannot write the privacy ledger .*ledger.json: Input/output error; "
                                           r"the newest valid checkpoint is .*round_000002.pt"):  # fmt: skip
        run_local(small(), tmp_path / "run")
    assert checkpoint.load(tmp_path / "run")["round"] == 2  # the ledger agrees with the metrics there
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and not (tmp_path / "run" / SUMMARY).exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(StorageError, match=rf"in use by another fedsim run \(pid {holder.pid} on "), locked(tmp_path):
            pass
        # run() refuses before loading data or starting Ray, and leaves the holder's lock alone.
        with pytest.raises(StorageError, match=str(holder.pid)):
            run(from_dict(small()), tmp_path)
        assert (tmp_path / LOCK).read_text().split()[0] == str(holder.pid)
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_from_a_dead_run_is_taken_over_and_released(tmp_path: Path) -> None:
    (tmp_path / LOCK).write_text(f"{dead_pid()} {socket.gethostname()}\n")  # a run killed with SIGKILL
    with locked(tmp_path):
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())
        with locked(tmp_path):  # the same process again (the ServerApp inside the run): allowed
            pass
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()


def test_the_cli_refuses_a_directory_in_use_with_one_line_and_status_2(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / LOCK).write_text(f"{holder.pid} {socket.gethostname()}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "fedsim", "rounds=1", f"output.dir={tmp_path}", f"hydra.run.dir={tmp_path / 'hydra'}"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"fedsim: error: output.dir {tmp_path} is in use by another fedsim run")


def test_resuming_with_a_changed_config_is_refused_naming_the_keys(tmp_path: Path) -> None:
    run_local(small(rounds=2), tmp_path / "run")
    changed = small(rounds=2, resume=str(tmp_path / "run"), seed=4)
    changed["model"] = {"name": "mlp", "hidden_sizes": [16]}
    changed["simulation"]["num_workers"] = 1  # how the run executes may change
    with pytest.raises(ConfigError, match=r"config key 'resume': the run at .* was made with other values of "
                                          r"model\.hidden_sizes, seed; a resumed run keeps its own config"):  # fmt: skip
        run(from_dict(changed), tmp_path / "elsewhere")
    # From the command line, only the keys the user set are compared (the rest are defaults).
    saved = from_dict(small()).to_dict()
    given = from_dict({"resume": "x", "simulation": {"num_workers": 1}, "checkpoint": {"every": 5}}).to_dict()
    assert changed_keys(saved, given, ["resume", "simulation.num_workers", "checkpoint.every"]) == []
    assert changed_keys(saved, given, ["resume", "rounds", "privacy"]) == ["privacy.dpsgd", "rounds"]
    assert changed_keys(saved, from_dict(small()).to_dict(), ["experiment"]) == []
    assert changed_keys(saved, given, ["experiment"])  # an experiment sets keys we cannot name: all compared


def test_the_cli_refuses_a_resume_with_other_values_with_one_line(tmp_path: Path) -> None:
    run_local(small(rounds=2), tmp_path / "run")
    cmd = [sys.executable, "-m", "fedsim", f"resume={tmp_path / 'run'}", "rounds=9", "model.hidden_sizes=[4]",
           "simulation.num_workers=1", f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedsim: error: config key 'resume': the run at ") and "model.hidden_sizes, rounds;" in last, last
    rows = json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"]
    assert rows == 2  # untouched
