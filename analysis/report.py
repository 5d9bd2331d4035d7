"""The privacy/utility report of a run or a sweep: report.md, report.html, table.csv and the figures."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.privacy import Accountant, create_accountant

from analysis.audit_plot import plot_audit
from analysis.document import Document
from analysis.plots import (
    NoData,
    fmt_delta,
    plot_accuracy,
    plot_clipping_and_noise,
    plot_device_epsilons,
    plot_epsilon,
    plot_pareto,
    run_colors,
)
from analysis.privacy import DeviceEpsilons, check_accountant, check_delta, device_epsilons, user_level_epsilon
from analysis.runs import Run, SkippedRun, config_differences, find_runs, format_value, run_labels
from analysis.table import Table, build_table, final_results
from analysis.tuning import Sweep, optuna_sweeps

SIGNIFICANT_DIGITS = 4
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
TABLE_CSV = "table.csv"


class NoRunsError(ValueError):
    """The directory holds no run directory at all."""


def with_sensitivity(run: Run) -> dict[str, Any]:
    """A skellam ledger with its sensitivities: from the ledger, or (a ledger written before it
    recorded them) from summary.json's privacy.sample_level.distributed_noise."""
    ledger = dict(run.ledger or {})
    if "skellam_sensitivity" not in ledger:
        noise = ((((run.summary or {}).get("privacy") or {}).get("sample_level") or {}).get("distributed_noise")) or {}
        if "example_l2_sensitivity" in noise and "example_l1_sensitivity" in noise:
            ledger["skellam_sensitivity"] = [noise["example_l2_sensitivity"], noise["example_l1_sensitivity"]]
    return ledger

def fmt(value: Any) -> str:
    """A number for the report: 4 significant digits for floats, as is for ints, "-" for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{SIGNIFICANT_DIGITS}g}"
    return str(value)


@dataclass
class Report:
    """Everything the report shows; `write_report` builds it and renders it to disk."""

    root: Path
    out: Path
    runs: list[Run]
    skipped: list[SkippedRun]
    table: Table  # one row per (run, round)
    final: Table  # one row per run
    labels: dict[str, str]
    overrides: dict[str, str]
    device_eps: dict[str, DeviceEpsilons] = field(default_factory=dict)
    recompute: tuple[str | None, float | None] | None = None  # (accountant, delta) asked for, None if not
    figures: list[tuple[str, str, list[Path]]] = field(default_factory=list)  # (title, caption, files)
    skipped_plots: list[tuple[str, str]] = field(default_factory=list)  # (title, reason)
    frontiers: dict[str, list[str]] = field(default_factory=dict)  # level -> runs on the Pareto frontier
    tuning: list[Sweep] = field(default_factory=list)  # Optuna sweeps among the runs (analysis.tuning)
    notes: list[str] = field(default_factory=list)

    @property
    def report_md(self) -> Path:
        return self.out / REPORT_MD


def _recompute_label(accountant: str | None, delta: float | None) -> str:
    acc = accountant or "each run's accountant"
    d = f"delta={fmt_delta(delta)}" if delta is not None else "each run's delta"
    return f"{acc}, {d}"


def _privacy_numbers(report: Report, accountant: str | None, delta: float | None) -> None:
    """Per-device epsilons from the ledgers; with recomputation, the extra final/tidy columns."""
    accountants: dict[str, Accountant] = {}

    def get(name: str, ledger: dict[str, Any] | None = None) -> Accountant:
        # A PLD ledger records the discretisation its run chose: recompute with the same one.
        interval = (ledger or {}).get("pld_discretization") if name == "pld" else None
        key = f"{name}/{interval}"
        if key not in accountants:
            accountants[key] = create_accountant(name, **({"value_discretization_interval": float(interval)} if interval else {}))
        return accountants[key]

    recompute = report.recompute is not None
    final_by_run = {r["run"]: r for r in report.final}
    # run -> [(tidy column, value, round it describes, accountant, delta)]
    recomputed: dict[str, list[tuple[str, float, int, str, float]]] = {}
    for run in report.runs:
        last_round = run.rounds[-1]
        if run.ledger is not None:
            try:
                name = str(accountant or run.ledger.get("accountant"))
                if run.ledger.get("accountant") == "skellam":  # distributed DP-SGD: only its own accountant bounds it
                    if accountant not in (None, "skellam"):
                        raise ValueError(f"a skellam ledger (distributed DP-SGD) is not recomputed with {accountant}")
                    d = device_epsilons(with_sensitivity(run), None, delta)
                else:
                    check_accountant(name)
                    d = device_epsilons(run.ledger, get(name, run.ledger), delta)
            except (ValueError, KeyError, TypeError) as err:
                run.problems.append(f"ledger.json unusable ({err}); no per-device epsilon")
            else:
                report.device_eps[run.name] = d
                logged = last_round.get("sample_epsilon_max")
                if not recompute and isinstance(logged, (int, float)) and math.isfinite(d.max):
                    if not math.isclose(d.max, logged, rel_tol=1e-6, abs_tol=1e-12):
                        report.notes.append(
                            f"Run {run.name}: ledger.json gives a max per-device epsilon of {fmt(d.max)}, the last "
                            f"round of metrics.jsonl {fmt(float(logged))}; the ledger may be from another run."
                        )
                if recompute:
                    # The ledger is the state at the end of the run: its last round.
                    recomputed.setdefault(run.name, []).extend([
                        ("recomputed_sample_epsilon_max", d.max, last_round["round"], d.accountant, d.delta),
                        ("recomputed_sample_epsilon_median", d.median, last_round["round"], d.accountant, d.delta),
                    ])
        final = final_by_run[run.name]
        if recompute and final["user_epsilon"] is not None and final["final_round"] is not None:
            user = ((run.config or {}).get("privacy") or {}).get("dpfedavg") or {}
            try:
                eps = user_level_epsilon(run, final["final_round"], accountant, delta)
            except ValueError as err:
                report.notes.append(f"Run {run.name}: user-level epsilon not recomputed ({err}).")
            else:
                recomputed.setdefault(run.name, []).append((
                    "recomputed_user_epsilon", eps, final["final_round"],
                    accountant or user.get("accountant"), delta if delta is not None else user.get("delta"),
                ))
    if not recompute:
        return

    extra = ["recomputed_sample_epsilon_max", "recomputed_sample_epsilon_median", "recomputed_user_epsilon"]
    for run_name, values in recomputed.items():
        final_by_run[run_name].update({column: value for column, value, *_ in values})
    report.final = Table(report.final.rows, report.final.columns + extra)
    # In the tidy table each number sits on the row of the round it describes.
    rows = {(r["run"], r["round"]): r for r in report.table.rows}
    for run_name, values in recomputed.items():
        for column, value, round_number, acc, d in values:
            row = rows[(run_name, round_number)]
            row[column] = value
            row.setdefault("recomputed_accountant", acc)
            row.setdefault("recomputed_delta", d)
    columns = report.table.columns + ["recomputed_accountant", "recomputed_delta"] + extra
    report.table = Table(report.table.rows, columns)


def _dataset(run: Run) -> Any:
    return ((run.config or {}).get("dataset") or {}).get("name") if run.config is not None else None


def _references(report: Report, level: str) -> list[str]:
    """Non-private runs to draw as references in the accuracy-vs-epsilon plot of `level`.

    In a tree mixing experiments, a non-private run on another dataset is no reference for
    these private runs: only the non-private runs on a dataset of the plotted private runs
    (or any, when datasets are unknown) are drawn.
    """
    column = "user_epsilon" if level == "user" else "sample_epsilon_max"
    runs = {r.name: r for r in report.runs}
    private = [runs[r["run"]] for r in report.final if r[column] is not None]
    datasets = {_dataset(r) for r in private}
    return [
        r["run"] for r in report.final
        if not r["private"] and (None in datasets or _dataset(runs[r["run"]]) in datasets | {None})
    ]


def _figures(report: Report) -> None:
    out, table, final = report.out, report.table, report.final
    colors = run_colors([r.name for r in report.runs])
    labels = {r.name: report.labels[r.name] + (" (partial)" if r.partial else "") for r in report.runs}

    def attempt(title: str, caption: str, draw: Any) -> Any:
        try:
            result = draw()
        except NoData as err:
            report.skipped_plots.append((title, str(err)))
            return None
        files = result[0] if isinstance(result, tuple) else result
        report.figures.append((title, caption, files))
        return result

    attempt("Test accuracy per round",
            "Test accuracy at every evaluated round (central evaluation on the test set).",
            lambda: plot_accuracy(table, colors, labels, out))
    attempt("Epsilon per round",
            "Privacy spent so far after each round, as logged by the run. Sample-level: per-device DP-SGD "
            "epsilon, max (solid) and median (dashed) over devices that trained; user-level: DP-FedAvg epsilon.",
            lambda: plot_epsilon(table, colors, labels, out))
    levels = [lvl for lvl, col in (("user", "user_epsilon"), ("sample", "sample_epsilon_max")) if table.has_data(col)]
    if not levels:
        report.skipped_plots.append(
            ("Final accuracy vs epsilon", "no run logged an epsilon (all runs are non-private)"))
    for level in levels:
        result = attempt(
            f"Final accuracy vs {level}-level epsilon",
            f"Final test accuracy against the {level}-level epsilon at that round, one point per private run; "
            "the Pareto frontier (no run has both a lower epsilon and a higher accuracy) is circled and "
            "joined; non-private runs are horizontal reference lines.",
            lambda level=level: plot_pareto(final, level, colors, labels, out, _references(report, level)),
        )
        if result is not None:
            report.frontiers[level] = result[1]
    recomputed = report.recompute is not None
    how = (f"recomputed with {_recompute_label(*report.recompute)}" if report.recompute
           else "with each ledger's own accountant and delta")
    attempt("Per-device epsilon at the end of the run",
            f"Distribution over devices of the sample-level epsilon in ledger.json, {how}; dotted lines: the "
            "per-device budget.",
            lambda: plot_device_epsilons(report.device_eps, colors, labels, out, recomputed))
    if any((run.summary or {}).get("audit") for run in report.runs):  # a sweep without audits: no plot, no note
        attempt("Audited epsilon against the accountant's",
                "One point per audited run (fedsim.audit): the accountant's epsilon against the audit's lower bound "
                "(filled; Steinke et al. 2023, at the run's confidence) and, at user level, the one-shot estimate of "
                "Andrew et al. 2024 with its bootstrap interval (hollow). A lower bound above the diagonal means the "
                "mechanism that ran leaks more than the one accounted for; below it says nothing about privacy.",
                lambda: plot_audit(report.runs, colors, labels, out))
    attempt("Clipping and noise per round",
            "Fraction of clipped per-example gradients (sample-level) or device updates (user-level), the "
            "noise multiplier z and the user-level clip norm, per round.",
            lambda: plot_clipping_and_noise(table, colors, labels, out))


_FINAL_HEADERS = [
    ("run", "run"), ("label", "label"), ("status", "status"), ("privacy", "privacy"),
    ("rounds", "rounds"), ("final_round", "final round"), ("test_accuracy", "test accuracy"),
    ("test_loss", "test loss"), ("sample_epsilon_max", "sample-level epsilon max"),
    ("sample_epsilon_median", "sample-level epsilon median"), ("sample_delta", "sample-level delta"),
    ("user_epsilon", "user-level epsilon"), ("user_delta", "user-level delta"),
]


def _privacy_kind(run: Run, row: dict[str, Any]) -> str:
    levels = [name for name, col in (("sample", "sample_epsilon_max"), ("user", "user_epsilon"))
              if any(col in r for r in run.rounds)]
    if not row["private"]:
        return "non-private"
    return "+".join(levels) + "-level" if levels else "private (no epsilon logged)"


def _document(report: Report) -> Document:
    runs = {r.name: r for r in report.runs}
    partial = [r for r in report.runs if r.partial]
    doc = Document(f"fedsim report: {report.root.resolve().name}")
    doc.paragraph(
        f"Source: `{report.root.resolve()}`. {len(report.runs)} run(s) read"
        + (f", {len(partial)} partial" if partial else "")
        + (f", {len(report.skipped)} skipped" if report.skipped else "")
        + ". Generated by `python -m analysis`."
    )

    doc.heading("Final accuracy and privacy per run")
    rec = report.recompute
    headers = list(_FINAL_HEADERS)
    if rec is not None:
        label = _recompute_label(*rec)
        headers += [("recomputed_sample_epsilon_max", f"recomputed sample-level epsilon max ({label})"),
                    ("recomputed_sample_epsilon_median", f"recomputed sample-level epsilon median ({label})"),
                    ("recomputed_user_epsilon", f"recomputed user-level epsilon ({label})")]
    headers += [("frontier", "Pareto frontier"), ("elapsed_s", "time (s)")]
    outside = diagnostics_outside(report.runs)
    headers = [(key, f"{label} \u2020" if key in outside else label) for key, label in headers]
    frontier_of = {name: [lvl for lvl, names in report.frontiers.items() if name in names] for name in runs}
    rows = []
    for r in report.final:
        cells = dict(r)
        cells["privacy"] = _privacy_kind(runs[r["run"]], r)
        cells["frontier"] = ", ".join(f"{lvl}-level" for lvl in frontier_of[r["run"]])
        rows.append(cells)
    # Columns no run has (e.g. sample-level epsilon in a user-level sweep) are left out.
    keep = [(k, h) for k, h in headers if k in ("run", "label", "status", "test_accuracy", "frontier")
            or any(c.get(k) not in (None, "") for c in rows)]
    doc.table(
        [h for _, h in keep],
        [[r[k] if k in ("run", "label", "status", "privacy", "frontier") else fmt(r.get(k)) for k, _ in keep]
         for r in rows],
        highlight=[r["status"] != "ok" for r in rows],
    )
    doc.paragraph(
        "Final = the last evaluated round (\"final round\"): its test accuracy and loss, and the epsilon the "
        "run logged at that round. \"rounds\" = rounds completed; time = wall time of the whole run. Numbers "
        f"are the values in each run's metrics.jsonl to {SIGNIFICANT_DIGITS} significant digits; "
        f"[{TABLE_CSV}]({TABLE_CSV}) has every round of every run at full precision. "
        "Status \"partial\": see Partial runs below."
    )
    if rec is not None:
        doc.paragraph(
            f"Recomputed epsilon ({_recompute_label(*rec)}): sample-level from each run's ledger.json (every "
            "device's DP-SGD history at the end of the run; max and median over the devices that trained), "
            "user-level from config.yaml (cohort sampling, population, cohort size, noise multiplier) at the "
            "final round. No re-training."
        )
    for level, names in report.frontiers.items():
        doc.paragraph(
            f"Pareto frontier ({level}-level): "
            + ", ".join(f"{n} (`{report.labels[n]}`)" for n in names)
            + " - no other run has both a lower epsilon and a higher final accuracy."
        )

    for sweep in report.tuning:
        _tuning_section(doc, sweep)

    if outside:
        doc.heading("Metrics outside the privacy guarantee")
        doc.paragraph(
            "These metrics are computed from the devices' data or the cohort without noise: no epsilon in this "
            "report covers them (each run's summary.json lists them under diagnostics_outside_guarantee). "
            "Publish them only as simulation diagnostics; a run with output.private_metrics_only=true leaves them "
            "out of metrics.jsonl. Table headers mark them with \u2020."
        )
        doc.table(["metric", "why it is outside", "runs"],
                  [[f"{key} \u2020", why, ", ".join(names)] for key, (why, names) in outside.items()])  # fmt: skip

    doc.heading("Plots")
    for title, caption, files in report.figures:
        png = next(f for f in files if f.suffix == ".png")
        svg = next((f for f in files if f.suffix == ".svg"), None)
        doc.heading(title, 3)
        doc.figure(png.name, title, caption + (f" [SVG]({svg.name})" if svg else ""))
    if report.skipped_plots:
        doc.heading("Plots not drawn", 3)
        doc.bullets([f"{title}: {reason}." for title, reason in report.skipped_plots])

    doc.heading("Config differences")
    configs = {r.name: r.config for r in report.runs if r.config is not None}
    diffs = config_differences(configs)
    without = [r.name for r in report.runs if r.config is None]
    if len(configs) < 2:
        doc.paragraph("Fewer than two runs have a readable config.yaml: nothing to compare.")
    elif not diffs:
        doc.paragraph("All runs have the same config.yaml.")
    else:
        names = list(configs)
        doc.paragraph(
            f"The {len(diffs)} config.yaml keys (flattened, dotted) whose values differ between runs; "
            "\"(absent)\": the key is not in that run's config (e.g. under a section that is null there)."
        )
        doc.table(["key"] + names,
                  [[k] + [format_value(v[n]) if n in v else "(absent)" for n in names] for k, v in diffs.items()])
    if without:
        doc.paragraph("Left out (no readable config.yaml): " + ", ".join(without) + ".")
    doc.heading("Overrides per run")
    doc.table(["run", "overrides"], [[r.name, report.overrides[r.name] or "-"] for r in report.runs])

    doc.heading("Partial runs")
    if partial:
        doc.paragraph("Their usable rounds are in the tables and plots, marked \"partial\".")
        doc.bullets([f"{r.name} (`{r.path}`): " + "; ".join(r.problems) for r in partial])
    else:
        doc.paragraph("None.")
    doc.heading("Skipped runs")
    if report.skipped:
        doc.paragraph("Run directories with no usable metrics, left out of every table and plot.")
        doc.bullets([f"{s.name} (`{s.path}`): {s.reason}" for s in report.skipped])
    else:
        doc.paragraph("None.")
    if report.notes:
        doc.heading("Notes")
        doc.bullets(report.notes)
    return doc


def _param(value: str) -> str:
    """A tuned value as the trial's override wrote it; floats to the report's precision."""
    try:
        return fmt(float(value)) if any(c in value for c in ".eE") else value
    except ValueError:
        return value


def _tuning_section(doc: Document, sweep: Sweep) -> None:
    """An Optuna sweep's trials ranked by accuracy at equal epsilon, and what the whole sweep spent."""
    doc.heading("Tuning: trials ranked by accuracy at equal epsilon")
    finished = [t for t in sweep.trials if t.accuracy is not None]
    doc.paragraph(
        f"Optuna study in `{sweep.directory}`: {len(sweep.trials)} trials read "
        f"({sweep.n_trials} configured), {sweep.sampler}, objective = final test accuracy ({sweep.direction}). "
        "Trials are ranked within each (target epsilon, delta): every trial's sigma is calibrated for its "
        "target, so they are compared at equal privacy. Tuned: " + ", ".join(f"`{k}`" for k in sweep.tuned) + "."
    )
    doc.table(
        ["rank", "run", "final test accuracy", "target epsilon", "delta", "epsilon max (this trial)", "sigma"]
        + [key.rsplit(".", 1)[-1] for key in sweep.tuned],
        [[fmt(t.rank), t.run.name, fmt(t.accuracy), fmt(t.target_epsilon), fmt(t.delta), fmt(t.epsilon_max),
          fmt(t.noise_multiplier)] + [_param(t.params[key]) for key in sweep.tuned] for t in sweep.trials],
        highlight=[t.rank == 1 for t in sweep.trials],
    )  # fmt: skip
    composed = (
        f"All {len(sweep.trials)} trials composed: epsilon {fmt(sweep.epsilon_all_trials)} per device "
        f"(the largest over devices; {sweep.epsilon_note})"
        if sweep.epsilon_all_trials is not None else f"All trials composed: {sweep.epsilon_note}"
    )  # fmt: skip
    doc.paragraph(
        f"Tuning on private data spends privacy too. A trial's epsilon is that trial's guarantee alone: it does "
        f"not cover choosing the best of these {len(finished)} trials from their results (Papernot & Steinke "
        f"2022, \"Hyperparameter Tuning with Renyi Differential Privacy\", ICLR). {composed}: this bounds the "
        "chosen model too, assuming the objective is computed on the server's held-out test set (not device "
        "data) and every trial trains on the same population. The best trial's accuracy was selected on that "
        "same test set, so it is an optimistic estimate: confirm it on data the sweep did not see."
    )


def build_report(
    run_dir_or_sweep_dir: str | Path,
    out: str | Path | None = None,
    accountant: str | None = None,
    delta: float | None = None,
) -> Report:
    """Read the runs, write table.csv, the figures, report.md and report.html; return what was shown.

    NoRunsError if the directory holds no run directory; ValueError for a bad accountant or delta.
    """
    root = Path(run_dir_or_sweep_dir)
    if accountant is not None:
        check_accountant(accountant)
    if delta is not None:
        delta = check_delta(delta)
    if not root.is_dir():
        raise NoRunsError(f"{root} is not a directory")
    runs, skipped = find_runs(root)
    if not runs and not skipped:
        raise NoRunsError(f"no run directory (one with a metrics.jsonl) under {root}")
    out_dir = Path(out) if out is not None else root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)

    labels, overrides = run_labels(runs)
    report = Report(
        root=root, out=out_dir, runs=runs, skipped=skipped, table=build_table(runs), final=final_results(runs),
        labels=labels, overrides=overrides,
        recompute=(accountant, delta) if (accountant is not None or delta is not None) else None,
    )
    if runs:
        _privacy_numbers(report, accountant, delta)
        # Runs found partial while accounting (unusable ledger) are marked in both tables.
        status = {r.name: r.status for r in runs}
        for row in report.table.rows + report.final.rows:
            row["status"] = status[row["run"]]
        _figures(report)
        report.tuning = optuna_sweeps(runs)
    report.table.to_csv(out_dir / TABLE_CSV)
    doc = _document(report)
    (out_dir / REPORT_MD).write_text(doc.markdown(), encoding="utf-8")
    (out_dir / REPORT_HTML).write_text(doc.html(), encoding="utf-8")
    return report


def write_report(
    run_dir_or_sweep_dir: str | Path,
    out: str | Path | None = None,
    accountant: str | None = None,
    delta: float | None = None,
) -> Path:
    """Write the report of a run directory, a Hydra multirun directory or any tree of runs; return report.md.

    out defaults to DIR/report. With `accountant` ("rdp" | "prv" | "pld") and/or `delta`,
    epsilon is also recomputed from the saved ledgers and configs (no re-training).
    Raises NoRunsError (a ValueError) if there is no run, ValueError for a bad accountant or delta;
    broken runs are listed in the report, never raised.
    """
    return build_report(run_dir_or_sweep_dir, out, accountant, delta).report_md


def diagnostics_outside(runs: list[Run]) -> dict[str, tuple[str, list[str]]]:
    """metric -> (why it is outside the guarantee, runs that logged it), from each summary.json."""
    out: dict[str, tuple[str, list[str]]] = {}
    for run in runs:
        listed = (run.summary or {}).get("diagnostics_outside_guarantee") or {}
        if not isinstance(listed, dict):
            continue
        for key, why in sorted(listed.items()):
            out.setdefault(str(key), (str(why), []))[1].append(run.name)
    return out
