"""simulation.backend=processes: fedsim's workers as plain child processes, no Ray.

The same run gives the same model bits on Ray and on the processes; a worker process that dies
holding a message is replaced and its message fails (fedsim resends the job); a ClientApp error
comes back as text; the launcher never imports Ray; the combinations the processes cannot serve
are refused with one line naming the key.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import ConfigError, from_dict, usable_cpus
from fedsim import local_workers
from fedsim.local_workers import WorkerDied, WorkerError, WorkerPool
from fedsim.run import _worker_runtime_env, pool_size, run
from helpers import descendants

REPO = Path(__file__).resolve().parent.parent


def small(tmp: Path, **simulation: object) -> dict:
    return {
        "seed": 3, "population": 30, "rounds": 2, "cohort": {"size": 10, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 30}, "model": {"name": "mlp", "hidden_sizes": [8]},
        "simulation": {"num_workers": 2, "ray_temp_dir": str(tmp / "ray"), **simulation},
        "output": {"progress": False, "report": False},
    }  # fmt: skip


def model_sha(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["model_sha256"]


def test_auto_picks_processes_on_one_machine_and_ray_where_only_ray_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert from_dict(small(tmp_path)).worker_backend == "processes"
    assert from_dict(small(tmp_path, device="cuda")).worker_backend == "ray"  # Ray shares GPUs out
    monkeypatch.setattr("fedsim.config.nvidia_gpus_present", lambda: True)
    assert from_dict(small(tmp_path)).worker_backend == "ray"  # device=auto on a machine with a GPU
    assert from_dict(small(tmp_path, device="cpu")).worker_backend == "processes"
    monkeypatch.undo()
    assert from_dict(small(tmp_path, backend="ray")).worker_backend == "ray"
    assert from_dict(small(tmp_path, ray_address="auto")).worker_backend == "ray"
    active = small(tmp_path)
    active["secagg"] = {"name": "secaggplus", "threat_model": "active"}
    assert from_dict(active).worker_backend == "ray"  # the key registry is a Ray actor (fedsim.pki)


def test_processes_are_refused_where_they_cannot_serve(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"simulation\.backend.*ray_address"):
        from_dict(small(tmp_path, backend="processes", ray_address="auto"))
    active = small(tmp_path, backend="processes")
    active["secagg"] = {"name": "secaggplus", "threat_model": "active"}
    with pytest.raises(ConfigError, match=r"simulation\.backend.*threat_model=active.*allowed with it: ray, auto"):
        from_dict(active)


def test_off_linux_auto_picks_ray_and_processes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")  # no SOCK_SEQPACKET Unix sockets there
    assert from_dict(small(tmp_path)).worker_backend == "ray"
    with pytest.raises(ConfigError, match=r"simulation\.backend.*needs Linux.*on darwin use ray or auto"):
        from_dict(small(tmp_path, backend="processes"))


def test_the_command_refuses_a_bad_backend_with_one_line_and_status_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "simulation.backend=threads", f"hydra.run.dir={tmp_path}", f"output.dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "simulation.backend" in proc.stderr and "processes" in proc.stderr and "Traceback" not in proc.stderr


def test_pool_size_is_what_ray_would_start_at_most_one_per_worker(tmp_path: Path) -> None:
    cpus = usable_cpus()  # the CPUs this process may run on, fewer under a cgroup quota (as Ray counts them)
    assert pool_size(from_dict(small(tmp_path, num_workers=1))) == 1
    assert pool_size(from_dict(small(tmp_path, num_workers=64))) == cpus
    classic = small(tmp_path)
    classic["simulation"] = {"layout": "classic"}
    assert pool_size(from_dict(classic)) == cpus  # one SuperNode per device, not one process each


def _cgroup(tmp: Path, lines: str, files: dict[str, str]) -> int:
    tmp.mkdir()
    (tmp / "self").write_text(lines)
    for name, text in files.items():
        (tmp / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "fs" / name).write_text(text)
    return usable_cpus(tmp / "fs", tmp / "self")


def test_usable_cpus_counts_a_containers_cpu_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core host
    assert _cgroup(tmp_path / "none", "0::/\n", {}) == 64  # no cpu.max: the affinity alone
    assert _cgroup(tmp_path / "max", "0::/\n", {"cpu.max": "max 100000\n"}) == 64
    # docker --cpus=1.5: 2 processes keep it busy (Ray rounds up alike)
    assert _cgroup(tmp_path / "v2", "0::/\n", {"cpu.max": "150000 100000\n"}) == 2
    assert _cgroup(tmp_path / "tiny", "0::/\n", {"cpu.max": "10000 100000\n"}) == 1
    # a systemd slice: the tightest quota among the process's cgroup and its parents
    nested = {"a/cpu.max": "300000 100000\n", "a/b/cpu.max": "max 100000\n", "a/b/c/cpu.max": "800000 100000\n"}
    assert _cgroup(tmp_path / "nested", "0::/a/b/c\n", nested) == 3
    v1 = {"cpu,cpuacct/cpu.cfs_quota_us": "400000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    assert _cgroup(tmp_path / "v1", "4:memory:/x\n3:cpu,cpuacct:/\n", v1) == 4
    # v1 on a host (a Slurm job, systemd's CPUQuota=): the quota sits at the process's own path
    job = {"cpu/slurm/job7/cpu.cfs_quota_us": "200000\n", "cpu/slurm/job7/cpu.cfs_period_us": "100000\n",
           "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}  # fmt: skip
    assert _cgroup(tmp_path / "v1job", "3:cpu,cpuacct:/slurm/job7\n", job) == 2
    assert _cgroup(tmp_path / "v1none", "3:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}) == 64
    assert _cgroup(tmp_path / "junk", "0::/\n", {"cpu.max": "what\n"}) == 64  # unreadable: no quota
    assert _cgroup(tmp_path / "zero", "0::/\n", {"cpu.max": "100000 0\n"}) == 64
    assert usable_cpus(tmp_path / "absent", tmp_path / "absent" / "self") == 64
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # a quota never adds CPUs
    assert _cgroup(tmp_path / "one", "0::/\n", {"cpu.max": "400000 100000\n"}) == 1


def test_pool_size_counts_usable_cpus_over_cpus_per_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedsim.run

    monkeypatch.setattr(fedsim.run, "usable_cpus", lambda: 8)
    assert pool_size(from_dict(small(tmp_path, num_workers=3))) == 3
    assert pool_size(from_dict(small(tmp_path, num_workers=64))) == 8
    assert pool_size(from_dict(small(tmp_path, num_workers=64, cpus_per_worker=2.0))) == 4


def test_the_same_run_gives_the_same_model_on_ray_and_on_processes(tmp_path: Path) -> None:
    on_ray = run(from_dict(small(tmp_path, backend="ray")), tmp_path / "ray_run")
    on_processes = run(from_dict(small(tmp_path, backend="processes")), tmp_path / "processes_run")
    assert model_sha(tmp_path / "ray_run") == model_sha(tmp_path / "processes_run")
    assert on_ray["final_test_accuracy"] == on_processes["final_test_accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "processes_run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["worker_peak_rss_mb"] > 50 for r in rows)


def test_the_workers_carry_the_simulation_mark_so_the_secagg_shortcut_runs_on_processes(tmp_path: Path) -> None:
    raw = small(tmp_path, backend="processes")
    raw["secagg"] = {"name": "secaggplus", "simulation_shortcut": True}
    summary = run(from_dict(raw), tmp_path / "shortcut")  # a worker without SIMULATION_ENV refuses the session
    assert summary["secagg"]["simulation_shortcut"] is True and summary["devices_failed"] == 0
    rows = [json.loads(line) for line in (tmp_path / "shortcut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["secagg_survivors_unmask"] for r in rows] == [10, 10]


def test_the_launcher_never_imports_ray_on_processes(tmp_path: Path) -> None:
    script = (
        "import json, sys\n"
        "from fedsim.config import from_dict\n"
        "from fedsim.run import run\n"
        f"cfg = from_dict(json.loads({json.dumps(json.dumps(small(tmp_path)))}))\n"
        f"run(cfg, {str(tmp_path / 'run')!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert model_sha(tmp_path / "run")


def started(pool: WorkerPool, count: int) -> list[int]:
    """The pool's worker pids once `count` are up (they are forked once the template imported)."""
    deadline = time.monotonic() + 120
    while len(pool.pids()) < count:
        assert time.monotonic() < deadline, "the worker processes did not start"
        time.sleep(0.02)
    return pool.pids()


def templates_below(pid: int) -> list[int]:
    """Template processes started by `pid` (its workers, forked from it, share its command line)."""
    return [p for p, cmd in descendants(pid).items() if "fedsim.local_workers import template" in cmd and parent(p) == pid]


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def pool():
    workers = WorkerPool(1, _worker_runtime_env()["env_vars"])
    yield workers
    workers.close()


def test_a_client_app_error_comes_back_as_text_and_the_worker_serves_on(pool: WorkerPool) -> None:
    for _ in range(2):  # the same process answers again after an error
        with pytest.raises(WorkerError, match=r"\w+Error: "):
            pool.run("not a message", None)
    assert len(started(pool, 1)) == 1


def test_the_workers_output_goes_to_the_log_file_with_the_whole_traceback(tmp_path: Path) -> None:
    log = tmp_path / "workers.log"
    workers = WorkerPool(1, _worker_runtime_env()["env_vars"], log)
    try:
        with pytest.raises(WorkerError) as raised:
            workers.run("not a message", None)
    finally:
        workers.close()
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and str(raised.value).split(":")[0] in text


def test_closing_the_pool_wakes_a_call_waiting_for_a_reply_and_later_calls_raise(pool: WorkerPool) -> None:
    [worker] = started(pool, 1)
    os.kill(worker, signal.SIGSTOP)  # holds the message without answering (killed by the template's grace)
    outcome: list[BaseException] = []
    waiting = threading.Thread(target=lambda: _catch(outcome, lambda: pool.run("not a message", None)))
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive()
    pool.close()
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    assert isinstance(outcome[0], WorkerDied) and "closed while worker process" in str(outcome[0])
    with pytest.raises(WorkerDied, match="the worker pool is closed"):
        pool.run("not a message", None)
    assert not _alive(worker)


def _catch(into: list[BaseException], call) -> None:
    try:
        call()
    except BaseException as err:  # the test looks at it
        into.append(err)


def test_a_worker_that_dies_holding_a_message_is_replaced_and_the_message_fails(pool: WorkerPool) -> None:
    [first] = started(pool, 1)
    os.kill(first, signal.SIGKILL)
    with pytest.raises(WorkerDied, match=rf"worker process {first} ended while it held a message \(exit status -9\)"):
        pool.run("not a message", None)
    [second] = pool.pids()
    assert second != first
    with pytest.raises(WorkerError):  # the new process serves
        pool.run("not a message", None)


def test_workers_are_forked_from_one_template_process(pool: WorkerPool) -> None:
    [template] = templates_below(os.getpid())
    [worker] = started(pool, 1)
    assert parent(worker) == template


def test_a_pool_whose_templates_all_die_raises_instead_of_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_workers, "TEMPLATE_COMMAND", "import sys; sys.exit(3)")  # every template dies at once
    workers = WorkerPool(2, _worker_runtime_env()["env_vars"])
    try:
        for _ in range(3):  # every call, not only the first
            with pytest.raises(WorkerDied, match=r"no worker process is left: the worker template process \d+ ended "
                                                 rf"\(exit status 3\), the last of the {local_workers.TEMPLATE_RESTARTS + 1} templates"):  # fmt: skip
                workers.run("not a message", None)
    finally:
        workers.close()
    assert not [cmd for cmd in descendants(os.getpid()).values() if "sys.exit(3)" in cmd]  # all reaped


def test_a_template_killed_before_it_forked_is_replaced_and_the_workers_start() -> None:
    workers = WorkerPool(2, _worker_runtime_env()["env_vars"])
    try:
        [first] = templates_below(os.getpid())
        os.kill(first, signal.SIGKILL)  # before or while it imports: it forks no worker
        with pytest.raises(WorkerError):  # a worker of the next template answers
            workers.run("not a message", None)
        [second] = templates_below(os.getpid())
        assert second != first and {parent(w) for w in started(workers, 2)} == {second}
    finally:
        workers.close()


def test_workers_serve_on_when_their_template_dies_and_a_new_one_replaces_the_lost(pool: WorkerPool) -> None:
    [worker] = started(pool, 1)
    [first] = templates_below(os.getpid())
    os.kill(first, signal.SIGKILL)  # the OOM killer's choice, say
    with pytest.raises(WorkerError):  # the orphaned worker still answers
        pool.run("not a message", None)
    assert pool.pids() == [worker]
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(WorkerDied, match=rf"worker process {worker} ended while it held a message \(exit status None\)"):
        pool.run("not a message", None)  # its template is gone: nobody can tell its exit status
    [replacement] = pool.pids()
    [second] = templates_below(os.getpid())
    assert second != first and parent(replacement) == second
    with pytest.raises(WorkerError):
        pool.run("not a message", None)


ECHO_TEMPLATE = (  # a template whose workers answer each message with itself, a little later
    "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); from fedsim.local_workers import template; "
    "template(lambda message, context: (time.sleep(0.005), message)[1])"
)


def test_many_threads_calling_at_once_each_get_their_own_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's engine calls run() from one thread per worker SuperNode: more threads than workers
    queue for an idle one, and each gets the reply to its own message."""
    monkeypatch.setattr(local_workers, "TEMPLATE_COMMAND", ECHO_TEMPLATE)
    workers = WorkerPool(2, _worker_runtime_env()["env_vars"])
    replies: dict[str, object] = {}
    contexts: list[object] = []

    def call(i: int) -> None:
        for j in range(20):
            reply, context = workers.run(f"message {i}-{j}", {"caller": i})
            replies[f"message {i}-{j}"] = reply
            contexts.append(context == {"caller": i})

    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert len(started(workers, 2)) == 2
    finally:
        workers.close()
    assert len(replies) == 160 and all(reply == message for message, reply in replies.items())
    assert len(contexts) == 160 and all(contexts)


def test_closing_the_pool_ends_every_worker_process_and_the_template() -> None:
    workers = WorkerPool(2, _worker_runtime_env()["env_vars"])
    pids = started(workers, 2) + templates_below(os.getpid())
    assert len(pids) == 3
    workers.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
    assert workers.pids() == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


class _Custom:
    """Says how it pickles: the transport must leave that alone."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self):
        return _Custom, (self.blob,)


def test_a_message_crosses_the_socket_with_its_large_arrays_beside_the_pickle_stream() -> None:
    """Large Array bytes are sent from their own memory and read into the bytes the rebuilt Array
    keeps (no copy in the pickle stream); everything else round-trips as pickle would."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

    from fedsim.wire import pack, unpack

    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(n).astype(np.float32) for n in (100_000, 30_000, 16, 0)]
    content = RecordDict({"arrays": ArrayRecord({str(i): pack(v) for i, v in enumerate(vectors)}),
                          "config": ConfigRecord({"round": 3, "name": "x" * 100_000})})  # fmt: skip
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=3600.0, message_type="train")  # fmt: skip
    message = Message(content=content, metadata=meta)
    extra = {"custom": _Custom(b"y" * 200_000), "array": rng.standard_normal(50_000), "none": None}
    body, buffers = local_workers.dumps((message, extra))
    # Out of band: the two Arrays of at least OUT_OF_BAND bytes, as views of their own bytes; the
    # 400 KB vector is not in the pickle stream. The numpy array (writable) is, as pickle copies it.
    big = [pack(v).data for v in vectors if 4 * v.size >= local_workers.OUT_OF_BAND]
    assert sorted(b.nbytes for b in buffers) == sorted(len(d) for d in big)
    assert 400_000 + 100_000 + 200_000 < len(body) < 400_000 + 100_000 + 200_000 + 200_000
    assert any(b.obj is message.content["arrays"]["0"].data for b in buffers)

    a, b = socket.socketpair()
    try:
        sender = threading.Thread(target=local_workers.send, args=(a, (body, buffers)))
        sender.start()
        got_message, got_extra = local_workers.recv(b)
        sender.join()
    finally:
        a.close()
        b.close()
    arrays = got_message.content["arrays"]
    for i, v in enumerate(vectors):
        assert type(arrays[str(i)].data) is bytes and np.array_equal(unpack(arrays[str(i)]), v)
    assert got_message.content["config"]["name"] == "x" * 100_000 and got_message.metadata.dst_node_id == 7
    assert isinstance(got_extra["custom"], _Custom) and got_extra["custom"].blob == b"y" * 200_000
    assert np.array_equal(got_extra["array"], extra["array"]) and got_extra["none"] is None
    assert got_extra["array"].flags.writeable  # as pickle gives it


class _Items(list):
    def __init__(self, items: list[int], blob: bytes) -> None:
        super().__init__(items)
        self.blob = blob


class _NeedsArgs:
    def __new__(cls, tag: str) -> _NeedsArgs:
        self = super().__new__(cls)
        self.tag = tag
        return self

    def __getnewargs__(self) -> tuple[str]:
        return (self.tag,)


class _Plain:
    big_class_attribute = b"z" * 100_000


def _round_trip(obj: object) -> object:
    a, b = socket.socketpair()
    try:
        frames = local_workers.dumps(obj)
        sender = threading.Thread(target=local_workers.send, args=(a, frames))
        sender.start()
        got = local_workers.recv(b)
        sender.join()
        return got
    finally:
        a.close()
        b.close()


def test_objects_cross_the_socket_as_pickle_rebuilds_them() -> None:
    big = b"q" * 100_000
    items = _round_trip(_Items([1, 2, 3], big))
    assert isinstance(items, _Items) and items == [1, 2, 3] and items.blob == big  # list items kept
    needs = _NeedsArgs("t")
    needs.blob = big
    got = _round_trip(needs)
    assert isinstance(got, _NeedsArgs) and got.tag == "t" and got.blob == big
    assert _round_trip(_Plain) is _Plain  # a class, pickled by reference
    cycle = _Plain()
    cycle.blob, cycle.me = big, cycle  # a cycle through an object with a large attribute
    got = _round_trip(cycle)
    assert got.me is got and got.blob == big
    shared = _Plain()
    shared.blob = big
    pair = _round_trip([shared, shared])
    assert pair[0] is pair[1] and pair[0].blob == big


def test_a_message_a_worker_cannot_unpickle_comes_back_as_its_error(pool: WorkerPool) -> None:
    with pytest.raises(WorkerError, match="no_such_module"):
        pool.run(_Unimportable(), None)
    with pytest.raises(WorkerError, match=r"\w+Error: "):  # the same worker serves on
        pool.run("not a message", None)
    assert len(pool.pids()) == 1


class _Unimportable:
    """Pickled as a reference to a module the worker does not have."""

    def __reduce__(self):
        return (getattr, (_FakeModuleRef(), "x"))


class _FakeModuleRef:
    def __reduce__(self):
        return (__import__, ("no_such_module",))


def test_closing_the_pool_ends_a_busy_worker_whose_template_died(pool: WorkerPool) -> None:
    [worker] = started(pool, 1)
    [template] = templates_below(os.getpid())
    os.kill(template, signal.SIGKILL)
    os.kill(worker, signal.SIGSTOP)  # holds the message: nobody but the pool can end it now
    outcome: list[BaseException] = []
    waiting = threading.Thread(target=lambda: _catch(outcome, lambda: pool.run("not a message", None)))
    waiting.start()
    time.sleep(0.3)
    pool.close()
    waiting.join(timeout=10)
    assert isinstance(outcome[0], WorkerDied)
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def test_a_socket_closed_mid_message_is_end_of_file() -> None:
    a, b = socket.socketpair()
    holder = _Plain()
    holder.blob = b"e" * 100_000
    body, buffers = local_workers.dumps(holder)
    a.sendall(local_workers._HEAD.pack(len(buffers), len(body)) + struct.pack("!Q", buffers[0].nbytes) + body)
    a.sendall(buffers[0][:1000])
    a.close()
    with pytest.raises(EOFError):
        local_workers.recv(b)
    b.close()
