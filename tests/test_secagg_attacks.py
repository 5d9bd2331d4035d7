"""Attacks on SecAgg+ over the real protocol objects: what a server colluding with devices learns.

1. A server that lies about dropouts (Bonawitz et al. 2017 sec. 6.2): it tells some honest
   neighbours of a target "it survived" (they reveal b-shares) and the others "it dropped"
   (they reveal s-shares), and c colluding neighbours hand over the target's shares. With
   t = floor(k/2) + 1 (fedsim's old rule) it rebuilds both secrets and the target's exact input;
   with the active threat model's t (2t > k + c, params.py) or the consistency check it cannot.
2. An honest-but-curious server with a gamma fraction of colluding devices (Bell et al. 2020
   sec. 3): an honest device is exposed when its colluding neighbours alone hold t shares of
   both its secrets, or when none of its neighbours is honest (nothing masks it). Counted on
   random graphs for the old parameters and the threat model's, and confirmed on one instance
   by actually recovering the input.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedsim.secagg import crypto, shamir
from fedsim.secagg.params import ThreatModel, choose_params
from fedsim.secagg.crypto import INFO_MASK, NONCE_PAIR_MASK, NONCE_SELF_MASK
from fedsim.secagg.protocol import (
    KeyRegistry,
    ProtocolViolation,
    SecAggAborted,
    SecAggDevice,
    SecAggParams,
    SecAggServer,
    survivors_message,
    neighbour_graph,
    simulate_round,
)

L, M = 8, 24
GAMMA = 1 / 3


def _params(n: int, k: int, t: int, *, active: bool, seed: bytes = b"attack") -> SecAggParams:
    return SecAggParams(n, t, k, M, L, session_id=b"session-" + seed, graph_seed=seed, active=active)


class Round:
    """One session run honestly through masked input, with every device object at hand
    (the colluders' are the adversary's: it reads their held shares and signs with their keys)."""

    def __init__(self, params: SecAggParams, seed: int = 0) -> None:
        self.params = params
        n = params.num_devices
        rng = np.random.default_rng(seed)
        self.inputs = {i: rng.integers(0, 2**M, L) for i in range(n)}
        self.identities = {i: crypto.generate_identity() for i in range(n)}
        registry = KeyRegistry()
        for i, key in self.identities.items():
            registry.register(params.session_id, i, i, crypto.identity_public(key))
        self.registry = registry.lookup(params.session_id)
        kw = {"registry": self.registry} if params.active else {}
        self.devices = {
            i: SecAggDevice(i, params, identity=self.identities[i] if params.active else None, **kw) for i in range(n)
        }
        self.server = SecAggServer(params, **kw)
        req2 = self.server.collect_keys({i: d.advertise_keys() for i, d in self.devices.items()})
        req3 = self.server.collect_shares({i: self.devices[i].share_keys(r) for i, r in req2.items()})
        self.masked = {i: self.devices[i].masked_input(r, self.inputs[i]) for i, r in req3.items()}
        self.server.collect_masked(self.masked)
        self.senders = {i: list(r["ids"]) for i, r in req3.items()}
        self._saved = {i: d.export_state() for i, d in self.devices.items()}

    def reset_devices(self) -> None:
        """Every device back to just after masked input (each answers unmask only once)."""
        kw = {"registry": self.registry} if self.params.active else {}
        self.devices = {
            i: SecAggDevice.restore(self.params, blob, identity=self.identities[i] if self.params.active else None, **kw)
            for i, blob in self._saved.items()
        }

    def recover(self, target: int, b_shares: dict[int, bytes], s_shares: dict[int, bytes]) -> np.ndarray | None:
        """The target's input from t shares of each secret, or None if either has fewer than t."""
        t, sid = self.params.threshold, self.params.session_id
        try:
            b = shamir.reconstruct(b_shares, t)
            s = crypto.private_from_bytes(shamir.reconstruct(s_shares, t))
        except shamir.NotEnoughShares:
            return None
        y = self.masked[target]["masked"].astype(np.int64)
        y -= crypto.prg_mask(b, L, M, NONCE_SELF_MASK).astype(np.int64)
        for j in self.senders[target]:
            pk = self.server.public_keys[j][1]
            mask = crypto.prg_mask(crypto.agree(s.private, pk, info=INFO_MASK, salt=sid), L, M, NONCE_PAIR_MASK)
            y += -mask.astype(np.int64) if target < j else mask.astype(np.int64)
        return y % 2**M

    def lying_server_attack(self, target: int, colluders: set[int]) -> np.ndarray | None:
        """Split the target's honest neighbours: A hears "survived", B hears "dropped".

        A gets exactly enough members for the b-shares (t - c), B the rest: the split that
        maximizes the s-shares. Active: the consistency check runs with U3 shown to A and
        U3 minus the target shown to B; colluders sign whatever helps.
        """
        self.reset_devices()
        p, graph = self.params, self.params.graph
        nbrs = graph[target]
        honest = [j for j in nbrs if j not in colluders]
        cut = max(0, p.threshold - len(colluders & set(nbrs)))
        group_a, group_b = honest[:cut], honest[cut:]
        u3 = sorted(self.server.masked)
        u3_lie = [i for i in u3 if i != target]
        view = {j: u3 for j in u3} | {j: u3_lie for j in group_b}
        signatures: dict[int, dict[tuple, bytes]] = {}
        if p.active:
            for j in u3:
                if j in colluders:  # the adversary signs both sets with the colluders' keys
                    for s in (u3, u3_lie):
                        signatures.setdefault(j, {})[tuple(s)] = crypto.sign(
                            self.identities[j], survivors_message(p.session_id, s))
                else:
                    try:
                        sig = self.devices[j].consistency({"survivors": view[j]})["sig"]
                    except ProtocolViolation:
                        continue
                    signatures.setdefault(j, {})[tuple(view[j])] = sig
        b_shares = {c: self.devices[c]._held[target][1] for c in colluders & set(nbrs) if target in self.devices[c]._held}
        s_shares = {c: self.devices[c]._held[target][0] for c in colluders & set(nbrs) if target in self.devices[c]._held}
        for j in group_a + group_b:
            survivors = set(view[j])
            request = {
                "survivors": [i for i in graph[j] if i in survivors],
                "dropped": [i for i in graph[j] if i in self.server.masked and i not in survivors],
            }
            if p.active:
                signers = [i for i in graph[j] if tuple(view[j]) in signatures.get(i, {})]
                request |= {"signers": signers, "signatures": [signatures[i][tuple(view[j])] for i in signers]}
            try:
                reply = self.devices[j].unmask(request)
            except ProtocolViolation:
                continue  # an honest device that refuses reveals nothing
            b_shares.update({j: sh for i, sh in zip(reply["b_ids"], reply["b_shares"]) if i == target})
            s_shares.update({j: sh for i, sh in zip(reply["s_ids"], reply["s_shares"]) if i == target})
        return self.recover(target, b_shares, s_shares)


def _colluders_around(params: SecAggParams, target: int, c: int) -> set[int]:
    return set(params.graph[target][:c])


@pytest.mark.parametrize(("n", "k", "c"), [(100, 20, 2), (10, 9, 1)])
def test_lying_server_with_old_threshold_recovers_the_exact_input(n, k, c):
    # fedsim's old parameters: k = 20, t = 11 at cohort 100; the complete graph, t = 5, at 10.
    params = _params(n, k, k // 2 + 1, active=False)
    rnd = Round(params)
    target = 3
    recovered = rnd.lying_server_attack(target, _colluders_around(params, target, c))
    assert recovered is not None
    np.testing.assert_array_equal(recovered, rnd.inputs[target] % 2**M)


ACTIVE = ThreatModel("active", GAMMA, max_dropout_fraction=0.1)


def test_active_threat_model_parameters_stop_the_lying_server_for_up_to_gamma_k_colluders():
    choice = choose_params(100, ACTIVE)
    k, t = choice.neighbours, choice.threshold
    assert 2 * t > k + math.floor(GAMMA * k)
    target = 5
    for active in (False, True):  # the threshold alone already stops the split; the check too
        params = _params(100, k, t, active=active)
        rnd = Round(params, seed=1)
        most = math.floor(GAMMA * k)
        for c in sorted({0, most // 2, most - 1, most}):  # each attack replays the whole unmask stage
            assert rnd.lying_server_attack(target, _colluders_around(params, target, c)) is None, (active, c)
        # The same harness with the colluders' shares of both kinds counted as t: it would succeed.
        assert rnd.recover(target, *[{j: rnd.devices[j]._held[target][x] for j in params.graph[target][:t]}
                                     for x in (1, 0)]) is not None  # fmt: skip


def test_consistency_check_alone_stops_the_lying_server_with_the_old_threshold():
    params = _params(100, 20, 11, active=True)  # old k, t; active: signed keys + consistency check
    rnd = Round(params, seed=2)
    assert rnd.lying_server_attack(3, _colluders_around(params, 3, 2)) is None
    # The devices told "dropped" refused: they saw fewer than t signatures on their set.
    honest = [j for j in params.graph[3] if j not in _colluders_around(params, 3, 2)]
    refused = [j for j in honest if rnd.devices[j]._stage == -1]
    assert refused, "some honest neighbour must have refused to unmask"


def test_active_device_refuses_keys_the_server_swapped():
    params = _params(12, 4, 3, active=True)
    identities = {i: crypto.generate_identity() for i in range(12)}
    registry = KeyRegistry()
    for i, key in identities.items():
        registry.register(params.session_id, i, i, crypto.identity_public(key))
    view = registry.lookup(params.session_id)
    devices = {i: SecAggDevice(i, params, identity=identities[i], registry=view) for i in range(12)}
    server = SecAggServer(params, registry=view)
    req2 = server.collect_keys({i: d.advertise_keys() for i, d in devices.items()})
    # The server replaces neighbour j's keys with its own (it would then decrypt i's shares for j).
    swapped = dict(req2[0])
    mine = crypto.generate_keypair(), crypto.generate_keypair()
    swapped["c_pks"] = [mine[0].public] + list(swapped["c_pks"][1:])
    swapped["s_pks"] = [mine[1].public] + list(swapped["s_pks"][1:])
    with pytest.raises(ProtocolViolation, match="registered identity"):
        devices[0].share_keys(swapped)
    with pytest.raises(ValueError, match="already has another registered identity key"):
        registry.register(params.session_id, 0, 0, crypto.identity_public(crypto.generate_identity()))


# --- a server that shrinks the survivor set below max(t, n - D) ---------------------------------


def _small_survivor_set_attack(params: SecAggParams, floor_on_devices: int, small: list[int]):
    """The server shows every device the (validly signed, if the devices sign) survivor set
    `small`, |small| >= t, though everyone sent a masked input: a sum over fewer inputs than
    the threat model (and distributed noise sized for max(t, n - D)) allows. Returns the
    round and the shares it collected: {"b": {device: {holder: share}}, "s": ...}."""
    rnd = Round(params, seed=7)
    device_params = dataclasses.replace(params, min_survivors=floor_on_devices)
    devices = {
        i: SecAggDevice.restore(device_params, blob, identity=rnd.identities[i], registry=rnd.registry)
        for i, blob in rnd._saved.items()
    }
    sigs = {}
    for i in small:
        try:
            sigs[i] = devices[i].consistency({"survivors": small})["sig"]
        except ProtocolViolation:
            continue
    shares: dict[str, dict[int, dict[int, bytes]]] = {"b": {}, "s": {}}
    for i in small:
        nbrs = params.graph[i]
        signers = [j for j in nbrs if j in sigs]
        request = {
            "survivors": [j for j in nbrs if j in small], "dropped": [j for j in nbrs if j not in small],
            "signers": signers, "signatures": [sigs[j] for j in signers],
        }  # fmt: skip
        try:
            reply = devices[i].unmask(request)
        except ProtocolViolation:
            continue
        for kind in ("b", "s"):
            for j, share in zip(reply[f"{kind}_ids"], reply[f"{kind}_shares"]):
                shares[kind].setdefault(j, {})[i] = share
    return rnd, shares


def _sum_over(rnd: Round, small: list[int], shares: dict) -> np.ndarray | None:
    """The sum of the inputs in `small` from their masked vectors and the collected shares
    (None: a secret has fewer than t shares), computed here independently of SecAggServer."""
    p, sid = rnd.params, rnd.params.session_id
    total = np.zeros(L, dtype=np.int64)
    try:
        for i in small:
            b = shamir.reconstruct(shares["b"].get(i, {}), p.threshold)
            total += rnd.masked[i]["masked"].astype(np.int64) - crypto.prg_mask(b, L, M, NONCE_SELF_MASK).astype(np.int64)
        for j in (j for j in range(p.num_devices) if j not in small):
            key = crypto.private_from_bytes(shamir.reconstruct(shares["s"].get(j, {}), p.threshold))
            for i in (i for i in p.graph[j] if i in small):  # y_i holds sign(i, j) PRG(KA(s_i, s_j))
                mask = crypto.prg_mask(crypto.agree(key.private, rnd.server.public_keys[i][1], info=INFO_MASK, salt=sid),
                                       L, M, NONCE_PAIR_MASK).astype(np.int64)  # fmt: skip
                total += -mask if i < j else mask
    except shamir.NotEnoughShares:
        return None
    return total % 2**M


def test_active_devices_reveal_no_share_for_a_survivor_set_below_max_t_n_minus_d():
    # Complete graph over 12 devices, t = 7 (2t > k), D = 3 budgeted dropouts: a released sum
    # must hold max(t, n - D) = 9 inputs. The server claims only 8 survived (>= t, so t alone
    # does not stop it) although all 12 sent a masked input.
    n, k, t, dropouts = 12, 11, 7, 3
    floor = max(t, n - dropouts)
    params = _params(n, k, t, active=True)
    small = list(range(floor - 1))
    # The harness can fail: devices without the count check (floor t, Bonawitz's own) sign the
    # small set and reveal enough shares for the server to compute the sum of those 8 inputs.
    rnd, shares = _small_survivor_set_attack(params, 0, small)
    assert _sum_over(rnd, small, shares) is not None
    np.testing.assert_array_equal(_sum_over(rnd, small, shares), sum(rnd.inputs[i] for i in small) % 2**M)
    # Devices that compute the floor themselves refuse to sign it, so nothing is revealed.
    rnd, shares = _small_survivor_set_attack(params, floor, small)
    assert shares == {"b": {}, "s": {}} and _sum_over(rnd, small, shares) is None
    # And a device that somehow signed such a set still reveals nothing at unmask.
    honest = SecAggDevice.restore(params, rnd._saved[0], identity=rnd.identities[0], registry=rnd.registry)
    honest.consistency({"survivors": small})
    checked = SecAggDevice.restore(dataclasses.replace(params, min_survivors=floor), honest.export_state(),
                                   identity=rnd.identities[0], registry=rnd.registry)  # fmt: skip
    sigs = {j: SecAggDevice.restore(params, rnd._saved[j], identity=rnd.identities[j], registry=rnd.registry)
            .consistency({"survivors": small})["sig"] for j in small[1:]}  # fmt: skip
    request = {"survivors": small[1:], "dropped": list(range(floor - 1, n)), "signers": list(sigs),
               "signatures": list(sigs.values())}  # fmt: skip
    with pytest.raises(ProtocolViolation, match=r"fewer than max\(t, n - D\) = 9"):
        checked.unmask(request)
    # The honest server aborts before asking for any share; D dropouts still give a round.
    guarded = dataclasses.replace(params, min_survivors=floor)
    inputs = {i: np.full(L, i, dtype=np.int64) for i in range(n)}
    with pytest.raises(SecAggAborted, match=r"8 masked inputs received, need >= max\(t, n - D\) = 9"):
        simulate_round(guarded, inputs, drop_before={"masked_input": range(8, 12)})
    result = simulate_round(guarded, inputs, drop_before={"masked_input": range(9, 12)})
    assert result.aggregate.tolist() == [sum(range(9))] * L


# --- honest-but-curious server with colluding devices -------------------------------------------


def _exposed(n: int, k: int, t: int, corrupt: set[int], dropped: set[int], seed: bytes) -> list[int]:
    """Honest survivors whose input the colluders can compute: >= t corrupt neighbours (both
    secrets rebuilt from the colluders' shares) or no honest surviving neighbour."""
    graph = neighbour_graph(n, k, seed)
    out = []
    for i in range(n):
        if i in corrupt or i in dropped:
            continue
        bad = sum(1 for j in graph[i] if j in corrupt)
        good = sum(1 for j in graph[i] if j not in corrupt and j not in dropped)
        if bad >= t or good == 0:
            out.append(i)
    return out


def _mean_exposed(n: int, k: int, t: int, trials: int, dropout: float = 0.0) -> float:
    rng = np.random.default_rng(0)
    total = 0
    for trial in range(trials):
        corrupt = set(rng.choice(n, math.floor(GAMMA * n), replace=False).tolist())
        dropped = {int(i) for i in np.flatnonzero(rng.random(n) < dropout)}
        total += len(_exposed(n, k, t, corrupt, dropped, f"trial-{trial}".encode()))
    return total / trials


def test_honest_devices_exposed_to_a_curious_server_with_a_third_colluding():
    # Old parameters, cohort 100: k = 20, t = 11 -> about 1.6 honest devices exposed per round.
    old = _mean_exposed(100, 20, 11, trials=400)
    assert 1.0 < old < 2.5, old
    # The threat model's parameters (semi-honest, gamma = 1/3, up to 10% dropouts): none.
    choice = choose_params(100, ThreatModel("semi_honest", GAMMA, max_dropout_fraction=0.1))
    assert choice.log2_insecure <= -40
    assert _mean_exposed(100, choice.neighbours, choice.threshold, trials=400, dropout=0.1) == 0.0


def test_an_exposed_device_is_really_recovered_by_the_colluders():
    n, k, t = 100, 20, 11
    rng = np.random.default_rng(3)
    for trial in range(200):  # find a graph where the colluders surround someone (about 1 in 1.2 rounds)
        corrupt = set(rng.choice(n, math.floor(GAMMA * n), replace=False).tolist())
        seed = f"exposed-{trial}".encode()
        exposed = _exposed(n, k, t, corrupt, set(), seed)
        if exposed:
            break
    params = _params(n, k, t, active=False, seed=seed)
    rnd = Round(params, seed=4)
    target = exposed[0]
    mine = [j for j in params.graph[target] if j in corrupt]
    # The server follows the protocol; the colluders just pool the shares they hold.
    b = {j: rnd.devices[j]._held[target][1] for j in mine}
    s = {j: rnd.devices[j]._held[target][0] for j in mine}
    np.testing.assert_array_equal(rnd.recover(target, b, s), rnd.inputs[target] % 2**M)
    # An honest device that is not exposed stays hidden from the same colluders.
    safe = next(i for i in range(n) if i not in corrupt and i not in exposed)
    mine = [j for j in params.graph[safe] if j in corrupt]
    assert rnd.recover(safe, {j: rnd.devices[j]._held[safe][1] for j in mine},
                       {j: rnd.devices[j]._held[safe][0] for j in mine}) is None  # fmt: skip
