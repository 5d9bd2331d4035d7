"""Reusable client-side training for federated learning, with only torch and numpy.

Nothing here imports Flower, Hydra or Ray: the simulator's workers call it in their
per-device loop, and a researcher can call the same functions from a notebook.
"""

from clients.params import flat_params, load_flat_params, num_params
from clients.training import LocalTrainer, TrainConfig, TrainResult, evaluate, mix_seed, train_local

__all__ = [
    "LocalTrainer",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "flat_params",
    "load_flat_params",
    "mix_seed",
    "num_params",
    "train_local",
]
