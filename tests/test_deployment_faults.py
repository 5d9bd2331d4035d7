"""Faults on the deployment engine: a SuperNode killed mid-run, one paused (SIGSTOP) for longer
than the round timeout. Apart from test_deployment.py so that pytest-xdist can run these two
long tests (mostly waiting on timeouts) beside the others."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from deployment_cluster import Cluster, finish, in_process, start_run, synthetic, wait_for_first_round

pytestmark = pytest.mark.ray


def test_a_supernode_killed_mid_run_loses_no_device_and_nothing_hangs(cluster: Cluster, tmp_path: Path) -> None:
    nodes = [cluster.add_node() for _ in range(3)]
    raw = synthetic(tmp_path, rounds=3, engine="deployment", superlink=cluster.address)
    # Groups of at most 3 devices (8 devices: 4 groups of 2): every worker has a job each round.
    # The kill comes after round 1, so every SuperNode's first ClientApp start (torch import,
    # tens of seconds on a loaded machine) is behind us; the round after the kill waits the
    # whole timeout for the dead worker. A live worker late under load is tolerated below.
    raw["simulation"] |= {"num_workers": 3, "round_timeout_s": 30, "device_group": 3}
    proc, metrics = start_run(cluster, tmp_path, raw)
    wait_for_first_round(proc, metrics)
    cluster.kill(nodes[0])
    output = finish(proc)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads(metrics.with_name("summary.json").read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 3
    # The killed worker is late (suspended) or, once the SuperLink stops listing it, lost. On a
    # loaded machine a live worker may be late too, but not lost (that takes 5 missed
    # deadlines in a row), and the killed one is one of the two.
    assert len(summary["workers_lost"]) <= 1 and summary["workers_late"] | summary["workers_lost"], summary
    # Its job went to the others: every sampled device trained...
    assert sum(r["devices_failed"] for r in rows) == 0 and sum(r["worker_retries"] for r in rows) >= 1
    # ... so the model is the in-process one, bit for bit.
    local = synthetic(tmp_path, rounds=3)
    local["simulation"]["device_group"] = 3
    assert summary["model_sha256"] == in_process(local, tmp_path / "local")["model_sha256"]


def test_a_supernode_paused_longer_than_the_timeout_is_kept_and_the_model_is_unchanged(
    cluster: Cluster, tmp_path: Path
) -> None:
    nodes = [cluster.add_node() for _ in range(2)]
    raw = synthetic(tmp_path, rounds=5, engine="deployment", superlink=cluster.address)
    # 4 groups of 2 over 2 workers: both have a job every round. The pause must outlast the
    # timeout (so the worker is late) and end well before the SuperLink stops listing the node:
    # it lists a node until 2 x 30 s after its last heartbeat, and a SuperNode sends one every
    # (30 - 5) x 0.7-0.9 s (flwr.supercore.heartbeat), so the pause may start up to 22.5 s after
    # the last one. A 40 s pause left 60 - 22.5 - 40 = -2.5 s (a CI run lost the node that way);
    # 25 s leaves 12.5 s for the heartbeat after SIGCONT. A loaded machine may make healthy
    # workers late too, so only the engine may drop a worker here (max_missed_rounds 10) and a
    # round has retries to spare.
    raw["simulation"] |= {"num_workers": 2, "round_timeout_s": 10, "max_missed_rounds": 10, "retries": 4,
                          "device_group": 3}  # fmt: skip
    proc, metrics = start_run(cluster, tmp_path, raw)
    wait_for_first_round(proc, metrics)
    os.killpg(nodes[0].pid, signal.SIGSTOP)  # the SuperNode and its ClientApp process
    try:
        time.sleep(25)
    finally:
        os.killpg(nodes[0].pid, signal.SIGCONT)
    output = finish(proc)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads(metrics.with_name("summary.json").read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert summary["workers_lost"] == {} and len(summary["workers_late"]) >= 1, summary
    assert all(r["workers_lost"] == 0 for r in rows) and sum(r["devices_failed"] for r in rows) == 0
    local = synthetic(tmp_path, rounds=5)
    local["simulation"]["device_group"] = 3
    assert summary["model_sha256"] == in_process(local, tmp_path / "local")["model_sha256"]

