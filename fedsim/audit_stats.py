"""The statistics of privacy auditing: from canary scores to an epsilon (no torch, no Flower).

Two published one-run methods, each with the computation its paper states:

* `gaussian_fit_epsilon` -- Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot
  Empirical Privacy Estimation for Federated Learning" (ICLR 2024), Sec. 3-4: fit a Gaussian
  to the statistics (cosines) of the inserted canaries and one to the statistics of canaries
  that were never inserted, and report the epsilon at which the pair of Gaussians is exactly
  (epsilon, delta)-DP (`gaussian_pair_epsilon`). Under the Gaussian mechanism, as the
  dimension grows, this equals the mechanism's epsilon for the threat model the statistic
  belongs to (their Thm. 3.2). It is an *estimate*, not a bound; its interval here is a
  percentile bootstrap over the canaries (resampling both groups).

* `one_run_lower_bound` -- Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training
  Run" (NeurIPS 2023): m canaries, each included independently with probability 1/2; the
  auditor guesses "in" for some, "out" for others, abstains on the rest. If the mechanism is
  (epsilon, delta)-DP, the number of correct guesses among r guesses is at most a
  Binomial(r, e^eps / (1 + e^eps)) plus a delta term (their Thm. 5.2, with the p-value of
  their Prop. 5.7 / Algorithm 2's code). The largest epsilon whose p-value is below the
  significance is a lower bound on the true epsilon at that confidence.

Both are used on the same canaries in fedsim.audit: each candidate canary is inserted with
probability 1/2, so the estimate (Andrew et al.) and the bound (Steinke et al.) read one set of
statistics; the bound needs no independence between canaries (one run is its premise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "GaussianFit",
    "gaussian_fit_epsilon",
    "gaussian_pair_delta",
    "gaussian_pair_epsilon",
    "one_run_epsilon",
    "one_run_lower_bound",
    "one_run_p_value",
]

_EPS_MAX = 1e3  # epsilons above this are reported as inf (a mechanism with no noise at all)


# ----------------------------------------------------------------------------- two Gaussians


def _log_sub(a: float, b: float) -> float:
    """log(e^a - e^b) for a >= b (-inf when equal)."""
    if b == -math.inf:
        return a
    if b >= a:
        return -math.inf
    return a + math.log1p(-math.exp(b - a))


def _log_add(*terms: float) -> float:
    """log(sum e^t) of one or two terms."""
    if len(terms) == 1:
        return terms[0]
    a, b = max(terms), min(terms)
    return a if b == -math.inf else a + math.log1p(math.exp(b - a))


def _log_mass(lo: float, hi: float, mu: float, std: float) -> float:
    """log P[lo < X < hi] for X ~ N(mu, std^2), accurate in both tails."""
    zl, zh = (lo - mu) / std, (hi - mu) / std
    if zl > 0:  # both in the upper tail: use survival functions
        return _log_sub(float(special.log_ndtr(-zl)), float(special.log_ndtr(-zh)))
    return _log_sub(float(special.log_ndtr(zh)), float(special.log_ndtr(zl)))


def _one_way_log_delta(mu_p: float, std_p: float, mu_q: float, std_q: float, eps: float) -> float:
    """log of the hockey-stick divergence sup_S P(S) - e^eps Q(S), P = N(mu_p, std_p^2), Q = N(mu_q, std_q^2).

    The supremum is reached on S = {x : log p(x)/q(x) > eps}; the log-ratio is the quadratic
    a x^2 + b x + c, so S is an interval or the complement of one.
    """
    a = 0.5 * (1 / std_q**2 - 1 / std_p**2)
    b = mu_p / std_p**2 - mu_q / std_q**2
    c = 0.5 * (mu_q**2 / std_q**2 - mu_p**2 / std_p**2) + math.log(std_q / std_p)
    if a == 0.0:
        if b == 0:
            return 0.0 if c > eps else -math.inf  # identical distributions: the log-ratio is the constant c
        t = (eps - c) / b
        regions = [(t, math.inf)] if b > 0 else [(-math.inf, t)]
    else:
        disc = b * b - 4 * a * (c - eps)
        if disc <= 0:
            # The quadratic never crosses eps: S is everything (a > 0) or nothing (a < 0).
            if a > 0:
                return _log_sub(0.0, eps) if eps <= 0 else -math.inf
            return -math.inf
        # Numerically stable roots (nearly equal stds make a tiny and one root huge).
        k = -0.5 * (b + math.copysign(math.sqrt(disc), b))
        roots = [k / a, (c - eps) / k] if k != 0 else [math.sqrt(-(c - eps) / a), -math.sqrt(-(c - eps) / a)]
        r1, r2 = sorted(roots)
        regions = [(-math.inf, r1), (r2, math.inf)] if a > 0 else [(r1, r2)]
    log_p = _log_add(*(_log_mass(lo, hi, mu_p, std_p) for lo, hi in regions))
    log_q = _log_add(*(_log_mass(lo, hi, mu_q, std_q) for lo, hi in regions))
    return _log_sub(log_p, eps + log_q)


def gaussian_pair_delta(mu0: float, std0: float, mu1: float, std1: float, eps: float) -> float:
    """The smallest delta such that N(mu0, std0^2) and N(mu1, std1^2) are (eps, delta)-indistinguishable
    (both directions)."""
    return math.exp(max(_one_way_log_delta(mu1, std1, mu0, std0, eps), _one_way_log_delta(mu0, std0, mu1, std1, eps)))


def gaussian_pair_epsilon(mu0: float, std0: float, mu1: float, std1: float, delta: float) -> float:
    """The smallest eps >= 0 such that N(mu0, std0^2) and N(mu1, std1^2) are (eps, delta)-indistinguishable.

    For equal standard deviations this is the analytic Gaussian mechanism's epsilon with
    sensitivity |mu1 - mu0| and noise std (Balle & Wang 2018, Thm. 8); for unequal ones the
    privacy loss is quadratic (Andrew et al. 2024 use the same computation, after Steinke 2022).
    """
    if not (std0 > 0 and std1 > 0 and 0 < delta < 1):
        raise ValueError(f"need positive standard deviations and delta in (0, 1), got {std0}, {std1}, {delta}")
    log_delta = math.log(delta)

    def excess(eps: float) -> float:
        return max(_one_way_log_delta(mu1, std1, mu0, std0, eps), _one_way_log_delta(mu0, std0, mu1, std1, eps)) - log_delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
        if hi > _EPS_MAX:
            return math.inf
    return float(optimize.brentq(excess, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-9, rtol=1e-10))


@dataclass(frozen=True)
class GaussianFit:
    """The estimate of Andrew et al. from one set of canary statistics."""

    epsilon: float  # the estimate
    interval: tuple[float, float]  # bootstrap percentile interval of the estimate
    confidence: float  # of the interval
    seen_mean: float
    seen_std: float
    unseen_mean: float
    unseen_std: float

    def to_dict(self) -> dict[str, float | list[float]]:
        return {
            "epsilon_estimate": self.epsilon,
            "interval": list(self.interval),
            "confidence": self.confidence,
            "seen_mean": self.seen_mean,
            "seen_std": self.seen_std,
            "unseen_mean": self.unseen_mean,
            "unseen_std": self.unseen_std,
        }


def _fit_epsilon(seen: np.ndarray, unseen: np.ndarray, delta: float) -> float:
    std_seen, std_unseen = float(np.std(seen, ddof=1)), float(np.std(unseen, ddof=1))
    if std_seen <= 0 or std_unseen <= 0:
        return math.inf if float(np.mean(seen)) != float(np.mean(unseen)) else 0.0
    return gaussian_pair_epsilon(float(np.mean(unseen)), std_unseen, float(np.mean(seen)), std_seen, delta)


def gaussian_fit_epsilon(
    seen: Sequence[float],
    unseen: Sequence[float],
    *,
    delta: float,
    confidence: float = 0.95,
    bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> GaussianFit:
    """Andrew et al.'s one-shot estimate: epsilon between the Gaussians fitted to the inserted
    canaries' statistics (`seen`) and the never-inserted canaries' (`unseen`), at `delta`,
    with a percentile bootstrap interval (`bootstrap` resamples of both groups; 0: no interval)."""
    s, u = np.asarray(seen, dtype=np.float64), np.asarray(unseen, dtype=np.float64)
    if len(s) < 2 or len(u) < 2:
        raise ValueError("the Gaussian fit needs at least 2 inserted and 2 unseen canaries")
    estimate = _fit_epsilon(s, u, delta)
    lo = hi = estimate
    if bootstrap:
        rng = rng if rng is not None else np.random.default_rng(0)
        draws = np.array([
            _fit_epsilon(s[rng.integers(0, len(s), len(s))], u[rng.integers(0, len(u), len(u))], delta)
            for _ in range(bootstrap)
        ])  # fmt: skip
        tail = (1 - confidence) / 2
        lo, hi = (float(np.quantile(draws, q, method="lower" if q < 0.5 else "higher")) for q in (tail, 1 - tail))
    return GaussianFit(
        epsilon=estimate,
        interval=(lo, hi),
        confidence=confidence,
        seen_mean=float(np.mean(s)),
        seen_std=float(np.std(s, ddof=1)),
        unseen_mean=float(np.mean(u)),
        unseen_std=float(np.std(u, ddof=1)),
    )


# ----------------------------------------------------------------------------- Steinke et al.


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] under an (eps, delta)-DP mechanism, m canaries
    (Steinke, Nasr, Jagielski 2023, Prop. 5.7 / Thm. 5.2; 0 <= v <= r <= m).

    beta = P[Binomial(r, q) >= v] with q = e^eps / (1 + e^eps); the delta term is
    2 m delta max_{i=1..v} P[v > Binomial(r, q) >= v - i] / i.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = special.expit(eps)
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    alpha = float(np.max((stats.binom.sf(v - i - 1, r, q) - beta) / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def one_run_epsilon(m: int, r: int, v: int, *, delta: float, significance: float) -> float:
    """The largest eps whose (eps, delta) claim is rejected at `significance` by v correct of r
    guesses (0 when none is)."""
    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) > significance:
        return 0.0

    def excess(eps: float) -> float:
        return significance - one_run_p_value(m, r, v, eps, delta)

    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
        if hi > _EPS_MAX:
            return math.inf
    return float(optimize.brentq(excess, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-9))


@dataclass(frozen=True)
class OneRunAudit:
    """The outcome of Steinke et al.'s audit: the best guess count and its bound."""

    epsilon_lower_bound: float
    confidence: float
    canaries: int  # m
    guesses: int  # r at the best k
    correct: int  # v at the best k
    ks_tried: list[int]

    def to_dict(self) -> dict[str, float | int | list[int]]:
        return {
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "confidence": self.confidence,
            "canaries": self.canaries,
            "guesses": self.guesses,
            "correct": self.correct,
            "guess_counts_tried": self.ks_tried,
        }


def one_run_lower_bound(
    scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95, ks: Sequence[int] | None = None
) -> OneRunAudit:
    """Steinke et al.'s audit: guess "in" for the k highest scores (k_+ = k, k_- = 0), for each k
    in `ks` (default: a geometric grid), Bonferroni-corrected over the grid so the best k's
    bound holds at `confidence`. Ties at the k-th score are broken against the auditor (the
    guessed set never depends on the inclusion bits)."""
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    m = len(s)
    if m == 0:
        return OneRunAudit(0.0, confidence, 0, 0, 0, [])
    if ks is None:
        ks = sorted({k for k in (int(round(m * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)) if k >= 1})
    ks = [k for k in ks if 1 <= k <= m]
    significance = (1 - confidence) / max(len(ks), 1)
    # Order by score, and among equal scores put the excluded canaries first: a tie never helps.
    order = np.lexsort((inc.astype(int), -s))
    best = (0.0, 0, 0)
    for k in ks:
        guessed = order[:k]
        v = int(inc[guessed].sum())
        eps = one_run_epsilon(m, k, v, delta=delta, significance=significance)
        if eps > best[0] or best[1] == 0:
            best = (eps, k, v)
    return OneRunAudit(best[0], confidence, m, best[1], best[2], list(ks))
