"""Shared fixtures: the bundled data, quiet Flower/Ray, one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _simulation_mark_per_test():
    """The simulation engine's mark (FEDSIM_SIMULATION_ENGINE) is put back after every test as it
    was before it: fake_grid.LocalGrid sets it for its in-process workers, and it must not reach a
    later test (a deployment SuperNode it starts, a check that the launcher leaves it unset)."""
    from fedsim.config import SIMULATION_ENV

    before = os.environ.get(SIMULATION_ENV)
    yield
    if before is None:
        os.environ.pop(SIMULATION_ENV, None)
    else:
        os.environ[SIMULATION_ENV] = before


@pytest.fixture(scope="session", autouse=True)
def _parsed_data_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """fedsim's parsed-data cache (fedsim.data.parsed_cache) in the session's temporary folder,
    shared by pytest-xdist's workers and every process they start, never the user's home: the
    first test that loads the bundled FEMNIST parses it, the others read the arrays back."""
    from fedsim.data.parsed_cache import CACHE_ENV

    base = tmp_path_factory.getbasetemp()
    os.environ[CACHE_ENV] = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "fedsim-cache")


@pytest.fixture(scope="session")
def femnist_dir() -> Path:
    """The repository's data/femnist (105 writers), sha256-checked. Never skipped: the data ship
    with fedsim, so a missing or altered copy fails the tests that need it."""
    from fedsim.data.bundled import bundled_path

    return bundled_path("femnist")


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def fashion_dir() -> Path:
    if not FASHION_DIR.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist (done by .ci/run)")
    return FASHION_DIR


@pytest.fixture
def cluster(tmp_path: Path):
    """A SuperLink on loopback (tests/deployment_cluster.py); SuperNodes are added by the test."""
    from deployment_cluster import Cluster

    c = Cluster(tmp_path)
    yield c
    c.stop()
