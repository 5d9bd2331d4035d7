"""Round time and memory against population size (cohort fixed): both should stay flat.

Runs the same experiment (LEAF synthetic, MLP, fixed cohort of 50, FedAvg) at populations
1,000 / 1,000,000 / 1,000,000,000, without privacy, with DP-SGD on every device and with
DP-FedAvg, each in its own `fedsim` process, and prints steady-state seconds per round
(median over rounds after the first two), the peak resident memory (VmHWM) of the server
process and of the largest worker process, and each round time against the 1,000-device run
with the same privacy.

    python bench/population.py                 # 3 populations x 3 privacy settings, 12 rounds each
    python bench/population.py --rounds 20 --populations 1000 100000 --privacy none
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRIVACY = {
    "none": [],
    "dpsgd": ["privacy=dpsgd"],
    # Fixed-size cohorts are accounted by RDP (replace-one adjacency); PLD covers Poisson only.
    "dpfedavg": ["privacy=dpfedavg", "privacy.dpfedavg.accountant=rdp"],
}


def run_one(population: int, privacy: str, rounds: int, cohort: int, workdir: Path, extra: list[str], timeout_s: float) -> dict:
    out = workdir / f"pop{population}-{privacy}"
    cmd = [
        sys.executable, "-m", "fedsim",
        f"population={population}", f"rounds={rounds}", f"cohort.size={cohort}", "cohort.sampling=fixed",
        "dataset.examples_per_device=50", "eval_every=1000", "output.progress=false", "output.save_model=false",
        f"output.dir={out}", f"hydra.run.dir={out}", f"simulation.ray_temp_dir={workdir / 'ray'}",
        *PRIVACY[privacy], *extra,
    ]  # fmt: skip
    # Its own process group, so a run that hangs (a Ray that failed to start on a loaded
    # machine) is stopped with its Ray processes; the other runs still go on.
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        return {"population": population, "privacy": privacy, "failed": f"no result within {timeout_s:.0f} s"}
    if proc.returncode:
        return {"population": population, "privacy": privacy, "failed": f"exit status {proc.returncode}"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    steady = [r["round_time_s"] for r in rows[2:]] or [r["round_time_s"] for r in rows]
    return {
        "population": population,
        "privacy": privacy,
        "s_per_round": statistics.median(steady),
        "server_peak_rss_mb": summary["server_peak_rss_mb"],
        "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--populations", type=int, nargs="+", default=[1_000, 1_000_000, 1_000_000_000])
    ap.add_argument("--privacy", nargs="+", choices=list(PRIVACY), default=list(PRIVACY))
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--cohort", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before a run counts as failed")
    ap.add_argument("overrides", nargs="*", help="extra fedsim overrides, e.g. simulation.num_workers=1")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run_one(p, privacy, args.rounds, args.cohort, Path(tmp), args.overrides, args.timeout)
            for privacy in args.privacy
            for p in args.populations
        ]
    print(f"\ncohort {args.cohort} (fixed), {args.rounds} rounds, median of rounds 3..{args.rounds}")
    print(
        f"| {'privacy':<8} | {'population':>13} | {'s/round':>7} | {'vs first':>8} "
        f"| {'server peak MB':>14} | {'worker peak MB':>14} |"
    )
    print(f"|{'-' * 10}|{'-' * 14}:|{'-' * 8}:|{'-' * 9}:|{'-' * 15}:|{'-' * 15}:|")
    for privacy in args.privacy:
        mine = [r for r in results if r["privacy"] == privacy]
        base = mine[0].get("s_per_round", float("nan"))
        for r in mine:
            if "failed" in r:
                print(f"| {privacy:<8} | {r['population']:>13,} | failed: {r['failed']} |")
                continue
            print(
                f"| {privacy:<8} | {r['population']:>13,} | {r['s_per_round']:>7.3f} | {r['s_per_round'] / base:>7.2f}x"
                f" | {r['server_peak_rss_mb']:>14.0f} | {r['worker_peak_rss_mb']:>14.0f} |"
            )


if __name__ == "__main__":
    main()
