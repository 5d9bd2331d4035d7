"""Sample-level DP on the server side of a run: calibration, budgets, the ledger, the metrics.

Devices run DP-SGD (clients/dp.py) and report the event they spent; the server records it
in the ledger *before* the round's update is applied, and accounts every device's epsilon
itself (devices never compute epsilon). A device's event is a function of its size n:
with batch size B, Opacus's Poisson sampling uses rate q = 1 / ceil(n / B) for
local_epochs * ceil(n / B) steps, so the server knows each device's next event before
sampling it, and can leave out a device whose next participation would exceed its budget.
n is the device's public count (the dataset's count, `Worker.public_examples`), never the size
of the data the device trains on: a data set with one example more or less runs the same q
and steps and reports the same count, as the add/remove-one analysis of each event assumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from fedsim.config import FedsimConfig
from fedsim.data import FederatedDataset
from fedsim.errors import ConfigError, FedsimError
from fedsim.privacy.accountants import Accountant, choose_pld_interval, create_accountant
from fedsim.privacy.distributed_sgd import SAMPLE_RATE, sensitivity
from fedsim.privacy.skellam import SkellamSGDAccountant
from fedsim.secure_grid import distributed_dpsgd, example_grid
from clients.params import num_params
from fedsim.privacy.calibration import calibrate_noise_multiplier
from clients import plan
from fedsim import checkpoint
from fedsim.privacy.events import DPSGDEvent
from fedsim.privacy.ledger import PrivacyLedger
from fedsim.mechanisms import Mechanism
from fedsim.models import checked_model
from fedsim.reports import DeviceReport
from fedsim.sampling import cyclic_period

LEDGER_FILE = "ledger.json"
log = logging.getLogger("fedsim")


def dpsgd_event(*, num_examples: int, batch_size: int, local_epochs: int, noise_multiplier: float) -> DPSGDEvent:
    """The event of one participation of a device with `num_examples` (Opacus DPDataLoader semantics)."""
    ev = plan.dpsgd_event(num_examples, batch_size=batch_size, local_epochs=local_epochs, noise_multiplier=noise_multiplier)
    return DPSGDEvent(noise_multiplier=ev.noise_multiplier, sample_rate=ev.sample_rate, steps=ev.steps)


def _median_low(counts: dict[int, float]) -> int:
    """statistics.median_low of the multiset {n: count} (counts may be expected, non-integer)."""
    rank = (round(sum(counts.values())) - 1) // 2  # 0-based rank of the low median
    seen = 0.0
    for n in sorted(counts):
        seen += counts[n]
        if seen > rank:
            return n
    return max(counts)


class SampleLevelDP(Mechanism):
    """The run's sample-level DP state: one ledger, one accountant, one budget per device."""

    def __init__(self, cfg: FedsimConfig, dataset: FederatedDataset, *, num_params: int | None = None) -> None:
        """`num_params`: the model's size, needed with distributed noise (the rounding bound depends on it)."""
        dp = cfg.privacy.dpsgd
        assert dp is not None
        self.cfg, self.dataset, self.num_params = cfg, dataset, num_params or 0
        self.delta, self.target = dp.delta, dp.target_epsilon
        # Distributed noise (fedsim.privacy.distributed_sgd): one Skellam-noised gradient sum per
        # device and round under SecAgg+, accounted by its own RDP bound in grid units.
        self.distributed = distributed_dpsgd(cfg)
        self.sensitivity: tuple[float, float] | None = None
        if self.distributed:
            if num_params is None:
                raise ValueError("distributed DP-SGD needs the model's size (num_params)")
            self.sensitivity = sensitivity(cfg, num_params)
            self.accountant: Accountant = SkellamSGDAccountant(l2=self.sensitivity[0], l1=self.sensitivity[1])
        else:
            self.accountant = create_accountant(dp.accountant)
        # {examples: devices}; expected counts for a generated population (no pass over 10^9 devices).
        sizes = dataset.size_counts()
        self.calibration: dict[str, Any] | None = None
        if dp.noise_multiplier is None:
            dp.noise_multiplier = self._calibrate(sizes)
        self.noise_multiplier = dp.noise_multiplier
        self.pld_intervals_tried: dict[float, float] = {}
        if dp.accountant == "pld" and self.noise_multiplier > 0:
            # The coarsest discretisation within 1% of the 1e-4 epsilon, for the planned history
            # of the median device (as calibration assumes it); every interval is an upper bound.
            planned = ((self.event_of_size(_median_low(sizes)), self._planned_participations()),)
            interval, self.pld_intervals_tried = choose_pld_interval(
                lambda i: create_accountant("pld", value_discretization_interval=i).epsilon(planned, self.delta)
            )
            self.accountant = create_accountant("pld", value_discretization_interval=interval)
        self.ledger = PrivacyLedger(self.accountant, delta=self.delta, target_epsilon=self.target)
        # Devices that cannot take part even once (e.g. a device smaller than one batch has
        # q = 1: no amplification by sampling) are counted once, here.
        self.never_eligible = 0
        if self.target is not None:
            once = {n: self.accountant.epsilon(((self.event_of_size(n), 1),), self.delta) for n in sizes}
            self.never_eligible = round(sum(c for n, c in sizes.items() if once[n] > self.target))
        self.last_clip_fraction: float | None = None

    def event_of_size(self, n: int) -> DPSGDEvent:
        a = self.cfg.algorithm
        z = self.cfg.privacy.dpsgd.noise_multiplier  # type: ignore[union-attr]
        if self.distributed:  # one step per round over all the device's examples
            return DPSGDEvent(noise_multiplier=z, sample_rate=SAMPLE_RATE, steps=1)
        return dpsgd_event(num_examples=n, batch_size=a.batch_size, local_epochs=a.local_epochs, noise_multiplier=z)

    def _planned_participations(self) -> int:
        dp = self.cfg.privacy.dpsgd
        assert dp is not None
        if self.cfg.cohort.sampling == "cyclic":  # each device once per cycle
            return dp.assumed_participations or math.ceil(self.cfg.rounds / cyclic_period(self.cfg.population, self.cfg.cohort.size))
        return dp.assumed_participations or math.ceil(self.cfg.rounds * self.cfg.cohort.size / self.cfg.population)

    def _calibrate(self, sizes: dict[int, float]) -> float:
        """Solve sigma for target_epsilon at the median device size and the expected participations."""
        dp, a = self.cfg.privacy.dpsgd, self.cfg.algorithm
        assert dp is not None and dp.target_epsilon is not None
        median_n = _median_low(sizes)
        batches = math.ceil(median_n / a.batch_size)
        q, steps = (SAMPLE_RATE, 1) if self.distributed else (1.0 / batches, a.local_epochs * batches)
        participations = self._planned_participations()
        try:
            z = calibrate_noise_multiplier(
                target_epsilon=dp.target_epsilon,
                delta=dp.delta,
                sample_rate=q,
                steps_per_participation=steps,
                participations=participations,
                accountant=self.accountant,
            )
        except ValueError as err:
            raise ConfigError("privacy.dpsgd.target_epsilon", str(err)) from None
        self.calibration = {
            "noise_multiplier": z,
            "target_epsilon": dp.target_epsilon,
            "delta": dp.delta,
            "accountant": self.accountant.name,
            "assumed_participations": participations,
            "assumed_device_examples": median_n,
            "assumed_sample_rate": q,
            "assumed_steps_per_participation": steps,
        }
        return z

    def describe(self) -> str:
        dp = self.cfg.privacy.dpsgd
        assert dp is not None
        text = (
            f"DP-SGD on every device: noise_multiplier={self.noise_multiplier:.4g}, max_grad_norm={dp.max_grad_norm}, "
            f"accountant={self.accountant.name}, delta={dp.delta:g}"
        )
        if self.distributed:
            text += (f"; distributed noise under SecAgg+: one gradient sum per device and round, Skellam variance "
                     f"(z D2)^2 per released sum, D2={self.sensitivity[0]:.6g} grid steps per example")  # type: ignore[index]
        if self.calibration:
            c = self.calibration
            text += (
                f"; sigma calibrated for epsilon={c['target_epsilon']:g} assuming {c['assumed_participations']} "
                f"participations x {c['assumed_steps_per_participation']} steps at sample rate "
                f"{c['assumed_sample_rate']:.4g} (median device: {c['assumed_device_examples']} examples)"
            )
        if self.target is not None:
            text += f"; budget epsilon={self.target:g} per device ({self.never_eligible} devices too small to join)"
        return text

    def admit(self, cohort: list[int]) -> list[int]:
        """The sampled devices whose next participation keeps them within budget."""
        if self.target is None:
            return cohort
        return [d for d in cohort if self.ledger.can_participate(d, self.event_of_size(self.dataset.num_examples(d)))]

    def eligible(self) -> int:
        return self.dataset.num_devices - self.never_eligible - self.ledger.exhausted_count()

    def check_enough_left(self, cohort_size: int) -> None:
        left = self.eligible()
        if self.target is not None and left < cohort_size:
            raise FedsimError(
                f"privacy budget exhausted: only {left} of {self.dataset.num_devices} devices can train again without "
                f"exceeding epsilon={self.target:g} (delta={self.delta:g}); cohort.size is {cohort_size}"
            )

    def account(self, reports: list[DeviceReport]) -> dict[str, Any]:
        """Record every trained device's event in the ledger; return the round's privacy metrics."""
        trained: list[int] = []
        clip_fractions: list[float] = []
        for report in reports:
            for device_id, (z, q, steps) in zip(report.device_ids, report.dp_events, strict=True):
                self.ledger.record(device_id, DPSGDEvent(noise_multiplier=z, sample_rate=q, steps=steps))
                trained.append(device_id)
            clip_fractions += [c for c in report.clip_fractions if not math.isnan(c)]  # NaN: no example drawn
        return self.round_metrics(trained, clip_fractions)

    def round_metrics(self, trained: list[int], clip_fractions: list[float]) -> dict[str, Any]:
        everyone = self.ledger.epsilon_stats()
        cohort = self.ledger.epsilon_stats(trained) if trained else {"max": None, "median": None}
        return {
            "sample_epsilon_max": everyone["max"],
            "sample_epsilon_median": everyone["median"],
            "sample_epsilon_cohort_max": cohort["max"],
            "sample_epsilon_cohort_median": cohort["median"],
            "sample_delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_fraction": sum(clip_fractions) / len(clip_fractions) if clip_fractions else None,
            "devices_exhausted": self.ledger.exhausted_count() + self.never_eligible,
        }

    def summary(self) -> dict[str, Any]:
        stats = self.ledger.epsilon_stats() if self.ledger.num_devices() else {"max": 0.0, "median": 0.0}
        return {
            "sample_level": {
                "mechanism": (
                    "distributed DP-SGD: each device's clipped, per-example-rounded gradient sum over all its examples "
                    "with a 1/h share of Skellam noise under SecAgg+ (Agarwal, Kairouz, Liu 2021; Truex et al. 2019), "
                    "one step per device and round" if self.distributed else
                    "DP-SGD (Abadi et al. 2016) per device: Opacus one by one, torch.func in vectorized groups"
                ),
                "distributed_noise": self._distributed_summary(),
                "assumes": self.assumptions(),
                "accountant": self.accountant.name,
                "pld_discretization": getattr(self.accountant, "value_discretization_interval", None),
                "pld_planned_epsilon_by_discretization": {f"{k:g}": v for k, v in self.pld_intervals_tried.items()} or None,
                "delta": self.delta,
                "noise_multiplier": self.noise_multiplier,
                "target_epsilon": self.target,
                "epsilon_max": stats["max"],
                "epsilon_median": stats["median"],
                "devices_accounted": self.ledger.num_devices(),
                "calibration": self.calibration,
            }
        }

    def _distributed_summary(self) -> dict[str, Any] | None:
        if not self.distributed:
            return None
        from fedsim.privacy.distributed_sgd import encoding

        l2, l1 = self.sensitivity  # type: ignore[misc]
        grid = example_grid(self.cfg, self.num_params)
        return {
            "example_norm_grid_steps": grid.example_norm,
            "example_l2_sensitivity": l2,
            "example_l1_sensitivity": l1,
            "grid_step": grid.step,
            "aggregate_skellam_variance": encoding(self.cfg, self.num_params).update_variance,
            "noise_share": "each device adds 1/h of the variance, h = max(t, n - D) - C the fewest honest inputs a "
            "released sum can hold (metrics: secagg_noise_honest_inputs)",
        }

    def assumptions(self) -> dict[str, str]:
        """What every per-device epsilon rests on, each stated (summary.json `assumes`)."""
        from fedsim import randomness

        mode, reason = randomness.resolve(self.cfg)
        if self.distributed:
            from fedsim.privacy.dpfedavg import SIMULATION_ONLY

            out = {
                "accountant": "Skellam RDP (Agarwal, Kairouz, Liu 2021, Cor. 3.6) of each participation, composed over the "
                "device's ledger history (computed by the server)",
                "adjacency": "add/remove-one training example of one device (not a whole device)" + _overlap_note(self.cfg),
                "sampling": "none: each round a device sends one sum over all its examples, normalized by the public "
                "batch_size, so no sampling rate depends on its size (its public example count, the server's, not its "
                "data's, is summed in the clear)",
                "rounding": "each example's clipped, scaled gradient is rounded alone by conditional randomized rounding "
                "within the L2 bound D2 (Kairouz, Liu, Steinke 2021; after 200 failed draws, probability < 1e-43, it is "
                "scaled into the bound and rounded toward zero): removing an example removes one rounded vector of L2 "
                "norm <= D2, L1 norm <= D2 min(sqrt(d), D2); a row with NaN or inf counts as zero, so no example can "
                "make its device drop",
                "threat_model": "the devices run the mechanism faithfully; the server and anyone who sees the released models "
                + ("see only SecAgg+ sums of the devices' updates and example counts (no loss or clipped fraction is sent). "
                   if not self.cfg.secagg.simulation_shortcut else
                   "see only sums of the devices' updates and example counts (no loss or clipped fraction is sent): the "
                   "released models see the cohort's sum, but this run's server sees each worker's unmasked sum (SecAgg+ "
                   "simulation shortcut, see simulation_shortcut), so the guarantee below holds against it only in the "
                   "faithful protocol. ")
                + "The epsilon holds against the server only under secagg's threat model: at most C devices of a cohort "
                "collude with it and strip their noise shares, and it follows the abort rule (semi_honest) or the devices "
                "enforce it and check the round's grid, rounding bound and noise share against the run config (active); "
                "each device adds 1/h of the variance the accountant counts, h = max(t, n - D) - C. The run config, "
                "including the noise multiplier calibrated before the run, is public and fixed before the run. A "
                "device's update is not private on its own. The server also receives each worker's training time and "
                "peak memory and any failure's reason, outside the epsilon (with one device per worker, e.g. the "
                "deployment engine, its timing follows its data size)",
                "randomness": f"{mode} ({reason})"
                + ("; " + SIMULATION_ONLY if mode == "reproducible" else ""),
            }
            if self.cfg.secagg.simulation_shortcut:
                out["simulation_shortcut"] = (
                    "SIMULATION SHORTCUT (secagg.simulation_shortcut=true): workers send the unmasked sum of their "
                    "devices' inputs, so this run's server could read each worker's partial sum (a single device's "
                    "update, with 1/h of the noise, where a worker holds one); the epsilon describes the faithful protocol"
                )
            return out
        return {
            "accountant": f"{self.accountant.name} on each device's ledger history (computed by the server)",
            "adjacency": "add/remove-one training example of one device (not a whole device: see user_level for that)"
            + _overlap_note(self.cfg),
            "sampling": "each DP-SGD step samples a device's examples by Poisson with q = 1 / ceil(n / batch_size) for "
            "local_epochs * ceil(n / batch_size) steps, empty batches included as noise-only steps, where n is the "
            "device's public example count (the count the server holds before the run), never the size of the data "
            "it trains on: one example more or less changes neither q, the steps, the normalization nor the count it "
            "reports (an audit's canary device: its filler's count plus all its canary slots)",
            "threat_model": "the device runs DP-SGD faithfully; anyone who sees its update (the server, the released "
            "models) learns no more about one of its examples than epsilon allows from it. "
            + (
                "The devices keep their training losses and clipped fractions (output.private_metrics_only): of "
                "each device the server receives the noised update, its event and its public example count; it also "
                "receives each worker's training time and peak memory and any failure's reason, diagnostics outside "
                "the epsilon (with one device per worker, its timing follows its data size)"
                if self.cfg.output.private_metrics_only
                else "The server also receives, without noise, each device's mean training loss and clipped fraction "
                "(under SecAgg+ their cohort sums): diagnostics outside the epsilon (diagnostics_outside_guarantee), so "
                "against a server that reads them the epsilon does not hold; output.private_metrics_only=true keeps "
                "them on the devices"
            ),
            "randomness": f"{mode} ({reason})"
            + ("; the noise is a function of the seed and the config, so whoever knows both can remove it" if mode == "reproducible" else ""),
        }

    # The round loop's interface (fedsim.mechanisms.Mechanism).
    checkpoint_key = "sample_ledger"

    @classmethod
    def enabled(cls, cfg: FedsimConfig) -> bool:
        return cfg.privacy.dpsgd is not None

    @classmethod
    def create(cls, cfg: FedsimConfig, dataset: FederatedDataset, model: torch.nn.Module) -> tuple[SampleLevelDP, torch.nn.Module]:
        # The workers apply the same check (and fix), so their flat parameters match the server's.
        model = checked_model(model, fix=cfg.privacy.dpsgd.fix_model)
        mechanism = cls(cfg, dataset, num_params=num_params(model))
        if mechanism.distributed:
            from fedsim import randomness
            from fedsim.privacy.dpfedavg import SIMULATION_ONLY

            if randomness.mode(cfg) != "secure":
                log.warning(SIMULATION_ONLY)  # said even without progress lines: it voids the distributed guarantee
        return mechanism, model  # may calibrate sigma (into cfg: prepare's working copy)

    def before_round(self, round_num: int) -> None:
        self.check_enough_left(self.cfg.cohort.size)

    def after_devices(self, round_num: int, reports: list[DeviceReport], run_dir: Path) -> dict[str, Any]:
        metrics = self.account(reports)
        if self.cfg.checkpoint.every:  # the spent privacy is on disk before the update that spent it
            with checkpoint.writing("privacy ledger", run_dir / LEDGER_FILE):
                self.save(run_dir)
        return metrics

    def finish(self, run_dir: Path) -> None:
        with checkpoint.writing("privacy ledger", run_dir / LEDGER_FILE):
            self.save(run_dir)

    def state_dict(self) -> dict[str, Any]:
        return self.ledger.to_json()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_ledger(state)

    def resumed(self, run_dir: Path, round_num: int, lost: list[dict]) -> None:
        """Secure randomness: the rounds after the checkpoint run again with fresh noise, while
        their first releases were already seen, so the privacy they spent stays counted: the
        ledger.json those rounds wrote (before their updates, every round when checkpointing) is
        kept when it holds more participations than the checkpoint's. Reproducible randomness
        repeats those rounds bit for bit (the same releases), so the checkpoint's ledger is exact."""
        from fedsim import randomness

        path = run_dir / LEDGER_FILE
        if randomness.mode(self.cfg) != "secure":
            return
        if not path.exists():
            log.warning("resume with secure randomness: no %s in %s; rounds after the checkpoint of round %d are not "
                        "counted twice", LEDGER_FILE, run_dir, round_num)
            return
        try:
            data = json.loads(path.read_text())
            newer = PrivacyLedger.from_json(data, self.accountant)
        except (OSError, ValueError) as err:  # (json.JSONDecodeError is a ValueError)
            raise FedsimError(f"resume: {path} is unreadable ({err}); the rounds after the checkpoint of round "
                              f"{round_num} ran with secure randomness and must stay counted") from None  # fmt: skip
        recorded = data.get("skellam_sensitivity")
        same = (newer.delta, newer.target_epsilon) == (self.ledger.delta, self.ledger.target_epsilon) and (
            recorded is None or self.sensitivity is None or list(recorded) == list(self.sensitivity))
        old, new = self.ledger.participations(), newer.participations()
        if not same or any(new.get(d, 0) < c for d, c in old.items()) or sum(new.values()) <= sum(old.values()):
            return  # not a later state of this run's ledger (another run's file, or nothing ran after the checkpoint)
        log.warning("resume with secure randomness: %d participations of rounds after the checkpoint of round %d stay "
                    "counted (those rounds run again with fresh noise)", sum(new.values()) - sum(old.values()), round_num)
        self.ledger = newer

    def save(self, run_dir: Path) -> None:
        """Write ledger.json atomically (a crash mid-write leaves the previous ledger)."""
        tmp = run_dir / f".{LEDGER_FILE}.tmp"
        tmp.write_text(json.dumps(self.ledger.to_json()) + "\n")
        os.replace(tmp, run_dir / LEDGER_FILE)

    def load_ledger(self, data: dict[str, Any]) -> None:
        """Continue from a checkpoint's ledger (every device's history so far)."""
        try:
            self.ledger = PrivacyLedger.from_json(data, self.accountant)
        except ValueError as err:
            raise FedsimError(f"resume: the checkpoint's privacy ledger is unusable: {err}") from None


def _overlap_note(cfg: FedsimConfig) -> str:
    """What an "example" protects when examples overlap (text windows)."""
    from fedsim.config import ShakespeareConfig

    ds = cfg.dataset
    if not isinstance(ds, ShakespeareConfig):
        return ""
    group = ds.seq_len + 1
    return (
        f"; an example is one window of {ds.seq_len} characters with its label(s), and windows overlap: one "
        f"character of a role's text is in up to {group} of its windows, so for a character, a word or a line "
        f"the guarantee is group privacy over up to k = {group} examples, (k epsilon, k e^((k-1) epsilon) delta) "
        "(group privacy, Dwork and Roth 2014, Sec. 2.3), not (epsilon, delta); the user-level guarantee "
        "(privacy=dpfedavg) covers a role's whole text"
    )
