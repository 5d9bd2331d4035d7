"""Datasets as device populations: `load_dataset(cfg, population=..., seed=...)`.

synthetic (LEAF/FedProx Synthetic(alpha, beta), any population), femnist (LEAF JSON files,
one device per writer), fashion_mnist (idx files, iid/Dirichlet/shard partitions) and
huggingface (any Hugging Face dataset through flwr-datasets; imported only when used),
shakespeare (next-character prediction, one device per speaking role), and custom (a user's
own FederatedDataset from `dataset.target`, fedsim.data.custom).
"""

from __future__ import annotations

from fedsim.config import DatasetConfig
from fedsim.data.base import FederatedDataset
from fedsim.registry import DATASETS

__all__ = ["FederatedDataset", "load_dataset"]


def load_dataset(cfg: DatasetConfig, *, population: int, seed: int) -> FederatedDataset:
    """The population of `population` devices described by `cfg`, deterministic in `seed`
    (the loader fedsim.registry.DATASETS names for cfg.name)."""
    return DATASETS.load(cfg.name)(cfg, population=population, seed=seed)
