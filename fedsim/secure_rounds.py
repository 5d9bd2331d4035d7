"""A training round under SecAgg+ on Flower messages: four stages, one message per worker each.

    stage 1 advertise_keys  server -> workers: session parameters, each worker's device positions
                            workers -> server: every device's two X25519 public keys
    stage 2 share_keys      server -> workers: each device's live neighbours' public keys
                            workers -> server: encrypted Shamir shares, one per neighbour
    stage 3 masked_input    server -> workers: global weights + the shares addressed to each device
                            workers -> server: each device trains, clips (DP-FedAvg), quantizes,
                            adds its noise share (distributed DP) and masks: only masked vectors leave
    stage 4 unmask          server -> workers: which neighbours survived stage 3
                            workers -> server: b-shares of survivors, s-shares of the dropped
The server then removes the masks and decodes the sum (fedsim.secagg.SecAggServer). It
never receives a device's unmasked update: `RECEIVED` hooks let a test record everything
that reaches the server. A device's secrets stay on its worker, in the worker node's
Flower state (`context.state`), between stages. Fewer than t survivors abort the round:
the model, the ledger and the accounting stay as they were.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsim import wire
from fedsim.config import FedsimConfig
from fedsim.errors import ConfigError
from fedsim.secagg import (
    FixedPoint,
    SecAggAborted,
    SecAggDevice,
    SecAggParams,
    SecAggServer,
    default_params,
    realized_total_variance,
    skellam,
    skellam_tail_bound,
)
from fedsim.worker import DeviceReport, Worker, keep_in_groups

STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")
MESSAGE_TYPE = "train.secagg"
_DROP_STREAM = 0xD20B
_QUANT_STREAM = 0x9A17

# Everything the server receives in a secure round passes through these callables (tests).
RECEIVED: list[Callable[[str, RecordDict], None]] = []


@dataclass
class SecureRoundResult:
    total: torch.Tensor | None  # float64 sum of the survivors' updates (None: aborted)
    count: int  # devices in the sum
    reports: list[DeviceReport]  # metadata of the devices in the sum (no updates)
    aborted: str | None = None
    metrics: dict = field(default_factory=dict)
    noise_std: float = 0.0  # std of the distributed noise the survivors added to `total` (float units)


def fixed_point(cfg: FedsimConfig, num_devices: int, noise_bound: int = 0) -> FixedPoint:
    """The round's encoding: m chosen (or the configured m checked) so the cohort's sum, noise
    included, cannot wrap around."""
    sa, user = cfg.secagg, cfg.privacy.dpfedavg
    clip = sa.clip_range or (user.clip_norm if user is not None and not user.adaptive_clipping else 1.0)
    try:
        return FixedPoint.for_sum(clip, sa.bits, num_devices, noise_bound, modulus_bits=sa.modulus_bits)
    except ValueError as err:
        raise ConfigError("secagg.modulus_bits", str(err)) from None


def noise_plan(fp_clip: FixedPoint, device_noise: Callable[[float], float] | None, n: int, length: int) -> tuple[float, int]:
    """Per-device Skellam variance on the grid and the bound B its sum stays within (w.p. 1 - 1e-9)."""
    if device_noise is None:
        return 0.0, 0
    mu = device_noise(fp_clip.step)
    return mu, skellam_tail_bound(mu * n, 1e-9, length) if mu > 0 else 0


def session_params(cfg: FedsimConfig, num_devices: int, num_params: int, modulus_bits: int) -> SecAggParams:
    session = os.urandom(16)  # public, fresh per round: seeds the graph and salts every key
    params = default_params(num_devices, num_params, modulus_bits, session)
    sa = cfg.secagg
    if sa.neighbours is None and sa.threshold is None:
        return params
    k = min(sa.neighbours or params.neighbours, num_devices - 1)
    t = sa.threshold or k // 2 + 1
    try:
        return SecAggParams(num_devices, t, k, modulus_bits, num_params, session)
    except ValueError as err:
        raise ConfigError("secagg.neighbours", str(err)) from None


# ----------------------------------------------------------------------------- server side


def secure_round(
    *,
    cfg: FedsimConfig,
    grid: Grid,
    plan: list[tuple[int, list[int]]],
    params_vec: torch.Tensor,
    round_num: int,
    config_json: str,
    clip_norm: float | None,
    device_noise: Callable[[float], float] | None = None,
    send: Callable[..., dict[int, Message]] | None = None,
) -> SecureRoundResult:
    """Run the four stages over the workers in `plan` (node id, device ids).

    `device_noise(step)`: distributed DP, the Skellam variance each device adds on a grid of
    spacing `step`; the result's `noise_std` is the noise the survivors actually added.
    """
    t0 = time.perf_counter()
    cohort = sorted(d for _, ids in plan for d in ids)
    position = {d: i for i, d in enumerate(cohort)}
    if len(cohort) < 2:
        return SecureRoundResult(None, 0, [], aborted=f"only {len(cohort)} device(s) sampled; SecAgg+ needs 2")
    mu, bound = noise_plan(fixed_point(cfg, len(cohort)), device_noise, len(cohort), len(params_vec))
    fp = fixed_point(cfg, len(cohort), bound)
    params = session_params(cfg, len(cohort), len(params_vec), fp.modulus_bits)
    server = SecAggServer(params)
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
        "clip": fp.clip,
        "bits": fp.bits,
        "skellam_mu": mu,
    }
    if clip_norm is not None:
        base["clip_norm"] = float(clip_norm)

    # `send(grid, messages, timeout=...)`: the server's transport (late workers, a restart of
    # the round when a worker misses a stage before unmasking: fedsim.server_app.exchange).
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
            for d in mine:
                content[f"req.{position[d]}"] = ConfigRecord(requests[position[d]])
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
            received.append(reply.content)
        stage_time[stage] = time.perf_counter() - started
        return received

    def device_payloads(replies: list[RecordDict]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for content in replies:
            for key, record in content.config_records.items():
                if key.startswith("dev."):
                    out[int(key[4:])] = dict(record)
        return out

    survivors: dict[str, int] = {}
    bytes_in: dict[str, int] = {}
    bytes_out: dict[str, int] = {}
    stage_time: dict[str, float] = {}
    try:
        everyone = {i: {} for i in range(len(cohort))}
        replies = exchange("advertise_keys", everyone)
        keys = device_payloads(replies)
        survivors["advertise_keys"] = len(keys)
        req2 = server.collect_keys(keys)
        replies = exchange("share_keys", req2)
        shares = device_payloads(replies)
        survivors["share_keys"] = len(shares)
        req3 = server.collect_shares(shares)
        global_record = {"global": ArrayRecord({"params": Array(params_vec.numpy())})}
        replies = exchange("masked_input", req3, global_record)
        masked: dict[int, dict] = {}
        reports: list[DeviceReport] = []
        for content in replies:
            arrays = content.array_records.get("masked")
            for key, arr in (arrays or {}).items():
                masked[int(key)] = {"masked": arr.numpy()}
            reports.append(wire.read_report(content, None))
        survivors["masked_input"] = len(masked)
        req4 = server.collect_masked(masked)
        replies = exchange("unmask", req4)
        unmask = device_payloads(replies)
        survivors["unmask"] = len(unmask)
        aggregate = server.collect_unmask(unmask)
    except SecAggAborted as err:
        return SecureRoundResult(None, 0, [], aborted=err.reason, metrics=_metrics(survivors, bytes_in, t0, len(cohort)))
    in_sum = {cohort[i] for i in server.survivors}
    for report in reports:  # only devices whose masked input made it into the sum
        report.keep_rows([i for i, d in enumerate(report.device_ids) if d in in_sum])
    total = torch.from_numpy(fp.decode_sum(aggregate, len(in_sum), bound))
    # Each survivor added Skellam(mu) on the grid: the sum carries variance mu * survivors.
    noise_std = math.sqrt(realized_total_variance(mu, len(in_sum))) * fp.step
    metrics = _metrics(survivors, bytes_in, t0, len(cohort))
    metrics |= {"bytes_sent": sum(bytes_out.values()), "bytes_received": sum(bytes_in.values())}
    metrics |= {f"secagg_stage_time_s_{stage}": t for stage, t in stage_time.items()}
    return SecureRoundResult(total, len(in_sum), reports, metrics=metrics, noise_std=noise_std)


def _metrics(survivors: dict[str, int], bytes_in: dict[str, int], t0: float, n: int) -> dict:
    """Survivors per stage, payload bytes per device that answered each stage, protocol time."""
    out: dict = {f"secagg_survivors_{s}": survivors.get(s) for s in STAGES}
    for stage in STAGES:
        answered = survivors.get(stage)
        out[f"secagg_bytes_per_device_{stage}"] = bytes_in[stage] / answered if answered and stage in bytes_in else None
    out["secagg_time_s"] = time.perf_counter() - t0
    out["secagg_cohort"] = n
    return out


# ----------------------------------------------------------------------------- worker side


def _dropped(cfg: FedsimConfig, stage: str, round_num: int, device_id: int) -> bool:
    rate = getattr(cfg.secagg, f"drop_{stage}")
    if rate <= 0:
        return False
    rng = np.random.default_rng([cfg.seed, _DROP_STREAM, STAGES.index(stage), round_num, device_id])
    return bool(rng.random() < rate)


def handle(msg: Message, context: Context, get_worker: Callable[[str], Worker]) -> Message:
    """One stage for the devices named in `msg`, their secrets kept in `context.state`."""
    job = msg.content.config_records["job"]
    stage, round_num = str(job["stage"]), int(job["round"])  # type: ignore[arg-type]
    worker = get_worker(str(job["config"]))
    cfg = worker.cfg
    params = SecAggParams(
        num_devices=int(job["n"]), threshold=int(job["t"]), neighbours=int(job["k"]),  # type: ignore[arg-type]
        modulus_bits=int(job["m"]), vector_length=int(job["length"]), session_id=bytes(job["session"]),  # type: ignore[arg-type]
    )  # fmt: skip
    state = context.state.config_records.get("secagg")
    # A new session starts with a clean slate (an earlier one may have ended without stage 4 here).
    secrets: dict[str, bytes] = dict(state) if state is not None and stage != "advertise_keys" else {}  # type: ignore[arg-type]
    device_ids = [int(d) for d in job["device_ids"]]  # type: ignore[union-attr]
    positions = [int(p) for p in job["positions"]]  # type: ignore[union-attr]
    out = RecordDict()
    live = [(d, p) for d, p in zip(device_ids, positions, strict=True) if not _dropped(cfg, stage, round_num, d)]

    if stage == "masked_input":
        fp = FixedPoint(float(job["clip"]), int(job["bits"]), params.modulus_bits)  # type: ignore[arg-type]
        mu = float(job["skellam_mu"])  # type: ignore[arg-type]
        global_params = torch.from_numpy(msg.content.array_records["global"]["params"].numpy())
        clip_norm = float(job["clip_norm"]) if "clip_norm" in job else None  # type: ignore[arg-type]
        # The plan's groups (vectorized training) without the devices that dropped here.
        sizes = [int(g) for g in job["groups"]] if "groups" in job else None  # type: ignore[union-attr]
        groups = keep_in_groups(device_ids, sizes, {d for d, _ in live})
        report = worker.train(global_params, round_num, [d for d, _ in live], clip_norm=clip_norm, groups=groups)
        masked: dict[str, Array] = {}
        pos_of = dict(live)
        for d, update in zip(report.device_ids, report.updates, strict=True):
            p = pos_of[d]
            device = SecAggDevice.restore(params, secrets.pop(str(p)))
            rng = np.random.default_rng([cfg.seed, _QUANT_STREAM, round_num, d])
            # Distributed DP: the device's noise share, added on the grid before masking. Seeded
            # for reproducible simulation; a deployment draws it from the OS.
            noise = skellam(mu, update.shape, rng) if mu > 0 else None
            x = fp.encode(update, rng, noise)
            request = dict(msg.content.config_records[f"req.{p}"])
            masked[str(p)] = Array(device.masked_input(request, x)["masked"])
            secrets[str(p)] = device.export_state()
        report.updates = []  # only masked vectors leave the worker
        out = wire.write_report(report)
        out["masked"] = ArrayRecord(masked)
    else:
        for d, p in live:
            request = dict(msg.content.config_records[f"req.{p}"]) if f"req.{p}" in msg.content.config_records else {}
            if stage == "advertise_keys":
                device = SecAggDevice(p, params)
                payload = device.advertise_keys()
            else:
                blob = secrets.get(str(p))
                if blob is None:
                    continue
                device = SecAggDevice.restore(params, blob)
                try:
                    payload = device.share_keys(request) if stage == "share_keys" else device.unmask(request)
                except SecAggAborted:
                    continue  # this device cannot go on: it drops
            out[f"dev.{p}"] = ConfigRecord(payload)
            secrets[str(p)] = device.export_state()
    if stage == "unmask":
        secrets = {}  # the session is over on this worker
    context.state["secagg"] = ConfigRecord(secrets)
    out["worker"] = out.metric_records.get("worker") or MetricRecord({"train_time_s": 0.0, "peak_rss_mb": 0.0})
    return Message(content=out, reply_to=msg)
