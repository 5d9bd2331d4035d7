"""FEMNIST from LEAF JSON files (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings").

One device per writer. The loader reads any directory of LEAF JSON files (`*.json` or
`*.json.gz`, searched recursively): files under a `train` directory hold the devices' data,
files under a `test` directory the central test set. A directory without train/test
subdirectories is all training data, with no central test set. Other directories next to
train/ and test/ (LEAF's all_data/, sampled_data/, ...) are ignored, so LEAF's own
data/femnist/data directory can be used as is. With `path: null` (the default) the loader
reads fedsim's bundled copy (105 writers, `fedsim.data.bundled`), checked against its sha256.

LEAF format: {"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]],
"y": [int]}}}. Every file is parsed once; each split is kept as one float32 array plus
per-writer offsets. A file's parsed arrays are kept in fedsim's disk cache
(`fedsim.data.parsed_cache`, keyed by the file's sha256), so later runs and the other processes
of a run read them back instead of parsing the JSON again (5.8 s -> 0.2 s for the bundled copy: `bench/startup.py --phases`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.config import FemnistConfig
from fedsim.data import parsed_cache
from fedsim.data.base import FederatedDataset
from fedsim.data.bundled import bundled_path
from fedsim.errors import ConfigError, DataError

FEMNIST_CLASSES = 62  # 10 digits, 26 upper- and 26 lower-case letters
IMAGE_SHAPE = (1, 28, 28)
PIXELS = 28 * 28
CACHE_KIND = "leaf-femnist-2"  # parsed_cache entries of _read_leaf_file (bump the digit when its output changes)


class FemnistDataset(FederatedDataset):
    """LEAF FEMNIST: device i is the i-th writer in sorted user-id order."""

    def __init__(self, cfg: FemnistConfig, *, population: int) -> None:
        self.name = cfg.name
        self.input_shape = IMAGE_SHAPE
        self.num_classes = FEMNIST_CLASSES
        self._root = Path(cfg.path) if cfg.path is not None else bundled_path("femnist")
        train_files, test_files = find_leaf_files(self._root)

        train = _read_split(train_files)
        writers = sorted(train)
        if population > len(writers):
            raise ConfigError(
                "population", f"femnist at {self._root} has {len(writers)} writers; allowed: 1..{len(writers)}"
            )
        self.writers: list[str] = writers[:population]
        self._train_x, self._train_y, self._offsets = _concatenate(train, self.writers)
        del train  # the writers beyond the population are not kept

        test = _read_split(test_files)
        self._test_x, self._test_y, _ = _concatenate(test, sorted(test))
        if cfg.max_test_examples is not None:
            self._test_x = self._test_x[: cfg.max_test_examples]
            self._test_y = self._test_y[: cfg.max_test_examples]
        self._has_test_files = bool(test_files)

    @property
    def num_devices(self) -> int:
        return len(self.writers)

    def num_examples(self, device_id: int) -> int:
        self.check_device_id(device_id)
        return int(self._offsets[device_id + 1] - self._offsets[device_id])

    def device_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_device_id(device_id)
        start, end = self._offsets[device_id], self._offsets[device_id + 1]
        # Copies, so a caller that normalizes in place cannot alter the stored data.
        return torch.tensor(self._train_x[start:end]), torch.tensor(self._train_y[start:end])

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._test_y) == 0:
            reason = (
                "its test files hold no examples"
                if self._has_test_files
                else "no LEAF JSON files under a 'test' directory"
            )
            raise DataError(f"femnist: {self._root} has no central test set ({reason})")
        return torch.from_numpy(self._test_x), torch.from_numpy(self._test_y)


def find_leaf_files(root: Path) -> tuple[list[Path], list[Path]]:
    """The train and test LEAF JSON files under root, each list in sorted path order."""
    if not root.is_dir():
        raise DataError(f"femnist: {root} is not a directory (expected LEAF JSON files under it)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith((".json", ".json.gz")))
    if not files:
        raise DataError(f"femnist: {root} has no LEAF JSON files (*.json or *.json.gz) under it")
    train = [p for p in files if "train" in p.relative_to(root).parts[:-1]]
    test = [p for p in files if "test" in p.relative_to(root).parts[:-1]]
    if not train and not test:
        return files, []
    if not train:
        raise DataError(f"femnist: {root} has LEAF JSON files under 'test' but none under a 'train' directory")
    return train, test


def _read_split(files: list[Path]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Writer id -> its (x, y) chunks, one chunk per file it appears in (in file order)."""
    by_writer: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for path in files:
        for writer, x, y in _read_leaf_file(path):
            by_writer.setdefault(writer, []).append((x, y))
    return by_writer


def _read_leaf_file(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(writer, x float32 [n, 1, 28, 28], y int64 [n]) of every writer in one LEAF file (from
    the parsed cache when it holds the arrays of these bytes)."""
    raw = _read_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()  # of the bytes parsed below, whatever the file holds by then
    kind = CACHE_KIND + ("-gz" if path.name.endswith(".gz") else "")  # the name decides how the bytes are read
    cached = parsed_cache.load(kind, digest)
    if cached is not None and _cached_shapes_hold(cached):
        bounds = np.concatenate([[0], np.cumsum(cached["counts"])])
        x, y = cached["x"], cached["y"]
        return [(str(w), x[a:b], y[a:b]) for w, a, b in zip(cached["writers"].tolist(), bounds[:-1], bounds[1:])]
    records = _parse_leaf_file(path, raw)
    writers = np.array([w for w, _, _ in records], dtype=str)
    if writers.tolist() == [w for w, _, _ in records]:  # numpy's str arrays drop trailing NULs: such ids are not cached
        parsed_cache.store(kind, digest, {
            "writers": writers,
            "counts": np.array([len(y) for _, _, y in records], dtype=np.int64),
            "x": np.concatenate([x for _, x, _ in records]) if records else np.zeros((0, *IMAGE_SHAPE), np.float32),
            "y": np.concatenate([y for _, _, y in records]) if records else np.zeros(0, np.int64),
        })  # fmt: skip
    return records


def _cached_shapes_hold(cached: dict[str, np.ndarray]) -> bool:
    """An entry whose arrays fit together (its checksum already matched: this only guards the layout)."""
    needed = {"writers", "counts", "x", "y"}
    if set(cached) != needed:
        return False
    writers, counts, x, y = (cached[k] for k in ("writers", "counts", "x", "y"))
    return (writers.ndim == 1 and counts.shape == writers.shape and x.dtype == np.float32 and y.dtype == np.int64
            and x.shape[1:] == IMAGE_SHAPE and len(x) == len(y) == int(counts.sum()))  # fmt: skip


def _parse_leaf_file(path: Path, raw: bytes | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """_read_leaf_file's records, parsed from the JSON (`raw`: the file's bytes, read if None) and checked."""
    content = _load_json(path, _read_bytes(path) if raw is None else raw)
    if not isinstance(content, dict) or "users" not in content or "user_data" not in content:
        raise DataError(f"femnist: {path} is not a LEAF file (expected keys 'users' and 'user_data')")
    user_data, users = content["user_data"], content["users"]
    if not isinstance(users, list) or not all(isinstance(u, (str, int)) and not isinstance(u, bool) for u in users):
        raise DataError(f"femnist: {path} has 'users' that is not a list of user ids (strings)")
    records = []
    for writer in users:
        entry = user_data.get(str(writer)) if isinstance(user_data, dict) else None
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise DataError(f"femnist: {path} lists user {writer!r} without user_data[{writer!r}] holding 'x' and 'y'")
        try:
            x = np.asarray(entry["x"], dtype=np.float32)
            labels = np.asarray(entry["y"])
            if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.all(np.mod(labels, 1) == 0)):
                raise ValueError("labels are not integers")
            y = labels.astype(np.int64) if labels.dtype.kind == "f" else np.asarray(entry["y"], dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            raise DataError(
                f"femnist: {path} user {writer!r} has malformed x or y "
                f"(expected rows of {PIXELS} numbers and integer labels)"
            ) from None
        if not np.isfinite(x).all():
            # json reads NaN and 1e999 as floats; a NaN pixel would make every update NaN.
            raise DataError(f"femnist: {path} user {writer!r} has NaN or infinite pixel values")
        if len(x) == 0:
            x = x.reshape(0, PIXELS)
        if x.ndim != 2 or x.shape[1] != PIXELS:
            raise DataError(f"femnist: {path} user {writer!r} has x rows of shape {x.shape[1:]}; expected {PIXELS} pixels")
        if y.shape != (len(x),):
            raise DataError(f"femnist: {path} user {writer!r} has {len(x)} x rows but {y.size} labels")
        if len(y) and (y.min() < 0 or y.max() >= FEMNIST_CLASSES):
            raise DataError(f"femnist: {path} user {writer!r} has labels outside 0..{FEMNIST_CLASSES - 1}")
        records.append((str(writer), x.reshape(-1, *IMAGE_SHAPE), y))
    return records


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"femnist: cannot read {path} ({_one_line(err)})") from None


def _load_json(path: Path, raw: bytes) -> Any:
    """The JSON value in `raw`, the bytes of `path` (gzip-compressed if its name ends in .gz)."""
    try:
        text = gzip.decompress(raw) if path.name.endswith(".gz") else raw
        return json.loads(text.decode("utf-8"))
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"femnist: {path} is not a readable gzip file ({_one_line(err)}; truncated?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DataError(f"femnist: {path} is not valid JSON ({_one_line(err)})") from None


def _concatenate(
    by_writer: dict[str, list[tuple[np.ndarray, np.ndarray]]], writers: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One x array, one y array and per-writer offsets for the given writers, in that order."""
    chunks = [chunk for writer in writers for chunk in by_writer[writer]]
    sizes = [sum(len(y) for _, y in by_writer[writer]) for writer in writers]
    offsets = np.zeros(len(writers) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    if not chunks:
        return np.zeros((0, *IMAGE_SHAPE), np.float32), np.zeros(0, np.int64), offsets
    return np.concatenate([x for x, _ in chunks]), np.concatenate([y for _, y in chunks]), offsets


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
