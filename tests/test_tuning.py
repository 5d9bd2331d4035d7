"""Tuning under a privacy budget: an offline Optuna sweep of experiment=tune_dpsgd, its trials
ranked by accuracy at equal epsilon in the report, and the whole sweep's epsilon checked
against an independent RDP composition of the trials' ledgers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants.analysis import rdp as opacus_rdp

from analysis import build_report
from analysis.privacy import check_delta

REPO = Path(__file__).resolve().parent.parent
TRIALS = 2  # the sweep test's trials (each starts Ray, ~25 s): two suffice to rank and to compose
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders


# Hydra finds its plugins under the hydra_plugins namespace: without the sweeper's directory
# there, fedsim sees what a user without the `tune` extra sees.
WITHOUT_OPTUNA = """
import os, runpy, sys
import hydra_plugins
hydra_plugins.__path__ = [p for p in hydra_plugins.__path__ if not os.path.isdir(os.path.join(p, "hydra_optuna_sweeper"))]
sys.argv = ["fedsim", *sys.argv[1:]]
runpy.run_module("fedsim", run_name="__main__")
"""


def test_tuning_without_the_optuna_sweeper_says_what_to_install_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_OPTUNA, "-m", "experiment=tune_dpsgd", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "Could not find 'hydra/sweeper/optuna'" in lines[0] and "pip install 'fedsim[tune]'" in lines[0]
    assert not (tmp_path / "sweep").exists()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[tune]'")
    tmp = tmp_path_factory.mktemp("tune")
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "-m", "experiment=tune_dpsgd", f"hydra.sweeper.n_trials={TRIALS}",
         "population=24", "rounds=1", "cohort.size=6", "dataset.size_max=60", "simulation.num_workers=1",
         "output.progress=false", f"simulation.ray_temp_dir={tmp / 'ray'}", f"hydra.sweep.dir={tmp / 'sweep'}"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "FLWR_LOG_LEVEL": "WARNING", "FLWR_TELEMETRY_ENABLED": "0"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The sweep ends by saying where its runs are and how to compare them.
    assert proc.stderr.splitlines()[-1] == f"[fedsim] sweep: {TRIALS} runs in {tmp / 'sweep'}; compare them with: fedsim-report {tmp / 'sweep'}"
    return tmp / "sweep"


@pytest.mark.ray
def test_an_optuna_sweep_maximizes_the_accuracy_fedsim_returns(sweep: Path) -> None:
    accuracies = [json.loads((sweep / str(i) / "summary.json").read_text())["final_test_accuracy"] for i in range(TRIALS)]
    results = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {max(accuracies)}" in results  # the sweeper read each trial's accuracy
    overrides = [(sweep / str(i) / ".hydra" / "overrides.yaml").read_text() for i in range(TRIALS)]
    assert len(set(overrides)) == TRIALS and all("algorithm.lr=" in o and "privacy.dpsgd.max_grad_norm=" in o for o in overrides)


@pytest.mark.ray
def test_report_ranks_the_trials_by_accuracy_at_equal_epsilon(sweep: Path) -> None:
    report = build_report(sweep)
    (tuning,) = report.tuning
    assert [t.rank for t in tuning.trials] == list(range(1, TRIALS + 1))
    accuracies = [t.accuracy for t in tuning.trials]
    assert accuracies == sorted(accuracies, reverse=True)
    assert {t.target_epsilon for t in tuning.trials} == {8.0}
    assert all(0 < t.epsilon_max <= 8.0 for t in tuning.trials)  # type: ignore[operator]
    assert tuning.tuned == ["algorithm.lr", "privacy.dpsgd.max_grad_norm", "algorithm.batch_size", "algorithm.local_epochs"]
    text = report.report_md.read_text()
    assert "## Tuning: trials ranked by accuracy at equal epsilon" in text
    assert f"{TRIALS} trials read ({TRIALS} configured)" in text and "Papernot & Steinke" in text
    assert f"| 1 | {tuning.trials[0].run.name} |" in text


@pytest.mark.ray
def test_the_whole_sweeps_epsilon_composes_every_trial_of_every_device(sweep: Path) -> None:
    (tuning,) = build_report(sweep).tuning
    # Independently of fedsim's accountants: Opacus's RDP of every (sigma, q, steps x count) a
    # device spent in any trial, summed over trials (Mironov 2017, Prop. 1), at the ledgers' delta.
    spent: dict[str, list[list[float]]] = {}
    delta = None
    for i in range(TRIALS):
        ledger = json.loads((sweep / str(i) / "ledger.json").read_text())
        delta = check_delta(ledger["delta"])
        for device, entries in ledger["devices"].items():
            spent.setdefault(device, []).extend(entries)
    assert delta is not None
    epsilons = []
    for entries in spent.values():
        rdp = sum(opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=int(steps * count), orders=ALPHAS)
                  for z, q, steps, count in entries)  # fmt: skip
        epsilons.append(opacus_rdp.get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)[0])
    assert tuning.epsilon_all_trials == pytest.approx(max(epsilons), rel=1e-9)
    assert tuning.epsilon_all_trials >= max(t.epsilon_max for t in tuning.trials)  # type: ignore[type-var]
