"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations


def set_keys(raw: dict, over: dict[str, object]) -> dict:
    """Set dotted keys ("simulation.num_workers") in a nested config dict, in place; return it."""
    for key, value in over.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw
