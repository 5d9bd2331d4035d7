"""Experiment trackers (output.loggers, fedsim.trackers): what TensorBoard and MLflow got is read
back from their own files and compared with metrics.jsonl and summary.json.

Runs are tiny and in-process (tests/fake_grid.run_local: no Ray). The read-back tests need the
`trackers` extra (`pip install -e ".[trackers]"`, which scripts/setup.sh installs) and skip
without it; the config checks do not need it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fake_grid import run_local
from fedsim import trackers
from fedsim.api import compose
from fedsim.config import FedsimConfig, from_dict
from fedsim.errors import ConfigError
from fedsim.runlog import RoundMetrics, RunLog
from helpers import set_keys

REPO = Path(__file__).resolve().parent.parent
DETERMINISTIC = ("test_accuracy", "test_loss", "train_loss", "cohort_size", "devices_trained", "num_examples")


def tiny(**over: object) -> dict:
    raw: dict = {
        "seed": 3,
        "population": 40,
        "rounds": 3,
        "cohort": {"size": 8, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 60},
        "model": {"name": "mlp", "hidden_sizes": [16]},
        "simulation": {"num_workers": 1},
        "output": {"progress": False, "loggers": ["tensorboard", "mlflow"]},
    }
    return set_keys(raw, over)


def needs_extra() -> None:
    pytest.importorskip("tensorboard", reason='the trackers extra: pip install -e ".[trackers]"')
    pytest.importorskip("mlflow", reason='the trackers extra: pip install -e ".[trackers]"')


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as a tracker should have it: key -> [(round, value)] over the numeric values."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows(run_dir):
        for key, value in trackers.numeric(row).items():
            out.setdefault(key, []).append((row["round"], value))
    return out


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def as_float32(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars are float32: the values metrics.jsonl holds, as TensorBoard stores them."""
    return {k: [(step, float(np.float32(v))) for step, v in points] for k, points in series.items()}


def mlflow_run(run_dir: Path) -> tuple[Any, Any]:
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as `mlflow ui` needs it (README), whichever test runs first
    client = MlflowClient(tracking_uri=str(run_dir / "mlruns"))
    experiment = client.get_experiment_by_name("fedsim")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1, [r.info.run_id for r in found]
    return client, found[0]


def mlflow_history(client: Any, run: Any) -> dict[str, list[tuple[int, float]]]:
    keys = [k for k in run.data.metrics if not k.startswith("summary.")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    needs_extra()
    run_dir = tmp_path_factory.mktemp("trackers") / "run"
    run_local(from_dict(tiny()), run_dir)
    return run_dir


def test_tensorboard_event_files_hold_every_round_of_metrics_jsonl(finished: Path) -> None:
    expected = logged(finished)
    assert {"test_accuracy", "train_loss", "round_time_s", "bytes_sent"} <= set(expected)
    assert all([step for step, _ in points] == [1, 2, 3] for points in expected.values())
    assert tensorboard_scalars(finished) == as_float32(expected)


def test_mlflow_run_holds_the_config_metrics_summary_and_artifacts(finished: Path) -> None:
    client, run = mlflow_run(finished)
    summary = json.loads((finished / "summary.json").read_text())
    assert run.info.run_id == json.loads((finished / "mlflow_run.json").read_text())["run_id"]
    assert run.info.status == "FINISHED"
    assert mlflow_history(client, run) == logged(finished)  # every round, exactly (float64)
    params = run.data.params
    assert params["seed"] == "3" and params["population"] == "40" and params["output.loggers"] == '["tensorboard", "mlflow"]'
    assert run.data.tags["model_sha256"] == summary["model_sha256"]
    assert run.data.tags["fedsim.version"]
    assert run.data.metrics["summary.final_test_accuracy"] == summary["final_test_accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.yaml"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "summary.json", str(finished.parent / "download"))
    assert json.loads(Path(local).read_text()) == summary


def test_output_loggers_from_the_command_line_compose_with_hydra() -> None:
    assert compose(["output.loggers=[tensorboard,mlflow]"]).output.loggers == ["tensorboard", "mlflow"]
    assert compose([]).output.loggers == []


def test_an_unknown_logger_ends_the_command_with_one_line_and_exit_status_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "output.loggers=[tensorboard,wandb]"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "output.loggers" in lines[0] and "'wandb'" in lines[0] and "allowed: tensorboard, mlflow" in lines[0], lines[0]
    with pytest.raises(ConfigError, match="listed twice"):
        from_dict({"output": {"loggers": ["mlflow", "mlflow"]}})


def test_a_logger_whose_package_is_missing_is_refused_before_the_run_naming_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fedsim.__main__ import precheck
    from fedsim.run import run

    monkeypatch.setattr(trackers.MLflowTracker, "requires", {"fedsim_no_such_module": "mlflow-skinny"})
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        precheck(["output.loggers=[mlflow]"])
    lines = err.getvalue().splitlines()
    assert done.value.code == 2 and len(lines) == 1, err.getvalue()
    assert "output.loggers" in lines[0] and "mlflow-skinny" in lines[0] and 'pip install -e ".[trackers]"' in lines[0]
    cfg = from_dict(tiny(**{"output.loggers": ["mlflow"]}))  # the config itself is valid (workers need no tracker)
    with pytest.raises(ConfigError, match="mlflow-skinny"):
        run(cfg, tmp_path / "run")  # before the run directory or Ray
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="mlflow-skinny"):
        RunLog(tmp_path / "direct", cfg)


def test_private_metrics_only_keeps_the_left_out_metrics_out_of_the_trackers_too(tmp_path: Path) -> None:
    needs_extra()
    raw = tiny(**{"privacy": {"dpfedavg": {"noise_multiplier": 0.5, "accountant": "rdp"}},
                  "output.private_metrics_only": True})  # fmt: skip
    run_local(from_dict(raw), tmp_path / "run")
    expected = logged(tmp_path / "run")
    assert "test_accuracy" in expected and "user_epsilon" in expected
    assert not {"train_loss", "num_examples", "round_time_s", "update_clipped_fraction"} & set(expected)
    assert tensorboard_scalars(tmp_path / "run") == as_float32(expected)
    client, run = mlflow_run(tmp_path / "run")
    assert mlflow_history(client, run) == expected


class Crash(BaseException):
    """Stands for the process dying (SIGKILL) after the trackers logged a round."""


class CrashOnce(trackers.Tracker):
    """Test tracker: the first run it follows dies after round 3 reached the other trackers."""

    crashed = False

    def on_round(self, round_num: int, metrics: dict[str, float]) -> None:
        if round_num == 3 and not CrashOnce.crashed:
            CrashOnce.crashed = True
            raise Crash


def test_a_run_resumed_from_a_checkpoint_logs_each_round_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    needs_extra()
    monkeypatch.setitem(trackers.TRACKERS, "crash", CrashOnce)
    monkeypatch.setattr(CrashOnce, "crashed", False)
    raw = tiny(rounds=4, **{"checkpoint": {"every": 2, "keep": 10}, "output.loggers": ["tensorboard", "mlflow", "crash"]})
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):  # after round 3 reached TensorBoard and MLflow, before its checkpoint
        run_local(from_dict(raw), run_dir)
    assert [r["round"] for r in rows(run_dir)] == [1, 2, 3]
    first_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    _, failed = mlflow_run(run_dir)
    assert failed.info.status == "FAILED"

    summary = run_local(from_dict({**raw, "resume": str(run_dir)}), run_dir)
    assert summary["resumed_from_round"] == 2
    expected = logged(run_dir)
    assert all([step for step, _ in points] == [1, 2, 3, 4] for points in expected.values())
    # TensorBoard: round 3's first attempt is purged (purge_step); every value is metrics.jsonl's.
    assert tensorboard_scalars(run_dir) == as_float32(expected)
    # MLflow: the same MLflow run, each round once. Round 3 keeps its first attempt's entries
    # (MLflow cannot replace them): the same numbers, except timings.
    client, run = mlflow_run(run_dir)
    assert run.info.run_id == first_id and run.info.status == "FINISHED"
    history = mlflow_history(client, run)
    assert {k: [s for s, _ in v] for k, v in history.items()} == {k: [1, 2, 3, 4] for k in expected}
    for key in DETERMINISTIC:
        assert history[key] == expected[key], key
    assert run.data.tags["model_sha256"] == summary["model_sha256"]


class Recorder(trackers.Tracker):
    """Test tracker: what RunLog called, and what the run directory held at that moment."""

    made: list[Recorder] = []  # every instance, in order (each test sets a new list)

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.dir: Path | None = None
        type(self).made.append(self)

    def on_start(self, cfg: FedsimConfig, run_dir: Path) -> None:
        self.dir = run_dir
        self.calls.append(("on_start", (run_dir / "config.yaml").is_file()))

    def on_resume(self, rounds: trackers.Rounds) -> None:
        self.calls.append(("on_resume", rounds))

    def on_round(self, round_num: int, metrics: dict[str, float]) -> None:
        assert self.dir is not None
        written = [json.loads(line)["round"] for line in (self.dir / "metrics.jsonl").read_text().splitlines()]
        self.calls.append(("on_round", round_num, metrics, written))

    def on_finish(self, summary: dict[str, Any]) -> None:
        assert self.dir is not None
        self.calls.append(("on_finish", json.loads((self.dir / "summary.json").read_text()) == summary))

    def close(self) -> None:
        self.calls.append(("close",))


class Boom(Recorder):
    """Test tracker: raises (a multi-line message) in round 2."""

    def on_round(self, round_num: int, metrics: dict[str, float]) -> None:
        super().on_round(round_num, metrics)
        if round_num == 2:
            raise RuntimeError("tracking server unreachable\nsecond line of detail")


def row(n: int) -> RoundMetrics:
    return RoundMetrics(round=n, cohort_size=5, devices_trained=5, devices_failed=0, num_examples=50, train_loss=0.5,
                        test_accuracy=None if n == 1 else 0.25 * n, test_loss=1.0, round_time_s=0.1, train_time_s=0.05,
                        elapsed_s=0.1 * n, bytes_sent=100, bytes_received=200, worker_peak_rss_mb=10.0)  # fmt: skip


def test_runlog_calls_its_trackers_after_its_own_files_and_resumes_without_logging_rounds_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch

    made: list[Recorder] = []
    monkeypatch.setattr(Recorder, "made", made)
    monkeypatch.setitem(trackers.TRACKERS, "recorder", Recorder)
    cfg = from_dict(tiny(**{"output.loggers": ["recorder"]}))
    keep = frozenset({"round", "test_accuracy", "user_epsilon"})  # as output.private_metrics_only would
    log = RunLog(tmp_path, cfg, keep=keep)
    log.round(row(1), {"user_epsilon": 0.5, "user_release": True, "clip_fraction": 0.1})
    log.round(row(2), {"user_epsilon": 0.7, "user_release": True, "clip_fraction": 0.2})
    saved = log.row_dicts()
    log.close()
    first = made[0].calls
    assert first[0] == ("on_start", True)
    assert first[1] == ("on_round", 1, {"user_epsilon": 0.5}, [1])  # no None, no bool, nothing `keep` leaves out
    assert first[2] == ("on_round", 2, {"test_accuracy": 0.5, "user_epsilon": 0.7}, [1, 2])
    assert first[3:] == [("close",)]

    resumed = RunLog(tmp_path, cfg, keep=keep)  # as a resumed run: the checkpoint's rows come back
    resumed.restore_rows(saved)
    resumed.round(row(3), {"user_epsilon": 0.9})
    resumed.finish(torch.nn.Linear(2, 2), torch.zeros(6), {})
    calls = made[1].calls
    assert [c[0] for c in calls] == ["on_start", "on_resume", "on_round", "on_finish", "close"]
    assert calls[1] == ("on_resume", [(1, {"user_epsilon": 0.5}), (2, {"test_accuracy": 0.5, "user_epsilon": 0.7})])
    assert calls[2][:2] == ("on_round", 3) and calls[3] == ("on_finish", True)


def test_a_tracker_that_raises_is_dropped_with_one_warning_and_the_run_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made: list[Recorder] = []
    monkeypatch.setattr(Recorder, "made", made)
    monkeypatch.setitem(trackers.TRACKERS, "boom", Boom)
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        summary = run_local(from_dict(tiny(**{"output.loggers": ["boom"]})), tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if "output.loggers" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "boom failed in on_round" in warnings[0] and "tracking server unreachable" in warnings[0]
    assert [c[0] for c in made[0].calls] == ["on_start", "on_round", "on_round", "close"]  # dropped after round 2
    assert [r["round"] for r in rows(tmp_path / "run")] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model_sha256"] == summary["model_sha256"]
