"""Combining device updates on the server: the example-weighted sum behind the mean update
Delta_t = sum_i w_i Delta_i / sum_i w_i that every strategy steps with (fedsim.strategies).

Reproducibility: float addition is not associative, so the mean is accumulated in float64
in ascending device-id order, whatever order the workers' replies arrived in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RunningSum:
    """Example-weighted sum of device updates, accumulated in float64 in device-id order."""

    def __init__(self, num_params: int) -> None:
        self.total = torch.zeros(num_params, dtype=torch.float64)
        self.weight = 0.0
        self.count = 0

    def add_all(self, updates: Iterable[tuple[int, torch.Tensor, float]]) -> None:
        """Add (device_id, update, weight) triples, sorted by device id first."""
        for _, update, weight in sorted(updates, key=lambda t: t[0]):
            self.total.add_(update.to(torch.float64), alpha=weight)
            self.weight += weight
            self.count += 1

    def mean(self) -> torch.Tensor:
        if self.weight <= 0:
            raise ValueError("no device updates to average")
        return (self.total / self.weight).to(torch.float32)
