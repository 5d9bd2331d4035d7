"""Accounting of the distributed Skellam mechanism that fedsim runs under SecAgg+.

The mechanism of one round (fedsim.secure_rounds, fedsim.secagg):

    device:  v_i = CRR(clip(Delta_i, C) / step)   integer vector, ||v_i||_2 <= D2 always
             y_i = v_i + Sk(mu_i)                 its Skellam share, then masked (SecAgg+)
    server:  sum_i y_i = sum_i v_i + Sk(sum_i mu_i)    (Skellam is closed under sums)

CRR is conditional randomized rounding (Kairouz, Liu, Steinke 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", Sec. 4.1 and
Theorem 1 there): each coordinate is rounded up or down at random (unbiased), and the draw
is repeated until the rounded vector's L2 norm is at most

    D2 = min(c + sqrt(d),  sqrt(c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2)))     (c = C / step)

(the first term holds for every draw; the second fails for a draw with probability at most
beta, so the expected number of draws is at most 1/(1 - beta)). Since v_i is an integer
vector, its L1 norm is at most D1 = D2 min(sqrt(d), D2) (|v_j| <= v_j^2 and Cauchy-Schwarz).

RDP of one release (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially
Private Federated Learning", NeurIPS, Corollary 3.6, with mu the variance of the aggregate
Skellam noise per coordinate, integer alpha > 1):

    eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))

Several blocks of coordinates with their own noise (the update; the clipped-count bits of
adaptive clipping) released together on the same cohort are one mechanism whose RDP is the
sum of the blocks' RDP (composition, Mironov 2017, Prop. 1).

Sampling amplification, for general RDP mechanisms (the Skellam curve is not the Gaussian's,
so dp_accounting's Gaussian-specific analyses do not apply):
* Poisson cohorts, add/remove-one-device adjacency: Zhu and Wang 2019, "Poisson Subsampled
  Renyi Differential Privacy", ICML, Theorem 5 (the general upper bound, integer alpha):
      (1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^eps(2)
        + 3 sum_{l=3..a} C(a,l) q^l (1-q)^(a-l) e^((l-1) eps(l))
* fixed-size cohorts, replace-one adjacency (sensitivities doubled: a device's vector can
  turn from v into -v): Wang, Balle, Kasiviswanathan 2019, "Subsampled Renyi Differential
  Privacy and Analytical Moments Accountant", AISTATS, Theorem 9, with eps(inf) = inf for
  Skellam (its privacy loss is unbounded):
      1 + g^2 C(a,2) min(4 (e^eps(2) - 1), 2 e^eps(2)) + 2 sum_{j=3..a} g^j C(a,j) e^((j-1) eps(j))
  both taken as (1/(a-1)) log(.).
Rounds compose by adding RDP; (epsilon, delta) by dp_accounting's `compute_epsilon`
(the conversion of Canonne, Kamath, Steinke 2020 / Balle et al. 2020), the same one the
central RDP accounting uses.

Invariants: every function here returns an upper bound (never an approximation); the RDP of a
round is a pure function of its frozen description and is cached.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from scipy.special import gammaln, logsumexp

from fedsim.privacy.accountants import Accountant
from fedsim.privacy.events import History

__all__ = [
    "ORDERS",
    "ROUNDING_BETA",
    "SkellamBlock",
    "SkellamRound",
    "SkellamSGDAccountant",
    "ledger_accountant",
    "l1_bound",
    "poisson_subsampled_rdp",
    "rounded_norm_bound",
    "skellam_epsilon",
    "skellam_rdp",
    "without_replacement_subsampled_rdp",
]

#: Integer Renyi orders (both subsampling theorems need integer alpha).
ORDERS: tuple[int, ...] = (*range(2, 65), 72, 80, 96, 112, 128, 160, 192, 256)
#: beta of conditional randomized rounding: Kairouz, Liu, Steinke 2021 use e^-0.5, i.e. at
#: most 1/(1 - beta) = 2.5 draws expected (far fewer in practice, the bound is loose).
ROUNDING_BETA = math.exp(-0.5)


def rounded_norm_bound(l2_norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """D2: the L2 norm a vector of norm <= `l2_norm` (grid units) keeps after conditional
    randomized rounding with parameter beta (Kairouz, Liu, Steinke 2021, Theorem 1)."""
    if not (math.isfinite(l2_norm) and l2_norm >= 0):
        raise ValueError(f"l2_norm must be finite and >= 0, got {l2_norm}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    always = l2_norm + math.sqrt(dim)
    if beta == 0:
        return always
    squared = l2_norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (l2_norm + math.sqrt(dim) / 2)
    return min(always, math.sqrt(squared))


def l1_bound(l2: float, dim: int) -> float:
    """D1 of an integer vector with L2 norm <= l2 in `dim` coordinates: l2 min(sqrt(dim), l2)."""
    return l2 * min(math.sqrt(dim), l2)


def skellam_rdp(orders: Sequence[int], *, l2: float, l1: float, variance: float) -> np.ndarray:
    """RDP of the Skellam mechanism at integer `orders` (Agarwal, Kairouz, Liu 2021, Cor. 3.6).

    `variance`: of the aggregate Skellam noise per coordinate (grid units); `l2`, `l1`: the
    sensitivities of the integer vector it protects. Zero variance gives inf.
    """
    a = np.asarray(orders, dtype=np.float64)
    if np.any(a < 2) or np.any(a != np.floor(a)):
        raise ValueError("Skellam RDP orders must be integers >= 2")
    if l2 < 0 or l1 < 0:
        raise ValueError(f"sensitivities must be >= 0, got l2={l2}, l1={l1}")
    if l2 == 0 and l1 == 0:
        return np.zeros_like(a)
    if not variance > 0:
        return np.full_like(a, math.inf)
    mu = float(variance)
    correction = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
    return a * l2**2 / (2 * mu) + correction


def _log_comb(n: np.ndarray | int, k: np.ndarray | int) -> np.ndarray:
    return gammaln(np.asarray(n) + 1.0) - gammaln(np.asarray(k) + 1.0) - gammaln(np.asarray(n) - np.asarray(k) + 1.0)


def _base_curve(base: np.ndarray, top: int) -> np.ndarray:
    """eps(l) for l = 0..top as an array indexed by l (base holds l = 2..top)."""
    if len(base) != top - 1:
        raise ValueError(f"need the base RDP at every integer order 2..{top} ({top - 1} values), got {len(base)}")
    return np.concatenate([[0.0, 0.0], np.asarray(base, dtype=np.float64)])


def poisson_subsampled_rdp(base: np.ndarray, q: float, orders: Sequence[int]) -> np.ndarray:
    """RDP at `orders` of the Poisson-subsampled mechanism (Zhu and Wang 2019, Theorem 5).

    `base[i]` is the mechanism's RDP at integer order i + 2, for every order up to max(orders).
    """
    if not 0 <= q <= 1:
        raise ValueError(f"sampling probability must be in [0, 1], got {q}")
    top = max(orders)
    eps = _base_curve(base, top)
    if q == 0:
        return np.zeros(len(orders))
    if q == 1:
        return np.array([eps[a] for a in orders])
    out = []
    for a in orders:
        ls = np.arange(3, a + 1)
        terms = [
            (a - 1) * math.log1p(-q) + math.log(a * q - q + 1),
            _log_comb(a, 2) + 2 * math.log(q) + (a - 2) * math.log1p(-q) + eps[2],
        ]
        log3 = math.log(3.0)
        rest = log3 + _log_comb(a, ls) + ls * math.log(q) + (a - ls) * math.log1p(-q) + (ls - 1) * eps[ls]
        out.append(float(logsumexp(np.concatenate([terms, rest]))) / (a - 1))
    return np.array(out)


def without_replacement_subsampled_rdp(base: np.ndarray, gamma: float, orders: Sequence[int]) -> np.ndarray:
    """RDP at `orders` of the mechanism run on a uniformly drawn fraction `gamma` of the devices,
    without replacement, replace-one adjacency (Wang, Balle, Kasiviswanathan 2019, Theorem 9,
    with eps(inf) = inf). `base` as in `poisson_subsampled_rdp`, w.r.t. replace-one adjacency."""
    if not 0 <= gamma <= 1:
        raise ValueError(f"sampling fraction must be in [0, 1], got {gamma}")
    top = max(orders)
    eps = _base_curve(base, top)
    if gamma == 0:
        return np.zeros(len(orders))
    if gamma == 1:
        return np.array([eps[a] for a in orders])
    out = []
    for a in orders:
        e2 = eps[2]
        # log(min(4 (e^e2 - 1), 2 e^e2)), stable for large e2
        second = min(math.log(4.0) + e2 + math.log(-math.expm1(-e2)) if e2 > 0 else -math.inf, math.log(2.0) + e2)
        terms = [0.0, 2 * math.log(gamma) + float(_log_comb(a, 2)) + second]
        js = np.arange(3, a + 1)
        rest = math.log(2.0) + js * math.log(gamma) + _log_comb(a, js) + (js - 1) * eps[js]
        out.append(float(logsumexp(np.concatenate([terms, rest]))) / (a - 1))
    return np.array(out)


@dataclass(frozen=True)
class SkellamBlock:
    """Coordinates released with their own Skellam noise: aggregate variance per coordinate
    `variance` and per-device sensitivities `l2`, `l1` (add/remove one device), grid units."""

    variance: float
    l2: float
    l1: float


@dataclass(frozen=True)
class SkellamRound:
    """One round of the distributed mechanism: its blocks, released on one sampled cohort.

    sampling "poisson": each of `population` devices joins with q = cohort_size / population,
    add/remove adjacency. "fixed": exactly cohort_size devices without replacement,
    replace-one adjacency (sensitivities doubled). "none": the cohort is known to the adversary
    (no amplification), replace-one adjacency of the device's data.
    """

    blocks: tuple[SkellamBlock, ...]
    sampling: str
    population: int
    cohort_size: int

    def rdp(self) -> np.ndarray:
        """The round's RDP at ORDERS (read-only, cached)."""
        return _round_rdp(self)


@functools.lru_cache(maxsize=1024)
def _round_rdp(r: SkellamRound) -> np.ndarray:
    if r.sampling not in ("poisson", "fixed", "none"):
        raise ValueError(f"unknown sampling {r.sampling!r}; allowed: poisson, fixed, none")
    factor = 1.0 if r.sampling == "poisson" else 2.0  # replace-one moves a device's vector by up to 2x
    every = list(range(2, max(ORDERS) + 1))
    base = np.zeros(len(every))
    for b in r.blocks:
        base = base + skellam_rdp(every, l2=factor * b.l2, l1=factor * b.l1, variance=b.variance)
    if r.sampling == "poisson":
        out = poisson_subsampled_rdp(base, r.cohort_size / r.population, ORDERS)
    elif r.sampling == "fixed":
        out = without_replacement_subsampled_rdp(base, r.cohort_size / r.population, ORDERS)
    else:
        out = np.array([base[a - 2] for a in ORDERS])
    out.setflags(write=False)
    return out


def skellam_epsilon(rounds: Sequence[SkellamRound], delta: float) -> float:
    """Epsilon at `delta` of the composition of `rounds` (RDP summed, then converted)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not rounds:
        return 0.0
    return _epsilon_cached(tuple(rounds), float(delta))


@functools.lru_cache(maxsize=256)
def _epsilon_cached(rounds: tuple[SkellamRound, ...], delta: float) -> float:
    total = np.zeros(len(ORDERS))
    for r in rounds:
        total = total + r.rdp()
    if not np.all(np.isfinite(total)) and not np.any(np.isfinite(total)):
        return math.inf
    eps, _ = compute_epsilon(np.array(ORDERS, dtype=np.float64), total, delta)
    return float(eps)


# ---------------------------------------------------------------------------------------------
# Distributed DP-SGD (fedsim.privacy.distributed_sgd): the sample-level guarantee of one device.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _sgd_step_rdp(noise_multiplier: float, sample_rate: float, l2: float, l1: float) -> np.ndarray:
    """RDP at ORDERS of one distributed DP-SGD step of a device (read-only, cached)."""
    every = list(range(2, max(ORDERS) + 1))
    base = skellam_rdp(every, l2=l2, l1=l1, variance=(noise_multiplier * l2) ** 2)
    # Sampling never costs privacy (the sampled mechanism is a mixture of runs on neighbouring
    # subsets: joint quasi-convexity of the Renyi divergence), while Zhu and Wang's general bound
    # (its factor 3) exceeds the base curve for q near 1: the smaller of the two, order by order.
    out = np.minimum(poisson_subsampled_rdp(base, sample_rate, ORDERS), base[np.array(ORDERS) - 2])
    out.setflags(write=False)
    return out


class SkellamSGDAccountant(Accountant):
    """Epsilon of a device's distributed DP-SGD history (sample level, add/remove one example).

    One step of a device: it takes its examples (all of them, q = 1, as fedsim.privacy.distributed_sgd
    does; or a Poisson sample at a public rate q from its own secret draws), rounds each one's clipped, scaled gradient on the grid by conditional
    randomized rounding (L2 norm <= `l2` = D2 in grid units, hence L1 <= `l1` = D1) and sums
    them; the released secure sum carries Skellam noise of variance (z D2)^2 per coordinate
    (each device adds 1/h of it, h the fewest honest inputs a released sum can hold). Removing
    one example removes its own rounded vector (the other examples' roundings are independent
    of it), a shift of L2 norm <= D2 and L1 norm <= D1, so the Skellam mechanism's RDP applies
    (Agarwal, Kairouz, Liu 2021, Cor. 3.6; a mixture over the rounding's randomness has at most
    the largest divergence: quasi-convexity, van Erven and Harremoes 2014, Thm 13), amplified
    by the Poisson sampling of the device's examples (Zhu and Wang 2019, Thm 5, or the base curve
    where that is smaller), composed over
    the device's steps (Mironov 2017, Prop. 1), converted by dp_accounting's compute_epsilon.
    An event's noise_multiplier z means aggregate variance (z D2)^2: the analogue of DP-SGD's
    sigma = z C. Every value is an upper bound.
    """

    name = "skellam"

    def __init__(self, *, l2: float, l1: float, cache_size: int = 65536) -> None:
        super().__init__(cache_size=cache_size)
        if not (math.isfinite(l2) and l2 > 0 and math.isfinite(l1) and l1 > 0):
            raise ValueError(f"sensitivities must be positive and finite, got l2={l2}, l1={l1}")
        self.l2, self.l1 = float(l2), float(l1)

    def variance(self, noise_multiplier: float) -> float:
        """The aggregate Skellam variance per coordinate (grid units) of noise multiplier z."""
        return (noise_multiplier * self.l2) ** 2

    def _compute(self, history: History, delta: float) -> float:
        total = np.zeros(len(ORDERS))
        for e, count in history:
            total = total + _sgd_step_rdp(e.noise_multiplier, e.sample_rate, self.l2, self.l1) * (e.steps * count)
        if not np.any(np.isfinite(total)):
            return math.inf
        eps, _ = compute_epsilon(np.array(ORDERS, dtype=np.float64), total, delta)
        return float(eps)

    def __repr__(self) -> str:
        return f"SkellamSGDAccountant(l2={self.l2:g}, l1={self.l1:g})"


def ledger_accountant(data: dict, **pld: float) -> Accountant:
    """The accountant a ledger.json was kept with: its name, and what that accountant needs
    from the run (Skellam: the recorded sensitivities; PLD: `value_discretization_interval`).
    ValueError when the ledger does not say enough."""
    from fedsim.privacy.accountants import create_accountant

    name = data.get("accountant") if isinstance(data, dict) else None
    if name == "skellam":
        sens = data.get("skellam_sensitivity")
        if not (isinstance(sens, list) and len(sens) == 2 and all(isinstance(v, (int, float)) for v in sens)):
            raise ValueError("a skellam ledger needs skellam_sensitivity [l2, l1]")
        return SkellamSGDAccountant(l2=float(sens[0]), l1=float(sens[1]))
    return create_accountant(str(name), **pld)

