"""Bad input on the command line: one line naming the key and what is allowed, exit status 2."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.config import FedsimConfig, from_dict
from fedsim.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def fedsim(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("dataset=mnist_of_mars", ("dataset/mnist_of_mars", "femnist", "synthetic")),
        ("model=resnet152", ("model/resnet152", "cnn", "mlp")),
        ("algorithm=fedsgd", ("algorithm/fedsgd", "fedavg", "fedyogi")),
        ("experiment=typo", ("experiment/typo", "femnist_fedavg", "debug")),  # not silently the default run
        ("cohort.size=5000", ("cohort.size", "larger than the population", "1..1000")),
        ("population=0", ("population", "> 0")),
        ("population=-5", ("population", "> 0")),
        ("rounds=0", ("rounds", "> 0")),
        ("algorithm.lr=-0.1", ("algorithm.lr", "> 0")),
        ("algorithm.batch_size=0", ("algorithm.batch_size", "> 0")),
        ("cohort.sampling=roundrobin", ("cohort.sampling", "poisson, fixed")),
        ("dataset.size_max=3", ("dataset.size_max", ">= dataset.size_min")),
        ("+algorithm.learning_rate=0.1", ("algorithm.learning_rate", "unknown key", "lr")),
        ("nonsense_key=3", ("nonsense_key",)),
        ("population=many", ("population", "integer")),
        ("simulation.layout=mesh", ("simulation.layout", "multiplexed, classic")),
    ],
)
def test_bad_config_gives_one_line_and_exit_2(override: str, fragments: tuple[str, ...]) -> None:
    assert_one_line_error(fedsim(override), *fragments)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_on_a_machine_without_one_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = fedsim("simulation.device=cuda", "rounds=1", f"hydra.run.dir={tmp_path / 'run'}", f"output.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, "simulation.device", "no CUDA device", "allowed here: auto, cpu")


def test_bad_value_inside_a_sweep_is_caught_before_any_job(tmp_path: Path) -> None:
    proc = fedsim("-m", "algorithm.lr=0.1,-1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert_one_line_error(proc, "algorithm.lr", "> 0")
    assert not (tmp_path / "sweep").exists()  # nothing started


def test_missing_femnist_directory(tmp_path: Path) -> None:
    proc = fedsim("dataset=femnist", f"dataset.path={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, "nowhere")


def test_truncated_femnist_file(tmp_path: Path) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    blob = gzip.compress(b'{"users": ["a"], "num_samples": [1], "user_data": {"a": {"x": [[0.5')
    (tmp_path / "data" / "train" / "part.json.gz").write_bytes(blob[: len(blob) // 2])
    proc = fedsim("dataset=femnist", f"dataset.path={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, "part.json.gz")


def test_config_roundtrips_through_json() -> None:
    cfg = from_dict({"population": 10, "cohort": {"size": 3}, "dataset": {"name": "femnist", "path": "/x"}})
    again = from_dict(__import__("json").loads(cfg.to_json()))
    assert again == cfg
    assert isinstance(again, FedsimConfig)


def test_dataset_keys_are_checked_per_dataset() -> None:
    with pytest.raises(ConfigError, match="dataset.alpha"):
        from_dict({"dataset": {"name": "femnist", "alpha": 1.0}})


def test_fixed_cohorts_with_pld_user_level_accounting_are_refused() -> None:
    proc = fedsim("privacy=dpfedavg", "cohort.sampling=fixed")
    assert_one_line_error(proc, "privacy.dpfedavg.accountant", "fixed-size cohorts", "rdp")


def test_secagg_modulus_too_small_for_the_cohort_is_refused(tmp_path: Path) -> None:
    proc = fedsim("secagg=secaggplus", "secagg.bits=16", "secagg.modulus_bits=18", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, "secagg.modulus_bits", "18")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_distributed_noise_without_secure_aggregation_is_refused() -> None:
    proc = fedsim("privacy=dpfedavg", "privacy.dpfedavg.noise=distributed")
    assert_one_line_error(proc, "privacy.dpfedavg.noise", "secagg=secaggplus")


def test_distributed_noise_with_poisson_cohorts_is_refused() -> None:
    # Shares sized for the sampled cohort make the total noise depend on the cohort size (a
    # membership signal Poisson amplification does not cover): fixed-size cohorts only.
    proc = fedsim("secagg=secaggplus", "privacy=dpfedavg", "privacy.dpfedavg.noise=distributed")
    assert_one_line_error(proc, "cohort.sampling", "cohort.sampling=fixed")


def test_secagg_with_dpfedavg_and_poisson_cohorts_is_refused_since_aborts_depend_on_who_was_sampled() -> None:
    # A SecAgg+ round aborts (releases nothing) when the sampled cohort is too small for a
    # secure (k, t): whether it released reveals whether a user was sampled, which the
    # Poisson-subsampled accountant does not cover (issue 13/14 review: eps >= 2.64 vs 0.62).
    proc = fedsim("secagg=secaggplus", "privacy=dpfedavg")
    assert_one_line_error(proc, "cohort.sampling", "aborts", "cohort.sampling=fixed", "privacy.dpfedavg.accountant=rdp")
    raw = {"secagg": {"name": "secaggplus"}, "privacy": {"dpfedavg": {}}}
    with pytest.raises(ConfigError, match="cohort.sampling"):
        from_dict(raw)
    # What stays allowed: fixed-size cohorts (n public and constant), and Poisson without user-level DP.
    fixed = from_dict({**raw, "cohort": {"size": 50, "sampling": "fixed"}, "privacy": {"dpfedavg": {"accountant": "rdp"}}})
    assert fixed.cohort.sampling == "fixed"
    assert from_dict({"secagg": {"name": "secaggplus"}}).cohort.sampling == "poisson"
    # The simulated deadline drops devices by their example count: a data-dependent dropout that
    # would make a secure round's abort depend on private data.
    with pytest.raises(ConfigError, match="faults.round_deadline_s"):
        from_dict({**raw, "cohort": {"size": 50, "sampling": "fixed"}, "privacy": {"dpfedavg": {"accountant": "rdp"}},
                   "faults": {"round_deadline_s": 1.0}})  # fmt: skip
    assert from_dict({"privacy": {"dpfedavg": {}}, "faults": {"round_deadline_s": 1.0}}).faults.round_deadline_s == 1.0
    # Sample-level budgets leave exhausted devices out of the cohort: its size would depend on their data.
    both = {"dpsgd": {"noise_multiplier": 1.0, "target_epsilon": 5.0}, "dpfedavg": {"accountant": "rdp"}}
    with pytest.raises(ConfigError, match="privacy.dpsgd.target_epsilon"):
        from_dict({**raw, "cohort": {"size": 50, "sampling": "fixed"}, "privacy": both})
    both["dpsgd"]["target_epsilon"] = None
    assert from_dict({**raw, "cohort": {"size": 50, "sampling": "fixed"}, "privacy": both}).privacy.dpsgd is not None

