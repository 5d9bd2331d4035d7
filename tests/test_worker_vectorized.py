"""The vectorized worker path: same reports as one by one (to float rounding), groups cut from
the cohort alone, and a run that is bit-identical whatever the number of workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clients import flat_params
from fedsim import wire
from fedsim.config import from_dict
from fedsim.errors import ConfigError
from fedsim.models import build_model
from fedsim.placement import assign_devices
from fedsim.reports import DeviceReport
from fedsim.worker import Worker, keep_in_groups, split_groups, use_vectorized
from helpers import set_keys

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

DEVICES = [1, 4, 5, 9, 12, 17, 22, 30]
GROUPS = [3, 3, 2]


def worker_config(vectorize: str, **over: object) -> dict:
    raw: dict = {
        "seed": 7,
        "population": 40,
        "cohort": {"size": 8},
        "dataset": {"name": "synthetic", "size_max": 60},
        "model": {"name": "mlp", "hidden_sizes": [16]},
        "algorithm": {"batch_size": 10, "local_epochs": 2, "momentum": 0.9},
        "simulation": {"vectorize": vectorize},
    }
    return set_keys(raw, over)


def both(clip_norm: float | None = None, **over: object) -> tuple[DeviceReport, DeviceReport]:
    """The same job trained one by one and vectorized (groups of 3, 3, 2)."""
    off = Worker(from_dict(worker_config("off", **over)))
    on = Worker(from_dict(worker_config("on", **over)))
    assert off.vectorized is None and on.vectorized is not None
    start = flat_params(off.model)
    a = off.train(start, 2, DEVICES, groups=GROUPS, clip_norm=clip_norm)
    b = on.train(start, 2, DEVICES, groups=GROUPS, clip_norm=clip_norm)
    return a, b


def assert_same_report(a: DeviceReport, b: DeviceReport) -> None:
    assert b.device_ids == a.device_ids and b.failed_ids == a.failed_ids and b.failures == a.failures
    assert b.num_examples == a.num_examples and b.within_bound == a.within_bound
    assert b.dp_events == a.dp_events
    assert len(b.clip_fractions) == len(a.clip_fractions)
    np.testing.assert_allclose(b.clip_fractions, a.clip_fractions, atol=0.02)  # a norm right at C could flip
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-5)
    assert len(b.updates) == len(a.updates) > 0
    for ua, ub in zip(a.updates, b.updates, strict=True):
        torch.testing.assert_close(torch.from_numpy(ub), torch.from_numpy(ua), rtol=1e-5, atol=1e-6)
    # The tolerance is far tighter than the difference between two devices' updates.
    assert np.abs(a.updates[0] - a.updates[1]).max() > 1e-3


def test_vectorized_worker_matches_one_by_one_plain() -> None:
    a, b = both()
    assert_same_report(a, b)
    assert not a.failed_ids


def test_vectorized_worker_matches_one_by_one_with_dpsgd() -> None:
    a, b = both(**{"privacy.dpsgd": {"noise_multiplier": 0.8, "max_grad_norm": 4.0}})  # some clipped, some not
    assert len(b.dp_events) == len(DEVICES) and 0 < np.mean(b.clip_fractions) < 1
    assert_same_report(a, b)


def test_vectorized_worker_matches_one_by_one_with_user_level_clipping() -> None:
    a, b = both(clip_norm=0.05)
    assert len(b.within_bound) == len(DEVICES) and not all(b.within_bound)
    assert_same_report(a, b)
    assert all(np.linalg.norm(u) <= 0.05 * (1 + 1e-6) for u in b.updates)


def test_injected_failures_leave_the_group_and_keep_the_report_order(monkeypatch: pytest.MonkeyPatch) -> None:
    over = {"faults.device_failure_rate": 0.35, "faults.nan_update_rate": 0.2}
    off = Worker(from_dict(worker_config("off", **over)))
    on = Worker(from_dict(worker_config("on", **over)))
    calls: list[int] = []
    fit_many = on.vectorized.fit_many  # type: ignore[union-attr]
    monkeypatch.setattr(on.vectorized, "fit_many", lambda g, datas, seeds: calls.append(len(datas)) or fit_many(g, datas, seeds))
    start = flat_params(off.model)
    a, b = off.train(start, 1, DEVICES, groups=GROUPS), on.train(start, 1, DEVICES, groups=GROUPS)
    assert any(f.startswith("RuntimeError: injected failure") for f in b.failures)
    assert 0 < len(b.device_ids) < len(DEVICES)
    assert sorted(b.device_ids + b.failed_ids) == DEVICES
    assert b.failed_ids == sorted(b.failed_ids) and b.device_ids == sorted(b.device_ids)
    # NaN updates are injected after training: both paths send the same rows (the server rejects them).
    nan = [d for d, u in zip(b.device_ids, b.updates, strict=True) if np.isnan(u).all()]
    assert nan == [d for d, u in zip(a.device_ids, a.updates, strict=True) if np.isnan(u).all()]
    keep = [i for i, u in enumerate(a.updates) if not np.isnan(u).any()]
    a.updates, b.updates = [a.updates[i] for i in keep], [b.updates[i] for i in keep]
    assert b.device_ids == a.device_ids and b.failures == a.failures and b.num_examples == a.num_examples
    for ua, ub in zip(a.updates, b.updates, strict=True):
        np.testing.assert_allclose(ub, ua, rtol=1e-5, atol=1e-6)
    # Failed devices were left out of their group before training: fit_many saw only the others.
    survivors = [sum(d not in b.failed_ids for d in g) for g in split_groups(DEVICES, GROUPS)]
    assert calls == [n for n in survivors if n > 1]


def test_without_groups_a_vectorized_worker_trains_one_by_one() -> None:
    off = Worker(from_dict(worker_config("off")))
    on = Worker(from_dict(worker_config("on")))
    start = flat_params(off.model)
    a, b = off.train(start, 1, DEVICES), on.train(start, 1, DEVICES)
    for ua, ub in zip(a.updates, b.updates, strict=True):
        assert np.array_equal(ua, ub)  # each device alone: the same trainer, bit for bit


def test_group_helpers() -> None:
    assert split_groups([1, 2, 3, 4, 5], [2, 3]) == [[1, 2], [3, 4, 5]]
    assert split_groups([1, 2], None) == [[1], [2]]
    with pytest.raises(ValueError, match="partition"):
        split_groups([1, 2, 3], [2, 2])
    assert keep_in_groups([1, 2, 3, 4, 5], [2, 3], {2, 3, 5}) == [1, 2]
    assert keep_in_groups([1, 2, 3, 4, 5], [2, 3], {4}) == [1]
    assert keep_in_groups([1, 2], None, {1}) is None


# ----------------------------------------------------------------------------- the decision


def test_use_vectorized_decides_from_the_config() -> None:
    def decide(vectorize: str, **over: object) -> tuple[bool, str]:
        cfg = from_dict(worker_config(vectorize, **over))
        model = build_model(cfg.model, (60,), 10, seed=0)
        return use_vectorized(cfg, model)

    assert decide("off") == (False, "simulation.vectorize=off")
    assert decide("on")[0] and decide("auto")[0]  # a small MLP
    big = {"model.hidden_sizes": [512, 128]}  # > 50,000 parameters
    assert not decide("auto", **big)[0] and "parameters" in decide("auto", **big)[1]
    assert decide("on", **big)[0]
    assert decide("auto", **big, **{"privacy.dpsgd": {"noise_multiplier": 1.0}})[0]  # DP-SGD: always worth it
    assert not decide("on", **{"simulation.layout": "classic"})[0]  # one device per worker


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_the_models_that_skip_the_trial_step_do_vmap(activation: str) -> None:
    """use_vectorized skips its trial vectorized step for VMAP_TESTED_MODELS (it costs ~2 s of
    torch start-up in the server): each of them must pass that trial, with DP-SGD too."""
    from clients import DPSGDConfig
    from clients.vectorized import vectorizable
    from fedsim.config import ModelConfig
    from fedsim.worker import VMAP_TESTED_MODELS

    shapes = {"logreg": (60,), "mlp": (60,), "cnn": (1, 28, 28), "auto": (1, 28, 28), "scatternet": (1, 28, 28)}
    assert set(VMAP_TESTED_MODELS) == set(shapes)
    for name, shape in shapes.items():
        model = build_model(ModelConfig(name=name, cnn_channels=[8, 8], cnn_dense=16, activation=activation), shape, 10, seed=0)
        example = (torch.randn(2, *shape), torch.tensor([1, 3]))
        for dp in (None, DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)):
            assert vectorizable(model, None, dp, example=example) is None, (name, dp)


def test_vectorize_on_with_a_model_it_cannot_train_is_a_config_error() -> None:
    cfg = from_dict(worker_config("on"))
    model = torch.nn.Sequential(torch.nn.Linear(60, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 10))
    with pytest.raises(ConfigError, match="simulation.vectorize.*dropout"):
        use_vectorized(cfg, model)
    used, why = use_vectorized(from_dict(worker_config("auto")), model)
    assert not used and "dropout" in why


# ----------------------------------------------------------------------------- the groups


def test_groups_depend_on_the_cohort_only_and_workers_get_whole_groups() -> None:
    cohort = sorted(np.random.default_rng(0).choice(1000, size=50, replace=False).tolist())
    # ceil(50 / 8) = 7, rounded up to an even count: 8 near-equal groups
    expected = [g.tolist() for g in np.array_split(np.asarray(cohort), 8)]
    for workers in (1, 2, 3, 10):
        nodes = list(range(100, 100 + workers))
        plan = assign_devices(cohort, nodes, "multiplexed", 8)
        got = [g for part in plan for g in split_groups(part[1], part.groups)]
        assert got == expected, workers  # the same groups, in cohort order, for any worker count
        assert [node for node, _ in plan] == nodes[: len(plan)]
        counts = [len(part.groups) for part in plan]
        assert max(counts) - min(counts) <= 1 and len(plan) == min(workers, 8)
    # Without groups: today's assignment, near-equal contiguous chunks.
    plain = assign_devices(cohort, [1, 2, 3], "multiplexed")
    assert plain == [(n, c.tolist()) for n, c in zip([1, 2, 3], np.array_split(np.asarray(cohort), 3), strict=True)]
    assert all(part.groups is None for part in plain)
    assert assign_devices([0, 2], [100, 101, 102], "classic", 8) == [(100, [0]), (102, [2])]
    assert assign_devices([], [1, 2], "multiplexed", 8) == []


def test_groups_travel_in_the_job() -> None:
    params = np.zeros(3, dtype=np.float32)
    job = wire.read_job(wire.write_job(round_num=1, device_ids=[4, 5, 6], config_json="{}", global_params=params, groups=[2, 1]))
    assert job.groups == [2, 1]
    assert wire.read_job(wire.write_job(round_num=1, device_ids=[4], config_json="{}", global_params=params)).groups is None
    with pytest.raises(ValueError, match="partition"):
        wire.write_job(round_num=1, device_ids=[4, 5], config_json="{}", global_params=params, groups=[3])


# ----------------------------------------------------------------------------- end to end


def sim_config(tmp: Path, **over: object) -> dict:
    raw: dict = {
        "seed": 3,
        "population": 40,
        "rounds": 2,
        "cohort": {"size": 16, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 60},
        "model": {"name": "mlp", "hidden_sizes": [16]},
        "simulation": {"num_workers": 1, "ray_temp_dir": str(tmp / "ray"), "vectorize": "on", "device_group": 4},
        "output": {"progress": False},
    }
    return set_keys(raw, over)


@pytest.mark.ray
def test_vectorized_run_is_bit_identical_with_one_or_two_workers(tmp_path: Path) -> None:
    from fedsim.run import run

    from fake_grid import run_local

    # Ray with 2 workers; the 1-worker runs on the in-process grid (same ClientApp, no Ray start-up).
    two = run(from_dict(sim_config(tmp_path, **{"simulation.num_workers": 2})), tmp_path / "two")
    one = run_local(from_dict(sim_config(tmp_path)), tmp_path / "one")
    off = run_local(from_dict(sim_config(tmp_path, **{"simulation.vectorize": "off"})), tmp_path / "off")
    assert one["model_sha256"] == two["model_sha256"]
    params = {name: torch.load(tmp_path / name / "model.pt", weights_only=False)["flat_params"] for name in ("one", "off")}
    # The groups reached the workers (batched kernels round differently from one by one) ...
    assert not torch.equal(params["one"], params["off"])
    # ... and the models agree to float tolerance.
    torch.testing.assert_close(params["one"], params["off"], rtol=0, atol=1e-4)
    assert one["final_test_accuracy"] == pytest.approx(off["final_test_accuracy"], abs=0.02)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["devices_trained"] == 16 and r["devices_failed"] == 0 for r in rows)


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_dpsgd_devices_take_q_steps_and_count_from_the_server_s_count(monkeypatch: pytest.MonkeyPatch, vectorize: str) -> None:
    """A device whose data holds one example more than the count the server has for it (the
    add-one neighbour) runs and reports the same event and count: nothing in the report
    follows the private data's size (Worker.public_examples)."""
    over = {"privacy.dpsgd.noise_multiplier": 1.0, "privacy.dpsgd.max_grad_norm": 1.0, "algorithm.momentum": 0.0}
    worker = Worker(from_dict(worker_config(vectorize, **over)))
    start = flat_params(worker.model)
    before = worker.train(start, 2, DEVICES, groups=GROUPS)
    real = worker.dataset.device_data

    def one_more(device_id: int):
        x, y = real(device_id)
        return torch.cat([x, x[:1]]), torch.cat([y, y[:1]])

    monkeypatch.setattr(worker.dataset, "device_data", one_more)
    after = worker.train(start, 2, DEVICES, groups=GROUPS)
    assert after.dp_events == before.dp_events and after.num_examples == before.num_examples
    assert before.num_examples == [worker.dataset.num_examples(d) for d in DEVICES]
    # The data did change: some update differs.
    assert any(not np.array_equal(a, b) for a, b in zip(before.updates, after.updates, strict=True))


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_a_dpsgd_device_that_lost_every_example_still_trains(monkeypatch: pytest.MonkeyPatch, vectorize: str) -> None:
    """The remove-one neighbour of a one-example device has no data: it must run its noise-only
    steps (alone, outside the batched trainer) rather than fail where the server sees it."""
    over = {"privacy.dpsgd.noise_multiplier": 1.0, "privacy.dpsgd.max_grad_norm": 1.0, "algorithm.momentum": 0.0}
    worker = Worker(from_dict(worker_config(vectorize, **over)))
    start = flat_params(worker.model)
    before = worker.train(start, 2, DEVICES, groups=GROUPS)
    real = worker.dataset.device_data
    monkeypatch.setattr(worker.dataset, "device_data", lambda d: (lambda x, y: (x[:0], y[:0]))(*real(d)) if d == DEVICES[1] else real(d))
    after = worker.train(start, 2, DEVICES, groups=GROUPS)
    assert not after.failed_ids and after.device_ids == before.device_ids
    assert after.dp_events == before.dp_events and after.num_examples == before.num_examples
