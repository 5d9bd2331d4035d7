"""A small tidy table (rows of dicts, no pandas) and the tables the report is built from.

`build_table`: one row per (run, round) with every metric the runs logged.
`final_results`: one row per run at its last evaluated round.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from analysis.runs import Run, run_labels

# Columns every tidy table has (empty where a run did not log them), in this order; metrics
# keys not listed here (e.g. secagg's survivors_*) follow in order of first appearance.
CORE_COLUMNS = [
    "run", "label", "overrides", "status", "round",
    "test_accuracy", "test_loss", "train_loss",
    "sample_epsilon_max", "sample_epsilon_median", "sample_delta",
    "user_epsilon", "user_delta",
    "noise_multiplier", "user_noise_multiplier",
    "clip_fraction", "update_clipped_fraction",
    "cohort_size", "devices_trained", "devices_failed",
    "round_time_s", "elapsed_s",
]
KNOWN_COLUMNS = CORE_COLUMNS + [
    "sample_epsilon_cohort_max", "sample_epsilon_cohort_median", "devices_exhausted",
    "clip_norm", "user_noise_std", "simulated_cohort_size",
    "num_examples", "train_time_s", "bytes_sent", "bytes_received", "worker_peak_rss_mb",
]
RUN_COLUMNS = ("run", "label", "overrides", "status")


class Table:
    """Rows of dicts with a fixed column order; missing values are None."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), columns: list[str] | None = None) -> None:
        self.rows = [dict(r) for r in rows]
        if columns is None:
            columns = []
            for row in self.rows:
                columns += [k for k in row if k not in columns]
        self.columns = list(columns)
        for row in self.rows:
            for c in self.columns:
                row.setdefault(c, None)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"Table({len(self.rows)} rows x {len(self.columns)} columns)"

    def column(self, name: str) -> list[Any]:
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; columns: {', '.join(self.columns)}")
        return [r[name] for r in self.rows]

    def array(self, name: str) -> np.ndarray:
        """A numeric column as floats, None as NaN."""
        return np.array([np.nan if v is None else float(v) for v in self.column(name)], dtype=float)

    def where(self, predicate: Callable[[dict[str, Any]], bool] | None = None, **equals: Any) -> Table:
        """Rows matching `predicate` and every column=value in `equals`."""
        rows = [
            r for r in self.rows
            if all(r.get(k) == v for k, v in equals.items()) and (predicate is None or predicate(r))
        ]
        return Table(rows, self.columns)

    def group_by(self, name: str) -> dict[Any, Table]:
        """{value: rows with that value}, in order of first appearance."""
        groups: dict[Any, list[dict[str, Any]]] = {}
        for r in self.rows:
            groups.setdefault(r[name], []).append(r)
        return {k: Table(v, self.columns) for k, v in groups.items()}

    def has_data(self, name: str) -> bool:
        """Whether any row has a value in column `name`."""
        return name in self.columns and any(r[name] is not None for r in self.rows)

    def to_csv(self, path: str | Path) -> Path:
        """Write the table as CSV: floats at full precision (repr), None as an empty cell."""
        path = Path(path)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            for r in self.rows:
                writer.writerow([_csv_cell(r[c]) for c in self.columns])
        return path


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
    if isinstance(value, (list, dict)):
        return str(value)
    return str(value)


def read_csv(path: str | Path) -> Table:
    """A table written by `Table.to_csv`, every cell a string ("" for None)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        columns = next(reader)
        rows = [dict(zip(columns, (c if c != "" else None for c in row), strict=True)) for row in reader]
        return Table(rows, columns)


def build_table(runs: list[Run]) -> Table:
    """One row per (run, round): run, label, overrides, status, then every metric logged."""
    labels, texts = run_labels(runs)
    extra: list[str] = []
    for run in runs:
        for row in run.rounds:
            extra += [k for k in row if k not in KNOWN_COLUMNS and k not in extra]
    present = {k for run in runs for row in run.rounds for k in row}
    columns = CORE_COLUMNS + [c for c in KNOWN_COLUMNS if c not in CORE_COLUMNS and c in present] + extra
    rows = []
    for run in runs:
        for metrics in run.rounds:
            rows.append({
                "run": run.name, "label": labels[run.name], "overrides": texts[run.name], "status": run.status,
                **{k: v for k, v in metrics.items() if k not in RUN_COLUMNS},
            })
    return Table(rows, columns)


def is_private(run: Run) -> bool:
    """Whether the run used any DP: its config says so, or (without a config) it logged an epsilon."""
    privacy = (run.config or {}).get("privacy") if run.config is not None else None
    if isinstance(privacy, dict):
        return any(privacy.get(k) is not None for k in ("dpsgd", "dpfedavg"))
    return any(k in row for row in run.rounds for k in ("sample_epsilon_max", "user_epsilon"))


def final_row(run: Run) -> dict[str, Any] | None:
    """The metrics of the last evaluated round, None if no round was evaluated."""
    evaluated = [r for r in run.rounds if r.get("test_accuracy") is not None]
    return evaluated[-1] if evaluated else None


FINAL_COLUMNS = [
    "run", "label", "status", "private", "rounds", "final_round",
    "test_accuracy", "test_loss",
    "sample_epsilon_max", "sample_epsilon_median", "sample_delta",
    "user_epsilon", "user_delta", "elapsed_s",
]


def final_results(runs: list[Run]) -> Table:
    """One row per run at its last evaluated round (final_round); accuracy and epsilon from that row.

    rounds = rounds completed; elapsed_s = wall time of the whole run (its last round).
    """
    labels, _ = run_labels(runs)
    rows = []
    for run in runs:
        final = final_row(run) or {}
        rows.append({
            "run": run.name, "label": labels[run.name], "status": run.status, "private": is_private(run),
            "rounds": run.rounds[-1]["round"], "final_round": final.get("round"),
            **{k: final.get(k) for k in FINAL_COLUMNS[6:-1]},
            "elapsed_s": run.rounds[-1].get("elapsed_s"),
        })
    return Table(rows, FINAL_COLUMNS)
