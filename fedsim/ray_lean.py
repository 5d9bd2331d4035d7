"""Ray serializers fedsim never needs, left out of its processes (Ray 2.55.1, as flwr[simulation] pins it).

Every Ray process makes a SerializationContext on its first (de)serialization, and its
constructor calls `ray.util.serialization_addons.apply`, which registers serializers for
pydantic models, Starlette's app state and Arrow tables (Ray Data's), importing pyarrow,
Ray's pydantic compatibility layer and Starlette to do so: 27 MB more resident memory per
process (pyarrow 23, pydantic 3, Starlette 1; measured after torch, Ray and fedsim's ClientApp
were imported), in the server and in every worker. What fedsim sends through Ray is Flower's
messages and contexts (records of bytes, numpy-free), its own jobs' plain Python values and
the key registry's bytes: none of those types. Without the add-ons an object of those types
would still cross Ray, pickled as any other object; only Ray Data's zero-copy Arrow path is
lost, which fedsim does not use.
"""

from __future__ import annotations

from collections.abc import Callable


def skip_serialization_addons() -> Callable[[], None]:
    """Make `ray.util.serialization_addons.apply` register nothing; return what restores it
    (a no-op where Ray has no such function). Serialization contexts made while it is in place
    keep the lean set (Ray makes one per job in each process)."""
    try:
        from ray.util import serialization_addons
    except ImportError:
        return lambda: None
    original = getattr(serialization_addons, "apply", None)
    if original is None:
        return lambda: None

    def none(serialization_context: object) -> None:
        return None

    serialization_addons.apply = none

    def restore() -> None:
        serialization_addons.apply = original

    return restore
