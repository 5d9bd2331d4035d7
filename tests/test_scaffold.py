"""SCAFFOLD (Karimireddy et al. 2020, Alg. 1, option II) and its disk-backed control variates.

The run is checked against a SCAFFOLD written here from the paper's equations on
clients.LocalTrainer (the same device seeds and cohorts), resumed bit-identically from a
checkpoint after the store moved on, and refused where it would break a guarantee.
"""

from __future__ import annotations

import json
import math
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from clients import LocalTrainer, flat_params
from fake_grid import run_local
from helpers import set_keys
from fedsim import randomness
from fedsim.config import from_dict
from fedsim.data import load_dataset
from fedsim.errors import ConfigError
from fedsim.models import model_for
from fedsim.sampling import sample_cohort
from fedsim.server_app import prepare
from fedsim.strategies.control_store import ControlStore
from fedsim.worker import device_seed, train_config


def config(tmp: Path, **over: object) -> dict:
    raw: dict = {
        "seed": 5,
        "population": 30,
        "rounds": 4,
        "cohort": {"size": 6, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 60},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "algorithm": {"name": "scaffold", "lr": 0.05, "local_epochs": 2, "batch_size": 10},
        "simulation": {"num_workers": 2, "ray_temp_dir": str(tmp / "ray")},
        "output": {"progress": False},
    }
    return set_keys(raw, over)


def final_params(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "model.pt", weights_only=False)["flat_params"]


def reference_scaffold(raw: dict) -> torch.Tensor:
    """SCAFFOLD from the paper (Alg. 1, option II), by hand: c_i and c in dicts and tensors,
    float64 server arithmetic; fedsim's choices (example-weighted mean of Delta y, N = the
    population, K = local steps) as its docstring states them."""
    cfg = from_dict(raw)
    a = cfg.algorithm
    dataset = load_dataset(cfg.dataset, population=cfg.population, seed=cfg.seed)
    model = model_for(cfg, dataset)
    x = flat_params(model).double()
    streams = randomness.streams(cfg)
    trainer = LocalTrainer(model, train_config(cfg))
    c = torch.zeros_like(x)
    c_i: dict[int, torch.Tensor] = {}
    for r in range(1, cfg.rounds + 1):
        cohort = sample_cohort(population=cfg.population, cohort_size=cfg.cohort.size, method=cfg.cohort.sampling,
                               rng=streams.numpy("cohort", r))  # fmt: skip
        delta_y, weights, delta_c = torch.zeros_like(x), 0.0, torch.zeros_like(x)
        for d in sorted(cohort):
            mine = c_i.get(d, torch.zeros_like(x))
            data = dataset.device_data(d)
            fit = trainer.fit(x.float(), data, seed=device_seed(streams, r, d), correction=(c - mine).float())
            n = len(data[1])
            delta_y += fit.update.double() * n
            weights += n
            steps = a.local_epochs * math.ceil(n / a.batch_size)
            new = mine - c - fit.update.double() / (steps * a.lr)  # c_i+ = c_i - c + (x - y) / (K eta_l)
            delta_c += new - mine
            c_i[d] = new
        x = x + a.server_lr * delta_y / weights
        c = c + delta_c / cfg.population
    return x.float()


def test_scaffold_run_follows_the_paper_and_differs_from_fedavg(tmp_path: Path) -> None:
    raw = config(tmp_path)
    summary = run_local(from_dict(raw), tmp_path / "scaffold")
    got = final_params(tmp_path / "scaffold")
    want = reference_scaffold(raw)
    assert torch.allclose(got, want, rtol=0, atol=2e-5), float((got - want).abs().max())
    fedavg = config(tmp_path, **{"algorithm.name": "fedavg"})
    run_local(from_dict(fedavg), tmp_path / "fedavg")
    # Round 1 is FedAvg (every c_i = c = 0); from round 2 on the correction changes the model.
    assert (final_params(tmp_path / "fedavg") - got).abs().max() > 1e-4
    stored = summary["strategy"]["control_variates"]
    assert 6 <= stored["devices_stored"] <= 24  # every device sampled in 4 rounds of 6 has a row
    assert stored["global_control_norm"] > 0
    rows = [json.loads(line) for line in (tmp_path / "scaffold" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["scaffold_devices_stored"] == stored["devices_stored"]
    # Without checkpoints there is nothing to resume: the control-variate file is removed.
    assert not Path(stored["file"]).exists()


def test_scaffold_with_dpsgd_on_devices_runs_and_accounts(tmp_path: Path) -> None:
    raw = config(tmp_path, **{"privacy": {"dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}, "rounds": 2})
    summary = run_local(from_dict(raw), tmp_path / "dp")
    assert summary["privacy"]["sample_level"]["epsilon_max"] > 0
    assert summary["strategy"]["control_variates"]["devices_stored"] > 0


def test_resume_after_the_store_moved_on_is_bit_identical(tmp_path: Path) -> None:
    from fedsim.checkpoint import checkpoint_path

    raw = config(tmp_path, **{"rounds": 4, "checkpoint": {"every": 2, "keep": 2}})
    whole, part = tmp_path / "whole", tmp_path / "part"
    done = run_local(from_dict(raw), whole)
    # The directory as a crash just before round 4's checkpoint leaves it: checkpoint 2, and a
    # store file that rounds 3 and 4 wrote on (the rows checkpoint 2 needs must be intact).
    shutil.copytree(whole, part)
    for leftover in [part / "summary.json", checkpoint_path(part, 4)]:
        leftover.unlink()
    resumed = run_local(from_dict({**raw, "resume": str(part)}), part)
    assert resumed["resumed_from_round"] == 2
    assert resumed["model_sha256"] == done["model_sha256"]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"secagg": {"name": "secaggplus"}}, "secagg=secaggplus hides"),
        ({"privacy": {"dpfedavg": {"noise_multiplier": 1.0, "clip_norm": 1.0, "accountant": "rdp"}}}, "outside DP-FedAvg's guarantee"),
        ({"simulation": {"vectorize": "on", "num_workers": 1}}, "trains each device with inputs of its own"),
    ],
)
def test_scaffold_is_refused_where_it_would_break_a_guarantee(tmp_path: Path, over: dict, message: str) -> None:
    raw = config(tmp_path)
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(ConfigError, match=message):
        prepare(from_dict(raw))


def test_store_reuses_slots_when_no_checkpoint_needs_them(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "c.f32", 3)
    for r in range(1, 6):
        store.write(r, {d: np.full(3, r + d, dtype=np.float32) for d in (1, 2, 3)})
    assert store.slots == 6  # a round writes 3 new rows, then frees the 3 it replaced: 6 slots, not 15
    assert np.array_equal(store.rows([2, 9]), np.array([[7, 7, 7], [0, 0, 0]], dtype=np.float32))


def test_store_keeps_the_rows_a_kept_checkpoint_refers_to(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "c.f32", 2)
    store.write(1, {7: np.array([1, 1], dtype=np.float32)})
    state = store.state_dict(1)
    store.checkpointed([1])
    for r in range(2, 5):  # the row at round 1 must survive every later write
        store.write(r, {7: np.array([r, r], dtype=np.float32), 8: np.array([-r, -r], dtype=np.float32)})
    back = ControlStore(tmp_path / "c.f32", 2)
    back.load_state_dict(state)
    assert np.array_equal(back.rows([7, 8]), np.array([[1, 1], [0, 0]], dtype=np.float32))
    store.checkpointed([4])  # round 1's checkpoint is gone: its rows are free again
    assert len(store.free) >= 1 and not store.pending


def test_store_memory_is_bounded_at_100k_devices(tmp_path: Path) -> None:
    """100,000 devices with a row each: Python memory holds the index only (a few MB), the rows
    live in the file (100,000 x 256 params x 4 bytes = 102 MB)."""
    store = ControlStore(tmp_path / "c.f32", 256)
    tracemalloc.start()
    for start in range(0, 100_000, 1_000):  # cohorts of 1,000
        rows = np.ones((1_000, 256), dtype=np.float32)
        store.write(start // 1_000 + 1, {start + i: rows[i] for i in range(1_000)})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert store.file_bytes() == 100_000 * 256 * 4
    assert peak < 40e6, peak  # the index of 100k devices and one cohort's rows, not the 102 MB of rows
    assert np.array_equal(store.rows([99_999]), np.ones((1, 256), dtype=np.float32))


def test_scaffold_on_a_population_of_100k(tmp_path: Path) -> None:
    raw = config(tmp_path, population=100_000, rounds=2, **{"cohort.size": 10, "checkpoint": {"every": 1, "keep": 1}})
    summary = run_local(from_dict(raw), tmp_path / "big")
    stored = summary["strategy"]["control_variates"]
    assert stored["devices_stored"] <= 20 and Path(stored["file"]).exists()  # kept for a resume
