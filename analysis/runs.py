"""Find and read fedsim run directories (layout: fedsim/runlog.py), tolerating broken ones.

`load_run` is strict (raises on the first broken file). `read_run` and `find_runs` are what the
report uses: a run whose metrics are usable is returned with its `problems` listed (a
"partial" run), a run without usable metrics becomes a `SkippedRun` with the reason.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
LEDGER = "ledger.json"
OVERRIDES = Path(".hydra") / "overrides.yaml"


@dataclass
class Run:
    path: Path
    config: dict[str, Any] | None  # config.yaml; None when missing or unreadable (read_run only)
    rounds: list[dict[str, Any]]  # metrics.jsonl, one dict per round
    summary: dict[str, Any] | None  # None when the run did not finish
    name: str = ""  # path relative to the scanned directory ("." for the directory itself)
    overrides: list[str] | None = None  # .hydra/overrides.yaml; None when absent
    ledger: dict[str, Any] | None = None  # ledger.json as read (sample-level DP runs)
    problems: list[str] = field(default_factory=list)  # why the run is partial; [] for a complete run

    @property
    def partial(self) -> bool:
        return bool(self.problems)

    @property
    def status(self) -> str:
        return "partial" if self.problems else "ok"


@dataclass
class SkippedRun:
    path: Path
    name: str
    reason: str


class RunSkipped(Exception):
    """A run directory without usable metrics; the message is the reason."""


def load_run(path: str | Path) -> Run:
    """Read config.yaml, metrics.jsonl and (if present) summary.json of a run directory.

    Raises FileNotFoundError naming the missing file, ValueError naming a malformed line.
    """
    path = Path(path)
    config = yaml.safe_load((path / CONFIG).read_text())
    rounds = []
    for number, line in enumerate((path / METRICS).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path / METRICS}: line {number} is not JSON ({err.msg})") from err
    summary_file = path / SUMMARY
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    return Run(path=path, config=config, rounds=rounds, summary=summary, name=path.name)


def _read_metrics(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    file = path / METRICS
    if not file.exists():
        raise RunSkipped(f"no {METRICS} (the run stopped before its first round)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RunSkipped(f"{METRICS} unreadable: {err}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise RunSkipped(f"{METRICS} is empty (the run stopped before its first round)")
    rows: list[dict[str, Any]] = []
    last = lines[-1][0]
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == last:
                problems.append(
                    f"{METRICS} line {number} is truncated (ignored; the run was interrupted while writing it)")
            else:
                problems.append(f"{METRICS} line {number} is not valid JSON (ignored)")
            continue
        if not isinstance(row, dict) or isinstance(row.get("round"), bool) or not isinstance(row.get("round"), int):
            problems.append(f"{METRICS} line {number} has no round number (ignored)")
            continue
        # A float that JSON allowed but a reader cannot use (NaN written by another tool) counts as missing.
        rows.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    if not rows:
        raise RunSkipped(f"{METRICS} has no readable round ({problems[-1]})")
    numbers = [r["round"] for r in rows]
    if numbers != sorted(set(numbers)):
        problems.append(f"{METRICS} round numbers are not strictly increasing (rows kept in file order)")
    return rows


def _read_json(file: Path, what: str, problems: list[str], missing: str | None) -> dict[str, Any] | None:
    if not file.exists():
        if missing:
            problems.append(missing)
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.append(f"{what} unreadable ({err}); ignored")
        return None
    if not isinstance(data, dict):
        problems.append(f"{what} is not a JSON object; ignored")
        return None
    return data


def read_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run directory, noting (not raising on) every broken part; RunSkipped if no metrics are usable."""
    path = Path(path)
    problems: list[str] = []
    rounds = _read_metrics(path, problems)

    config: dict[str, Any] | None = None
    if not (path / CONFIG).exists():
        problems.append(f"no {CONFIG}: its config differences are unknown")
    else:
        try:
            loaded = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            problems.append(f"{CONFIG} unreadable ({type(err).__name__}); its config differences are unknown")
        else:
            if isinstance(loaded, dict):
                config = loaded
            else:
                problems.append(f"{CONFIG} is not a mapping; its config differences are unknown")

    summary = _read_json(
        path / SUMMARY, SUMMARY, problems,
        missing=f"no {SUMMARY}: the run did not finish (crashed, killed or still running)",
    )
    ledger = _read_json(path / LEDGER, LEDGER, problems, missing=None)

    overrides: list[str] | None = None
    if (path / OVERRIDES).exists():
        try:
            loaded = yaml.safe_load((path / OVERRIDES).read_text(encoding="utf-8"))
            if isinstance(loaded, list):
                overrides = [str(o) for o in loaded]
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            pass  # labels then fall back to config differences; nothing the reader needs to act on

    return Run(
        path=path, config=config, rounds=rounds, summary=summary, name=name or path.name,
        overrides=overrides, ledger=ledger, problems=problems,
    )


def natural_key(text: str) -> list[Any]:
    """Sort key putting "2" before "10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def find_run_dirs(root: str | Path) -> list[Path]:
    """Run directories under `root` (itself included), naturally sorted.

    A run directory has a metrics.jsonl, or a .hydra/overrides.yaml (a Hydra job that died
    before its first round; it is reported as skipped). Hidden directories and the
    inside of run directories are not searched.
    """
    root = Path(root)
    found: list[Path] = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        if METRICS in files or (here / OVERRIDES).is_file():
            found.append(here)
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def find_runs(root: str | Path) -> tuple[list[Run], list[SkippedRun]]:
    """Every run under `root`: the readable ones (possibly partial) and the skipped ones with reasons."""
    root = Path(root)
    runs: list[Run] = []
    skipped: list[SkippedRun] = []
    for path in find_run_dirs(root):
        name = path.relative_to(root).as_posix()
        if name == ".":
            name = root.resolve().name or "."
        try:
            runs.append(read_run(path, name))
        except RunSkipped as err:
            skipped.append(SkippedRun(path=path, name=name, reason=str(err)))
    return runs, skipped


# -- configs -----------------------------------------------------------------------------------

_ABSENT = object()


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None are leaves."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def config_differences(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{dotted key: {run: value}} for the keys whose values differ between the given configs.

    A key missing from a run's config counts as a value of its own (absent from that run's
    dict). With fewer than two configs nothing differs.
    """
    if len(configs) < 2:
        return {}
    flat = {name: flatten_config(cfg) for name, cfg in configs.items()}
    keys: list[str] = []
    for f in flat.values():
        keys += [k for k in f if k not in keys]
    diffs: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = {name: f.get(key, _ABSENT) for name, f in flat.items()}
        if len({"<absent>" if v is _ABSENT else _canonical(v) for v in values.values()}) > 1:
            diffs[key] = {name: v for name, v in values.items() if v is not _ABSENT}
    return diffs


def format_value(value: Any) -> str:
    """A config value as YAML would show it (null, true, [16, 32])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


_LABEL_IGNORED_PREFIXES = ("output.",)
_LABEL_MAX_KEYS = 3


def _majority(values: dict[str, Any], total: int) -> str | None:
    """The canonical value more runs share than any other (absent counts as a value), if there is one."""
    counts: dict[str, int] = {}
    for v in values.values():
        counts[_canonical(v)] = counts.get(_canonical(v), 0) + 1
    absent = total - len(values)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if not ranked or ranked[0][1] < 2 or ranked[0][1] <= absent:
        return None
    if len(ranked) > 1 and ranked[1][1] == ranked[0][1]:
        return None
    return ranked[0][0]


def run_labels(runs: list[Run]) -> tuple[dict[str, str], dict[str, str]]:
    """({run: legend label}, {run: overrides text}) naming each run by what distinguishes it.

    The overrides text is the run's .hydra/overrides.yaml, or, without one, "key=value" for
    the config keys in which it differs from the other runs. The label drops the overrides
    every run shares; it falls back to the run name, and is made unique with the name.
    """
    common: set[str] = set()
    with_overrides = [r for r in runs if r.overrides is not None]
    if len(with_overrides) > 1:
        common = set.intersection(*(set(r.overrides or []) for r in with_overrides))
    configs = {r.name: r.config for r in runs if r.config is not None}
    diffs = {
        k: v for k, v in config_differences(configs).items() if not k.startswith(_LABEL_IGNORED_PREFIXES)
    }
    labels: dict[str, str] = {}
    texts: dict[str, str] = {}
    for run in runs:
        if run.overrides is not None:
            texts[run.name] = " ".join(run.overrides)
            label = " ".join(o for o in run.overrides if o not in common)
        else:
            # Keys deeper than a null parent (privacy.dpsgd.* when dpsgd is null) would repeat it.
            mine = [f"{k}={format_value(v[run.name])}" for k, v in diffs.items() if run.name in v]
            texts[run.name] = " ".join(mine)
            # The label keeps only values that set the run apart: not the one most runs share.
            own = [f"{k}={format_value(v[run.name])}" for k, v in diffs.items()
                   if run.name in v and _canonical(v[run.name]) != _majority(v, len(configs))]
            label = " ".join(own[:_LABEL_MAX_KEYS]) + (" ..." if len(own) > _LABEL_MAX_KEYS else "")
        labels[run.name] = label or run.name
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    return {n: (f"{lab} [{n}]" if seen[lab] > 1 and lab != n else lab) for n, lab in labels.items()}, texts
