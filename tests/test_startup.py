"""The launcher starts Ray on a thread while it loads the data (fedsim.run._ray_starting).

What a user relies on: a run refused while its data load (bad data), or stopped by Ctrl-C while
Ray starts, leaves no Ray behind (no initialized Ray in the process, no Ray daemon still running
under it), so the next run in the same process starts normally; and the simulation engine's
mark (`SIMULATION_ENV`), which lets a worker take secagg.simulation_shortcut, reaches the workers
but does not stay in the launcher's environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray

from fedsim.config import SIMULATION_ENV, from_dict
from fedsim.errors import FedsimError
from fedsim.run import run

pytestmark = pytest.mark.ray


def _child_processes() -> list[tuple[str, str]]:
    """(command name, command line) of this process's live child processes (Ray's GCS and raylet are ours)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if int(rest[1]) == me and rest[0] != "Z":
            found.append((name, command))
    return found


def _children() -> list[str]:
    """Command names of this process's live child processes."""
    return [name for name, _ in _child_processes()]


def _cfg(tmp_path: Path, **dataset: object) -> dict:
    return {
        "rounds": 1,
        "population": 20,
        "cohort": {"size": 4, "sampling": "fixed"},
        "dataset": dataset,
        "output": {"progress": False, "save_model": False, "report": False},
        "simulation": {"num_workers": 1, "ray_temp_dir": str(tmp_path / "ray")},
    }


def test_a_run_refused_at_its_data_leaves_no_ray_and_the_next_run_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Absent whatever this test process was started with (conftest restores it afterwards).
    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert not ray.is_initialized()
    with pytest.raises(FedsimError, match="has no train-images"):
        run(from_dict(_cfg(tmp_path, name="fashion_mnist", path=str(empty))), tmp_path / "refused")
    assert not ray.is_initialized()
    assert not [n for n in _children() if n in ("gcs_server", "raylet")], _children()
    assert SIMULATION_ENV not in os.environ
    # The same process runs the next experiment (Ray started again by the same thread).
    summary = run(from_dict(_cfg(tmp_path)), tmp_path / "ok")
    assert summary["rounds"] == 1 and summary["devices_trained"] > 0
    assert SIMULATION_ENV not in os.environ
    assert not ray.is_initialized()


def test_the_ray_workers_carry_the_simulation_mark_and_take_the_shortcut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """secagg.simulation_shortcut on Ray: the workers accept it only with the mark the launcher
    puts in the environment Ray starts with (a worker without it refuses and its devices drop);
    the run ends with the model the in-process engine computes, bit for bit."""
    from fake_grid import run_local

    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    assert not ray.is_initialized()  # a Ray left by another test would not carry the mark
    raw = _cfg(tmp_path)
    raw.update({"rounds": 2, "population": 30, "cohort": {"size": 8, "sampling": "fixed"},
                "secagg": {"name": "secaggplus", "simulation_shortcut": True, "max_corrupt_fraction": 0.0},
                "simulation": {"num_workers": 2, "ray_temp_dir": str(tmp_path / "ray")}})  # fmt: skip
    on_ray = run(from_dict(raw), tmp_path / "ray-run")
    assert SIMULATION_ENV not in os.environ
    rows = [json.loads(x) for x in (tmp_path / "ray-run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("secagg_survivors_unmask") for r in rows] == [8, 8] and not any(r.get("secagg_aborted") for r in rows)
    assert on_ray["secagg"]["simulation_shortcut"] is True
    monkeypatch.setenv(SIMULATION_ENV, "1")  # as LocalGrid sets it, undone at teardown
    local = run_local(from_dict(raw), tmp_path / "local")
    assert on_ray["model_sha256"] == local["model_sha256"]


def test_ctrl_c_while_ray_starts_restores_the_environment_and_leaves_no_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt in the launcher while Ray starts on its thread (fedsim.run._ray_starting):
    it goes on once Ray's start is done and undone, and the simulation mark is not left in the
    environment (a long-lived process, a notebook, would hand it to every process it starts)."""
    from fedsim.run import _ray_starting, _short_path

    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    assert not ray.is_initialized()
    with _short_path(str(tmp_path / "ray")) as ray_dir, pytest.raises(KeyboardInterrupt):
        args = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False, "_temp_dir": ray_dir}
        with _ray_starting(args, preload=False):
            assert os.environ[SIMULATION_ENV] == "1"  # in the environment Ray's raylet starts with
            raise KeyboardInterrupt
    assert SIMULATION_ENV not in os.environ
    assert not ray.is_initialized()
    assert not [n for n in _children() if n in ("gcs_server", "raylet")], _children()


def _child_commands() -> list[str]:
    """Command lines of this process's live children."""
    return [command for _, command in _child_processes()]


@pytest.mark.parametrize("log_to_driver", [False, True])
def test_the_local_cluster_starts_without_the_daemons_fedsim_does_not_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_to_driver: bool) -> None:
    """fedsim.run._lean_head: Ray's API server (ray.init waits for it before the raylet starts),
    the autoscaler's monitor and, without log_to_driver, the log monitor are not started; GCS and
    the raylet are, and a task runs; Ray's own classes are put back afterwards."""
    from ray._private import node, parameter

    from fedsim.run import _ray_starting, _short_path

    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    assert not ray.is_initialized()
    before = (parameter.RayParams.__init__, node.Node.start_api_server)
    with _short_path(str(tmp_path / "ray")) as ray_dir:
        args = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": log_to_driver, "_temp_dir": ray_dir}
        with _ray_starting(args, preload=False):
            pass
        try:
            assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
            commands = _child_commands()
            assert any("gcs_server" in c for c in commands) and any("raylet" in c for c in commands), commands
            assert not any("dashboard/dashboard.py" in c or "autoscaler/_private/monitor.py" in c for c in commands), commands
            assert any("log_monitor.py" in c for c in commands) == log_to_driver, commands
        finally:
            ray.shutdown()
    assert (parameter.RayParams.__init__, node.Node.start_api_server) == before


def _python(probe: str) -> list[str]:
    """What a fresh interpreter running `probe` prints, as words (it must exit 0)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_a_ray_worker_imports_flowers_actor_without_the_simulation_launcher() -> None:
    """What a Ray worker process runs as it starts (fedsim.ray_worker, Ray's preload): Flower's
    actor module then loads without flwr/simulation/__init__.py's launcher (SuperLink state on
    SQLAlchemy, the CLI on FastAPI: 1.9 s and 47 MB a worker), and every name the package
    offers is still there when read (its real __init__ runs then, in the same module)."""
    probe = (
        "import sys\n"
        "import fedsim.ray_worker\n"
        "from flwr.simulation.ray_transport.ray_actor import ClientAppActor\n"
        "print(sorted(m for m in ('sqlalchemy', 'alembic', 'fastapi', 'flwr.simulation.app') if m in sys.modules))\n"
        "assert 'fedsim.client_app' in sys.modules\n"
        "from flwr.simulation import run_simulation\n"
        "import flwr.simulation\n"
        "assert flwr.simulation.run_simulation is run_simulation and 'flwr.simulation.app' in sys.modules\n"
        "from fedsim import flower_adapter\n"
        "print(flower_adapter.light_simulation_package())\n"
    )
    assert _python(probe) == ["[]", "False"]
    star = (  # `from flwr.simulation import *` reads __all__: the real __init__ runs, every name comes
        "import fedsim.ray_worker\n"
        "from flwr.simulation import *\n"
        "print(callable(run_simulation), callable(start_simulation))\n"
    )
    assert _python(star) == ["True", "True"]
    threads = (  # names read on several threads at once: each waits for the one running __init__
        "import threading\n"
        "import fedsim.ray_worker\n"
        "import flwr.simulation as package\n"
        "seen = []\n"
        "def read():\n"
        "    from flwr.simulation import start_simulation, run_simulation_process\n"
        "    seen.append(callable(start_simulation) and callable(run_simulation_process))\n"
        "workers = [threading.Thread(target=read) for _ in range(6)]\n"
        "[w.start() for w in workers]; [w.join() for w in workers]\n"
        "print(seen == [True] * 6, '__getattr__' in package.__dict__)\n"
    )
    assert _python(threads) == ["True", "False"]


def test_the_launcher_imports_flowers_sql_state_only_when_a_run_uses_it() -> None:
    """fedsim's launcher (fedsim.run) defers Flower's SuperLink state on SQL and makes Flower's
    error package and FastAPI lazy: importing the simulation launcher then leaves SQLAlchemy,
    Alembic, FastAPI's application layer and pydantic out (45 MB, 1 s), and the in-memory
    state the simulation uses is the real one. A SuperLink on a database in the same process
    still gets the real SQL classes, which work (the stand-in imports them when called)."""
    probe = (
        "import sys\n"
        "from fedsim import flower_adapter\n"
        "print(flower_adapter.defer_sql_state())\n"
        "from flwr.simulation import run_simulation\n"
        "from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory, SqlLinkState\n"
        "from flwr.supercore.object_store import ObjectStoreFactory\n"
        "from flwr.superlink.federation import NoOpFederationManager\n"
        "print(sorted(m for m in ('sqlalchemy', 'alembic') if m in sys.modules))\n"
        "from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME\n"
        "memory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()).state()\n"
        "print(type(memory) is InMemoryLinkState, isinstance(memory, SqlLinkState), 'sqlalchemy' in sys.modules)\n"
        "store = ObjectStoreFactory(':memory:').store()\n"
        "real = sys.modules['flwr.supercore.object_store.sql_object_store']\n"
        "print(type(store) is real.SqlObjectStore, 'sqlalchemy' in sys.modules, getattr(real, '_fedsim_stand_in', False))\n"
        "sql = LinkStateFactory(':memory:', NoOpFederationManager(), ObjectStoreFactory()).state()\n"
        "import flwr.server.superlink.linkstate.sql_linkstate as module\n"
        "print(type(sql) is module.SqlLinkState, isinstance(sql, SqlLinkState), issubclass(module.SqlLinkState, SqlLinkState))\n"
        "print(callable(module._run_from_models), flower_adapter.defer_sql_state())\n"
    )
    assert _python(probe) == ["True", "[]", "True", "False", "False", "True", "True", "False", "True", "True", "True", "True", "False"]
    # What fedsim.run has imported when it defers (its module, Ray on the starting thread) leaves
    # the SQL state unimported, so the launcher's call is not too late.
    launcher = (  # as fedsim.run imports Flower's launcher and its own apps
        "import sys, ray, fedsim.run\n"
        "from fedsim import flower_adapter\n"
        "with flower_adapter.lean_launcher_imports() as lean:\n"
        "    import fedsim.server_app, fedsim.client_app\n"
        "    from flwr.simulation import run_simulation\n"
        "print(lean, sorted(m for m in ('sqlalchemy', 'fastapi', 'fastapi.applications', 'pydantic') if m in sys.modules))\n"
        # Afterwards FastAPI imports as usual, a submodule first too (while lazy, that broke), and
        # everything Flower's error package offers is there: the same objects as its modules'.
        "from fastapi.security import APIKeyHeader\n"
        "import fastapi.applications, starlette.status, flwr.supercore.error.base as base\n"
        "from flwr.supercore.error import FlowerError, http_error_translator\n"
        "from fastapi import FastAPI, status, __version__\n"
        "import flwr.supercore.error.catalog as catalog\n"
        "print(FlowerError is base.FlowerError, status is starlette.status is catalog.status, callable(FastAPI),\n"
        "      callable(http_error_translator), callable(APIKeyHeader))\n"
    )
    assert _python(launcher) == ["True", "[]", "True", "True", "True", "True", "True"]
    # The stand-in as a class: introspection stays cheap; a subclass, a patched attribute and the
    # factories' own name are the real class's once it is used.
    stand_in = (
        "import sys\n"
        "from fedsim import flower_adapter\n"
        "flower_adapter.defer_sql_state()\n"
        "from flwr.server.superlink.linkstate import SqlLinkState, linkstate_factory\n"
        "hasattr(SqlLinkState, '__wrapped__'); SqlLinkState.__doc__\n"
        "print('sqlalchemy' in sys.modules)\n"
        "class Mine(SqlLinkState):\n"
        "    pass\n"
        "import flwr.server.superlink.linkstate.sql_linkstate as real\n"
        "print(issubclass(Mine, real.SqlLinkState), type(Mine) is type(real.SqlLinkState))\n"
        "SqlLinkState.fedsim_probe = 1\n"
        "print(real.SqlLinkState.fedsim_probe, linkstate_factory.SqlLinkState is real.SqlLinkState)\n"
    )
    assert _python(stand_in) == ["False", "True", "True", "1", "True"]


def test_rays_serialization_addons_stay_out_of_workers_and_of_the_driver_while_a_run_lasts() -> None:
    """Ray's SerializationContext registers pydantic, Starlette and Arrow serializers, importing
    pyarrow (23 MB resident in every process); fedsim sends none of those types through Ray
    (fedsim.ray_lean). A preloaded worker never registers them; the launcher leaves them out
    while its run's Ray session lasts and puts Ray's function back afterwards."""
    probe = (
        "import sys\n"
        "class Context:\n"
        "    def __init__(self): self.calls = []\n"
        "    def __getattr__(self, name): return lambda *a, **k: self.calls.append(name)\n"
        "from ray.util import serialization_addons\n"
        "import fedsim.ray_worker\n"
        "ctx = Context(); serialization_addons.apply(ctx); print(len(ctx.calls), 'pyarrow' in sys.modules)\n"
    )
    assert _python(probe) == ["0", "False"]
    driver = (
        "import sys\n"
        "class Context:\n"
        "    def __init__(self): self.calls = []\n"
        "    def __getattr__(self, name): return lambda *a, **k: self.calls.append(name)\n"
        "from ray.util import serialization_addons\n"
        "from fedsim.run import _lean_serialization\n"
        "with _lean_serialization():\n"
        "    ctx = Context(); serialization_addons.apply(ctx); print(len(ctx.calls), 'pyarrow' in sys.modules)\n"
        "ctx = Context(); serialization_addons.apply(ctx); print(len(ctx.calls) > 0, 'pyarrow' in sys.modules)\n"
    )
    assert _python(driver) == ["0", "False", "True", "True"]
