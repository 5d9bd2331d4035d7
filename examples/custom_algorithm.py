"""Your own federated algorithm: a server step of your own, plugged in without editing fedsim.

    python examples/custom_algorithm.py                  # 1,000 devices, 30 rounds
    python examples/custom_algorithm.py --rounds 3 --population 100 simulation.num_workers=2

A strategy is a `fedsim.strategies.Strategy` subclass; the round loop calls its `step` with the
round's mean update (the noised mean under DP-FedAvg, so anything `step` does is
post-processing) and checkpoints its `state_dict`. This one decays the server learning rate,
eta_t = eta / sqrt(t), and keeps momentum on the server: v <- beta v + Delta_t, x <- x + eta_t v.

fedsim imports it as `algorithm.name=custom_algorithm:DecayingMomentum` (this file's directory
is on sys.path, and the simulator's workers inherit it). To give it a short name for the
command line, register it in a module your runs import:
`fedsim.registry.STRATEGIES.add("decaying", "custom_algorithm:DecayingMomentum", "...")`.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

import fedsim
from fedsim.strategies import Strategy


class DecayingMomentum(Strategy):
    """x <- x + (eta / sqrt(t)) v, v <- beta v + Delta_t (eta: algorithm.server_lr, beta: algorithm.beta1)."""

    def __init__(self, cfg: Any, num_params: int, run_dir: Any = None) -> None:
        super().__init__(cfg, num_params, run_dir)
        self.beta = cfg.algorithm.beta1
        self.t = 0
        self.v: torch.Tensor | None = None
        self.lrs: list[float] = []

    def describe(self) -> str:
        return f"DecayingMomentum: eta_t = {self.lr:g} / sqrt(t), server momentum {self.beta:g}"

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.v = delta.clone() if self.v is None else self.beta * self.v + delta
        lr = self.lr / math.sqrt(self.t)
        self.lrs.append(lr)
        return params + lr * self.v

    def state_dict(self) -> dict[str, Any]:  # what a checkpoint needs for a bit-identical resume
        return {"t": self.t, "v": self.v, "lrs": list(self.lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.v, self.lrs = state.get("t", 0), state.get("v"), list(state.get("lrs", []))

    def summary(self) -> dict[str, Any]:
        return super().summary() | {"server_lrs": self.lrs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    parser.add_argument("overrides", nargs="*", help="more fedsim overrides (key=value), as on the command line")
    args = parser.parse_args()

    result = fedsim.simulate(
        [
            "algorithm.name=custom_algorithm:DecayingMomentum",
            "algorithm.server_lr=0.5",
            "algorithm.beta1=0.5",
            f"population={args.population}",
            f"rounds={args.rounds}",
            f"cohort.size={args.cohort}",
            "simulation.num_workers=1",
            *args.overrides,
        ],
        output_dir=args.out,
    )
    strategy = result.summary["strategy"]
    print(f"final test accuracy: {result.summary['final_test_accuracy']:.4f}")
    print(f"strategy: {strategy['name']}")
    print("server learning rates: " + " ".join(f"{lr:.6f}" for lr in strategy["server_lrs"]))
    print(f"run directory: {result.run_dir}")


if __name__ == "__main__":
    main()
