"""Privacy numbers of saved runs: per-device epsilon from ledger.json, recomputed with any accountant and delta.

No re-training: a sample-level ledger holds every device's DP-SGD history, so epsilon at
another delta, or by another accountant, is `accountant.epsilon(history, delta)` per device.
The user-level epsilon after R rounds is recomputed from what each round actually used
(issue 14, defect 7): the rounds metrics.jsonl records, each with the noise multiplier that
round used (the realized z under distributed noise, else the round's z), rounds that released
nothing (`user_release: none`) left out, and the sampling and population from config.yaml.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.privacy import ACCOUNTANTS, Accountant, History, PrivacyLedger
from fedsim.privacy.skellam import ledger_accountant

from analysis.runs import Run


@dataclass
class DeviceEpsilons:
    """Per-device sample-level epsilon of one run's ledger, by `accountant` at `delta`."""

    accountant: str
    delta: float
    epsilons: dict[int, float]  # device id -> epsilon, devices that trained at least once
    target_epsilon: float | None  # the run's per-device budget, if any

    @property
    def max(self) -> float:
        return max(self.epsilons.values()) if self.epsilons else 0.0

    @property
    def median(self) -> float:
        """Median over devices (mean of the two middle ones when even), as PrivacyLedger.epsilon_stats."""
        return float(np.median(list(self.epsilons.values()))) if self.epsilons else 0.0


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; allowed: {', '.join(ACCOUNTANTS)}")
    return name


def check_delta(delta: Any) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def ledger_histories(data: Any) -> dict[int, History]:
    """Device histories of a ledger.json, validated by PrivacyLedger.from_json; ValueError if broken.

    from_json requires the ledger's own accountant and, with a budget, computes every
    device's next-participation check. Only the histories are wanted here, so it reads a
    copy without the budget (no accountant call at all), whatever accountant will be used.
    """
    if not isinstance(data, dict):
        raise ValueError(f"ledger must be a JSON object, got {type(data).__name__}")
    name = data.get("accountant")
    if name not in (*ACCOUNTANTS, "skellam"):
        raise ValueError(f"ledger accountant {name!r} is not one of {', '.join((*ACCOUNTANTS, 'skellam'))}")
    ledger = PrivacyLedger.from_json({**data, "target_epsilon": None}, ledger_accountant(data))
    return {int(key): ledger.history(int(key)) for key in data["devices"]}


def device_epsilons(
    data: dict[str, Any], accountant: Accountant | None = None, delta: float | None = None
) -> DeviceEpsilons:
    """Per-device epsilon of a ledger.json; by default with the ledger's own accountant and delta.

    One accountant call per distinct history (the accountant caches by (history, delta), so
    pass one accountant for many runs to share the work).
    """
    histories = ledger_histories(data)
    if data["accountant"] == "skellam" and accountant is not None and accountant.name != "skellam":
        # Distributed DP-SGD's events are Skellam mechanisms: a Gaussian accountant would not bound them.
        raise ValueError(f"a skellam ledger (distributed DP-SGD) is accounted by its own accountant, not {accountant.name}")
    if accountant is None or data["accountant"] == "skellam":
        interval = data.get("pld_discretization") if data["accountant"] == "pld" else None
        accountant = ledger_accountant(data, **({"value_discretization_interval": float(interval)} if interval else {}))
    delta = check_delta(data["delta"] if delta is None else delta)
    target = data.get("target_epsilon")
    return DeviceEpsilons(
        accountant=accountant.name,
        delta=delta,
        epsilons={d: accountant.epsilon(h, delta) for d, h in sorted(histories.items())},
        target_epsilon=float(target) if isinstance(target, (int, float)) and not isinstance(target, bool) else None,
    )


def released_nothing(run: Run) -> Callable[[dict], bool]:
    """Whether a metrics.jsonl row is of a round that released nothing: marked `user_release:
    none`, or, in a row without `user_release` (output.private_metrics_only drops it: whether a
    round released is a fact about the cohort), listed in summary.json's `rounds_not_released`."""
    user = (((run.summary or {}).get("privacy") or {}).get("user_level")) or {}
    listed = {r["round"] for r in user.get("rounds_not_released") or [] if isinstance(r, dict) and "round" in r}
    return lambda row: row.get("user_release", "none" if row.get("round") in listed else None) == "none"


def round_noise_multipliers(run: Run, rounds: int, planned: float) -> list[float]:
    """The z of every released round up to `rounds`, from metrics.jsonl.

    A round's z is `user_realized_noise_multiplier` (distributed noise: what the survivors
    added), else `user_noise_multiplier`, else `planned`. Rounds marked `user_release: none`
    (SecAgg+ aborted before unmasking, every worker failed), or listed as such in summary.json
    (`rounds_not_released`), released nothing; every other
    round that ran is a release, rows without user-level keys included (runs from before
    issue 14 wrote none for empty rounds, which released the noise alone): when in doubt, the
    larger epsilon.
    """
    zs = []
    skipped = released_nothing(run)
    for row in run.rounds:
        if not isinstance(row.get("round"), int) or row["round"] > rounds:
            continue
        if skipped(row):
            continue
        z = row.get("user_realized_noise_multiplier")
        if z is None:
            z = row.get("user_noise_multiplier", planned)
        zs.append(float(z))
    return zs


def user_level_epsilon(run: Run, rounds: int, accountant: str | None = None, delta: float | None = None) -> float:
    """User-level epsilon after `rounds` rounds of a DP-FedAvg run, from what each round used.

    Same accounting as the run (fedsim.privacy.dpfedavg): Poisson or fixed-size cohorts of
    cohort.size out of population devices (config.yaml), one event per released round with
    that round's noise multiplier (`round_noise_multipliers`; the planned z, as calibrated,
    where a row does not say). ValueError if the config lacks what is needed or the
    combination is not accountable (PLD with fixed-size cohorts).
    """
    from fedsim.privacy.user_level import UserLevelAccounting  # imports torch; only when needed

    cfg = run.config or {}
    user = (cfg.get("privacy") or {}).get("dpfedavg")
    if not isinstance(user, dict):
        raise ValueError("no privacy.dpfedavg in config.yaml")
    if user.get("noise") == "distributed" and (cfg.get("secagg") or {}).get("name") == "secaggplus":
        return distributed_user_level_epsilon(run, rounds, delta)
    summary_user = (((run.summary or {}).get("privacy") or {}).get("user_level")) or {}
    # With adaptive clipping the accounted z is the combined one the summary records.
    z = summary_user.get("noise_multiplier", user.get("noise_multiplier"))
    if z is None:
        raise ValueError("the noise multiplier is not recorded")
    try:
        accounting = UserLevelAccounting(
            accountant=accountant or user.get("accountant", "pld"),
            sampling=cfg["cohort"]["sampling"],
            population=cfg["population"],
            cohort_size=cfg["cohort"]["size"],
            noise_multiplier=z,
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"config.yaml lacks {err}") from None
    delta = check_delta(user.get("delta") if delta is None else delta)
    zs = round_noise_multipliers(run, rounds, float(z))
    # dp_accounting's RDP logs a warning per fractional order it drops at small z; the bound stays valid.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        eps = accounting.epsilon_of_rounds(zs, delta=delta)
    finally:
        logging.disable(previous)
    return eps if math.isfinite(eps) else math.inf


def distributed_user_level_epsilon(run: Run, rounds: int, delta: float | None = None) -> float:
    """User-level epsilon of a distributed-noise (Skellam under SecAgg+) run after `rounds` rounds.

    The mechanism is the run's own (fedsim.privacy.dpfedavg.UserLevelDP: Skellam RDP with the
    conditional-rounding sensitivity, Agarwal, Kairouz, Liu 2021), rebuilt from config.yaml,
    the model size in summary.json and the clip norm of every round that released (metrics.jsonl;
    which rounds released also from summary.json, since output.private_metrics_only drops
    `user_release` but keeps `clip_norm`, a covered metric);
    the accountant argument does not apply (the Skellam mechanism is accounted in RDP). ValueError
    when the run directory lacks any of these.
    """
    from fedsim.config import from_dict  # imports torch; only when needed
    from fedsim.errors import ConfigError
    from fedsim.privacy.dpfedavg import UserLevelDP

    summary = run.summary or {}
    user_summary = ((summary.get("privacy") or {}).get("user_level")) or {}
    z, num_params = user_summary.get("noise_multiplier"), summary.get("num_params")
    if z is None or num_params is None:
        raise ValueError("summary.json lacks the noise multiplier or num_params of a distributed-noise run")
    raw = json.loads(json.dumps(run.config))  # a copy: the calibrated z goes in, no recalibration
    raw["privacy"]["dpfedavg"]["noise_multiplier"] = z
    if delta is not None:
        raw["privacy"]["dpfedavg"]["delta"] = check_delta(delta)
    try:
        mechanism = UserLevelDP(from_dict(raw), num_params=int(num_params))
    except (ConfigError, KeyError, TypeError) as err:
        raise ValueError(f"config.yaml does not rebuild the run's mechanism ({err})") from None
    clips = []
    skipped = released_nothing(run)
    for row in run.rounds:
        if not isinstance(row.get("round"), int) or row["round"] > rounds or skipped(row):
            continue
        if not isinstance(row.get("clip_norm"), (int, float)):
            raise ValueError(f"round {row['round']} of metrics.jsonl has no clip_norm")
        clips.append(float(row["clip_norm"]))
    mechanism.released_clips = clips
    return mechanism.epsilon(len(clips))
