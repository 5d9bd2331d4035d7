"""Any Hugging Face dataset as a device population, through flwr-datasets.

`cfg.hf_name` is a Hub dataset id (e.g. "ylecun/mnist", downloaded by `datasets` on first use)
or a packaged builder ("parquet", "csv", "json") reading the local `cfg.data_files`, which
works offline. flwr-datasets (Beutel et al. 2020, "Flower: A Friendly Federated Learning
Research Framework") shuffles the train split with the run's seed and partitions it:
iid (IidPartitioner: contiguous near-equal shards of the shuffled split), dirichlet
(DirichletPartitioner: per-class Dirichlet(alpha) proportions over devices, the label skew of
Hsu et al. 2019, re-drawn until every device has an example) or natural (NaturalIdPartitioner:
one device per distinct value of `partition_by`, e.g. a writer id). Device i is partition i.

Partitions are loaded when a device's data is asked for and converted on the fly: images to
float32 [C, H, W] in [0, 1] (grayscale: C = 1), numeric lists to float32 vectors. Only the
train split's labels (for num_classes) and one example (for input_shape) are read up front.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsim.config import HuggingFaceConfig
from fedsim.data.base import FederatedDataset
from fedsim.errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets


class HuggingFaceDataset(FederatedDataset):
    """A Hugging Face dataset split over devices by a flwr-datasets partitioner."""

    def __init__(self, cfg: HuggingFaceConfig, *, population: int, seed: int) -> None:
        try:
            import datasets
            from flwr_datasets import FederatedDataset as FlowerFederatedDataset
        except ImportError:
            raise DataError("huggingface: needs flwr-datasets; pip install -e '.[hf]'") from None

        self.name = cfg.name
        self._cfg = cfg
        self._source = cfg.hf_name if not cfg.data_files else f"{cfg.hf_name} {cfg.data_files}"
        load_kwargs: dict[str, Any] = {"data_files": cfg.data_files} if cfg.data_files else {}
        self._flower = FlowerFederatedDataset(
            dataset=cfg.hf_name,
            partitioners={cfg.train_split: _make_partitioner(cfg, population=population, seed=seed)},
            shuffle=True,
            seed=seed,
            **load_kwargs,
        )
        train = self._load_split(cfg.train_split)
        partition_keys = [cfg.partition_by] if cfg.partition != "iid" else []
        self._check_columns(train, cfg.train_split, [cfg.feature_key, cfg.label_key, *partition_keys])
        if len(train) == 0:
            raise DataError(f"huggingface: {self._source} split {cfg.train_split!r} has no rows")

        self._is_image = isinstance(train.features[cfg.feature_key], datasets.Image)
        self._image_mode = _image_mode(train[0][cfg.feature_key]) if self._is_image else None
        self.input_shape = tuple(self._features(train.select([0])).shape[1:])
        labels = self._labels(train)
        self.num_classes = cfg.num_classes if cfg.num_classes is not None else int(labels.max()) + 1
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError(
                f"huggingface: {self._source} split {cfg.train_split!r} column {cfg.label_key!r} "
                f"has labels outside 0..{self.num_classes - 1}"
            )

        self._num_devices = self._check_population(population, num_rows=len(train))
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_devices(self) -> int:
        return self._num_devices

    def num_examples(self, device_id: int) -> int:
        self.check_device_id(device_id)
        # A partition is an index view of the memory-mapped split: its length decodes nothing.
        return len(self._flower.load_partition(device_id, self._cfg.train_split))

    def device_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_device_id(device_id)
        partition = self._flower.load_partition(device_id, self._cfg.train_split)
        return torch.from_numpy(self._features(partition)), torch.from_numpy(self._labels(partition))

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test is None:
            if self._cfg.test_split is None:
                self._test = torch.zeros((0, *self.input_shape)), torch.zeros(0, dtype=torch.int64)
            else:
                test = self._load_split(self._cfg.test_split)
                self._check_columns(test, self._cfg.test_split, [self._cfg.feature_key, self._cfg.label_key])
                if self._cfg.max_test_examples is not None:
                    test = test.select(range(min(self._cfg.max_test_examples, len(test))))
                self._test = torch.from_numpy(self._features(test)), torch.from_numpy(self._labels(test))
        return self._test

    def _check_population(self, population: int, *, num_rows: int) -> int:
        """The number of devices: population, checked against what the partitioner can make."""
        cfg = self._cfg
        if cfg.partition == "natural":
            natural_ids = self._flower.partitioners[cfg.train_split].num_partitions
            if population > natural_ids:
                raise ConfigError(
                    "population",
                    f"huggingface {cfg.hf_name} has {natural_ids} distinct {cfg.partition_by!r} values; "
                    f"allowed: 1..{natural_ids}",
                )
            return population
        if population > num_rows:
            raise ConfigError(
                "population", f"huggingface {cfg.hf_name} has {num_rows} training rows; allowed: 1..{num_rows}"
            )
        if cfg.partition == "dirichlet":
            try:
                # Draws the assignment now, so an impossible one fails at start-up, not mid-run.
                self._flower.partitioners[cfg.train_split].num_partitions
            except ValueError as err:
                message = f"flwr-datasets could not partition: {_one_line(err)}"
                raise ConfigError("dataset.dirichlet_alpha", message) from None
        return population

    def _load_split(self, split: str) -> datasets.Dataset:
        try:
            return self._flower.load_split(split)
        except Exception as err:  # datasets raises many types (missing files, no network, bad split)
            raise DataError(f"huggingface: cannot load split {split!r} of {self._source}: {_one_line(err)}") from None

    def _check_columns(self, split: datasets.Dataset, split_name: str, keys: list[str]) -> None:
        for key in keys:
            if key not in split.column_names:
                raise DataError(
                    f"huggingface: {self._source} split {split_name!r} has no column {key!r}; "
                    f"columns: {', '.join(split.column_names)}"
                )

    def _features(self, rows: datasets.Dataset) -> np.ndarray:
        """float32 [n, *input_shape]: images scaled to [0, 1] as [C, H, W], numbers as vectors."""
        key = self._cfg.feature_key
        if self._is_image:
            assert self._image_mode is not None
            mode = self._image_mode
            pixels = [np.asarray(img if img.mode == mode else img.convert(mode)) for img in rows[key]]
            if not pixels:
                return np.zeros((0, *self.input_shape), np.float32)
            stacked = np.stack(pixels).astype(np.float32) / 255.0
            # Grayscale [n, H, W] -> [n, 1, H, W]; colour [n, H, W, C] -> [n, C, H, W].
            return stacked[:, None] if stacked.ndim == 3 else np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))
        values = _column(rows, key)
        if len(values) == 0:
            return np.zeros((0, *self.input_shape), np.float32)
        try:
            vectors = np.asarray(np.stack(values) if values.dtype == object else values, dtype=np.float32)
        except (ValueError, TypeError):
            raise DataError(
                f"huggingface: {self._source} column {key!r} must hold images or equal-length lists of numbers"
            ) from None
        return vectors.reshape(len(vectors), -1)

    def _labels(self, rows: datasets.Dataset) -> np.ndarray:
        labels = _column(rows, self._cfg.label_key)
        if len(labels) == 0:
            return np.zeros(0, np.int64)
        if labels.dtype.kind not in "iub":
            raise DataError(
                f"huggingface: {self._source} column {self._cfg.label_key!r} must hold integer classes, got {labels.dtype}"
            )
        return labels.astype(np.int64)


def _make_partitioner(cfg: HuggingFaceConfig, *, population: int, seed: int) -> Any:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if cfg.partition == "iid":
        return IidPartitioner(num_partitions=population)
    if cfg.partition == "dirichlet":
        # min_partition_size=1: every device gets data, as with fedsim's own Dirichlet split.
        return DirichletPartitioner(
            num_partitions=population,
            partition_by=cfg.partition_by,
            alpha=cfg.dirichlet_alpha,
            min_partition_size=1,
            seed=seed,
        )
    if cfg.partition == "natural":
        return NaturalIdPartitioner(partition_by=cfg.partition_by)
    raise ConfigError("dataset.partition", f"unknown value {cfg.partition!r}; allowed: iid, dirichlet, natural")


def _image_mode(image: Any) -> str:
    """PIL mode every image is converted to: one band -> "L", anything else -> "RGB"."""
    return "L" if len(image.getbands()) == 1 and image.mode != "P" else "RGB"


def _column(rows: datasets.Dataset, key: str) -> np.ndarray:
    return rows.select_columns([key]).with_format("numpy")[:][key]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
