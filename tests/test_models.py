"""fedsim.models: shapes, sizes, seeded initialisation and DP-SGD compatibility."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from fedsim.config import ModelConfig
from fedsim.errors import ConfigError
from fedsim.models import build_model

IMAGE = (1, 28, 28)
VECTOR = (60,)


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [("logreg", VECTOR, 10), ("mlp", VECTOR, 10), ("cnn", IMAGE, 62), ("mlp", IMAGE, 10), ("logreg", IMAGE, 10)],
)
def test_output_shape(name: str, shape: tuple[int, ...], classes: int) -> None:
    model = build_model(ModelConfig(name=name), shape, classes, seed=0)
    assert model(torch.randn(3, *shape)).shape == (3, classes)


def test_auto_picks_cnn_for_images_and_mlp_for_vectors() -> None:
    image_model = build_model(ModelConfig(), IMAGE, 10, seed=0)
    vector_model = build_model(ModelConfig(), VECTOR, 10, seed=0)
    assert any(isinstance(m, torch.nn.Conv2d) for m in image_model.modules())
    assert not any(isinstance(m, torch.nn.Conv2d) for m in vector_model.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in vector_model.modules()) == 2  # one hidden layer


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cnn_parameter_count_with_defaults() -> None:
    model = build_model(ModelConfig(name="cnn"), IMAGE, 62, seed=0)
    conv1 = 1 * 32 * 5 * 5 + 32
    norm1 = 2 * 32
    conv2 = 32 * 64 * 5 * 5 + 64
    norm2 = 2 * 64
    dense = 64 * 7 * 7 * 256 + 256  # 28 -> 14 -> 7 after two poolings
    out = 256 * 62 + 62
    assert _count(model) == conv1 + norm1 + conv2 + norm2 + dense + out == 871_294


def test_mlp_and_logreg_parameter_counts() -> None:
    mlp = build_model(ModelConfig(name="mlp", hidden_sizes=[32, 16]), VECTOR, 10, seed=0)
    assert _count(mlp) == (60 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    assert _count(build_model(ModelConfig(name="logreg"), VECTOR, 10, seed=0)) == 60 * 10 + 10


@pytest.mark.parametrize(("name", "shape"), [("logreg", VECTOR), ("mlp", VECTOR), ("cnn", IMAGE)])
def test_same_seed_same_weights_and_other_seed_other_weights(name: str, shape: tuple[int, ...]) -> None:
    cfg = ModelConfig(name=name)
    a = build_model(cfg, shape, 10, seed=7)
    torch.rand(100)  # the global RNG moving in between must not matter
    b = build_model(cfg, shape, 10, seed=7)
    c = build_model(cfg, shape, 10, seed=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_model(ModelConfig(name="cnn"), IMAGE, 10, seed=0)
    build_model(ModelConfig(name="mlp"), VECTOR, 10, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(("name", "shape"), [("logreg", VECTOR), ("mlp", VECTOR), ("cnn", IMAGE)])
def test_opacus_accepts_every_model(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig(name=name), shape, 10, seed=0)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(("name", "shape"), [("mlp", VECTOR), ("cnn", IMAGE)])
def test_tanh_activation_replaces_every_relu_and_keeps_the_weights(name: str, shape: tuple[int, ...]) -> None:
    relu = build_model(ModelConfig(name=name), shape, 10, seed=3)
    tanh = build_model(ModelConfig(name=name, activation="tanh"), shape, 10, seed=3)
    kinds = [type(m) for m in tanh.modules()]
    assert torch.nn.Tanh in kinds and torch.nn.ReLU not in kinds
    assert kinds.count(torch.nn.Tanh) == [type(m) for m in relu.modules()].count(torch.nn.ReLU)
    for a, b in zip(relu.parameters(), tanh.parameters()):  # same initial weights: only the function differs
        assert torch.equal(a, b)
    x = torch.randn(4, *shape)
    assert tanh(x).shape == (4, 10) and not torch.equal(tanh(x), relu(x))
    assert ModuleValidator.validate(tanh, strict=False) == []


def test_cnn_on_vector_input_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="cnn"), VECTOR, 10, seed=0)
    assert err.value.key == "model.name"
    assert "cnn needs image input (C, H, W); dataset gives (60,); allowed here: logreg, mlp" in str(err.value)


def test_unknown_model_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.name"):
        build_model(ModelConfig(name="resnet"), VECTOR, 10, seed=0)
