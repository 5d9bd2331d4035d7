"""The simulation engine attached to a running Ray cluster (`ray start --head` on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedsim.config import from_dict
from fedsim.run import run
from fake_grid import run_local
from helpers import free_port, listening

pytestmark = pytest.mark.ray
BIN = Path(sys.executable).parent


def config(tmp: Path, **simulation: object) -> dict:
    # SecAgg+ in the active threat model: its key registry (fedsim.pki) is a Ray actor the
    # launcher creates on the cluster, which the workers (cluster processes) find by job id.
    return {
        "seed": 6, "population": 40, "rounds": 2, "cohort": {"size": 8, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 60}, "model": {"name": "mlp", "hidden_sizes": [16]},
        "secagg": {"name": "secaggplus", "bits": 16, "threat_model": "active"},
        "simulation": {"num_workers": 2, "ray_temp_dir": str(tmp / "ray"), **simulation},
        "output": {"progress": False},
    }  # fmt: skip


def test_simulation_attached_to_a_ray_head_trains_the_same_model_with_active_secagg(tmp_path: Path) -> None:
    port = free_port()
    # Ray's unix sockets live under its temp dir: keep the path short (AF_UNIX limit of 107 bytes).
    ray_tmp = Path(tempfile.mkdtemp(prefix="fsrh", dir="/tmp"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", str(ray_tmp), "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not listening(port):
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not start within 120 s"
            time.sleep(0.5)
        attached = run(from_dict(config(tmp_path, ray_address=f"127.0.0.1:{port}")), tmp_path / "attached")
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: stopping `ray start` stops the head's processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    assert attached["num_workers"] == 2
    local = run_local(from_dict(config(tmp_path)), tmp_path / "local")  # the in-process grid and registry
    assert attached["model_sha256"] == local["model_sha256"]
    rows = [json.loads(line) for line in (tmp_path / "attached" / "metrics.jsonl").read_text().splitlines()]
    assert [r["devices_failed"] for r in rows] == [0, 0]
    # Every device registered, signed the survivor set and had its signatures verified.
    for r in rows:
        assert "secagg_aborted" not in r and r["secagg_devices_rejected"] == 0, r
        assert r["secagg_survivors_consistency"] == r["secagg_survivors_unmask"] == 8
    # Nothing of the head is left running (its processes name its temp dir on their command lines).
    time.sleep(1)
    leftovers = subprocess.run(["pgrep", "-af", str(ray_tmp)], capture_output=True, text=True).stdout
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leftovers.strip(), leftovers[:500]
