"""fedsim.data.parsed_cache through its one user, the LEAF FEMNIST loader: a cached load is the
parse bit for bit, a damaged or stale entry is never used, and a cache that cannot be used
never fails a load."""

from __future__ import annotations

import gzip
import json
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
    path.write_bytes(gzip.compress(json.dumps({"users": list(writers), "num_samples": list(writers.values()), "user_data": data}).encode()))
    return path


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        wa == wb and xa.dtype == xb.dtype and ya.dtype == yb.dtype and np.array_equal(xa, xb) and np.array_equal(ya, yb)
        for (wa, xa, ya), (wb, xb, yb) in zip(a, b))  # fmt: skip


def _no_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> None:
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
    assert parsed_cache.load(leaf.CACHE_KIND, source) is None
    assert _same(leaf._read_leaf_file(source), parsed)  # parsed again, and the entry rewritten
    assert parsed_cache.load(leaf.CACHE_KIND, source) is not None
    # A truncated entry, then a changed source file (another key: its new data are read).
    entry.write_bytes(entry.read_bytes()[:100])
    assert _same(leaf._read_leaf_file(source), parsed)
    _leaf_file(source, {"w1": 4, "w2": 2}, seed=1)
    changed = leaf._read_leaf_file(source)
    assert not np.array_equal(changed[0][1], parsed[0][1]) and _same(changed, leaf._parse_leaf_file(source))
    # An entry written for other arrays under this file's key (a foreign or older layout) is refused.
    parsed_cache.store(leaf.CACHE_KIND, source, {"x": np.zeros(3, np.float32)})
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
