"""One round's exchange with the workers: send the round out, bring back the (sum of the)
device updates, as plain messages through the transport (fedsim.transport: deadlines,
retries, lost workers) or as a SecAgg+ session (fedsim.secure_rounds), restarted on other
workers when a worker misses a stage before unmasking. The round loop (fedsim.server_app)
gets a `RoundOutcome` and never sees a message.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedsim import wire
from fedsim.aggregation import Node, RunningSum, tree_nodes
from fedsim.config import FedsimConfig
from fedsim.mechanisms import Mechanism
from fedsim.reports import DeviceReport, all_finite, device_weight, reject_non_finite
from fedsim.secure_rounds import secure_round
from fedsim.strategies import Strategy
from fedsim.transport import Workers, send_and_receive, send_with_retries, with_fault, worker_faults

log = logging.getLogger("fedsim")


@dataclass
class RoundOutcome:
    """What came back from the devices in one round, before the server's update."""

    total: torch.Tensor | None  # float64 (weighted) sum of the updates; None: nothing released
    count: int  # devices in the sum
    weight: float  # the sum's denominator for FedAvg (examples, or devices under SecAgg+)
    reports: list[DeviceReport]
    stats: dict  # metrics of the round (loss, bytes, time, secagg stages, ...)
    count_sum: float | None = None  # SecAgg+ with adaptive clipping: secure sum of (2 b_i - 1) (+ device noise)
    aborted: str | None = None  # SecAgg+ aborted the round before the server could unmask a sum


def exchange(
    cfg: FedsimConfig,
    grid: Grid,
    plan: list[tuple[int, list[int]]],
    params: torch.Tensor,
    round_num: int,
    config_json: str,
    release: Mechanism | None,
    workers: Workers,
    replan: Callable[[list[int]], list[wire.Assignment]] | None = None,
    strategy: Strategy | None = None,
) -> RoundOutcome:
    """Send the round to the workers and bring back the (sum of the) device updates.
    (`replan(nodes)`: the round's plan over other workers, for a SecAgg+ round that restarts.)"""
    clip_norm = release.clip_norm if release else None  # the releasing mechanism's per-device clip
    f = cfg.faults
    faults = worker_faults(seed=cfg.seed, round_num=round_num, nodes=[node for node, _ in plan], kill_rate=f.worker_kill_rate,
                           pause_rate=f.worker_pause_rate, pause_s=f.worker_pause_s)  # fmt: skip
    if cfg.secagg.name == "secaggplus":
        # SecAgg+: the server only ever holds the sum of the survivors' updates.
        secure, restarts = None, 0
        for attempt in range(1 + cfg.simulation.retries):
            if attempt:
                alive = workers.wait_for_alive(grid)
                if not alive or replan is None:
                    break
                plan = replan(alive)
            sender = SecureStages(workers, round_num, faults if attempt == 0 else {}, last=attempt == cfg.simulation.retries)
            try:
                secure = secure_round(
                    cfg=cfg, grid=grid, plan=plan, params_vec=params, round_num=round_num,
                    config_json=config_json, clip_norm=clip_norm,
                    encoding=release.secure_encoding() if release else None,
                    send=sender,
                )  # fmt: skip
                break
            except StageMissed as missed:
                restarts += 1
                log.warning("round %d: %s; the secure round starts again (fresh session) on the other workers", round_num, missed)
        if secure is None:  # every worker was lost during the restarts
            stats = round_stats([]) | {"bytes_sent": 0, "bytes_received": 0, "worker_retries": restarts}
            return RoundOutcome(None, 0, 0.0, [], stats | {"secagg_aborted": "no worker left"})
        stats = round_stats(secure.reports) | {"bytes_sent": 0, "bytes_received": 0} | secure.metrics
        stats |= {"worker_retries": restarts}
        if secure.aborted:
            log.warning("round %d aborted (model, ledger and accounting unchanged): %s", round_num, secure.aborted)
            stats["secagg_aborted"] = secure.aborted
        # Under SecAgg+ devices are weighted equally: the sum is all the server gets.
        return RoundOutcome(
            secure.total, secure.count, float(secure.count), secure.reports, stats, secure.sums.get("within_bound"),
            secure.aborted,
        )  # fmt: skip
    # DP-FedAvg sums clipped updates with weight 1: a device's influence is at most C.
    weighting = "examples" if release is None else "ones"
    # Workers ship the sums of the cohort tree's nodes over their devices unless the strategy
    # reads each device's update (SCAFFOLD) or a worker holds one device (the classic layout):
    # then rows, which the server makes into the same tree's leaves (fedsim.aggregation).
    cohort = sorted(d for _, ids in plan for d in ids)
    ship_sums = cfg.simulation.layout == "multiplexed" and not (strategy and strategy.needs_device_updates)

    def sum_range(ids: list[int]) -> tuple[int, int] | None:
        start = bisect.bisect_left(cohort, ids[0]) if ids else 0
        return (start, len(cohort)) if ship_sums and ids and cohort[start : start + len(ids)] == list(ids) else None

    jobs = [
        (part[0], wire.write_job(
            round_num=round_num, device_ids=part[1], config_json=config_json, global_params=params.numpy(),
            clip_norm=clip_norm, groups=wire.groups_of(part),
            arrays=strategy.job_arrays(round_num, part[1]) if strategy else None,
            sums=weighting if span else None, sum_range=span,
        ))
        for part in plan
        for span in [sum_range(part[1])]
    ]  # fmt: skip
    sent = send_with_retries(grid, jobs, round_num=round_num, workers=workers, retries=cfg.simulation.retries, faults=faults)
    running, stats, reports = collect(sent.replies, len(params), weighting=weighting, cohort=cohort, sums_asked=ship_sums,
                                      events_required=cfg.privacy.dpsgd is not None, clip_norm=clip_norm,
                                      job_devices=[plan[j][1] for j in sent.reply_jobs])  # fmt: skip
    stats |= {"bytes_sent": sent.bytes_sent, "workers_failed": sent.jobs_failed, "worker_retries": sent.resent,
              "workers_late": len(sent.late)}  # fmt: skip
    if sent.errors:
        stats["worker_errors"] = sorted(set(sent.errors))
        # Every worker answered with an error: a setup problem. Late workers are not failed ones.
        stats["all_workers_failed"] = not sent.replies and not sent.late
    if not sent.replies:  # nothing came back: no update, no noise step, no privacy spent
        return RoundOutcome(None, 0, 0.0, reports, stats)
    return RoundOutcome(running.total, running.count, running.weight, reports, stats)


class StageMissed(Exception):
    """A worker missed a SecAgg+ stage before unmasking: the round starts again."""


class SecureStages:
    """How `secure_round` sends a stage: through the transport (late workers are suspended like
    in plain rounds), with the round's chaos faults on the masked-input stage of the first
    attempt, and raising StageMissed when a worker gives no answer (or an error) in a stage
    before unmasking, unless this is the last attempt.

    Why a restart is safe and changes nothing (threat model: an honest-but-curious server
    that follows the protocol): the abandoned attempt never reached the unmask stage, so the
    server never asked for (and never holds) the shares that would remove its masks, and its
    masked vectors are uniformly random to it; the new attempt uses a fresh session (new keys,
    new self-masks). Device training and quantization are seeded by (seed, round, device),
    so the restarted round's sum is the one the fault-free round would have had. A worker
    that misses the unmask stage is handled by SecAgg+'s own dropout recovery instead. (The
    faithful protocol; under the simulation shortcut there is no such claim: the server keeps
    the abandoned attempt's unmasked worker sums.)
    """

    def __init__(self, workers: Workers, round_num: int, faults: dict[int, str], *, last: bool) -> None:
        self.workers, self.round_num, self.faults, self.last = workers, round_num, faults, last

    def __call__(self, grid: Grid, messages: list[Message], *, timeout: float | None) -> dict[int, Message]:
        if not messages:
            return {}
        stage = str(wire.records(messages[0].content, ConfigRecord)["job"]["stage"])
        if stage == "masked_input" and self.faults:
            messages = [
                Message(with_fault(m.content, self.faults[m.metadata.dst_node_id]), dst_node_id=m.metadata.dst_node_id,
                        message_type=m.metadata.message_type, group_id=m.metadata.group_id)
                if m.metadata.dst_node_id in self.faults else m
                for m in messages
            ]  # fmt: skip
        replies = send_and_receive(grid, messages, timeout=timeout, clock=self.workers.clock)
        missed, silent = [], []
        for i, m in enumerate(messages):
            node, reply = m.metadata.dst_node_id, replies.get(i)
            if reply is None:
                silent.append((node, m.metadata.message_id, f"no answer within {timeout:g} s in round {self.round_num} ({stage})"))
                missed.append(f"worker {node} gave no answer in {stage}")
            elif reply.has_error():
                missed.append(f"worker {node} failed in {stage}: {(reply.error.reason or '').strip()[:200]}")
            else:
                self.workers.answered(node)
        self.workers.missed_many(silent)
        if missed and stage != "unmask" and not self.last:
            raise StageMissed("; ".join(missed))
        return replies


def round_stats(reports: list[DeviceReport]) -> dict:
    """Loss, examples, time and memory of a round, from the workers' reports."""
    examples = sum(sum(r.num_examples) for r in reports)
    loss_sum = sum(loss * n for r in reports for loss, n in zip(r.losses, r.num_examples, strict=True))
    return {
        "num_examples": examples,
        "devices_late": sum(f.startswith("DeadlineMissed") for r in reports for f in r.failures),
        "train_loss": loss_sum / examples if examples else None,
        "train_time_s": max((r.train_time_s for r in reports), default=0.0),
        "worker_peak_rss_mb": max((r.peak_rss_mb for r in reports), default=0.0),
    }


def collect(
    replies: list[Message],
    num_params: int,
    *,
    weighting: str = "examples",
    cohort: list[int] | None = None,
    sums_asked: bool = True,
    events_required: bool = False,
    clip_norm: float | None = None,
    job_devices: list[list[int]] | None = None,
) -> tuple[RunningSum, dict, list[DeviceReport]]:
    """Sum the device updates of all replies and gather round statistics.

    `cohort`: the round's devices, sorted (None: the devices of the replies); position i is
    the i-th leaf of the tree the sum follows (fedsim.aggregation). A reply brings a row per
    device (the server makes each into its leaf) or, for a job that asked for it, the sums of
    the tree's nodes over its devices; the server finishes the tree over both, so the total
    does not depend on the workers, their number or the order of the replies.
    `weighting`: each device's weight, "examples" (FedAvg) or "ones" (clipped updates under
    user-level DP, fedsim.reports.device_weight). A reply is refused (skipped, with a warning)
    when it brings sums the round did not ask for (`sums_asked` False: the strategy reads each
    device's row), lacks a device's DP-SGD event (`events_required`), names devices outside
    the cohort or already counted, or brings node sums that are not exactly the tree's nodes
    over its devices; a node whose sum is NaN/inf or beyond what float32 updates can sum to
    fails its devices, so the total stays finite and its mean within float32. `clip_norm` (the
    round's C under user-level DP, weighting "ones"): a row whose L2 norm exceeds C, or a node
    sum whose norm exceeds C times its devices, fails its devices (`reject_over_clip`: a sanity
    check of the workers' clipping, which the accountant's sensitivity C rests on).
    `job_devices` (aligned with `replies`): the devices of the job each reply answers; a reply
    naming any other device is refused (a worker cannot report, or claim first, another job's
    devices).
    """
    reports: list[DeviceReport] = []
    received = 0
    for k, reply in enumerate(replies):
        if reply.has_error():
            log.warning("a worker failed: %s", (reply.error.reason or "").splitlines()[0] if reply.error.reason else reply.error.code)
            continue
        received += wire.payload_bytes(reply.content)
        try:
            report = wire.read_report(reply.content, num_params)
        except wire.BadReply as err:
            log.warning("skipping a worker's reply: %s", err)
            continue
        if job_devices is not None and not {*report.device_ids, *report.failed_ids} <= set(job_devices[k]):
            log.warning("skipping a worker's reply: it names devices its job did not send it")
            continue
        reports.append(report)
    if cohort is None:
        cohort = sorted(d for r in reports for d in (*r.device_ids, *r.failed_ids))
    position = {d: i for i, d in enumerate(cohort)}
    n = len(cohort)
    total = RunningSum(num_params)
    sums: dict[Node, np.ndarray] = {}
    rows: dict[int, tuple[np.ndarray, float]] = {}
    kept: list[DeviceReport] = []
    counted: set[int] = set()
    weight_sum, count = 0.0, 0
    for report in reports:
        try:
            check_reply(report, position, n, counted, sums_asked=sums_asked, events_required=events_required)
        except wire.BadReply as err:
            log.warning("skipping a worker's reply: %s", err)
            continue
        reject_non_finite(report)  # device replies are input: a NaN must not reach the model
        weight = {d: device_weight(k, weighting) for d, k in zip(report.device_ids, report.num_examples, strict=True)}
        reject_bad_sums(report, position, weight)
        if clip_norm is not None and weighting == "ones":
            reject_over_clip(report, position, clip_norm)
        counted.update(report.device_ids, report.failed_ids)
        kept.append(report)
        for device_id, reason in zip(report.failed_ids, report.failures, strict=True):
            log.warning("device %d failed: %s", device_id, reason)
        sums.update(zip(report.sum_nodes, report.sums, strict=True))
        for d, u in zip(report.device_ids if not report.sums else [], report.updates, strict=True):
            rows[position[d]] = (u, weight[d])
        weight_sum += sum(weight.values())
        count += len(report.device_ids)
    total.add_tree(n, weight_sum, count, sums=sums, rows=rows)
    stats = round_stats(kept) | {"bytes_received": received}
    return total, stats, kept


def check_reply(
    report: DeviceReport, position: dict[int, int], n: int, counted: set[int], *, sums_asked: bool, events_required: bool
) -> None:
    """Refuse (BadReply) a reply naming a device outside the cohort, twice, or already brought by
    another reply; one of sums the round did not ask for, or lacking a device's DP-SGD event;
    and one whose node sums are not exactly the tree's nodes over its devices that hold a
    trained device."""
    listed = [*report.device_ids, *report.failed_ids]
    if len(set(listed)) != len(listed) or counted.intersection(listed):
        raise wire.BadReply("the reply lists a device twice, or one another reply already brought")
    if any(d not in position for d in listed):
        raise wire.BadReply("the reply lists a device that is not in this round's cohort")
    if events_required and len(report.dp_events) != len(report.device_ids):
        raise wire.BadReply(f"the reply lists {len(report.device_ids)} devices but {len(report.dp_events)} "
                            "DP-SGD events: a device the server cannot account for is not aggregated")  # fmt: skip
    if not report.sums:
        return
    if not sums_asked:
        raise wire.BadReply("the reply brings sums, but the round asked for a row per device")
    places = sorted(position[d] for d in listed)
    if places != list(range(places[0], places[0] + len(places))):
        raise wire.BadReply("the reply's devices are not a contiguous range of the cohort")
    trained = {position[d] for d in report.device_ids}
    expected = [node for node in tree_nodes(places[0], places[-1] + 1, n) if any(node[0] <= p < node[1] for p in trained)]
    if report.sum_nodes != expected:
        raise wire.BadReply(f"the reply's sums are for tree nodes {report.sum_nodes}, expected {expected}")


FLOAT32_MAX = float(np.finfo(np.float32).max)
# Workers clip in float32 (norm <= C (1 + 1e-7), fedsim.privacy.user_level.clip_update) and sum in
# float64: a correctly clipped row or node stays far inside this slack.
CLIP_SLACK = 1e-5


def reject_over_clip(report: DeviceReport, position: dict[int, int], clip_norm: float) -> None:
    """Under user-level DP: fail (move to the failures, in place) a device whose row has an L2
    norm above clip_norm, or the devices of a node whose sum has a norm above clip_norm times
    the node's devices (the triangle inequality's bound for clipped rows).

    A sanity check, not the guarantee: the sensitivity C rests on the workers' clipping, which
    is fedsim's own code (the workers are part of the simulator, as the server is). A node sum
    within the bound does not prove each device was clipped (unclipped updates in different
    directions can sum to less), and a worker that means harm can put a node's whole budget on
    one device. It catches a worker that did not clip an aligned or large update, or ships a
    sum of the wrong scale."""
    limit = clip_norm * (1 + CLIP_SLACK)
    reason = f"rejected by the server: update norm above the clip norm {clip_norm:g} (user-level DP)"
    if not report.sums:
        over = {d for d, u in zip(report.device_ids, report.updates, strict=True)
                if float(np.linalg.norm(np.asarray(u, dtype=np.float64))) > limit}  # fmt: skip
        if over:
            report.fail_devices(over, reason)
        return
    places = [position[d] for d in report.device_ids]
    bad = [
        (lo, hi)
        for (lo, hi), vector in zip(report.sum_nodes, report.sums, strict=True)
        if float(np.linalg.norm(vector)) > limit * sum(1 for p in places if lo <= p < hi)
    ]
    fail_nodes(report, position, bad, reason.replace("update norm", "sum of its node"))


def reject_bad_sums(report: DeviceReport, position: dict[int, int], weight: dict[int, float]) -> None:
    """A node sum with NaN/inf values, or an entry beyond (the node's weight) x float32's
    largest value (more than the node's float32 updates can sum to: the float64 total then
    cannot overflow, nor its mean leave float32), fails the node's devices (moved to the
    failures), in place."""
    if not report.sums:
        return
    bad: list[Node] = []
    for (lo, hi), vector in zip(report.sum_nodes, report.sums, strict=True):
        limit = FLOAT32_MAX * sum(w for d, w in weight.items() if lo <= position[d] < hi)
        # max |x| as max(max x, -min x): no |x| copy of a 6.9 MB sum
        if not all_finite(vector) or max(float(vector.max(initial=0.0)), -float(vector.min(initial=0.0))) > limit:
            bad.append((lo, hi))
    fail_nodes(report, position, bad, "rejected by the server: its sum has NaN/inf or out-of-range values")


def fail_nodes(report: DeviceReport, position: dict[int, int], bad: list[Node], reason: str) -> None:
    """Drop these node sums from a report of shipped sums and fail their devices, in place."""
    if not bad:
        return
    report.fail_devices({d for d in report.device_ids if any(lo <= position[d] < hi for lo, hi in bad)}, reason)
    kept = [i for i, node in enumerate(report.sum_nodes) if node not in bad]
    report.sum_nodes, report.sums = [report.sum_nodes[i] for i in kept], [report.sums[i] for i in kept]
