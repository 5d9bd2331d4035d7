"""A user's own federated data: `fedsim dataset=custom dataset.target=package.module:factory`.

The factory is called as factory(population=N, seed=S) and returns a `FederatedDataset` with
exactly N devices (ids 0..N-1). The server and every worker call it, so it must be
deterministic in (population, seed): a worker that built different device data would train on
examples the server's privacy accounting never saw.
"""

from __future__ import annotations

import importlib

from fedsim.data.base import FederatedDataset
from fedsim.errors import ConfigError


def custom_dataset(target: str, *, population: int, seed: int) -> FederatedDataset:
    """The population `target` ("package.module:factory") builds for `population` and `seed`."""
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError("dataset.target", f"cannot import {target!r} ({err}); expected 'package.module:factory'") from None
    dataset = factory(population=population, seed=seed)
    if not isinstance(dataset, FederatedDataset):
        raise ConfigError("dataset.target", f"{target} returned {type(dataset).__name__}, not a fedsim.data.FederatedDataset")
    if dataset.num_devices != population:
        raise ConfigError(
            "population", f"{target} built {dataset.num_devices} devices for population={population}; it must build exactly population devices"
        )
    return dataset
