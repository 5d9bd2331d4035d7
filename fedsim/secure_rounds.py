"""A training round under SecAgg+ on Flower messages: four stages, one message per worker each.

    stage 1 advertise_keys  server -> workers: session parameters, each worker's device positions
                            workers -> server: every device's two X25519 public keys
    stage 2 share_keys      server -> workers: each device's live neighbours' public keys
                            workers -> server: encrypted Shamir shares, one per neighbour
    stage 3 masked_input    server -> workers: global weights + the shares addressed to each device
                            workers -> server: each device trains, clips (DP-FedAvg), rounds to the
                            grid (conditionally, within the accountant's norm bound), adds its noise
                            share (distributed DP), appends its statistics and masks: only masked
                            vectors leave
    (active) consistency    server -> workers: the survivor set; workers -> server: each device's signature on it
    stage 4 unmask          server -> workers: which neighbours survived stage 3 (active: + their signatures)
                            workers -> server: b-shares of survivors, s-shares of the dropped
Each message's per-device part is one bytes value per device under its cohort position
(requests in configs["req"], replies in configs["dev"]: `fedsim.wire.pack_payload`).
The server then removes the masks and decodes the sum (fedsim.secagg.SecAggServer). It
never receives a device's unmasked update (the faithful protocol; under the simulation
shortcut, below, it receives each worker's unmasked sum): `RECEIVED` hooks let a test record
everything that reaches the server. A device's secrets stay on its worker, in the worker node's
Flower state (`context.state`), between stages. Fewer than t survivors abort the round:
the model, the ledger and the accounting stay as they were. A device whose stage fails (bad
key, unusable reply, its own refusal) drops alone, with the stage and reason in the metrics.

k and t come from `secagg.threat_model` and its parameters (fedsim.secagg.params); the graph's
ring order comes from fedsim.randomness (stream "secagg.graph", round): in reproducible mode the
same seed gives the same graph, survivors and model; in secure mode fresh OS entropy. Device
secrets never come from there: they are drawn by the devices from the OS CSPRNG.

Active threat model, identity keys: at advertise_keys each device draws an Ed25519 key for
the session from its worker's OS CSPRNG (`SecAggDevice`), keeps the private half in its stage
state (the worker's `context.state`, never in a reply) and its worker registers the public
half in the key registry (`fedsim.pki`: a Ray actor created by the launcher for the run, or
this process's registry on the in-process test grid), once per (session, device). From
share_keys on, workers read their devices' neighbour keys from the registry, not from the
server's messages. The server reads the registry for its own early checks and cannot write to
it. Assumption stated in summary.json: the registry is trusted infrastructure. The deployment
engine has no such registry, so the active model is refused there (config.py).

No side channels: what the server needs per device (its mean loss, its example count, the
DP-SGD clipped fraction, the adaptive-clipping bit) travels as extra coordinates of the masked
vector (`STATS`, fixed point with their own ranges) and reaches the server only as cohort sums.
A worker's plain reply names the devices that trained or failed (the server sees who sent a
masked vector anyway) and, with DP-SGD, each device's privacy event for the ledger.

Simulation shortcut (`secagg.simulation_shortcut`, not what devices do): the masked_input stage
alone, each worker sending the unmasked sum of its devices' inputs; the server takes the other
stages' decisions from the seeded drops (fedsim.secagg.shortcut), so the sum, survivors and
aborts are the faithful protocol's.

Randomness the server cannot know: rounding and noise come from `fedsim.randomness` streams
("secagg.rounding", "secagg.noise"): fresh OS entropy in secure mode (the default with
distributed noise), derived from the seed and config in reproducible mode, where the run says
"simulation only: the server can remove the noise".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsim import pki, randomness, wire
from fedsim.config import SIMULATION_ENV, FedsimConfig
from fedsim.errors import ConfigError
from fedsim.mechanisms import Mechanism
from fedsim.secagg import (
    FixedPoint,
    GraphChoice,
    SecAggAborted,
    SecAggDevice,
    SecAggParams,
    SecAggServer,
    ThreatModel,
    Unsatisfiable,
    check_params,
    choose_params,
    skellam,
    skellam_tail_bound,
)
from fedsim.secagg.crypto import PRG_NAME
from fedsim.secagg.protocol import DEVICE_FAULTS, PairMemo, masked_inputs, ring_order
from fedsim.secagg.quantize import from_ring_signed, stochastic_round, to_ring
from fedsim.secagg.shortcut import ShortcutSession
from fedsim.secure_grid import SecureEncoding, distributed_dpsgd, grid
from fedsim.reports import DeviceReport
from clients.params import num_params
from fedsim.worker import Worker, config_from_job, keep_in_groups

log = logging.getLogger("fedsim")
# Stages with a configurable fault rate (secagg.drop_<stage>); their index keys the drop stream.
STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")

MESSAGE_TYPE = "train.secagg"
_DROP_STREAM = 0xD20B
ROUNDING_STREAM = "secagg.rounding"
# Distributed DP-SGD: the rounding of each example's gradient.
EXAMPLE_ROUNDING_STREAM = "dpsgd.example_rounding"
NOISE_STREAM = "secagg.noise"
#: P(the noise of a round's sum leaves the range the modulus is sized for): accuracy only (a
#: wrapped sum is still a function of the noisy sum, so privacy holds).
OVERFLOW_PROB = 1e-9

# Per-device statistics appended to the masked vector. Each is an integer in [0, STAT_LEVELS]
# (the adaptive-clipping bit: 2 b - 1 in {-1, 1}, plus its noise share); sums decode to cohort sums.
STAT_LEVELS = (1 << 16) - 1
LOSS_RANGE = 64.0  # a device's mean training loss, clipped to [0, 64], 16-bit fixed point

# Everything the server receives in a secure round passes through these callables (tests).
RECEIVED: list[Callable[[str, RecordDict], None]] = []


@dataclass
class SecureRoundResult:
    total: torch.Tensor | None  # float64 sum of the survivors' updates, their noise included (None: aborted)
    count: int  # devices in the sum
    reports: list[DeviceReport]  # who trained or failed, DP-SGD events (no per-device values)
    aborted: str | None = None
    metrics: dict = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)  # cohort sums of the STATS coordinates


def stats_names(cfg: FedsimConfig) -> tuple[str, ...]:
    """The per-device statistics a SecAgg+ round carries inside the masked vector, in order."""
    if distributed_dpsgd(cfg):
        # The example counts only (public): a loss or clipped fraction summed without noise would
        # tell the server about the examples, which distributed DP-SGD's epsilon does not cover.
        return ("num_examples",)
    keep = cfg.output.private_metrics_only  # the un-noised diagnostics stay on the devices (worker.keep_diagnostics)
    names = ["num_examples"] if keep else ["loss", "num_examples"]
    if cfg.privacy.dpsgd is not None and not keep:
        names += ["clip_fraction", "clip_fraction_devices"]  # devices with no example drawn report NaN
    user = cfg.privacy.dpfedavg
    if user is not None and user.adaptive_clipping:
        names.append("within_bound")  # 2 b_i - 1: the centred count of Andrew et al. 2021, doubled
    return tuple(names)


def encode_stats(
    names: tuple[str, ...], loss: float, examples: int, clip_fraction: float | None, within: bool | None,
    rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """One device's statistics as integers (fixed point, randomized rounding for the fractions)."""
    out = []
    for name in names:
        if name == "loss":
            value = min(max(loss, 0.0), LOSS_RANGE) if np.isfinite(loss) else LOSS_RANGE
            out.append(int(stochastic_round(np.array([value / LOSS_RANGE * STAT_LEVELS]), rng)[0]))
        elif name == "num_examples":
            out.append(min(int(examples), STAT_LEVELS))
        elif name == "clip_fraction":
            fraction = 0.0 if clip_fraction is None or np.isnan(clip_fraction) else clip_fraction
            out.append(int(stochastic_round(np.array([fraction * STAT_LEVELS]), rng)[0]))
        elif name == "clip_fraction_devices":
            out.append(0 if clip_fraction is None or np.isnan(clip_fraction) else 1)
        elif name == "within_bound":
            out.append(1 if within else -1)
    return np.array(out, dtype=np.int64)


def decode_stats(names: tuple[str, ...], sums: np.ndarray) -> dict[str, float]:
    """Cohort sums from the summed statistics coordinates (signed integers)."""
    out: dict[str, float] = {}
    for name, value in zip(names, sums.tolist(), strict=True):
        scale = {"loss": LOSS_RANGE / STAT_LEVELS, "clip_fraction": 1.0 / STAT_LEVELS}.get(name, 1.0)
        out[name] = value * scale
    return out


def fixed_point(
    cfg: FedsimConfig, num_devices: int, noise_bound: int = 0, other_abs_sum: int = 0, *, dim: int = 1,
) -> FixedPoint:  # fmt: skip
    """The round's encoding for a model of `dim` parameters: m chosen (or the configured m
    checked) so the cohort's sum, noise and statistics included, cannot wrap around."""
    sa = cfg.secagg
    other = max(other_abs_sum, num_devices * STAT_LEVELS)
    clip, bits = grid(cfg, dim)
    try:
        return FixedPoint.for_sum(clip, bits, num_devices, noise_bound, modulus_bits=sa.modulus_bits, other_abs_sum=other)
    except ValueError as err:
        raise ConfigError("secagg.modulus_bits", str(err)) from None


def threat_model(cfg: FedsimConfig) -> ThreatModel:
    """The configured threat model; without max_dropout_fraction, each device's probability of
    dropping at some stage from the simulator's fault model (the four drop_* rates, device
    failures and NaN updates, independent): p = 1 - prod(1 - rate)."""
    sa, faults = cfg.secagg, cfg.faults
    keep = 1.0
    for rate in (sa.drop_advertise_keys, sa.drop_share_keys, sa.drop_masked_input, sa.drop_unmask,
                 faults.device_failure_rate, faults.nan_update_rate):  # fmt: skip
        keep *= 1.0 - rate
    return ThreatModel(
        model=sa.threat_model, max_corrupt_fraction=sa.max_corrupt_fraction,
        max_dropout_fraction=sa.max_dropout_fraction, dropout_rate=1.0 - keep,
        security_bits=sa.security_bits, correctness_bits=sa.correctness_bits,
    )  # fmt: skip


def graph_choice(cfg: FedsimConfig, num_devices: int) -> GraphChoice:
    """k and t for a cohort of `num_devices`: chosen from the threat model, or the configured
    ones checked against it. Raises ConfigError (one line, exit 2) if none / they are unsafe."""
    sa, tm = cfg.secagg, threat_model(cfg)
    try:
        if sa.neighbours is None:
            return choose_params(num_devices, tm)
        return check_params(num_devices, min(sa.neighbours, num_devices - 1), sa.threshold, tm)
    except Unsatisfiable as err:
        key = "secagg.neighbours" if sa.neighbours is not None else "secagg.max_corrupt_fraction"
        raise ConfigError(key, str(err)) from None


def survivor_floor(choice: GraphChoice) -> int:
    """max(t, n - D): the fewest masked inputs a released sum of a cohort of n may hold (D the
    dropouts the threat model budgets for; below it the server learns a sum of fewer inputs
    than Bell et al.'s guarantee and the distributed noise allow for)."""
    return max(choice.threshold, choice.n - choice.dropouts)


def session_params(cfg: FedsimConfig, num_devices: int, num_params: int, modulus_bits: int, round_num: int) -> SecAggParams:
    """The round's public SecAgg+ parameters; in the active threat model with the survivor
    floor max(t, n - D) that the devices enforce themselves (`device_params`)."""
    choice = graph_choice(cfg, num_devices)
    active = cfg.secagg.threat_model == "active"
    # The ring order is public: reproducible mode derives it from (seed, round) so dropout runs
    # repeat exactly; secure mode draws it from the OS. The session id only salts keys and binds
    # ciphertexts and signatures to the round, so it is always fresh.
    graph_seed = randomness.numpy_generator(cfg, "secagg.graph", round_num).bytes(32)
    return SecAggParams(
        num_devices=num_devices, threshold=choice.threshold, neighbours=choice.neighbours,
        modulus_bits=modulus_bits, vector_length=num_params, session_id=os.urandom(16),
        graph_seed=graph_seed, active=active, min_survivors=survivor_floor(choice) if active else 0,
    )  # fmt: skip


def prepare(cfg: FedsimConfig, dim: int = 1) -> GraphChoice:
    """Checks before the run (a bad modulus or an impossible threat model fails here, not in
    round 1); returns the guarantee at the configured cohort size."""
    fixed_point(cfg, cfg.cohort.size, dim=dim)
    return graph_choice(cfg, cfg.cohort.size)


def summary(cfg: FedsimConfig) -> dict:
    """summary.json["secagg"]: the parameters, the guarantee and every assumption it rests on."""
    choice = graph_choice(cfg, cfg.cohort.size)
    mode, why = randomness.resolve(cfg)
    assumptions = [
        f"at most {choice.corrupt} devices of a cohort of {choice.n} collude with the server (gamma = "
        f"{cfg.secagg.max_corrupt_fraction}); which ones does not depend on the neighbour graph",
        f"at most {choice.dropouts} devices drop out per round ("
        + ("secagg.max_dropout_fraction" if cfg.secagg.max_dropout_fraction is not None else
           f"the configured fault rates, p = {choice.threat.dropout_rate:.4g} per device, exceeded with "
           f"probability <= 2^-{cfg.secagg.correctness_bits + 1}") + ")",  # fmt: skip
        "the graph's ring order is public randomness the server cannot bias"
        + (" (reproducible mode: derived from the run seed, so a server that knows the seed knows the graph "
           "before choosing colluders: simulation only)" if mode == "reproducible" else ""),  # fmt: skip
        "device secrets (X25519 keys, self-mask seeds, Shamir coefficients) come from each device's OS CSPRNG",
        "X25519, HKDF-SHA256, AES-256-GCM and AES-128-CTR (the mask PRG) are secure; the sum itself is what the server learns "
        "(privacy of the sum is DP's job)",
    ]
    if cfg.secagg.threat_model == "active":
        assumptions.append(
            "a trusted key registry (PKI): each device draws its Ed25519 identity key for the round from its own "
            "OS CSPRNG and registers the public key once per (session, device); devices read their neighbours' "
            "keys from the registry, not from the server; the server can read the registry but not write to it "
            "(simulated: a Ray actor the launcher creates for the run, which the workers reach directly; fedsim's "
            "server code only reads it)"
        )
    if cfg.engine == "simulation":
        assumptions.append(
            "simulation engine: Flower keeps each worker node's state, where devices keep their round secrets "
            "between stages (identity keys included), in the launcher process that also runs the ServerApp; "
            "fedsim's server code never reads it (separated by code, not by process)"
        )
    if cfg.secagg.threat_model == "active":
        assumptions.append(
            f"the run config is public and fixed before the run: each device computes t, D and the survivor floor "
            f"max(t, n - D) (= {survivor_floor(choice)} at n = {choice.n}) from it and the session's n, refuses a "
            "session whose k, t differ, and signs and unmasks only a survivor set at least that large; with DP-FedAvg "
            "or distributed DP-SGD it also checks the round's encoding against the config (grid, fixed clip norm, "
            "rounding norm bound, its noise share at least 1/h of the accounted variance); with adaptive clipping the "
            "clip norm is taken as sent (the norm bound and the noise scale with it)"
        )
    shortcut = None
    if cfg.secagg.simulation_shortcut:
        shortcut = (
            "SIMULATION SHORTCUT (secagg.simulation_shortcut=true), not what devices do: each worker sends the "
            "unmasked sum of its devices' inputs in one message, no key, share or mask is made (every mask cancels "
            "in the survivors' sum), and the server takes the faithful protocol's decisions (drops at each stage "
            "from the seeded fault model, pruning, survivor floor, secrets' holders and shares), so the sum, "
            "survivors, aborts and dropout handling are the faithful protocol's bit for bit, but the server could "
            "read each worker's sum (a device's update where a worker holds one): the guarantee above describes "
            "the faithful protocol, not this run"
        )
        assumptions.insert(0, shortcut)
    if choice.n != cfg.cohort.size or cfg.cohort.sampling == "poisson":
        assumptions.append("Poisson cohorts: k and t are chosen per round for the sampled size (metrics secagg_k, secagg_t)")
    return choice.as_dict() | {
        "min_survivors": survivor_floor(choice),  # max(t, n - D): fewer masked inputs abort the round
        "guarantee": choice.describe() + (f". {shortcut}" if shortcut else ""),
        "simulation_shortcut": cfg.secagg.simulation_shortcut,
        "assumptions": assumptions,
        "randomness": f"{mode} ({why})",
        "references": "Bell et al. 2020 (CCS) sec. 3-4 for k, t and the graph; Bonawitz et al. 2017 (CCS) sec. 6 "
        "for the consistency check and the PKI",
    }


# ----------------------------------------------------------------------------- server side


class SecureAggregation(Mechanism):
    """SecAgg+ as one of the run's mechanisms (fedsim.mechanisms): it decides how the round's sum
    travels (fedsim.exchange runs `secure_round` while it is active), not what is released, so
    it adds no noise and no accounting; it checks its parameters before the run, states its
    guarantee in the run log and in summary.json["secagg"]."""

    summary_key = "secagg"

    def __init__(self, cfg: FedsimConfig, dim: int = 1) -> None:
        self.cfg = cfg
        prepare(cfg, dim)  # a modulus too small or an impossible threat model fails here, not in round 1

    @classmethod
    def enabled(cls, cfg: FedsimConfig) -> bool:
        return cfg.secagg.name == "secaggplus"

    @classmethod
    def create(cls, cfg: FedsimConfig, dataset: object, model: torch.nn.Module) -> tuple[SecureAggregation, torch.nn.Module]:
        del dataset
        return cls(cfg, num_params(model)), model

    def describe(self) -> str:
        return summary(self.cfg)["guarantee"]

    def summary(self) -> dict:
        return summary(self.cfg)


def secure_round(
    *,
    cfg: FedsimConfig,
    grid: Grid,
    plan: list[tuple[int, list[int]]],
    params_vec: torch.Tensor,
    round_num: int,
    config_json: str,
    clip_norm: float | None,
    encoding: SecureEncoding | None = None,
    send: Callable[..., dict[int, Message]] | None = None,
) -> SecureRoundResult:
    """Run the four stages (five in the active threat model; the masked input alone under the
    simulation shortcut) over the workers in `plan` (node id, device ids).

    `encoding` (user-level DP): the norm bound of conditional rounding and, with distributed
    noise, the Skellam variance every released sum must carry; each device adds 1/h of it, h
    the fewest honest inputs a released sum can hold (see below), so any sum has at least that.
    """
    t0 = time.perf_counter()
    cohort = sorted(d for _, ids in plan for d in ids)
    position = {d: i for i, d in enumerate(cohort)}
    if len(cohort) < 2:
        return SecureRoundResult(None, 0, [], aborted=f"only {len(cohort)} device(s) sampled; SecAgg+ needs 2")
    n, dim = len(cohort), len(params_vec)
    names = stats_names(cfg)
    if encoding is None and distributed_dpsgd(cfg):  # sample-level DP with distributed noise
        from fedsim.privacy.distributed_sgd import encoding as example_encoding

        encoding = example_encoding(cfg, dim)
    try:  # k and t first: the noise shares depend on t
        params = session_params(cfg, n, dim + len(names), 64, round_num)
    except ConfigError as err:  # a Poisson cohort too small for the threat model: this round only
        return SecureRoundResult(None, 0, [], aborted=f"no secure (k, t) for this round's cohort: {err.message}")
    # Distributed noise: the server sums at least `min_inputs` masked inputs or aborts before
    # unmasking (the larger of t and n - D, D the dropouts the threat model budgets for), and up
    # to C of them may collude with the server and strip their own share: each device adds
    # 1/(min_inputs - C) of the round's variance, so any sum released carries the accounted noise.
    distributed = encoding is not None and (encoding.update_variance > 0 or encoding.count_variance > 0)
    min_inputs, honest = params.min_survivors, 1
    if distributed:
        choice = graph_choice(cfg, n)
        min_inputs = survivor_floor(choice)
        honest = min_inputs - choice.corrupt
        if honest < 1:
            return SecureRoundResult(None, 0, [], aborted=(
                f"distributed noise cannot be guaranteed: at least {min_inputs} inputs are summed but up to "
                f"{choice.corrupt} colluding devices may remove their shares"))  # fmt: skip
    mu_update = encoding.update_variance / honest if distributed else 0.0  # type: ignore[union-attr]
    mu_count = encoding.count_variance / honest if distributed else 0.0  # type: ignore[union-attr]
    # The sum of all n devices' shares stays within +-B (w.p. 1 - OVERFLOW_PROB): the ring is sized for it.
    bound = skellam_tail_bound(n * mu_update, OVERFLOW_PROB / 2, dim) if mu_update > 0 else 0
    count_bound = skellam_tail_bound(n * mu_count, OVERFLOW_PROB / 2, 1) if mu_count > 0 else 0
    fp = fixed_point(cfg, n, bound, n + count_bound, dim=dim)
    # The server aborts below min_inputs before asking for any share (SecAggServer.collect_masked;
    # ShortcutSession.finish under the shortcut).
    params = dataclasses.replace(params, modulus_bits=fp.modulus_bits, min_survivors=min_inputs)
    shortcut = cfg.secagg.simulation_shortcut
    plan = along_the_ring(plan, cohort, params)
    server_registry: dict[int, bytes] = {}
    server: SecAggServer | None = None
    timeout = cfg.simulation.round_timeout_s
    base = {
        "round": round_num,
        "config": config_json,
        "n": params.num_devices,
        "t": params.threshold,
        "k": params.neighbours,
        "m": params.modulus_bits,
        "length": params.vector_length,
        "session": params.session_id,
        "graph_seed": params.graph_seed,
        "prg": PRG_NAME,  # the mask PRG the server will remove: a device with another refuses
        "active": params.active,
        "clip": fp.clip,
        "bits": fp.bits,
        "dim": dim,
        "stats": list(names),
        "skellam_mu": mu_update,
        "skellam_mu_count": mu_count,
    }
    if encoding is not None:
        base["norm_bound"] = float(encoding.norm_bound)
    if clip_norm is not None:
        base["clip_norm"] = float(clip_norm)

    # `send(grid, messages, timeout=...)`: the server's transport (late workers, a restart of
    # the round when a worker misses a stage before unmasking: fedsim.exchange.exchange).
    if send is None:
        from fedsim.transport import send_and_receive as send

    def exchange(stage: str, requests: dict[int, dict], extra: dict[str, ArrayRecord] | None = None) -> list[RecordDict]:
        started = time.perf_counter()
        messages = []
        for part in plan:
            node, ids = part
            mine = [d for d in ids if position[d] in requests]
            if not mine:
                continue
            job = {**base, "stage": stage, "device_ids": mine, "positions": [position[d] for d in mine]}
            if stage == "masked_input" and wire.groups_of(part) is not None:  # vectorized training
                job["groups"] = keep_in_groups(ids, wire.groups_of(part), set(mine))
            content = RecordDict({"job": ConfigRecord(job)})
            if any(requests[position[d]] for d in mine):  # (advertise_keys asks nothing of a device)
                content["req"] = wire.payload_record({position[d]: requests[position[d]] for d in mine})
            for key, record in (extra or {}).items():
                content[key] = record
            bytes_out[stage] = bytes_out.get(stage, 0) + wire.payload_bytes(content)
            messages.append(Message(content, dst_node_id=node, message_type=MESSAGE_TYPE, group_id=str(round_num)))
        received = []
        for reply in send(grid, messages, timeout=timeout).values():
            if reply.has_error():
                continue  # the worker's devices count as dropped at this stage
            for hook in RECEIVED:
                hook(stage, reply.content)
            bytes_in[stage] = bytes_in.get(stage, 0) + wire.payload_bytes(reply.content)
            errors = wire.records(reply.content, ConfigRecord).get("device_errors")
            for pos, reason in (errors or {}).items():
                device_errors[int(pos)] = str(reason)
                log.warning("round %d: device %d dropped at %s", round_num, cohort[int(pos)], reason)
            received.append(reply.content)
        stage_time[stage] = time.perf_counter() - started
        return received

    def device_payloads(replies: list[RecordDict]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for content in replies:
            for position, fields in wire.read_payloads(wire.records(content, ConfigRecord).get("dev")).items():  # type: ignore[arg-type]
                out[position] = fields if fields is not None else {}  # {}: the protocol rejects it as malformed
        return out

    survivors: dict[str, int] = {}
    session: ShortcutSession | None = None
    bytes_in: dict[str, int] = {}
    bytes_out: dict[str, int] = {}
    stage_time: dict[str, float] = {}
    device_errors: dict[int, str] = {}
    try:
        if shortcut:  # stages 1-2 decided from the seeded drops: no message (fedsim.secagg.shortcut)
            session = ShortcutSession(params, lambda stage, i: _dropped(cfg, stage, round_num, cohort[i]))
            survivors = session.answered
            req3: dict[int, dict] = {i: {} for i in session.before_training()}
        else:
            everyone = {i: {} for i in range(len(cohort))}
            replies = exchange("advertise_keys", everyone)
            keys = device_payloads(replies)
            survivors["advertise_keys"] = len(keys)
            if params.active:  # the PKI is public: the server reads it to drop faulty devices early
                server_registry = pki.lookup(params.session_id, range(len(cohort)))
            server = SecAggServer(params, registry=server_registry if params.active else None)
            req2 = server.collect_keys(keys)
            replies = exchange("share_keys", req2)
            shares = device_payloads(replies)
            survivors["share_keys"] = len(shares)
            req3 = server.collect_shares(shares)
        global_record = {"global": ArrayRecord({"params": wire.pack(params_vec.numpy())})}
        replies = exchange("masked_input", req3, global_record)
        bad: dict[int, dict | None] = {}  # position -> {"bad": [senders]}; None: did not unpack
        for content in replies:
            bad |= wire.read_payloads(wire.records(content, ConfigRecord).get("dev"))  # type: ignore[arg-type]

        def bad_of(p: int) -> object:  # what the device reported; None (malformed) makes the server reject it
            fields = bad.get(p, {})
            return None if fields is None else fields.get("bad", [])

        masked: dict[int, dict] = {}  # faithful: position -> its masked vector and the senders it lacks
        summed: list[tuple[list[int], np.ndarray | None]] = []  # shortcut: each worker's sum of its inputs
        reports: list[DeviceReport] = []
        for content in replies:
            try:
                report = wire.read_report(content, None)
            except wire.BadReply as err:  # its devices are left out whole: no vector without its accounting
                log.warning("round %d: skipping a worker's masked input: %s", round_num, err)
                continue
            # Only vectors of devices this reply's report lists (no vector without its accounting),
            # each position once.
            listed = {position[d] for d in report.device_ids if d in position}
            if shortcut:
                record = wire.records(content, ArrayRecord).get("masked_sum")
                if record is None:  # no device of this worker trained
                    reports.append(report)
                    continue
                try:
                    members = [int(p) for p in wire.records(content, ConfigRecord)["masked_sum_members"]["positions"]]  # type: ignore[union-attr]
                    vector: np.ndarray | None = wire.unpack(record["sum"])
                except (KeyError, TypeError, ValueError):  # (wire.BadReply is a ValueError)
                    members, vector = [], None
                if not members or len(set(members)) != len(members) or set(members) != listed:
                    log.warning("round %d: skipping a worker's masked input: its sum's members are not its devices", round_num)
                    continue
                summed.append((members, vector))  # a malformed vector: ShortcutSession.finish rejects its members
                reports.append(report)
                continue
            for key, arr in (wire.records(content, ArrayRecord).get("masked") or {}).items():
                pos = wire.position_key(key)
                if pos is None or pos not in listed or pos in masked:
                    log.warning("round %d: skipping a masked vector under key %r: not a device of its reply", round_num, key)
                    continue
                try:
                    vector = wire.unpack(arr)
                except wire.BadReply:
                    vector = None  # malformed: SecAggServer.collect_masked rejects this device
                masked[pos] = {"masked": vector, "bad": bad_of(pos)}
            reports.append(report)
        if session is not None:
            aggregate = session.finish(summed)  # stages 3-4's decisions (fedsim.secagg.shortcut)
        else:
            survivors["masked_input"] = len(masked)
            req4 = server.collect_masked(masked)
            if params.active:
                replies = exchange("consistency", req4)
                signatures = device_payloads(replies)
                survivors["consistency"] = len(signatures)
                req4 = server.collect_signatures(signatures)
            replies = exchange("unmask", req4)
            unmask = device_payloads(replies)
            survivors["unmask"] = len(unmask)
            aggregate = server.collect_unmask(unmask)
    except SecAggAborted as err:
        metrics = _metrics(survivors, bytes_in, t0, len(cohort), params, device_errors, session or server)
        return SecureRoundResult(None, 0, [], aborted=err.reason, metrics=metrics)
    in_sum = {cohort[i] for i in (session or server).survivors}
    for report in reports:  # only devices whose masked input made it into the sum
        report.keep_rows([i for i, d in enumerate(report.device_ids) if d in in_sum])
    total = torch.from_numpy(fp.decode_sum(aggregate[:dim]))
    sums = decode_stats(names, from_ring_signed(aggregate[dim:], fp.modulus_bits))
    metrics = _metrics(survivors, bytes_in, t0, len(cohort), params, device_errors, session or server)
    metrics |= {"bytes_sent": sum(bytes_out.values()), "bytes_received": sum(bytes_in.values())}
    metrics |= {f"secagg_stage_time_s_{stage}": t for stage, t in stage_time.items()}
    metrics |= cohort_metrics(sums, len(in_sum))
    if distributed:
        metrics |= {"secagg_noise_min_inputs": min_inputs, "secagg_noise_honest_inputs": honest}
    return SecureRoundResult(total, len(in_sum), reports, metrics=metrics, sums=sums)


def along_the_ring(plan: list[tuple[int, list[int]]], cohort: list[int], params: SecAggParams) -> list[tuple[int, list[int]]]:
    """The placement of both modes: each worker takes a contiguous arc of the neighbour
    graph's ring (as many devices as the plan gave it), so nearly all of a device's neighbours
    are on its own worker, where their key agreements and pair masks are computed once for both
    (`PairMemo`, `masked_inputs`: the same bits). At cohort 1,000 on 2 workers about 98% of the
    pairs are then on one worker instead of about half. Which worker simulates a device changes
    nothing a device computes (its training and rounding streams are its own), so the sum and the
    model are the same bits; the placement is the server's and the ring order public. The plan is
    kept as it is where its devices train in groups (vectorized training: a device's update
    depends on its group) and with one worker. The simulation shortcut places devices the same
    way (it has no masks to share): a worker fault then takes out the same devices in both modes."""
    if len(plan) < 2 or any(wire.groups_of(part) is not None for part in plan):
        return plan
    ring = [cohort[int(p)] for p in ring_order(len(cohort), params.graph_seed or params.session_id)]
    out, start = [], 0
    for node, ids in plan:
        out.append(wire.Assignment(node, sorted(ring[start : start + len(ids)])))
        start += len(ids)
    return out


def cohort_metrics(sums: dict[str, float], count: int) -> dict:
    """Round metrics from the cohort sums (under SecAgg+ the server has nothing per device).

    train_loss is the mean over devices of each device's mean loss (a device-weighted mean:
    an example-weighted one would need each device's loss x examples, a wider coordinate).
    """
    loss = sums.get("loss")  # not sent under distributed DP-SGD
    out: dict = {"num_examples": int(round(sums["num_examples"])), "train_loss": loss / count if count and loss is not None else None}
    if "clip_fraction" in sums:
        devices = sums["clip_fraction_devices"]
        out["clip_fraction"] = sums["clip_fraction"] / devices if devices else None
    return out


def _metrics(
    survivors: dict[str, int], bytes_in: dict[str, int], t0: float, n: int, params: SecAggParams,
    device_errors: dict[int, str], server: SecAggServer | ShortcutSession | None,
) -> dict:  # fmt: skip
    """Survivors per stage, payload bytes per device that answered each stage, protocol time,
    k and t, and the devices dropped for a fault of their own (worker-side or rejected by the server)."""
    out: dict = {f"secagg_survivors_{s}": survivors.get(s) for s in params.stages}
    for stage in params.stages:
        answered = survivors.get(stage)
        out[f"secagg_bytes_per_device_{stage}"] = bytes_in[stage] / answered if answered and stage in bytes_in else None
    out["secagg_time_s"] = time.perf_counter() - t0
    out["secagg_cohort"] = n
    out["secagg_k"], out["secagg_t"] = params.neighbours, params.threshold
    rejected = dict(server.rejected) if server is not None else {}
    for pos, reason in rejected.items():
        log.warning("device at position %d dropped by the server at %s", pos, reason)
    out["secagg_devices_rejected"] = len(set(device_errors) | set(rejected))
    if device_errors or rejected:
        reasons = [reason.split(":")[0] for reason in [*device_errors.values(), *rejected.values()]]
        out["secagg_rejected_stages"] = ",".join(sorted(set(reasons)))
    return out


# ----------------------------------------------------------------------------- worker side


def _dropped(cfg: FedsimConfig, stage: str, round_num: int, device_id: int) -> bool:
    if stage not in STAGES:  # the consistency stage has no fault rate
        return False
    rate = getattr(cfg.secagg, f"drop_{stage}")
    if rate <= 0:
        return False
    rng = np.random.default_rng([cfg.seed, _DROP_STREAM, STAGES.index(stage), round_num, device_id])
    return bool(rng.random() < rate)


def request_of(requests: Mapping[str, ConfigRecord], position: int) -> dict:
    """The server's request to the device at `position` this stage ({} if it sent none); BadReply
    (a ValueError: that device drops alone) if it does not unpack."""
    record = requests.get("req")
    if record is None or str(position) not in record:
        return {}
    return wire.unpack_payload(record[str(position)])  # type: ignore[arg-type]


def _masked_input(
    msg: Message, job: ConfigRecord, worker: Worker, params: SecAggParams, live: list[tuple[int, int]],
    round_num: int, device: Callable[[int, int], SecAggDevice], states: dict[str, bytes], errors: dict[str, str],
    memo: PairMemo,
) -> RecordDict:  # fmt: skip
    """Stage 3 on a worker: train, round, add noise shares and statistics, mask (module doc;
    under the simulation shortcut: add to the worker's unmasked sum instead).

    `device(d, p)` restores device d's protocol state (taking it out of `states`); a device
    whose stage fails drops alone, its reason in `errors`. `memo`: this message's PairMemo."""
    cfg = worker.cfg
    fp = FixedPoint(float(job["clip"]), int(job["bits"]), params.modulus_bits)  # type: ignore[arg-type]
    mu, mu_count = float(job["skellam_mu"]), float(job["skellam_mu_count"])  # type: ignore[arg-type]
    norm_bound = float(job["norm_bound"]) if "norm_bound" in job else None  # type: ignore[arg-type]
    names = tuple(str(n) for n in job["stats"])  # type: ignore[union-attr]
    global_params = torch.from_numpy(wire.unpack(wire.records(msg.content, ArrayRecord)["global"]["params"]).copy())
    requests = wire.records(msg.content, ConfigRecord)  # once: each access rebuilds the view over every record
    clip_norm = float(job["clip_norm"]) if "clip_norm" in job else None  # type: ignore[arg-type]
    device_ids = [int(d) for d in job["device_ids"]]  # type: ignore[union-attr]
    # The plan's groups (vectorized training) without the devices that dropped here.
    sizes = [int(g) for g in job["groups"]] if "groups" in job else None  # type: ignore[union-attr]
    groups = keep_in_groups(device_ids, sizes, {d for d, _ in live})
    streams = randomness.streams(cfg)
    by_example = distributed_dpsgd(cfg)  # distributed DP-SGD: the devices' rounded gradient sums
    if by_example:
        if norm_bound is None:
            raise ValueError("the session gives no rounding bound for distributed DP-SGD")
        if int(job["dim"]) != len(global_params):  # type: ignore[arg-type]
            raise ValueError(f"the session's dim {job['dim']} is not its model's size {len(global_params)}")
        report = worker.gradient_sums(
            global_params, round_num, [d for d, _ in live], norm_bound=norm_bound,
            rounding=lambda d: streams.numpy(EXAMPLE_ROUNDING_STREAM, round_num, d),
        )  # fmt: skip
    else:
        report = worker.train(global_params, round_num, [d for d, _ in live], clip_norm=clip_norm, groups=groups)
    masked: dict[str, Array] = {}
    # Simulation shortcut: the inputs travel unmasked, so the worker ships their sum mod 2^m (one
    # vector instead of one per device; fedsim.secagg.shortcut takes the server's decisions).
    group_sum: np.ndarray | None = np.zeros(params.vector_length, dtype=params.dtype) if cfg.secagg.simulation_shortcut else None
    members: list[int] = []
    bad_senders: dict[int, dict] = {}
    pos_of = dict(live)
    keep: list[int] = []
    waiting: list = []  # faithful: (row, position, device, request, x) of each device ready to mask

    def done(row: int, p: int, dev: SecAggDevice, reply: dict) -> None:
        masked[str(p)] = wire.pack(reply["masked"])
        if reply["bad"]:  # senders whose share ciphertexts did not open: the server drops them
            bad_senders[p] = {"bad": [int(j) for j in reply["bad"]]}
        states[str(p)] = dev.export_state()
        keep.append(row)

    full = np.empty(params.vector_length, dtype=np.int64)  # one device's grid values then statistics (reused)
    ring_buf = np.empty(params.vector_length, dtype=params.dtype) if group_sum is not None else None
    q = full[: params.vector_length - len(names)]
    for row, d in enumerate(report.device_ids):
        p = pos_of[d]
        rounding = streams.numpy(ROUNDING_STREAM, round_num, d)
        noise_rng = streams.numpy(NOISE_STREAM, round_num, d) if mu > 0 or mu_count > 0 else None
        try:
            if by_example:
                q[:] = report.updates[row]
            else:
                fp.encode_int(report.updates[row], rounding, norm_bound, out=q)
        except ValueError as err:  # this device's update cannot be encoded: it drops, the others go on
            errors[str(p)] = f"masked_input: {err}"
            continue
        if mu > 0:  # the device's noise share, on the grid, before masking (Agarwal et al. 2021)
            q += skellam(mu, q.shape, noise_rng)  # type: ignore[arg-type]
        stats = encode_stats(
            names, report.losses[row], report.num_examples[row],
            report.clip_fractions[row] if report.clip_fractions else None,
            report.within_bound[row] if report.within_bound else None, rounding,
        )  # fmt: skip
        if mu_count > 0 and "within_bound" in names:
            stats[names.index("within_bound")] += skellam(mu_count, 1, noise_rng)[0]  # type: ignore[arg-type]
        full[len(q) :] = stats
        if group_sum is not None:  # shortcut: added to the worker's sum at once, so one buffer serves every device
            np.copyto(ring_buf, full, casting="unsafe")  # the low bits: mod 2^32 / 2^64
            np.add(group_sum, ring_buf, out=group_sum)  # wraps mod 2^32 / 2^64, multiples of 2^m
            members.append(p)
            keep.append(row)
            continue
        x = to_ring(full, params.modulus_bits)  # a fresh array (kept until masked): `full` is reused
        try:  # masked below, all at once (each pair mask two devices here share is expanded once)
            waiting.append((row, p, device(d, p), request_of(requests, p), x))
        except DEVICE_FAULTS as err:  # bad input for this device (a peer's key, a request): it drops alone
            errors[str(p)] = f"masked_input: {err}"
    replies = masked_inputs([w[2] for w in waiting], [w[3] for w in waiting], [w[4] for w in waiting], memo=memo)
    for i, (row, p, dev, _, _) in enumerate(waiting):
        reply, waiting[i], replies[i] = replies[i], None, None  # type: ignore[call-overload]  # (each vector freed once packed)
        if isinstance(reply, Exception):
            errors[str(p)] = f"masked_input: {reply}"
            continue
        done(row, p, dev, reply)
    report.keep_rows(sorted(keep))
    # Only masked vectors (shortcut: the unmasked sum of the worker's devices) leave the worker: no
    # update, loss, example count or clipping bit in the clear.
    report.updates, report.losses, report.num_examples = [], [], []
    report.within_bound, report.clip_fractions = [], []
    out = wire.write_report(report)
    if group_sum is None:
        out["masked"] = ArrayRecord(masked)
    if group_sum is not None and members:
        if params.modulus_bits not in (32, 64):
            group_sum &= group_sum.dtype.type((1 << params.modulus_bits) - 1)
        out["masked_sum"] = ArrayRecord({"sum": wire.pack(group_sum)})
        out["masked_sum_members"] = ConfigRecord({"positions": members})
    if bad_senders:
        out["dev"] = wire.payload_record(bad_senders)
    return out


def device_params(job: ConfigRecord, cfg: FedsimConfig) -> SecAggParams:
    """The session's parameters as the worker's devices accept them.

    The simulation shortcut is refused (ValueError) unless this worker process was started by
    fedsim's simulation engine (`SIMULATION_ENV`), whatever the config says.
    Active threat model: the server may lie, so the devices do not take the threat model, k, t
    or the survivor floor from its word: they recompute them from their own copy of the run
    config and the session's n (its devices are numbered 0..n-1, so n is what the session is) and refuse a
    session whose k, t, mode or encoding (`check_encoding`) differ (ValueError). Assumption
    (stated in summary.json): the run config is public and fixed before the run (the workers
    read it from the job, and a deployment's devices would check it against the published
    one); what the server chooses per round is only the cohort, the session's public
    randomness and, with adaptive clipping, the clip norm.
    """
    n, active = int(job["n"]), cfg.secagg.threat_model == "active"  # type: ignore[arg-type]
    if cfg.secagg.simulation_shortcut and os.environ.get(SIMULATION_ENV) != "1":
        # The config comes with the server's message: a server could ask a real device for its
        # update in the clear. Only this process's own environment says it is a simulation.
        raise ValueError(f"the session asks for secagg.simulation_shortcut (inputs sent unmasked), but this worker "
                         f"was not started by fedsim's simulation engine ({SIMULATION_ENV} is not set)")  # fmt: skip
    if bool(job["active"]) != active:
        raise ValueError(f"the session's threat model is not the run config's ({cfg.secagg.threat_model})")
    if job.get("prg") != PRG_NAME:  # e.g. a server of an older fedsim (ChaCha20 masks): the sum would be wrong
        raise ValueError(f"the session's mask PRG ({job.get('prg', 'not named')}) is not this device's ({PRG_NAME})")
    k, t, floor = int(job["k"]), int(job["t"]), 0  # type: ignore[arg-type]
    if active:
        choice = graph_choice(cfg, n)
        if (k, t) != (choice.neighbours, choice.threshold):
            raise ValueError(f"the session's k={k}, t={t} are not the run config's for n={n} "
                             f"(k={choice.neighbours}, t={choice.threshold})")  # fmt: skip
        floor = survivor_floor(choice)
        check_encoding(job, cfg, choice)
    return SecAggParams(
        num_devices=n, threshold=t, neighbours=k, modulus_bits=int(job["m"]),  # type: ignore[arg-type]
        vector_length=int(job["length"]), session_id=bytes(job["session"]),  # type: ignore[arg-type]
        graph_seed=bytes(job["graph_seed"]), active=active, min_survivors=floor,  # type: ignore[arg-type]
    )  # fmt: skip


@functools.lru_cache(maxsize=4)
def _user_level_dp(config_json: str, num_params: int):  # noqa: ANN202 - a UserLevelDP
    from fedsim.privacy.dpfedavg import UserLevelDP

    return UserLevelDP(config_from_job(config_json)[0], num_params=num_params)


def check_encoding(job: ConfigRecord, cfg: FedsimConfig, choice: GraphChoice) -> None:
    """Active threat model with DP-FedAvg or distributed DP-SGD: the round's encoding is what
    the run config implies.

    The grid (range, bits) must be the config's, the fixed clip norm the config's (adaptive
    clipping: the clip norm the server derived from the noisy counts is taken as sent; the
    bound and noise below scale with it), the rounding norm bound no larger than the
    accountant's for that clip norm, and, with distributed noise, each device's Skellam share
    at least 1/h of the variance the accountant assumes, h = max(t, n - D) - C from the config.
    Distributed DP-SGD: the example grid, each example's rounding bound and the noise share,
    from the config's (calibrated) noise multiplier. So a lying server cannot strip the noise
    or loosen the sensitivity. ValueError otherwise.
    """
    user = cfg.privacy.dpfedavg
    if user is None and not distributed_dpsgd(cfg):
        return
    dim = int(job["dim"])  # type: ignore[arg-type]
    if (float(job["clip"]), int(job["bits"])) != grid(cfg, dim):  # type: ignore[arg-type]
        raise ValueError(f"the session's grid (range {job['clip']}, {job['bits']} bits) is not the run config's")
    if user is None:  # distributed DP-SGD: each example's bound and the noise from the config's z
        from fedsim.privacy.distributed_sgd import encoding as example_encoding

        expected = example_encoding(cfg, dim)
        # Exactly the accountant's bound: a tighter one would make rounding fall back (scale the
        # example down) for large examples, a looser one would loosen the sensitivity.
        if abs(float(job["norm_bound"]) - expected.norm_bound) > 1e-12 * expected.norm_bound:  # type: ignore[arg-type]
            raise ValueError(f"the session's rounding norm bound {job['norm_bound']} is not the accountant's {expected.norm_bound:g}")
    else:
        clip = float(job["clip_norm"])  # type: ignore[arg-type]
        if not user.adaptive_clipping and clip != user.clip_norm:
            raise ValueError(f"the session's clip norm {clip:g} is not the run config's ({user.clip_norm:g})")
        expected = _user_level_dp(str(job["config"]), dim).secure_encoding(clip)
        if float(job["norm_bound"]) > expected.norm_bound * (1 + 1e-12):  # type: ignore[arg-type]
            raise ValueError(f"the session's rounding norm bound {job['norm_bound']} exceeds the accountant's {expected.norm_bound:g}")
    honest = survivor_floor(choice) - choice.corrupt
    for key, variance in (("skellam_mu", expected.update_variance), ("skellam_mu_count", expected.count_variance)):
        if variance > 0 and float(job[key]) < variance / honest * (1 - 1e-12):  # type: ignore[arg-type]
            raise ValueError(f"the session's noise share {key}={job[key]} is below the run config's {variance / honest:g}")


def _refuse_session(msg: Message, context: Context, job: ConfigRecord, stage: str, reason: str) -> Message:
    """Every device of the job refuses the session (its parameters are not the run config's):
    no payload leaves, each device is reported with the reason, and the worker forgets the session."""
    positions = [int(p) for p in job["positions"]]  # type: ignore[union-attr]
    log.warning("round %s: devices refuse the SecAgg+ session at %s: %s", job.get("round"), stage, reason)
    context.state["secagg"] = ConfigRecord({})
    out = RecordDict({"device_errors": ConfigRecord({str(p): f"{stage}: refuses the session: {reason}" for p in positions})})
    out["worker"] = MetricRecord({"train_time_s": 0.0, "peak_rss_mb": 0.0})
    return Message(content=out, reply_to=msg)


def handle(msg: Message, context: Context, get_worker: Callable[[str], Worker]) -> Message:
    """One stage for the devices named in `msg`, their secrets kept in `context.state`.

    A device whose stage fails drops alone: its position and "stage: reason" go back in the
    reply's "device_errors" record; the worker's other devices carry on.
    """
    job = wire.records(msg.content, ConfigRecord)["job"]
    stage, round_num = str(job["stage"]), int(job["round"])  # type: ignore[arg-type]
    worker = get_worker(str(job["config"]))
    cfg = worker.cfg
    try:
        params = device_params(job, cfg)
    except (ConfigError, ValueError, TypeError, KeyError) as err:
        return _refuse_session(msg, context, job, stage, getattr(err, "message", None) or str(err))
    registry: dict[int, bytes] = {}
    if params.active and stage != "advertise_keys" and not cfg.secagg.simulation_shortcut:
        # The neighbours' identity keys come from the PKI itself, never from the server's message.
        registry = pki.lookup(params.session_id)
    state = wire.records(context.state, ConfigRecord).get("secagg")
    # A new session starts with a clean slate (an earlier one may have ended without stage 4 here).
    states: dict[str, bytes] = dict(state) if state is not None and stage != "advertise_keys" else {}  # type: ignore[arg-type]
    device_ids = [int(d) for d in job["device_ids"]]  # type: ignore[union-attr]
    positions = [int(p) for p in job["positions"]]  # type: ignore[union-attr]
    out = RecordDict()
    requests = wire.records(msg.content, ConfigRecord)  # once: each access rebuilds the view over every record
    errors: dict[str, str] = {}
    live = [(d, p) for d, p in zip(device_ids, positions, strict=True) if not _dropped(cfg, stage, round_num, d)]
    identity_keys: dict[int, tuple[int, bytes]] = {}  # active, advertise_keys: position -> (device, public key)
    payloads: dict[int, dict] = {}  # position -> this stage's reply (not masked_input's: arrays)
    # Key agreements of two devices of this worker are run once (same bits; PairMemo's doc).
    memo = PairMemo()

    def device(d: int, p: int) -> SecAggDevice:
        kw = {"registry": registry} if params.active else {}
        if stage == "advertise_keys":
            return SecAggDevice(p, params, **kw)  # type: ignore[arg-type]
        return SecAggDevice.restore(params, states.pop(str(p)), **kw)  # type: ignore[arg-type]

    if stage == "masked_input":
        if not cfg.secagg.simulation_shortcut:  # (the shortcut's devices hold no state: stages 1-2 were not run)
            live = [(d, p) for d, p in live if str(p) in states]
        out = _masked_input(msg, job, worker, params, live, round_num, device, states, errors, memo)
    else:
        for d, p in live:
            if stage != "advertise_keys" and str(p) not in states:
                continue  # dropped or failed at an earlier stage
            try:
                request = request_of(requests, p)
                dev = device(d, p)
                if stage == "advertise_keys":
                    payload = dev.advertise_keys()
                    if params.active:
                        identity_keys[p] = (d, dev.identity_public)  # type: ignore[assignment]
                elif stage == "share_keys":
                    payload = dev.share_keys(request, memo=memo)
                else:
                    payload = getattr(dev, stage)(request)
            except DEVICE_FAULTS as err:  # bad input for this device (a peer's key, a request): it drops alone
                errors[str(p)] = f"{stage}: {err}"
                continue
            payloads[p] = payload
            states[str(p)] = dev.export_state()
    if identity_keys:  # before any reply leaves: a device whose key the PKI refuses drops alone
        try:
            refused = pki.register(params.session_id, identity_keys)
        except RuntimeError as err:  # no registry reachable: no neighbour could authenticate these devices
            refused = {p: str(err) for p in identity_keys}
        for p, reason in refused.items():
            errors[str(p)] = f"advertise_keys: identity key not registered: {reason}"
            payloads.pop(p, None)
            states.pop(str(p), None)
    if payloads:
        out["dev"] = wire.payload_record(payloads)
    if stage == "unmask":
        states = {}  # the session is over on this worker
    context.state["secagg"] = ConfigRecord(states)
    if errors:
        out["device_errors"] = ConfigRecord(errors)
    out["worker"] = wire.records(out, MetricRecord).get("worker") or MetricRecord({"train_time_s": 0.0, "peak_rss_mb": 0.0})
    return Message(content=out, reply_to=msg)
