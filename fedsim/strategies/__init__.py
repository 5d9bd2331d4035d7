"""Federated algorithms' server side, as registry entries (fedsim.registry.STRATEGIES).

A strategy owns what the round loop leaves open: what each device is sent besides the
global weights (`job_arrays`, and `device_correction` on the device), how the round's mean
update becomes the next model (`step`), what it learns from the devices' replies
(`observe`), and its state for checkpoints. The loop (fedsim.server_app) calls these and
nothing else, so an algorithm is one file here plus one line in fedsim/registry.py.
Cohort sampling is not a strategy's: the privacy accountants rely on cohort.sampling.
"""

from __future__ import annotations

from pathlib import Path

from fedsim.config import FedsimConfig
from fedsim.registry import STRATEGIES
from fedsim.strategies.base import Strategy

__all__ = ["Strategy", "build", "strategy_class"]


def strategy_class(cfg: FedsimConfig) -> type[Strategy]:
    cls = STRATEGIES.load(cfg.algorithm.name)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        from fedsim.errors import ConfigError

        raise ConfigError("algorithm.name", f"{cfg.algorithm.name!r} is not a fedsim.strategies.Strategy subclass")
    return cls


def build(cfg: FedsimConfig, num_params: int, run_dir: Path | None = None) -> Strategy:
    """The run's strategy (checked against the config first: a combination it cannot serve
    raises ConfigError before any round)."""
    cls = strategy_class(cfg)
    cls.check(cfg)
    return cls(cfg, num_params, run_dir)
