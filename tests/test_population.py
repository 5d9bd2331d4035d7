"""Populations at the scale of a phone platform: 10^9 devices in bounded memory.

Sampling, DP-SGD's budgets and the dataset cost O(cohort) or O(devices that trained), never
O(population); a run whose population-dependent state would not fit is refused before it
starts; and whole runs at 10^9 devices keep every process under 1 GiB.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fedsim.capacity import LEDGER_BYTES_PER_DEVICE, check_fits, footprint, machine_memory
from fedsim.config import from_dict
from fedsim.data import load_dataset
from fedsim.data.synthetic import SizeGenerator, train_part
from fedsim.errors import ConfigError
from fedsim.privacy.sample_level import SampleLevelDP, _median_low
from fedsim.sampling import sample_cohort

REPO = Path(__file__).resolve().parent.parent
BILLION = 1_000_000_000
GiB = 2**30


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("method", ["poisson", "fixed"])
def test_sampling_a_cohort_from_a_billion_allocates_nothing_per_device(method: str) -> None:
    tracemalloc.start()
    try:
        cohorts = [sample_cohort(population=BILLION, cohort_size=50, method=method, rng=np.random.default_rng([0, r])) for r in range(1, 21)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # an O(population) array would be 8 GB
    for cohort in cohorts:
        assert cohort == sorted(set(cohort)) and 0 <= cohort[0] and cohort[-1] < BILLION
        assert len(cohort) == 50 if method == "fixed" else 20 <= len(cohort) <= 90
    # Devices from the whole id range, not only the first few.
    assert max(max(c) for c in cohorts) > 0.9 * BILLION and min(min(c) for c in cohorts) < 0.1 * BILLION


# ----------------------------------------------------------------------------- DP-SGD budgets


def test_median_low_of_counts_is_statistics_median_low() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = rng.integers(1, 30, int(rng.integers(1, 40))).tolist()
        counts = {int(v): float(values.count(v)) for v in set(values)}
        assert _median_low(counts) == statistics.median_low(values)


def test_dpsgd_calibration_and_budgets_at_a_billion_devices_use_the_size_distribution() -> None:
    raw = {"population": BILLION, "rounds": 3, "privacy": {"dpsgd": {"noise_multiplier": None, "target_epsilon": 1.0}}}
    raw["dataset"] = {"name": "synthetic", "size_max": 100}
    cfg = from_dict(raw)
    dataset = load_dataset(cfg.dataset, population=BILLION, seed=0)
    tracemalloc.start()
    try:
        dp = SampleLevelDP(cfg, dataset)  # a pass over 10^9 devices would take hours
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000
    # The calibration's median device is the median of the size distribution.
    law = SizeGenerator(cfg.dataset, seed=0).total_distribution()
    cdf, median = 0.0, None
    for total in sorted(law):
        cdf += law[total]
        if cdf > 0.5:
            median = int(train_part(np.array([total]), cfg.dataset.test_fraction)[0])
            break
    assert dp.calibration is not None and dp.calibration["assumed_device_examples"] == median
    # Devices whose first participation alone would exceed the budget: the expected number of them.
    def joins(n: int) -> bool:
        return dp.accountant.epsilon(((dp.event_of_size(n), 1),), dp.delta) <= 1.0

    expected_small = sum(p for t, p in law.items() if not joins(int(train_part(np.array([t]), 0.1)[0]))) * BILLION
    assert dp.never_eligible == round(expected_small) > 0
    # Admission works per sampled device, from its own size.
    cohort = sample_cohort(population=BILLION, cohort_size=200, method="fixed", rng=np.random.default_rng([0, 1]))
    admitted = dp.admit(cohort)
    assert admitted == [d for d in cohort if joins(dataset.num_examples(d))] and 0 < len(admitted) < 200


# ----------------------------------------------------------------------------- refusing what would not fit


def test_a_billion_synthetic_devices_need_no_population_memory() -> None:
    fp = footprint(from_dict({"population": BILLION}))
    assert fp.per_process == 0 and fp.server_only == 0
    check_fits(from_dict({"population": BILLION, "privacy": {"dpsgd": {}, "dpfedavg": {}}}), memory=4 * GiB)


def test_population_state_over_memory_is_refused_naming_the_key_and_the_estimate() -> None:
    v1 = from_dict({"population": BILLION, "dataset": {"name": "synthetic", "recipe_version": 1}})
    with pytest.raises(ConfigError) as err:
        check_fits(v1, memory=24 * GiB)
    line = str(err.value)
    assert line.startswith("config key 'dataset.recipe_version'") and "\n" not in line
    assert "GiB in each process" in line and "allowed: 2" in line
    # The same population of an index-keeping dataset: refused on the population.
    with pytest.raises(ConfigError, match=r"^config key 'population': .* GiB .*allowed: population <= "):
        check_fits(from_dict({"population": BILLION, "dataset": {"name": "fashion_mnist"}}), memory=8 * GiB)
    # A DP-SGD ledger over every device that ever trains: refused on the rounds, with the bound.
    ledger = from_dict({"population": BILLION, "rounds": 1_000_000, "cohort": {"size": 1000}, "privacy": {"dpsgd": {}}})
    with pytest.raises(ConfigError) as err:
        check_fits(ledger, memory=24 * GiB)
    assert str(err.value).startswith("config key 'rounds': 1000000:") and "privacy ledger" in str(err.value)
    bound = int(str(err.value).split("rounds <= ")[1].split()[0].replace(",", ""))
    fits = from_dict({"population": BILLION, "rounds": bound, "cohort": {"size": 1000}, "privacy": {"dpsgd": {}}})
    check_fits(fits, memory=24 * GiB)  # the bound it names is allowed ...
    fits.rounds = bound + 10 * GiB // (LEDGER_BYTES_PER_DEVICE * 1000)
    with pytest.raises(ConfigError):
        check_fits(fits, memory=24 * GiB)  # ... and well past it is not
    assert machine_memory() > GiB


def test_recipe_version_and_its_size_table_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'dataset.recipe_version': unknown version 3; allowed: 1, 2$"):
        from_dict({"dataset": {"name": "synthetic", "recipe_version": 3}})
    big = {"name": "synthetic", "size_max": 2_000_000}
    with pytest.raises(ConfigError, match=r"^config key 'dataset.size_max': at most dataset.size_min \+ 1,000,000"):
        from_dict({"dataset": big})
    assert from_dict({"dataset": big | {"recipe_version": 1}}).dataset.size_max == 2_000_000


def test_cli_refuses_a_run_that_would_not_fit_in_one_line_before_it_starts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "population=1000000000", "dataset.recipe_version=1", f"hydra.run.dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: config key 'dataset.recipe_version'"), proc.stderr
    assert "GiB" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_peak_memory_is_the_process_own_not_its_large_parent(tmp_path: Path) -> None:
    # The launcher (here pytest) may be large when it starts fedsim; Linux's ru_maxrss would report
    # the parent's size in the child (it survives exec): the reported peak must be the child's.
    child = "from fedsim.capacity import peak_rss_mb; print(peak_rss_mb())"
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB resident in this process
    out = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 1 < float(out.stdout) < 300, out.stdout
    assert ballast.sum() == ballast.size


# ----------------------------------------------------------------------------- delta against 1/N


def test_a_user_level_delta_not_below_one_over_the_population_is_flagged() -> None:
    from fedsim.privacy.dpfedavg import UserLevelDP

    def check(population: int, **dpfedavg) -> dict:
        cfg = from_dict({"population": population, "cohort": {"size": 50},
                         "privacy": {"dpfedavg": {"noise_multiplier": 1.0, "delta": 1e-5, **dpfedavg}}})  # fmt: skip
        return UserLevelDP(cfg).delta_check()

    assert "warning" not in check(1000) and check(1000)["delta_times_population"] == pytest.approx(0.01)
    at_platform = check(BILLION)
    assert at_platform["delta_times_population"] == pytest.approx(1e4)
    assert "about 10,000 devices" in at_platform["warning"] and "e.g. 1e-10" in at_platform["warning"]
    # noise_cohort_size simulates a deployment with the same q = m/N: N' = N M'/m = 20,000 x 1000/50.
    simulated = check(20_000, noise_cohort_size=1000)
    assert simulated["population"] == 400_000 and "simulated deployment" in simulated["warning"]
    assert "warning" not in check(20_000, noise_cohort_size=1000, delta=1e-7)


# ----------------------------------------------------------------------------- whole runs at 10^9


@pytest.mark.ray
@pytest.mark.parametrize(
    "privacy", [pytest.param("none", marks=pytest.mark.slow), "[dpsgd_target,dpfedavg]"]
)  # the private run holds everything the plain one does, plus the per-device ledger
def test_runs_over_a_billion_devices_keep_every_process_under_1_gib(tmp_path: Path, privacy: str) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "fedsim", "population=1000000000", "rounds=2", "cohort.size=20",
            f"privacy={privacy}", "dataset.eval_devices=20", "simulation.num_workers=2", "output.progress=false",
            f"output.dir={out}", f"hydra.run.dir={out}", f"simulation.ray_temp_dir={tmp_path / 'ray'}",
        ],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["devices_trained"] > 0 for r in rows)
    # ru_maxrss of the server process and of each worker process (the largest they reported).
    assert 0 < summary["server_peak_rss_mb"] < 1024, summary["server_peak_rss_mb"]
    assert 0 < max(r["worker_peak_rss_mb"] for r in rows) < 1024, rows
    if privacy != "none":
        assert summary["privacy"]["sample_level"]["devices_accounted"] == sum(r["devices_trained"] for r in rows)
        # Noise was added; epsilon itself is 0.0 here at delta 1e-5 (q = 2e-8 amplifies it away).
        assert rows[-1]["user_noise_std"] > 0 and rows[-1]["user_epsilon"] >= 0.0
        # ...but delta 1e-5 against 10^9 devices is no guarantee: said at the start and in summary.json.
        check = summary["privacy"]["user_level"]["delta_vs_population"]
        assert check["delta_times_population"] == pytest.approx(1e4) and "e.g. 1e-10" in check["warning"]
        assert "privacy.dpfedavg.delta = 1e-05 is not below 1/population" in proc.stdout + proc.stderr
