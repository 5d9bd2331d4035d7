"""Values a run derives from its config, kept apart from it (issue 16: one config source).

Calibration solves a noise multiplier for a target epsilon when the config leaves it null
(fedsim.config.CALIBRATED_KEYS). `server_app.prepare` calibrates on a copy of the config and
records the solved values here; the caller's config is left as given. The run then works
with `effective(cfg)`: the given config with the derived values filled in, which is what
config.yaml records, what the workers receive and what the randomness fingerprint hashes (so
runs are bit-identical to those recorded when calibration wrote into the config itself).
summary.json lists the derived values under `derived`.
"""

from __future__ import annotations

import copy
from typing import Any

from fedsim.config import CALIBRATED_KEYS, FedsimConfig


def config_value(cfg: FedsimConfig, key: str) -> Any:
    """The value at dotted `key` ("privacy.dpsgd.noise_multiplier"); None under a null group."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part, None) if node is not None else None
    return node


def derived_values(given: FedsimConfig, solved: FedsimConfig) -> dict[str, float]:
    """The calibrated keys that are null in `given` and set in `solved`."""
    return {key: float(config_value(solved, key)) for key in CALIBRATED_KEYS
            if config_value(given, key) is None and config_value(solved, key) is not None}  # fmt: skip


def effective(cfg: FedsimConfig, derived: dict[str, float]) -> FedsimConfig:
    """A copy of `cfg` with the derived values filled in (`cfg` itself is not changed)."""
    out = copy.deepcopy(cfg)
    for key, value in derived.items():
        *path, last = key.split(".")
        node: Any = out
        for part in path:
            node = getattr(node, part)
        if getattr(node, last) is None:
            setattr(node, last, value)
    return out
