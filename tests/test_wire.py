"""The worker <-> server records: round trip, and malformed replies rejected, not fatal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedsim import wire
from fedsim.exchange import collect
from fedsim.reports import DeviceReport


def report(ids: list[int], num_params: int = 4) -> DeviceReport:
    return DeviceReport(
        device_ids=ids,
        updates=[np.full(num_params, float(i), dtype=np.float32) for i in ids],
        num_examples=[10 * (i + 1) for i in ids],
        losses=[0.5 for _ in ids],
        failed_ids=[99],
        failures=["ValueError: device has no training examples"],
        train_time_s=0.25,
        peak_rss_mb=100.0,
    )


def test_job_and_report_round_trip() -> None:
    params = np.arange(4, dtype=np.float32)
    job = wire.read_job(wire.write_job(round_num=3, device_ids=[5, 7], config_json='{"seed": 1}', global_params=params))
    assert job.round_num == 3 and job.device_ids == [5, 7] and job.config_json == '{"seed": 1}'
    assert torch.equal(job.global_params, torch.from_numpy(params))
    back = wire.read_report(wire.write_report(report([1, 2])), num_params=4)
    assert back.device_ids == [1, 2] and back.num_examples == [20, 30] and back.failed_ids == [99]
    assert np.array_equal(back.updates[1], np.full(4, 2.0, dtype=np.float32))


def test_wrong_shape_or_missing_record_is_a_bad_reply() -> None:
    content = wire.write_report(report([1, 2], num_params=5))
    with pytest.raises(wire.BadReply, match=r"shape \(2, 5\), expected \(2, 4\)"):
        wire.read_report(content, num_params=4)
    with pytest.raises(wire.BadReply, match="malformed"):
        wire.read_report(RecordDict({"updates": ArrayRecord({"updates": Array(np.zeros((1, 4), np.float32))})}), 4)
    lying = wire.write_report(report([1]))
    lying["devices"] = ConfigRecord({**dict(lying.config_records["devices"]), "num_examples": [1, 2, 3]})
    with pytest.raises(wire.BadReply, match="1 devices but 3"):
        wire.read_report(lying, num_params=4)


class _Reply:
    """What `collect` reads of a reply Message (building real ones needs a running Flower task)."""

    def __init__(self, content: RecordDict) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


def test_collect_sums_good_replies_and_skips_bad_ones() -> None:
    good = _Reply(wire.write_report(report([2, 0])))
    bad = _Reply(wire.write_report(report([5], num_params=3)))
    total, stats, reports = collect([bad, good], num_params=4)  # type: ignore[list-item]
    assert [r.device_ids for r in reports] == [[2, 0]]
    assert total.count == 2  # the malformed reply's device is not aggregated
    # weights 10 (device 0, update 0) and 30 (device 2, update 2): mean = 60 / 40 = 1.5
    assert torch.equal(total.mean(), torch.full((4,), 1.5))
    assert stats["num_examples"] == 40 and stats["train_loss"] == pytest.approx(0.5)


def test_collect_rejects_non_finite_updates_per_device() -> None:
    bad = report([0, 1, 2])
    bad.updates[1] = np.full(4, np.nan, dtype=np.float32)
    total, stats, reports = collect([_Reply(wire.write_report(bad))], num_params=4)  # type: ignore[list-item]
    assert total.count == 2 and torch.isfinite(total.mean()).all()
    assert reports[0].device_ids == [0, 2]
    assert 1 in reports[0].failed_ids


def test_collect_sums_in_device_id_order_whatever_order_replies_arrive_in() -> None:
    """float64 addition is not associative: the sum must not depend on which worker answered first."""
    rng = np.random.default_rng(0)

    def reply(ids: list[int]) -> _Reply:
        r = report(ids, num_params=1000)
        r.updates = [rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-6, 6) for _ in ids]
        return _Reply(wire.write_report(r))

    replies = [reply([3, 9]), reply([1, 7]), reply([4, 0, 8])]
    totals = [collect(order, num_params=1000)[0].total for order in (replies, replies[::-1], replies[1:] + replies[:1])]  # type: ignore[arg-type]
    assert all(torch.equal(t, totals[0]) for t in totals[1:])


def test_secagg_device_payloads_round_trip_and_anything_else_is_a_bad_reply() -> None:
    fields = {"ids": [3, 0, 2**40], "ciphertexts": [b"\x01" * 60, b"", b"z"], "sig": b"s" * 64, "n": -7, "x": 0.25,
              "ok": True, "name": "é", "none": []}  # fmt: skip
    blob = wire.pack_payload(fields)
    assert wire.unpack_payload(blob) == fields
    assert type(wire.unpack_payload(blob)["ok"]) is bool
    for cut in range(len(blob)):  # every truncation is refused, none is read as a shorter payload
        with pytest.raises(wire.BadReply):
            wire.unpack_payload(blob[:cut])
    with pytest.raises(wire.BadReply, match="after its last field"):
        wire.unpack_payload(blob + b"\x00")
    one = wire.pack_payload({"a": 1})
    with pytest.raises(wire.BadReply, match="repeats field 'a'"):
        wire.unpack_payload(b"\x02" + one[1:] + one[1:])
    with pytest.raises(wire.BadReply, match="unknown tag"):
        wire.unpack_payload(b"\x01\x01aQ")
    with pytest.raises(wire.BadReply, match="must be bytes"):
        wire.unpack_payload([1, 2])  # type: ignore[arg-type]
    for mixed in ([1, b"x"], [b"x", 1], [b"ab", np.arange(3)], [b"ab", bytearray(b"cd")], [b"x", "s"], [1, True]):
        with pytest.raises(TypeError, match="'mixed'"):  # (len() of an int64 array counts items, not bytes)
            wire.pack_payload({"mixed": mixed})
    record = wire.payload_record({0: {"a": 1}, 5: {"b": [b"x"]}})
    assert wire.read_payloads(record) == {0: {"a": 1}, 5: {"b": [b"x"]}}
    assert wire.read_payloads({**dict(record), "5": b"\x09", "job": b"x"}) == {0: {"a": 1}, 5: None}
    assert wire.read_payloads(None) == {}
    # Only plain decimal keys are positions: "01", "²" or "١" are not (isdigit/int would read them).
    odd = {"01": record["0"], "\u00b2": record["0"], "\u0661": record["0"], "-1": record["0"], "7": record["0"]}
    assert wire.read_payloads(odd) == {7: {"a": 1}}
    assert [wire.position_key(k) for k in ("0", "12", "01", "\u00b2", "1.0", "")] == [0, 12, None, None, None, None]


def test_reading_jobs_and_replies_leaves_no_reference_cycle_holding_their_arrays() -> None:
    """Flower's `content.array_records` (and config/metric) views are reference cycles that keep a
    whole message alive until the cyclic garbage collector runs: reading them every round kept
    each round's weights and replies resident (~13 MB a round for the FEMNIST-size CNN on the
    server). Reading through `wire.records` frees a message as soon as its last reference goes."""
    import gc

    gc.collect()
    gc.disable()
    try:
        job = wire.write_job(round_num=1, device_ids=[5], config_json="{}", global_params=np.zeros(1000, dtype=np.float32),
                             arrays={"c": np.ones((1, 1000), dtype=np.float32)})  # fmt: skip
        read = wire.read_job(job)
        assert read.arrays is not None and wire.payload_bytes(job) > 8000
        replies = [_Reply(wire.write_report(report([1, 2], num_params=1000)))]
        total, _, reports = collect(replies, num_params=1000)  # type: ignore[arg-type]
        assert total.count == 2 and len(wire.records(job, ArrayRecord)) == 2 and "job" in wire.records(job, ConfigRecord)
        del job, read, replies, total, reports
        assert gc.collect() == 0  # nothing was left for the collector: refcounting freed it all
        wire.write_report(report([1])).array_records  # (Flower's own view: a cycle, as the doc says)
        assert gc.collect() > 0
    finally:
        gc.enable()
