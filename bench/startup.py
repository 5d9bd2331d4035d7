"""Start-up: seconds from launching `fedsim` to the end of round 1, and to the command's exit.

Runs `fedsim rounds=1` (the default task, or with the given overrides) several times, each a
new process, and timestamps the command's output lines as they arrive: "round 1" is when
round 1's progress line appears (after round 1's evaluation), "exit" when the process ended.
Also prints round 1's own time (`round_time_s` of metrics.jsonl: the workers started) and the
median of each column. Issue 18's target is a first round within 5 s on 2 cores.

`--against REV` also runs the code of another git revision of this repository (exported into a
temporary directory and put first on the import path, so it runs with this venv's packages),
one run of each in turn, so both see the same machine load; the README's before/after start-up
table compares HEAD with ecbce82 this way.

`--phases` measures instead the parts of the start that fedsim changed, each in a new process,
fedsim's way and the way it was done before, in turn (`PHASES`; medians and ranges):
- torch: `import torch` alone (what every process pays; the floor of the rest);
- worker import: what a Ray worker imports before its first job, after torch: fedsim's preload
  (`fedsim.ray_worker`: `flwr.simulation` as a lazy package) then Flower's actor module, against
  the actor module through Flower's whole `flwr.simulation` package then fedsim's ClientApp;
  seconds and the growth of the process's peak memory;
- launcher import: Flower's simulation launcher as fedsim.run imports it, after torch and Ray
  (`flower_adapter.lean_launcher_imports`: no SQLAlchemy, Alembic, FastAPI application layer or
  pydantic) against a plain import;
- ray.init: a local 2-CPU cluster as fedsim starts it (`fedsim.run._lean_head`: no API server,
  autoscaler monitor or log monitor) against Ray's defaults with the same arguments;
- first grad: the first `torch.func.grad` of a small model, with fedsim's dynamo-free
  `_autograd_grad` (`clients.vectorized`) against torch's own (which imports torch._dynamo);
- FEMNIST load: the bundled FEMNIST (105 writers) loaded once the parsed cache holds it
  (`fedsim.data.parsed_cache`, warmed in the same process first) against parsing its JSON
  (`FEDSIM_CACHE_DIR=none`), as every process of a run did.

    python bench/startup.py                          # 5 runs of the default task
    python bench/startup.py --runs 6 --against ecbce82
    python bench/startup.py --runs 3 -- simulation.num_workers=1
    python bench/startup.py --phases --runs 4
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


# Each phase: (fedsim's way, the way before), snippets run in a new process after PRELUDE; a
# snippet measures its own part between mark() and done() and prints one JSON line.
PRELUDE = """
import json, resource, sys, time
def mark():
    global _t, _m
    _t, _m = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def done():
    m = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"s": time.perf_counter() - _t, "mb": (m - _m) / 1024}))
"""
RAY_INIT = """
import tempfile, ray
tmp = tempfile.mkdtemp(prefix="fedsim-phase-")
args = dict(num_cpus=2, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING", log_to_driver=False)
mark()
{start}
done()
ray.shutdown()
"""
GRAD = """
import torch
from torch._functorch import eager_transforms
torch_own = eager_transforms._autograd_grad
import clients.vectorized
{restore}
model = torch.nn.Sequential(torch.nn.Linear(60, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
params = dict(model.named_parameters())
x, y = torch.randn(10, 60), torch.randint(0, 10, (10,))
loss = lambda p: torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)
mark()
torch.func.grad(loss)(params)
done()
"""
FEMNIST = """
import os, tempfile
os.environ["FEDSIM_CACHE_DIR"] = {cache}
from fedsim.config import FemnistConfig
from fedsim.data import load_dataset
{warm}
mark()
load_dataset(FemnistConfig(), population=105, seed=0)
done()
"""
PHASES: dict[str, tuple[str, str]] = {
    "torch": ("mark()\nimport torch\ndone()", "mark()\nimport torch\ndone()"),
    "worker import": (
        "import torch\nmark()\nimport fedsim.ray_worker\nimport flwr.simulation.ray_transport.ray_actor\ndone()",
        "import torch\nmark()\nimport flwr.simulation.ray_transport.ray_actor\nimport fedsim.client_app\ndone()",
    ),
    "launcher import": (  # Flower's launcher as fedsim.run imports it, after torch and Ray
        "import torch, ray\nfrom fedsim.flower_adapter import lean_launcher_imports\nmark()\n"
        "with lean_launcher_imports():\n    from flwr.simulation import run_simulation\ndone()",
        "import torch, ray\nmark()\nfrom flwr.simulation import run_simulation\ndone()",
    ),
    "ray.init": (
        RAY_INIT.format(start="from fedsim.run import _lean_head\nwith _lean_head(log_monitor=False):\n    ray.init(**args)"),
        RAY_INIT.format(start="ray.init(**args)"),
    ),
    "first grad": (GRAD.format(restore=""), GRAD.format(restore="eager_transforms._autograd_grad = torch_own")),
    "FEMNIST load": (
        FEMNIST.format(cache="tempfile.mkdtemp()", warm="load_dataset(FemnistConfig(), population=105, seed=0)"),
        FEMNIST.format(cache="'none'", warm=""),
    ),
}


def phase_once(snippet: str, timeout_s: float) -> dict[str, float]:
    """Seconds and peak-memory growth (MB) of one phase snippet, in a new process."""
    env = {**os.environ, "FLWR_LOG_LEVEL": "WARNING", "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PRELUDE + snippet], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout_s)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"bench/startup.py: a phase failed (exit {proc.returncode}):\n{snippet}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def phases(runs: int, timeout_s: float) -> None:
    """The `--phases` table: each phase fedsim's way and the way before, in turn, `runs` times."""
    print(f"phases of the start: {runs} runs each, {os.cpu_count()} CPUs; median (min-max)", flush=True)
    print(f"{'phase':<16} | {'fedsim (s)':>20} | {'before (s)':>20} | {'fedsim MB':>9} | {'before MB':>9}")
    for name, (ours, before) in PHASES.items():
        got: dict[str, list[dict[str, float]]] = {"ours": [], "before": []}
        for _ in range(runs):
            got["ours"].append(phase_once(ours, timeout_s))
            got["before"].append(phase_once(before, timeout_s))

        def cell(rows: list[dict[str, float]]) -> str:
            v = [r["s"] for r in rows]
            return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"

        mb = {k: statistics.median(r["mb"] for r in v) for k, v in got.items()}
        print(f"{name:<16} | {cell(got['ours']):>20} | {cell(got['before']):>20} | {mb['ours']:>9.0f} | {mb['before']:>9.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it counts as failed")
    parser.add_argument("--against", metavar="REV", help="also run this git revision's code, interleaved")
    parser.add_argument("--phases", action="store_true", help="measure the start's phases instead (see above)")
    parser.add_argument("overrides", nargs="*", help="fedsim overrides (after --)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.phases:
        if args.against or args.overrides:
            parser.error("--phases takes neither --against nor overrides")
        phases(args.runs, args.timeout)
        return
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
