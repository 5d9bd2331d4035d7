"""The privacy event of one DP-SGD fit, in a module of its own: `clients.training` names it in
`TrainResult` and `clients.vectorized` makes it without importing `clients.dp` (and Opacus),
which itself builds on `clients.training`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DPSGDEvent:
    """The privacy event one fit spent: `steps` subsampled Gaussian mechanisms (what the ledger records)."""

    noise_multiplier: float
    sample_rate: float  # Poisson rate q of this device's examples per step
    steps: int  # noisy optimizer steps taken, empty batches included
