"""Workers ship one float64 sum per device group instead of a row per device (issue 18): the
round's total is the same bits as the server folding the rows itself, whatever the split of the
groups over workers; a NaN device still fails alone; a reply whose sums do not match its
devices is refused; and the sums are what crosses the wire (bytes per round)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients import flat_params
from fedsim import wire
from fedsim.config import from_dict
from fedsim.exchange import collect
from fedsim.placement import assign_devices, cohort_groups
from fedsim.worker import Worker
from helpers import set_keys

COHORT = [2, 3, 5, 8, 11, 13, 17, 19, 23, 29, 31, 37]  # 4 groups of 3 (simulation.device_group=3)


class _Reply:
    """What `collect` reads of a reply Message."""

    def __init__(self, content: object) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


def worker(**over: object) -> Worker:
    raw: dict = {
        "seed": 3,
        "population": 40,
        "cohort": {"size": 12},
        "dataset": {"name": "synthetic", "size_max": 60},
        "model": {"name": "mlp", "hidden_sizes": [16]},
        "algorithm": {"batch_size": 10, "local_epochs": 1},
        "simulation": {"vectorize": "off", "device_group": 3},
    }
    w = Worker(from_dict(set_keys(raw, over)))
    w.start = flat_params(w.model)  # type: ignore[attr-defined]  # the global weights (training moves w.model)
    return w


def round_total(w: Worker, nodes: int, sums: str | None, weighting: str = "examples", clip_norm: float | None = None):
    """Train the cohort split over `nodes` workers (all the same Worker: results do not depend on
    which process trains a device), each shipping sums or rows, and collect the replies."""
    start = w.start  # type: ignore[attr-defined]
    plan = assign_devices(COHORT, list(range(100, 100 + nodes)), "multiplexed", 3)
    replies = []
    for part in plan:
        report = w.train(start, 1, part[1], groups=part.groups, clip_norm=clip_norm, sums=sums)
        replies.append(_Reply(wire.write_report(report)))
    groups = cohort_groups(COHORT, 3)
    return collect(replies[::-1], len(start), weighting=weighting, groups=groups)  # type: ignore[arg-type]  # another order


@pytest.mark.parametrize("weighting", ["examples", "ones"])
def test_shipped_sums_equal_the_servers_fold_of_rows_bit_for_bit_for_any_number_of_workers(weighting: str) -> None:
    w = worker()
    clip = 0.05 if weighting == "ones" else None
    rows, stats_rows, _ = round_total(w, 1, None, weighting, clip)
    for nodes in (1, 2, 3, 4):
        total, stats, reports = round_total(w, nodes, weighting, weighting, clip)
        assert torch.equal(total.total, rows.total), nodes
        assert (total.count, total.weight) == (rows.count, rows.weight)
        assert total.count == 12 and (total.weight == 12.0) == (weighting == "ones")
        assert all(not r.updates and r.sums for r in reports)
        # 4 groups of 3 devices: 4 float64 vectors cross the wire instead of 12 float32 rows.
        vector_bytes = sum(8 * len(s) for r in reports for s in r.sums)
        assert vector_bytes == 4 * 8 * len(total.total)
        assert stats["bytes_received"] < stats_rows["bytes_received"]
    # Independently: sum_i w_i u_i over the devices trained one at a time, in any order.
    reference = np.zeros(len(rows.total))
    start = w.start  # type: ignore[attr-defined]
    for d in COHORT[::-1]:
        report = w.train(start, 1, [d], clip_norm=clip)
        reference += (report.num_examples[0] if weighting == "examples" else 1.0) * report.updates[0].astype(np.float64)
    np.testing.assert_allclose(rows.total.numpy(), reference, rtol=1e-10, atol=1e-12)


def test_a_nan_device_fails_alone_and_its_group_sums_the_others() -> None:
    w = worker(**{"faults.nan_update_rate": 0.3})
    total, _, reports = round_total(w, 2, "examples")
    failed = [d for r in reports for d in r.failed_ids]
    assert failed and total.count == 12 - len(failed)
    assert all("NaN/inf" in f for r in reports for f in r.failures)
    assert torch.isfinite(total.total).all()
    rows, _, _ = round_total(w, 2, None)
    assert torch.equal(total.total, rows.total)  # the server's own rejection gives the same sum


def test_a_reply_whose_sums_do_not_match_its_devices_is_refused() -> None:
    w = worker()
    start = w.start  # type: ignore[attr-defined]
    groups = cohort_groups(COHORT, 3)
    report = w.train(start, 1, COHORT[:6], groups=[3, 3], sums="examples")
    good = wire.write_report(report)

    report.sum_keys = [COHORT[0], COHORT[6]]  # the second sum claims another worker's group
    wrong_group = _Reply(wire.write_report(report))
    total, _, reports = collect([wrong_group], len(start), groups=groups)  # type: ignore[list-item]
    assert total.count == 0 and reports == []

    report.sum_keys = [COHORT[0], COHORT[3]]
    report.device_ids = [*report.device_ids[:5], 99]  # a device outside the cohort
    outsider = _Reply(wire.write_report(report))
    assert collect([outsider], len(start), groups=groups)[0].count == 0  # type: ignore[list-item]

    # The same devices twice (a duplicated reply): counted once.
    total, _, reports = collect([_Reply(good), _Reply(good)], len(start), groups=groups)  # type: ignore[list-item]
    assert total.count == 6 and len(reports) == 1

    # A group sum with inf: that group's devices fail, the other group counts.
    report = w.train(start, 1, COHORT[:6], groups=[3, 3], sums="examples")
    report.sums[1] = np.full_like(report.sums[1], np.inf)
    total, _, reports = collect([_Reply(wire.write_report(report))], len(start), groups=groups)  # type: ignore[list-item]
    assert total.count == 3 and sorted(reports[0].failed_ids) == COHORT[3:6]
    assert torch.isfinite(total.total).all()


def test_sums_are_refused_where_the_round_has_no_groups_and_float32_sums_are_malformed() -> None:
    w = worker()
    start = w.start  # type: ignore[attr-defined]
    report = w.train(start, 1, COHORT[:3], groups=[3], sums="examples")
    assert collect([_Reply(wire.write_report(report))], len(start))[0].count == 0  # type: ignore[list-item]
    report.sums = [s.astype(np.float32) for s in report.sums]
    with pytest.raises(wire.BadReply, match="float64"):
        wire.read_report(wire.write_report(report), len(start))
    with pytest.raises(ValueError, match="must name its groups"):
        w.train(start, 1, COHORT[:3], sums="examples")


def test_raw_arrays_round_trip_without_a_header_and_a_short_buffer_is_a_bad_reply() -> None:
    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.linspace(0, 1, 5), np.zeros((0, 0), np.float32),
                  np.arange(6, dtype=">f8")):  # fmt: skip
        packed = wire.pack(array)
        assert packed.stype == wire.RAW and len(packed.data) == array.nbytes
        back = wire.unpack(packed)
        assert back.shape == array.shape and np.array_equal(back, array) and back.dtype.byteorder in "<="
    short = wire.pack(np.arange(4, dtype=np.float32))
    short.data = short.data[:-1]
    with pytest.raises(wire.BadReply, match="bytes"):
        wire.unpack(short)
