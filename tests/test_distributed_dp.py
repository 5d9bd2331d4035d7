"""Distributed DP under SecAgg+ accounted as the discrete mechanism actually run (issue 14, defects 1-3).

No Ray here: UserLevelDP is driven round by round as the ServerApp drives it, and its epsilon
is compared with an independent computation written out below from the papers' formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from fedsim.config import from_dict
from fedsim.errors import FedsimError
from fedsim.privacy.dpfedavg import UserLevelDP
from fedsim.privacy.skellam import ORDERS
from fedsim.privacy.user_level import UserLevelAccounting

DIM = 500


def config(**dpfedavg: object) -> dict:
    return {
        "seed": 5,
        "population": 40,
        "rounds": 4,
        "cohort": {"size": 12, "sampling": "fixed"},
        "privacy": {
            "dpfedavg": {"noise_multiplier": 0.8, "clip_norm": 0.5, "accountant": "rdp", "noise": "distributed", **dpfedavg}
        },
        "secagg": {"name": "secaggplus", "bits": 16},
    }


# ---- an independent computation, straight from the papers (loops, math module only) ----------


def skellam_rdp(a: int, l2: float, l1: float, var: float) -> float:
    """Agarwal, Kairouz, Liu 2021, Corollary 3.6 (var: variance of the aggregate noise)."""
    return a * l2 * l2 / (2 * var) + min(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * var * var), 3 * l1 / (2 * var))


def log_add(terms: list[float]) -> float:
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def without_replacement(eps, a: int, g: float) -> float:  # noqa: ANN001
    """Wang, Balle, Kasiviswanathan 2019, Theorem 9 with eps(inf) = inf."""
    e2 = eps(2)
    terms = [0.0, 2 * math.log(g) + math.log(math.comb(a, 2)) + min(math.log(4 * math.expm1(e2)), math.log(2) + e2)]
    terms += [math.log(2) + j * math.log(g) + math.log(math.comb(a, j)) + (j - 1) * eps(j) for j in range(3, a + 1)]
    return log_add(terms) / (a - 1)


def independent_epsilon(clips: list[float], *, z: float, count_sigma: float | None, delta: float = 1e-5) -> float:
    step = (1.0 if count_sigma is not None else 0.5) / (2**15 - 1)  # the grid: range 1 (adaptive) or C
    z_update = z / math.sqrt(1 - (z / (2 * count_sigma)) ** 2) if count_sigma is not None else z
    total = []
    for a in ORDERS:
        rdp = 0.0
        for clip in clips:
            c = clip / step
            d2 = min(c + math.sqrt(DIM), math.sqrt(c * c + DIM / 4 + 1.0 * (c + math.sqrt(DIM) / 2)))  # beta = e^-0.5
            d1 = d2 * min(math.sqrt(DIM), d2)

            def eps(order: int, d2: float = d2, d1: float = d1) -> float:
                # replace-one: sensitivities doubled; the count block (sum of 2 b - 1) moves by 2
                value = skellam_rdp(order, 2 * d2, 2 * d1, (z_update * d2) ** 2)
                if count_sigma is not None:
                    value += skellam_rdp(order, 2.0, 2.0, (2 * count_sigma) ** 2)
                return value

            rdp += without_replacement(eps, a, 12 / 40)
        total.append(rdp)
    return float(compute_epsilon(np.array(ORDERS, dtype=float), np.array(total), delta)[0])


# -----------------------------------------------------------------------------------------------


def run_rounds(dp: UserLevelDP, rounds: int, survivors: list[int]) -> list[float]:
    """Drive `dp` as the ServerApp does; returns the clip norm of each released round."""
    clips = []
    for r in range(1, rounds + 1):
        dp.check_budget(r)
        clips.append(dp.clip_norm)
        n = survivors[(r - 1) % len(survivors)]
        dp.aggregate(torch.zeros(DIM, dtype=torch.float64), [], r, count_sum=float(n - 2), count_devices=n)
    return clips


def test_distributed_adaptive_epsilon_equals_an_independent_skellam_composition() -> None:
    # Defect 1: z = 0.8 with adaptive clipping; the count is released with its own discrete noise.
    dp = UserLevelDP(from_dict(config(adaptive_clipping=True)), num_params=DIM)
    clips = run_rounds(dp, 4, survivors=[12, 10, 9, 11])  # 20% dropout or so: it must not matter
    assert len(set(clips)) > 1  # C moved: each round is accounted at its own clip norm
    reported = dp.round_metrics()["user_epsilon"]
    assert reported == pytest.approx(independent_epsilon(clips, z=0.8, count_sigma=12 / 20), rel=1e-9)
    # The old accounting (the update alone, as a Gaussian of the realized variance) under-reported.
    update_only = UserLevelAccounting(
        accountant="rdp", sampling="fixed", population=40, cohort_size=12, noise_multiplier=dp.update_noise
    ).epsilon(rounds=4, delta=1e-5)
    assert reported > 1.2 * update_only
    assert dp.summary()["user_level"]["distributed_noise"]["epsilon_vs_server"] > reported


def test_distributed_epsilon_without_adaptive_clipping_equals_the_independent_computation() -> None:
    dp = UserLevelDP(from_dict(config()), num_params=DIM)
    clips = run_rounds(dp, 3, survivors=[12, 7])
    assert dp.round_metrics()["user_epsilon"] == pytest.approx(independent_epsilon(clips, z=0.8, count_sigma=None), rel=1e-9)


@pytest.mark.parametrize("survivors", [[12], [7], [12, 7, 9]])
def test_a_calibrated_distributed_run_never_ends_above_its_target_whatever_the_dropouts(survivors: list[int]) -> None:
    # Defect 2: target 2.0 ended at 2.63 when the realized (smaller) noise was accounted after the
    # budget check had used the planned one. Now every device adds 1/h of the noise (h the fewest honest inputs), so the round's
    # guarantee is the same whatever survives, and the check before a round is exact.
    raw = config(noise_multiplier=None, target_epsilon=2.0, adaptive_clipping=True, count_noise_multiplier=5.0)
    raw |= {"population": 400, "rounds": 6}
    dp = UserLevelDP(from_dict(raw), num_params=DIM)
    epsilons = []
    with pytest.raises(FedsimError, match="budget reached"):  # ask for more rounds than calibrated for
        for r in range(1, 20):
            dp.check_budget(r)
            n = survivors[(r - 1) % len(survivors)]
            dp.aggregate(torch.zeros(DIM, dtype=torch.float64), [], r, count_sum=float(n), count_devices=n)
            epsilons.append(dp.round_metrics()["user_epsilon"])
    assert len(epsilons) >= 6
    assert max(epsilons) <= 2.0
    assert epsilons[5] >= 2.0 * 0.9  # calibrated to use the budget over the planned 6 rounds


def test_distributed_noise_is_z_times_the_rounded_norm_bound() -> None:
    dp = UserLevelDP(from_dict(config()), num_params=DIM)
    enc = dp.secure_encoding()
    # total variance at the fewest honest inputs = (z D2)^2 in grid units, D2 the rounded norm bound of C
    assert enc.norm_bound == pytest.approx(dp.rounding_bound(0.5))
    assert enc.update_variance == pytest.approx((0.8 * enc.norm_bound) ** 2)
    assert enc.count_variance == 0.0
    # the float-domain std the summary reports is z D2 steps >= z C
    assert dp.noise_std == pytest.approx(0.8 * enc.norm_bound * dp.grid_step)
    assert dp.noise_std >= 0.8 * 0.5


def test_summary_states_the_assumptions_and_the_randomness() -> None:
    secure = UserLevelDP(from_dict(config()), num_params=DIM).summary()["user_level"]
    assert secure["distributed_noise"]["randomness"] == "secure"  # auto with distributed noise
    assert any("abort rule" in text for text in secure["distributed_noise"]["assumptions"])
    assert "n - D" in secure["distributed_noise"]["noise_sizing"]
    raw = config()
    raw["privacy"]["randomness"] = "reproducible"
    repro = UserLevelDP(from_dict(raw), num_params=DIM)
    assert any(text.startswith("simulation only: the server can remove the noise") for text in
               repro.summary()["user_level"]["distributed_noise"]["assumptions"])  # fmt: skip
    assert "simulation only: the server can remove the noise" in repro.describe()
