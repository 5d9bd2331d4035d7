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

import contextlib
import copyreg
import io
import os
import pickle
import queue
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["WorkerDied", "WorkerError", "WorkerPool", "dumps", "loads", "recv", "recv_frames", "send", "serve", "template"]

# Ctrl-C is the launcher's to handle (ignored before the imports, and so in every worker too).
TEMPLATE_COMMAND = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "from fedsim.local_workers import template; from fedsim.client_app import app; template(app)"
)
FD_ENV = "FEDSIM_WORKER_FD"  # the template's end of its control socket, by number
_FORK, _STATUS = b"F", b"S"  # the template's two requests: fork a worker; a dead worker's exit status
_ERROR = b"E"  # the template's reply when it cannot fork
WORKER_GRACE_S = 5.0  # once the launcher is gone, the template kills the workers still running after this
TEMPLATE_RESTARTS = 3  # a pool starts a new template this many times at most when its template died
OUT_OF_BAND = 64 * 1024  # bytes attributes at least this large travel beside the pickle stream (`dumps`)
_HEAD = struct.Struct("!IQ")  # a message's frame: number of out-of-band buffers, pickle stream length


class WorkerDied(RuntimeError):
    """A worker process ended (killed, crashed) while it held a message; a new one replaces it."""


class _ForkRefused(WorkerDied):
    """The template lives but could not fork (out of memory, processes or descriptors)."""


class WorkerError(RuntimeError):
    """The ClientApp raised in a worker process: its type and message, as text."""


class _Template:
    """The launcher's handle on the template process (`template`): forks workers on request."""

    def __init__(self, env: Mapping[str, str], log: Path | None) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control = mine
        sink = log.open("ab") if log is not None else None  # the workers' output (None: this process's)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", TEMPLATE_COMMAND],
                env={**os.environ, **env, FD_ENV: str(theirs.fileno())}, pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
            )  # fmt: skip
        finally:
            theirs.close()
            if sink is not None:
                sink.close()
        self._lock = threading.Lock()

    def _ask(self, request: bytes) -> tuple[bytes, list[int]]:
        with self._lock:
            try:
                self.control.sendall(request)
                reply, fds, _, _ = socket.recv_fds(self.control, 512, 1)
            except OSError:
                reply, fds = b"", []
        for fd in fds:
            os.set_inheritable(fd, False)  # no later child of the launcher holds a worker's socket
        if not reply:
            raise WorkerDied(f"the worker template process {self.proc.pid} ended (exit status {self.proc.poll()})")
        if reply.startswith(_ERROR):
            raise _ForkRefused(f"the worker template cannot start a worker: {reply[len(_ERROR) :].decode(errors='replace')}")
        return reply, fds

    def fork(self) -> tuple[int, socket.socket]:
        """A new worker: its pid and the launcher's end of its socket pair (the worker answers
        once the template's imports are done)."""
        reply, fds = self._ask(_FORK)
        if len(fds) != 1:
            raise WorkerDied(f"the worker template sent {len(fds)} sockets for a new worker, not 1")
        return int(reply), socket.socket(fileno=fds[0])

    def exit_status(self, pid: int) -> int | None:
        """The exit status of a worker that ended (negative: the signal that ended it), None if
        the template is gone."""
        try:
            return int(self._ask(_STATUS + str(pid).encode())[0])
        except WorkerDied:
            return None

    def close(self, timeout: float) -> None:
        try:
            self.control.shutdown(socket.SHUT_RDWR)  # also wakes a fork request waiting for the reply
        except OSError:
            pass
        self.control.close()  # the template reaps its workers (killing them after WORKER_GRACE_S) and ends
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Worker:
    def __init__(self, template: _Template, pid: int, sock: socket.socket) -> None:
        self.template, self.pid, self.sock = template, pid, sock  # the template that forked it knows its exit status
        try:  # a handle on the process itself: no other process can take its place once it ends
            self.pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def hang_up(self) -> None:
        """End the worker's conversation: an idle worker reads end-of-file and ends, a busy one ends
        when its reply finds the socket shut, and a thread of this process waiting for its reply
        wakes with EOFError (shutting a socket down wakes its readers; closing it would not)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Free this process's socket (only once no thread reads it)."""
        self.sock.close()

    def forget(self) -> None:
        """Free the pidfd (by the pool's one owner of this worker: `_lost`, or `close`)."""
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def ended(self) -> bool:
        """Whether the process has ended (True when that cannot be known: no pidfd)."""
        if self.pidfd is None:
            return True
        return bool(select.select([self.pidfd], [], [], 0)[0])  # a pidfd reads ready once its process ends

    def kill(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)


class WorkerPool:
    """`num_workers` worker processes, each running fedsim's ClientApp on the messages it is sent.

    `run` may be called from several threads at once (Flower's engine calls it from one thread
    per worker): each call takes an idle worker, waiting for one if none is. A worker that dies
    is replaced. A template that died (the OOM killer) is replaced when a worker is next needed,
    up to TEMPLATE_RESTARTS times; the workers it forked serve on. Once no worker is left and
    none can be started, or the pool is closed, every call raises WorkerDied instead of waiting.
    `log`: a file for the workers' output (None: this process's stdout and stderr)."""

    def __init__(self, num_workers: int, env: Mapping[str, str], log: Path | None = None) -> None:
        if num_workers < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {num_workers}")
        self.num_workers = num_workers
        self._env, self._log = dict(env), log
        self._template = _Template(env, log)
        self._templates = [self._template]  # every template started (the dead ones are closed with the pool)
        self._template_lock = threading.Lock()
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()  # None: no worker will come
        self._lock = threading.Lock()
        self._all: list[_Worker] = []
        self._closed = False
        self._broken: str | None = None
        # Forked once the template's imports are done: meanwhile the launcher goes on with its own.
        self._starter = threading.Thread(target=self._start_all, name="fedsim-workers", daemon=True)
        self._starter.start()

    def _start_all(self) -> None:
        for _ in range(self.num_workers):
            if not self._add():
                return

    def _add(self) -> bool:
        """Fork one more worker into the idle queue; False (and the pool may be broken) if none can be."""
        try:
            worker = self._fork()
        except Exception as err:  # WorkerDied, or the template's reply was unusable
            self._cannot_start(str(err))
            return False
        with self._lock:
            if not self._closed:
                self._all.append(worker)
                self._idle.put(worker)
                return True
        worker.hang_up()  # forked while the pool closed
        worker.close()
        worker.forget()
        return False

    def _fork(self) -> _Worker:
        """A worker from the template; from a new template if this one died (while restarts are left)."""
        while True:
            template = self._template
            try:
                return _Worker(template, *template.fork())
            except _ForkRefused:
                raise  # the template lives and could not fork: no new template would do better
            except WorkerDied:
                try:  # its socket's end may come a moment before its exit status
                    template.proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    raise  # its socket ended but it lives on: not a template to replace
            with self._template_lock:
                if self._template is template:  # the first thread to find it dead starts the next one
                    if self._closed:
                        raise WorkerDied("the worker pool is closed")
                    if len(self._templates) > TEMPLATE_RESTARTS:
                        raise WorkerDied(f"the worker template process {template.proc.pid} ended (exit status {template.proc.poll()}), "
                                         f"the last of the {len(self._templates)} templates this pool may start")  # fmt: skip
                    self._template = _Template(self._env, self._log)
                    self._templates.append(self._template)

    def _cannot_start(self, why: str) -> None:
        with self._lock:
            if self._all or self._broken is not None:
                return  # the live workers serve on
            self._broken = why
        self._idle.put(None)

    def is_idle(self) -> bool:
        return not self._idle.empty() and self._broken is None

    def pids(self) -> list[int]:
        """The worker processes now serving (not the template)."""
        with self._lock:
            return [w.pid for w in self._all]

    def run(self, message: Any, context: Any) -> tuple[Any, Any]:
        """The ClientApp's reply to `message` and its updated `context`, from an idle worker.

        Raises WorkerError when the ClientApp raised, WorkerDied when the worker process ended
        (it is replaced) or no worker is left."""
        frames = dumps((message, context))  # one that cannot be sent harms no worker
        worker = self._idle.get()
        if worker is None:
            self._idle.put(None)  # for the next caller too
            raise WorkerDied(f"no worker process is left: {self._broken}")
        try:
            send(worker.sock, frames)
            status, first, second = recv(worker.sock)
        except (EOFError, OSError) as err:
            raise WorkerDied(self._lost(worker, kill=False)) from err
        except BaseException:  # a reply that does not unpickle, an interrupt: the stream is out of step
            self._lost(worker, kill=True)
            raise
        self._idle.put(worker)
        if status != "ok":
            raise WorkerError(first)
        return first, second

    def _lost(self, worker: _Worker, *, kill: bool) -> str:
        """Take a worker that can no longer serve out of the pool and start another in its place
        (not once the pool is closed); what happened, for WorkerDied."""
        with self._lock:
            closed = self._closed
            mine = worker in self._all  # else close() took it, and frees its pidfd
            if mine:
                self._all.remove(worker)
        worker.close()
        if mine:
            worker.forget()
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        if closed:
            return f"the worker pool was closed while worker process {worker.pid} held a message"
        code = worker.template.exit_status(worker.pid)
        self._add()
        return f"worker process {worker.pid} ended while it held a message (exit status {code})"

    def close(self, timeout: float = 30.0) -> None:
        """Stop every worker and the template; returns once all of them are gone (the template
        kills a worker still busy after WORKER_GRACE_S and reaps it). Calls waiting for a reply
        raise WorkerDied; so does every later call."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all = []
            if self._broken is None:
                self._broken = "the worker pool is closed"
        for worker in workers:
            worker.hang_up()
        while True:  # idle workers: no thread reads their sockets
            try:
                idle = self._idle.get(block=False)
            except queue.Empty:
                break
            if idle is not None:
                idle.close()
        self._idle.put(None)
        # Workers whose template died have no template to end them: they get WORKER_GRACE_S to
        # finish, as the others get from their template, then are killed through their pidfd
        # (never another process that took the number).
        orphans = [w for w in workers if w.template.proc.poll() is not None]
        with self._template_lock:
            templates = list(self._templates)
        for template in templates:
            template.close(timeout)
        deadline = time.monotonic() + WORKER_GRACE_S
        while any(not w.ended() for w in orphans) and time.monotonic() < deadline:
            time.sleep(0.01)
        for worker in orphans:
            if not worker.ended():
                worker.kill()
        for worker in workers:
            worker.forget()
        self._starter.join()


def template(app: Callable[..., Any]) -> None:
    """The template process, once it imported `app` (fedsim's ClientApp, with torch and Flower):
    fork a worker (`serve`) per request on the control socket, reap the workers that end and
    tell their exit status when asked; when the launcher goes away, give the workers
    WORKER_GRACE_S to end (they end when their sockets close), kill and reap what is left, and
    end."""
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
            try:
                mine, theirs = socket.socketpair()
                pid = os.fork()
            except OSError as err:  # out of memory, processes or descriptors: this worker is not started
                try:
                    control.sendall(_ERROR + f"{type(err).__name__}: {err}".encode())
                except OSError:
                    break
                continue
            if pid == 0:  # the worker
                control.close()
                theirs.close()
                random.seed()  # as a fresh interpreter: Python's and numpy's global generators from the OS
                import numpy as np

                np.random.seed()
                serve(app, mine)
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
    deadline = time.monotonic() + WORKER_GRACE_S
    while children and time.monotonic() < deadline:
        time.sleep(0.01)
        reap()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:  # reaped before the template ends: when close() returns, no worker is left
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    os._exit(0)


def serve(app: Callable[..., Any], sock: socket.socket) -> None:
    """A worker process's loop around `app` (fedsim's ClientApp): (message, context) in, ("ok",
    reply, context) or ("error", text, None) out, until the pool sends None or goes away; then the
    process ends (without the interpreter's teardown: a worker writes no files, the launcher does)."""
    while True:
        try:
            frames = recv_frames(sock)
        except (EOFError, OSError):
            break
        try:
            request = loads(frames)
        except Exception as err:  # a message this worker cannot unpickle: its error, the stream in step
            request = err
        if request is None:
            break
        try:
            if isinstance(request, Exception):
                raise request
            message, context = request
            reply = ("ok", app(message=message, context=context), context)
        except Exception as err:  # the ClientApp's failure goes back as the message's error
            traceback.print_exc()  # the whole traceback into the workers' output
            reply = ("error", f"{type(err).__name__}: {err}", None)
        try:
            frames = dumps(reply)
        except Exception as err:  # the reply does not pickle: nothing was written, the stream is in step
            frames = dumps(("error", f"the worker's reply cannot be sent: {type(err).__name__}: {err}", None))
        try:
            send(sock, frames)
        except OSError:  # the pool closed meanwhile (the run ended or was interrupted)
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- messages on a socket
#
# A message is one pickle stream (protocol 5) and its out-of-band buffers: every `bytes` attribute
# of at least OUT_OF_BAND bytes of a plain object (a Flower Array's `data`: a device's update,
# masked vector or the global model; immutable, so a view of it is a snapshot). Writable buffers
# (numpy arrays) stay in the stream, as pickle copies them, and arrive writable as with pickle.
# The sender writes each buffer from the object's own memory; the receiver reads each one
# straight into the bytes object the rebuilt object keeps. One copy into the kernel and one out,
# where multiprocessing's Connection made four more: into the pickle stream, through a read
# buffer, into a BytesIO, and out of the stream into new bytes objects (bench/transport.py: 500
# vectors of 454 KB cost the receiver 0.45-0.55 s of CPU and 160,000 page faults that way, and
# 0.13-0.23 s with 56,000 this way).


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        """Pickle's own reduction of a plain object (copyreg.__newobj__ on its class, then its
        __dict__), with its large `bytes` attributes as out-of-band PickleBuffers; NotImplemented
        (pickle goes on as usual) for everything else: builtins, classes, objects with a reducer
        of their own or in copyreg's table, and those whose reduction has more than a state."""
        state = getattr(obj, "__dict__", None)
        if (
            not state or isinstance(obj, type) or type(obj) in copyreg.dispatch_table
            or not any(type(v) is bytes and len(v) >= OUT_OF_BAND for v in state.values())
        ):  # fmt: skip
            return NotImplemented
        reduced = obj.__reduce_ex__(5)
        if not (
            isinstance(reduced, tuple) and len(reduced) >= 3 and reduced[0] is copyreg.__newobj__
            and reduced[1] == (type(obj),) and type(reduced[2]) is dict and all(r is None for r in reduced[3:])
        ):  # fmt: skip
            return NotImplemented
        big = {k: pickle.PickleBuffer(v) for k, v in reduced[2].items() if type(v) is bytes and len(v) >= OUT_OF_BAND}
        return reduced[0], reduced[1], {**reduced[2], **big}


def dumps(obj: Any) -> tuple[bytes, list[memoryview]]:
    """`obj` as (pickle stream, out-of-band buffers). Out of band go the read-only buffers of at
    least OUT_OF_BAND bytes, as views of the objects' own memory (immutable: what is sent is what
    was pickled); writable ones (numpy arrays) are copied into the stream as pickle copies them,
    so they arrive writable."""
    stream = io.BytesIO()
    buffers: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:  # False: out of band
        raw = buffer.raw()
        if not raw.readonly or raw.nbytes < OUT_OF_BAND:
            return True
        buffers.append(raw)
        return False

    _Pickler(stream, protocol=5, buffer_callback=out_of_band).dump(obj)
    return stream.getvalue(), buffers


def send(sock: socket.socket, frames: tuple[bytes, list[memoryview]]) -> None:
    """Write one message (`dumps`) to a stream socket."""
    body, buffers = frames
    head = _HEAD.pack(len(buffers), len(body)) + struct.pack(f"!{len(buffers)}Q", *(b.nbytes for b in buffers))
    sock.sendall(head + body if len(body) < OUT_OF_BAND else head)
    if len(body) >= OUT_OF_BAND:
        sock.sendall(body)
    for buffer in buffers:
        sock.sendall(buffer)


def recv(sock: socket.socket) -> Any:
    """Read one message written by `send`; EOFError when the other end is gone."""
    return loads(recv_frames(sock))


def recv_frames(sock: socket.socket) -> tuple[bytes, list[bytes]]:
    """One whole message's pickle stream and buffers, not yet unpickled (EOFError when the other
    end is gone): a message that then fails to unpickle leaves the stream in step."""
    count, length = _HEAD.unpack(_read(sock, _HEAD.size))
    sizes = struct.unpack(f"!{count}Q", _read(sock, 8 * count)) if count else ()
    body = _read(sock, length)
    return body, [_read(sock, size) for size in sizes]


def loads(frames: tuple[bytes, list[bytes]]) -> Any:
    body, buffers = frames
    return pickle.loads(body, buffers=buffers)


def _read(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes, read into one new bytes object (MSG_WAITALL: one copy from the kernel)."""
    if n == 0:
        return b""
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) == n:
        return data
    parts, got = [data], len(data)
    while data and got < n:  # a signal cut the wait short
        data = sock.recv(n - got, socket.MSG_WAITALL)
        parts.append(data)
        got += len(data)
    if got < n:
        raise EOFError("the other end closed the socket")
    return b"".join(parts)
