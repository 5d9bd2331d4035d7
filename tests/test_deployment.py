"""The same fedsim app on Flower's deployment engine: a SuperLink and SuperNodes on loopback.

Each test starts its own SuperLink and SuperNodes as local processes (insecure mode), runs a
short experiment through them with `fedsim engine=deployment superlink=127.0.0.1:PORT`, and
compares with the in-process simulation of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployment_cluster import Cluster, in_process, synthetic
from fedsim.config import from_dict
from fedsim.run import run

pytestmark = pytest.mark.ray


def test_fedsim_on_a_superlink_over_tls_trains_the_in_process_model(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, tls=True)
    try:
        deployed_with_tls(cluster, tmp_path)
    finally:
        cluster.stop()


def deployed_with_tls(cluster: Cluster, tmp_path: Path) -> None:
    for _ in range(2):
        cluster.add_node()
    out = tmp_path / "deployed"
    cmd = [
        sys.executable, "-m", "fedsim", "engine=deployment", f"superlink={cluster.address}", f"superlink_ca={cluster.ca}",
        "seed=4", "population=40",
        "rounds=2", "cohort.size=8", "cohort.sampling=fixed", "dataset.size_max=60", "model=mlp", "model.hidden_sizes=[16]",
        "simulation.num_workers=2", "simulation.round_timeout_s=60", f"output.dir={out}", f"hydra.run.dir={out}",
        "privacy.randomness=reproducible",  # engine=deployment defaults to secure (never reproducible)
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "round 2/2" in proc.stderr  # the ServerApp's progress lines, streamed back
    for name in ("metrics.jsonl", "summary.json", "model.pt", "config.yaml"):
        assert (out / name).is_file(), name
    deployed = json.loads((out / "summary.json").read_text())
    assert deployed["num_workers"] == 2 and deployed["rounds"] == 2 and deployed["workers_lost"] == {}
    local = in_process(synthetic(tmp_path), tmp_path / "in_process")
    assert deployed["model_sha256"] == local["model_sha256"]

    from analysis import write_report

    assert write_report(out).is_file()  # the analysis reads the collected run directory unchanged


def test_a_worker_without_its_data_says_so_in_the_metrics(
    cluster: Cluster, tmp_path: Path, femnist_dir: Path
) -> None:
    cluster.add_node()
    cluster.add_node(node_config="fedsim-data='/nonexistent/femnist'")  # this machine has no copy of the data
    # One round: each round costs ~30 s here (ClientApp process start-ups and a retry), and
    # one shows the failed setup, the retry and that no device was lost.
    raw = synthetic(tmp_path, engine="deployment", superlink=cluster.address, population=20, rounds=1,
                    dataset={"name": "femnist", "path": str(femnist_dir.resolve())})  # fmt: skip
    raw["cohort"]["size"] = 6
    raw["simulation"]["device_group"] = 2  # 3 groups of 2: both workers get a job
    summary = run(from_dict(raw), tmp_path / "deployed")
    rows = [json.loads(line) for line in (tmp_path / "deployed" / "metrics.jsonl").read_text().splitlines()]
    errors = [e for r in rows for e in r.get("worker_errors", [])]
    assert errors and all("/nonexistent/femnist" in e and "worker setup failed" in e for e in errors), errors
    # The job went to the worker that has the data: no device was lost.
    assert sum(r["devices_failed"] for r in rows) == 0 and summary["rounds"] == 1 and rows[0]["devices_trained"] == 6


def test_when_no_worker_has_the_data_the_run_stops_with_one_line(
    cluster: Cluster, tmp_path: Path, femnist_dir: Path
) -> None:
    cluster.add_node(node_config="fedsim-data='/nonexistent/femnist'")
    out = tmp_path / "deployed"
    cmd = [
        sys.executable, "-m", "fedsim", "engine=deployment", f"superlink={cluster.address}", "dataset=femnist",
        f"dataset.path={femnist_dir.resolve()}", "population=20", "rounds=3", "cohort.size=4", "model=mlp", "model.hidden_sizes=[8]",
        # A fixed cohort: a Poisson one (the default) is empty in round 1 once in 87 runs (0.8^20;
        # the deployment engine draws cohorts from fresh entropy), and round 1 then has no job to fail.
        "cohort.sampling=fixed",
        "simulation.num_workers=1", "simulation.retries=0", f"output.dir={out}", f"hydra.run.dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedsim: error: round 1: every worker failed: worker ") and "/nonexistent/femnist" in last, last
    assert "Traceback" not in proc.stderr
    # Nothing lost: the run directory holds what the run did before it stopped.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["devices_trained"] == 0 and "/nonexistent/femnist" in rows[0]["worker_errors"][0]


def _terminal_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_run_on_the_superlink_too(cluster: Cluster, tmp_path: Path) -> None:
    cluster.add_node()
    out = tmp_path / "deployed"
    cmd = [
        sys.executable, "-m", "fedsim", "engine=deployment", f"superlink={cluster.address}", "population=40", "rounds=40",
        "cohort.size=8", "dataset.size_max=60", "simulation.num_workers=1", f"output.dir={out}", f"hydra.run.dir={out}",
    ]  # fmt: skip
    # Its own session, like a terminal's foreground job: Ctrl-C reaches fedsim and its `flwr run`.
    # And with SIGINT as a terminal leaves it (default action), whatever this test process's
    # earlier tests (in-process Ray and Flower runs) did to its own disposition.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_terminal_sigint)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "round 1 did not finish"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("fedsim: interrupted: run ") and "stopped on the SuperLink" in err
    rows = len(metrics.read_text().splitlines())
    time.sleep(15)  # a round takes ~8 s here: a run still going would have logged another
    assert len(metrics.read_text().splitlines()) == rows < 40
