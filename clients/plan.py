"""How many local steps a device takes, and at what sampling rate: the one rule the trainers
(clients.training, clients.dp, clients.vectorized) follow and the server relies on (the
privacy accountant's events, SCAFFOLD's control variates).

A device with n examples and batch size B has ceil(n / B) batches per epoch:
- plain SGD: each epoch a seeded permutation cut into ceil(n / B) consecutive batches;
- DP-SGD (Opacus DPDataLoader semantics): each step a Poisson sample of the n examples at
  rate q = 1 / ceil(n / B), ceil(n / B) steps per epoch, empty samples included.
Either way local_epochs * ceil(n / B) steps, cut at max_steps when one is set.
"""

from __future__ import annotations

import math

import torch

from clients.events import DPSGDEvent


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def local_steps(num_examples: int, *, local_epochs: int, batch_size: int, max_steps: int | None = None) -> int:
    """Optimizer steps of one fit on `num_examples` examples."""
    steps = local_epochs * batches_per_epoch(num_examples, batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def poisson_rate(num_examples: int, batch_size: int) -> float:
    """DP-SGD's per-example sampling rate q = 1 / ceil(n / B)."""
    return 1.0 / batches_per_epoch(num_examples, batch_size)


def public_count(public_examples: int | None, n: int) -> int:
    """The count that sets DP-SGD's q, steps and expected batch size: `public_examples` if
    given (a positive int), else n, the size of the data given (then treated as public)."""
    if public_examples is None:
        return n
    if isinstance(public_examples, bool) or not isinstance(public_examples, int) or public_examples < 1:
        raise ValueError(f"public_examples must be a positive int, got {public_examples!r}")
    return public_examples


def dpsgd_event(
    num_examples: int, *, batch_size: int, local_epochs: int, noise_multiplier: float, max_steps: int | None = None
) -> DPSGDEvent:
    """The privacy event of one DP-SGD fit: `steps` Poisson-subsampled Gaussian mechanisms."""
    return DPSGDEvent(
        noise_multiplier=noise_multiplier,
        sample_rate=poisson_rate(num_examples, batch_size),
        steps=local_steps(num_examples, local_epochs=local_epochs, batch_size=batch_size, max_steps=max_steps),
    )


def poisson_masks(num_examples: int, sample_rate: float, steps: int, generator: torch.Generator) -> torch.Tensor:
    """bool [steps, num_examples]: step s uses example j iff mask[s, j]. Each step draws
    torch.rand(n) < q from `generator` in turn (Opacus's UniformWithReplacementSampler's draw;
    rand is in [0, 1), so q = 1 takes every example); clients.dp and clients.vectorized both
    take their batches from here, so a device's batches do not depend on the trainer."""
    if steps == 0:
        return torch.zeros((0, num_examples), dtype=torch.bool)
    return torch.stack([torch.rand(num_examples, generator=generator) < sample_rate for _ in range(steps)])
