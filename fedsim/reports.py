"""What a worker reports for one round: a row per trained device, and its failures.

Shared by the worker that fills it (fedsim.worker), the wire format that carries it
(fedsim.wire), SecAgg+ rounds (fedsim.secure_rounds), the privacy mechanisms that account it
(fedsim.privacy) and the server that sums it. It sits below all of them and imports only numpy,
so none of them has to import another for the type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DeviceReport:
    """The outcome of one round on one worker: a row per trained device, and failures."""

    device_ids: list[int] = field(default_factory=list)
    updates: list[np.ndarray] = field(default_factory=list)
    num_examples: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    # Sample-level DP (empty without it): the event each device spent, its clipped fraction.
    dp_events: list[tuple[float, float, int]] = field(default_factory=list)  # (noise_multiplier, sample_rate, steps)
    clip_fractions: list[float] = field(default_factory=list)
    # User-level DP (empty without it): was the device's update norm within the clip norm C?
    within_bound: list[bool] = field(default_factory=list)
    failed_ids: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    train_time_s: float = 0.0
    peak_rss_mb: float = 0.0

    PER_DEVICE = ("device_ids", "updates", "num_examples", "losses", "dp_events", "clip_fractions", "within_bound")

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows of every per-device list (lists left empty stay empty)."""
        for name in self.PER_DEVICE:
            values = getattr(self, name)
            if values:
                setattr(self, name, [values[i] for i in rows])


def reject_non_finite(report: DeviceReport) -> None:
    """Move devices whose update has NaN/inf values (or a non-positive example count) to the
    report's failures, in place."""
    keep = [
        i
        for i, (u, n) in enumerate(zip(report.updates, report.num_examples, strict=True))
        if n > 0 and np.isfinite(u).all()
    ]
    if len(keep) == len(report.device_ids):
        return
    for i in sorted(set(range(len(report.device_ids))) - set(keep)):
        report.failed_ids.append(report.device_ids[i])
        report.failures.append("rejected by the server: update has NaN/inf values or no examples")
    report.keep_rows(keep)
