"""fedsim.randomness and clients.seeding: modes, fingerprints, full-width torch seeding."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.seeding import mt19937_state, new_generator, seed_sequence
from fedsim import randomness
from fedsim.config import FedsimConfig, from_dict, resolve_paths
from fedsim.data import identity
from fedsim.errors import ConfigError, DataError
from fedsim.worker import device_seed
from helpers import set_keys

REPO = Path(__file__).resolve().parent.parent


def _cfg(**over: object) -> FedsimConfig:
    return from_dict(set_keys({"population": 100, "cohort": {"size": 10}}, dict(over)))


def test_torch_state_layout_is_numpy_mt19937_fed_the_same_words():
    words = np.random.default_rng(7).integers(0, 2**32, size=624, dtype=np.uint32)
    g = torch.Generator()
    g.set_state(mt19937_state(words))
    reference = np.random.MT19937()
    state = reference.state
    state["state"]["key"] = words
    state["state"]["pos"] = 624
    reference.state = state
    # torch's random_ on int64 over [0, 2^32) consumes one 64-bit draw (two MT outputs) and
    # keeps the second 32-bit output
    expected = reference.random_raw(20)[1::2]
    got = torch.empty(10, dtype=torch.int64).random_(0, 2**32, generator=g).numpy()
    np.testing.assert_array_equal(got, expected)


def test_torch_manual_seed_keeps_32_bits_but_full_seeding_does_not():
    # The defect: torch 2.13's CPU generator folds manual_seed's argument to 32 bits.
    a = torch.rand(4, generator=torch.Generator().manual_seed(5))
    b = torch.rand(4, generator=torch.Generator().manual_seed(5 + 2**32))
    assert torch.equal(a, b)
    c = torch.rand(4, generator=new_generator(5))
    d = torch.rand(4, generator=new_generator(5 + 2**32))
    assert not torch.equal(c, d)


def test_seed_packing_is_fixed_width():
    first = seed_sequence((2**32,)).generate_state(4)
    second = seed_sequence((0, 1)).generate_state(4)
    assert not np.array_equal(first, second)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        seed_sequence((-1,))


def test_auto_mode_is_reproducible_in_simulation_and_secure_in_deployment_or_distributed_noise():
    assert randomness.resolve(_cfg())[0] == "reproducible"
    deployed = _cfg(engine="deployment", superlink="127.0.0.1:9093")
    assert randomness.resolve(deployed)[0] == "secure"
    distributed = _cfg(secagg={"name": "secaggplus"}, privacy={"dpfedavg": {"noise": "distributed", "accountant": "rdp"}}, cohort={"size": 50, "sampling": "fixed"})
    mode, reason = randomness.resolve(distributed)
    assert mode == "secure" and "distributed" in reason
    central = _cfg(secagg={"name": "secaggplus"}, privacy={"dpfedavg": {"accountant": "rdp"}}, cohort={"size": 50, "sampling": "fixed"})
    assert randomness.mode(central) == "reproducible"
    assert randomness.mode(_cfg(engine="deployment", superlink="h:1", privacy={"randomness": "reproducible"})) == "reproducible"
    assert randomness.mode(_cfg(privacy={"randomness": "secure"})) == "secure"


def test_bad_randomness_mode_and_seed_are_config_errors():
    with pytest.raises(ConfigError, match="privacy.randomness"):
        _cfg(privacy={"randomness": "fast"})
    with pytest.raises(ConfigError, match="seed"):
        _cfg(seed=-1)


def test_fingerprint_ignores_how_a_run_is_executed_but_not_what_it_computes():
    base = randomness.fingerprint(_cfg())
    assert base < 2**128
    same = [
        _cfg(simulation={"num_workers": 2}),
        _cfg(output={"dir": "/tmp/elsewhere"}),
        _cfg(checkpoint={"every": 3}),
        _cfg(privacy={"randomness": "reproducible"}),
        # killed or frozen workers only delay a run (tests/test_chaos.py compares it with a clean run)
        _cfg(faults={"worker_kill_rate": 0.1, "worker_pause_rate": 0.1, "worker_pause_s": 12}),
    ]
    assert all(randomness.fingerprint(c) == base for c in same)
    different = [
        _cfg(cohort={"size": 11}),
        _cfg(rounds=21),
        _cfg(privacy={"dpfedavg": {"noise_multiplier": 1.0}}),
        _cfg(privacy={"dpfedavg": {"noise_multiplier": 1.1}}),
        _cfg(faults={"device_failure_rate": 0.1}),  # which devices fail is part of the result
    ]
    prints = {randomness.fingerprint(c) for c in different} | {base}
    assert len(prints) == len(different) + 1


def _data_in(folder: Path, kind: str) -> dict:
    """The dataset config of a `kind` dataset written into `folder` (same bytes for every folder)."""
    folder.mkdir(parents=True)
    if kind == "shakespeare":
        (folder / "play.txt").write_text("A:\nto be or not to be\n\nB:\nthat is the question\n")
        return {"name": "shakespeare", "path": str(folder / "play.txt"), "min_chars": 5, "seq_len": 4}
    if kind == "femnist":
        shutil.copytree(REPO / "data" / "femnist", folder / "leaf")
        return {"name": "femnist", "path": str(folder / "leaf")}
    if kind == "fashion_mnist":
        for stem in identity.FASHION_FILES:
            (folder / (stem + ".gz")).write_bytes(stem.encode() * 3)  # never parsed: only hashed
        return {"name": "fashion_mnist", "path": str(folder)}
    (folder / "train.csv").write_text("x,label\n1,0\n2,1\n")
    (folder / "test.csv").write_text("x,label\n3,1\n")
    return {"name": "huggingface", "hf_name": "csv", "data_files": {"train": str(folder / "train.csv"), "test": str(folder / "*t.csv")}}


def _first_file(folder: Path) -> Path:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".gz", ".txt", ".csv"))[0]


@pytest.mark.parametrize("kind", ["shakespeare", "femnist", "fashion_mnist", "huggingface"])
def test_data_enters_the_fingerprint_by_its_bytes_not_by_where_it_lies(tmp_path: Path, kind: str) -> None:
    # The flake this fixes: a Shakespeare run in pytest's tmp_path trained from a different
    # seed stream on every run, because the (absolute) dataset.path was hashed.
    here = _cfg(dataset=_data_in(tmp_path / "clone_a", kind))
    there = _cfg(dataset=_data_in(tmp_path / "clone_b" / "deeper", kind))
    assert randomness.fingerprint(here) == randomness.fingerprint(there)
    sha = identity.content_sha256(here.dataset)
    assert sha is not None and randomness.describe(here)["data_sha256"] == sha
    if kind != "huggingface":  # dataset.path given relative to the working directory: the same run
        relative = _cfg(dataset=_data_in(tmp_path / "rel", kind))
        relative.dataset.path = str(Path(relative.dataset.path).relative_to(tmp_path))
        assert randomness.fingerprint(resolve_paths(relative, base=tmp_path)) == randomness.fingerprint(here)
    # A file the loader does not read changes nothing (the bundled FEMNIST copy has a README.md).
    (_first_file(tmp_path / "clone_b").parent / "NOTES.md").write_text("not data")
    assert randomness.fingerprint(there) == randomness.fingerprint(here)
    # One byte of the data changed: another run (edited data never reuses the original's noise).
    changed = _first_file(tmp_path / "clone_b")
    data = bytearray(changed.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(data)
    assert identity.content_sha256(there.dataset) != sha
    assert randomness.fingerprint(there) != randomness.fingerprint(here)
    # Data that cannot be read keeps its location in (the loader reports it), and is not the same run.
    shutil.rmtree(tmp_path / "clone_b")
    assert identity.content_sha256(there.dataset) is None
    assert randomness.fingerprint(there) != randomness.fingerprint(here)


def test_what_the_loader_reads_where_and_in_which_order_is_part_of_the_data(tmp_path: Path) -> None:
    # Hugging Face: the same file contents in other folders are other data (imagefolder labels are
    # folder names; `datasets` reads d/a.b/ before d/a/, so the row order differs too).
    def csv_tree(root: Path, second: str) -> FedsimConfig:
        for rel, text in (("a/q.csv", "x,label\n1,0\n"), (f"{second}/p.csv", "x,label\n2,1\n")):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        return _cfg(dataset={"name": "huggingface", "hf_name": "csv", "data_files": {"train": str(root / "**" / "*.csv")}})

    one, other = csv_tree(tmp_path / "one", "a.b"), csv_tree(tmp_path / "other", "b")
    assert randomness.fingerprint(one) != randomness.fingerprint(other)
    (tmp_path / "one" / "README.md").write_text("not read by datasets")
    (tmp_path / "one" / "__cache").mkdir()
    (tmp_path / "one" / "__cache" / "z.csv").write_text("x,label\n9,9\n")  # `datasets` skips __ folders
    assert randomness.fingerprint(one) == randomness.fingerprint(csv_tree(tmp_path / "again", "a.b"))
    # imagefolder collects labels (folder names) over every split: a train split pinned to one
    # folder is still named by that folder.
    def splits(label: str) -> FedsimConfig:
        root = tmp_path / f"images-{label}"
        for rel in (f"train/{label}/1.csv", "test/dog/2.csv"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("x,label\n1,0\n")
        return _cfg(dataset={"name": "huggingface", "hf_name": "csv", "data_files": {
            "train": str(root / "train" / label / "*.csv"), "test": str(root / "test" / "*" / "*.csv")}})  # fmt: skip

    assert randomness.fingerprint(splits("cat")) != randomness.fingerprint(splits("cow"))
    # Fashion-MNIST: the train and t10k labels swapped are other data.
    fashion = _cfg(dataset=_data_in(tmp_path / "fashion", "fashion_mnist"))
    before = randomness.fingerprint(fashion)
    train, test = (tmp_path / "fashion" / f"{split}-labels-idx1-ubyte.gz" for split in ("train", "t10k"))
    a, b = train.read_bytes(), test.read_bytes()
    train.write_bytes(b)
    test.write_bytes(a)
    assert randomness.fingerprint(fashion) != before
    # A file name that is not UTF-8 (bytes as the disk has them) is hashed, not a traceback.
    leaf_root = tmp_path / "leaf-bytes"
    shutil.copytree(REPO / "data" / "femnist", leaf_root)
    os.rename(leaf_root / "test" / "femnist_test.json.gz", os.path.join(os.fsencode(leaf_root / "test"), b"caf\xe9.json.gz"))
    assert identity.content_sha256(_cfg(dataset={"name": "femnist", "path": str(leaf_root)}).dataset) is not None
    # Same size, mtime set back (os.utime, `cp -p`, `tar -x`): still seen as changed in this process.
    text = tmp_path / "play.txt"
    text.write_text("A:\nto be or not to be\n")
    play = _cfg(dataset={"name": "shakespeare", "path": str(text), "min_chars": 5})
    first, stamp = randomness.fingerprint(play), text.stat()
    text.write_text("A:\nto be or not to bE\n")
    os.utime(text, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert text.stat().st_mtime_ns == stamp.st_mtime_ns and randomness.fingerprint(play) != first


def test_a_worker_whose_data_are_not_the_servers_bytes_refuses_the_run(tmp_path: Path) -> None:
    from fedsim.client_app import local_config
    from fedsim.worker import SERVER_DATA_KEY, config_from_job, get_worker, job_config_json

    server = _cfg(population=2, cohort={"size": 2}, dataset=_data_in(tmp_path / "server", "shakespeare"))
    job = job_config_json(server)
    assert json.loads(job)[SERVER_DATA_KEY] == identity.content_sha256(server.dataset)
    assert config_from_job(job) == (server, identity.content_sha256(server.dataset))
    assert get_worker(job).cfg == server
    # A SuperNode's own copy (`fedsim-data`): the same bytes are the same run ...
    copy = tmp_path / "node" / "play.txt"
    copy.parent.mkdir()
    shutil.copy(server.dataset.path, copy)

    class Node:
        node_config = {"fedsim-data": str(copy)}

    assert get_worker(local_config(job, Node())).dataset.num_devices == 2  # type: ignore[arg-type]
    # ... other bytes are refused in one line naming both digests.
    other = tmp_path / "other-node" / "play.txt"
    other.parent.mkdir()
    other.write_text(copy.read_text().replace("question", "answer!!"))
    Node.node_config = {"fedsim-data": str(other)}
    with pytest.raises(DataError, match=r"^dataset: the data this worker reads \(.*play.txt: sha256 [0-9a-f]{64}\) are not the bytes the server read \(sha256 [0-9a-f]{64}\)"):
        get_worker(local_config(job, Node()))  # type: ignore[arg-type]
    # Data without files carries no digest (nothing to compare).
    assert SERVER_DATA_KEY not in json.loads(job_config_json(_cfg()))


def test_data_without_files_of_its_own_keeps_its_config_values():
    bundled = _cfg(dataset={"name": "shakespeare"})
    assert identity.content_sha256(bundled.dataset) is None and "data_sha256" not in randomness.describe(bundled)
    assert randomness.fingerprint(bundled) != randomness.fingerprint(_cfg(dataset={"name": "shakespeare", "seq_len": 40}))
    hub = _cfg(dataset={"name": "huggingface", "hf_name": "ylecun/mnist"})
    assert identity.content_sha256(hub.dataset) is None
    assert randomness.fingerprint(hub) != randomness.fingerprint(_cfg(dataset={"name": "huggingface", "hf_name": "zalando/fashion"}))


def test_reproducible_streams_repeat_and_secure_streams_never_do():
    cfg = _cfg()
    a = randomness.numpy_generator(cfg, "noise", 3, 4).random(5)
    b = randomness.numpy_generator(cfg, "noise", 3, 4).random(5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, randomness.numpy_generator(cfg, "noise", 4, 3).random(5))
    assert not np.array_equal(a, randomness.numpy_generator(cfg, "count", 3, 4).random(5))
    t1 = torch.randn(5, generator=randomness.torch_generator(cfg, "noise", 3))
    t2 = torch.randn(5, generator=randomness.torch_generator(cfg, "noise", 3))
    assert torch.equal(t1, t2)

    secure = _cfg(privacy={"randomness": "secure"})
    s1 = randomness.numpy_generator(secure, "noise", 3, 4).random(5)
    s2 = randomness.numpy_generator(secure, "noise", 3, 4).random(5)
    assert not np.array_equal(s1, s2)
    u1 = torch.randn(5, generator=randomness.torch_generator(secure, "noise", 3))
    u2 = torch.randn(5, generator=randomness.torch_generator(secure, "noise", 3))
    assert not torch.equal(u1, u2)


def test_hydra_default_config_has_randomness_auto_and_accepts_an_override():
    from hydra import compose, initialize_config_dir

    from fedsim.__main__ import CONF_DIR, config_from_hydra

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        chosen = config_from_hydra(compose(config_name="config", overrides=["privacy=dpfedavg", "privacy.randomness=secure"]))
        default = config_from_hydra(compose(config_name="config"))
    assert chosen.privacy.randomness == "secure" and chosen.privacy.dpfedavg is not None
    assert default.privacy.randomness == "auto"


# ----------------------------------------------------------------------------- defect 5 (issue 14)


def _old_device_seed(*ints: int) -> int:
    """fedsim's seed of a device fit before issue 14: BLAKE2b-64 of the ints, then manual_seed."""
    packed = struct.pack(f"<{len(ints)}Q", *ints)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")


def test_defect5_no_two_round_device_pairs_in_a_million_fit_run_share_a_stream():
    # The defect: manual_seed keeps 32 of the 64 mixed bits, so with seed 0 round 45 device 268
    # and round 95 device 175 drew the same Poisson masks and noise.
    assert _old_device_seed(0, 45, 268) != _old_device_seed(0, 95, 175)
    assert _old_device_seed(0, 45, 268) % 2**32 == _old_device_seed(0, 95, 175) % 2**32
    cfg = _cfg(rounds=1000, population=1000, cohort={"size": 1000, "sampling": "fixed"})
    streams = randomness.streams(cfg)
    a = torch.rand(1000, generator=new_generator(device_seed(streams, 45, 268)))
    b = torch.rand(1000, generator=new_generator(device_seed(streams, 95, 175)))
    assert not torch.equal(a, b)

    # A 10^6-fit run: 1000 rounds x 1000 devices. Every fit's stream is Philox under one key
    # (seed, fingerprint, "device-train") from the counter (0, round, device, 0); Philox is a
    # bijection of the counter, and a fit advances only the counter's first word, so distinct
    # (round, device) give disjoint blocks. Checked on every pair: the counters are distinct...
    rounds, devices = np.meshgrid(np.arange(1, 1001), np.arange(1000), indexing="ij")
    counters = np.array([randomness.philox_counter((int(r), int(d))) for r, d in zip(rounds.ravel(), devices.ravel(), strict=True)])
    assert len(counters) == 10**6 and len(np.unique(counters, axis=0)) == 10**6
    # ... and on a sample, the generator a fit gets really is (that key, that counter), its
    # draws stay inside the counter's first word, and the torch states built from them differ.
    key = randomness.philox_key(cfg.seed, streams.fingerprint, "device-train", 2)
    rng = np.random.default_rng(1)
    states, pairs = set(), set()
    for r, d in zip(rng.integers(1, 1001, 300), rng.integers(0, 1000, 300), strict=True):
        bits = device_seed(streams, int(r), int(d))
        state = bits.state["state"]
        assert int(state["key"][0]) | int(state["key"][1]) << 64 == key
        assert state["counter"].tolist() == [0, r, d, 0]
        generator = new_generator(bits)
        torch.rand(10**5, generator=generator)
        assert bits.state["state"]["counter"].tolist()[1:] == [r, d, 0]
        pairs.add((int(r), int(d)))
        states.add(bytes(new_generator(device_seed(streams, int(r), int(d))).get_state().numpy()))
    assert len(states) == len(pairs)


def test_defect5_configs_that_differ_only_in_z_give_uncorrelated_noise():
    from fedsim.privacy.dpfedavg import UserLevelDP

    def central_noise(z: float) -> np.ndarray:
        user = UserLevelDP(_cfg(privacy={"dpfedavg": {"noise_multiplier": z, "clip_norm": 1.0}}))
        mean = user.aggregate(torch.zeros(10_000, dtype=torch.float64), [], 1)
        return mean.double().numpy() * user.expected_cohort / user.noise_std  # unit Gaussians

    a, b = central_noise(1.0), central_noise(1.1)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
    np.testing.assert_array_equal(a, central_noise(1.0))  # same config: the same noise
    # DP-SGD on devices: a device's stream (Poisson masks and noise) depends on sigma too.
    low = randomness.streams(_cfg(privacy={"dpsgd": {"noise_multiplier": 1.0}}))
    high = randomness.streams(_cfg(privacy={"dpsgd": {"noise_multiplier": 1.1}}))
    x = torch.randn(10_000, generator=new_generator(device_seed(low, 1, 7)), dtype=torch.float64).numpy()
    y = torch.randn(10_000, generator=new_generator(device_seed(high, 1, 7)), dtype=torch.float64).numpy()
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.05
