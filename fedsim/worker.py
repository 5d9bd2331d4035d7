"""What a worker does with one message: train the named devices, one after another or in groups.

A worker (one Flower SuperNode running fedsim's ClientApp) keeps one dataset handle, one
model object and one trainer per run configuration, in this module's cache: Ray re-pickles
anything defined in `__main__`, but an importable module's globals live as long as the actor.
Every device starts from the global weights and trains with its own seed, the stream
("device-train", round, device id) of `fedsim.randomness` (reproducible mode: derived from the
run seed and the config fingerprint; secure mode: fresh OS entropy), so in reproducible mode
the result for a device does not depend on which worker trained it or what the worker trained
before.

With vectorization (`use_vectorized`), the job also names groups of devices (consecutive
runs of its device ids, cut by the server from the cohort alone): a group's devices train
together as one batched computation (`clients.vectorized.VectorizedTrainer`). A device's
update then depends on its group's members (float rounding of the batched kernels), so the
groups, not the workers, fix the result: the same groups give the same bits on any worker.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

from clients import LocalTrainer, TrainConfig, TrainResult
from clients.vectorized import VectorizedTrainer, vectorizable
from fedsim import randomness
from fedsim.canaries import canary_device_data, canary_public_examples, is_canary_device
from fedsim.capacity import peak_rss_mb
from fedsim.aggregation import TreeFolder
from fedsim.config import FedsimConfig, from_dict
from fedsim.data import FederatedDataset, identity, load_dataset
from fedsim.errors import ConfigError, DataError
from fedsim.models import checked_model, model_for, split_fixed_features
from fedsim.reports import REJECTED, DeviceReport, acceptable, all_finite, device_weight
from fedsim.strategies import strategy_class

if TYPE_CHECKING:  # DP-SGD's trainer imports Opacus (~2 s): only runs with privacy.dpsgd load it
    from collections.abc import Callable

    from clients import DPSGDConfig, DPSGDTrainer


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


def dp_config(cfg: FedsimConfig) -> DPSGDConfig | None:
    """DP-SGD's mechanism (None without privacy.dpsgd); sigma must be resolved (calibrated)."""
    dp = cfg.privacy.dpsgd
    if dp is None:
        return None
    if dp.noise_multiplier is None:
        raise ValueError("privacy.dpsgd.noise_multiplier must be resolved (calibrated) before workers start")
    from clients import DPSGDConfig

    # audit.break_mechanism=no_noise (tests only, fedsim.audit): the noise is drawn but not added.
    sigma = 0.0 if cfg.audit.break_mechanism == "no_noise" else dp.noise_multiplier
    return DPSGDConfig(
        noise_multiplier=sigma,
        max_grad_norm=dp.max_grad_norm,
        grad_sample_mode=dp.grad_sample_mode,
        secure_mode=randomness.mode(cfg) == "secure",
    )


def build_trainer(cfg: FedsimConfig, model: torch.nn.Module) -> LocalTrainer | DPSGDTrainer:
    """The plain trainer, or DP-SGD through Opacus when privacy.dpsgd is on."""
    dp = dp_config(cfg)
    if dp is None:
        return LocalTrainer(model, train_config(cfg))
    from clients import DPSGDTrainer

    return DPSGDTrainer(model, train_config(cfg), dp)


def worker_device(cfg: FedsimConfig) -> torch.device:
    """Where this worker trains (simulation.device): the CPU, or the GPU Ray gave it (cuda, or
    auto where torch sees one). Raises ConfigError for cuda on a worker without a CUDA device."""
    if cfg.simulation.device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if cfg.simulation.device == "cuda":
        raise ConfigError("simulation.device", "cuda, but this worker's torch sees no CUDA device "
                          "(torch.cuda.is_available() is False); allowed here: auto, cpu")  # fmt: skip
    return torch.device("cpu")


def worker_model(cfg: FedsimConfig, dataset: FederatedDataset) -> torch.nn.Module:
    """The run's model as the server builds it (with DP-SGD: checked, and fixed on request)."""
    model = model_for(cfg, dataset)
    if cfg.privacy.dpsgd is not None:
        model = checked_model(model, fix=cfg.privacy.dpsgd.fix_model)  # the server's layout (prepare)
    return model


# ----------------------------------------------------------------------------- vectorization

# simulation.vectorize=auto: without DP-SGD the batched path pays off for small models only
# (measured: 2.3-2.8x faster for the tiny MLP, 0.5-0.9x for the 870k-parameter FEMNIST CNN);
# with DP-SGD it pays off for both (4.6-5.2x MLP, 1.1-1.5x CNN).
AUTO_MAX_PARAMS = 50_000
VMAP_TESTED_MODELS = ("auto", "logreg", "mlp", "cnn", "scatternet")  # model.name values vectorized in tests: no trial step
_DECISIONS: dict[str, tuple[bool, str]] = {}
# Per worker: FEMNIST's 105 writers as scatternet features (81 x 7 x 7 floats each) take 254 MB.
FEATURE_CACHE_MB = 384


def use_vectorized(
    cfg: FedsimConfig, model: torch.nn.Module, dataset: FederatedDataset | None = None
) -> tuple[bool, str]:
    """(train devices in groups through VectorizedTrainer?, why) for this run.

    `model` is the run's model as `prepare` builds it (not wrapped by Opacus); `dataset`, if
    given, supplies two real examples for a trial vectorized step (a custom model whose
    forward torch.func cannot vmap is caught here, not in round 1).
    off: no. on: yes, and a model the vectorized path cannot train raises ConfigError
    ("simulation.vectorize"). auto: yes when the model is vectorizable and DP-SGD is on or
    the model has at most AUTO_MAX_PARAMS parameters, unless the model sets the attribute
    `vectorize_auto = False` (measured slower vectorized, as fedsim's text models are). The classic layout (one device per
    worker) never groups devices. The server and every worker decide alike from the config;
    the answer is cached per (config, model structure).
    """
    mode = cfg.simulation.vectorize
    if mode == "off":
        return False, "simulation.vectorize=off"
    if cfg.simulation.layout == "classic":
        return False, "classic layout: one device per worker, nothing to batch"
    if not strategy_class(cfg).vectorizable:
        if mode == "on":
            raise ConfigError("simulation.vectorize", f"on, but algorithm.name={cfg.algorithm.name} trains each device "
                                                      "with inputs of its own; allowed with it: auto, off")  # fmt: skip
        return False, f"{cfg.algorithm.name}: each device trains with inputs of its own"
    key = hashlib.sha256((cfg.to_json() + "\0" + repr(model)).encode()).hexdigest()
    if key not in _DECISIONS:
        _DECISIONS[key] = _decide(cfg, model, dataset)  # raises ConfigError for "on" and a model it cannot train
    return _DECISIONS[key]


def _decide(cfg: FedsimConfig, model: torch.nn.Module, dataset: FederatedDataset | None) -> tuple[bool, str]:
    mode, dpsgd = cfg.simulation.vectorize, cfg.privacy.dpsgd
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if mode == "auto" and getattr(model, "vectorize_auto", True) is False:
        # A model may know it trains faster one by one (the sequence models: README, Shakespeare).
        return False, f"auto: {type(model).__name__} trains faster one by one (its vectorize_auto)"
    if mode == "auto" and dpsgd is None and size > AUTO_MAX_PARAMS:
        return False, f"auto: {size:,} parameters > {AUTO_MAX_PARAMS:,} without DP-SGD (one by one is as fast)"
    dp = None
    if dpsgd is not None:  # sigma may still be uncalibrated here: any value does for the check
        from clients import DPSGDConfig

        dp = DPSGDConfig(
            noise_multiplier=1.0 if dpsgd.noise_multiplier is None else dpsgd.noise_multiplier,
            max_grad_norm=dpsgd.max_grad_norm,
            grad_sample_mode=dpsgd.grad_sample_mode,
        )
    # A trial step on real inputs catches a forward torch.func cannot vmap; the built-in
    # feed-forward models are known to vmap (tests/test_vectorized.py), and the trial's first
    # vmap costs ~2 s of torch start-up in the server process.
    trial = cfg.model.name not in VMAP_TESTED_MODELS
    reason = vectorizable(model, train_config(cfg), dp, example=_trial_example(dataset) if trial else None)
    if reason is not None:
        if mode == "on":
            raise ConfigError("simulation.vectorize", f"on, but the model cannot be trained vectorized: {reason}")
        return False, f"auto: not vectorizable ({reason})"
    if mode == "on":
        return True, "simulation.vectorize=on"
    why = "DP-SGD" if dpsgd is not None else f"{size:,} parameters <= {AUTO_MAX_PARAMS:,}"
    return True, f"auto: {why}"


def _trial_example(dataset: FederatedDataset | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two training examples of the first of the first few devices that has any (None: no dataset)."""
    if dataset is None:
        return None
    for device_id in range(min(dataset.num_devices, 16)):
        x, y = dataset.device_data(device_id)
        if len(y):
            return x[:2], y[:2]
    return None


def split_groups(device_ids: list[int], groups: list[int] | None) -> list[list[int]]:
    """`device_ids` cut into consecutive groups of the given sizes (None: each device alone)."""
    if groups is None:
        return [[d] for d in device_ids]
    if any(int(g) < 1 for g in groups) or sum(groups) != len(device_ids):
        raise ValueError(f"group sizes {groups} do not partition {len(device_ids)} devices")
    out, start = [], 0
    for size in groups:
        out.append(list(device_ids[start : start + size]))
        start += size
    return out


def keep_in_groups(device_ids: list[int], groups: list[int] | None, keep: set[int]) -> list[int] | None:
    """The group sizes once only the devices in `keep` are left (empty groups vanish)."""
    if groups is None:
        return None
    return [n for n in (sum(d in keep for d in group) for group in split_groups(device_ids, groups)) if n]


class FeatureCache:
    """Devices' features (FixedFeatures outputs), least recently used first out, within
    `budget_mb` (a worker's memory stays bounded whatever the population). Only speed depends on
    it: a device's features are a function of its data alone, recomputed the same on a miss."""

    def __init__(self, budget_mb: float = FEATURE_CACHE_MB) -> None:
        self.budget = int(budget_mb * 2**20)
        self.nbytes = 0
        self._items: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        item = self._items.get(device_id)
        if item is not None:
            self._items.move_to_end(device_id)
        return item

    def put(self, device_id: int, item: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        size = sum(t.numel() * t.element_size() for t in item)
        if size <= self.budget:
            while self.nbytes + size > self.budget:
                _, old = self._items.popitem(last=False)
                self.nbytes -= sum(t.numel() * t.element_size() for t in old)
            self._items[device_id] = item
            self.nbytes += size
        return item


class Worker:
    """Dataset, model and trainer of one run, reused for every device this worker trains.

    With vectorization on for the run (`use_vectorized`), also a VectorizedTrainer on a model
    of its own (Opacus's hooks on `self.model` would fire inside vmap). Both train on
    `worker_device(cfg)` (simulation.device), except DP-SGD's one-by-one trainer (Opacus),
    which stays on the CPU; updates come back on the CPU either way.
    """

    def __init__(self, cfg: FedsimConfig) -> None:
        self.cfg = cfg
        self.streams = randomness.streams(cfg)
        torch.set_num_threads(cfg.simulation.torch_threads)
        self.dataset: FederatedDataset = load_dataset(cfg.dataset, population=cfg.population, seed=cfg.seed)
        self.device = worker_device(cfg)
        # A model whose first layer is fixed (FixedFeatures) trains its rest on the features,
        # which self.features computes once per device (the same numbers as at every step).
        self.features, self.model = split_fixed_features(worker_model(cfg, self.dataset))
        self._feature_cache = FeatureCache()
        self._gradient_sums = None  # distributed DP-SGD's device side, made on first use
        if cfg.privacy.dpsgd is None:  # Opacus's one-by-one DP-SGD draws its noise from CPU generators: it stays there
            self.model.to(self.device)
        self.strategy = strategy_class(cfg)  # its device side: what a job's extra arrays mean to a device
        self.vectorized: VectorizedTrainer | None = None
        # Distributed DP-SGD devices only send gradient sums (gradient_sums): no local trainer
        # (Opacus's, ~2 s to import and build) and no batched one.
        self.distributed_sgd = cfg.privacy.dpsgd is not None and cfg.privacy.dpsgd.noise == "distributed"
        self.trainer: LocalTrainer | DPSGDTrainer | None = None if self.distributed_sgd else build_trainer(cfg, self.model)
        # A model of its own: Opacus's hooks on self.model would fire inside vmap.
        model = None if self.distributed_sgd else worker_model(cfg, self.dataset)
        if model is not None and use_vectorized(cfg, model, self.dataset)[0]:  # decided as the server did (prepare)
            # The default memory budget and no device cap: the chunks inside a group depend on
            # the group alone, never on the worker.
            tail = split_fixed_features(model)[1]
            self.vectorized = VectorizedTrainer(tail.to(self.device), train_config(cfg), dp_config(cfg))

    def device_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A device's training data as its trainer takes it: the dataset's examples, or for a
        model with a fixed first layer their features (kept for later rounds, FeatureCache)."""
        if is_canary_device(self.cfg, device_id):  # an audit's canary device: data of its own
            x, y = canary_device_data(self.cfg, self.dataset, device_id)
            return (x, y) if self.features is None else (self.features(x), y)
        if self.features is None:
            return self.dataset.device_data(device_id)
        cached = self._feature_cache.get(device_id)
        if cached is None:
            x, y = self.dataset.device_data(device_id)
            cached = self._feature_cache.put(device_id, (self.features(x), y))
        return cached

    def public_examples(self, device_id: int) -> int:
        """The device's public example count: what the server holds for it before the round
        (`dataset.num_examples`; for an audit's canary device, its filler's count plus every
        canary slot it holds, included or not). Under DP-SGD it, never the size of the data the
        device trains on, sets q, the steps and the count the device reports, so one example
        more or less changes none of them (the add/remove-one adjacency the ledger assumes)."""
        if is_canary_device(self.cfg, device_id):
            return int(canary_public_examples(self.cfg, self.dataset, device_id))
        return int(self.dataset.num_examples(device_id))

    def train(
        self,
        global_params: torch.Tensor,
        round_num: int,
        device_ids: list[int],
        *,
        clip_norm: float | None = None,
        groups: list[int] | None = None,
        arrays: dict[str, np.ndarray] | None = None,
        sums: str | None = None,
        sum_range: tuple[int, int] | None = None,
    ) -> DeviceReport:
        """Train each device from the global weights; with `clip_norm` (user-level DP), clip each
        update to that L2 norm before it leaves the device (McMahan et al. 2018).

        `groups`: sizes of consecutive groups of `device_ids` (None: each device alone). With
        vectorization on, the devices of a group that pass the failure and deadline checks
        train as one batched computation; a group left with one device trains it one by one,
        like a worker without vectorization. `arrays`: the strategy's extra inputs of this job
        (rows in `device_ids` order; Strategy.device_correction reads them). `sums` ("examples" or
        "ones", with `sum_range` = (cohort position of the first device, cohort size)): the
        report carries the float64 sums of the cohort tree's nodes over its devices instead of a
        row per device, after the server's own per-device check (fedsim.reports.acceptable); each
        row is folded into the tree (fedsim.aggregation.TreeFolder) as soon as its group has
        trained, so the job's rows are never all alive at once.
        """
        if sums is not None and sum_range is None:
            raise ValueError("a job asking for sums must give its devices' range in the cohort")
        report = DeviceReport()
        start = time.perf_counter()
        cfg, streams = self.cfg, self.streams
        batches = split_groups(device_ids, groups if self.vectorized is not None else None)
        if self.trainer is None:
            raise RuntimeError("under distributed DP-SGD devices send gradient sums (Worker.gradient_sums), they do not train")
        position_of = {d: i for i, d in enumerate(device_ids)}  # the strategy's rows, the cohort tree's positions
        if clip_norm is not None:  # user-level DP only: fedsim.privacy imports the accountants (~2 s)
            from fedsim.privacy.user_level import clip_update
        dpsgd = cfg.privacy.dpsgd is not None  # local DP-SGD: q and steps from each device's public count
        folder = TreeFolder(sum_range[0], sum_range[0] + len(device_ids), sum_range[1]) if sums is not None else None  # type: ignore[index]
        rejected: set[int] = set()  # rows the server's check refuses (moved to the failures at the end)

        def alone(device_id: int, data: object) -> TrainResult | Exception:
            try:
                correction = self.strategy.device_correction(arrays, position_of[device_id]) if arrays else None
                public = {"public_examples": self.public_examples(device_id)} if dpsgd else {}
                return self.trainer.fit(global_params, data, seed=device_seed(streams, round_num, device_id),
                                        correction=correction, **public)  # fmt: skip
            except Exception as err:
                return err

        for batch in batches:
            outcome: dict[int, tuple[TrainResult, torch.Tensor, bool | None] | str] = {}
            ready: list[tuple[int, object]] = []
            for device_id in batch:
                try:
                    if injected_failure(cfg, streams, round_num, device_id):
                        raise RuntimeError("injected failure (faults.device_failure_rate)")
                    if is_canary_device(cfg, device_id):  # an audit's canary device: data of its own, no faults
                        ready.append((device_id, self.device_data(device_id)))
                        continue
                    check_deadline(cfg, streams, round_num, device_id, self.dataset.num_examples(device_id))
                    ready.append((device_id, self.device_data(device_id)))
                except Exception as err:  # one device failing must not take its worker's other devices down
                    outcome[device_id] = _failure(err)
            if len(ready) > 1:
                # Under DP-SGD a device whose data is empty trains alone (noise-only steps): the
                # batched trainer needs a row, and failing would show that it has none.
                batched = [i for i, (_, data) in enumerate(ready) if not (dpsgd and len(data[1]) == 0)]  # type: ignore[index]
                results: list[TrainResult | Exception | None] = [None] * len(ready)
                if batched:
                    try:
                        done = self.vectorized.fit_many(  # type: ignore[union-attr]
                            global_params, [ready[i][1] for i in batched],
                            [device_seed(streams, round_num, ready[i][0]) for i in batched],
                            **({"public_examples": [self.public_examples(ready[i][0]) for i in batched]} if dpsgd else {}),
                        )  # fmt: skip
                    except Exception as err:  # the batched computation failed: the group's devices fail alike
                        done = [err] * len(batched)
                    for i, result in zip(batched, done, strict=True):
                        results[i] = result
                for i, (device_id, data) in enumerate(ready):
                    if results[i] is None:
                        results[i] = alone(device_id, data)
            else:
                results = [alone(device_id, data) for device_id, data in ready]
            for (device_id, _), result in zip(ready, results, strict=True):
                if isinstance(result, Exception):  # this device's own error (e.g. no training examples)
                    outcome[device_id] = _failure(result)
                    continue
                try:
                    update, within = result.update, None
                    if not all_finite(update.detach().numpy()):
                        raise ValueError("update has NaN or inf values")  # rejected here, never aggregated
                    if clip_norm is not None:
                        update, _, within = clip_update(update, clip_norm)  # raises on NaN/inf
                    if injected_failure(cfg, streams, round_num, device_id, kind="nan"):
                        update = torch.full_like(update, float("nan"))  # a faulty device: the server must catch it
                    outcome[device_id] = (result, update, within)
                except Exception as err:
                    outcome[device_id] = _failure(err)
            for device_id in batch:  # rows and failures in device order, as one by one
                row = self._add(report, device_id, outcome.pop(device_id), keep_row=folder is None)
                if folder is not None:  # the row goes into the tree now, not into the report
                    position = sum_range[0] + position_of[device_id]  # type: ignore[index]
                    if row is None:
                        folder.skip(position)
                    elif acceptable(*row):
                        folder.add(position, (row[0], device_weight(row[1], sums)))  # type: ignore[arg-type]
                    else:
                        rejected.add(device_id)
                        folder.skip(position)
        if cfg.audit.break_mechanism == "no_noise" and cfg.privacy.dpsgd is not None:
            # Tests only: the accountant is told the configured sigma, as a buggy mechanism would.
            report.dp_events = [(cfg.privacy.dpsgd.noise_multiplier, q, steps) for _, q, steps in report.dp_events]
        if folder is not None:
            report.fail_devices(rejected, REJECTED)
            for node, total in folder.finish():
                report.sum_nodes.append(node)
                report.sums.append(total)
        keep_diagnostics(cfg, report)
        report.train_time_s = time.perf_counter() - start
        report.peak_rss_mb = peak_rss_mb()
        return report

    def gradient_sums(
        self, global_params: torch.Tensor, round_num: int, device_ids: list[int], *, norm_bound: float,
        rounding: Callable[[int], np.random.Generator],
    ) -> DeviceReport:  # fmt: skip
        """Distributed DP-SGD (fedsim.privacy.distributed_sgd): each device's rounded sum of all
        its examples' clipped, scaled gradients at the global model, as int64 rows of
        `report.updates`; `rounding(d)` gives device d's rounding generator. A device fails alone
        (injected failures and deadlines as in `train`), never because of an example's values."""
        from fedsim.privacy.distributed_sgd import SAMPLE_RATE, GradientSums

        if self._gradient_sums is None:
            self._gradient_sums = GradientSums(self.cfg, split_fixed_features(worker_model(self.cfg, self.dataset))[1])
        report, start = DeviceReport(), time.perf_counter()
        cfg, streams = self.cfg, self.streams
        z = cfg.privacy.dpsgd.noise_multiplier  # type: ignore[union-attr]
        for device_id in device_ids:
            try:
                if injected_failure(cfg, streams, round_num, device_id):
                    raise RuntimeError("injected failure (faults.device_failure_rate)")
                check_deadline(cfg, streams, round_num, device_id, self.dataset.num_examples(device_id))
                x, y = self.device_data(device_id)
                out = self._gradient_sums(global_params, x, y, norm_bound=norm_bound, rounding=rounding(device_id))
            except Exception as err:  # one device failing must not take its worker's other devices down
                report.failed_ids.append(device_id)
                report.failures.append(_failure(err))
                continue
            report.device_ids.append(device_id)
            report.updates.append(out.ints)
            report.num_examples.append(self.public_examples(device_id))  # summed in the clear: never len(y)
            report.losses.append(out.loss)
            report.dp_events.append((z, SAMPLE_RATE, 1))
            report.clip_fractions.append(out.clip_fraction)
        keep_diagnostics(cfg, report)
        report.train_time_s = time.perf_counter() - start
        report.peak_rss_mb = peak_rss_mb()
        return report

    @staticmethod
    def _add(
        report: DeviceReport, device_id: int, outcome: tuple[TrainResult, torch.Tensor, bool | None] | str,
        *, keep_row: bool = True,
    ) -> tuple[np.ndarray, int] | None:  # fmt: skip
        """Put a device's outcome into the report (its row only with `keep_row`); return its
        (update, example count), None for a failure."""
        if isinstance(outcome, str):
            report.failed_ids.append(device_id)
            report.failures.append(outcome)
            return None
        result, update, within = outcome
        if within is not None:
            report.within_bound.append(within)
        report.device_ids.append(device_id)
        row = update.numpy()
        if keep_row:
            report.updates.append(row)
        report.num_examples.append(result.num_examples)
        report.losses.append(float(result.metrics["loss"]))
        if result.privacy is not None:
            ev = result.privacy
            report.dp_events.append((ev.noise_multiplier, ev.sample_rate, ev.steps))
            report.clip_fractions.append(float(result.metrics["clip_fraction"]))
        return row, result.num_examples


def keep_diagnostics(cfg: FedsimConfig, report: DeviceReport) -> None:
    """With output.private_metrics_only, the devices' training losses and clipped fractions stay
    on the devices (NaN in the report): computed from their data without noise, they are outside
    every epsilon, so a run that publishes only covered metrics does not let the server see them
    either (fedsim.privacy.published; under SecAgg+ they leave the masked vector, stats_names)."""
    if cfg.output.private_metrics_only:
        report.losses = [math.nan] * len(report.losses)
        report.clip_fractions = [math.nan] * len(report.clip_fractions)


def _failure(err: BaseException) -> str:
    """A failed device's line in the report."""
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def device_seed(streams: randomness.Streams, round_num: int, device_id: int) -> np.random.BitGenerator:
    """The seed of one device's fit in one round: every draw of its training comes from it."""
    return streams.bit_generator("device-train", round_num, device_id)


class DeadlineMissed(Exception):
    """A device would finish after the round's (simulated) deadline: it drops out of the round."""


def check_deadline(cfg: FedsimConfig, streams: randomness.Streams, round_num: int, device_id: int, num_examples: int) -> None:
    """Simulated device time (examples x epochs x seconds_per_example, x slowdown for stragglers)
    against faults.round_deadline_s; a simulated clock keeps runs reproducible."""
    f = cfg.faults
    if f.round_deadline_s is None:
        return
    seconds = num_examples * cfg.algorithm.local_epochs * f.seconds_per_example
    if f.straggler_rate > 0 and streams.numpy("fault-straggler", round_num, device_id).random() < f.straggler_rate:
        seconds *= f.straggler_slowdown
    if seconds > f.round_deadline_s:
        raise DeadlineMissed(f"would finish after {seconds:.3g} s, past the round deadline of {f.round_deadline_s:g} s")


def injected_failure(
    cfg: FedsimConfig, streams: randomness.Streams, round_num: int, device_id: int, *, kind: str = "fail"
) -> bool:
    """Drawn from the stream (fault-<kind>, round, device): in reproducible mode the same devices
    fail whatever worker trains them."""
    rate = cfg.faults.device_failure_rate if kind == "fail" else cfg.faults.nan_update_rate
    return rate > 0 and streams.numpy(f"fault-{kind}", round_num, device_id).random() < rate


_WORKERS: dict[str, Worker] = {}


# Key of the job's config JSON holding the sha256 of the data the server read (`job_config_json`).
SERVER_DATA_KEY = "_server_data_sha256"


def job_config_json(cfg: FedsimConfig) -> str:
    """The run config as jobs carry it to the workers, with the sha256 of the data files the
    server read (fedsim.data.identity), which each worker checks its own copy against."""
    raw = cfg.to_dict()
    if (digest := identity.content_sha256(cfg.dataset)) is not None:
        raw[SERVER_DATA_KEY] = digest
    return json.dumps(raw, sort_keys=True)


def config_from_job(config_json: str) -> tuple[FedsimConfig, str | None]:
    """(the run config, the server's data sha256 or None) of a job's config JSON."""
    raw = json.loads(config_json)
    expected = raw.pop(SERVER_DATA_KEY, None)
    return from_dict(raw), None if expected is None else str(expected)


def get_worker(config_json: str) -> Worker:
    """The worker for this run configuration, built on first use and cached for later rounds.

    A worker whose data files are not the bytes the server read refuses the run (DataError):
    its devices would train on other data than the server's cohort sampling and DP accounting
    (device sizes) assume, and its random streams would come from another fingerprint."""
    key = hashlib.sha256(config_json.encode()).hexdigest()
    worker = _WORKERS.get(key)
    if worker is None:
        _WORKERS.clear()  # a new run: drop the previous run's data and model
        cfg, expected = config_from_job(config_json)
        worker = Worker(cfg)  # the loader reports missing or malformed data first
        ours = identity.content_sha256(cfg.dataset)
        if expected is not None and ours != expected:
            where = getattr(cfg.dataset, "path", None) or getattr(cfg.dataset, "data_files", None)
            raise DataError(
                f"dataset: the data this worker reads ({where}: sha256 {ours or 'unreadable'}) are not the bytes the "
                f"server read (sha256 {expected}); every worker must read the same data files"
            )
        _WORKERS[key] = worker
    return worker

