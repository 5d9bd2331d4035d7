"""Fixed-point encoding of float vectors into Z_{2^m} for secure aggregation.

Secure aggregation sums integers mod 2^m (Bonawitz et al. 2017, sec. 3: inputs in Z_R;
Bell et al. 2020, sec. 3), so each device maps its float vector to the integer grid first,
as in the distributed-DP pipeline of Agarwal, Kairouz, Liu 2021 ("The Skellam Mechanism
for Differentially Private Federated Learning", NeurIPS, sec. 4: clip, scale, randomly
round, add integer noise, aggregate mod 2^m):

    clip each coordinate to [-r, r]
    u = x / step,  step = r / L,  L = 2^(b-1) - 1          (u in [-L, L])
    q = floor(u) + Bernoulli(u - floor(u))                   (randomized rounding, unbiased)
    decode(q) = q * step                                     (E[decode(encode(x))] = x for |x| <= r)

The Bernoulli draws of `FixedPoint.encode_int` use one uniform 32-bit word k per coordinate
and round up with probability the fractional part rounded to a multiple of 2^-32, so the
rounding is unbiased to within 2^-33 of a grid step per coordinate. Up to
FIXED_POINT_MAX_BITS = 20 bits (the default is 16) it works in fixed point: s = x L 2^32 / r,
clipped to [-L 2^32, L 2^32] (clipping x to [-r, r], exactly), is rounded to the nearest
integer v = floor(u) 2^32 + g (half to even), and q = floor(u) + [k < g], computed as
(v + 2^32 - 1 - k) >> 32 in int64 (0.26 ms for a 113,610-value vector against 0.44 ms for the
float64 comparison, 2026-12-03, one process on the 2-core AMD machine). Above 20 bits L 2^32
no longer stays below 2^51, and it compares (k + 1/2) / 2^32 < u - floor(u) in float64 (u =
x / step clipped to [-L, L]). With the same words both give the same q except where their
float64 roundings put the fraction on either side of a half-way point between two multiples
of 2^-32 and the word falls just there: about 2^-32 per coordinate (scripts/golden.py's SecAgg+
runs, 20 bits, kept their model hashes across the change). The words are the AES-128-CTR
keystream (nonce and counter 0, little-endian 32-bit words) under a key of 128 bits drawn
from the device's rounding stream (its generator's first two 64-bit outputs,
`rounding_stream`): reproducible where the stream is (fedsim.randomness), from the OS CSPRNG
where it is, and 4x cheaper than the generator's own output (AES-NI: 0.05 ms for a
113,610-value vector against 0.2 ms of Philox words and 0.5 ms of Philox float64 draws, which
the encoding used until 2026-12-02).

The grid is centred on 0 (q is a signed integer vector, reduced mod 2^m by two's complement):
a device's contribution to the sum is then an integer vector whose norm the Skellam
accountant bounds (fedsim.privacy.skellam). An offset grid (q in [0, 2^b - 1], the offset
removed after summing) would make the sum's lattice depend on the number of devices, which
integer noise cannot hide.

Conditional randomized rounding (Kairouz, Liu, Steinke 2021, Sec. 4.1): with `max_norm`,
the rounding is drawn again until ||q||_2 <= max_norm, so the norm bound the accountant uses
holds for every device, not only on average.

The sum of n devices' q (|q_j| <= L) plus integer noise with |noise| <= B lies in
[-(nL + B), nL + B], so m must satisfy 2^m > 2 (nL + B) (`required_modulus_bits`); decoding
maps the sum mod 2^m back to that signed range and rescales by step.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedsim.secagg.crypto import mask_dtype, zero_bytes

__all__ = [
    "FixedPoint",
    "check_modulus_bits",
    "from_ring_signed",
    "required_modulus_bits",
    "stochastic_round",
    "to_ring",
]

#: Above 52 bits the grid index no longer fits a float64 mantissa exactly.
MAX_BITS = 52
#: Conditional rounding redraws at most this often (each draw fails with probability <= beta,
#: e^-0.5 by default: 200 failures in a row have probability < 1e-43).
MAX_ROUNDING_DRAWS = 200


def _half_levels(bits: int) -> int:
    if not 2 <= bits <= MAX_BITS:
        raise ValueError(f"quantization bits must be in [2, {MAX_BITS}], got {bits}")
    return (1 << (bits - 1)) - 1


def required_modulus_bits(bits: int, n_devices: int, noise_bound: int = 0, *, other_abs_sum: int = 0) -> int:
    """Smallest m such that the sum of `n_devices` b-bit values plus noise in [-B, B] fits Z_{2^m}.

    Needs 2^m > 2 (n L + B), L = 2^(b-1) - 1 (the signed range of possible sums);
    `other_abs_sum` bounds |sum| of any other coordinates sharing the vector. Raises
    ValueError naming the numbers if that m exceeds 64 (the widest ring the masks support).
    """
    half = _half_levels(bits)
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if noise_bound < 0 or other_abs_sum < 0:
        raise ValueError(f"noise_bound and other_abs_sum must be >= 0, got {noise_bound}, {other_abs_sum}")
    span = 2 * max(n_devices * half + int(noise_bound), int(other_abs_sum))
    m = span.bit_length()
    if m > 64:
        raise ValueError(
            f"secure aggregation would need a {m}-bit modulus (> 64) for the sum of "
            f"{n_devices} devices x {bits}-bit values + noise bound {noise_bound} (max span {span}); "
            "use fewer quantization bits or fewer devices per aggregate"
        )
    return m


def check_modulus_bits(modulus_bits: int, bits: int, n_devices: int, noise_bound: int = 0, *, other_abs_sum: int = 0) -> None:
    """Raise ValueError (naming the numbers) if Z_{2^modulus_bits} can overflow for this sum."""
    needed = required_modulus_bits(bits, n_devices, noise_bound, other_abs_sum=other_abs_sum)
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


def from_ring_signed(total: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Elements of Z_{2^m} as int64 in [-2^(m-1), 2^(m-1)) (the inverse of `to_ring` on that range)."""
    t = np.asarray(total).astype(np.uint64) & np.uint64((1 << modulus_bits) - 1 if modulus_bits < 64 else 2**64 - 1)
    signed = t.astype(np.int64)  # two's complement for m = 64
    if modulus_bits < 64:
        signed = np.where(signed >= (1 << (modulus_bits - 1)), signed - (1 << modulus_bits), signed)
    return signed


class _Workspace:
    """encode_int's buffers for vectors of one length (the float path's made on first use)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.u = np.empty(size, dtype=np.float64)
        self.fixed = np.empty(size, dtype=np.int64)

    @functools.cached_property
    def lo(self) -> np.ndarray:
        return np.empty(self.size, dtype=np.float64)

    @functools.cached_property
    def draws(self) -> np.ndarray:
        return np.empty(self.size, dtype=np.float64)

    @functools.cached_property
    def up(self) -> np.ndarray:
        return np.empty(self.size, dtype=bool)


#: encode_int's fixed-point path (module docstring) up to this many bits: L 2^32 < 2^51.
FIXED_POINT_MAX_BITS = 20
_WORD = 1 << 32
_ROUND_MAGIC = 1.5 * 2.0**52  # x + this is x rounded to an integer, in the low mantissa bits, for |x| < 2^51
_ROUND_MAGIC_BITS = int(np.float64(_ROUND_MAGIC).view(np.int64))
_HALF_WORD = 2.0**-33  # half of one 32-bit draw's step (the float path)
_ROUNDING_NONCE = bytes(16)


def rounding_stream(rng: np.random.Generator) -> Callable[[int], np.ndarray]:
    """encode_int's rounding words (module docstring): `words(n)` gives the next n uniform
    32-bit words (uint32) of AES-128-CTR under a key of 128 bits drawn from `rng` (its bit
    generator's next two 64-bit outputs, little-endian); successive calls continue the
    keystream (conditional rounding's redraws). Each call's array is valid until the next call
    on the same thread."""
    key = rng.bit_generator.random_raw(2).astype("<u8").tobytes()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ROUNDING_NONCE)).encryptor()

    def words(size: int) -> np.ndarray:
        buf = getattr(_workspaces, "words", None)
        if buf is None or len(buf) < 4 * size + 16:
            buf = _workspaces.words = bytearray(4 * size + 16)
        encryptor.update_into(zero_bytes(4 * size), buf)
        return np.frombuffer(buf, dtype="<u4", count=size)

    return words


_workspaces = threading.local()


def _workspace(size: int) -> _Workspace:
    """This thread's buffers for `size` values (the last length used is kept)."""
    work = getattr(_workspaces, "work", None)
    if work is None or work.size != size:
        work = _workspaces.work = _Workspace(size)
    return work


@dataclass(frozen=True)
class FixedPoint:
    """Clip to [-clip, clip], signed b-bit grid, values in Z_{2^modulus_bits} (module docstring)."""

    clip: float
    bits: int
    modulus_bits: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip range must be a positive finite number, got {self.clip}")
        _half_levels(self.bits)
        if not self.bits <= self.modulus_bits <= 64:
            raise ValueError(f"modulus_bits must be in [bits={self.bits}, 64], got {self.modulus_bits}")

    @classmethod
    def for_sum(
        cls,
        clip: float,
        bits: int,
        n_devices: int,
        noise_bound: int = 0,
        modulus_bits: int | None = None,
        *,
        other_abs_sum: int = 0,
    ) -> FixedPoint:
        """The encoding for a sum over n devices: m chosen (or a given m checked) against overflow."""
        if modulus_bits is None:
            modulus_bits = required_modulus_bits(bits, n_devices, noise_bound, other_abs_sum=other_abs_sum)
        else:
            check_modulus_bits(modulus_bits, bits, n_devices, noise_bound, other_abs_sum=other_abs_sum)
        return cls(clip, bits, modulus_bits)

    @property
    def levels(self) -> int:
        """L = 2^(b-1) - 1: grid indices lie in [-L, L]."""
        return _half_levels(self.bits)

    @property
    def step(self) -> float:
        """Grid spacing clip / L in input units."""
        return self.clip / self.levels

    def encode_int(
        self, x: np.ndarray, rng: np.random.Generator, max_norm: float | None = None, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Grid indices in [-L, L] as int64 (before noise / ring reduction).

        `max_norm` (grid units): conditional randomized rounding, the rounding is drawn again
        until ||q||_2 <= max_norm (ValueError after MAX_ROUNDING_DRAWS draws: the bound does
        not fit this vector). `out`: a C-contiguous int64 array of x's size to write q into
        (returned, shaped as x), instead of a new one. This runs once per device per round on
        ~1e5 values: the float64 work happens in per-thread buffers reused from call to call
        (fresh arrays of this size cost a page fault per 4 KiB each time, as much as the
        arithmetic), so the result is the same bits as with fresh arrays.
        """
        work = _workspace(np.size(x))
        flat = np.ravel(x)
        if not np.isfinite(flat).all():
            raise ValueError("cannot quantize non-finite values (NaN or inf) for secure aggregation")
        limit = None if max_norm is None else math.floor(max_norm * max_norm)
        if out is None:
            q = np.empty(work.size, dtype=np.int64)
        elif out.dtype != np.int64 or out.size != work.size or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous int64 array of {work.size} values, got {out.dtype} {out.shape}")
        else:
            q = out.reshape(-1)
        words = rounding_stream(rng)
        fixed = self.bits <= FIXED_POINT_MAX_BITS and math.isfinite(self.levels * _WORD / self.clip)  # (a clip below ~1e-293: float)
        draw = self._fixed_point_draws(flat, work, q, words) if fixed else self._float_draws(flat, work, q, words)
        for _ in range(MAX_ROUNDING_DRAWS):
            draw()
            if limit is None or int(np.dot(q, q)) <= limit:
                return q.reshape(np.shape(x))
        raise ValueError(f"conditional rounding: no draw within the norm bound {max_norm:g} after {MAX_ROUNDING_DRAWS} tries")

    def _fixed_point_draws(self, flat: np.ndarray, work: _Workspace, q: np.ndarray, words: Callable[[int], np.ndarray]) -> Callable[[], None]:
        """bits <= FIXED_POINT_MAX_BITS (module docstring): s = x L 2^32 / r clipped to [-L 2^32,
        L 2^32], v = s rounded to the nearest integer (half to even) = floor(u) 2^32 + g with g
        the fraction in units of 2^-32, and each draw q = (v + 2^32 - 1 - k) >> 32, i.e. floor(u)
        + [k < g]. |s| < 2^51, so adding 1.5 2^52 rounds s to an integer whose int64 bits
        are the float's mantissa (the magic-number conversion: two passes instead of numpy's
        slower float-to-int cast)."""
        u, fixed = work.u, work.fixed
        np.copyto(u, flat)  # (a float32 x: float64 arithmetic, not float32)
        bound = float(self.levels * _WORD)
        with np.errstate(over="ignore"):  # a huge finite value overflows to inf here, then is clipped
            np.multiply(u, bound / self.clip, out=u)
        np.clip(u, -bound, bound, out=u)  # clipping x to [-r, r] is clipping s to the grid's ends, exactly
        np.add(u, _ROUND_MAGIC, out=u)
        np.subtract(u.view(np.int64), _ROUND_MAGIC_BITS - (_WORD - 1), out=fixed)  # v + 2^32 - 1

        def draw() -> None:
            np.copyto(q, words(q.size))
            np.subtract(fixed, q, out=q)
            np.right_shift(q, 32, out=q)  # floor division by 2^32: in [-L, L] (+-L have g = 0)

        return draw

    def _float_draws(self, flat: np.ndarray, work: _Workspace, q: np.ndarray, words: Callable[[int], np.ndarray]) -> Callable[[], None]:
        """bits > FIXED_POINT_MAX_BITS (L 2^32 no longer below 2^51): u = x / step clipped to
        [-L, L], f = u - floor(u), and each draw rounds up iff (k + 1/2) 2^-32 < f, in float64."""
        u, lo, draws, up = work.u, work.lo, work.draws, work.up
        # Clipping each value to [-r, r] is clipping x / step to [-L, L] (step = r / L), done
        # after the division so that no rounding of r / step can leave the grid.
        with np.errstate(over="ignore"):  # a huge finite value overflows to inf here, then is clipped
            np.divide(flat, self.step, out=u, dtype=np.float64)
        np.clip(u, -self.levels, self.levels, out=u)
        np.floor(u, out=lo)
        # The fractional part f less half a draw step: (k + 1/2) 2^-32 < f iff k 2^-32 < f - 2^-33
        # (both sides exact in float64), so the comparison below needs no offset per draw.
        np.subtract(u, lo, out=u)
        np.subtract(u, _HALF_WORD, out=u)

        def draw() -> None:
            np.multiply(words(q.size), 2.0**-32, out=draws)
            np.less(draws, u, out=up)
            np.add(lo, up, out=draws)  # in [-L, L]: the clipped values are, and +-L have no fraction to round up
            np.copyto(q, draws, casting="unsafe")

        return draw

    def encode(
        self, x: np.ndarray, rng: np.random.Generator, noise: np.ndarray | None = None, max_norm: float | None = None
    ) -> np.ndarray:
        """Encode x (plus optional integer noise on the grid, e.g. Skellam) into Z_{2^m}."""
        q = self.encode_int(x, rng, max_norm)
        if noise is not None:
            q = q + np.asarray(noise, dtype=np.int64)
        return to_ring(q, self.modulus_bits)

    def decode(self, q: np.ndarray) -> np.ndarray:
        """One device's value back to floats (no noise)."""
        return self.decode_sum(q)

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """Float sum of devices' values (noise included) from their sum mod 2^m; the sum must
        lie in [-2^(m-1), 2^(m-1)), which `required_modulus_bits` guarantees."""
        return from_ring_signed(total, self.modulus_bits).astype(np.float64) * self.step
