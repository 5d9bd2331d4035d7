"""The population of devices and the one interface every dataset implements.

A dataset is a *population*: device ids 0..num_devices-1, each with its own local examples,
plus a central held-out test set for the server's evaluation. Device data is produced on
demand (`device_data`), so memory grows with the data a dataset really holds, never with
bookkeeping per device beyond a few integers; a generated population (synthetic) holds nothing
per device at all, so its memory does not depend on the population.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch


class FederatedDataset(ABC):
    """A population of devices with local data, and a central test set."""

    name: str
    input_shape: tuple[int, ...]  # shape of one example, e.g. (60,) or (1, 28, 28)
    num_classes: int
    token_inputs: bool = False  # examples are token indices in [0, num_classes) (text), not features
    # Training labels are the next token at every input position: y int64 [n, seq_len], and the
    # model gives logits [n, num_classes, seq_len] in training mode (test labels stay [n]).
    sequence_targets: bool = False

    @property
    @abstractmethod
    def num_devices(self) -> int:
        """Number of devices in the population (ids 0..num_devices-1)."""

    @abstractmethod
    def device_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training examples of one device: x float32 [n, *input_shape], y int64 [n].

        Deterministic: the same device id always gives the same tensors (for a given seed).
        """

    @abstractmethod
    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The central held-out test set (x float32, y int64), for the server's evaluation."""

    def num_examples(self, device_id: int) -> int:
        """Training examples on one device (subclasses override when cheaper than loading)."""
        return int(self.device_data(device_id)[1].shape[0])

    def size_counts(self) -> dict[int, float]:
        """How many devices have each number of training examples: {num_examples: devices}.

        Exact here (one `num_examples` call per device: fine for datasets whose population is
        bounded by the examples they hold). A generated population whose sizes are independent
        draws (synthetic) may return the expected counts, population x P(size), when counting
        would cost O(population) time (10^9 devices).
        """
        counts: dict[int, float] = {}
        for device_id in range(self.num_devices):
            n = self.num_examples(device_id)
            counts[n] = counts.get(n, 0.0) + 1.0
        return counts

    def notes(self) -> list[str]:
        """Lines about the population for the run's terminal output (e.g. devices left out)."""
        return []

    def save(self, run_dir: Path) -> None:
        """Write files a run's model cannot be read without (a text dataset's vocabulary)."""

    def final_summary(self, model: torch.nn.Module, generator: torch.Generator) -> dict[str, Any]:
        """Dataset-specific results of the final model for summary.json (e.g. sampled text).

        Randomness comes from `generator` only (a run stream), so a reproducible run repeats it.
        """
        return {}

    def check_device_id(self, device_id: int) -> None:
        if not 0 <= device_id < self.num_devices:
            raise IndexError(f"device id {device_id} outside the population 0..{self.num_devices - 1}")
