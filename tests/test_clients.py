"""clients: the Flower-free client training API (params, LocalTrainer, train_local, evaluate)."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clients import (
    LocalTrainer,
    TrainConfig,
    evaluate,
    flat_params,
    load_flat_params,
    new_generator,
    num_params,
    train_local,
)
from helpers import PairDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models run several times slower with 2 threads on this machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(seed: int = 0, d: int = 10, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, classes))


def blobs(n: int, seed: int, d: int = 10, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian clusters: a linearly separable classification problem."""
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.eye(classes, d)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + 0.5 * torch.randn(n, d, generator=g)
    return x, y


# ----------------------------------------------------------------------------- params


def test_flat_params_roundtrip_order_and_copy() -> None:
    model = mlp()
    flat = flat_params(model)
    assert flat.dtype == torch.float32 and flat.dim() == 1
    assert flat.numel() == num_params(model) == 10 * 16 + 16 + 16 * 3 + 3
    assert torch.equal(flat[: 16 * 10], model[0].weight.detach().reshape(-1))  # parameters() order
    flat.zero_()  # a copy: the model is untouched
    assert model[0].weight.abs().sum() > 0
    load_flat_params(model, torch.arange(num_params(model), dtype=torch.float32))
    assert model[0].weight[0, 1].item() == 1.0 and model[2].bias[-1].item() == num_params(model) - 1
    assert model[0].weight.grad is None and model[0].weight.requires_grad


def test_load_flat_params_size_mismatch() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"expected 227 values.*got shape \(226,\)"):
        load_flat_params(model, torch.zeros(226))


class OddModel(nn.Module):
    """Any module shape works: a 3-d parameter, a frozen one, a buffer, a custom forward."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.full((2, 3, 4), 0.1))
        self.frozen = nn.Parameter(torch.ones(4), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(3))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bi,jki->bk", x * self.frozen, self.kernel)
        return self.scale * h + self.bias


def test_custom_module_frozen_params_are_left_out() -> None:
    model = OddModel()
    assert num_params(model) == 2 * 3 * 4 + 3
    x, y = blobs(40, seed=1, d=4)
    result = LocalTrainer(model, TrainConfig(lr=0.1, local_epochs=3)).fit(flat_params(model), (x, y), seed=0)
    assert result.update.shape == (27,) and result.update.abs().sum() > 0
    assert torch.equal(model.frozen, torch.ones(4))
    assert result.metrics["steps"] == 12


# ----------------------------------------------------------------------------- training


def test_training_lowers_loss_and_raises_accuracy() -> None:
    x, y = blobs(300, seed=0)
    test = blobs(300, seed=1)
    model = mlp()
    before = evaluate(model, test)
    result = train_local(model, (x, y), TrainConfig(lr=0.1, local_epochs=3), seed=0)
    after = evaluate(model, test)
    assert before["accuracy"] < 0.6 and after["accuracy"] > 0.98
    assert after["loss"] < 0.1 < 0.9 < before["loss"]
    assert result.num_examples == 300 and result.metrics["steps"] == 90
    assert result.metrics["loss"] < before["loss"]


def test_same_seed_bit_identical_other_seed_different() -> None:
    x, y = blobs(50, seed=0)
    trainer = LocalTrainer(mlp(), TrainConfig(lr=0.1, momentum=0.5, local_epochs=2))
    start = flat_params(mlp(seed=1))
    a = trainer.fit(start, (x, y), seed=(3, 1, 17))
    b = LocalTrainer(mlp(seed=5), trainer.config).fit(start, (x, y), seed=(3, 1, 17))
    c = trainer.fit(start, (x, y), seed=(3, 1, 18))
    assert torch.equal(a.update, b.update) and a.metrics == b.metrics
    assert not torch.equal(a.update, c.update)


def test_fit_independent_of_previous_fits_including_momentum() -> None:
    xa, ya = blobs(50, seed=0)
    xb, yb = blobs(70, seed=1)
    config = TrainConfig(lr=0.1, momentum=0.9, local_epochs=2)
    trainer = LocalTrainer(mlp(), config)
    start = flat_params(mlp(seed=1))
    first = trainer.fit(start, (xa, ya), seed=1)
    other = trainer.fit(start + 0.3, (xb, yb), seed=2)  # leaves momentum buffers and moved weights
    assert len(trainer.optimizer.state) > 0
    again = trainer.fit(start, (xa, ya), seed=1)
    assert torch.equal(first.update, again.update)
    assert not torch.equal(first.update, other.update)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-3), (0.5, 1e-2)])
def test_plain_sgd_takes_torch_sgds_steps_bit_for_bit(momentum: float, weight_decay: float) -> None:
    from clients.training import PlainSGD

    x, y = blobs(40, seed=2)
    ours, theirs = mlp(seed=3), mlp(seed=3)
    frozen = [p for p in ours.parameters()][-1], [p for p in theirs.parameters()][-1]  # no grad: skipped by both
    mine = PlainSGD([p for p in ours.parameters()], lr=0.05, momentum=momentum, weight_decay=weight_decay)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for step in range(6):
        for model, opt in ((ours, mine), (theirs, ref)):
            for p in model.parameters():
                p.grad = None
            nn.functional.cross_entropy(model(x[step::3]), y[step::3]).backward()
            (frozen[0] if model is ours else frozen[1]).grad = None
            opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a, b), step


def sgd_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, seed: int) -> torch.Tensor:
    """Textbook minibatch SGD, with FedProx's proximal term written into the loss (Eq. 2)."""
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    g = new_generator(seed)
    for _ in range(config.local_epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), config.batch_size):
            idx = order[i : i + config.batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if config.proximal_mu > 0:
                distance = sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start))
                loss = loss + config.proximal_mu / 2 * distance
            loss.backward()
            optimizer.step()
    return flat_params(model) - torch.cat([s.reshape(-1) for s in start])


def test_mu_zero_is_exactly_plain_sgd() -> None:
    x, y = blobs(47, seed=0)  # 47: a short last batch
    config = TrainConfig(lr=0.1, local_epochs=2, batch_size=10)
    ours = train_local(mlp(), (x, y), config, seed=4).update
    assert torch.equal(ours, sgd_reference(mlp(), x, y, config, seed=4))


def test_fedprox_matches_proximal_loss_and_shrinks_the_update() -> None:
    x, y = blobs(60, seed=0)
    plain = train_local(mlp(), (x, y), TrainConfig(lr=0.1, local_epochs=3), seed=4).update
    prox_config = TrainConfig(lr=0.1, local_epochs=3, proximal_mu=1.0)
    prox = train_local(mlp(), (x, y), prox_config, seed=4).update
    assert torch.allclose(prox, sgd_reference(mlp(), x, y, prox_config, seed=4), atol=1e-6)
    assert prox.norm() < 0.7 * plain.norm()


def test_max_steps() -> None:
    x, y = blobs(50, seed=0)
    capped = train_local(mlp(), (x, y), TrainConfig(lr=0.1, local_epochs=3, max_steps=7), seed=0)
    assert capped.metrics["steps"] == 7
    uncapped = train_local(mlp(), (x, y), TrainConfig(lr=0.1, local_epochs=3, max_steps=100), seed=0)
    assert uncapped.metrics["steps"] == 15
    # The cap stops the same run early: 5 steps = exactly the first epoch.
    first_epoch = train_local(mlp(), (x, y), TrainConfig(lr=0.1, local_epochs=1), seed=0)
    cut = train_local(mlp(), (x, y), TrainConfig(lr=0.1, local_epochs=3, max_steps=5), seed=0)
    assert torch.equal(first_epoch.update, cut.update)


def test_dataset_path_equals_tensor_path() -> None:
    x, y = blobs(43, seed=0)
    config = TrainConfig(lr=0.1, local_epochs=2, batch_size=8, momentum=0.5)
    start = flat_params(mlp())
    trainer = LocalTrainer(mlp(), config)
    tensors = trainer.fit(start, (x, y), seed=(0, 2, 9))
    dataset = trainer.fit(start, PairDataset(x, y), seed=(0, 2, 9))
    assert torch.equal(tensors.update, dataset.update)
    assert tensors.metrics == dataset.metrics and dataset.num_examples == 43


def test_empty_device_raises() -> None:
    trainer = LocalTrainer(mlp(), TrainConfig(lr=0.1))
    with pytest.raises(ValueError, match="device has no training examples"):
        trainer.fit(flat_params(mlp()), (torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)), seed=0)


def test_seeds_int_sequence_and_generator() -> None:
    x, y = blobs(30, seed=0)
    trainer = LocalTrainer(mlp(), TrainConfig(lr=0.1))
    start = flat_params(mlp())
    by_int = trainer.fit(start, (x, y), seed=5).update
    assert torch.equal(by_int, trainer.fit(start, (x, y), seed=(5,)).update)
    assert torch.equal(by_int, trainer.fit(start, (x, y), seed=np.random.SeedSequence([1, 5, 0])).update)
    generator = new_generator(5)
    assert torch.equal(by_int, trainer.fit(start, (x, y), seed=generator).update)
    assert not torch.equal(trainer.fit(start, (x, y), seed=(1, 2, 3)).update, trainer.fit(start, (x, y), seed=(1, 2, 3, 0)).update)
    with pytest.raises(ValueError):
        trainer.fit(start, (x, y), seed=(-1, 2))


def test_global_rng_untouched_and_dropout_reproducible() -> None:
    x, y = blobs(30, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    trainer = LocalTrainer(model, TrainConfig(lr=0.1))
    start = flat_params(model)
    before = torch.get_rng_state()
    a = trainer.fit(start, (x, y), seed=1)
    b = trainer.fit(start, (x, y), seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.update, b.update)
    LocalTrainer(mlp(), TrainConfig(lr=0.1)).fit(flat_params(mlp()), (x, y), seed=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_model_is_in_train_mode_while_training() -> None:
    modes: list[bool] = []

    class Spy(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            modes.append(self.training)
            return super().forward(x)

    model = nn.Sequential(Spy(10, 3))
    model.eval()
    train_local(model, blobs(20, seed=0), TrainConfig(lr=0.1), seed=0)
    assert modes == [True, True]


def test_train_local_leaves_the_model_trained() -> None:
    model = mlp()
    start = flat_params(model)
    result = train_local(model, blobs(30, seed=0), TrainConfig(lr=0.1), seed=0)
    assert torch.allclose(flat_params(model), start + result.update, rtol=0, atol=1e-7)


def test_train_config_rejects_bad_values() -> None:
    for bad in ({"batch_size": 0}, {"local_epochs": 0}, {"proximal_mu": -1.0}, {"max_steps": 0}):
        with pytest.raises(ValueError):
            TrainConfig(lr=0.1, **bad)
    with pytest.raises(ValueError):
        TrainConfig(lr=0.0)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_hand_made_case() -> None:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])  # logits = x
    y = torch.tensor([0, 1, 1, 1])  # predictions 0, 1, 0, 1: three of four right
    # two-class cross entropy = log(1 + exp(other logit - own logit))
    expected = sum(math.log1p(math.exp(margin)) for margin in (-2, -1, 1, -3)) / 4
    model.train()
    for data in ((x, y), PairDataset(x, y)):
        metrics = evaluate(model, data, batch_size=3)  # a short last batch must weigh 1, not 3
        assert metrics["accuracy"] == 0.75 and metrics["num_examples"] == 4.0
        assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert model.training and model.weight.grad is None
    model.eval()
    evaluate(model, (x, y))
    assert not model.training
    empty = evaluate(model, (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    assert empty["num_examples"] == 0.0 and math.isnan(empty["loss"])


# ----------------------------------------------------------------------------- packaging


def test_import_clients_pulls_in_no_flower_hydra_or_ray() -> None:
    code = (
        "import sys, clients\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'hydra', 'ray', 'omegaconf', 'fedsim'})\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 5, padding=2), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))  # fmt: skip


def test_conv_models_train_channels_last_by_default_with_the_same_function_and_reproducibly() -> None:
    x, y = torch.randn(30, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.arange(30) % 10
    start = flat_params(_small_cnn())
    fast = LocalTrainer(_small_cnn(), TrainConfig(lr=0.1, batch_size=10, momentum=0.9))
    plain = LocalTrainer(_small_cnn(), TrainConfig(lr=0.1, batch_size=10, momentum=0.9, memory_format="contiguous"))
    conv = fast.model[4].weight  # (the first conv's, with one input channel, is both layouts at once)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert torch.equal(flat_params(fast.model), start)  # the layout moved, not the values
    a = fast.fit(start, (x, y), seed=3)
    b = plain.fit(start, (x, y), seed=3)
    assert torch.equal(a.update, fast.fit(start, (x, y), seed=3).update)  # bit for bit again
    assert not torch.equal(a.update, b.update)  # other kernels: other float rounding...
    torch.testing.assert_close(a.update, b.update, rtol=1e-4, atol=1e-5)  # ...of the same function
    mlp = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), TrainConfig(lr=0.1))
    assert not mlp._channels_last  # auto: only models with 2-D convolutions
    with pytest.raises(ValueError, match="memory_format"):
        TrainConfig(lr=0.1, memory_format="nhwc")
