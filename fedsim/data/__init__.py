"""Datasets as device populations: `load_dataset(cfg, population=..., seed=...)`.

synthetic (LEAF/FedProx Synthetic(alpha, beta), any population), femnist (LEAF JSON files,
one device per writer), fashion_mnist (idx files, iid/Dirichlet/shard partitions) and
huggingface (any Hugging Face dataset through flwr-datasets; imported only when used),
shakespeare (next-character prediction, one device per speaking role), and custom (a user's
own FederatedDataset from `dataset.target`, fedsim.data.custom).
"""

from __future__ import annotations

from fedsim.config import (
    CustomDatasetConfig,
    DatasetConfig,
    FashionMnistConfig,
    FemnistConfig,
    HuggingFaceConfig,
    ShakespeareConfig,
    SyntheticConfig,
)
from fedsim.data.base import FederatedDataset
from fedsim.data.custom import custom_dataset
from fedsim.data.fashion_mnist import FashionMnistDataset
from fedsim.data.huggingface import HuggingFaceDataset  # imports flwr-datasets only when built
from fedsim.data.leaf import FemnistDataset
from fedsim.data.shakespeare import ShakespeareDataset
from fedsim.data.synthetic import SyntheticDataset

__all__ = ["FederatedDataset", "load_dataset"]


def load_dataset(cfg: DatasetConfig, *, population: int, seed: int) -> FederatedDataset:
    """The population of `population` devices described by `cfg`, deterministic in `seed`."""
    if isinstance(cfg, SyntheticConfig):
        return SyntheticDataset(cfg, population=population, seed=seed)
    if isinstance(cfg, FemnistConfig):
        return FemnistDataset(cfg, population=population)
    if isinstance(cfg, FashionMnistConfig):
        return FashionMnistDataset(cfg, population=population, seed=seed)
    if isinstance(cfg, HuggingFaceConfig):
        return HuggingFaceDataset(cfg, population=population, seed=seed)
    if isinstance(cfg, ShakespeareConfig):
        return ShakespeareDataset(cfg, population=population)
    if isinstance(cfg, CustomDatasetConfig):
        return custom_dataset(cfg.target or "", population=population, seed=seed)
    raise TypeError(f"load_dataset: unsupported dataset config {type(cfg).__name__}")
