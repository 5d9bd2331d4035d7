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
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedsim.config import ConfigError, from_dict
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
    cpus = len(os.sched_getaffinity(0))  # the CPUs this process may run on, as Ray counts them
    assert pool_size(from_dict(small(tmp_path, num_workers=1))) == 1
    assert pool_size(from_dict(small(tmp_path, num_workers=64))) == cpus
    classic = small(tmp_path)
    classic["simulation"] = {"layout": "classic"}
    assert pool_size(from_dict(classic)) == cpus  # one SuperNode per device, not one process each


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


def test_a_pool_whose_template_died_raises_instead_of_waiting() -> None:
    workers = WorkerPool(2, _worker_runtime_env()["env_vars"])
    try:
        [template] = templates_below(os.getpid())
        os.kill(template, signal.SIGKILL)  # before or while it imports: no worker can be forked
        for _ in range(3):  # every call, not only the first
            with pytest.raises(WorkerDied, match=rf"no worker process is left: the worker template process {template} ended"):
                workers.run("not a message", None)
    finally:
        workers.close()


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
