"""Privacy accountants: epsilon of a device's DP-SGD history, one interface, three analyses.

`create_accountant(name)` returns one of (mirroring `opacus.accountants.create_accountant`):

* "rdp" - Renyi DP of the sampled Gaussian mechanism, via Opacus's analysis. Tight enough
  for calibration, cheap, a valid upper bound; typically 5-20% above the numerical ones.
* "prv" - numerical composition of privacy loss random variables, via Opacus's PRVAccountant.
* "pld" - numerical composition of privacy loss distributions, via Google's dp_accounting.

All three account the add/remove-one neighbouring relation under Poisson sampling, which is
what DP-SGD with Opacus's `DPDataLoader` implements, so their numbers are comparable.

Invariants:

* `epsilon(history, delta)` is a pure function of the (canonical) history and delta, and is
  cached by (history, delta) in a bounded LRU: all devices with the same history share one
  computation. `num_computations` counts the calls that reached the underlying library.
* An empty history (or one whose events all have steps = 0 or sample_rate = 0: nothing
  was released about anybody) has epsilon 0.0. Any event with noise_multiplier = 0 makes
  epsilon = inf (no noise, no privacy). Neither case reaches the library or the counter.
* Composition order does not matter; the canonical history is passed to the libraries in
  its sorted order, which is exactly the Opacus accountant history
  `[(z, q, steps * count), ...]` that `events.total_steps` builds.

Costs per uncached call, measured on 2 cores (delta = 1e-5, one event z = 1, q = 0.1):

    accountant                100 steps   2000 steps
    rdp, new (z, q)             ~50 ms      ~50 ms    (150 RDP orders, a scipy series each)
    rdp, (z, q) seen before    ~0.06 ms    ~0.06 ms   (per-step RDP vector reused, see below)
    prv                        ~130 ms     ~650 ms    (grows with steps: finer mesh)
    pld (interval 1e-3)         ~45 ms      ~60 ms
    any, cache hit             ~0.01 ms    ~0.01 ms

The accountants are not thread-safe (the caches are plain dicts); the server accounts from
one thread.
"""

from __future__ import annotations

import functools
import math
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant as _OpacusPRVAccountant
from opacus.accountants import RDPAccountant as _OpacusRDPAccountant
from opacus.accountants.analysis import rdp as _opacus_rdp

from fedsim.privacy.events import DPSGDEvent, History, make_event, make_history, total_steps

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "create_accountant",
]


def _is_canonical(history: object) -> bool:
    if not isinstance(history, tuple):
        return False
    prev: DPSGDEvent | None = None
    for pair in history:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            return False
        event, count = pair
        if type(event) is not DPSGDEvent or type(count) is not int or count < 1:
            return False
        if prev is not None and not prev < event:
            return False
        prev = event
    return True


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


class Accountant(ABC):
    """epsilon(history, delta) for the sample-level DP of one device, cached by (history, delta)."""

    name: ClassVar[str]

    def __init__(self, *, cache_size: int = 65536) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self._cache: OrderedDict[tuple[History, float], float] = OrderedDict()
        self._cache_size = cache_size
        self.num_computations = 0  # calls that reached the underlying library
        self.cache_hits = 0

    def epsilon(self, history: History, delta: float) -> float:
        """Smallest epsilon such that the device's history is (epsilon, delta)-DP (an upper bound)."""
        delta = _check_delta(delta)
        if not _is_canonical(history):
            # Accept any iterable of (event, count); canonical form is what makes the cache work.
            history = make_history(history)
        key = (history, delta)
        cached = self._cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            self._cache.move_to_end(key)
            return cached
        eps = self._epsilon_uncached(history, delta)
        self._cache[key] = eps
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return eps

    def _epsilon_uncached(self, history: History, delta: float) -> float:
        # Events that released nothing (no steps, or nobody sampled) compose as the identity;
        # dropping them also keeps the libraries away from degenerate inputs (PRV divides by
        # the total number of steps).
        for e, _ in history:
            # Validation on cache misses only: a canonical history built by hand (or by a
            # caller constructing DPSGDEvent directly) is not checked anywhere else.
            make_event(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
        spent = tuple((e, c) for e, c in history if e.steps > 0 and e.sample_rate > 0.0)
        if not spent:
            return 0.0
        if any(e.noise_multiplier == 0.0 for e, _ in spent):
            return math.inf
        self.num_computations += 1
        return float(self._compute(spent, delta))

    @abstractmethod
    def _compute(self, history: History, delta: float) -> float:
        """epsilon of a non-empty canonical history, every z > 0, q > 0, steps > 0."""

    def cache_info(self) -> dict[str, int]:
        return {"entries": len(self._cache), "hits": self.cache_hits, "computations": self.num_computations}

    def clear_cache(self) -> None:
        self._cache.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------------------------
# RDP: Mironov 2017, "Renyi Differential Privacy" (composition: RDP at each order adds up);
# Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism"
# (the per-step RDP eps_q,z(alpha) of Poisson sampling with rate q and Gaussian noise z, their
# Sec. 3.3: integer orders by the binomial expansion, fractional orders by the two-sided
# series); conversion to (eps, delta) by Balle et al. 2020, Thm 21, as Opacus does:
#     eps = min_alpha  T * rdp(alpha) + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)
# with T = sum over history of steps * count.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of ONE subsampled Gaussian step at Opacus's DEFAULT_ALPHAS (read-only array).

    This is the expensive part (a scipy series per order) and depends only on (z, q); a
    device's history changes every round only by its counts, so caching it here makes a new
    history cost one multiply-add per event instead of ~50 ms.
    """
    rdp = np.asarray(
        _opacus_rdp.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.ALPHAS
        ),
        dtype=float,
    )
    rdp.setflags(write=False)
    return rdp


class RDPAccountant(Accountant):
    """Opacus's RDP analysis; bit-for-bit equal to `opacus.accountants.RDPAccountant` on the same history.

    Equality holds because the arithmetic is the same: Opacus computes
    `compute_rdp(q, z, steps=T, orders)` = (per-step RDP vector) * T and sums the vectors
    over its history with `sum([...])`; here the per-step vector is cached and multiplied
    by T = steps * count, summed in the same (canonical) order.
    """

    name = "rdp"
    ALPHAS: ClassVar[tuple[float, ...]] = tuple(_OpacusRDPAccountant.DEFAULT_ALPHAS)

    def _compute(self, history: History, delta: float) -> float:
        rdp = sum([_rdp_per_step(e.noise_multiplier, e.sample_rate) * (e.steps * c) for e, c in history])
        with warnings.catch_warnings():
            # Opacus warns when the best order is the smallest/largest of its grid (very
            # large or very small epsilon). The bound is still valid, and the warning would
            # fire on every bisection step of a calibration, so it is silenced here.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            eps, _ = _opacus_rdp.get_privacy_spent(orders=list(self.ALPHAS), rdp=rdp, delta=delta)
        return float(eps)


# ---------------------------------------------------------------------------------------------
# PRV: Gopi, Lee, Wutschitz 2021, "Numerical Composition of Differential Privacy" (NeurIPS).
# The privacy loss random variable of each event is discretised on a mesh and the T-fold
# composition is a convolution done by FFT (their Alg. 1); the answer is an interval
# [eps_lower, eps_upper] with eps_upper = eps_estimate(delta - delta_error) + eps_error
# (Thm 5.5), and Opacus returns eps_upper.
# ---------------------------------------------------------------------------------------------


class PRVAccountant(Accountant):
    """Opacus's PRVAccountant on the history; returns its upper bound eps_upper.

    Error parameters (what `get_epsilon(delta, eps_error=..., delta_error=...)` receives):

    * delta_error = delta / 1000 (Opacus's default) unless given.
    * eps_error: if given, used as is (Opacus's default is 0.01). If None (default), it is
      relative: first pass with eps_error = `max_eps_error` (0.01); if `rel_eps_error` times
      that answer is smaller, a second pass with eps_error = max(rel_eps_error * eps,
      `min_eps_error`). Why: eps_error is an ADDITIVE pad on the answer, so a fixed 0.01 is
      2% of an epsilon of 0.5 and 25% of 0.04 (z = 3, q = 0.01, few steps), while the cost
      is ~ (domain size) / eps_error and the domain shrinks with epsilon: a relative error
      keeps both the precision and the cost roughly constant. The second pass only happens
      for epsilon < max_eps_error / rel_eps_error (= 2 by default), where PRV is cheap.
    """

    name = "prv"

    def __init__(
        self,
        *,
        eps_error: float | None = None,
        rel_eps_error: float = 0.005,
        max_eps_error: float = 0.01,
        min_eps_error: float = 1e-4,
        delta_error: float | None = None,
        cache_size: int = 65536,
    ) -> None:
        super().__init__(cache_size=cache_size)
        for label, value in (("rel_eps_error", rel_eps_error), ("max_eps_error", max_eps_error),
                             ("min_eps_error", min_eps_error)):
            if not value > 0:
                raise ValueError(f"{label} must be > 0, got {value!r}")
        if eps_error is not None and not eps_error > 0:
            raise ValueError(f"eps_error must be > 0, got {eps_error!r}")
        if min_eps_error > max_eps_error:
            raise ValueError(f"min_eps_error ({min_eps_error}) must be <= max_eps_error ({max_eps_error})")
        self.eps_error = eps_error
        self.rel_eps_error = rel_eps_error
        self.max_eps_error = max_eps_error
        self.min_eps_error = min_eps_error
        self.delta_error = delta_error

    def eps_error_for(self, first_pass_epsilon: float) -> float:
        """The eps_error of the final pass given the answer of the first (max_eps_error) pass."""
        return min(self.max_eps_error, max(self.rel_eps_error * first_pass_epsilon, self.min_eps_error))

    def _compute(self, history: History, delta: float) -> float:
        delta_error = self.delta_error if self.delta_error is not None else delta / 1000
        acc = _OpacusPRVAccountant()
        acc.history = total_steps(history)
        # Opacus's PRV of q = 1 evaluates log(1 - q) = -inf on purpose (np.where picks the
        # other branch), and its domain-size bound runs an RDPAccountant that warns about
        # its order grid at tiny delta_error: both warnings are noise here.
        with np.errstate(divide="ignore"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            if self.eps_error is not None:
                return float(acc.get_epsilon(delta, eps_error=self.eps_error, delta_error=delta_error))
            eps = float(acc.get_epsilon(delta, eps_error=self.max_eps_error, delta_error=delta_error))
            eps_error = self.eps_error_for(eps)
            if eps_error < self.max_eps_error:
                eps = float(acc.get_epsilon(delta, eps_error=eps_error, delta_error=delta_error))
        return eps


# ---------------------------------------------------------------------------------------------
# PLD: privacy loss distributions, Meiser & Mohammadi 2018 ("Tight on budget?"), Koskela,
# Jalko, Honkela 2020 (FFT composition of subsampled mechanisms), Doroshenko, Ghazi, Kamath,
# Kumar, Manurangsi 2022 ("Connect the Dots: Tighter Discrete Approximations of Privacy Loss
# Distributions", the connect-the-dots discretisation dp_accounting uses). Each event is
# SelfComposed(PoissonSampled(q, Gaussian(z)), steps * count); q = 1 is no sampling, where
# the T-fold Gaussian is a single Gaussian with std z / sqrt(T) (exact, and cheaper).
# The discretisation is pessimistic (rounds privacy losses up), so the answer is an upper
# bound up to floating point.
# ---------------------------------------------------------------------------------------------

#: PLD value_discretization_interval. Measured against this module's PRV (relative
#: eps_error) at delta = 1e-5 on 38 settings, z in {0.5, 1, 2, 3} x q in {0.01, 0.1, 1} x
#: steps in {10, 100, 1000, 3000} (leaving out the q = 1 / 1000+ steps corners where PRV
#: takes seconds): the largest disagreement is 0.53% (z = 1, q = 0.01, 10 steps:
#: PLD 0.3799, PRV 0.3819), PLD being the lower in 35 of 38. Against PRV's *estimate*
#: (its answer minus eps_error) the agreement is ~1e-3 absolute everywhere. A finer 1e-4
#: (dp_accounting's default) costs ~10x more (0.8 s vs 0.08 s at z = 0.5, q = 0.01) for
#: no visible gain; a coarser 1e-2 is 53% pessimistic at z = 3, q = 0.01, 2000 steps,
#: where the per-step privacy loss is smaller than the interval.
DEFAULT_VALUE_DISCRETIZATION_INTERVAL = 1e-3


#: Intervals `choose_pld_interval` tries, coarsest (cheapest) first; the last is the reference.
PLD_INTERVALS = (1e-3, 5e-4, 2e-4, 1e-4)
PLD_TOLERANCE = 0.01


def choose_pld_interval(epsilon_at: Callable[[float], float], *, tolerance: float = PLD_TOLERANCE) -> tuple[float, dict[float, float]]:
    """The coarsest interval of PLD_INTERVALS whose epsilon is within `tolerance` of the 1e-4 one.

    `epsilon_at(interval)` is the run's planned epsilon (its whole horizon) accounted with that
    interval. Every interval gives an upper bound (the discretisation is pessimistic), so the
    choice only trades tightness for ledger cost: 1e-3 is +4% over 1e-4 at q = 1e-3, T = 3000
    (issue 14, item 7), where the per-step privacy loss is small against the interval. Returns
    (interval, {interval: epsilon} for the intervals computed).
    """
    reference = PLD_INTERVALS[-1]
    computed = {reference: epsilon_at(reference)}
    for interval in PLD_INTERVALS[:-1]:
        computed[interval] = epsilon_at(interval)
        if computed[interval] <= computed[reference] * (1 + tolerance):
            return interval, computed
    return reference, computed


def pld_event(history: History) -> dp_accounting.DpEvent:
    """The dp_accounting event of a (canonical, non-degenerate) history."""
    events: list[dp_accounting.DpEvent] = []
    for e, c in history:
        gaussian = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        inner = gaussian if e.sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(e.sample_rate, gaussian)
        events.append(dp_accounting.SelfComposedDpEvent(inner, e.steps * c))
    return dp_accounting.ComposedDpEvent(events)


class PLDAccountant(Accountant):
    """dp_accounting's PLDAccountant (add/remove-one neighbours) on the history's composed event."""

    name = "pld"

    def __init__(
        self,
        *,
        value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
        cache_size: int = 65536,
    ) -> None:
        super().__init__(cache_size=cache_size)
        if not value_discretization_interval > 0:
            raise ValueError(f"value_discretization_interval must be > 0, got {value_discretization_interval!r}")
        self.value_discretization_interval = value_discretization_interval

    def _compute(self, history: History, delta: float) -> float:
        acc = pld_privacy_accountant.PLDAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            value_discretization_interval=self.value_discretization_interval,
        )
        acc.compose(pld_event(history))
        return float(acc.get_epsilon(delta))


ACCOUNTANTS: dict[str, type[Accountant]] = {
    RDPAccountant.name: RDPAccountant,
    PRVAccountant.name: PRVAccountant,
    PLDAccountant.name: PLDAccountant,
}


def create_accountant(name: str, **options: float | None) -> Accountant:
    """A new accountant by name ("rdp" | "prv" | "pld"); options go to its constructor."""
    try:
        cls = ACCOUNTANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown accountant {name!r}; allowed: {', '.join(ACCOUNTANTS)}") from None
    return cls(**options)
