"""Chaos: workers killed and frozen mid-run (faults.worker_*), devices failing, user-level DP
and SecAgg+ on: the run ends where the same run without worker faults ends, model and epsilon.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fake_grid import LocalGrid, run_local, set_flower_identity
from fedsim.config import from_dict
from fedsim.run import run
from fedsim.server_app import run_rounds
from fedsim.transport import worker_faults


def chaos_config(tmp: Path, rounds: int, **faults: float) -> dict:
    return {
        "seed": 5, "population": 40, "rounds": rounds, "cohort": {"size": 8, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 30}, "model": {"name": "mlp", "hidden_sizes": [8]},
        # Fixed-size cohorts: with SecAgg+ and DP-FedAvg, Poisson cohorts are refused (config.validate).
        "privacy": {"dpfedavg": {"noise_multiplier": 1.0, "clip_norm": 1.0, "accountant": "rdp"}}, "secagg": {"name": "secaggplus", "max_corrupt_fraction": 0.1, "correctness_bits": 6},
        # (A cohort of 8 with 10% failing devices cannot also hold against a third colluding at 2^-20 aborts.)
        "faults": {"device_failure_rate": 0.1, **faults},
        # Generous: a killed Ray worker is replaced by a new process that imports torch (tens of
        # seconds on a loaded machine), and a restarted secure round needs retries to spare.
        "simulation": {"num_workers": 2, "round_timeout_s": 10, "retries": 8, "max_missed_rounds": 30,
                       "device_group": 3, "ray_temp_dir": str(tmp / "ray")},
        "output": {"progress": False},
    }  # fmt: skip


def test_worker_faults_are_seeded_per_round_and_leave_other_randomness_alone() -> None:
    nodes = [11, 22, 33]
    plan = [worker_faults(seed=5, round_num=r, nodes=nodes, kill_rate=0.3, pause_rate=0.3, pause_s=7) for r in range(1, 41)]
    again = [worker_faults(seed=5, round_num=r, nodes=nodes, kill_rate=0.3, pause_rate=0.3, pause_s=7) for r in range(1, 41)]
    assert plan == again  # seeded
    kinds = [f for faults in plan for f in faults.values()]
    assert 4 <= kinds.count("kill") <= 20 and 4 <= kinds.count("pause:7") <= 20
    assert all(len(set(faults)) == len(faults) for faults in plan)  # never two faults on one worker
    assert worker_faults(seed=5, round_num=1, nodes=nodes, kill_rate=0, pause_rate=0, pause_s=7) == {}
    # Flower's node ids are uint64: ids on both sides of 2**63 are faulted as themselves (numpy
    # had made them floats, which matched no node, and the slow chaos run went fault-free).
    big = [6535255403393455422, 11730454361926632953]
    hits = [worker_faults(seed=5, round_num=r, nodes=big, kill_rate=0.5, pause_rate=0.5, pause_s=7) for r in range(1, 21)]
    assert {type(n) for faults in hits for n in faults} == {int} and {n for faults in hits for n in faults} == set(big)
    assert [sorted(f.values()) for f in hits] == [
        sorted(worker_faults(seed=5, round_num=r, nodes=[1, 2], kill_rate=0.5, pause_rate=0.5, pause_s=7).values())
        for r in range(1, 21)
    ]


def test_a_secure_round_restarts_when_a_worker_misses_a_stage_and_ends_where_the_fault_free_run_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_flower_identity(monkeypatch)
    cfg = from_dict(chaos_config(tmp_path, rounds=3))
    clean = run_rounds(cfg, LocalGrid(2), tmp_path / "clean")
    grid = LocalGrid(2)
    grid.paused_until = {grid.nodes[0]: 25.0}  # frozen through round 1's first stage (timeout 10 s)
    faulty = run_rounds(cfg, grid, tmp_path / "faulty", clock=grid.clock)
    rows = [json.loads(line) for line in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["worker_retries"] >= 1 and faulty["workers_lost"] == {}  # restarted, the worker kept
    assert [r["devices_trained"] for r in rows] == [
        json.loads(line)["devices_trained"] for line in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()
    ]
    assert faulty["model_sha256"] == clean["model_sha256"]
    assert faulty["privacy"]["user_level"]["epsilon"] == clean["privacy"]["user_level"]["epsilon"]


@pytest.mark.ray
@pytest.mark.slow  # a 30-round Ray run, workers frozen for longer than the timeout: minutes on 2 loaded cores
def test_thirty_rounds_of_dpfedavg_and_secagg_with_workers_killed_and_frozen_end_like_the_fault_free_run(
    tmp_path: Path,
) -> None:
    clean = run_local(from_dict(chaos_config(tmp_path, rounds=30)), tmp_path / "clean")  # fault-free, in-process grid
    chaos = run(from_dict(chaos_config(tmp_path, rounds=30, worker_kill_rate=0.1, worker_pause_rate=0.1,
                                       worker_pause_s=12)), tmp_path / "chaos")  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "chaos" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and chaos["stopped_early"] is None
    assert sum(r["worker_retries"] for r in rows) >= 2  # the faults did hit rounds
    assert sum(r["devices_failed"] for r in rows) > 0  # and devices failed, the same ones in both runs
    assert chaos["model_sha256"] == clean["model_sha256"]
    assert chaos["privacy"]["user_level"]["epsilon"] == clean["privacy"]["user_level"]["epsilon"]


class GarblingGrid(LocalGrid):
    """A LocalGrid whose first worker's masked-input reply arrives malformed: its report
    without its device list, one masked vector cut short, or vectors under keys that are not
    its devices' positions (`how`)."""

    def __init__(self, how: str) -> None:
        super().__init__(2)
        self.how, self.garbled = how, 0

    def answer(self, message, node):  # noqa: ANN001, ANN201 - as LocalGrid.answer
        reply = super().answer(message, node)
        job = message.content.config_records.get("job")
        if node != self.nodes[0] or job is None or job.get("stage") != "masked_input" or reply.has_error():
            return reply
        self.garbled += 1
        if self.how == "report":
            del reply.content.config_records["devices"]
        elif self.how == "key":  # one vector under a key that is no position, one under another worker's
            arrays = reply.content.array_records["masked"]
            first, second = list(arrays)[:2]
            arrays["x" + first] = arrays.pop(first)
            arrays["0" if second != "0" and "0" not in arrays else "99"] = arrays.pop(second)
        else:
            arrays = reply.content.array_records["masked"]
            key = next(iter(arrays))
            arr = arrays[key]
            arrays[key] = type(arr)(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data[:-4])
        return reply


@pytest.mark.parametrize("how", ["report", "vector", "key"])
def test_a_malformed_masked_input_reply_leaves_its_devices_out_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    set_flower_identity(monkeypatch)
    cfg = from_dict(chaos_config(tmp_path, rounds=2))
    clean = run_rounds(cfg, LocalGrid(2), tmp_path / "clean")
    grid = GarblingGrid(how)
    garbled = run_rounds(cfg, grid, tmp_path / "garbled")  # no BadReply escapes: the server goes on
    rows = [json.loads(line) for line in (tmp_path / "garbled" / "metrics.jsonl").read_text().splitlines()]
    clean_rows = [json.loads(line) for line in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    assert grid.garbled == 2 and len(rows) == 2
    # The garbled worker's devices (a whole reply, or the one device whose vector was cut) are
    # not in the sum: fewer devices aggregated than in the clean run, and a different model.
    for r, c in zip(rows, clean_rows, strict=True):
        assert r["secagg_survivors_masked_input"] - r["secagg_devices_rejected"] < c["secagg_survivors_masked_input"]
        assert r["devices_trained"] < c["devices_trained"]  # (0: too few survivors, the round aborted)
    assert garbled["model_sha256"] != clean["model_sha256"]
