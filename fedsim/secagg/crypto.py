"""Cryptographic primitives of secure aggregation, all from the `cryptography` package.

- Key pairs: X25519 (raw 32-byte public keys). Each device holds two per session, as in
  Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
  Learning", CCS, sec. 4 / Fig. 4 "AdvertiseKeys"): c for encrypting share payloads to a
  neighbour and s for agreeing on pairwise mask seeds.
- Key agreement: X25519 Diffie-Hellman followed by HKDF-SHA256 with an `info` string that
  separates the mask key from the encryption key ("fedsim/secagg/mask", "fedsim/secagg/enc")
  and salt = the session id (Bonawitz 2017 sec. 3, KA.agree; Bell et al. 2020, "Secure
  Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS, sec. 3 use the same
  key-agreement-then-PRG construction for the pairwise masks).
- Authenticated encryption of share payloads: AES-256-GCM with a random 96-bit nonce and
  associated data (sender id, receiver id, session id), so a flipped byte, a ciphertext routed
  to the wrong receiver, or one replayed from another round raises `TamperedShare`
  (Bonawitz 2017 sec. 3, AE.enc/AE.dec, "IND-CPA and INT-CTXT").
- Identity keys and signatures (active threat model only): Ed25519 (RFC 8032) from
  `cryptography`. A device draws an identity key per session from the OS CSPRNG and registers
  the public key once with the key registry (the PKI Bonawitz 2017 sec. 6.2 assumes; fedsim.pki);
  it signs the device's round keys (so the server cannot substitute its own) and, in the
  consistency check, the survivor set it was told about.
- Every device secret (X25519 keys, self-mask seeds, Shamir coefficients, identity keys) comes
  from the OS CSPRNG (os.urandom / `secrets` / cryptography's generate) in every randomness
  mode: none of them changes the aggregate, so reproducibility never needs them.
- Mask expansion (the PRG of Bonawitz 2017 sec. 3 / Bell 2020 sec. 3, which both instantiate
  it with AES in counter mode): AES-128-CTR keyed with the first 16 bytes of a 32-byte seed, the
  keystream (= encryption of zeros) from a fixed per-use-case initial counter block, read as
  little-endian uint32/uint64 words and reduced mod 2^m. The seeds come from X25519 agreements
  (a ~128-bit security level) or the OS CSPRNG, so a 128-bit key matches the weakest link; AES
  with AES-NI expands a 113k-word mask in ~45 us here, where ChaCha20 (the PRG until 2026-12-01)
  took ~80 us (a one-off micro-timing of update_into, not in bench/; bench/secagg.py measures
  the rounds). Reducing a uniform 32/64-bit word mod 2^m (m <= word size) is exactly uniform
  (power of two).
"""

from __future__ import annotations

import os
import struct
import threading

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "INFO_ENC",
    "INFO_MASK",
    "KEY_BYTES",
    "NONCE_PAIR_MASK",
    "NONCE_SELF_MASK",
    "KeyPair",
    "TamperedShare",
    "SIGNATURE_BYTES",
    "agree",
    "check_public_key",
    "decrypt_share",
    "encrypt_share",
    "generate_identity",
    "generate_keypair",
    "identity_public",
    "mask_dtype",
    "prg_mask",
    "add_mask",
    "add_mask_many",
    "private_from_bytes",
    "restored_keypair",
    "random_bytes",
    "sign",
    "verify",
]

KEY_BYTES = 32
INFO_MASK = b"fedsim/secagg/mask"
INFO_ENC = b"fedsim/secagg/enc"
#: AES-CTR initial counter blocks (16 bytes, incremented as one big-endian integer) per use case:
#: a 12-byte label and a 4-byte counter from 0, so a seed used for two purposes never yields
#: overlapping streams (each stream is shorter than 2^32 blocks = 64 GiB).
NONCE_SELF_MASK = b"secagg-self!" + b"\x00" * 4
NONCE_PAIR_MASK = b"secagg-pair!" + b"\x00" * 4
PRG_KEY_BYTES = 16  # AES-128: the first 16 bytes of a 32-byte seed
PRG_NAME = "aes128-ctr"  # named in every session's job: server and devices must expand masks alike
_GCM_NONCE_BYTES = 12
SIGNATURE_BYTES = 64


class TamperedShare(Exception):
    """A share ciphertext failed authentication: modified, truncated, misrouted or replayed."""


def random_bytes(n: int) -> bytes:
    """n bytes from the OS CSPRNG."""
    return os.urandom(n)


class KeyPair:
    """An X25519 key pair; `public` is the raw 32-byte encoding sent to the server.

    The private key object is built on first use of `private`: a device's state is restored
    at every stage, and most stages use neither key.
    """

    __slots__ = ("_private", "_raw", "public")

    def __init__(self, raw: bytes, public: bytes, private: X25519PrivateKey | None = None) -> None:
        self._raw, self.public, self._private = raw, public, private

    @property
    def private(self) -> X25519PrivateKey:
        if self._private is None:
            self._private = X25519PrivateKey.from_private_bytes(self._raw)
        return self._private

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key (what gets Shamir-shared for the s key)."""
        return self._raw


def restored_keypair(raw: bytes, public: bytes) -> KeyPair:
    """A key pair from its own saved (raw private, public) bytes, with no curve operation: for a
    device's state written by its own host (`SecAggDevice.export_state`), never for peer input."""
    if len(raw) != KEY_BYTES or len(public) != KEY_BYTES:
        raise ValueError(f"X25519 keys have {KEY_BYTES} bytes, got {len(raw)} and {len(public)}")
    return KeyPair(raw, public)


def private_from_bytes(raw: bytes) -> KeyPair:
    """The key pair whose raw private key is `raw` (32 bytes)."""
    if len(raw) != KEY_BYTES:
        raise ValueError(f"an X25519 private key has {KEY_BYTES} bytes, got {len(raw)}")
    private = X25519PrivateKey.from_private_bytes(raw)
    return KeyPair(bytes(raw), private.public_key().public_bytes_raw(), private)


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the OS CSPRNG (Bonawitz 2017 sec. 3, KA.gen)."""
    return private_from_bytes(random_bytes(KEY_BYTES))


_P25519 = 2**255 - 19
#: u-coordinates (mod 2^255, RFC 7748 sec. 5 masks bit 255) of the points of order dividing 8 on
#: Curve25519 and its twist: 0, 1, p - 1, the two of order 8, and the non-canonical encodings
#: p and p + 1 of 0 and 1 (libsodium's has_small_order list). A clamped X25519 scalar is 8k' with
#: k' < 2^252, below the large prime factor of both group orders, so the shared secret is all
#: zeros exactly for these points (RFC 7748 sec. 6.1). tests/test_secagg.py derives the set
#: from the doubling formula and checks it against an X25519 exchange.
SMALL_ORDER_U = frozenset({
    0, 1, _P25519 - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    _P25519, _P25519 + 1,
})  # fmt: skip
_U_MASK = (1 << 255) - 1


def check_public_key(public: bytes) -> None:
    """Raise ValueError unless `public` is a usable X25519 public key.

    A string of the wrong length, or a low-order point (its Diffie-Hellman result is all zeros
    whatever the private key, RFC 7748 sec. 6.1), would give every neighbour a mask seed the
    server can compute. The low-order points are a fixed list (SMALL_ORDER_U), so this is a
    lookup, not a probe exchange (40 us each, 2 per device per round on the server); an
    agreement with such a key still fails in `agree`, as `cryptography` rejects it.
    """
    if len(public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(public)}")
    if int.from_bytes(public, "little") & _U_MASK in SMALL_ORDER_U:
        raise ValueError("low-order X25519 public key: every agreement with it is all zeros (RFC 7748 sec. 6.1)")


def generate_identity() -> Ed25519PrivateKey:
    """A fresh Ed25519 identity key from the OS CSPRNG (registered once per device per session)."""
    return Ed25519PrivateKey.generate()


def identity_public(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte Ed25519 public key (what the key registry holds)."""
    return key.public_key().public_bytes_raw()


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of `message`."""
    return key.sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True iff `signature` is a valid Ed25519 signature of `message` under the raw key `public`."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public)).verify(bytes(signature), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def agree(private: X25519PrivateKey, peer_public: bytes, *, info: bytes, salt: bytes) -> bytes:
    """32-byte key shared by the two ends: HKDF-SHA256(X25519(private, peer_public), salt, info).

    Symmetric: agree(a, B) == agree(b, A). `info` separates uses (INFO_MASK, INFO_ENC); `salt`
    is the session id, so keys never carry over between rounds (Bonawitz 2017 sec. 3, KA.agree).
    A malformed or low-order peer key raises ValueError.
    """
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(peer_public)}")
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(shared)


def _associated_data(sender: int, receiver: int, session_id: bytes) -> bytes:
    return struct.pack(">QQ", sender, receiver) + session_id


def encrypt_share(key: bytes, plaintext: bytes, *, sender: int, receiver: int, session_id: bytes) -> bytes:
    """AES-256-GCM(key) of `plaintext`, bound to (sender, receiver, session): nonce || ct || tag.

    The nonce is random (os.urandom) even in reproducible simulations: a repeated GCM nonce
    under one key is catastrophic, and the same c-agreement key serves both directions.
    """
    nonce = os.urandom(_GCM_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _associated_data(sender, receiver, session_id))


def decrypt_share(key: bytes, ciphertext: bytes, *, sender: int, receiver: int, session_id: bytes) -> bytes:
    """Inverse of `encrypt_share`; raises TamperedShare if authentication fails."""
    if len(ciphertext) < _GCM_NONCE_BYTES + 16:
        raise TamperedShare(f"share ciphertext from {sender} to {receiver} is truncated ({len(ciphertext)} bytes)")
    nonce, body = ciphertext[:_GCM_NONCE_BYTES], ciphertext[_GCM_NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, _associated_data(sender, receiver, session_id))
    except InvalidTag:
        raise TamperedShare(
            f"share ciphertext from device {sender} to device {receiver} failed authentication "
            "(tampered, misrouted or from another session)"
        ) from None


def mask_dtype(modulus_bits: int) -> type[np.unsignedinteger]:
    """Working dtype for arithmetic mod 2^m: uint32 if m <= 32 else uint64.

    Additions wrap mod 2^32 / 2^64, a multiple of 2^m, so reducing once at the end is exact.
    """
    if not 1 <= modulus_bits <= 64:
        raise ValueError(f"modulus_bits must be in [1, 64], got {modulus_bits}")
    return np.uint32 if modulus_bits <= 32 else np.uint64


_ZEROS = memoryview(b"")


def zero_bytes(nbytes: int) -> memoryview:
    """A read-only view of `nbytes` zero bytes (one buffer, grown on demand, shared by all masks)."""
    global _ZEROS
    zeros = _ZEROS  # one read: another thread may replace the global meanwhile
    if len(zeros) < nbytes:
        zeros = _ZEROS = memoryview(bytes(max(nbytes, 2 * len(zeros))))
    return zeros[:nbytes]


def prg_mask(seed: bytes, length: int, modulus_bits: int, nonce: bytes = NONCE_PAIR_MASK) -> np.ndarray:
    """Expand a 32-byte seed to `length` uniform values mod 2^modulus_bits (AES-128-CTR keystream).

    PRG of Bonawitz 2017 (sec. 3) / Bell 2020 (sec. 3). Returns a writable array of
    `mask_dtype(modulus_bits)`: the words `add_mask` adds, reduced mod 2^m.
    """
    words = np.zeros(length, dtype=mask_dtype(modulus_bits))
    add_mask(words, seed, nonce)
    if modulus_bits not in (32, 64):
        words &= words.dtype.type((1 << modulus_bits) - 1)
    return words


_streams = threading.local()  # one keystream buffer per thread, grown on demand


def add_mask(target: np.ndarray, seed: bytes, nonce: bytes = NONCE_PAIR_MASK, *, subtract: bool = False) -> None:
    """target += PRG(seed) (or -=), in place, wrapping mod 2^32 / 2^64 (target's uint32/uint64):
    `prg_mask` without allocating a mask per call (the keystream goes into a reused buffer).

    The keystream is the encryption of zeros, written straight into the buffer (allocating the
    zeros and copying the stream cost 8x the cipher itself at 100k values). The words are not
    reduced mod 2^m: the caller reduces its sum once at the end, which is the same mod 2^m
    because 2^m divides the word size. 18% faster than allocating a mask per call and adding it
    (80 vs 98 us at 113,620 values here, with ChaCha20).
    """
    add_mask_many([(target, subtract)], seed, nonce)


def add_mask_many(targets: list[tuple[np.ndarray, bool]], seed: bytes, nonce: bytes = NONCE_PAIR_MASK) -> None:
    """`add_mask` of one seed into several arrays of one length and dtype, (array, subtract)
    each, with the keystream expanded once (a simulation host adds a pair mask to both of its
    devices' vectors: the words each device would expand, one cipher run)."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"a mask seed has {KEY_BYTES} bytes, got {len(seed)}")
    if not targets:
        return
    first = targets[0][0]
    for target, _ in targets:
        if target.dtype not in (np.uint32, np.uint64) or not target.flags.c_contiguous or not target.flags.writeable:
            raise ValueError(f"add_mask needs a writable contiguous uint32/uint64 array, got {target.dtype}")
        if target.dtype != first.dtype or target.size != first.size:
            raise ValueError("add_mask_many needs arrays of one dtype and length")
    nbytes = first.nbytes
    buf = getattr(_streams, "buf", None)
    if buf is None or len(buf) < nbytes + 16:
        buf = _streams.buf = bytearray(nbytes + 16)
    Cipher(algorithms.AES(seed[:PRG_KEY_BYTES]), modes.CTR(nonce)).encryptor().update_into(zero_bytes(nbytes), buf)
    words = np.frombuffer(buf, dtype=first.dtype.newbyteorder("<"), count=first.size)
    for target, subtract in targets:
        (np.subtract if subtract else np.add)(target, words, out=target)
