"""End to end on Flower's simulation engine: outputs, learning, bit-identical reruns, layouts.

Small on purpose (a few rounds, tiny population): Ray starts once per run (~5 s here).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsim.config import from_dict
from fedsim.run import run
from fake_grid import run_local
from helpers import set_keys

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


def tiny(tmp: Path, **over: object) -> dict:
    raw: dict = {
        "seed": 3,
        "population": 40,
        "rounds": 3,
        "cohort": {"size": 8, "sampling": "poisson"},
        "dataset": {"name": "synthetic", "size_max": 60},
        "model": {"name": "mlp", "hidden_sizes": [16]},
        "simulation": {"num_workers": 1, "ray_temp_dir": str(tmp / "ray")},
        "output": {"progress": False},
    }
    return set_keys(raw, over)


def final_params(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "model.pt", weights_only=False)["flat_params"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("base")
    run(from_dict(tiny(tmp)), tmp / "run")
    return tmp / "run"


def test_run_writes_config_metrics_model_and_summary(base_run: Path) -> None:
    rows = [json.loads(line) for line in (base_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["devices_trained"] == r["cohort_size"] > 0
        assert r["devices_failed"] == 0
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
        assert r["round_time_s"] > 0
    summary = json.loads((base_run / "summary.json").read_text())
    assert summary["rounds"] == 3
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
    ckpt = torch.load(base_run / "model.pt", weights_only=False)
    assert ckpt["sha256"] == summary["model_sha256"]
    assert "population: 40" in (base_run / "config.yaml").read_text()


def test_same_seed_gives_bit_identical_model_with_one_or_two_workers(base_run: Path, tmp_path: Path) -> None:
    # The 1-worker Ray run's model, from the in-process grid with 1 and with 2 workers (the same
    # ClientApp and job assignment, no Ray start-up), and another seed gives another model.
    ref = final_params(base_run)
    for workers in (1, 2):
        run_local(from_dict(tiny(tmp_path, **{"simulation.num_workers": workers})), tmp_path / f"local{workers}")
        assert torch.equal(final_params(tmp_path / f"local{workers}"), ref), workers
    run_local(from_dict(tiny(tmp_path, seed=4)), tmp_path / "other")
    assert not torch.equal(final_params(tmp_path / "other"), ref)
    # Vectorized groups of 3 spread over two Ray workers: the same model as one in-process worker.
    run(from_dict(tiny(tmp_path, **{"simulation.num_workers": 2, "simulation.device_group": 3})), tmp_path / "groups2")
    run_local(from_dict(tiny(tmp_path, **{"simulation.device_group": 3})), tmp_path / "groups1")
    assert torch.equal(final_params(tmp_path / "groups1"), final_params(tmp_path / "groups2"))


def test_classic_layout_one_supernode_per_device_gives_the_same_model(tmp_path: Path) -> None:
    # Classic trains one device per SuperNode: the same model as multiplexed one-by-one training
    # (the vectorized path agrees with both to float rounding, tests/test_worker_vectorized.py).
    run(from_dict(tiny(tmp_path, **{"simulation.layout": "classic"})), tmp_path / "classic")
    run_local(from_dict(tiny(tmp_path, **{"simulation.vectorize": "off", "simulation.num_workers": 2})), tmp_path / "off")
    assert torch.equal(final_params(tmp_path / "classic"), final_params(tmp_path / "off"))
    summary = json.loads((tmp_path / "classic" / "summary.json").read_text())
    assert summary["num_workers"] == 40


def test_cli_run_learns_on_the_default_dataset(tmp_path: Path) -> None:
    """The console entry end to end, on the default synthetic data: accuracy beats the majority class."""
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable, "-m", "fedsim", "population=200", "rounds=8", "cohort.size=20", "eval_every=4",
            f"hydra.run.dir={out}", f"simulation.ray_temp_dir={tmp_path / 'ray'}",
        ],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("[fedsim] round")]
    assert len(progress) == 8 and "ETA" in progress[-1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["test_accuracy"] is not None] == [4, 8]
    from fedsim.data import load_dataset

    cfg = from_dict({"population": 200, "cohort": {"size": 20}})
    _, y = load_dataset(cfg.dataset, population=200, seed=0).test_data()
    majority = torch.bincount(y).max().item() / len(y)
    assert rows[-1]["test_accuracy"] > majority + 0.1, (rows[-1]["test_accuracy"], majority)


def test_population_of_100k_runs_with_a_fixed_cohort(tmp_path: Path) -> None:
    raw = tiny(tmp_path, population=100_000, rounds=2, cohort={"size": 20, "sampling": "fixed"})
    raw["dataset"]["eval_devices"] = 20
    summary = run_local(from_dict(raw), tmp_path / "big")  # in-process grid: the population is the point, not Ray
    rows = [json.loads(line) for line in (tmp_path / "big" / "metrics.jsonl").read_text().splitlines()]
    assert [r["devices_trained"] for r in rows] == [20, 20]
    assert summary["devices_failed"] == 0


@pytest.mark.slow
def test_femnist_cnn_fedavg_reaches_75_percent(tmp_path: Path, femnist_dir: Path) -> None:
    """The README's FEMNIST row: `fedsim experiment=femnist_fedavg` (100 rounds, ~2.5 min)."""
    out = tmp_path / "femnist"
    proc = subprocess.run(
        [
            sys.executable, "-m", "fedsim", "experiment=femnist_fedavg", f"dataset.path={femnist_dir}",
            f"hydra.run.dir={out}", f"simulation.ray_temp_dir={tmp_path / 'ray'}", "output.progress=false",
        ],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_accuracy"] >= 0.75, summary
