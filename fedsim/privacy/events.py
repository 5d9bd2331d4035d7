"""Privacy events of sample-level DP-SGD and the per-device histories built from them.

One participation of a device in a round runs DP-SGD (Abadi et al. 2016, Algorithm 1) on
that device's examples: `steps` applications of the Poisson-subsampled Gaussian mechanism
with rate q = `sample_rate` and noise multiplier z = `noise_multiplier`. That is the
`DPSGDEvent` the device reports and the server records.

A device's *history* is the multiset of events it has spent, written canonically as a tuple
of `(event, count)` pairs sorted by event, every event at most once and every count >= 1.
Invariants the accountants and the ledger rely on:

* Composition is commutative (the epsilon of a set of mechanisms does not depend on the
  order they ran in), so the multiset is all an accountant needs, and two devices with the
  same multiset have the same epsilon.
* Canonical form makes equal multisets equal (and equally hashed) tuples, so a history is a
  cache key: the accountants cache epsilon by (history, delta) and the ledger counts how
  many devices share each history. A device's event is usually the same every round, so a
  history is typically one pair, `((event, participations),)`.

`DPSGDEvent` mirrors `clients.dp.DPSGDEvent` field for field; this package does not import
`clients` (no torch here), so `as_event` converts any object with the three fields.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class DPSGDEvent:
    """`steps` Poisson-subsampled Gaussian mechanisms: one participation of a device in DP-SGD."""

    noise_multiplier: float
    sample_rate: float  # Poisson rate per step
    steps: int  # steps in one participation


# ((event, count), ...) sorted by event, events distinct, counts >= 1.
History = tuple[tuple[DPSGDEvent, int], ...]

EMPTY_HISTORY: History = ()


def as_event(obj: Any) -> DPSGDEvent:
    """A validated `DPSGDEvent` from any object with the three fields (e.g. clients.dp.DPSGDEvent).

    Raises ValueError for values no accountant can give a meaning to. The fields are
    normalised (float, float, int) so that equal events from different sources hash alike.
    """
    try:
        z, q, steps = obj.noise_multiplier, obj.sample_rate, obj.steps
    except AttributeError:
        raise ValueError(f"not a DP-SGD event (needs noise_multiplier, sample_rate, steps): {obj!r}") from None
    return make_event(noise_multiplier=z, sample_rate=q, steps=steps)


def make_event(*, noise_multiplier: Any, sample_rate: Any, steps: Any) -> DPSGDEvent:
    """A validated, normalised event; ValueError naming the offending field."""
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)):
        raise ValueError(f"noise_multiplier must be a number, got {noise_multiplier!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
        raise ValueError(f"sample_rate must be a number, got {sample_rate!r}")
    # Integral floats (e.g. from JSON written by another tool) are accepted; 2.5 steps is not.
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or float(steps) != int(steps):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    z, q, n = float(noise_multiplier), float(sample_rate), int(steps)
    # z = 0 is allowed (no noise: epsilon is infinite); negative or non-finite z is meaningless.
    if not (math.isfinite(z) and z >= 0.0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    # q = 0 (nobody sampled) and steps = 0 are allowed: such an event spends nothing.
    if not (0.0 <= q <= 1.0):
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    if n < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    return DPSGDEvent(noise_multiplier=z, sample_rate=q, steps=n)


def make_history(pairs: Iterable[tuple[Any, int]]) -> History:
    """Canonical history of (event, count) pairs: merged, sorted, zero counts dropped."""
    counts: dict[DPSGDEvent, int] = {}
    for event, count in pairs:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
        if count:
            e = as_event(event)
            counts[e] = counts.get(e, 0) + count
    return tuple(sorted(counts.items()))


def add_participation(history: History, event: DPSGDEvent, count: int = 1) -> History:
    """`history` after `count` more participations spending `event` (history must be canonical)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    # Histories are a handful of pairs, so a linear merge beats any cleverness.
    out = list(history)
    for i, (e, c) in enumerate(out):
        if e == event:
            out[i] = (e, c + count)
            return tuple(out)
    out.append((event, count))
    out.sort()
    return tuple(out)


def total_steps(history: History) -> list[tuple[float, float, int]]:
    """Opacus-style history: [(noise_multiplier, sample_rate, steps * count), ...] in canonical order.

    This is exactly what `opacus.accountants.RDPAccountant.history` / `PRVAccountant.history`
    hold after the same mechanisms ran (their `step` merges consecutive identical steps).
    """
    return [(e.noise_multiplier, e.sample_rate, e.steps * c) for e, c in history]
