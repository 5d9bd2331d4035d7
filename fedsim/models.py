"""The models devices train: logistic regression, an MLP, the LEAF/McMahan-style CNN, and
two next-character models for text datasets (LEAF's LSTM and a small causal transformer).

None of them uses BatchNorm: its statistics mix examples within a batch, which breaks the
per-example gradients DP-SGD (Opacus) needs, so the CNN normalises with GroupNorm instead.
The image and vector models are plain `nn.Sequential`s, so their parameter order (and with
it the flat vector updates travel in) is the layer order below; the text models' order is
their attribute order.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from typing import TYPE_CHECKING

from fedsim.config import ModelConfig

if TYPE_CHECKING:
    from fedsim.config import FedsimConfig
    from fedsim.data.base import FederatedDataset
from fedsim.errors import ConfigError
from fedsim.registry import MODELS


def model_for(cfg: FedsimConfig, dataset: FederatedDataset) -> nn.Module:
    """The run's model for `dataset` (server, workers, API and audit all build it here)."""
    return build_model(cfg.model, dataset.input_shape, dataset.num_classes, seed=cfg.seed,
                       sequence_targets=dataset.sequence_targets)  # fmt: skip


def build_model(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *, seed: int, sequence_targets: bool = False
) -> nn.Module:
    """The model `cfg.name` for inputs of `input_shape` (one example, no batch dimension).

    "auto" picks the cnn for images (C, H, W) and the mlp otherwise. Weights are a
    deterministic function of `seed`; torch's global RNG is left exactly as it was.
    `sequence_targets` (lstm, transformer): in training mode the model gives logits at every
    position, [batch, num_classes, seq_len], for labels [batch, seq_len] (F.cross_entropy
    reads that layout as is); in eval mode always the last position's [batch, num_classes].
    """
    input_shape = tuple(input_shape)
    name = cfg.name
    if name == "auto":
        name = "cnn" if len(input_shape) == 3 else "mlp"
    MODELS.check(name)
    builder = MODELS.load(name)
    if sequence_targets and not getattr(builder, "sequence_model", False):
        raise ConfigError("dataset.targets", f"every: needs a sequence model (lstm, transformer), not {name}")
    # Layer constructors draw their initial weights from the global RNG: fork it, so the
    # caller's random stream is untouched and the weights depend on `seed` alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(cfg, input_shape, num_classes, sequence_targets=sequence_targets)


# The builders fedsim.registry.MODELS names: (model config, input shape, classes) -> module.


def logreg(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *, sequence_targets: bool = False) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *, sequence_targets: bool = False) -> nn.Module:
    """ReLU MLP with model.hidden_sizes."""
    return _mlp(math.prod(input_shape), cfg.hidden_sizes, num_classes, cfg.activation)


def cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *, sequence_targets: bool = False) -> nn.Module:
    """The LEAF/McMahan-style CNN with GroupNorm, for images (C, H, W)."""
    return _cnn(cfg, input_shape, num_classes)


def scatternet(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *, sequence_targets: bool = False) -> nn.Module:
    """ScatterNet features + GroupNorm + a linear or CNN head (Tramer & Boneh 2021, ICLR, Sec. 3).

    A fixed scattering transform (fedsim.scattering, J = 2, L = 8: 81 channels per image channel
    at a quarter of the side) with no trainable weights, GroupNorm of its channels in 27 groups
    without affine weights (their setting; a per-example normalisation, so it costs no privacy),
    then `model.scatter_head`: "linear" (one linear layer) or "cnn" (the cnn below, on the
    feature maps: model.cnn_channels, cnn_dense, norm_groups, activation apply). DP-SGD trains
    only the head, whose parameters are few; the features carry what an end-to-end CNN would
    have to learn from noisy gradients.
    """
    from fedsim.scattering import Scattering2D

    if len(input_shape) != 3:
        raise ConfigError("model.name", f"scatternet needs image input (C, H, W); dataset gives {input_shape}")
    channels, height, width = input_shape
    if height % 4 or width % 4 or height < 8 or width < 8:
        raise ConfigError(
            "model.name", f"scatternet needs image sides that are multiples of 4, at least 8; dataset gives {input_shape}"
        )
    scattering = Scattering2D((height, width), J=2, L=8)
    features = channels * scattering.channels_per_input
    front = FixedFeatures(scattering, nn.GroupNorm(27, features, affine=False))
    if cfg.scatter_head == "cnn":
        return nn.Sequential(front, *_cnn(cfg, (features, height // 4, width // 4), num_classes))
    return nn.Sequential(front, nn.Flatten(), nn.Linear(features * (height // 4) * (width // 4), num_classes))


class FixedFeatures(nn.Sequential):
    """A model's first layer that is a fixed function of each example alone: no parameters, no
    buffers, no randomness, nothing mixed across a batch (scatternet's scattering + GroupNorm).

    Training its model is training the rest on the features: a worker computes a device's
    features once and keeps them for the device's later rounds (`split_fixed_features`,
    fedsim.worker), the same numbers the whole model would compute at every step.
    """


def split_fixed_features(model: nn.Module) -> tuple[FixedFeatures | None, nn.Module]:
    """(the fixed first layer, the rest) of an nn.Sequential that starts with FixedFeatures, else
    (None, model). The rest holds the model's own parameter objects, in the same order (the
    first layer has none), so flat parameter vectors of the two are the same vector."""
    if not isinstance(model, nn.Sequential) or not len(model) or not isinstance(model[0], FixedFeatures):
        return None, model
    front = model[0]
    if any(True for _ in front.parameters()) or any(True for _ in front.buffers()):
        raise ValueError("FixedFeatures must hold no parameters and no buffers")
    return front, model[1:]


def _sequence(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 1:
        raise ConfigError("model.name", f"{name} reads sequences of character indices; dataset gives {input_shape}")


def lstm(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *, sequence_targets: bool = False) -> nn.Module:
    """LEAF's Shakespeare LSTM (CharLSTM)."""
    _sequence("lstm", input_shape)
    model = CharLSTM(num_classes, embed=cfg.embed, hidden=cfg.hidden, layers=cfg.layers)
    model.sequence_targets = sequence_targets
    return model


def transformer(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *, sequence_targets: bool = False) -> nn.Module:
    """A small causal transformer over characters (CharTransformer)."""
    _sequence("transformer", input_shape)
    model = CharTransformer(num_classes, input_shape[0], width=cfg.hidden, layers=cfg.layers, heads=cfg.heads)
    model.sequence_targets = sequence_targets
    return model


lstm.sequence_model = True  # type: ignore[attr-defined]  # logits at every position with dataset.targets=every
transformer.sequence_model = True  # type: ignore[attr-defined]


def custom(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *, sequence_targets: bool = False) -> nn.Module:
    """Any nn.Module from model.target = 'package.module:factory(input_shape, num_classes)'."""
    return _custom(cfg.target or "", input_shape, num_classes)


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: embedding (8), a stacked LSTM (2 x 256), a linear read-out of
    the last step's hidden state giving the next character's logits.

    Input: character indices [batch, seq_len], as float (the dataset interface) or integer.
    For DP-SGD `checked_model` swaps nn.LSTM for Opacus's DPLSTM (same weights, same function,
    built from linear layers Opacus can compute per-example gradients of).
    """

    # simulation.vectorize=auto trains it one by one: vmapped per-example gradients of 80
    # recurrent steps were slower than Opacus's DPLSTM hooks (README, Shakespeare).
    vectorize_auto = False
    reads_tokens = True  # inputs must be token indices (FederatedDataset.token_inputs)
    sequence_targets = False  # training mode: logits at every position (build_model)

    def __init__(self, vocabulary: int, *, embed: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocabulary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(x.long()))
        if self.training and self.sequence_targets:
            return self.head(out).transpose(1, 2)
        return self.head(out[:, -1])


class CharTransformer(nn.Module):
    """A small causal (GPT-style, pre-norm) transformer predicting the character after the window.

    Token and learned position embeddings of width `width`, `layers` blocks of causal
    multi-head self-attention and a 4x-wide GELU MLP, a final LayerNorm and a linear
    read-out of the last position. Built from nn.Embedding, nn.Linear and nn.LayerNorm only
    (no nn.MultiheadAttention), the layers Opacus has per-example gradient rules for; the
    positions go through an nn.Embedding fed a [batch, seq_len] index so that rule applies.
    """

    # simulation.vectorize=auto trains it one by one: vectorized was slower with DP-SGD and no
    # faster without (README, Shakespeare); simulation.vectorize=on still batches it.
    vectorize_auto = False
    reads_tokens = True  # inputs must be token indices (FederatedDataset.token_inputs)
    sequence_targets = False  # training mode: logits at every position (build_model)

    def __init__(self, vocabulary: int, seq_len: int, *, width: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError("model.heads", f"must divide model.hidden ({width}), got {heads}")
        self.token = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.long()
        positions = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
        h = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            h = block(h)
        if self.training and self.sequence_targets:
            return self.head(self.norm(h)).transpose(1, 2)
        return self.head(self.norm(h[:, -1]))


class _Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)) (pre-norm, as in GPT-2)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # Written out rather than F.scaled_dot_product_attention: torch.func has no batching
        # rule for its CPU kernel, and vectorized cohort training vmaps this forward.
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        attended = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


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


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}  # model.activation


def _mlp(in_features: int, hidden_sizes: list[int], num_classes: int, activation: str = "relu") -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Two 5x5 conv blocks (conv, GroupNorm, activation, 2x2 max-pool), a dense layer, the output
    (activation: model.activation, ReLU by default).

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
    act = ACTIVATIONS[cfg.activation]
    return nn.Sequential(
        nn.Conv2d(channels, ch0, kernel_size=5, padding=2),
        nn.GroupNorm(cfg.norm_groups, ch0),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(ch0, ch1, kernel_size=5, padding=2),
        nn.GroupNorm(cfg.norm_groups, ch1),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, cfg.cnn_dense),
        act(),
        nn.Linear(cfg.cnn_dense, num_classes),
    )


def checked_model(model: nn.Module, *, fix: bool) -> nn.Module:
    """The model, checked for DP-SGD by Opacus's ModuleValidator (and fixed if `fix`).

    An incompatible model is bad input: ConfigError naming what to change. nn.LSTM layers
    are always swapped for Opacus's DPLSTM (the same weights and function, so no fix to ask
    for), whatever `fix` says.
    """
    from clients import check_model

    model = _dp_lstm(model)
    try:
        return check_model(model, fix=fix)
    except ValueError as err:
        raise ConfigError("model", str(err)) from None


def _dp_lstm(model: nn.Module) -> nn.Module:
    """`model` with every nn.LSTM replaced by Opacus's DPLSTM loaded with its weights."""
    from opacus.validators import ModuleValidator

    if isinstance(model, nn.LSTM):
        return ModuleValidator.fix(model)
    for name, child in list(model.named_children()):
        replaced = _dp_lstm(child)
        if replaced is not child:
            setattr(model, name, replaced)
    return model
