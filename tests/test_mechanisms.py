"""The privacy mechanisms as a registered, ordered list (fedsim.mechanisms, fedsim.registry.MECHANISMS).

A run's mechanisms come from the registry in its documented order, a mechanism of one's own
joins a run through one registry entry (the loop is not edited), and two mechanisms that would
both release the round's update are refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fake_grid import run_local
from helpers import set_keys
from fedsim import mechanisms
from fedsim.config import from_dict
from fedsim.data import load_dataset
from fedsim.errors import ConfigError
from fedsim.mechanisms import Mechanism
from fedsim.models import model_for
from fedsim.privacy.dpfedavg import UserLevelDP
from fedsim.privacy.sample_level import SampleLevelDP
from fedsim.registry import MECHANISMS
from fedsim.secure_rounds import SecureAggregation


def config(tmp: Path, **over: object) -> dict:
    raw: dict = {
        "seed": 3,
        "population": 24,
        "rounds": 3,
        "cohort": {"size": 8, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 40},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "simulation": {"num_workers": 2, "ray_temp_dir": str(tmp / "ray")},
        "output": {"progress": False},
    }
    return set_keys(raw, over)


def built(raw: dict) -> list[Mechanism]:
    cfg = from_dict(raw)
    dataset = load_dataset(cfg.dataset, population=cfg.population, seed=cfg.seed)
    active, _ = mechanisms.build(cfg, dataset, model_for(cfg, dataset))
    return active


def test_the_registry_order_is_the_composition_order(tmp_path: Path) -> None:
    assert MECHANISMS.names()[:3] == ("dpsgd", "dpfedavg", "secaggplus")
    assert built(config(tmp_path)) == []
    dpsgd = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    assert [type(m) for m in built(config(tmp_path, **{"privacy.dpsgd": dpsgd}))] == [SampleLevelDP]
    secure = config(tmp_path, **{"privacy.dpfedavg": {"noise_multiplier": 1.0, "clip_norm": 1.0, "accountant": "rdp"}, "secagg.name": "secaggplus"})
    active = built(secure)
    assert [type(m) for m in active] == [UserLevelDP, SecureAggregation]
    assert mechanisms.releaser(active) is active[0]  # the user-level release
    assert active[1].summary_key == "secagg" and "guarantee" in active[1].summary()


class EvenDevicesOnly(Mechanism):
    """A mechanism of one's own: only even device ids may train; it records who did."""

    trained: list[int] = []

    @classmethod
    def enabled(cls, cfg: object) -> bool:
        return True

    @classmethod
    def create(cls, cfg: object, dataset: object, model: torch.nn.Module) -> tuple[Mechanism, torch.nn.Module]:
        return cls(), model

    def describe(self) -> str:
        return "even devices only"

    def admit(self, cohort: list[int]) -> list[int]:
        return [d for d in cohort if d % 2 == 0]

    def after_devices(self, round_num: int, reports: list, run_dir: Path) -> dict:
        trained = [d for r in reports for d in r.device_ids]
        type(self).trained.extend(trained)
        return {"even_devices_trained": len(trained)}

    def summary(self) -> dict:
        return {"even_only_devices": len(type(self).trained)}


def test_a_registered_mechanism_joins_the_run_without_an_edit_to_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MECHANISMS, "even_only", EvenDevicesOnly)
    monkeypatch.setattr(EvenDevicesOnly, "trained", [])
    summary = run_local(from_dict(config(tmp_path)), tmp_path / "run")
    trained = EvenDevicesOnly.trained
    assert trained and all(d % 2 == 0 for d in trained)
    assert summary["privacy"]["even_only_devices"] == len(trained)
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert all('"even_devices_trained"' in row for row in rows)


def test_two_releasing_mechanisms_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class AnotherRelease(EvenDevicesOnly):
        releases = True

    monkeypatch.setitem(MECHANISMS, "another_release", AnotherRelease)
    with pytest.raises(ConfigError, match="at most one mechanism may release.*UserLevelDP, AnotherRelease"):
        built(config(tmp_path, **{"privacy.dpfedavg": {"noise_multiplier": 1.0, "clip_norm": 1.0, "accountant": "rdp"}}))
