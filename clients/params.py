"""A model's trainable parameters as one flat float32 vector: the form updates travel in.

The order is always `model.parameters()` order, restricted to parameters with
`requires_grad=True`; frozen parameters are neither sent nor overwritten. The `*_list`
helpers take the parameter list directly so a caller in a hot loop (the `LocalTrainer`)
collects it once instead of walking the module tree per device.
"""

from __future__ import annotations

import torch
from torch import nn


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters `flat_params` covers, in their flat order."""
    return [p for p in model.parameters() if p.requires_grad]


def num_params(model: nn.Module) -> int:
    """Number of trainable scalars, i.e. the length of `flat_params(model)`."""
    return sum(p.numel() for p in trainable_params(model))


def flat_params(model: nn.Module) -> torch.Tensor:
    """A 1-D float32 copy of all trainable parameters, in `model.parameters()` order."""
    return flatten_list(trainable_params(model))


def load_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Overwrite the trainable parameters in place with `flat` (as made by `flat_params`).

    Raises ValueError naming the expected and the given size when they differ.
    """
    load_list(trainable_params(model), flat)


def flatten_list(params: list[nn.Parameter] | list[torch.Tensor]) -> torch.Tensor:
    """`flat_params` for an already collected parameter list: one new float32 tensor."""
    if not params:
        return torch.zeros(0, dtype=torch.float32)
    # torch.cat writes straight into the fresh result, so this is the only copy.
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return flat if flat.dtype == torch.float32 else flat.float()


def load_list(params: list[nn.Parameter] | list[torch.Tensor], flat: torch.Tensor) -> None:
    """`load_flat_params` for an already collected parameter list."""
    expected = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(
            f"flat parameter vector has the wrong size: expected {expected} values "
            f"(1-D), got shape {tuple(flat.shape)}"
        )
    if not params:
        return
    views = unflatten_views(flat, params)
    with torch.no_grad():
        # One foreach call instead of a Python loop of copy_: measurably faster for the
        # small models the simulator trains device after device. copy_ casts the dtype.
        torch._foreach_copy_(list(params), views)


def unflatten_views(flat: torch.Tensor, like: list[nn.Parameter] | list[torch.Tensor]) -> list[torch.Tensor]:
    """Views into `flat` shaped like each tensor of `like` (no copy unless `flat` is strided)."""
    # view_as is about twice as fast as view(p.shape)/reshape, which build a Size per call.
    chunks = flat.contiguous().split([p.numel() for p in like])
    return [c.view_as(p) for c, p in zip(chunks, like)]
