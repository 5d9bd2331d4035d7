"""Fixed-point encoding of float vectors into Z_{2^m} for secure aggregation.

Secure aggregation sums integers mod 2^m (Bonawitz et al. 2017, sec. 3: inputs in Z_R;
Bell et al. 2020, sec. 3), so each device maps its float vector to the integer grid first,
as in the distributed-DP pipeline of Agarwal, Kairouz, Liu 2021 ("The Skellam Mechanism
for Differentially Private Federated Learning", NeurIPS, sec. 4: clip, scale, stochastically
round, add integer noise, aggregate mod 2^m):

    clip each coordinate to [-r, r]
    u = (x + r) / step,  step = 2r / (2^b - 1)          (u in [0, 2^b - 1])
    q = floor(u) + Bernoulli(u - floor(u))               (stochastic rounding, unbiased)
    decode(q) = q * step - r                              (E[decode(encode(x))] = x for |x| <= r)

The sum of n devices' q (plus integer noise with |noise| <= B) lies in [-B, n (2^b - 1) + B],
so m must satisfy 2^m > n (2^b - 1) + 2B (`required_modulus_bits`); decoding the sum
recentres by B, subtracts the n offsets (n r) and rescales by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsim.secagg.crypto import mask_dtype

__all__ = ["FixedPoint", "check_modulus_bits", "required_modulus_bits", "stochastic_round", "to_ring"]

#: Above 52 bits the grid index no longer fits a float64 mantissa exactly.
MAX_BITS = 52


def required_modulus_bits(bits: int, n_devices: int, noise_bound: int = 0) -> int:
    """Smallest m such that the sum of `n_devices` b-bit values plus noise in [-B, B] fits Z_{2^m}.

    Needs 2^m > n (2^b - 1) + 2B (the span of possible sums). Raises ValueError naming the
    numbers if that m exceeds 64 (the widest ring the masks support).
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"quantization bits must be in [1, {MAX_BITS}], got {bits}")
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if noise_bound < 0:
        raise ValueError(f"noise_bound must be >= 0, got {noise_bound}")
    span = n_devices * ((1 << bits) - 1) + 2 * int(noise_bound)
    m = span.bit_length()
    if m > 64:
        raise ValueError(
            f"secure aggregation would need a {m}-bit modulus (> 64) for the sum of "
            f"{n_devices} devices x {bits}-bit values + noise bound {noise_bound} (max span {span}); "
            "use fewer quantization bits or fewer devices per aggregate"
        )
    return m


def check_modulus_bits(modulus_bits: int, bits: int, n_devices: int, noise_bound: int = 0) -> None:
    """Raise ValueError (naming the numbers) if Z_{2^modulus_bits} can overflow for this sum."""
    needed = required_modulus_bits(bits, n_devices, noise_bound)
    if not 1 <= modulus_bits <= 64:
        raise ValueError(f"modulus_bits must be in [1, 64], got {modulus_bits}")
    if modulus_bits < needed:
        raise ValueError(
            f"modulus_bits={modulus_bits} is too small: the sum of {n_devices} devices x {bits}-bit "
            f"values + noise bound {noise_bound} needs at least {needed} bits"
        )


def stochastic_round(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """floor(u) + Bernoulli(frac(u)) as int64: unbiased, E[result] = u."""
    lo = np.floor(u)
    return (lo + (rng.random(u.shape) < (u - lo))).astype(np.int64)


def to_ring(values: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Integers (any sign, any int dtype) reduced mod 2^m, in the working dtype of that ring."""
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"secure aggregation inputs must be integers, got dtype {arr.dtype}")
    # Integer casts keep the low bits (two's complement, sign-extended when widening), i.e.
    # they reduce mod 2^32 / 2^64, multiples of 2^m. Always a fresh array.
    wrapped = arr.astype(mask_dtype(modulus_bits), copy=True)
    if modulus_bits not in (32, 64):
        wrapped &= wrapped.dtype.type((1 << modulus_bits) - 1)
    return wrapped


@dataclass(frozen=True)
class FixedPoint:
    """Clip to [-clip, clip], b-bit grid, values in Z_{2^modulus_bits} (see module docstring)."""

    clip: float
    bits: int
    modulus_bits: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip range must be a positive finite number, got {self.clip}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"quantization bits must be in [1, {MAX_BITS}], got {self.bits}")
        if not self.bits <= self.modulus_bits <= 64:
            raise ValueError(f"modulus_bits must be in [bits={self.bits}, 64], got {self.modulus_bits}")

    @classmethod
    def for_sum(
        cls, clip: float, bits: int, n_devices: int, noise_bound: int = 0, modulus_bits: int | None = None
    ) -> FixedPoint:
        """The encoding for a sum over n devices: m chosen (or a given m checked) against overflow."""
        if modulus_bits is None:
            modulus_bits = required_modulus_bits(bits, n_devices, noise_bound)
        else:
            check_modulus_bits(modulus_bits, bits, n_devices, noise_bound)
        return cls(clip, bits, modulus_bits)

    @property
    def levels(self) -> int:
        """Largest grid index 2^b - 1."""
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """Grid spacing 2 clip / (2^b - 1) in input units."""
        return 2.0 * self.clip / self.levels

    def encode_int(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Grid indices in [0, 2^b - 1] as int64 (before noise / ring reduction).

        In place on one float64 copy (this runs once per device per round on ~1e5 values):
        the same draws and results as floor(u) + Bernoulli(frac(u)) written out plainly.
        """
        u = np.array(x, dtype=np.float64)
        if not np.isfinite(u).all():
            raise ValueError("cannot quantize non-finite values (NaN or inf) for secure aggregation")
        np.clip(u, -self.clip, self.clip, out=u)
        u += self.clip
        u /= self.step
        lo = np.floor(u)
        u -= lo  # the fractional part: round up with this probability
        lo += rng.random(u.shape) < u
        q = lo.astype(np.int64)
        np.clip(q, 0, self.levels, out=q)
        return q

    def encode(self, x: np.ndarray, rng: np.random.Generator, noise: np.ndarray | None = None) -> np.ndarray:
        """Encode x (plus optional integer noise on the grid, e.g. Skellam) into Z_{2^m}."""
        q = self.encode_int(x, rng)
        if noise is not None:
            q = q + np.asarray(noise, dtype=np.int64)
        return to_ring(q, self.modulus_bits)

    def decode(self, q: np.ndarray) -> np.ndarray:
        """One device's value back to floats (no noise)."""
        return self.decode_sum(q, 1)

    def decode_sum(self, total: np.ndarray, n_devices: int, noise_bound: int = 0) -> np.ndarray:
        """Float sum of n devices' values from their sum mod 2^m (noise sum assumed in [-B, B])."""
        mask = (1 << self.modulus_bits) - 1
        t = np.asarray(total).astype(np.uint64)
        shifted = (t + np.uint64(noise_bound & mask)) & np.uint64(mask)  # wraps mod 2^64 first: fine
        signed = shifted.astype(np.float64) - float(noise_bound)
        return signed * self.step - n_devices * self.clip
