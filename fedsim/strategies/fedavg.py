"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020).

Both take the server step x <- x + eta * Delta_t on the pseudo-gradient Delta_t, the
example-weighted mean of the device updates (Reddi et al. 2021, Alg. 2 with a plain SGD
server optimizer; eta = algorithm.server_lr, 1.0 = McMahan et al.'s FedAvg). FedProx changes
the devices' objective (the proximal term mu/2 ||w - x||^2, algorithm.proximal_mu, applied
by clients.training), not the server step.
"""

from __future__ import annotations

from fedsim.strategies.base import Strategy


class FedAvg(Strategy):
    """x <- x + eta * Delta_t."""


class FedProx(FedAvg):
    """FedAvg's server step; the devices add mu * (w - x) to each gradient (Li et al. 2020, Eq. 2)."""

    def describe(self) -> str | None:
        return f"FedProx: proximal term mu = {self.cfg.algorithm.proximal_mu:g} on the devices"
