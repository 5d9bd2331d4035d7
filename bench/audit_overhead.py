"""Wall-time cost of the privacy audit at its default canary counts (issue: at most +20%).

Runs fedsim's default experiment (LEAF synthetic, 1,000 devices, Poisson cohorts of 50, MLP,
30 rounds) with user-level DP (DP-FedAvg, z=1) with and without `audit=user` (200 candidate
canary devices), and with sample-level DP (DP-SGD, sigma=1) with and without `audit=sample`
(200 canary examples on 10 canary devices), alternating the variants so machine load hits
both alike. Prints, per variant, the median process wall time (Ray start-up included), the
round loop's time (summary.json total_time_s), the audited/plain ratios, and the audit's own
share of the audited run (summary.json audit.audit_time_s over the loop plus the audit's
end-of-run scoring): the share is measured inside one run, so machine load hits both parts.

    python bench/audit_overhead.py              # 2 repetitions
    python bench/audit_overhead.py --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "user-level DP": ["privacy=dpfedavg"],
    "user-level DP + audit=user": ["privacy=dpfedavg", "audit=user"],
    "sample-level DP": ["privacy=dpsgd"],
    "sample-level DP + audit=sample": ["privacy=dpsgd", "audit=sample"],
}


def run_one(name: str, extra: list[str], workdir: Path, rep: int) -> tuple[float, float, float | None]:
    out = workdir / f"{name.replace(' ', '_').replace('=', '-')}_{rep}"
    cmd = [sys.executable, "-m", "fedsim", "output.progress=false", f"output.dir={out}", f"hydra.run.dir={out}",
           f"simulation.ray_temp_dir={workdir / 'ray'}", *extra]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    audit = summary.get("audit", {})
    # The audit's share of its run: its time over the loop plus its end-of-run scoring.
    share = audit["audit_time_s"] / (summary["total_time_s"] + audit["audit_scoring_time_s"]) if audit else None
    return wall, summary["total_time_s"], share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float, float | None]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="fedsim-audit-bench-") as tmp:
        for rep in range(args.reps):
            for name, extra in VARIANTS.items():
                times[name].append(run_one(name, extra, Path(tmp), rep))
                print(f"rep {rep}: {name}: wall {times[name][-1][0]:.1f} s, rounds {times[name][-1][1]:.1f} s", flush=True)
    print("\n| variant | process wall (s) | round loop (s) | wall vs plain | loop vs plain | audit share of its run |")
    print("|---|---:|---:|---:|---:|---:|")
    base: dict[str, tuple[float, float]] = {}
    for name in VARIANTS:
        wall = statistics.median(t[0] for t in times[name])
        loop = statistics.median(t[1] for t in times[name])
        plain = name.split(" + ")[0]
        if name == plain:
            base[plain] = (wall, loop)
            print(f"| {name} | {wall:.1f} | {loop:.1f} | 1.00x | 1.00x | - |")
        else:
            share = statistics.median(t[2] for t in times[name] if t[2] is not None)
            print(f"| {name} | {wall:.1f} | {loop:.1f} | {wall / base[plain][0]:.2f}x | {loop / base[plain][1]:.2f}x | {share:.1%} |")


if __name__ == "__main__":
    main()
