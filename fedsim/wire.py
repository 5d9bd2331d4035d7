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

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.reports import DeviceReport

__all__ = [
    "Assignment",
    "BadReply",
    "DeviceReport",
    "Job",
    "read_job",
    "read_report",
    "write_job",
    "write_report",
]


class BadReply(ValueError):
    """A worker's reply is missing records or has inconsistent shapes."""


RAW = "fedsim.raw-le"  # Array.stype of `pack`: C-order little-endian bytes, no header
SUMS = ("examples", "ones")  # a job's "sums": how the worker weights each device in its tree sums


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
    job = content.config_records["job"]
    params = unpack(content.array_records["global"]["params"]).copy()  # the one copy: trainers write into it
    return Job(
        round_num=int(job["round"]),
        device_ids=[int(i) for i in job["device_ids"]],  # type: ignore[union-attr]
        config_json=str(job["config"]),
        global_params=torch.from_numpy(params),
        clip_norm=float(job["clip_norm"]) if "clip_norm" in job else None,  # type: ignore[arg-type]
        groups=[int(g) for g in job["groups"]] if "groups" in job else None,  # type: ignore[union-attr]
        arrays={k: unpack(a) for k, a in content.array_records["strategy"].items()}
        if "strategy" in content.array_records else None,
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
        devices = content.config_records["devices"]
        vectors = content.array_records["updates"]
        shipped = unpack(vectors["sums"]) if "sums" in vectors else None
        updates = unpack(vectors["updates"]) if shipped is None else np.zeros((0, 0), dtype=np.float32)
        flat = [int(x) for x in devices["sum_nodes"]] if "sum_nodes" in devices else []  # type: ignore[union-attr]
        sum_nodes = list(zip(flat[0::2], flat[1::2], strict=True))
        worker = content.metric_records["worker"]
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

    def size(value: object) -> int:
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, list):
            if all(type(v) is bytes for v in value):  # fast paths: SecAgg+ ciphertexts, keys, shares
                return sum(map(len, value))
            if all(type(v) is int for v in value):  # ids, positions
                return 8 * len(value)
            return sum(size(v) for v in value)
        return 8

    total = 0
    for record in content.array_records.values():
        total += sum(len(arr.data) for arr in record.values())
    for record in content.config_records.values():
        total += sum(size(v) for v in record.values())
    return total
