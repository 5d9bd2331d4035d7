"""The audit catches a broken mechanism and stays below the accountant for the real one.

Fast tests drive the real mechanisms in process: UserLevelDP.aggregate (the server's noise)
with the audit's canary devices, and Worker.train (DP-SGD on devices, as a Ray worker runs it)
for the sample-level canary devices. Two runs on Flower's simulation engine check the wiring:
summary.json, metrics.jsonl, audit.json, `fedsim-audit`, and that the run itself is unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim import audit, canaries
from fedsim.audit import SampleLevelAudit, UserLevelAudit, score_user_level
from fedsim.config import from_dict
from fedsim.errors import ConfigError
from fedsim.models import build_model
from fedsim.privacy.dpfedavg import UserLevelDP
from fedsim.privacy.user_level import clip_update
from fedsim.worker import Worker


def user_cfg(target_epsilon: float, *, canaries: int = 1000, broken: str = "none", rounds: int = 20) -> object:
    return from_dict({
        "seed": 3, "population": 200, "rounds": rounds, "cohort": {"size": 20},
        "privacy": {"dpfedavg": {"noise_multiplier": None, "target_epsilon": target_epsilon}},
        "audit": {"canaries": canaries, "bootstrap": 0, "break_mechanism": broken},
    })  # fmt: skip


def simulate_dpfedavg(cfg, dim: int = 2000) -> tuple[dict, float]:
    """DP-FedAvg rounds through the server's own code (UserLevelDP.aggregate), with real devices
    whose updates share a drift, and the audit's canaries in the released sum."""
    user_dp = UserLevelDP(cfg)
    params = torch.zeros(dim)
    user = UserLevelAudit(cfg, params)
    rng = np.random.default_rng(0)
    drift = rng.standard_normal(dim)
    for round_num in range(1, cfg.rounds + 1):
        total = torch.zeros(dim, dtype=torch.float64)
        for _ in range(rng.binomial(cfg.population, cfg.cohort.size / cfg.population)):
            update = torch.from_numpy((drift + 2 * rng.standard_normal(dim)).astype(np.float32))
            total += clip_update(update, user_dp.clip_norm)[0].to(torch.float64)
        canaries, _ = user.canary_sum(round_num, user_dp.clip_norm)
        params = params + user_dp.aggregate(total + canaries, [], round_num)
        user.after_step(params)
    scored = score_user_level(user.statistics(params), delta=user_dp.user.delta, confidence=0.95, bootstrap=0, seed=0)
    return scored, user_dp.epsilon(user_dp.rounds_released)


@pytest.mark.parametrize("target", [2.0, 4.0, 8.0])
def test_user_level_lower_bound_stays_below_the_accountant_epsilon(target: float) -> None:
    scored, epsilon = simulate_dpfedavg(user_cfg(target))
    assert epsilon == pytest.approx(target, rel=0.02)
    for threat in ("all_rounds", "final_model"):
        assert 0.0 <= scored[threat]["epsilon_lower_bound"] <= epsilon


def test_user_level_audit_catches_noise_drawn_but_not_added(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSIM_ALLOW_BROKEN", "1")
    scored, claimed = simulate_dpfedavg(user_cfg(1.0, broken="no_noise"))
    assert claimed == pytest.approx(1.0, rel=0.02)  # the accountant does not see the bug
    assert scored["all_rounds"]["epsilon_lower_bound"] > 3 * claimed  # the audit does
    assert scored["all_rounds"]["epsilon_estimate"] > 10 * claimed


def test_canaries_are_unit_directions_sampled_with_the_devices_rate() -> None:
    cfg = user_cfg(4.0, canaries=500)
    user = UserLevelAudit(cfg, torch.zeros(300))
    assert torch.allclose(torch.linalg.vector_norm(user.directions, dim=1), torch.ones(1000), atol=1e-5)
    assert abs(user.included.mean() - 0.5) < 0.05
    total, count = user.canary_sum(1, 2.0)
    q = cfg.cohort.size / cfg.population
    assert abs(count - q * user.included.sum()) < 4 * math.sqrt(q * user.included.sum())
    sampled = np.flatnonzero(user.participations)
    assert set(sampled) <= set(np.flatnonzero(user.included))  # only inserted canaries ever join
    expected = (user.directions[sampled].to(torch.float64) * 2.0).sum(0)
    assert torch.allclose(total, expected, atol=1e-5)


def test_broken_mechanism_is_refused_without_the_test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSIM_ALLOW_BROKEN", raising=False)
    with pytest.raises(ConfigError, match="audit.break_mechanism"):
        user_cfg(1.0, broken="no_noise")


def test_audit_keys_name_the_mechanism_they_need() -> None:
    with pytest.raises(ConfigError, match="audit.canaries.*dpfedavg"):
        from_dict({"audit": {"canaries": 50}})
    with pytest.raises(ConfigError, match="audit.canary_examples.*dpsgd"):
        from_dict({"audit": {"canary_examples": 50}})
    with pytest.raises(ConfigError, match="audit.confidence"):
        from_dict({"audit": {"confidence": 1.5}})


# ----------------------------------------------------------------------------- sample level


def sample_cfg(sigma: float, *, broken: str = "none") -> object:
    return from_dict({
        "seed": 2, "population": 50, "rounds": 10, "cohort": {"size": 10},
        "dataset": {"name": "synthetic", "size_max": 40},
        "model": {"name": "mlp", "hidden_sizes": [32]},
        "algorithm": {"lr": 0.5, "local_epochs": 5},
        "privacy": {"dpsgd": {"noise_multiplier": sigma, "max_grad_norm": 1.0}},
        "audit": {"canary_examples": 400, "canary_devices": 20, "break_mechanism": broken},
        "simulation": {"vectorize": "off"},
    })  # fmt: skip


def simulate_dpsgd_canaries(cfg) -> tuple[dict, float]:
    """The canary devices train DP-SGD through Worker.train (the Ray worker's code), from the
    initial model each round; the server-side audit scores their updates."""
    worker = Worker(cfg)
    model = build_model(cfg.model, worker.dataset.input_shape, worker.dataset.num_classes, seed=cfg.seed)
    sample = SampleLevelAudit(cfg, worker.dataset, model)
    params = torch.cat([p.detach().reshape(-1) for p in worker.model.parameters()])
    for round_num in range(1, cfg.rounds + 1):
        ids = sample.sampled(round_num)
        if ids:
            report = worker.train(params, round_num, ids)
            assert not report.failed_ids, report.failures
            sample.score(params, [report])
    return sample.round_metrics(), sample.claimed_epsilon()


# The largest canary device's epsilon (synthetic recipe_version 2 device sizes; q and steps from its
# public count, filler + all 20 canary slots, not from how many canaries the draw included).
@pytest.mark.parametrize(("sigma", "epsilon"), [(2.4, 4.94), (3.8, 2.79)])
def test_sample_level_lower_bound_stays_below_the_accountant_epsilon(sigma: float, epsilon: float) -> None:
    metrics, claimed = simulate_dpsgd_canaries(sample_cfg(sigma))
    assert claimed == pytest.approx(epsilon, abs=0.1)
    assert metrics["audit_sample_epsilon_lower_bound"] <= claimed


def test_sample_level_audit_catches_noise_drawn_but_not_added(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSIM_ALLOW_BROKEN", "1")
    metrics, claimed = simulate_dpsgd_canaries(sample_cfg(100.0, broken="no_noise"))
    assert 0 < claimed < 0.2  # what the ledger is told: sigma 100
    assert metrics["audit_sample_epsilon_lower_bound"] > 5 * claimed


def test_canary_device_data_is_a_real_device_plus_its_included_canaries() -> None:
    cfg = sample_cfg(1.0)
    worker = Worker(cfg)
    x, y, included = canaries.canary_examples(cfg, worker.dataset.input_shape, worker.dataset.num_classes, worker.dataset.device_data(0)[0])
    for index in (0, 7):
        fx, fy = worker.dataset.device_data(canaries.filler_device(cfg, index))
        cx, cy = canaries.canary_device_data(cfg, worker.dataset, cfg.population + index)
        part = canaries.canary_slices(cfg)[index]
        keep = np.flatnonzero(included[part]) + part.start
        assert torch.equal(cx, torch.cat([fx, x[keep]])) and torch.equal(cy, torch.cat([fy, y[keep]]))


# ----------------------------------------------------------------------------- whole runs


def run_cfg(tmp: Path, **audit_keys: object) -> dict:
    return {
        "seed": 5, "population": 60, "rounds": 4, "cohort": {"size": 12},
        "dataset": {"name": "synthetic", "size_max": 40},
        "model": {"name": "mlp", "hidden_sizes": [16]},
        "privacy": {"dpsgd": {"noise_multiplier": 1.0}, "dpfedavg": {"noise_multiplier": 1.0}},
        "audit": audit_keys,
        "simulation": {"num_workers": 1, "ray_temp_dir": str(tmp / "ray")},
        "output": {"progress": False},
    }  # fmt: skip


@pytest.mark.ray
def test_audited_run_reports_both_audits_and_leaves_the_accounting_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fake_grid import run_local
    from fedsim.run import run

    plain = run_local(from_dict(run_cfg(tmp_path)), tmp_path / "plain")  # the audited run is the one on Ray
    audited = run(from_dict(run_cfg(tmp_path, canaries=50, canary_examples=40, canary_devices=8, bootstrap=50)), tmp_path / "audited")
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("plain", "audited")}
    # The accounting is untouched: the same user-level epsilon every round (a function of the
    # rounds alone); the ledger holds real devices only, one event per counted participation.
    assert [r["user_epsilon"] for r in rows["audited"]] == [r["user_epsilon"] for r in rows["plain"]]
    assert audited["privacy"]["user_level"]["epsilon"] == plain["privacy"]["user_level"]["epsilon"]
    ledger = json.loads((tmp_path / "audited" / "ledger.json").read_text())["devices"]
    assert all(int(d) < 60 for d in ledger)
    assert sum(count for entries in ledger.values() for *_, count in entries) == sum(r["devices_trained"] for r in rows["audited"])
    assert all(r["cohort_size"] <= 60 and r["devices_trained"] <= r["cohort_size"] for r in rows["audited"])
    assert "audit" not in plain and all("audit_user_epsilon_lower_bound" in r for r in rows["audited"])

    user, sample = audited["audit"]["user_level"], audited["audit"]["sample_level"]
    assert user["accountant_epsilon"] == audited["privacy"]["user_level"]["epsilon"]
    assert 0.0 <= user["all_rounds"]["epsilon_lower_bound"] <= user["accountant_epsilon"]
    lo, hi = user["all_rounds"]["interval"]
    assert lo <= user["all_rounds"]["epsilon_estimate"] <= hi
    assert sample["canary_devices_trained"] > 0 and sample["canaries"] == 40
    assert 0.0 <= sample["epsilon_lower_bound"] <= sample["accountant_epsilon"]
    assert audited["audit"]["broken_mechanism"] == "none"

    # fedsim-audit re-scores the saved run: the same numbers, the final model's cosines rechecked.
    capsys.readouterr()
    assert audit.main([str(tmp_path / "audited")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["final_model_rechecked"] is True
    assert again["user_level"]["all_rounds"]["epsilon_lower_bound"] == user["all_rounds"]["epsilon_lower_bound"]
    assert again["user_level"]["final_model"]["epsilon_estimate"] == pytest.approx(user["final_model"]["epsilon_estimate"], rel=1e-6)
    assert again["sample_level"]["epsilon_lower_bound"] == sample["epsilon_lower_bound"]


def test_an_audited_run_resumed_from_a_checkpoint_scores_the_canaries_of_the_whole_run(tmp_path: Path) -> None:
    import shutil

    from fake_grid import run_local

    raw = run_cfg(tmp_path, canaries=20, canary_examples=20, canary_devices=4, bootstrap=20)
    raw["checkpoint"] = {"every": 1, "keep": 10}
    whole, part = tmp_path / "whole", tmp_path / "part"
    done = run_local(from_dict(raw), whole)
    # The same run stopped after round 2: its directory as the round-2 checkpoint left it.
    shutil.copytree(whole, part)
    from fedsim.checkpoint import checkpoint_path

    for leftover in [part / "summary.json", part / "audit.json", checkpoint_path(part, 3), checkpoint_path(part, 4)]:
        leftover.unlink()
    assert checkpoint_rounds(part) == [1, 2]
    resumed = run_local(from_dict({**raw, "resume": str(part)}), part)
    assert resumed["resumed_from_round"] == 2 and resumed["model_sha256"] == done["model_sha256"]
    saved = [json.loads((d / "audit.json").read_text()) for d in (part, whole)]
    assert saved[0].pop("config")["resume"] and saved[1].pop("config")["resume"] is None
    assert saved[0] == saved[1]  # every canary's statistic, as the uninterrupted run saved it
    for level in ("user_level", "sample_level"):
        a, b = dict(done["audit"][level]), dict(resumed["audit"][level])
        assert a == b, level
    assert resumed["audit"]["user_level"]["canary_participations"] > 0


def checkpoint_rounds(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("round_*.pt"))


def test_fedsim_audit_on_a_run_without_an_audit_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "audit.json" in err[0]


def test_report_plots_accountant_against_audit_for_every_audited_run(tmp_path: Path) -> None:
    from analysis.audit_plot import audit_points, plot_audit
    from analysis.runs import Run

    def fake(name: str, audit_section: dict | None) -> Run:
        return Run(path=tmp_path / name, config={}, rounds=[], summary={"audit": audit_section} if audit_section else {}, name=name)

    runs = [
        fake("plain", None),
        fake("user", {"broken_mechanism": "none", "confidence": 0.95, "user_level": {
            "accountant_epsilon": 4.0, "all_rounds": {"epsilon_lower_bound": 0.5, "epsilon_estimate": 3.0, "interval": [1.0, "inf"]}}}),
        fake("broken", {"broken_mechanism": "no_noise", "confidence": 0.95, "sample_level": {
            "accountant_epsilon": 0.2, "epsilon_lower_bound": 1.4}}),
    ]  # fmt: skip
    points = audit_points(runs)
    assert [(p["run"], p["level"]) for p in points] == [("user", "user_level"), ("broken", "sample_level")]
    assert points[0]["interval"] == [1.0, math.inf] and points[1]["estimate"] is None
    files = plot_audit(runs, {r.name: "C0" for r in runs}, {r.name: r.name for r in runs}, tmp_path)
    assert all(f.exists() and f.stat().st_size > 1000 for f in files)
