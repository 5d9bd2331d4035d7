"""SecAgg+'s simulation shortcut (secagg.simulation_shortcut, issue 18; fedsim.secagg.shortcut):
one message per worker, no cryptography, and the sum, the survivors, the aborts and the model
are the faithful protocol's, bit for bit, with dropouts at every stage, in both threat models
and with distributed noise. What would break it: a decision the shortcut takes otherwise than
the faithful server (pruning, the survivor floor, a secret with too few holders or shares, an
unmask answer it expects from a device that would refuse) changes which devices are summed or
which rounds abort; the random sessions below compare both on every such path."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_grid import run_local
from fedsim import randomness, secure_rounds
from fedsim.config import from_dict
from fedsim.errors import ConfigError
from fedsim.secagg import SecAggAborted, SecAggParams
from fedsim.secagg.protocol import simulate_round
from fedsim.secagg.shortcut import ShortcutSession
from helpers import set_keys


def params(**over: object) -> SecAggParams:
    base = dict(num_devices=12, threshold=3, neighbours=8, modulus_bits=20, vector_length=5, session_id=b"s1")
    return SecAggParams(**(base | over))  # type: ignore[arg-type]


def inputs(p: SecAggParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(-(2**18), 2**18, p.vector_length) for i in range(p.num_devices)}


def both(p: SecAggParams, x: dict[int, np.ndarray], drops: dict[str, list[int]], workers: int = 2) -> tuple:
    """(faithful, shortcut) outcomes of one session with these drops: (sum, survivors, dropped
    after sharing) or the abort reason. The shortcut's inputs come as `workers` sums, as workers
    send them (each over its share of the devices asked for an input, without those dropping)."""
    try:
        r = simulate_round(p, x, drop_before=drops)
        faithful: tuple = (r.aggregate.tolist(), r.survivors, r.dropped_after_sharing)
    except SecAggAborted as err:
        faithful = (err.reason,)
    session = ShortcutSession(p, lambda stage, i: i in drops.get(stage, ()))
    try:
        live = session.before_training()
        sending = [i for i in sorted(live) if i not in drops.get("masked_input", ())]
        parts = [sending[w::workers] for w in range(workers)]
        sums = [(part, sum((x[i] for i in part), np.zeros(p.vector_length, np.int64)) % (1 << p.modulus_bits))
                for part in parts if part]  # fmt: skip
        total = session.finish(sums)
        short: tuple = (total.tolist(), session.survivors, session.dropped_after_sharing)
    except SecAggAborted as err:
        short = (err.reason,)
    return faithful, short


@st.composite
def sessions(draw: st.DrawFn) -> tuple[SecAggParams, dict[str, list[int]]]:
    n = draw(st.integers(3, 14))
    active = draw(st.booleans())
    k = draw(st.sampled_from([n - 1, *range(2, n - 1, 2)]))
    t = draw(st.integers(k // 2 + 1 if active else 1, k))
    floor = draw(st.integers(0, n))
    stages = ("advertise_keys", "share_keys", "masked_input", "unmask")
    drops = {s: sorted(draw(st.sets(st.integers(0, n - 1), max_size=n // 4 + 1))) for s in stages}
    p = params(num_devices=n, neighbours=k, threshold=t, active=active, min_survivors=floor, modulus_bits=16)
    return p, drops


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_the_shortcut_decides_every_session_like_the_faithful_protocol(case: tuple) -> None:
    """Random cohorts, graphs, thresholds, survivor floors and drops at every stage, both threat
    models: the same sum, survivors and dropped devices, or the same abort with the same reason."""
    p, drops = case
    faithful, short = both(p, inputs(p), drops)
    assert short == faithful


@pytest.mark.parametrize("active", [False, True])
@pytest.mark.parametrize(
    "drops",
    [
        {},
        {"advertise_keys": [1], "share_keys": [2], "masked_input": [3], "unmask": [5]},
        {"masked_input": [0, 6, 11]},  # devices whose pairwise masks the server must rebuild
        {"unmask": list(range(10))},  # 2 of 12 answer unmask, t = 3 (semi-honest): too few answers
        {"share_keys": list(range(9))},  # pruned below t before the masked input
    ],
)
def test_the_shortcut_sums_survivors_drops_and_aborts_like_the_faithful_protocol(drops: dict, active: bool) -> None:
    p = params(active=active, threshold=6, neighbours=10) if active else params()
    x = inputs(p)
    faithful, short = both(p, x, drops, workers=3)
    assert short == faithful
    if len(faithful) == 3:
        expected = sum(x[i] for i in faithful[1]) % (1 << p.modulus_bits)
        assert short[0] == expected.tolist()


def test_the_shortcut_aborts_where_a_secret_cannot_be_rebuilt() -> None:
    """Enough survivors answer unmask, but one survivor's self-mask seed has fewer than t shares
    among them: the faithful server fails to rebuild it, and so must the shortcut's."""
    p = params()
    x = inputs(p)
    for first in range(12):
        drops = {"unmask": [(first + i) % 12 for i in range(7)]}  # 5 of 12 answer, t = 3
        faithful, short = both(p, x, drops)
        if "cannot rebuild" in faithful[0]:
            assert short == faithful
            break
    else:
        pytest.fail("no drop pattern made a secret unrecoverable")


def test_a_workers_sum_is_in_the_sum_whole_and_only_for_devices_asked() -> None:
    p = params()
    x = inputs(p)

    def session() -> ShortcutSession:
        out = ShortcutSession(p, lambda stage, i: False)
        out.before_training()
        return out

    halves = [[0, 1], list(range(2, 12))]
    vector = [sum(x[i] for i in h) % (1 << p.modulus_bits) for h in halves]
    # A malformed sum rejects its devices, and only those (they count as dropped at the masked input).
    s = session()
    s.finish([(halves[0], vector[0][:-1]), (halves[1], vector[1])])
    assert sorted(s.rejected) == halves[0] and s.masked == frozenset(halves[1])
    assert s.answered["masked_input"] == 12  # received, as the faithful server counts a malformed input
    assert s.dropped_after_sharing == frozenset(halves[0])
    # A device in two sums, or one not asked for its input: the worker's fault, the round aborts.
    with pytest.raises(SecAggAborted, match="device 1's input is inside a worker's sum"):
        session().finish([(halves[0], vector[0]), ([1, *halves[1]], vector[1])])
    s = ShortcutSession(p, lambda stage, i: stage == "advertise_keys" and i == 0)
    s.before_training()
    with pytest.raises(SecAggAborted, match="device 0's input"):
        s.finish([(halves[0], vector[0])])


def test_a_shortcut_round_draws_no_key_makes_no_share_and_expands_no_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the shortcut saves: one message per worker and no cryptography at all; the server
    receives each worker's sum of its devices' inputs, unmasked (what the label says)."""
    import fedsim.secagg.protocol as protocol

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the shortcut ran the protocol's cryptography")

    for name in ("generate_keypair", "agree", "add_mask", "add_mask_many"):
        monkeypatch.setattr(protocol, name, forbidden)
    monkeypatch.setattr(protocol.shamir, "share_many", forbidden)
    seen: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(secure_rounds, "RECEIVED", [lambda stage, content: seen.append((stage, sorted(content)))])
    out = run_local(from_dict(run_config(tmp_path, rounds=2, **{"secagg.simulation_shortcut": True})), tmp_path / "r")
    assert out["rounds"] == 2
    assert {stage for stage, _ in seen} == {"masked_input"} and len(seen) >= 2  # one message per worker with devices
    assert all("masked_sum" in keys and "masked" not in keys for _, keys in seen)


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
    assert secure_rounds.device_params(job, cfg).num_devices == 12  # type: ignore[arg-type]  # (accepted)
    monkeypatch.delenv(secure_rounds.SIMULATION_ENV)
    with pytest.raises(ValueError, match="not started by fedsim's simulation engine"):
        secure_rounds.device_params(job, cfg)  # type: ignore[arg-type]
    faithful = from_dict(run_config(tmp_path))
    assert secure_rounds.device_params(job, faithful).num_devices == 12  # type: ignore[arg-type]
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


def test_distributed_dpsgd_under_the_shortcut_keeps_the_faithful_model_and_says_what_the_server_sees(
    tmp_path: Path,
) -> None:
    """Sample-level DP with the noise shared under SecAgg+ (each device's rounded gradient sum):
    the shortcut's model is the faithful run's, and the privacy statement no longer says the
    server sees only SecAgg+ sums."""
    raw: dict = {
        "seed": 5, "population": 30, "rounds": 2, "cohort": {"size": 12, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 60}, "model": {"name": "mlp", "hidden_sizes": [8]},
        "algorithm": {"lr": 0.5, "batch_size": 20},
        "privacy": {"dpsgd": {"noise_multiplier": 1.5, "max_grad_norm": 0.5, "noise": "distributed"},
                    "randomness": "reproducible"},
        "secagg": {"name": "secaggplus", "max_corrupt_fraction": 0.1, "correctness_bits": 3, "drop_masked_input": 0.1},
        "simulation": {"num_workers": 2}, "output": {"progress": False},
    }  # fmt: skip
    faithful = run_local(from_dict(raw), tmp_path / "faithful")
    short = run_local(from_dict(set_keys(copy.deepcopy(raw), {"secagg.simulation_shortcut": True})), tmp_path / "short")
    assert short["model_sha256"] == faithful["model_sha256"]
    survivors = [json.loads(line)["secagg_survivors_masked_input"]
                 for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert min(survivors) < 12  # dropouts did happen
    threat = short["privacy"]["sample_level"]["assumes"]["threat_model"]
    assert "each worker's unmasked sum" in threat and "see only SecAgg+ sums" not in threat
    assert "see only SecAgg+ sums" in faithful["privacy"]["sample_level"]["assumes"]["threat_model"]
    assert "SIMULATION SHORTCUT" in short["privacy"]["sample_level"]["assumes"]["simulation_shortcut"]
