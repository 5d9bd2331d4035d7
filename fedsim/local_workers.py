"""Worker processes on this machine without Ray: `simulation.backend=processes`.

Flower's simulation engine hands each message for a worker to a Backend (Flower's Ray actor pool
by default). On one machine fedsim can run its workers as plain child processes instead
(`flower_adapter.process_backend` plugs this pool in as the engine's backend): no Ray daemons
(GCS, raylet, its Python agents), no object store, no Ray import in any process. The children are
started as the run starts, before the launcher imports torch, so their imports (torch, fedsim's
ClientApp) overlap the launcher's own; a child serves one message at a time, over a socket pair.

What a worker does with a message is the same code as under Ray (`fedsim.client_app.app`), with
the same environment (`SIMULATION_ENV`, one torch thread, this process's import path), so a run
gives the same bits on either backend (tests/test_local_workers.py). A child that dies (a chaos
fault's SIGKILL, the OOM killer) is replaced and its message fails (`WorkerDied`): fedsim resends
the job as it does for a dead Ray actor.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["WorkerDied", "WorkerError", "WorkerPool", "serve"]

FD_ENV = "FEDSIM_WORKER_FD"  # the child's end of its socket pair, by number


class WorkerDied(RuntimeError):
    """A worker process ended (killed, crashed) while it held a message; a new one replaces it."""


class WorkerError(RuntimeError):
    """The ClientApp raised in a worker process: its type and message, as text."""


class _Worker:
    def __init__(self, env: Mapping[str, str]) -> None:
        parent, child = socket.socketpair()
        self.conn = Connection(parent.detach())
        fd = child.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from fedsim.local_workers import serve; from fedsim.client_app import app; serve(app)"],
            env={**os.environ, **env, FD_ENV: str(fd)}, pass_fds=(fd,), stdin=subprocess.DEVNULL,
        )  # fmt: skip
        child.close()

    def hang_up(self) -> None:
        """An idle child reads None and ends; a busy one ends when its reply finds the socket closed."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.conn.close()

    def wait(self, timeout: float) -> None:
        """Reap the child, killed if it still runs after `timeout` seconds."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class WorkerPool:
    """`num_workers` child processes, each running fedsim's ClientApp on the messages it is sent.

    `run` may be called from several threads at once (Flower's engine calls it from one thread
    per worker): each call takes an idle child, waiting for one if none is."""

    def __init__(self, num_workers: int, env: Mapping[str, str]) -> None:
        if num_workers < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {num_workers}")
        self.env = dict(env)
        self.num_workers = num_workers
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._all: list[_Worker] = []
        self._closed = False
        for _ in range(num_workers):
            self._idle.put(self._start())

    def _start(self) -> _Worker:
        worker = _Worker(self.env)
        with self._lock:
            self._all.append(worker)
        return worker

    def is_idle(self) -> bool:
        return not self._idle.empty()

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._all if w.proc.poll() is None]

    def run(self, message: Any, context: Any) -> tuple[Any, Any]:
        """The ClientApp's reply to `message` and its updated `context`, from an idle worker.

        Raises WorkerError when the ClientApp raised, WorkerDied when the process ended."""
        worker = self._idle.get()
        try:
            worker.conn.send((message, context))
            status, first, second = worker.conn.recv()
        except (EOFError, OSError) as err:
            dead, code = worker.proc.pid, worker.proc.wait()
            with self._lock:
                self._all.remove(worker)
            worker.conn.close()
            if not self._closed:
                worker = self._start()
            raise WorkerDied(f"worker process {dead} ended while it held a message (exit status {code})") from err
        finally:
            if not self._closed:
                self._idle.put(worker)
        if status != "ok":
            raise WorkerError(first)
        return first, second

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker (each ends its loop; killed after `timeout` seconds)."""
        self._closed = True
        with self._lock:
            workers, self._all = self._all, []
        for worker in workers:  # all told first, then waited for: they end at the same time
            worker.hang_up()
        for worker in workers:
            worker.wait(timeout)


def serve(app: Callable[..., Any]) -> None:
    """A worker process's loop around `app` (fedsim's ClientApp): (message, context) in, ("ok",
    reply, context) or ("error", text, None) out, until the pool sends None or goes away."""
    conn = Connection(int(os.environ.pop(FD_ENV)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break
        if request is None:
            break
        message, context = request
        try:
            reply = ("ok", app(message=message, context=context), context)
        except Exception as err:  # the ClientApp's failure goes back as the message's error
            reply = ("error", f"{type(err).__name__}: {err}", None)
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError) as err:
            conn.send(("error", f"the worker's reply cannot be sent: {err}", None))
        except OSError:  # the pool closed meanwhile (the run ended or was interrupted)
            break
    # Nothing of a worker needs the interpreter's teardown (it writes no files; the launcher
    # does): ending at once saves about a second a worker with torch loaded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
