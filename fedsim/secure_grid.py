"""The fixed-point grid every SecAgg+ round of a run encodes updates on, from the run config.

secure_rounds encodes on it; privacy.dpfedavg measures the sensitivity of a secure sum in its
steps. Both import it from here (it imports neither, nor Flower).
"""

from __future__ import annotations

from fedsim.config import FedsimConfig
from fedsim.secagg.quantize import FixedPoint


def encoding_clip(cfg: FedsimConfig) -> float:
    """The per-coordinate range r of the round's grid."""
    sa, user = cfg.secagg, cfg.privacy.dpfedavg
    return sa.clip_range or (user.clip_norm if user is not None and not user.adaptive_clipping else 1.0)


def grid_step(cfg: FedsimConfig) -> float:
    """The grid spacing r / (2^(b-1) - 1) of every SecAgg+ round of `cfg`."""
    return FixedPoint(encoding_clip(cfg), cfg.secagg.bits, 64).step
