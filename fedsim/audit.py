"""Privacy auditing in the run itself: an empirical epsilon next to the accountant's.

An accountant proves an upper bound for the mechanism *as written*; a bug in the code that
runs (noise on the wrong tensor, a wrong sampling rate, no clipping) is invisible to it. The
audit measures the run that happened, with canaries, and reports what an attacker who knows
the canaries learns from what the server releases.

User level (`audit.canaries`, DP-FedAvg) -- Andrew, Kairouz, Oh, Oprea, McMahan,
Suriyakumar, "One-shot Empirical Privacy Estimation for Federated Learning" (ICLR 2024),
Alg. 2: K canary devices, each with a fixed random unit direction c_j (isotropic in parameter
space) as its update, scaled to the round's clip norm and clipped like any device, each
Poisson-sampled every round with the devices' rate q; K more directions are never inserted.
The statistic of a canary is the cosine between its direction and
  * the final model delta theta_T - theta_0 (threat model: only the final model is seen), and
  * each round's model delta, maximised over rounds (threat model: every round's release is
    seen -- what the accountant covers).
The estimate is the epsilon between Gaussians fitted to the inserted and to the unseen
canaries' statistics (`fedsim.audit_stats.gaussian_fit_epsilon`), with a bootstrap interval;
`epsilon_lower_bound` is the thresholding bound at the stated confidence.
Canaries join the released sum on the server, after the devices' sum (in the clear, or decoded
by SecAgg+) and before the central noise: under SecAgg+ they are not protocol participants.

Sample level (`audit.canary_examples`, DP-SGD) -- Steinke, Nasr, Jagielski, "Privacy
Auditing with One (1) Training Run" (NeurIPS 2023): m canary examples (random inputs with
random labels), each included with probability 1/2, spread over `audit.canary_devices`
canary devices. A canary device holds a copy of a real device's data plus its included
canaries, is Poisson-sampled with the devices' rate and trains DP-SGD on a worker like any
device; its update is seen by the server (which is what per-device DP-SGD protects: the
server sees every update) and scored, never aggregated. A canary's score is the cosine between
its negative loss gradient at the round's global model and its device's update (gradient
alignment), summed over the rounds its device trained. The bound (`fedsim.audit_stats.one_run_lower_bound`) is tested against the
largest epsilon any canary device reached under the run's accountant.

What the audit leaves alone: canaries are never in the cohort counts, losses, accuracy,
ledger or user-level accounting of the run; the run's epsilon is computed exactly as without
the audit. Canary directions, canary examples, inclusion bits and canary sampling come from
their own streams of the run seed in every randomness mode (test instruments: nothing here is
secret from anyone; `fedsim-audit` regenerates them). The config fingerprint of
fedsim.randomness covers audit.*: an audited run's cohorts and noise differ from its
unaudited twin's, so publishing both never cancels the noise.

Assumptions every output repeats: the canaries' statistics are treated as independent trials
(they share one training run); the user-level estimate is exact for the Gaussian mechanism as
the dimension grows (Andrew et al., Thm. 3.2) and is an estimate, not a bound; a lower bound
says the mechanism is *at least* that leaky, never that it is private.

`audit.break_mechanism=no_noise` (tests only: FEDSIM_ALLOW_BROKEN=1) draws the noise and does
not add it, while the accountant is told it was: the audit must catch it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.canaries import (  # the audit's streams and what canary devices hold (workers read it too)
    BOOTSTRAP,
    CANARY_SAMPLING,
    DEVICE_SAMPLING,
    DIRECTIONS,
    STREAM,
    USER_INCLUSION,
    audit_rng,
    canary_examples,
    canary_slices,
    reference_inputs,
)
from fedsim.config import FedsimConfig
from fedsim.errors import ConfigError, FedsimError

AUDIT_FILE = "audit.json"
_MAX_DIRECTION_VALUES = 50_000_000  # 2K x d float32 canary directions kept in memory (200 MB)
BROKEN_LABEL = "BROKEN MECHANISM (audit.break_mechanism={}): this run is NOT private; for tests only"
_ASSUMPTIONS = [
    "canaries' statistics are treated as independent trials, though they share one training run",
    "a lower bound says the mechanism leaks at least that much; it never says the mechanism is private",
]


def broken(cfg: FedsimConfig) -> str:
    """The mechanism broken on purpose ("none" in every real run; tests only)."""
    return cfg.audit.break_mechanism


def canary_sampled(cfg: FedsimConfig, stream: int, round_num: int, count: int) -> np.ndarray:
    """Which of `count` canaries take part in round `round_num`: Poisson with the devices' rate
    q = cohort.size / population (fixed-size cohorts: the same inclusion probability)."""
    q = cfg.cohort.size / cfg.population
    return audit_rng(cfg, stream, round_num).random(count) < q


# ----------------------------------------------------------------------------- user level


def canary_directions(cfg: FedsimConfig, num_params: int) -> torch.Tensor:
    """2K unit directions, isotropic in parameter space: rows 0..K-1 inserted, K..2K-1 never."""
    k = cfg.audit.canaries
    if 2 * k * num_params > _MAX_DIRECTION_VALUES:
        raise ConfigError(
            "audit.canaries",
            f"{k} canaries x 2 x {num_params:,} parameters exceed {_MAX_DIRECTION_VALUES:,} values in memory; "
            f"allowed: at most {_MAX_DIRECTION_VALUES // (2 * num_params)} for this model",
        )
    z = audit_rng(cfg, DIRECTIONS).standard_normal((2 * k, num_params))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return torch.from_numpy(z.astype(np.float32))


class UserLevelAudit:
    """Canary devices of DP-FedAvg and their cosine statistics (Andrew et al. 2024).

    2K candidate directions, each inserted as a canary device with probability 1/2 (so the
    same statistics also give Steinke et al.'s one-run lower bound); the others are the unseen
    canaries of Andrew et al.
    """

    def __init__(self, cfg: FedsimConfig, initial_params: torch.Tensor) -> None:
        self.cfg = cfg
        self.m = 2 * cfg.audit.canaries
        self.directions = canary_directions(cfg, len(initial_params))
        self.included = audit_rng(cfg, USER_INCLUSION).random(self.m) < 0.5
        self.initial = initial_params.detach().clone()
        self.previous = self.initial.clone()
        self.max_round_cosine = np.full(self.m, -np.inf)
        self.participations = np.zeros(self.m, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the statistics so far (directions and inclusion are redrawn
        from the config; the previous model is the checkpoint's)."""
        return {"initial": self.initial.clone(), "max_round_cosine": self.max_round_cosine.tolist(),
                "participations": self.participations.tolist()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], params: torch.Tensor) -> None:
        self.initial = state["initial"].clone()
        self.previous = params.detach().clone()
        self.max_round_cosine = np.asarray(state["max_round_cosine"], dtype=np.float64)
        self.participations = np.asarray(state["participations"], dtype=np.int64)
        if self.max_round_cosine.shape != (self.m,) or self.participations.shape != (self.m,) or self.initial.shape != self.previous.shape:
            raise FedsimError("resume: the checkpoint's user-level audit state does not match audit.canaries or the model")

    def canary_sum(self, round_num: int, clip_norm: float) -> tuple[torch.Tensor, int]:
        """The float64 sum of this round's sampled canaries' clipped updates, and their number."""
        from fedsim.privacy.user_level import clip_update

        # Every candidate draws its Poisson coin, inserted or not: sampling never depends on inclusion.
        sampled = np.flatnonzero(canary_sampled(self.cfg, CANARY_SAMPLING, round_num, self.m) & self.included)
        total = torch.zeros(self.directions.shape[1], dtype=torch.float64)
        for j in sampled:
            update, _, _ = clip_update(self.directions[j] * clip_norm, clip_norm)  # at C already: clipping is a no-op
            total += update.to(torch.float64)
        self.participations[sampled] += 1
        return total, len(sampled)

    def _cosines(self, delta: torch.Tensor) -> np.ndarray:
        norm = float(torch.linalg.vector_norm(delta.to(torch.float64)))
        if norm == 0.0:
            return np.zeros(self.m)
        return (self.directions @ delta.to(torch.float32)).to(torch.float64).numpy() / norm

    def after_step(self, params: torch.Tensor) -> None:
        """Fold this round's model delta into every canary's maximum cosine."""
        self.max_round_cosine = np.maximum(self.max_round_cosine, self._cosines(params - self.previous))
        self.previous = params.detach().clone()

    def statistics(self, params: torch.Tensor) -> dict[str, list]:
        """Per-canary statistics (what audit.json keeps, so `fedsim-audit` can re-score them)."""
        return {
            "final": self._cosines(params - self.initial).tolist(),
            "max_round": self.max_round_cosine.tolist(),
            "included": self.included.astype(int).tolist(),
            "participations": self.participations.tolist(),
        }

    def round_metrics(self, params: torch.Tensor, delta: float, confidence: float) -> dict[str, Any]:
        """The estimates and the bound after this round (no interval: it is per round)."""
        if not np.isfinite(self.max_round_cosine).all():
            return {}
        s = score_user_level(self.statistics(params), delta=delta, confidence=confidence, bootstrap=0, seed=0)
        return {
            "audit_user_epsilon_final_model": s["final_model"]["epsilon_estimate"],
            "audit_user_epsilon_all_rounds": s["all_rounds"]["epsilon_estimate"],
            "audit_user_epsilon_lower_bound": s["all_rounds"]["epsilon_lower_bound"],
        }


def score_user_level(stats: dict[str, list], *, delta: float, confidence: float, bootstrap: int, seed: int) -> dict[str, Any]:
    """Both threat models' estimates (with intervals) and one-run lower bounds from saved statistics."""
    from fedsim.audit_stats import gaussian_fit_epsilon, one_run_lower_bound  # scipy: loaded by audited runs only

    included = np.asarray(stats["included"], dtype=bool)
    out: dict[str, Any] = {}
    for name, key in (("final_model", "final"), ("all_rounds", "max_round")):
        values = np.asarray(stats[key], dtype=np.float64)
        fit = gaussian_fit_epsilon(
            values[included], values[~included], delta=delta, confidence=confidence, bootstrap=bootstrap,
            rng=np.random.default_rng([seed, STREAM, BOOTSTRAP, len(key)]),
        )  # fmt: skip
        bound = one_run_lower_bound(values, included, delta=delta, confidence=confidence)
        out[name] = fit.to_dict() | {"epsilon_lower_bound": bound.epsilon_lower_bound, "lower_bound": bound.to_dict()}
    return out


# ----------------------------------------------------------------------------- sample level


class SampleLevelAudit:
    """Canary devices of DP-SGD and their canaries' scores (Steinke et al. 2023)."""

    def __init__(self, cfg: FedsimConfig, dataset: Any, model: torch.nn.Module) -> None:
        from fedsim.privacy import PrivacyLedger, create_accountant

        dp = cfg.privacy.dpsgd
        assert dp is not None
        self.cfg, self.model = cfg, model
        self.x, self.y, self.included = canary_examples(cfg, dataset.input_shape, dataset.num_classes, reference_inputs(cfg, dataset))
        self.slices = canary_slices(cfg)
        self.scores = np.zeros(cfg.audit.canary_examples)
        # The canary devices' own ledger: never the run's (their epsilon is the claim under test).
        self.ledger = PrivacyLedger(create_accountant(dp.accountant), delta=dp.delta, target_epsilon=None)
        self.delta = dp.delta
        self.trained: set[int] = set()

    def sampled(self, round_num: int) -> list[int]:
        """The canary devices (by id) taking part in this round."""
        chosen = canary_sampled(self.cfg, DEVICE_SAMPLING, round_num, self.cfg.audit.canary_devices)
        return [self.cfg.population + int(i) for i in np.flatnonzero(chosen)]

    def _alignments(self, params: torch.Tensor, part: slice, update: torch.Tensor) -> np.ndarray:
        """cos(-grad of each canary's loss at the global model, the device's update): how far the
        update went down each canary's own loss (gradient alignment; higher: more likely in)."""
        from clients import load_flat_params

        load_flat_params(self.model, params)
        self.model.eval()
        norm_u = float(torch.linalg.vector_norm(update))
        out = np.zeros(part.stop - part.start)
        for i, j in enumerate(range(part.start, part.stop)):
            self.model.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.x[j : j + 1]), self.y[j : j + 1]).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in self.model.parameters() if p.grad is not None])
            denom = float(torch.linalg.vector_norm(grad)) * norm_u
            out[i] = float(-(grad @ update)) / denom if denom > 0 else 0.0
        self.model.zero_grad(set_to_none=True)
        return out

    def score(self, params: torch.Tensor, reports: list[Any]) -> None:
        """Add each canary's alignment with its device's update; record the devices' events."""
        from fedsim.privacy import DPSGDEvent

        for report in reports:
            for device_id, update, (z, q, steps) in zip(report.device_ids, report.updates, report.dp_events, strict=True):
                part = self.slices[device_id - self.cfg.population]
                aligned = self._alignments(params, part, torch.from_numpy(np.array(update)))
                # Centred per device: what the update does to all its canaries alike (the filler
                # data's pull) says nothing about any one canary's inclusion.
                self.scores[part] += aligned - aligned.mean()
                self.ledger.record(device_id, DPSGDEvent(noise_multiplier=z, sample_rate=q, steps=steps))
                self.trained.add(device_id)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the canaries' scores, the canary devices' ledger and who trained."""
        return {"scores": self.scores.tolist(), "ledger": self.ledger.to_json(), "trained": sorted(self.trained)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from fedsim.privacy import PrivacyLedger

        scores = np.asarray(state["scores"], dtype=np.float64)
        if scores.shape != self.scores.shape:
            raise FedsimError("resume: the checkpoint's sample-level audit state does not match audit.canary_examples")
        self.scores = scores
        try:
            self.ledger = PrivacyLedger.from_json(state["ledger"], self.ledger.accountant)
        except ValueError as err:
            raise FedsimError(f"resume: the checkpoint's canary-device ledger is unusable: {err}") from None
        self.trained = {int(d) for d in state["trained"]}

    def claimed_epsilon(self) -> float:
        """The largest epsilon a canary device reached (0 before any trained)."""
        return max((self.ledger.epsilon(d) for d in self.trained), default=0.0)

    def statistics(self) -> dict[str, Any]:
        return {
            "scores": self.scores.tolist(),
            "included": self.included.astype(int).tolist(),
            "device_epsilons": {str(d): self.ledger.epsilon(d) for d in sorted(self.trained)},
        }

    def round_metrics(self) -> dict[str, Any]:
        from fedsim.audit_stats import one_run_lower_bound

        bound = one_run_lower_bound(self.scores, self.included, delta=self.delta, confidence=self.cfg.audit.confidence)
        return {"audit_sample_epsilon_lower_bound": bound.epsilon_lower_bound, "audit_sample_epsilon_claimed": self.claimed_epsilon()}


def score_sample_level(stats: dict[str, Any], *, delta: float, confidence: float) -> dict[str, Any]:
    from fedsim.audit_stats import one_run_lower_bound

    bound = one_run_lower_bound(stats["scores"], [bool(b) for b in stats["included"]], delta=delta, confidence=confidence)
    return bound.to_dict()


# ----------------------------------------------------------------------------- the run's audit


class RunAudit:
    """What the round loop calls: `during_round` after the devices' sum is in, `after_round`
    after the server step; `summary` at the end (also writes audit.json)."""

    def __init__(self, cfg: FedsimConfig, dataset: Any, model: torch.nn.Module, initial_params: torch.Tensor) -> None:
        self.cfg = cfg
        self.user = UserLevelAudit(cfg, initial_params) if cfg.audit.canaries else None
        self.sample = SampleLevelAudit(cfg, dataset, model) if cfg.audit.canary_examples else None
        self.seconds = 0.0  # wall time spent in the audit (canary devices' training included)

    @classmethod
    def start(cls, cfg: FedsimConfig, setup: Any, params: torch.Tensor) -> RunAudit | None:
        """The run's audit (None without canaries and without a broken mechanism)."""
        if not (cfg.audit.canaries or cfg.audit.canary_examples or broken(cfg) != "none"):
            return None
        audit = cls(cfg, setup.dataset, setup.model, params)
        if setup.resume is not None:
            state = setup.resume.get("audit")
            if state is None and (cfg.audit.canaries or cfg.audit.canary_examples):
                raise FedsimError("resume: the checkpoint holds no audit state (written before audited runs were checkpointed)")
            if state is not None:
                audit.load_state_dict(state, params)
        return audit

    def state_dict(self) -> dict[str, Any]:
        """The audit's statistics so far, for a checkpoint (resumed runs score the same canaries)."""
        return {"user": self.user.state_dict() if self.user else None,
                "sample": self.sample.state_dict() if self.sample else None, "seconds": self.seconds}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], params: torch.Tensor) -> None:
        if (state.get("user") is None) != (self.user is None) or (state.get("sample") is None) != (self.sample is None):
            raise FedsimError("resume: the checkpoint's audit does not match audit.canaries / audit.canary_examples")
        if self.user:
            self.user.load_state_dict(state["user"], params)
        if self.sample:
            self.sample.load_state_dict(state["sample"])
        self.seconds = float(state.get("seconds", 0.0))

    def describe(self) -> str:
        parts = []
        if self.user:
            parts.append(
                f"user-level audit: {2 * self.cfg.audit.canaries} candidate canary devices, each inserted with probability "
                "1/2 (Andrew et al. 2024; lower bound: Steinke et al. 2023)"
            )
        if self.sample:
            parts.append(
                f"sample-level audit: {self.cfg.audit.canary_examples} canary examples on "
                f"{self.cfg.audit.canary_devices} canary devices (Steinke et al. 2023)"
            )
        if broken(self.cfg) != "none":
            parts.append(BROKEN_LABEL.format(broken(self.cfg)))
        return "; ".join(parts)

    def during_round(self, out: Any, round_num: int, params: torch.Tensor, user_dp: Any, grid: Any, workers: Any, config_json: str) -> torch.Tensor | None:
        """The round's released sum (`out.total`) with its canaries in it (user level), after
        the round's canary devices trained on the workers and were scored (sample level)."""
        start = time.perf_counter()
        if self.sample:
            ids = self.sample.sampled(round_num)
            if ids:
                self.sample.score(params, train_canary_devices(self.cfg, grid, workers, ids, params, round_num, config_json))
        total = out.total
        if self.user and total is not None and user_dp is not None:
            canaries, _ = self.user.canary_sum(round_num, user_dp.clip_norm)
            total = total + canaries
        self.seconds += time.perf_counter() - start
        return total

    def after_round(self, params: torch.Tensor, *, evaluated: bool, user_dp: Any) -> dict[str, Any]:
        """This round's audit metrics (rounds with an evaluation); every round folds its model
        delta into the canaries' statistics."""
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        if self.user:
            self.user.after_step(params)
            if evaluated and user_dp is not None:
                metrics |= self.user.round_metrics(params, user_dp.user.delta, self.cfg.audit.confidence)
        if self.sample and evaluated:
            metrics |= self.sample.round_metrics()
        if broken(self.cfg) != "none":
            metrics["audit_broken_mechanism"] = broken(self.cfg)
        self.seconds += time.perf_counter() - start
        return metrics

    def summary(self, run_dir: Path, params: torch.Tensor, user_dp: Any) -> dict[str, Any]:
        """summary.json's `audit` section; writes audit.json (what `fedsim-audit` re-scores)."""
        start = time.perf_counter()
        a = self.cfg.audit
        user_delta = user_dp.user.delta if user_dp is not None else None
        user_epsilon = user_dp.epsilon(user_dp.rounds_released) if user_dp is not None else None
        out: dict[str, Any] = {"broken_mechanism": broken(self.cfg), "confidence": a.confidence, "assumptions": list(_ASSUMPTIONS)}
        if broken(self.cfg) != "none":
            out["warning"] = BROKEN_LABEL.format(broken(self.cfg))
        saved: dict[str, Any] = {"config": self.cfg.to_dict()}
        if self.user and user_delta is not None:
            stats = self.user.statistics(params)
            saved["user_level"] = stats
            out["user_level"] = {
                "method": "one-shot empirical privacy estimation (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, ICLR 2024)",
                "candidate_canaries": 2 * a.canaries,
                "inserted_canaries": int(self.user.included.sum()),
                "canary_participations": int(self.user.participations.sum()),
                "threat_models": {
                    "all_rounds": "the attacker sees every round's model (what the accountant covers); statistic: max cosine over rounds",
                    "final_model": "the attacker sees the final model only; statistic: cosine with theta_T - theta_0",
                },
                **score_user_level(stats, delta=user_delta, confidence=a.confidence, bootstrap=a.bootstrap, seed=self.cfg.seed),
                "accountant_epsilon": user_epsilon,
                "delta": user_delta,
                "where": "canaries join the released sum on the server before the central noise (under SecAgg+: after decoding, "
                "not as protocol participants)",
                "note": "epsilon_estimate is Andrew et al.'s Gaussian fit: exact for the Gaussian mechanism as the dimension "
                "grows (their Thm. 3.2), an estimate, not a bound; epsilon_lower_bound is Steinke et al.'s one-run bound on "
                "the same canaries (each inserted with probability 1/2) at the stated confidence: compare it with the "
                "accountant",
            }
        if self.sample:
            stats = self.sample.statistics()
            saved["sample_level"] = stats
            out["sample_level"] = {
                "method": "privacy auditing with one training run (Steinke, Nasr, Jagielski, NeurIPS 2023), k+ = k guesses, "
                "k- = 0, Bonferroni over the k tried",
                "canary_examples": a.canary_examples,
                "canary_devices": a.canary_devices,
                "canary_devices_trained": len(self.sample.trained),
                "score": "cosine between each canary's negative loss gradient at the global model and its device's update "
                "(the server sees each update), summed over the rounds its device trained",
                **score_sample_level(stats, delta=self.sample.delta, confidence=a.confidence),
                "accountant_epsilon": self.sample.claimed_epsilon(),
                "accountant_epsilon_is": "the largest epsilon any canary device reached under the run's accountant",
                "delta": self.sample.delta,
            }
        (run_dir / AUDIT_FILE).write_text(json.dumps(_finite(saved)) + "\n")
        scoring = time.perf_counter() - start
        out["audit_time_s"] = self.seconds + scoring  # in the round loop, plus this end-of-run scoring
        out["audit_scoring_time_s"] = scoring
        return _finite(out)


def train_canary_devices(
    cfg: FedsimConfig, grid: Any, workers: Any, ids: list[int], params: torch.Tensor, round_num: int, config_json: str
) -> list[Any]:
    """Train the round's canary devices on the workers (plain messages, one by one, never
    aggregated) and return their reports."""
    from fedsim import wire  # Flower's records: loaded only when canary devices train
    from fedsim.placement import assign_devices
    from fedsim.reports import reject_non_finite
    from fedsim.transport import send_with_retries

    alive = workers.alive(grid)
    if not alive:
        return []
    plan = assign_devices(ids, alive, "multiplexed")
    jobs = [
        (node, wire.write_job(round_num=round_num, device_ids=part, config_json=config_json, global_params=params.numpy(),
                              clip_norm=None, groups=None))
        for node, part in plan
    ]  # fmt: skip
    sent = send_with_retries(grid, jobs, round_num=round_num, workers=workers, retries=cfg.simulation.retries)
    reports = []
    for reply in sent.replies:
        try:
            report = wire.read_report(reply.content, len(params))
        except wire.BadReply:
            continue
        if report.sums or len(report.dp_events) != len(report.device_ids):
            continue  # canary jobs ask for rows, and every canary device's event is scored
        reject_non_finite(report)
        reports.append(report)
    return reports


# ----------------------------------------------------------------------------- fedsim-audit


def rescore(run_dir: Path, *, confidence: float | None = None, delta: float | None = None, bootstrap: int | None = None) -> dict[str, Any]:
    """Re-score a saved run from its audit.json (and its final model, whose cosines are
    recomputed against the canary directions regenerated from the config)."""
    from fedsim.config import from_dict
    from fedsim.errors import DataError

    path = run_dir / AUDIT_FILE
    try:
        saved = json.loads(path.read_text())
        cfg = from_dict(saved["config"])
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (the run had no audit: audit.canaries / audit.canary_examples)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not an audit file ({err})") from None
    conf = confidence if confidence is not None else cfg.audit.confidence
    out: dict[str, Any] = {"run": str(run_dir), "confidence": conf, "broken_mechanism": cfg.audit.break_mechanism}
    if "user_level" in saved:
        stats = dict(saved["user_level"])
        model_file = run_dir / "model.pt"
        if model_file.exists():
            out["final_model_rechecked"] = _recheck_final(cfg, model_file, stats)
        d = delta if delta is not None else cfg.privacy.dpfedavg.delta  # type: ignore[union-attr]
        out["user_level"] = score_user_level(
            stats, delta=d, confidence=conf, bootstrap=cfg.audit.bootstrap if bootstrap is None else bootstrap, seed=cfg.seed
        ) | {"delta": d}
    if "sample_level" in saved:
        d = delta if delta is not None else cfg.privacy.dpsgd.delta  # type: ignore[union-attr]
        out["sample_level"] = score_sample_level(saved["sample_level"], delta=d, confidence=conf) | {
            "accountant_epsilon": max(saved["sample_level"]["device_epsilons"].values(), default=0.0),
            "delta": d,
        }
    return out


def _recheck_final(cfg: FedsimConfig, model_file: Path, stats: dict[str, Any]) -> bool:
    """Recompute the final-model cosines from model.pt and the initial model (rebuilt from the
    seed); replaces the saved ones. True when they agree with what the run saved."""
    from clients import flat_params
    from fedsim.data import load_dataset
    from fedsim.models import checked_model, model_for

    dataset = load_dataset(cfg.dataset, population=cfg.population, seed=cfg.seed)
    model = model_for(cfg, dataset)
    if cfg.privacy.dpsgd is not None:
        model = checked_model(model, fix=cfg.privacy.dpsgd.fix_model)
    user = UserLevelAudit(cfg, flat_params(model))
    final = torch.load(model_file, weights_only=False)["flat_params"]
    cosines = user.statistics(final)["final"]
    agree = bool(np.allclose(cosines, stats["final"], atol=1e-6))
    stats["final"] = cosines
    return agree


def main(argv: list[str] | None = None) -> int:
    """fedsim-audit RUN_DIR: re-score a saved run's audit (print JSON)."""
    from fedsim.errors import FedsimError

    parser = argparse.ArgumentParser(prog="fedsim-audit", description="Re-score the privacy audit of a saved fedsim run.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--confidence", type=float, default=None, help="of the intervals and bounds (default: the run's)")
    parser.add_argument("--delta", type=float, default=None, help="delta of the estimates (default: the run's)")
    parser.add_argument("--bootstrap", type=int, default=None, help="resamples for the user-level interval")
    args = parser.parse_args(argv)
    if args.confidence is not None and not 0 < args.confidence < 1:
        print("fedsim-audit: error: --confidence must be in (0, 1)", file=sys.stderr)
        return 2
    if args.delta is not None and not 0 < args.delta < 1:
        print("fedsim-audit: error: --delta must be in (0, 1)", file=sys.stderr)
        return 2
    try:
        result = rescore(args.run_dir, confidence=args.confidence, delta=args.delta, bootstrap=args.bootstrap)
    except FedsimError as err:
        print(f"fedsim-audit: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(_finite(result), indent=2))
    return 0


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
