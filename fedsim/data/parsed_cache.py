"""A disk cache of parsed data files, keyed by the sha256 of the file's bytes.

Parsing text formats is slow where the data are numbers: the bundled FEMNIST (105 writers,
16,393 images as JSON floats) takes 6.4 s to parse on a 2-core AMD EPYC, and every process of a
run parses it (the launcher, the server, each worker, and `fedsim.simulate`'s result). A
loader stores the arrays it parsed from a file here, once the file passed all its checks, and
later loads of the same bytes read them back (about 0.1 s for FEMNIST) instead of parsing.

- Where: `$FEDSIM_CACHE_DIR`, else `$XDG_CACHE_HOME/fedsim`, else `~/.cache/fedsim`;
  `FEDSIM_CACHE_DIR=none` turns the cache off. Entries are `<kind>-v<VERSION>-<sha256>.npz`;
  deleting any of them is always safe.
- Same data, bit for bit: an entry is keyed by the sha256 of the source file's bytes (a
  changed file is another key) and by `kind` (which includes the parser's format version), and
  it holds the sha256 of its own arrays (names, dtypes, shapes, bytes), checked on every read:
  a damaged, truncated or foreign entry is ignored and the file parsed again. Entries are
  written to a temporary name and renamed, so concurrent processes never read half an entry.
- Best effort: a cache that cannot be read or written (read-only home, full disk) only costs
  the parse; it never fails a run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from fedsim.data.bundled import file_sha256

CACHE_ENV = "FEDSIM_CACHE_DIR"
VERSION = 1
_CHECK = "__sha256__"


def cache_dir() -> Path | None:
    """The cache directory (None: turned off with FEDSIM_CACHE_DIR=none, or no home to put it in)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "none", "off") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    try:
        return (Path(base) if base else Path.home() / ".cache") / "fedsim"
    except RuntimeError:  # no home directory
        return None


def entry_path(kind: str, source: Path) -> Path | None:
    """Where the arrays parsed from `source` by parser `kind` are kept (None: no cache)."""
    root = cache_dir()
    return None if root is None else root / f"{kind}-v{VERSION}-{file_sha256(source)}.npz"


def load(kind: str, source: Path) -> dict[str, np.ndarray] | None:
    """The arrays stored for `source`'s bytes, or None (no entry, or one that fails its check)."""
    try:
        entry = entry_path(kind, source)
        if entry is None or not entry.is_file():
            return None
        with np.load(entry, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        check = arrays.pop(_CHECK, None)
        if check is None or check.tobytes() != _digest(arrays):
            return None
        return arrays
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # npz is a zip archive
        return None


def store(kind: str, source: Path, arrays: dict[str, np.ndarray]) -> None:
    """Keep `arrays` (parsed from `source`, all checks passed) for the next load; never raises."""
    try:
        entry = entry_path(kind, source)
        if entry is None:
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}-", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, **arrays, **{_CHECK: np.frombuffer(_digest(arrays), dtype=np.uint8)})
            os.replace(temporary, entry)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError:
        return


def _digest(arrays: dict[str, np.ndarray]) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{value.dtype.str}\0{value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.digest()
