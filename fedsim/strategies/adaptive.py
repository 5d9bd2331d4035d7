"""Adaptive server optimizers, Reddi et al. 2021 ("Adaptive Federated Optimization", Alg. 2).

On the pseudo-gradient Delta_t (the mean device update):

    m <- b1 m + (1-b1) Delta_t
    FedAdagrad: v <- v + Delta_t^2
    FedAdam:    v <- b2 v + (1-b2) Delta_t^2
    FedYogi:    v <- v - (1-b2) Delta_t^2 sign(v - Delta_t^2)
    x <- x + eta * m / (sqrt(v) + tau)

No bias correction, as in the paper; v_0 = tau^2 (the paper asks v_0 >= tau^2), m_0 = 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedsim.config import FedsimConfig
from fedsim.strategies.base import Strategy


class FedAdam(Strategy):
    def __init__(self, cfg: FedsimConfig, num_params: int, run_dir: Path | None = None) -> None:
        super().__init__(cfg, num_params, run_dir)
        a = cfg.algorithm
        self.beta1, self.beta2, self.tau = a.beta1, a.beta2, a.tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta_sq

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(params)
            self.v = torch.full_like(params, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self._second_moment(self.v, delta * delta)
        return params + self.lr * self.m / (self.v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.m is None or self.v is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m, self.v = state.get("m"), state.get("v")


class FedYogi(FedAdam):
    """Additive, sign-controlled second moment."""

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)


class FedAdagrad(FedAdam):
    """Summed second moment (beta2 is not used)."""

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq
