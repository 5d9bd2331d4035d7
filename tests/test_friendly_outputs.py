"""What a person sees: the two lines a finished run ends with, and short legend labels."""

from __future__ import annotations

from pathlib import Path

from analysis.plots import short_labels
from fedsim.__main__ import end_of_run


def test_end_of_run_names_the_outputs_and_the_result(tmp_path: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".hydra").mkdir()
    where, done = end_of_run({"rounds": 30, "final_test_accuracy": 0.62514, "privacy": {}}, tmp_path, 15.04)
    assert where == f"outputs: {tmp_path} (config.yaml, metrics.jsonl, summary.json)"
    assert done == "done: final test accuracy 0.6251 | 30 rounds | 15.0 s wall"


def test_end_of_run_reports_every_guarantee_with_the_largest_device_epsilon(tmp_path: Path) -> None:
    summary = {
        "rounds": 100, "final_test_accuracy": 0.5, "stopped_early": None,
        "privacy": {
            "sample_level": {"epsilon_max": 7.99, "epsilon_median": 7.11, "delta": 1e-5},
            "user_level": {"epsilon": 1.987, "delta": 1e-6, "simulated_cohort_size": 5000},
        },
    }  # fmt: skip
    _, done = end_of_run(summary, tmp_path, 129.0)
    assert "sample-level epsilon 7.99 per device (max; median 7.11), delta 1e-05" in done
    assert "user-level epsilon 1.99, delta 1e-06, for cohorts of 5000" in done


def test_end_of_run_without_evaluation_or_after_an_early_stop(tmp_path: Path) -> None:
    summary = {"rounds": 3, "final_test_accuracy": None, "stopped_early": "budget exhausted"}
    _, done = end_of_run(summary, tmp_path, 1.0)
    assert done == "done: no evaluation | 3 rounds | stopped early: budget exhausted | 1.0 s wall"


def test_legend_labels_keep_the_last_part_of_swept_keys() -> None:
    labels = {
        "multirun/0": "privacy.dpsgd.target_epsilon=8",
        "multirun/1": "privacy.dpsgd.target_epsilon=4 algorithm.lr=0.1",
        "other": "other",  # a run named by its directory stays as it is
    }
    assert short_labels(labels) == {
        "multirun/0": "target_epsilon=8",
        "multirun/1": "target_epsilon=4 lr=0.1",
        "other": "other",
    }


def test_legend_labels_keep_enough_of_a_key_to_tell_it_apart() -> None:
    labels = {"a": "privacy.dpsgd.target_epsilon=8", "b": "privacy.dpfedavg.target_epsilon=2"}
    assert short_labels(labels) == {"a": "dpsgd.target_epsilon=8", "b": "dpfedavg.target_epsilon=2"}


def test_legend_labels_never_show_absolute_paths() -> None:
    labels = {
        "0": "dataset.path=/home/me/data/femnist_a model.cnn_channels=[16, 32] output.dir=/tmp/x/runs/0",
        "1": "dataset.path=/home/me/data/femnist_b model.cnn_channels=[32, 64] output.dir=/tmp/x/runs/1",
        "2": "hydra.run.dir=/tmp/x/runs/2",
    }
    short = short_labels(labels)
    assert short == {"0": "path=femnist_a cnn_channels=[16, 32]", "1": "path=femnist_b cnn_channels=[32, 64]", "2": "2"}
    assert not any("/tmp" in v or "/home" in v for v in short.values())


def test_legend_labels_that_become_equal_get_their_run_name() -> None:
    labels = {"x/0": "seed=1 output.dir=/a", "x/1": "seed=1 output.dir=/b"}
    assert short_labels(labels) == {"x/0": "seed=1 [x/0]", "x/1": "seed=1 [x/1]"}
