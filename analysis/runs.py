"""Load one run directory written by fedsim (see fedsim/runlog.py for the layout)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]  # metrics.jsonl, one dict per round
    summary: dict[str, Any] | None  # None when the run did not finish


def load_run(path: str | Path) -> Run:
    """Read config.yaml, metrics.jsonl and (if present) summary.json of a run directory.

    Raises FileNotFoundError naming the missing file, ValueError naming a malformed line.
    """
    path = Path(path)
    config = yaml.safe_load((path / "config.yaml").read_text())
    rounds = []
    for number, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path / 'metrics.jsonl'}: line {number} is not JSON ({err.msg})") from err
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    return Run(path=path, config=config, rounds=rounds, summary=summary)
