"""The fixed-point grid every SecAgg+ round of a run encodes updates on, from the run config.

secure_rounds encodes on it; privacy.dpfedavg and privacy.sample_level measure the sensitivity
of a secure sum in its steps. They import it from here (it imports neither, nor Flower).

Two grids:
* device updates (the default, and user-level DP): each coordinate clipped to [-r, r] on a
  signed b-bit grid (`secagg.clip_range`, `secagg.bits`; fedsim.secagg.quantize).
* distributed DP-SGD (`privacy.dpsgd.noise=distributed`, fedsim.privacy.distributed_sgd): a
  device sends the sum of its examples' clipped, scaled gradients, each example rounded on its
  own, so the grid is sized from one example's contribution: its L2 norm lr C / B spans
  EXAMPLE_LEVELS grid steps (a power of two, at least 16 sqrt(d), so conditional rounding's
  d / 4 term adds under 0.1% to its norm bound), and the device range holds
  DEVICE_EXAMPLES_LIMIT such examples (secagg.bits and clip_range do not apply).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsim.config import FedsimConfig
from fedsim.secagg.quantize import FixedPoint

#: A device of distributed DP-SGD sums at most this many examples a round (the ring is sized for it).
DEVICE_EXAMPLES_LIMIT = 1 << 24


@dataclass(frozen=True)
class SecureEncoding:
    """What a SecAgg+ round needs from the DP mechanism (grid units of the round's encoding).

    norm_bound: D2, the L2 bound every device's rounded update (user-level DP) or each of its
    rounded example contributions (distributed DP-SGD) is held to (conditional randomized
    rounding). update_variance / count_variance: distributed noise, the Skellam
    variance per coordinate that every released sum must carry, even when it holds only the
    fewest honest inputs the protocol allows (0: the server adds central noise instead).
    """

    norm_bound: float
    update_variance: float = 0.0
    count_variance: float = 0.0


def encoding_clip(cfg: FedsimConfig) -> float:
    """The per-coordinate range r of the round's grid (device updates)."""
    sa, user = cfg.secagg, cfg.privacy.dpfedavg
    return sa.clip_range or (user.clip_norm if user is not None and not user.adaptive_clipping else 1.0)


def grid_step(cfg: FedsimConfig) -> float:
    """The grid spacing r / (2^(b-1) - 1) of every SecAgg+ round of `cfg` (device updates)."""
    return FixedPoint(encoding_clip(cfg), cfg.secagg.bits, 64).step


def distributed_dpsgd(cfg: FedsimConfig) -> bool:
    """Whether devices send DP-SGD gradient sums with distributed noise (privacy.dpsgd.noise)."""
    dp = cfg.privacy.dpsgd
    return dp is not None and dp.noise == "distributed" and cfg.secagg.name != "none"


@dataclass(frozen=True)
class ExampleGrid:
    """The grid of distributed DP-SGD for a model of `dim` parameters (module doc).

    `scale`: what a device multiplies each clipped example gradient by (-lr / B: the sum is
    its model update); `example_norm`: the L2 norm of one scaled clipped gradient in grid steps
    (lr C / B / step), before rounding."""

    clip: float  # FixedPoint range: levels x step
    bits: int
    step: float  # FixedPoint(clip, bits).step, the grid spacing
    scale: float
    example_norm: float


def example_levels(dim: int) -> int:
    """Grid steps spanned by one example's clipped contribution: a power of two >= max(4096, 16 sqrt(dim))."""
    return 1 << max(12, math.ceil(math.log2(16 * math.sqrt(dim))))


def example_grid(cfg: FedsimConfig, dim: int) -> ExampleGrid:
    """The distributed DP-SGD grid of `cfg` for `dim` parameters (a pure function of both:
    server and devices derive the same one)."""
    dp, a = cfg.privacy.dpsgd, cfg.algorithm
    assert dp is not None
    per_example = a.lr * dp.max_grad_norm / a.batch_size  # L2 norm of one scaled clipped gradient
    levels = example_levels(dim)
    bits = (levels * DEVICE_EXAMPLES_LIMIT).bit_length() + 1  # L = 2^(bits-1) - 1 >= levels x limit
    half = (1 << (bits - 1)) - 1
    clip = per_example / levels * half
    step = FixedPoint(clip, bits, 64).step
    return ExampleGrid(clip=clip, bits=bits, step=step, scale=-a.lr / a.batch_size, example_norm=per_example / step)


def grid(cfg: FedsimConfig, dim: int) -> tuple[float, int]:
    """(range, bits) of the FixedPoint every SecAgg+ round of `cfg` encodes on."""
    if distributed_dpsgd(cfg):
        g = example_grid(cfg, dim)
        return g.clip, g.bits
    return encoding_clip(cfg), cfg.secagg.bits
