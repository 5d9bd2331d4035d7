"""Round time and memory against population size (cohort fixed): the round should stay flat.

Runs the same experiment (LEAF synthetic, MLP, fixed cohort of 50, FedAvg) at populations
1,000 / 10,000 / 100,000, each in its own `fedsim` process, and prints steady-state seconds
per round (median over rounds after the first two), the server's and the workers' peak
resident memory, and the ratio of each round time to the 1,000-device one.

    python bench/population.py                 # 1k, 10k, 100k; 12 rounds each
    python bench/population.py --rounds 20 --populations 1000 100000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_one(population: int, rounds: int, cohort: int, workdir: Path, extra: list[str]) -> dict:
    out = workdir / f"pop{population}"
    cmd = [
        sys.executable, "-m", "fedsim",
        f"population={population}", f"rounds={rounds}", f"cohort.size={cohort}", "cohort.sampling=fixed",
        "dataset.examples_per_device=50", "eval_every=1000", "output.progress=false", "output.save_model=false",
        f"output.dir={out}", f"hydra.run.dir={out}", f"simulation.ray_temp_dir={workdir / 'ray'}", *extra,
    ]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    steady = [r["round_time_s"] for r in rows[2:]] or [r["round_time_s"] for r in rows]
    return {
        "population": population,
        "s_per_round": statistics.median(steady),
        "server_peak_rss_mb": summary["server_peak_rss_mb"],
        "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--populations", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--cohort", type=int, default=50)
    ap.add_argument("overrides", nargs="*", help="extra fedsim overrides, e.g. simulation.num_workers=1")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_one(p, args.rounds, args.cohort, Path(tmp), args.overrides) for p in args.populations]
    base = results[0]["s_per_round"]
    print(f"\ncohort {args.cohort}, {args.rounds} rounds, median of rounds 3..{args.rounds}")
    print(f"{'population':>10} | {'s/round':>8} | {'vs first':>8} | {'server peak MB':>14} | {'worker peak MB':>14}")
    for r in results:
        print(
            f"{r['population']:>10,} | {r['s_per_round']:>8.3f} | {r['s_per_round'] / base:>7.2f}x"
            f" | {r['server_peak_rss_mb']:>14.0f} | {r['worker_peak_rss_mb']:>14.0f}"
        )


if __name__ == "__main__":
    main()
