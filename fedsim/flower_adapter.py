"""Every Flower internal fedsim reaches into, in one place.

fedsim builds on Flower's public Message API (`flwr.app`, `flwr.serverapp`, `flwr.clientapp`)
and its simulation launcher (`flwr.simulation.run_simulation`). A few things it needs are not
public; they live here, each checked against Flower 1.42.0 (pyproject.toml pins
flwr>=1.42,<1.43, and tests/test_layers.py fails when the installed minor version differs from
FLOWER_CHECKED, so an upgrade means re-reading the Flower sources named below). No other module
imports anything under `flwr.` outside those public modules or spells a name of INTERNALS
(tests/test_layers.py checks both).

- `fast_dispatch`: the simulation engine's loop that hands server messages to workers sleeps
  100 ms per pass (flwr/server/superlink/fleet/vce/vce_api.py, `add_messages_to_queue`); fedsim
  sends one message per worker per stage, so that sleep would be most of a small round.
- `replace_dead_actors`: Flower's Ray actor pool (flwr/simulation/ray_transport/ray_actor.py,
  `BasicActorPool`) reuses an actor whose process died; fedsim's chaos faults kill workers.
- `in_process_grid`: whether a grid is the simulation engine's InMemoryGrid (it has a
  `pull_interval`, flwr/superlink/grid/inmemory_grid.py), to pick how often to pull replies.
- `light_simulation_package`: a Ray worker process imports Flower's actor class from
  flwr/simulation/ray_transport/ray_actor.py, and so first the package flwr/simulation/__init__.py,
  which imports the whole simulation launcher (SuperLink state on SQLAlchemy and Alembic, the CLI
  on FastAPI) that a worker never runs: 1.9 s of CPU and 47 MB in every worker, measured.
  (The launcher imports the package whole: Flower's run_simulation module itself imports
  SQLAlchemy and FastAPI, so skipping the package's app.py there saved nothing,
  `python bench/startup.py --phases`.)
- `defer_sql_state`, `light_error_packages`: the launcher imports Flower's SuperLink state on SQL
  (SQLAlchemy and Alembic) only to reach the in-memory state the simulation engine uses, and
  Flower's error package (its HTTP translator on FastAPI, pydantic) for four names: stand-ins and
  lazy packages until the rest is used (LIGHT_NAMES lists what the launcher reads).
- `process_backend`: the simulation engine builds its backend as Flower's `RayBackend`, named in
  flwr/server/superlink/fleet/vce/vce_api.py (`start_vce`, `backend_fn`) with no way to pass
  another; fedsim's local worker processes (`fedsim.local_workers`) take that name while a run
  on them lasts, as a subclass of Flower's `Backend` (flwr/server/superlink/fleet/vce/backend).
- `task_identity(_patches)` and `set_message_id`: what Flower's engines set in a real ServerApp/ClientApp
  process (flwr/supercore/task_identity.py `TaskIdentity`; a Message's `_message_id`), for the
  in-process grid the tests and scripts/golden.py run fedsim's apps on (tests/fake_grid.py).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import threading
import time
import types
from collections.abc import Iterator
from queue import Empty
from typing import Any

FLOWER_CHECKED = "1.42.0"  # the Flower version every internal below was read against

# Names of Flower internals (attributes, classes, functions) used only in this module.
INTERNALS = {
    "add_messages_to_queue": "vce_api's dispatch loop, replaced by fast_dispatch",
    "put_message_into_state": "vce_api's reply loop, replaced by fast_dispatch",
    "BasicActorPool": "Flower's Ray actor pool, patched by replace_dead_actors",
    "pull_interval": "InMemoryGrid's pull pause, the mark of an in-process grid",
    "TaskIdentity": "the ids a Message needs in its process, set by task_identity",
    "_message_id": "a Message's id, set by Flower's grids when they push it",
    "RayBackend": "the simulation engine's backend, replaced by process_backend",
}


def in_process_grid(grid: object) -> bool:
    """Flower's InMemoryGrid (the simulation engine), as opposed to a SuperLink over the network."""
    return hasattr(grid, "pull_interval")


IDLE_POLL_FRACTION = 0.01  # an idle poller waits at most this fraction of the time it has waited
STOP_CHECK_S = 0.05  # the simulation engine's threads look at its stop flag at least this often


@contextlib.contextmanager
def fast_dispatch(num_nodes: int) -> Iterator[None]:
    """Poll for new messages every 2 ms instead of Flower's 100 ms when there are few workers.

    With few nodes a pass over them is cheap, so fedsim polls every 2 ms; with many (the
    classic layout) it keeps Flower's 100 ms. The loop is otherwise Flower's own.

    Also the engine's end: its worker threads and its reply thread wait on their queues with a
    timeout of 1 s between looks at the stop flag (`worker`, `put_message_into_state`), so a run
    ended up to 1 s after its last round. Here those waits last at most `STOP_CHECK_S`: the
    message queue's `get` is capped on the instance the dispatch loop is given, and the reply
    thread's loop is Flower's with the shorter wait.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original, original_replies = vce_api.add_messages_to_queue, vce_api.put_message_into_state
    interval = 0.002 if num_nodes <= 64 else 0.1

    def put_message_into_state(state: Any, queue: Any, f_stop: Any) -> None:
        while not f_stop.is_set():
            try:
                state.store_message_res(queue.get(timeout=STOP_CHECK_S))
            except Empty:
                pass

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
        get = queue.get
        queue.get = lambda block=True, timeout=None: get(block, timeout if timeout is None else min(timeout, STOP_CHECK_S))
        last = time.monotonic()
        while not f_stop.is_set():
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
                    last = time.monotonic()
            # Idle for long (workers training a large model): poll less, at most 1% later than
            # the idle time so far and never past 50 ms, so the polls do not take CPU from the
            # workers (measured: 2 ms polls made a 2-worker CNN round's training 8% slower).
            f_stop.wait(max(interval, min(IDLE_POLL_FRACTION * (time.monotonic() - last), 0.05)))

    vce_api.add_messages_to_queue, vce_api.put_message_into_state = add_messages_to_queue, put_message_into_state
    try:
        yield
    finally:
        vce_api.add_messages_to_queue, vce_api.put_message_into_state = original, original_replies


def light_simulation_package() -> bool:
    """Make `flwr.simulation` a package whose `__init__` runs only when one of its names is read.

    For a Ray worker process, before Flower's actor class arrives (fedsim.ray_worker, Ray's
    preload): importing `flwr.simulation.ray_transport.ray_actor` then imports that module and
    what it imports, not the launcher that flwr/simulation/__init__.py imports (measured on the
    2-core machine: 1.4 s and 101 MB instead of 3.3 s and 148 MB). The first read of a name
    the package defines (`from flwr.simulation import run_simulation`, `__all__` for a star
    import) runs the real `__init__` in the same module object (`_lazy_package`), so nothing the
    package offers is missing, only later. Returns False (and changes nothing) where
    `flwr.simulation` is already imported.
    """
    return _lazy_package("flwr.simulation", {})


# The names the simulation launcher reads from two packages whose `__init__` imports FastAPI,
# each with the module (and attribute) the real `__init__` binds it from. Flower's error package
# (flwr/supercore/error/__init__.py) imports its HTTP error translator, on FastAPI; the launcher
# reads only these four (NoOpFederationManager, flwr.cli.utils, the gRPC interceptors). Its gRPC
# translator's status catalog (error/catalog.py) reads `status` from FastAPI, which is
# Starlette's module (fastapi/__init__.py: `from starlette import status as status`).
LIGHT_NAMES = {
    "flwr.supercore.error": {
        "ApiErrorCode": ("flwr.supercore.error.base", "ApiErrorCode"),
        "FlowerError": ("flwr.supercore.error.base", "FlowerError"),
        "EntitlementError": ("flwr.supercore.error.exceptions", "EntitlementError"),
        "rpc_error_translator": ("flwr.supercore.error.grpc", "rpc_error_translator"),
    },
    "fastapi": {"status": ("starlette.status", None)},
}


def light_error_packages() -> bool:
    """Make Flower's error package and FastAPI packages whose `__init__` runs only when a name
    other than LIGHT_NAMES' is read (those come from their own modules: the same objects).
    Returns False (and changes nothing) where either is already imported. FastAPI stays lazy
    only until `release_fastapi` (`lean_launcher_imports` calls both): a FastAPI submodule
    imported first while the package is lazy would run its `__init__` halfway through."""
    if any(name in sys.modules for name in LIGHT_NAMES):
        return False
    return all([_lazy_package(name, light) for name, light in LIGHT_NAMES.items()])


def release_fastapi() -> None:
    """Put FastAPI back as any package: if its `__init__` never ran, the lazy module leaves
    sys.modules (the next `import fastapi` is the usual one; what was read from it, `status`,
    is the object the real package binds); if a submodule was imported meanwhile, its real
    `__init__` runs now."""
    module = sys.modules.get("fastapi")
    if module is None or "__getattr__" not in module.__dict__ or not getattr(module, "_fedsim_lazy", False):
        return
    # A snapshot (list() copies in one step): Ray's start thread may be importing meanwhile, and
    # iterating sys.modules itself then fails with "dictionary changed size during iteration".
    if any(name.startswith("fastapi.") for name in list(sys.modules)):
        getattr(module, "__version__")  # runs the real __init__ (a name LIGHT_NAMES does not give)
    else:
        del sys.modules["fastapi"]


@contextlib.contextmanager
def lean_launcher_imports() -> Iterator[bool]:
    """While the block runs (the launcher importing Flower's simulation launcher and its own
    apps), `defer_sql_state` and `light_error_packages`; FastAPI is released at the end
    (`release_fastapi`), Flower's error package stays lazy. Yields whether both applied (False:
    something imported them before, their saving is lost; nothing else changes)."""
    applied = defer_sql_state()
    applied = light_error_packages() and applied
    try:
        yield applied
    finally:
        release_fastapi()


def _lazy_package(name: str, light: dict[str, tuple[str, str | None]]) -> bool:
    """Put package `name` into sys.modules without running its `__init__`: its submodules import
    as usual (the package's path is set), a name of `light` comes from its own module alone
    ((module, attribute); attribute None: the module itself), and the first read of any other
    name runs the real `__init__` in the same module object, under a lock (a second thread waits,
    as the import system would make it; an `__init__` that raises leaves the hook in place, so the
    next read raises the same error). Dunder probes (copy, pickle, inspect) stay cheap; `__all__`
    and `__version__` run the `__init__` (a star import gets every name). False where `name` is
    already imported. Known limit: the `__init__` runs under this module's lock, which Python's
    import-deadlock detection does not see (a thread importing a submodule of the package while
    another reads a name could wait for each other); fedsim reads these names on one thread."""
    if name in sys.modules:
        return False
    parent_name, _, child = name.rpartition(".")
    parent = importlib.import_module(parent_name) if parent_name else None
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return False
    module = importlib.util.module_from_spec(spec)
    lock, running = threading.RLock(), []

    def __getattr__(attribute: str) -> Any:  # noqa: N807 - the module-level hook of PEP 562
        if attribute.startswith("__") and attribute.endswith("__") and attribute not in ("__all__", "__version__"):
            raise AttributeError(attribute)
        if attribute in light and module.__dict__.get("__getattr__") is __getattr__:
            source, field = light[attribute]
            value = importlib.import_module(source)
            value = value if field is None else getattr(value, field)
            module.__dict__.setdefault(attribute, value)
            return module.__dict__[attribute]
        with lock:
            if running:  # the real __init__, on this thread, reading a name it has not defined yet
                raise AttributeError(f"partially initialized module {name!r} has no attribute {attribute!r}")
            if module.__dict__.get("__getattr__") is __getattr__:
                running.append(True)
                try:
                    spec.loader.exec_module(module)  # type: ignore[union-attr]
                finally:
                    running.clear()
                del module.__getattr__  # only once the real __init__ ran to the end
        try:
            return module.__dict__[attribute]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}") from None

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    module._fedsim_lazy = True  # type: ignore[attr-defined]
    sys.modules[name] = module
    if parent is not None:
        setattr(parent, child, module)  # as the import system sets it
    return True


# Flower's SuperLink state on SQL (SQLAlchemy and Alembic): each factory module imports its Sql*
# class eagerly, while the simulation engine asks the factories for in-memory state only
# (flwr/simulation/run_simulation.py and flwr/server/superlink/fleet/vce/vce_api.py pass
# FLWR_IN_MEMORY_DB_NAME to LinkStateFactory and ObjectStoreFactory).
SQL_STATE = {
    "flwr.server.superlink.linkstate.sql_linkstate": "SqlLinkState",
    "flwr.supercore.object_store.sql_object_store": "SqlObjectStore",
}


class _Deferred(type):
    """Metaclass of a stand-in for a class whose module is imported only when the class is used.

    Calling the stand-in, reading or setting an attribute of it (not a dunder: introspection
    stays cheap), subclassing it, or asking whether a class is a subclass of it imports the real
    module and answers with the real class; once it is imported, every module's global that
    holds the stand-in is made the real class (`_rebind`). `isinstance` answers False without
    importing while the real module was never imported (no instance can exist then).
    """

    _fedsim_lock = threading.RLock()

    def __new__(mcs, name: str, bases: tuple, namespace: dict, **kwds: Any) -> Any:  # noqa: N804
        if any(isinstance(base, _Deferred) for base in bases):  # a subclass: of the real class
            real = tuple(base._fedsim_real() if isinstance(base, _Deferred) else base for base in bases)
            return types.new_class(name, real, kwds, lambda body: body.update(namespace))
        return super().__new__(mcs, name, bases, namespace)

    def _fedsim_real(cls) -> Any:
        real = cls.__dict__.get("_fedsim_class")
        if real is None:
            real = getattr(_import_deferred(cls.__dict__["_fedsim_module"]), cls.__name__)
            with _Deferred._fedsim_lock:
                if cls.__dict__.get("_fedsim_class") is None:
                    type.__setattr__(cls, "_fedsim_class", real)
                    _rebind(cls, real)
        return real

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._fedsim_real()(*args, **kwargs)

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_fedsim") or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return getattr(cls._fedsim_real(), name)

    def __setattr__(cls, name: str, value: Any) -> None:
        setattr(cls._fedsim_real(), name, value)

    def __delattr__(cls, name: str) -> None:
        delattr(cls._fedsim_real(), name)

    def __instancecheck__(cls, obj: Any) -> bool:
        module = sys.modules.get(cls.__dict__["_fedsim_module"])
        if cls.__dict__.get("_fedsim_class") is None and getattr(module, "_fedsim_stand_in", False):
            return False
        return isinstance(obj, cls._fedsim_real())

    def __subclasscheck__(cls, sub: Any) -> bool:
        return issubclass(sub, cls._fedsim_real())


def _rebind(stand_in: Any, real: Any) -> None:
    """Make every module global that holds `stand_in` hold `real` (the factories' own names)."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        try:
            names = [key for key, value in namespace.items() if value is stand_in]
        except RuntimeError:  # the module's dict changed meanwhile (another thread importing)
            continue
        for key in names:
            namespace[key] = real


def _import_deferred(name: str) -> Any:
    """The real module `name`, imported now in place of its stand-in. Only the bookkeeping holds
    _Deferred's lock; the import itself is ordered by Python's own lock on the module (a second
    thread waits for the first's import)."""
    with _Deferred._fedsim_lock:
        module = sys.modules.get(name)
        stand_in = module if getattr(module, "_fedsim_stand_in", False) else None
        if stand_in is not None:
            _SqlStateFinder.released.add(name)
            del sys.modules[name]
    try:
        return importlib.import_module(name)
    except BaseException:
        with _Deferred._fedsim_lock:
            if stand_in is not None and name not in sys.modules:  # the next use tries again
                _SqlStateFinder.released.discard(name)
                sys.modules[name] = stand_in
        raise


class _SqlStateFinder:
    """Import hook (sys.meta_path) that loads a stand-in for each module of SQL_STATE, once the
    import system asks for it, so its package gets it as any submodule (sys.modules, the
    package's attribute); the real module when Flower no longer has it, or once released."""

    released: set[str] = set()

    @classmethod
    def find_spec(cls, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in SQL_STATE or name in cls.released:
            return None
        real = importlib.machinery.PathFinder.find_spec(name, path)
        if real is None:
            return None
        return importlib.util.spec_from_loader(name, cls, origin=real.origin)

    @staticmethod
    def create_module(spec: Any) -> Any:
        return _stand_in_module(spec.name, SQL_STATE[spec.name])

    @staticmethod
    def exec_module(module: Any) -> None:
        return None


def defer_sql_state() -> bool:
    """Make Flower's SQL state modules (SQL_STATE) stand-ins until they are used, so that
    importing the simulation launcher does not import SQLAlchemy and Alembic, which an
    in-memory simulation never uses: 32 MB resident and 0.5 s less in the launcher (one-off, on
    the 2-core EPYC: `import torch, ray` then `from flwr.simulation import run_simulation`,
    337 -> 305 MB, 1.07 -> 0.55 s; with `light_error_packages` too, `python bench/startup.py
    --phases`, "launcher import"). Nothing is lost: the stand-in module's other names, and
    the stand-in class when called or read, import the real module then (a SuperLink on a
    database still works in the same process). Returns False (and changes nothing) where one
    of them is already imported.
    """
    with _Deferred._fedsim_lock:
        if any(name in sys.modules for name in SQL_STATE):
            return False
        if _SqlStateFinder not in sys.meta_path:
            sys.meta_path.insert(0, _SqlStateFinder)  # type: ignore[arg-type]
        return True


def _stand_in_module(name: str, class_name: str) -> Any:
    module = types.ModuleType(name, f"Stand-in for {name} until it is used (fedsim.flower_adapter.defer_sql_state).")
    module._fedsim_stand_in = True  # type: ignore[attr-defined]
    stand_in = _Deferred(class_name, (), {"_fedsim_module": name, "_fedsim_class": None, "__module__": name})

    def __getattr__(attribute: str) -> Any:  # noqa: N807 - the module-level hook of PEP 562
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)
        return getattr(_import_deferred(name), attribute)

    module.__dict__.update({class_name: stand_in, "__getattr__": __getattr__})
    return module


@contextlib.contextmanager
def replace_dead_actors() -> Iterator[None]:
    """Replace a Ray worker actor whose process died, instead of reusing it.

    Flower's actor pool puts an actor back into the pool after its job raised, even when the
    actor's process is gone (SIGKILL, OOM killer): every later message it gets fails at once,
    and with all actors dead the run can no longer train. Here the dead actor is dropped and a
    new one takes its place, so a killed worker process costs one resent job.
    """
    import ray
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    fetch, give_back = BasicActorPool.fetch_result_and_return_actor_to_pool, BasicActorPool.add_actor_back_to_pool

    def fetch_result_and_return_actor_to_pool(self: Any, future: Any) -> Any:
        try:
            return fetch(self, future)
        except ray.exceptions.RayActorError:
            self._future_to_actor.pop(future, None)
            self.pool.append(self.create_actor_fn())
            raise

    def add_actor_back_to_pool(self: Any, future: Any) -> None:
        if future in self._future_to_actor:  # not the dead actor replaced above
            give_back(self, future)

    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_result_and_return_actor_to_pool
    BasicActorPool.add_actor_back_to_pool = add_actor_back_to_pool
    try:
        yield
    finally:
        BasicActorPool.fetch_result_and_return_actor_to_pool = fetch
        BasicActorPool.add_actor_back_to_pool = give_back


RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"


@contextlib.contextmanager
def process_backend(pool: Any) -> Iterator[None]:
    """Flower's simulation engine on `pool` (a `fedsim.local_workers.WorkerPool`) instead of Ray.

    While the block runs, the engine's `RayBackend` is a Backend that hands each message to the
    pool: a ClientApp's exception comes back as Flower's ClientAppException (the engine replies
    with an error message, as for a Ray actor's), a dead worker process as WorkerDied (the same).
    The Ray backend's module is not imported for it (that imports Ray): a stand-in module takes
    its name, unless it is already loaded, then only its class is swapped. Put back on leaving.
    """
    from flwr.clientapp.client_app import ClientAppException
    from flwr.server.superlink.fleet.vce.backend import Backend

    from fedsim.local_workers import WorkerError

    class LocalProcessBackend(Backend):
        """fedsim's worker processes as the engine's backend (`fedsim.local_workers`)."""

        def __init__(self, backend_config: Any) -> None:
            super().__init__(backend_config)

        def build(self, app_fn: Any) -> None:
            pass  # the workers run fedsim's ClientApp, the app the engine was given

        @property
        def num_workers(self) -> int:
            return pool.num_workers

        def is_worker_idle(self) -> bool:
            return pool.is_idle()

        def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
            try:
                return pool.run(message, context)
            except WorkerError as err:
                raise ClientAppException(str(err)) from None

        def terminate(self) -> None:
            pool.close()

    module = sys.modules.get(RAY_BACKEND_MODULE)
    if module is not None:
        original = module.RayBackend
        module.RayBackend = LocalProcessBackend
    else:
        sys.modules[RAY_BACKEND_MODULE] = types.ModuleType(RAY_BACKEND_MODULE)
        sys.modules[RAY_BACKEND_MODULE].RayBackend = LocalProcessBackend  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if module is not None:
            module.RayBackend = original
        else:
            sys.modules.pop(RAY_BACKEND_MODULE, None)


def task_identity_patches(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> list[tuple[Any, str, int]]:
    """(object, attribute, value) to set for the process identity Flower's engines set before a
    ServerApp or ClientApp runs (a Message cannot be made without it); for pytest's monkeypatch."""
    from flwr.supercore.task_identity import TaskIdentity

    return [(TaskIdentity, "_run_id", run_id), (TaskIdentity, "_node_id", node_id), (TaskIdentity, "_task_id", task_id)]


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """`task_identity_patches` while the block runs: both apps in this process without an engine."""
    from unittest import mock

    with contextlib.ExitStack() as stack:
        for target, name, value in task_identity_patches(run_id, node_id, task_id):
            stack.enter_context(mock.patch.object(target, name, value))
        yield


def set_message_id(message: Any, message_id: str) -> None:
    """Give a pushed Message its id, as Flower's grids do (its metadata has no public setter)."""
    message.metadata.__dict__["_message_id"] = message_id
