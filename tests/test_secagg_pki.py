"""The key registry (PKI) of SecAgg+'s active threat model: identity keys the server cannot know.

The consistency check (Bonawitz et al. 2017 sec. 6.2) stops a server that lies about dropouts
only if it cannot sign for honest devices. These tests play that server over the real worker
code (fedsim.secure_rounds.handle through the in-process grid): it takes everything it
received, everything in its process environment and the run's config, tries every way of
turning that into an honest device's signing key (including the HKDF derivation fedsim used
before, from a secret in the launcher's environment), and forges with the result. Honest
devices must refuse the forgeries; given the devices' real keys (what that derivation used to
give the server), the same forging harness succeeds, so it can fail.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fake_grid import LocalGrid, set_flower_identity
from fedsim import pki, wire
from fedsim.config import ConfigError, from_dict
from fedsim.secagg import crypto
from fedsim.secagg.protocol import KeyRegistry, SecAggDevice, SecAggParams, survivors_message

N = 8


def _config(tmp: Path) -> dict:
    return {
        "seed": 5, "population": 20, "rounds": 1, "cohort": {"size": N, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 30}, "model": {"name": "mlp", "hidden_sizes": [4]},
        "secagg": {"name": "secaggplus", "bits": 16, "threat_model": "active"},
        "simulation": {"num_workers": 2, "ray_temp_dir": str(tmp / "ray")}, "output": {"progress": False},
    }  # fmt: skip


class ForgingGrid(LocalGrid):
    """The server's transport, in the server's hands: it rewrites its own requests.

    `forge(stage, job, requests)` may change the per-device requests of a stage before the
    workers see them. Everything the server sends and receives is kept.
    """

    def __init__(self, num_workers: int, forge=None) -> None:  # noqa: ANN001
        super().__init__(num_workers)
        self.forge = forge
        self.jobs: dict[str, dict] = {}
        self.requests: dict[str, dict[int, dict]] = {}
        self.replies: list[tuple[str, object]] = []
        self.cohort: set[int] = set()  # device ids (the server chose them)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        for m in messages:
            job = dict(m.content.config_records["job"])
            stage = str(job["stage"])
            self.jobs[stage] = job
            self.cohort |= {int(d) for d in job["device_ids"]}
            reqs = wire.read_payloads(m.content.config_records.get("req"))
            if self.forge is not None:
                reqs = self.forge(stage, job, reqs)
                m.content["req"] = wire.payload_record(reqs)
            self.requests.setdefault(stage, {}).update(reqs)
        ids = super().push_messages(messages)
        self.replies += [(mid, self._replies[mid][1].content) for mid in ids if mid in self._replies]
        return ids


def _server_material(grid: ForgingGrid, cfg_json: str) -> list[bytes]:
    """Every byte string the server process holds about the round: received payloads (whole and
    in aligned 32-byte pieces), what it sent, its environment and the config."""
    found: list[bytes] = []

    def walk(value: object) -> None:
        if isinstance(value, (bytes, bytearray)):
            raw = bytes(value)
            found.append(raw)
            found.extend(raw[i : i + 32] for i in range(0, len(raw) - 31, 32))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    for _, content in grid.replies:
        for record in content.config_records.values():
            walk(dict(record))
        walk(wire.read_payloads(content.config_records.get("dev")))  # each device's fields unpacked
        for record in content.array_records.values():
            for arr in record.values():
                walk(wire.unpack(arr).tobytes()[:4096])
    for job in grid.jobs.values():
        walk(job)
    for reqs in grid.requests.values():
        walk(reqs)
    for value in [*os.environ.values(), cfg_json]:
        found.append(value.encode())
        try:
            found.append(bytes.fromhex(value))
        except ValueError:
            pass
    return found


def _candidate_keys(material: list[bytes], cohort: list[int]) -> list[Ed25519PrivateKey]:
    """Signing keys the server can make from `material`: each 32-byte string as a seed, the
    SHA-256 of each string, and fedsim's former identity derivation HKDF(secret, device id)."""
    seeds = set()
    for raw in material:
        if len(raw) == 32:
            seeds.add(raw)
        seeds.add(hashlib.sha256(raw).digest())
        if 16 <= len(raw) <= 64:
            for d in cohort:
                seeds.add(HKDF(algorithm=hashes.SHA256(), length=32, salt=b"fedsim/secagg/identity",
                               info=d.to_bytes(8, "big")).derive(raw))  # fmt: skip
    return [Ed25519PrivateKey.from_private_bytes(s) for s in seeds]


def _forge_unmask(keys_by_position):  # noqa: ANN001, ANN202
    """A forger that replaces every neighbour signature at unmask by its own on the survivor set
    it announced, made with the key it has for that neighbour (`keys_by_position(job)`:
    {position: private key}, asked once per round)."""
    state: dict = {}

    def forge(stage: str, job: dict, reqs: dict[int, dict]) -> dict[int, dict]:
        if stage == "consistency":
            state["u3"] = [int(j) for j in next(iter(reqs.values()))["survivors"]]
        if stage != "unmask":
            return reqs
        if "keys" not in state:
            state["keys"] = keys_by_position(job)
        keys, message = state["keys"], survivors_message(bytes(job["session"]), state["u3"])
        out = {}
        for p, req in reqs.items():
            signers = [j for j in req["signers"] if j in keys]
            out[p] = {**req, "signers": signers, "signatures": [crypto.sign(keys[j], message) for j in signers]}
        return out

    return forge


def _run(tmp: Path, grid: ForgingGrid) -> list[dict]:
    from fedsim.server_app import run_rounds

    run_rounds(from_dict(_config(tmp)), grid, tmp / "run")
    return [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


def test_signatures_forged_from_everything_the_server_holds_are_refused_by_honest_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_flower_identity(monkeypatch)
    cfg_json = from_dict(_config(tmp_path)).to_json()
    held: dict = {}

    def server_keys(job: dict) -> dict[int, Ed25519PrivateKey]:
        # Forge at the last stage, with everything received up to then (and the registry, public).
        registered = pki.lookup(bytes(job["session"]))
        candidates = _candidate_keys(_server_material(grid, cfg_json), sorted(grid.cohort | set(range(N))))
        publics = {crypto.identity_public(k): k for k in candidates}
        held["matches"] = {p: publics[pk] for p, pk in registered.items() if pk in publics}
        held["registered"] = registered
        own = candidates[0]  # no match: sign with a key of its own
        return {p: held["matches"].get(p, own) for p in range(N)}

    grid = ForgingGrid(2, forge=_forge_unmask(server_keys))
    rows = _run(tmp_path, grid)
    assert len(held["registered"]) == N  # every device registered a key for the session
    assert held["matches"] == {}  # and none of them is a key the server can make
    assert "secagg_aborted" in rows[0]  # so no device released a share
    unmask_errors = {}
    for _, content in grid.replies:
        unmask_errors |= {p: e for p, e in dict(content.config_records.get("device_errors", {})).items()
                          if e.startswith("unmask")}  # fmt: skip
    assert len(unmask_errors) == N and all("valid neighbour signatures" in e for e in unmask_errors.values())


def test_the_forging_harness_succeeds_with_the_devices_real_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the former HKDF identities gave the server: the devices' signing keys. With them the
    # same forger's signatures are accepted and the round completes, so the test above can fail.
    set_flower_identity(monkeypatch)

    def real_keys(job: dict) -> dict[int, Ed25519PrivateKey]:
        keys = {}
        for context in grid.contexts.values():  # the workers' stage state: what a server would have to steal
            for p, blob in dict(context.state.config_records["secagg"]).items():
                device = SecAggDevice.restore(_session_params(job), bytes(blob))
                keys[int(p)] = device._identity
        return keys

    grid = ForgingGrid(2, forge=_forge_unmask(real_keys))
    rows = _run(tmp_path, grid)
    assert "secagg_aborted" not in rows[0] and rows[0]["secagg_survivors_unmask"] == N


def _session_params(job: dict) -> SecAggParams:
    return SecAggParams(
        num_devices=int(job["n"]), threshold=int(job["t"]), neighbours=int(job["k"]), modulus_bits=int(job["m"]),
        vector_length=int(job["length"]), session_id=bytes(job["session"]), graph_seed=bytes(job["graph_seed"]),
        active=True,
    )  # fmt: skip


def test_keys_the_server_swaps_in_are_refused_even_when_signed_with_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_flower_identity(monkeypatch)
    cfg_json = from_dict(_config(tmp_path)).to_json()

    def swap(stage: str, job: dict, reqs: dict[int, dict]) -> dict[int, dict]:
        if stage != "share_keys":
            return reqs
        # The server offers its own keys for every neighbour, signed with the neighbour's
        # registered key if it can make it from what it holds, else with one of its own.
        candidates = _candidate_keys(_server_material(grid, cfg_json), sorted(grid.cohort | set(range(N))))
        session = bytes(job["session"])
        publics = {crypto.identity_public(k): k for k in candidates}
        registered = pki.lookup(session)
        out = {}
        for p, req in reqs.items():
            c_pks, s_pks, sigs = [], [], []
            for j in req["ids"]:
                c, s = crypto.generate_keypair(), crypto.generate_keypair()
                key = publics.get(registered.get(int(j), b""), candidates[0])
                c_pks.append(c.public)
                s_pks.append(s.public)
                sigs.append(crypto.sign(key, b"fedsim/secagg/keys" + session + int(j).to_bytes(8, "big") + c.public + s.public))
            out[p] = {**req, "c_pks": c_pks, "s_pks": s_pks, "sigs": sigs}
        return out

    grid = ForgingGrid(2, forge=swap)
    rows = _run(tmp_path, grid)
    assert "secagg_aborted" in rows[0]
    errors = {}
    for _, content in grid.replies:
        errors |= dict(content.config_records.get("device_errors", {}))
    assert len(errors) == N and all("not signed by its registered identity" in e for e in errors.values())


def test_an_active_round_needs_no_identity_secret_in_any_environment_or_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers draw their keys themselves: with every FEDSIM_* variable gone the round completes,
    # and two runs of the same config register different keys (nothing derives them).
    set_flower_identity(monkeypatch)
    for name in [n for n in os.environ if n.startswith("FEDSIM")]:
        monkeypatch.delenv(name)
    sessions = []
    for attempt in ("a", "b"):
        grid = ForgingGrid(2)
        rows = _run(tmp_path / attempt, grid)
        assert "secagg_aborted" not in rows[0] and rows[0]["secagg_survivors_unmask"] == N
        sessions.append(pki.lookup(bytes(grid.jobs["advertise_keys"]["session"])))
    assert len(sessions[0]) == len(sessions[1]) == N
    assert not set(sessions[0].values()) & set(sessions[1].values())
    # Only the simulation engine's mark, which the test grid sets like fedsim's launcher (no secret).
    from fedsim.secure_rounds import SIMULATION_ENV

    assert [n for n in os.environ if n.startswith("FEDSIM")] == [SIMULATION_ENV]


def test_the_registry_refuses_a_second_key_for_a_device_or_a_position_in_a_session() -> None:
    registry = KeyRegistry(keep_sessions=2)
    k1, k2 = (crypto.identity_public(crypto.generate_identity()) for _ in range(2))
    registry.register(b"s1", 0, 17, k1)
    registry.register(b"s1", 0, 17, k1)  # the same registration again is harmless
    with pytest.raises(ValueError, match="another registered identity key"):
        registry.register(b"s1", 0, 17, k2)  # the same device, another key
    with pytest.raises(ValueError, match="device 17 already registered"):
        registry.register(b"s1", 3, 17, k2)  # the same device at a second position
    with pytest.raises(ValueError, match="position 0 already has"):
        registry.register(b"s1", 0, 18, k2)  # another device at a taken position
    assert registry.register_many(b"s1", {0: (17, k2), 1: (18, k2)}) == {
        0: "position 0 already has another registered identity key in this session"}  # fmt: skip
    assert registry.lookup(b"s1") == {0: k1, 1: k2}
    registry.register(b"s2", 0, 17, k2)  # a new session: a new key
    registry.register(b"s3", 0, 17, k2)
    assert registry.lookup(b"s1") == {} and registry.lookup(b"s3", [0, 1]) == {0: k2}  # only 2 sessions kept
    with pytest.raises(ValueError, match="32 bytes"):
        registry.register(b"s3", 1, 18, b"short")


def test_a_worker_whose_device_key_the_registry_refuses_drops_that_device_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that tells two workers they hold the same device (to get a second key registered
    # for it): the second registration is refused and only that copy drops.
    set_flower_identity(monkeypatch)
    grid = ForgingGrid(2)

    def duplicate(stage: str, job: dict, reqs: dict[int, dict]) -> dict[int, dict]:
        # The registration a second worker told it holds position 0 would have made first.
        # (This is the test writing, as that worker: the server has no way to.)
        if stage == "advertise_keys" and 0 in job["positions"]:
            pki.local_registry().register(bytes(job["session"]), 0, 10**6, crypto.identity_public(crypto.generate_identity()))
        return reqs

    grid.forge = duplicate
    rows = _run(tmp_path, grid)
    errors = {}
    for _, content in grid.replies:
        errors |= dict(content.config_records.get("device_errors", {}))
    assert errors == {"0": "advertise_keys: identity key not registered: position 0 already has another "
                           "registered identity key in this session"}  # fmt: skip
    assert rows[0]["secagg_survivors_advertise_keys"] == N - 1


def test_active_secure_aggregation_is_refused_on_the_deployment_engine(tmp_path: Path) -> None:
    raw = _config(tmp_path) | {"engine": "deployment", "superlink": "127.0.0.1:9093"}
    with pytest.raises(ConfigError, match=r"secagg.threat_model.*allowed with engine=deployment: semi_honest"):
        from_dict(raw)
    raw["secagg"] = raw["secagg"] | {"threat_model": "semi_honest"}
    from_dict(raw)


@pytest.mark.ray
def test_the_ray_registry_is_reached_by_workers_directly_and_refuses_a_second_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # The simulation engine's registry: an actor named after the Ray job, found by a task in
    # another process from its own job id (no name or address comes from the server).
    import tempfile

    import ray

    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray_dir = tempfile.TemporaryDirectory(prefix="fsray")  # Ray's socket paths must stay short
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=ray_dir.name,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                                                      os.environ.get("PYTHONPATH", "")])}})  # fmt: skip
    try:
        pki.start()
        first = crypto.identity_public(crypto.generate_identity())

        @ray.remote(num_cpus=0)
        def worker_registers(session: bytes, entries: dict) -> tuple[dict, int]:
            from fedsim import pki as worker_pki

            return worker_pki.register(session, entries), os.getpid()

        refused, pid = ray.get(worker_registers.remote(b"session", {3: (42, first)}))
        assert refused == {} and pid != os.getpid()
        assert pki.lookup(b"session") == {3: first}  # what the server may read
        second = crypto.identity_public(crypto.generate_identity())
        refused, _ = ray.get(worker_registers.remote(b"session", {3: (42, second)}))
        assert refused == {3: "position 3 already has another registered identity key in this session"}
        assert pki.lookup(b"session", [3]) == {3: first}
    finally:
        pki.close()
        ray.shutdown()
        ray_dir.cleanup()
