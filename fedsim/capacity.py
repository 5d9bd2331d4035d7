"""Will the run fit in memory? Checked from the config alone, before any data is loaded.

fedsim's cost per round depends on the cohort, and its memory on what devices have done,
never on the population: a synthetic population of 10^9 devices holds nothing per device
(fedsim/data/synthetic.py). Two things still grow with the run's size, and a run where they
would not fit is refused here with one line naming the key, the estimate and what is allowed,
instead of being killed by the kernel mid-run:

* a per-device index held by every process (the server and each worker load the dataset):
  the sizes of `dataset.recipe_version=1` (every device's size drawn up front), and the
  partition offsets of datasets that hold their examples (femnist, fashion_mnist,
  huggingface; these also refuse populations above their examples or writers when loaded);
* the server's state stores: the DP-SGD privacy ledger keeps a history per device that ever
  trained (at most min(population, rounds x cohort.size) in expectation), and serializes it
  to ledger.json and checkpoints.

The estimates are measured bytes per device (tracemalloc, numpy 2.4, CPython 3.11), compared
with this machine's memory (physical, or the cgroup limit when lower) minus the fixed cost of
each process (torch, Flower and Ray loaded). On a Ray cluster or the deployment engine, where
workers run elsewhere, each process is checked alone against this machine's memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from fedsim.config import FedsimConfig, SyntheticConfig, usable_cpus
from fedsim.errors import ConfigError

# recipe_version 1 at 10^6 devices: 8.7 B/device kept, 24.7 B/device peak while drawing
# (lognormal floats, floor, clip, the split); rounded up.
V1_SIZES_BYTES_PER_DEVICE = 32
# Datasets holding their examples keep at least one int64 offset per device.
INDEX_BYTES_PER_DEVICE = 8
# PrivacyLedger: 380 B per device kept (history, last event, counters), and as much again
# while ledger.json or a checkpoint is written.
LEDGER_BYTES_PER_DEVICE = 800


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB since it started its program.

    Linux: VmHWM of /proc/self/status, the high-water mark of the current address space.
    getrusage's ru_maxrss is not used there: Linux carries it across exec, so a process started
    by a large parent (pytest after hundreds of tests, a launcher holding a dataset) reports the
    parent's size at fork. Elsewhere ru_maxrss is the best available (KiB on Linux/BSD, bytes on
    macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
# A server or worker process before any population-dependent state (torch, Flower, Ray,
# the model): about 0.5 GB each (README, bench/population.py).
PROCESS_BASE_BYTES = 500 * 2**20
# Population-dependent state below this never refuses a run.
NEGLIGIBLE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Footprint:
    """Population-dependent bytes of one run: per process holding the dataset, and on the server."""

    per_process: int  # in the server and in every worker
    per_process_why: str
    per_process_key: str
    server_only: int
    server_only_why: str
    server_only_key: str


def footprint(cfg: FedsimConfig) -> Footprint:
    """What grows with the population (or the devices that train) in this run, in bytes."""
    ds = cfg.dataset
    per_process, why, key = 0, "", "population"
    if isinstance(ds, SyntheticConfig):
        if ds.recipe_version == 1:
            per_process = V1_SIZES_BYTES_PER_DEVICE * cfg.population
            why, key = "dataset.recipe_version=1 draws every device's size up front", "dataset.recipe_version"
    else:
        per_process = INDEX_BYTES_PER_DEVICE * cfg.population
        why = f"dataset {ds.name} keeps an index entry per device"
    server, server_why = 0, ""
    if cfg.privacy.dpsgd is not None:
        trained = min(cfg.population, cfg.rounds * cfg.cohort.size)
        server = LEDGER_BYTES_PER_DEVICE * trained
        server_why = f"the DP-SGD privacy ledger of up to {trained:,} devices that train (rounds x cohort.size)"
    return Footprint(per_process, why, key, server, server_why, "rounds")


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def local_workers(cfg: FedsimConfig) -> int:
    """Worker processes on this machine: floor(usable CPUs / cpus_per_worker) at most (Ray's actors, or fedsim's processes)."""
    if cfg.engine == "deployment" or cfg.simulation.ray_address:
        return 0  # elsewhere
    slots = max(1, math.floor(usable_cpus() / cfg.simulation.cpus_per_worker))
    return min(cfg.num_workers, slots)


def check_fits(cfg: FedsimConfig, *, memory: int | None = None) -> None:
    """Refuse, with a ConfigError naming the key, a run whose estimated memory exceeds `memory`."""
    memory = machine_memory() if memory is None else memory
    fp = footprint(cfg)
    processes = 1 + local_workers(cfg)
    grows = processes * fp.per_process + fp.server_only
    need = processes * PROCESS_BASE_BYTES + grows
    if grows < NEGLIGIBLE_BYTES or need <= memory:
        return  # a machine too small for the processes themselves is not this check's business
    where = f"{processes} processes (the server and {processes - 1} workers)" if processes > 1 else "the server"
    parts = []
    if fp.per_process:
        parts.append(f"{fp.per_process_why}: {_gb(fp.per_process)} in each process")
    if fp.server_only:
        parts.append(f"{fp.server_only_why}: {_gb(fp.server_only)} on the server")
    detail = "; ".join(parts) or "the processes alone"
    estimate = f"estimated {_gb(need)} for {where} ({detail}), over this machine's {_gb(memory)}"
    per_process_share = fp.per_process * processes
    if per_process_share >= fp.server_only:
        key = fp.per_process_key
        if key == "dataset.recipe_version":
            allowed = "allowed: 2 (device sizes computed per device, no per-device memory)"
        else:
            room = (memory - processes * PROCESS_BASE_BYTES - fp.server_only) // (processes * INDEX_BYTES_PER_DEVICE)
            allowed = (
                f"allowed: population <= {max(room, 0):,} (and at most the dataset's devices), "
                "or dataset=synthetic (any population)"
            )
        value = getattr(cfg.dataset, "recipe_version", None) if key == "dataset.recipe_version" else cfg.population
    else:
        key = fp.server_only_key
        room = (memory - processes * (PROCESS_BASE_BYTES + fp.per_process)) // (LEDGER_BYTES_PER_DEVICE * cfg.cohort.size)
        allowed = f"allowed: rounds <= {max(room, 0):,} with cohort.size={cfg.cohort.size}"
        value = cfg.rounds
    raise ConfigError(key, f"{value}: the run would not fit in memory: {estimate}; {allowed}")


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"
