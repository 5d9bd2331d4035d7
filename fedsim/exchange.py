"""One round's exchange with the workers: send the round out, bring back the (sum of the)
device updates, as plain messages through the transport (fedsim.transport: deadlines,
retries, lost workers) or as a SecAgg+ session (fedsim.secure_rounds), restarted on other
workers when a worker misses a stage before unmasking. The round loop (fedsim.server_app)
gets a `RoundOutcome` and never sees a message.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedsim import wire
from fedsim.aggregation import RunningSum, group_sum
from fedsim.config import FedsimConfig
from fedsim.mechanisms import Mechanism
from fedsim.placement import cohort_groups
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
    # Workers ship one sum per device group unless the strategy reads each device's update
    # (SCAFFOLD) or a worker holds one device (the classic layout): then rows, which the server
    # folds into the same groups.
    groups = cohort_groups([d for _, ids in plan for d in ids], cfg.simulation.device_group)
    ship_sums = cfg.simulation.layout == "multiplexed" and not (strategy and strategy.needs_device_updates)
    jobs = [
        (part[0], wire.write_job(
            round_num=round_num, device_ids=part[1], config_json=config_json, global_params=params.numpy(),
            clip_norm=clip_norm, groups=wire.groups_of(part),
            arrays=strategy.job_arrays(round_num, part[1]) if strategy else None,
            sums=weighting if ship_sums and wire.groups_of(part) is not None else None,
        ))
        for part in plan
    ]  # fmt: skip
    sent = send_with_retries(grid, jobs, round_num=round_num, workers=workers, retries=cfg.simulation.retries, faults=faults)
    running, stats, reports = collect(sent.replies, len(params), weighting=weighting, groups=groups)
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
    that misses the unmask stage is handled by SecAgg+'s own dropout recovery instead.
    """

    def __init__(self, workers: Workers, round_num: int, faults: dict[int, str], *, last: bool) -> None:
        self.workers, self.round_num, self.faults, self.last = workers, round_num, faults, last

    def __call__(self, grid: Grid, messages: list[Message], *, timeout: float | None) -> dict[int, Message]:
        if not messages:
            return {}
        stage = str(messages[0].content.config_records["job"]["stage"])
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
    replies: list[Message], num_params: int, *, weighting: str = "examples", groups: list[list[int]] | None = None
) -> tuple[RunningSum, dict, list[DeviceReport]]:
    """Sum the device updates of all replies and gather round statistics.

    `groups`: the round's device groups (fedsim.placement.cohort_groups; None: the whole reply
    set is one group). A reply brings a row per device (the server folds the rows of each group
    into its float64 sum, in device-id order) or, for a job that asked for it, one sum per group
    its worker trained; the group sums are then added in group order (fedsim.aggregation), so
    the total does not depend on the workers, their number or the order of the replies.
    `weighting`: each device's weight, "examples" (FedAvg) or "ones" (clipped updates under
    user-level DP, fedsim.reports.device_weight).
    """
    key_of = {d: group[0] for group in groups for d in group} if groups is not None else None
    total = RunningSum(num_params)
    reports: list[DeviceReport] = []
    entries: list[tuple[int, np.ndarray, float, int]] = []  # (group key, sum, weight, devices)
    rows: dict[int, list[tuple[int, np.ndarray, float]]] = defaultdict(list)  # group key -> (device, row, weight)
    counted: set[int] = set()
    received = 0
    for reply in replies:
        if reply.has_error():
            log.warning("a worker failed: %s", (reply.error.reason or "").splitlines()[0] if reply.error.reason else reply.error.code)
            continue
        received += wire.payload_bytes(reply.content)
        try:
            report = wire.read_report(reply.content, num_params)
            check_groups(report, key_of, counted)
        except wire.BadReply as err:
            log.warning("skipping a worker's reply: %s", err)
            continue
        reject_non_finite(report)  # device replies are input: a NaN must not reach the model
        reject_non_finite_sums(report, key_of)
        counted.update(report.device_ids)
        reports.append(report)
        for device_id, reason in zip(report.failed_ids, report.failures, strict=True):
            log.warning("device %d failed: %s", device_id, reason)
        weight = {d: device_weight(n, weighting) for d, n in zip(report.device_ids, report.num_examples, strict=True)}
        for key, vector in zip(report.sum_keys, report.sums, strict=True):
            mine = [d for d in report.device_ids if key_of[d] == key]  # type: ignore[index]
            entries.append((key, vector, sum(weight[d] for d in mine), len(mine)))
        for d, u in zip(report.device_ids if not report.sums else [], report.updates, strict=True):
            rows[key_of[d] if key_of is not None else 0].append((d, u, weight[d]))
    for key, members in rows.items():
        members.sort(key=lambda t: t[0])  # device-id order within the group
        entries.append((key, group_sum([(u, w) for _, u, w in members], num_params), sum(w for *_, w in members), len(members)))
    total.add_groups(entries)
    stats = round_stats(reports) | {"bytes_received": received}
    return total, stats, reports


def check_groups(report: DeviceReport, key_of: dict[int, int] | None, counted: set[int]) -> None:
    """Refuse (BadReply) a reply naming a device outside the round's groups or one another reply
    already brought, or whose sums are not exactly one per group of its devices."""
    ids = report.device_ids
    if len(set(ids)) != len(ids) or counted.intersection(ids):
        raise wire.BadReply("the reply lists a device twice, or one another reply already brought")
    if key_of is None:
        if report.sums:
            raise wire.BadReply("the reply brings group sums, which the round did not ask for")
        return
    if any(d not in key_of for d in ids):
        raise wire.BadReply("the reply lists a device that is not in this round's cohort")
    if report.sums and sorted(report.sum_keys) != sorted({key_of[d] for d in ids}):
        raise wire.BadReply(f"the reply's sums are for groups {report.sum_keys}, not the groups of its devices")


def reject_non_finite_sums(report: DeviceReport, key_of: dict[int, int] | None) -> None:
    """A group sum with NaN/inf values fails its group's devices (moved to the failures), in place."""
    bad = {key for key, vector in zip(report.sum_keys, report.sums, strict=True) if not all_finite(vector)}
    if not bad or key_of is None:
        return
    for d in report.device_ids:
        if key_of[d] in bad:
            report.failed_ids.append(d)
            report.failures.append("rejected by the server: its group's sum has NaN/inf values")
    report.keep_rows([i for i, d in enumerate(report.device_ids) if key_of[d] not in bad])
    kept = [i for i, key in enumerate(report.sum_keys) if key not in bad]
    report.sum_keys, report.sums = [report.sum_keys[i] for i in kept], [report.sums[i] for i in kept]
