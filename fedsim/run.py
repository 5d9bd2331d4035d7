"""Run one experiment in-process on Flower's simulation engine (Ray backend).

`run(cfg, run_dir)` is what `fedsim` calls after Hydra composed and validated the config; it
is also the entry point for notebooks and tests. It quiets Flower and Ray unless asked,
starts `num_workers` SuperNodes (one Ray actor per `cpus_per_worker` CPUs), runs the
ServerApp's round loop in this process and returns the run's summary.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from fedsim.capacity import check_fits
from fedsim.config import CALIBRATED_KEYS, SIMULATION_ENV, FedsimConfig, resolve_paths, usable_cpus
from fedsim.errors import ConfigError, DataError
from fedsim.runlog import locked
from fedsim.trackers import check_installed



class _DropDeprecation(logging.Filter):
    """`run_simulation` warns that `flwr run` is the new front door; fedsim knows (issue 9)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage()


def _quiet(level: str) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ["FLWR_LOG_LEVEL"] = level
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Hydra sets the root logger to INFO; Flower's link state (alembic), Ray and the dataset
    # libraries would print their INFO lines through it.
    for name in ("alembic", "sqlalchemy", "ray", "filelock", "datasets", "fsspec", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.WARNING))
    logger = logging.getLogger("flwr")
    logger.setLevel(level)
    if not any(isinstance(f, _DropDeprecation) for f in logger.filters):
        logger.addFilter(_DropDeprecation())
        for handler in logger.handlers:
            handler.addFilter(_DropDeprecation())


def run(cfg: FedsimConfig, run_dir: str | Path, *, overrides: Iterable[str] | None = None) -> dict[str, Any]:
    """Run the experiment described by `cfg`, writing its outputs to `run_dir`.

    With `cfg.resume`, continue the checkpointed run instead: its own config and its run
    directory. Only the simulation, output and checkpoint settings of `cfg` apply; any other
    key of `overrides` (the config keys the user set, e.g. the command line's; None: every
    key of `cfg`) that differs from the run's config is refused, naming the keys.
    The run directory is locked while the run writes it (`fedsim.runlog.locked`).
    """
    if cfg.engine == "deployment":  # a running SuperLink does the work (fedsim.deploy)
        from fedsim.deploy import run_deployment

        check_fits(cfg)

        if cfg.resume:
            raise ConfigError("resume", "resuming runs on engine=simulation only")
        _quiet(cfg.simulation.log_level)
        with locked(Path(run_dir).absolute()):
            summary = run_deployment(cfg, run_dir)
        if cfg.output.report:
            _write_report(Path(run_dir).absolute())
        return summary
    resume_state = None
    if cfg.resume:
        cfg, run_dir, resume_state = _resumed(cfg, overrides)
    check_fits(cfg)  # a population whose state would not fit is refused here, not OOM-killed mid-run
    check_installed(cfg.output.loggers)  # a tracker's missing package: one line now, not after Ray started
    resolve_paths(cfg)
    run_dir = Path(run_dir).absolute()
    cfg.output.dir = str(run_dir)
    with locked(run_dir):
        return _simulate(cfg, run_dir, resume_state)


def _simulate(cfg: FedsimConfig, run_dir: Path, resume_state: dict[str, Any] | None) -> dict[str, Any]:
    _quiet(cfg.simulation.log_level)
    result: dict[str, Any] = {}
    if cfg.worker_backend == "processes":
        _simulate_on_processes(cfg, run_dir, resume_state, result)
    else:
        _simulate_on_ray(cfg, run_dir, resume_state, result)
    if cfg.output.report and result:
        _write_report(run_dir)
    return result


def _prepared(cfg: FedsimConfig, resume_state: dict[str, Any] | None) -> Any:
    """`server_app.prepare` (the data and model checked, the privacy calibrated), then the
    engine's imports, with Flower's launcher imported without SQLAlchemy, Alembic, FastAPI's
    application layer and pydantic (45 MB and 0.7 s of imports: bench/startup.py --phases)."""
    from fedsim.flower_adapter import lean_launcher_imports

    with lean_launcher_imports() as lean:
        if not lean:
            logging.getLogger(__name__).debug("Flower's SQL state or error package was imported before: they stay loaded")
        from fedsim.server_app import prepare

        setup = prepare(cfg, resume=resume_state)

        for module in ("fedsim.client_app", "flwr.simulation"):  # heavy imports only once the inputs are known good
            importlib.import_module(module)
    _quiet(cfg.simulation.log_level)  # importing flwr (and opacus) resets its logger's level
    return setup


def _run_engine(cfg: FedsimConfig, run_dir: Path, result: dict[str, Any], setup: Any, backend_config: dict[str, Any]) -> None:
    """Flower's simulation engine on fedsim's ServerApp and ClientApp (the backend set up by the caller)."""
    from flwr.simulation import run_simulation

    from fedsim.client_app import app as client_app
    from fedsim.flower_adapter import fast_dispatch
    from fedsim.server_app import make_server_app

    with fast_dispatch(cfg.num_workers), _stop_on_ctrl_c():
        run_simulation(
            server_app=make_server_app(cfg, run_dir, result, setup),
            client_app=client_app,
            num_supernodes=cfg.num_workers,
            backend_config=backend_config,
            verbose_logging=cfg.simulation.log_level == "DEBUG",
        )


def _simulate_on_ray(cfg: FedsimConfig, run_dir: Path, resume_state: dict[str, Any] | None, result: dict[str, Any]) -> None:
    sim = cfg.simulation
    init_args: dict[str, Any] = {
        "log_to_driver": sim.log_level in ("DEBUG", "INFO"),
        "include_dashboard": False,
        "logging_level": sim.log_level,
    }
    with _short_path(None if sim.ray_address else sim.ray_temp_dir) as ray_dir, _lean_serialization():
        if ray_dir:
            init_args["_temp_dir"] = ray_dir
        # Ray's start (2.5 s here, mostly waiting for its daemons) runs on a thread while this one
        # imports torch and the ServerApp, checks the data and model and calibrates the privacy:
        # round 1 ends about 2 s sooner (`fedsim rounds=1`, 2 cores: median 8.2 s after the launch
        # against 10.1, README "Start-up"). Bad input still fails here,
        # before any round, once Ray's start is done and undone (a data error: 7 s, was 2.5 s).
        # An existing cluster is attached to afterwards.
        # Preload only where every process the raylet starts (one per CPU) becomes a busy worker.
        every_cpu = sim.cpus_per_worker == 1 and cfg.num_workers >= usable_cpus()
        with _ray_starting(None if sim.ray_address else init_args, preload=every_cpu):
            setup = _prepared(cfg, resume_state)
        _quiet(sim.log_level)  # again: Ray's start (on the other thread) sets its logger's level
        if sim.ray_address:
            cfg.simulation.num_workers = _attach_ray(sim.ray_address, sim.num_workers, sim.cpus_per_worker)
        from fedsim.flower_adapter import replace_dead_actors

        with replace_dead_actors():
            if cfg.needs_key_registry:
                _start_key_registry()
            backend = {"client_resources": {"num_cpus": sim.cpus_per_worker, "num_gpus": gpus_per_worker(cfg)}, "init_args": init_args}
            _run_engine(cfg, run_dir, result, setup, backend)


def pool_size(cfg: FedsimConfig) -> int:
    """Worker processes of `simulation.backend=processes`: as many as Ray would start actors on
    this machine (`usable_cpus()`: the CPUs this process may run on, fewer under a cgroup CPU
    quota, / cpus_per_worker), at most one per worker SuperNode."""
    return max(1, min(cfg.num_workers, int(usable_cpus() // cfg.simulation.cpus_per_worker)))


def _simulate_on_processes(cfg: FedsimConfig, run_dir: Path, resume_state: dict[str, Any] | None, result: dict[str, Any]) -> None:
    """The run on fedsim's own worker processes (`simulation.backend=processes`,
    `fedsim.local_workers`): started first, so that their imports overlap this process's."""
    from fedsim.local_workers import WorkerPool

    sim = cfg.simulation
    env = _worker_runtime_env()["env_vars"]
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # as Ray sets them for its actors
        env[name] = os.environ.get(name, str(sim.torch_threads))
    # The workers' output (warnings, a ClientApp's traceback) goes to workers.log in the run
    # directory, as Ray keeps its workers' output in its session logs, unless the logs are asked for.
    log = None if sim.log_level in ("DEBUG", "INFO") else run_dir / WORKERS_LOG
    pool = WorkerPool(pool_size(cfg), env, log)
    try:
        gpus_per_worker(cfg)  # simulation.device=cuda without a GPU: the config error, before any round
        setup = _prepared(cfg, resume_state)
        from fedsim.flower_adapter import process_backend

        with process_backend(pool):
            _run_engine(cfg, run_dir, result, setup, {"client_resources": {"num_cpus": sim.cpus_per_worker, "num_gpus": 0.0}})
    finally:
        pool.close()
        if log is not None and log.exists() and log.stat().st_size == 0:
            log.unlink()  # nothing to say


WORKERS_LOG = "workers.log"


@contextlib.contextmanager
def _lean_serialization() -> Iterator[None]:
    """Ray's serialization add-ons left out of this process while the run's Ray session lasts
    (`fedsim.ray_lean`; the preloaded workers leave them out too), then put back."""
    from fedsim import ray_lean

    restore = ray_lean.skip_serialization_addons()
    try:
        yield
    finally:
        restore()


def server_malloc() -> None:
    """glibc's malloc settings for the `fedsim` command's process (the server), where glibc is
    the C library; the command sets them, `run` does not (a notebook's process keeps its own).

    Large blocks (1 MB and up: a round's replies and their copies, the evaluation's activations)
    are mapped and given back to the system when freed, instead of glibc's default, whose
    threshold rises (up to 32 MB) each time such a block is freed, so later ones come from the
    heap and stay resident; at most two arenas (Ray's and Flower's threads would each get one).
    The FEMNIST-size CNN of `bench/speed.py` (its fedsim command with 8 rounds, run by hand twice
    each way): server peak 641-645 MB against 792-796, seconds per round unchanged (1.43-1.45
    against 1.41-1.44); in `bench/speed.py` runs, 607-614 MB against 725. The workers keep
    the defaults: their training frees and allocates such blocks at every step, and the same
    settings there made a round 18% slower."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own defaults
        return
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's malloc.h
    for option, value in ((m_arena_max, 2), (m_mmap_threshold, 1 << 20), (m_trim_threshold, 4 << 20)):
        mallopt(option, value)


def gpus_per_worker(cfg: FedsimConfig) -> float:
    """Ray GPUs per worker: with simulation.device cuda (or auto on a machine whose torch sees
    GPUs) the workers share this machine's GPUs, min(1, GPUs / workers) each (fractional: Ray
    then places several workers on one GPU); 0 on the CPU."""
    if cfg.simulation.device == "cpu":
        return 0.0
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if cfg.simulation.device == "cuda" and not cfg.simulation.ray_address:
            raise ConfigError("simulation.device", "cuda, but torch sees no CUDA device on this machine "
                              "(torch.cuda.is_available() is False); allowed here: auto, cpu")  # fmt: skip
        return 0.0
    return min(1.0, count / cfg.num_workers)


@contextlib.contextmanager
def _ray_starting(init_args: dict[str, Any] | None, *, preload: bool) -> Iterator[None]:
    """Start Ray (`_start_ray`) on another thread while the body runs; on leaving, wait for it
    (its error, if any, is raised here, once what it started is shut down). None: nothing to
    start (an existing cluster is attached to instead, `_attach_ray`).

    The workers' environment (`_start_ray`) is put into this process's environment for Ray's
    start and taken out again on every way out; if the body raises (bad data, Ctrl-C, ...), it is
    taken out first, then Ray's start is waited for and Ray shut down, both on the starting
    thread, with further Ctrl-Cs / SIGTERMs held back meanwhile (bounded by Ray's own start-up
    timeouts; one line says so), before the error goes on: nothing of Ray outlives a refused run,
    also in a long-lived process (a notebook). Two runs at once in one process are not supported
    (Ray is one per process).

    The thread is one per process and never ends (`_ray_starter`): Ray starts its daemons (GCS,
    raylet) with PR_SET_PDEATHSIG, which kills them when the *thread* that started them exits.
    ray.init sets a SIGTERM handler (exit, so that its atexit shutdown runs) only on the main
    thread, so the same handler is set here."""
    if init_args is None:
        yield
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    env = _worker_runtime_env()["env_vars"]
    saved = {key: os.environ.get(key) for key in env if key != "PYTHONPATH"}  # PYTHONPATH stays set
    started: _Job | None = None
    try:
        os.environ.update(env)
        started = _on_ray_thread(lambda: _start_ray(init_args, env, preload=preload))
        yield
        started.done.wait()
    except BaseException:
        _restore_environment(saved)
        held = None
        if started is not None:
            held = _hold_interrupts(started.done)
            held = _hold_interrupts(_on_ray_thread(_shutdown_ray).done) or held
        if held is not None:
            raise held from None
        raise
    _restore_environment(saved)
    if started.error is not None:
        _hold_interrupts(_on_ray_thread(_shutdown_ray).done)  # a half-started Ray
        raise started.error


class _Job:
    """A call made on the Ray thread (`_on_ray_thread`): done once it returned or raised."""

    def __init__(self, call: Callable[[], None]) -> None:
        self.call, self.done, self.error = call, threading.Event(), None


def _on_ray_thread(call: Callable[[], None]) -> _Job:
    job = _Job(call)
    _ray_starter().put(job)
    return job


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()  # nothing if Ray is not initialized


def _hold_interrupts(done: threading.Event) -> BaseException | None:
    """Wait for `done`, holding back KeyboardInterrupt / SystemExit (SIGTERM) until it is set;
    the first one held back is returned."""
    held: BaseException | None = None
    while not done.is_set():
        try:
            done.wait()
        except (KeyboardInterrupt, SystemExit) as err:
            if held is None:
                sys.stderr.write("[fedsim] stopping once Ray's start is done and undone (a few seconds)\n")
            held = held or err
    return held


def _restore_environment(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    sys.exit(signum)  # the handler ray.init sets on the main thread (ray._private.worker.init)


def _existing_cluster(temp_dir: str | None) -> bool:
    """Whether ray.init without an address would connect to a running cluster instead of
    starting one (RAY_ADDRESS set to a cluster, inside a Ray job say, or a `ray start` cluster
    recorded in Ray's temp dir): Ray's own decision (a private function; if it fails, Ray starts
    its own). fedsim then attaches to it as it always did, the workers' environment as the job's
    runtime_env, instead of starting its own Ray."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None, temp_dir) is not None
    except Exception:  # noqa: BLE001 - see the docstring
        return False


@functools.cache
def _ray_starter() -> queue.SimpleQueue:
    """The queue of the process's one Ray thread (see `_ray_starting`), which runs each `_Job`
    put on it in turn. A process forked from this one has no such thread: it makes its own
    (`register_at_fork`)."""
    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def serve() -> None:
        # ray.init warns off the main thread that it sets no SIGTERM handler: _ray_starting does.
        logging.getLogger("ray._private.worker").addFilter(lambda r: "SIGTERM handler is not set" not in r.getMessage())
        while True:
            job = jobs.get()
            try:
                job.call()
            except BaseException as err:  # noqa: BLE001 - raised again on the waiting thread
                job.error = err
            job.done.set()

    threading.Thread(target=serve, name="fedsim-ray", daemon=True).start()
    return jobs


os.register_at_fork(after_in_child=_ray_starter.cache_clear)


def _start_ray(init_args: dict[str, Any], env: dict[str, str], *, preload: bool = False) -> None:
    """Start Ray here, as Flower's Ray backend would (its init_ray) (Flower then reuses it), before the
    ServerApp starts: Flower otherwise starts Ray while the ServerApp's first round is already
    waiting, and round 1's time held Ray's start (2.5 s here) on top of the workers'.

    The workers' environment `env` (`_worker_runtime_env`) is in this process's environment while
    Ray starts (`_ray_starting` puts it there), so the raylet and every worker it starts inherit it,
    instead of being passed as Ray's job runtime_env: the raylet starts one worker process per
    CPU as it starts, without a runtime_env, and Flower's worker actors can only reuse those when
    the job has none either (a runtime_env made every actor start a new process after Ray's
    start, 0.8 s of round 1 here). With `preload` those processes import fedsim's ClientApp
    (torch, Flower) as they start, during Ray's start (Ray's `preload_python_modules`): only
    where each of them becomes a busy worker (one CPU per worker, at least as many workers as
    CPUs: `usable_cpus()`); on 64 cores and 8 workers, 56 idle processes would each hold torch.
    Where ray.init would connect to a running cluster instead (`_existing_cluster`), its workers
    get the environment as the job's runtime_env (and it takes no `_system_config`)."""
    import ray

    if ray.is_initialized():
        return
    if _existing_cluster(init_args.get("_temp_dir")):
        ray.init(runtime_env={"env_vars": env}, **init_args)
    else:
        preloaded = {"_system_config": {"preload_python_modules": ["fedsim.ray_worker"]}} if preload else {}
        with _lean_head(log_monitor=bool(init_args.get("log_to_driver", True))):
            ray.init(**init_args, **preloaded)


@contextlib.contextmanager
def _lean_head(*, log_monitor: bool) -> Iterator[None]:
    """While ray.init starts a local cluster, leave out three Python daemons fedsim never uses:
    - Ray's API server, which ray.init waits for before it starts the raylet (it writes its
      address to GCS): with include_dashboard=False it loads only its usage-statistics module
      (ray/_private/services.py, `--modules-to-load=UsageStatsHead`); fedsim uses nothing of it
      (the key registry of the active model is a named actor, found through GCS). Left out only
      on Ray's minimal install (no dashboard dependencies, as flwr[simulation] installs it):
      with ray[default] the raylet's dashboard agent runs its event module, which waits for the
      API server's address forever. Measured on the 2-core machine: ray.init 4.2-5.2 s without
      it against 7.3-8.7 s with it.
    - the autoscaler's monitor: a one-node cluster of fixed size never scales;
    - unless the workers' output goes to the driver (log_to_driver), the log monitor, whose only
      job is to stream it there.
    Each imports Ray while everything else starts on the same two cores. ray.init has no
    argument for them (`ray start` has --no-monitor); Ray's head node reads them from its
    RayParams (ray/_private/parameter.py: `no_monitor`, `include_log_monitor`,
    `include_dashboard`) and starts the API server in `Node.start_api_server`
    (ray/_private/node.py), Ray 2.55.1 as flwr[simulation] pins it. Set here while ray.init
    builds the head node; a Ray without those names is left as it is."""
    try:
        from ray._private import node, parameter
    except ImportError:
        yield
        return
    params_init, start_api_server = parameter.RayParams.__init__, getattr(node.Node, "start_api_server", None)
    if start_api_server is None:
        yield
        return

    def lean(self: Any, *args: Any, **kwargs: Any) -> None:
        params_init(self, *args, **kwargs)
        if hasattr(self, "no_monitor") and hasattr(self, "include_log_monitor"):
            self.no_monitor = True
            if not log_monitor:
                self.include_log_monitor = False

    def api_server_if_wanted(self: Any, **kwargs: Any) -> None:
        if getattr(self._ray_params, "include_dashboard", None) is False and _ray_is_minimal():
            self._webui_url = None  # what Ray records when its API server failed to start
            return
        start_api_server(self, **kwargs)

    parameter.RayParams.__init__, node.Node.start_api_server = lean, api_server_if_wanted
    try:
        yield
    finally:
        parameter.RayParams.__init__, node.Node.start_api_server = params_init, start_api_server


def _ray_is_minimal() -> bool:
    """Whether Ray is installed without its dashboard's dependencies (`ray`, not `ray[default]`):
    Ray's own test (a private function; if it fails, Ray is taken as not minimal)."""
    try:
        from ray._private.utils import get_dashboard_dependency_error

        return get_dashboard_dependency_error() is not None
    except Exception:  # noqa: BLE001 - see the docstring
        return False


def _start_key_registry() -> None:
    """SecAgg+'s active model: the run's key registry (fedsim.pki), a Ray actor the workers reach
    directly, created here, once Ray is up (`_start_ray` or `_attach_ray`) and before the
    ServerApp starts (`pki.start` forgets handles cached by an earlier run in this process)."""
    from fedsim import pki

    pki.start()


def _worker_runtime_env() -> dict[str, Any]:
    """What Flower's Ray backend passes (its init_ray) when it starts Ray itself: this process's import
    path, so workers import fedsim as the launcher does (on other machines fedsim must be
    installed at the same path, see docs/distributed.md), and the simulation engine's mark
    (`SIMULATION_ENV`)."""
    given = os.environ.get("PYTHONPATH")
    entries = [*sys.path, *(given.split(os.pathsep) if given else [])]
    pythonpath = os.pathsep.join(dict.fromkeys(entries))  # each once: many runs in one process do not grow it
    os.environ["PYTHONPATH"] = pythonpath
    # The workers' own mark of the simulation engine (secagg.simulation_shortcut needs it).
    return {"env_vars": {"PYTHONPATH": pythonpath, SIMULATION_ENV: "1"}}


def _attach_ray(address: str, num_workers: int | None, cpus_per_worker: float) -> int:
    """Connect to a running Ray cluster (`ray start --head`, more nodes with `ray start --address`)
    before Flower's simulation engine starts: Flower then uses this connection (it calls
    ray.init only when Ray is not initialized) and spreads its worker actors over the cluster.
    Returns the number of workers: as configured, or one per `cpus_per_worker` cluster CPUs."""
    import ray

    from fedsim.errors import FedsimError

    runtime_env = _worker_runtime_env()
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING,
                 log_to_driver=False)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise FedsimError(f"simulation.ray_address={address}: cannot attach to a Ray cluster: {str(err).splitlines()[0]}") from None
    cpus = float(ray.cluster_resources().get("CPU", 0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    workers = num_workers or max(1, int(cpus // cpus_per_worker))
    if workers * cpus_per_worker > cpus:
        ray.shutdown()
        raise FedsimError(
            f"simulation.num_workers={workers} x cpus_per_worker={cpus_per_worker:g} needs more than the "
            f"{cpus:g} CPUs of the Ray cluster at {address}"
        )
    sys.stderr.write(f"[fedsim] attached to the Ray cluster at {address}: {nodes} node(s), {cpus:g} CPUs, {workers} workers\n")
    return workers


def _write_report(run_dir: Path) -> None:
    """The run's own report; a failure here must not fail a run whose outputs are written."""
    from analysis import write_report

    try:
        path = write_report(run_dir)
        sys.stderr.write(f"[fedsim] report: {path}\n")
    except Exception as err:  # noqa: BLE001 - report problems are reported, the run stands
        logging.getLogger("fedsim").warning("could not write the report for %s: %s", run_dir, err)


# Settings of how and where a run executes, not of what it computes: a resumed run may change them.
RESUME_MAY_CHANGE = ("simulation", "output", "checkpoint", "resume")


def _resumed(cfg: FedsimConfig, overrides: Iterable[str] | None = None) -> tuple[FedsimConfig, Path, dict[str, Any]]:
    """The checkpointed run's config, run directory and state (fedsim.checkpoint.load checks it).

    A key of `overrides` (None: every key) whose value in `cfg` differs from the run's own
    config is refused: the resumed run would silently not be the run that was asked for.
    """
    from fedsim import checkpoint
    from fedsim.config import from_dict

    path = checkpoint.latest(Path(cfg.resume or "").expanduser())
    state = checkpoint.load(path)
    saved = from_dict(state["config"])
    given = resolve_paths(cfg)
    saved_dict, given_dict = saved.to_dict(), given.to_dict()
    if overrides is not None:  # `dataset=shakespeare` on a Shakespeare run chooses nothing new: only its keys count
        overrides = [k for k in overrides if not _same_group(k, saved_dict, given_dict)]
    changed = changed_keys(saved_dict, given_dict, overrides)
    moved = _moved_data(path, state, saved, given, changed)
    if moved is not None:  # the same bytes elsewhere: read them there
        changed = [k for k in changed if k not in moved[0]]
        setattr(saved.dataset, moved[0][0].split(".")[1], moved[1])
    if changed:
        raise ConfigError(
            "resume",
            f"the run at {path.parent.parent} was made with other values of {', '.join(changed)}; "
            f"a resumed run keeps its own config (only {', '.join(RESUME_MAY_CHANGE[:3])} keys may change, and "
            "the data's location to files holding the same bytes): "
            "drop these overrides, or start a new run",
        )
    if warning := checkpoint.check_identity(path, state, saved):
        sys.stderr.write(f"[fedsim] warning: resume: {warning}\n")
    saved.simulation, saved.output.progress, saved.output.report = cfg.simulation, cfg.output.progress, cfg.output.report
    if cfg.checkpoint.every:
        saved.checkpoint = cfg.checkpoint
    saved.resume = str(path)
    # Continue in the run's own directory (where its metrics and ledger live).
    return saved, Path(saved.output.dir) if saved.output.dir else path.parent.parent, state


def _same_group(key: str, saved: dict[str, Any], given: dict[str, Any]) -> bool:
    """Whether override `key` chose a whole config group (`dataset=shakespeare`) of the same
    name as the run's own: needed on the command line to set one of its keys, not a change."""
    mine, theirs = given.get(key), saved.get(key)
    return isinstance(mine, dict) and isinstance(theirs, dict) and mine.get("name") is not None and mine.get("name") == theirs.get("name")


def _moved_data(
    path: Path, state: dict[str, Any], saved: FedsimConfig, given: FedsimConfig, changed: list[str]
) -> tuple[list[str], Any] | None:
    """(the changed keys at or under `dataset.<location key>`, its given value) when those are
    the only `changed` keys: `given` points the run's dataset elsewhere (a path, or a Hugging
    Face builder's data_files, whose entries are keys of their own). The resume may then read
    the data there if its bytes are the ones the checkpoint recorded (fedsim.checkpoint.identity;
    the run, its fingerprint included, stays the same); otherwise one line says why not."""
    import dataclasses

    from fedsim.data import identity

    key = identity.location_key(saved.dataset)
    if key is None:
        return None
    dotted = f"dataset.{key}"
    moved = [k for k in changed if k == dotted or k.startswith(dotted + ".")]
    new = getattr(given.dataset, key, None) if type(given.dataset) is type(saved.dataset) else None
    if not moved or len(moved) != len(changed) or new is None:
        return None  # not (only) a move: the caller refuses the changed keys
    if state.get("data_sha256") is None:
        raise ConfigError(
            "resume",
            f"{path.name} was written by a fedsim that recorded no digest of its data, so its run cannot read its "
            f"data elsewhere; resume with the run's own {dotted}",
        )
    there = identity.content_sha256(dataclasses.replace(saved.dataset, **{key: new}))
    if there is None:
        raise DataError(f"resume: {dotted}={new} cannot be read (or its files listed): a resumed run must read the data it was checkpointed with")
    if there != state["data_sha256"]:
        raise DataError(
            f"resume: {dotted}={new} holds other bytes than the run read (sha256 {state['data_sha256'][:16]}..., "
            f"there {there[:16]}...): a resumed run must read the same data; point it at a copy of that data or start a new run"
        )
    return moved, new


def changed_keys(saved: dict[str, Any], given: dict[str, Any], overrides: Iterable[str] | None) -> list[str]:
    """Dotted config keys whose values differ, limited to those under (or above) an override
    (None: all), except the RESUME_MAY_CHANGE groups. An override that is not a config key
    (experiment=...) sets keys we cannot name: then every key is compared."""
    diff = [k for k in _diff(saved, given, "") if k.split(".")[0] not in RESUME_MAY_CHANGE and not _calibrated(k, saved, given)]
    keys = list(overrides) if overrides is not None else None
    if keys is None or any(k.split(".")[0] not in saved for k in keys):
        return diff
    return [d for d in diff if any(d == k or d.startswith(k + ".") or k.startswith(d + ".") for k in keys)]


def _calibrated(key: str, saved: dict[str, Any], given: dict[str, Any]) -> bool:
    """A derived key (fedsim.config.CALIBRATED_KEYS) that the run filled in from the same target:
    null in the given config, a number in the saved one."""
    if key not in CALIBRATED_KEYS:
        return False
    *parent, _ = key.split(".")

    def at(d: Any, path: list[str]) -> Any:
        for part in path:
            d = d.get(part) if isinstance(d, dict) else None
        return d

    mine, theirs = at(given, parent), at(saved, parent)
    return (isinstance(mine, dict) and isinstance(theirs, dict) and at(given, key.split(".")) is None
            and mine.get("target_epsilon") == theirs.get("target_epsilon") is not None)  # fmt: skip


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    return [] if a == b else [path]


@contextlib.contextmanager
def _stop_on_ctrl_c() -> Iterator[None]:
    """First Ctrl-C: finish the round, checkpoint (if on), write the outputs, stop. Second: abort."""
    from fedsim.server_app import STOP

    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        sys.stderr.write("\n[fedsim] Ctrl-C: stopping after this round (Ctrl-C again to abort now)\n")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _short_path(path: str | None) -> Iterator[str | None]:
    """Ray puts unix sockets under its temp dir, and AF_UNIX paths are limited to 107 bytes:
    a long directory (a test's tmp_path) is reached through a short symlink in /tmp."""
    if not path:
        yield None
        return
    target = Path(path).absolute()
    target.mkdir(parents=True, exist_ok=True)
    if len(str(target)) <= 40:
        yield str(target)
        return
    link = Path(tempfile.mkdtemp(prefix="fsray")) / "r"
    link.symlink_to(target, target_is_directory=True)
    try:
        yield str(link)
    finally:
        shutil.rmtree(link.parent, ignore_errors=True)
