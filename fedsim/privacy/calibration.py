"""Noise calibration: the smallest DP-SGD noise multiplier that meets an (epsilon, delta) budget.

The budget is for `participations` participations of one device, each `steps_per_participation`
Poisson-subsampled Gaussian steps at rate `sample_rate`, i.e. the history
((DPSGDEvent(z, q, steps), participations),), accounted by the given accountant.

Method: bisection on z, using that epsilon is non-increasing in z (more noise, less
privacy loss: the privacy loss distribution of the subsampled Gaussian is stochastically
decreasing in z; Mironov, Talwar, Zhang 2019 show the RDP is decreasing in z). Invariant of
the search: epsilon(lo) > target >= epsilon(hi), starting from lo = 0 (epsilon = inf) and
hi = 1 doubled until it meets the target, capped at MAX_NOISE_MULTIPLIER. The answer is hi,
so it ALWAYS satisfies epsilon <= target even where a numerical accountant (PRV, PLD) is not
exactly monotone; the search stops once target * (1 - tolerance) <= epsilon(hi).

Same idea as `opacus.accountants.utils.get_noise_multiplier`, but with a relative tolerance
(Opacus's is absolute, 0.01 in epsilon), a multi-participation history, any fedsim
accountant (cached), and a clear error when the target is unreachable.
"""

from __future__ import annotations

from collections.abc import Callable

import math

from fedsim.privacy.accountants import Accountant
from fedsim.privacy.events import make_event

#: Beyond this, the model is noise; a target that needs more is treated as unreachable.
MAX_NOISE_MULTIPLIER = 1000.0
#: Bisection steps after bracketing: 60 halvings resolve z to 1e-18 of the bracket, far past
#: the tolerance; the cap only matters when a numerical accountant plateaus.
_MAX_BISECTIONS = 60


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_participation: int,
    participations: int,
    accountant: Accountant,
    tolerance: float = 0.01,
) -> float:
    """Noise multiplier z with target*(1 - tolerance) <= epsilon(z) <= target for the given schedule.

    Raises ValueError for invalid arguments, and
    "target_epsilon=... cannot be reached: even noise_multiplier=... gives epsilon=..." when
    even z = MAX_NOISE_MULTIPLIER is not enough (e.g. a tiny target without sampling, q = 1).
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
        0 < target_epsilon < math.inf
    ):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    if isinstance(participations, bool) or not isinstance(participations, int) or participations < 1:
        raise ValueError(f"participations must be an integer >= 1, got {participations!r}")
    if isinstance(steps_per_participation, bool) or not isinstance(steps_per_participation, int) or (
        steps_per_participation < 1
    ):
        raise ValueError(f"steps_per_participation must be an integer >= 1, got {steps_per_participation!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (0 < tolerance < 1):
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    target = float(target_epsilon)

    def epsilon(z: float) -> float:
        event = make_event(noise_multiplier=z, sample_rate=sample_rate, steps=steps_per_participation)
        return accountant.epsilon(((event, participations),), delta)

    return solve_noise_multiplier(
        epsilon,
        target_epsilon=target,
        tolerance=tolerance,
        setting=(
            f"delta={delta:g}, sample_rate={sample_rate:g}, {participations} participations x "
            f"{steps_per_participation} steps, {accountant.name} accountant"
        ),
    )


def solve_noise_multiplier(
    epsilon: Callable[[float], float], *, target_epsilon: float, tolerance: float, setting: str
) -> float:
    """The smallest z found with epsilon(z) <= target, within `tolerance` below the target.

    epsilon is non-increasing in z. Invariant: epsilon(lo) > target >= epsilon(hi), from
    lo = 0, hi = 1 doubled up to MAX_NOISE_MULTIPLIER; the answer is hi, so it always meets
    the target. `setting` describes the assumptions for the error message.
    """
    target = target_epsilon
    lo, hi = 0.0, 1.0
    eps_hi = epsilon(hi)
    while eps_hi > target:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target_epsilon={target:g} cannot be reached: even noise_multiplier={hi:g} gives "
                f"epsilon={eps_hi:.4g} ({setting})"
            )
        lo, hi = hi, min(2.0 * hi, MAX_NOISE_MULTIPLIER)
        eps_hi = epsilon(hi)

    floor = target * (1.0 - tolerance)
    for _ in range(_MAX_BISECTIONS):
        if eps_hi >= floor:
            break
        mid = 0.5 * (lo + hi)
        eps_mid = epsilon(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi
