"""Distributed DP noise on the quantization grid: the Skellam mechanism.

Agarwal, Kairouz, Liu 2021 ("The Skellam Mechanism for Differentially Private Federated
Learning", NeurIPS): each device adds integer noise Sk(mu_i) = Poisson(mu_i/2) - Poisson(mu_i/2)
(mean 0, variance mu_i) to its quantized vector before secure aggregation. Skellam is closed
under summation, Sk(a) + Sk(b) = Sk(a + b), so the aggregate carries Sk(sum of the survivors'
mu_i) and the server only ever sees the noisy sum. Sampled exactly with numpy's Poisson sampler.

Noise is split for the *fewest honest inputs* a released sum can hold, h (fedsim.secure_rounds:
mu_device = mu_total / h, h = max(t, n - D) - C): the server aborts a round with fewer inputs,
and colluders may strip their own shares, so any sum it can decode carries at least
Sk(mu_total), whatever drops out, and the round's privacy
guarantee (fedsim.privacy.skellam) is fixed before the round starts. With s > h honest survivors the
sum carries Sk(s mu_device) (`realized_total_variance`): more noise than accounted, never less.
Variances here are in grid units; `grid_variance` converts a float-domain standard deviation
with the quantization step.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "grid_variance",
    "per_device_variance",
    "realized_total_variance",
    "skellam",
    "skellam_tail_bound",
]


def skellam(mu: float, size: int | tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Int64 Skellam noise with variance `mu` per coordinate (Agarwal et al. 2021, Def. 2.3).

    Difference of two independent Poisson(mu/2) draws; mu = 0 gives zeros.
    """
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"Skellam variance must be finite and >= 0, got {mu}")
    if mu == 0:
        return np.zeros(size, dtype=np.int64)
    return rng.poisson(mu / 2, size).astype(np.int64) - rng.poisson(mu / 2, size).astype(np.int64)


def per_device_variance(target_total_variance: float, n_expected: int) -> float:
    """Per-device Skellam variance so the sum over `n_expected` devices (the minimum number of
    survivors, for a guarantee) has the target variance."""
    if n_expected < 1:
        raise ValueError(f"n_expected must be >= 1, got {n_expected}")
    if not (math.isfinite(target_total_variance) and target_total_variance >= 0):
        raise ValueError(f"target variance must be finite and >= 0, got {target_total_variance}")
    return target_total_variance / n_expected


def realized_total_variance(per_device: float, n_survivors: int) -> float:
    """Variance of the aggregate noise when `n_survivors` devices' inputs are summed (at least
    the accounted total when the shares were sized for the minimum number of survivors)."""
    if n_survivors < 0:
        raise ValueError(f"n_survivors must be >= 0, got {n_survivors}")
    return per_device * n_survivors


def grid_variance(sigma: float, step: float) -> float:
    """Variance in grid units of noise with float-domain standard deviation sigma: (sigma/step)^2."""
    if step <= 0:
        raise ValueError(f"quantization step must be > 0, got {step}")
    return (sigma / step) ** 2


def skellam_tail_bound(total_variance: float, failure_prob: float, dimension: int = 1) -> int:
    """Integer B with P(max over `dimension` coordinates of |Sk(total_variance)| > B) <= failure_prob.

    Chernoff bound from the Skellam MGF E[e^{lZ}] = exp(mu (cosh l - 1)) at l = asinh(a/mu):
    P(Z >= a) <= exp(mu (sqrt(1 + (a/mu)^2) - 1) - a asinh(a/mu)), doubled for both tails and
    union-bounded over coordinates. Pass B as `noise_bound` to the quantizer so the noisy sum
    cannot wrap around Z_{2^m} except with probability `failure_prob`.
    """
    if not 0 < failure_prob < 1:
        raise ValueError(f"failure_prob must be in (0, 1), got {failure_prob}")
    if dimension < 1:
        raise ValueError(f"dimension must be >= 1, got {dimension}")
    if total_variance <= 0:
        return 0
    mu = float(total_variance)
    log_target = math.log(failure_prob / (2 * dimension))

    def log_tail(a: float) -> float:
        r = a / mu
        return mu * (math.sqrt(1 + r * r) - 1) - a * math.asinh(r)

    lo, hi = 0, max(1, int(math.ceil(math.sqrt(mu))))
    while log_tail(hi) > log_target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # log_tail is decreasing in a
        mid = (lo + hi) // 2
        if log_tail(mid) > log_target:
            lo = mid
        else:
            hi = mid
    return hi
