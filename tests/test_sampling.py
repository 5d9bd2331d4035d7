"""Cohort sampling: Poisson with rate q, fixed size k, seeded per round."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim import randomness
from fedsim.sampling import sample_cohort
from fedsim.placement import assign_devices


def cohorts(n_rounds: int, *, seed: int, **kw: object) -> list[list[int]]:
    return [round_cohort(seed=seed, round_num=r, **kw) for r in range(1, n_rounds + 1)]


def round_cohort(*, seed: int, round_num: int, **kw: object) -> list[int]:
    """The cohort fedsim's server draws: the stream ("cohort", round) of a run with this seed."""
    streams = randomness.Streams(mode="reproducible", seed=seed, fingerprint=0)
    return sample_cohort(rng=streams.numpy("cohort", round_num), **kw)  # type: ignore[arg-type]


def test_poisson_sampling_has_rate_q_per_device() -> None:
    population, k, rounds = 200, 20, 2000
    q = k / population
    counts = np.zeros(population)
    sizes = []
    for c in cohorts(rounds, population=population, cohort_size=k, method="poisson", seed=3):
        counts[c] += 1
        sizes.append(len(c))
    # Cohort size ~ Binomial(N, q): mean Nq, variance Nq(1-q); 5-sigma bounds on the mean.
    sd_mean = np.sqrt(population * q * (1 - q) / rounds)
    assert abs(np.mean(sizes) - k) < 5 * sd_mean
    assert np.var(sizes) == pytest.approx(population * q * (1 - q), rel=0.15)
    # Each device joins with probability q, independently of its id.
    rate = counts / rounds
    assert np.all(np.abs(rate - q) < 5 * np.sqrt(q * (1 - q) / rounds))
    assert len(set(sizes)) > 5  # not a fixed size in disguise


def test_fixed_sampling_gives_exactly_k_distinct_devices() -> None:
    for c in cohorts(50, population=1000, cohort_size=37, method="fixed", seed=0):
        assert len(c) == 37 and len(set(c)) == 37
        assert c == sorted(c) and 0 <= c[0] and c[-1] < 1000


def test_same_seed_same_cohorts_other_seed_other_cohorts() -> None:
    a = cohorts(5, population=100_000, cohort_size=50, method="poisson", seed=1)
    b = cohorts(5, population=100_000, cohort_size=50, method="poisson", seed=1)
    c = cohorts(5, population=100_000, cohort_size=50, method="poisson", seed=2)
    assert a == b and a != c


def test_round_cohort_does_not_depend_on_earlier_rounds() -> None:
    full = cohorts(10, population=500, cohort_size=10, method="fixed", seed=7)
    assert round_cohort(population=500, cohort_size=10, method="fixed", seed=7, round_num=8) == full[7]


def test_multiplexed_assignment_covers_cohort_once_and_classic_maps_device_to_node() -> None:
    cohort = [3, 8, 9, 20, 41, 42, 77]
    nodes = [11, 22, 33]
    plan = assign_devices(cohort, nodes, "multiplexed")
    assert sorted(d for _, ids in plan for d in ids) == cohort
    assert [n for n, _ in plan] == nodes
    assert max(len(ids) for _, ids in plan) - min(len(ids) for _, ids in plan) <= 1
    # More workers than devices: idle workers get no message.
    assert len(assign_devices([5], nodes, "multiplexed")) == 1
    classic = assign_devices([0, 2], [100, 101, 102], "classic")
    assert classic == [(100, [0]), (102, [2])]
