"""Golden model hashes: a matrix of small runs whose final models must stay bit-identical.

    python scripts/golden.py record tests/data/golden_shas.json   # from the code as it is now
    python scripts/golden.py check tests/data/golden_shas.json    # after a change: same bits?
    python scripts/golden.py check FILE --only dpsgd              # the runs whose name has "dpsgd"

Every run is composed from Hydra overrides (`fedsim.api.compose`, as the command line does)
and runs on the in-process grid of tests/fake_grid.py (fedsim's ClientApp answering in this
process, no Ray), which gives the Ray engine's model bit for bit. Each run is tiny (a few
rounds of a small population) with `privacy.randomness=reproducible`, so its model sha256,
its calibrated noise multipliers and its final epsilons are functions of the code alone.
`check` compares each with the file and fails (exit status 1) on any difference, naming the
run and the value.

A run added to MATRIX must be recorded on the code before the change it guards: extract that
commit (`git archive COMMIT | tar -x -C DIR`), copy this script into DIR/scripts and record
there (it imports the fedsim beside it), then check the other runs agree with this file.

The hashes hold for the torch/numpy/opacus versions and the CPU the file was recorded with
(stored in it): float kernels change between versions, and torch picks other kernels on CPUs
with other vector instructions (the same commit gave 31 other values on a CPU without the
recording machine's), so `check` refuses to compare across torch versions or CPUs rather than
report a refactor as the cause: re-record at the base commit on this machine, then check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as fedsim's command line: one BLAS thread, same sums
os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent
# This checkout's fedsim (not an editable install of another one) and the tests' in-process grid.
sys.path[:0] = [str(REPO), str(REPO / "tests")]

# Every run: small synthetic population, 2 workers (the split must not matter), reproducible draws.
BASE = [
    "seed=7", "population=30", "rounds=3", "cohort.size=8", "model=mlp",
    "model.hidden_sizes=[8]", "simulation.num_workers=2", "privacy.randomness=reproducible",
    "output.progress=false",
]  # fmt: skip
SYNTHETIC = ["dataset.size_max=40"]  # every run but those that choose another dataset=
FIXED = ["cohort.sampling=fixed"]
DPFEDAVG_RDP = ["privacy.dpfedavg.accountant=rdp"]  # fixed-size cohorts have no PLD accountant
SECAGG = ["secagg=secaggplus", "secagg.bits=20", *FIXED]
ACTIVE = [*SECAGG, "secagg.threat_model=active"]
DISTRIBUTED = ["privacy=dpfedavg", *DPFEDAVG_RDP, "privacy.dpfedavg.noise=distributed"]

# name -> overrides after BASE. Names say what a failing run covers.
MATRIX: dict[str, list[str]] = {
    "plain_fedavg_vec_off": ["simulation.vectorize=off"],
    "plain_fedavg_vec_on": ["simulation.vectorize=on", "simulation.device_group=3"],
    "plain_fedavg_classic": ["simulation.layout=classic", "simulation.vectorize=off"],
    "plain_fedprox": ["algorithm=fedprox", "simulation.vectorize=off"],
    "plain_fedadam": ["algorithm=fedadam"],
    "plain_fedyogi_fixed": ["algorithm=fedyogi", *FIXED],
    "plain_faults": ["faults.device_failure_rate=0.2", "faults.nan_update_rate=0.1", "simulation.vectorize=off"],
    "dpsgd_sigma_vec_off": ["privacy=dpsgd", "simulation.vectorize=off"],
    "dpsgd_sigma_vec_on": ["privacy=dpsgd", "simulation.vectorize=on"],
    "dpsgd_target_epsilon": ["privacy=dpsgd_target", "privacy.dpsgd.target_epsilon=8", "simulation.vectorize=off"],
    "dpsgd_target_budget_stop": [  # devices over budget left out, then the run stops (after round 4)
        "privacy=dpsgd_target", "privacy.dpsgd.target_epsilon=8", "privacy.dpsgd.noise_multiplier=1.0", "rounds=8",
        "cohort.size=15",
    ],  # fmt: skip
    "dpfedavg_central_sigma": ["privacy=dpfedavg", "privacy.dpfedavg.clip_norm=0.5"],
    "dpfedavg_central_target": ["privacy=dpfedavg_target", "privacy.dpfedavg.target_epsilon=20"],
    "dpfedavg_central_adaptive": [
        "privacy=dpfedavg", "privacy.dpfedavg.adaptive_clipping=true", "privacy.dpfedavg.noise_multiplier=0.5",
    ],  # fmt: skip
    "dpfedavg_central_fixed_rdp": ["privacy=dpfedavg", *DPFEDAVG_RDP, *FIXED, "algorithm=fedadam"],
    "dpsgd_and_dpfedavg": ["privacy=[dpsgd,dpfedavg]", *DPFEDAVG_RDP, *FIXED],
    "secagg_semi_honest": [*SECAGG],
    "secagg_active": [*ACTIVE],
    "secagg_semi_honest_dropouts": [
        *SECAGG, "secagg.drop_share_keys=0.2", "secagg.max_corrupt_fraction=0.0", "secagg.max_dropout_fraction=0.3",
    ],  # fmt: skip
    "secagg_semi_honest_dpfedavg_central": [*SECAGG, "privacy=dpfedavg", *DPFEDAVG_RDP],
    "secagg_semi_honest_dpfedavg_distributed": [*SECAGG, *DISTRIBUTED],
    "secagg_active_dpfedavg_distributed": [*ACTIVE, *DISTRIBUTED],
    "secagg_active_dpfedavg_distributed_adaptive": [
        *ACTIVE, *DISTRIBUTED, "privacy.dpfedavg.adaptive_clipping=true", "privacy.dpfedavg.noise_multiplier=0.5",
    ],  # fmt: skip
    "secagg_distributed_target": [*SECAGG, *DISTRIBUTED, "privacy.dpfedavg.noise_multiplier=null", "privacy.dpfedavg.target_epsilon=20"],
    "audit_user": ["privacy=dpfedavg", "audit=user", "audit.canaries=10"],
    "audit_sample": ["privacy=dpsgd", "audit=sample", "audit.canary_examples=20", "audit.canary_devices=4"],
    "shakespeare_lstm": [
        "dataset=shakespeare", "population=141", "cohort.size=4", "rounds=2", "model=lstm", "model.hidden=16",
        "model.layers=1", "dataset.max_train_windows=20", "dataset.max_test_examples=100", "dataset.sample_chars=20",
    ],  # fmt: skip
}


def versions() -> dict[str, str]:
    import flwr
    import numpy
    import opacus
    import torch

    return {
        "torch": torch.__version__, "numpy": numpy.__version__, "opacus": opacus.__version__,
        "flwr": flwr.__version__, "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu(),
    }  # fmt: skip


def cpu() -> str:
    """The CPU's model name and the vector-instruction flags that decide torch's kernels."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    vector = sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4")))
    return f"{model}; {' '.join(vector)}"


def overrides(name: str) -> list[str]:
    """The Hydra overrides of matrix entry `name`."""
    own = MATRIX[name]
    return [*BASE, *([] if any(o.startswith("dataset=") for o in own) else SYNTHETIC), *own]


def run_one(name: str, tmp: Path) -> dict[str, Any]:
    """Run matrix entry `name` on the in-process grid; return what must stay identical."""
    from fake_grid import run_local

    from fedsim.api import compose
    from fedsim.errors import FedsimError

    cfg = compose(overrides(name))
    try:
        summary = run_local(cfg, tmp / name)
    except FedsimError:  # a run that stops on its budget writes its outputs first (stopped_early says why)
        summary = json.loads((tmp / name / "summary.json").read_text())
    out: dict[str, Any] = {
        "model_sha256": summary["model_sha256"],
        "rounds": summary["rounds"],
        "devices_trained": summary["devices_trained"],
        "stopped_early": summary.get("stopped_early"),
    }
    privacy = summary.get("privacy", {})
    sample, user = privacy.get("sample_level"), privacy.get("user_level")
    if sample:
        out |= {"sample_noise_multiplier": sample["noise_multiplier"], "sample_epsilon_max": sample["epsilon_max"],
                "sample_epsilon_median": sample["epsilon_median"]}  # fmt: skip
    if user:
        out |= {"user_noise_multiplier": user["noise_multiplier"], "user_epsilon": user["epsilon"],
                "user_final_clip_norm": user["final_clip_norm"]}  # fmt: skip
    return out


def run_matrix(names: list[str]) -> tuple[dict[str, dict[str, Any]], float]:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("fedsim").setLevel(logging.ERROR)  # the faults run's per-device warnings
    results, start = {}, time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedsim-golden-") as tmp:
        for name in names:
            t = time.monotonic()
            results[name] = run_one(name, Path(tmp))
            sys.stderr.write(f"[golden] {name}: {results[name]['model_sha256'][:16]} ({time.monotonic() - t:.1f} s)\n")
    return results, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("file", type=Path)
    parser.add_argument("--only", default="", help="check: only the runs whose name contains this")
    args = parser.parse_args(argv)

    if args.action == "record":
        results, seconds = run_matrix(list(MATRIX))
        data = {"versions": versions(), "seconds": round(seconds), "runs": {n: {"overrides": overrides(n), **results[n]} for n in MATRIX}}
        args.file.parent.mkdir(parents=True, exist_ok=True)
        args.file.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(results)} runs in {seconds:.0f} s to {args.file}")
        return 0

    golden = json.loads(args.file.read_text())
    now = versions()
    if golden["versions"]["torch"] != now["torch"]:
        print(f"recorded with torch {golden['versions']['torch']}, this is torch {now['torch']}: re-record on the old code")
        return 1
    if golden["versions"].get("cpu") != now["cpu"]:
        print(f"recorded on another CPU ({golden['versions'].get('cpu', 'not recorded')}), this is {now['cpu']}: torch's "
              "kernels differ between them; re-record at the base commit on this machine, then check")
        return 1
    names = [n for n in golden["runs"] if args.only in n]
    missing = [n for n in names if n not in MATRIX]
    if missing or any(golden["runs"][n]["overrides"] != overrides(n) for n in names if n in MATRIX):
        print(f"the matrix changed since {args.file} was recorded (runs {missing or 'or overrides'}): re-record on the old code")
        return 1
    results, seconds = run_matrix(names)
    failures = [
        f"{name}: {key} was {expected!r}, now {results[name].get(key)!r}"
        for name in names
        for key, expected in golden["runs"][name].items()
        if key != "overrides" and results[name].get(key) != expected
    ]
    print("\n".join(failures) or f"all {len(names)} runs identical ({seconds:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
