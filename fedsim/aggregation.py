"""Combining device updates: the weighted sum behind the mean update
Delta_t = sum_i w_i Delta_i / sum_i w_i that every strategy steps with (fedsim.strategies).

Reproducibility: float addition is not associative, so the order of the sum is fixed by the
cohort alone. The round's cohort is cut into groups (`fedsim.placement.cohort_groups`, sorted
device ids); a group's sum is accumulated in float64 in device-id order (`group_sum`), where
the group trained (the worker ships one vector per group, not one per device) or on the
server from the devices' rows (the classic layout, strategies that read each device's update);
the server then adds the group sums in group order (`RunningSum.add_groups`). Either way the
same operations run on the same values, so the model is the same bits with 1, 2 or 16 workers,
with the classic layout, and whatever order the replies arrive in. numpy's elementwise
multiply and add are exact IEEE operations (no fused multiply-add), so worker and server agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


def group_sum(rows: Sequence[tuple[np.ndarray, float]], num_params: int) -> np.ndarray:
    """sum_i w_i u_i over one group's (update, weight) rows, given in device-id order, in float64."""
    total = np.zeros(num_params, dtype=np.float64)
    scaled = np.empty(num_params, dtype=np.float64)
    for update, weight in rows:
        np.multiply(np.asarray(update, dtype=np.float64), weight, out=scaled)
        total += scaled
    return total


class RunningSum:
    """The round's (weighted) sum of device updates: group sums added in group order."""

    def __init__(self, num_params: int) -> None:
        self.total = torch.zeros(num_params, dtype=torch.float64)
        self.weight = 0.0
        self.count = 0

    def add_groups(self, sums: Iterable[tuple[int, np.ndarray, float, int]]) -> None:
        """Add (group key, float64 sum, weight, devices) entries, sorted by group key first (the
        key is the group's first device id, so key order is group order)."""
        total = self.total.numpy()  # shares memory with self.total
        for _, vector, weight, count in sorted(sums, key=lambda t: t[0]):
            total += vector
            self.weight += weight
            self.count += count

    def add_all(self, updates: Iterable[tuple[int, torch.Tensor | np.ndarray, float]]) -> None:
        """Add (device_id, update, weight) rows as one group, in device-id order."""
        rows = sorted(updates, key=lambda t: t[0])
        if rows:
            vector = group_sum([(np.asarray(u), w) for _, u, w in rows], self.total.numel())
            self.add_groups([(rows[0][0], vector, sum(w for _, _, w in rows), len(rows))])

    def mean(self) -> torch.Tensor:
        if self.weight <= 0:
            raise ValueError("no device updates to average")
        return (self.total / self.weight).to(torch.float32)
