"""Seconds per round: fedsim against pfl-research (Apple's simulator) and a plain loop (the floor).

Every workload trains the same model on the same per-device arrays with the same cohorts in
three ways, each in its own process (so each one's peak memory is its own):

- fedsim: `python -m fedsim <overrides>` (like bench/population.py), with
  `simulation.num_workers=2` (one worker process per core on this 2-core machine) and again with
  `simulation.num_workers=1`; times from metrics.jsonl (`round_time_s`), memory from
  summary.json (`server_peak_rss_mb`) and the largest `worker_peak_rss_mb` in metrics.jsonl.
- pfl: pfl 0.6.0's `FederatedAveraging` on its `SimulatedBackend` with a `PyTorchModel`, in one
  process ("pfl", 1 core) and in two processes joined by torch.distributed/gloo the way pfl
  distributes a simulation ("pfl x2", `PFL_WORKER_ADDRESSES` + `PFL_WORKER_RANK`, 2 cores).
  Rounds are timed by a pfl callback (`after_central_iteration`). Optional: without pfl
  installed the script says so in one line and leaves its rows out.
- floor: a loop with no framework, one process, one torch thread: for each device of the
  round, load its data, copy the global weights into the model, run torch SGD over its
  shuffled batches, take local minus global weights, and FedAvg the updates (float64 sum in
  device-id order, weighted by examples, then global += mean). What any simulator must at
  least do; fedsim/floor is fedsim's overhead.

All runners: 1 torch thread per process; the fedsim config (Hydra, conf/) is composed in the
pfl and floor processes from the same overrides, so `fedsim.data.load_dataset` gives them the
same per-device arrays (`dataset.device_data(i)`, on demand, as fedsim's workers load them)
and `fedsim.models.model_for` the same initial weights; every runner trains round r's
cohort `fedsim.sampling.sample_cohort(seed, r)` (fixed size 50, distinct devices). Device
updates per second = devices trained per round / seconds per round. Memory, three ways: "peak
MB" = the sum over a runner's processes of their own peak RSS (`ru_maxrss`); for fedsim, server +
workers x the largest worker peak (as they report it: not its worker template, nor Ray's
daemons); "tree RSS" and "tree PSS" = the largest total RSS and PSS of the runner's whole process
tree at one time, sampled every 0.1 s from /proc (`TreeMemory`: the template and Ray's daemons
included). RSS counts a page shared by several processes in each (shared libraries; fedsim's
workers are forked from one template and share its pages), PSS divides it among them: the PSS
total is what the runner takes from the machine, and "PSS/pfl" compares it with pfl's on the
same cores.

`--repeat N` runs each workload's runners N times in turn (fedsim w=2, w=1, pfl, pfl x2, floor,
then again), so that a slower minute of a shared machine falls on every runner alike; each row
is the repeat with the median seconds per round, and every repeat's value is printed under
the table (one run gave the CNN's one-worker round 0.90x the floor and the next 1.10x).

Steady-state seconds per round = median of the round times of rounds 3..N-1: the first two
rounds warm up (worker processes start, lazy imports, first allocations), and fedsim's last round
also runs its final central evaluation (fedsim always evaluates after the last round), which
pfl and the floor do not do, so round N is left out for every runner. Hence --rounds >= 4.
"round 1" is the first round's time apart (fedsim: the worker processes' start, imports and
set-up fall in it), and "launch" (fedsim only) the seconds from starting the fedsim command to
the end of round 1, Python, Hydra, the data and the workers' start included (README
"Start-up"). fedsim runs with its defaults: on this one Linux machine its workers are local
processes forked from one template (`simulation.backend=auto`); pass
`--fedsim-override simulation.backend=ray` for Ray's.

Workloads (`--workloads`, default all; cohort 50, 1 local epoch, batch 10, seed 0, FedAvg):

- mlp: pfl's speed-benchmark shape, 1,000 devices x 50 examples, MLP 60-32-10 (2,282
  parameters), lr 0.1. fedsim's default synthetic dataset (LEAF recipe, 60 features, 10
  classes) with `dataset.examples_per_device=56`: LEAF's split holds out 10% of each device
  for the central test set, floor(0.9 x 56) = 50, so every device trains on exactly 50
  examples (with 50, as bench/population.py uses, devices train on 45).
- cnn: fedsim's CNN (conf/model/cnn.yaml as conf/experiment/femnist_fedavg.yaml uses it: 5x5
  convs with 32 and 64 channels, GroupNorm(8), dense 256; 857,930 parameters for 28x28x1
  and 10 classes), lr 0.05 (femnist_fedavg's), on Fashion-MNIST from
  /usr/share/datasets/fashion-mnist, iid partition. Its 60,000 training images over 1,000
  devices would give 60 per device, so the population is 1,200: exactly 50 images per device
  (5 steps of batch 10, as in mlp); the population size does not change per-round cost
  (see pop10k/pop100k). `dataset.max_test_examples=1000` keeps fedsim's final evaluation short.
- mlp_dp: mlp with DP, two variants.
  user: user-level DP-FedAvg with a fixed noise multiplier z = 1 and clip C = 1: fedsim
  `privacy=dpfedavg` (devices clip their update to C, the server adds N(0, (zC)^2) to the sum
  and divides by the expected cohort size, 50; `accountant=rdp`, the one fedsim allows with
  fixed-size cohorts, and epsilon is computed every round); pfl
  `CentrallyAppliedPrivacyMechanism(GaussianMechanism(clipping_bound=1, relative_noise_stddev=1))`
  with `WeightByUser` (clip each update, sum, add N(0, (zC)^2), divide by the number of users,
  50); the floor: the loop + per-device clip + Gaussian noise on the sum / 50.
  sample: sample-level DP-SGD with sigma = 1, C = 1 per example: fedsim `privacy=dpsgd`
  (Opacus, Poisson batches with q = 1/ceil(n/B), per-device RDP ledger on the server); the
  floor: the same DP-SGD written out with torch.func (vmap of per-example gradients, clip,
  sum, noise, divide by q n). pfl 0.6.0 has no per-example DP-SGD (its DP mechanisms act on
  the whole update), so this variant has no pfl row.
- pop10k, pop100k: mlp at populations 10,000 and 100,000 (cohort still 50).
- cohort1000: mlp with 1,000 devices per round of a population of 100,000 (the cohort size
  of production keyboard-model training; fedsim's workers train their 16 groups of 31-32
  devices each as batched computations and ship one float64 sum per group).
- shakespeare: next-character prediction on the bundled Tiny Shakespeare, one device per
  speaking role (141 roles with at least 1,000 characters), LEAF's LSTM (embedding 8, 2 x
  LSTM 256; 820,185 parameters), 80-character windows labelled with the next character (LEAF's
  recipe, `dataset.targets=last`), lr 0.8 (LEAF's); each device's training windows evenly
  thinned to 50 (`dataset.max_train_windows=50`: 5 steps of batch 10, as in mlp and cnn),
  central test set thinned to 500 windows. fedsim trains the LSTM one device at a time
  (`simulation.vectorize=auto`: nn.LSTM's fused kernel has no batching rule), as do pfl and
  the floor.

Commands (the exact fedsim command lines: `python bench/speed.py --print-commands`):

    python bench/speed.py                                   # every workload, 12 rounds
    python bench/speed.py --workloads mlp cnn --rounds 20 --json speed.json
    python bench/speed.py --runners fedsim fedsim1 floor    # leave pfl out
    python bench/speed.py --fedsim-override simulation.vectorize=on   # to every fedsim run

e.g. mlp, fedsim with 2 workers (output.* and hydra.run.dir point into a temporary directory):

    python -m fedsim seed=0 rounds=12 cohort.size=50 cohort.sampling=fixed algorithm.local_epochs=1
        algorithm.batch_size=10 eval_every=1000 population=1000 dataset=synthetic
        dataset.examples_per_device=56 model=mlp 'model.hidden_sizes=[32]' algorithm.lr=0.1
        simulation.num_workers=2

The ratio columns divide a fedsim row's seconds per round by pfl's with as many processes as
fedsim has workers (fedsim w=2 / pfl x2, fedsim w=1 / pfl) and by the floor's (always one
core), within the same workload and DP variant. "acc" is the final central test accuracy of
each runner's model (fedsim's own final evaluation; pfl's and the floor's model evaluated on
the same test set after the timed rounds): a check that every runner trained the same thing.
Plain FedAvg: fedsim and the floor make the same updates (same seeds, same shuffles), so their
accuracy agrees to float rounding; pfl's differs a little (see below).

Installing pfl: pfl 0.6.0 pins dp-accounting<0.6 (and through it absl-py~=1.0) and
wheel<0.46, so a plain `pip install pfl==0.6.0` (or `pip install -e ".[bench]"`) downgrades
dp-accounting 0.6.0 -> 0.5.1 and absl-py 2.5.1 -> 1.4.0 under fedsim's PLD accounting. pfl
runs with dp-accounting 0.6.0 (pfl.privacy imports it; the simulation here and, in a smoke
test, pfl's PLD/RDP/PRV accountants work), so install it without the resolver:

    .venv/bin/pip install --no-deps pfl==0.6.0 prv-accountant==0.2.0

prv-accountant (needs only numpy and scipy) is the one run-time dependency of pfl the venv
lacked; wheel is not needed to run; pfl's `pytorch` extra only asks for torch. torch, numpy,
flwr, opacus, ray and dp-accounting stay as they were; `pip check` then reports pfl's
dp-accounting pin and the missing wheel. The `bench` extra in pyproject.toml names the same
packages, with this command in its comment.

Fair and unfair points that remain:
- Sampling: pfl's own user samplers are `random` (uniform *with* replacement: a device can
  appear twice in a cohort) and `minimize_reuse` (round robin over the ids); here pfl is given
  fedsim's cohorts through its `user_sampler` callable, so all runners train the same devices.
- Data: every runner loads each device's data when it trains it, as fedsim's workers do
  (synthetic: generated from the device's seed, about 70 us per device, under a tenth of the
  floor's mlp time; Fashion-MNIST: a slice, about 20 us); pfl's usual in-memory
  `FederatedDataset.from_slices` would skip that, at 1.2 GB for pop100k.
- Local data order: pfl iterates a device's examples in stored order (no shuffling, batches
  cached per dataset object); fedsim and the floor draw a seeded permutation per epoch, a
  few microseconds per device. pfl's model therefore differs slightly from the other two.
- Work done besides training: fedsim serializes weights and updates into Flower messages,
  sends them to its worker processes over sockets, checks every update for NaN/inf (worker and server), and with DP computes
  epsilon every round (user-level RDP; with DP-SGD, every device's ledger); pfl with a fixed
  noise multiplier does no accounting, and neither does the floor. pfl with world size 1 does
  no communication at all; pfl x2 all-reduces the summed update over gloo once per round.
- DP semantics: pfl's central Gaussian mechanism divides the noised sum by the number of
  users that contributed (here always 50); fedsim by the expected cohort size (50), so with
  fixed cohorts and no failures they are the same computation. Accounting differs (fedsim:
  fixed-size cohorts under replace-one adjacency, z/2 in RDP; pfl's accountants assume Poisson
  sampling) but no epsilon is compared here.
- pfl's per-round metric printing (its generic platform writes every metric to stdout every
  round) is turned off (`send_metrics_to_platform=False`); pfl's central evaluation is off
  (its per-user evaluation in the first iteration falls in the warm-up rounds).
- Cores: fedsim w=2 and pfl x2 use both cores, fedsim w=1 uses one core for training plus a
  server process (the server mostly waits), pfl and the floor use one. fedsim w=2 against the
  one-core floor can therefore be below 1. Two-process runners (fedsim w=2, pfl x2) wait for
  their slowest process every round, so they suffer most from anything else running on the
  machine: measure on an idle machine.
- Memory: fedsim runs a server, a worker template and its workers, each with torch and Flower
  (the workers share the template's pages), so its totals are above a single pfl or floor
  process; "peak MB" is a sum of peaks, which need not coincide in time; the tree columns are
  totals at one time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the parent process never imports torch or fedsim: its children do the work
    import torch

    from fedsim.config import FedsimConfig
    from fedsim.data import FederatedDataset

REPO = Path(__file__).resolve().parent.parent
COHORT = 50
WARMUP_ROUNDS = 2

# Every run of every workload: fixed cohorts (of 50 but in cohort1000), one local epoch of SGD
# with batch 10, no central evaluation before the last round.
COMMON = (
    "seed=0", "cohort.sampling=fixed", "algorithm.local_epochs=1",
    "algorithm.batch_size=10", "eval_every=1000",
)  # fmt: skip
MLP = (
    "dataset=synthetic", "dataset.examples_per_device=56", "model=mlp", "model.hidden_sizes=[32]",
    "algorithm.lr=0.1",
)  # fmt: skip
SHAKESPEARE = (
    "dataset=shakespeare", "dataset.max_train_windows=50", "dataset.max_test_examples=500", "model=lstm",
    "algorithm.lr=0.8",
)  # fmt: skip
CNN = (
    "dataset=fashion_mnist", "dataset.path=/usr/share/datasets/fashion-mnist", "dataset.partition=iid",
    "dataset.max_test_examples=1000", "model=cnn", "model.cnn_channels=[32,64]", "model.cnn_dense=256",
    "model.norm_groups=8", "algorithm.lr=0.05",
)  # fmt: skip

# DP variants: the privacy overrides of fedsim; the pfl and floor processes read z, C and sigma
# from the composed config.
VARIANTS: dict[str, tuple[str, ...]] = {
    "-": (),
    "user": (
        "privacy=dpfedavg", "privacy.dpfedavg.noise_multiplier=1.0", "privacy.dpfedavg.clip_norm=1.0",
        "privacy.dpfedavg.accountant=rdp",
    ),
    "sample": ("privacy=dpsgd", "privacy.dpsgd.noise_multiplier=1.0", "privacy.dpsgd.max_grad_norm=1.0"),
}  # fmt: skip


@dataclass(frozen=True)
class Workload:
    name: str
    population: int
    overrides: tuple[str, ...]
    variants: tuple[str, ...] = ("-",)
    cohort: int = COHORT

    def fedsim_overrides(self, variant: str, rounds: int) -> list[str]:
        """The run's fedsim config: the same for fedsim's command line and the pfl/floor processes."""
        return [*COMMON, f"cohort.size={self.cohort}", f"rounds={rounds}", f"population={self.population}",
                *self.overrides, *VARIANTS[variant]]  # fmt: skip


WORKLOADS = {
    w.name: w
    for w in (
        Workload("mlp", 1_000, MLP),
        Workload("cnn", 1_200, CNN),
        Workload("mlp_dp", 1_000, MLP, ("user", "sample")),
        Workload("pop10k", 10_000, MLP),
        Workload("pop100k", 100_000, MLP),
        Workload("cohort1000", 100_000, MLP, cohort=1_000),
        Workload("shakespeare", 141, SHAKESPEARE),
    )
}


@dataclass(frozen=True)
class Runner:
    name: str
    label: str
    kind: str  # "fedsim" | "pfl" | "floor"
    processes: int  # fedsim: workers (plus the server process); pfl: torch.distributed world size


RUNNERS = {
    r.name: r
    for r in (
        Runner("fedsim", "fedsim w=2", "fedsim", 2),
        Runner("fedsim1", "fedsim w=1", "fedsim", 1),
        Runner("pfl", "pfl", "pfl", 1),
        Runner("pfl2", "pfl x2", "pfl", 2),
        Runner("floor", "floor", "floor", 1),
    )
}


@dataclass
class Measured:
    """What one runner's process(es) report: per-round times and devices, peak RSS per process."""

    round_times: list[float]
    devices: list[int]
    rss_mb: list[float]
    final_test_accuracy: float | None = None
    launch_to_round_1_s: float | None = None  # fedsim: from starting the command to round 1's metrics line
    tree_rss_mb: float | None = None  # TreeMemory: the process tree's largest total RSS at one time
    tree_pss_mb: float | None = None  # and its largest total PSS


@dataclass
class Row:
    workload: str
    variant: str
    runner: str
    cores: int
    s_per_round: float | None = None
    first_round_s: float | None = None  # round 1's own time (fedsim: the workers' start included, Ray already up)
    launch_to_round_1_s: float | None = None  # fedsim: from the command's start to the end of round 1
    updates_per_s: float | None = None
    peak_mb: float | None = None
    peak_detail: str = ""
    tree_rss_mb: float | None = None
    tree_pss_mb: float | None = None
    final_test_accuracy: float | None = None
    vs_pfl: float | None = None
    vs_floor: float | None = None
    pss_vs_pfl: float | None = None  # tree PSS against pfl's with the same cores
    round_times: list[float] = field(default_factory=list)
    error: str = ""
    repeats: list[float | None] = field(default_factory=list)  # --repeat: s/round of each repeat, in order


# ----------------------------------------------------------------------------- fedsim runs


def fedsim_command(workload: Workload, variant: str, runner: Runner, rounds: int, out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "fedsim", *workload.fedsim_overrides(variant, rounds),
        f"simulation.num_workers={runner.processes}", "output.progress=false", "output.save_model=false",
        f"output.dir={out}", f"hydra.run.dir={out}", f"simulation.ray_temp_dir={out.parent / 'ray'}", *extra,
    ]  # fmt: skip


def run_fedsim(cmd: list[str], out: Path, timeout: float) -> Measured:
    launch_to_round_1, memory = _run_checked(cmd, timeout, watch=out / "metrics.jsonl")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    workers = int(summary.get("num_workers") or 1)
    worker_peak = max(r["worker_peak_rss_mb"] for r in rows)
    return Measured(
        round_times=[r["round_time_s"] for r in rows],
        devices=[r["devices_trained"] for r in rows],
        rss_mb=[summary["server_peak_rss_mb"], *[worker_peak] * workers],
        final_test_accuracy=summary.get("final_test_accuracy"),
        launch_to_round_1_s=launch_to_round_1,
        tree_rss_mb=memory.rss_mb,
        tree_pss_mb=memory.pss_mb,
    )


# ----------------------------------------------------------------------------- pfl and floor (parent side)


def child_command(runner: str, workload: Workload, variant: str, rounds: int, out: Path) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--child", runner, "--workloads", workload.name,
        "--variant", variant, "--rounds", str(rounds), "--out", str(out),
    ]  # fmt: skip


def run_children(runner: Runner, workload: Workload, variant: str, rounds: int, workdir: Path, timeout: float) -> Measured:
    """Start the runner's process(es) (pfl x2: two ranks on loopback) and read their reports."""
    outs = [workdir / f"rank{rank}.json" for rank in range(runner.processes)]
    env = dict(os.environ)
    if runner.processes > 1:
        env["PFL_WORKER_ADDRESSES"] = ",".join(f"localhost:{port}" for port in _free_ports(runner.processes))
    logs = [workdir / f"rank{rank}.log" for rank in range(runner.processes)]
    procs = []
    for rank, (out, log) in enumerate(zip(outs, logs)):
        if runner.processes > 1:
            env = {**env, "PFL_WORKER_RANK": str(rank)}
        cmd = child_command(runner.kind, workload, variant, rounds, out)
        with log.open("w") as sink:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT))
    memory = TreeMemory([p.pid for p in procs])
    # Poll all ranks: one that fails leaves the other waiting for it in torch.distributed.
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(codes) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    memory.stop()
    failed = [log for p, log in zip(procs, logs) if p.returncode]  # exited with an error by itself
    running = [p for p in procs if p.returncode is None]
    for p in running:
        p.kill()
        p.wait()
    if failed:
        raise RuntimeError(_last_lines(failed[0].read_text()))
    if running:
        raise RuntimeError(f"timed out after {timeout:.0f} s")
    reports = [json.loads(out.read_text()) for out in outs]
    head = reports[0]
    return Measured(
        round_times=head["round_times"],
        devices=head["devices"],
        rss_mb=[mb for r in reports for mb in r["rss_mb"]],
        final_test_accuracy=head["final_test_accuracy"],
        tree_rss_mb=memory.rss_mb,
        tree_pss_mb=memory.pss_mb,
    )


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TreeMemory:
    """Samples, every `interval` s while a runner runs, the memory of its process tree (the
    processes it started and everything below them, from /proc): the largest total RSS and the
    largest total PSS seen at one time. RSS counts a page shared by several processes (a
    library's code, fedsim's workers forked from one template) in each of them; PSS divides it
    among them, so the PSS total is the memory the runner takes from the machine."""

    def __init__(self, roots: list[int], interval: float = 0.1) -> None:
        self.roots, self.interval = roots, interval
        self.rss_mb = self.pss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                except OSError:
                    continue
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
        found, todo = [], list(self.roots)
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = pss = 0
            for pid in self._tree():
                try:
                    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Rss:"):
                            rss += int(line.split()[1])
                        elif line.startswith("Pss:"):
                            pss += int(line.split()[1])
                except (OSError, ValueError, IndexError):
                    continue  # ended meanwhile
            self.pss_mb = max(self.pss_mb, pss / 1024)
            self.rss_mb = max(self.rss_mb, rss / 1024)


def _run_checked(cmd: list[str], timeout: float, watch: Path | None = None) -> tuple[float | None, TreeMemory]:
    """Run `cmd`; RuntimeError if it fails or times out. Returns the seconds from starting the
    command to the first complete line of `watch` (a metrics.jsonl: the end of round 1, Python,
    Hydra, data and the workers' start included; polled every 10 ms; None without `watch`) and
    the memory of the command's process tree (`TreeMemory`)."""
    started = time.perf_counter()
    first: float | None = None
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        memory = TreeMemory([proc.pid])
        try:
            while proc.poll() is None:
                if time.perf_counter() - started > timeout:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError(f"timed out after {timeout:.0f} s")
                if watch is not None and first is None and watch.exists() and watch.read_text().endswith("\n"):
                    first = time.perf_counter() - started
                time.sleep(0.01)
        finally:
            memory.stop()
        log.seek(0)
        if proc.returncode:
            raise RuntimeError(_last_lines(log.read()))
    return first, memory


def _last_lines(output: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "exited with an error and no output"


def pfl_missing() -> str | None:
    """None if pfl (with its PyTorch backend) imports in this interpreter, else the reason."""
    probe = subprocess.run(
        [sys.executable, "-c", "import pfl.model.pytorch, pfl.privacy, pfl.aggregate.simulate"],
        capture_output=True, text=True,
    )  # fmt: skip
    if probe.returncode == 0:
        return None
    return _last_lines(probe.stderr, 1)


# ----------------------------------------------------------------------------- child processes


def child_main(args: argparse.Namespace) -> None:
    """Run one pfl rank or the floor for one workload; write its Measured (JSON) to --out."""
    import torch

    workload = WORKLOADS[args.workloads[0]]
    cfg = compose(workload.fedsim_overrides(args.variant, args.rounds))
    torch.set_num_threads(cfg.simulation.torch_threads)
    from fedsim.data import load_dataset
    from fedsim.models import model_for

    dataset = load_dataset(cfg.dataset, population=cfg.population, seed=cfg.seed)
    model = model_for(cfg, dataset)
    if args.child == "pfl":
        measured = run_pfl(cfg, dataset, model, args.variant)
    else:
        measured = run_floor(cfg, dataset, model, args.variant)
    from clients import evaluate

    measured.final_test_accuracy = evaluate(model, dataset.test_data())["accuracy"]
    measured.rss_mb = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    Path(args.out).write_text(json.dumps(asdict(measured)))


def compose(overrides: list[str]) -> FedsimConfig:
    """fedsim's validated config for these overrides, composed the way `python -m fedsim` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fedsim.__main__ import CONF_DIR, config_from_hydra

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return config_from_hydra(hydra_compose(config_name="config", overrides=overrides))


def cohorts(cfg: FedsimConfig) -> Iterator[list[int]]:
    """fedsim's cohort of round 1, 2, ...: the same devices for every runner."""
    from fedsim import randomness
    from fedsim.sampling import sample_cohort

    streams = randomness.streams(cfg)
    for round_num in itertools.count(1):
        yield sample_cohort(
            population=cfg.population, cohort_size=cfg.cohort.size, method=cfg.cohort.sampling,
            rng=streams.numpy("cohort", round_num),
        )  # fmt: skip


def run_pfl(cfg: FedsimConfig, dataset: FederatedDataset, net: torch.nn.Module, variant: str) -> Measured:
    """pfl 0.6.0: FederatedAveraging on a SimulatedBackend, timed by a callback per central iteration."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from pfl.aggregate.base import get_num_devices_weight_name
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints, WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.common_types import Population
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset as PflFederatedDataset
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted, get_overall_value
    from pfl.model.pytorch import PyTorchModel
    from pfl.postprocessor.base import Postprocessor
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism

    if variant == "sample":
        raise SystemExit("pfl 0.6.0 has no per-example DP-SGD")

    class Module(torch.nn.Module):
        """pfl's PyTorchModel wants `loss` and `metrics` on the module."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

        def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.inner(x), y)

        @torch.no_grad()
        def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Weighted]:
            out = self.inner(x)
            n = len(y)
            return {
                "loss": Weighted(F.cross_entropy(out, y, reduction="sum").item(), n),
                "accuracy": Weighted((out.argmax(-1) == y).sum().item(), n),
            }

    class RoundTimer(TrainingProcessCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.devices: list[int] = []
            self._last = 0.0

        def on_train_begin(self, *, model: Any) -> Metrics:
            self._last = time.perf_counter()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics: Metrics, model: Any, *, central_iteration: int) -> tuple[bool, Metrics]:
            now = time.perf_counter()
            self.times.append(now - self._last)
            self._last = now
            # Users trained this round, summed over ranks (pfl all-reduces the metrics).
            self.devices.append(int(get_overall_value(aggregate_metrics[get_num_devices_weight_name(Population.TRAIN)])))
            return False, Metrics()

    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # pfl calls the user sampler once per cohort slot (world_size times per slot, each rank
    # keeping its own), so a stream of fedsim's cohorts gives every rank the same sequence.
    stream = itertools.chain.from_iterable(cohorts(cfg))
    federated = PflFederatedDataset(
        make_dataset_fn=lambda device: Dataset(dataset.device_data(device), user_id=device),
        user_sampler=lambda: next(stream),
    )
    module = Module(net)
    params = [p for p in module.parameters() if p.requires_grad]
    model = PyTorchModel(
        model=module, local_optimizer_create=torch.optim.SGD, central_optimizer=torch.optim.SGD(params, lr=1.0)
    )
    postprocessors: list[Postprocessor]
    if variant == "user":
        user = cfg.privacy.dpfedavg
        assert user is not None
        gaussian = GaussianMechanism(clipping_bound=user.clip_norm, relative_noise_stddev=user.noise_multiplier)
        postprocessors = [WeightByUser(), CentrallyAppliedPrivacyMechanism(gaussian)]
    else:
        postprocessors = [WeightByDatapoints()]
    backend = SimulatedBackend(training_data=federated, val_data=federated, postprocessors=postprocessors)
    timer = RoundTimer()
    algo = cfg.algorithm
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=cfg.rounds, evaluation_frequency=cfg.rounds + 1,
            train_cohort_size=cfg.cohort.size, val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=algo.lr, local_num_epochs=algo.local_epochs, local_batch_size=algo.batch_size,
        ),
        callbacks=[timer],
        send_metrics_to_platform=False,  # pfl's generic platform would print every metric every round
    )  # fmt: skip
    return Measured(round_times=timer.times, devices=timer.devices, rss_mb=[])


def run_floor(cfg: FedsimConfig, dataset: FederatedDataset, model: torch.nn.Module, variant: str) -> Measured:
    """The plain loop: per device, load data, SGD from the global weights, FedAvg the updates."""
    import torch

    from clients import seed_generator

    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    global_flat = torch.cat([p.detach().reshape(-1) for p in params])
    generator = torch.Generator()
    user = cfg.privacy.dpfedavg if variant == "user" else None
    train = dpsgd_floor if variant == "sample" else sgd_floor
    local_train = train(cfg, model, params, generator)
    times: list[float] = []
    devices: list[int] = []
    for round_num, cohort in zip(range(1, cfg.rounds + 1), cohorts(cfg)):
        start = time.perf_counter()
        total = torch.zeros(global_flat.numel(), dtype=torch.float64)
        weight = 0.0
        for device in cohort:
            x, y = dataset.device_data(device)
            with torch.no_grad():
                for p, g in zip(params, global_flat.split(sizes)):
                    p.copy_(g.view_as(p))
            seed_generator(generator, (cfg.seed, round_num, device))
            local_train(x, y)
            update = torch.cat([p.detach().reshape(-1) for p in params]).sub_(global_flat).double()
            if user is not None:
                update.mul_(min(1.0, user.clip_norm / max(float(update.norm()), 1e-12)))
                w = 1.0
            else:
                w = float(len(y))
            total.add_(update, alpha=w)
            weight += w
        if user is not None:
            seed_generator(generator, (cfg.seed, round_num))
            noise = torch.normal(0.0, user.noise_multiplier * user.clip_norm, (total.numel(),), generator=generator)
            mean = (total + noise.double()) / cfg.cohort.size
        else:
            mean = total / weight
        global_flat = global_flat + mean.float()
        times.append(time.perf_counter() - start)
        devices.append(len(cohort))
    with torch.no_grad():
        for p, g in zip(params, global_flat.split(sizes)):
            p.copy_(g.view_as(p))
    return Measured(round_times=times, devices=devices, rss_mb=[])


def sgd_floor(
    cfg: FedsimConfig, model: torch.nn.Module, params: list[torch.nn.Parameter], generator: torch.Generator
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Local SGD as fedsim runs it: per epoch a seeded permutation, batches in that order."""
    import torch
    import torch.nn.functional as F

    algo = cfg.algorithm
    b = algo.batch_size
    optimizer = torch.optim.SGD(params, lr=algo.lr)

    def local_train(x: torch.Tensor, y: torch.Tensor) -> None:
        n = len(y)
        for _ in range(algo.local_epochs):
            order = torch.randperm(n, generator=generator)
            xs, ys = x[order], y[order]
            for start in range(0, n, b):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(xs[start : start + b]), ys[start : start + b]).backward()
                optimizer.step()

    return local_train


def dpsgd_floor(
    cfg: FedsimConfig, model: torch.nn.Module, params: list[torch.nn.Parameter], generator: torch.Generator
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """DP-SGD (Abadi et al. 2016) as fedsim runs it: Poisson batches with q = 1/ceil(n/B), for
    epochs x ceil(n/B) steps; per-example gradients (torch.func) clipped to C, summed, plus
    N(0, (sigma C)^2), divided by the expected batch q n; then an SGD step."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    dp = cfg.privacy.dpsgd
    assert dp is not None and dp.noise_multiplier is not None
    sigma, clip = dp.noise_multiplier, dp.max_grad_norm
    algo = cfg.algorithm
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def example_loss(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, weights, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def local_train(x: torch.Tensor, y: torch.Tensor) -> None:
        n = len(y)
        batches = math.ceil(n / algo.batch_size)
        q = 1.0 / batches
        for _ in range(algo.local_epochs * batches):
            picked = (torch.rand(n, generator=generator) < q).nonzero().view(-1)
            if len(picked):
                weights = {name: p.detach() for name, p in zip(names, params)}
                grads = per_example(weights, x[picked], y[picked])
                norms = torch.sqrt(sum(grads[name].flatten(1).pow(2).sum(1) for name in names))
                factor = (clip / (norms + 1e-6)).clamp(max=1.0)
                summed = [torch.einsum("i,i...->...", factor, grads[name]) for name in names]
            else:
                summed = [torch.zeros_like(p) for p in params]
            with torch.no_grad():
                for p, s in zip(params, summed):
                    noisy = s + torch.normal(0.0, sigma * clip, p.shape, generator=generator)
                    p.sub_(noisy / (q * n), alpha=algo.lr)

    return local_train


# ----------------------------------------------------------------------------- the table


def measure(
    runner: Runner, workload: Workload, variant: str, rounds: int, workdir: Path, extra: list[str], timeout: float
) -> Row:
    row = Row(workload.name, variant, runner.label, cores=runner.processes)
    out = workdir / f"{workload.name}-{variant.strip('-') or 'plain'}-{runner.name}"
    out.mkdir(parents=True)
    try:
        if runner.kind == "fedsim":
            m = run_fedsim(fedsim_command(workload, variant, runner, rounds, out / "run", extra), out / "run", timeout)
        else:
            m = run_children(runner, workload, variant, rounds, out, timeout)
    except RuntimeError as err:
        row.error = str(err)
        return row
    steady = slice(WARMUP_ROUNDS, len(m.round_times) - 1)
    row.round_times = m.round_times
    row.s_per_round = statistics.median(m.round_times[steady])
    row.first_round_s = m.round_times[0] if m.round_times else None
    row.launch_to_round_1_s = m.launch_to_round_1_s
    row.updates_per_s = statistics.median(m.devices[steady]) / row.s_per_round
    row.peak_mb = sum(m.rss_mb)
    row.tree_rss_mb, row.tree_pss_mb = m.tree_rss_mb, m.tree_pss_mb
    if runner.kind == "fedsim":
        row.peak_detail = f"{m.rss_mb[0]:.0f} + {len(m.rss_mb) - 1}x{m.rss_mb[1]:.0f}"
    else:
        row.peak_detail = " + ".join(f"{mb:.0f}" for mb in m.rss_mb)
    row.final_test_accuracy = m.final_test_accuracy
    return row


def median_repeat(runs: list[Row]) -> Row:
    """The repeat with the median s/round (the lower middle one for an even count; a failed
    repeat counts as slowest), with every repeat's s/round in `repeats`."""
    ordered = sorted(runs, key=lambda r: (r.s_per_round is None, r.s_per_round or 0.0))
    row = ordered[(len(ordered) - 1) // 2]
    row.repeats = [r.s_per_round for r in runs]
    return row


def add_ratios(rows: list[Row]) -> None:
    """fedsim rows: / pfl with as many processes as fedsim has workers, / the floor (same variant)."""
    index = {(r.workload, r.variant, r.runner): r for r in rows}
    for row in rows:
        if not row.runner.startswith("fedsim") or row.s_per_round is None:
            continue
        pfl = index.get((row.workload, row.variant, "pfl x2" if row.cores == 2 else "pfl"))
        floor = index.get((row.workload, row.variant, "floor"))
        if pfl and pfl.s_per_round:
            row.vs_pfl = row.s_per_round / pfl.s_per_round
        if pfl and pfl.tree_pss_mb and row.tree_pss_mb:
            row.pss_vs_pfl = row.tree_pss_mb / pfl.tree_pss_mb
        if floor and floor.s_per_round:
            row.vs_floor = row.s_per_round / floor.s_per_round


def torch_device() -> str:
    """Where fedsim's workers train here (simulation.device=auto): asked of a child process, since
    this one never imports torch. pfl and the floor train on the CPU."""
    probe = "import torch; print(f'cuda ({torch.cuda.get_device_name(0)})' if torch.cuda.is_available() else 'cpu')"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    return out.stdout.strip() or f"unknown ({_last_lines(out.stderr, 1)})"


def print_table(rows: list[Row], rounds: int, device: str) -> None:
    print(f"\nfedsim's workers trained on: {device}; pfl and the floor on the CPU")
    print(f"cohort {COHORT} (cohort1000: 1,000), {rounds} rounds; s/round = median of rounds {WARMUP_ROUNDS + 1}..{rounds - 1}")
    head = (
        f"{'workload':<11} | {'dp':<6} | {'runner':<10} | {'cores':>5} | {'s/round':>8} | {'round 1':>7} | {'launch':>6} | {'updates/s':>9} | "
        f"{'peak MB':>7} | {'per process MB':<14} | {'tree RSS':>8} | {'tree PSS':>8} | {'PSS/pfl':>7} | "
        f"{'acc':>5} | {'/pfl':>6} | {'/floor':>6}"
    )
    print(head)
    print("-" * len(head))

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in rows:
        if r.error:
            print(f"{r.workload:<11} | {r.variant:<6} | {r.runner:<10} | {r.cores:>5} | failed: {r.error[:160]}")
            continue
        print(
            f"{r.workload:<11} | {r.variant:<6} | {r.runner:<10} | {r.cores:>5} | {num(r.s_per_round, '.4f'):>8} | "
            f"{num(r.first_round_s, '.2f'):>7} | {num(r.launch_to_round_1_s, '.2f'):>6} | "
            f"{num(r.updates_per_s, '.0f'):>9} | {num(r.peak_mb, '.0f'):>7} | {r.peak_detail:<14} | "
            f"{num(r.tree_rss_mb, '.0f'):>8} | {num(r.tree_pss_mb, '.0f'):>8} | {num(r.pss_vs_pfl, '.2f'):>7} | "
            f"{num(r.final_test_accuracy, '.3f'):>5} | {num(r.vs_pfl, '.2f'):>6} | {num(r.vs_floor, '.2f'):>6}"
        )
    if any(len(r.repeats) > 1 for r in rows):
        print("\ns/round of each repeat (the row is the median one):")
        for r in rows:
            print(f"  {r.workload} {r.variant} {r.runner}: " + ", ".join(num(v, ".4f") for v in r.repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument("--runners", nargs="+", choices=list(RUNNERS), default=list(RUNNERS))
    ap.add_argument("--rounds", type=int, default=12, help="rounds per run (>= 4; default 12)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run each workload's runners N times in turn (fedsim, pfl, floor, fedsim, ...); a row is the "
                         "repeat with the median s/round (default 1)")  # fmt: skip
    ap.add_argument("--fedsim-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every fedsim run (repeatable; pfl and the floor do not see it), "
                         "e.g. simulation.vectorize=on")  # fmt: skip
    ap.add_argument("--json", type=Path, help="also write the rows (with every round's time) to this file")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per runner before it counts as failed")
    ap.add_argument("--print-commands", action="store_true", help="print the fedsim command lines and exit")
    # Internal: one pfl rank or the floor, started by the parent.
    ap.add_argument("--child", choices=["pfl", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="-", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    if args.rounds < WARMUP_ROUNDS + 2:
        ap.error(f"--rounds must be at least {WARMUP_ROUNDS + 2} (two warm-up rounds, one measured, fedsim's evaluating last one)")

    plan = [(WORKLOADS[w], v) for w in args.workloads for v in WORKLOADS[w].variants]
    runners = [RUNNERS[r] for r in args.runners]
    if args.print_commands:
        out = Path("OUT/run")
        for workload, variant in plan:
            for runner in (r for r in runners if r.kind == "fedsim"):
                cmd = fedsim_command(workload, variant, runner, args.rounds, out, args.fedsim_override)
                print(f"# {workload.name} {variant} {runner.label}\n{shlex.join(cmd)}")
        return
    if any(r.kind == "pfl" for r in runners) and (reason := pfl_missing()):
        print(f"pfl is not importable ({reason}); skipping its rows (install: see bench/speed.py's docstring)")
        runners = [r for r in runners if r.kind != "pfl"]

    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fedsim-speed-") as tmp:
        for workload, variant in plan:
            tries: dict[str, list[Row]] = {}
            for repeat in range(args.repeat):
                for runner in runners:
                    if runner.kind == "pfl" and variant == "sample":
                        continue  # pfl 0.6.0 has no per-example DP-SGD
                    t = time.perf_counter()
                    work = Path(tmp) / f"repeat{repeat}"
                    work.mkdir(exist_ok=True)
                    row = measure(runner, workload, variant, args.rounds, work, args.fedsim_override, args.timeout)
                    tries.setdefault(runner.label, []).append(row)
                    result = f"failed: {row.error}" if row.error else f"{row.s_per_round:.4f} s/round"
                    again = f" (repeat {repeat + 1})" if args.repeat > 1 else ""
                    print(f"{workload.name} {variant} {runner.label}{again}: {result} ({time.perf_counter() - t:.0f} s)", flush=True)
            rows += [median_repeat(runs) for runs in tries.values()]
    add_ratios(rows)
    device = torch_device()
    print_table(rows, args.rounds, device)
    if args.json:
        meta = {
            "rounds": args.rounds, "repeat": args.repeat, "cohort": {w.name: w.cohort for w, _ in plan}, "fedsim_overrides": args.fedsim_override,
            "steady_rounds": [WARMUP_ROUNDS + 1, args.rounds - 1], "cpus": os.cpu_count(), "device": device,
        }  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
