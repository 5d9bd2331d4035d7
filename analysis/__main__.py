"""`python -m analysis DIR [--out OUT] [--accountant rdp|prv|pld] [--delta D]`: the privacy/utility report.

Exit status: 0 report written; 1 report written but no run was usable (all skipped);
2 bad arguments or no run directory under DIR (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from analysis.report import NoRunsError, build_report

PROG = "fedsim-report"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG,
        description="Privacy budget against accuracy for a fedsim run, a Hydra multirun directory or any tree "
        "of run directories: report.md, report.html, table.csv and plots (PNG and SVG).",
    )
    parser.add_argument("dir", metavar="DIR", help="run directory, sweep directory, or a directory containing runs")
    parser.add_argument("--out", metavar="OUT", help="output directory (default: DIR/report)")
    parser.add_argument("--accountant", metavar="NAME",
                        help="recompute epsilon from the saved ledgers/configs with this accountant: rdp, prv or pld")
    parser.add_argument("--delta", metavar="D", type=float,
                        help="recompute epsilon at this delta (default: each run's own delta)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, already printed)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        report = build_report(args.dir, args.out, args.accountant, args.delta)
    except NoRunsError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad --accountant / --delta
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    partial = sum(r.partial for r in report.runs)
    print(
        f"{report.report_md} ({len(report.runs)} runs"
        + (f", {partial} partial" if partial else "")
        + (f", {len(report.skipped)} skipped" if report.skipped else "")
        + ")"
    )
    if not report.runs:
        print(f"{PROG}: no usable run under {args.dir}: every run directory was skipped (see the report)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
