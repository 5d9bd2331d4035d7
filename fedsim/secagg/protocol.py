"""SecAgg+ as transport-free state machines: the server learns only the sum of the survivors' inputs.

Protocol: Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS, Fig. 4: AdvertiseKeys, ShareKeys, MaskedInputCollection, Unmasking) with the
complete graph replaced by a sparse random k-regular graph as in Bell et al. 2020 ("Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS, sec. 3-4: SecAgg+), so each
device talks to k = O(log n) neighbours instead of n - 1. k = n - 1 is classic SecAgg.

Threat model: honest-but-curious server (it follows the protocol but tries to learn inputs;
Bonawitz sec. 6.1, Bell sec. 3 "semi-honest"), devices may drop out at any stage. No signatures
or consistency round, so an actively malicious server is out of scope; the device-side checks
below (never reveal both secrets of a neighbour, t > k/2) are the defence in depth Bonawitz
sec. 4 prescribes for honest devices.

Device i holds x_i in Z_{2^m} (see quantize.py) and, per session, two X25519 key pairs (c for
encrypting shares, s for pairwise masks) and a random self-mask seed b_i. It sends

    y_i = x_i + PRG(b_i) + sum_{j in N(i), j alive at ShareKeys} sign(i, j) PRG(KA(s_i, s_j))  mod 2^m

with sign(i, j) = +1 if i < j else -1, so pairwise masks cancel between surviving neighbours
(Bonawitz sec. 4, "double masking"). s_i^SK and b_i are Shamir-shared (threshold t) among N(i),
each pair of shares AES-GCM-encrypted to its holder. At unmasking, each surviving neighbour
reveals the b-share of every neighbour that sent y, and the s-share of every neighbour that
shared keys but sent no y - never both for the same neighbour, which is what keeps y_i hidden
from the server if i is merely late (Bonawitz sec. 4).

Messages (plain dicts of ints / bytes / lists / numpy arrays, i.e. Flower ConfigRecord and
ArrayRecord friendly; ids are device ids 0..n-1, the positions in this round's cohort):

    stage 1  device -> server  advertise_keys()          {"c_pk": bytes32, "s_pk": bytes32}
    stage 2  server -> device  collect_keys()[i]        {"ids": [j], "c_pks": [bytes32], "s_pks": [bytes32]}
             device -> server  share_keys(req)           {"ids": [j], "ciphertexts": [bytes]}   (j = receiver)
    stage 3  server -> device  collect_shares()[i]      {"ids": [j], "ciphertexts": [bytes]}   (j = sender)
             device -> server  masked_input(req, x)      {"masked": uint32|uint64 array [L]}
    stage 4  server -> device  collect_masked()[i]      {"survivors": [j], "dropped": [j]}     (j in N(i))
             device -> server  unmask(req)               {"b_ids": [j], "b_shares": [bytes], "s_ids": [j], "s_shares": [bytes]}
    result   collect_unmask(replies) -> uint64 array [L]: sum of survivors' x mod 2^m

The server's collect_* methods take {device_id: reply} for the devices that answered (a missing
or malformed reply is a dropout) and return {device_id: request} for the next stage.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedsim.secagg import shamir
from fedsim.secagg.crypto import (
    INFO_ENC,
    INFO_MASK,
    KEY_BYTES,
    NONCE_PAIR_MASK,
    NONCE_SELF_MASK,
    TamperedShare,
    agree,
    decrypt_share,
    encrypt_share,
    generate_keypair,
    mask_dtype,
    prg_mask,
    private_from_bytes,
    random_bytes,
)
from fedsim.secagg.quantize import to_ring

__all__ = [
    "STAGES",
    "ProtocolViolation",
    "RoundResult",
    "SecAggAborted",
    "SecAggDevice",
    "SecAggParams",
    "SecAggServer",
    "TamperedShare",
    "default_params",
    "neighbour_graph",
    "payload_nbytes",
    "simulate_round",
]

STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")
_SHARE_BYTES = shamir.share_size(KEY_BYTES)


class SecAggAborted(Exception):
    """The round cannot complete securely (too few survivors / shares); `reason` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ProtocolViolation(SecAggAborted):
    """A device refuses a request that would break its security (e.g. reveal both its secrets)."""


# ---------------------------------------------------------------------------------------------
# Parameters and the neighbour graph


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one SecAgg+ session (the same on the server and every device).

    num_devices n: cohort size; devices are 0..n-1. neighbours k: degree of the graph, even
    and < n, or n - 1 (complete graph = classic SecAgg). threshold t: Shamir threshold for each
    device's secrets among its k neighbours, k/2 < t <= k. modulus_bits m: inputs and the sum
    live in Z_{2^m} (1..64). vector_length L. session_id: public bytes chosen by the server
    (round id / random); seeds the graph and salts every key derivation.
    """

    num_devices: int
    threshold: int
    neighbours: int
    modulus_bits: int
    vector_length: int
    session_id: bytes

    def __post_init__(self) -> None:
        n, k, t = self.num_devices, self.neighbours, self.threshold
        if n < 2:
            raise ValueError(f"secure aggregation needs at least 2 devices, got {n}")
        if not (k == n - 1 or (k % 2 == 0 and 2 <= k < n)):
            raise ValueError(f"neighbours k={k} must be even with 2 <= k < n={n}, or n-1={n - 1} (complete graph)")
        if not (k < 2 * t and t <= k):
            raise ValueError(
                f"threshold t={t} must satisfy k/2 < t <= k for k={k}: t > k/2 so no two disjoint "
                "groups of neighbours can release both secrets of a device (Bell et al. 2020)"
            )
        if not 1 <= self.modulus_bits <= 64:
            raise ValueError(f"modulus_bits must be in [1, 64], got {self.modulus_bits}")
        if self.vector_length < 1:
            raise ValueError(f"vector_length must be >= 1, got {self.vector_length}")
        if not isinstance(self.session_id, bytes) or not self.session_id:
            raise ValueError("session_id must be non-empty bytes")

    @property
    def graph(self) -> tuple[tuple[int, ...], ...]:
        """graph[i] = sorted neighbour ids of device i."""
        return neighbour_graph(self.num_devices, self.neighbours, self.session_id)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """Array dtype of masked vectors: uint32 if m <= 32 else uint64."""
        return mask_dtype(self.modulus_bits)


@functools.lru_cache(maxsize=64)
def neighbour_graph(n: int, k: int, session_id: bytes) -> tuple[tuple[int, ...], ...]:
    """Harary graph H_{k,n} over a permutation seeded by the public session id (Bell et al. 2020, sec. 4).

    Devices are placed on a ring in a pseudo-random order; each is joined to the k/2 nearest
    on either side (a circulant, k-regular). k = n - 1 gives the complete graph. The order is
    public and deterministic, so the server and every device derive the same graph.
    """
    if k >= n - 1:
        return tuple(tuple(j for j in range(n) if j != i) for i in range(n))
    seed = int.from_bytes(hashlib.sha256(b"fedsim/secagg/graph" + session_id).digest()[:16], "big")
    order = np.random.default_rng(seed).permutation(n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    graph = []
    for i in range(n):
        p = int(position[i])
        nbrs = {int(order[(p + d) % n]) for d in range(1, k // 2 + 1)}
        nbrs |= {int(order[(p - d) % n]) for d in range(1, k // 2 + 1)}
        graph.append(tuple(sorted(nbrs)))
    return tuple(graph)


def _binomial_cdf(x: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, x + 1))


def default_params(
    num_devices: int,
    vector_length: int,
    modulus_bits: int,
    session_id: bytes | None = None,
    *,
    dropout_rate: float = 0.1,
    failure_prob: float = 1e-3,
) -> SecAggParams:
    """SecAgg+ parameters with k = O(log n) neighbours and t = floor(k/2) + 1 (Bell et al. 2020).

    t = floor(k/2) + 1 (a strict majority of the neighbours): the server needs t shares to
    rebuild a secret, and honest neighbours answer for each device with either the b-share or
    the s-share, so two disjoint groups of size t cannot both exist - the server cannot obtain
    both secrets of a device even by showing different survivor lists to different neighbours.
    Larger t = more neighbours must collude with the server; smaller t = more dropouts survivable.

    k is the smallest even number that is (a) >= 2 ceil(log2 n), the O(log n) degree Bell et al.
    show keeps the random Harary graph's surviving honest part connected, so the server learns
    only sums of large groups, and (b) correct with probability >= 1 - failure_prob when each
    device independently drops with probability `dropout_rate`: union over the n devices of
    P(fewer than t of its k neighbours survive) = n P(Bin(k, 1 - dropout_rate) < t)
    <= failure_prob. If that needs k >= n - 1, the complete graph (classic SecAgg) is used.
    (A device left with fewer than t live neighbours cannot be unmasked and is excluded; on a
    Harary graph with t = k/2 + 1 that exclusion cascades through its ring neighbours, so in
    practice such an event aborts the round - which is the event this bound budgets for.)
    This is a heuristic for simulation, not Bell et al.'s exact parameter theorem (which also
    budgets for a fraction of corrupt devices); e.g. n=10 -> complete graph (k=9, t=5),
    n=100 -> k=20, t=11, n=1000 -> k=24, t=13.
    """
    n = num_devices
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 devices, got {n}")
    if not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    k = max(2, 2 * math.ceil(math.log2(n)))
    k += k % 2
    while k < n - 1 and n * _binomial_cdf(k // 2, k, 1 - dropout_rate) > failure_prob:
        k += 2
    if k >= n - 1:
        k = n - 1
    return SecAggParams(
        num_devices=n,
        threshold=k // 2 + 1,
        neighbours=k,
        modulus_bits=modulus_bits,
        vector_length=vector_length,
        session_id=os.urandom(16) if session_id is None else session_id,
    )


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
        return sum(payload_nbytes(v) for v in message)
    raise TypeError(f"unexpected message element of type {type(message).__name__}")


def _sign(i: int, j: int) -> int:
    return 1 if i < j else -1


def _pair_lists(msg: Mapping, ids_key: str, values_key: str) -> dict[int, object]:
    ids, values = list(msg[ids_key]), list(msg[values_key])
    if len(ids) != len(values) or len(set(ids)) != len(ids):
        raise ValueError(f"'{ids_key}' and '{values_key}' must be parallel lists of distinct ids")
    return {int(i): v for i, v in zip(ids, values)}


# ---------------------------------------------------------------------------------------------
# Device


class SecAggDevice:
    """One device's side of a SecAgg+ session (Bonawitz et al. 2017 Fig. 4, Bell et al. 2020 sec. 4).

    Methods must be called in order, once each: advertise_keys, share_keys, masked_input,
    unmask. `rng` (numpy Generator) makes keys/seeds/shares reproducible for simulation and is
    NOT cryptographically secure; None (default) draws them from the OS CSPRNG.
    `bytes_sent[stage]` / `bytes_received[stage]` count payload bytes (see payload_nbytes).
    """

    def __init__(self, device_id: int, params: SecAggParams, rng: np.random.Generator | None = None) -> None:
        if not 0 <= device_id < params.num_devices:
            raise ValueError(f"device id {device_id} not in [0, {params.num_devices})")
        self.id = device_id
        self.params = params
        self.neighbours = frozenset(params.graph[device_id])
        self._rng = rng
        self._stage = 0
        self.bytes_sent: dict[str, int] = {}
        self.bytes_received: dict[str, int] = {}
        self._c = self._s = None
        self._b: bytes | None = None
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self._enc_keys: dict[int, bytes] = {}  # neighbour -> AES key from the c agreement
        self._held: dict[int, tuple[bytes, bytes]] = {}  # sender -> (s-share, b-share)
        self._revealed: dict[int, str] = {}  # neighbour -> "b" | "s"

    def export_state(self) -> bytes:
        """The device's secrets and progress, to keep between stages on the device's host.

        Workers serve a device's stages from whatever process Flower routes the message to,
        so the state lives in the worker node's own state, never in a message to the server.
        """
        state = {
            "id": self.id,
            "stage": self._stage,
            "c": self._c.private_bytes() if self._c else None,
            "s": self._s.private_bytes() if self._s else None,
            "b": self._b,
            "peer_keys": self._peer_keys,
            "enc_keys": self._enc_keys,
            "held": self._held,
            "revealed": self._revealed,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, params: SecAggParams, blob: bytes) -> SecAggDevice:
        """The device `export_state` saved (the blob is the node's own, never a peer's)."""
        state = pickle.loads(blob)  # noqa: S301 - written by this node's own export_state
        device = cls(state["id"], params)
        device._stage = state["stage"]
        device._c = private_from_bytes(state["c"]) if state["c"] else None
        device._s = private_from_bytes(state["s"]) if state["s"] else None
        device._b = state["b"]
        device._peer_keys = state["peer_keys"]
        device._enc_keys = state["enc_keys"]
        device._held = state["held"]
        device._revealed = state["revealed"]
        device.bytes_sent = state["bytes_sent"]
        device.bytes_received = state["bytes_received"]
        return device

    def _advance(self, expected: int, name: str) -> None:
        if self._stage != expected:
            raise ProtocolViolation(
                f"device {self.id}: '{name}' requested out of order (at stage {self._stage}, expected {expected})"
            )
        self._stage = expected + 1

    def _abort(self, reason: str) -> None:
        self._stage = -1  # a device that aborted never continues
        raise SecAggAborted(f"device {self.id}: {reason}")

    def advertise_keys(self) -> dict:
        """Stage 1 (Bonawitz AdvertiseKeys): fresh c and s key pairs -> {"c_pk", "s_pk"}."""
        self._advance(0, "advertise_keys")
        self._c, self._s = generate_keypair(self._rng), generate_keypair(self._rng)
        reply = {"c_pk": self._c.public, "s_pk": self._s.public}
        self.bytes_sent["advertise_keys"] = payload_nbytes(reply)
        return reply

    def share_keys(self, request: Mapping) -> dict:
        """Stage 2 (Bonawitz ShareKeys, Bell: shares to neighbours only).

        request {"ids", "c_pks", "s_pks"}: the live neighbours' public keys. Shamir-shares s^SK
        and a fresh self-mask seed b among them (threshold t) and returns, per neighbour j,
        AES-GCM(KA(c_i, c_j)) of (s-share_j || b-share_j) bound to (i, j, session):
        {"ids": [j], "ciphertexts": [bytes]}.
        """
        self._advance(1, "share_keys")
        self.bytes_received["share_keys"] = payload_nbytes(request)
        c_pks = _pair_lists(request, "ids", "c_pks")
        s_pks = _pair_lists(request, "ids", "s_pks")
        if set(c_pks) != set(s_pks) or not set(c_pks) <= self.neighbours:
            raise ProtocolViolation(f"device {self.id}: public keys offered for non-neighbours {sorted(set(c_pks) - self.neighbours)}")
        keys = [bytes(c_pks[j]) for j in c_pks] + [bytes(s_pks[j]) for j in s_pks]
        if len(set(keys)) != len(keys) or self._c.public in keys or self._s.public in keys:
            raise ProtocolViolation(f"device {self.id}: duplicate public keys offered (Bonawitz 2017: all must differ)")
        t = self.params.threshold
        if len(c_pks) < t:
            self._abort(f"only {len(c_pks)} live neighbours at share_keys, threshold t={t}")
        self._peer_keys = {j: (bytes(c_pks[j]), bytes(s_pks[j])) for j in sorted(c_pks)}
        holders = sorted(self._peer_keys)
        self._b = random_bytes(KEY_BYTES, self._rng)
        s_shares = shamir.share(self._s.private_bytes(), t, holders, self._rng)
        b_shares = shamir.share(self._b, t, holders, self._rng)
        sid = self.params.session_id
        ciphertexts = []
        for j in holders:
            key = self._enc_keys[j] = agree(self._c.private, self._peer_keys[j][0], info=INFO_ENC, salt=sid)
            ciphertexts.append(encrypt_share(key, s_shares[j] + b_shares[j], sender=self.id, receiver=j, session_id=sid))
        reply = {"ids": holders, "ciphertexts": ciphertexts}
        self.bytes_sent["share_keys"] = payload_nbytes(reply)
        return reply

    def masked_input(self, request: Mapping, x: np.ndarray) -> dict:
        """Stage 3 (Bonawitz MaskedInputCollection): decrypt held shares, return {"masked": y}.

        request {"ids", "ciphertexts"}: the ciphertexts neighbours addressed to this device;
        their senders are the neighbours it masks with. x: integer vector of length L (any sign:
        reduced mod 2^m, e.g. FixedPoint.encode output). A ciphertext failing authentication
        raises TamperedShare. y = x + PRG(b) + sum_j sign(i,j) PRG(KA(s_i, s_j)) mod 2^m.
        """
        self._advance(2, "masked_input")
        self.bytes_received["masked_input"] = payload_nbytes(request)
        cts = _pair_lists(request, "ids", "ciphertexts")
        unknown = set(cts) - set(self._peer_keys)
        if unknown:
            raise ProtocolViolation(f"device {self.id}: ciphertexts from devices it did not exchange keys with: {sorted(unknown)}")
        t, sid = self.params.threshold, self.params.session_id
        if len(cts) < t:
            self._abort(f"only {len(cts)} neighbours shared keys, threshold t={t}")
        for j in sorted(cts):
            plain = decrypt_share(self._enc_keys[j], bytes(cts[j]), sender=j, receiver=self.id, session_id=sid)
            if len(plain) != 2 * _SHARE_BYTES:
                raise TamperedShare(f"share payload from device {j} has {len(plain)} bytes, expected {2 * _SHARE_BYTES}")
            self._held[j] = (plain[:_SHARE_BYTES], plain[_SHARE_BYTES:])
        x = np.asarray(x)
        if x.shape != (self.params.vector_length,):
            raise ValueError(f"device {self.id}: input shape {x.shape}, expected ({self.params.vector_length},)")
        m, length = self.params.modulus_bits, self.params.vector_length
        y = to_ring(x, m)  # a fresh array: x is not modified
        y += prg_mask(self._b, length, m, NONCE_SELF_MASK)
        for j in sorted(self._held):
            seed = agree(self._s.private, self._peer_keys[j][1], info=INFO_MASK, salt=sid)
            mask = prg_mask(seed, length, m, NONCE_PAIR_MASK)
            if _sign(self.id, j) > 0:
                y += mask
            else:
                y -= mask
        if m not in (32, 64):
            y &= y.dtype.type((1 << m) - 1)
        reply = {"masked": y}
        self.bytes_sent["masked_input"] = payload_nbytes(reply)
        return reply

    def unmask(self, request: Mapping) -> dict:
        """Stage 4 (Bonawitz Unmasking): reveal b-shares of survivors, s-shares of dropped.

        request {"survivors": [j], "dropped": [j]}: the status of the neighbours whose shares this
        device holds. Refuses (ProtocolViolation) if a neighbour is in both lists, if this device
        is listed as dropped, if asked twice, or if a neighbour's other secret was already
        revealed: releasing both b_j and s_j would unmask y_j. Aborts (SecAggAborted) if fewer
        than t neighbours survive, since then its own self mask cannot be removed anyway.
        Returns {"b_ids", "b_shares", "s_ids", "s_shares"}.
        """
        self._advance(3, "unmask")
        self.bytes_received["unmask"] = payload_nbytes(request)
        survivors = {int(j) for j in request["survivors"]}
        dropped = {int(j) for j in request["dropped"]}
        both = survivors & dropped
        if both:
            raise ProtocolViolation(
                f"device {self.id} refuses: asked for both the b-share and the s-share of {sorted(both)}"
            )
        if self.id in dropped:
            raise ProtocolViolation(f"device {self.id} refuses: it sent its masked input but is listed as dropped")
        for j in survivors | dropped:
            kind = "b" if j in survivors else "s"
            if self._revealed.get(j, kind) != kind:
                raise ProtocolViolation(f"device {self.id} refuses: already revealed the other secret of {j}")
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
        self.bytes_sent["unmask"] = payload_nbytes(reply)
        return reply


# ---------------------------------------------------------------------------------------------
# Server


class SecAggServer:
    """The server's side: routes messages, tracks survivors, rebuilds the masks, outputs the sum.

    It never holds a decryption key: share ciphertexts are forwarded opaque. Fewer than t
    devices at any stage, or a secret with fewer than t reachable shares, raises
    SecAggAborted. Attributes after each stage: `advertised` (U1), `shared` (U2), `masked`
    (U3 = the devices whose inputs are summed, also `survivors`), `responded` (U4),
    `dropped_after_sharing` (shared keys but sent no masked input: their pairwise masks are
    rebuilt), `rejected` {device: reason} for malformed replies (treated as dropouts).
    """

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self.graph = params.graph
        self._stage = 1
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}
        self.advertised: frozenset[int] = frozenset()
        self.shared: frozenset[int] = frozenset()
        self.masked: frozenset[int] = frozenset()
        self.responded: frozenset[int] = frozenset()
        self.dropped_after_sharing: frozenset[int] = frozenset()
        self.rejected: dict[int, str] = {}
        self._live: frozenset[int] = frozenset()  # devices still in the session after pruning
        self._ciphertexts: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> ct
        self._total: np.ndarray | None = None
        self.bytes_sent: dict[str, int] = {}  # server -> all devices, per stage

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

    def _prune(self, alive: Iterable[int], stage: str) -> frozenset[int]:
        """Drop devices with fewer than t live neighbours until stable (Bell 2020: they abort)."""
        live = set(alive)
        t = self.params.threshold
        changed = True
        while changed:
            changed = False
            for i in sorted(live):
                if sum(1 for j in self.graph[i] if j in live) < t:
                    live.discard(i)
                    changed = True
        if len(live) < t:
            self._abort(
                f"round aborted at {stage}: {len(live)} devices with >= t={t} live neighbours remain, need >= {t}"
            )
        return frozenset(live)

    def _record(self, stage: str, requests: dict[int, dict]) -> dict[int, dict]:
        self.bytes_sent[stage] = sum(payload_nbytes(r) for r in requests.values())
        return requests

    def collect_keys(self, replies: Mapping[int, Mapping]) -> dict[int, dict]:
        """End of stage 1: {i: {"c_pk", "s_pk"}} -> share_keys requests {i: {"ids", "c_pks", "s_pks"}}."""
        self._advance(1, "collect_keys")
        keys: dict[int, tuple[bytes, bytes]] = {}
        for i, reply in replies.items():
            try:
                c_pk, s_pk = bytes(reply["c_pk"]), bytes(reply["s_pk"])
            except (KeyError, TypeError) as exc:
                self.rejected[i] = f"advertise_keys reply malformed: {exc!r}"
                continue
            if not 0 <= i < self.params.num_devices or len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES or c_pk == s_pk:
                self.rejected[i] = "advertise_keys reply: bad device id or keys"
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
                    self.rejected[i] = "advertise_keys reply: public key reused by another device"
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
        return self._record("share_keys", requests)

    def collect_shares(self, replies: Mapping[int, Mapping]) -> dict[int, dict]:
        """End of stage 2: {i: {"ids", "ciphertexts"}} -> masked_input requests {i: {"ids", "ciphertexts"}}."""
        self._advance(2, "collect_shares")
        cts: dict[int, dict[int, bytes]] = {}
        for i, reply in replies.items():
            if i not in self._live:
                self.rejected[i] = "share_keys reply from a device not in the session"
                continue
            try:
                by_receiver = {j: bytes(c) for j, c in _pair_lists(reply, "ids", "ciphertexts").items()}
            except (KeyError, TypeError, ValueError) as exc:
                self.rejected[i] = f"share_keys reply malformed: {exc!r}"
                continue
            expected = {j for j in self.graph[i] if j in self._live}
            if set(by_receiver) != expected:
                self.rejected[i] = f"share_keys reply addressed {sorted(by_receiver)}, expected {sorted(expected)}"
                continue
            cts[i] = by_receiver
        self.shared = frozenset(cts)
        self._live = self._prune(cts, "masked_input")
        self._ciphertexts = {i: cts[i] for i in self._live}
        requests = {}
        for i in sorted(self._live):
            senders = [j for j in self.graph[i] if j in self._live]
            requests[i] = {"ids": senders, "ciphertexts": [self._ciphertexts[j][i] for j in senders]}
        return self._record("masked_input", requests)

    def collect_masked(self, replies: Mapping[int, Mapping]) -> dict[int, dict]:
        """End of stage 3: {i: {"masked": y}} -> unmask requests {i: {"survivors", "dropped"}}."""
        self._advance(3, "collect_masked")
        p = self.params
        total = np.zeros(p.vector_length, dtype=p.dtype)
        masked = set()
        for i, reply in replies.items():
            if i not in self._live:
                self.rejected[i] = "masked_input reply from a device not in the session"
                continue
            try:
                y = np.asarray(reply["masked"])
            except (KeyError, TypeError) as exc:
                self.rejected[i] = f"masked_input reply malformed: {exc!r}"
                continue
            if y.shape != (p.vector_length,) or not np.issubdtype(y.dtype, np.integer):
                self.rejected[i] = f"masked_input reply: shape {y.shape} dtype {y.dtype}, expected ({p.vector_length},) integers"
                continue
            total += y.astype(p.dtype, copy=False)  # integer casts wrap mod 2^32 / 2^64: exact mod 2^m
            masked.add(i)
        t = p.threshold
        if len(masked) < t:
            self._abort(f"round aborted at unmask: {len(masked)} masked inputs received, need >= t={t}")
        self.masked = frozenset(masked)
        self.dropped_after_sharing = self._live - self.masked
        self._total = total
        # Every secret the server will need must have >= t holders among the survivors.
        for i in sorted(self._live):
            needed = i in self.masked or any(j in self.masked for j in self.graph[i])
            holders = sum(1 for j in self.graph[i] if j in self.masked and j in self._live)
            if needed and holders < t:
                what = "self mask" if i in self.masked else "pairwise masks"
                self._abort(
                    f"round aborted: device {i}'s {what} cannot be removed, only {holders} of its "
                    f"neighbours survive, need t={t}"
                )
        requests = {}
        for i in sorted(self.masked):
            nbrs = [j for j in self.graph[i] if j in self._live]
            requests[i] = {
                "survivors": [j for j in nbrs if j in self.masked],
                "dropped": [j for j in nbrs if j in self.dropped_after_sharing],
            }
        return self._record("unmask", requests)

    def collect_unmask(self, replies: Mapping[int, Mapping]) -> np.ndarray:
        """End of stage 4: {i: {"b_ids", "b_shares", "s_ids", "s_shares"}} -> sum of survivors' x mod 2^m (uint64)."""
        self._advance(4, "collect_unmask")
        p = self.params
        t, sid, m, length = p.threshold, p.session_id, p.modulus_bits, p.vector_length
        b_shares: dict[int, dict[int, bytes]] = {}
        s_shares: dict[int, dict[int, bytes]] = {}
        responded = set()
        for i, reply in replies.items():
            if i not in self.masked:
                self.rejected[i] = "unmask reply from a device that sent no masked input"
                continue
            try:
                bs = {j: bytes(v) for j, v in _pair_lists(reply, "b_ids", "b_shares").items()}
                ss = {j: bytes(v) for j, v in _pair_lists(reply, "s_ids", "s_shares").items()}
            except (KeyError, TypeError, ValueError) as exc:
                self.rejected[i] = f"unmask reply malformed: {exc!r}"
                continue
            nbrs = set(self.graph[i])
            if not (set(bs) <= nbrs & self.masked and set(ss) <= nbrs & self.dropped_after_sharing):
                self.rejected[i] = "unmask reply reveals shares that were not requested"
                continue
            responded.add(i)
            for j, sh in bs.items():
                b_shares.setdefault(j, {})[i] = sh
            for j, sh in ss.items():
                s_shares.setdefault(j, {})[i] = sh
        self.responded = frozenset(responded)
        if len(responded) < t:
            self._abort(f"round aborted at unmask: {len(responded)} devices answered, need >= t={t}")
        total = self._total
        # Remove self masks of the survivors (Bonawitz 2017 Fig. 4, Unmasking step 2).
        for i in sorted(self.masked):
            b_i = self._reconstruct(b_shares.get(i, {}), f"self-mask seed of device {i}")
            total -= prg_mask(b_i, length, m, NONCE_SELF_MASK)
        # Remove pairwise masks survivors shared with devices that dropped after sharing keys.
        for j in sorted(self.dropped_after_sharing):
            partners = [l for l in self.graph[j] if l in self.masked]
            if not partners:
                continue
            raw = self._reconstruct(s_shares.get(j, {}), f"mask key of dropped device {j}")
            key = private_from_bytes(raw)
            if key.public != self.public_keys[j][1]:
                self._abort(f"round aborted: reconstructed mask key of device {j} does not match its public key")
            for l in partners:
                seed = agree(key.private, self.public_keys[l][1], info=INFO_MASK, salt=sid)
                mask = prg_mask(seed, length, m, NONCE_PAIR_MASK)
                if _sign(l, j) > 0:  # y_l contains +mask
                    total -= mask
                else:
                    total += mask
        self._total = None
        result = total.astype(np.uint64)
        if m < 64:
            result &= np.uint64((1 << m) - 1)
        return result

    def _reconstruct(self, shares: dict[int, bytes], what: str) -> bytes:
        try:
            return shamir.reconstruct(shares, self.params.threshold)
        except shamir.ShamirError as exc:
            self._abort(f"round aborted: cannot rebuild the {what}: {exc}")
            raise  # unreachable: _abort raises


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


def simulate_round(
    params: SecAggParams,
    inputs: Mapping[int, np.ndarray],
    *,
    drop_before: Mapping[str, Iterable[int]] | None = None,
    rng: np.random.Generator | None = None,
) -> RoundResult:
    """Run one full session in-process (for tests, benchmarks and a transport-free simulator).

    inputs: {device: integer vector}; devices without an input drop before stage 1.
    drop_before: {stage name in STAGES: devices that go silent from that stage on}.
    rng: reproducible (NOT secure) device randomness, or None for the OS CSPRNG.
    Raises SecAggAborted if the round cannot complete.
    """
    drop_before = drop_before or {}
    unknown = set(drop_before) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {STAGES}")
    gone: set[int] = set()

    def alive(stage: str, ids: Iterable[int]) -> list[int]:
        gone.update(drop_before.get(stage, ()))
        return [i for i in ids if i not in gone]

    seeds = rng.integers(0, 2**63, size=params.num_devices) if rng is not None else None
    devices = {
        i: SecAggDevice(i, params, None if seeds is None else np.random.default_rng(int(seeds[i])))
        for i in sorted(inputs)
    }
    server = SecAggServer(params)
    replies1 = {i: devices[i].advertise_keys() for i in alive("advertise_keys", devices)}
    requests2 = server.collect_keys(replies1)
    replies2 = {i: devices[i].share_keys(requests2[i]) for i in alive("share_keys", requests2)}
    requests3 = server.collect_shares(replies2)
    replies3 = {i: devices[i].masked_input(requests3[i], inputs[i]) for i in alive("masked_input", requests3)}
    requests4 = server.collect_masked(replies3)
    replies4 = {i: devices[i].unmask(requests4[i]) for i in alive("unmask", requests4)}
    aggregate = server.collect_unmask(replies4)
    return RoundResult(
        aggregate=aggregate,
        survivors=server.survivors,
        dropped_after_sharing=server.dropped_after_sharing,
        bytes_sent={i: dict(d.bytes_sent) for i, d in devices.items()},
        bytes_received={i: dict(d.bytes_received) for i, d in devices.items()},
    )
