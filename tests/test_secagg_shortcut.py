"""SecAgg+'s simulation shortcut (secagg.simulation_shortcut, issue 18): no mask is expanded, and
the sum, the survivors, the aborts and the model are the faithful protocol's, bit for bit, with
dropouts at every stage, in both threat models and with distributed noise. What would break it:
a mask that does not cancel (a pair one side skips, a self mask the server still removes) moves
the sum; a secret the shortcut stops rebuilding changes which rounds abort."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fake_grid import run_local
from fedsim import randomness, secure_rounds
from fedsim.config import from_dict
from fedsim.errors import ConfigError
from fedsim.secagg import SecAggAborted, SecAggParams
from fedsim.secagg.protocol import simulate_round
from helpers import set_keys


def params(**over: object) -> SecAggParams:
    base = dict(num_devices=12, threshold=3, neighbours=8, modulus_bits=20, vector_length=500, session_id=b"s1")
    return SecAggParams(**(base | over))  # type: ignore[arg-type]


def inputs(p: SecAggParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(-(2**18), 2**18, p.vector_length) for i in range(p.num_devices)}


@pytest.mark.parametrize("active", [False, True])
@pytest.mark.parametrize(
    "drops",
    [
        {},
        {"advertise_keys": [1], "share_keys": [2], "masked_input": [3], "unmask": [5]},
        {"masked_input": [0, 6, 11]},  # devices whose pairwise masks the server must rebuild
    ],
)
def test_the_shortcut_sums_survivors_drops_and_rejections_like_the_faithful_protocol(drops: dict, active: bool) -> None:
    p = params(active=active, threshold=6, neighbours=10) if active else params()
    x = inputs(p)
    faithful = simulate_round(p, x, drop_before=drops)
    short = simulate_round(dataclasses.replace(p, shortcut=True), x, drop_before=drops)
    # As workers send them under the shortcut: each worker's devices as one sum.
    summed = simulate_round(dataclasses.replace(p, shortcut=True), x, drop_before=drops, groups=[range(5), range(5, 12)])
    for other in (short, summed):
        np.testing.assert_array_equal(other.aggregate, faithful.aggregate)
        assert other.survivors == faithful.survivors and other.dropped_after_sharing == faithful.dropped_after_sharing
        assert other.rejected == faithful.rejected
        assert other.bytes_sent == faithful.bytes_sent  # the same messages, only their masks differ
    expected = sum(x[i] for i in faithful.survivors) % (1 << p.modulus_bits)
    np.testing.assert_array_equal(short.aggregate, expected.astype(np.uint64))


def _up_to_masked_input(p: SecAggParams, x: dict[int, np.ndarray]):  # noqa: ANN202 - (server, replies)
    from fedsim.secagg import SecAggDevice, SecAggServer

    devices = {i: SecAggDevice(i, p) for i in x}
    server = SecAggServer(p)
    req2 = server.collect_keys({i: d.advertise_keys() for i, d in devices.items()})
    req3 = server.collect_shares({i: devices[i].share_keys(r) for i, r in req2.items()})
    return server, {i: devices[i].masked_input(r, x[i]) for i, r in req3.items()}


def test_a_summed_group_is_in_the_sum_whole_or_the_round_aborts() -> None:
    p = params(shortcut=True)
    x = inputs(p)
    group = [0, 1]
    rest = range(2, 12)
    # A device inside a worker's sum that must be left out (a neighbour could not open its share)
    # cannot be taken out of the sum: the round aborts, with the reason.
    server, replies = _up_to_masked_input(p, x)
    reporter, victim = next((i, j) for i in rest for j in p.graph[i] if j in group)
    replies[reporter] = dict(replies[reporter]) | {"bad": [victim]}
    total = replies[0]["masked"] + replies[1]["masked"]
    grouped = {i: {"group": 0, "bad": list(replies[i]["bad"])} for i in group}
    with pytest.raises(SecAggAborted, match=f"device {victim} must be left out .* inside its worker's sum"):
        server.collect_masked(grouped | {i: replies[i] for i in rest}, groups={0: total})
    # A malformed group vector rejects its devices, and only those.
    server, replies = _up_to_masked_input(p, x)
    server.collect_masked(grouped | {i: replies[i] for i in rest}, groups={0: total[:-1]})
    assert sorted(server.rejected) == group and server.masked == frozenset(rest)
    # Sums outside the shortcut: refused.
    server, replies = _up_to_masked_input(params(), x)
    with pytest.raises(SecAggAborted, match="simulation shortcut only"):
        server.collect_masked(grouped | {i: replies[i] for i in rest}, groups={0: total})


def test_the_shortcut_aborts_where_the_faithful_protocol_aborts() -> None:
    p = params()
    x = inputs(p)
    drops = {"unmask": list(range(10))}  # 2 of 12 answer unmask, t = 3: too few answers
    for q in (p, dataclasses.replace(p, shortcut=True)):
        with pytest.raises(SecAggAborted, match="unmask"):
            simulate_round(q, x, drop_before=drops)
    # Enough answers, but one survivor's self-mask seed has fewer than t shares among them: the
    # abort comes from rebuilding the secret, which the shortcut must still do.
    for first in range(12):
        drops = {"unmask": [(first + i) % 12 for i in range(7)]}  # 5 of 12 answer, t = 3
        try:
            simulate_round(p, x, drop_before=drops)
        except SecAggAborted as err:
            if "cannot rebuild" in str(err):
                break
    else:
        pytest.fail("no drop pattern made a secret unrecoverable")
    with pytest.raises(SecAggAborted, match="cannot rebuild"):
        simulate_round(dataclasses.replace(p, shortcut=True), x, drop_before=drops)


def test_devices_send_their_inputs_unmasked_only_in_the_shortcut() -> None:
    """What the label says: under the shortcut the server holds each device's input."""
    p = params()
    x = inputs(p, seed=1)
    seen: dict[bool, dict[int, np.ndarray]] = {}
    import fedsim.secagg.protocol as protocol

    original = protocol.SecAggServer.collect_masked
    for shortcut in (False, True):
        grabbed: dict[int, np.ndarray] = {}

        def spy(self, replies, groups=None, grabbed=grabbed):  # noqa: ANN001, ANN202 - wraps the server method
            grabbed.update({i: np.asarray(r["masked"]) for i, r in replies.items()})
            return original(self, replies, groups)

        protocol.SecAggServer.collect_masked = spy
        try:
            simulate_round(dataclasses.replace(p, shortcut=shortcut), x)
        finally:
            protocol.SecAggServer.collect_masked = original
        seen[shortcut] = grabbed
    ring = {i: (v % (1 << p.modulus_bits)).astype(np.uint32) for i, v in x.items()}
    assert all(np.array_equal(seen[True][i], ring[i]) for i in ring)
    assert not any(np.array_equal(seen[False][i], ring[i]) for i in ring)


def run_config(tmp: Path, **over: object) -> dict:
    raw: dict = {
        "seed": 3, "population": 40, "rounds": 3, "cohort": {"size": 12, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 40}, "model": {"name": "mlp", "hidden_sizes": [8]},
        "privacy": {"dpfedavg": {"noise_multiplier": 0.5, "clip_norm": 0.5, "accountant": "rdp"}},
        "secagg": {"name": "secaggplus", "bits": 20, "max_corrupt_fraction": 0.1, "correctness_bits": 3,
                   "drop_advertise_keys": 0.05, "drop_share_keys": 0.05, "drop_masked_input": 0.1, "drop_unmask": 0.05},
        "simulation": {"num_workers": 3}, "output": {"progress": False},
    }  # fmt: skip
    return set_keys(raw, over)


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"secagg.threat_model": "active", "secagg.max_corrupt_fraction": 0.0},  # (gamma 0.1 does not fit n = 12)
        # Devices add the noise; reproducible randomness so two runs can be compared bit for bit.
        {"privacy.dpfedavg.noise": "distributed", "privacy.randomness": "reproducible"},
    ],
    ids=["semi_honest", "active", "distributed"],
)
def test_a_shortcut_run_ends_with_the_faithful_runs_model_survivors_and_epsilon(tmp_path: Path, over: dict) -> None:
    faithful = run_local(from_dict(run_config(tmp_path, **over)), tmp_path / "faithful")
    short_cfg = from_dict(run_config(tmp_path, **over, **{"secagg.simulation_shortcut": True}))
    short = run_local(short_cfg, tmp_path / "short")

    def rows(name: str) -> list[dict]:
        keep = ("devices_trained", "secagg_aborted", "secagg_devices_rejected", "user_epsilon", "train_loss")
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        out = []
        for line in lines:
            r = json.loads(line)
            out.append({k: v for k, v in r.items() if k in keep or k.startswith("secagg_survivors_")})
        return out

    assert rows("short") == rows("faithful")
    assert any(r["secagg_survivors_masked_input"] < 12 for r in rows("short"))  # dropouts did happen
    assert short["model_sha256"] == faithful["model_sha256"]
    assert short["secagg"]["simulation_shortcut"] is True and faithful["secagg"]["simulation_shortcut"] is False
    assert "SIMULATION SHORTCUT" in short["secagg"]["guarantee"] and "SIMULATION" not in faithful["secagg"]["guarantee"]
    assert any(a.startswith("SIMULATION SHORTCUT") for a in short["secagg"]["assumptions"])
    # The privacy statement says what the server saw, too.
    threat = short["privacy"]["user_level"]["assumes"]["threat_model"]
    assert "simulation shortcut" in threat and "sees only the SecAgg+ sum" not in threat
    assert "sees only the SecAgg+ sum" in faithful["privacy"]["user_level"]["assumes"]["threat_model"]
    if "distributed" in str(over):
        assert "SIMULATION SHORTCUT" in json.dumps(short["privacy"]["user_level"]["distributed_noise"])


def test_the_shortcut_keeps_the_runs_randomness_and_is_refused_on_the_deployment_engine(tmp_path: Path) -> None:
    raw = run_config(tmp_path)
    short = run_config(tmp_path, **{"secagg.simulation_shortcut": True})
    assert randomness.fingerprint(from_dict(raw)) == randomness.fingerprint(from_dict(short))
    with pytest.raises(ConfigError, match="secagg.simulation_shortcut"):
        from_dict(set_keys(copy.deepcopy(short), {"engine": "deployment", "superlink": "127.0.0.1:9093"}))
    assert secure_rounds.summary(from_dict(short))["simulation_shortcut"] is True


def test_a_worker_outside_the_simulation_engine_refuses_the_shortcut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config travels in the server's message: a server asking a real device (the deployment
    engine's SuperNodes) for the shortcut would get updates in the clear. Only the worker's own
    environment, set by fedsim's simulation launcher, lets it through."""
    cfg = from_dict(run_config(tmp_path, **{"secagg.simulation_shortcut": True}))
    job = {"n": 12, "active": False, "k": 10, "t": 3, "m": 24, "length": 9, "session": b"s", "graph_seed": b"g", "prg": "aes128-ctr"}
    monkeypatch.setenv(secure_rounds.SIMULATION_ENV, "1")
    assert secure_rounds.device_params(job, cfg).shortcut is True  # type: ignore[arg-type]
    monkeypatch.delenv(secure_rounds.SIMULATION_ENV)
    with pytest.raises(ValueError, match="not started by fedsim's simulation engine"):
        secure_rounds.device_params(job, cfg)  # type: ignore[arg-type]
    faithful = from_dict(run_config(tmp_path))
    assert secure_rounds.device_params(job, faithful).shortcut is False  # type: ignore[arg-type]
    # A whole round: every device refuses the session, nothing is summed.
    from fake_grid import LocalGrid
    from fedsim.flower_adapter import task_identity
    from fedsim.server_app import run_rounds

    grid = LocalGrid(3)  # (it marks this process as the simulation engine)
    monkeypatch.delenv(secure_rounds.SIMULATION_ENV)

    with task_identity():
        run_rounds(from_dict(run_config(tmp_path, rounds=1, **{"secagg.simulation_shortcut": True})), grid, tmp_path / "r")
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["devices_trained"] == 0 and "secagg_aborted" in row


def test_shortcut_shares_fail_where_encrypted_ones_fail_and_need_no_key_agreement(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut sends Shamir shares in the clear (crypto.seal_clear_share): a flipped byte,
    a truncation, two swapped senders or another session's envelope must still be rejected like
    an AES-GCM ciphertext, or faults would drop other devices than in the faithful protocol;
    and no device runs a key agreement (what the shortcut saves)."""
    from fedsim.secagg import SecAggDevice, SecAggServer, crypto

    def to_masked_input(p: SecAggParams):  # noqa: ANN202
        devices = {i: SecAggDevice(i, p) for i in range(p.num_devices)}
        server = SecAggServer(p)
        req2 = server.collect_keys({i: d.advertise_keys() for i, d in devices.items()})
        return devices, server.collect_shares({i: devices[i].share_keys(r) for i, r in req2.items()})

    outcomes = {}
    for shortcut in (False, True):
        p = params(shortcut=shortcut)
        devices, req3 = to_masked_input(p)
        _, other_session = to_masked_input(params(shortcut=shortcut, session_id=b"s2"))
        r = req3[0]
        cts = list(r["ciphertexts"])
        flipped = bytearray(cts[0])
        flipped[20] ^= 0x01
        cts[0] = bytes(flipped)
        cts[1], cts[2] = cts[2], cts[1]  # misrouted: swapped senders
        cts[3] = cts[3][:-1]  # truncated
        cts[4] = other_session[0]["ciphertexts"][4]  # replayed from another round
        reply = devices[0].masked_input({"ids": r["ids"], "ciphertexts": cts}, np.zeros(p.vector_length, dtype=np.int64))
        outcomes[shortcut] = (reply["bad"], sorted(devices[0]._held))
        assert len(cts[5]) == len(r["ciphertexts"][5])
    assert outcomes[True] == outcomes[False] and outcomes[True][0] == sorted(params().graph[0][:5])

    def no_agreement(*args, **kwargs):  # noqa: ANN202
        raise AssertionError("a key agreement ran under the shortcut")

    monkeypatch.setattr("fedsim.secagg.protocol.agree", no_agreement)
    p = params(shortcut=True)
    result = simulate_round(p, inputs(p), drop_before={"masked_input": [3]})
    assert result.dropped_after_sharing == {3}
    assert crypto.open_clear_share(crypto.seal_clear_share(b"x" * 100, sender=1, receiver=2, session_id=b"s"),
                                   sender=1, receiver=2, session_id=b"s") == b"x" * 100  # fmt: skip
