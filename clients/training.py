"""Local SGD on one device's data, and evaluation: the client side of federated learning.

Only torch (and the standard library) is used, so a notebook can call this directly:

    trainer = LocalTrainer(model, TrainConfig(lr=0.05))
    for device_id in cohort:
        result = trainer.fit(global_params, data[device_id], seed=(run_seed, rnd, device_id))

`data` is either a pair of tensors `(x, y)`, the fast path the simulator uses, or any
`torch.utils.data.Dataset` whose items are `(x, y)` pairs. Both shuffle with the same seeded
permutation per epoch, so the same examples give the same batches and the same update.

Seeds. An int `s` is the sequence `(s,)`. A sequence of ints in [0, 2^64), e.g.
`(run_seed, round, device_id)`, or a `numpy.random.SeedSequence`, seeds the fit's generator
through `clients.seeding`: the generator's whole MT19937 state comes from the SeedSequence, not
the 32 bits `torch.Generator.manual_seed` keeps, so different seeds never share a stream
(except with probability ~2^-128). A `torch.Generator` is used as given and advances.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from clients.events import DPSGDEvent
from clients.params import flatten_list, load_list, trainable_params, unflatten_views
from clients.seeding import SeedLike, child_seed, seed_generator

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Data = tuple[torch.Tensor, torch.Tensor] | Dataset
Seed = SeedLike | torch.Generator
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of local training (plain SGD, optionally with FedProx's proximal term)."""

    lr: float
    local_epochs: int = 1
    batch_size: int = 10
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: adds mu/2 * ||w - w_global||^2 to the loss (Li et al. 2020, Eq. 2)
    max_steps: int | None = None  # stop after this many optimizer steps (None = full epochs)
    # How LocalTrainer lays out image tensors: "auto" = channels_last (NHWC) for models with a
    # 2-D convolution (oneDNN's convolutions and max-pooling are faster that way on CPU: fedsim's
    # CNN round in bench/speed.py, one worker, 2.19 -> 2.02-2.06 s), "contiguous" = torch's NCHW.
    # Same function, other float rounding: the two give close, not identical, weights.
    memory_format: str = "auto"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("momentum", "weight_decay", "proximal_mu"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.memory_format not in ("auto", "channels_last", "contiguous"):
            raise ValueError(f"memory_format must be auto, channels_last or contiguous, got {self.memory_format!r}")


@dataclass
class TrainResult:
    """What a device sends back after local training."""

    update: torch.Tensor  # flat float32: local weights minus the global weights the device started from
    num_examples: int  # training examples on the device (the FedAvg weight), not examples processed
    metrics: dict[str, float]  # "loss": mean data loss over steps (without the proximal term); "steps"
    privacy: DPSGDEvent | None = None  # set by DP-SGD training: the privacy event this fit spent


class PlainSGD:
    """torch.optim.SGD's step (lr, momentum, weight decay; no dampening, Nesterov or maximize),
    with the same tensor operations in the same order, so the same bits (tests/test_clients.py
    compares them step by step).

    Why not torch.optim.SGD: building one imports torch._dynamo (torch.optim.Optimizer's
    constructor is wrapped in torch._disable_dynamo), 1.2 s of a worker's start-up on this
    machine, for a loop that never compiles anything. `state` maps a parameter to its momentum
    buffer, as torch's `state[p]["momentum_buffer"]` does; clear it to forget a fit.
    """

    def __init__(self, params: list[torch.Tensor], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.params, self.lr, self.momentum, self.weight_decay = list(params), float(lr), float(momentum), float(weight_decay)
        self.state: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        """One step over the parameters that have a gradient (torch's `_single_tensor_sgd`)."""
        for p in self.params:
            if p.grad is None:
                continue
            grad = p.grad
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.state.get(p)
                if buf is None:
                    buf = self.state[p] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1)
                grad = buf
            p.add_(grad, alpha=-self.lr)


class LocalTrainer:
    """Trains one model object in place for device after device (weights reloaded per device).

    Everything that does not depend on the device is built once here: the parameter list,
    the SGD optimizer and the random generator. `fit` reloads the global weights, clears the
    optimizer state (momentum buffers) and reseeds, so a fit never depends on earlier fits.

    FedProx (Li et al. 2020, Eq. 2) minimises h(w) = F_k(w) + mu/2 * ||w - w_global||^2.
    Its gradient mu * (w - w_global) is added to the data gradient after backward rather
    than put into the loss: the same step, without growing the autograd graph per parameter.

    The model's structure (its modules and trainable parameters) must not change after the
    trainer is built: both lists are collected once.

    Modules that draw random numbers from torch's global generator (dropout) are run under
    `torch.random.fork_rng`, seeded from the fit's seed, so they are reproducible too and
    the caller's global RNG is left as it was. Custom stochastic modules are not detected.
    (On a CUDA model dropout draws from the CUDA generator, which is not reseeded: such fits
    are not reproducible.)

    The trainer trains on the device the model's parameters are on when it is built (move
    the model first: `model.to("cuda")`); `global_params` and data may be on the CPU, and
    `TrainResult.update` is always on the CPU.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, loss_fn: LossFn = F.cross_entropy) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self._config = config
        self._params = trainable_params(model)
        if not self._params:
            raise ValueError("model has no trainable parameters")
        # Built once: clearing .state per fit costs nothing.
        self.optimizer = PlainSGD(self._params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        self._generator = torch.Generator()
        self._all_modules = list(model.modules())
        self._uses_global_rng = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in self._all_modules)
        # Trains where the model's parameters are (a CUDA model: batches move there, the update
        # comes back to the CPU); the CPU path runs the same code with no-op moves.
        self._device = self._params[0].device
        has_conv = any(isinstance(m, nn.Conv2d) for m in self._all_modules)
        self._channels_last = config.memory_format == "channels_last" or (config.memory_format == "auto" and has_conv)
        if self._channels_last:
            # The parameters' strides change, not their values (flat_params reads logical order).
            model.to(memory_format=torch.channels_last)

    @property
    def config(self) -> TrainConfig:
        """Read-only: the optimizer was built from it (make a new trainer to change it)."""
        return self._config

    def fit(
        self, global_params: torch.Tensor, data: Data, *, seed: Seed, correction: torch.Tensor | None = None
    ) -> TrainResult:
        """Train from `global_params` on one device's `data`; the model keeps the local weights.

        `global_params` is only read, and must not share memory with the model's parameters
        (it is the anchor of the update and of the proximal term). Raises ValueError("device has no training examples")
        for an empty device: it has no update to contribute and its weight would be 0.
        `correction`: a flat tensor added to every step's gradient (SCAFFOLD's c - c_i,
        Karimireddy et al. 2020, Alg. 1 line 10); None: plain SGD.
        """
        cfg = self._config
        source = _source(data)
        if source.n == 0:
            raise ValueError("device has no training examples")
        generator = self._seeded(seed)
        global_flat = global_params.detach().to(self._device)
        load_list(self._params, global_flat)
        self.optimizer.state.clear()  # momentum buffers of the previous device
        # Checking the flags costs 0.3 us; model.train() walks the module tree for 7 us.
        if not all(m.training for m in self._all_modules):
            self.model.train()
        anchors = unflatten_views(global_flat, self._params) if cfg.proximal_mu > 0 else None
        shifts = _correction_views(correction, self._params)
        batches = source.shuffled_batches(cfg, generator)

        if self._uses_global_rng:
            dropout_seed = child_seed(generator)
            with torch.random.fork_rng(devices=[]):
                seed_generator(torch.default_generator, dropout_seed)
                loss_sum, steps = self._sgd(batches, anchors, shifts)
        else:
            loss_sum, steps = self._sgd(batches, anchors, shifts)

        update = flatten_list(self._params).sub_(global_flat).cpu()
        metrics = {"loss": loss_sum / steps, "steps": float(steps)}
        return TrainResult(update=update, num_examples=source.n, metrics=metrics)

    def _sgd(
        self, batches: Iterator[Batch], anchors: list[torch.Tensor] | None, shifts: list[torch.Tensor] | None = None
    ) -> tuple[float, int]:
        """The step loop; returns the summed batch losses and the number of steps."""
        model, loss_fn, optimizer, params = self.model, self.loss_fn, self.optimizer, self._params
        mu = self._config.proximal_mu
        # Summed as a tensor: one .item() at the end instead of a sync per step.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self._device)
        steps = 0
        channels_last, device = self._channels_last, self._device
        for xb, yb in batches:
            xb, yb = xb.to(device), yb.to(device)  # no-ops on the CPU
            if channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            # Same as optimizer.zero_grad(set_to_none=True) for plain SGD, without its
            # profiler hooks (about 6 us per step, 5% of a small model's fit).
            for p in params:
                p.grad = None
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if anchors is not None:
                _add_proximal_grad(params, anchors, mu)
            if shifts is not None:
                _add_correction(params, shifts)
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        return loss_sum.item(), steps

    def _seeded(self, seed: Seed) -> torch.Generator:
        if isinstance(seed, torch.Generator):
            return seed
        return seed_generator(self._generator, seed)


def train_local(
    model: nn.Module, data: Data, config: TrainConfig, *, seed: Seed = 0, loss_fn: LossFn = F.cross_entropy
) -> TrainResult:
    """One-shot local training from the model's current weights; leaves the model trained."""
    trainer = LocalTrainer(model, config, loss_fn=loss_fn)
    return trainer.fit(flatten_list(trainer._params), data, seed=seed)


def evaluate(
    model: nn.Module, data: Data, *, batch_size: int = 64, loss_fn: LossFn = F.cross_entropy
) -> dict[str, float]:
    """Mean loss and accuracy (argmax over the last dimension) on `data`.

    Runs in eval mode without gradients, `batch_size` examples at a time, and restores the
    model's previous mode. 64 keeps a server's final evaluation from setting its peak memory:
    1,000 examples through the FEMNIST-size CNN add 112 MB to a process's peak at 256 a batch,
    43 MB at 64, in the same time (0.73 vs 0.72 s); 2,000 windows through LEAF's LSTM add
    101 vs 41 MB and take 4.0 vs 3.3 s (AMD EPYC, 1 thread; a one-off script, not in bench/). An empty
    data set gives loss and accuracy nan with num_examples 0, so weighted averages skip it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = _source(data)
    n = source.n
    if n == 0:
        return {"loss": math.nan, "accuracy": math.nan, "num_examples": 0.0}
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # evaluates where the model is
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                xb, yb = source.batch(start, stop)
                xb, yb = xb.to(device), yb.to(device)
                out = model(xb)
                # Weight each batch mean by its size so a short last batch counts right.
                loss_sum += loss_fn(out, yb).double() * (stop - start)
                correct += (out.argmax(dim=-1) == yb).sum()
    finally:
        model.train(was_training)
    return {"loss": loss_sum.item() / n, "accuracy": correct.item() / n, "num_examples": float(n)}


# ----------------------------------------------------------------------------- internals


def _add_proximal_grad(params: list[nn.Parameter], anchors: list[torch.Tensor], mu: float) -> None:
    """grad += mu * (w - w_global), the gradient of mu/2 * ||w - w_global||^2."""
    for p in params:
        if p.grad is None:  # a parameter the forward pass did not use still feels the pull
            p.grad = torch.zeros_like(p)
    # no_grad keeps autograd from recording w - w_global (it would, params require grad):
    # without it this costs 12 us per step instead of 7.
    with torch.no_grad():
        torch._foreach_add_([p.grad for p in params], torch._foreach_sub(params, anchors), alpha=mu)


def _correction_views(correction: torch.Tensor | None, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
    """A flat per-step gradient correction as views shaped like the parameters (None: none)."""
    if correction is None:
        return None
    total = sum(p.numel() for p in params)
    if correction.shape != (total,):
        raise ValueError(f"correction has shape {tuple(correction.shape)}, expected ({total},)")
    return unflatten_views(correction.detach().to(params[0].device, params[0].dtype), params)


def _add_correction(params: list[nn.Parameter], shifts: list[torch.Tensor]) -> None:
    """grad += correction (a constant vector: the gradient of <correction, w>)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    with torch.no_grad():
        torch._foreach_add_([p.grad for p in params], shifts)


def _source(data: Data) -> _Tensors | _Items:
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return _Tensors(*data.tensors)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return _Tensors(*data)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return _Items(data)
    raise TypeError(f"data must be a pair of tensors (x, y) or a Dataset of (x, y) pairs, got {type(data).__name__}")


def _epochs(n: int, cfg: TrainConfig, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, range]]:
    """Per epoch: the shuffled example order and the batch start offsets, cut short where
    max_steps ends training (no permutation is drawn for an epoch that would not run)."""
    steps = 0
    for _ in range(cfg.local_epochs):
        starts = range(0, n, cfg.batch_size)
        if cfg.max_steps is not None:
            starts = starts[: cfg.max_steps - steps]
            if not starts:
                return
        yield torch.randperm(n, generator=generator), starts
        steps += len(starts)


class _Tensors:
    """The fast path: a pair of tensors (x, y)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y disagree on the number of examples: {x.shape[0]} vs {y.shape[0]}")
        self.x, self.y, self.n = x, y, int(y.shape[0])

    def shuffled_batches(self, cfg: TrainConfig, generator: torch.Generator) -> Iterator[Batch]:
        b = cfg.batch_size
        for order, starts in _epochs(self.n, cfg, generator):
            # One gather per epoch, then slices (views): fewer indexing ops than one per batch.
            xs, ys = self.x[order], self.y[order]
            for start in starts:
                yield xs[start : start + b], ys[start : start + b]

    def batch(self, start: int, stop: int) -> Batch:
        return self.x[start:stop], self.y[start:stop]


class _Items:
    """The general path: any Dataset of (x, y) pairs, in the same order as `_Tensors`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.n = dataset, len(dataset)

    def shuffled_batches(self, cfg: TrainConfig, generator: torch.Generator) -> Iterator[Batch]:
        b = cfg.batch_size
        for order, starts in _epochs(self.n, cfg, generator):
            indices = order.tolist()
            for start in starts:
                yield _collate(self.dataset, indices[start : start + b])

    def batch(self, start: int, stop: int) -> Batch:
        return _collate(self.dataset, range(start, stop))


def _collate(dataset: Dataset, indices: Sequence[int]) -> Batch:
    """Stack dataset items into one batch, in the calling process (no DataLoader workers)."""
    items = [dataset[i] for i in indices]
    xs = [torch.as_tensor(item[0]) for item in items]
    labels = [item[1] for item in items]
    yb = torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.as_tensor(labels)
    return torch.stack(xs), yb
