"""The models devices train: logistic regression, an MLP and the LEAF/McMahan-style CNN.

None of them uses BatchNorm: its statistics mix examples within a batch, which breaks the
per-example gradients DP-SGD (Opacus) needs, so the CNN normalises with GroupNorm instead.
Every model is a plain `nn.Sequential`, so its parameter order (and with it the flat vector
updates travel in) is the layer order below.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from fedsim.config import ModelConfig
from fedsim.errors import ConfigError


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *, seed: int) -> nn.Module:
    """The model `cfg.name` for inputs of `input_shape` (one example, no batch dimension).

    "auto" picks the cnn for images (C, H, W) and the mlp otherwise. Weights are a
    deterministic function of `seed`; torch's global RNG is left exactly as it was.
    """
    input_shape = tuple(input_shape)
    name = cfg.name
    if name == "auto":
        name = "cnn" if len(input_shape) == 3 else "mlp"
    # Layer constructors draw their initial weights from the global RNG: fork it, so the
    # caller's random stream is untouched and the weights depend on `seed` alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "logreg":
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
        if name == "mlp":
            return _mlp(math.prod(input_shape), cfg.hidden_sizes, num_classes)
        if name == "cnn":
            return _cnn(cfg, input_shape, num_classes)
        if name == "custom":
            return _custom(cfg.target or "", input_shape, num_classes)
    raise ConfigError("model.name", f"unknown model {cfg.name!r}; allowed: auto, logreg, mlp, cnn, custom")


def _custom(target: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A user's model: `package.module:factory`, called as factory(input_shape, num_classes).

    Its parameters travel as one flat vector like the built-in models'; buffers (BatchNorm
    running statistics, for example) are not aggregated, so prefer models without them.
    """
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError("model.target", f"cannot import {target!r} ({err}); expected 'package.module:factory'") from None
    model = factory(tuple(input_shape), num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError("model.target", f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _mlp(in_features: int, hidden_sizes: list[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Two 5x5 conv blocks (conv, GroupNorm, ReLU, 2x2 max-pool), a dense layer, the output.

    The architecture of McMahan et al. 2017 and LEAF's FEMNIST baseline, with GroupNorm
    (Wu & He 2018) added after each convolution.
    """
    if len(input_shape) != 3:
        raise ConfigError(
            "model.name", f"cnn needs image input (C, H, W); dataset gives {input_shape}; allowed here: logreg, mlp"
        )
    channels, height, width = input_shape
    if height < 4 or width < 4:
        raise ConfigError(
            "model.name", f"cnn needs images of at least 4x4 (two 2x2 poolings); dataset gives {input_shape}"
        )
    ch0, ch1 = cfg.cnn_channels
    for ch in (ch0, ch1):
        if ch % cfg.norm_groups:
            raise ConfigError(
                "model.norm_groups", f"must divide every cnn channel count ({cfg.cnn_channels}), got {cfg.norm_groups}"
            )
    # padding=2 keeps 5x5 convolutions size-preserving; each pooling floors H and W by half.
    flat = ch1 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, ch0, kernel_size=5, padding=2),
        nn.GroupNorm(cfg.norm_groups, ch0),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(ch0, ch1, kernel_size=5, padding=2),
        nn.GroupNorm(cfg.norm_groups, ch1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, cfg.cnn_dense),
        nn.ReLU(),
        nn.Linear(cfg.cnn_dense, num_classes),
    )


def checked_model(model: nn.Module, *, fix: bool) -> nn.Module:
    """The model, checked for DP-SGD by Opacus's ModuleValidator (and fixed if `fix`).

    An incompatible model is bad input: ConfigError naming what to change.
    """
    from clients import check_model

    try:
        return check_model(model, fix=fix)
    except ValueError as err:
        raise ConfigError("model", str(err)) from None
