"""analysis.load_run reads what a run writes, and says which file is broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import load_run


def write_run(path: Path, rows: list[dict], summary: dict | None) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("seed: 0\npopulation: 10\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))


def test_load_run_reads_config_rounds_and_summary(tmp_path: Path) -> None:
    write_run(tmp_path / "r", [{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": 0.6}], {"rounds": 2})
    run = load_run(tmp_path / "r")
    assert run.config["population"] == 10
    assert [r["test_accuracy"] for r in run.rounds] == [0.5, 0.6]
    assert run.summary == {"rounds": 2}


def test_unfinished_run_has_no_summary_and_bad_line_is_named(tmp_path: Path) -> None:
    write_run(tmp_path / "r", [{"round": 1}], None)
    assert load_run(tmp_path / "r").summary is None
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "test_acc')
    with pytest.raises(ValueError, match="line 2"):
        load_run(tmp_path / "r")
