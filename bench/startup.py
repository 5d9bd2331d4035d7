"""Start-up: seconds from launching `fedsim` to the end of round 1, and to the command's exit.

Runs `fedsim rounds=1` (the default task, or with the given overrides) several times, each a
new process, and timestamps the command's output lines as they arrive: "round 1" is when
round 1's progress line appears (after round 1's evaluation), "exit" when the process ended.
Also prints round 1's own time (`round_time_s` of metrics.jsonl: Ray already up) and the
median of each column. Issue 18's target is a first round within 5 s on 2 cores.

`--against REV` also runs the code of another git revision of this repository (exported into a
temporary directory and put first on the import path, so it runs with this venv's packages),
one run of each in turn, so both see the same machine load; the README's before/after start-up
table compares HEAD with ecbce82 this way.

    python bench/startup.py                          # 5 runs of the default task
    python bench/startup.py --runs 6 --against ecbce82
    python bench/startup.py --runs 3 -- simulation.num_workers=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def export(rev: str, into: Path) -> Path:
    """The repository's files at `rev` (git archive), in `into`/src."""
    src = into / "src"
    src.mkdir(parents=True)
    archive = into / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(REPO), "archive", rev], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    return src


def launch_once(overrides: list[str], workdir: Path, timeout_s: float, code: Path | None = None) -> dict[str, float]:
    """One `fedsim rounds=1` process (with the code in `code` first on the import path, else
    this checkout's): seconds to round 1's line, to exit; round 1's own time."""
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "fedsim", "rounds=1", f"hydra.run.dir={run_dir}", f"simulation.ray_temp_dir={workdir / 'ray'}", *overrides]
    env = {**os.environ, "FLWR_LOG_LEVEL": "WARNING", "FLWR_TELEMETRY_ENABLED": "0"}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=code or REPO)
    round1 = None
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if round1 is None and "round 1/" in line:
            round1 = time.perf_counter() - started
    code = proc.wait(timeout=timeout_s)
    ended = time.perf_counter() - started
    if code != 0 or round1 is None:
        sys.exit(f"bench/startup.py: `{' '.join(cmd)}` failed (exit {code}):\n{''.join(lines[-20:])}")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"round1": round1, "exit": ended, "round1_own": float(metrics[0]["round_time_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it counts as failed")
    parser.add_argument("--against", metavar="REV", help="also run this git revision's code, interleaved")
    parser.add_argument("overrides", nargs="*", help="fedsim overrides (after --)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    print(f"fedsim rounds=1 {' '.join(args.overrides)}: {args.runs} runs, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedsim-startup-") as tmp:
        codes: dict[str, Path | None] = {"this checkout": None}
        if args.against:
            codes[args.against] = export(args.against, Path(tmp) / "against")
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in codes}
        print(f"{'code':<14} | {'run':>3} | {'round 1 ends (s)':>16} | {'round 1 own (s)':>15} | {'exit (s)':>8}")
        for i in range(args.runs):
            for name, code in codes.items():
                row = launch_once(args.overrides, Path(tmp), args.timeout, code)
                rows[name].append(row)
                print(f"{name:<14} | {i + 1:>3} | {row['round1']:>16.2f} | {row['round1_own']:>15.2f} | {row['exit']:>8.2f}", flush=True)
    for name, got in rows.items():
        med = {k: statistics.median(r[k] for r in got) for k in got[0]}
        print(f"{name:<14} | med | {med['round1']:>16.2f} | {med['round1_own']:>15.2f} | {med['exit']:>8.2f}")


if __name__ == "__main__":
    main()
