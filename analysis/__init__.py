"""Privacy/utility analysis of fedsim runs: tidy tables, plots and a report, from what runs write on disk.

    python -m analysis DIR [--out OUT] [--accountant rdp|prv|pld] [--delta D]
    analysis.write_report(DIR)  # -> DIR/report/report.md (+ report.html, table.csv, *.png, *.svg)
"""

from analysis.pareto import pareto_frontier
from analysis.privacy import DeviceEpsilons, device_epsilons, ledger_histories, user_level_epsilon
from analysis.report import NoRunsError, Report, build_report, write_report
from analysis.runs import (
    Run,
    SkippedRun,
    config_differences,
    find_run_dirs,
    find_runs,
    flatten_config,
    load_run,
    read_run,
    run_labels,
)
from analysis.table import Table, build_table, final_results, read_csv

__all__ = [
    "DeviceEpsilons",
    "NoRunsError",
    "Report",
    "Run",
    "SkippedRun",
    "Table",
    "build_report",
    "build_table",
    "config_differences",
    "device_epsilons",
    "final_results",
    "find_run_dirs",
    "find_runs",
    "flatten_config",
    "ledger_histories",
    "load_run",
    "pareto_frontier",
    "read_csv",
    "read_run",
    "run_labels",
    "user_level_epsilon",
    "write_report",
]
