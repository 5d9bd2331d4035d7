"""What a worker does with one message: train the named devices one after another.

A worker (one Flower SuperNode running fedsim's ClientApp) keeps one dataset handle, one
model object and one trainer per run configuration, in this module's cache: Ray re-pickles
anything defined in `__main__`, but an importable module's globals live as long as the actor.
Every device starts from the global weights and trains with its own seed (run seed, round,
device id), so the result for a device does not depend on which worker trained it or what
the worker trained before.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from clients import DPSGDConfig, DPSGDTrainer, LocalTrainer, TrainConfig
from fedsim.config import FedsimConfig, from_dict
from fedsim.data import FederatedDataset, load_dataset
from fedsim.models import build_model
from fedsim.privacy.user_level import clip_update


def train_config(cfg: FedsimConfig) -> TrainConfig:
    a = cfg.algorithm
    return TrainConfig(
        lr=a.lr,
        local_epochs=a.local_epochs,
        batch_size=a.batch_size,
        momentum=a.momentum,
        weight_decay=a.weight_decay,
        proximal_mu=a.proximal_mu,
    )


def build_trainer(cfg: FedsimConfig, model: torch.nn.Module) -> LocalTrainer | DPSGDTrainer:
    """The plain trainer, or DP-SGD through Opacus when privacy.dpsgd is on."""
    dp = cfg.privacy.dpsgd
    if dp is None:
        return LocalTrainer(model, train_config(cfg))
    if dp.noise_multiplier is None:
        raise ValueError("privacy.dpsgd.noise_multiplier must be resolved (calibrated) before workers start")
    dp_config = DPSGDConfig(
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, grad_sample_mode=dp.grad_sample_mode
    )
    return DPSGDTrainer(model, train_config(cfg), dp_config)


@dataclass
class DeviceReport:
    """The outcome of one round on one worker: a row per trained device, and failures."""

    device_ids: list[int] = field(default_factory=list)
    updates: list[np.ndarray] = field(default_factory=list)
    num_examples: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    # Sample-level DP (empty without it): the event each device spent, its clipped fraction.
    dp_events: list[tuple[float, float, int]] = field(default_factory=list)  # (noise_multiplier, sample_rate, steps)
    clip_fractions: list[float] = field(default_factory=list)
    # User-level DP (empty without it): was the device's update norm within the clip norm C?
    within_bound: list[bool] = field(default_factory=list)
    failed_ids: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    train_time_s: float = 0.0
    peak_rss_mb: float = 0.0

    PER_DEVICE = ("device_ids", "updates", "num_examples", "losses", "dp_events", "clip_fractions", "within_bound")

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows of every per-device list (lists left empty stay empty)."""
        for name in self.PER_DEVICE:
            values = getattr(self, name)
            if values:
                setattr(self, name, [values[i] for i in rows])


class Worker:
    """Dataset, model and trainer of one run, reused for every device this worker trains."""

    def __init__(self, cfg: FedsimConfig) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.simulation.torch_threads)
        self.dataset: FederatedDataset = load_dataset(cfg.dataset, population=cfg.population, seed=cfg.seed)
        self.model = build_model(cfg.model, self.dataset.input_shape, self.dataset.num_classes, seed=cfg.seed)
        self.trainer = build_trainer(cfg, self.model)

    def train(
        self, global_params: torch.Tensor, round_num: int, device_ids: list[int], *, clip_norm: float | None = None
    ) -> DeviceReport:
        """Train each device from the global weights; with `clip_norm` (user-level DP), clip each
        update to that L2 norm before it leaves the device (McMahan et al. 2018)."""
        report = DeviceReport()
        start = time.perf_counter()
        for device_id in device_ids:
            try:
                if injected_failure(self.cfg, round_num, device_id):
                    raise RuntimeError("injected failure (faults.device_failure_rate)")
                check_deadline(self.cfg, round_num, device_id, self.dataset.num_examples(device_id))
                data = self.dataset.device_data(device_id)
                result = self.trainer.fit(global_params, data, seed=(self.cfg.seed, round_num, device_id))
                update = result.update
                if not torch.isfinite(update).all():
                    raise ValueError("update has NaN or inf values")  # rejected here, never aggregated
                if clip_norm is not None:
                    update, _, within = clip_update(update, clip_norm)  # raises on NaN/inf
                if injected_failure(self.cfg, round_num, device_id, kind="nan"):
                    update = torch.full_like(update, float("nan"))  # a faulty device: the server must catch it
            except Exception as err:  # one device failing must not take its worker's other devices down
                report.failed_ids.append(device_id)
                report.failures.append(f"{type(err).__name__}: {err}".splitlines()[0][:300])
                continue
            if clip_norm is not None:
                report.within_bound.append(within)
            report.device_ids.append(device_id)
            report.updates.append(update.numpy())
            report.num_examples.append(result.num_examples)
            report.losses.append(float(result.metrics["loss"]))
            if result.privacy is not None:
                ev = result.privacy
                report.dp_events.append((ev.noise_multiplier, ev.sample_rate, ev.steps))
                report.clip_fractions.append(float(result.metrics["clip_fraction"]))
        report.train_time_s = time.perf_counter() - start
        report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return report


_FAULT_STREAM = 0xFA17


class DeadlineMissed(Exception):
    """A device would finish after the round's (simulated) deadline: it drops out of the round."""


def check_deadline(cfg: FedsimConfig, round_num: int, device_id: int, num_examples: int) -> None:
    """Simulated device time (examples x epochs x seconds_per_example, x slowdown for stragglers)
    against faults.round_deadline_s; a simulated clock keeps runs reproducible."""
    f = cfg.faults
    if f.round_deadline_s is None:
        return
    seconds = num_examples * cfg.algorithm.local_epochs * f.seconds_per_example
    if f.straggler_rate > 0 and np.random.default_rng([cfg.seed, _FAULT_STREAM + 2, round_num, device_id]).random() < f.straggler_rate:
        seconds *= f.straggler_slowdown
    if seconds > f.round_deadline_s:
        raise DeadlineMissed(f"would finish after {seconds:.3g} s, past the round deadline of {f.round_deadline_s:g} s")


def injected_failure(cfg: FedsimConfig, round_num: int, device_id: int, *, kind: str = "fail") -> bool:
    """Seeded per (run seed, round, device, kind): the same devices fail whatever worker trains them."""
    rate = cfg.faults.device_failure_rate if kind == "fail" else cfg.faults.nan_update_rate
    stream = _FAULT_STREAM if kind == "fail" else _FAULT_STREAM + 1
    return rate > 0 and np.random.default_rng([cfg.seed, stream, round_num, device_id]).random() < rate


_WORKERS: dict[str, Worker] = {}


def get_worker(config_json: str) -> Worker:
    """The worker for this run configuration, built on first use and cached for later rounds."""
    key = hashlib.sha256(config_json.encode()).hexdigest()
    worker = _WORKERS.get(key)
    if worker is None:
        _WORKERS.clear()  # a new run: drop the previous run's data and model
        worker = _WORKERS[key] = Worker(from_dict(json.loads(config_json)))
    return worker

