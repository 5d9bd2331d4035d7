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
    summary = run(from_dict(dp_config(tmp_path)), tmp_path / "run")
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
    a = run(from_dict(dp_config(tmp_path)), tmp_path / "a")
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
