"""Sample-level DP end to end: metrics, the saved ledger, budgets, bad privacy input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.config import from_dict
from fedsim.privacy import PrivacyLedger, create_accountant
from fedsim.run import run
from fake_grid import run_local

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


def dp_config(tmp: Path, **dpsgd: object) -> dict:
    return {
        "seed": 1,
        "population": 30,
        "rounds": 3,
        "cohort": {"size": 8, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 60},
        "model": {"name": "mlp", "hidden_sizes": [16]},
        "privacy": {"dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, **dpsgd}},
        "simulation": {"num_workers": 1, "ray_temp_dir": str(tmp / "ray")},
        "output": {"progress": False},
    }


def test_dpsgd_run_reports_epsilon_and_saves_a_ledger_that_recomputes_it(tmp_path: Path) -> None:
    summary = run_local(from_dict(dp_config(tmp_path)), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eps_max = [r["sample_epsilon_max"] for r in rows]
    assert all(e > 0 for e in eps_max) and eps_max == sorted(eps_max)  # budgets only grow
    for r in rows:
        assert r["noise_multiplier"] == 1.0 and r["sample_delta"] == 1e-5
        assert 0.0 <= r["clip_fraction"] <= 1.0
        assert r["sample_epsilon_cohort_max"] <= r["sample_epsilon_max"]
    data = json.loads((tmp_path / "run" / "ledger.json").read_text())
    ledger = PrivacyLedger.from_json(data, create_accountant("rdp"))
    assert ledger.num_devices() == summary["privacy"]["sample_level"]["devices_accounted"]
    assert ledger.epsilon_stats()["max"] == pytest.approx(rows[-1]["sample_epsilon_max"], rel=1e-12)
    # Every device that trained is in the ledger with one event per participation.
    participations = sum(count for entries in data["devices"].values() for *_, count in entries)
    assert participations == sum(r["devices_trained"] for r in rows)


def test_same_seed_dpsgd_runs_are_bit_identical(tmp_path: Path) -> None:
    a = run_local(from_dict(dp_config(tmp_path)), tmp_path / "a")  # in-process grid, 1 worker; b: Ray, 2 workers
    b = run(from_dict(dp_config(tmp_path, grad_sample_mode="hooks") | {"simulation": {"num_workers": 2, "ray_temp_dir": str(tmp_path / "ray")}}), tmp_path / "b")
    assert a["model_sha256"] == b["model_sha256"]


def fedsim_cli(tmp: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "assets")}
    return subprocess.run(
        [
            sys.executable, "-m", "fedsim", "population=30", "cohort.size=8", "cohort.sampling=fixed",
            "dataset.size_max=60", "simulation.num_workers=1", f"simulation.ray_temp_dir={tmp / 'ray'}",
            f"hydra.run.dir={tmp / 'run'}", "output.progress=false", *overrides,
        ],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_budget_exhaustion_stops_with_one_line_after_saving_the_run(tmp_path: Path) -> None:
    proc = fedsim_cli(tmp_path, "rounds=40", "privacy=dpsgd", "privacy.dpsgd.target_epsilon=3", "privacy.dpsgd.noise_multiplier=1.0")
    line = one_line(proc)
    assert "privacy budget exhausted" in line and "epsilon=3" in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["rounds"] < 40
    assert summary["privacy"]["sample_level"]["epsilon_max"] <= 3.0
    assert (tmp_path / "run" / "ledger.json").exists()


def test_unreachable_target_epsilon_is_refused_before_training(tmp_path: Path) -> None:
    line = one_line(fedsim_cli(tmp_path, "privacy=dpsgd_target", "privacy.dpsgd.target_epsilon=0.0001"))
    assert "privacy.dpsgd.target_epsilon" in line and "cannot be reached" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_incompatible_model_is_refused_or_fixed_on_request(tmp_path: Path) -> None:
    line = one_line(fedsim_cli(tmp_path, "model=custom", "model.target=bn_model:make", "privacy=dpsgd", "rounds=1"))
    assert "BatchNorm" in line and "privacy.dpsgd.fix_model" in line
    fixed = fedsim_cli(tmp_path, "model=custom", "model.target=bn_model:make", "privacy=dpsgd", "privacy.dpsgd.fix_model=true", "rounds=1")
    assert fixed.returncode == 0, fixed.stderr[-3000:]


def user_config(tmp: Path, **over: object) -> dict:
    raw = dp_config(tmp)
    raw["cohort"] = {"size": 8, "sampling": "poisson"}
    raw["rounds"] = 4
    raw["privacy"]["dpfedavg"] = {"noise_multiplier": 0.8, "clip_norm": 0.5, "delta": 1e-5}
    raw.update(over)
    return raw


def reference_user_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    """dp-accounting used directly: Poisson-subsampled Gaussian, self-composed."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(delta)


@pytest.fixture(scope="module")
def both_levels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("both")
    run_local(from_dict(user_config(tmp)), tmp / "run")
    return tmp / "run"


def test_run_with_both_levels_reports_both_guarantees(both_levels: Path) -> None:
    rows = [json.loads(line) for line in (both_levels / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["sample_epsilon_max"] > 0 and r["clip_fraction"] is not None
        assert r["user_epsilon"] == pytest.approx(reference_user_epsilon(8 / 30, 0.8, r["round"], 1e-5), rel=1e-6)
        assert r["clip_norm"] == 0.5 and r["user_noise_std"] == pytest.approx(0.4)
    summary = json.loads((both_levels / "summary.json").read_text())
    assert set(summary["privacy"]) == {"sample_level", "user_level"}
    assert "add/remove" in summary["privacy"]["user_level"]["accounting"]


def test_failing_devices_neither_abort_rounds_nor_change_user_accounting(both_levels: Path, tmp_path: Path) -> None:
    raw = user_config(tmp_path)
    raw["faults"] = {"device_failure_rate": 0.1}
    run_local(from_dict(raw), tmp_path / "faulty")
    clean = [json.loads(line) for line in (both_levels / "metrics.jsonl").read_text().splitlines()]
    faulty = [json.loads(line) for line in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    assert len(faulty) == len(clean) == 4
    assert sum(r["devices_failed"] for r in faulty) > 0
    assert [r["user_epsilon"] for r in faulty] == [r["user_epsilon"] for r in clean]
    assert all(r["devices_trained"] + r["devices_failed"] == r["cohort_size"] for r in faulty)


def test_user_level_budget_stop_is_one_line_and_keeps_the_outputs(tmp_path: Path) -> None:
    proc = fedsim_cli(
        tmp_path, "rounds=50", "cohort.sampling=poisson", "privacy=dpfedavg",
        "privacy.dpfedavg.noise_multiplier=2.0", "privacy.dpfedavg.target_epsilon=2",
    )  # fmt: skip
    line = one_line(proc)
    assert "user-level privacy budget reached" in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 8  # epsilon(8 rounds) = 1.95 <= 2 < epsilon(9 rounds) = 2.05 at q = 8/30, z = 2
    assert summary["privacy"]["user_level"]["epsilon"] <= 2.0
