"""SecAgg+ as transport-free state machines: the server learns only the sum of the survivors' inputs.

Protocol: Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS, Fig. 4: AdvertiseKeys, ShareKeys, MaskedInputCollection, ConsistencyCheck,
Unmasking) with the complete graph replaced by a sparse random k-regular (Harary) graph as in
Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS,
sec. 3-4: SecAgg+), so each device talks to k = O(log n) neighbours instead of n - 1. k = n - 1
is classic SecAgg. k and t come from a stated threat model: see params.py.

Threat models (SecAggParams.active):
- semi-honest (active=False): the server follows the protocol, reports dropouts truthfully
  and tries to learn inputs, colluding with up to gamma n devices (Bonawitz sec. 6.1, Bell
  sec. 3). Four stages.
- active (active=True): the server may also lie about who dropped, forward keys of its own
  choosing and send different devices different views (Bonawitz sec. 6.2, Bell sec. 4
  "semi-malicious"). Added: (1) identity keys in a key registry (the PKI, `KeyRegistry`):
  each device draws an Ed25519 key per session from its OS CSPRNG, registers the public half
  (once per session and device) and signs its round keys with it; neighbours verify against
  the registry, which the server can read but not write, so keys cannot be swapped or forged;
  (2) the consistency check, a stage between masked input and unmasking: each survivor signs
  the survivor set U3 it is told, and a device reveals shares only if it receives >= t valid
  signatures from its neighbours on the same U3, is itself in U3, and U3 holds at least
  max(t, n - D) devices (SecAggParams.min_survivors, which the device computes itself); (3) t with 2t > k + c for
  the c colluding neighbours a device may have, so a split of its honest neighbours into
  "told i survived" and "told i dropped" can never give the server t shares of both secrets.
  Not covered in either: a server that biases which devices are neighbours (the graph order is
  public randomness drawn independently of the corrupt set), denial of service (an active
  server can always abort a round), and what the sum itself reveals (that is DP's job).
Devices may drop out at any stage; the device-side rules (never reveal both secrets of a
neighbour, answer each stage once, refuse when listed as dropped) hold in both models.

Device i holds x_i in Z_{2^m} (see quantize.py) and, per session, two X25519 key pairs (c for
encrypting shares, s for pairwise masks) and a random self-mask seed b_i, all from the OS
CSPRNG. It sends

    y_i = x_i + PRG(b_i) + sum_{j in N(i), j alive at ShareKeys} sign(i, j) PRG(KA(s_i, s_j))  mod 2^m

with sign(i, j) = +1 if i < j else -1, so pairwise masks cancel between surviving neighbours
(Bonawitz sec. 4, "double masking"). s_i^SK and b_i are Shamir-shared (threshold t) among N(i),
each pair of shares AES-GCM-encrypted to its holder. At unmasking, each surviving neighbour
reveals the b-share of every neighbour that sent y, and the s-share of every neighbour that
shared keys but sent no y - never both for the same neighbour, which is what keeps y_i hidden
from the server if i is merely late (Bonawitz sec. 4).

One faulty device never takes others down: the server drops a device whose keys are malformed
or low-order (or, active, not signed by its registered identity); a device that cannot open a
neighbour's share ciphertext still masks with it, reports it in "bad", and the server drops
that neighbour (its pairwise masks are removed through its s-shares like any dropout). Each
such drop is in `SecAggServer.rejected` with the stage and the reason.

Messages (plain dicts of ints / bytes / lists / numpy arrays, i.e. Flower ConfigRecord and
ArrayRecord friendly; ids are device ids 0..n-1, the positions in this round's cohort; "sig"
fields only in the active model):

    advertise_keys  device -> server  advertise_keys()     {"c_pk": bytes32, "s_pk": bytes32, "sig": bytes64}
    share_keys      server -> device  collect_keys()[i]    {"ids": [j], "c_pks": [bytes32], "s_pks": [bytes32], "sigs": [bytes64]}
                    device -> server  share_keys(req)      {"ids": [j], "ciphertexts": [bytes]}   (j = receiver)
    masked_input    server -> device  collect_shares()[i]  {"ids": [j], "ciphertexts": [bytes]}   (j = sender)
                    device -> server  masked_input(req, x) {"masked": uint32|uint64 array [L], "bad": [j]}
    consistency     server -> device  collect_masked()[i]  {"survivors": [all of U3]}             (active only)
                    device -> server  consistency(req)     {"sig": bytes64}
    unmask          server -> device  collect_masked()[i] (semi-honest) or collect_signatures()[i] (active):
                                      {"survivors": [j], "dropped": [j], "signers": [j], "signatures": [bytes64]}
                    device -> server  unmask(req)          {"b_ids": [j], "b_shares": [bytes], "s_ids": [j], "s_shares": [bytes]}
    result          collect_unmask(replies) -> uint64 array [L]: sum of survivors' x mod 2^m

The server's collect_* methods take {device_id: reply} for the devices that answered (a missing
or malformed reply is a dropout) and return {device_id: request} for the next stage.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsim.secagg import shamir
from fedsim.secagg.crypto import (
    INFO_ENC,
    INFO_MASK,
    KEY_BYTES,
    NONCE_PAIR_MASK,
    NONCE_SELF_MASK,
    KeyPair,
    TamperedShare,
    add_mask,
    add_mask_many,
    agree,
    check_public_key,
    decrypt_share,
    encrypt_share,
    generate_identity,
    generate_keypair,
    identity_public,
    mask_dtype,
    private_from_bytes,
    random_bytes,
    restored_keypair,
    sign,
    verify,
)
from fedsim.secagg.quantize import to_ring

__all__ = [
    "STAGES",
    "KeyRegistry",
    "PairMemo",
    "ProtocolViolation",
    "RoundResult",
    "SecAggAborted",
    "SecAggDevice",
    "SecAggParams",
    "SecAggServer",
    "TamperedShare",
    "masked_inputs",
    "neighbour_graph",
    "payload_nbytes",
    "ring_order",
    "simulate_round",
    "stages",
    "survivors_message",
]

STAGES = ("advertise_keys", "share_keys", "masked_input", "consistency", "unmask")
_SHARE_BYTES = shamir.share_size(KEY_BYTES)


def stages(active: bool) -> tuple[str, ...]:
    """The stages of a session: the consistency check only in the active threat model."""
    return STAGES if active else tuple(s for s in STAGES if s != "consistency")


class SecAggAborted(Exception):
    """The round cannot complete securely (too few survivors / shares); `reason` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ProtocolViolation(SecAggAborted):
    """A device refuses a request that would break its security (e.g. reveal both its secrets)."""


# ---------------------------------------------------------------------------------------------
# Parameters, the neighbour graph and the key registry


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one SecAgg+ session (the same on the server and every device).

    num_devices n: cohort size; devices are 0..n-1. neighbours k: degree of the graph, even
    and < n - 1, or n - 1 (complete graph = classic SecAgg). threshold t: Shamir threshold for
    each device's secrets among its k neighbours, 1 <= t <= k; which (k, t) are safe depends
    on the threat model (params.choose_params / check_params). modulus_bits m: inputs and the
    sum live in Z_{2^m} (1..64). vector_length L. session_id: public bytes, fresh per round;
    salts every key derivation and binds every ciphertext and signature to the round.
    graph_seed: public bytes that order the ring of the Harary graph (None: the session id);
    a reproducible run derives it from (seed, round). active: the active threat model
    (identity keys, signed keys, consistency check). min_survivors: the fewest masked inputs a
    released sum may hold, max(t, n - D) for the D dropouts the threat model budgets (0: t
    alone). The server aborts below it before asking for any share; in the active model each
    device also refuses to sign or unmask a smaller survivor set (Bell et al. 2020 sec. 4: the
    server learns only sums of at least that many inputs; Bonawitz et al. 2017 Fig. 4 demand
    |U3| >= t device-side). A device must compute it from public parameters it trusts (the run
    config and the session's n), never take it from the server.

    """

    num_devices: int
    threshold: int
    neighbours: int
    modulus_bits: int
    vector_length: int
    session_id: bytes
    graph_seed: bytes | None = None
    active: bool = False
    min_survivors: int = 0

    def __post_init__(self) -> None:
        n, k, t = self.num_devices, self.neighbours, self.threshold
        if n < 2:
            raise ValueError(f"secure aggregation needs at least 2 devices, got {n}")
        if not (k == n - 1 or (k % 2 == 0 and 2 <= k < n)):
            raise ValueError(f"neighbours k={k} must be even with 2 <= k < n={n}, or n-1={n - 1} (complete graph)")
        if not 1 <= t <= k:
            raise ValueError(f"threshold t={t} must satisfy 1 <= t <= k={k}")
        if self.active and not k < 2 * t:
            raise ValueError(f"threshold t={t} must exceed k/2={k / 2} in the active threat model")
        if not 1 <= self.modulus_bits <= 64:
            raise ValueError(f"modulus_bits must be in [1, 64], got {self.modulus_bits}")
        if self.vector_length < 1:
            raise ValueError(f"vector_length must be >= 1, got {self.vector_length}")
        if not isinstance(self.session_id, bytes) or not self.session_id:
            raise ValueError("session_id must be non-empty bytes")
        if not 0 <= self.min_survivors <= n:
            raise ValueError(f"min_survivors={self.min_survivors} must be in [0, n={n}]")

    @property
    def graph(self) -> tuple[tuple[int, ...], ...]:
        """graph[i] = sorted neighbour ids of device i."""
        return neighbour_graph(self.num_devices, self.neighbours, self.graph_seed or self.session_id)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """Array dtype of masked vectors: uint32 if m <= 32 else uint64."""
        return mask_dtype(self.modulus_bits)

    @property
    def stages(self) -> tuple[str, ...]:
        return stages(self.active)

    @property
    def survivor_floor(self) -> int:
        """The fewest masked inputs a sum may hold: max(t, min_survivors)."""
        return max(self.threshold, self.min_survivors)


def ring_order(n: int, seed: bytes) -> np.ndarray:
    """The devices 0..n-1 in the order `neighbour_graph` places them on its ring."""
    digest = int.from_bytes(hashlib.sha256(b"fedsim/secagg/graph" + seed).digest(), "big")
    return np.random.default_rng(digest).permutation(n)  # all 256 bits seed the permutation


@functools.lru_cache(maxsize=64)
def neighbour_graph(n: int, k: int, seed: bytes) -> tuple[tuple[int, ...], ...]:
    """Harary graph H_{k,n} over a permutation seeded by public bytes (Bell et al. 2020, sec. 4).

    Devices are placed on a ring in a pseudo-random order; each is joined to the k/2 nearest
    on either side (a circulant, k-regular). k = n - 1 gives the complete graph. The order is
    public and deterministic, so the server and every device derive the same graph; the
    security analysis (params.py) needs it independent of which devices are corrupt.
    """
    if k >= n - 1:
        return tuple(tuple(j for j in range(n) if j != i) for i in range(n))
    order = ring_order(n, seed)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    graph = []
    for i in range(n):
        p = int(position[i])
        nbrs = {int(order[(p + d) % n]) for d in range(1, k // 2 + 1)}
        nbrs |= {int(order[(p - d) % n]) for d in range(1, k // 2 + 1)}
        graph.append(tuple(sorted(nbrs)))
    return tuple(graph)


class KeyRegistry:
    """The PKI of the active threat model: one Ed25519 identity public key per (session, device).

    Trusted infrastructure by assumption (Bonawitz et al. 2017 sec. 6.2, "a PKI"): devices
    register their own keys and read their neighbours' from here, never from the server's
    messages; the server may read (the keys are public) but has no way to write. Register-once:
    in a session a device has one key at one position (its index in the round's cohort) and a
    position belongs to one device, so the server can neither swap a key nor let one colluding
    device answer for several positions. Only the newest `keep_sessions` sessions are kept (a
    session's keys are needed while its round runs), so a long run holds O(cohort) keys.

    This class is the in-process registry (tests, the fake grid); fedsim.pki serves the same
    object from a Ray actor to every worker of a simulation.
    """

    def __init__(self, keep_sessions: int = 16) -> None:
        self.keep_sessions = keep_sessions
        # session -> position -> (device, key); dicts keep insertion order: the oldest session is first
        self._sessions: dict[bytes, dict[int, tuple[int, bytes]]] = {}
        self._devices: dict[bytes, dict[int, int]] = {}  # session -> device -> position

    def register(self, session: bytes, position: int, device: int, public: bytes) -> None:
        """Record `device`'s identity key at `position` of `session`; ValueError if the key is
        not 32 bytes, or the device or the position already has another registration."""
        session, position, device, public = bytes(session), int(position), int(device), bytes(public)
        if len(public) != 32:
            raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(public)}")
        keys = self._sessions.get(session, {})
        entry = (device, public)
        if position in keys and keys[position] != entry:
            raise ValueError(f"position {position} already has another registered identity key in this session")
        known = self._devices.get(session, {}).get(device)
        if known is not None and known != position:
            raise ValueError(f"device {device} already registered an identity key in this session")
        if session not in self._sessions:
            self._sessions[session], self._devices[session] = {}, {}
            while len(self._sessions) > self.keep_sessions:
                oldest = next(iter(self._sessions))
                del self._sessions[oldest], self._devices[oldest]
        self._sessions[session][position] = entry
        self._devices[session][device] = position

    def register_many(self, session: bytes, entries: Mapping[int, tuple[int, bytes]]) -> dict[int, str]:
        """`register` for {position: (device, key)}; returns {position: why it was refused}."""
        refused = {}
        for position, (device, public) in entries.items():
            try:
                self.register(session, position, device, public)
            except ValueError as err:
                refused[int(position)] = str(err)
        return refused

    def lookup(self, session: bytes, positions: Iterable[int] | None = None) -> dict[int, bytes]:
        """{position: identity public key} of `session` (all positions when None)."""
        keys = self._sessions.get(bytes(session), {})
        wanted = keys if positions is None else [int(p) for p in positions]
        return {p: keys[p][1] for p in wanted if p in keys}


def _key_message(session: bytes, device: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return b"fedsim/secagg/keys" + session + device.to_bytes(8, "big") + c_pk + s_pk


def survivors_message(session: bytes, survivors: Iterable[int]) -> bytes:
    """What a device signs in the consistency check: the session and the sorted survivor ids."""
    ids = sorted(int(i) for i in survivors)
    return b"fedsim/secagg/survivors" + session + b"".join(i.to_bytes(8, "big") for i in ids)


def payload_nbytes(message: object) -> int:
    """Bytes a message carries: bytes/arrays at their length, each id (int) as 4 bytes.

    Field names are schema, not payload, and are not counted.
    """
    if isinstance(message, (bytes, bytearray)):
        return len(message)
    if isinstance(message, np.ndarray):
        return int(message.nbytes)
    if isinstance(message, bool):
        return 1
    if isinstance(message, (int, np.integer)):
        return 4
    if isinstance(message, Mapping):
        return sum(payload_nbytes(v) for v in message.values())
    if isinstance(message, (list, tuple)):
        if all(type(v) is bytes for v in message):  # fast paths: ciphertexts, keys, shares, ids
            return sum(map(len, message))
        if all(type(v) is int for v in message):
            return 4 * len(message)
        return sum(payload_nbytes(v) for v in message)
    raise TypeError(f"unexpected message element of type {type(message).__name__}")


def _sign(i: int, j: int) -> int:
    return 1 if i < j else -1


def _id_list(value: object) -> list[int]:
    """A reply's list of device ids (TypeError for anything else: a number, a string, None)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(j, (int, np.integer)) and not isinstance(j, bool) for j in value):
        raise TypeError(f"expected a list of device ids, got {value!r}"[:200])
    return [int(j) for j in value]


def _pair_lists(msg: Mapping, ids_key: str, values_key: str) -> dict[int, object]:
    ids, values = list(msg[ids_key]), list(msg[values_key])
    if len(ids) != len(values) or len(set(ids)) != len(ids):
        raise ValueError(f"'{ids_key}' and '{values_key}' must be parallel lists of distinct ids")
    return {int(i): v for i, v in zip(ids, values)}


# ---------------------------------------------------------------------------------------------
# Device


class PairMemo:
    """A simulation host's memo of its devices' pairwise key agreements.

    Diffie-Hellman is symmetric (KA(s_i, S_j) = KA(s_j, S_i), Bonawitz et al. 2017 sec. 3), so
    when two neighbours live on the same worker the second takes the first's result instead of
    running X25519 and HKDF again. A value is keyed by the derivation's label and salt and by
    both ends' public keys as each device uses them (its own, and the peer's as the server
    forwarded it): a device is handed a value only where its own computation gives the same
    bytes, so a forged or low-order key never matches the honest pair's entry. What each device
    sends is the same bits as without the memo; only the time changes. One memo per stage
    message on a worker: it holds secrets of that worker's devices only, as their states there do.
    """

    def __init__(self) -> None:
        self._values: dict[tuple, bytes] = {}
        self.hits = 0  # agreements served from the memo (a test reads it)

    def agree(self, own_id: int, own: KeyPair, peer_id: int, peer_public: bytes, *, info: bytes, salt: bytes) -> bytes:
        peer_public = bytes(peer_public)
        key = (info, salt, *sorted([(own_id, own.public), (peer_id, peer_public)]))
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = agree(own.private, peer_public, info=info, salt=salt)
        else:
            self.hits += 1
        return value


def _agree(memo: PairMemo | None, own_id: int, own: KeyPair, peer_id: int, peer_public: bytes, info: bytes, salt: bytes) -> bytes:
    if memo is None:
        return agree(own.private, peer_public, info=info, salt=salt)
    return memo.agree(own_id, own, peer_id, peer_public, info=info, salt=salt)


#: What one device's stage may raise on bad input (a peer's key, a server's request): it drops alone.
DEVICE_FAULTS = (SecAggAborted, ValueError, TypeError, KeyError)


def masked_inputs(
    devices: list[SecAggDevice], requests: list[Mapping], xs: list[np.ndarray], *, memo: PairMemo | None = None
) -> list[dict | Exception]:
    """`SecAggDevice.masked_input` for several devices of one simulation host, in order: each
    device's reply, or the DEVICE_FAULTS error it raised (it drops alone). Each pair mask the
    host's devices share is expanded once and added to both vectors (add_mask_many), and the
    agreements go through `memo`: the same bits as one call per device (sums mod 2^32 / 2^64 do
    not depend on the order of the terms). The xs become the masked vectors (no copy when they
    are already of the ring's dtype); an array passed for two devices is copied for the second
    (each device's vector must be its own: pass distinct arrays, not views of one buffer)."""
    out: list[dict | Exception | None] = [None] * len(devices)
    opened = []
    by_seed: dict[tuple[bytes, bytes], list[tuple[np.ndarray, bool]]] = {}
    seen: set[int] = set()
    for pos, (device, request, x) in enumerate(zip(devices, requests, xs, strict=True)):
        own = id(x) not in seen
        seen.add(id(x))
        try:
            y, masks, bad = device._open_for_masking(request, x, memo, in_place=own)
        except DEVICE_FAULTS as err:
            out[pos] = err
            continue
        for seed, nonce, subtract in masks:
            by_seed.setdefault((seed, nonce), []).append((y, subtract))
        opened.append((pos, device, y, bad))
    for (seed, nonce), targets in by_seed.items():
        add_mask_many(targets, seed, nonce)
    for pos, device, y, bad in opened:
        out[pos] = device._masked_reply(y, bad)
    return out  # type: ignore[return-value]


class SecAggDevice:
    """One device's side of a SecAgg+ session (Bonawitz et al. 2017 Fig. 4, Bell et al. 2020 sec. 4).

    Methods must be called in order, once each: advertise_keys, share_keys, masked_input,
    consistency (active only), unmask. Every secret comes from the OS CSPRNG. Active threat
    model: `identity` is the device's Ed25519 key for this session (drawn here from the OS
    CSPRNG when not given; `identity_public` is what its host registers with the PKI) and
    `registry` {protocol id: identity public key} the PKI's view of the cohort, read by the
    device's host from the registry itself (needed from share_keys on). Message sizes are
    counted by whoever carries the messages (`simulate_round` with payload_nbytes, fedsim's
    rounds on the wire), not by the device: counting cost as much as a stage's own checks.
    """

    def __init__(
        self,
        device_id: int,
        params: SecAggParams,
        *,
        identity: Ed25519PrivateKey | None = None,
        registry: Mapping[int, bytes] | None = None,
    ) -> None:
        if not 0 <= device_id < params.num_devices:
            raise ValueError(f"device id {device_id} not in [0, {params.num_devices})")
        self.id = device_id
        self.params = params
        self.neighbours = frozenset(params.graph[device_id])
        self._identity = (identity or generate_identity()) if params.active else None
        self._registry = dict(registry or {})
        self._stage = 0
        self._c = self._s = None
        self._b: bytes | None = None
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self._enc_keys: dict[int, bytes] = {}  # neighbour -> AES key from the c agreement
        self._held: dict[int, tuple[bytes, bytes]] = {}  # sender -> (s-share, b-share)
        self._revealed: dict[int, str] = {}  # neighbour -> "b" | "s"
        self._u3: tuple[int, ...] | None = None  # the survivor set this device signed (active)
        self.share_errors: dict[int, str] = {}  # sender -> why its share ciphertext was not usable
        self._senders: set[int] = set()  # neighbours that sent shares (it masks with them)

    def export_state(self) -> bytes:
        """The device's round secrets and progress, to keep between stages on the device's host.

        Workers serve a device's stages from whatever process Flower routes the message to,
        so the state lives in the worker node's own state, never in a message to the server.
        In the active model it holds the session's identity key: drawn by the device, it
        exists nowhere else.
        """
        state = {
            "id": self.id,
            "stage": self._stage,
            "c": (self._c.private_bytes(), self._c.public) if self._c else None,
            "s": (self._s.private_bytes(), self._s.public) if self._s else None,
            "b": self._b,
            "peer_keys": self._peer_keys,
            "enc_keys": self._enc_keys,
            "held": self._held,
            "revealed": self._revealed,
            "u3": self._u3,
            "senders": self._senders,
            "identity": self._identity.private_bytes_raw() if self._identity is not None else None,
        }
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(
        cls,
        params: SecAggParams,
        blob: bytes,
        *,
        identity: Ed25519PrivateKey | None = None,
        registry: Mapping[int, bytes] | None = None,
    ) -> SecAggDevice:
        """The device `export_state` saved (the blob is the node's own, never a peer's)."""
        state = pickle.loads(blob)  # noqa: S301 - written by this node's own export_state
        if identity is None and state.get("identity") is not None:
            identity = Ed25519PrivateKey.from_private_bytes(state["identity"])
        device = cls(state["id"], params, identity=identity, registry=registry)
        device._stage = state["stage"]
        device._c = restored_keypair(*state["c"]) if state["c"] else None
        device._s = restored_keypair(*state["s"]) if state["s"] else None
        device._b = state["b"]
        device._peer_keys = state["peer_keys"]
        device._enc_keys = state["enc_keys"]
        device._held = state["held"]
        device._revealed = state["revealed"]
        device._u3 = state["u3"]
        device._senders = state["senders"]
        return device

    @property
    def identity_public(self) -> bytes | None:
        """The raw Ed25519 public key to register with the PKI (active model), else None."""
        return identity_public(self._identity) if self._identity is not None else None

    def _advance(self, name: str) -> None:
        if name not in self.params.stages:
            self._refuse(f"'{name}' is not a stage of this session")
        expected = self.params.stages.index(name)
        if self._stage != expected:
            raise ProtocolViolation(
                f"device {self.id}: '{name}' requested out of order (at stage {self._stage}, expected {expected})"
            )
        self._stage = expected + 1

    def _abort(self, reason: str) -> None:
        self._stage = -1  # a device that aborted never continues
        raise SecAggAborted(f"device {self.id}: {reason}")

    def _refuse(self, reason: str) -> None:
        self._stage = -1
        raise ProtocolViolation(f"device {self.id} refuses: {reason}")

    def advertise_keys(self) -> dict:
        """Stage 1 (Bonawitz AdvertiseKeys): fresh c and s key pairs -> {"c_pk", "s_pk"[, "sig"]}.

        Active: "sig" signs (session, id, c_pk, s_pk) with the identity key (Bonawitz Fig. 4,
        the actively secure variant), so neighbours can tell these keys are the device's own.
        """
        self._advance("advertise_keys")
        self._c, self._s = generate_keypair(), generate_keypair()
        reply = {"c_pk": self._c.public, "s_pk": self._s.public}
        if self.params.active:
            reply["sig"] = sign(self._identity, _key_message(self.params.session_id, self.id, self._c.public, self._s.public))
        return reply

    def share_keys(self, request: Mapping, *, memo: PairMemo | None = None) -> dict:
        """Stage 2 (Bonawitz ShareKeys): encrypted Shamir shares of s^SK and b for each neighbour.

        request {"ids", "c_pks", "s_pks"[, "sigs"]}: the live neighbours' public keys. Refuses
        keys of non-neighbours, repeated keys, unusable (low-order) c keys and, active, keys whose
        signature does not verify under the neighbour's registered identity (the server already
        dropped devices with unusable keys; a device meets one only from a dishonest server). Shamir-shares s^SK
        and a fresh self-mask seed b among them (threshold t) and returns, per neighbour j,
        AES-GCM(KA(c_i, c_j)) of (s-share_j || b-share_j) bound to (i, j, session):
        {"ids": [j], "ciphertexts": [bytes]}. `memo`: the host's PairMemo (same result).
        """
        self._advance("share_keys")
        c_pks = _pair_lists(request, "ids", "c_pks")
        s_pks = _pair_lists(request, "ids", "s_pks")
        if set(c_pks) != set(s_pks) or not set(c_pks) <= self.neighbours:
            self._refuse(f"public keys offered for non-neighbours {sorted(set(c_pks) - self.neighbours)}")
        keys = [bytes(c_pks[j]) for j in c_pks] + [bytes(s_pks[j]) for j in s_pks]
        if len(set(keys)) != len(keys) or self._c.public in keys or self._s.public in keys:
            self._refuse("duplicate public keys offered (Bonawitz 2017: all must differ)")
        sid = self.params.session_id
        if self.params.active:
            sigs = _pair_lists(request, "ids", "sigs")
            for j in sorted(c_pks):
                registered = self._registry.get(j)
                msg = _key_message(sid, j, bytes(c_pks[j]), bytes(s_pks[j]))
                if registered is None or j not in sigs or not verify(registered, bytes(sigs[j]), msg):
                    self._refuse(f"the keys offered for neighbour {j} are not signed by its registered identity")
        t = self.params.threshold
        if len(c_pks) < t:
            self._abort(f"only {len(c_pks)} live neighbours at share_keys, threshold t={t}")
        self._peer_keys = {j: (bytes(c_pks[j]), bytes(s_pks[j])) for j in sorted(c_pks)}
        holders = sorted(self._peer_keys)
        self._b = random_bytes(KEY_BYTES)
        s_shares, b_shares = shamir.share_many([self._s.private_bytes(), self._b], t, holders)
        ciphertexts = []
        for j in holders:
            try:  # a low-order key fails here (the s key at masked_input): only a dishonest server forwards one
                key = self._enc_keys[j] = _agree(memo, self.id, self._c, j, self._peer_keys[j][0], INFO_ENC, sid)
            except ValueError as err:
                self._refuse(f"unusable public key offered for neighbour {j}: {err}")
            ciphertexts.append(encrypt_share(key, s_shares[j] + b_shares[j], sender=self.id, receiver=j, session_id=sid))
        reply = {"ids": holders, "ciphertexts": ciphertexts}
        return reply

    def masked_input(self, request: Mapping, x: np.ndarray, *, memo: PairMemo | None = None) -> dict:
        """Stage 3 (Bonawitz MaskedInputCollection): decrypt held shares, return {"masked": y, "bad": [j]}.

        request {"ids", "ciphertexts"}: the ciphertexts neighbours addressed to this device;
        their senders are the neighbours it masks with. x: integer vector of length L (any sign:
        reduced mod 2^m, e.g. FixedPoint.encode output). y = x + PRG(b) + sum_j sign(i,j)
        PRG(KA(s_i, s_j)) mod 2^m. A ciphertext that fails authentication (or has the wrong
        size) is not held, its sender is still masked with, and it is listed in "bad" so the
        server drops that sender (and removes its masks through the other holders' shares).
        `memo`: the host's PairMemo (same result). Several devices of one host:
        `masked_inputs` (each pair mask expanded once).
        """
        y, masks, bad = self._open_for_masking(request, x, memo, in_place=False)
        for seed, nonce, subtract in masks:
            add_mask(y, seed, nonce, subtract=subtract)
        return self._masked_reply(y, bad)

    def _open_for_masking(
        self, request: Mapping, x: np.ndarray, memo: PairMemo | None, *, in_place: bool
    ) -> tuple[np.ndarray, list[tuple[bytes, bytes, bool]], list[int]]:
        """masked_input up to the masks: (y = x mod 2^m, the masks to add as (seed, nonce,
        subtract), the senders whose shares did not open). Every check and agreement happens
        here: once it returns, adding the masks cannot fail. `in_place`: x (of the ring's dtype)
        becomes y."""
        self._advance("masked_input")
        cts = _pair_lists(request, "ids", "ciphertexts")
        unknown = set(cts) - set(self._peer_keys)
        if unknown:
            self._refuse(f"ciphertexts from devices it did not exchange keys with: {sorted(unknown)}")
        t, sid = self.params.threshold, self.params.session_id
        if len(cts) < t:
            self._abort(f"only {len(cts)} neighbours shared keys, threshold t={t}")
        x = np.asarray(x)
        if x.shape != (self.params.vector_length,):
            raise ValueError(f"device {self.id}: input shape {x.shape}, expected ({self.params.vector_length},)")
        self._senders = set(cts)
        bad = []
        for j in sorted(cts):
            try:
                plain = decrypt_share(self._enc_keys[j], bytes(cts[j]), sender=j, receiver=self.id, session_id=sid)
                if len(plain) != 2 * _SHARE_BYTES:
                    raise TamperedShare(f"share payload from device {j} has {len(plain)} bytes, expected {2 * _SHARE_BYTES}")
            except (TamperedShare, TypeError) as err:
                self.share_errors[j] = str(err)
                bad.append(j)
                continue
            self._held[j] = (plain[:_SHARE_BYTES], plain[_SHARE_BYTES:])
        m = self.params.modulus_bits
        if in_place and x.dtype == self.params.dtype and x.flags.c_contiguous and x.flags.writeable:
            y = x  # reduced mod 2^m with its masks, in _masked_reply
        else:
            y = to_ring(x, m)  # a fresh array: x is not modified
        masks: list[tuple[bytes, bytes, bool]] = []
        for j in sorted(cts):
            seed = _agree(memo, self.id, self._s, j, self._peer_keys[j][1], INFO_MASK, sid)
            masks.append((seed, NONCE_PAIR_MASK, _sign(self.id, j) < 0))
        masks.append((self._b, NONCE_SELF_MASK, False))
        return y, masks, bad

    def _masked_reply(self, y: np.ndarray, bad: list[int]) -> dict:
        m = self.params.modulus_bits
        if m not in (32, 64):
            y &= y.dtype.type((1 << m) - 1)
        reply = {"masked": y, "bad": bad}
        return reply

    def consistency(self, request: Mapping) -> dict:
        """Active stage (Bonawitz ConsistencyCheck): sign the survivor set U3 -> {"sig": bytes64}.

        request {"survivors": [every device whose masked input the server says it has]}.
        Refuses if this device is not in it (it did send y), or if it has fewer than
        params.survivor_floor = max(t, n - D) members (a sum over fewer inputs than the threat
        model allows, e.g. fewer than the distributed noise is sized for). The set is
        remembered: unmask accepts only requests consistent with it.
        """
        self._advance("consistency")
        u3 = tuple(sorted({int(j) for j in request["survivors"]}))
        if self.id not in u3:
            self._refuse("it sent its masked input but is not in the survivor set")
        self._check_survivor_count(u3)
        self._u3 = u3
        reply = {"sig": sign(self._identity, survivors_message(self.params.session_id, u3))}
        return reply

    def unmask(self, request: Mapping) -> dict:
        """Last stage (Bonawitz Unmasking): reveal b-shares of survivors, s-shares of the dropped.

        request {"survivors": [j], "dropped": [j]} (neighbours), active also {"signers": [j],
        "signatures": [bytes64]}. Refuses (ProtocolViolation) if a neighbour is in both lists,
        if this device is listed as dropped, if asked twice, or if a neighbour's other secret
        was already revealed: releasing both b_j and s_j would unmask y_j. Active: the lists
        must be exactly what the signed survivor set U3 implies, and at least t neighbours in
        U3 must have validly signed the same U3, which must hold at least params.survivor_floor
        devices. Aborts (SecAggAborted) if fewer than t
        neighbours survive, since then its own self mask cannot be removed anyway. Returns
        {"b_ids", "b_shares", "s_ids", "s_shares"}.
        """
        self._advance("unmask")
        survivors = {int(j) for j in request["survivors"]}
        dropped = {int(j) for j in request["dropped"]}
        both = survivors & dropped
        if both:
            self._refuse(f"asked for both the b-share and the s-share of {sorted(both)}")
        if self.id in dropped:
            self._refuse("it sent its masked input but is listed as dropped")
        if self.params.active:
            self._check_signatures(request, survivors, dropped)
        for j in survivors | dropped:
            kind = "b" if j in survivors else "s"
            if self._revealed.get(j, kind) != kind:
                self._refuse(f"already revealed the other secret of {j}")
        if len(survivors & set(self._held)) < self.params.threshold:
            self._abort(f"only {len(survivors & set(self._held))} surviving neighbours, threshold t={self.params.threshold}")
        b_ids = sorted(j for j in self._held if j in survivors)
        s_ids = sorted(j for j in self._held if j in dropped)
        for j in b_ids:
            self._revealed[j] = "b"
        for j in s_ids:
            self._revealed[j] = "s"
        reply = {
            "b_ids": b_ids,
            "b_shares": [self._held[j][1] for j in b_ids],
            "s_ids": s_ids,
            "s_shares": [self._held[j][0] for j in s_ids],
        }
        # Secrets are no longer needed: drop them.
        self._c = self._s = None
        self._b = None
        self._enc_keys = {}
        return reply

    def _check_survivor_count(self, u3: Iterable[int]) -> None:
        count, floor = len(set(u3)), self.params.survivor_floor
        if count < floor:
            self._refuse(f"the survivor set has {count} devices, fewer than max(t, n - D) = {floor}")

    def _check_signatures(self, request: Mapping, survivors: set[int], dropped: set[int]) -> None:
        u3 = set(self._u3 or ())
        self._check_survivor_count(u3)  # no share leaves for a set below the floor, however it was signed
        if survivors != self.neighbours & u3 or dropped != (self._senders - u3):
            self._refuse("the survivors and dropped it is asked about differ from the survivor set it signed")
        message = survivors_message(self.params.session_id, u3)
        sigs = _pair_lists(request, "signers", "signatures")
        valid = sum(
            1
            for j, sig in sigs.items()
            if j in self.neighbours and j in u3 and j in self._registry and verify(self._registry[j], bytes(sig), message)
        )
        if valid < self.params.threshold:
            self._refuse(f"only {valid} valid neighbour signatures on its survivor set, threshold t={self.params.threshold}")


# ---------------------------------------------------------------------------------------------
# The server's decisions on who stays in the session (shared with fedsim.secagg.shortcut, which
# takes the same decisions without the cryptography: the same rules and the same abort reasons)


def prune(graph: Sequence[Sequence[int]], alive: Iterable[int], t: int) -> frozenset[int]:
    """The devices of `alive` left once those with fewer than t live neighbours are dropped,
    until none is (Bell et al. 2020 sec. 4: such a device aborts; its secrets could not be
    rebuilt). The result, the largest subset where everyone has t live neighbours, does not
    depend on the order devices are dropped in."""
    live = set(alive)
    count = {i: sum(1 for j in graph[i] if j in live) for i in live}
    stack = [i for i in live if count[i] < t]
    while stack:
        i = stack.pop()
        if i not in live:
            continue
        live.discard(i)
        for j in graph[i]:
            if j in live:
                count[j] -= 1
                if count[j] < t:
                    stack.append(j)
    return frozenset(live)


def pruned_too_far(remaining: int, t: int, stage: str) -> str | None:
    """The abort reason when pruning before `stage` left fewer than t devices (None: go on)."""
    if remaining < t:
        return f"round aborted at {stage}: {remaining} devices with >= t={t} live neighbours remain, need >= {t}"
    return None


def survivor_problem(
    params: SecAggParams, masked: frozenset[int], live: frozenset[int], holders: Callable[[int], int]
) -> str | None:  # fmt: skip
    """The abort reason at the end of stage 3, before any share is asked for (None: go on):
    fewer masked inputs than the survivor floor max(t, min_survivors), or a secret the server
    will need (a survivor's self mask, the pairwise masks of a device that shared keys and
    dropped next to a survivor) with fewer than t survivors holding its shares (`holders(i)`)."""
    t, floor = params.threshold, params.survivor_floor
    if len(masked) < floor:
        need = f"t={t}" if floor == t else f"max(t, n - D) = {floor}"
        return f"round aborted at unmask: {len(masked)} masked inputs received, need >= {need}"
    graph = params.graph
    for i in sorted(live):
        if i in masked or any(j in masked for j in graph[i]):
            count = holders(i)
            if count < t:
                what = "self mask" if i in masked else "pairwise masks"
                return (f"round aborted: device {i}'s {what} cannot be removed, only {count} of its "
                        f"neighbours survive holding its shares, need t={t}")  # fmt: skip
    return None


def too_few_answers(count: int, t: int) -> str:
    """The abort reason when fewer than t survivors answer the unmask stage."""
    return f"round aborted at unmask: {count} devices answered, need >= t={t}"


def cannot_rebuild(what: str, device: int, why: object) -> str:
    """The abort reason when a secret cannot be rebuilt from the shares the survivors revealed."""
    return f"round aborted: cannot rebuild the {what} device {device}: {why}"


# ---------------------------------------------------------------------------------------------
# Server


class SecAggServer:
    """The server's side: routes messages, tracks survivors, rebuilds the masks, outputs the sum.

    It never holds a decryption key: share ciphertexts are forwarded opaque. Fewer than t
    devices at any stage, or a secret with fewer than t reachable shares, raises
    SecAggAborted. Attributes after each stage: `advertised` (U1), `shared` (U2), `masked`
    (U3 = the devices whose inputs are summed, also `survivors`), `responded` (U4),
    `dropped_after_sharing` (shared keys but are not in the sum: their pairwise masks are
    rebuilt), `rejected` {device: "stage: reason"} for devices dropped for a malformed or
    invalid reply. Active: `registry` {protocol id: identity public key} checks the signatures.
    """

    def __init__(self, params: SecAggParams, registry: Mapping[int, bytes] | None = None) -> None:
        if params.active and registry is None:
            raise ValueError("the active threat model needs the key registry")
        self.params = params
        self.registry = dict(registry or {})
        self.graph = params.graph
        self._stage = 1
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}
        self._key_sigs: dict[int, bytes] = {}
        self.advertised: frozenset[int] = frozenset()
        self.shared: frozenset[int] = frozenset()
        self.masked: frozenset[int] = frozenset()
        self.signed: frozenset[int] = frozenset()
        self.responded: frozenset[int] = frozenset()
        self.dropped_after_sharing: frozenset[int] = frozenset()
        self.rejected: dict[int, str] = {}
        self._live: frozenset[int] = frozenset()  # devices still in the session after pruning
        self._ciphertexts: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> ct
        self._lacks: dict[int, set[int]] = {}  # receiver -> senders whose shares it could not open
        self._signatures: dict[int, bytes] = {}
        self._total: np.ndarray | None = None

    @property
    def survivors(self) -> frozenset[int]:
        """Devices whose inputs are in the aggregate."""
        return self.masked

    def _advance(self, expected: int, name: str) -> None:
        if self._stage != expected:
            raise RuntimeError(f"SecAggServer.{name} called out of order (stage {self._stage}, expected {expected})")
        self._stage = expected + 1

    def _abort(self, reason: str) -> None:
        self._stage = -1
        raise SecAggAborted(reason)

    def _reject(self, device: int, stage: str, reason: str) -> None:
        self.rejected[device] = f"{stage}: {reason}"

    def _prune(self, alive: Iterable[int], stage: str) -> frozenset[int]:
        live = prune(self.graph, alive, self.params.threshold)
        reason = pruned_too_far(len(live), self.params.threshold, stage)
        if reason:
            self._abort(reason)
        return live

    def collect_keys(self, replies: Mapping[int, Mapping]) -> dict[int, dict]:
        """End of stage 1: {i: {"c_pk", "s_pk"[, "sig"]}} -> share_keys requests.

        A device whose keys are malformed, low-order, reused or (active) not signed by its
        registered identity is dropped alone.
        """
        self._advance(1, "collect_keys")
        stage, sid = "advertise_keys", self.params.session_id
        keys: dict[int, tuple[bytes, bytes]] = {}
        for i, reply in replies.items():
            if not 0 <= i < self.params.num_devices:
                continue
            try:
                c_pk, s_pk = bytes(reply["c_pk"]), bytes(reply["s_pk"])
                check_public_key(c_pk)
                check_public_key(s_pk)
                if c_pk == s_pk:
                    raise ValueError("c and s keys are equal")
                if self.params.active:
                    sig = bytes(reply["sig"])
                    if i not in self.registry or not verify(self.registry[i], sig, _key_message(sid, i, c_pk, s_pk)):
                        raise ValueError("keys not signed by the device's registered identity")
                    self._key_sigs[i] = sig
            except (KeyError, TypeError, ValueError) as exc:
                self._reject(i, stage, f"unusable keys: {exc}")
                continue
            keys[i] = (c_pk, s_pk)
        seen: dict[bytes, list[int]] = {}
        for i, pair in keys.items():
            for k in pair:
                seen.setdefault(k, []).append(i)
        for owners in seen.values():
            if len(owners) > 1:  # Bonawitz 2017: public keys must be pairwise distinct
                for i in owners:
                    keys.pop(i, None)
                    self._reject(i, stage, "public key reused by another device")
        self.public_keys = keys
        self.advertised = frozenset(keys)
        self._live = self._prune(keys, "share_keys")
        requests = {}
        for i in sorted(self._live):
            nbrs = [j for j in self.graph[i] if j in self._live]
            requests[i] = {
                "ids": nbrs,
                "c_pks": [keys[j][0] for j in nbrs],
                "s_pks": [keys[j][1] for j in nbrs],
            }
            if self.params.active:
                requests[i]["sigs"] = [self._key_sigs[j] for j in nbrs]
        return requests

    def collect_shares(self, replies: Mapping[int, Mapping]) -> dict[int, dict]:
        """End of stage 2: {i: {"ids", "ciphertexts"}} -> masked_input requests {i: {"ids", "ciphertexts"}}."""
        self._advance(2, "collect_shares")
        cts: dict[int, dict[int, bytes]] = {}
        for i, reply in replies.items():
            if i not in self._live:
                continue
            try:
                by_receiver = {j: bytes(c) for j, c in _pair_lists(reply, "ids", "ciphertexts").items()}
            except (KeyError, TypeError, ValueError) as exc:
                self._reject(i, "share_keys", f"malformed reply: {exc!r}")
                continue
            expected = {j for j in self.graph[i] if j in self._live}
            if set(by_receiver) != expected:
                self._reject(i, "share_keys", f"addressed {sorted(by_receiver)}, expected {sorted(expected)}")
                continue
            cts[i] = by_receiver
        self.shared = frozenset(cts)
        self._live = self._prune(cts, "masked_input")
        self._ciphertexts = {i: cts[i] for i in self._live}
        requests = {}
        for i in sorted(self._live):
            senders = [j for j in self.graph[i] if j in self._live]
            requests[i] = {"ids": senders, "ciphertexts": [self._ciphertexts[j][i] for j in senders]}
        return requests

    def collect_masked(self, replies: Mapping[int, Mapping]) -> dict[int, dict]:
        """End of stage 3: {i: {"masked": y, "bad": [j]}} -> consistency requests (active) or unmask requests.

        A sender named in some survivor's "bad" list (its share ciphertext did not open) is
        dropped: its y is left out and its masks are removed through its other holders' shares.
        """
        self._advance(3, "collect_masked")
        p = self.params
        vectors: dict[int, np.ndarray] = {}
        for i, reply in replies.items():
            if i not in self._live:
                continue
            try:
                y = np.asarray(reply["masked"])
                bad = _id_list(reply.get("bad", ()))
            except (KeyError, TypeError, ValueError) as exc:
                self._reject(i, "masked_input", f"malformed reply: {exc!r}")
                continue
            if y.shape != (p.vector_length,) or not np.issubdtype(y.dtype, np.integer):
                self._reject(i, "masked_input", f"shape {y.shape} dtype {y.dtype}, expected ({p.vector_length},) integers")
                continue
            senders = {j for j in self.graph[i] if j in self._live}
            if not set(bad) <= senders:
                self._reject(i, "masked_input", f"reports shares from non-senders {sorted(set(bad) - senders)}")
                continue
            vectors[i] = y
            self._lacks[i] = set(bad)
        for i in sorted(vectors):
            for j in sorted(self._lacks[i]):
                self.rejected.setdefault(j, f"masked_input: its share ciphertext to device {i} did not open")
        for j in [j for j in vectors if j in self.rejected]:
            del vectors[j]
        total = np.zeros(p.vector_length, dtype=p.dtype)
        for i in sorted(vectors):
            total += vectors[i].astype(p.dtype, copy=False)  # integer casts wrap mod 2^32 / 2^64: exact mod 2^m
        self.masked = frozenset(vectors)
        reason = survivor_problem(p, self.masked, self._live, lambda i: len(self._holders(i)))
        if reason:  # before any share is asked for: nothing is released
            self._abort(reason)
        self.dropped_after_sharing = self._live - self.masked
        self._total = total
        if p.active:
            everyone = sorted(self.masked)
            return {i: {"survivors": everyone} for i in everyone}
        return self._unmask_requests(self.masked)

    def _holders(self, i: int) -> set[int]:
        """Survivors holding device i's shares."""
        return {j for j in self.graph[i] if j in self.masked and i not in self._lacks.get(j, ())}

    def _unmask_requests(self, ids: Iterable[int]) -> dict[int, dict]:
        requests = {}
        for i in sorted(ids):
            nbrs = [j for j in self.graph[i] if j in self._live]
            requests[i] = {
                "survivors": [j for j in nbrs if j in self.masked],
                "dropped": [j for j in nbrs if j in self.dropped_after_sharing],
            }
            if self.params.active:
                signers = [j for j in self.graph[i] if j in self._signatures]
                requests[i] |= {"signers": signers, "signatures": [self._signatures[j] for j in signers]}
        return requests

    def collect_signatures(self, replies: Mapping[int, Mapping]) -> dict[int, dict]:
        """End of the consistency check (active): {i: {"sig"}} -> unmask requests with the neighbours' signatures."""
        self._advance(4, "collect_signatures")
        if not self.params.active:
            raise RuntimeError("collect_signatures belongs to the active threat model only")
        message = survivors_message(self.params.session_id, self.masked)
        for i, reply in replies.items():
            if i not in self.masked:
                continue
            try:
                sig = bytes(reply["sig"])
            except (KeyError, TypeError) as exc:
                self._reject(i, "consistency", f"malformed reply: {exc!r}")
                continue
            if not verify(self.registry.get(i, b""), sig, message):
                self._reject(i, "consistency", "signature on the survivor set does not verify")
                continue
            self._signatures[i] = sig
        self.signed = frozenset(self._signatures)
        return self._unmask_requests(self.signed)

    def collect_unmask(self, replies: Mapping[int, Mapping]) -> np.ndarray:
        """End of the last stage: {i: {"b_ids", "b_shares", "s_ids", "s_shares"}} -> sum of survivors' x mod 2^m (uint64)."""
        self._advance(5 if self.params.active else 4, "collect_unmask")
        p = self.params
        t, sid, m = p.threshold, p.session_id, p.modulus_bits
        b_shares: dict[int, dict[int, bytes]] = {}
        s_shares: dict[int, dict[int, bytes]] = {}
        responded = set()
        for i, reply in replies.items():
            if i not in self.masked:
                continue
            try:
                bs = {j: bytes(v) for j, v in _pair_lists(reply, "b_ids", "b_shares").items()}
                ss = {j: bytes(v) for j, v in _pair_lists(reply, "s_ids", "s_shares").items()}
            except (KeyError, TypeError, ValueError) as exc:
                self._reject(i, "unmask", f"malformed reply: {exc!r}")
                continue
            nbrs = set(self.graph[i])
            if not (set(bs) <= nbrs & self.masked and set(ss) <= nbrs & self.dropped_after_sharing):
                self._reject(i, "unmask", "reveals shares that were not requested")
                continue
            if not shamir.all_well_formed([*bs.values(), *ss.values()], KEY_BYTES):
                self._reject(i, "unmask", "malformed share")  # the other holders' t shares suffice
                continue
            responded.add(i)
            for j, sh in bs.items():
                b_shares.setdefault(j, {})[i] = sh
            for j, sh in ss.items():
                s_shares.setdefault(j, {})[i] = sh
        self.responded = frozenset(responded)
        if len(responded) < t:
            self._abort(too_few_answers(len(responded), t))
        total = self._total
        # Remove self masks of the survivors (Bonawitz 2017 Fig. 4, Unmasking step 2).
        survivors = sorted(self.masked)
        for _, b_i in self._rebuilt([b_shares.get(i, {}) for i in survivors], "self-mask seed of", survivors):
            add_mask(total, b_i, NONCE_SELF_MASK, subtract=True)
        # Remove pairwise masks survivors shared with devices that dropped after sharing keys.
        dropped = [j for j in sorted(self.dropped_after_sharing) if any(l in self.masked for l in self.graph[j])]
        for j, raw in self._rebuilt([s_shares.get(j, {}) for j in dropped], "mask key of dropped", dropped):
            partners = [l for l in self.graph[j] if l in self.masked]
            key = private_from_bytes(raw)
            if key.public != self.public_keys[j][1]:
                self._abort(f"round aborted: reconstructed mask key of device {j} does not match its public key")
            for l in partners:
                seed = agree(key.private, self.public_keys[l][1], info=INFO_MASK, salt=sid)
                add_mask(total, seed, NONCE_PAIR_MASK, subtract=_sign(l, j) > 0)  # y_l holds +mask if l < j
        self._total = None
        result = total.astype(np.uint64)
        if m < 64:
            result &= np.uint64((1 << m) - 1)
        return result

    def _rebuilt(self, shares: list[dict[int, bytes]], what: str, devices: list[int]) -> Iterator[tuple[int, bytes]]:
        """(device, secret) in `devices` order, the secrets from one batched Shamir reconstruction;
        the round aborts when the iteration reaches a device whose secret cannot be rebuilt, after
        the caller's checks of the devices before it (as with one reconstruction per device)."""
        rebuilt = shamir.reconstruct_many(shares, self.params.threshold)
        for device, secret in zip(devices, rebuilt, strict=True):
            if isinstance(secret, shamir.ShamirError):
                self._abort(cannot_rebuild(what, device, secret))
            yield device, secret  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# In-process driver


@dataclass
class RoundResult:
    """Outcome of `simulate_round`."""

    aggregate: np.ndarray
    survivors: frozenset[int]
    dropped_after_sharing: frozenset[int]
    bytes_sent: dict[int, dict[str, int]] = field(default_factory=dict)  # device -> stage -> bytes
    bytes_received: dict[int, dict[str, int]] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


def simulate_round(
    params: SecAggParams,
    inputs: Mapping[int, np.ndarray],
    *,
    drop_before: Mapping[str, Iterable[int]] | None = None,
    registry: KeyRegistry | None = None,
    identities: Mapping[int, Ed25519PrivateKey] | None = None,
    count_bytes: bool = True,
) -> RoundResult:
    """Run one full session in-process (for tests, benchmarks and a transport-free simulator).

    inputs: {device: integer vector}; devices without an input drop before stage 1.
    drop_before: {stage name in STAGES: devices that go silent from that stage on}.
    Active threat model: identity keys are made (unless given) and registered in `registry`
    (a fresh KeyRegistry unless given) under the session, device i at position i.
    count_bytes: fill the result's bytes_sent / bytes_received (payload_nbytes of every
    request and reply; False times the protocol alone, as bench/secagg.py --protocol does).
    Raises SecAggAborted if the round cannot complete.
    """
    drop_before = drop_before or {}
    unknown = set(drop_before) - set(params.stages)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {params.stages}")
    gone: set[int] = set()

    def alive(stage: str, ids: Iterable[int]) -> list[int]:
        gone.update(drop_before.get(stage, ()))
        return [i for i in ids if i not in gone]

    view: dict[int, bytes] | None = None
    if params.active:
        identities = dict(identities or {i: generate_identity() for i in inputs})
        registry = registry if registry is not None else KeyRegistry()
        for i, key in identities.items():
            registry.register(params.session_id, i, i, identity_public(key))
        view = registry.lookup(params.session_id)
    devices = {
        i: SecAggDevice(i, params, identity=(identities or {}).get(i), registry=view) for i in sorted(inputs)
    }
    server = SecAggServer(params, registry=view)
    sent: dict[int, dict[str, int]] = {i: {} for i in devices}
    received: dict[int, dict[str, int]] = {i: {} for i in devices}

    def stage(name: str, requests: Mapping[int, Mapping], run: Callable[[int, Mapping], dict]) -> dict[int, dict]:
        """Each live device's reply to its request, the payload bytes of both counted (stage 1
        has no request)."""
        replies = {}
        for i in alive(name, requests):
            if count_bytes and name != "advertise_keys":
                received[i][name] = payload_nbytes(requests[i])
            replies[i] = run(i, requests[i])
            if count_bytes:
                sent[i][name] = payload_nbytes(replies[i])
        return replies

    replies1 = stage("advertise_keys", {i: {} for i in devices}, lambda i, r: devices[i].advertise_keys())
    requests2 = server.collect_keys(replies1)
    replies2 = stage("share_keys", requests2, lambda i, r: devices[i].share_keys(r))
    requests3 = server.collect_shares(replies2)
    replies3 = stage("masked_input", requests3, lambda i, r: devices[i].masked_input(r, inputs[i]))
    requests4 = server.collect_masked(replies3)
    if params.active:
        replies_c = stage("consistency", requests4, lambda i, r: devices[i].consistency(r))
        requests4 = server.collect_signatures(replies_c)
    replies4 = stage("unmask", requests4, lambda i, r: devices[i].unmask(r))
    aggregate = server.collect_unmask(replies4)
    return RoundResult(
        aggregate=aggregate,
        survivors=server.survivors,
        dropped_after_sharing=server.dropped_after_sharing,
        bytes_sent=sent,
        bytes_received=received,
        rejected=dict(server.rejected),
    )
