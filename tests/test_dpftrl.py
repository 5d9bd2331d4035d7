"""DP-FTRL (privacy.dpfedavg.noise=tree): the tree's noise, its accounting checked against
independent computations (an explicit node matrix, dp-accounting's Gaussian PLD, and the
distinguishability measured from the released noise itself), and a run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fake_grid import run_local
from fedsim.config import from_dict, validate
from fedsim.errors import ConfigError
from fedsim.privacy import tree
from fedsim.sampling import cyclic_period, sample_cohort


def test_decomposition_and_released_nodes() -> None:
    assert tree.decomposition(6) == [(2, 0), (1, 2)]  # [1..4] + [5..6]
    assert tree.decomposition(7) == [(2, 0), (1, 2), (0, 6)]
    assert [list(tree.node_rounds(n)) for n in tree.decomposition(5)] == [[1, 2, 3, 4], [5]]
    # [2] and [3, 4] are never a part of a prefix: never drawn, never released
    assert tree.released_nodes(4) == {(0, 0), (1, 0), (0, 2), (2, 0)}


def node_matrix(horizon: int) -> np.ndarray:
    """Released nodes x rounds: A[v, r] = 1 if round r is in node v (built from the ranges alone)."""
    nodes = sorted(tree.released_nodes(horizon))
    a = np.zeros((len(nodes), horizon))
    for i, node in enumerate(nodes):
        for r in tree.node_rounds(node):
            a[i, r - 1] = 1
    return a


@pytest.mark.parametrize("horizon", [1, 5, 8, 13])
def test_sensitivity_is_the_norm_of_the_device_column_sum(horizon: int) -> None:
    rng = np.random.default_rng(horizon)
    a = node_matrix(horizon)
    for _ in range(30):
        rounds = sorted(rng.choice(horizon, size=rng.integers(1, horizon + 1), replace=False) + 1)
        x = np.zeros(horizon)
        x[np.array(rounds) - 1] = 1.0  # aligned contributions of norm C = 1: the worst case
        assert tree.sensitivity_squared([int(r) for r in rounds], horizon) == pytest.approx(float(np.sum((a @ x) ** 2)))


def test_cyclic_worst_case_matches_the_schedule_fedsim_samples() -> None:
    population, size, rounds, restart = 20, 5, 11, 6  # a cycle of 4 rounds, trees of 6
    period = cyclic_period(population, size)
    per_device: dict[int, list[int]] = {}
    for r in range(1, rounds + 1):
        for d in sample_cohort(population=population, cohort_size=size, method="cyclic", rng=np.random.default_rng(), round_num=r):
            per_device.setdefault(d, []).append(r)
    assert all(len(v) == len(per_device[0]) or abs(len(v) - len(per_device[0])) == 1 for v in per_device.values())
    worst = 0.0
    for rounds_of in per_device.values():
        total = 0.0
        for start in range(0, rounds, restart):
            end = min(start + restart, rounds)
            x = np.zeros(end - start)
            for r in rounds_of:
                if start < r <= end:
                    x[r - start - 1] = 1
            total += float(np.sum((node_matrix(end - start) @ x) ** 2))
        worst = max(worst, total)
    assert tree.cyclic_mu_squared(horizon=rounds, restart_every=restart, period=period) == pytest.approx(worst)


def test_gdp_conversion_matches_dp_accounting_gaussian() -> None:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    for mu, delta in [(0.5, 1e-5), (1.3, 1e-6), (3.0, 1e-5)]:
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        acc.compose(dp_accounting.GaussianDpEvent(noise_multiplier=1.0 / mu))
        theirs = acc.get_epsilon(delta)
        ours = tree.gdp_epsilon(mu, delta)
        assert ours == pytest.approx(theirs, rel=2e-3)
        assert ours <= theirs + 1e-9  # theirs is pessimistic (discretised upward)
        assert tree.gdp_mu(ours, delta) == pytest.approx(mu, rel=1e-6)


def test_residuals_telescope_to_the_prefix_noise_also_over_skipped_rounds() -> None:
    draws: dict[tuple[int, int, int], torch.Tensor] = {}

    def node(t: int, level: int, index: int) -> torch.Tensor:
        assert (t, level, index) not in draws, "a node is drawn once"
        draws[(t, level, index)] = torch.randn(3, dtype=torch.float64)
        return draws[(t, level, index)]

    noise = tree.TreeNoise(8, node)
    released = [1, 2, 3, 5, 6, 8, 9, 10, 16, 17]  # 4 and 7 released nothing; trees restart at 9 and 17
    total = {}
    for r in released:
        tid = (r - 1) // 8
        total[tid] = total.get(tid, 0) + noise.residual(r)
        t = (r - 1) % 8 + 1
        prefix = sum(draws[(tid, *n)] for n in tree.decomposition(t))
        assert torch.allclose(total[tid], prefix, atol=1e-12), r
    with pytest.raises(ValueError, match="released already"):
        noise.residual(16)


def test_measured_distinguishability_equals_the_accounted_mu() -> None:
    """The attack: the best test between 'device in' and 'device out' given the released
    residuals is the Gaussian likelihood ratio, whose power is set by the Mahalanobis distance
    sqrt(d' Sigma^-1 d) of the device's contribution d under the releases' noise covariance
    Sigma. Sigma is measured here from TreeNoise's own output (20,000 coordinates as trials):
    a noise that cancels or is reused across rounds would show as a distance above the mu the
    accountant reports."""
    horizon, z = 8, 1.7
    gen = torch.Generator().manual_seed(0)

    def node(t: int, level: int, index: int) -> torch.Tensor:
        return torch.randn(20_000, dtype=torch.float64, generator=gen) * z

    noise = tree.TreeNoise(horizon, node)
    releases = torch.stack([noise.residual(r) for r in range(1, horizon + 1)]).numpy()  # [rounds, trials]
    sigma = np.cov(releases)
    for rounds in ([3], [1, 5], [2, 4, 6, 8], list(range(1, 9))):
        d = np.zeros(horizon)
        d[np.array(rounds) - 1] = 1.0
        measured = math.sqrt(d @ np.linalg.solve(sigma, d))
        accounted = math.sqrt(tree.sensitivity_squared(rounds, horizon)) / z
        assert measured == pytest.approx(accounted, rel=0.05), rounds


def config(tmp: Path, **dpfedavg: object) -> dict:
    return {
        "seed": 2,
        "population": 40,
        "rounds": 6,
        "cohort": {"size": 10, "sampling": "cyclic"},
        "dataset": {"name": "synthetic", "size_max": 40},
        "model": {"name": "logreg"},
        "privacy": {"dpfedavg": {"noise": "tree", "clip_norm": 0.5, "noise_multiplier": 2.0, **dpfedavg}},
        "simulation": {"num_workers": 1, "ray_temp_dir": str(tmp / "ray")},
        "output": {"progress": False},
    }


def test_dpftrl_run_reports_the_independently_computed_epsilon(tmp_path: Path) -> None:
    summary = run_local(from_dict(config(tmp_path)), tmp_path / "run")
    user = summary["privacy"]["user_level"]
    assert user["mechanism"].startswith("DP-FTRL")
    # 4 rounds a cycle (40 / 10), one tree per cycle: trees [1..4] and [5..6]; every device once per cycle
    worst = max(
        tree.sensitivity_squared([b + 1], 4) + (tree.sensitivity_squared([b + 1], 2) if b < 2 else 0) for b in range(4)
    )
    assert user["tree"]["mu_squared_times_z_squared"] == worst
    assert user["epsilon"] == pytest.approx(tree.gdp_epsilon(math.sqrt(worst) / 2.0, 1e-5), rel=1e-9)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["cohort_size"] for r in rows] == [10] * 6
    assert rows[-1]["user_noise"] == "tree"
    assert all(rows[i]["user_epsilon"] <= rows[i + 1]["user_epsilon"] for i in range(5))


def test_dpftrl_calibrates_z_to_the_target_and_resumes_bit_identically(tmp_path: Path) -> None:
    import shutil

    from fedsim.checkpoint import checkpoint_path

    raw = config(tmp_path, noise_multiplier=None, target_epsilon=3.0)
    raw["checkpoint"] = {"every": 2, "keep": 5}
    whole, part = tmp_path / "whole", tmp_path / "part"
    done = run_local(from_dict(raw), whole)
    assert done["privacy"]["user_level"]["epsilon"] == pytest.approx(3.0, rel=1e-6)
    shutil.copytree(whole, part)
    for leftover in [part / "summary.json", checkpoint_path(part, 4), checkpoint_path(part, 6)]:
        leftover.unlink()
    resumed = run_local(from_dict({**raw, "resume": str(part)}), part)  # resumes inside the second tree's start
    assert resumed["resumed_from_round"] == 2 and resumed["model_sha256"] == done["model_sha256"]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"cohort": {"size": 10, "sampling": "poisson"}}, "cohort.sampling"),
        ({"privacy": {"dpfedavg": {"noise": "tree", "adaptive_clipping": True}}}, "privacy.dpfedavg.adaptive_clipping"),
        ({"privacy": {"dpfedavg": {"noise": "tree", "noise_cohort_size": 1000}}}, "privacy.dpfedavg.noise_cohort_size"),
        ({"privacy": {"dpfedavg": {"noise": "central", "accountant": "rdp"}}}, "cohort.sampling"),  # cyclic needs tree
        # a sample-level budget stops the run at a round that depends on the devices' data
        ({"privacy": {"dpfedavg": {"noise": "tree"}, "dpsgd": {"target_epsilon": 4.0, "noise_multiplier": None}}},
         "privacy.dpsgd.target_epsilon"),
    ],
)
def test_dpftrl_refuses_what_its_accounting_does_not_cover(tmp_path: Path, change: dict, key: str) -> None:
    raw = config(tmp_path)
    raw.update(change)
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        validate(from_dict(raw))


def test_resume_with_the_same_command_accepts_the_calibrated_noise() -> None:
    """`fedsim experiment=X resume=DIR` compares every key with the run's own config, where
    calibration filled in the noise multiplier the command leaves null: that is the same run.
    Another target is not."""
    from fedsim.run import changed_keys

    saved = {"privacy": {"dpfedavg": {"noise_multiplier": 1.37, "target_epsilon": 3.0}, "dpsgd": None}, "rounds": 6}
    same = {"privacy": {"dpfedavg": {"noise_multiplier": None, "target_epsilon": 3.0}, "dpsgd": None}, "rounds": 6}
    assert changed_keys(saved, same, None) == []
    other = {"privacy": {"dpfedavg": {"noise_multiplier": None, "target_epsilon": 4.0}, "dpsgd": None}, "rounds": 6}
    assert changed_keys(saved, other, None) == ["privacy.dpfedavg.noise_multiplier", "privacy.dpfedavg.target_epsilon"]


def test_secure_randomness_refuses_checkpoints_that_would_hold_the_open_nodes_noise(tmp_path: Path) -> None:
    from fedsim.server_app import prepare

    raw = config(tmp_path)
    raw["privacy"]["randomness"] = "secure"
    raw["checkpoint"] = {"every": 1}
    with pytest.raises(ConfigError, match="config key 'checkpoint.every'"):
        prepare(from_dict(raw))


def test_summary_states_zero_out_adjacency_and_the_replace_one_epsilon(tmp_path: Path) -> None:
    summary = run_local(from_dict(config(tmp_path, noise_multiplier=1.0)), tmp_path / "run")
    user = summary["privacy"]["user_level"]
    assert user["accountant"] == "gdp"
    assert user["assumes"]["adjacency"].startswith("zero-out")
    assert "no amplification" in user["assumes"]["sampling"]
    assert "tree node" in user["rounds_accounted"] and "Poisson" not in user["rounds_accounted"]
    mu = math.sqrt(user["tree"]["mu_squared_times_z_squared"]) / 1.0
    assert user["epsilon_replace_one"] == pytest.approx(tree.gdp_epsilon(2 * mu, 1e-5), rel=1e-9)
    assert user["epsilon_replace_one"] > user["epsilon"]


def test_gdp_conversion_does_not_overflow_at_large_mu() -> None:
    eps = tree.gdp_epsilon(40.0, 1e-5)  # e^epsilon overflows a float in the direct formula
    assert math.isfinite(eps) and eps > 40 * 40 / 2 - 1
    assert tree.gdp_delta(2000.0, 1.0) == 0.0
    assert tree.gdp_mu(800.0, 1e-5) > 30  # a large target: no overflow


def test_prepare_leaves_the_given_config_alone_and_records_the_calibrated_noise(tmp_path: Path) -> None:
    """Calibration is a derived value (fedsim.runstate): the caller's config keeps null, the run's
    config.yaml and summary.json carry the solved z."""
    import yaml

    from fedsim.server_app import prepare

    cfg = from_dict(config(tmp_path, noise_multiplier=None, target_epsilon=3.0))
    setup = prepare(cfg)
    assert cfg.privacy.dpfedavg.noise_multiplier is None
    z = setup.derived["privacy.dpfedavg.noise_multiplier"]
    assert z > 0
    summary = run_local(cfg, tmp_path / "run")
    assert summary["derived"] == {"privacy.dpfedavg.noise_multiplier": z}
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["privacy"]["dpfedavg"]["noise_multiplier"] == z
    assert cfg.privacy.dpfedavg.noise_multiplier is None
