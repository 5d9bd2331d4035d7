"""User-level DP for DP-FedAvg (fedsim.privacy.user_level).

References are built independently here: dp_accounting's accountants composed directly on
the DpEvents (not through the module's caches), closed forms for the Gaussian mechanism,
and plain statistics for the clipping, noise and adaptive clipping.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedsim.privacy.user_level import (
    AdaptiveClipping,
    UserLevelAccounting,
    calibrate_user_noise,
    clip_update,
    combined_noise_multiplier,
    gaussian_sum_noise,
    update_noise_multiplier,
)

REL = dp_accounting.NeighboringRelation


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------- accounting


def _reference_poisson(accountant: str, q: float, z: float, rounds: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    if accountant == "pld":
        acc = pld_privacy_accountant.PLDAccountant(
            neighboring_relation=REL.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3
        )
    else:
        acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


# (population, cohort, z, rounds, delta): q = 0.01, 0.1, 0.001, 1 (everybody, every round)
POISSON_SETTINGS = [
    (10_000, 100, 1.0, 100, 1e-5),
    (1_000, 100, 0.8, 50, 1e-6),
    (10_000, 10, 2.0, 1000, 1e-5),
    (50, 50, 5.0, 20, 1e-4),
]


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("population,cohort,z,rounds,delta", POISSON_SETTINGS)
def test_poisson_epsilon_equals_dp_accounting(accountant, population, cohort, z, rounds, delta):
    acc = UserLevelAccounting(
        accountant=accountant, sampling="poisson", population=population, cohort_size=cohort, noise_multiplier=z
    )
    expected = _reference_poisson(accountant, cohort / population, z, rounds, delta)
    got = acc.epsilon(rounds=rounds, delta=delta)
    assert got == pytest.approx(expected, rel=1e-6)
    assert 0 < got < math.inf
    assert acc.epsilon(rounds=rounds, delta=delta) == got  # cached, same answer


def _reference_fixed(population: int, cohort: int, gaussian_multiplier: float, rounds: int, delta: float) -> float:
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=REL.REPLACE_ONE)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                population, cohort, dp_accounting.GaussianDpEvent(gaussian_multiplier)
            ),
            rounds,
        )
    )
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "population,cohort,z,rounds,delta", [(10_000, 100, 1.0, 100, 1e-5), (1_000, 100, 2.0, 30, 1e-6)]
)
def test_fixed_epsilon_equals_dp_accounting_replace_one(population, cohort, z, rounds, delta):
    acc = UserLevelAccounting(
        accountant="rdp", sampling="fixed", population=population, cohort_size=cohort, noise_multiplier=z
    )
    # Under replace-one the clipped sum's sensitivity is 2C, and dp_accounting's
    # sampled-without-replacement RDP takes the multiplier w.r.t. that sensitivity: z / 2.
    expected = _reference_fixed(population, cohort, z / 2, rounds, delta)
    got = acc.epsilon(rounds=rounds, delta=delta)
    assert got == pytest.approx(expected, rel=1e-6)
    # Passing z itself would claim (much) more privacy than the mechanism gives.
    assert got > 2 * _reference_fixed(population, cohort, z, rounds, delta)


def test_fixed_full_cohort_is_gaussian_with_sensitivity_two_c():
    # cohort == population: no sampling, T Gaussian mechanisms with std z*C and replace-one
    # sensitivity 2C: RDP(alpha) = T * alpha * (2C)^2 / (2 (zC)^2) = 2 alpha T / z^2 (closed form).
    z, rounds, delta = 3.0, 40, 1e-5
    acc = UserLevelAccounting(accountant="rdp", sampling="fixed", population=20, cohort_size=20, noise_multiplier=z)
    orders = np.array(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=float)
    expected, _ = rdp_privacy_accountant.compute_epsilon(orders, 2.0 * orders * rounds / z**2, delta)
    assert acc.epsilon(rounds=rounds, delta=delta) == pytest.approx(expected, rel=1e-9)


def test_pld_with_fixed_cohorts_is_rejected():
    with pytest.raises(ValueError, match="fixed-size cohorts have no PLD accountant in dp-accounting") as info:
        UserLevelAccounting(accountant="pld", sampling="fixed", population=100, cohort_size=10, noise_multiplier=1.0)
    assert "cohort.sampling=poisson" in str(info.value)
    assert "privacy.dpfedavg.accountant=rdp (replace-one adjacency)" in str(info.value)


def test_default_accountant_is_pld():
    acc = UserLevelAccounting(sampling="poisson", population=100, cohort_size=10, noise_multiplier=1.0)
    assert acc.accountant == "pld"


def test_degenerate_cases_and_validation():
    acc = UserLevelAccounting(
        accountant="rdp", sampling="poisson", population=100, cohort_size=10, noise_multiplier=0.0
    )
    assert acc.epsilon(rounds=5, delta=1e-5) == math.inf
    assert acc.epsilon(rounds=0, delta=1e-5) == 0.0
    acc = UserLevelAccounting(
        accountant="pld", sampling="poisson", population=100, cohort_size=10, noise_multiplier=1.0
    )
    assert acc.epsilon(rounds=0, delta=1e-5) == 0.0
    for bad in ({"accountant": "prv"}, {"sampling": "shuffle"}, {"cohort_size": 101}, {"cohort_size": 0},
                {"noise_multiplier": -1.0}, {"noise_multiplier": math.nan}, {"population": 10.5}):
        kwargs = {"accountant": "rdp", "sampling": "poisson", "population": 100, "cohort_size": 10,
                  "noise_multiplier": 1.0, **bad}
        with pytest.raises(ValueError):
            UserLevelAccounting(**kwargs)
    for rounds, delta in ((-1, 1e-5), (1.5, 1e-5), (3, 0.0), (3, 1.0)):
        with pytest.raises(ValueError):
            acc.epsilon(rounds=rounds, delta=delta)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    base = dict(accountant="rdp", sampling="poisson", population=1000, cohort_size=50)
    lo = UserLevelAccounting(noise_multiplier=1.0, **base)
    hi = UserLevelAccounting(noise_multiplier=2.0, **base)
    eps = [lo.epsilon(rounds=r, delta=1e-5) for r in (1, 10, 100, 1000)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert hi.epsilon(rounds=100, delta=1e-5) < lo.epsilon(rounds=100, delta=1e-5)


def test_describe_states_adjacency_sampling_q_z_accountant():
    poisson = UserLevelAccounting(sampling="poisson", population=1000, cohort_size=10, noise_multiplier=1.25)
    text = poisson.describe()
    assert "add/remove-one-device" in text and "Poisson" in text and "q = 0.01" in text
    assert "z = 1.25" in text and "PLD" in text
    fixed = UserLevelAccounting(accountant="rdp", sampling="fixed", population=1000, cohort_size=10, noise_multiplier=2)
    text = fixed.describe()
    assert "replace-one-device" in text and "without replacement" in text and "q = 0.01" in text
    assert "z = 2" in text and "RDP" in text
    assert text.count(". ") == 0 and text.endswith(".")  # one sentence


@pytest.mark.parametrize("accountant,limit", [("rdp", 300), ("pld", 40)])
def test_max_rounds_matches_linear_scan(accountant, limit):
    acc = UserLevelAccounting(
        accountant=accountant, sampling="poisson", population=1000, cohort_size=100, noise_multiplier=1.0
    )
    delta = 1e-5
    eps = [acc.epsilon(rounds=r, delta=delta) for r in range(limit + 1)]
    for target in (eps[1] * 0.5, eps[1], eps[limit // 3] * 1.0001, eps[limit // 2], eps[limit] * 2.0):
        expected = max(r for r in range(limit + 1) if eps[r] <= target)
        assert acc.max_rounds(target_epsilon=target, delta=delta, limit=limit) == expected
    assert acc.max_rounds(target_epsilon=eps[limit] * 2.0, delta=delta, limit=limit) == limit
    assert acc.max_rounds(target_epsilon=eps[1] * 0.5, delta=delta, limit=limit) == 0


def test_max_rounds_fixed_cohorts():
    acc = UserLevelAccounting(accountant="rdp", sampling="fixed", population=1000, cohort_size=50, noise_multiplier=1.5)
    eps = [acc.epsilon(rounds=r, delta=1e-5) for r in range(201)]
    target = eps[137]
    assert acc.max_rounds(target_epsilon=target, delta=1e-5, limit=200) == max(
        r for r in range(201) if eps[r] <= target
    )


@pytest.mark.parametrize(
    "accountant,sampling,population,cohort,rounds,target",
    [
        ("rdp", "poisson", 10_000, 100, 500, 2.0),
        ("pld", "poisson", 10_000, 100, 100, 1.0),
        ("rdp", "fixed", 1_000, 50, 100, 4.0),
    ],
)
def test_calibrate_user_noise_meets_target(accountant, sampling, population, cohort, rounds, target):
    acc = UserLevelAccounting(
        accountant=accountant, sampling=sampling, population=population, cohort_size=cohort, noise_multiplier=0.0
    )
    tolerance = 0.01
    z = calibrate_user_noise(target_epsilon=target, delta=1e-5, rounds=rounds, accounting=acc, tolerance=tolerance)
    # Checked with the independent references, not with the module's epsilon.
    if sampling == "poisson":
        eps = _reference_poisson(accountant, cohort / population, z, rounds, 1e-5)
    else:
        eps = _reference_fixed(population, cohort, z / 2, rounds, 1e-5)
    assert target * (1 - tolerance) <= eps <= target


def test_calibrate_user_noise_unreachable():
    # Everybody every round (q = 1): 1000 Gaussian rounds at z = 1000 still give epsilon ~ 0.15.
    acc = UserLevelAccounting(accountant="rdp", sampling="poisson", population=10, cohort_size=10, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"target_epsilon=0\.001 cannot be reached"):
        calibrate_user_noise(target_epsilon=1e-3, delta=1e-5, rounds=1000, accounting=acc)


# --------------------------------------------------------------------------- clipping


def test_clip_update_never_exceeds_bound():
    g = _gen(0)
    clip = 0.75
    for i in range(2000):
        dim = int(torch.randint(1, 5000, (1,), generator=g))
        scale = float(10 ** (torch.rand(1, generator=g) * 8 - 4))  # norms from ~1e-4 to ~1e4 x C
        dtype = torch.float32 if i % 4 else torch.float64
        update = (torch.randn(dim, generator=g, dtype=torch.float64) * scale).to(dtype)
        clipped, norm, within = clip_update(update, clip)
        true_norm = float(update.double().norm())
        assert norm == pytest.approx(true_norm, rel=1e-12)
        assert within == (true_norm <= clip)
        assert clipped.dtype == update.dtype and clipped.shape == update.shape
        assert float(clipped.double().norm()) <= clip * (1 + 1e-6)
        if not within:
            assert float(clipped.double().norm()) == pytest.approx(clip, rel=1e-6)
            cosine = float(torch.nn.functional.cosine_similarity(clipped.double(), update.double(), dim=0))
            assert cosine == pytest.approx(1.0, abs=1e-6)


def test_clip_update_leaves_short_vectors_bit_for_bit():
    g = _gen(1)
    for _ in range(200):
        update = torch.randn(3, 7, generator=g)
        update = update * (0.999 / float(update.norm()))  # norm just under C = 1
        before = update.clone()
        clipped, norm, within = clip_update(update, 1.0)
        assert within and norm <= 1.0
        assert torch.equal(clipped, before)
        assert clipped.view(torch.int32).equal(before.view(torch.int32))  # bit for bit
    long = torch.full((10,), 3.0)
    kept = long.clone()
    clip_update(long, 1.0)
    assert torch.equal(long, kept)  # the input is never mutated


def test_clip_update_boundary_and_extremes():
    exactly = torch.tensor([3.0, 4.0])
    clipped, norm, within = clip_update(exactly, 5.0)
    assert within and norm == 5.0 and clipped is exactly
    zero = torch.zeros(4)
    assert clip_update(zero, 1.0)[2]
    huge = torch.full((1000,), 3e38, dtype=torch.float32)  # float32 sum of squares would overflow
    clipped, norm, within = clip_update(huge, 2.0)
    assert not within and math.isfinite(norm) and float(clipped.double().norm()) <= 2.0 * (1 + 1e-6)
    vast = torch.full((4,), 1e300, dtype=torch.float64)  # float64 sum of squares would overflow
    clipped, norm, within = clip_update(vast, 1.0)
    assert norm == pytest.approx(2e300) and float(clipped.norm()) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_clip_update_rejects_non_finite(bad):
    update = torch.ones(10)
    update[3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        clip_update(update, 1.0)


@pytest.mark.parametrize("clip", [0.0, -1.0, math.inf, math.nan])
def test_clip_update_rejects_bad_clip_norm(clip):
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(torch.ones(3), clip)


# --------------------------------------------------------------------------- noise


def _assert_gaussian(sample: torch.Tensor, std: float) -> None:
    x = sample.double()
    n = x.numel()
    assert float(x.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(x.mean())) < 5 * std / math.sqrt(n)


def test_gaussian_sum_noise_statistics():
    std = 0.7
    noise = gaussian_sum_noise(200_000, std=std, generator=_gen(2))
    assert noise.dtype == torch.float32 and noise.shape == (200_000,)
    _assert_gaussian(noise, std)
    # Tails look Gaussian too: about 4.55% beyond 2 std.
    assert float((noise.abs() > 2 * std).double().mean()) == pytest.approx(0.0455, abs=0.003)


def test_noise_check_detects_missing_noise():
    # The statistical check above has power: it fails on a run that forgot the noise.
    with pytest.raises(AssertionError):
        _assert_gaussian(torch.zeros(200_000), 0.7)
    with pytest.raises(AssertionError):
        _assert_gaussian(gaussian_sum_noise(200_000, std=0.5, generator=_gen(3)), 0.7)


def test_gaussian_sum_noise_is_reproducible_and_zero_std():
    a = gaussian_sum_noise(1000, std=1.0, generator=_gen(4))
    b = gaussian_sum_noise(1000, std=1.0, generator=_gen(4))
    c = gaussian_sum_noise(1000, std=1.0, generator=_gen(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.count_nonzero(gaussian_sum_noise(1000, std=0.0, generator=_gen(4))) == 0
    with pytest.raises(ValueError):
        gaussian_sum_noise(10, std=-1.0, generator=_gen(4))


# --------------------------------------------------------------------------- adaptive clipping

COHORT = 100


def _run_adaptive(
    initial: float, gamma: float, seed: int, rounds: int = 300
) -> tuple[AdaptiveClipping, list[float]]:
    """Andrew et al.'s setting: cohort m = 100, sigma_b = m / 20, eta = 0.2; norms ~ lognormal(0, 1)."""
    clipping = AdaptiveClipping(
        initial_clip_norm=initial,
        target_quantile=gamma,
        learning_rate=0.2,
        count_noise_multiplier=COHORT / 20,
        expected_cohort_size=COHORT,
    )
    data, noise = _gen(seed), _gen(seed + 1000)
    history = []
    for _ in range(rounds):
        norms = torch.exp(torch.randn(COHORT, generator=data, dtype=torch.float64))
        history.append(clipping.update([bool(n <= clipping.clip_norm) for n in norms], generator=noise))
    return clipping, history


@pytest.mark.parametrize("gamma", [0.5, 0.9])
@pytest.mark.parametrize("initial", [0.01, 100.0])
def test_adaptive_clipping_converges_to_quantile(gamma, initial):
    true_quantile = math.exp(float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(gamma))))
    clipping, history = _run_adaptive(initial, gamma, seed=10)
    # Seeded. Over 50 seeds the final C has sd ~4% of the quantile, mean +0.1% (gamma = 0.5)
    # and +1.3% / +3.0% (gamma = 0.9 from below / above: from above log C falls by at most
    # eta * (1 - gamma) = 0.02 per round, so it needs >= 166 rounds to arrive).
    assert clipping.clip_norm == pytest.approx(true_quantile, rel=0.10)
    # It came from far away: the first rounds are still off by > 2x.
    assert abs(math.log(history[4] / true_quantile)) > math.log(2)
    fresh = torch.exp(torch.randn(200_000, generator=_gen(99), dtype=torch.float64))
    fraction = float((fresh <= clipping.clip_norm).double().mean())
    assert abs(fraction - gamma) < 0.05
    assert clipping.num_updates == 300


def test_adaptive_clipping_exact_step_without_noise():
    clipping = AdaptiveClipping(initial_clip_norm=2.0, target_quantile=0.5, learning_rate=0.2,
                                count_noise_multiplier=0.0, expected_cohort_size=4)
    new = clipping.update([True, True, True, False], generator=_gen(0))  # b_bar = 3/4
    assert new == pytest.approx(2.0 * math.exp(-0.2 * (0.75 - 0.5)))
    assert clipping.last_unclipped_fraction == pytest.approx(0.75)
    new = clipping.update([True] * 40, generator=_gen(0))  # b_bar clipped to 1
    assert new == pytest.approx(2.0 * math.exp(-0.2 * 0.25) * math.exp(-0.2 * 0.5))
    with pytest.raises(ValueError):
        clipping.update([True, 0.5], generator=_gen(0))


def test_adaptive_clipping_count_noise_is_applied():
    def trajectory(sigma_b: float) -> list[float]:
        clipping = AdaptiveClipping(initial_clip_norm=1.0, target_quantile=0.5, count_noise_multiplier=sigma_b,
                                    expected_cohort_size=10)
        g = _gen(7)
        return [clipping.update([True] * 5 + [False] * 5, generator=g) for _ in range(50)]

    quiet, noisy = trajectory(0.0), trajectory(2.0)
    assert all(c == pytest.approx(1.0) for c in quiet)  # b_bar = gamma exactly: C stays
    assert np.std(np.log(noisy)) > 0.01  # the noise moves it


def test_adaptive_clipping_state_dict_resumes_exactly():
    kwargs = dict(initial_clip_norm=0.3, target_quantile=0.7, count_noise_multiplier=3.0, expected_cohort_size=30)
    full, g_full = AdaptiveClipping(**kwargs), _gen(8)
    flags = [[i % 3 != j % 5 for i in range(30)] for j in range(20)]
    for f in flags[:10]:
        full.update(f, generator=g_full)
    state = full.state_dict()
    resumed = AdaptiveClipping(**kwargs)
    resumed.load_state_dict(state)
    g_resumed = torch.Generator()
    g_resumed.set_state(g_full.get_state())
    for f in flags[10:]:
        assert resumed.update(f, generator=g_resumed) == full.update(f, generator=g_full)
    assert resumed.state_dict() == full.state_dict()
    other = AdaptiveClipping(**{**kwargs, "target_quantile": 0.5})
    with pytest.raises(ValueError, match="target_quantile"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------- noise split


@pytest.mark.parametrize("z,sigma_b", [(1.0, 5.0), (0.5, 0.3), (3.0, 50.0), (1.0, 0.5000001)])
def test_update_noise_multiplier_round_trips(z, sigma_b):
    z_delta = update_noise_multiplier(noise_multiplier=z, count_noise_multiplier=sigma_b)
    assert z_delta > z
    assert z_delta == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-9)
    assert combined_noise_multiplier(update_noise_multiplier=z_delta, count_noise_multiplier=sigma_b) == (
        pytest.approx(z, rel=1e-12)
    )
    # Recovered from first principles: the two Gaussians' inverse squared multipliers add up.
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)


def test_update_noise_multiplier_paper_example():
    # Andrew et al. 2021: sigma_b = m / 20 with m = 100 costs ~0.5% more update noise at z = 1.
    assert update_noise_multiplier(noise_multiplier=1.0, count_noise_multiplier=5.0) == pytest.approx(
        1 / math.sqrt(0.99)
    )


@pytest.mark.parametrize("z,sigma_b", [(1.0, 0.5), (2.0, 0.9), (1.0, 0.0)])
def test_update_noise_multiplier_no_budget_left(z, sigma_b):
    with pytest.raises(ValueError) as info:
        update_noise_multiplier(noise_multiplier=z, count_noise_multiplier=sigma_b)
    message = str(info.value)
    assert f"{2 * sigma_b:g}" in message and f"{z:g}" in message
