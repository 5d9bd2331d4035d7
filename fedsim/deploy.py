"""`fedsim engine=deployment superlink=HOST:PORT`: the same run on a running SuperLink.

fedsim is a Flower App ([tool.flwr.app] in pyproject.toml). This module starts it with
`flwr run <fedsim's project dir> <superlink> --stream`, the resolved config travelling as the
run config entry `fedsim-config`, and waits for the run to end. The ServerApp runs on the
SuperLink's machine; the SuperNodes there run fedsim's ClientApp (docs/distributed.md).

Outputs. The ServerApp writes the run directory (metrics.jsonl, summary.json, model.pt, ...)
at `output.dir`, which is this run's directory: on the same machine or a shared file system
it fills as the run goes. When it ends, the ServerApp also prints each output file on its
log stream, gzip + base64 in framed lines (`FRAME` below), and this module writes them into
the run directory: outputs arrive with no shared file system and no other channel than the
one `flwr` already has. A fedsim error in the ServerApp (say, every worker lacks its data)
arrives as one framed line and ends this command with exit status 2, like a local run.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedsim.config import FedsimConfig, resolve_paths
from fedsim.errors import ConfigError, FedsimError, RunInterrupted

RUN_CONFIG_KEY = "fedsim-config"  # the run config entry holding the resolved config (pyproject.toml)
FRAME = "@fedsim-output"  # FRAME <relative path> <chunk index> <chunks> <base64 of gzip chunk>
ERROR = "@fedsim-error"  # ERROR <one line>
_STARTED = re.compile(r"Successfully started run (\d+)")
CHUNK = 48_000  # base64 characters per framed line
MAX_SHIPPED_BYTES = 256 * 2**20  # files larger than this stay on the SuperLink's machine only


def project_dir() -> Path:
    """fedsim's project directory (the Flower App that `flwr run` bundles)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise FedsimError(f"engine=deployment runs fedsim from its source tree; no Flower App in {root}")
    return root


def run_deployment(cfg: FedsimConfig, run_dir: str | Path) -> dict[str, Any]:
    """Start `cfg` on the SuperLink `cfg.superlink`, stream its log, collect its outputs into
    `run_dir`; returns the run's summary."""
    if cfg.superlink_ca is not None and not Path(cfg.superlink_ca).expanduser().is_file():
        # Checked here, on the launcher's machine: the ServerApp and workers never read it.
        raise ConfigError("superlink_ca", f"no such file: {cfg.superlink_ca}")
    resolve_paths(cfg)
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.output.dir = str(run_dir)
    flwr = shutil.which("flwr", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if flwr is None:
        raise FedsimError("engine=deployment needs Flower's `flwr` command; install fedsim with scripts/setup.sh")
    with tempfile.TemporaryDirectory(prefix="fedsim-flwr-") as tmp:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        connection = str(cfg.superlink)
        if ":" in connection:  # HOST:PORT: a connection of our own, in a private FLWR_HOME
            env["FLWR_HOME"] = tmp
            (Path(tmp) / "config.toml").write_text(superlink_toml(connection, cfg.superlink_ca))
            connection = "fedsim"
        run_config = Path(tmp) / "run_config.toml"
        # json.dumps of a string is a valid TOML basic string (same escapes, ASCII only).
        run_config.write_text(f"{RUN_CONFIG_KEY} = {json.dumps(cfg.to_json())}\n")
        cmd = [flwr, "run", str(project_dir()), connection, "--run-config", str(run_config), "--stream"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        collected = Collector()
        try:
            tail = collected.feed(proc.stdout, echo=sys.stderr)
            code = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C ends `flwr run`, not the run: stop it on the SuperLink too.
            proc.terminate()
            raise RunInterrupted(stop_run(flwr, collected.run_id, connection, env, cfg.superlink)) from None
    collected.write(run_dir)
    if collected.error:
        raise FedsimError(collected.error)
    summary = run_dir / "summary.json"
    if code != 0 or not summary.is_file():
        # flwr draws its errors in boxes: keep the words.
        words = " ".join(" ".join(line.strip(" \n│╭╮╯╰─").split()) for line in tail[-4:])
        last = " ".join(words.split())
        raise FedsimError(f"the run on SuperLink {cfg.superlink} did not finish (flwr exit status {code}): {last}")
    return json.loads(summary.read_text())


STOP_TIMEOUT_S = 45.0  # for `flwr stop` to answer after Ctrl-C


def stop_run(flwr: str, run_id: int | None, connection: str, env: dict[str, str], superlink: str | None) -> str:
    """`flwr stop RUN_ID`; returns the line to show."""
    if run_id is None:
        return f"interrupted before the SuperLink {superlink} started the run"
    # Its own process group, killed whole on timeout: subprocess.run(timeout=) kills only the
    # child and then waits without a timeout for pipes that a grandchild may still hold open.
    try:
        proc = subprocess.Popen([flwr, "stop", str(run_id), connection], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    except OSError as err:
        return f"interrupted, but run {run_id} could not be stopped on {superlink} ({err}): flwr stop {run_id}"
    try:
        out, _ = proc.communicate(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        why = f"flwr stop gave no answer within {STOP_TIMEOUT_S:g} s"
    else:
        if proc.returncode == 0:
            return f"interrupted: run {run_id} stopped on the SuperLink {superlink}"
        why = " ".join((out or "").strip().splitlines()[-1:])
    return f"interrupted, but run {run_id} could not be stopped on {superlink} ({why}): flwr stop {run_id}"


def superlink_toml(address: str, ca: str | None) -> str:
    """A Flower CLI config with one SuperLink connection named "fedsim" (TLS when `ca` is set)."""
    lines = ["[superlink]", 'default = "fedsim"', "", "[superlink.fedsim]", f"address = {json.dumps(address)}"]
    if ca:
        lines.append(f"root-certificates = {json.dumps(str(Path(ca).expanduser().absolute()))}")
        lines.append("insecure = false")
    else:
        lines.append("insecure = true")
    return "\n".join(lines) + "\n"


class Collector:
    """Reassembles the framed output files (and a fedsim error) from `flwr run --stream`'s lines."""

    def __init__(self) -> None:
        self.chunks: dict[str, dict[int, str]] = {}
        self.totals: dict[str, int] = {}
        self.error: str | None = None
        self.run_id: int | None = None  # from flwr's "Successfully started run N"

    def feed(self, lines: Iterable[str], *, echo: Any = None) -> list[str]:
        """Consume `lines`; other lines are echoed (the run's log). Returns the last echoed lines."""
        tail: list[str] = []
        for line in lines:
            at = line.find(FRAME)
            if at >= 0:
                try:
                    _, rel, index, total, data = line[at:].split()
                    self.chunks.setdefault(rel, {})[int(index)] = data
                    self.totals[rel] = int(total)
                except ValueError:  # a frame mangled on the way: its file stays incomplete
                    pass
                continue
            if self.run_id is None and (started := _STARTED.search(line)):
                self.run_id = int(started.group(1))
            at = line.find(ERROR)
            if at >= 0:
                self.error = line[at + len(ERROR) :].strip()
                continue
            # After a fedsim error only Flower's report of the ServerApp's exception follows
            # (a traceback): the error's one line is what the user gets (exit status 2).
            if echo is not None and self.error is None and not _flower_chatter(line):
                echo.write(line)
                echo.flush()
            tail = [*tail[-9:], line]
        return tail

    def write(self, run_dir: Path) -> list[str]:
        """Write every complete file that `run_dir` lacks (relative paths only); returns their names.

        Files already there are left alone: on the same file system the ServerApp wrote them
        itself, and this command's own files (Hydra's log) are newer than the shipped copies.
        """
        written = []
        for rel, parts in self.chunks.items():
            if len(parts) != self.totals[rel] or Path(rel).is_absolute() or ".." in Path(rel).parts:
                continue
            target = run_dir / rel
            if target.exists():
                continue
            data = gzip.decompress(base64.b64decode("".join(parts[i] for i in range(self.totals[rel]))))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            written.append(rel)
        return written


def _flower_chatter(line: str) -> bool:
    """Flower's own DEBUG lines and empty INFO lines from the ServerApp process."""
    head, _, rest = line.partition(":DEBUG:")
    if rest and head[:2].isdigit():
        return True
    head, _, rest = line.partition(":INFO:")
    return bool(head[:2].isdigit() and head and not rest.strip())


def ship_outputs(run_dir: Path, *, out: Any = None) -> None:
    """ServerApp side: print every file of the run directory as framed lines (see `Collector`)."""
    out = out or sys.stdout
    # Smallest first (summary.json, metrics.jsonl before model.pt): Flower gives the log upload
    # a few seconds after the ServerApp returns, so whatever is cut off is the least needed.
    # Checkpoints stay on the SuperLink's machine (resume is for the simulation engine).
    files = [p for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(run_dir).parts]
    for path in sorted(files, key=lambda p: (p.stat().st_size, p.as_posix())):
        if path.stat().st_size > MAX_SHIPPED_BYTES:
            out.write(f"[fedsim] {path} is larger than {MAX_SHIPPED_BYTES >> 20} MB: it stays on the SuperLink's machine\n")
            continue
        data = base64.b64encode(gzip.compress(path.read_bytes(), mtime=0)).decode()
        rel = path.relative_to(run_dir).as_posix()
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [""]
        for i, chunk in enumerate(chunks):
            out.write(f"{FRAME} {rel} {i} {len(chunks)} {chunk}\n")
    out.flush()


def ship_error(message: str, *, out: Any = None) -> None:
    out = out or sys.stdout
    out.write(f"{ERROR} {message.splitlines()[0] if message else 'error'}\n")
    out.flush()
