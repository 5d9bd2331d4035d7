"""The records exchanged between the ServerApp and a worker, in one place.

Server -> worker ("train"):
    arrays["global"]  = {"params": flat float32 global weights}
    configs["job"]    = {"round": int, "device_ids": [int], "config": resolved run config (JSON),
                         "clip_norm": float (user-level DP only)}
Worker -> server:
    arrays["updates"] = {"updates": float32 [devices, params]}  (rows in device_ids order)
    configs["devices"] = {"device_ids", "num_examples", "loss", "failed_ids", "failures",
                          "dp_noise_multiplier", "dp_sample_rate", "dp_steps", "clip_fraction", "within_bound"}
                          (dp_* and clip_fraction: sample-level DP; within_bound: user-level DP)
    metrics["worker"] = {"train_time_s", "peak_rss_mb"}

The global weights go once per worker, not once per device; the config JSON is a few kB.
A reply that does not follow this format raises `BadReply`, which the server counts and
skips rather than crash on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.worker import DeviceReport

__all__ = ["BadReply", "DeviceReport", "Job", "read_job", "read_report", "write_job", "write_report"]


class BadReply(ValueError):
    """A worker's reply is missing records or has inconsistent shapes."""


@dataclass
class Job:
    round_num: int
    device_ids: list[int]
    config_json: str
    global_params: torch.Tensor
    clip_norm: float | None = None  # user-level DP: clip each device's update to this L2 norm


def write_job(
    *, round_num: int, device_ids: list[int], config_json: str, global_params: np.ndarray, clip_norm: float | None = None
) -> RecordDict:
    job: dict = {"round": round_num, "device_ids": device_ids, "config": config_json}
    if clip_norm is not None:
        job["clip_norm"] = float(clip_norm)
    return RecordDict({"global": ArrayRecord({"params": Array(global_params)}), "job": ConfigRecord(job)})


def read_job(content: RecordDict) -> Job:
    job = content.config_records["job"]
    params = content.array_records["global"]["params"].numpy()
    return Job(
        round_num=int(job["round"]),
        device_ids=[int(i) for i in job["device_ids"]],  # type: ignore[union-attr]
        config_json=str(job["config"]),
        global_params=torch.from_numpy(params),
        clip_norm=float(job["clip_norm"]) if "clip_norm" in job else None,  # type: ignore[arg-type]
    )


def write_report(report: DeviceReport) -> RecordDict:
    updates = np.stack(report.updates) if report.updates else np.zeros((0, 0), dtype=np.float32)
    return RecordDict(
        {
            "updates": ArrayRecord({"updates": Array(updates)}),
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
                }
            ),
            "worker": MetricRecord({"train_time_s": report.train_time_s, "peak_rss_mb": report.peak_rss_mb}),
        }
    )


def read_report(content: RecordDict, num_params: int | None) -> DeviceReport:
    """The worker's report; `num_params` None: the reply carries no plain updates (secure aggregation)."""
    try:
        devices = content.config_records["devices"]
        updates = content.array_records["updates"]["updates"].numpy()
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
    if len(report.num_examples) != n or len(report.losses) != n:
        raise BadReply(f"reply lists {n} devices but {len(report.num_examples)} example counts")
    if report.within_bound and len(report.within_bound) != n:
        raise BadReply(f"reply lists {n} devices but {len(report.within_bound)} clipping bits")
    if report.dp_events and len(report.dp_events) != n:
        raise BadReply(f"reply lists {n} devices but {len(report.dp_events)} privacy events")
    if num_params is None:
        if updates.size:
            raise BadReply("a secure-aggregation reply carries plain updates")
        return report
    if n and updates.shape != (n, num_params):
        raise BadReply(f"updates have shape {updates.shape}, expected ({n}, {num_params})")
    report.updates = list(updates) if n else []
    return report


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays, strings and byte strings in a message (what dominates its size on
    the wire); numbers count 8 bytes each."""

    def size(value: object) -> int:
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, list):
            return sum(size(v) for v in value)
        return 8

    total = 0
    for record in content.array_records.values():
        total += sum(len(arr.data) for arr in record.values())
    for record in content.config_records.values():
        total += sum(size(v) for v in record.values())
    return total
