"""Experiment trackers: a run's rounds and summary sent to TensorBoard or MLflow as it goes.

`output.loggers=[tensorboard,mlflow]` turns them on (the extra: `pip install -e ".[trackers]"`).
`fedsim.runlog.RunLog` owns a run's trackers and calls them, always after its own files:

    on_start(cfg, run_dir)      the run directory is set up (config.yaml written)
    on_resume(rounds)           a resumed run restored these rounds from its checkpoint
    on_round(round_num, metrics)  metrics.jsonl got this round's row
    on_finish(summary)          summary.json is written
    close()                     the end, also when the run fails

`metrics` are the round's numeric values exactly as metrics.jsonl keeps them
(`output.private_metrics_only` leaves the same keys out), without `round` (the step) and
without values that are None, booleans or text. A tracker that raises is dropped for the rest
of the run with one warning line (RunLog); the run and its files go on.

Adding a tracker: one subclass of `Tracker` here and one `LOGGERS.add` line in
fedsim/registry.py; the config's allowed names, the check that its package is installed and
RunLog's calls follow from them. This module imports nothing heavy at module level.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError
from fedsim.registry import LOGGERS

INSTALL = 'pip install -e ".[trackers]"'  # (from a clone; an installed wheel: pip install "fedsim[trackers]")
TENSORBOARD_DIR = "tensorboard"  # <run dir>/tensorboard: the event files
MLRUNS_DIR = "mlruns"  # <run dir>/mlruns: MLflow's file store, unless output.mlflow_uri names another
MLFLOW_RUN = "mlflow_run.json"  # <run dir>/mlflow_run.json: where the run's MLflow run is (tracking URI, ids)

Rounds = list[tuple[int, dict[str, float]]]


class Tracker:
    """What RunLog calls on every tracker; the defaults do nothing (override what you need).

    `requires` maps the modules a tracker imports to the distributions that provide them:
    a missing one is a ConfigError before the run starts (`check_installed`).
    """

    requires: dict[str, str] = {}

    def on_start(self, cfg: Any, run_dir: Path) -> None:
        """The run directory `run_dir` is set up for the run of `cfg` (a `FedsimConfig`)."""

    def on_resume(self, rounds: Rounds) -> None:
        """A resumed run starts from these (round, metrics) of its checkpoint; the run that
        wrote them logged them already, unless this tracker did not follow that run."""

    def on_round(self, round_num: int, metrics: dict[str, float]) -> None:
        """Round `round_num` ended with these numeric metrics (as metrics.jsonl keeps them)."""

    def on_finish(self, summary: dict[str, Any]) -> None:
        """The run finished (or stopped early) with this summary (as in summary.json)."""

    def close(self) -> None:
        """Release files and connections; called once, last, also when the run failed."""


class TensorBoardTracker(Tracker):
    """TensorBoard: one scalar per metric and round in <run dir>/tensorboard/ (torch.utils.tensorboard)."""

    requires = {"tensorboard": "tensorboard"}

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.writer: Any = None
        self.earlier = False  # the directory held events of an earlier attempt of this run
        self.last_step = 0

    def on_start(self, cfg: Any, run_dir: Path) -> None:
        self.dir = run_dir / TENSORBOARD_DIR
        self.earlier = self.dir.is_dir() and any(self.dir.glob("events.out.tfevents.*"))

    def _writer(self, first_step: int) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: readers drop earlier events from this step on (a rerun of the same
            # rounds, after a resume or in a reused run directory), so no round shows twice.
            self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=first_step if self.earlier else None)
        return self.writer

    def on_resume(self, rounds: Rounds) -> None:
        if self.earlier:  # the interrupted run wrote these rounds into the same directory
            return
        for round_num, metrics in rounds:
            self.on_round(round_num, metrics)

    def on_round(self, round_num: int, metrics: dict[str, float]) -> None:
        writer = self._writer(round_num)
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=round_num)
        writer.flush()  # a live `tensorboard --logdir` sees each round as it ends
        self.last_step = round_num

    def on_finish(self, summary: dict[str, Any]) -> None:
        writer = self._writer(self.last_step)
        writer.add_text("model_sha256", str(summary.get("model_sha256")), global_step=self.last_step)
        writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", global_step=self.last_step)
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowTracker(Tracker):
    """MLflow: the config as params, metrics per round, summary.json/config.yaml as artifacts (file store <run dir>/mlruns)."""

    requires = {"mlflow": "mlflow-skinny"}
    BATCH = 100  # params per log_batch call (MLflow's limit)

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self.last_step = 0  # a resumed MLflow run already holds the rounds up to this one
        self.finished = False

    def on_start(self, cfg: Any, run_dir: Path) -> None:
        from mlflow.tracking import MlflowClient

        self.run_dir = run_dir
        uri = cfg.output.mlflow_uri or str((run_dir / MLRUNS_DIR).absolute())
        if "://" not in uri or uri.startswith("file:"):
            # MLflow 3 keeps its file store in "maintenance mode" and refuses it unless this is set;
            # a file store in the run directory is what fedsim asks of it (still supported, no server).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        previous = _read_json(run_dir / MLFLOW_RUN)
        if cfg.resume and previous.get("tracking_uri") == uri and self._continue(previous.get("run_id")):
            return
        experiment = self._experiment(cfg.output.mlflow_experiment)
        run = self.client.create_run(
            experiment, run_name=run_dir.name, tags={"fedsim.version": _fedsim_version(), "fedsim.run_dir": str(run_dir)}
        )
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in flatten(cfg.to_dict()).items()]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + self.BATCH])
        info = {"tracking_uri": uri, "experiment_id": experiment, "run_id": self.run_id}
        (run_dir / MLFLOW_RUN).write_text(json.dumps(info, indent=2) + "\n")

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - another run (a sweep's job) created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _continue(self, run_id: str | None) -> bool:
        """Log into the MLflow run of the run being resumed; False if it cannot be found."""
        if not run_id:
            return False
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - deleted, or another store: start a new MLflow run
            return False
        self.run_id = run_id
        steps = [m.step for key in run.data.metrics if not key.startswith("summary.")
                 for m in self.client.get_metric_history(run_id, key)]  # fmt: skip
        self.last_step = max(steps, default=0)
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "fedsim.resumed_from_checkpoint", "true")
        if "fedsim.stopped_early" in run.data.tags:  # the interrupted attempt's (Ctrl-C); said again if it applies
            self.client.delete_tag(run_id, "fedsim.stopped_early")
        return True

    def on_resume(self, rounds: Rounds) -> None:
        for round_num, metrics in rounds:  # only rounds the MLflow run does not hold yet
            self.on_round(round_num, metrics)

    def on_round(self, round_num: int, metrics: dict[str, float]) -> None:
        # A round the MLflow run holds already (logged before a crash, rerun after the resume)
        # is not logged twice: MLflow cannot replace a metric's entry, only add one.
        if round_num <= self.last_step:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, round_num) for k, v in metrics.items()])
        self.last_step = round_num

    def on_finish(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        numbers = {f"summary.{k}": v for k, v in flatten(summary).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        metrics = [Metric(k, float(v), now, self.last_step) for k, v in numbers.items()]
        tags = [RunTag("model_sha256", str(summary.get("model_sha256")))]
        if summary.get("stopped_early"):
            tags.append(RunTag("fedsim.stopped_early", str(summary["stopped_early"])[:5000]))
        self.client.log_batch(self.run_id, tags=tags)
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        assert self.run_dir is not None
        for name in ("summary.json", "config.yaml"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def close(self) -> None:
        if self.run_id is not None and not self.finished:
            self.client.set_terminated(self.run_id, "FAILED")
            self.finished = True


# The loggers output.loggers may name: fedsim.registry.LOGGERS (the config's allowed values
# come from it; it imports this module only when a run builds a tracker).
TRACKERS = LOGGERS


def check_installed(names: Iterable[str]) -> None:
    """ConfigError for a logger whose package is missing, naming it and the install command."""
    for name in names:
        for module, distribution in TRACKERS[name].requires.items():
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    "output.loggers", f"{name} needs the package {distribution}, which is not installed: {INSTALL}"
                )


def build(names: Iterable[str]) -> list[tuple[str, Tracker]]:
    """The trackers `output.loggers` names, in its order (their packages checked first)."""
    names = list(names)
    check_installed(names)
    return [(name, TRACKERS[name]()) for name in names]


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row's values a tracker logs: numbers only (no None, booleans or text), no `round`."""
    return {k: v for k, v in row.items() if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested dicts flattened with dots; numbers and strings
    stay as they are, any other leaf (None, booleans, lists, empty dicts) becomes its JSON."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, path + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = value
        else:
            out[path] = value if isinstance(value, str) else json.dumps(value)
    return out


def _fedsim_version() -> str:
    try:
        return importlib.metadata.version("fedsim")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
