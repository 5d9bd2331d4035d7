"""Worker processes on this machine without Ray: `simulation.backend=processes`.

Flower's simulation engine hands each message for a worker to a Backend (Flower's Ray actor pool
by default). On one machine fedsim runs its workers as plain processes instead
(`flower_adapter.process_backend` plugs this pool in as the engine's backend): no Ray daemons
(GCS, raylet, its Python agents), no object store, no Ray import in any process.

One template process imports what every worker needs (torch, Flower, fedsim's ClientApp) once,
started as the run starts, so its imports overlap the launcher's; each worker is forked from it
(`template`), so the workers start ready and share the template's pages. The template runs no
torch computation before it forks (no thread pool to inherit) and each forked worker reseeds
Python's and numpy's global generators, which a fresh interpreter seeds from the OS (fedsim
draws nothing from them; torch's default generator starts from its fixed seed either way). A
worker serves one message at a time over its own socket pair (`serve`).

What a worker does with a message is the same code as under Ray (`fedsim.client_app.app`), with
the same environment (`SIMULATION_ENV`, one torch thread, this process's import path), so a run
gives the same bits on either backend (tests/test_local_workers.py). A worker that dies (a chaos
fault's SIGKILL, the OOM killer) is replaced and its message fails (`WorkerDied`): fedsim resends
the job as it does for a dead Ray actor.
"""

from __future__ import annotations

import os
import pickle
import queue
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["WorkerDied", "WorkerError", "WorkerPool", "serve", "template"]

# Ctrl-C is the launcher's to handle (ignored before the imports, and so in every worker too).
TEMPLATE_COMMAND = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "from fedsim.local_workers import template; from fedsim.client_app import app; template(app)"
)
FD_ENV = "FEDSIM_WORKER_FD"  # the template's end of its control socket, by number
_FORK, _STATUS = b"F", b"S"  # the template's two requests: fork a worker; a dead worker's exit status


class WorkerDied(RuntimeError):
    """A worker process ended (killed, crashed) while it held a message; a new one replaces it."""


class WorkerError(RuntimeError):
    """The ClientApp raised in a worker process: its type and message, as text."""


class _Template:
    """The launcher's handle on the template process (`template`): forks workers on request."""

    def __init__(self, env: Mapping[str, str]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control = mine
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TEMPLATE_COMMAND],
            env={**os.environ, **env, FD_ENV: str(theirs.fileno())}, pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        theirs.close()
        self._lock = threading.Lock()

    def _ask(self, request: bytes) -> tuple[bytes, list[int]]:
        with self._lock:
            try:
                self.control.sendall(request)
                reply, fds, _, _ = socket.recv_fds(self.control, 64, 1)
            except OSError:
                reply, fds = b"", []
        if not reply:
            raise WorkerDied(f"the worker template process {self.proc.pid} ended (exit status {self.proc.poll()})")
        return reply, fds

    def fork(self) -> tuple[int, Connection]:
        """A new worker: its pid and the launcher's end of its socket pair (its first `recv` waits
        until the template's imports are done)."""
        reply, fds = self._ask(_FORK)
        return int(reply), Connection(fds[0])

    def exit_status(self, pid: int) -> int:
        """The exit status of a worker that ended (negative: the signal that ended it)."""
        return int(self._ask(_STATUS + str(pid).encode())[0])

    def close(self, timeout: float) -> None:
        try:
            self.control.shutdown(socket.SHUT_RDWR)  # also wakes a fork request waiting for the reply
        except OSError:
            pass
        self.control.close()  # the template reaps its workers and ends
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Worker:
    def __init__(self, pid: int, conn: Connection) -> None:
        self.pid, self.conn = pid, conn

    def hang_up(self) -> None:
        """An idle worker reads None and ends; a busy one ends when its reply finds the socket closed."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.conn.close()


class WorkerPool:
    """`num_workers` worker processes, each running fedsim's ClientApp on the messages it is sent.

    `run` may be called from several threads at once (Flower's engine calls it from one thread
    per worker): each call takes an idle worker, waiting for one if none is."""

    def __init__(self, num_workers: int, env: Mapping[str, str]) -> None:
        if num_workers < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {num_workers}")
        self.num_workers = num_workers
        self._template = _Template(env)
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()  # None: no worker can start
        self._lock = threading.Lock()
        self._all: list[_Worker] = []
        self._closed = False
        self._broken: str | None = None
        # Forked once the template's imports are done: meanwhile the launcher goes on with its own.
        self._starter = threading.Thread(target=self._start_all, name="fedsim-workers", daemon=True)
        self._starter.start()

    def _start_all(self) -> None:
        try:
            for _ in range(self.num_workers):
                self._idle.put(self._start())
        except WorkerDied as err:  # the template died (its imports failed, say) or the pool closed
            self._give_up(err)

    def _give_up(self, err: WorkerDied) -> None:
        """No worker can be started: every call to `run`, waiting or to come, raises instead."""
        self._broken = str(err)
        self._idle.put(None)

    def _start(self) -> _Worker:
        worker = _Worker(*self._template.fork())
        with self._lock:
            self._all.append(worker)
        return worker

    def is_idle(self) -> bool:
        return not self._idle.empty()

    def pids(self) -> list[int]:
        """The worker processes now serving (not the template)."""
        with self._lock:
            return [w.pid for w in self._all]

    def run(self, message: Any, context: Any) -> tuple[Any, Any]:
        """The ClientApp's reply to `message` and its updated `context`, from an idle worker.

        Raises WorkerError when the ClientApp raised, WorkerDied when the process ended."""
        worker = self._idle.get()
        if worker is None:
            self._idle.put(None)  # for the next caller too
            raise WorkerDied(f"no worker process can start: {self._broken}")
        try:
            worker.conn.send((message, context))
            status, first, second = worker.conn.recv()
        except (EOFError, OSError) as err:
            self._replace(worker)
            raise WorkerDied(f"worker process {worker.pid} ended while it held a message "
                             f"(exit status {self._template.exit_status(worker.pid)})") from err  # fmt: skip
        except BaseException:  # a reply that does not unpickle, an interrupt: the stream is out of step
            os.kill(worker.pid, signal.SIGKILL)
            self._replace(worker)
            raise
        self._idle.put(worker)
        if status != "ok":
            raise WorkerError(first)
        return first, second

    def _replace(self, dead: _Worker) -> None:
        with self._lock:
            self._all.remove(dead)
        dead.conn.close()
        if self._closed:
            return
        try:
            self._idle.put(self._start())
        except WorkerDied as err:
            self._give_up(err)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker and the template (workers still running after `timeout` s are killed)."""
        self._closed = True
        with self._lock:
            workers, self._all = self._all, []
        for worker in workers:
            worker.hang_up()
        self._template.close(timeout)
        self._starter.join()
        while not self._idle.empty():  # forked while closing
            worker = self._idle.get()
            if worker is not None:
                worker.hang_up()


def template(app: Callable[..., Any]) -> None:
    """The template process, once it imported `app` (fedsim's ClientApp, with torch and Flower):
    fork a worker (`serve`) per request on the control socket, reap the workers that end and tell their exit status when asked; when
    the launcher goes away, give the workers up to 10 s to end (they end when their sockets
    close), kill what is left, and end."""
    control = socket.socket(fileno=int(os.environ.pop(FD_ENV)))
    statuses: dict[int, int] = {}
    children: set[int] = set()

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            statuses[pid] = os.waitstatus_to_exitcode(status)

    while True:
        ready, _, _ = select.select([control], [], [], 0.5)
        reap()
        if not ready:
            continue
        try:
            request = control.recv(64)
        except OSError:
            request = b""
        if not request:
            break
        if request == _FORK:
            mine, theirs = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # the worker
                control.close()
                theirs.close()
                random.seed()  # as a fresh interpreter: Python's and numpy's global generators from the OS
                import numpy as np

                np.random.seed()
                serve(app, Connection(mine.detach()))
            mine.close()
            children.add(pid)
            try:
                socket.send_fds(control, [str(pid).encode()], [theirs.fileno()])
            except OSError:  # the launcher is gone: so is this worker's other end
                break
            finally:
                theirs.close()
        elif request.startswith(_STATUS):
            pid = int(request[len(_STATUS) :])
            while pid in children:
                time.sleep(0.005)
                reap()
            try:
                control.sendall(str(statuses.pop(pid, 0)).encode())
            except OSError:
                break
    deadline = time.monotonic() + 10.0
    while children and time.monotonic() < deadline:
        time.sleep(0.01)
        reap()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    os._exit(0)


def serve(app: Callable[..., Any], conn: Connection) -> None:
    """A worker process's loop around `app` (fedsim's ClientApp): (message, context) in, ("ok",
    reply, context) or ("error", text, None) out, until the pool sends None or goes away; then the
    process ends (without the interpreter's teardown: a worker writes no files, the launcher does)."""
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
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
