"""simulation.device: training on a GPU where there is one. The device path is the same code as
the CPU's (moves that are no-ops there), so it runs here on the CPU for equality, and again on
CUDA where torch sees a GPU (skipped cleanly otherwise)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clients import DPSGDConfig, LocalTrainer, TrainConfig, evaluate, flat_params
from clients.vectorized import VectorizedTrainer
from fedsim.config import from_dict
from fedsim.errors import ConfigError
from fedsim.run import gpus_per_worker
from fedsim.worker import Worker, worker_device

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 7 * 7, 5))


def _devices(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(12 + i, 1, 14, 14, generator=g), torch.randint(0, 5, (12 + i,), generator=g)) for i in range(n)]


@pytest.mark.parametrize("device", DEVICES)
def test_local_training_on_a_device_equals_the_cpus(device: str) -> None:
    config = TrainConfig(lr=0.1, batch_size=4, momentum=0.9, proximal_mu=0.01)
    start = flat_params(_model())
    data = _devices(1)[0]
    cpu = LocalTrainer(_model(), config).fit(start, data, seed=5)
    trainer = LocalTrainer(_model().to(device), config)
    there = trainer.fit(start, data, seed=5, correction=torch.full_like(start, 1e-3))
    again = LocalTrainer(_model(), config).fit(start, data, seed=5, correction=torch.full_like(start, 1e-3))
    assert there.update.device.type == "cpu" and there.num_examples == cpu.num_examples
    if device == "cpu":
        assert torch.equal(there.update, again.update)
    torch.testing.assert_close(there.update, again.update, rtol=1e-4, atol=1e-5)
    result = evaluate(trainer.model, data)
    assert result["num_examples"] == len(data[1]) and 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dp", [None, DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)])
def test_vectorized_cohorts_on_a_device_equal_the_cpus(device: str, dp: DPSGDConfig | None) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(196, 16), nn.Tanh(), nn.Linear(16, 5))
    config = TrainConfig(lr=0.1, batch_size=4, momentum=0.9)
    start = flat_params(model)
    cpu = VectorizedTrainer(model, config, dp).fit_many(start, _devices(), seeds=list(range(6)))
    moved = nn.Sequential(nn.Flatten(), nn.Linear(196, 16), nn.Tanh(), nn.Linear(16, 5))
    moved.load_state_dict(model.state_dict())
    there = VectorizedTrainer(moved.to(device), config, dp).fit_many(start, _devices(), seeds=list(range(6)))
    for a, b in zip(cpu, there, strict=True):
        assert b.update.device.type == "cpu"
        if device == "cpu":
            assert torch.equal(a.update, b.update) and a.metrics == b.metrics
        torch.testing.assert_close(b.update, a.update, rtol=1e-4, atol=1e-5)
        assert (a.privacy is None) == (dp is None) and a.privacy == b.privacy


def _config(device: str) -> dict:
    return {"seed": 1, "population": 20, "cohort": {"size": 4}, "dataset": {"name": "synthetic", "size_max": 30},
            "model": {"name": "mlp", "hidden_sizes": [8]}, "simulation": {"device": device}}  # fmt: skip


def test_workers_train_where_simulation_device_says_and_cuda_without_a_gpu_is_one_clear_error() -> None:
    assert worker_device(from_dict(_config("cpu"))).type == "cpu"
    assert worker_device(from_dict(_config("auto"))).type == ("cuda" if HAS_CUDA else "cpu")
    cfg = from_dict(_config("auto"))
    worker = Worker(cfg)
    assert next(worker.model.parameters()).device == worker.device
    assert gpus_per_worker(from_dict(_config("cpu"))) == 0.0
    if HAS_CUDA:
        assert 0 < gpus_per_worker(cfg) <= 1
        return
    assert gpus_per_worker(cfg) == 0.0
    for call in (worker_device, gpus_per_worker):
        with pytest.raises(ConfigError, match="simulation.device") as err:
            call(from_dict(_config("cuda")))
        assert "allowed here: auto, cpu" in str(err.value)
    with pytest.raises(ConfigError, match="simulation.device"):
        from_dict(_config("tpu"))
