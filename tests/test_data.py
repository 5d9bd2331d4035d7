"""The data package: synthetic, FEMNIST (LEAF JSON), Fashion-MNIST (idx) and Hugging Face loaders."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import FashionMnistConfig, FemnistConfig, HuggingFaceConfig, SyntheticConfig
from fedsim.data import FederatedDataset, load_dataset
from fedsim.data.partition import dirichlet_partition, iid_partition, shard_partition
from fedsim.data.synthetic import SizeGenerator, SyntheticDataset, device_sizes, train_part
from fedsim.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def assert_one_line_naming(err: pytest.ExceptionInfo, name: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    assert name in message, message


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_device_and_seed() -> None:
    cfg = SyntheticConfig()
    first = load_dataset(cfg, population=50, seed=3)
    again = load_dataset(cfg, population=50, seed=3)
    x, y = first.device_data(7)
    x2, y2 = again.device_data(7)
    assert torch.equal(x, x2) and torch.equal(y, y2)

    other_device = first.device_data(8)[0]
    assert x.shape[1:] == other_device.shape[1:] == (60,)
    assert not torch.equal(x[:5], other_device[:5])
    other_seed = load_dataset(cfg, population=50, seed=4).device_data(7)[0]
    assert not torch.equal(x[:5], other_seed[:5])


def test_synthetic_device_data_does_not_depend_on_call_order() -> None:
    cfg = SyntheticConfig()
    fresh = load_dataset(cfg, population=20, seed=0)
    x_first, y_first = fresh.device_data(5)
    used = load_dataset(cfg, population=20, seed=0)
    for device_id in (19, 0, 4, 6):
        used.device_data(device_id)
    used.test_data()
    x_later, y_later = used.device_data(5)
    assert torch.equal(x_first, x_later) and torch.equal(y_first, y_later)


def test_synthetic_tensors_have_the_promised_types_and_ranges() -> None:
    ds = load_dataset(SyntheticConfig(num_features=12, num_classes=4), population=30, seed=1)
    assert isinstance(ds, FederatedDataset)
    assert ds.input_shape == (12,) and ds.num_classes == 4 and ds.num_devices == 30
    for device_id in range(30):
        x, y = ds.device_data(device_id)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (ds.num_examples(device_id), 12) and y.shape == (len(x),)
        assert 0 <= int(y.min()) and int(y.max()) < 4
    with pytest.raises(IndexError):
        ds.device_data(30)


def test_synthetic_population_of_a_billion_holds_nothing_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SyntheticConfig()
    tracemalloc.start()
    try:
        ds = SyntheticDataset(cfg, population=1_000_000_000, seed=0)
        sizes = [ds.num_examples(k) for k in (0, 123_456_789, 999_999_999)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    small = SyntheticDataset(cfg, population=1_000, seed=0)
    assert peak < 1_000_000  # the size table (8 kB) and the LEAF structure, nothing per device
    for value in vars(ds).values():
        assert not isinstance(value, torch.Tensor)

    def held(d: SyntheticDataset) -> int:
        return sum(v.nbytes for v in vars(d).values() if isinstance(v, np.ndarray))

    assert held(ds) == held(small)
    # The same device has the same size in a population of 1,000 and one of 10^9.
    assert ds.num_examples(0) == small.num_examples(0) == sizes[0]
    assert all(1 <= n <= cfg.size_max for n in sizes)

    def no_generation(device_id: int) -> None:
        raise AssertionError("num_examples generated device data")

    monkeypatch.setattr(ds, "_generate", no_generation)
    ids = range(999_995_000, 1_000_000_000)
    train = np.array([ds.num_examples(k) for k in ids])
    total = train + np.array([ds.heldout_examples(k) for k in ids])
    assert total.min() >= cfg.size_min and total.max() <= cfg.size_max
    assert train.min() >= 1 and total.max() > total.min()  # lognormal sizes vary
    assert np.array_equal(train, np.floor(0.9 * total + 1e-9))  # LEAF's 90/10 split
    with pytest.raises(IndexError):
        ds.num_examples(1_000_000_000)


def test_synthetic_sizes_are_the_same_in_bulk_alone_and_in_another_process() -> None:
    cfg = SyntheticConfig()
    sizes = SizeGenerator(cfg, seed=7)
    bulk = sizes.totals(10**9 - 50_000, 50_000)
    alone = [int(sizes.totals(10**9 - 50_000 + k, 1)[0]) for k in range(0, 50_000, 997)]
    assert alone == bulk[::997].tolist()
    # Chunks that start anywhere agree with each other.
    assert np.array_equal(sizes.totals(10**9 - 49_999, 3), bulk[1:4])
    # A worker is another process: it computes the same sizes from (seed, device id) alone.
    code = (
        "from fedsim.config import SyntheticConfig; from fedsim.data.synthetic import SyntheticDataset; "
        "ds = SyntheticDataset(SyntheticConfig(), population=10**9, seed=7); "
        "print([ds.heldout_examples(d) + ds.num_examples(d) for d in range(10**9 - 50_000, 10**9, 997)])"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(other.stdout) == alone
    assert not np.array_equal(SizeGenerator(cfg, seed=8).totals(0, 100), sizes.totals(0, 100))


def test_synthetic_sizes_follow_leafs_clipped_lognormal() -> None:
    from scipy import stats

    cfg = SyntheticConfig()  # clip(floor(lognormal(3, 2)) + 5, 5, 1000)
    sizes = SizeGenerator(cfg, seed=0)
    # The table against scipy's lognormal: P(total = 5 + j) = F(j + 1) - F(j), the rest at 1000.
    law = stats.lognorm(s=cfg.size_sigma, scale=np.exp(cfg.size_mu))
    j = np.arange(cfg.size_max - cfg.size_min)
    expected = np.append(law.cdf(j + 1) - law.cdf(j), law.sf(cfg.size_max - cfg.size_min))
    table = sizes.total_distribution()
    got = np.array([table.get(cfg.size_min + k, 0.0) for k in range(len(expected))])
    assert np.allclose(got, expected, rtol=1e-9, atol=1e-15)
    # A million devices against the law, in bins: within 5 standard errors each.
    n = 1_000_000
    drawn = sizes.totals(0, n)
    for lo, hi in [(5, 5), (6, 20), (21, 100), (101, 999), (1000, 1000)]:
        p = sum(table.get(k, 0.0) for k in range(lo, hi + 1))
        freq = np.count_nonzero((drawn >= lo) & (drawn <= hi)) / n
        assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n), (lo, hi, freq, p)
    # Recipe version 1's sizes come from the same law (a two-sample check on the means).
    v1 = device_sizes(cfg, population=n, seed=0)
    assert abs(drawn.mean() - v1.mean()) < 5 * np.sqrt(drawn.var() / n + v1.var() / n)


def test_synthetic_recipe_version_1_keeps_the_sizes_of_earlier_runs() -> None:
    cfg = SyntheticConfig(recipe_version=1)
    ds = SyntheticDataset(cfg, population=500, seed=3)
    # Version 1, as fedsim drew it before 2026-11-30: one lognormal stream over the population.
    raw = np.random.default_rng([3, 0]).lognormal(3.0, 2.0, 500)
    total = np.clip(np.floor(raw) + 5, 5, 1000).astype(np.int64)
    got = np.array([ds.num_examples(k) + ds.heldout_examples(k) for k in range(500)])
    assert np.array_equal(got, total)
    train, count = np.unique([ds.num_examples(k) for k in range(500)], return_counts=True)
    assert ds.size_counts() == dict(zip(train.tolist(), count.tolist(), strict=True))  # exact counts
    v2 = SyntheticDataset(SyntheticConfig(), population=500, seed=3)
    assert [v2.num_examples(k) for k in range(500)] != [ds.num_examples(k) for k in range(500)]


def test_synthetic_size_counts_are_the_expected_devices_per_size() -> None:
    cfg = SyntheticConfig(size_max=60)
    counts = SyntheticDataset(cfg, population=10**9, seed=0).size_counts()
    assert sum(counts.values()) == pytest.approx(10**9, rel=1e-12)
    assert min(counts) == 4 and max(counts) == 54  # floor(0.9 * 5), floor(0.9 * 60)
    # Up to 10^6 devices the counts are exact, and agree with the expectation.
    ds = SyntheticDataset(cfg, population=1_000_000, seed=0)
    seen = np.bincount(train_part(SizeGenerator(cfg, seed=0).totals(0, 1_000_000), cfg.test_fraction))
    exact = ds.size_counts()
    assert exact == {n: float(seen[n]) for n in np.flatnonzero(seen)}
    for n, c in exact.items():
        assert abs(c - counts[n] * 1e-3) < 5 * np.sqrt(c) + 1, n
    fixed = SyntheticDataset(SyntheticConfig(examples_per_device=40), population=10**9, seed=0)
    assert fixed.size_counts() == {36: 10**9}


def test_synthetic_device_data_caches_nothing() -> None:
    ds = load_dataset(SyntheticConfig(), population=10, seed=0)
    before = {key: id(value) for key, value in vars(ds).items()}
    ds.device_data(3)
    assert {key: id(value) for key, value in vars(ds).items()} == before


def test_synthetic_test_set_is_the_heldout_part_of_the_eval_devices() -> None:
    cfg = SyntheticConfig(eval_devices=7, size_min=5, size_max=50)
    ds = load_dataset(cfg, population=40, seed=2)
    assert isinstance(ds, SyntheticDataset)
    x, y = ds.test_data()
    assert len(x) == len(y) == sum(ds.heldout_examples(k) for k in range(7))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (60,)
    assert ds.test_data()[0] is x  # cached
    # The held-out examples follow the train examples in the device's stream, so they differ.
    first_train = ds.device_data(0)[0]
    assert not any(torch.equal(row, first_train[0]) for row in x)

    small = load_dataset(cfg, population=3, seed=2)
    assert len(small.test_data()[1]) == sum(small.heldout_examples(k) for k in range(3))


def test_synthetic_fixed_size_overrides_lognormal() -> None:
    ds = load_dataset(SyntheticConfig(examples_per_device=40, test_fraction=0.25), population=8, seed=0)
    assert isinstance(ds, SyntheticDataset)
    assert [ds.num_examples(k) for k in range(8)] == [30] * 8
    assert [ds.heldout_examples(k) for k in range(8)] == [10] * 8
    assert len(ds.device_data(2)[0]) == 30


def _label_distance(ds: FederatedDataset, pairs: list[tuple[int, int]]) -> float:
    """Mean total-variation distance between the label distributions of device pairs."""
    distances = []
    for a, b in pairs:
        hist_a = np.bincount(ds.device_data(a)[1].numpy(), minlength=ds.num_classes) / ds.num_examples(a)
        hist_b = np.bincount(ds.device_data(b)[1].numpy(), minlength=ds.num_classes) / ds.num_examples(b)
        distances.append(0.5 * np.abs(hist_a - hist_b).sum())
    return float(np.mean(distances))


def test_synthetic_iid_devices_share_one_label_distribution() -> None:
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7)]
    iid = load_dataset(SyntheticConfig(iid=True, examples_per_device=2000), population=8, seed=0)
    skewed = load_dataset(SyntheticConfig(examples_per_device=2000), population=8, seed=0)
    iid_distance = _label_distance(iid, pairs)
    assert iid_distance < 0.06
    assert _label_distance(skewed, pairs) > 0.3 > iid_distance


# ----------------------------------------------------------------------------- partitioners


def test_partitioners_use_each_example_once() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 1200)
    iid = iid_partition(1200, 7, rng)
    assert np.array_equal(np.sort(iid.indices), np.arange(1200))
    assert iid.sizes().max() - iid.sizes().min() <= 1

    shards = shard_partition(labels, 30, 2, rng)
    assert np.array_equal(np.sort(shards.indices), np.arange(1200))
    # Two label-sorted shards of 20 examples: at most 2 labels each, bar a shard straddling a label change.
    assert max(len(np.unique(labels[shards.part(k)])) for k in range(30)) <= 4

    # 1000 devices, alpha 0.05: the raw draw leaves most devices empty; all must end non-empty.
    skewed = dirichlet_partition(labels, 1000, 0.05, rng)
    assert len(skewed) == 1000 and skewed.sizes().min() >= 1
    assert len(np.unique(skewed.indices)) == len(skewed.indices) <= 1200
    assert skewed.indices.min() >= 0 and skewed.indices.max() < 1200


# ----------------------------------------------------------------------------- femnist


@pytest.fixture(scope="module")
def femnist(femnist_dir: Path) -> FederatedDataset:
    return load_dataset(FemnistConfig(path=str(femnist_dir)), population=105, seed=0)


def test_femnist_has_the_105_writers_of_the_bundled_files(femnist: FederatedDataset) -> None:
    assert femnist.num_devices == 105
    assert femnist.input_shape == (1, 28, 28) and femnist.num_classes == 62
    assert sum(femnist.num_examples(k) for k in range(105)) == 14_708
    assert femnist.writers == sorted(femnist.writers)  # type: ignore[attr-defined]
    x, y = femnist.device_data(0)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (femnist.num_examples(0), 1, 28, 28) and y.shape == (len(x),)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    test_x, test_y = femnist.test_data()
    assert test_x.shape == (1685, 1, 28, 28) and test_y.shape == (1685,)
    assert int(test_y.min()) >= 0 and int(test_y.max()) < 62


def test_femnist_smaller_population_takes_the_first_writers(femnist_dir: Path, femnist: FederatedDataset) -> None:
    cfg = FemnistConfig(path=str(femnist_dir), max_test_examples=100)
    ten = load_dataset(cfg, population=10, seed=0)
    assert ten.num_devices == 10
    assert ten.writers == femnist.writers[:10]  # type: ignore[attr-defined]
    assert torch.equal(ten.device_data(9)[0], femnist.device_data(9)[0])
    assert len(ten.test_data()[1]) == 100  # the central test set still comes from all writers
    with pytest.raises(IndexError):
        ten.device_data(10)


def test_femnist_population_above_the_writers_is_a_config_error(femnist_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_dataset(FemnistConfig(path=str(femnist_dir)), population=200, seed=0)
    assert err.value.key == "population"
    assert "105 writers" in str(err.value) and "1..105" in str(err.value)


def _leaf(users: dict[str, int], pixels: int = 784) -> dict:
    rng = np.random.default_rng(len(users))
    return {
        "users": list(users),
        "num_samples": list(users.values()),
        "user_data": {
            user: {"x": rng.random((n, pixels)).round(3).tolist(), "y": rng.integers(0, 62, n).tolist()}
            for user, n in users.items()
        },
    }


def test_femnist_reads_plain_json_in_train_and_test_dirs(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "part0.json").write_text(json.dumps(_leaf({"w2": 3, "w1": 2})))
    (tmp_path / "train" / "part1.json").write_text(json.dumps(_leaf({"w0": 1})))
    test_content = _leaf({"w0": 1, "w2": 2, "w9": 1})
    (tmp_path / "test" / "part0.json").write_text(json.dumps(test_content))
    (tmp_path / "all_data").mkdir()  # LEAF's unsplit copy sits next to train/ and test/
    (tmp_path / "all_data" / "all.json").write_text(json.dumps(_leaf({"z": 4})))

    ds = load_dataset(FemnistConfig(path=str(tmp_path)), population=3, seed=0)
    assert ds.writers == ["w0", "w1", "w2"]  # type: ignore[attr-defined]
    assert [ds.num_examples(k) for k in range(3)] == [1, 2, 3]
    x, y = ds.device_data(0)
    expected = np.asarray(_leaf({"w0": 1})["user_data"]["w0"]["x"], dtype=np.float32).reshape(1, 1, 28, 28)
    assert np.array_equal(x.numpy(), expected)
    test_x, test_y = ds.test_data()
    assert len(test_y) == 4  # every writer's test examples, including w9 without train data
    first = test_content["user_data"]["w0"]
    assert int(test_y[0]) == first["y"][0]
    assert np.allclose(test_x[0].flatten().numpy(), first["x"][0])


def test_femnist_without_train_test_dirs_is_all_training_data(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "writers.json.gz", "wt") as out:
        json.dump(_leaf({"a": 2, "b": 5}), out)
    ds = load_dataset(FemnistConfig(path=str(tmp_path)), population=2, seed=0)
    assert [ds.num_examples(k) for k in range(2)] == [2, 5]
    with pytest.raises(DataError) as err:
        ds.test_data()
    assert_one_line_naming(err, str(tmp_path))


def test_femnist_truncated_gzip_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    whole = gzip.compress(json.dumps(_leaf({"a": 30})).encode())
    (tmp_path / "train" / "broken_file.json.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as err:
        load_dataset(FemnistConfig(path=str(tmp_path)), population=1, seed=0)
    assert_one_line_naming(err, "broken_file.json.gz")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"users": ["a"], "user_data": {"a": {"x": [[0.5', "not valid JSON"),
        ('{"users": ["a"], "num_samples": [1]}', "user_data"),
        (json.dumps(_leaf({"a": 2}, pixels=780)), "784"),
        ('{"users": ["a"], "user_data": {"a": {"x": [], "y": [1]}}}', "labels"),
    ],
)
def test_femnist_malformed_file_is_a_data_error_naming_the_file(tmp_path: Path, content: str, problem: str) -> None:
    (tmp_path / "bad_writer_file.json").write_text(content)
    with pytest.raises(DataError) as err:
        load_dataset(FemnistConfig(path=str(tmp_path)), population=1, seed=0)
    assert_one_line_naming(err, "bad_writer_file.json")
    assert problem in str(err.value)


def test_femnist_empty_or_missing_directory_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no json here")
    with pytest.raises(DataError) as err:
        load_dataset(FemnistConfig(path=str(tmp_path)), population=1, seed=0)
    assert_one_line_naming(err, str(tmp_path))
    assert "no LEAF JSON files" in str(err.value)
    with pytest.raises(DataError) as err:
        load_dataset(FemnistConfig(path=str(tmp_path / "absent")), population=1, seed=0)
    assert_one_line_naming(err, "absent")


# ----------------------------------------------------------------------------- fashion-mnist


@pytest.fixture(scope="module")
def fashion_dir() -> Path:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST idx files not installed in {FASHION_DIR} (Debian: dataset-fashion-mnist)")
    return FASHION_DIR


def _fashion(path: Path, population: int, seed: int = 0, **options: object) -> FederatedDataset:
    cfg = FashionMnistConfig(path=str(path), **options)  # type: ignore[arg-type]
    return load_dataset(cfg, population=population, seed=seed)


def _mean_distinct_labels(ds: FederatedDataset) -> float:
    return float(np.mean([len(torch.unique(ds.device_data(k)[1])) for k in range(ds.num_devices)]))


def test_fashion_mnist_partitions_use_every_train_example_once(fashion_dir: Path) -> None:
    iid = _fashion(fashion_dir, 100, partition="iid")
    shards = _fashion(fashion_dir, 100, partition="shards", shards_per_device=2)
    skewed = _fashion(fashion_dir, 100, partition="dirichlet", dirichlet_alpha=0.1)
    for ds in (iid, shards):
        assert np.array_equal(np.sort(ds.partition.indices), np.arange(60_000))  # type: ignore[attr-defined]
    indices = skewed.partition.indices  # type: ignore[attr-defined]
    assert len(np.unique(indices)) == len(indices) and indices.max() < 60_000
    assert min(skewed.num_examples(k) for k in range(100)) >= 1
    assert sum(skewed.num_examples(k) for k in range(100)) == len(indices)

    x, y = iid.device_data(0)
    assert x.shape == (600, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    test_x, test_y = iid.test_data()
    assert test_x.shape == (10_000, 1, 28, 28) and set(test_y.tolist()) == set(range(10))

    # Label skew: iid devices see all 10 classes, Dirichlet(0.1) and 2-shard devices far fewer.
    assert _mean_distinct_labels(iid) == 10.0
    assert _mean_distinct_labels(skewed) < 7.0
    assert _mean_distinct_labels(shards) <= 2.5


def test_fashion_mnist_partition_is_deterministic_by_seed(fashion_dir: Path) -> None:
    first = _fashion(fashion_dir, 50, seed=1, partition="dirichlet", max_test_examples=500)
    again = _fashion(fashion_dir, 50, seed=1, partition="dirichlet")
    other = _fashion(fashion_dir, 50, seed=2, partition="dirichlet")
    assert np.array_equal(first.partition.indices, again.partition.indices)  # type: ignore[attr-defined]
    assert np.array_equal(first.partition.offsets, again.partition.offsets)  # type: ignore[attr-defined]
    assert not np.array_equal(first.partition.offsets, other.partition.offsets)  # type: ignore[attr-defined]
    assert len(first.test_data()[1]) == 500


def test_fashion_mnist_population_above_the_examples_is_a_config_error(fashion_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _fashion(fashion_dir, 60_001)
    assert err.value.key == "population" and "60000" in str(err.value)


def _idx_images(images: np.ndarray, magic: int = 0x00000803) -> bytes:
    return struct.pack(">IIII", magic, *images.shape) + images.tobytes()


def _idx_labels(labels: np.ndarray, magic: int = 0x00000801) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_idx(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """20 train examples as plain idx files, 6 test examples gzipped."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_images(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_labels(labels))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_images(images[:6])))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_labels(labels[:6])))
    return tmp_path, images, labels


def test_fashion_mnist_parses_generated_idx_files(tiny_idx: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, images, labels = tiny_idx
    ds = _fashion(path, 4, partition="iid")
    assert ds.num_devices == 4 and ds.input_shape == (1, 28, 28)
    seen = []
    for device_id in range(4):
        x, y = ds.device_data(device_id)
        owned = ds.partition.part(device_id)  # type: ignore[attr-defined]
        assert np.allclose(x.numpy(), images[owned][:, None] / 255.0)
        assert np.array_equal(y.numpy(), labels[owned])
        seen.extend(owned.tolist())
    assert sorted(seen) == list(range(20))
    test_x, test_y = ds.test_data()
    assert np.allclose(test_x.numpy(), images[:6, None] / 255.0) and test_y.tolist() == labels[:6].tolist()

    with pytest.raises(ConfigError) as err:
        _fashion(path, 8, partition="shards", shards_per_device=3)
    assert err.value.key == "dataset.shards_per_device"


def test_fashion_mnist_wrong_magic_is_a_data_error(tiny_idx: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, images, _ = tiny_idx
    (path / "train-images-idx3-ubyte").write_bytes(_idx_images(images, magic=0x00000801))
    with pytest.raises(DataError) as err:
        _fashion(path, 2)
    assert_one_line_naming(err, "train-images-idx3-ubyte")
    assert "0x00000801" in str(err.value) and "0x00000803" in str(err.value)


def test_fashion_mnist_truncated_files_are_data_errors(tiny_idx: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, images, labels = tiny_idx
    whole = _idx_images(images)
    (path / "train-images-idx3-ubyte").write_bytes(whole[:-100])
    with pytest.raises(DataError) as err:
        _fashion(path, 2)
    assert_one_line_naming(err, "train-images-idx3-ubyte")
    assert "truncated" in str(err.value)

    (path / "train-images-idx3-ubyte").write_bytes(whole)
    zipped = gzip.compress(_idx_labels(labels[:6]))
    (path / "t10k-labels-idx1-ubyte.gz").write_bytes(zipped[: len(zipped) - 12])
    with pytest.raises(DataError) as err:
        _fashion(path, 2)
    assert_one_line_naming(err, "t10k-labels-idx1-ubyte.gz")

    (path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_labels(labels[:5])))
    with pytest.raises(DataError) as err:
        _fashion(path, 2)
    assert_one_line_naming(err, "t10k-labels-idx1-ubyte.gz")
    assert "6 images" in str(err.value) and "5 labels" in str(err.value)


def test_fashion_mnist_checks_the_training_images_whole_but_reads_them_on_first_use(
    tiny_idx: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    """The server builds the dataset to partition and never trains: it must not hold the
    training pixels (47 MB of Fashion-MNIST), yet a bad images file is still refused before any
    round, with one line, gzipped or not."""
    path, images, labels = tiny_idx
    ds = _fashion(path, 4, partition="iid")
    assert ds._train_images is None  # type: ignore[attr-defined]
    x, _ = ds.device_data(1)
    assert ds._train_images is not None and np.allclose(x.numpy(), images[ds.partition.part(1)][:, None] / 255.0)  # type: ignore[attr-defined]
    whole = _idx_images(images)
    (path / "train-images-idx3-ubyte").unlink()
    for name, content, words in (
        ("train-images-idx3-ubyte.gz", gzip.compress(whole + b"\x00"), "longer than its header says"),
        ("train-images-idx3-ubyte.gz", gzip.compress(whole)[:-40], "not a readable gzip file"),
        ("train-images-idx3-ubyte.gz", gzip.compress(whole[:-1]), "truncated"),
    ):
        (path / name).write_bytes(content)
        with pytest.raises(DataError) as err:
            _fashion(path, 2)
        assert_one_line_naming(err, name)
        assert words in str(err.value)


def test_fashion_mnist_missing_file_is_a_data_error(tiny_idx: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, _, _ = tiny_idx
    (path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        _fashion(path, 2)
    assert_one_line_naming(err, "t10k-images-idx3-ubyte")


# ----------------------------------------------------------------------------- huggingface


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A local train (300 rows) and test (50 rows) parquet pair, read offline through flwr-datasets."""
    pytest.importorskip("flwr_datasets")
    root = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_CACHE", str(root / "cache"))
        patch.setenv("FLWR_TELEMETRY_ENABLED", "0")
        import datasets
        import flwr_datasets.common.telemetry as telemetry
        from PIL import Image

        # datasets and the telemetry module read these at import time: patch the live values too.
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "cache")
        patch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")

        rng = np.random.default_rng(0)
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "photo": datasets.Image(),
                "vec": datasets.List(datasets.Value("float32")),
                "label": datasets.Value("int64"),
                "writer": datasets.Value("string"),
            }
        )
        paths = {}
        for split, rows in (("train", 300), ("test", 50)):
            table = {
                "image": [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(rows)],
                "photo": [Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)) for _ in range(rows)],
                "vec": rng.random((rows, 5)).astype(np.float32).tolist(),
                "label": rng.integers(0, 10, rows).tolist(),
                "writer": [f"w{i % 7}" for i in range(rows)],
            }
            paths[split] = str(root / f"{split}.parquet")
            datasets.Dataset.from_dict(table, features=features).to_parquet(paths[split])
        yield paths


def _hf(files: dict[str, str], population: int, **options: object) -> FederatedDataset:
    cfg = HuggingFaceConfig(hf_name="parquet", data_files=files, **options)  # type: ignore[arg-type]
    return load_dataset(cfg, population=population, seed=0)


def test_huggingface_iid_partition_covers_every_row(parquet_files: dict[str, str]) -> None:
    ds = _hf(parquet_files, 5, feature_key="vec")
    assert ds.num_devices == 5 and ds.input_shape == (5,) and ds.num_classes == 10
    parts = [ds.device_data(k) for k in range(5)]
    assert [len(y) for _, y in parts] == [60] * 5
    rows = np.concatenate([x.numpy() for x, _ in parts])
    import pyarrow.parquet as pq

    stored = np.array(pq.read_table(parquet_files["train"]).column("vec").to_pylist(), dtype=np.float32)
    assert np.array_equal(np.unique(rows, axis=0), np.unique(stored, axis=0))
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in parts)

    test_x, test_y = ds.test_data()
    stored_test = np.array(pq.read_table(parquet_files["test"]).column("vec").to_pylist(), dtype=np.float32)
    assert np.array_equal(np.unique(test_x.numpy(), axis=0), np.unique(stored_test, axis=0))
    assert len(test_y) == 50


def test_huggingface_images_become_chw_float_tensors(parquet_files: dict[str, str]) -> None:
    gray = _hf(parquet_files, 5, max_test_examples=20)
    x, y = gray.device_data(3)
    assert gray.input_shape == (1, 28, 28)
    assert x.shape == (60, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x * 255, torch.round(x * 255))  # whole pixel values, scaled
    assert gray.test_data()[0].shape == (20, 1, 28, 28)

    colour = _hf(parquet_files, 3, feature_key="photo", test_split=None)
    assert colour.input_shape == (3, 8, 6) and colour.device_data(0)[0].shape == (100, 3, 8, 6)
    empty_x, empty_y = colour.test_data()
    assert empty_x.shape == (0, 3, 8, 6) and empty_y.shape == (0,)


def test_huggingface_dirichlet_and_natural_partitions(parquet_files: dict[str, str]) -> None:
    skewed = _hf(parquet_files, 6, partition="dirichlet", dirichlet_alpha=0.3, feature_key="vec")
    sizes = [skewed.num_examples(k) for k in range(6)]
    assert min(sizes) >= 1 and sum(sizes) == 300

    natural = _hf(parquet_files, 7, partition="natural", partition_by="writer", feature_key="vec")
    assert sorted(natural.num_examples(k) for k in range(7)) == [42] + [43] * 6
    with pytest.raises(ConfigError) as err:
        _hf(parquet_files, 8, partition="natural", partition_by="writer")
    assert err.value.key == "population" and "7 distinct" in str(err.value)


def test_huggingface_bad_input_is_a_data_error(parquet_files: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        _hf(parquet_files, 5, feature_key="pixels")
    assert_one_line_naming(err, "pixels")
    with pytest.raises(DataError) as err:
        _hf(parquet_files, 5, partition="natural", partition_by="author")
    assert_one_line_naming(err, "author")
    missing = {"train": str(tmp_path / "missing.parquet")}
    with pytest.raises(DataError) as err:
        _hf(missing, 5)
    assert_one_line_naming(err, "missing.parquet")


def test_huggingface_without_flwr_datasets_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # makes `import flwr_datasets` fail
    with pytest.raises(DataError) as err:
        load_dataset(HuggingFaceConfig(), population=2, seed=0)
    assert str(err.value) == "huggingface: needs flwr-datasets; pip install -e '.[hf]'"
