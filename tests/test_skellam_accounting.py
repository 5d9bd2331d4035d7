"""The Skellam accountant (fedsim.privacy.skellam) against independent computations.

Each closed-form bound is checked to be an upper bound of the exact Renyi divergence computed
numerically from the Skellam probability mass function (scipy), and the general subsampling
bounds are checked against dp_accounting's exact analysis of the subsampled Gaussian.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from scipy import stats
from scipy.special import logsumexp

from fedsim.privacy.skellam import (
    ORDERS,
    SkellamBlock,
    SkellamRound,
    l1_bound,
    poisson_subsampled_rdp,
    rounded_norm_bound,
    skellam_epsilon,
    skellam_rdp,
    without_replacement_subsampled_rdp,
)


def skellam_logpmf(variance: float, support: np.ndarray) -> np.ndarray:
    return stats.skellam.logpmf(support, variance / 2, variance / 2)


def renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: int) -> float:
    """D_alpha(P || Q) = log(sum p^alpha q^(1-alpha)) / (alpha - 1), from log-probabilities
    (over the points where both are representable; the support is wide enough that the rest
    is far below float precision)."""
    ok = np.isfinite(log_p) & np.isfinite(log_q)
    return float(logsumexp(alpha * log_p[ok] + (1 - alpha) * log_q[ok])) / (alpha - 1)


@pytest.mark.parametrize(("variance", "shift"), [(4.0, 1), (25.0, 2), (100.0, 3), (400.0, 10)])
def test_skellam_rdp_bounds_the_exact_divergence_of_a_shifted_skellam(variance: float, shift: int) -> None:
    support = np.arange(-4000, 4001)
    base = skellam_logpmf(variance, support)
    shifted = skellam_logpmf(variance, support - shift)
    for alpha in (2, 3, 5, 8, 16, 32):
        exact = max(renyi(shifted, base, alpha), renyi(base, shifted, alpha))
        bound = skellam_rdp([alpha], l2=shift, l1=shift, variance=variance)[0]
        assert exact <= bound * (1 + 1e-9), (alpha, exact, bound)
        # and not vacuous: at the orders that matter the Gaussian term leads and the bound is close
        if alpha <= 8:
            assert bound <= (1.5 if variance >= 25 else 2.5) * exact + 1e-3, (alpha, exact, bound)


def test_skellam_rdp_tends_to_the_gaussian_rdp_as_the_variance_grows() -> None:
    alpha, d2 = np.array([2, 10, 50]), 3.0
    for variance in (1e4, 1e6):
        sk = skellam_rdp(alpha, l2=d2, l1=l1_bound(d2, 1000), variance=variance)
        gauss = alpha * d2**2 / (2 * variance)
        assert np.all(sk >= gauss) and np.all(sk <= gauss * 1.01)


def test_poisson_subsampling_bound_holds_for_the_exact_mixture_divergence() -> None:
    # 1-D Skellam, sensitivity 1, q = 0.1: the exact divergences of the subsampled mechanism
    # in both directions (add and remove) are below Zhu-Wang's general bound.
    variance, q = 9.0, 0.1
    support = np.arange(-3000, 3001)
    p = skellam_logpmf(variance, support)
    shifted = skellam_logpmf(variance, support - 1)
    mix = np.logaddexp(math.log1p(-q) + p, math.log(q) + shifted)
    top = 40
    base = skellam_rdp(range(2, top + 1), l2=1, l1=1, variance=variance)
    bound = poisson_subsampled_rdp(base, q, list(range(2, top + 1)))
    for alpha in (2, 4, 8, 16, 32, 40):
        exact = max(renyi(mix, p, alpha), renyi(p, mix, alpha))
        assert exact <= bound[alpha - 2] * (1 + 1e-9), (alpha, exact, bound[alpha - 2])
    assert bound[0] < base[0] / 10  # amplification: at q = 0.1 far below the unsampled RDP


def gaussian_curve(z: float, top: int) -> np.ndarray:
    a = np.arange(2, top + 1)
    return a / (2 * z**2)


@pytest.mark.parametrize(("q", "z"), [(0.01, 0.8), (0.05, 1.5), (0.3, 2.0)])
def test_general_poisson_bound_is_above_dp_accounting_on_the_gaussian(q: float, z: float) -> None:
    acc = rdp.RdpAccountant(orders=[float(a) for a in ORDERS])
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    exact = np.asarray(acc._rdp)
    ours = poisson_subsampled_rdp(gaussian_curve(z, max(ORDERS)), q, ORDERS)
    assert np.all(ours >= exact * (1 - 1e-9))
    assert ours[0] <= 4 * exact[0]  # alpha = 2: close to the tight analysis


@pytest.mark.parametrize(("n", "m", "z"), [(1000, 10, 1.0), (100, 20, 2.0)])
def test_general_without_replacement_bound_is_above_dp_accounting_on_the_gaussian(n: int, m: int, z: float) -> None:
    # dp_accounting's sampled-without-replacement Gaussian (WBK19, Gaussian-specific) under
    # replace-one: GaussianDpEvent(s) has replace-one RDP alpha / (2 s^2) per unit sensitivity.
    acc = rdp.RdpAccountant(orders=[float(a) for a in ORDERS], neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z)))
    exact = np.asarray(acc._rdp)
    ours = without_replacement_subsampled_rdp(gaussian_curve(z, max(ORDERS)), m / n, ORDERS)
    finite = np.isfinite(exact)
    assert np.all(ours[finite] >= exact[finite] * (1 - 1e-9))


def test_rounded_norm_bound_matches_the_conditional_rounding_growth_of_the_issue() -> None:
    # 8 bits (c = 127 grid steps for the clip norm) on a 100k-parameter model: 1.6x typical, 3.5x worst case.
    c, d = 127.0, 100_000
    assert rounded_norm_bound(c, d, beta=0) / c == pytest.approx((c + math.sqrt(d)) / c)
    assert 3.4 < (c + math.sqrt(d)) / c < 3.6
    assert 1.5 < rounded_norm_bound(c, d) / c < 1.8
    # with 16 bits the rounding costs almost nothing
    assert rounded_norm_bound(32767.0, d) / 32767.0 < 1.02


def test_rounded_norm_bound_holds_for_random_roundings() -> None:
    rng = np.random.default_rng(0)
    d, c = 2000, 30.0
    x = rng.normal(size=d)
    x *= c / np.linalg.norm(x)
    lo = np.floor(x)
    norms = [np.linalg.norm(lo + (rng.random(d) < x - lo)) for _ in range(2000)]
    bound = rounded_norm_bound(c, d)
    assert np.mean(np.array(norms) > bound) <= math.exp(-0.5)  # KLS21 Thm 1: P(exceed) <= beta
    assert max(norms) <= c + math.sqrt(d)


def test_epsilon_composes_rounds_by_adding_rdp() -> None:
    r = SkellamRound((SkellamBlock(variance=4e4, l2=150.0, l1=l1_bound(150.0, 5000)),), "poisson", 1000, 20)
    one = skellam_epsilon([r], 1e-5)
    four = skellam_epsilon([r] * 4, 1e-5)
    eps, _ = rdp.compute_epsilon(np.array(ORDERS, dtype=float), 4 * r.rdp(), 1e-5)
    assert four == pytest.approx(eps, rel=1e-12)
    assert one < four
    # a second block (the clipped-count bits) only adds privacy loss
    with_count = SkellamRound((*r.blocks, SkellamBlock(variance=4.0, l2=1.0, l1=1.0)), "poisson", 1000, 20)
    assert skellam_epsilon([with_count] * 4, 1e-5) > four
