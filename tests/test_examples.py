"""Every script in examples/ runs as a user would run it (a subprocess, tiny sizes) and prints or
writes what it promises; plus the dataset=custom plug-in point the custom-dataset example uses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.data import load_dataset
from fedsim.config import CustomDatasetConfig
from fedsim.errors import ConfigError
from fedsim.privacy.accountants import create_accountant
from fedsim.privacy.sample_level import dpsgd_event

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def _example(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_LOG_LEVEL": "WARNING", "FLWR_TELEMETRY_ENABLED": "0",
                   **(env or {})}  # fmt: skip
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600, env=environment, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return float(found.group(1))


@pytest.mark.ray
def test_custom_model_example_trains_the_users_model_within_the_epsilon_target(tmp_path: Path) -> None:
    out = _example("custom_model.py", "--population", "60", "--rounds", "2", "--cohort", "10", "--out", str(tmp_path / "run"),
                   "output.progress=false", f"simulation.ray_temp_dir={tmp_path / 'ray'}")  # fmt: skip
    assert 0.0 <= _number(r"final test accuracy: ([\d.]+)", out) <= 1.0
    assert 0.0 < _number(r"per-device epsilon: max ([\d.]+)", out) <= 8.0
    # Linear(60, 32) + LayerNorm(32) + Linear(32, 10): the example's own model, not a built-in one.
    assert "Sequential with 2346 parameters" in out
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "ledger.json").is_file()


@pytest.mark.ray
def test_custom_dataset_example_learns_the_users_population(tmp_path: Path) -> None:
    out = _example("custom_dataset.py", "--population", "30", "--rounds", "3", "--cohort", "10", "--out", str(tmp_path / "run"),
                   "output.progress=false", f"simulation.ray_temp_dir={tmp_path / 'ray'}")  # fmt: skip
    assert "devices: 30," in out
    assert _number(r"final test accuracy: ([\d.]+)", out) > 0.6  # chance is 0.25


def test_clients_example_reports_the_epsilon_fedsim_accounts_for_the_same_fits() -> None:
    out = _example("clients_without_simulator.py", "--rounds", "2", "--devices", "3")
    assert _number(r"non-private test accuracy: ([\d.]+)", out) > 0.5  # three classes: chance is 1/3
    assert 0.0 <= _number(r"DP-SGD test accuracy: ([\d.]+)", out) <= 1.0
    # Independently: fedsim's accountant on the event its simulator records for a device with
    # 100 examples, batch 10, one epoch, sigma 1, taking part in both rounds.
    event = dpsgd_event(num_examples=100, batch_size=10, local_epochs=1, noise_multiplier=1.0)
    expected = create_accountant("rdp").epsilon([(event, 2)], 1e-5)
    assert _number(r"per-device epsilon: ([\d.]+)", out) == pytest.approx(expected, abs=1e-3)


@pytest.mark.ray
def test_walkthrough_compares_a_private_and_a_non_private_run_in_a_report(tmp_path: Path) -> None:
    out = _example("walkthrough.py", env={
        "FEDSIM_EXAMPLE_ROUNDS": "2", "FEDSIM_EXAMPLE_POPULATION": "60", "FEDSIM_EXAMPLE_DIR": str(tmp_path / "runs"),
        "FEDSIM_EXAMPLE_OVERRIDES": f"simulation.ray_temp_dir={tmp_path / 'ray'}",
    })  # fmt: skip
    plain = _number(r"non-private: final test accuracy ([\d.]+)", out)
    private = _number(r"DP-SGD: +final test accuracy ([\d.]+)", out)
    assert 0.0 <= plain <= 1.0 and 0.0 <= private <= 1.0
    assert 0.0 < _number(r"per-device epsilon max ([\d.]+)", out) <= 8.0
    assert _number(r"cost of privacy: ([+-][\d.]+)", out) == pytest.approx(plain - private, abs=2e-4)
    assert re.search(r"^\s*2\s+[\d.]+\s+[\d.]+$", out, re.M), out  # the metrics table's last round
    report = tmp_path / "runs" / "report" / "report.md"
    assert f"report: {report}" in out
    text = report.read_text()
    assert "non_private" in text and "dpsgd_eps8" in text
    assert list(report.parent.glob("*.png"))


def _factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    (tmp_path / "my_population.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_population", None)


def test_custom_dataset_must_build_exactly_the_population(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    dataset = load_dataset(CustomDatasetConfig(target="custom_dataset:make_population"), population=7, seed=3)
    assert dataset.num_devices == 7 and dataset.device_data(6)[0].shape[1] == 16
    _factory_module(tmp_path, monkeypatch, "from custom_dataset import GaussianClasses\n"
                    "def wrong(population, seed):\n    return GaussianClasses(population + 1, seed)\n"
                    "def not_a_dataset(population, seed):\n    return [1, 2]\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"'population': my_population:wrong built 8 devices for population=7"):
        load_dataset(CustomDatasetConfig(target="my_population:wrong"), population=7, seed=0)
    with pytest.raises(ConfigError, match=r"'dataset.target': .*returned list, not a fedsim.data.FederatedDataset"):
        load_dataset(CustomDatasetConfig(target="my_population:not_a_dataset"), population=7, seed=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset.target=no_such_module:make"], "fedsim: error: config key 'dataset.target': cannot import 'no_such_module:make'"),
        ([], "fedsim: error: config key 'dataset.target': dataset=custom needs dataset.target='package.module:factory', got None"),
    ],
)
def test_custom_dataset_bad_target_is_one_line_and_exit_2(tmp_path: Path, overrides: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "dataset=custom", *overrides, "simulation.num_workers=1",
         f"simulation.ray_temp_dir={tmp_path / 'ray'}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(message)


@pytest.mark.ray
def test_custom_algorithm_example_runs_the_users_server_step(tmp_path: Path) -> None:
    out = _example("custom_algorithm.py", "--population", "60", "--rounds", "3", "--cohort", "10", "--out", str(tmp_path / "run"),
                   "output.progress=false", f"simulation.ray_temp_dir={tmp_path / 'ray'}")  # fmt: skip
    assert "strategy: custom_algorithm:DecayingMomentum" in out
    lrs = [float(x) for x in re.search(r"server learning rates: (.*)", out).group(1).split()]
    assert lrs == pytest.approx([0.5, 0.5 / 2**0.5, 0.5 / 3**0.5], abs=1e-6)  # its own step ran, once per round
    assert 0.0 <= _number(r"final test accuracy: ([\d.]+)", out) <= 1.0


@pytest.mark.ray
def test_scatternet_variants_example_trains_the_smaller_feature_model(tmp_path: Path) -> None:
    out = _example("scatternet_variants.py", "pool3", "--rounds", "1", "--out", str(tmp_path / "run"),
                   "cohort.size=4", "simulation.num_workers=1", f"simulation.ray_temp_dir={tmp_path / 'ray'}")  # fmt: skip
    assert "pool3: 45260 trained parameters" in out  # 81 channels x 3 x 3 x 62 classes + 62
    assert 0.0 <= _number(r"final test accuracy (\d\.\d+)", out) <= 1.0
    assert (tmp_path / "run" / "summary.json").exists()
