"""User-level differential privacy of DP-FedAvg: clipping, noise, adaptive clipping, accounting.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models", Alg. 1 with the flat clipping of their Sec. 3): every round the server
samples a cohort of devices, each sampled device clips its whole model update Delta_i to
L2 norm C, and the server releases

    sum_i clip(Delta_i, C) + N(0, (z * C)^2 I)        (then divides by the expected cohort)

The unit of privacy is a device (all of its data), so the guarantee is *user-level*: the
rounds are T applications of a subsampled Gaussian mechanism over the population of devices,
each with noise multiplier z = (noise std) / C.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping") replaces the fixed C by a private running estimate of a
quantile of the update norms; releasing the noisy count it needs is part of the same
Gaussian mechanism (see `update_noise_multiplier`).

Invariants:

* `noise_multiplier` (z) is ALWAYS noise std / C, the convention of `GaussianDpEvent` and of
  the DP-FedAvg papers, whatever the adjacency. Under add/remove-one (Poisson cohorts) the
  sum's sensitivity is C, so z is the multiplier of the mechanism. Under replace-one
  (fixed-size cohorts) one device can move the sum from +Delta to -Delta, sensitivity 2C,
  so the mechanism's multiplier is z / 2; dp_accounting's RDP analysis of
  `SampledWithoutReplacementDpEvent` takes the multiplier w.r.t. the replace-one
  sensitivity (its per-step RDP at q = 1 is alpha / (2 sigma^2); google/differential-privacy
  issue #378), so this module passes GaussianDpEvent(z / 2) there. Passing z would
  underestimate the RDP by a factor of 4.
* `UserLevelAccounting.epsilon(rounds=r, delta=d)` is a pure function of (the accounting,
  r, d), cached per (accounting, r, d); r = 0 gives 0.0 and z = 0 gives inf without
  reaching dp_accounting. It equals dp_accounting's own accountant composing
  SelfComposedDpEvent(<one round>, r) (bit for bit: same library calls, in the same order),
  so a number reported after round r equals the one recomputed offline for r rounds.
* The expensive per-(q, z) part (the one-round PLD; the one-round RDP vector) is cached,
  so an epsilon for a new r costs one PLD self-composition (PLD) or one vector scaling plus
  the RDP-to-DP conversion (RDP).
* `clip_update` never mutates its input; `AdaptiveClipping.update` draws exactly one
  float64 normal from the given generator per call (even with zero count noise), so a run's
  random stream does not depend on whether the count is noised.

Costs per `epsilon` call, measured on 2 busy cores (q = 0.01, z = 1, delta = 1e-5):

    accountant                  100 rounds   1000 rounds
    pld, new (q, z)               ~33 ms       ~38 ms     (one-round PLD ~20 ms + the row below)
    pld, (q, z) seen, new r       ~10 ms       ~14 ms     (self-composition + epsilon search)
    rdp, new (q, z)               ~20 ms       ~20 ms     (fixed-size cohorts: ~140 ms, WBK19 bound)
    rdp, (q, z) seen, new r      ~0.09 ms     ~0.09 ms
    any, cache hit               ~2-12 us     ~2-12 us

A run asks once per round for a new r, i.e. the "new rounds" row.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dp_accounting
import numpy as np
import torch
from dp_accounting.pld import privacy_loss_distribution as _pld
from dp_accounting.rdp import rdp_privacy_accountant as _rdp

from fedsim.privacy.calibration import solve_noise_multiplier

__all__ = [
    "ACCOUNTANTS",
    "PLD_VALUE_DISCRETIZATION_INTERVAL",
    "SAMPLINGS",
    "AdaptiveClipping",
    "UserLevelAccounting",
    "calibrate_user_noise",
    "clip_update",
    "combined_noise_multiplier",
    "gaussian_sum_noise",
    "update_noise_multiplier",
]

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "fixed")
#: Same interval as the sample-level PLD accountant (see accountants.py for the measurements).
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-3
_FIXED_PLD_MESSAGE = (
    "fixed-size cohorts have no PLD accountant in dp-accounting: use cohort.sampling=poisson, "
    "or privacy.dpfedavg.accountant=rdp (replace-one adjacency)"
)
#: dp_accounting's default orders, as the array its RdpAccountant holds them in.
_RDP_ORDERS = np.array(_rdp.DEFAULT_RDP_ORDERS)


def _is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float))


def _positive_finite(name: str, x: Any) -> float:
    if not _is_number(x) or not (0.0 < float(x) < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")
    return float(x)


def _check_delta(delta: Any) -> float:
    if not _is_number(delta) or not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_count(name: str, x: Any, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or int(x) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {x!r}")
    return int(x)


# ---------------------------------------------------------------------------------------------
# Device side: flat L2 clipping of the whole update (McMahan et al. 2018, Sec. 3, "flat
# clipping": the update is scaled by min(1, C / ||Delta||), which bounds every device's
# contribution to the sum, hence the sensitivity, by C).
# ---------------------------------------------------------------------------------------------


def clip_update(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float, bool]:
    """(update * min(1, C / ||update||), ||update||, ||update|| <= C) with ||.|| the flat L2 norm.

    The norm is computed in float64 (a float32 sum of squares overflows for entries past
    ~1e19) and so is the scaling, which is then cast back to the update's dtype: the clipped
    norm is C up to one float rounding per entry (<= C * (1 + 1e-7) in float32). An update
    within the bound is returned as is (the same tensor, not a copy; this function never
    mutates its input). Raises ValueError for a NaN/inf entry: the caller rejects the device,
    since clipping cannot bound a non-finite update.
    """
    c = _positive_finite("clip_norm", clip_norm)
    if not isinstance(update, torch.Tensor):
        raise ValueError(f"update must be a torch.Tensor, got {type(update).__name__}")
    if not (update.is_floating_point()):
        raise ValueError(f"update must be a floating-point tensor, got dtype {update.dtype}")
    flat = update.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("update has NaN or infinite entries; it cannot be clipped (reject this device)")
    norm = float(torch.linalg.vector_norm(flat))
    if not math.isfinite(norm):
        # float64 input with entries near 1e154+: rescale by the largest magnitude first.
        scale = float(flat.abs().max())
        norm = scale * float(torch.linalg.vector_norm(flat / scale))
    within = norm <= c
    if within:
        return update, norm, True
    clipped = (update.detach().to(torch.float64) * (c / norm)).to(update.dtype)
    return clipped, norm, False


# ---------------------------------------------------------------------------------------------
# Server side: the Gaussian mechanism on the sum of clipped updates (McMahan et al. 2018,
# Alg. 1; the Gaussian mechanism of Dwork & Roth 2014, App. A): N(0, (z C)^2) per coordinate.
# ---------------------------------------------------------------------------------------------


def gaussian_sum_noise(num_params: int, *, std: float, generator: torch.Generator, secure: bool = False) -> torch.Tensor:
    """float32 vector of `num_params` independent N(0, std^2) draws (drawn in float64, then cast).

    std = 0 gives zeros (and still draws, so the generator advances the same way). `secure`:
    each value is the sum of 4 draws / 2, the defence Opacus's secure_mode uses against
    floating-point attacks on a single Gaussian sample (Holohan & Braghin 2021, Sec. 5.1).
    """
    n = _check_count("num_params", num_params, 0)
    if not _is_number(std) or not (0.0 <= float(std) < math.inf):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if secure:
        noise = torch.randn((4, n), dtype=torch.float64, generator=generator, device=generator.device).sum(0) / 2
    else:
        noise = torch.randn(n, dtype=torch.float64, generator=generator, device=generator.device)
    return (noise * float(std)).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Adaptive clipping: Andrew, Thakkar, McMahan, Ramaswamy 2021, Alg. 1 and the geometric
# update of their Sec. 2.1/3: with b_i = 1[||Delta_i|| <= C] and expected cohort m,
#     b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2,    C <- C * exp(-eta_C (b_bar - gamma)).
# Centering the indicators at 1/2 (as their analysis and tensorflow_privacy's
# QuantileEstimatorQuery do) makes the noisy count's add/remove sensitivity 1/2 instead of 1,
# which is where the 2 sigma_b of Theorem 1 comes from; when the cohort has exactly m devices
# b_bar equals (sum_i b_i + N(0, sigma_b^2)) / m. b_bar is clipped to [0, 1] (post-processing,
# also as tensorflow_privacy does), so one round moves log C by at most eta_C * max(gamma, 1 - gamma).
# ---------------------------------------------------------------------------------------------


class AdaptiveClipping:
    """Private geometric quantile tracking of the update norms (Andrew et al. 2021, Alg. 1).

    `update(within_bound, generator=...)` takes the b_i of the round's cohort (the third
    value `clip_update` returns) and returns the clip norm for the next round. The count
    noise sigma_b (`count_noise_multiplier`, in units of devices; the paper suggests
    m / 20) is paid for by the update noise: see `update_noise_multiplier`.
    """

    def __init__(
        self,
        *,
        initial_clip_norm: float,
        target_quantile: float,
        learning_rate: float = 0.2,
        count_noise_multiplier: float,
        expected_cohort_size: float,
    ) -> None:
        self.initial_clip_norm = _positive_finite("initial_clip_norm", initial_clip_norm)
        if not _is_number(target_quantile) or not (0.0 < target_quantile < 1.0):
            raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
        self.target_quantile = float(target_quantile)
        self.learning_rate = _positive_finite("learning_rate", learning_rate)
        if not _is_number(count_noise_multiplier) or not (0.0 <= count_noise_multiplier < math.inf):
            raise ValueError(f"count_noise_multiplier must be a finite number >= 0, got {count_noise_multiplier!r}")
        self.count_noise_multiplier = float(count_noise_multiplier)
        self.expected_cohort_size = _positive_finite("expected_cohort_size", expected_cohort_size)
        self._clip_norm = self.initial_clip_norm
        self.num_updates = 0
        self.last_unclipped_fraction: float | None = None  # the released b_bar of the last update

    @property
    def clip_norm(self) -> float:
        return self._clip_norm

    def update(self, within_bound: Sequence[bool], *, generator: torch.Generator) -> float:
        """One private quantile step from the round's indicators b_i; returns the new clip norm."""
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        below = 0
        n = 0
        for b in within_bound:
            if isinstance(b, (bool, np.bool_)) or (isinstance(b, (int, np.integer)) and b in (0, 1)):
                below += int(bool(b))
                n += 1
            else:
                raise ValueError(f"within_bound must hold booleans, got {b!r}")
        noise = float(torch.randn(1, dtype=torch.float64, generator=generator, device=generator.device)[0])
        centered = (below - 0.5 * n) + self.count_noise_multiplier * noise
        b_bar = min(1.0, max(0.0, centered / self.expected_cohort_size + 0.5))
        new = self._clip_norm * math.exp(-self.learning_rate * (b_bar - self.target_quantile))
        if not (0.0 < new < math.inf):
            raise ValueError(f"adaptive clip norm left (0, inf): {self._clip_norm!r} -> {new!r}")
        self._clip_norm = new
        self.num_updates += 1
        self.last_unclipped_fraction = b_bar
        return new

    def _hyperparameters(self) -> dict[str, float]:
        return {
            "initial_clip_norm": self.initial_clip_norm,
            "target_quantile": self.target_quantile,
            "learning_rate": self.learning_rate,
            "count_noise_multiplier": self.count_noise_multiplier,
            "expected_cohort_size": self.expected_cohort_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (plain floats and ints)."""
        return {
            "clip_norm": self._clip_norm,
            "num_updates": self.num_updates,
            "last_unclipped_fraction": self.last_unclipped_fraction,
            **self._hyperparameters(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a `state_dict`; ValueError if it was saved with different hyperparameters."""
        for key, value in self._hyperparameters().items():
            if key in d and float(d[key]) != value:
                raise ValueError(f"adaptive clipping state has {key}={d[key]!r}, this run has {value!r}")
        clip = _positive_finite("clip_norm", d["clip_norm"])
        self._clip_norm = clip
        self.num_updates = _check_count("num_updates", d.get("num_updates", 0), 0)
        last = d.get("last_unclipped_fraction")
        self.last_unclipped_fraction = None if last is None else float(last)

    def __repr__(self) -> str:
        return (
            f"AdaptiveClipping(clip_norm={self._clip_norm:.6g}, target_quantile={self.target_quantile}, "
            f"learning_rate={self.learning_rate}, count_noise_multiplier={self.count_noise_multiplier}, "
            f"expected_cohort_size={self.expected_cohort_size})"
        )


# ---------------------------------------------------------------------------------------------
# Andrew et al. 2021, Theorem 1 / Sec. 3.1: the update sum (multiplier z_Delta, sensitivity C)
# and the centered count (std sigma_b, sensitivity 1/2, i.e. multiplier 2 sigma_b) released in
# the same round on the same cohort are one Gaussian mechanism on the concatenated vector,
# with multiplier z where z^-2 = z_Delta^-2 + (2 sigma_b)^-2. To spend a budget computed for z
# (accounting is done for z), the update gets z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).
# ---------------------------------------------------------------------------------------------


def update_noise_multiplier(*, noise_multiplier: float, count_noise_multiplier: float) -> float:
    """z_Delta for the update sum so that (update sum, noisy count) compose to multiplier z."""
    z = _positive_finite("noise_multiplier", noise_multiplier)
    if not _is_number(count_noise_multiplier) or not (0.0 <= count_noise_multiplier < math.inf):
        raise ValueError(f"count_noise_multiplier must be a finite number >= 0, got {count_noise_multiplier!r}")
    two_sigma_b = 2.0 * float(count_noise_multiplier)
    if two_sigma_b <= z:
        raise ValueError(
            f"count noise leaves no budget for the update: 2 * count_noise_multiplier = {two_sigma_b:g} "
            f"must exceed noise_multiplier = {z:g} (Andrew et al. 2021, Thm 1: z^-2 = z_update^-2 + "
            f"(2 sigma_b)^-2); raise count_noise_multiplier or lower the noise_multiplier"
        )
    # z / sqrt(1 - (z / 2 sigma_b)^2): same value as (z^-2 - (2 sigma_b)^-2)^(-1/2), better conditioned.
    return z / math.sqrt((1.0 - z / two_sigma_b) * (1.0 + z / two_sigma_b))


def combined_noise_multiplier(*, update_noise_multiplier: float, count_noise_multiplier: float) -> float:
    """The inverse: z = (z_Delta^-2 + (2 sigma_b)^-2)^(-1/2), the multiplier to account for."""
    z_delta = _positive_finite("update_noise_multiplier", update_noise_multiplier)
    if not _is_number(count_noise_multiplier) or not (0.0 <= count_noise_multiplier < math.inf):
        raise ValueError(f"count_noise_multiplier must be a finite number >= 0, got {count_noise_multiplier!r}")
    if count_noise_multiplier == 0:
        return 0.0  # a noiseless count: no privacy
    return (z_delta**-2 + (2.0 * float(count_noise_multiplier)) ** -2) ** -0.5


# ---------------------------------------------------------------------------------------------
# Accounting. One round is a subsampled Gaussian mechanism over the population of devices:
#
# * poisson: each device joins with probability q = cohort_size / population, add/remove-one
#   device adjacency. PoissonSampledDpEvent(q, GaussianDpEvent(z)); the sampled Gaussian of
#   Abadi et al. 2016 ("Deep Learning with Differential Privacy", moments accountant) and
#   Mironov, Talwar, Zhang 2019 ("Renyi Differential Privacy of the Sampled Gaussian
#   Mechanism") for RDP; privacy loss distributions with the connect-the-dots discretisation
#   of Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022 for PLD (dp_accounting's PLD).
# * fixed: exactly cohort_size of population devices, uniformly without replacement,
#   replace-one device adjacency: SampledWithoutReplacementDpEvent(population, cohort_size,
#   GaussianDpEvent(z / 2)) with dp_accounting's RDP accountant, which implements Wang, Balle,
#   Kasiviswanathan 2019 ("Subsampled Renyi Differential Privacy and Analytical Moments
#   Accountant", Thm 27). z / 2: see the module docstring (replace-one sensitivity is 2C).
#
# T rounds are SelfComposedDpEvent(<round>, T). RDP to (epsilon, delta) by dp_accounting's
# compute_epsilon (Canonne, Kamath, Steinke 2020 / Balle et al. 2020 conversion), at
# dp_accounting's DEFAULT_RDP_ORDERS.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _round_pld(q: float, z: float, interval: float) -> Any:
    """The one-round PLD, exactly what dp_accounting's PLDAccountant builds for the event."""
    return _pld.from_gaussian_mechanism(
        standard_deviation=z,
        value_discretization_interval=interval,
        sampling_prob=q,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _round_event(sampling: str, population: int, cohort_size: int, z: float) -> dp_accounting.DpEvent:
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(cohort_size / population, dp_accounting.GaussianDpEvent(z))
    return dp_accounting.SampledWithoutReplacementDpEvent(
        population, cohort_size, dp_accounting.GaussianDpEvent(z / 2.0)
    )


def _rdp_relation(sampling: str) -> dp_accounting.NeighboringRelation:
    if sampling == "poisson":
        return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    return dp_accounting.NeighboringRelation.REPLACE_ONE


@functools.lru_cache(maxsize=256)
def _round_rdp(sampling: str, population: int, cohort_size: int, z: float) -> np.ndarray | None:
    """RDP of one round at DEFAULT_RDP_ORDERS (read-only), or None if dp_accounting hides it.

    Read from an RdpAccountant that composed the one-round event, so the event dispatch is
    dp_accounting's own; T rounds are then T * vector, which is exactly what the accountant
    computes for SelfComposedDpEvent(round, T) (0 + T * vector).
    """
    acc = _rdp.RdpAccountant(neighboring_relation=_rdp_relation(sampling))
    acc.compose(_round_event(sampling, population, cohort_size, z))
    vec = getattr(acc, "_rdp", None)
    if not isinstance(vec, np.ndarray):  # a future dp_accounting: fall back to composing per call
        return None
    vec = vec.copy()
    vec.setflags(write=False)
    return vec


@functools.lru_cache(maxsize=65536)
def _epsilon_cached(accounting: UserLevelAccounting, rounds: int, delta: float) -> float:
    z = accounting.noise_multiplier
    if accounting.accountant == "pld":
        base = _round_pld(accounting.sample_rate, z, PLD_VALUE_DISCRETIZATION_INTERVAL)
        # identity().compose(...) as PLDAccountant does, so the answer is the library's to the bit.
        composed = _pld.identity(value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL).compose(
            base.self_compose(rounds)
        )
        return float(composed.get_epsilon_for_delta(delta))
    vec = _round_rdp(accounting.sampling, accounting.population, accounting.cohort_size, z)
    if vec is None:
        acc = _rdp.RdpAccountant(neighboring_relation=_rdp_relation(accounting.sampling))
        acc.compose(
            dp_accounting.SelfComposedDpEvent(
                _round_event(accounting.sampling, accounting.population, accounting.cohort_size, z), rounds
            )
        )
        return float(acc.get_epsilon(delta))
    eps, _ = _rdp.compute_epsilon(_RDP_ORDERS, rounds * vec, delta)
    return float(eps)


@dataclass(frozen=True, kw_only=True)
class UserLevelAccounting:
    """User-level epsilon of T rounds of DP-FedAvg over a population of devices.

    `cohort_size` is the expected cohort (poisson: q = cohort_size / population) or the exact
    one (fixed). `noise_multiplier` is z = noise std / clip norm of the whole round mechanism
    (with adaptive clipping, the combined z of `update_noise_multiplier`). accountant="pld"
    with sampling="fixed" is rejected at construction: dp_accounting has no PLD for
    sampling without replacement.
    """

    accountant: str = "pld"
    sampling: str
    population: int
    cohort_size: int
    noise_multiplier: float

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown user-level accountant {self.accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown cohort sampling {self.sampling!r}; allowed: {', '.join(SAMPLINGS)}")
        population = _check_count("population", self.population, 1)
        cohort = _check_count("cohort_size", self.cohort_size, 1)
        if cohort > population:
            raise ValueError(f"cohort_size ({cohort}) must be <= population ({population})")
        z = self.noise_multiplier
        if not _is_number(z) or not (0.0 <= float(z) < math.inf):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {z!r}")
        if self.sampling == "fixed" and self.accountant == "pld":
            raise ValueError(_FIXED_PLD_MESSAGE)
        # Normalise so that equal accountings hash alike (they key the epsilon cache).
        object.__setattr__(self, "population", population)
        object.__setattr__(self, "cohort_size", cohort)
        object.__setattr__(self, "noise_multiplier", float(z))

    @property
    def sample_rate(self) -> float:
        """q = cohort_size / population (poisson: inclusion probability; fixed: sampling fraction)."""
        return self.cohort_size / self.population

    def epsilon(self, *, rounds: int, delta: float) -> float:
        """Smallest epsilon (an upper bound) such that `rounds` rounds are user-level (epsilon, delta)-DP."""
        r = _check_count("rounds", rounds, 0)
        d = _check_delta(delta)
        if r == 0:
            return 0.0
        if self.noise_multiplier == 0.0:
            return math.inf
        return _epsilon_cached(self, r, d)

    def describe(self) -> str:
        q, z = self.sample_rate, self.noise_multiplier
        if self.sampling == "poisson":
            return (
                f"User-level DP under add/remove-one-device adjacency (a device's whole data set), assuming "
                f"each round's cohort is Poisson-sampled (every one of {self.population} devices joins "
                f"independently with q = {q:.6g}, expected cohort {self.cohort_size}), noise multiplier "
                f"z = {z:.6g} (noise std / clip norm), accounted by dp_accounting's "
                + ("PLD accountant (discretisation 1e-3)." if self.accountant == "pld" else "RDP accountant.")
            )
        return (
            f"User-level DP under replace-one-device adjacency (one device's whole data set swapped for "
            f"another's), assuming each round's cohort is exactly {self.cohort_size} of {self.population} devices "
            f"drawn uniformly without replacement (q = {q:.6g}), noise multiplier z = {z:.6g} (noise std / clip "
            f"norm; z/2 per unit of the 2C replace-one sensitivity), accounted by dp_accounting's RDP accountant "
            f"(Wang, Balle, Kasiviswanathan 2019)."
        )

    def max_rounds(self, *, target_epsilon: float, delta: float, limit: int) -> int:
        """Largest r <= limit with epsilon(r) <= target_epsilon (0 if even one round exceeds it).

        Binary search on r (epsilon is non-decreasing in r: composing more mechanisms cannot
        release less). Invariant epsilon(lo) <= target < epsilon(hi), so the answer always
        meets the target even where a numerical accountant wobbles.
        """
        target = _positive_finite("target_epsilon", target_epsilon)
        d = _check_delta(delta)
        lim = _check_count("limit", limit, 0)
        if lim == 0 or self.epsilon(rounds=lim, delta=d) <= target:
            return lim
        lo, hi = 0, lim
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon(rounds=mid, delta=d) <= target:
                lo = mid
            else:
                hi = mid
        return lo


def calibrate_user_noise(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    accounting: UserLevelAccounting,
    tolerance: float = 0.01,
) -> float:
    """Noise multiplier z with target*(1 - tolerance) <= epsilon(z) <= target after `rounds` rounds.

    `accounting.noise_multiplier` is ignored (replaced by each candidate z). Bisection as in
    `calibration.calibrate_noise_multiplier`: epsilon is non-increasing in z, invariant
    epsilon(lo) > target >= epsilon(hi) from lo = 0, hi = 1 doubled up to
    MAX_NOISE_MULTIPLIER (1000); the answer is hi, so it always meets the target. Raises
    "target_epsilon=... cannot be reached: ..." when even z = 1000 is not enough.
    """
    target = _positive_finite("target_epsilon", target_epsilon)
    d = _check_delta(delta)
    r = _check_count("rounds", rounds, 1)
    if not isinstance(accounting, UserLevelAccounting):
        raise ValueError(f"accounting must be a UserLevelAccounting, got {type(accounting).__name__}")
    if not _is_number(tolerance) or not (0.0 < tolerance < 1.0):
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")

    def epsilon(z: float) -> float:
        return dataclasses.replace(accounting, noise_multiplier=z).epsilon(rounds=r, delta=d)

    return solve_noise_multiplier(
        epsilon,
        target_epsilon=target,
        tolerance=tolerance,
        setting=(
            f"after {r} rounds, delta={d:g}, {accounting.sampling} cohorts of "
            f"{accounting.cohort_size}/{accounting.population}, {accounting.accountant} accountant"
        ),
    )
