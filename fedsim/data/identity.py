"""What identifies a run's data in its randomness fingerprint: the bytes read, not where they lie.

`fedsim.config.resolve_paths` makes data paths absolute, so the same data read from two clones,
two working directories or two temporary folders used to give two config fingerprints, hence
two different runs of one seed and config (fedsim.randomness). The fingerprint now leaves the
location keys out (`LOCATION_KEYS`) and hashes what the loader reads instead: `content_sha256`
is the sha256 over (name, sha256 of the bytes) of every file the dataset's loader reads, with
names that do not depend on where the files are (a FEMNIST file's path under dataset.path, a
Fashion-MNIST file's idx name, "text" for a Shakespeare text, split, position and path under
the folder all of them share for a Hugging Face builder's local files, as `datasets` lists
them). Moving the data changes nothing; changing one byte of it changes the fingerprint, so a
run on edited data never reuses the noise of a run on the original (two releases with the same
noise on different data would publish their difference noise-free).

Data without files of its own keeps its config values in the fingerprint: the bundled copies
(dataset.path null: pinned by sha256 in fedsim.data.bundled), synthetic data, custom factories
(dataset.target: a factory that reads files is identified by its name only) and Hub datasets
(hf_name, no revision: a Hub dataset that changes keeps its fingerprint, and so does a local
folder given as hf_name; a URL, a file:// or a chained `a::b` path in data_files is kept as its
text, its content is not read). When the files cannot be listed or read (a missing path), the
location keys stay in and the loader reports the missing data with its own message.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedsim.config import DatasetConfig, FashionMnistConfig, FemnistConfig, HuggingFaceConfig, ShakespeareConfig
from fedsim.data.bundled import file_sha256
from fedsim.data.fashion_mnist import find_idx
from fedsim.data.leaf import find_leaf_files
from fedsim.errors import DataError

# dataset.<key> that names where the data lies, per config class.
LOCATION_KEYS: dict[type, str] = {
    FemnistConfig: "path", FashionMnistConfig: "path", ShakespeareConfig: "path", HuggingFaceConfig: "data_files",
}  # fmt: skip
FASHION_FILES = tuple(f"{split}-{kind}" for split in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def content_sha256(cfg: DatasetConfig) -> str | None:
    """sha256 (hex) of the files `cfg`'s loader reads, by location-free name; None when `cfg`
    names no files of its own or they cannot be read (see the module doc)."""
    try:
        named = _named_files(cfg)
        if named is None:
            return None
        digest = hashlib.sha256()
        for name, file in named:
            digest.update(f"{name}\0{file if isinstance(file, str) else file_sha256(file)}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()
    except (DataError, OSError, ValueError, ImportError):  # unreadable or unlistable: the loader says what is wrong
        return None


def location_key(cfg: DatasetConfig) -> str | None:
    """The dataset key that names where `cfg`'s data lies (None: it has none)."""
    return LOCATION_KEYS.get(type(cfg))


def _named_files(cfg: DatasetConfig) -> list[tuple[str, Path | str]] | None:
    """(location-free name, file or URL) of every file the loader reads, in a fixed order."""
    if isinstance(cfg, ShakespeareConfig):
        return None if cfg.path is None else [("text", _file(Path(cfg.path)))]
    if isinstance(cfg, FemnistConfig):
        if cfg.path is None:
            return None
        root = Path(cfg.path)
        train, test = find_leaf_files(root)
        return [(f"{split}:{file.relative_to(root).as_posix()}", file) for split, files in (("train", train), ("test", test)) for file in files]
    if isinstance(cfg, FashionMnistConfig):
        root = Path(cfg.path)
        return [(stem + (".gz" if file.name.endswith(".gz") else ""), file) for stem in FASHION_FILES for file in [find_idx(root, stem)]]
    if isinstance(cfg, HuggingFaceConfig):
        if not cfg.data_files:
            return None
        # The files the `datasets` library reads for each pattern, in its order (it skips README.md,
        # `__` folders and the like), named by their path under the folder all of them share,
        # across splits: the order and the folders are data too (imagefolder's labels are the
        # names of the files' folders, collected over every split).
        from datasets.data_files import resolve_pattern

        listed: list[tuple[str, list[str] | str]] = []
        for split in sorted(cfg.data_files):
            pattern = cfg.data_files[split]
            if "://" in pattern or "::" in pattern:
                listed.append((split, pattern))  # a URL or a chained path: its text only
                continue
            try:
                listed.append((split, resolve_pattern(pattern, base_path="")))
            except FileNotFoundError:
                raise DataError(f"dataset.data_files.{split}: {pattern} matches no file") from None
        local = [f for _, files in listed if isinstance(files, list) for f in files]
        base = Path(os.path.commonpath([os.path.dirname(f) for f in local])) if local else Path()
        named: list[tuple[str, Path | str]] = []
        for split, files in listed:
            if isinstance(files, str):
                named.append((f"{split}:url", files))
            else:
                named += [(f"{split}[{i}]:{Path(f).relative_to(base).as_posix()}", Path(f)) for i, f in enumerate(files)]
        return named
    return None


def _file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    return path
