"""Cohort sampling: which devices train in a round, drawn by the server with its own seeded RNG.

Poisson sampling (each device joins independently with rate q = cohort_size / population) is
what privacy amplification by sampling assumes (Abadi et al. 2016; Zhu & Wang 2019). It is
drawn as m ~ Binomial(N, q) followed by m distinct ids uniformly at random, which has exactly
the same distribution as N independent coin flips but costs O(m), not O(N): nothing per round
touches every device of the population. Fixed-size sampling draws exactly k distinct ids.

The caller passes the round's generator: fedsim's server uses the stream ("cohort", r) of
`fedsim.randomness`, so a round's cohort does not depend on what happened in earlier rounds
(resuming at round r samples the same cohort in reproducible mode), and in secure mode the
cohort comes from fresh OS entropy: whoever knows the run seed cannot predict it.
"""

from __future__ import annotations

import numpy as np


def sample_cohort(*, population: int, cohort_size: int, method: str, rng: np.random.Generator) -> list[int]:
    """Device ids taking part in the round whose generator is `rng`, ascending."""
    if method == "poisson":
        size = int(rng.binomial(population, cohort_size / population))
    elif method == "fixed":
        size = cohort_size
    else:
        raise ValueError(f"unknown sampling method {method!r}; allowed: poisson, fixed")
    # Generator.choice without replacement uses Floyd's set-based algorithm when size is much
    # smaller than the population, so this stays O(size) at a population of 100,000.
    ids = rng.choice(population, size=size, replace=False, shuffle=False)
    return sorted(int(i) for i in ids)
