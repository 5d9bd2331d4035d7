"""Fashion-MNIST (Xiao et al. 2017) from its four idx files, partitioned over devices.

Reads train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte, each plain or gzipped (Debian's dataset-fashion-mnist installs the
.gz files in /usr/share/datasets/fashion-mnist). The idx format is parsed here: a big-endian
magic number (0x00000803 for images, 0x00000801 for labels), big-endian dimension sizes, then
unsigned bytes. The training examples are split over the population by one of the recipes in
`fedsim.data.partition` (iid, Dirichlet label skew, McMahan's shards); the 10,000 t10k
examples are the central test set.

Pixels are kept as uint8 (a quarter of the float32 memory) and scaled to [0, 1] when a
device's data is asked for.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from fedsim.config import FashionMnistConfig
from fedsim.data.base import FederatedDataset
from fedsim.data.partition import Partition, dirichlet_partition, iid_partition, shard_partition
from fedsim.errors import ConfigError, DataError

FASHION_CLASSES = 10
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_PARTITION_STREAM = 3  # keeps the partition's random numbers apart from other uses of the seed


class FashionMnistDataset(FederatedDataset):
    """Fashion-MNIST: the training examples partitioned over devices, t10k as the test set."""

    def __init__(self, cfg: FashionMnistConfig, *, population: int, seed: int) -> None:
        self.name = cfg.name
        self.num_classes = FASHION_CLASSES
        root = Path(cfg.path)
        if not root.is_dir():
            raise DataError(f"fashion_mnist: {root} is not a directory (expected the four Fashion-MNIST idx files in it)")
        self._train_images, self._train_labels = read_idx_pair(root, "train")
        test_images, test_labels = read_idx_pair(root, "t10k")
        if test_images.shape[1:] != self._train_images.shape[1:]:
            raise DataError(
                f"fashion_mnist: {root} has train images of size {self._train_images.shape[1:]} "
                f"but t10k images of size {test_images.shape[1:]}"
            )
        self.input_shape = (1, *self._train_images.shape[1:])

        num_train = len(self._train_labels)
        if not 1 <= population <= num_train:
            raise ConfigError(
                "population", f"fashion_mnist at {root} has {num_train} training examples; allowed: 1..{num_train}"
            )
        if cfg.partition == "shards" and population * cfg.shards_per_device > num_train:
            raise ConfigError(
                "dataset.shards_per_device",
                f"{population} devices x {cfg.shards_per_device} shards exceed the {num_train} training examples; "
                f"allowed: 1..{num_train // population}",
            )
        self.partition = partition_labels(cfg, self._train_labels, population=population, seed=seed)

        if cfg.max_test_examples is not None:
            test_images = test_images[: cfg.max_test_examples]
            test_labels = test_labels[: cfg.max_test_examples]
        self._test = _to_tensors(test_images, test_labels)

    @property
    def num_devices(self) -> int:
        return len(self.partition)

    def num_examples(self, device_id: int) -> int:
        self.check_device_id(device_id)
        return int(self.partition.offsets[device_id + 1] - self.partition.offsets[device_id])

    def device_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_device_id(device_id)
        owned = self.partition.part(device_id)
        return _to_tensors(self._train_images[owned], self._train_labels[owned])

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._test


def partition_labels(cfg: FashionMnistConfig, labels: np.ndarray, *, population: int, seed: int) -> Partition:
    """The configured partition of the training examples over `population` devices."""
    rng = np.random.default_rng([seed, _PARTITION_STREAM])
    if cfg.partition == "iid":
        return iid_partition(len(labels), population, rng)
    if cfg.partition == "dirichlet":
        return dirichlet_partition(labels, population, cfg.dirichlet_alpha, rng)
    if cfg.partition == "shards":
        return shard_partition(labels, population, cfg.shards_per_device, rng)
    raise ConfigError("dataset.partition", f"unknown value {cfg.partition!r}; allowed: iid, dirichlet, shards")


def read_idx_pair(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [n, rows, cols] and labels int64 [n] of `<prefix>-images/labels` in root."""
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(
            f"fashion_mnist: {images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= FASHION_CLASSES:
        raise DataError(f"fashion_mnist: {labels_path} has labels outside 0..{FASHION_CLASSES - 1}")
    return images, labels


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """The uint8 array stored in one idx file (plain or .gz), checked against its header."""
    raw = _read_bytes(path)
    num_dims = expected_magic & 0xFF
    header_size = 4 + 4 * num_dims
    if len(raw) < header_size:
        raise DataError(
            f"fashion_mnist: {path} is truncated ({len(raw)} bytes, shorter than the {header_size}-byte idx header)"
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"fashion_mnist: {path} has idx magic number 0x{magic:08x}; expected 0x{expected_magic:08x}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=num_dims, offset=4))
    expected_size = header_size + int(np.prod(dims))
    if len(raw) != expected_size:
        problem = "truncated" if len(raw) < expected_size else "longer than its header says"
        raise DataError(
            f"fashion_mnist: {path} is {problem} ({len(raw)} bytes; dimensions {dims} need {expected_size})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"fashion_mnist: {root} has no {stem} or {stem}.gz")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"fashion_mnist: {path} is not a readable gzip file ({reason}; truncated?)") from None
    except OSError as err:
        raise DataError(f"fashion_mnist: cannot read {path} ({err.strerror or err})") from None


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [n, 1, rows, cols] in [0, 1], y int64 [n]."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
