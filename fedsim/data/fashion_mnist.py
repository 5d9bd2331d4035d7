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
        # The training images are checked here and read on the first device_data call: the
        # server partitions by the labels and never trains, so it never holds the 47 MB of pixels.
        self._images_path, train_shape, self._train_labels = read_idx_pair(root, "train", load_images=False)
        self._train_images: np.ndarray | None = None
        test_images, test_labels = read_idx_pair(root, "t10k")
        if test_images.shape[1:] != train_shape[1:]:
            raise DataError(
                f"fashion_mnist: {root} has train images of size {train_shape[1:]} "
                f"but t10k images of size {test_images.shape[1:]}"
            )
        self.input_shape = (1, *train_shape[1:])

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
        if self._train_images is None:
            self._train_images = read_idx(self._images_path, IMAGES_MAGIC)
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


def read_idx_pair(root: Path, prefix: str, *, load_images: bool = True) -> tuple:
    """Images uint8 [n, rows, cols] and labels int64 [n] of `<prefix>-images/labels` in root.

    load_images=False: (images path, images shape, labels), the images file checked whole
    (header, size, gzip stream) without being kept."""
    images_path = find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, IMAGES_MAGIC, keep=load_images)
    shape = images.shape if isinstance(images, np.ndarray) else images
    labels = read_idx(labels_path, LABELS_MAGIC).astype(np.int64)
    if shape[0] != len(labels):
        raise DataError(
            f"fashion_mnist: {images_path} holds {shape[0]} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= FASHION_CLASSES:
        raise DataError(f"fashion_mnist: {labels_path} has labels outside 0..{FASHION_CLASSES - 1}")
    return (images, labels) if load_images else (images_path, shape, labels)


def read_idx(path: Path, expected_magic: int, *, keep: bool = True) -> np.ndarray | tuple[int, ...]:
    """The uint8 array stored in one idx file (plain or .gz), checked against its header.

    Read straight into one array of the size the header gives (a gzip file decompressed into
    it in place: no second copy of the file's bytes). keep=False: the whole file is checked the
    same way, in 1 MB pieces, and only its dims are returned."""
    num_dims = expected_magic & 0xFF
    header_size = 4 + 4 * num_dims
    try:
        with _open(path) as stream:
            header = stream.read(header_size)
            if len(header) < header_size:
                raise DataError(
                    f"fashion_mnist: {path} is truncated ({len(header)} bytes, shorter than the {header_size}-byte idx header)"
                )
            magic = int.from_bytes(header[:4], "big")
            if magic != expected_magic:
                raise DataError(f"fashion_mnist: {path} has idx magic number 0x{magic:08x}; expected 0x{expected_magic:08x}")
            dims = tuple(int(d) for d in np.frombuffer(header, dtype=">u4", count=num_dims, offset=4))
            size = int(np.prod(dims))
            if keep:
                out = np.empty(size, dtype=np.uint8)
                got = _read_into(stream, memoryview(out))
            else:
                out, got, piece = None, 0, bytearray(1 << 20)
                while got <= size:
                    n = stream.readinto(piece)
                    if not n:
                        break
                    got += n
            extra = got == size and len(stream.read(1)) > 0
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"fashion_mnist: {path} is not a readable gzip file ({reason}; truncated?)") from None
    except OSError as err:
        raise DataError(f"fashion_mnist: cannot read {path} ({err.strerror or err})") from None
    if got != size or extra:
        total = header_size + got + (1 if extra else 0)
        problem = "truncated" if got < size else "longer than its header says"
        raise DataError(
            f"fashion_mnist: {path} is {problem} ({'at least ' if extra else ''}{total} bytes; dimensions {dims} need "
            f"{header_size + size})"
        )
    return out.reshape(dims) if keep else dims


def _open(path: Path):  # noqa: ANN202 - a binary stream with readinto
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _read_into(stream, view: memoryview) -> int:  # noqa: ANN001 - a binary stream
    """Fill `view` from `stream` (fewer bytes only at the end of the stream); the count read."""
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def find_idx(root: Path, stem: str) -> Path:
    """The idx file `stem` (plain or .gz) in root (DataError if neither is there)."""
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"fashion_mnist: {root} has no {stem} or {stem}.gz")


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [n, 1, rows, cols] in [0, 1], y int64 [n]."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
