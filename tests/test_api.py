"""fedsim.simulate: one experiment in this process, its metrics, summary and model returned."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedsim
from clients import flat_params
from fedsim.config import FedsimConfig
from fedsim.errors import ConfigError
from fedsim.runlog import model_sha256

TINY = {"rounds": 2, "population": 40, "cohort": {"size": 4, "sampling": "fixed"}, "model": {"name": "mlp", "hidden_sizes": [8]}}


def _overrides(tmp: Path) -> list[str]:
    return ["rounds=2", "population=40", "cohort.size=4", "cohort.sampling=fixed", "model=mlp", "model.hidden_sizes=[8]",
            "simulation.num_workers=1", f"simulation.ray_temp_dir={tmp / 'ray'}", "output.progress=false"]  # fmt: skip


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> fedsim.SimulationResult:
    tmp = tmp_path_factory.mktemp("api")
    return fedsim.simulate(_overrides(tmp), output_dir=tmp / "run")


def test_simulate_returns_each_round_the_summary_and_the_final_model(result: fedsim.SimulationResult) -> None:
    assert [m["round"] for m in result.metrics] == [1, 2]
    assert result.summary["rounds"] == 2
    assert result.summary["final_test_accuracy"] == result.metrics[-1]["test_accuracy"]
    assert 0.0 <= result.summary["final_test_accuracy"] <= 1.0
    assert isinstance(result.config, FedsimConfig) and result.config.population == 40
    assert result.model is not None
    assert model_sha256(flat_params(result.model)) == result.summary["model_sha256"]  # the model that finished
    assert (result.run_dir / "metrics.jsonl").is_file()


def test_simulate_metrics_as_a_dataframe(result: fedsim.SimulationResult) -> None:
    pytest.importorskip("pandas")
    frame = result.dataframe()
    assert list(frame["round"]) == [1, 2]
    assert frame["test_accuracy"].iloc[-1] == result.summary["final_test_accuracy"]


def test_simulate_with_a_config_runs_the_same_experiment_as_with_overrides(
    result: fedsim.SimulationResult, tmp_path: Path
) -> None:
    config = {**TINY, "simulation": {"num_workers": 1, "ray_temp_dir": str(tmp_path / "ray")}, "output": {"progress": False}}
    again = fedsim.simulate(config=config, output_dir=tmp_path / "run")
    assert again.summary["model_sha256"] == result.summary["model_sha256"]


def test_simulate_bad_input_raises_the_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cohort.size"):
        fedsim.simulate(["cohort.size=5000"], output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="not both"):
        fedsim.simulate(["rounds=1"], config={"rounds": 1})
    assert not (tmp_path / "run").exists()
