"""Retries, late and lost workers (fedsim.transport), against a fake grid and a fake clock.

No processes, no Ray, no sleeps: the fake grid answers a message when the fake clock has
reached the time its worker would answer (never, for a dead one), so every timing case is
exact and the same on a loaded machine as on an idle one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Error, Message

from fake_grid import ClockedGrid, FakeClock, set_flower_identity
from fedsim import wire
from fedsim.exchange import collect
from fedsim.transport import Workers, send_with_retries
from fedsim.reports import DeviceReport

NUM_PARAMS = 3
TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def flower_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_flower_identity(monkeypatch)


class FakeGrid(ClockedGrid):
    """Workers that train instantly (device d's update is [d, d, d]) unless paused, dead or failing."""

    def __init__(self, clock: FakeClock, nodes: list[int]) -> None:
        super().__init__(nodes, clock)
        self.failing: set[int] = set()  # answers with an error

    def answer(self, message: Message, node: int) -> Message:
        if node in self.failing:
            return Message(Error(code=2, reason="worker setup failed: no data"), reply_to=message)
        devices = wire.read_job(message.content).device_ids
        report = DeviceReport(
            device_ids=list(devices),
            updates=[np.full(NUM_PARAMS, float(d), dtype=np.float32) for d in devices],
            num_examples=[1] * len(devices),
            losses=[0.5] * len(devices),
        )
        return Message(wire.write_report(report), reply_to=message)


def jobs_for(plan: dict[int, list[int]], round_num: int = 1) -> list[tuple[int, object]]:
    return [
        (node, wire.write_job(round_num=round_num, device_ids=ids, config_json="{}", global_params=np.zeros(NUM_PARAMS, np.float32)))
        for node, ids in plan.items()
    ]  # fmt: skip


def setup(nodes: int = 3, *, max_missed: int = 3) -> tuple[FakeClock, FakeGrid, Workers]:
    clock = FakeClock()
    grid = FakeGrid(clock, list(range(1, nodes + 1)))
    return clock, grid, Workers(grid.get_node_ids(), timeout_s=TIMEOUT, max_missed_rounds=max_missed, clock=clock)


def round_of(grid: FakeGrid, workers: Workers, round_num: int = 1, retries: int = 2):
    alive = workers.wait_for_alive(grid)
    devices = list(range(6))
    plan = {node: part.tolist() for node, part in zip(alive, np.array_split(devices, len(alive)), strict=False)}
    return send_with_retries(grid, jobs_for(plan, round_num), round_num=round_num, workers=workers, retries=retries)


def summed_devices(delivery) -> list[int]:
    running, _, reports = collect(delivery.replies, NUM_PARAMS)
    return sorted(d for r in reports for d in r.device_ids)


def test_a_slow_worker_is_late_not_lost_and_gets_work_again_once_it_answers() -> None:
    clock, grid, workers = setup()
    grid.paused_until[1] = 25.0  # SIGSTOPped for 25 s: longer than the 10 s timeout
    first = round_of(grid, workers)
    assert first.late == [1] and summed_devices(first) == list(range(6))  # its job went elsewhere
    assert workers.lost == {} and workers.suspended == [1]
    assert workers.alive(grid) == [2, 3]  # suspended: no new job while it is silent
    clock.t = 26.0  # it woke up and answered its old job
    assert workers.alive(grid) == [1, 2, 3]
    workers.drop_unclaimed()  # end of round: its job had been answered by the resend
    assert workers.late_replies_discarded == 1 and workers.late_count == {1: 1} and workers.lost == {}
    second = round_of(grid, workers, round_num=2)
    assert second.late == [] and second.resent == 0 and {n for n, _ in grid.sent[-3:]} == {1, 2, 3}


def test_a_dead_worker_still_listed_is_lost_after_max_missed_rounds_of_silence() -> None:
    clock, grid, workers = setup(max_missed=3)
    round_of(grid, workers)  # every worker answers once: started
    grid.dead.add(2)  # SIGKILLed; the SuperLink lists it until its heartbeats time out
    round_of(grid, workers, round_num=2)
    assert workers.suspended == [2] and workers.lost == {}
    clock.t += 1.99 * TIMEOUT  # 2 deadlines missed in a row (the job's, one more of silence)...
    workers.alive(grid)
    assert workers.lost == {}
    clock.t += 0.02 * TIMEOUT  # ...and the third
    assert workers.alive(grid) == [1, 3]
    assert list(workers.lost) == [2] and "3 deadlines missed in a row" in workers.lost[2]


def test_a_worker_that_never_answered_is_starting_its_silence_is_not_counted() -> None:
    clock, grid, workers = setup(max_missed=2)
    grid.paused_until[3] = 200.0  # its first job: app install and torch import on a loaded machine
    round_of(grid, workers)
    clock.t = 150.0  # 14 timeouts of silence: a started worker would be long gone
    assert workers.alive(grid) == [1, 2] and workers.lost == {} and workers.suspended == [3]
    clock.t = 201.0
    assert workers.alive(grid) == [1, 2, 3]


def test_workers_that_never_answer_at_all_are_dropped_after_the_startup_allowance() -> None:
    clock, grid, workers = setup(nodes=2, max_missed=2)
    grid.dead |= {1, 2}
    delivery = round_of(grid, workers, retries=1)
    assert delivery.replies == [] and set(workers.lost) == {1, 2} and "every worker silent" in workers.lost[1]
    assert workers.startup_s <= clock.t < workers.startup_s + TIMEOUT + 2


def test_a_worker_the_engine_no_longer_lists_is_lost_at_once() -> None:
    clock, grid, workers = setup()
    grid.listed.discard(3)
    assert workers.alive(grid) == [1, 2] and "no longer listed" in workers.lost[3]
    grid.listed.add(3)  # a dropped worker stays dropped
    assert workers.alive(grid) == [1, 2]


def test_a_late_reply_for_a_resent_job_is_discarded_and_not_counted_twice() -> None:
    clock, grid, workers = setup(nodes=2)
    grid.paused_until[1] = 10.5  # answers half a second after the deadline
    delivery = round_of(grid, workers, retries=1)
    assert delivery.resent == 1 and delivery.late == [1]
    assert len(grid._replies) == 1  # worker 1's copy, still on its way
    devices = summed_devices(delivery)
    assert devices == list(range(6))  # each device once
    running, _, _ = collect(delivery.replies, NUM_PARAMS)
    assert running.count == 6 and torch.equal(running.total, torch.full((NUM_PARAMS,), float(sum(range(6))), dtype=torch.float64))
    clock.t = 11.0
    workers.alive(grid)  # the late copy is pulled now...
    workers.drop_unclaimed()  # ...and thrown away at the end of the round (run_rounds)
    assert workers.late_replies_discarded == 1 and grid._replies == {} and workers.suspended == []


def test_a_late_copy_that_answers_before_any_other_copy_is_used_once() -> None:
    clock, grid, workers = setup(nodes=2)
    grid.paused_until = {1: 15.0, 2: 40.0}  # the first send answers at 15 s, the resend at 40 s
    delivery = send_with_retries(grid, jobs_for({1: list(range(6))}), round_num=1, workers=workers, retries=1)
    assert summed_devices(delivery) == list(range(6)) and len(delivery.replies) == 1 and delivery.late == [1, 2]
    assert delivery.reply_jobs == [0]  # a late copy's reply still names its job
    clock.t = 41.0
    workers.alive(grid)
    workers.drop_unclaimed()
    assert workers.late_replies_discarded == 1  # the resend's reply: its job was already counted


def test_late_answers_do_not_reset_the_misses_in_a_row() -> None:
    clock, grid, workers = setup(nodes=2, max_missed=2)
    for round_num in (1, 2):  # worker 1 always answers 1 s after the deadline
        grid.paused_until[1] = clock.t + TIMEOUT + 1
        delivery = round_of(grid, workers, round_num=round_num)
        assert summed_devices(delivery) == list(range(6))
        clock.t += 2
        workers.alive(grid)
    assert 1 in workers.lost and "2 deadlines missed in a row" in workers.lost[1]


def test_an_answer_in_time_resets_the_misses_in_a_row() -> None:
    clock, grid, workers = setup(nodes=2, max_missed=2)
    for round_num in (1, 2, 3):
        if round_num != 2:  # late in rounds 1 and 3, in time in round 2
            grid.paused_until[1] = clock.t + TIMEOUT + 1
        round_of(grid, workers, round_num=round_num)
        clock.t += 2
        workers.alive(grid)
    assert workers.lost == {} and workers.late_count == {1: 2}


def test_when_every_worker_is_late_the_round_waits_for_one_to_answer_again() -> None:
    clock, grid, workers = setup(nodes=1, max_missed=5)
    grid.paused_until[1] = 35.0  # the only worker, paused for 35 s
    delivery = round_of(grid, workers)
    # Its own late reply is the job's first: used, nothing resent.
    assert summed_devices(delivery) == list(range(6)) and delivery.resent == 0
    assert 35.0 <= clock.t < 36.0 and workers.lost == {} and workers.late_count == {1: 1}


def test_when_every_worker_is_silent_they_are_all_lost_after_the_wait_and_nothing_is_delivered() -> None:
    clock, grid, workers = setup(nodes=2, max_missed=2)
    round_of(grid, workers)  # started
    grid.dead |= {1, 2}
    start = clock.t
    delivery = round_of(grid, workers, round_num=2)
    assert delivery.replies == [] and delivery.jobs_failed == 2 and set(workers.lost) == {1, 2}
    assert workers.wait_for_alive(grid) == []  # the run stops: "every worker is lost"
    # Not after 2 misses (no worker kept its deadline: it may be the machine), but when the
    # wait for any of them passes workers.startup_s.
    assert clock.t - start == pytest.approx(TIMEOUT + workers.startup_s, abs=1.1)


def test_when_every_worker_fails_each_retry_the_errors_say_why() -> None:
    clock, grid, workers = setup(nodes=2)
    grid.failing |= {1, 2}
    delivery = round_of(grid, workers, retries=2)
    assert delivery.replies == [] and delivery.jobs_failed == 2 and delivery.resent == 4
    assert len(delivery.errors) == 6 and all("worker setup failed: no data" in e for e in delivery.errors)
    assert workers.lost == {} and workers.suspended == []  # an error is an answer: not late
    assert clock.t < 1.0  # errors are not waited for


def test_retries_exhausted_leave_the_jobs_failed_and_the_rest_delivered() -> None:
    clock, grid, workers = setup(nodes=3)
    grid.failing.add(1)
    grid.failing.add(2)  # every retry of job 1 lands on a failing worker
    delivery = send_with_retries(
        grid, jobs_for({1: [0, 1], 3: [2, 3]}), round_num=1, workers=workers, retries=1
    )  # the retry of worker 1's job goes to worker 2 (the next one), which fails too
    assert summed_devices(delivery) == [2, 3] and delivery.jobs_failed == 1 and delivery.resent == 1
    assert [node for node, _ in grid.sent] == [1, 3, 2]
    assert delivery.reply_jobs == [1]  # the one good reply answers job 1 (worker 3's), by index


def test_a_failed_worker_job_moves_to_another_worker_and_the_sum_is_unchanged() -> None:
    clock, grid, workers = setup(nodes=3)
    grid.failing.add(2)
    delivery = round_of(grid, workers)
    running, _, _ = collect(delivery.replies, NUM_PARAMS)
    assert summed_devices(delivery) == list(range(6)) and delivery.jobs_failed == 1 and delivery.resent == 1
    assert running.total.tolist() == [15.0] * NUM_PARAMS
    # Each reply is checked against the job it answers (the resent job's reply too).
    plan = [ids for _, ids in [(n, wire.read_job(c).device_ids) for n, c in jobs_for({1: [0, 1], 2: [2, 3], 3: [4, 5]})]]
    checked, _, _ = collect(delivery.replies, NUM_PARAMS, job_devices=[plan[j] for j in delivery.reply_jobs])
    assert checked.count == 6 and sorted(delivery.reply_jobs) == [0, 1, 2]


def test_a_round_where_every_worker_is_late_does_not_stop_the_run(tmp_path) -> None:
    """The deployment engine's first round (app install, torch import) can outlast the timeout
    on every worker at once: that round's devices fail, the run goes on with the same workers."""
    from fake_grid import LocalGrid
    from fedsim.config import from_dict
    from fedsim.server_app import run_rounds

    cfg = from_dict({
        "seed": 1, "population": 20, "rounds": 3, "cohort": {"size": 4, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 30}, "model": {"name": "mlp", "hidden_sizes": [4]},
        "simulation": {"num_workers": 2, "round_timeout_s": TIMEOUT, "retries": 0, "vectorize": "off"},
        "output": {"progress": False, "dir": str(tmp_path)},
    })  # fmt: skip
    grid = LocalGrid(2)
    grid.paused_until = {node: 1.5 * TIMEOUT for node in grid.nodes}
    summary = run_rounds(cfg, grid, tmp_path, clock=grid.clock)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["devices_trained"] for r in rows] == [0, 4, 4] and rows[0]["workers_late"] == 2
    assert summary["stopped_early"] is None and summary["workers_lost"] == {}
    assert summary["workers_late"] == {str(n): 1 for n in grid.nodes} and summary["late_replies_discarded"] == 2


def test_a_late_error_reply_does_not_bring_a_worker_back() -> None:
    clock, grid, workers = setup(max_missed=5)
    round_of(grid, workers)  # started
    grid.failing.add(1)  # what the SuperLink sends for a node it gave up on is an error, too
    grid.paused_until[1] = clock.t + 25
    round_of(grid, workers, round_num=2)
    clock.t += 26
    assert 1 not in workers.alive(grid) and workers.late_replies_discarded == 1 and workers.suspended == [1]


def test_when_every_worker_is_always_late_none_is_dropped_and_every_round_delivers() -> None:
    """A machine too loaded for the timeout (seen: 40-90 s per message against 20 s): every
    worker misses every deadline, so none of them is to blame; their late replies are used."""
    clock, grid, workers = setup(nodes=2, max_missed=2)
    for round_num in (1, 2, 3):
        grid.paused_until = {1: clock.t + TIMEOUT + 3, 2: clock.t + TIMEOUT + 3}
        delivery = round_of(grid, workers, round_num=round_num, retries=1)
        assert summed_devices(delivery) == list(range(6))
    assert workers.lost == {} and workers.late_count == {1: 3, 2: 3}
