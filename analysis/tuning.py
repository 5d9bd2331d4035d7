"""Hyper-parameter sweeps run by Hydra's Optuna sweeper: trials ranked by accuracy at equal epsilon,
and what the sweep as a whole spends.

Threat model and assumptions of `sweep_epsilon`: the privacy unit is one device's examples
(sample-level DP-SGD, each trial's ledger.json); every trial trains on the same population
(same dataset config, population and seed, checked), and the objective the sweeper maximizes is
the central test accuracy, computed on the server's held-out test set, which is not device data.
Under these assumptions, the results of all N trials together are one composed mechanism per
device: its RDP is the sum of the trials' RDP (Mironov 2017, Prop. 1), converted to (eps, delta)
as each run's own accountant does. Choosing the best trial from them is post-processing, so
that epsilon bounds the selected model too. A single trial's epsilon does not: tuning on
private data leaks (Papernot & Steinke 2022, "Hyperparameter Tuning with Renyi Differential
Privacy", ICLR, Sec. 2). Their tighter bounds need a random number of trials (truncated negative
binomial or Poisson); Optuna runs a fixed n_trials, so they are not applied here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim.privacy import create_accountant
from fedsim.privacy.events import make_history

from analysis.privacy import ledger_histories
from analysis.runs import Run

HYDRA_YAML = Path(".hydra") / "hydra.yaml"
OPTUNA_RESULTS = "optimization_results.yaml"


@dataclass
class Trial:
    run: Run
    accuracy: float | None  # final test accuracy: the sweeper's objective
    target_epsilon: float | None  # privacy.dpsgd.target_epsilon (the epsilon trials are compared at)
    delta: float | None
    epsilon_max: float | None  # the largest per-device epsilon this trial spent
    noise_multiplier: float | None  # sigma, calibrated for the target
    params: dict[str, str]  # the tuned keys and this trial's values (from its overrides)
    rank: int | None = None  # 1 = best accuracy among the trials at the same (target epsilon, delta)


@dataclass
class Sweep:
    """One Optuna study's trials (the run directories of one Hydra multirun)."""

    directory: Path
    sampler: str
    direction: str
    n_trials: int | None  # as configured
    tuned: list[str]  # hydra.sweeper.params keys
    trials: list[Trial] = field(default_factory=list)
    epsilon_all_trials: float | None = None  # composed over every trial, max over devices (see module doc)
    epsilon_note: str = ""  # why epsilon_all_trials is None, or its delta


def _hydra_config(run: Run) -> dict[str, Any] | None:
    try:
        loaded = yaml.safe_load((run.path / HYDRA_YAML).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return loaded.get("hydra") if isinstance(loaded, dict) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def optuna_sweeps(runs: list[Run]) -> list[Sweep]:
    """The runs that are trials of an Optuna sweep (their .hydra/hydra.yaml names the sweeper),
    grouped by sweep directory, each group ranked by final accuracy within equal target epsilon."""
    sweeps: dict[Path, Sweep] = {}
    for run in runs:
        hydra = _hydra_config(run)
        sweeper = (hydra or {}).get("sweeper") or {}
        if "optuna" not in str(sweeper.get("_target_", "")).lower():
            continue
        directory = Path(str((hydra.get("sweep") or {}).get("dir") or run.path.parent))
        sweep = sweeps.get(directory)
        if sweep is None:
            sampler = str((sweeper.get("sampler") or {}).get("_target_", "?")).rsplit(".", 1)[-1]
            sweep = sweeps[directory] = Sweep(
                directory=directory, sampler=sampler, direction=str(sweeper.get("direction", "?")),
                n_trials=sweeper.get("n_trials"), tuned=list((sweeper.get("params") or {}).keys()),
            )  # fmt: skip
        sweep.trials.append(_trial(run, sweep.tuned))
    for sweep in sweeps.values():
        _rank(sweep.trials)
        sweep.epsilon_all_trials, sweep.epsilon_note = sweep_epsilon(sweep.trials)
    return list(sweeps.values())


def _trial(run: Run, tuned: list[str]) -> Trial:
    summary = run.summary or {}
    sample = (summary.get("privacy") or {}).get("sample_level") or {}
    dpsgd = ((run.config or {}).get("privacy") or {}).get("dpsgd") or {}
    given = dict(o.split("=", 1) for o in (run.overrides or []) if "=" in o)
    return Trial(
        run=run,
        accuracy=_number(summary.get("final_test_accuracy")),
        target_epsilon=_number(dpsgd.get("target_epsilon")),
        delta=_number(sample.get("delta", dpsgd.get("delta"))),
        epsilon_max=_number(sample.get("epsilon_max")),
        noise_multiplier=_number(sample.get("noise_multiplier")),
        params={key: given.get(key, "?") for key in tuned},
    )


def _rank(trials: list[Trial]) -> None:
    """Sort by (target epsilon, delta), then best accuracy first; unfinished trials last, unranked."""
    trials.sort(key=lambda t: (t.target_epsilon is None, t.target_epsilon or 0.0, t.delta or 0.0,
                               t.accuracy is None, -(t.accuracy or 0.0), t.run.name))  # fmt: skip
    group, rank = None, 0
    for trial in trials:
        if (trial.target_epsilon, trial.delta) != group:
            group, rank = (trial.target_epsilon, trial.delta), 0
        if trial.accuracy is not None:
            rank += 1
            trial.rank = rank


def sweep_epsilon(trials: list[Trial]) -> tuple[float | None, str]:
    """(epsilon of all trials composed, the largest over devices; a note), see the module doc."""
    data_keys = {
        repr([((t.run.config or {}).get(k)) for k in ("dataset", "population", "seed")]) for t in trials
    }  # fmt: skip
    if len(data_keys) != 1:
        return None, "not computed: the trials do not all train on the same population (dataset, population, seed)"
    ledgers = [t.run.ledger for t in trials]
    if any(ledger is None for ledger in ledgers):
        return None, "not computed: a trial has no ledger.json (sample-level DP-SGD ledgers are needed)"
    accountants = {ledger["accountant"] for ledger in ledgers}  # type: ignore[index]
    deltas = {float(ledger["delta"]) for ledger in ledgers}  # type: ignore[index]
    if len(accountants) != 1 or len(deltas) != 1:
        return None, "not computed: the trials use different accountants or deltas"
    combined: dict[int, list[Any]] = {}
    try:
        for ledger in ledgers:
            for device, history in ledger_histories(ledger).items():
                combined.setdefault(device, []).extend(history)
    except ValueError as err:
        return None, f"not computed: a ledger.json is unusable ({err})"
    (name,), (delta,) = accountants, deltas
    accountant = create_accountant(name)
    epsilons = [accountant.epsilon(make_history(pairs), delta) for pairs in combined.values()]
    return (max(epsilons) if epsilons else 0.0), f"{name} accountant, delta {delta:g}, over {len(trials)} trials"
