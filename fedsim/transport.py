"""Getting a round's jobs to the workers and their replies back: retries, late and lost workers.

A worker (a SuperNode running fedsim's ClientApp) is in one of three states:

    active     it gets jobs.
    late       it missed `round_timeout_s` on a job: the job went to another worker, and this
               one gets no new job (it is *suspended*) until a reply from it arrives; it is
               then active again. Each job counts its first reply, whichever copy (first
               send or resend) it answers; every other copy's reply is discarded by its
               message id, so nothing is counted twice.
    lost       dropped for good: the engine no longer lists it (a SuperNode that stopped, or
               whose heartbeats stopped for the SuperLink's patience), or it missed
               `max_missed_rounds` deadlines in a row.

"Misses in a row" are the deadlines a worker missed since it last answered in time: a job
that timed out is one; while it stays silent, every further `round_timeout_s` is one more (as
if it had been sent a job each time). Hence a silent worker is dropped after
max_missed_rounds * round_timeout_s, a worker that is paused for less than that (a loaded
machine, SIGSTOP, a long garbage collection) is kept, and a worker whose replies always
come late is dropped after max_missed_rounds rounds instead of costing a timeout each round.
A worker that has never answered yet is starting (a SuperNode installs the app and imports
torch on its first job: over a minute on a loaded machine): its silence is not counted.
Misses drop a worker only while another worker keeps its deadlines: when every worker is
late, the timeout is too short for the machine, and the round waits for them, for at most
`startup_s` (max(600 s, max_missed_rounds * round_timeout_s)), then drops them all.

Why a resent job changes nothing: a device's update depends only on (seed, round, device id)
and its group (which depends on the cohort only), never on the worker that computed it, so
the run stays bit-identical whoever answers.

Everything that waits does so through a `Clock`, and everything it talks to is a grid-like
object (`get_node_ids`, `push_messages`, `pull_messages`): tests drive this module with a
fake grid and a fake clock (tests/test_transport.py), without processes or sleeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedsim import wire
from fedsim.errors import FedsimError
from fedsim.flower_adapter import IDLE_POLL_FRACTION, in_process_grid

log = logging.getLogger("fedsim")


class Clock(Protocol):
    """Where time comes from: `time` in runs, a fake one in tests."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class GridLike(Protocol):
    """The part of Flower's Grid this module uses."""

    def get_node_ids(self) -> Iterable[int]: ...

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...


def send_and_receive(
    grid: GridLike, messages: list[Message], *, timeout: float | None, clock: Clock = SYSTEM_CLOCK
) -> dict[int, Message]:
    """Push `messages`, then pull their replies until all are in or `timeout` passed; returns
    {index of the message: its reply}. A reply to anything else is not taken.

    Grid.send_and_receive does the same but sleeps between pulls: 100 ms in-process and 3 s
    on the deployment engine (flwr/superlink/grid/http_grid.py), most of a small round.
    Here the pause grows from 1 ms to 4 ms (in-process: a pull is a dictionary lookup) or
    from 5 ms to 200 ms (over the network); in-process, a wait longer than 0.4 s lets it grow
    to 1% of the time waited (at most 50 ms), so the polls leave the CPU to the workers.
    """
    if not messages:
        return {}
    pushed = {mid for mid in grid.push_messages(messages) if mid}
    # Each message carries the id its grid gave it; a message the grid refused gets no reply.
    index = {m.metadata.message_id: i for i, m in enumerate(messages) if m.metadata.message_id in pushed}
    waiting = set(index)
    replies: dict[int, Message] = {}
    started = clock.monotonic()
    deadline = None if timeout is None else started + timeout
    pause, longest = (0.001, 0.004) if in_process_grid(grid) else (0.005, 0.2)
    while waiting:
        for reply in grid.pull_messages(waiting):
            mid = reply.metadata.reply_to_message_id
            if mid in waiting:
                waiting.discard(mid)
                replies[index[mid]] = reply
        if not waiting or (deadline is not None and clock.monotonic() >= deadline):
            break
        clock.sleep(pause)
        # A long wait (a large model training) polls less: at most 1% of the time waited so far
        # later (measured: 2-4 ms pulls made a 2-worker CNN round's training 8% slower).
        pause = min(pause * 2, max(longest, min(IDLE_POLL_FRACTION * (clock.monotonic() - started), 0.05)))
    return replies


class Workers:
    """The worker SuperNodes of a run and their state: active, late (suspended) or lost.

    See the module docstring for the rules. `late_count` (times each worker missed a
    deadline) and `lost` (why each lost worker was dropped) go to summary.json.
    """

    def __init__(
        self,
        nodes: Iterable[int],
        *,
        timeout_s: float | None,
        max_missed_rounds: int,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.nodes = list(nodes)
        self.timeout_s = timeout_s
        self.max_missed_rounds = max_missed_rounds
        self.clock = clock
        self.lost: dict[int, str] = {}
        self.late_count: dict[int, int] = {}  # deadlines missed over the run, per worker
        self.late_replies_discarded = 0
        self._missed: dict[int, int] = {}  # deadlines missed in a row (since the last reply in time)
        self._silent_since: dict[int, float] = {}  # suspended workers: when their last miss was counted
        self._owed: dict[str, int] = {}  # message id -> worker: replies that come too late to count
        self._started: set[int] = set()  # workers that answered at least once
        self._arrived: dict[str, Message] = {}  # late replies not (yet) used, by message id
        # How long to wait for workers that never answered (see the module docstring).
        self.startup_s = max(600.0, max_missed_rounds * (timeout_s or 0.0))

    # -- state changes

    def missed(self, node: int, message_id: str | None, reason: str) -> None:
        """`node` did not answer `message_id` within the timeout: suspend it (or drop it)."""
        self.missed_many([(node, message_id, reason)])

    def missed_many(self, misses: list[tuple[int, str | None, str]]) -> None:
        """(node, message id, reason) of the jobs one wait left unanswered: all are suspended
        before any miss is counted (whether another worker keeps its deadlines)."""
        misses = [m for m in misses if m[0] not in self.lost]
        for node, message_id, _ in misses:
            if message_id:
                self._owed[message_id] = node
            self._silent_since[node] = self.clock.monotonic()
        for node in dict.fromkeys(node for node, _, _ in misses):
            reason = next(r for n, _, r in misses if n == node)
            self.late_count[node] = self.late_count.get(node, 0) + 1
            self._count_miss(node, reason)
            if node not in self.lost:
                log.warning("worker %d late (%s); its job goes to another worker, it gets work again once it answers",
                            node, reason)  # fmt: skip

    def answered(self, node: int) -> None:
        """A reply from `node` arrived in time: its misses in a row start again from zero."""
        self._missed.pop(node, None)
        self._started.add(node)
        self._resume(node)

    def lose(self, node: int, reason: str) -> None:
        if node in self.nodes and node not in self.lost:
            log.warning("worker %d lost (%s); its jobs go to the other workers", node, reason)
            self.lost[node] = reason
            self._silent_since.pop(node, None)
            for mid in [m for m, n in self._owed.items() if n == node]:
                del self._owed[mid]

    def _count_miss(self, node: int, reason: str) -> None:
        self._missed[node] = self._missed.get(node, 0) + 1
        # Only while another worker keeps its deadlines: when every worker is late, the timeout
        # is too short for this machine, and dropping them all would end the run.
        others = any(n != node and n not in self.lost and n not in self._silent_since for n in self.nodes)
        if self._missed[node] >= self.max_missed_rounds and others:
            self.lose(node, f"{reason}; {self._missed[node]} deadlines missed in a row")

    def _resume(self, node: int) -> None:
        if self._silent_since.pop(node, None) is not None:
            log.warning("worker %d answered again; it gets work again", node)

    # -- what the engine and the late replies say

    def refresh(self, grid: GridLike) -> None:
        """Drop workers the engine no longer lists, take in late replies (and discard them),
        and count the deadlines suspended workers keep missing while silent."""
        listed = set(grid.get_node_ids())
        for node in self.nodes:
            if node not in listed:
                self.lose(node, "no longer listed by the engine (SuperNode stopped or its heartbeats ended)")
        if self._owed:
            for reply in grid.pull_messages(set(self._owed)):
                mid = reply.metadata.reply_to_message_id
                node = self._owed.pop(mid, None)
                if node is None:
                    continue
                if reply.has_error():
                    # It may come from the engine itself (the SuperLink answers for a node it
                    # gave up on): only a worker's own reply shows it is back.
                    self.late_replies_discarded += 1
                    continue
                self._arrived[mid] = reply  # send_with_retries may still use it (`claim`)
                if node not in self.lost:
                    self._started.add(node)
                    self._resume(node)
        if self.timeout_s is None:
            return
        now = self.clock.monotonic()
        for node in [n for n in self._silent_since if n in self._started]:
            while node in self._silent_since and now - self._silent_since[node] >= self.timeout_s:
                self._silent_since[node] += self.timeout_s
                self._count_miss(node, f"still silent {self.timeout_s:g} s later")

    def claim(self, message_ids: Iterable[str]) -> dict[str, Message]:
        """Take the late replies to these messages that have arrived."""
        return {mid: self._arrived.pop(mid) for mid in message_ids if mid in self._arrived}

    def drop_unclaimed(self) -> None:
        """Discard late replies nobody used (their job had another copy answered)."""
        self.late_replies_discarded += len(self._arrived)
        self._arrived.clear()

    @property
    def suspended(self) -> list[int]:
        return [n for n in self.nodes if n in self._silent_since and n not in self.lost]

    def alive(self, grid: GridLike) -> list[int]:
        """Workers that get jobs now (listed, not lost, not suspended)."""
        self.refresh(grid)
        return [n for n in self.nodes if n not in self.lost and n not in self._silent_since]

    def wait_for_alive(self, grid: GridLike) -> list[int]:
        """`alive`, but when every remaining worker is suspended, wait for one to answer (or
        for all to be dropped, which returns [])."""
        pause, since = 0.05, self.clock.monotonic()
        while True:
            alive = self.alive(grid)
            if alive or not self.suspended:
                return alive
            if self.clock.monotonic() - since >= self.startup_s:  # bounded: a run never hangs
                for node in self.suspended:
                    self.lose(node, f"every worker silent for {self.startup_s:.0f} s")
                return []
            self.clock.sleep(pause)
            pause = min(pause * 2, 1.0)


FAULT_KEY = "fault"  # in a job's "job" record: "kill" or "pause:<seconds>" (faults.worker_*)
_FAULT_STREAM = 0xC4A05


def worker_faults(
    *, seed: int, round_num: int, nodes: list[int], kill_rate: float, pause_rate: float, pause_s: float
) -> dict[int, str]:
    """Chaos (faults.worker_*): {node: fault} for this round, a seeded choice among `nodes`.

    Drawn from its own stream (seed, round), so the faults never change a device's seeds:
    a run with worker faults must end where the same run without them ends.
    """
    if not nodes or (kill_rate <= 0 and pause_rate <= 0):
        return {}
    rng = np.random.default_rng([seed, _FAULT_STREAM, round_num])
    kill, pause = rng.random() < kill_rate, rng.random() < pause_rate
    # Permute positions, not the ids: Flower's node ids are uint64, and numpy turns a mix of ids
    # below and above 2**63 into float64 (the faults then matched no node: the chaos test ran
    # fault-free whenever a worker's id was >= 2**63). Same draws as permuting the ids.
    ordered = sorted(nodes)
    victims = [ordered[i] for i in rng.permutation(len(ordered))]
    out: dict[int, str] = {}
    if kill:
        out[victims[0]] = "kill"
    if pause and (not kill or len(victims) > 1):
        out[victims[1 if kill else 0]] = f"pause:{pause_s:g}"
    return out


def with_fault(content: RecordDict, fault: str) -> RecordDict:
    """A copy of a job carrying `fault` (shallow: the weights are shared, the job record is new),
    so a resend of the same job goes out without it."""
    copy = RecordDict(dict(content.items()))
    copy["job"] = ConfigRecord({**dict(wire.records(content, ConfigRecord)["job"]), FAULT_KEY: fault})
    return copy


@dataclass
class Delivery:
    """What `send_with_retries` got back for a round's jobs."""

    replies: list[Message]  # the good replies
    jobs_failed: int  # jobs that failed (or got no answer) at least once
    resent: int  # messages sent again
    errors: list[str]  # the workers' error reasons, "worker <node>: <reason>"
    bytes_sent: int  # payload bytes of every message sent, resends included
    late: list[int]  # workers that missed this round's deadline
    reply_jobs: list[int] = field(default_factory=list)  # the job (index into `jobs`) each good reply answers


def send_with_retries(
    grid: GridLike,
    jobs: list[tuple[int, RecordDict]],
    *,
    round_num: int,
    workers: Workers,
    retries: int,
    message_type: str = "train",
    faults: dict[int, str] | None = None,
) -> Delivery:
    """Send each job to its worker; resend the jobs that failed or got no answer in time to
    another active worker, up to `retries` times.

    A worker process can die mid-round (Ray, or a SuperNode's app process, answers with an
    error), a SuperNode can vanish (the engine stops listing it), or be slow (no answer within
    the timeout: late, see `Workers`). When every remaining worker is late, a retry waits for
    one of them to answer again. `faults` (chaos, {node: fault}) go with the first send only.
    """
    timeout, clock = workers.timeout_s, workers.clock
    targets = [node for node, _ in jobs]
    sizes = [wire.payload_bytes(content) for _, content in jobs]
    pending: list[int] = list(range(len(jobs)))
    good: list[Message] = []
    answered: list[int] = []  # the job of each good reply
    ever_failed: set[int] = set()
    errors: list[str] = []
    late: list[int] = []
    resent = sent_bytes = 0
    copies: dict[str, int] = {}  # message id -> job, every copy sent this round
    workers.drop_unclaimed()  # late replies to earlier rounds' jobs

    def take_late_replies() -> None:
        # A copy that came late still counts if no copy of its job has answered yet: the first
        # reply of a job is the one used, every other copy of it is discarded.
        for mid, reply in workers.claim([m for m, job in copies.items() if job in pending]).items():
            if copies[mid] in pending:
                pending.remove(copies[mid])
                good.append(reply)
                answered.append(copies[mid])

    for attempt in range(1 + retries):
        alive = workers.wait_for_alive(grid)
        take_late_replies()
        if not alive or not pending:
            break
        for i, job in enumerate(pending):
            # A retry moves the job off the worker that failed it; any attempt moves it off a
            # worker that is late or lost (the classic layout plans with every node).
            if targets[job] not in alive or (attempt and len(alive) > 1):
                others = [n for n in alive if n != targets[job]] or alive
                targets[job] = others[i % len(others)]
        if attempt:
            resent += len(pending)
        faulty = (faults or {}) if attempt == 0 else {}
        messages = [
            Message(
                with_fault(jobs[job][1], faulty[targets[job]]) if targets[job] in faulty else jobs[job][1],
                dst_node_id=targets[job], message_type=message_type, group_id=str(round_num),
            )
            for job in pending
        ]  # fmt: skip
        sent_bytes += sum(sizes[job] for job in pending)
        replies = send_and_receive(grid, messages, timeout=timeout, clock=clock)
        copies |= {m.metadata.message_id: job for m, job in zip(messages, pending, strict=True) if m.metadata.message_id}
        still, misses = [], []
        for k, job in enumerate(pending):
            reply, node = replies.get(k), targets[job]
            if reply is None:
                silence = f"no answer within {timeout:g} s in round {round_num}"
                misses.append((node, messages[k].metadata.message_id, silence))
                errors.append(f"worker {node}: {silence}")
                if node not in late:
                    late.append(node)
            elif reply.has_error():
                reason = (reply.error.reason or str(reply.error.code)).strip().splitlines()[0][:300]
                log.warning("round %d: worker %d failed (attempt %d): %s", round_num, node, attempt + 1, reason)
                errors.append(f"worker {node}: {reason}")
            else:
                workers.answered(node)
                good.append(reply)
                answered.append(job)
                continue
            still.append(job)
        workers.missed_many(misses)
        ever_failed |= set(still)
        pending[:] = still
        if not pending:
            break
    if pending:
        workers.refresh(grid)
        take_late_replies()
    ever_failed |= set(pending)  # no worker left to send them to, or retries exhausted
    return Delivery(good, len(ever_failed), resent, errors, sent_bytes, late, answered)


def wait_for_workers(
    grid: GridLike, expected: int | None, *, timeout_s: float, clock: Clock = SYSTEM_CLOCK
) -> list[int]:
    """Sorted ids of the worker SuperNodes, once all `expected` have registered (None: all
    that are connected 5 s after the first one is)."""
    deadline = clock.monotonic() + timeout_s
    first_seen = None
    while True:
        nodes = sorted(grid.get_node_ids())
        if expected is None and nodes:
            first_seen = first_seen or clock.monotonic()
            if clock.monotonic() - first_seen >= 5.0:
                return nodes
        elif expected is not None and len(nodes) >= expected:
            return nodes[:expected]
        if clock.monotonic() > deadline:
            raise FedsimError(f"only {len(nodes)} of {expected or 'at least 1'} workers connected within {timeout_s:.0f} s")
        clock.sleep(0.1)
