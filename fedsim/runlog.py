"""What a run leaves on disk, and the one line per round it shows on the terminal.

A run directory holds:
    config.yaml    the resolved, validated config (what actually ran)
    metrics.jsonl  one JSON object per round (see `RoundMetrics`)
    model.pt       the final model: {"state_dict", "flat_params", "sha256", "config"} (a plain dict)
    summary.json   final numbers, timings and the model's sha256 (written last: a run
                   directory without it did not finish)
    .fedsim.lock   while a run writes it: the pid and host of that run (`locked`)
and, with `output.loggers` (fedsim.trackers), what the experiment trackers write:
    tensorboard/   TensorBoard event files
    mlruns/        MLflow's file store (unless output.mlflow_uri names another tracking URI)
    mlflow_run.json  the tracking URI and ids of the run's MLflow run
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from fedsim import trackers
from fedsim.checkpoint import atomic_write, writing
from fedsim.config import FedsimConfig
from fedsim.errors import StorageError

if TYPE_CHECKING:  # torch is imported where it is used: the launcher imports this module before Ray starts
    import torch

log = logging.getLogger("fedsim")

METRICS = "metrics.jsonl"


def rows_after(run_dir: Path, round_num: int) -> list[dict[str, Any]]:
    """The rows metrics.jsonl holds for rounds after `round_num` (a resumed run's lost rounds;
    read before RunLog rewrites the file). A line cut by a crash is skipped."""
    try:
        lines = (run_dir / METRICS).read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] > round_num:
            rows.append(row)
    return rows
SUMMARY = "summary.json"
MODEL = "model.pt"
CONFIG = "config.yaml"


@dataclass
class RoundMetrics:
    round: int
    cohort_size: int  # devices sampled this round
    devices_trained: int  # devices whose update was aggregated
    devices_failed: int  # sampled devices that raised, or whose worker did not answer
    num_examples: int  # training examples over the trained devices
    train_loss: float | None  # example-weighted mean training loss (SecAgg+: mean of each device's mean loss)
    test_accuracy: float | None  # central evaluation (None in rounds without one)
    test_loss: float | None
    round_time_s: float  # wall time of this round, evaluation included
    train_time_s: float  # slowest worker's device-training time this round
    elapsed_s: float  # wall time since the first round started
    bytes_sent: int  # payload bytes the server sent to workers this round
    bytes_received: int  # payload bytes the server received from workers
    worker_peak_rss_mb: float  # largest peak resident memory reported by a worker


ROUND_FIELDS = frozenset(f.name for f in dataclasses.fields(RoundMetrics))


def model_sha256(flat_params: torch.Tensor) -> str:
    """Fingerprint of the weights: equal hashes mean bit-identical models."""
    return hashlib.sha256(flat_params.detach().contiguous().numpy().tobytes()).hexdigest()


class RunLog:
    """Writes the run directory, prints progress, and feeds the experiment trackers.

    The trackers of `output.loggers` (fedsim.trackers) are RunLog's: started once the run
    directory is set up, given each round after metrics.jsonl has its row and the summary after
    summary.json is written, closed at the end (`finish`) or on failure (`close`). The run's
    own files always come first; a tracker that raises is dropped with one warning line.
    """

    def __init__(
        self, run_dir: Path, cfg: FedsimConfig, *, stream: TextIO = sys.stderr, keep: frozenset[str] | None = None
    ) -> None:
        """`keep`: the only metric keys metrics.jsonl gets (output.private_metrics_only); None: all."""
        self.dir = run_dir
        self.keep = keep
        self.keys: set[str] = set()  # every metric key a round produced, left-out ones included
        self.cfg = cfg
        self.stream = stream
        # A missing package is a ConfigError here, before any file (fedsim.run checks it earlier still).
        self.trackers = trackers.build(cfg.output.loggers)
        with writing("run directory", run_dir / CONFIG):
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self._metrics = open(run_dir / METRICS, "w", buffering=1)  # noqa: SIM115 - closed in close()
        self.rows: list[RoundMetrics] = []
        self._full: list[str] = []  # every round's metrics, left-out keys included (for checkpoints)
        self._track("on_start", cfg, run_dir)

    def row_dicts(self) -> list[dict[str, Any]]:
        """Every round's metrics so far, as dicts (for checkpoints; keys `keep` leaves out included)."""
        return [json.loads(line) for line in self._full]

    def restore_rows(self, rows: list[dict[str, Any]]) -> None:
        """Start from a checkpoint's rounds: rewrite metrics.jsonl with them."""
        self._metrics.seek(0)
        self._metrics.truncate()
        self._full = []
        self.rows = []
        restored = []
        for row in rows:
            shown = self._write(row)
            self.rows.append(RoundMetrics(**{k: row[k] for k in ROUND_FIELDS}))
            restored.append((row["round"], trackers.numeric(shown)))
        self._track("on_resume", restored)  # not on_round: the run that wrote them logged them

    def note(self, text: str) -> None:
        """A line about the run's set-up (calibration, budgets) on the terminal."""
        if self.cfg.output.progress:
            self.stream.write(f"[fedsim] {text}\n")
            self.stream.flush()

    def round(self, row: RoundMetrics, extra: dict[str, Any] | None = None) -> None:
        """Log one round; `extra` holds the privacy metrics of the mechanisms that are on."""
        self.rows.append(row)
        shown = self._write({**dataclasses.asdict(row), **(extra or {})})
        if self.cfg.output.progress:
            self.stream.write(self._progress_line(row) + "\n")
            self.stream.flush()
        self._track("on_round", row.round, trackers.numeric(shown))

    def _write(self, values: dict[str, Any]) -> dict[str, Any]:
        """Append one round to metrics.jsonl; returns the row as written (what `keep` shows)."""
        values = _finite(values)
        self.keys |= set(values)
        self._full.append(json.dumps(values))
        shown = values if self.keep is None else {k: v for k, v in values.items() if k in self.keep}
        with writing("metrics", self.dir / METRICS):
            self._metrics.write(json.dumps(shown) + "\n")
        return shown

    def _track(self, method: str, *args: Any) -> None:
        """Call `method` on every tracker; one that raises is dropped with one warning line."""
        for entry in list(self.trackers):
            name, tracker = entry
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001 - a tracker never fails the run
                self.trackers.remove(entry)
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                log.warning("output.loggers: %s failed in %s (%s: %s); it is off for the rest of the run",
                            name, method, type(err).__name__, reason)  # fmt: skip
                if method != "close":
                    with contextlib.suppress(Exception):
                        tracker.close()

    def _close_trackers(self) -> None:
        self._track("close")
        self.trackers = []

    def _progress_line(self, row: RoundMetrics) -> str:
        rounds = self.cfg.rounds
        per_round = row.elapsed_s / row.round
        eta = datetime.timedelta(seconds=round(per_round * (rounds - row.round)))
        parts = [f"round {row.round:>{len(str(rounds))}}/{rounds}", f"cohort {row.devices_trained:>3}"]
        if row.train_loss is not None:
            parts.append(f"train loss {row.train_loss:.4f}")
        if row.test_accuracy is not None:
            parts.append(f"test acc {row.test_accuracy:.4f}")
        if row.devices_failed:
            parts.append(f"failed {row.devices_failed}")
        parts += [f"{row.round_time_s:.2f} s", f"ETA {eta}"]
        return "[fedsim] " + " | ".join(parts)

    def finish(self, model: torch.nn.Module, flat_params: torch.Tensor, extra: dict[str, Any]) -> dict[str, Any]:
        """Write model.pt and summary.json (last), then give the trackers the summary; returns it."""
        try:
            summary, text = self._write_outputs(model, flat_params, extra)
        except BaseException:
            self.close()  # the trackers end too (a failed MLflow run), whatever stopped the outputs
            raise
        self._track("on_finish", json.loads(text))  # summary.json as written
        self._close_trackers()
        return summary

    def _write_outputs(
        self, model: torch.nn.Module, flat_params: torch.Tensor, extra: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes]:
        import torch

        sha = model_sha256(flat_params)
        if self.cfg.output.save_model:
            state = {"state_dict": model.state_dict(), "flat_params": flat_params, "sha256": sha, "config": self.cfg.to_dict()}
            with writing("model", self.dir / MODEL):
                atomic_write(self.dir / MODEL, lambda f: torch.save(state, f))
        evaluated = [r for r in self.rows if r.test_accuracy is not None]
        summary = {
            "rounds": len(self.rows),
            "final_test_accuracy": evaluated[-1].test_accuracy if evaluated else None,
            "final_test_loss": evaluated[-1].test_loss if evaluated else None,
            "best_test_accuracy": max((r.test_accuracy for r in evaluated), default=None),  # type: ignore[type-var]
            "total_time_s": self.rows[-1].elapsed_s if self.rows else 0.0,
            "mean_round_time_s": sum(r.round_time_s for r in self.rows) / max(len(self.rows), 1),
            "devices_trained": sum(r.devices_trained for r in self.rows),
            "devices_failed": sum(r.devices_failed for r in self.rows),
            "model_sha256": sha,
            "seed": self.cfg.seed,
            **extra,
        }
        text = (json.dumps(_finite(summary), indent=2) + "\n").encode()
        # summary.json is what marks a run finished (analysis/ skips directories without it):
        # written last, and atomically, so a failed write never leaves a run that looks done.
        with writing("summary", self.dir / SUMMARY):
            atomic_write(self.dir / SUMMARY, lambda f: f.write(text))
        self._metrics.close()
        return summary, text

    def close(self) -> None:
        """End a run that failed: metrics.jsonl and the trackers are closed."""
        self._metrics.close()
        self._close_trackers()


LOCK = ".fedsim.lock"


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this process: a second run pointed at the same directory (which would
    interleave metrics and overwrite checkpoints) is refused with one line.

    The lock file holds the holder's pid and host. A lock whose pid is no longer running on
    this host (a run killed with SIGKILL) is stale and taken over; one from another host
    cannot be checked and is refused, naming the file to delete if that run is gone.
    """
    run_dir = Path(run_dir)
    with writing("lock file", run_dir / LOCK):
        run_dir.mkdir(parents=True, exist_ok=True)
    path, me = run_dir / LOCK, f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder == me:
                yield  # this process holds it already (a run inside a run: nothing to do)
                return
            if holder is not None and _running_elsewhere(holder):
                pid, host = holder.split(" ", 1)
                raise StorageError(
                    f"output.dir {run_dir} is in use by another fedsim run (pid {pid} on {host}, lock file {path}); "
                    "choose another output.dir, or wait for that run to end (delete the lock file if it is gone)"
                ) from None
            path.unlink(missing_ok=True)  # stale (its process is gone) or empty: take it over
            continue
        with writing("lock file", path), os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    try:
        yield
    finally:
        if _lock_holder(path) == me:
            path.unlink(missing_ok=True)


def _lock_holder(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _running_elsewhere(holder: str) -> bool:
    """Is the lock's holder ("pid host") a live process (assumed so on another host)?"""
    pid_text, _, host = holder.partition(" ")
    if not pid_text.isdigit():
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: write None for non-finite floats so every reader can parse the file."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
