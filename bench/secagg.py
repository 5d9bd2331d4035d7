"""Round time with and without secure aggregation: fedsim's SecAgg+ against Flower's own.

Workload: 100 (and 1,000) devices per round (fixed cohort), 50 synthetic examples each (60
features, 10 classes), an MLP 60-1600-10 (113,610 parameters), 1 local epoch of SGD with batch
10, one torch thread per worker, 2 workers (one per core), no evaluation between rounds. The
workers are local processes (`simulation.backend=auto`), except in the active threat model,
whose key registry is a Ray actor: auto runs that setup on Ray.

1. fedsim, population = 2 x cohort, each setup in its own `python -m fedsim` process: plain,
   `secagg=secaggplus` in the semi-honest and the active threat model (gamma = 1/3 colluding
   devices, no dropouts configured: k and t are what the threat model needs, printed from the
   run's secagg_k / secagg_t), semi-honest SecAgg+ with `secagg.simulation_shortcut=true` (one
   unmasked message per worker, no cryptography; the same sum, survivors and aborts as the
   faithful protocol; issue 18 asks
   <= 1.3x plain for it and <= 2.0x for the faithful semi-honest protocol), and semi-honest
   SecAgg+ with distributed DP (devices add Skellam noise, DP-FedAvg z=1). Seconds per round =
   median of metrics.jsonl's round_time_s over the rounds after the first two; also the median
   secagg_time_s and the upload bytes per device per SecAgg+ stage.
2. Flower 1.42's own SecAgg+ (legacy API: `SecAggPlusWorkflow` + `secaggplus_mod` around a
   NumPyClient), 100 SuperNodes (one per device, Flower's layout), all sampled every round,
   each device training the same MLP with `clients.LocalTrainer` on 50 random examples;
   num_shares=21 (Flower counts the device itself, so 20 neighbours) and threshold 11, like
   fedsim. Also Flower's plain DefaultWorkflow on the same setup. Each configuration runs in
   a child process (Ray restarts cleanly) with a timeout; the fit workflow is timed per round
   from the server side, and s/round is the median over the rounds after the first.
   A failed or timed-out configuration is reported in the table instead of a time.

    python bench/secagg.py                       # cohorts 100 and 1000, fedsim 8 rounds, Flower 4 rounds
    python bench/secagg.py --rounds 6 --skip-flower --cohorts 100
    python bench/secagg.py --skip-flower --only plain,shortcut      # some fedsim setups only
    python bench/secagg.py --skip-flower --fedsim-override simulation.backend=ray  # fedsim's workers on Ray
    python bench/secagg.py --protocol                # the protocol's own CPU per device, no training
    python bench/secagg.py --floor                   # the faithful round's cryptographic floor (4.)
Flower runs at cohort 100 only (one SuperNode per device).

3. `--protocol`: the SecAgg+ session alone, in this process, at cohort 1,000 with the
   semi-honest k and t, CPU seconds (time.process_time) per device for an input of 16 values
   and of the MLP's 113,610: faithful (`protocol.simulate_round`: every stage of every device
   and the server, no transport, no training, message bytes not counted; the driver masks one
   device at a time, so each pair mask is expanded by both devices, as on real devices, where a
   fedsim worker expands it once for two of its own) and the shortcut (`ShortcutSession`: the
   server's decisions and the sum of two workers' sums); and one device's rounding of its 113,610-value float32
   update to the 16-bit grid (`FixedPoint.encode_int`). Best of 3; what the protocol costs
   before fedsim's rounds add messages, state and training.
4. The faithful round's cryptographic floor (printed after the table, or alone with `--floor`):
   one X25519 agreement with HKDF (`crypto.agree`), one keystream of the model's length and one
   mask addition (`crypto.add_mask_many`, over 256 vectors, so additions meet memory as on a
   worker) timed in this process, times what a round needs at least at the cohort's semi-honest
   k: two agreements per pair of neighbours (n k / 2 pairs), a keystream per pair and two per
   device (its self mask, and the server's to remove it), two additions per pair and two per
   device; divided by 2 cores. A faithful round is at least plain's time plus this, before
   Shamir shares, share encryption, stages, messages and Python.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COHORT = 100  # Flower's comparison
EXAMPLES = 50
FEATURES, CLASSES, HIDDEN = 60, 10, 1600
NUM_SHARES, THRESHOLD = 21, 11  # Flower: 21 shares = the device + 20 neighbours (fedsim's k=20, t=11)
FLOWER_MARKER = "FLOWER_ROUNDS "


@dataclass
class Row:
    """One line of the table: a setup and its steady-state seconds per round (None: failed)."""

    setup: str
    family: str  # "fedsim<cohort>" | "flower": the plain row of the same family is the first ratio's base
    s_per_round: float | None = None
    note: str = ""
    command: str = ""
    secagg: dict[str, float] = field(default_factory=dict)


# -- the model ---------------------------------------------------------------------------------


def build_mlp():
    from fedsim.config import ModelConfig
    from fedsim.models import build_model

    return build_model(ModelConfig(name="mlp", hidden_sizes=[HIDDEN]), (FEATURES,), CLASSES, seed=0)


def model_params() -> int:
    from clients import num_params

    return num_params(build_mlp())


# -- fedsim ------------------------------------------------------------------------------------


FEDSIM_SETUPS: dict[str, list[str]] = {
    "fedsim plain": ["secagg=none"],
    "fedsim SecAgg+ semi-honest": ["secagg=secaggplus", "secagg.threat_model=semi_honest"],
    # One unmasked message per worker, no cryptography; the same sum, survivors and aborts
    # (simulation only, not what devices do).
    "fedsim SecAgg+ semi-honest, simulation shortcut": [
        "secagg=secaggplus", "secagg.threat_model=semi_honest", "secagg.simulation_shortcut=true",
    ],
    "fedsim SecAgg+ active": ["secagg=secaggplus", "secagg.threat_model=active"],
    "fedsim SecAgg+ semi-honest + distributed DP": [
        "secagg=secaggplus", "privacy=dpfedavg", "privacy.dpfedavg.noise=distributed",
        "privacy.dpfedavg.noise_multiplier=1.0", "privacy.dpfedavg.accountant=rdp",  # rdp: fixed cohorts
    ],
}  # fmt: skip


def fedsim_command(overrides: list[str], rounds: int, out: Path, ray_dir: Path, cohort: int = COHORT) -> list[str]:
    return [
        sys.executable, "-m", "fedsim",
        f"population={2 * cohort}", f"rounds={rounds}", f"cohort.size={cohort}", "cohort.sampling=fixed",
        "dataset=synthetic", f"dataset.examples_per_device={EXAMPLES}", "model=mlp", f"model.hidden_sizes=[{HIDDEN}]",
        "eval_every=1000", "output.progress=false", "output.save_model=false",
        f"output.dir={out}", f"hydra.run.dir={out}", f"simulation.ray_temp_dir={ray_dir}", *overrides,
    ]  # fmt: skip


def run_fedsim(setup: str, overrides: list[str], rounds: int, workdir: Path, cohort: int = COHORT) -> Row:
    out = workdir / f"{cohort}_{re.sub(r'[^A-Za-z0-9-]+', '_', setup.replace('+', 'p'))}"  # no ',' (a Hydra sweep)
    cmd = fedsim_command(overrides, rounds, out, workdir / "ray", cohort)
    row = Row(f"{setup} (cohort {cohort})" if cohort != COHORT else setup, f"fedsim{cohort}", command=shlex.join(cmd))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        row.note = f"failed (exit {proc.returncode}): {last_line(proc.stderr)}"
        return row
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:] or rows
    row.s_per_round = statistics.median(r["round_time_s"] for r in steady)
    row.secagg = secagg_metrics(steady)
    return row


def secagg_metrics(rows: list[dict]) -> dict[str, float]:
    """Median protocol time and upload bytes per device per stage, where the run has them."""
    out: dict[str, float] = {}
    for key in ["secagg_k", "secagg_t", "secagg_time_s", *(k for k in rows[0] if k.startswith("secagg_bytes_per_device_"))]:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    return out


# -- Flower's own SecAgg+ (child process) ------------------------------------------------------


_device_trainer = None  # per Ray worker: this module is imported there by reference (not __main__)


def train_device(device_id: int, parameters: list) -> list:
    """One device's fit for Flower: the cached MLP and `clients.LocalTrainer`, as fedsim's workers.

    50 random examples seeded by the device id, lr 0.05, 1 epoch, batch 10 (conf/algorithm/fedavg.yaml).
    Building the model per call would cost 40 ms against a 1.4 ms fit, so it is built once per worker.
    """
    global _device_trainer
    import numpy as np
    import torch

    from clients import LocalTrainer, TrainConfig

    if _device_trainer is None:
        torch.set_num_threads(1)
        _device_trainer = LocalTrainer(build_mlp(), TrainConfig(lr=0.05, local_epochs=1, batch_size=10))
    g = torch.Generator().manual_seed(device_id)
    data = (torch.randn(EXAMPLES, FEATURES, generator=g), torch.randint(0, CLASSES, (EXAMPLES,), generator=g))
    global_flat = torch.from_numpy(np.concatenate([a.ravel() for a in parameters]).astype(np.float32))
    _device_trainer.fit(global_flat, data, seed=(0, device_id))
    return [p.detach().numpy().copy() for p in _device_trainer.model.parameters()]


def flower_child(mode: str, rounds: int) -> None:
    """Run Flower's legacy FedAvg with `mode` = plain | secaggplus; print per-round times."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.server.workflow.default_workflows import default_fit_workflow
    from flwr.simulation import run_simulation

    class Device(NumPyClient):
        def __init__(self, device_id: int) -> None:
            self.device_id = device_id

        def fit(self, parameters, config):
            return train_device(self.device_id, parameters), EXAMPLES, {}

    def client_fn(context):
        return Device(int(context.node_config["partition-id"])).to_client()

    times: list[tuple[float, bool]] = []

    def timed(fit_workflow):
        def run(grid, context) -> None:
            before = context.state.array_records[MAIN_PARAMS_RECORD]
            t0 = time.perf_counter()
            fit_workflow(grid, context)
            # Both workflows store a new parameter record only when the round aggregated.
            times.append((time.perf_counter() - t0, context.state.array_records[MAIN_PARAMS_RECORD] is not before))

        return run

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        initial = ndarrays_to_parameters([p.detach().numpy() for p in build_mlp().parameters()])
        strategy = FedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=COHORT,
            min_available_clients=COHORT, initial_parameters=initial,
        )  # fmt: skip
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        fit = SecAggPlusWorkflow(NUM_SHARES, THRESHOLD) if mode == "secaggplus" else default_fit_workflow
        DefaultWorkflow(fit_workflow=timed(fit))(grid, legacy)

    mods = [secaggplus_mod] if mode == "secaggplus" else []
    client_app = ClientApp(client_fn=client_fn, mods=mods)
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_dir:  # short: Ray's socket paths
        run_simulation(
            server_app, client_app, num_supernodes=COHORT,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"log_to_driver": False, "_temp_dir": ray_dir}},
        )  # fmt: skip
    print(FLOWER_MARKER + json.dumps(times), flush=True)


def run_flower(setup: str, mode: str, rounds: int, timeout_s: float) -> Row:
    # Imported as bench.secagg (PYTHONPATH=repo, also for the Ray workers) so train_device's cache
    # is a module global there; from __main__ Ray would re-pickle it with every message.
    cmd = [sys.executable, "-c", f'from bench.secagg import flower_child; flower_child("{mode}", {rounds})']
    row = Row(setup, "flower", command="PYTHONPATH=. " + shlex.join(cmd))
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": pythonpath, "FLWR_LOG_LEVEL": "WARNING", "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and the Ray processes it started
        proc.communicate()
        row.note = f"timed out after {timeout_s:.0f} s"
        return row
    marked = [line for line in stdout.splitlines() if line.startswith(FLOWER_MARKER)]
    if proc.returncode != 0 or not marked:
        row.note = f"failed (exit {proc.returncode}): {last_line(stderr)}"
        return row
    times = json.loads(marked[-1][len(FLOWER_MARKER) :])
    failed = [i + 1 for i, (_, ok) in enumerate(times) if not ok]
    if failed or len(times) < rounds:
        row.note = f"rounds not aggregated: {failed}; {len(times)}/{rounds} ran; {last_line(stderr)}"
    steady = times[1:] or times
    row.s_per_round = statistics.median(t for t, _ in steady) if steady else None
    return row


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


# -- report ------------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def print_table(rows: list[Row], params: int, rounds: int, flower_rounds: int) -> None:
    plain = {r.family: r.s_per_round for r in rows if " plain" in r.setup}
    print(f"\nMLP {FEATURES}-{HIDDEN}-{CLASSES}: {params:,} parameters; {COHORT} devices/round, {EXAMPLES} examples each")
    print(f"fedsim: {rounds} rounds, median of rounds 3..{rounds}; Flower: {flower_rounds} rounds, median of rounds 2..{flower_rounds}")
    width = max(len(r.setup) for r in rows)
    print(f"{'setup':<{width}} | {'s/round':>8} | {'vs its own plain':>16} | {'vs fedsim plain':>15}")
    for r in rows:
        s = f"{r.s_per_round:8.3f}" if r.s_per_round is not None else f"{'-':>8}"
        print(f"{r.setup:<{width}} | {s} | {ratio(r.s_per_round, plain.get(r.family)):>16} | {ratio(r.s_per_round, plain.get(r.family if r.family != 'flower' else f'fedsim{COHORT}')):>15}")
        if r.note:
            print(f"{'':<{width}}   ^ {r.note}")
    for r in rows:
        if r.secagg:
            print(f"\n{r.setup}: " + ", ".join(f"{k.removeprefix('secagg_')} {v:,.3f}" for k, v in r.secagg.items()))
    print("\ncommands:")
    for r in rows:
        print(f"  [{r.setup}] {r.command}")


def protocol_costs(cohort: int = 1000) -> None:
    """Print the SecAgg+ session's own CPU per device (module docstring, 3.)."""
    import numpy as np

    from fedsim.api import compose
    from fedsim.secagg.protocol import SecAggParams, simulate_round
    from fedsim.secagg.quantize import FixedPoint
    from fedsim.secagg.shortcut import ShortcutSession
    from fedsim.secure_rounds import graph_choice

    choice = graph_choice(compose(["secagg=secaggplus"]), cohort)
    print(f"SecAgg+ session at cohort {cohort:,}, semi-honest k={choice.neighbours}, t={choice.threshold}; "
          "CPU ms per device (best of 3)", flush=True)
    length = model_params()
    for shortcut in (True, False):
        for size in (16, length):
            params = SecAggParams(num_devices=cohort, threshold=choice.threshold, neighbours=choice.neighbours,
                                  modulus_bits=32, vector_length=size, session_id=os.urandom(16))
            inputs = {i: np.full(size, i % 7, dtype=np.int64) for i in range(cohort)}
            halves = [list(range(cohort // 2)), list(range(cohort // 2, cohort))]
            sums = [(h, np.full(size, len(h), dtype=np.uint32)) for h in halves]
            best = float("inf")
            for _ in range(3):
                t0 = time.process_time()
                if shortcut:
                    session = ShortcutSession(params, lambda stage, i: False)
                    session.before_training()
                    session.finish(sums)
                else:
                    simulate_round(params, inputs, count_bytes=False)
                best = min(best, time.process_time() - t0)
            mode = "shortcut" if shortcut else "faithful"
            print(f"  {mode:8} vector {size:>7,}: {1e3 * best / cohort:.3f} ms", flush=True)
    fp = FixedPoint(0.05, 16, 32)
    x = (np.random.default_rng(0).standard_normal(length) * 0.02).astype(np.float32)
    out = np.empty(length, dtype=np.int64)
    rng = np.random.default_rng(1)
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(200):
            fp.encode_int(x, rng, out=out)
        best = min(best, (time.process_time() - t0) / 200)
    print(f"  rounding one update of {length:,} values to 16 bits: {1e3 * best:.3f} ms", flush=True)


def crypto_costs() -> tuple[float, float, float]:
    """CPU seconds of one X25519 agreement with HKDF, one keystream of the model's length and one
    mask addition, in this process (best of 3; module docstring, 4.)."""
    import numpy as np

    from fedsim.secagg import crypto

    length = model_params()
    keys = [crypto.generate_keypair() for _ in range(64)]
    salt = os.urandom(16)
    # 256 vectors of the model's length (116 MB): mask additions meet memory, as on a worker
    vectors = [np.ones(length, dtype=np.uint32) for _ in range(256)]  # written: no first-touch faults timed
    seeds = [os.urandom(32) for _ in range(256)]
    best = [float("inf")] * 3
    for _ in range(3):
        t0 = time.process_time()
        for a in keys:
            for b in keys[:8]:
                crypto.agree(a.private, b.public, info=crypto.INFO_MASK, salt=salt)
        best[0] = min(best[0], (time.process_time() - t0) / (len(keys) * 8))
        for targets in (1, 2):
            t0 = time.process_time()
            for i in range(512):
                crypto.add_mask_many([(vectors[(i + j * 97) % 256], j == 1) for j in range(targets)], seeds[i % 256])
            best[targets] = min(best[targets], (time.process_time() - t0) / 512)
    add_s = max(best[2] - best[1], 0.0)
    return best[0], max(best[1] - add_s, 0.0), add_s


def crypto_floor(cohort: int, costs: tuple[float, float, float], workers: int = 2) -> tuple[float, str]:
    """Seconds a faithful round's cryptography takes at least on `workers` cores at this cohort
    (module docstring, 4.), and how it was counted."""
    from fedsim.api import compose
    from fedsim.secure_rounds import graph_choice

    agree_s, expand_s, add_s = costs
    k = graph_choice(compose(["secagg=secaggplus"]), cohort).neighbours
    pairs = cohort * k // 2
    # Per round: two agreements a pair (mask and encryption keys), each once for both ends; a
    # keystream a pair and a self mask a device, expanded by the device and again by the server;
    # each pair mask added to both ends' vectors, each self mask added and then removed.
    cpu = 2 * pairs * agree_s + (pairs + 2 * cohort) * expand_s + (2 * pairs + 2 * cohort) * add_s
    how = (f"k={k}: {2 * pairs:,} agreements x {1e6 * agree_s:.0f} us, {pairs + 2 * cohort:,} keystreams of "
           f"{model_params():,} words x {1e6 * expand_s:.0f} us, {2 * pairs + 2 * cohort:,} mask additions x "
           f"{1e6 * add_s:.0f} us = {cpu:.2f} s of CPU")  # fmt: skip
    return cpu / workers, how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="fedsim rounds per setup")
    ap.add_argument("--flower-rounds", type=int, default=4, help="Flower rounds per setup (its SecAgg+ is slow)")
    ap.add_argument("--flower-timeout", type=float, default=600.0, help="seconds per Flower configuration")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--cohorts", default="100,1000", help="comma-separated fedsim cohort sizes")
    ap.add_argument("--only", default="", help="comma-separated words: run the fedsim setups whose name has one "
                    "(e.g. 'plain,shortcut'; the plain row is the ratios' base)")
    ap.add_argument("--fedsim-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every fedsim run (repeatable), e.g. simulation.backend=ray")  # fmt: skip
    ap.add_argument("--protocol", action="store_true", help="only the protocol's own CPU per device (docstring, 3.)")
    ap.add_argument("--floor", action="store_true", help="only the faithful round's cryptographic floor (docstring, 4.)")
    args = ap.parse_args()
    if args.protocol:
        protocol_costs()
        return
    cohorts = [int(c) for c in args.cohorts.split(",")]
    if args.floor:
        costs = crypto_costs()
        for cohort in cohorts:
            seconds, how = crypto_floor(cohort, costs)
            print(f"cohort {cohort:,}: the faithful round's cryptography takes at least {seconds:.3f} s on 2 cores ({how})")
        return
    params = model_params()
    print(f"model: MLP {FEATURES}-{HIDDEN}-{CLASSES}, {params:,} parameters", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fsb", dir="/tmp") as tmp:
        for cohort in cohorts:
            for setup, overrides in FEDSIM_SETUPS.items():
                if args.only and not any(word in setup for word in args.only.split(",")):
                    continue
                print(f"running {setup} at cohort {cohort} ...", flush=True)
                rows.append(run_fedsim(setup, [*overrides, *args.fedsim_override], args.rounds, Path(tmp), cohort))
    if not args.skip_flower:
        for setup, mode in [("Flower plain", "plain"), ("Flower SecAgg+", "secaggplus")]:
            print(f"running {setup} ...", flush=True)
            rows.append(run_flower(setup, mode, args.flower_rounds, args.flower_timeout))
    print_table(rows, params, args.rounds, args.flower_rounds)
    print()
    costs = crypto_costs()
    for cohort in cohorts:
        plain = next((r.s_per_round for r in rows if r.family == f"fedsim{cohort}" and " plain" in r.setup), None)
        seconds, how = crypto_floor(cohort, costs)
        against = f"; with plain's {plain:.3f} s: faithful >= {(plain + seconds) / plain:.2f}x plain" if plain else ""
        print(f"cohort {cohort:,}: the faithful round's cryptography takes at least {seconds:.3f} s on 2 cores{against} ({how})")


if __name__ == "__main__":
    main()
