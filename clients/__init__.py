"""Reusable client-side training for federated learning, with only torch and numpy.

Nothing here imports Flower, Hydra or Ray: the simulator's workers call it in their
per-device loop, and a researcher can call the same functions from a notebook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clients.params import flat_params, load_flat_params, num_params
from clients.plan import dpsgd_event, local_steps, poisson_rate
from clients.seeding import new_generator, seed_generator
from clients.training import LocalTrainer, TrainConfig, TrainResult, evaluate, train_local

if TYPE_CHECKING:
    from clients.dp import DPSGDConfig, DPSGDEvent, DPSGDTrainer, check_model

# DP-SGD needs Opacus, whose import takes over a second: loaded on first use (PEP 562), so
# `import clients` stays cheap for runs without differential privacy.
_DP_EXPORTS = ("DPSGDConfig", "DPSGDEvent", "DPSGDTrainer", "check_model")


def __getattr__(name: str) -> Any:
    if name in _DP_EXPORTS:
        from clients import dp

        return getattr(dp, name)
    raise AttributeError(f"module 'clients' has no attribute {name!r}")


__all__ = [
    "DPSGDConfig",
    "DPSGDEvent",
    "DPSGDTrainer",
    "LocalTrainer",
    "TrainConfig",
    "TrainResult",
    "check_model",
    "dpsgd_event",
    "evaluate",
    "flat_params",
    "load_flat_params",
    "local_steps",
    "new_generator",
    "num_params",
    "poisson_rate",
    "seed_generator",
    "train_local",
]
