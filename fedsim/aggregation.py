"""Combining device updates on the server: the weighted mean and the server optimizers.

Reddi et al. 2021 ("Adaptive Federated Optimization", Alg. 2) write every method here as
one server step on the *pseudo-gradient* Delta_t = sum_i w_i Delta_i / sum_i w_i, the
example-weighted mean of device updates (local weights minus global weights):

    FedAvg / FedProx:  x <- x + eta * Delta_t                     (eta = 1: McMahan et al. 2017)
    FedAdam:           m <- b1 m + (1-b1) Delta_t
                       v <- b2 v + (1-b2) Delta_t^2
                       x <- x + eta * m / (sqrt(v) + tau)
    FedYogi:           v <- v - (1-b2) Delta_t^2 sign(v - Delta_t^2)   (m and x as FedAdam)

Reproducibility: float addition is not associative, so the mean is accumulated in float64
in ascending device-id order, whatever order the workers' replies arrived in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedsim.config import AlgorithmConfig


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


class ServerOptimizer:
    """x <- x + eta * Delta (FedAvg/FedProx); subclasses keep moments (FedAdam/FedYogi)."""

    def __init__(self, cfg: AlgorithmConfig) -> None:
        self.lr = cfg.server_lr

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Return the new global parameters given the mean device update `delta`."""
        return params + self.lr * delta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        del state


class FedAdam(ServerOptimizer):
    """Reddi et al. 2021, Alg. 2 (FedAdam). No bias correction, as in the paper."""

    def __init__(self, cfg: AlgorithmConfig) -> None:
        super().__init__(cfg)
        self.beta1, self.beta2, self.tau = cfg.beta1, cfg.beta2, cfg.tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta_sq

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(params)
            # Reddi et al. initialise v_0 >= tau^2 (Alg. 2); tau^2 keeps round 1 well scaled.
            self.v = torch.full_like(params, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self._second_moment(self.v, delta * delta)
        return params + self.lr * self.m / (self.v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.m is None or self.v is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.m, self.v = state.get("m"), state.get("v")


class FedYogi(FedAdam):
    """Reddi et al. 2021, Alg. 2 (FedYogi): additive, sign-controlled second moment."""

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "fedavg": ServerOptimizer,
    "fedprox": ServerOptimizer,  # FedProx changes the devices' objective, not the server step
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


def build_server_optimizer(cfg: AlgorithmConfig) -> ServerOptimizer:
    return SERVER_OPTIMIZERS[cfg.name](cfg)
