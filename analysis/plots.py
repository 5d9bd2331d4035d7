"""Report figures, one style for all: Agg only (no pyplot state), PNG and SVG per figure.

Every plot function draws from the tidy table (or per-device epsilons) and returns the
files it wrote, or raises `NoData` with the reason the plot is skipped.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from analysis.pareto import pareto_frontier
from analysis.privacy import DeviceEpsilons
from analysis.table import Table

STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "grid.linestyle": "-",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "savefig.dpi": 130,
    "svg.hashsalt": "fedsim-report",  # stable SVG ids: the same runs give the same file
}
FIGSIZE_IN = (9.0, 4.8)
LEGEND_WRAP_CHARS = 40


class NoData(Exception):
    """The plot has nothing to show; the message says why."""


def run_colors(runs: Sequence[str]) -> dict[str, Any]:
    """One colour per run, the same in every figure."""
    cmap = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    n = cmap.N
    return {name: cmap(i % n) for i, name in enumerate(runs)}


# A "key=value" part of a run label: a Hydra override or a config difference (values may hold
# spaces, as in model.cnn_channels=[16, 32], so parts are found by their keys).
_KEY = re.compile(r"(?:(?<=\s)|^)[+~]?([A-Za-z_][\w.]*)=")
_HIDDEN_PREFIXES = ("output.", "hydra.")  # where a run was written says nothing about what it ran


def short_labels(labels: dict[str, str]) -> dict[str, str]:
    """Legend labels: each swept key shortened to the last part(s) of its dotted name that set it
    apart from the other keys (privacy.dpsgd.target_epsilon=4 -> target_epsilon=4), path values
    reduced to their last component, output./hydra. keys left out; labels that end up equal get
    their run name appended, and an empty one becomes the run name."""
    parsed = {run: _label_parts(label) for run, label in labels.items()}
    keys = {key for _, parts in parsed.values() for key, _ in parts}
    short = {key: _shortest_unique_suffix(key, keys) for key in keys}
    out: dict[str, str] = {}
    for run, (prefix, parts) in parsed.items():
        shown = [f"{short[k]}={_short_value(v)}" for k, v in parts if not k.startswith(_HIDDEN_PREFIXES)]
        out[run] = ((prefix + " ".join(shown)).strip() or run) if parts else labels[run]
    counts: dict[str, int] = {}
    for label in out.values():
        counts[label] = counts.get(label, 0) + 1
    return {run: f"{label} [{run}]" if counts[label] > 1 and label != run else label for run, label in out.items()}


def _label_parts(label: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first key, [(key, value), ...]) of a label."""
    starts = list(_KEY.finditer(label))
    if not starts:
        return label, []
    parts = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(label)
        parts.append((m.group(1), label[m.end() : end].strip()))
    return label[: starts[0].start()], parts


def _shortest_unique_suffix(key: str, keys: set[str]) -> str:
    names = key.split(".")
    for n in range(1, len(names) + 1):
        suffix = ".".join(names[-n:])
        if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
            return suffix
    return key


def _short_value(value: str) -> str:
    """A path (absolute, home-relative or file://) as its last component; other values as they are."""
    bare = value.strip("'\"")
    if bare.startswith(("/", "~", "file://")) or re.match(r"^[A-Za-z]:[\\/]", bare):
        return PurePath(bare.removeprefix("file://").rstrip("/\\")).name or bare
    return value


def _wrap(label: str) -> str:
    return "\n".join(textwrap.wrap(label, LEGEND_WRAP_CHARS, break_on_hyphens=False)) or label


def fmt_delta(delta: float) -> str:
    return f"{delta:g}"


def _figure(rows: int = 1, height_in: float | None = None) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(FIGSIZE_IN[0], height_in or FIGSIZE_IN[1]), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _legend(fig: Figure, handles: list[Any], labels: list[str]) -> None:
    if handles:
        fig.legend(handles, [_wrap(lab) for lab in labels], loc="outside right upper")


def _save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    fig.savefig(paths[0], metadata={"Software": None})
    fig.savefig(paths[1], metadata={"Date": None})
    return paths


def _delta_text(deltas: set[float]) -> str:
    deltas = {d for d in deltas if d is not None}
    if len(deltas) == 1:
        return f"delta={fmt_delta(next(iter(deltas)))}"
    return "delta per run, see the table" if deltas else "delta unknown"


def _series(table: Table, run: str, column: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in table.where(run=run):
        if r[column] is not None:
            xs.append(r["round"])
            ys.append(r[column])
    return xs, ys


def plot_accuracy(table: Table, colors: dict[str, Any], labels: dict[str, str], out_dir: Path) -> list[Path]:
    """Test accuracy at every evaluated round, one line per run."""
    labels = short_labels(labels)  # the same short label for a run in every figure
    if not table.has_data("test_accuracy"):
        raise NoData("no run has an evaluated round (test_accuracy)")
    with matplotlib.rc_context(STYLE):
        fig, (ax,) = _figure()
        handles = []
        for run in colors:
            xs, ys = _series(table, run, "test_accuracy")
            if xs:
                (line,) = ax.plot(xs, ys, marker="o", color=colors[run], label=labels[run])
                handles.append(line)
        ax.set(title="Test accuracy per round", xlabel="round", ylabel="test accuracy (fraction correct)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend(fig, handles, [h.get_label() for h in handles])
        return _save(fig, out_dir, "accuracy_vs_round")


def plot_epsilon(table: Table, colors: dict[str, Any], labels: dict[str, str], out_dir: Path) -> list[Path]:
    """Epsilon spent per round: sample-level (max and median over devices) and user-level panels."""
    labels = short_labels(labels)  # the same short label for a run in every figure
    levels = [lvl for lvl, col in (("sample", "sample_epsilon_max"), ("user", "user_epsilon")) if table.has_data(col)]
    if not levels:
        raise NoData("no run logged an epsilon (all runs are non-private)")
    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(len(levels), height_in=4.2 * len(levels) if len(levels) > 1 else None)
        run_handles: dict[str, Any] = {}
        style_handles: list[Any] = []
        for ax, level in zip(axes, levels, strict=True):
            if level == "sample":
                deltas = set(table.column("sample_delta"))
                for run in colors:
                    for column, style in (("sample_epsilon_max", "-"), ("sample_epsilon_median", "--")):
                        xs, ys = _series(table, run, column)
                        if xs:
                            (line,) = ax.plot(xs, ys, linestyle=style, color=colors[run], label=labels[run])
                            run_handles.setdefault(run, line)
                ax.set(title="Sample-level epsilon per device (DP-SGD)",
                       ylabel=f"epsilon ({_delta_text(deltas)})")
                style_handles = [
                    Line2D([], [], color="0.2", linestyle="-", label="max over devices"),
                    Line2D([], [], color="0.2", linestyle="--", label="median over devices"),
                ]
            else:
                deltas = set(table.column("user_delta"))
                for run in colors:
                    xs, ys = _series(table, run, "user_epsilon")
                    if xs:
                        (line,) = ax.plot(xs, ys, color=colors[run], label=labels[run])
                        run_handles.setdefault(run, line)
                ax.set(title="User-level epsilon (DP-FedAvg)", ylabel=f"epsilon ({_delta_text(deltas)})")
            ax.set_ylim(bottom=0)
        axes[-1].set_xlabel("round")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        handles = list(run_handles.values()) + style_handles
        _legend(fig, handles, [labels[r] for r in run_handles] + [h.get_label() for h in style_handles])
        return _save(fig, out_dir, "epsilon_vs_round")


LEVEL_COLUMNS = {"user": "user_epsilon", "sample": "sample_epsilon_max"}
LEVEL_TITLES = {
    "user": ("Final test accuracy vs user-level epsilon", "user-level epsilon"),
    "sample": ("Final test accuracy vs sample-level epsilon", "sample-level epsilon, max over devices"),
}


def plot_pareto(
    final: Table, level: str, colors: dict[str, Any], labels: dict[str, str], out_dir: Path,
    references: list[str] | None = None,
) -> tuple[list[Path], list[str]]:
    """Final accuracy against final epsilon per private run, Pareto frontier marked, non-private runs as lines.

    `references`: the non-private runs to draw (default: all). Returns the files and the runs on the frontier.
    """
    labels = short_labels(labels)  # the same short label for a run in every figure
    column = LEVEL_COLUMNS[level]
    private = [r for r in final if r[column] is not None and r["test_accuracy"] is not None]
    if not private:
        raise NoData(f"no run has a final test accuracy and a {level}-level epsilon")
    points = [(float(r[column]), float(r["test_accuracy"])) for r in private]
    frontier = pareto_frontier(points)
    reference = [r for r in final if not r["private"] and r["test_accuracy"] is not None
                 and (references is None or r["run"] in references)]
    title, xname = LEVEL_TITLES[level]
    deltas = {r["user_delta" if level == "user" else "sample_delta"] for r in private}
    with matplotlib.rc_context(STYLE):
        fig, (ax,) = _figure()
        handles = []
        for r, (x, y) in zip(private, points, strict=True):
            handles.append(ax.scatter([x], [y], s=40, color=colors[r["run"]], zorder=3, label=labels[r["run"]]))
        fx = [points[i][0] for i in frontier]
        fy = [points[i][1] for i in frontier]
        (front,) = ax.plot(fx, fy, color="0.15", linestyle="-", linewidth=1.0, zorder=2,
                           marker="o", markersize=11, markerfacecolor="none", markeredgewidth=1.2,
                           label="Pareto frontier")
        handles.append(front)
        for i, r in enumerate(reference):
            style = ["--", ":", "-."][i % 3]
            name = "non-private" if len(reference) == 1 else f"non-private: {labels[r['run']]}"
            handles.append(ax.axhline(r["test_accuracy"], color="0.35", linestyle=style, linewidth=1.3, label=name))
        xs = [p[0] for p in points]
        if min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.margins(x=0.08, y=0.12)
        ax.set(title=title, xlabel=f"{xname} ({_delta_text(deltas)})", ylabel="final test accuracy (fraction correct)")
        _legend(fig, handles, [h.get_label() for h in handles])
        return _save(fig, out_dir, f"accuracy_vs_epsilon_{level}_level"), [private[i]["run"] for i in frontier]


def plot_device_epsilons(
    device_eps: dict[str, DeviceEpsilons], colors: dict[str, Any], labels: dict[str, str], out_dir: Path,
    recomputed: bool,
) -> list[Path]:
    """Histogram of per-device sample-level epsilon at the end of each run with a ledger."""
    labels = short_labels(labels)  # the same short label for a run in every figure
    device_eps = {run: d for run, d in device_eps.items() if d.epsilons}
    if not device_eps:
        raise NoData("no run has a readable ledger.json (sample-level DP)")
    values = [e for d in device_eps.values() for e in d.epsilons.values() if math.isfinite(e)]
    if not values:
        raise NoData("every per-device epsilon is infinite (noise multiplier 0)")
    how = {(d.accountant, d.delta) for d in device_eps.values()}
    if len(how) == 1:
        acc, delta = next(iter(how))
        basis = f"{acc}, delta={fmt_delta(delta)}"
    else:
        basis = "each run's accountant and delta"
    edges = _common_bin_edges([[e for e in d.epsilons.values() if math.isfinite(e)] for d in device_eps.values()])
    with matplotlib.rc_context(STYLE):
        fig, (ax,) = _figure()
        handles = []
        any_target = False
        for run, d in device_eps.items():
            eps = [e for e in d.epsilons.values() if math.isfinite(e)]
            color = colors[run]
            ax.hist(eps, bins=edges, color=color, alpha=0.35, histtype="stepfilled")
            _, _, patches = ax.hist(eps, bins=edges, color=color, histtype="step", linewidth=1.4,
                                    label=f"{labels[run]} ({len(eps)}\u00a0devices)")
            handles.append(patches[0])
            if d.target_epsilon is not None and not recomputed:
                ax.axvline(d.target_epsilon, color=color, linestyle=":", linewidth=1.5)
                any_target = True
        if any_target:
            handles.append(Line2D([], [], color="0.2", linestyle=":", label="per-device budget (target epsilon)"))
        what = "recomputed from ledger.json" if recomputed else "ledger.json"
        ax.set(title="Per-device epsilon at the end of the run",
               xlabel=f"sample-level epsilon of a device ({basis}; {what})", ylabel="devices")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _legend(fig, handles, [h.get_label() for h in handles])
        return _save(fig, out_dir, "device_epsilon_histogram")


def _common_bin_edges(groups: list[list[float]], max_bins: int = 200) -> list[float]:
    """Equal-width bins over all groups, narrow enough to give each group about sqrt(n) bins (5 to 30)."""
    lo = min(min(g) for g in groups if g)
    hi = max(max(g) for g in groups if g)
    if hi <= lo:
        return [lo - 0.5, lo + 0.5]
    widths = [
        (max(g) - min(g)) / max(5, min(30, int(math.sqrt(len(g))) + 1)) for g in groups if g and max(g) > min(g)
    ]
    width = max(min(widths) if widths else (hi - lo) / 10, (hi - lo) / max_bins)
    count = max(1, math.ceil((hi - lo) / width - 1e-9))
    return [lo + (hi - lo) * i / count for i in range(count + 1)]


_CLIP_PANELS = [
    ("fraction clipped", [("clip_fraction", "-", "per-example gradients, sample-level"),
                          ("update_clipped_fraction", "--", "device updates, user-level")]),
    ("noise multiplier z\n(noise std / clip norm)", [("noise_multiplier", "-", "sample-level z"),
                                                    ("user_noise_multiplier", "--", "user-level z")]),
    ("clip norm C\n(L2 norm)", [("clip_norm", "--", "user-level clip norm")]),
]


def plot_clipping_and_noise(
    table: Table, colors: dict[str, Any], labels: dict[str, str], out_dir: Path
) -> list[Path]:
    """Clip fraction, noise multiplier and (user-level) clip norm per round, one panel each."""
    labels = short_labels(labels)  # the same short label for a run in every figure
    panels = [(name, [c for c in cols if table.has_data(c[0])]) for name, cols in _CLIP_PANELS]
    # A clip norm that never moves (fixed clipping) is in the config table; only adaptive clipping gets a panel.
    panels = [
        (name, [c for c in cols if c[0] != "clip_norm" or len({v for v in table.column(c[0]) if v is not None}) > 1])
        for name, cols in panels
    ]
    panels = [(name, cols) for name, cols in panels if cols]
    if not panels:
        raise NoData("no run logged clipping or noise (all runs are non-private)")
    used = [c for _, cols in panels for c in cols]
    both_levels = len({style for _, style, _ in used}) > 1
    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(len(panels), height_in=2.4 * len(panels) + 1.0)
        run_handles: dict[str, Any] = {}
        for ax, (name, cols) in zip(axes, panels, strict=True):
            for column, style, _ in cols:
                for run in colors:
                    xs, ys = _series(table, run, column)
                    if xs:
                        (line,) = ax.plot(xs, ys, linestyle=style if both_levels else "-", color=colors[run],
                                          linewidth=1.2)
                        run_handles.setdefault(run, line)
            ax.set_ylabel(f"{name}\n({cols[0][2]})" if name.startswith("fraction") and len(cols) == 1 else name)
            if name.startswith("fraction"):
                ax.set_ylim(-0.03, 1.03)
        axes[0].set_title("Clipping and noise per round")
        axes[-1].set_xlabel("round")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        handles = [Line2D([], [], color=colors[r], label=labels[r]) for r in run_handles]
        if both_levels:  # say which line style is which
            handles += [Line2D([], [], color="0.2", linestyle="-", label="sample-level (DP-SGD)"),
                        Line2D([], [], color="0.2", linestyle="--", label="user-level (DP-FedAvg)")]
        _legend(fig, handles, [h.get_label() for h in handles])
        return _save(fig, out_dir, "clipping_and_noise")
