"""SecAgg+ (fedsim.secagg): exactness under dropouts, aborts, security checks, Shamir,
fixed-point quantization and Skellam noise. Small sizes: the whole file runs in a few seconds."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from fedsim.secagg import crypto, protocol, quantize, shamir
from fedsim.secagg.ddp import (
    grid_variance,
    per_device_variance,
    realized_total_variance,
    skellam,
    skellam_tail_bound,
)
from fedsim.secagg.protocol import (
    ProtocolViolation,
    SecAggAborted,
    SecAggDevice,
    SecAggParams,
    SecAggServer,
    simulate_round,
    stages,
)
from fedsim.secagg.quantize import FixedPoint, check_modulus_bits, required_modulus_bits, to_ring

N, K, T, L, M = 10, 4, 3, 1000, 20


def _params(session: bytes = b"test-round-1", **overrides) -> SecAggParams:
    kw = dict(num_devices=N, threshold=T, neighbours=K, modulus_bits=M, vector_length=L, session_id=session)
    kw.update(overrides)
    return SecAggParams(**kw)


def _inputs(params: SecAggParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 2**12, params.vector_length) for i in range(params.num_devices)}


def _plain_sum(inputs: dict[int, np.ndarray], ids, m: int) -> np.ndarray:
    return sum(inputs[i].astype(np.uint64) for i in ids) % np.uint64(2**m)


def _far_pair(params: SecAggParams) -> tuple[int, int]:
    """Two devices that are not neighbours and share no neighbour (so nobody loses two)."""
    g = params.graph
    for a, b in itertools.combinations(range(params.num_devices), 2):
        if b not in g[a] and not set(g[a]) & set(g[b]):
            return a, b
    raise AssertionError("no far pair")


def _run_to_stage3(params: SecAggParams):
    """Drive stages 1-2 by hand: (devices, server, stage-3 requests)."""
    devices = {i: SecAggDevice(i, params) for i in range(params.num_devices)}
    server = SecAggServer(params)
    req2 = server.collect_keys({i: d.advertise_keys() for i, d in devices.items()})
    req3 = server.collect_shares({i: devices[i].share_keys(r) for i, r in req2.items()})
    return devices, server, req3


# --- protocol exactness -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "active"),
    [(stage, active) for active in (False, True) for stage in (None, *stages(active))],
)
def test_aggregate_is_exact_sum_under_dropouts(stage, active):
    params = _params(active=active)
    inputs = _inputs(params)
    dropped = set(_far_pair(params)) if stage else set()
    result = simulate_round(params, inputs, drop_before={stage: dropped} if stage else None)
    # Dropping after sending y (consistency, unmask) keeps the device's input in the sum.
    gone = stage in ("advertise_keys", "share_keys", "masked_input")
    expected_ids = set(range(N)) - (dropped if gone else set())
    assert result.survivors == expected_ids
    assert result.dropped_after_sharing == (dropped if stage == "masked_input" else set())
    assert result.aggregate.dtype == np.uint64
    np.testing.assert_array_equal(result.aggregate, _plain_sum(inputs, expected_ids, M))
    assert result.rejected == {}


def _drive(params: SecAggParams, inputs, *, tamper_keys=None, tamper_cts=None):
    """A semi-honest session by hand, with hooks that corrupt one device's messages."""
    devices = {i: SecAggDevice(i, params) for i in range(params.num_devices)}
    server = SecAggServer(params)
    keys = {i: d.advertise_keys() for i, d in devices.items()}
    for i, reply in (tamper_keys or {}).items():
        keys[i] = reply
    req2 = server.collect_keys(keys)
    shares = {i: devices[i].share_keys(r) for i, r in req2.items()}
    for (sender, receiver), ct in (tamper_cts or {}).items():
        reply = shares[sender]
        reply["ciphertexts"][reply["ids"].index(receiver)] = ct
    req3 = server.collect_shares(shares)
    req4 = server.collect_masked({i: devices[i].masked_input(r, inputs[i]) for i, r in req3.items()})
    return server, server.collect_unmask({i: devices[i].unmask(r) for i, r in req4.items()})


def test_a_host_that_shares_pair_work_sends_the_same_bits_as_each_device_alone():
    """A worker hosting several devices runs each pair's key agreement once (PairMemo) and
    expands each pair mask once (masked_inputs): every share ciphertext key, every masked
    vector and the sum must be what each device computes alone. A server that forges the key
    it forwards for one device (a low-order s key to one neighbour) makes that neighbour drop
    in both paths, and the memo never hands it the honest pair's value."""
    params = _params()
    inputs = {i: to_ring(x, M) for i, x in _inputs(params).items()}
    alone = {i: SecAggDevice(i, params) for i in range(N)}
    server = SecAggServer(params)
    req2 = server.collect_keys({i: d.advertise_keys() for i, d in alone.items()})
    twins = {i: SecAggDevice.restore(params, d.export_state()) for i, d in alone.items()}  # the same devices again
    memo = protocol.PairMemo()
    shares = {i: alone[i].share_keys(r) for i, r in req2.items()}
    for i, r in req2.items():
        twins[i].share_keys(r, memo=memo)
    assert memo.hits == N * K // 2  # every edge agreed once, the other end served from the memo
    assert all(twins[i]._enc_keys == alone[i]._enc_keys for i in range(N))
    req3 = server.collect_shares(shares)
    shared_states = {i: d.export_state() for i, d in alone.items()}
    shared = {i: SecAggDevice.restore(params, blob) for i, blob in shared_states.items()}  # same b, same keys

    def alone_on(i: int, x: np.ndarray) -> np.ndarray:  # device i's masked vector for input x, computed alone
        return SecAggDevice.restore(params, shared_states[i]).masked_input(forged[i], x.copy())["masked"]

    # The forger: the s key it forwarded to device v for u (its first neighbour) was the low-order
    # point 0 (written into v's state here: share_keys does not use s keys), so v's mask agreement
    # with u fails, and v fails before any other agreement.
    v = 0
    u = req3[v]["ids"][0]
    forged = req3
    for devices in (alone, shared):
        devices[v]._peer_keys[u] = (devices[v]._peer_keys[u][0], bytes(32))
    replies_alone = {}
    for i, r in forged.items():
        try:
            replies_alone[i] = alone[i].masked_input(r, inputs[i].copy())
        except protocol.DEVICE_FAULTS as err:
            replies_alone[i] = err
    order = sorted(forged, key=lambda i: i == v)  # v last: u's honest agreement with v is in the memo by then
    memo = protocol.PairMemo()
    got = protocol.masked_inputs([shared[i] for i in order], [forged[i] for i in order], [inputs[i].copy() for i in order],
                                 memo=memo)  # fmt: skip
    assert memo.hits == N * K // 2 - K  # v's K edges: its neighbours compute them alone
    for i, reply in zip(order, got, strict=True):
        want = replies_alone[i]
        if isinstance(want, Exception):
            assert i == v and type(reply) is type(want) and str(reply) == str(want)
            continue
        assert reply["bad"] == want["bad"] and reply["masked"].dtype == want["masked"].dtype
        np.testing.assert_array_equal(reply["masked"], want["masked"])
    assert isinstance(replies_alone[v], ValueError)
    # One array passed for two devices: the second gets a copy, each vector is its own.
    a, b = order[0], order[1]
    twice = {i: SecAggDevice.restore(params, shared_states[i]) for i in (a, b)}
    x = inputs[a].copy()
    first, second = protocol.masked_inputs([twice[a], twice[b]], [forged[a], forged[b]], [x, x])
    np.testing.assert_array_equal(first["masked"], replies_alone[a]["masked"])
    np.testing.assert_array_equal(second["masked"], alone_on(b, inputs[a]))
    survivors = {i: r for i, r in replies_alone.items() if not isinstance(r, Exception)}
    req4 = server.collect_masked(survivors)
    total = server.collect_unmask({i: alone[i].unmask(r) for i, r in req4.items()})
    np.testing.assert_array_equal(total, _plain_sum(_inputs(params), set(range(N)) - {v}, M))


def test_a_masked_reply_whose_bad_list_is_not_a_list_of_ids_drops_that_device_only():
    # A worker's packed reply may carry any value under "bad" (or none that unpacks: None).
    params = _params()
    inputs = _inputs(params)
    devices, server, req3 = _run_to_stage3(params)
    a, b = _far_pair(params)
    replies = {i: devices[i].masked_input(r, inputs[i]) for i, r in req3.items()}
    replies[a]["bad"], replies[b]["bad"] = 5, None
    req4 = server.collect_masked(replies)
    assert {a, b} <= set(server.rejected) and "malformed reply" in server.rejected[a] and "malformed reply" in server.rejected[b]
    total = server.collect_unmask({i: devices[i].unmask(r) for i, r in req4.items()})
    np.testing.assert_array_equal(total, _plain_sum(inputs, set(range(N)) - {a, b}, M))


def test_unmasking_aborts_at_the_first_dropped_device_in_order_whatever_the_cause():
    """Two devices drop after sharing keys; at unmask the holders' s-shares rebuild a wrong key for
    the first (a key that does not match its public key) and too few shares are left for the
    second. The batched reconstruction must abort where one-by-one did: at the first device."""
    params = _params()
    inputs = _inputs(params)
    a, b = sorted(_far_pair(params))
    devices, server, req3 = _run_to_stage3(params)
    req4 = server.collect_masked({i: devices[i].masked_input(r, inputs[i]) for i, r in req3.items() if i not in (a, b)})
    replies = {i: dict(devices[i].unmask(r)) for i, r in req4.items()}
    holders = sorted(i for i, r in replies.items() if a in r["s_ids"])
    forged = shamir.share(os.urandom(32), T, holders)  # consistent shares of another key
    for i in holders:
        r = replies[i]
        r["s_shares"] = [forged[i] if j == a else sh for j, sh in zip(r["s_ids"], r["s_shares"], strict=True)]
    for i in sorted(i for i, r in replies.items() if b in r["s_ids"])[T - 1 :]:  # t - 1 shares of b's key left
        r = replies[i]
        kept = [(j, sh) for j, sh in zip(r["s_ids"], r["s_shares"], strict=True) if j != b]
        r["s_ids"], r["s_shares"] = [j for j, _ in kept], [sh for _, sh in kept]
    with pytest.raises(SecAggAborted, match=f"reconstructed mask key of device {a} does not match its public key"):
        server.collect_unmask(replies)


def test_a_malformed_or_low_order_key_drops_that_device_only():
    params = _params()
    inputs = _inputs(params)
    low_order = bytes(32)  # the X25519 point 0: every Diffie-Hellman result with it is zero
    a, b = _far_pair(params)
    server, total = _drive(params, inputs, tamper_keys={
        a: {"c_pk": crypto.generate_keypair().public, "s_pk": low_order},
        b: {"c_pk": b"short", "s_pk": crypto.generate_keypair().public},
    })  # fmt: skip
    assert set(server.rejected) == {a, b}
    assert all(reason.startswith("advertise_keys: unusable keys") for reason in server.rejected.values())
    np.testing.assert_array_equal(total, _plain_sum(inputs, set(range(N)) - {a, b}, M))


def _roots_mod_p(coefficients: list[int], p: int) -> int:
    """How many distinct roots in F_p a polynomial has (coefficients from the highest degree):
    the degree of gcd(f, x^p - x), by polynomial arithmetic mod p (no library)."""

    def trim(a: list[int]) -> list[int]:
        a = [c % p for c in a]
        while a and a[0] == 0:
            a = a[1:]
        return a

    def mod(a: list[int], m: list[int]) -> list[int]:
        a, inv = trim(a), pow(m[0], -1, p)
        while len(a) >= len(m):
            q = a[0] * inv % p
            a = trim([c - q * d for c, d in itertools.zip_longest(a, m, fillvalue=0)][1:])
        return a

    def mul(a: list[int], b: list[int]) -> list[int]:
        out = [0] * (len(a) + len(b) - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                out[i + j] += x * y
        return out

    f = trim(coefficients)
    power, base, e = [1], [1, 0], p  # x^p mod f by squaring
    while e:
        if e & 1:
            power = mod(mul(power, base), f)
        base, e = mod(mul(base, base), f), e >> 1
    power = [0] * max(0, 2 - len(power)) + power
    power[-2] -= 1  # x^p - x
    g, h = f, mod(trim(power), f)
    while h:
        g, h = h, mod(g, h)
    return len(g) - 1


def test_the_low_order_key_list_is_every_point_of_order_dividing_8_and_the_exchange_agrees():
    """check_public_key looks keys up in crypto.SMALL_ORDER_U instead of running an exchange.
    Independent derivation: with x-only doubling x(2P) = (x^2 - 1)^2 / (4x(x^2 + Ax + 1)) on
    Curve25519 (A = 486662; curve and twist alike), order 2 is x = 0 (x^2 + Ax + 1 has no root
    in F_p), order 4 is x(2P) = 0, i.e. x = +-1, order 8 is x(2P) = +-1: the roots of
    (x^2 - 1)^2 -+ 4x(x^2 + Ax + 1). Every listed value must make `cryptography`'s exchange fail
    (all-zero secret), in both encodings of bit 255, and the count must be complete."""
    p, a = 2**255 - 19, 486662
    assert _roots_mod_p([1, a, 1], p) == 0
    order8 = {u for u in crypto.SMALL_ORDER_U if u < p and ((u * u - 1) ** 2 - 4 * u * (u * u + a * u + 1)) % p == 0}
    assert _roots_mod_p([1, -4, -4 * a - 2, -4, 1], p) == len(order8) == 2  # (x^2-1)^2 - 4x(x^2+Ax+1)
    assert _roots_mod_p([1, 4, 4 * a - 2, 4, 1], p) == 0  # (x^2-1)^2 + 4x(x^2+Ax+1)
    canonical = {0, 1, p - 1} | order8
    assert crypto.SMALL_ORDER_U == canonical | {u + p for u in canonical if u + p < 2**255}
    probe = X25519PrivateKey.generate()
    for u in crypto.SMALL_ORDER_U:
        for top in (0, 1 << 255):
            key = (u | top).to_bytes(32, "little")
            with pytest.raises(ValueError, match="low-order"):
                crypto.check_public_key(key)
            with pytest.raises(ValueError):
                probe.exchange(X25519PublicKey.from_public_bytes(key))
    for key in [(p + d).to_bytes(32, "little") for d in range(2, 19)] + [os.urandom(32) for _ in range(200)]:
        crypto.check_public_key(key)  # accepted, and the exchange works
        assert probe.exchange(X25519PublicKey.from_public_bytes(key)) != bytes(32)



def test_a_share_ciphertext_that_does_not_open_drops_its_sender_only():
    params = _params()
    inputs = _inputs(params)
    sender = 0
    receiver = params.graph[sender][0]
    server, total = _drive(params, inputs, tamper_cts={(sender, receiver): os.urandom(128)})
    assert list(server.rejected) == [sender] and server.rejected[sender].startswith("masked_input:")
    assert server.dropped_after_sharing == {sender}  # its masks were removed through the other holders
    np.testing.assert_array_equal(total, _plain_sum(inputs, set(range(N)) - {sender}, M))


def test_a_malformed_unmasking_share_drops_that_reply_only():
    params = _params()
    inputs = _inputs(params)
    devices, server, req3 = _run_to_stage3(params)
    req4 = server.collect_masked({i: devices[i].masked_input(r, inputs[i]) for i, r in req3.items()})
    replies = {i: devices[i].unmask(r) for i, r in req4.items()}
    replies[0]["b_shares"][0] = replies[0]["b_shares"][0][:-3]  # truncated
    total = server.collect_unmask(replies)
    assert server.rejected == {0: "unmask: malformed share"}
    np.testing.assert_array_equal(total, _plain_sum(inputs, range(N), M))  # device 0's own input is still in


def test_active_device_refuses_to_unmask_without_t_neighbour_signatures():
    from fedsim.secagg.protocol import KeyRegistry

    params = _params(active=True)
    ids = {i: crypto.generate_identity() for i in range(N)}
    registry = KeyRegistry()
    for i, key in ids.items():
        registry.register(params.session_id, i, i, crypto.identity_public(key))
    view = registry.lookup(params.session_id)
    devices = {i: SecAggDevice(i, params, identity=ids[i], registry=view) for i in range(N)}
    server = SecAggServer(params, registry=view)
    req2 = server.collect_keys({i: d.advertise_keys() for i, d in devices.items()})
    req3 = server.collect_shares({i: devices[i].share_keys(r) for i, r in req2.items()})
    reqc = server.collect_masked({i: devices[i].masked_input(r, np.zeros(L, dtype=np.int64)) for i, r in req3.items()})
    req4 = server.collect_signatures({i: devices[i].consistency(r) for i, r in reqc.items()})
    honest = dict(req4[0])
    keep = T - 1  # the server withholds signatures: one short of t
    with pytest.raises(ProtocolViolation, match="valid neighbour signatures"):
        devices[0].unmask(honest | {"signers": honest["signers"][:keep], "signatures": honest["signatures"][:keep]})
    forged = [bytes(64)] * len(honest["signers"])
    with pytest.raises(ProtocolViolation, match="valid neighbour signatures"):
        devices[1].unmask(dict(req4[1]) | {"signatures": forged})
    assert devices[2].unmask(req4[2])["b_ids"]  # the genuine request is answered


def test_complete_graph_classic_secagg_with_mixed_dropouts():
    params = _params(neighbours=N - 1, threshold=5, modulus_bits=64)
    inputs = _inputs(params, seed=3)
    inputs[0] = -inputs[0]  # negative integers are reduced mod 2^m
    drops = {"advertise_keys": [9], "share_keys": [8], "masked_input": [7], "unmask": [5]}
    result = simulate_round(params, inputs, drop_before=drops)
    # Shares go to the other devices only, so each secret needs t=5 of the 5 other responders.
    assert result.survivors == {0, 1, 2, 3, 4, 5, 6}
    assert result.dropped_after_sharing == {7}
    expected = sum(inputs[i] for i in result.survivors).astype(np.uint64)  # int64 wraps like 2^64
    np.testing.assert_array_equal(result.aggregate, expected)


def test_byte_counts_per_stage():
    active = simulate_round(_params(active=True), _inputs(_params())).bytes_sent[0]
    assert active["advertise_keys"] == 64 + 64 and active["consistency"] == 64  # Ed25519 signatures
    params = _params()
    result = simulate_round(params, _inputs(params))
    sent = result.bytes_sent[0]
    assert sent["advertise_keys"] == 64
    # per neighbour: 4-byte id + 12 nonce + 2 x 46-byte shares + 16 tag
    assert sent["share_keys"] == K * (4 + 12 + 2 * shamir.share_size(32) + 16)
    assert sent["masked_input"] == L * 4  # m=20 -> uint32, no "bad" senders
    assert sent["unmask"] == K * (4 + shamir.share_size(32))
    assert result.bytes_received[0]["masked_input"] == sent["share_keys"]
    uncounted = simulate_round(params, _inputs(params), count_bytes=False)  # (bench/secagg.py --protocol)
    np.testing.assert_array_equal(uncounted.aggregate, result.aggregate)
    assert not any(uncounted.bytes_sent.values()) and not any(uncounted.bytes_received.values())


def test_too_few_survivors_aborts():
    params = _params()
    inputs = _inputs(params)
    with pytest.raises(SecAggAborted, match="aborted"):
        simulate_round(params, inputs, drop_before={"share_keys": range(2, N)})
    with pytest.raises(SecAggAborted):  # y sent, but too few answer the unmask request
        simulate_round(params, inputs, drop_before={"unmask": range(3, N)})
    with pytest.raises(SecAggAborted):  # nobody left at all
        simulate_round(params, {})


def test_device_with_too_few_live_neighbours_aborts_cleanly():
    # Device 0 keeps 2 < t=3 live neighbours: its secrets could not be rebuilt, so it is
    # excluded; on a k=4 ring that exclusion cascades to its neighbours and the round aborts.
    params = _params()
    drop = set(params.graph[0][:2])
    with pytest.raises(SecAggAborted, match="live neighbours"):
        simulate_round(params, _inputs(params), drop_before={"share_keys": drop})


# --- security properties ------------------------------------------------------------------------


def test_masked_vector_of_zeros_looks_uniform():
    params = _params(vector_length=4096)
    devices, server, req3 = _run_to_stage3(params)
    y = devices[0].masked_input(req3[0], np.zeros(params.vector_length, dtype=np.int64))["masked"]
    assert y.max() < 2**M
    top_bits = (y >> (M - 4)).astype(np.int64)  # 16 bins of the top 4 bits
    counts = np.bincount(top_bits, minlength=16)
    assert stats.chisquare(counts).pvalue > 0.001
    low = (y & 0xF).astype(np.int64)
    assert stats.chisquare(np.bincount(low, minlength=16)).pvalue > 0.001


def test_tampered_or_misrouted_ciphertext_is_reported_not_held():
    params = _params()
    devices, server, req3 = _run_to_stage3(params)
    x = np.zeros(L, dtype=np.int64)
    r = req3[0]
    bad = list(r["ciphertexts"])
    flipped = bytearray(bad[0])
    flipped[20] ^= 0x01
    bad[0] = bytes(flipped)
    reply = devices[0].masked_input({"ids": r["ids"], "ciphertexts": bad}, x)
    assert reply["bad"] == [r["ids"][0]] and r["ids"][0] not in devices[0]._held
    assert "authentication" in devices[0].share_errors[r["ids"][0]]
    # Swap two senders' ciphertexts: the associated data (sender id) no longer matches.
    r1 = req3[1]
    swapped = [r1["ciphertexts"][1], r1["ciphertexts"][0]] + list(r1["ciphertexts"][2:])
    reply = devices[1].masked_input({"ids": r1["ids"], "ciphertexts": swapped}, x)
    assert reply["bad"] == sorted(r1["ids"][:2])


def test_device_refuses_to_reveal_both_secrets_of_a_neighbour():
    params = _params()
    devices, server, req3 = _run_to_stage3(params)
    d = devices[0]
    d.masked_input(req3[0], np.zeros(L, dtype=np.int64))
    nbrs = list(req3[0]["ids"])
    with pytest.raises(ProtocolViolation, match="both"):
        d.unmask({"survivors": nbrs, "dropped": [nbrs[0]]})
    # A fresh device answering once refuses any second request (e.g. the other secret).
    d = devices[1]
    d.masked_input(req3[1], np.zeros(L, dtype=np.int64))
    nbrs = list(req3[1]["ids"])
    reply = d.unmask({"survivors": nbrs, "dropped": []})
    assert reply["b_ids"] == sorted(nbrs) and reply["s_ids"] == []
    with pytest.raises(ProtocolViolation):
        d.unmask({"survivors": nbrs[1:], "dropped": nbrs[:1]})


def test_server_never_sees_plaintext_shares():
    params = _params()
    devices, server, req3 = _run_to_stage3(params)
    secret_b = devices[0]._b
    b_shares = shamir.share(secret_b, T, [1, 2, 3])  # any share of b is 46 bytes of field elements
    for request in req3.values():
        for ct in request["ciphertexts"]:
            assert secret_b not in ct and len(ct) == 12 + 2 * len(b_shares[1]) + 16


# --- parameters and graph -----------------------------------------------------------------------


def test_params_validation_and_graph():
    with pytest.raises(ValueError, match="even"):
        _params(neighbours=3)
    with pytest.raises(ValueError, match="1 <= t <= k"):
        _params(threshold=5)
    with pytest.raises(ValueError, match="k/2"):
        _params(threshold=2, active=True)  # a lying server could collect both secrets with t <= k/2
    params = _params()
    g = params.graph
    assert all(len(nbrs) == K and i not in nbrs for i, nbrs in enumerate(g))
    assert all(i in g[j] for i, nbrs in enumerate(g) for j in nbrs)  # symmetric
    assert g == _params().graph and g != _params(session=b"another round").graph
    # The ring order follows the graph seed when one is given, not the session id.
    assert _params(graph_seed=b"r1").graph == _params(session=b"other", graph_seed=b"r1").graph


# --- crypto primitives --------------------------------------------------------------------------


def test_key_agreement_and_prg():
    a, b = crypto.generate_keypair(), crypto.generate_keypair()
    kab = crypto.agree(a.private, b.public, info=crypto.INFO_MASK, salt=b"r1")
    assert kab == crypto.agree(b.private, a.public, info=crypto.INFO_MASK, salt=b"r1")
    assert kab != crypto.agree(a.private, b.public, info=crypto.INFO_ENC, salt=b"r1")
    assert kab != crypto.agree(a.private, b.public, info=crypto.INFO_MASK, salt=b"r2")
    m1 = crypto.prg_mask(kab, 100_000, 20)
    assert m1.dtype == np.uint32 and m1.max() < 2**20 and m1.shape == (100_000,)
    np.testing.assert_array_equal(m1, crypto.prg_mask(kab, 100_000, 20))
    assert not np.array_equal(m1, crypto.prg_mask(kab, 100_000, 20, crypto.NONCE_SELF_MASK))
    assert crypto.prg_mask(kab, 10, 64).dtype == np.uint64
    # add_mask (the devices' and the server's in-place form) adds the same words, reduced mod 2^m later.
    for m, n in ((20, 100_000), (32, 1_001), (64, 777)):
        start = np.arange(n, dtype=crypto.mask_dtype(m))
        y, z = start.copy(), start.copy()
        crypto.add_mask(y, kab, crypto.NONCE_SELF_MASK)
        crypto.add_mask(z, kab, crypto.NONCE_SELF_MASK, subtract=True)
        reduce = np.uint64((1 << m) - 1) if m < 64 else np.uint64(2**64 - 1)
        mask = crypto.prg_mask(kab, n, m, crypto.NONCE_SELF_MASK).astype(np.uint64)
        np.testing.assert_array_equal(y.astype(np.uint64) & reduce, (start.astype(np.uint64) + mask) & reduce)
        np.testing.assert_array_equal(z.astype(np.uint64) & reduce, (start.astype(np.uint64) - mask) & reduce)
    with pytest.raises(ValueError, match="uint32/uint64"):
        crypto.add_mask(np.zeros(4, dtype=np.int64), kab)
    ct = crypto.encrypt_share(kab, b"payload", sender=1, receiver=2, session_id=b"r1")
    assert crypto.decrypt_share(kab, ct, sender=1, receiver=2, session_id=b"r1") == b"payload"
    with pytest.raises(crypto.TamperedShare):
        crypto.decrypt_share(kab, ct, sender=1, receiver=3, session_id=b"r1")
    with pytest.raises(crypto.TamperedShare):
        crypto.decrypt_share(kab, ct, sender=1, receiver=2, session_id=b"r2")


def test_prg_is_aes128_ctr_of_the_seed_from_its_use_case_counter_block():
    """Known answer, computed independently: AES-128 (ECB, one block at a time) of the counter
    blocks label || 0, label || 1, ..., keyed with the seed's first 16 bytes, read as little-endian
    words. A PRG keyed with other bytes, another counter layout or byte order fails this."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(32))
    for nonce, label in ((crypto.NONCE_PAIR_MASK, b"secagg-pair!"), (crypto.NONCE_SELF_MASK, b"secagg-self!")):
        ecb = Cipher(algorithms.AES(seed[:16]), modes.ECB()).encryptor()
        blocks = b"".join(ecb.update(label + i.to_bytes(4, "big")) for i in range(40))
        expected32 = np.frombuffer(blocks, dtype="<u4")[:157]
        np.testing.assert_array_equal(crypto.prg_mask(seed, 157, 32, nonce), expected32)
        expected64 = np.frombuffer(blocks, dtype="<u8")[:77]
        np.testing.assert_array_equal(crypto.prg_mask(seed, 77, 64, nonce), expected64)
        np.testing.assert_array_equal(crypto.prg_mask(seed, 157, 20, nonce), expected32 & np.uint32(2**20 - 1))
    # The key is the seed's first half (128 bits, the level of the X25519 agreement it came from).
    np.testing.assert_array_equal(crypto.prg_mask(seed, 50, 32), crypto.prg_mask(seed[:16] + bytes(16), 50, 32))


# --- Shamir -------------------------------------------------------------------------------------


def test_shamir_any_t_reconstruct_and_t_minus_1_do_not():
    secret = os.urandom(32)
    ids = [0, 3, 4, 7, 8, 11]
    t = 4
    shares = shamir.share(secret, t, ids)
    for subset in itertools.combinations(ids, t):
        assert shamir.reconstruct({i: shares[i] for i in subset}, t) == secret
    assert shamir.reconstruct(shares, t) == secret  # more than t is fine
    for subset in itertools.combinations(ids, t - 1):
        part = {i: shares[i] for i in subset}
        with pytest.raises(shamir.NotEnoughShares):
            shamir.reconstruct(part, t)
        try:
            assert shamir.reconstruct(part, t - 1) != secret
        except shamir.ShamirError:
            pass  # the interpolated value does not even fit 32 bytes: also not the secret
    for secret in (b"", b"x", os.urandom(15), os.urandom(16), os.urandom(45)):
        sh = shamir.share(secret, 2, [1, 2, 3])
        assert shamir.reconstruct({1: sh[1], 3: sh[3]}, 2) == secret
    # Cohort-sized ids and thresholds (positions up to 10^6, t up to 40: integer Horner, batch inversion).
    rng = np.random.default_rng(7)
    for t in (1, 2, 36, 40):
        ids = sorted(int(i) for i in rng.choice(10**6, size=t + 3, replace=False))
        secret = os.urandom(32)
        shares = shamir.share(secret, t, ids)
        assert shamir.reconstruct({i: shares[i] for i in ids[3:]}, t) == secret
        assert shamir.reconstruct({i: shares[i] for i in ids[:t]}, t) == secret


def test_shamir_shares_are_the_polynomials_evaluated_exactly(monkeypatch: pytest.MonkeyPatch):
    """The int64 matrix product (coefficients split in 16-bit halves) against Python integers:
    an overflow or a missed reduction would give wrong shares that still decode. Also: the
    coefficient draw rejects 2^31 - 1 (the only 31-bit value outside the field), and
    share_many draws independent polynomials per secret (one draw, the secrets' chunks side by
    side), with the parties' powers from its table (ids below 1,000) or computed directly (ids
    up to 10^6)."""
    p = shamir.PRIME
    rng = np.random.default_rng(11)
    for t, n_ids, id_range in ((1, 3, 10**6), (2, 5, 10**6), (36, 40, 10**6), (40, 45, 10**6), (36, 40, 1000), (3, 5, 1000)):
        ids = sorted(int(i) for i in rng.choice(id_range, size=n_ids, replace=False))
        secrets = [os.urandom(32), os.urandom(7)]
        drawn: list[np.ndarray] = []
        real = shamir._random_elements
        monkeypatch.setattr(shamir, "_random_elements", lambda count: drawn.append(real(count)) or drawn[-1])
        shares = shamir.share_many(secrets, t, ids)
        monkeypatch.undo()
        assert len(drawn) == 1
        widths = [len(range(0, len(secret), 3)) for secret in secrets]
        draw = drawn[0].reshape(t - 1, sum(widths))
        for n, (secret, got) in enumerate(zip(secrets, shares, strict=True)):
            chunks = [int.from_bytes(secret[k : k + 3], "big") for k in range(0, len(secret), 3)]
            start = sum(widths[:n])
            coeffs = [chunks] + draw[:, start : start + len(chunks)].tolist()
            for i in ids:
                want = [sum(coeffs[k][c] * (i + 1) ** k for k in range(t)) % p for c in range(len(chunks))]
                assert got[i] == len(secret).to_bytes(2, "big") + b"".join(v.to_bytes(4, "big") for v in want)
            assert shamir.reconstruct(got, t) == secret
        if t > 1:  # the two secrets' polynomials are not the same
            assert not np.array_equal(draw[:, 0], draw[:, widths[0]])
    # Inner sizes above one reduction block (a complete graph of 40,000 devices has t up to that).
    a = rng.integers(0, p, (3, 40_000), dtype=np.int64)
    b = rng.integers(0, p, (40_000, 2), dtype=np.int64)
    want = [[sum(int(x) * int(y) for x, y in zip(a[i], b[:, j], strict=True)) % p for j in range(2)] for i in range(3)]
    assert shamir._mod_matmul(a, b).tolist() == want
    # The float64 path at its limit (64 terms), with every entry at its largest (p - 1 and
    # 16-bit halves of all ones): the sums reach 64 (2^31 - 2)(2^16 - 1) < 2^53, and one more
    # term goes through int64.
    for inner in (1, 63, 64, 65):
        a = np.full((2, inner), p - 1, dtype=np.int64)
        b = np.full((inner, 3), p - 1, dtype=np.int64)
        b[:, 1] = rng.integers(0, p, inner)
        b[:, 2] = 0x7FFEFFFF  # (a low half of all ones)
        want = [[sum(int(x) * int(y) for x, y in zip(a[i], b[:, j], strict=True)) % p for j in range(3)] for i in range(2)]
        assert shamir._mod_matmul(a, b).tolist() == want
    # 31-bit draws (little-endian words >> 1): 2^31 - 1 and 1, then the rejected one again as 5.
    blocks = iter([b"\xff\xff\xff\xff\x02\x00\x00\x00", b"\x0a\x00\x00\x00"])
    monkeypatch.setattr(shamir.os, "urandom", lambda n: next(blocks))
    assert shamir._random_elements(2).tolist() == [5, 1]


def test_lagrange_weights_equal_the_term_by_term_formula():
    p = shamir.PRIME
    rng = np.random.default_rng(3)
    for size in (1, 2, 5, 36):
        xs = tuple(sorted(int(x) + 1 for x in rng.choice(10**6, size=size, replace=False)))
        expected = []
        for j, xj in enumerate(xs):
            num = den = 1
            for m, xm in enumerate(xs):
                if m != j:
                    num, den = num * xm % p, den * (xm - xj) % p
            expected.append(num * pow(den, -1, p) % p)
        assert shamir._lagrange_at_zero(xs) == tuple(expected)
        assert sum(shamir._lagrange_at_zero(xs)) % p == 1  # the basis interpolates the constant 1
    # The batched weights (the server rebuilds one secret per device in one call): the same.
    rows = [sorted(int(x) + 1 for x in rng.choice(p - 1, size=36, replace=False)) for _ in range(5)]
    got = shamir._lagrange_rows(np.array(rows, dtype=np.int64))
    assert [tuple(r) for r in got.tolist()] == [shamir._lagrange_at_zero(tuple(r)) for r in rows]


def test_batched_reconstruction_gives_each_secret_or_the_error_of_one_by_one():
    """reconstruct_many (the server's unmask) against reconstruct, secret by secret: right
    secrets from any t of the shares, and the same error where one-by-one raises (too few
    shares, a tampered share, a malformed share, secrets of other lengths, an empty secret)."""
    rng = np.random.default_rng(5)
    t, ids = 4, list(range(7))
    secrets = [os.urandom(32) for _ in range(6)] + [os.urandom(5), b""]
    held = []
    for secret in secrets:
        shares = shamir.share(secret, t, ids)
        held.append({i: shares[i] for i in sorted(int(x) for x in rng.choice(ids, size=5, replace=False))})
    held[1] = dict(list(held[1].items())[: t - 1])  # too few
    first = min(held[2])
    held[2][first] = held[2][first][:-1] + bytes([held[2][first][-1] ^ 1])  # a wrong value
    held[3][min(held[3])] = b"\x00\x20" + b"\xff" * 44  # an element >= PRIME
    held[4][min(held[4])] = shamir.share(os.urandom(31), t, ids)[min(held[4])]  # another secret length
    got = shamir.reconstruct_many(held, t)
    for pos, (shares, secret) in enumerate(zip(held, secrets, strict=True)):
        try:
            want: object = shamir.reconstruct(shares, t)
        except shamir.ShamirError as err:
            want = err
        if isinstance(want, shamir.ShamirError):
            assert type(got[pos]) is type(want) and str(got[pos]) == str(want), pos
        else:
            assert got[pos] == want and (pos == 2 or want == secret), pos
    # (A changed share value goes unnoticed when the rebuilt chunks still fit: Shamir has no integrity.)
    assert [type(g).__name__ for g in (got[1], got[3], got[4])] == ["NotEnoughShares", "ShamirError", "ShamirError"]
    assert got[0] == secrets[0] and got[5:] == secrets[5:]
    # Two shares of the right total size but wrong sizes each (42 + 50 bytes): malformed, both ways.
    sh4 = shamir.share(secrets[0], 2, [0, 1, 2])
    split = {0: sh4[0][:42], 1: sh4[0][42:] + sh4[1]}
    assert type(shamir.reconstruct_many([split], 2)[0]) is shamir.ShamirError
    with pytest.raises(shamir.ShamirError):
        shamir.reconstruct(split, 2)
    # A large t (a complete graph): the weights of each distinct holder set are computed once, in blocks.
    big_t, big_ids = 300, list(range(320))
    big = [os.urandom(32) for _ in range(40)]
    held_big = [{i: s[i] for i in big_ids if i != k} for k, s in enumerate(shamir.share_many(big, big_t, big_ids))]
    assert shamir.reconstruct_many(held_big, big_t) == big
    # Ids outside [0, PRIME - 2] (x = id + 1 would be 0 or outside the field): refused, both ways.
    sh = shamir.share(secrets[0], 2, [0, 1, 2])
    for bad_id in (-1, shamir.PRIME - 1, 2.5, False):
        bad = {bad_id: sh[0], 1: sh[1]}
        with pytest.raises(shamir.ShamirError, match="share ids must be integers"):
            shamir.reconstruct(bad, 2)
        assert "share ids must be integers" in str(shamir.reconstruct_many([bad], 2)[0])
    numpy_ids = {np.int64(0): sh[0], np.int64(2): sh[2]}  # numpy integers are ids too (exact Lagrange products)
    assert shamir.reconstruct(numpy_ids, 2) == shamir.reconstruct_many([numpy_ids], 2)[0] == secrets[0]
    # The well-formedness of a reply's shares, checked as one array.
    good = list(shamir.share(os.urandom(32), 2, [0, 1, 2]).values())
    assert shamir.all_well_formed(good, 32) and shamir.all_well_formed([], 32)
    for bad in (good[0][:-1], b"\x00\x21" + good[0][2:], good[0][:2] + b"\xff" * 44):
        assert shamir.all_well_formed([good[1], bad], 32) is shamir.is_well_formed(bad, 32) is False


# --- quantization -------------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased():
    fp = FixedPoint(clip=1.0, bits=4, modulus_bits=16)
    rng = np.random.default_rng(0)
    draws = 200_000
    for value in (-0.93, -0.1, 0.0, 0.3337, 0.71):
        decoded = fp.decode(fp.encode(np.full(draws, value), rng))
        # each rounding error lies within one step, so its sd is <= step/2
        assert abs(decoded.mean() - value) < 5 * (fp.step / 2) / np.sqrt(draws)
    clipped = fp.decode(fp.encode(np.array([5.0, -5.0]), rng))
    np.testing.assert_allclose(clipped, [1.0, -1.0])


def test_to_ring_reduces_any_integer_dtype():
    for dtype in (np.int8, np.int32, np.int64, np.uint16, np.uint64):
        values = np.array([0, 1, 5, -1 if np.issubdtype(dtype, np.signedinteger) else 7], dtype=dtype)
        for m in (3, 20, 32, 40, 64):
            got = to_ring(values, m)
            assert got.dtype == (np.uint32 if m <= 32 else np.uint64)
            assert got.tolist() == [int(v) % 2**m for v in values.tolist()]
    with pytest.raises(ValueError, match="integers"):
        to_ring(np.array([1.5]), 20)


def test_modulus_overflow_checks():
    assert required_modulus_bits(16, 100) == 23  # 2 * 100 * 32767 < 2^23
    assert required_modulus_bits(2, 1) == 2  # {-1, 0, 1}
    with pytest.raises(ValueError, match=r"bits must be in \[2, 52\]"):
        required_modulus_bits(1, 1)
    with pytest.raises(ValueError, match=r"65-bit.*2147483648 devices x 34-bit"):
        required_modulus_bits(34, 2**31)
    with pytest.raises(ValueError, match=r"modulus_bits=20 is too small.*100 devices x 16-bit.*at least 23"):
        check_modulus_bits(20, 16, 100)
    with pytest.raises(ValueError, match="too small"):
        FixedPoint.for_sum(clip=1.0, bits=16, n_devices=100, modulus_bits=22)
    assert FixedPoint.for_sum(clip=1.0, bits=16, n_devices=100, noise_bound=2**22).modulus_bits == 24
    with pytest.raises(ValueError, match="non-finite"):
        FixedPoint(1.0, 8, 16).encode(np.array([np.nan]), np.random.default_rng(0))


def test_decode_of_summed_encodings():
    n, d = 10, 500
    fp = FixedPoint.for_sum(clip=0.5, bits=8, n_devices=n)
    rng = np.random.default_rng(1)
    xs = rng.uniform(-0.5, 0.5, (n, d))
    total = sum(fp.encode(x, rng).astype(np.uint64) for x in xs) % np.uint64(2**fp.modulus_bits)
    assert np.abs(fp.decode_sum(total) - xs.sum(0)).max() <= n * fp.step


def test_decode_with_noise_that_wraps_below_zero():
    n, d, mu = 5, 2000, 40.0
    rng = np.random.default_rng(2)
    bound = skellam_tail_bound(n * mu, 1e-6, dimension=d)
    fp = FixedPoint.for_sum(clip=1.0, bits=6, n_devices=n, noise_bound=bound)
    xs = np.full((n, d), -1.0)  # grid index -L: negative noise goes further below zero, mod 2^m
    noises = [skellam(mu, d, rng) for _ in range(n)]
    total = sum(fp.encode(x, rng, z).astype(np.uint64) for x, z in zip(xs, noises)) % np.uint64(2**fp.modulus_bits)
    decoded = fp.decode_sum(total)
    np.testing.assert_allclose(decoded, -n + sum(noises) * fp.step, atol=1e-9)


def test_secure_sum_of_quantized_noisy_updates_end_to_end():
    n, d = 10, 300
    rng = np.random.default_rng(3)
    mu_dev = per_device_variance(100.0, n)
    bound = skellam_tail_bound(realized_total_variance(mu_dev, n), 1e-6, dimension=d)
    fp = FixedPoint.for_sum(clip=0.1, bits=10, n_devices=n, noise_bound=bound)
    xs = rng.normal(0, 0.05, (n, d))
    noises = [skellam(mu_dev, d, rng) for _ in range(n)]
    inputs = {i: fp.encode(xs[i], rng, noises[i]) for i in range(n)}
    params = _params(vector_length=d, modulus_bits=fp.modulus_bits)
    result = simulate_round(params, inputs)
    decoded = fp.decode_sum(result.aggregate)
    noise = sum(noises) * fp.step
    assert np.abs(decoded - noise - np.clip(xs, -0.1, 0.1).sum(0)).max() <= n * fp.step


# --- Skellam ------------------------------------------------------------------------------------


def test_skellam_variance_and_sum_over_devices():
    rng = np.random.default_rng(4)
    z = skellam(50.0, 200_000, rng)
    assert z.dtype == np.int64
    assert abs(z.mean()) < 0.1 and abs(z.var() / 50.0 - 1) < 0.03
    n_expected, target = 10, 100.0
    mu_dev = per_device_variance(target, n_expected)
    assert mu_dev == 10.0
    total = sum(skellam(mu_dev, 100_000, rng) for _ in range(n_expected))
    assert abs(total.var() / target - 1) < 0.03
    survivors = 7
    assert realized_total_variance(mu_dev, survivors) == 70.0
    partial = sum(skellam(mu_dev, 100_000, rng) for _ in range(survivors))
    assert abs(partial.var() / 70.0 - 1) < 0.03
    assert grid_variance(0.5, 0.01) == pytest.approx(2500.0)
    bound = skellam_tail_bound(70.0, 1e-3, dimension=partial.size)
    assert np.abs(partial).max() <= bound < 100  # ~ 5.6 standard deviations
    assert skellam(0.0, 3, rng).tolist() == [0, 0, 0]


def test_conditional_rounding_keeps_every_device_within_the_norm_bound():
    from fedsim.privacy.skellam import rounded_norm_bound

    fp = FixedPoint(clip=1.0, bits=4, modulus_bits=16)  # L = 7: a coarse grid, large rounding growth
    rng = np.random.default_rng(5)
    d = 400
    x = rng.normal(size=d)
    x *= 1.0 / np.linalg.norm(x)  # ||x|| = C = the clip range
    c = 1.0 / fp.step
    bound = rounded_norm_bound(c, d)
    plain = [np.linalg.norm(fp.encode_int(x, rng)) for _ in range(300)]
    conditional = [np.linalg.norm(fp.encode_int(x, rng, max_norm=bound)) for _ in range(300)]
    assert max(conditional) <= bound
    assert max(plain) > c  # unconditioned rounding does grow the norm past C / step
    # still unbiased enough to be useful: the mean of the rounded vectors is near x
    mean = np.mean([fp.decode(fp.encode_int(x, rng, max_norm=bound)) for _ in range(2000)], axis=0)
    assert np.abs(mean - x).max() < 0.05


def test_a_device_drops_for_its_data_at_encoding_with_negligible_probability_only():
    # Under SecAgg+ a device whose update fails conditional rounding MAX_ROUNDING_DRAWS times
    # drops: a data-dependent dropout. Kairouz, Liu, Steinke 2021 (Thm. 1) bound each draw's
    # failure by beta for every vector within the clip norm; checked here, independently, on the
    # worst case for rounding (every coordinate halfway between grid points) and a random
    # direction, so the dropout has probability <= beta^MAX_ROUNDING_DRAWS (the claim summary.json makes).
    from fedsim.privacy.skellam import ROUNDING_BETA, rounded_norm_bound
    from fedsim.secagg.quantize import MAX_ROUNDING_DRAWS

    fp = FixedPoint(clip=1.0, bits=4, modulus_bits=16)
    rng = np.random.default_rng(11)
    d = 400
    halfway = np.full(d, 0.5 * fp.step)  # u = 0.5 on every coordinate: the largest rounding variance
    direction = rng.normal(size=d)
    direction *= np.linalg.norm(halfway) / np.linalg.norm(direction)
    for x in (halfway, direction):
        c = float(np.linalg.norm(x)) / fp.step
        limit = rounded_norm_bound(c, d) ** 2
        draws = 4000
        failed = sum(float(np.sum(fp.encode_int(x, rng).astype(np.float64) ** 2)) > limit for _ in range(draws))
        assert failed / draws <= ROUNDING_BETA  # per draw: <= beta (here far below: ~2%)
        fp.encode_int(x, rng, max_norm=math.sqrt(limit))  # and the conditional draw succeeds
    assert MAX_ROUNDING_DRAWS * math.log(1 / ROUNDING_BETA) >= 100  # beta^draws <= e^-100


def test_k_and_t_for_30_percent_dropout_keep_rounds_alive_where_the_old_rule_aborts():
    from fedsim.secagg.params import ThreatModel, choose_params

    n, rounds = 30, 6
    choice = choose_params(n, ThreatModel("semi_honest", 0.1, dropout_rate=0.3))
    assert choice.log2_abort <= -20

    def aborts(k: int, t: int) -> int:
        count = 0
        for r in range(rounds):
            rng = np.random.default_rng(r)
            dropped = [i for i in range(n) if rng.random() < 0.3]
            params = SecAggParams(n, t, k, 16, 2, session_id=b"s", graph_seed=f"round-{r}".encode())
            try:
                simulate_round(params, {i: np.arange(2) for i in range(n)}, drop_before={"masked_input": dropped})
            except SecAggAborted:
                count += 1
        return count

    assert aborts(choice.neighbours, choice.threshold) == 0
    assert aborts(10, 6) >= 2  # fedsim's old rule at cohort 30: k = 2 ceil(log2 30), t = k/2 + 1


def _encode_int_reference(fp: FixedPoint, x: np.ndarray, rng: np.random.Generator, max_norm: float | None = None) -> np.ndarray:
    """encode_int written with fresh arrays and Python integers where it can (the formulas of
    the quantize module's docstring). Words: AES-128-CTR (zero nonce) under the generator's next
    two 64-bit outputs as the key, continued from draw to draw."""
    key = b"".join(int(w).to_bytes(8, "little") for w in rng.bit_generator.random_raw(2))
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    flat = np.array(x, dtype=np.float64).ravel()
    if fp.bits <= quantize.FIXED_POINT_MAX_BITS:
        # s = x L 2^32 / r on the grid's ends, v = s to the nearest integer (half to even, as
        # Python's round), round up iff k < v mod 2^32.
        bound = fp.levels * 2**32
        v = np.array([round(min(max(float(s), -bound), bound)) for s in flat * (float(bound) / fp.clip)], dtype=np.int64)
    else:  # u = x / step on [-L, L]; round up iff (k + 1/2) / 2^32 < u - floor(u)
        u = np.clip(flat / fp.step, -fp.levels, fp.levels)
    for _ in range(200):
        k = np.frombuffer(stream.update(bytes(4 * flat.size)), dtype="<u4")
        if fp.bits <= quantize.FIXED_POINT_MAX_BITS:
            q = (v >> 32) + (k.astype(np.int64) < (v & 0xFFFFFFFF))
        else:
            lo = np.floor(u)
            q = (lo + ((k.astype(np.float64) + 0.5) / 2**32 < u - lo)).astype(np.int64)
        if max_norm is None or int(np.dot(q, q)) <= math.floor(max_norm * max_norm):
            return q.reshape(np.shape(x))
    raise AssertionError("no draw")


def test_encode_int_reuses_its_buffers_without_changing_a_bit() -> None:
    """encode_int works in per-thread buffers kept between calls: interleaved lengths, float32 and
    float64 inputs, 2-D input, conditional redraws and other threads give the reference's bits."""
    import threading

    cases = []
    for n, dtype, clip, bits in ((20_000, np.float32, 0.05, 16), (7, np.float64, 1.0, 8), (20_001, np.float64, 0.02, 12),
                                 (5_000, np.float64, 0.3, 20), (20_000, np.float32, 0.05, 24)):  # fmt: skip
        fp = FixedPoint(clip, bits, 32)
        x = (np.random.default_rng(n).standard_normal(n) * clip).astype(dtype)
        u = np.clip(x.astype(np.float64), -clip, clip) / fp.step
        frac = u - np.floor(u)
        median_norm = math.sqrt(float(np.sum(np.floor(u) ** 2 + frac * (2 * np.floor(u) + 1))))  # E||q||^2
        cases += [(fp, x, None), (fp, x, median_norm)]  # the second redraws about half the time
    results: dict[int, list[np.ndarray]] = {}

    def run(key: int) -> None:
        results[key] = [fp.encode_int(x, np.random.default_rng(i), m) for i, (fp, x, m) in enumerate(cases)]

    run(0)
    threads = [threading.Thread(target=run, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in (0, 1, 2):
        for i, ((fp, x, m), got) in enumerate(zip(cases, results[key], strict=True)):
            want = _encode_int_reference(fp, x, np.random.default_rng(i), m)
            assert got.dtype == np.int64 and np.array_equal(got, want)
    fp, x, _ = cases[0]
    assert np.array_equal(fp.encode_int(x.reshape(2, -1), np.random.default_rng(0)).ravel(), results[0][0])
    out = np.full(x.size, 7, dtype=np.int64)
    assert fp.encode_int(x, np.random.default_rng(0), out=out) is not None and np.array_equal(out, results[0][0])
    with pytest.raises(ValueError, match="C-contiguous int64"):
        fp.encode_int(x, np.random.default_rng(0), out=np.zeros(x.size, dtype=np.int32))


def test_rounding_draws_give_each_fraction_its_probability_to_2_33(monkeypatch: pytest.MonkeyPatch) -> None:
    """P(round up) = frac rounded to a multiple of 2^-32 (module docstring): 32-bit draws k at
    (k + 1/2) / 2^32. With known words (the draws k = 0, 1, ..., 2^32 - 1 seen through 8 evenly
    spaced ones), each fraction rounds up for exactly the k below it; values beyond the range
    land on its ends. The words themselves: the AES-128-CTR keystream under the stream's key."""
    ks = np.array([j << 29 for j in range(8)], dtype=np.uint32)  # draws at (k + 1/2) / 2^32 = j/8 + 2^-33
    real = quantize.rounding_stream
    monkeypatch.setattr(quantize, "rounding_stream", lambda rng: lambda size: ks[:size])
    # Step 1 (x = 3 + f has grid value 3 + f exactly): the fixed-point path (4 bits) and the
    # float path (24 bits). fraction -> how many of the 8 draws lie below it (round up); at
    # 2^-33 exactly (a tie between two multiples of 2^-32) the paths may differ, 2^-33 apart.
    for fp in (FixedPoint(clip=7.0, bits=4, modulus_bits=16), FixedPoint(clip=float(2**23 - 1), bits=24, modulus_bits=32)):
        for f, ups in ((0.0, 0), (2.0**-34, 0), (2.0**-33 + 2.0**-40, 1), (0.125, 1), (0.125 + 2.0**-32, 2),
                       (0.5, 4), (0.999, 8), (1 - 2.0**-34, 8)):  # fmt: skip
            got = fp.encode_int(np.full(8, 3 + f), np.random.default_rng(0))
            assert got.tolist() == [4] * ups + [3] * (8 - ups), (fp.bits, f)
        top = fp.levels
        big = fp.encode_int(np.array([top + 0.5, 1e30, -top - 1e-7, -1e30]), np.random.default_rng(0))
        assert big.tolist() == [top, top, -top, -top]
    # A clip so small that L 2^32 / clip overflows: the float path, not NaNs read as integers.
    tiny = FixedPoint(clip=1e-300, bits=16, modulus_bits=64)
    got = tiny.encode_int(np.array([0.0, -0.0, 1e-300, -1e-300 / 2, 1.0]), np.random.default_rng(0), max_norm=1e6)
    half = tiny.levels / 2  # -1e-300 / 2 is -half grid steps: rounds to one of its two neighbours
    assert got[[0, 1, 2, 4]].tolist() == [0, 0, tiny.levels, tiny.levels] and got[3] in (math.floor(-half), math.ceil(-half))
    monkeypatch.undo()
    rng = np.random.Generator(np.random.Philox(3))
    key = b"".join(int(w).to_bytes(8, "little") for w in np.random.Generator(np.random.Philox(3)).bit_generator.random_raw(2))
    words = real(rng)
    first, second = words(5).copy(), words(3).copy()  # a redraw continues the keystream
    stream = np.frombuffer(Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(32)), dtype="<u4")
    assert first.tolist() == stream[:5].tolist() and second.tolist() == stream[5:8].tolist()
