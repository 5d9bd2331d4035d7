"""Workers ship the sums of the cohort tree's nodes over their devices instead of a row per
device (issue 18, fedsim.aggregation): the round's total is the same bits as the server making
the tree from the rows itself, whatever the split of the cohort over workers; a NaN device
still fails alone; a reply whose sums do not match its devices is refused; and the sums are
what crosses the wire (bytes per round)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients import flat_params
from fedsim import wire
from fedsim.aggregation import TreeFolder, tree_nodes, tree_total
from fedsim.config import from_dict
from fedsim.exchange import collect
from fedsim.placement import assign_devices
from fedsim.worker import Worker
from helpers import set_keys

COHORT = [2, 3, 5, 8, 11, 13, 17, 19, 23, 29, 31, 37]


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
        "simulation": {"vectorize": "off"},
    }
    w = Worker(from_dict(set_keys(raw, over)))
    w.start = flat_params(w.model)  # type: ignore[attr-defined]  # the global weights (training moves w.model)
    return w


def job(w: Worker, ids: list[int], sums: str | None = "examples", clip: float | None = None):
    start = COHORT.index(ids[0]) if ids else 0
    return w.train(w.start, 1, ids, clip_norm=clip, sums=sums, sum_range=(start, len(COHORT)) if sums else None)  # type: ignore[attr-defined]


def round_total(w: Worker, nodes: int, sums: str | None, weighting: str = "examples", clip: float | None = None):
    """The cohort split over `nodes` workers (all the same Worker: a device's update does not
    depend on the process that trains it), each shipping sums or rows, collected."""
    plan = assign_devices(COHORT, list(range(100, 100 + nodes)), "multiplexed")
    replies = [_Reply(wire.write_report(job(w, ids, sums, clip))) for _, ids in plan]
    return collect(replies[::-1], len(w.start), weighting=weighting, cohort=COHORT)  # type: ignore[arg-type,attr-defined]


def test_the_tree_decomposes_any_range_into_the_nodes_whose_sums_give_the_root() -> None:
    assert tree_nodes(0, 12, 12) == [(0, 12)]
    assert tree_nodes(0, 6, 12) == [(0, 6)] and tree_nodes(6, 12, 12) == [(6, 12)]  # 2 workers: one vector each
    assert tree_nodes(4, 9, 12) == [(4, 6), (6, 9)]
    rng = np.random.default_rng(0)
    rows = {p: (rng.standard_normal(50) * 10.0 ** rng.integers(-8, 8), float(rng.integers(1, 9))) for p in range(12) if p != 7}
    frozen = {p: (u.copy(), w) for p, (u, w) in rows.items()}
    root = tree_total(0, 12, rows=rows)
    for cuts in ([0, 12], [0, 5, 12], [0, 1, 2, 9, 12], list(range(13))):
        sums = {}
        for lo, hi in zip(cuts, cuts[1:]):
            for node in tree_nodes(lo, hi, 12):
                if (total := tree_total(*node, rows=rows)) is not None:
                    sums[node] = total
        assert np.array_equal(tree_total(0, 12, sums=sums), root)  # same bits whatever the ranges
    # Finished partly from node sums, partly from rows (a rows reply beside a sums reply).
    some = {node: tree_total(*node, rows=rows) for node in tree_nodes(5, 12, 12)}
    assert np.array_equal(tree_total(0, 12, sums=some, rows={p: r for p, r in rows.items() if p < 5}), root)
    assert all(np.array_equal(rows[p][0], frozen[p][0]) for p in rows)  # inputs never written to
    leaves = [w * u.astype(np.float64) for p, (u, w) in sorted(rows.items())]
    assert not np.array_equal(root, sum(leaves))  # (not the sequential sum's bits)


def test_folding_rows_as_they_arrive_gives_tree_totals_bits_in_any_order_and_keeps_few_alive() -> None:
    rng = np.random.default_rng(1)
    n = 37
    rows = {p: (rng.standard_normal(40).astype(np.float32) * np.float32(10.0 ** rng.integers(-6, 6)), float(rng.integers(1, 9)))
            for p in range(n) if p % 5 != 3}  # fmt: skip
    for lo, hi in ((0, n), (0, 18), (5, 29), (36, 37), (11, 12)):
        expected = [(node, t) for node in tree_nodes(lo, hi, n) if (t := tree_total(*node, rows=rows)) is not None]
        for order in (list(range(lo, hi)), list(range(hi - 1, lo - 1, -1)), list(rng.permutation(np.arange(lo, hi)))):
            folder, alive = TreeFolder(lo, hi, n), 0
            for p in order:
                folder.add(int(p), rows[p]) if p in rows else folder.skip(int(p))
                alive = max(alive, len(folder._done))
            got = folder.finish()
            assert [node for node, _ in got] == [node for node, _ in expected]
            assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, expected, strict=True)), (lo, hi)
            if order == list(range(lo, hi)):  # in position order: O(log n) values alive, not a row per device
                assert alive <= 2 * int(np.log2(n)) + 2, alive
    # A row left waiting is copied when it is a view of a larger buffer (a vectorized group's
    # updates are rows of one tensor): the folder must not keep the whole group alive.
    group = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    folder = TreeFolder(0, 4, 4)
    folder.add(1, (group[1].numpy(), 1.0))  # waits for position 0
    waiting = folder._done[(1, 2)][0]
    assert waiting.base is None and np.array_equal(waiting, [4, 5, 6, 7])
    folder.add(0, (np.ones(4, dtype=np.float32), 2.0))
    folder.skip(2)
    folder.skip(3)
    assert np.array_equal(folder.finish()[0][1], [6, 7, 8, 9])
    folder = TreeFolder(0, 4, 4)
    folder.add(0, rows[0])
    with pytest.raises(ValueError, match="came twice"):
        folder.add(0, rows[0])
    with pytest.raises(ValueError, match=r"positions \[1, 2, 3\] neither added nor skipped"):
        folder.finish()


@pytest.mark.parametrize("weighting", ["examples", "ones"])
def test_shipped_sums_equal_the_servers_tree_over_rows_bit_for_bit_for_any_number_of_workers(weighting: str) -> None:
    w = worker()
    clip = 0.05 if weighting == "ones" else None
    rows, stats_rows, _ = round_total(w, 1, None, weighting, clip)
    for nodes in (1, 2, 3, 4, 7, 12):
        total, stats, reports = round_total(w, nodes, weighting, weighting, clip)
        assert torch.equal(total.total, rows.total), nodes
        assert (total.count, total.weight) == (rows.count, rows.weight) and total.count == 12
        assert (total.weight == 12.0) == (weighting == "ones")
        assert all(not r.updates and r.sums for r in reports)
        if nodes == 2:  # each worker's half is a subtree: one float64 vector each instead of 6 float32 rows
            assert [len(r.sums) for r in reports] == [1, 1]
            assert stats["bytes_received"] < 0.8 * stats_rows["bytes_received"]
    # Independently: sum_i w_i u_i over the devices trained one at a time, in another order.
    reference = np.zeros(len(rows.total))
    for d in COHORT[::-1]:
        report = w.train(w.start, 1, [d], clip_norm=clip)  # type: ignore[attr-defined]
        reference += (report.num_examples[0] if weighting == "examples" else 1.0) * report.updates[0].astype(np.float64)
    np.testing.assert_allclose(rows.total.numpy(), reference, rtol=1e-10, atol=1e-12)


def test_a_nan_device_fails_alone_and_the_others_sum_as_the_server_would() -> None:
    w = worker(**{"faults.nan_update_rate": 0.3})
    total, _, reports = round_total(w, 2, "examples")
    failed = [d for r in reports for d in r.failed_ids]
    assert failed and total.count == 12 - len(failed)
    assert all("NaN/inf" in f for r in reports for f in r.failures)
    assert torch.isfinite(total.total).all()
    rows, _, _ = round_total(w, 3, None)
    assert torch.equal(total.total, rows.total)  # the server's own rejection gives the same sum


def test_a_reply_whose_sums_do_not_match_its_devices_is_refused() -> None:
    w = worker()
    good = job(w, COHORT[:6])
    content = wire.write_report(good)

    def count(report_or_content, **kw) -> int:
        c = report_or_content if not hasattr(report_or_content, "device_ids") else wire.write_report(report_or_content)
        return collect([_Reply(c)], len(w.start), cohort=COHORT, **kw)[0].count  # type: ignore[list-item,attr-defined]

    assert count(content) == 6
    # Checked against the job each reply answers: a worker cannot report another job's devices.
    assert count(content, job_devices=[COHORT[:6]]) == 6 and count(content, job_devices=[COHORT[:5]]) == 0
    lying = job(w, COHORT[:6])
    lying.sum_nodes = [(0, 3)]  # claims a node other than its range's
    assert count(lying) == 0
    outsider = job(w, COHORT[:6])
    outsider.device_ids = [*outsider.device_ids[:5], 99]  # a device outside the cohort
    assert count(outsider) == 0
    # The same devices twice (a duplicated reply): counted once.
    total, _, reports = collect([_Reply(content), _Reply(content)], len(w.start), cohort=COHORT)  # type: ignore[list-item,attr-defined]
    assert total.count == 6 and len(reports) == 1
    # Sums where rows were asked (SCAFFOLD, the audit's canaries read each row), a missing
    # DP-SGD event (a device the server cannot account for): refused.
    assert count(content, sums_asked=False) == 0 and count(content, events_required=True) == 0
    # A sum with inf, or one no float32 updates could add up to (1e300: the mean would overflow):
    # its devices fail, and nothing reaches the total.
    for value in (np.inf, 1e300):
        bad = job(w, COHORT[:6])
        bad.sums[0] = np.full_like(bad.sums[0], value)
        total, _, reports = collect([_Reply(wire.write_report(bad))], len(w.start), cohort=COHORT)  # type: ignore[list-item,attr-defined]
        assert total.count == 0 and sorted(reports[0].failed_ids) == COHORT[:6]
        assert torch.isfinite(total.total).all()


@pytest.mark.parametrize("sums", ["ones", None])
def test_under_user_level_dp_the_server_fails_rows_and_sums_beyond_the_clip_norm(sums: str | None) -> None:
    """The accountant's sensitivity is C per device: a worker that clipped correctly passes
    (shipped sums and rows alike), one whose rows or node sums exceed C per device is failed."""
    w = worker()
    honest = job(w, COHORT[:6], sums, clip=0.01)
    collected = collect([_Reply(wire.write_report(honest))], len(w.start), weighting="ones", cohort=COHORT, clip_norm=0.01)  # type: ignore[list-item,attr-defined]
    assert collected[0].count == 6
    unclipped = job(w, COHORT[:6], sums, clip=None)  # the same devices, not clipped (norms 0.2-0.7 here)
    norms = [float(np.linalg.norm(u)) for u in job(w, COHORT[:6], None).updates]
    assert min(norms) > 0.2  # so every device breaks C = 0.01 by 20x
    total, _, reports = collect([_Reply(wire.write_report(unclipped))], len(w.start), weighting="ones", cohort=COHORT,  # type: ignore[list-item,attr-defined]
                                clip_norm=0.01)  # fmt: skip
    assert total.count == 0 and sorted(reports[0].failed_ids) == COHORT[:6]
    assert all("clip norm 0.01" in f for f in reports[0].failures)
    # Without user-level DP (FedAvg weights by examples) nothing is clipped, nothing is checked.
    plain = job(w, COHORT[:6], "examples" if sums else None)
    assert collect([_Reply(wire.write_report(plain))], len(w.start), cohort=COHORT, clip_norm=None)[0].count == 6  # type: ignore[list-item,attr-defined]


def test_float32_sums_float64_rows_and_negative_shapes_are_bad_replies() -> None:
    w = worker()
    report = job(w, COHORT[:3])
    report.sums = [s.astype(np.float32) for s in report.sums]
    with pytest.raises(wire.BadReply, match="float64"):
        wire.read_report(wire.write_report(report), len(w.start))  # type: ignore[attr-defined]
    rows = job(w, COHORT[:2], sums=None)
    rows.updates = [np.full_like(u, 1e300, dtype=np.float64) for u in rows.updates]
    with pytest.raises(wire.BadReply, match="dtype float64"):
        wire.read_report(wire.write_report(rows), len(w.start))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="range in the cohort"):
        w.train(w.start, 1, COHORT[:3], sums="examples")  # type: ignore[attr-defined]
    bad = wire.pack(np.zeros(0, dtype=np.float32))
    bad.shape = (-1, 0)
    with pytest.raises(wire.BadReply, match="negative"):
        wire.unpack(bad)


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
