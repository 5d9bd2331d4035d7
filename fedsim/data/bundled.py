"""The small real datasets that ship with fedsim, checked against their sha256 before use.

fedsim carries LEAF FEMNIST (105 writers) and Tiny Shakespeare in the repository's top-level
`data/` folder, and a built wheel carries the same files inside the package (see
`fedsim.resources`). A dataset config with `path: null` means "the bundled copy":
`bundled_path(name)` finds it relative to the installed package or the repository (never the
working directory) and checks every file against the sha256 below, which are also stated in
each dataset's `data/<name>/README.md`. A missing or altered file is a `DataError` (one line,
exit status 2) that says where the files belong.

Each file's digest is computed once per process and remembered with the file's size and
modification time, so workers that rebuild a dataset (a new config, a resumed run) do not
read the files again.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from fedsim import resources
from fedsim.errors import DataError


@dataclass(frozen=True)
class Bundle:
    """One bundled dataset: what `bundled_path` returns and the files it is checked by."""

    path: str  # relative to data/: the dataset's directory or its single file
    sha256: dict[str, str]  # file relative to data/ -> its sha256 (hex)


BUNDLES: dict[str, Bundle] = {
    # LEAF FEMNIST, sampled non-IID split, the 105 writers with train and test data (data/femnist/README.md).
    "femnist": Bundle(
        path="femnist",
        sha256={
            "femnist/train/femnist_train.json.gz": "9eed7428c4b82793342db105d4a60c0f2deb05d2d3c53e0a16fe72e2f650ad44",
            "femnist/test/femnist_test.json.gz": "0afc1734bd39e7491f4879ac667d3f7d2f090e10e2b4981f056b23098d4b8dd1",
        },
    ),
    # Tiny Shakespeare, 1,115,394 characters (data/shakespeare/README.md).
    "shakespeare": Bundle(
        path="shakespeare/input.txt",
        sha256={"shakespeare/input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"},
    ),
}

# (resolved file, device, inode, size, mtime_ns, ctime_ns) -> sha256 hex: a file changed in place
# or replaced gets hashed again (ctime changes on every write and on os.utime, which can set an
# old mtime back; a rename gives another inode).
_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}
# A file changed less than this long before it is hashed is hashed again at every call: a
# rewrite within the file system's timestamp tick (1-10 ms on Linux kernels before 6.13) would
# leave every field of the key as it was.
MEMO_AFTER_NS = 50_000_000


def bundled_path(name: str) -> Path:
    """The bundled copy of dataset `name`, checked: "femnist" -> its directory (train/ and test/
    LEAF JSON files), "shakespeare" -> its input.txt.

    Raises DataError when the files are missing (naming where fedsim looks for them) or when
    one does not match its sha256.
    """
    bundle = _bundle(name)
    root = _data_root(name)
    verify(name, root=root)
    return root / bundle.path


def verify(name: str, *, root: Path | None = None) -> None:
    """Check every file of bundled dataset `name` against its sha256 (DataError if one differs).

    `root` is the folder holding the datasets (default: the bundled data/ folder).
    """
    bundle = _bundle(name)
    root = root if root is not None else _data_root(name)
    for relative, expected in bundle.sha256.items():
        path = root / relative
        if not path.is_file():
            raise DataError(
                f"bundled dataset '{name}' is incomplete: {path} is missing; copy data/{name}/ from the "
                f"fedsim repository to {root / name}, or set dataset.path to your own copy"
            )
        actual = file_sha256(path)
        if actual != expected:
            raise DataError(
                f"bundled dataset '{name}': {path} has sha256 {actual}, expected {expected} (a damaged or "
                f"altered copy); restore it from the fedsim repository's data/{name}/, or set dataset.path to use other files"
            )


def _bundle(name: str) -> Bundle:
    if name not in BUNDLES:
        raise DataError(f"no bundled dataset '{name}'; bundled: {', '.join(sorted(BUNDLES))}")
    return BUNDLES[name]


def _data_root(name: str) -> Path:
    root = resources.resource_dir("data")
    if root is None:
        packaged, repository = resources.candidates("data")
        raise DataError(
            f"bundled dataset '{name}' not found: fedsim looks for {repository / name} (a repository checkout) and "
            f"{packaged / name} (an installed wheel); copy data/{name}/ from the fedsim repository there, "
            f"or set dataset.path to your own copy"
        )
    return root


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, remembered in this process per (resolved path, device, inode,
    size, mtime, ctime): any write to the file or its replacement is hashed again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _DIGESTS:
        started = time.time_ns()
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        if started - stat.st_ctime_ns < MEMO_AFTER_NS:
            return digest.hexdigest()  # changed just before: a rewrite in the same tick would keep this key
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]
