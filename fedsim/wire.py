"""The records exchanged between the ServerApp and a worker, in one place.

Server -> worker ("train"):
    arrays["global"]  = {"params": flat float32 global weights}
    configs["job"]    = {"round": int, "device_ids": [int], "config": resolved run config (JSON),
                         "clip_norm": float (user-level DP only),
                         "groups": [int] (vectorized training only: sizes of consecutive runs of
                                   device_ids trained as one batch; absent = each device alone)}
    arrays["strategy"] = {name: float32 array}  (only for strategies that send more than the
                          weights, e.g. SCAFFOLD's control variates; Strategy.job_arrays)
                         "sums": "examples" | "ones" (reply with the float64 sums of the cohort
                                  tree's nodes over the job's devices, weighted by example counts
                                  or by 1; absent = a row per device),
                         "sum_range": [start, n] (with sums: the cohort position of the job's
                                  first device, and the cohort's size; fedsim.aggregation)}
Worker -> server:
    arrays["updates"] = {"updates": float32 [devices, params]}  (rows in device_ids order), or
                        {"sums": float64 [nodes, params]}  (job with "sums": one per tree node
                        inside the job's range that holds a trained device; fedsim.aggregation)
    configs["devices"] = {"device_ids", "num_examples", "loss", "failed_ids", "failures",
                          "dp_noise_multiplier", "dp_sample_rate", "dp_steps", "clip_fraction", "within_bound",
                          "sum_nodes" (with sums: each sum's node [lo, hi), flattened lo0, hi0, lo1, ...)}
                          (dp_* and clip_fraction: sample-level DP; within_bound: user-level DP)
    metrics["worker"] = {"train_time_s", "peak_rss_mb"}

The global weights go once per worker, not once per device, and a worker's devices come back
as one vector per group (Flower's Array with stype RAW: the array's little-endian bytes with no
header, so writing costs one copy and reading none; `pack` / `unpack`); the config JSON is a
few kB. A reply that does not follow this format raises `BadReply`, which the server counts
and skips rather than crash on.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.reports import DeviceReport

__all__ = [
    "Assignment",
    "records",
    "BadReply",
    "DeviceReport",
    "Job",
    "pack_payload",
    "payload_record",
    "position_key",
    "read_payloads",
    "unpack_payload",
    "read_job",
    "read_report",
    "write_job",
    "write_report",
]


class BadReply(ValueError):
    """A worker's reply is missing records or has inconsistent shapes."""


RAW = "fedsim.raw-le"  # Array.stype of `pack`: C-order little-endian bytes, no header
SUMS = ("examples", "ones")  # a job's "sums": how the worker weights each device in its tree sums


RecordT = TypeVar("RecordT", ArrayRecord, ConfigRecord, MetricRecord)


def records(content: RecordDict, kind: type[RecordT]) -> dict[str, RecordT]:
    """The records of `kind` in `content`, as a plain dict (read it like Flower's
    `content.array_records` / `config_records` / `metric_records`). Flower's views are
    `_SyncedDict`s that hold a bound method of themselves and the RecordDict: each access makes
    a reference cycle that keeps the whole message (its arrays' bytes included) alive until the
    cyclic garbage collector runs. On the server that was ~13 MB more resident memory per round
    for the FEMNIST-size CNN (the replies' sums and the jobs' weights, 433 -> 556 MB over six
    rounds, flat at ~480 with the cycles gone: RSS sampled every 50 ms in a one-off script, not in
    bench/; bench/speed.py's server peak went 556 -> 509 MB); tests/test_wire.py checks that reading a message
    through this leaves no cycle."""
    return {key: record for key, record in content.items() if isinstance(record, kind)}


def pack(array: np.ndarray) -> Array:
    """`array` as a Flower Array of its raw little-endian bytes (one copy; np.save's header and
    buffer would be two)."""
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return Array(dtype=array.dtype.newbyteorder("=").name, shape=tuple(int(n) for n in array.shape), stype=RAW,
                 data=array.tobytes())  # fmt: skip


def unpack(array: Array) -> np.ndarray:
    """The numpy array of a Flower Array: a read-only view of a `pack`ed one's bytes (no copy),
    or np.load for Flower's own format. Raises BadReply when the bytes do not match the shape."""
    if array.stype != RAW:
        return array.numpy()
    try:
        dtype = np.dtype(array.dtype).newbyteorder("<")
        shape = tuple(int(n) for n in array.shape)
    except (TypeError, ValueError) as err:
        raise BadReply(f"array of unknown dtype {array.dtype!r} or shape {array.shape!r}") from err
    if any(n < 0 for n in shape):
        raise BadReply(f"array of negative shape {shape}")
    if len(array.data) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise BadReply(f"array of shape {shape} and dtype {dtype.name} with {len(array.data)} bytes")
    return np.frombuffer(array.data, dtype=dtype).reshape(shape)


class Assignment(tuple):
    """One worker's part of a round: unpacks as `(node id, device ids)`; `.groups` holds the
    sizes of the consecutive device groups trained as one batch (None: each device alone).

    A tuple, so a plan still reads `for node, ids in plan` and compares equal to plain pairs.
    """

    groups: list[int] | None

    def __new__(cls, node: int, device_ids: list[int], groups: list[int] | None = None) -> Assignment:
        obj = super().__new__(cls, (node, device_ids))
        obj.groups = groups
        return obj

    def __getnewargs__(self) -> tuple:  # type: ignore[override]  # copy/pickle: rebuild with the groups
        return (self[0], self[1], self.groups)


def groups_of(part: tuple[int, list[int]]) -> list[int] | None:
    """The group sizes of a plan entry (a plain (node, ids) pair: None, each device alone)."""
    return getattr(part, "groups", None)


@dataclass
class Job:
    round_num: int
    device_ids: list[int]
    config_json: str
    global_params: torch.Tensor
    clip_norm: float | None = None  # user-level DP: clip each device's update to this L2 norm
    groups: list[int] | None = None  # vectorized training: sizes of consecutive device groups
    arrays: dict[str, np.ndarray] | None = None  # the strategy's extra inputs (Strategy.job_arrays)
    sums: str | None = None  # "examples" | "ones": reply with tree-node sums (None: a row per device)
    sum_range: tuple[int, int] | None = None  # with sums: (cohort position of the first device, cohort size)


def write_job(
    *,
    round_num: int,
    device_ids: list[int],
    config_json: str,
    global_params: np.ndarray,
    clip_norm: float | None = None,
    groups: list[int] | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    sums: str | None = None,
    sum_range: tuple[int, int] | None = None,
) -> RecordDict:
    job: dict = {"round": round_num, "device_ids": device_ids, "config": config_json}
    if clip_norm is not None:
        job["clip_norm"] = float(clip_norm)
    if groups is not None:
        if any(g < 1 for g in groups) or sum(groups) != len(device_ids):
            raise ValueError(f"group sizes {groups} do not partition the job's {len(device_ids)} devices")
        job["groups"] = [int(g) for g in groups]
    if sums is not None:
        start, n = sum_range if sum_range is not None else (-1, 0)
        if sums not in SUMS or not (0 <= start and start + len(device_ids) <= n):
            raise ValueError(f"sums={sums!r} needs one of {SUMS} and the job's range in the cohort, got {sum_range}")
        job["sums"], job["sum_range"] = sums, [int(start), int(n)]
    content = RecordDict({"global": ArrayRecord({"params": pack(global_params)}), "job": ConfigRecord(job)})
    if arrays:
        content["strategy"] = ArrayRecord({k: pack(v) for k, v in arrays.items()})
    return content


def read_job(content: RecordDict) -> Job:
    job = records(content, ConfigRecord)["job"]
    params = unpack(records(content, ArrayRecord)["global"]["params"]).copy()  # the one copy: trainers write into it
    return Job(
        round_num=int(job["round"]),
        device_ids=[int(i) for i in job["device_ids"]],  # type: ignore[union-attr]
        config_json=str(job["config"]),
        global_params=torch.from_numpy(params),
        clip_norm=float(job["clip_norm"]) if "clip_norm" in job else None,  # type: ignore[arg-type]
        groups=[int(g) for g in job["groups"]] if "groups" in job else None,  # type: ignore[union-attr]
        arrays={k: unpack(a) for k, a in records(content, ArrayRecord)["strategy"].items()}
        if "strategy" in records(content, ArrayRecord) else None,
        sums=str(job["sums"]) if "sums" in job else None,
        sum_range=(int(job["sum_range"][0]), int(job["sum_range"][1])) if "sum_range" in job else None,  # type: ignore[index]
    )


def write_report(report: DeviceReport) -> RecordDict:
    if report.sums:
        vectors = {"sums": pack(np.stack(report.sums))}
    else:
        vectors = {"updates": pack(np.stack(report.updates) if report.updates else np.zeros((0, 0), dtype=np.float32))}
    return RecordDict(
        {
            "updates": ArrayRecord(vectors),
            "devices": ConfigRecord(
                {
                    "device_ids": report.device_ids,
                    "num_examples": report.num_examples,
                    "loss": report.losses,
                    "dp_noise_multiplier": [e[0] for e in report.dp_events],
                    "dp_sample_rate": [e[1] for e in report.dp_events],
                    "dp_steps": [e[2] for e in report.dp_events],
                    "clip_fraction": report.clip_fractions,
                    "within_bound": report.within_bound,
                    "failed_ids": report.failed_ids,
                    "failures": report.failures,
                    "sum_nodes": [int(x) for node in report.sum_nodes for x in node],
                }
            ),
            "worker": MetricRecord({"train_time_s": report.train_time_s, "peak_rss_mb": report.peak_rss_mb}),
        }
    )


def read_report(content: RecordDict, num_params: int | None) -> DeviceReport:
    """The worker's report; `num_params` None: a secure-aggregation reply, which must carry no
    per-device values (updates, losses, example counts, clipping bits or fractions) at all."""
    try:
        devices = records(content, ConfigRecord)["devices"]
        vectors = records(content, ArrayRecord)["updates"]
        shipped = unpack(vectors["sums"]) if "sums" in vectors else None
        updates = unpack(vectors["updates"]) if shipped is None else np.zeros((0, 0), dtype=np.float32)
        flat = [int(x) for x in devices["sum_nodes"]] if "sum_nodes" in devices else []  # type: ignore[union-attr]
        sum_nodes = list(zip(flat[0::2], flat[1::2], strict=True))
        worker = records(content, MetricRecord)["worker"]
        report = DeviceReport(
            device_ids=[int(i) for i in devices["device_ids"]],  # type: ignore[union-attr]
            num_examples=[int(n) for n in devices["num_examples"]],  # type: ignore[union-attr]
            losses=[float(x) for x in devices["loss"]],  # type: ignore[union-attr]
            failed_ids=[int(i) for i in devices["failed_ids"]],  # type: ignore[union-attr]
            failures=[str(s) for s in devices["failures"]],  # type: ignore[union-attr]
            dp_events=[
                (float(z), float(q), int(k))
                for z, q, k in zip(
                    devices["dp_noise_multiplier"], devices["dp_sample_rate"], devices["dp_steps"], strict=True  # type: ignore[arg-type]
                )
            ],
            clip_fractions=[float(c) for c in devices["clip_fraction"]],  # type: ignore[union-attr]
            within_bound=[bool(b) for b in devices["within_bound"]],  # type: ignore[union-attr]
            train_time_s=float(worker["train_time_s"]),  # type: ignore[arg-type]
            peak_rss_mb=float(worker["peak_rss_mb"]),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError) as err:  # ValueError: zip(strict=True) on unequal lists
        raise BadReply(f"malformed worker reply: {err}") from err
    n = len(report.device_ids)
    if num_params is None:
        # Secure aggregation: per-device values travel only inside the masked vectors.
        if updates.size or shipped is not None or report.num_examples or report.losses or report.within_bound \
                or report.clip_fractions:
            raise BadReply("a secure-aggregation reply carries per-device values in the clear")
        if report.dp_events and len(report.dp_events) != n:
            raise BadReply(f"reply lists {n} devices but {len(report.dp_events)} privacy events")
        return report
    if len(report.num_examples) != n or len(report.losses) != n:
        raise BadReply(f"reply lists {n} devices but {len(report.num_examples)} example counts")
    if report.within_bound and len(report.within_bound) != n:
        raise BadReply(f"reply lists {n} devices but {len(report.within_bound)} clipping bits")
    if report.dp_events and len(report.dp_events) != n:
        raise BadReply(f"reply lists {n} devices but {len(report.dp_events)} privacy events")
    if shipped is not None:
        if any(k <= 0 for k in report.num_examples):  # rows with none are rejected one by one (reject_non_finite)
            raise BadReply("a reply of sums lists a device with no examples")
        if shipped.dtype != np.float64 or shipped.shape != (len(sum_nodes), num_params) or not 0 < len(sum_nodes) <= n:
            raise BadReply(f"sums have shape {shipped.shape} ({shipped.dtype}) for {len(sum_nodes)} nodes of {n} devices, "
                           f"expected float64 ({len(sum_nodes)}, {num_params})")  # fmt: skip
        report.sum_nodes, report.sums = sum_nodes, list(shipped)
        return report
    if n and updates.shape != (n, num_params):
        raise BadReply(f"updates have shape {updates.shape}, expected ({n}, {num_params})")
    if n and updates.dtype not in (np.float16, np.float32):  # what a model's float32 (or half) weights give
        raise BadReply(f"updates of dtype {updates.dtype}, expected float32")
    report.updates = list(updates) if n else []
    return report


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays, strings and byte strings in a message (what dominates its size on
    the wire); numbers count 8 bytes each."""
    total = 0
    for record in records(content, ArrayRecord).values():
        total += sum(len(arr.data) for arr in record.values())
    for record in records(content, ConfigRecord).values():
        total += sum(_value_size(v) for v in record.values())
    return total


def _value_size(value: object) -> int:
    # (Module level: a closure that calls itself is a reference cycle, freed only by the collector.)
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, list):
        if all(type(v) is bytes for v in value):  # fast paths: SecAgg+ ciphertexts, keys, shares
            return sum(map(len, value))
        if all(type(v) is int for v in value):  # ids, positions
            return 8 * len(value)
        return sum(_value_size(v) for v in value)
    return 8


# -- SecAgg+ device payloads -------------------------------------------------------------------
#
# A SecAgg+ stage carries one request per device (server -> worker, configs["req"]) and one
# reply per device (worker -> server, configs["dev"]), each as one bytes value under the
# device's cohort position: {str(position): pack_payload(fields)}. (A ConfigRecord per device
# made Flower check every list item of every device, ~10% of a cohort-1,000 round.)
#
# pack_payload layout (little-endian): u8 field count, then per field: u8 name length, the
# ASCII name, a u8 tag, the value:
#   "y" bytes: u32 length, the bytes        "s" str: u32 length, UTF-8
#   "i" int: i64      "f" float: f64        "?" bool: u8 (0 or 1)
#   "I" list of int: u32 count, i64 each    "Y" list of bytes: u32 count, u32 length each, the bytes

_U8, _U32, _I64, _F64 = struct.Struct("<B"), struct.Struct("<I"), struct.Struct("<q"), struct.Struct("<d")


_NAMES: dict[str, bytes] = {}  # field name -> its u8 length and ASCII bytes (the schema's few names)


def _name(name: str) -> bytes:
    head = _NAMES.get(name)
    if head is None:
        key = name.encode("ascii") if isinstance(name, str) else b""
        if not 0 < len(key) < 256:
            raise TypeError(f"payload field name {name!r} must have 1 to 255 ASCII characters")
        head = _U8.pack(len(key)) + key
        if len(_NAMES) < 1024:
            _NAMES[name] = head
    return head


def pack_payload(fields: Mapping[str, object]) -> bytes:
    """One device's stage request or reply as bytes (layout above). TypeError for a value of
    another type (e.g. a list mixing ints and bytes)."""
    if len(fields) > 255:
        raise TypeError(f"a payload has at most 255 fields, got {len(fields)}")
    out = [_U8.pack(len(fields))]
    for name, value in fields.items():
        head = _name(name)
        kind = type(value)
        if kind is bytes or kind is bytearray:
            out += [head, b"y", _U32.pack(len(value)), bytes(value)]
        elif kind is list or kind is tuple:
            n = len(value)
            first = type(value[0]) if n else int
            if first is bytes and all(type(v) is bytes for v in value):  # (len() counts bytes only for bytes)
                out += [head, b"Y", _U32.pack(n), struct.pack(f"<{n}I", *map(len, value)), *value]
            elif first is int and all(type(v) is int for v in value):
                out += [head, b"I", _U32.pack(n), struct.pack(f"<{n}q", *value)]
            else:
                raise TypeError(f"payload field {name!r}: cannot pack a list of {first.__name__} values")
        elif isinstance(value, str):
            raw = value.encode()
            out += [head, b"s", _U32.pack(len(raw)), raw]
        elif isinstance(value, bool):
            out += [head, b"?", _U8.pack(int(value))]
        elif isinstance(value, int):
            out += [head, b"i", _I64.pack(value)]
        elif isinstance(value, float):
            out += [head, b"f", _F64.pack(value)]
        elif isinstance(value, (bytes, bytearray)):
            out += [head, b"y", _U32.pack(len(value)), bytes(value)]
        elif isinstance(value, (list, tuple)):
            raise TypeError(f"payload field {name!r}: cannot pack a list of mixed or other values")
        else:
            raise TypeError(f"payload field {name!r}: cannot pack a value of type {type(value).__name__}")
    return b"".join(out)


def unpack_payload(blob: bytes) -> dict[str, object]:
    """`pack_payload`'s fields back; BadReply if `blob` is not exactly one well-formed payload
    (truncated, unknown tag, repeated field, bytes left over)."""
    if not isinstance(blob, (bytes, bytearray)):
        raise BadReply(f"a device payload must be bytes, got {type(blob).__name__}")
    view = bytes(blob)
    size, out = len(view), {}
    try:
        count, pos = view[0], 1
        for _ in range(count):
            length = view[pos]
            end = pos + 1 + length
            if end + 1 > size:
                raise BadReply("truncated device payload")
            name = view[pos + 1 : end].decode("ascii")
            if name in out:
                raise BadReply(f"device payload repeats field {name!r}")
            tag, pos = view[end], end + 1
            if tag == 0x59:  # "Y": u32 count, u32 lengths, the bytes
                (n,) = _U32.unpack_from(view, pos)
                pos += 4
                if pos + 4 * n > size:
                    raise BadReply("truncated device payload")
                lengths = struct.unpack_from(f"<{n}I", view, pos)
                start, pos = pos + 4 * n, pos + 4 * n + sum(lengths)
                if pos > size:
                    raise BadReply("truncated device payload")
                width = lengths[0] if n else 0
                if width and lengths.count(width) == n:  # one width (keys, shares, ciphertexts): slices by stride
                    value: object = [view[a : a + width] for a in range(start, pos, width)]
                else:
                    ends = list(itertools.accumulate(lengths, initial=start))
                    value = [view[a:b] for a, b in zip(ends, ends[1:])]
            elif tag == 0x49:  # "I": u32 count, i64 each
                (n,) = _U32.unpack_from(view, pos)
                pos += 4
                if pos + 8 * n > size:
                    raise BadReply("truncated device payload")
                value = list(struct.unpack_from(f"<{n}q", view, pos))
                pos += 8 * n
            elif tag == 0x79 or tag == 0x73:  # "y" bytes, "s" str: u32 length, the bytes
                (n,) = _U32.unpack_from(view, pos)
                pos += 4
                if pos + n > size:
                    raise BadReply("truncated device payload")
                value = view[pos : pos + n] if tag == 0x79 else view[pos : pos + n].decode()
                pos += n
            elif tag == 0x69:  # "i"
                (value,) = _I64.unpack_from(view, pos)
                pos += 8
            elif tag == 0x66:  # "f"
                (value,) = _F64.unpack_from(view, pos)
                pos += 8
            elif tag == 0x3F:  # "?"
                if pos >= size:
                    raise BadReply("truncated device payload")
                flag = view[pos]
                pos += 1
                if flag > 1:
                    raise BadReply(f"device payload field {name!r}: a bool must be 0 or 1")
                value = bool(flag)
            else:
                raise BadReply(f"device payload field {name!r}: unknown tag {bytes([tag])!r}")
            out[name] = value
    except IndexError:
        raise BadReply("truncated device payload") from None
    except (struct.error, UnicodeDecodeError) as err:
        raise BadReply(f"malformed device payload: {err}") from None
    if pos != size:
        raise BadReply(f"device payload has {size - pos} bytes after its last field")
    return out


def payload_record(payloads: Mapping[int, Mapping[str, object]]) -> ConfigRecord:
    """{cohort position: fields} as one record: {str(position): pack_payload(fields)}."""
    return ConfigRecord({str(p): pack_payload(fields) for p, fields in payloads.items()})


def position_key(key: str) -> int | None:
    """The cohort position a record key names ("0", "17", ...), or None for any other key
    (including "01", "²" or "١", which Python's isdigit/int would also read as numbers)."""
    if key.isascii() and key.isdigit() and key == str(int(key)):
        return int(key)
    return None


def read_payloads(record: Mapping[str, object] | None) -> dict[int, dict[str, object] | None]:
    """`payload_record` back: {position: fields}. A key that is not a position (`position_key`)
    is skipped; a payload that does not unpack gives None, which the caller must treat as that
    device's malformed reply."""
    out: dict[int, dict[str, object] | None] = {}
    for key, blob in (record or {}).items():
        position = position_key(key)
        if position is None:
            continue
        try:
            out[position] = unpack_payload(blob)  # type: ignore[arg-type]
        except BadReply:
            out[position] = None
    return out
