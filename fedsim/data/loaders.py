"""The dataset loaders fedsim.registry.DATASETS names: (config, population, seed) -> FederatedDataset."""

from __future__ import annotations

from fedsim.data.base import FederatedDataset


def synthetic(cfg, *, population: int, seed: int) -> FederatedDataset:  # noqa: ANN001 - its DatasetConfig
    from fedsim.data.synthetic import SyntheticDataset

    return SyntheticDataset(cfg, population=population, seed=seed)


def femnist(cfg, *, population: int, seed: int) -> FederatedDataset:  # noqa: ANN001
    from fedsim.data.leaf import FemnistDataset

    return FemnistDataset(cfg, population=population)  # one device per writer: no randomness


def fashion_mnist(cfg, *, population: int, seed: int) -> FederatedDataset:  # noqa: ANN001
    from fedsim.data.fashion_mnist import FashionMnistDataset

    return FashionMnistDataset(cfg, population=population, seed=seed)


def huggingface(cfg, *, population: int, seed: int) -> FederatedDataset:  # noqa: ANN001
    from fedsim.data.huggingface import HuggingFaceDataset

    return HuggingFaceDataset(cfg, population=population, seed=seed)


def shakespeare(cfg, *, population: int, seed: int) -> FederatedDataset:  # noqa: ANN001
    from fedsim.data.shakespeare import ShakespeareDataset

    return ShakespeareDataset(cfg, population=population)  # one device per speaking role


def custom(cfg, *, population: int, seed: int) -> FederatedDataset:  # noqa: ANN001
    from fedsim.data.custom import custom_dataset

    return custom_dataset(cfg.target or "", population=population, seed=seed)
