"""Cohort sampling: which devices train in a round, drawn by the server with its own seeded RNG.

Poisson sampling (each device joins independently with rate q = cohort_size / population) is
what privacy amplification by sampling assumes (Abadi et al. 2016; Zhu & Wang 2019). It is
drawn as m ~ Binomial(N, q) followed by m distinct ids uniformly at random, which has exactly
the same distribution as N independent coin flips but costs O(m), not O(N): nothing per round
touches every device of the population. Fixed-size sampling draws exactly k distinct ids.
Cyclic (DP-FTRL's participation pattern, no randomness) takes each device once per cycle.

The caller passes the round's generator: fedsim's server uses the stream ("cohort", r) of
`fedsim.randomness`, so a round's cohort does not depend on what happened in earlier rounds
(resuming at round r samples the same cohort in reproducible mode), and in secure mode the
cohort comes from fresh OS entropy: whoever knows the run seed cannot predict it.
"""

from __future__ import annotations

import numpy as np


def cyclic_period(population: int, cohort_size: int) -> int:
    """Rounds of one cycle of the cyclic schedule: B = population // cohort_size classes."""
    return max(1, population // cohort_size)


def sample_cohort(
    *, population: int, cohort_size: int, method: str, rng: np.random.Generator, round_num: int | None = None
) -> list[int]:
    """Device ids taking part in the round whose generator is `rng`, ascending.

    "cyclic" (for DP-FTRL, fedsim.privacy.tree): no randomness; round r takes the devices
    i with i mod B = (r - 1) mod B, B = population // cohort_size, so every device takes part
    once per B rounds (cohorts of floor or ceil of population / B devices). The schedule is
    fixed before the run and public; the accounting assumes nothing else of it."""
    if method == "cyclic":
        if round_num is None or round_num < 1:
            raise ValueError(f"cyclic sampling needs the round number (>= 1), got {round_num!r}")
        period = cyclic_period(population, cohort_size)
        return list(range((round_num - 1) % period, population, period))
    if method == "poisson":
        size = int(rng.binomial(population, cohort_size / population))
    elif method == "fixed":
        size = cohort_size
    else:
        raise ValueError(f"unknown sampling method {method!r}; allowed: poisson, fixed, cyclic")
    # Generator.choice without replacement uses Floyd's set-based algorithm while size is under
    # 1/20 of the population, so this stays O(size) at a population of 10^9 (tests/test_population.py);
    # above that it shuffles an index of the population, at most 20x the cohort.
    ids = rng.choice(population, size=size, replace=False, shuffle=False)
    return sorted(int(i) for i in ids)
