"""Cohort-vectorized local training: a worker's devices train together as one batched computation.

`LocalTrainer` and `DPSGDTrainer` train device after device; for the small models federated
simulations use, most of a fit is per-call overhead (Python, dispatcher, autograd, Opacus
hooks), not arithmetic. `VectorizedTrainer` runs the same local training for many devices
at once with `torch.func`: each trainable parameter is stacked into one tensor with a
leading device dimension, the model is run with `functional_call` on those stacked weights,
and `vmap` maps the gradient computation over devices. For DP-SGD the per-example
gradients come from the same vmap: vmap over devices of vmap over examples of grad.

    trainer = VectorizedTrainer(model, TrainConfig(lr=0.05))            # or dp=DPSGDConfig(...)
    results = trainer.fit_many(global_params, [data[i] for i in cohort],
                               [(run_seed, rnd, i) for i in cohort])
    for device_id, result in zip(cohort, results):
        if isinstance(result, Exception):   # e.g. ValueError("device has no training examples")
            ...                              # this device failed; the others trained normally
        else:
            ...                              # a TrainResult, as LocalTrainer/DPSGDTrainer.fit returns

Same updates as the one-by-one trainers. Every random draw is the one-by-one path's draw,
from a generator seeded the same way and in the same order per device: the per-epoch
permutations (`LocalTrainer`), or the Poisson masks `torch.rand(n) < q` and, from the noise
generator seeded by the first draw, one `torch.normal` per parameter per step (`DPSGDTrainer`
through Opacus's `DPOptimizer.add_noise`). The draws are cheap Python loops per device; the
forward and backward passes are batched over devices. The results agree with the one-by-one
trainers to float rounding (the batched kernels sum in a different order), noise included.

Unequal devices are handled by masking. At each step every device contributes a padded
batch of the step's largest batch size plus a mask: the padding repeats the device's own
first example (so everything stays finite) and is excluded from the loss, from the
gradient, from clipping and from the sums. Devices are sorted by their number of steps, so
the devices still training at a step are a prefix of the chunk: a device that has finished
is simply not computed any more, and neither its weights nor its momentum change.

DP-SGD is Algorithm 1 of Abadi et al. 2016, "Deep Learning with Differential Privacy"
(CCS'16), exactly as `clients.dp.DPSGDTrainer` runs it with Opacus: per step a Poisson
sample with rate q = 1 / ceil(n / B), one gradient per sampled example, each clipped to L2
norm at most C (Opacus's factor min(1, C / (norm + 1e-6)), the norm over all parameters),
summed, plus Gaussian noise N(0, sigma^2 C^2 I), divided by the device's own expected batch
size n / ceil(n / B); then FedProx's proximal gradient and the SGD step (momentum and
weight decay, torch.optim.SGD semantics). An empty Poisson sample is a noise-only step. See
clients/dp.py for why each choice (the exact expected batch size, two generators, the
proximal term as post-processing) is made; this module reproduces them.

Requirements (`vectorizable` checks them and says why not): no dropout (it draws from the
global RNG), no nn.LSTM/GRU/RNN (fused kernels torch.func cannot batch), no BatchNorm or other layer with running statistics, no buffers at all, no
module hooks (Opacus's GradSampleModule hooks in particular: give this trainer the model
before, or instead of, wrapping it for `DPSGDTrainer`), and `loss_fn` must be a mean over
the batch of per-example losses, like `F.cross_entropy`'s default (each device's loss is the
masked mean of per-example losses). The model's own parameters are never written: the
stacked copies live inside `fit_many`. The model's train/eval flags are set to training for
the call and restored afterwards, as the one-by-one trainers train in training mode.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from clients.events import DPSGDEvent
from clients.params import trainable_params, unflatten_views
from clients.plan import batches_per_epoch, local_steps, poisson_masks, poisson_rate, public_count
from clients.training import (
    Data,
    LossFn,
    Seed,
    TrainConfig,
    TrainResult,
    _collate,
    _epochs,
    _Items,
    _source,
)
from clients.seeding import child_seed, new_generator, seed_generator

if TYPE_CHECKING:  # clients.dp imports Opacus (over a second): only loaded when DP is used
    from clients.dp import DPSGDConfig

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of working memory per chunk of devices

TORCH_CHECKED = "2.13."  # the torch whose torch/_functorch/eager_transforms.py _grads_without_dynamo was read against


def _grads_without_dynamo() -> bool:
    """Let torch.func's grad run without importing torch._dynamo where compiled autograd is off.

    Every torch.func.grad call runs its backward pass inside
    `torch._dynamo.compiled_autograd._disable()` (torch/_functorch/eager_transforms.py,
    `_autograd_grad`), and that attribute access imports all of torch._dynamo (with SymPy):
    3.0 s of CPU and ~60 MB in every process that trains vectorized, measured on the 2-core
    machine, most of a simulation worker's first round. The context only switches compiled
    autograd off for the call (a C++ switch, `torch._C._dynamo.compiled_autograd`, plus
    Python-side flags of torch._dynamo), and compiled autograd can only have been switched on
    through torch._dynamo: while torch._dynamo is not imported, `_autograd_grad` here runs the
    same torch.autograd.grad call with the same C++ switch set and restored around it (same
    gradients, bit for bit); once it is imported, torch's own function runs. Installed once, for
    torch 2.13 only and only where torch._dynamo is not yet imported (another torch, or a
    process that already uses torch._dynamo, is left as it is). Returns whether it is installed."""
    from torch._functorch import eager_transforms

    original = getattr(eager_transforms, "_autograd_grad", None)
    if original is None or getattr(original, "fedsim_without_dynamo", False):
        return original is not None
    switch = getattr(getattr(getattr(torch._C, "_dynamo", None), "compiled_autograd", None), "set_autograd_compiler", None)
    if not torch.__version__.startswith(TORCH_CHECKED) or switch is None or "torch._dynamo" in sys.modules:
        return False  # another torch, or torch._dynamo already loaded (its tracer may know the original)

    def _autograd_grad(
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        grad_outputs: Sequence[torch.Tensor] | None = None,
        retain_graph: bool = False,
        create_graph: bool = True,
    ) -> tuple[torch.Tensor, ...]:
        if "torch._dynamo" in sys.modules:
            return original(outputs, inputs, grad_outputs, retain_graph=retain_graph, create_graph=create_graph)
        if grad_outputs is None:
            pairs = [(out, None) for out in outputs if out.requires_grad]
        else:
            pairs = [(out, go) for out, go in zip(outputs, grad_outputs) if out.requires_grad]
        if not pairs:
            return tuple(torch.zeros_like(inp) for inp in inputs)
        # Compiled autograd off for the call, as _disable() does, by the same C++ switch.
        prior = switch(None, False)
        try:
            grads = torch.autograd.grad(
                tuple(out for out, _ in pairs),
                inputs,
                None if grad_outputs is None else tuple(go for _, go in pairs),
                retain_graph=retain_graph,
                create_graph=create_graph,
                allow_unused=True,
            )
        finally:
            switch(*prior)
        return tuple(torch.zeros_like(inp) if g is None else g for g, inp in zip(grads, inputs))

    _autograd_grad.fedsim_without_dynamo = True  # type: ignore[attr-defined]
    eager_transforms._autograd_grad = _autograd_grad
    return True


_grads_without_dynamo()

_CALL_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def vectorizable(
    model: nn.Module,
    config: TrainConfig | None = None,
    dp: DPSGDConfig | None = None,
    *,
    example: tuple[torch.Tensor, torch.Tensor] | None = None,
    loss_fn: LossFn = F.cross_entropy,
) -> str | None:
    """None if `VectorizedTrainer` can train `model`, else a one-line reason why not.

    The checks are structural (every TrainConfig and DPSGDConfig setting is supported):
    trainable parameters exist; no dropout (global RNG), no BatchNorm or running statistics,
    no buffers, no forward/backward hooks (e.g. Opacus's). Whether torch.func can vmap every
    operation of a custom forward cannot be seen from the structure: pass `example`, a
    small `(x, y)` batch of real inputs, to also try one vectorized step on two devices
    (a trial run of one step with `loss_fn`; the model's parameters are not changed).
    """
    if not trainable_params(model):
        return "model has no trainable parameters"
    for name, m in model.named_modules():
        at = f"{type(m).__name__} at {repr(name) if name else 'the root'}"
        if isinstance(m, nn.modules.dropout._DropoutNd):
            return f"{at} draws from torch's global RNG (dropout), which the vectorized path does not support"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"{at} mixes the examples of a batch and keeps running statistics; use GroupNorm"
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            return f"{at} keeps running statistics (track_running_stats=True), state the vectorized path does not carry"
        if isinstance(m, nn.RNNBase):
            # Its fused kernel has no torch.func batching rule: vmap would loop over the devices
            # one at a time, slower than the one-by-one trainers (Opacus's DPLSTM is vmappable).
            return f"{at} runs a fused recurrent kernel torch.func cannot batch; train one by one"
        if any(True for _ in m.buffers(recurse=False)):
            return f"{at} holds buffers, state the vectorized path does not carry per device"
        if any(getattr(m, attr, None) for attr in _CALL_HOOK_DICTS):
            return f"{at} has forward/backward hooks (e.g. Opacus's GradSampleModule), which would fire inside vmap"
    glob = nn.modules.module
    kinds = ("forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")
    if any(getattr(glob, f"_global_{kind}", None) for kind in kinds):
        return "global module hooks are registered (torch.nn.modules.module.register_module_*_hook)"
    if example is not None:
        trial_config = replace(config or TrainConfig(lr=0.01), max_steps=1)
        try:
            trainer = VectorizedTrainer(model, trial_config, dp, loss_fn=loss_fn)
            params = torch.cat([p.detach().reshape(-1).float() for p in trainable_params(model)])
            for result in trainer.fit_many(params, [example, example], [0, 1]):
                if isinstance(result, Exception):
                    raise result
        except Exception as err:  # noqa: BLE001 -- the reason is the point: report it, do not raise
            first = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            return f"torch.func could not run a vectorized step on the example ({first})"
    return None


class VectorizedTrainer:
    """Local SGD (or DP-SGD with `dp`) for many devices at once; same results as fitting one by one.

    `fit_many(global_params, datas, seeds)` equals, device for device,
    `LocalTrainer(model, config, loss_fn=loss_fn).fit(global_params, datas[i], seed=seeds[i])`
    or, with `dp`, `DPSGDTrainer(model, config, dp, loss_fn=loss_fn).fit(...)`: the same
    update (to float rounding), num_examples, metrics ("loss", "steps", and for DP
    "clip_fraction") and privacy event. `dp.grad_sample_mode` is ignored: the per-example
    gradients are computed by torch.func, the same values any Opacus mode computes.

    Devices are trained in chunks so that memory stays bounded: at most `max_devices` per
    chunk, and no more than fit in `memory_budget` bytes by an estimate made from the
    parameter count, the batch size (twice it for DP's variable Poisson batches) and the
    activation memory of one example (measured once per input shape). Devices are sorted
    by their number of steps before chunking, so a chunk's devices train for similar lengths.

    Raises ValueError at construction if `vectorizable(model, config, dp)` gives a reason.
    The model's parameters are only read (the stacked per-device weights are private copies).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        dp: DPSGDConfig | None = None,
        *,
        loss_fn: LossFn = F.cross_entropy,
        max_devices: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        reason = vectorizable(model, config, dp)
        if reason is not None:
            raise ValueError(f"cannot vectorize training: {reason}")
        if max_devices is not None and max_devices < 1:
            raise ValueError(f"max_devices must be >= 1 or None, got {max_devices}")
        if memory_budget < 1:
            raise ValueError(f"memory_budget must be >= 1 byte, got {memory_budget}")
        self.model = model
        self.loss_fn = loss_fn
        self._config = config
        self._dp = dp
        self.max_devices = max_devices
        self.memory_budget = memory_budget
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self._names = [name for name, _ in named]
        self._params = trainable_params(model)
        if [id(p) for _, p in named] != [id(p) for p in self._params]:  # both walk parameters() order
            raise ValueError("cannot vectorize training: named and flat parameter orders differ")
        self._num_params = sum(p.numel() for p in self._params)
        # Trains where the model's parameters are (as LocalTrainer): data, indices and the
        # stacked weights move there; the random draws stay on the CPU (the seeded generators
        # are CPU ones) and the updates come back to it.
        self._device = self._params[0].device
        self._activation_bytes: dict[tuple, int] = {}  # per (example shape, dtype): bytes saved for backward
        self._plain_step = vmap(grad(self._batch_loss, has_aux=True))
        self._dp_step = vmap(self._clipped_sum)
        self._per_example_loss = _per_example_loss(loss_fn)

    @property
    def config(self) -> TrainConfig:
        return self._config

    @property
    def dp(self) -> DPSGDConfig | None:
        return self._dp

    # ------------------------------------------------------------------------- public API

    def fit_many(
        self,
        global_params: torch.Tensor,
        datas: Sequence[Data],
        seeds: Sequence[Seed],
        *,
        public_examples: Sequence[int | None] | None = None,
    ) -> list[TrainResult | Exception]:
        """Train every device from `global_params`; one result per device, in input order.

        A device's entry is its TrainResult, or the exception its one-by-one fit would have
        raised before training (ValueError for a device without examples, x and y of
        different lengths, a bad seed), or a ValueError if its example shape or dtype differs
        from the first good device's. Failed devices take no part in the computation, so
        they never affect the others. Errors in the batched computation itself (a model
        torch.func cannot run, say) are raised: they would fail every device alike.

        `global_params` is only read. Seeds are as for `LocalTrainer.fit`: an int, a
        sequence of ints, or a torch.Generator (used as given, and advanced). The updates
        of one chunk of devices are rows (views) of one [devices, params] float32 tensor.
        `public_examples` (DP-SGD only, one entry per device): as for `DPSGDTrainer.fit`, the
        count that sets each device's q, steps, expected batch size and `num_examples` (a
        device without examples still fails here: `DPSGDTrainer.fit` runs it as noise only).
        """
        if len(datas) != len(seeds):
            raise ValueError(f"got {len(datas)} data sets but {len(seeds)} seeds")
        publics = [None] * len(datas) if public_examples is None else list(public_examples)
        if len(publics) != len(datas):
            raise ValueError(f"got {len(datas)} data sets but {len(publics)} public example counts")
        global_flat = global_params.detach()
        if global_flat.dim() != 1 or global_flat.numel() != self._num_params:
            raise ValueError(
                f"flat parameter vector has the wrong size: expected {self._num_params} values "
                f"(1-D), got shape {tuple(global_flat.shape)}"
            )
        results: list[TrainResult | Exception | None] = [None] * len(datas)
        plans: list[_Plan] = []
        reference: tuple | None = None
        for i, (data, seed) in enumerate(zip(datas, seeds, strict=True)):
            try:
                plan = self._plan(i, data, seed, publics[i])
                signature = (tuple(plan.x.shape[1:]), plan.x.dtype, tuple(plan.y.shape[1:]), plan.y.dtype)
                if reference is None:
                    reference = signature
                elif signature != reference:
                    raise ValueError(
                        f"examples of shape/dtype {signature} differ from the cohort's {reference}; "
                        "train this device on its own"
                    )
            except Exception as err:  # noqa: BLE001 -- this device's error, reported in its slot
                results[i] = err
                continue
            plans.append(plan)
        if plans:
            anchors = [
                a.to(p.device, p.dtype)
                for a, p in zip(unflatten_views(global_flat, self._params), self._params, strict=True)
            ]
            # Under DP the order (hence the chunks and their padding) follows public counts only.
            plans.sort(key=lambda p: (-p.steps, -(p.public if self._dp is not None else p.n), p.index))
            was_training = [(m, m.training) for m in self.model.modules()]
            self.model.train()
            try:
                chunk = self._chunk_size(plans[0])
                for start in range(0, len(plans), chunk):
                    self._run_chunk(plans[start : start + chunk], anchors, global_flat, results)
            finally:
                for m, mode in was_training:
                    m.training = mode
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------------- the draws

    def _plan(self, index: int, data: Data, seed: Seed, public_examples: int | None = None) -> _Plan:
        """One device's data and every random draw of its fit that does not depend on the weights."""
        cfg = self._config
        source = _source(data)
        n = source.n
        if n == 0:
            raise ValueError("device has no training examples")
        if isinstance(source, _Items):
            x, y = _collate(source.dataset, range(n))  # all of it, in order: same batches as the one-by-one path
        else:
            x, y = source.x, source.y
        generator = seed if isinstance(seed, torch.Generator) else new_generator(seed)
        if self._dp is None:
            return _plain_plan(index, x, y, n, cfg, generator)
        return _dp_plan(index, x, y, n, cfg, generator, public_count(public_examples, n))

    # ------------------------------------------------------------------------- the compute

    def _batch_loss(self, params: dict, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, count: torch.Tensor):
        """One device's mean loss over its real examples (the padded ones masked out)."""
        out = functional_call(self.model, params, (x,))
        losses = self._per_example_loss(out, y)
        loss = torch.where(mask, losses, 0.0).sum() / count
        return loss, loss.detach()

    def _example_loss(self, params: dict, x: torch.Tensor, y: torch.Tensor):
        out = functional_call(self.model, params, (x.unsqueeze(0),))
        loss = self.loss_fn(out, y.unsqueeze(0))
        return loss, loss.detach()

    def _clipped_sum(self, params: dict, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
        """One device's DP-SGD gradient sum (Abadi et al. 2016, Alg. 1, "clip" and the sum of "add noise").

        Per-example gradients (vmap over examples of grad), each example's L2 norm over all
        parameters (per-parameter norms, then their norm, as Opacus does), clipped by
        min(1, C / (norm + 1e-6)); padded examples get factor 0, so they add nothing.
        Returns (summed clipped gradients per parameter, norms, per-example losses).
        """
        grads, losses = vmap(grad(self._example_loss, has_aux=True), in_dims=(None, 0, 0))(params, x, y)
        per_param = [grads[name] for name in self._names]
        norms = torch.stack([g.flatten(1).norm(2, dim=-1) for g in per_param], dim=1).norm(2, dim=1)
        factor = (self._dp.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        factor = torch.where(mask, factor, 0.0)
        summed = [torch.einsum("i,i...", factor, g) for g in per_param]
        return summed, norms, losses

    def _run_chunk(
        self,
        plans: list[_Plan],
        anchors: list[torch.Tensor],
        global_flat: torch.Tensor,
        results: list,
    ) -> None:
        """Train one chunk of devices (sorted by steps, descending) and store their results."""
        cfg, dp = self._config, self._dp
        num = len(plans)
        total_steps = plans[0].steps
        lengths = [p.n for p in plans]
        offsets = [0]
        for n in lengths[:-1]:
            offsets.append(offsets[-1] + n)
        dev = self._device
        x_all = torch.cat([p.x for p in plans]).to(dev)
        y_all = torch.cat([p.y for p in plans]).to(dev)
        width = max(p.idx.shape[1] for p in plans)
        # idx[d, s, j]: row of x_all of device d's j-th example at step s (padding: its first example).
        idx = torch.tensor(offsets).view(num, 1, 1).repeat(1, total_steps, width)
        counts = torch.zeros(num, total_steps, dtype=torch.long)
        for d, p in enumerate(plans):
            idx[d, : p.steps, : p.idx.shape[1]] += p.idx
            counts[d, : p.steps] = p.counts
        batch_max = counts.max(dim=0).values.tolist()
        active = [sum(1 for p in plans if p.steps > s) for s in range(total_steps)]  # a prefix: sorted by steps
        idx, counts, positions = idx.to(dev), counts.to(dev), torch.arange(width, device=dev)

        params = [a.unsqueeze(0).expand(num, *a.shape).clone() for a in anchors]
        moments = [torch.zeros_like(p) for p in params] if cfg.momentum else None
        loss_sum = torch.zeros(num, dtype=torch.float64, device=dev)
        if dp is not None:
            nonempty = torch.zeros(num, dtype=torch.long, device=dev)
            clipped = torch.zeros(num, dtype=torch.long, device=dev)
            std = dp.noise_multiplier * dp.max_grad_norm
            noise_generators = [p.noise_generator for p in plans]
            scale = torch.tensor([p.expected_batch_size for p in plans], dtype=params[0].dtype, device=dev)

        for s in range(total_steps):
            k, bmax = active[s], batch_max[s]
            ps = [p[:k] for p in params]
            count = counts[:k, s]
            if bmax > 0:
                rows = idx[:k, s, :bmax]
                xb, yb = x_all[rows], y_all[rows]
                mask = positions[:bmax] < count.unsqueeze(1)
            named = dict(zip(self._names, ps, strict=True))
            if dp is None:
                grads_by_name, losses = self._plain_step(named, xb, yb, mask, count.to(ps[0].dtype))
                grads = [grads_by_name[name] for name in self._names]
                loss_sum[:k] += losses.double()
            else:
                if bmax > 0:
                    grads, norms, example_losses = self._dp_step(named, xb, yb, mask)
                    has = count > 0
                    batch_loss = torch.where(mask, example_losses, 0.0).sum(1) / count.clamp(min=1)
                    loss_sum[:k] += torch.where(has, batch_loss, 0.0).double()
                    nonempty[:k] += has
                    clipped[:k] += ((norms > dp.max_grad_norm) & mask).sum(1)
                else:  # every active device drew an empty batch: noise-only steps
                    grads = [torch.zeros_like(p) for p in ps]
                if std != 0:  # Opacus's _generate_noise draws nothing for std 0
                    for g in grads:
                        noise = torch.empty(g.shape, dtype=g.dtype)  # drawn on the CPU: the generators are CPU ones
                        for d in range(k):  # each device's own generator, parameter by parameter
                            if dp.secure_mode:
                                noise[d] = _secure_noise(noise[d], std, noise_generators[d])
                            else:
                                noise[d].normal_(0.0, std, generator=noise_generators[d])
                        g.add_(noise.to(dev))
                for g in grads:  # divided by each device's own expected batch size n / ceil(n / B)
                    g.div_(scale[:k].view((k,) + (1,) * (g.dim() - 1)))
            self._sgd_step(ps, grads, anchors, moments, k)

        updates = torch.cat([p.reshape(num, -1) for p in params], dim=1).float().sub_(global_flat.float().to(dev)).cpu()
        loss_list = loss_sum.tolist()
        if dp is not None:
            nonempty_list, clipped_list = nonempty.tolist(), clipped.tolist()
        for d, p in enumerate(plans):
            metrics = {"loss": loss_list[d] / p.steps, "steps": float(p.steps)}
            privacy = None
            if dp is not None:
                drawn = int(p.counts.sum())
                metrics = {
                    "loss": loss_list[d] / nonempty_list[d] if nonempty_list[d] else math.nan,
                    "steps": float(p.steps),
                    "clip_fraction": clipped_list[d] / drawn if drawn else math.nan,
                }
                privacy = DPSGDEvent(noise_multiplier=dp.noise_multiplier, sample_rate=p.sample_rate, steps=p.steps)
            num_examples = p.public if dp is not None else p.n
            results[p.index] = TrainResult(update=updates[d], num_examples=num_examples, metrics=metrics, privacy=privacy)

    def _sgd_step(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        anchors: list[torch.Tensor],
        moments: list[torch.Tensor] | None,
        k: int,
    ) -> None:
        """FedProx's proximal gradient, then torch.optim.SGD's step, on the first k devices in place.

        The same operations in the same order as LocalTrainer / DPSGDTrainer (proximal term
        added to the gradient, then SGD's weight decay, momentum, and the update).
        A momentum buffer starting at zero gives SGD's first-step buf = grad exactly.
        """
        cfg = self._config
        if cfg.proximal_mu > 0:
            torch._foreach_add_(grads, torch._foreach_sub(params, anchors), alpha=cfg.proximal_mu)
        if cfg.weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=cfg.weight_decay)
        if moments is not None:
            bufs = [m[:k] for m in moments]
            torch._foreach_mul_(bufs, cfg.momentum)
            torch._foreach_add_(bufs, grads)
            grads = bufs
        torch._foreach_add_(params, grads, alpha=-cfg.lr)

    # ------------------------------------------------------------------------- memory

    def _chunk_size(self, plan: _Plan) -> int:
        """Devices per chunk: `max_devices`, and what fits the memory budget by estimate."""
        cfg = self._config
        bytes_per_value = self._params[0].element_size()
        batch = cfg.batch_size if self._dp is None else 2 * cfg.batch_size
        per_device = bytes_per_value * self._num_params * 6  # weights, grads, momentum, noise, temporaries
        per_device += batch * self._example_activation_bytes(plan.x[:1], plan.y[:1])
        if self._dp is not None:
            per_device += batch * bytes_per_value * self._num_params  # the per-example gradients
        size = max(1, self.memory_budget // max(per_device, 1))
        if self.max_devices is not None:
            size = min(size, self.max_devices)
        return size

    def _example_activation_bytes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Bytes autograd saves for backward per example (measured once per input shape).

        The difference between a batch of two and a batch of one: what is saved once per
        batch (the weights, for a linear layer's input gradient) is not counted per example.
        """
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._activation_bytes:
            params = {name: p.detach().requires_grad_() for name, p in zip(self._names, self._params, strict=True)}
            one, two = (
                self._saved_bytes(params, x[:1].expand(size, *x.shape[1:]), y[:1].expand(size, *y.shape[1:])) for size in (1, 2)
            )
            self._activation_bytes[key] = max(two - one, 0)
        return self._activation_bytes[key]

    def _saved_bytes(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> int:
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.loss_fn(functional_call(self.model, params, (x.contiguous().to(self._device),)), y.contiguous().to(self._device))
        return saved


# ----------------------------------------------------------------------------- internals


@dataclass
class _Plan:
    """One device: its data and its fit's batches, drawn up front.

    idx[s, j] is the j-th example (a row of x) of step s, padded with 0 past counts[s].
    """

    index: int  # position in fit_many's input
    x: torch.Tensor
    y: torch.Tensor
    n: int
    steps: int
    idx: torch.Tensor  # [steps, width] long
    counts: torch.Tensor  # [steps] long
    sample_rate: float = 0.0  # DP only
    expected_batch_size: float = 0.0  # DP only
    noise_generator: torch.Generator | None = None  # DP only
    public: int = 0  # DP only: the public example count (TrainResult.num_examples)


def _plain_plan(index: int, x: torch.Tensor, y: torch.Tensor, n: int, cfg: TrainConfig, g: torch.Generator) -> _Plan:
    """LocalTrainer's batches: per epoch a permutation, cut into consecutive slices of batch_size."""
    b = cfg.batch_size
    per_epoch = math.ceil(n / b)
    blocks, counts = [], []
    for order, starts in _epochs(n, cfg, g):  # the same function, so the same draws and max_steps cut
        padded = order.new_zeros(per_epoch * b)
        padded[:n] = order
        blocks.append(padded.view(per_epoch, b)[: len(starts)])
        counts.extend(min(b, n - start) for start in starts)
    idx = torch.cat(blocks)
    return _Plan(index, x, y, n, len(counts), idx, torch.tensor(counts, dtype=torch.long))


def _dp_plan(
    index: int, x: torch.Tensor, y: torch.Tensor, n: int, cfg: TrainConfig, g: torch.Generator, public: int
) -> _Plan:
    """DPSGDTrainer's draws: the noise seed first, then one Poisson mask per step over the n
    examples given; q, steps and the expected batch size from the public count."""
    num_batches = batches_per_epoch(public, cfg.batch_size)
    sample_rate = poisson_rate(public, cfg.batch_size)
    steps = local_steps(public, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, max_steps=cfg.max_steps)
    noise_generator = seed_generator(torch.Generator(), child_seed(g))
    masks = poisson_masks(n, sample_rate, steps, g)
    counts = masks.sum(dim=1)
    width = int(counts.max())
    # A stable sort puts each step's sampled examples first, in ascending order (as nonzero() gives them).
    order = torch.sort((~masks).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    idx = torch.where(torch.arange(width) < counts.unsqueeze(1), order, 0)
    return _Plan(
        index,
        x,
        y,
        n,
        steps,
        idx,
        counts,
        sample_rate=sample_rate,
        expected_batch_size=public / num_batches,
        public=public,
        noise_generator=noise_generator,
    )


def _secure_noise(reference: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Opacus's secure_mode draw (DPOptimizer._generate_noise): one discarded N(0, std^2), then
    the sum of 4 draws / 2 (Holohan & Braghin 2021, Sec. 5.1: floating-point attack resistance)."""
    torch.normal(mean=0, std=std, size=(1, 1), generator=generator)
    total = torch.zeros_like(reference)
    for _ in range(4):
        total += torch.normal(mean=0, std=std, size=reference.shape, generator=generator)
    return total / 2


def _per_example_loss(loss_fn: LossFn) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-example losses of a batch-mean loss: loss_fn on each example alone (cross-entropy:
    reduction="none", averaged over any further label positions, [n, classes, T] against [n, T],
    as the batch mean averages them)."""
    if loss_fn is F.cross_entropy:
        return lambda out, y: F.cross_entropy(out, y, reduction="none").reshape(y.shape[0], -1).mean(1)
    return vmap(lambda out, y: loss_fn(out.unsqueeze(0), y.unsqueeze(0)))
