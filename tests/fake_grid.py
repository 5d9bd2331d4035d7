"""A grid without Flower's engines, for tests of the server's round loop: fedsim's own
ClientApp answers each message in this process, so `run_rounds` runs for real (training,
aggregation, privacy, checkpoints) in a second, with no Ray, no SuperLink and no sleeps.
Replies become visible when a fake clock reaches the time a worker would answer.
"""

from __future__ import annotations

import os

from flwr.app import Context, Message, RecordDict

from fedsim.flower_adapter import set_message_id, task_identity, task_identity_patches


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def set_flower_identity(monkeypatch) -> None:
    """Flower's Message needs the ids the engine sets in a real ServerApp/ClientApp process."""
    for target, name, value in task_identity_patches():
        monkeypatch.setattr(target, name, value)


class ClockedGrid:
    """A grid whose workers answer when a fake clock reaches the time they would: `answer(message,
    node)` makes the reply (None: no reply); `dead` nodes never answer, `paused_until` delays a
    node's replies (SIGSTOP, a loaded machine). `sent` keeps (node, message) per message pushed."""

    def __init__(self, nodes: list[int], clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.listed = set(nodes)
        self.dead: set[int] = set()
        self.paused_until: dict[int, float] = {}  # node -> clock time it answers again
        self.sent: list[tuple[int, Message]] = []
        self._replies: dict[str, tuple[float, Message]] = {}

    def answer(self, message: Message, node: int) -> Message | None:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return sorted(self.listed)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for m in messages:
            mid = f"msg{len(self.sent)}"
            set_message_id(m, mid)  # what Flower's grids do
            node = m.metadata.dst_node_id
            self.sent.append((node, m))
            ids.append(mid)
            if node not in self.dead:
                reply = self.answer(m, node)
                if reply is not None:
                    self._replies[mid] = (max(self.clock.t, self.paused_until.get(node, 0.0)), reply)
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        ready = [mid for mid in message_ids if mid in self._replies and self._replies[mid][0] <= self.clock.t]
        return [self._replies.pop(mid)[1] for mid in ready]


class LocalGrid(ClockedGrid):
    """`num_workers` worker nodes running fedsim.client_app.app in this process."""

    def __init__(self, num_workers: int, clock: FakeClock | None = None) -> None:
        from fedsim.client_app import app
        from fedsim.config import SIMULATION_ENV

        # An in-process simulation engine, as fedsim.run marks its workers (conftest puts it back after the test).
        os.environ[SIMULATION_ENV] = "1"
        self.app = app
        self.nodes = list(range(101, 101 + num_workers))
        super().__init__(self.nodes, clock)
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in self.nodes}

    def answer(self, message: Message, node: int) -> Message:
        return self.app(message, self.contexts[node])


def run_local(cfg, run_dir, workers: int | None = None) -> dict:  # noqa: ANN001 - FedsimConfig, Path
    """The run `fedsim.run.run(cfg, run_dir)` makes, on `LocalGrid` in this process (no Ray):
    the same ClientApp and round loop, so the same model bit for bit. Tests compare one Ray run
    with this instead of paying Ray's start-up for every reference run."""
    from fedsim.server_app import prepare, run_rounds

    state = None
    if cfg.resume:  # as `fedsim resume=DIR` does: the checkpoint's config, directory and state
        from fedsim.run import _resumed

        cfg, run_dir, state = _resumed(cfg)
    with task_identity():
        return run_rounds(cfg, LocalGrid(workers or cfg.num_workers), run_dir, prepare(cfg, resume=state))
