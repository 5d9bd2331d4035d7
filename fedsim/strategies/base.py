"""The interface between the round loop and a federated algorithm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.config import FedsimConfig
from fedsim.errors import ConfigError
from fedsim.reports import DeviceReport


class Strategy:
    """A federated algorithm's server side (FedAvg's: x <- x + eta * mean update).

    The loop calls, per round: `job_arrays` (for each worker's devices), then, once the
    round's updates are combined (the example-weighted mean, or DP-FedAvg's noised mean),
    `step` with that mean, then `observe` with the devices' reports. `state_dict` /
    `load_state_dict` carry everything `step` and `observe` depend on through checkpoints,
    so a resumed run is bit-identical to an uninterrupted one.

    Class attributes a subclass sets:
    - needs_device_updates: True if `observe` reads each device's own update. Such a
      strategy cannot run where the server must not see them (secagg=secaggplus) or where
      what it derives from them would escape the noise (privacy.dpfedavg): `check` refuses.
    - vectorizable: False if devices need per-device inputs the batched trainer
      (clients.vectorized) does not take (then devices train one by one).
    """

    needs_device_updates = False
    vectorizable = True

    @classmethod
    def check(cls, cfg: FedsimConfig) -> None:
        """Raise ConfigError for a config this strategy cannot serve."""
        if not cls.needs_device_updates:
            return
        name = cfg.algorithm.name
        from fedsim.registry import STRATEGIES

        sum_only = ", ".join(n for n in STRATEGIES.names() if not STRATEGIES[n].needs_device_updates)
        if cfg.secagg.name != "none":
            raise ConfigError("algorithm.name", f"{name} reads each device's update, which secagg={cfg.secagg.name} "
                                                f"hides from the server; allowed with it: strategies that need only the sum "
                                                f"({sum_only})")  # fmt: skip
        if cfg.privacy.dpfedavg is not None:
            raise ConfigError("algorithm.name", f"{name} keeps state computed from each device's un-noised update, "
                                                f"outside DP-FedAvg's guarantee; allowed with privacy.dpfedavg: {sum_only}")  # fmt: skip

    def __init__(self, cfg: FedsimConfig, num_params: int, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.num_params = num_params
        self.run_dir = run_dir
        self.lr = cfg.algorithm.server_lr

    def describe(self) -> str | None:
        """One line for the run's log (None: nothing worth saying)."""
        return None

    def job_arrays(self, round_num: int, device_ids: list[int]) -> dict[str, np.ndarray]:
        """Arrays a worker's job carries besides the global weights (float32; rows per device
        are in `device_ids` order)."""
        del round_num, device_ids
        return {}

    @staticmethod
    def device_correction(arrays: dict[str, np.ndarray], row: int) -> torch.Tensor | None:
        """On the worker: a flat tensor added to every local gradient of the `row`-th device of
        the job (None: plain local SGD)."""
        del arrays, row
        return None

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new global weights, given the round's mean update `delta` (float32)."""
        return params + self.lr * delta

    def observe(self, round_num: int, reports: list[DeviceReport]) -> dict[str, Any]:
        """After `step`: what the strategy learns from the replies; returns round metrics."""
        del round_num, reports
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def checkpointed(self, round_num: int, kept_rounds: list[int]) -> None:
        """Told after a checkpoint of `round_num` is written; `kept_rounds`: the rounds of the
        checkpoints still on disk (a resume can go back to any of them)."""
        del round_num, kept_rounds

    def summary(self) -> dict[str, Any]:
        """What summary.json records of the strategy."""
        return {"name": self.cfg.algorithm.name}

    def close(self) -> None:
        """Release files or memory held for the run."""
