"""FedAvgM: FedAvg with server momentum (Hsu, Qi, Brown 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", Sec. 3).

On the pseudo-gradient Delta_t (the round's mean update, noised under DP-FedAvg):

    v <- beta v + Delta_t            (beta = algorithm.beta1; v_0 = 0)
    x <- x + eta v                   (eta = algorithm.server_lr)

With beta = 0 it is FedAvg. The effective step is eta / (1 - beta) in steady state, so
eta ~ 1 - beta keeps FedAvg's step size. Under DP the momentum averages the independent noise
of successive rounds (McMahan et al. 2018 train DP-FedAvg with server momentum 0.9); it is
post-processing of the released updates, so no guarantee changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedsim.config import FedsimConfig
from fedsim.strategies.base import Strategy


class FedAvgM(Strategy):
    def __init__(self, cfg: FedsimConfig, num_params: int, run_dir: Path | None = None) -> None:
        super().__init__(cfg, num_params, run_dir)
        self.beta = cfg.algorithm.beta1
        self.v: torch.Tensor | None = None

    def describe(self) -> str | None:
        return f"FedAvgM: server momentum beta = {self.beta:g}, server lr eta = {self.lr:g}"

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        self.v = delta.clone() if self.v is None else self.beta * self.v + delta
        return params + self.lr * self.v

    def state_dict(self) -> dict[str, Any]:
        return {} if self.v is None else {"v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.v = state.get("v")
