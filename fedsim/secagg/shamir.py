"""Shamir t-of-n secret sharing of byte strings over GF(2^31 - 1), vectorized with numpy.

Used as in Bonawitz et al. 2017 (sec. 3, SS.share / SS.recon) and Bell et al. 2020 (sec. 3,
shares among a device's graph neighbours only): each device shares its mask private key s^SK
and its self-mask seed b so the server can rebuild exactly one of them per device once t
neighbours answer.

The secret is cut into 3-byte chunks (24 bits < 31, so every chunk is a field element); each
chunk gets its own random polynomial of degree t-1 with the chunk as constant term (Shamir 1979,
"How to share a secret"), and the share of party `i` is the vector of evaluations at x = i + 1
(x = 0 would be the secret). Any t shares determine every polynomial (Lagrange interpolation at
0); any t-1 shares are uniformly distributed whatever the secret (perfect secrecy holds in every
prime field, so the field's size is not a security parameter: it only has to hold the chunks
and the ids). Interpolating from fewer than t gives, per chunk, a uniform field element, which
fits its chunk's 24 bits with probability 2^-7 (a 32-byte secret: 11 chunks, 2^-77 together).

The field is the Mersenne prime 2^31 - 1 so that every product of two elements fits an int64
(< 2^62): a sharing is one matrix product (the parties' powers times the coefficients, exact in
int64 with the coefficients split in 16-bit halves) over all holders and chunks at once, where
the previous field (2^127 - 1, until 2026-12-02) needed Python integers, one multiply-add at a
time.

Share encoding (bytes): 2-byte big-endian secret length, then one 4-byte big-endian field
element per chunk. A 32-byte secret gives a 46-byte share.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Collection, Mapping, Sequence

import numpy as np

__all__ = [
    "PRIME", "NotEnoughShares", "ShamirError", "all_well_formed", "is_well_formed", "reconstruct", "reconstruct_many",
    "share", "share_many", "share_size",
]  # fmt: skip

#: The Mersenne prime 2^31 - 1.
PRIME = (1 << 31) - 1
_CHUNK = 3
_ELEM = 4
_LEN = 2


class ShamirError(ValueError):
    """Malformed or inconsistent shares."""


class NotEnoughShares(ShamirError):
    """Fewer than t shares were given."""


def _num_chunks(secret_len: int) -> int:
    return max(1, -(-secret_len // _CHUNK))


def share_size(secret_len: int) -> int:
    """Bytes in one share of a `secret_len`-byte secret."""
    return _LEN + _ELEM * _num_chunks(secret_len)


def _chunks(secret: bytes) -> np.ndarray:
    if not secret:
        return np.zeros(1, dtype=np.int64)
    return np.array([int.from_bytes(secret[i : i + _CHUNK], "big") for i in range(0, len(secret), _CHUNK)], dtype=np.int64)


def _random_elements(count: int) -> np.ndarray:
    """`count` independent uniform elements of [0, PRIME) from the OS CSPRNG: 31 random bits
    each, the one value 2^31 - 1 drawn again (rejection sampling: exactly uniform)."""
    out = np.frombuffer(os.urandom(4 * count), dtype="<u4").astype(np.int64) >> 1
    while True:
        redo = np.flatnonzero(out == PRIME)
        if not len(redo):
            return out
        out[redo] = np.frombuffer(os.urandom(4 * len(redo)), dtype="<u4").astype(np.int64) >> 1


def share(secret: bytes, t: int, n_ids: Sequence[int]) -> dict[int, bytes]:
    """Split `secret` so that any `t` of the parties `n_ids` can rebuild it: {id: share}.

    Ids must be distinct non-negative integers below PRIME - 1; the coefficients come from the
    OS CSPRNG (os.urandom), always: shares never need to be reproducible.
    """
    return share_many([secret], t, n_ids)[0]


def share_many(secrets: Sequence[bytes], t: int, n_ids: Sequence[int]) -> list[dict[int, bytes]]:
    """`share` of each secret among the same parties (independent polynomials, evaluated in one
    matrix product; the powers of the parties' points come from a table kept between calls)."""
    ids = [int(i) for i in n_ids]
    if len(set(ids)) != len(ids) or any(i < 0 or i + 1 >= PRIME for i in ids):
        raise ShamirError(f"share ids must be distinct integers in [0, {PRIME - 2}], got {ids}")
    if not 1 <= t <= len(ids):
        raise ShamirError(f"threshold t={t} must be in [1, number of parties={len(ids)}]")
    for secret in secrets:
        if len(secret) >= 1 << (8 * _LEN):
            raise ShamirError(f"secret too long ({len(secret)} bytes)")
    if not secrets:
        return []
    powers = _powers(np.array(ids, dtype=np.int64), t)  # powers[r, k] = (ids[r] + 1)^k mod PRIME
    # One polynomial per chunk of every secret, all evaluated in one product: coeffs[k] = the
    # x^k coefficients (coeffs[0] = the chunks), the secrets side by side.
    chunks = [_chunks(secret) for secret in secrets]
    width = sum(len(c) for c in chunks)
    coeffs = np.empty((t, width), dtype=np.int64)
    coeffs[0] = np.concatenate(chunks)
    coeffs[1:] = _random_elements((t - 1) * width).reshape(t - 1, width)
    y = _mod_matmul(powers, coeffs).astype(">u4")
    out, start = [], 0
    for secret, part in zip(secrets, chunks, strict=True):
        header = len(secret).to_bytes(_LEN, "big")
        size = _ELEM * len(part)
        rows = np.ascontiguousarray(y[:, start : start + len(part)]).tobytes()
        out.append({i: header + rows[r * size : (r + 1) * size] for r, i in enumerate(ids)})
        start += len(part)
    return out


#: x^k mod PRIME for x = 1..size and k < t, per t: a session's parties are 0..n-1, so every
#: device of a host takes its neighbours' rows from one table instead of t - 1 numpy passes.
_POWER_TABLES: dict[int, np.ndarray] = {}
_TABLE_LIMIT = 1 << 21  # values (16 MB): larger ids or thresholds compute their powers directly


def _power_rows(x: np.ndarray, t: int) -> np.ndarray:
    powers = np.empty((len(x), t), dtype=np.int64)
    powers[:, 0] = 1
    for k in range(1, t):
        np.multiply(powers[:, k - 1], x, out=powers[:, k])  # < 2^62
        powers[:, k] %= PRIME
    return powers


def _powers(ids: np.ndarray, t: int) -> np.ndarray:
    """powers[r, k] = (ids[r] + 1)^k mod PRIME (party id's point is id + 1)."""
    need = int(ids.max()) + 1 if len(ids) else 0
    table = _POWER_TABLES.get(t)
    if table is None or len(table) < need:
        size = max(need, 2 * len(table) if table is not None else 0, 64)
        if size * t > _TABLE_LIMIT:
            return _power_rows(ids + 1, t)
        if len(_POWER_TABLES) >= 8:
            _POWER_TABLES.clear()
        table = _POWER_TABLES[t] = _power_rows(np.arange(1, size + 1, dtype=np.int64), t)
    return table[ids]


_BLOCK = 1 << 14  # terms summed before a reduction: _BLOCK * 2^31 * 2^16 < 2^62
_FLOAT_TERMS = 64  # inner sizes summed in float64: 64 * 2^31 * 2^16 = 2^53


def _mod_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b mod PRIME for int64 matrices with entries in [0, PRIME), exact: b is split in 16-bit
    halves, so each product is below 2^47; up to 64 terms (a share's threshold) the sums stay
    below 2^53 and run as float64 products, beyond that in int64 with at most _BLOCK terms
    summed before a reduction (any inner size)."""
    if a.shape[1] <= _FLOAT_TERMS:  # every partial sum is an integer below 2^53: float64 (BLAS) is exact
        af = a.astype(np.float64)
        high = (af @ (b >> 16).astype(np.float64)).astype(np.int64) % PRIME
        return ((high << 16) + (af @ (b & 0xFFFF).astype(np.float64)).astype(np.int64) % PRIME) % PRIME
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.int64)
    for start in range(0, a.shape[1], _BLOCK):
        part_a, part_b = a[:, start : start + _BLOCK], b[start : start + _BLOCK]
        high = (part_a @ (part_b >> 16)) % PRIME
        out += ((high << 16) + part_a @ (part_b & 0xFFFF)) % PRIME
        out %= PRIME
    return out


def _decode(share_bytes: bytes) -> tuple[int, np.ndarray]:
    if len(share_bytes) < _LEN + _ELEM or (len(share_bytes) - _LEN) % _ELEM:
        raise ShamirError(f"malformed share of {len(share_bytes)} bytes")
    secret_len = int.from_bytes(share_bytes[:_LEN], "big")
    values = np.frombuffer(share_bytes, dtype=">u4", offset=_LEN)
    if len(values) != _num_chunks(secret_len) or (values >= PRIME).any():
        raise ShamirError("malformed share: length header and field elements disagree")
    return secret_len, values


def is_well_formed(share_bytes: bytes, secret_len: int) -> bool:
    """True iff `share_bytes` decodes as a share of a `secret_len`-byte secret (format only:
    a well-formed share with a wrong value is indistinguishable until reconstruction)."""
    if len(share_bytes) != share_size(secret_len) or int.from_bytes(share_bytes[:_LEN], "big") != secret_len:
        return False
    return not (np.frombuffer(share_bytes, dtype=">u4", offset=_LEN) >= PRIME).any()


def all_well_formed(shares: Sequence[bytes], secret_len: int) -> bool:
    """`is_well_formed` of every share, checked as one array (a device's reply holds k shares)."""
    width = share_size(secret_len)
    if any(len(sh) != width for sh in shares):
        return False
    if not shares:
        return True
    rows = np.frombuffer(b"".join(shares), dtype=_row_dtype(secret_len))
    return bool((rows["n"] == secret_len).all() and not (rows["v"] >= PRIME).any())


def _row_dtype(secret_len: int) -> np.dtype:
    """One share as a numpy record: the length header and the field elements."""
    return np.dtype([("n", ">u2"), ("v", ">u4", (_num_chunks(secret_len),))])


@functools.lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis at 0 for the points xs, mod PRIME: l_j(0) = prod_{m != j} x_m / (x_m - x_j).

    Numerators and denominators are exact products of small integers (one C-level product
    each, one reduction at the end); the t denominators are inverted with one modular
    inversion (Montgomery's batch trick) instead of t.
    """
    total = math.prod(xs)
    nums = [total // xj % PRIME for xj in xs]
    dens = [math.prod(xm - xj for xm in xs if xm != xj) % PRIME for xj in xs]
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % PRIME)
    # Distinct xs below PRIME: no denominator is 0 mod PRIME, so the product is invertible.
    inverse = pow(prefix[-1], -1, PRIME)
    inverses = [0] * len(dens)
    for j in range(len(dens) - 1, -1, -1):
        inverses[j] = inverse * prefix[j] % PRIME
        inverse = inverse * dens[j] % PRIME
    return tuple(n * inv % PRIME for n, inv in zip(nums, inverses, strict=True))


def _check_ids(shares: Mapping[int, bytes]) -> None:
    """Share ids are the parties' ids: integers in [0, PRIME - 2] (x = id + 1 must be a nonzero
    field element; a negative id or PRIME - 1 would interpolate at a wrong point or divide by 0)."""
    for i in shares:
        if not _is_id(i):
            raise ShamirError(f"share ids must be integers in [0, {PRIME - 2}], got {i!r}")


def _is_id(i: object) -> bool:
    return isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < PRIME - 1


def _all_ids(ids: Collection[object]) -> bool:
    """`_is_id` of each (plain ints, the server's case, checked by type and range at once)."""
    if ids and all(type(i) is int for i in ids):
        return 0 <= min(ids) and max(ids) < PRIME - 1  # type: ignore[type-var, operator]
    return all(map(_is_id, ids))


def reconstruct(shares: Mapping[int, bytes], t: int) -> bytes:
    """Rebuild the secret from at least `t` shares {id: share} (Lagrange interpolation at 0).

    Uses the t smallest ids. Fewer than t shares raise NotEnoughShares; a reconstructed chunk
    that does not fit its byte length (inconsistent shares or a wrong t) raises ShamirError.
    """
    if t < 1:
        raise ShamirError(f"threshold t={t} must be >= 1")
    if len(shares) < t:
        raise NotEnoughShares(f"{len(shares)} shares given, {t} needed to reconstruct")
    _check_ids(shares)
    ids = sorted(int(i) for i in shares)[:t]  # Python ints: the Lagrange products are exact
    blobs = [bytes(shares[i]) for i in ids]
    secret_len, _ = _decode(blobs[0])
    width = share_size(secret_len)
    if any(len(b) != width for b in blobs):
        for b in blobs:
            _decode(b)  # a malformed share says so; else they are shares of secrets of other lengths
        raise ShamirError("shares of secrets of different lengths")
    rows = np.frombuffer(b"".join(blobs), dtype=_row_dtype(secret_len))
    if (rows["n"] != secret_len).any():
        raise ShamirError("shares of secrets of different lengths")
    values = rows["v"].astype(np.int64)  # [t, chunks]
    if (values >= PRIME).any():
        raise ShamirError("malformed share: length header and field elements disagree")
    weights = np.array(_lagrange_at_zero(tuple(i + 1 for i in ids)), dtype=np.int64)
    chunks = ((weights[:, None] * values) % PRIME).sum(axis=0) % PRIME  # t terms < 2^31: no overflow
    out = []
    for c, value in enumerate(chunks.tolist()):
        size = min(_CHUNK, secret_len - c * _CHUNK) if secret_len else 0
        if value >= 1 << (8 * size):
            raise ShamirError(
                f"reconstructed chunk {c} does not fit in {size} bytes: inconsistent shares or wrong threshold"
            )
        out.append(value.to_bytes(size, "big"))
    return b"".join(out)


def _mod_pow(base: np.ndarray, exponent: int) -> np.ndarray:
    """base^exponent mod PRIME elementwise (square and multiply; every product < 2^62)."""
    result = np.ones_like(base)
    square = base % PRIME
    while exponent:
        if exponent & 1:
            result = result * square % PRIME
        square = square * square % PRIME
        exponent >>= 1
    return result


def _lagrange_rows(xs: np.ndarray) -> np.ndarray:
    """`_lagrange_at_zero` of each row of xs ([secrets, t] distinct points in [1, PRIME)), as one
    array computation: numerators from prefix and suffix products, denominators from the [t, t]
    differences, inverses by Fermat (d^(PRIME-2))."""
    n, t = xs.shape
    prefix = np.ones((n, t + 1), dtype=np.int64)
    suffix = np.ones((n, t + 1), dtype=np.int64)
    for j in range(t):
        prefix[:, j + 1] = prefix[:, j] * xs[:, j] % PRIME
        suffix[:, t - j - 1] = suffix[:, t - j] * xs[:, t - j - 1] % PRIME
    nums = prefix[:, :t] * suffix[:, 1:] % PRIME  # prod over m != j of x_m
    diffs = (xs[:, None, :] - xs[:, :, None]) % PRIME  # [i, j, m] = x_m - x_j
    diffs[:, np.arange(t), np.arange(t)] = 1
    dens = np.ones((n, t), dtype=np.int64)
    for m in range(t):
        dens = dens * diffs[:, :, m] % PRIME
    return nums * _mod_pow(dens, PRIME - 2) % PRIME


def reconstruct_many(shares: Sequence[Mapping[int, bytes]], t: int) -> list[bytes | ShamirError]:
    """`reconstruct` of each secret, as one array computation over the secrets whose shares are
    well formed: the secret, or the ShamirError `reconstruct` would raise (in input order), so
    a caller can stop at the first failure as with one call per secret. The server of a round
    rebuilds one secret per device (1,000 at cohort 1,000): one call, not 1,000."""
    if t < 1:
        raise ShamirError(f"threshold t={t} must be >= 1")
    out: list[bytes | ShamirError | None] = [None] * len(shares)
    batches: dict[int, list[tuple[int, list[int], bytes]]] = {}
    for pos, held in enumerate(shares):
        if len(held) >= t and _all_ids(held):
            ids = sorted(int(i) for i in held)[:t]
            blob = b"".join(bytes(held[i]) for i in ids)
            secret_len = int.from_bytes(blob[:_LEN], "big")
            width = share_size(secret_len) if secret_len else 0
            if secret_len and all(len(held[i]) == width for i in ids):  # else the one-secret path says why
                batches.setdefault(secret_len, []).append((pos, ids, blob))
                continue
        try:
            out[pos] = reconstruct(held, t)
        except ShamirError as err:
            out[pos] = err
    for secret_len, batch in batches.items():
        chunks = _num_chunks(secret_len)
        rows = np.frombuffer(b"".join(blob for _, _, blob in batch), dtype=_row_dtype(secret_len)).reshape(len(batch), t)
        values = rows["v"].astype(np.int64)  # [secrets, t, chunks]
        valid = (rows["n"] == secret_len).all(axis=1) & (values < PRIME).all(axis=(1, 2))
        xs = np.array([ids for _, ids, _ in batch], dtype=np.int64) + 1
        # Secrets with the same t holders share their weights (with a complete graph nearly all
        # do): compute each distinct row once, in blocks of at most ~4M [rows, t, t] values.
        rows_x, inverse = np.unique(xs, axis=0, return_inverse=True)
        step = max(1, (1 << 22) // (t * t))
        unique_weights = np.concatenate([_lagrange_rows(rows_x[k : k + step]) for k in range(0, len(rows_x), step)])
        weights = unique_weights[inverse.reshape(-1)]
        sums = ((weights[:, :, None] * values) % PRIME).sum(axis=1) % PRIME  # [secrets, chunks]
        last = secret_len - (chunks - 1) * _CHUNK  # bytes in the last chunk
        fits = valid & (sums[:, :-1] < 1 << (8 * _CHUNK)).all(axis=1) & (sums[:, -1] < 1 << (8 * last))
        # Each chunk as 3 big-endian bytes; the last chunk keeps only its `last` low bytes.
        raw = sums.astype(">u4").view(np.uint8).reshape(len(batch), chunks, 4)[:, :, 4 - _CHUNK :].reshape(len(batch), -1)
        raw = np.ascontiguousarray(np.concatenate([raw[:, : -_CHUNK], raw[:, raw.shape[1] - last :]], axis=1))
        for r, (pos, ids, _) in enumerate(batch):
            if fits[r]:
                out[pos] = raw[r].tobytes()
            else:  # malformed or inconsistent: the one-secret path raises the exact error
                try:
                    out[pos] = reconstruct(shares[pos], t)
                except ShamirError as err:
                    out[pos] = err
    return out  # type: ignore[return-value]
