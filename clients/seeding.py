"""Seeding torch generators from a full 128-bit-or-wider seed, not the 32 bits torch keeps.

`torch.Generator.manual_seed(s)` on the CPU seeds its MT19937 with `s` truncated to 32 bits
(torch 2.13: `manual_seed(5)` and `manual_seed(5 + 2**32)` give the same draws), so any scheme
that mixes (run seed, round, device) into one integer and calls manual_seed has only 2^32
distinct streams: by the birthday bound, a run with ~10^5 device fits shares a stream between
two of them with probability ~70%, and two fits that share a stream draw the same Poisson
masks and the same DP noise. Here the whole MT19937 state (624 32-bit words) is filled from
numpy's SeedSequence (O'Neill's seed_seq hashing, the one numpy uses for every bit generator),
so distinct seeds give distinct streams except with probability ~2^-128 per pair (the
SeedSequence pool is 128 bits).

A seed is an int, a sequence of ints in [0, 2^64), a `numpy.random.SeedSequence`, or a numpy
bit generator (its next 624 32-bit outputs become the state; fedsim passes a Philox stream).
Ints are packed at a fixed width (a length word, then two 32-bit words per int), so no two
different sequences feed SeedSequence the same words: (2^32,) and (0, 1) are different seeds.

Only torch and numpy are imported: clients/ stays free of Flower, Hydra and Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SeedLike = int | Sequence[int] | np.random.SeedSequence | np.random.BitGenerator

_MT_WORDS = 624  # MT19937's state
# Byte layout of torch 2.13's CPU generator state (CPUGeneratorImplState, checked by
# tests/test_randomness.py against numpy's MT19937 fed the same words): uint64 seed, int32
# `left`, bool `seeded`, uint32 `next`, then 624 state words stored as uint64, then the cached
# normal samples (zeroed = invalid).
_OFFSET_LEFT = 8
_OFFSET_SEEDED = 12
_OFFSET_NEXT = 16
_OFFSET_STATE = 24
_TEMPLATE: torch.Tensor | None = None


def seed_sequence(seed: int | Sequence[int] | np.random.SeedSequence) -> np.random.SeedSequence:
    """The SeedSequence of `seed` (see the module doc for the fixed-width packing)."""
    if isinstance(seed, np.random.SeedSequence):
        return seed
    ints = (seed,) if isinstance(seed, (int, np.integer)) else tuple(seed)
    words = [len(ints)]
    for value in ints:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**64:
            raise ValueError(f"seed must be ints in [0, 2**64), got {seed!r}")
        words += [int(value) & 0xFFFFFFFF, int(value) >> 32]
    return np.random.SeedSequence(np.array(words, dtype=np.uint32))  # an array: 5x cheaper than a list


def _template() -> np.ndarray:
    global _TEMPLATE
    if _TEMPLATE is None:
        state = torch.Generator().manual_seed(0).get_state().numpy().copy()
        state[:] = 0
        state[_OFFSET_LEFT : _OFFSET_LEFT + 4] = np.frombuffer(np.int32(1).tobytes(), np.uint8)  # twist before the next draw
        state[_OFFSET_SEEDED] = 1
        _TEMPLATE = state
    return _TEMPLATE


def mt19937_state(words: np.ndarray, *, initial_seed: int = 0) -> torch.Tensor:
    """A torch CPU generator state whose MT19937 key is `words` (624 uint32), freshly twisted."""
    words = np.asarray(words, dtype=np.uint32)
    if words.shape != (_MT_WORDS,):
        raise ValueError(f"an MT19937 state has {_MT_WORDS} words, got shape {words.shape}")
    if not words.any():
        raise ValueError("an all-zero MT19937 state never leaves zero")
    state = _template().copy()
    state[0:8].view(np.uint64)[0] = initial_seed & (2**64 - 1)
    state[_OFFSET_STATE : _OFFSET_STATE + 8 * _MT_WORDS].view(np.uint64)[:] = words
    return torch.from_numpy(state)


def seed_generator(generator: torch.Generator, seed: SeedLike) -> torch.Generator:
    """Reseed `generator` (CPU) from the full SeedSequence (or bit generator) of `seed`; returns it.

    The 624 state words are a bit generator's next outputs: PCG64 seeded from the SeedSequence
    (its 128-bit pool, as numpy seeds every bit generator), 10x cheaper than
    SeedSequence.generate_state(624), which matters once per device fit.
    """
    bits = seed if isinstance(seed, np.random.BitGenerator) else np.random.PCG64(seed_sequence(seed))
    words = bits.random_raw(_MT_WORDS // 2).view(np.uint32)
    generator.set_state(mt19937_state(words, initial_seed=int(words[0]) | int(words[1]) << 32))
    return generator


def new_generator(seed: SeedLike) -> torch.Generator:
    """A fresh CPU generator seeded from the full SeedSequence of `seed`."""
    return seed_generator(torch.Generator(), seed)


def child_seed(generator: torch.Generator) -> np.random.SeedSequence:
    """A seed drawn from `generator` (4 x 62 bits) for a child stream: noise, dropout."""
    draws = torch.randint(0, 2**62, (4,), generator=generator)
    return np.random.SeedSequence([int(v) for v in draws.tolist()])
