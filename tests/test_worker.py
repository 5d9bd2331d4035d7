"""A worker in-process (no Flower, no Ray): DP-SGD events per device, no epsilon computed there."""

from __future__ import annotations

import pytest

from fedsim.config import from_dict
from fedsim.privacy import accountants
from fedsim.privacy.sample_level import dpsgd_event
from fedsim.worker import Worker


def test_dp_worker_reports_each_devices_event_and_never_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> float:
        raise AssertionError("a worker computed epsilon")

    monkeypatch.setattr(accountants.Accountant, "epsilon", forbidden)
    cfg = from_dict(
        {
            "population": 20,
            "cohort": {"size": 5},
            "dataset": {"name": "synthetic", "size_max": 80},
            "model": {"name": "mlp", "hidden_sizes": [8]},
            "algorithm": {"batch_size": 10, "local_epochs": 2},
            "privacy": {"dpsgd": {"noise_multiplier": 0.7, "max_grad_norm": 0.5}},
        }
    )
    worker = Worker(cfg)
    from clients import flat_params

    report = worker.train(flat_params(worker.model), round_num=1, device_ids=[3, 11, 17])
    assert report.device_ids == [3, 11, 17] and not report.failed_ids
    for device_id, (z, q, steps) in zip(report.device_ids, report.dp_events, strict=True):
        expected = dpsgd_event(
            num_examples=worker.dataset.num_examples(device_id), batch_size=10, local_epochs=2, noise_multiplier=0.7
        )
        # The server predicts each device's event from its size (budget checks before sampling).
        assert (z, q, steps) == (expected.noise_multiplier, expected.sample_rate, expected.steps)
    assert all(0.0 <= c <= 1.0 for c in report.clip_fractions)


def test_stragglers_miss_the_simulated_deadline_deterministically() -> None:
    raw = {
        "population": 40,
        "cohort": {"size": 5},
        "dataset": {"name": "synthetic", "examples_per_device": 50},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "faults": {"straggler_rate": 0.3, "straggler_slowdown": 10.0, "seconds_per_example": 0.01, "round_deadline_s": 1.0},
    }
    worker = Worker(from_dict(raw))
    from clients import flat_params

    ids = list(range(40))
    first = worker.train(flat_params(worker.model), round_num=1, device_ids=ids)
    again = worker.train(flat_params(worker.model), round_num=1, device_ids=ids)
    # 45 training examples x 0.01 s = 0.45 s on time; a straggler takes 4.5 s > 1 s deadline.
    assert 0 < len(first.failed_ids) < 40 and first.failed_ids == again.failed_ids
    assert all(f.startswith("DeadlineMissed") for f in first.failures)
    assert sorted(first.device_ids + first.failed_ids) == ids
