"""The worker side of SecAgg+ (fedsim.secure_rounds.handle), without Ray: one device's bad
request or failure drops that device only, never its worker's other devices."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedsim import secure_rounds, wire
from fedsim.config import from_dict
from fedsim.secagg import SecAggAborted, SecAggParams, SecAggServer, protocol
from fedsim.secagg.crypto import PRG_NAME
from fedsim.worker import Worker

N = 8


def _config(tmp: Path) -> dict:
    return {
        "seed": 5, "population": 20, "rounds": 1, "cohort": {"size": N, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 40}, "model": {"name": "mlp", "hidden_sizes": [4]},
        "secagg": {"name": "secaggplus", "bits": 16},
        "simulation": {"ray_temp_dir": str(tmp / "ray")}, "output": {"progress": False},
    }  # fmt: skip


class OneWorker:
    """All N devices on one worker node, driven stage by stage as secure_round would."""

    def __init__(self, tmp: Path, privacy: dict | None = None, **secagg: object) -> None:
        raw = _config(tmp)
        raw["secagg"] |= secagg
        if privacy:
            raw["privacy"] = privacy
        self.cfg = from_dict(raw)
        self.worker = Worker(self.cfg)
        self.context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        self.num_params = sum(p.numel() for p in self.worker.model.parameters())
        fp = secure_rounds.fixed_point(self.cfg, N)
        names = secure_rounds.stats_names(self.cfg)  # the device's statistics ride in the masked vector
        length = self.num_params + len(names)
        self.params = secure_rounds.session_params(self.cfg, N, length, fp.modulus_bits, 1)
        self.base = {
            "round": 1, "config": self.cfg.to_json(), "n": N, "t": self.params.threshold, "k": self.params.neighbours,
            "m": self.params.modulus_bits, "length": length, "session": self.params.session_id,
            "graph_seed": self.params.graph_seed, "prg": PRG_NAME, "active": False, "clip": fp.clip, "bits": fp.bits, "skellam_mu": 0.0,
            "skellam_mu_count": 0.0, "dim": self.num_params, "stats": list(names),
        }  # fmt: skip

    def stage(self, stage: str, requests: dict[int, dict], extra: dict | None = None, raw: dict | None = None) -> RecordDict:
        """One stage on this worker; `raw` {position: bytes} replaces packed requests as sent."""
        ids = sorted(requests)
        content = RecordDict({"job": ConfigRecord({**self.base, "stage": stage, "device_ids": ids, "positions": ids})})
        if any(requests.values()):
            packed = {str(p): wire.pack_payload(r) for p, r in requests.items()} | {str(p): b for p, b in (raw or {}).items()}
            content["req"] = ConfigRecord(packed)
        for key, record in (extra or {}).items():
            content[key] = record
        meta = Metadata(run_id=1, message_id=stage, src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                        created_at=time.time(), ttl=3600.0, message_type=secure_rounds.MESSAGE_TYPE)  # fmt: skip
        msg = Message(content=content, metadata=meta)
        return secure_rounds.handle(msg, self.context, lambda _: self.worker).content


def _payloads(content: RecordDict) -> dict[int, dict]:
    return wire.read_payloads(content.config_records.get("dev"))


def test_one_devices_bad_requests_drop_that_device_and_not_its_worker(tmp_path: Path) -> None:
    node = OneWorker(tmp_path)
    server = SecAggServer(node.params)
    keys = _payloads(node.stage("advertise_keys", {i: {} for i in range(N)}))
    assert sorted(keys) == list(range(N))
    req2 = server.collect_keys(keys)
    # Device 0 is offered a neighbour's keys twice (a forwarding bug or a dishonest server): it refuses alone.
    bad = dict(req2[0])
    bad["c_pks"] = [bad["c_pks"][0]] * len(bad["c_pks"])
    reply = node.stage("share_keys", {**req2, 0: bad})
    assert sorted(_payloads(reply)) == list(range(1, N))
    assert dict(reply.config_records["device_errors"]) == {"0": "share_keys: device 0 refuses: duplicate public keys "
                                                                "offered (Bonawitz 2017: all must differ)"}  # fmt: skip
    req3 = server.collect_shares(_payloads(reply))
    # Device 1 gets ciphertexts claimed to come from a device it never exchanged keys with.
    victim = min(i for i in req3 if i != 0)
    stranger = next(j for j in range(N) if j not in node.params.graph[victim] and j != victim)
    wrong = {"ids": [stranger], "ciphertexts": [b"x" * 40]}
    global_record = {"global": ArrayRecord({"params": Array(np.zeros(node.num_params, dtype=np.float32))})}
    reply = node.stage("masked_input", {**req3, victim: wrong}, global_record)
    masked = reply.array_records["masked"]
    assert sorted(int(k) for k in masked) == sorted(set(req3) - {victim})
    assert str(victim) in reply.config_records["device_errors"]
    assert reply.config_records["device_errors"][str(victim)].startswith("masked_input: ")


def test_a_device_payload_that_does_not_unpack_drops_that_device_only(tmp_path: Path) -> None:
    # Requests and replies travel as one packed byte string per device (wire.pack_payload).
    node = OneWorker(tmp_path)
    server = SecAggServer(node.params)
    req2 = server.collect_keys(_payloads(node.stage("advertise_keys", {i: {} for i in range(N)})))
    # Device 1's request arrives cut short: it drops alone, its worker's other devices go on.
    reply = node.stage("share_keys", req2, raw={1: wire.pack_payload(req2[1])[:-3]})
    assert sorted(_payloads(reply)) == [p for p in range(N) if p != 1]
    assert dict(reply.config_records["device_errors"]) == {"1": "share_keys: truncated device payload"}
    # A reply that does not unpack reads as None, which the server passes on as an empty reply: rejected.
    replies = wire.read_payloads({**dict(reply.config_records["dev"]), "2": wire.pack_payload(_payloads(reply)[2])[:9]})
    assert replies[2] is None and replies[3] == _payloads(reply)[3]
    try:
        server.collect_shares({p: fields if fields is not None else {} for p, fields in replies.items()})
    except SecAggAborted:  # (this small cohort may fall below t without devices 1 and 2)
        pass
    assert server.rejected[2].startswith("share_keys: malformed reply")


def test_workers_refuse_a_session_whose_threat_model_or_k_t_are_not_the_run_configs(tmp_path: Path) -> None:
    # A lying server could switch off the active checks or lower t; the devices recompute the
    # session's parameters from the run config and the cohort's size and refuse, revealing nothing.
    node = OneWorker(tmp_path)  # semi-honest run
    node.base["active"] = True
    reply = node.stage("advertise_keys", {i: {} for i in range(N)})
    assert _payloads(reply) == {}
    errors = dict(reply.config_records["device_errors"])
    assert sorted(errors) == [str(i) for i in range(N)]
    assert all("refuses the session: the session's threat model is not the run config's" in e for e in errors.values())
    # A server that would remove masks of another PRG (an older fedsim's ChaCha20): refused, nothing sent.
    node.base["active"] = False
    node.base["prg"] = "chacha20"
    reply = node.stage("advertise_keys", {i: {} for i in range(N)})
    assert _payloads(reply) == {}
    errors = dict(reply.config_records["device_errors"])
    assert len(errors) == N and all("mask PRG (chacha20) is not this device's (aes128-ctr)" in e for e in errors.values())
    del node.base["prg"]
    errors = dict(node.stage("advertise_keys", {i: {} for i in range(N)}).config_records["device_errors"])
    assert len(errors) == N and all("mask PRG (not named)" in e for e in errors.values())

    active = OneWorker(tmp_path, threat_model="active", max_dropout_fraction=0.25)
    choice = secure_rounds.graph_choice(active.cfg, N)
    active.base["active"] = True
    job = ConfigRecord({**active.base, "stage": "advertise_keys", "device_ids": [], "positions": []})
    params = secure_rounds.device_params(job, active.cfg)
    assert params.min_survivors == max(choice.threshold, N - choice.dropouts) == N - 2  # D = floor(0.25 * 8)
    active.base["t"] = choice.threshold + 1
    errors = dict(active.stage("advertise_keys", {i: {} for i in range(N)}).config_records["device_errors"])
    assert all(f"t={choice.threshold + 1} are not the run config's" in e for e in errors.values()) and len(errors) == N


def test_active_devices_refuse_a_session_that_strips_their_noise_or_loosens_the_sensitivity(tmp_path: Path) -> None:
    # Distributed noise in the active model: each device's Skellam share, the rounding norm
    # bound and the grid are what the run config implies, recomputed on the worker; a server
    # that sends a smaller share (or none) or a looser bound gets a refusal, not a masked input.
    from fedsim.privacy.dpfedavg import UserLevelDP

    privacy = {"dpfedavg": {"noise_multiplier": 1.0, "clip_norm": 0.5, "accountant": "rdp", "noise": "distributed"}}
    node = OneWorker(tmp_path, privacy=privacy, threat_model="active", max_corrupt_fraction=0.1)
    choice = secure_rounds.graph_choice(node.cfg, N)
    encoding = UserLevelDP(node.cfg, num_params=node.num_params).secure_encoding()
    honest = secure_rounds.survivor_floor(choice) - choice.corrupt
    fp = secure_rounds.fixed_point(node.cfg, N)
    node.base |= {"active": True, "clip_norm": 0.5, "norm_bound": encoding.norm_bound,
                  "skellam_mu": encoding.update_variance / honest, "clip": fp.clip, "bits": fp.bits}  # fmt: skip

    def params(**over: object):
        job = ConfigRecord({**node.base, **over, "stage": "advertise_keys", "device_ids": [], "positions": []})
        return secure_rounds.device_params(job, node.cfg)

    assert params().min_survivors == secure_rounds.survivor_floor(choice)  # what the honest server sends passes
    assert params(skellam_mu=2 * node.base["skellam_mu"]).active  # more noise is fine
    for lie, why in [({"skellam_mu": 0.0}, "noise share"), ({"skellam_mu": 0.5 * node.base["skellam_mu"]}, "noise share"),
                     ({"norm_bound": 2 * encoding.norm_bound}, "norm bound"), ({"clip_norm": 5.0}, "clip norm"),
                     ({"bits": 8}, "grid")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            params(**lie)


def test_faithful_rounds_place_each_worker_on_an_arc_of_the_ring() -> None:
    # Each worker simulates a contiguous arc of the neighbour graph's ring (its plan's count), so
    # most neighbour pairs share a worker (their agreements and pair masks are computed once).
    cohort = list(range(100, 300, 2))  # 100 device ids, positions 0..99
    plan = [wire.Assignment(7, cohort[:60]), wire.Assignment(9, cohort[60:])]
    params = SecAggParams(num_devices=100, threshold=14, neighbours=26, modulus_bits=32, vector_length=4,
                          session_id=b"s" * 16, graph_seed=b"g" * 32)  # fmt: skip
    placed = secure_rounds.along_the_ring(plan, cohort, params)
    assert [node for node, _ in placed] == [7, 9] and [len(ids) for _, ids in placed] == [60, 40]
    assert sorted(d for _, ids in placed for d in ids) == cohort
    ring = [int(p) for p in protocol.ring_order(100, b"g" * 32)]
    where = {cohort[p]: i for i, p in enumerate(ring)}  # device -> ring index
    assert sorted(where[d] for d in placed[0][1]) == list(range(60))  # the first arc of the ring
    graph, worker_of = params.graph, {d: node for node, ids in placed for d in ids}
    pairs = [(i, j) for i in range(100) for j in graph[i] if i < j]
    same = sum(worker_of[cohort[i]] == worker_of[cohort[j]] for i, j in pairs) / len(pairs)
    before = sum((i < 60) == (j < 60) for i, j in pairs) / len(pairs)  # the id-ordered plan
    assert same > 0.85 and before < 0.6, (same, before)
    # Kept as it is: vectorized groups (a device's update depends on its group), one worker.
    grouped = [wire.Assignment(7, cohort[:60], [30, 30]), wire.Assignment(9, cohort[60:], [40])]
    assert secure_rounds.along_the_ring(grouped, cohort, params) is grouped
    assert secure_rounds.along_the_ring(plan[:1], cohort[:60], params) == plan[:1]
