"""fedsim.data.parsed_cache through its one user, the LEAF FEMNIST loader: a cached load is the
parse bit for bit, a damaged or stale entry is never used, and a cache that cannot be used
never fails a load."""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
import time
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import leaf, parsed_cache
from fedsim.errors import DataError


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(parsed_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _leaf_file(path: Path, writers: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = {w: {"x": rng.random((n, leaf.PIXELS)).round(3).tolist(), "y": rng.integers(0, 62, n).tolist()} for w, n in writers.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"users": list(writers), "num_samples": list(writers.values()), "user_data": data}).encode()
    path.write_bytes(gzip.compress(text) if path.name.endswith(".gz") else text)
    return path


def _kind(path: Path) -> str:
    return leaf.CACHE_KIND + ("-gz" if path.name.endswith(".gz") else "")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        wa == wb and xa.dtype == xb.dtype and ya.dtype == yb.dtype and np.array_equal(xa, xb) and np.array_equal(ya, yb)
        for (wa, xa, ya), (wb, xb, yb) in zip(a, b))  # fmt: skip


def _no_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path, raw: bytes) -> None:
        raise AssertionError(f"{path} was parsed, not read from the cache")

    monkeypatch.setattr(leaf, "_load_json", refuse)


def test_a_cached_load_is_the_parse_bit_for_bit_and_does_not_parse(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, femnist_dir: Path) -> None:
    source = _leaf_file(tmp_path / "train" / "a.json.gz", {"w1": 3, "w0": 0, "w2": 5})
    parsed = leaf._parse_leaf_file(source)
    assert _same(leaf._read_leaf_file(source), parsed)  # parses and stores
    assert len(list(cache.glob("*.npz"))) == 1
    with monkeypatch.context() as m:
        _no_parse(m)
        assert _same(leaf._read_leaf_file(source), parsed)
        # the same bytes elsewhere are the same entry
        moved = shutil.copy(source, tmp_path / "b.json.gz")
        assert _same(leaf._read_leaf_file(Path(moved)), parsed)
    # The bundled copy: the whole dataset from the cache equals the parse (the cache is empty here).
    train = femnist_dir / "train" / "femnist_train.json.gz"
    first = leaf._read_leaf_file(train)
    with monkeypatch.context() as m:
        _no_parse(m)
        assert _same(leaf._read_leaf_file(train), first)


def test_a_damaged_or_stale_entry_is_never_used(tmp_path: Path, cache: Path) -> None:
    source = _leaf_file(tmp_path / "a.json.gz", {"w1": 4, "w2": 2})
    parsed = leaf._read_leaf_file(source)
    (entry,) = cache.glob("*.npz")
    # One flipped byte in the stored pixels: the entry's own sha256 no longer matches.
    raw = bytearray(entry.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    entry.write_bytes(raw)
    assert parsed_cache.load(_kind(source), _sha(source)) is None
    assert _same(leaf._read_leaf_file(source), parsed)  # parsed again, and the entry rewritten
    assert parsed_cache.load(_kind(source), _sha(source)) is not None
    # A truncated entry, then a changed source file (another key: its new data are read).
    entry.write_bytes(entry.read_bytes()[:100])
    assert _same(leaf._read_leaf_file(source), parsed)
    _leaf_file(source, {"w1": 4, "w2": 2}, seed=1)
    changed = leaf._read_leaf_file(source)
    assert not np.array_equal(changed[0][1], parsed[0][1]) and _same(changed, leaf._parse_leaf_file(source))
    # An entry written for other arrays under this file's key (a foreign or older layout) is refused.
    parsed_cache.store(_kind(source), _sha(source), {"x": np.zeros(3, np.float32)})
    assert _same(leaf._read_leaf_file(source), changed)


def test_a_bad_file_is_not_cached_and_an_unusable_cache_never_fails_a_load(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"users": ["w"], "user_data": {"w": {"x": [[0.5] * 3], "y": [1]}}}))
    with pytest.raises(DataError, match="784 pixels"):
        leaf._read_leaf_file(bad)
    assert not cache.exists() or not list(cache.glob("*.npz"))
    source = _leaf_file(tmp_path / "a.json.gz", {"w": 2})
    # Turned off: nothing written.
    monkeypatch.setenv(parsed_cache.CACHE_ENV, "none")
    assert _same(leaf._read_leaf_file(source), leaf._parse_leaf_file(source))
    assert not cache.exists()
    # A cache path that cannot be a directory (a file is in the way): the load still works.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv(parsed_cache.CACHE_ENV, str(blocker / "cache"))
    assert _same(leaf._read_leaf_file(source), leaf._parse_leaf_file(source))


def test_a_file_replaced_during_its_parse_never_files_the_old_arrays_under_the_new_bytes(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _leaf_file(tmp_path / "a.json.gz", {"w": 3}, seed=0)
    old = leaf._parse_leaf_file(source)
    parse = leaf._parse_leaf_file

    def replaced_meanwhile(path: Path, raw: bytes | None = None) -> list:
        records = parse(path, raw)
        _leaf_file(source, {"w": 3}, seed=1)  # a `git checkout` during the parse
        return records

    monkeypatch.setattr(leaf, "_parse_leaf_file", replaced_meanwhile)
    assert _same(leaf._read_leaf_file(source), old)  # what the bytes read held
    monkeypatch.setattr(leaf, "_parse_leaf_file", parse)
    new = leaf._read_leaf_file(source)
    assert _same(new, parse(source)) and not _same(new, old)


def test_a_same_size_rewrite_with_its_mtime_set_back_is_read_again(tmp_path: Path, cache: Path) -> None:
    source = _leaf_file(tmp_path / "a.json", {"w": 2}, seed=0)
    first = leaf._read_leaf_file(source)
    stamp = source.stat()
    data = bytearray(source.read_bytes())
    at = data.index(b'"y": [') + 6
    data[at : at + 2] = b"61" if data[at : at + 2] != b"61" else b"60"  # one label, same size
    source.write_bytes(bytes(data))
    os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    again = leaf._read_leaf_file(source)
    assert not _same(again, first) and _same(again, leaf._parse_leaf_file(source))


def test_writer_ids_numpy_would_change_are_not_cached(tmp_path: Path, cache: Path) -> None:
    source = _leaf_file(tmp_path / "a.json.gz", {"w": 1, "w\x00": 2})
    parsed = leaf._read_leaf_file(source)
    assert [w for w, _, _ in parsed] == ["w", "w\x00"] and not list(cache.glob("*.npz"))
    assert _same(leaf._read_leaf_file(source), parsed)


def test_a_cache_that_cannot_expand_its_path_or_holds_leftovers_is_harmless(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _leaf_file(tmp_path / "a.json.gz", {"w": 2})
    cache.mkdir()
    stale, fresh = cache / f"{parsed_cache.TEMPORARY}dead.npz", cache / f"{parsed_cache.TEMPORARY}live.npz"
    mine = cache / ".my-own-old.npz"  # not fedsim's: never swept, however old
    for leftover in (stale, fresh, mine):
        leftover.write_bytes(b"half an entry")
    for old in (stale, mine):
        os.utime(old, (time.time() - 2 * parsed_cache.STALE_S,) * 2)
    leaf._read_leaf_file(source)  # stores, sweeping the writer killed an hour ago
    assert not stale.exists() and fresh.exists() and mine.exists() and len(list(cache.glob("[!.]*.npz"))) == 1
    monkeypatch.setenv(parsed_cache.CACHE_ENV, "~no-such-user-here/cache")
    assert parsed_cache.cache_dir() is None
    assert _same(leaf._read_leaf_file(source), leaf._parse_leaf_file(source))


# The parser whose output the cache keeps: a change to it must come with a new CACHE_KIND, or
# entries written by the old parser would be read as the new one's (update both together).
PARSER_SHA256 = "1cb7c95ba1001dfe"


def test_the_cache_kind_changes_with_the_parser() -> None:
    parts = (leaf._read_leaf_file, leaf._cached_shapes_hold, leaf._parse_leaf_file, leaf._load_json)
    source = "".join(inspect.getsource(f) for f in parts) + repr((leaf.IMAGE_SHAPE, leaf.FEMNIST_CLASSES))
    assert (hashlib.sha256(source.encode()).hexdigest()[:16], leaf.CACHE_KIND) == (PARSER_SHA256, "leaf-femnist-2"), (
        "the LEAF parser changed: bump fedsim.data.leaf.CACHE_KIND and set PARSER_SHA256 and the kind here"
    )


def test_the_same_bytes_under_a_gz_name_are_not_read_from_the_plain_files_entry(tmp_path: Path, cache: Path) -> None:
    plain = _leaf_file(tmp_path / "a.json", {"w": 2})
    leaf._read_leaf_file(plain)
    misnamed = Path(shutil.copy(plain, tmp_path / "b.json.gz"))
    with pytest.raises(DataError, match="not a readable gzip file"):
        leaf._read_leaf_file(misnamed)  # as with an empty cache
