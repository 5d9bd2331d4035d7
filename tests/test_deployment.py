"""The same fedsim app on Flower's deployment engine: a SuperLink and two SuperNodes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim.config import from_dict, resolve_paths
from fedsim.run import run

# slow: it passed in one clean CI run and timed out waiting for the SuperLink in another;
# kept out of the CI set until that is understood (FEDSIM_SLOW=1 runs it).
pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, log: Path, *, timeout_s: float = 120.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port (the SuperLink is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s:.0f} s; SuperLink log:\n{log.read_text()[-2000:]}")


def test_superlink_and_two_supernodes_train_the_in_process_model(tmp_path: Path) -> None:
    raw = {
        "seed": 4, "population": 40, "rounds": 2, "cohort": {"size": 8},
        "dataset": {"name": "synthetic", "size_max": 60}, "model": {"name": "mlp", "hidden_sizes": [16]},
        "simulation": {"num_workers": 2, "round_timeout_s": 120, "ray_temp_dir": str(tmp_path / "ray")},
        "output": {"progress": False, "dir": str(tmp_path / "deployed")},
    }  # fmt: skip
    link = free_port()
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_LOG_LEVEL": "WARNING"}
    procs = []
    log = open(tmp_path / "superlink.log", "w")  # noqa: SIM115 - closed below
    try:
        procs.append(subprocess.Popen(
            [BIN / "flower-superlink", "--insecure", "--port", str(link), "--disable-runtime-dependency-installation"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
        wait_for_port(link, tmp_path / "superlink.log")
        for _ in range(2):
            procs.append(subprocess.Popen(
                [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(free_port())],
                env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            ))  # fmt: skip
        cfg_json = resolve_paths(from_dict(raw)).to_json()
        flwr = subprocess.run(
            [BIN / "flwr", "run", str(REPO), "local", "--run-config", f"fedsim-config='{cfg_json}'", "--stream"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert flwr.returncode == 0, (flwr.stdout + flwr.stderr)[-3000:]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        log.close()
    deployed = json.loads((tmp_path / "deployed" / "summary.json").read_text())
    assert deployed["num_workers"] == 2 and deployed["rounds"] == 2
    raw["output"]["dir"] = None
    local = run(from_dict(raw), tmp_path / "in_process")
    assert deployed["model_sha256"] == local["model_sha256"]
