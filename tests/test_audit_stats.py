"""The audit's statistics against independent computations: the analytic Gaussian mechanism,
numerical integration, closed forms of the one-run bound, and a mechanism of known epsilon."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy import integrate, stats

from fedsim.audit_stats import (
    gaussian_fit_epsilon,
    gaussian_pair_delta,
    gaussian_pair_epsilon,
    one_run_epsilon,
    one_run_lower_bound,
    one_run_p_value,
)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
def test_equal_variance_gaussians_give_the_analytic_gaussian_mechanism_epsilon(sigma: float) -> None:
    # Sensitivity 1, noise sigma: dp_accounting's analytic Gaussian mechanism (Balle & Wang 2018).
    expected = dp_accounting.get_epsilon_gaussian(sigma, 1e-5)
    assert gaussian_pair_epsilon(0.0, sigma, 1.0, sigma, 1e-5) == pytest.approx(expected, rel=1e-6)
    assert gaussian_pair_epsilon(3.0, sigma, 2.0, sigma, 1e-5) == pytest.approx(expected, rel=1e-6)  # shift, sign


@pytest.mark.parametrize(("mu1", "std1", "eps"), [(1.0, 1.3, 1.0), (2.0, 0.7, 2.0), (0.5, 1.1, 0.2)])
def test_unequal_variance_delta_matches_numerical_integration(mu1: float, std1: float, eps: float) -> None:
    p, q = stats.norm(mu1, std1), stats.norm(0.0, 1.0)

    def hockey(a, b):  # sup_S a(S) - e^eps b(S) = integral of max(a - e^eps b, 0)
        return integrate.quad(lambda x: max(a.pdf(x) - math.exp(eps) * b.pdf(x), 0.0), -40, 40, limit=400, points=[0, mu1])[0]

    expected = max(hockey(p, q), hockey(q, p))
    assert gaussian_pair_delta(0.0, 1.0, mu1, std1, eps) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_identical_gaussians_are_zero_epsilon_and_far_ones_infinite() -> None:
    assert gaussian_pair_epsilon(0.0, 1.0, 0.0, 1.0, 1e-5) == 0.0
    assert gaussian_pair_epsilon(0.0, 1e-3, 100.0, 1e-3, 1e-5) == math.inf


def test_gaussian_fit_recovers_the_mechanism_epsilon_from_many_canaries() -> None:
    rng = np.random.default_rng(3)
    mu = 1.0  # sensitivity 1, noise 1: the Gaussian mechanism with sigma 1
    fit = gaussian_fit_epsilon(rng.normal(mu, 1.0, 20_000), rng.normal(0.0, 1.0, 20_000), delta=1e-5, bootstrap=50, rng=rng)
    truth = dp_accounting.get_epsilon_gaussian(1.0, 1e-5)
    assert fit.epsilon == pytest.approx(truth, rel=0.1)
    assert fit.interval[0] <= truth <= fit.interval[1]


def test_all_correct_guesses_give_the_closed_form_bound_without_delta() -> None:
    # With delta = 0 and v = r correct, the p-value is q^r: eps = logit(significance^(1/r)).
    for r in (10, 100, 1000):
        q = 0.05 ** (1 / r)
        assert one_run_epsilon(2000, r, r, delta=0.0, significance=0.05) == pytest.approx(math.log(q / (1 - q)), rel=1e-8)


def _p_value_by_hand(m: int, r: int, v: int, eps: float, delta: float) -> float:
    # Steinke et al. 2023, Prop. 5.7, summed term by term with exact binomial coefficients.
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max((sum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), [(100, 50, 40, 1.0, 1e-5), (1000, 200, 180, 2.0, 1e-3), (50, 20, 20, 0.5, 0.0)])
def test_p_value_matches_a_term_by_term_sum(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(_p_value_by_hand(m, r, v, eps, delta), rel=1e-9)


def test_one_run_bound_of_randomized_response_stays_below_its_epsilon_and_approaches_it() -> None:
    # An exactly 1-DP mechanism per canary: randomized response on the inclusion bit. The
    # audit may exceed 1 in at most ~5% of trials (its confidence) and should get close to 1.
    eps, m, trials = 1.0, 4000, 20
    rng = np.random.default_rng(7)
    bounds = []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        scores = np.where(truthful == included, 1.0, -1.0) + 1e-6 * rng.random(m)
        bounds.append(one_run_lower_bound(scores, included, delta=0.0, confidence=0.95, ks=[m // 2]).epsilon_lower_bound)
    assert sum(b > eps for b in bounds) <= 2
    assert np.mean(bounds) > 0.75 * eps


def test_scores_that_ignore_inclusion_give_no_bound() -> None:
    rng = np.random.default_rng(0)
    audit = one_run_lower_bound(rng.random(1000), rng.random(1000) < 0.5, delta=1e-5)
    assert audit.epsilon_lower_bound < 0.3
