"""The audit figure: theoretical epsilon (the accountant's) against the audited epsilon, one
point per audited run and level, across a sweep (fedsim.audit writes summary.json's `audit`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.lines import Line2D

from analysis.plots import STYLE, NoData, _figure, _legend, _save
from analysis.runs import Run

LEVEL_MARKERS = {"user_level": "o", "sample_level": "s"}


def _number(value: Any) -> float | None:
    """A float from summary.json ("inf" is how the audit writes an unbounded estimate)."""
    if isinstance(value, str) and value in ("inf", "-inf"):
        return math.inf if value == "inf" else -math.inf
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def audit_points(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per (run, level): accountant epsilon, lower bound, estimate and its interval."""
    rows = []
    for run in runs:
        section = (run.summary or {}).get("audit") or {}
        for level in ("user_level", "sample_level"):
            part = section.get(level)
            if not part:
                continue
            threat = part.get("all_rounds", part)  # user level: the threat model the accountant covers
            interval = threat.get("interval") or [None, None]
            rows.append({
                "run": run.name, "level": level, "broken": section.get("broken_mechanism", "none"),
                "accountant_epsilon": _number(part.get("accountant_epsilon")),
                "lower_bound": _number(threat.get("epsilon_lower_bound")),
                "estimate": _number(threat.get("epsilon_estimate")),
                "interval": [_number(v) for v in interval],
                "confidence": section.get("confidence"),
            })  # fmt: skip
    return rows


def plot_audit(runs: list[Run], colors: dict[str, Any], labels: dict[str, str], out_dir: Path) -> list[Path]:
    """Accountant epsilon (x) against the audit's lower bound (filled) and, for the user level,
    Andrew et al.'s estimate with its interval (hollow, bars); the diagonal is "audit = theory":
    a lower bound above it means the mechanism that ran is leakier than the one accounted for."""
    rows = [r for r in audit_points(runs) if r["accountant_epsilon"] is not None and r["lower_bound"] is not None]
    if not rows:
        raise NoData("no run has an audit (audit.canaries / audit.canary_examples)")
    finite = [v for r in rows for v in (r["accountant_epsilon"], r["lower_bound"], r["estimate"]) if v is not None and math.isfinite(v)]
    top = max(finite) * 1.15 if finite else 1.0
    with matplotlib.rc_context(STYLE):
        fig, (ax,) = _figure()
        ax.plot([0, top], [0, top], color="0.4", linestyle="--", linewidth=1.0)
        handles: list[Any] = [Line2D([], [], color="0.4", linestyle="--", label="audit = accountant")]
        seen: set[str] = set()
        for r in rows:
            color, marker = colors[r["run"]], LEVEL_MARKERS[r["level"]]
            x = r["accountant_epsilon"]
            ax.scatter([x], [min(r["lower_bound"], top)], s=46, marker=marker, color=color, zorder=3)
            est = r["estimate"]
            if est is not None:
                lo, hi = (min(v, top) if v is not None else None for v in r["interval"])
                shown = min(est, top)
                if lo is not None and hi is not None:
                    ax.errorbar([x], [shown], yerr=[[max(shown - lo, 0)], [max(hi - shown, 0)]], fmt="none", ecolor=color, alpha=0.6, capsize=3)
                ax.scatter([x], [shown], s=46, marker=marker, facecolors="none", edgecolors=color, zorder=3)
            if r["run"] not in seen:
                seen.add(r["run"])
                name = labels.get(r["run"], r["run"]) + (f" (BROKEN: {r['broken']})" if r["broken"] != "none" else "")
                handles.append(Line2D([], [], color=color, marker="o", linestyle="", label=name))
        handles += [
            Line2D([], [], color="0.2", marker="o", linestyle="", label="user level (DP-FedAvg)"),
            Line2D([], [], color="0.2", marker="s", linestyle="", label="sample level (DP-SGD)"),
            Line2D([], [], color="0.2", marker="o", linestyle="", label="filled: lower bound"),
            Line2D([], [], color="0.2", marker="o", markerfacecolor="none", linestyle="", label="hollow: estimate (bars: interval)"),
        ]
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        confidences = {r["confidence"] for r in rows}
        conf = f"{next(iter(confidences)):g} confidence" if len(confidences) == 1 else "confidence per run"
        ax.set(title="Audited epsilon against the accountant's", xlabel="epsilon (accountant)",
               ylabel=f"epsilon (audit; bound at {conf})")  # fmt: skip
        _legend(fig, handles, [h.get_label() for h in handles])
        return _save(fig, out_dir, "audit_epsilon")
