"""The key registry (PKI) of SecAgg+'s active threat model, reachable by the workers directly.

Devices register their session identity keys here and read their neighbours' keys from here,
never from the server's messages (Bonawitz et al. 2017 sec. 6.2 assume such a PKI). The
registry is trusted infrastructure: the server may read it (the keys are public) but has no
way to write to it; fedsim's server code only calls `lookup`.

Where it lives, chosen by the process the code runs in:
- simulation engine (Ray, one machine or a cluster: `simulation.ray_address`): a Ray actor
  the launcher (`fedsim.run`) creates for the run, before the ServerApp starts, named after the
  Ray job id. Workers find it from their own job id, so nothing in a server message says which
  registry to use (a server that named one could name one of its own).
- no Ray in this process (the in-process test grid, tests/fake_grid.py): one `KeyRegistry`
  per process, shared by the server and the workers that run in it.
- deployment engine (SuperNodes): no registry the SuperNodes could reach without the server,
  so config.py refuses `secagg.threat_model=active` with `engine=deployment`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fedsim.secagg.protocol import KeyRegistry

__all__ = ["NAMESPACE", "close", "local_registry", "lookup", "register", "start"]

log = logging.getLogger("fedsim")
NAMESPACE = "fedsim-pki"
_LOCAL = KeyRegistry()
_owned: Any = None  # the launcher's handle: a named actor lives while a handle to it does
_found: dict[str, Any] = {}  # actor name -> handle, per worker process


def _actor_name() -> str:
    import ray

    return f"fedsim-pki-{ray.get_runtime_context().get_job_id()}"


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray comes with flwr[simulation]
        return False
    return ray.is_initialized()


def start() -> None:
    """Create the run's registry actor (launcher only, Ray already initialized)."""
    global _owned
    import ray

    # No CPU: the workers' actor pool is sized from the CPUs (2 cores / cpus_per_worker). A sync
    # actor runs one call at a time, which makes register-once atomic across workers.
    service = ray.remote(num_cpus=0, max_restarts=0)(KeyRegistry)
    _found.clear()  # handles found before belong to an earlier Ray session's actor of the same name
    _owned = service.options(name=_actor_name(), namespace=NAMESPACE).remote()
    ray.get(_owned.lookup.remote(b"ready"))  # fail here, not in round 1


def close() -> None:
    """Drop the launcher's handle (Ray ends the actor with the job)."""
    global _owned
    _owned = None
    _found.clear()


def _actor() -> Any:
    import ray

    name = _actor_name()
    if name not in _found:
        try:
            _found[name] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            raise RuntimeError("no key registry for this Ray job (the launcher creates it: fedsim.run)") from None
    return _found[name]


def local_registry() -> KeyRegistry:
    """This process's registry, used when Ray is not initialized (the in-process test grid)."""
    return _LOCAL


def register(session: bytes, entries: Mapping[int, tuple[int, bytes]]) -> dict[int, str]:
    """Worker side: register {position: (device id, Ed25519 public key)} for `session`;
    returns {position: why refused} (a device or position registered with another key)."""
    if _ray_ready():
        import ray

        return ray.get(_actor().register_many.remote(bytes(session), dict(entries)))
    return _LOCAL.register_many(session, entries)


def lookup(session: bytes, positions: Iterable[int] | None = None) -> dict[int, bytes]:
    """{position: identity public key} registered for `session` (read-only; server and workers)."""
    wanted = None if positions is None else [int(p) for p in positions]
    if _ray_ready():
        import ray

        return ray.get(_actor().lookup.remote(bytes(session), wanted))
    return _LOCAL.lookup(session, wanted)
