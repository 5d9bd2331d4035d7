"""The audit's seeded streams and the sample-level canary devices' data (fedsim.audit).

Workers build a canary device's training data from the config alone (`canary_device_data`), as
the server's audit does to score it; this module holds what both need, below fedsim.worker and
fedsim.audit, so the worker does not import the server's audit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedsim.config import FedsimConfig

STREAM = 0xA0D17  # the audit's own stream of the run seed
DIRECTIONS, CANARY_SAMPLING, EXAMPLES, INCLUSION, DEVICE_SAMPLING, FILLER, BOOTSTRAP, USER_INCLUSION = range(1, 9)


def audit_rng(cfg: FedsimConfig, *ints: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, STREAM, *ints])


def canary_examples(cfg: FedsimConfig, input_shape: tuple[int, ...], num_classes: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(x, y, included) of the m canary examples: inputs N(0, (2 s_f)^2) per feature f, with s_f
    the spread of `like` (real training inputs), labels uniform over the classes; each included
    with probability 1/2."""
    m = cfg.audit.canary_examples
    rng = audit_rng(cfg, EXAMPLES)
    flat = like.reshape(len(like), -1).to(torch.float64)
    std = flat.std(0).numpy() if len(flat) > 1 else np.ones(int(np.prod(input_shape)))
    # Centred at zero, twice the data's spread: canaries far from the data and from each other
    # (a shared mean would make their gradients alike, and an excluded canary look included).
    x = 2 * np.maximum(std, 1e-3) * rng.standard_normal((m, std.size))
    y = rng.integers(0, num_classes, m)
    included = audit_rng(cfg, INCLUSION).random(m) < 0.5
    return torch.from_numpy(x.astype(np.float32)).reshape(m, *input_shape), torch.from_numpy(y.astype(np.int64)), included


def canary_slices(cfg: FedsimConfig) -> list[slice]:
    """Which canary examples each canary device holds (near-equal contiguous shares)."""
    bounds = np.linspace(0, cfg.audit.canary_examples, cfg.audit.canary_devices + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def is_canary_device(cfg: FedsimConfig, device_id: int) -> bool:
    """Canary devices have ids population .. population + audit.canary_devices - 1."""
    return bool(cfg.audit.canary_examples) and cfg.population <= device_id < cfg.population + cfg.audit.canary_devices


def filler_device(cfg: FedsimConfig, index: int) -> int:
    """The real device whose data canary device `index` copies (its ordinary examples)."""
    return int(audit_rng(cfg, FILLER, index).integers(0, cfg.population))


def canary_device_data(cfg: FedsimConfig, dataset: Any, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A canary device's training data: a real device's examples plus its included canaries."""
    index = device_id - cfg.population
    fx, fy = dataset.device_data(filler_device(cfg, index))
    cx, cy, included = canary_examples(cfg, dataset.input_shape, dataset.num_classes, reference_inputs(cfg, dataset))
    part = canary_slices(cfg)[index]
    keep = np.flatnonzero(included[part]) + part.start
    return torch.cat([fx, cx[keep]]), torch.cat([fy, cy[keep]])


def canary_public_examples(cfg: FedsimConfig, dataset: Any, device_id: int) -> int:
    """A canary device's public example count: its filler's count plus all its canary slots.

    Fixed before the draw of which canaries are included, so DP-SGD's q and steps on this
    device do not depend on that draw (the audit measures the mechanism the ledger accounts)."""
    index = device_id - cfg.population
    part = canary_slices(cfg)[index]
    return int(dataset.num_examples(filler_device(cfg, index))) + part.stop - part.start


def reference_inputs(cfg: FedsimConfig, dataset: Any) -> torch.Tensor:
    """Real inputs the canary inputs imitate: the first device's (the same on server and workers)."""
    return dataset.device_data(0)[0]
