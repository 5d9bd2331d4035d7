"""A disk cache of parsed data files, keyed by the sha256 of the file's bytes.

Parsing text formats is slow where the data are numbers: the bundled FEMNIST (105 writers,
16,393 images as JSON floats) takes about 6 s to parse on a 2-core AMD EPYC, and every process of a
run parses it (the launcher, the server, each worker, and `fedsim.simulate`'s result). A
loader stores the arrays it parsed from a file here, once the file passed all its checks, and
later loads of the same bytes read them back (0.2 s for FEMNIST: `bench/startup.py --phases`) instead of parsing.

- Where: `$FEDSIM_CACHE_DIR`, else `$XDG_CACHE_HOME/fedsim`, else `~/.cache/fedsim`;
  `FEDSIM_CACHE_DIR=none` turns the cache off. Entries are `<kind>-v<VERSION>-<sha256>.npz`;
  deleting any of them is always safe.
- Same data, bit for bit: an entry is keyed by the sha256 of the bytes the parser read (the
  loader reads the file once, hashes those bytes and parses them: a changed file is another
  key, and a file replaced during a parse cannot have the old arrays filed under its new
  digest) and by `kind` (which includes the parser's format version), and it holds the sha256
  of its own arrays (names, dtypes, shapes, bytes), checked on every read: a damaged, truncated
  or foreign entry is ignored and the file parsed again. Entries are written to a temporary
  name and renamed, so concurrent processes never read half an entry.
- Best effort: a cache that cannot be read or written (read-only home, full disk) only costs
  the parse; it never fails a run. Temporary entries of writers killed mid-write are removed
  by the next store after an hour. Entries are private to the user (mode 0600) and are not
  authenticated: whoever can write the cache directory can change the data a run reads, as
  whoever can write the data files can.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

CACHE_ENV = "FEDSIM_CACHE_DIR"
VERSION = 1
_CHECK = "__sha256__"


def cache_dir() -> Path | None:
    """The cache directory (None: turned off with FEDSIM_CACHE_DIR=none, or no home to put it in)."""
    value = os.environ.get(CACHE_ENV)
    base = os.environ.get("XDG_CACHE_HOME")
    try:
        if value is not None:
            return None if value.strip().lower() in ("", "none", "off") else Path(value).expanduser()
        return (Path(base) if base else Path.home() / ".cache") / "fedsim"
    except RuntimeError:  # no home directory to expand
        return None


def entry_path(kind: str, digest: str) -> Path | None:
    """Where the arrays parser `kind` parsed from bytes of sha256 `digest` are kept (None: no cache)."""
    root = cache_dir()
    return None if root is None else root / f"{kind}-v{VERSION}-{digest}.npz"


def load(kind: str, digest: str) -> dict[str, np.ndarray] | None:
    """The arrays stored for the bytes of sha256 `digest`, or None (no entry, one that fails its
    check, or any trouble reading it)."""
    try:
        entry = entry_path(kind, digest)
        if entry is None or not entry.is_file():
            return None
        with np.load(entry, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        check = arrays.pop(_CHECK, None)
        if check is None or check.tobytes() != _digest(arrays):
            return None
        return arrays
    except Exception:  # noqa: BLE001 - best effort: any failure only costs the parse
        return None


def store(kind: str, digest: str, arrays: dict[str, np.ndarray]) -> None:
    """Keep `arrays`, parsed from bytes of sha256 `digest` (the bytes the parser read, hashed
    before parsing, so a file replaced meanwhile cannot file them under its new digest), for
    the next load; never raises. Leftovers of writers killed mid-write are swept first."""
    try:
        entry = entry_path(kind, digest)
        if entry is None:
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        _sweep(entry.parent)
        handle, temporary = tempfile.mkstemp(dir=entry.parent, prefix=f"{TEMPORARY}{entry.stem}-", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, **{_CHECK: np.frombuffer(_digest(arrays), dtype=np.uint8)}, **arrays)
            os.replace(temporary, entry)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except Exception:  # noqa: BLE001 - best effort: the parsed arrays are returned either way
        return


STALE_S = 3600.0  # a temporary entry this old was left by a writer that was killed
TEMPORARY = ".fedsim-tmp-"  # name prefix of entries being written (only these are ever swept)


def _sweep(root: Path) -> None:
    now = time.time()
    for leftover in root.glob(f"{TEMPORARY}*.npz"):
        try:
            if now - leftover.stat().st_mtime > STALE_S:
                leftover.unlink()
        except OSError:
            pass


def _digest(arrays: dict[str, np.ndarray]) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{value.dtype.str}\0{value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.digest()
