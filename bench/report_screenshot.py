"""Open fedsim's HTML report in a real browser (headless Chromium) and check what it shows.

    python bench/report_screenshot.py                      # two small runs, their report, a screenshot
    python bench/report_screenshot.py DIR                  # the report of DIR (a run, a sweep, any tree)
    python bench/report_screenshot.py DIR --out shot.png   # keep the screenshot there

Chromium comes from Debian (`apt-get install chromium`; .ci/run installs it). The check fails
(exit status 1, one line per problem) when:
- an <img> of report.html points at a file that is not there,
- Chromium cannot render the page, or the screenshot is blank,
- the plots are not drawn in the screenshot: the report's plots use matplotlib's colour cycle,
  so a page whose images failed to load has (almost) no pixel of its first two colours,
- the legends of the accuracy plot carry an absolute path (labels must be the swept keys' last parts).
It prints where the screenshot is, to look at it.
"""

from __future__ import annotations

import argparse
import html.parser
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# matplotlib's default colour cycle, first two (C0 blue, C1 orange): the runs' lines in every plot.
PLOT_COLOURS = ((31, 119, 180), (255, 127, 14))
MIN_PLOT_PIXELS = 300  # pixels of those colours a page with its plots drawn has (measured: thousands)


def browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources += [value for name, value in attrs if name == "src" and value]


def screenshot(page: Path, png: Path, *, width: int = 1280, height: int = 6000) -> None:
    """Render `page` in headless Chromium to `png` (RuntimeError if it cannot)."""
    exe = browser()
    if exe is None:
        raise RuntimeError("no Chromium found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    if done.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}")


def check(report_dir: Path, png: Path, labels: dict[str, str] | None = None) -> list[str]:
    """Problems with the report in `report_dir` as rendered in `png` (empty: it is fine);
    `labels`: the report's legend label per run (analysis.Report.labels)."""
    problems: list[str] = []
    page = report_dir / "report.html"
    parser = _Images()
    parser.feed(page.read_text())
    if not parser.sources:
        problems.append("report.html has no image")
    for src in parser.sources:
        if not (report_dir / src).is_file():
            problems.append(f"report.html shows {src}, which is not in {report_dir}")
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    if (pixels.min(axis=2) < 240).mean() < 0.01:
        problems.append(f"{png} is blank (under 1% of its pixels are not white)")
    drawn = sum(int((np.abs(pixels - np.array(colour)).max(axis=2) <= 8).sum()) for colour in PLOT_COLOURS)
    if drawn < MIN_PLOT_PIXELS:
        problems.append(f"the plots are not drawn: {drawn} pixels of the plot colours (at least {MIN_PLOT_PIXELS} expected)")
    for run, label in (labels or {}).items():
        if "/" in label or str(report_dir.parent) in label:
            problems.append(f"run {run}: its legend label {label!r} names a path")
    return problems


def _small_runs(root: Path) -> Path:
    """Two 3-round runs that differ in one key, as a sweep would leave them."""
    import fedsim

    for lr in (0.05, 0.2):
        fedsim.simulate(["rounds=3", "population=200", "cohort.size=20", f"algorithm.lr={lr}", "privacy=dpsgd",
                         "output.progress=false"], output_dir=root / f"lr={lr}")  # fmt: skip
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="a run, a sweep or any tree of runs (default: two small runs made now)")
    parser.add_argument("--out", help="where to keep the screenshot (default: DIR/report/screenshot.png)")
    args = parser.parse_args(argv)
    if browser() is None:
        print("report_screenshot: no Chromium on this machine (apt-get install chromium)", file=sys.stderr)
        return 2
    root = Path(args.dir) if args.dir else _small_runs(Path(tempfile.mkdtemp(prefix="fedsim-report-")))
    from analysis import NoRunsError, build_report

    try:
        report = build_report(root)
    except NoRunsError as err:
        print(f"report_screenshot: {err}", file=sys.stderr)
        return 2
    report_dir = root / "report"
    png = Path(args.out) if args.out else report_dir / "screenshot.png"
    screenshot(report_dir / "report.html", png)
    problems = check(report_dir, png, report.labels)
    for problem in problems:
        print(f"report_screenshot: {problem}", file=sys.stderr)
    print(f"report_screenshot: {'FAILED' if problems else 'ok'}: {png} ({Image.open(png).size[0]}x{Image.open(png).size[1]})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
