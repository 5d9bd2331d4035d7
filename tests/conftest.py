"""Shared fixtures: where the shared data lives, quiet Flower/Ray, one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(1)


def shared_dir() -> Path:
    """../shared beside the repository (or $FEDSIM_SHARED)."""
    return Path(os.environ.get("FEDSIM_SHARED", REPO.parent / "shared"))


@pytest.fixture
def femnist_dir() -> Path:
    path = shared_dir() / "data" / "femnist"
    if not path.is_dir():
        pytest.skip(f"FEMNIST not found at {path} (set FEDSIM_SHARED)")
    return path


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def fashion_dir() -> Path:
    if not FASHION_DIR.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist (done by .ci/run)")
    return FASHION_DIR
