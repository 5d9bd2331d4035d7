"""Distributed DP-SGD: sample-level DP with the noise shared by the devices under SecAgg+.

`privacy.dpsgd.noise=distributed` (with `secagg=secaggplus`). Local DP-SGD (the default) has
every device add all the noise its own epsilon needs, so the cohort's mean carries sqrt(n) times
the noise of one DP-SGD step on the cohort's examples. Here the devices trust secure
aggregation instead (Truex et al. 2019, "A Hybrid Approach to Privacy-Preserving Federated
Learning", AISec: each party adds noise scaled to the honest parties a sum holds): the server
only sees the sum, so each device adds 1/h of the noise, h the fewest honest inputs a released
sum can hold under the SecAgg+ threat model, and every released sum still carries at least the
noise the accountant counts. The mechanism of one round (DP-FedSGD: one step per device):

    device j:  v_j = sum over its n_j examples i of CRR(-(lr / B) clip(g_i, C) / step)   each example rounded alone
               y_j = v_j + Sk(mu / h)                                             its Skellam share, then masked
    server:    sum_j y_j = sum_j v_j + Sk(s mu / h), s >= h survivors              (Skellam is closed under sums)
               update = step x (sum_j y_j) / s                                   the mean of the devices' updates

g_i is example i's gradient at the global model, clip(g, C) = g min(1, C / ||g||) (a row with a
NaN or inf counts as zero: a device never drops because of what an example holds), CRR
conditional randomized rounding (Kairouz, Liu, Steinke 2021, Sec. 4.1): each example's rounded
vector has L2 norm <= D2 (fedsim.privacy.skellam.rounded_norm_bound of its norm lr C / B / step;
should every draw fail, which has probability below 1e-43, the row is scaled into the bound and
rounded toward zero; an example the model cannot take, e.g. a label out of range, counts as zero
too: no example makes its device fail). B is a public constant
(algorithm.batch_size); a device uses all its examples every round, so no sampling rate depends
on its size. The grid (fedsim.secure_grid.example_grid) makes that norm a power of two >= 16
sqrt(d) steps, so rounding inflates the sensitivity by under 0.1%. Adding or removing one
example of device j adds or removes its own rounded vector only (the others' roundings are
independent of it): the Skellam mechanism with L2 sensitivity D2 and L1 sensitivity
D1 = D2 min(sqrt(d), D2), once per participation; the accountant is
fedsim.privacy.skellam.SkellamSGDAccountant (Agarwal, Kairouz, Liu 2021, Cor. 3.6) with
mu = (z D2)^2 for the noise multiplier z. The secure vector carries only the devices' example
counts besides the update (no loss, no clipped fraction: they would be un-noised functions of
the examples), so the server learns nothing else from a round.

What the guarantee rests on (summary.json `privacy.sample_level.assumes`): the SecAgg+ threat
model (at most C devices of a cohort collude with the server and may strip their shares; the
server follows the abort rule, or in the active model the devices enforce it and check the
round's grid, bound and noise share against the run config, whose noise multiplier (calibrated
before the run) is published with it); each device's rounding and noise come from secret
randomness (`privacy.randomness=secure`, the auto default here); a device's example count is
public (it is summed in the clear, and the device's update norm grows with it).

This module holds the device's side (`gradient_sum`, run by fedsim.worker) and the round's
encoding (`encoding`, run by the server and checked by the devices); it imports torch and
numpy only, not the accountants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from clients.params import load_flat_params, trainable_params
from fedsim.config import FedsimConfig
from fedsim.secagg.quantize import MAX_ROUNDING_DRAWS
from fedsim.secure_grid import DEVICE_EXAMPLES_LIMIT, SecureEncoding, example_grid

#: Examples whose per-example gradients are held at once (float64 rows of the model's size).
CHUNK_VALUES = 1 << 23


#: Every device uses all its examples every round (no sampling rate that would depend on its size).
SAMPLE_RATE = 1.0


@dataclass
class GradientSum:
    """One device's contribution to a distributed DP-SGD round (before its noise share)."""

    ints: np.ndarray  # int64: the sum of its examples' rounded contributions, grid units
    loss: float  # mean loss of its examples at the global model (stays on the device)
    clip_fraction: float  # fraction of its examples whose gradient was clipped (stays on the device)


def sensitivity(cfg: FedsimConfig, dim: int) -> tuple[float, float]:
    """(D2, D1): the L2 and L1 norm bounds of one example's rounded contribution, grid units."""
    from fedsim.privacy.skellam import l1_bound, rounded_norm_bound

    d2 = rounded_norm_bound(example_grid(cfg, dim).example_norm, dim)
    return d2, l1_bound(d2, dim)


def encoding(cfg: FedsimConfig, dim: int) -> SecureEncoding:
    """The round's encoding: each example's rounding bound D2 and the aggregate Skellam variance
    (z D2)^2 every released sum must carry (z: privacy.dpsgd.noise_multiplier, calibrated)."""
    dp = cfg.privacy.dpsgd
    assert dp is not None and dp.noise_multiplier is not None
    d2, _ = sensitivity(cfg, dim)
    return SecureEncoding(norm_bound=d2, update_variance=(dp.noise_multiplier * d2) ** 2)


def rows_per_sum(max_norm: float) -> int:
    """Rows whose rounded values (each |value| <= max_norm) sum exactly in float32 (below 2^24)."""
    return max(1, int((1 << 24) // (math.floor(max_norm) + 1)))


def round_rows(rows: torch.Tensor, rng: np.random.Generator, max_norm: float) -> torch.Tensor:
    """Conditional randomized rounding of each row alone (float32 rows in grid units, |values|
    < 2^23, modified in place): each coordinate rounded up with probability its fractional part
    (unbiased up to float32's resolution of that part), a row drawn again until its L2 norm,
    computed exactly in integers, is <= max_norm; a row that finds no such draw in
    MAX_ROUNDING_DRAWS is scaled into the bound and rounded toward zero instead (never an error,
    whatever the row holds). Returns the float64 sum of the rounded rows (integers, exact below
    2^53); at most `rows_per_sum(max_norm)` rows (ValueError beyond)."""
    if len(rows) > rows_per_sum(max_norm):
        raise ValueError(f"round_rows takes at most {rows_per_sum(max_norm)} rows at a time, got {len(rows)}")
    lo = torch.floor(rows)
    frac = rows.sub_(lo)
    limit = math.floor(max_norm * max_norm * (1 - 1e-12))  # below D2^2 whatever float64 rounding did
    total = torch.zeros(rows.shape[1], dtype=torch.float64)
    todo: torch.Tensor | None = None  # rows still to round (None: all)
    for _ in range(MAX_ROUNDING_DRAWS):
        base, part = (lo, frac) if todo is None else (lo[todo], frac[todo])
        q = base + (torch.from_numpy(rng.random(tuple(part.shape), dtype=np.float32)) < part)
        qi = q.to(torch.int32).numpy()
        ok = torch.from_numpy(np.einsum("ij,ij->i", qi, qi, dtype=np.int64) <= limit)  # int64: exact
        # float32 column sums are exact: every partial sum is an integer below 2^24 (rows_per_sum)
        total += (q if bool(ok.all()) else q[ok]).sum(0)
        left = torch.nonzero(~ok).flatten()
        if not len(left):
            return total
        todo = left if todo is None else todo[left]
    # Every draw failed (probability < 1e-43 for a row within the accountant's norm; certain for a
    # row above the bound): scale the rows left into the bound and round toward zero, which never
    # increases a coordinate's magnitude. No example makes its device fail.
    left_rows = (lo[todo] + frac[todo]).double()
    norms = left_rows.norm(dim=1, keepdim=True)
    left_rows *= (max_norm * (1 - 1e-9) / norms).clamp(max=1.0).nan_to_num(0.0)
    total += torch.trunc(left_rows).sum(0)
    return total


class GradientSums:
    """A worker's device side of distributed DP-SGD for one run: the model (without its fixed
    first layer: devices pass features) and the grid; `__call__` makes one device's sum."""

    def __init__(self, cfg: FedsimConfig, model: nn.Module) -> None:
        dp = cfg.privacy.dpsgd
        assert dp is not None
        self.cfg, self.model, self.clip = cfg, model, dp.max_grad_norm
        self.params = trainable_params(model)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)
        self.grid = example_grid(cfg, self.dim)
        self.step = self.grid.step

        def example_loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = functional_call(self.model, params, (x.unsqueeze(0),))
            loss = F.cross_entropy(out, y.unsqueeze(0))
            return loss, loss.detach()

        self._grads = vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")

    def _rows(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example gradients as rows (and losses). Should the batch fail (an example the model
        cannot take, e.g. a label out of range), each example is taken alone and one that fails
        gives a NaN row, which counts as zero: no example makes its device fail."""
        try:
            grads, loss = self._grads(params, x, y)
            return torch.cat([grads[name].flatten(1) for name in self.names], dim=1), loss
        except Exception:
            rows, losses = [], []
            for i in range(len(y)):
                try:
                    grads, loss = self._grads(params, x[i : i + 1], y[i : i + 1])
                    rows.append(torch.cat([grads[name].flatten(1) for name in self.names], dim=1))
                    losses.append(loss)
                except Exception:
                    rows.append(torch.full((1, self.dim), math.nan))
                    losses.append(torch.full((1,), math.nan))
            return torch.cat(rows), torch.cat(losses)

    def __call__(
        self, global_params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, norm_bound: float, rounding: np.random.Generator,
    ) -> GradientSum:  # fmt: skip
        """The device's rounded sum of all its examples' clipped, scaled gradients."""
        n = len(y)
        if n > DEVICE_EXAMPLES_LIMIT:  # the integer sum's bound: only a data set at exactly 2^24 examples fails on one more
            raise ValueError(f"a device of distributed DP-SGD holds at most {DEVICE_EXAMPLES_LIMIT} examples, this one {n}")
        if len(global_params) != self.dim:
            raise ValueError(f"the session's model has {len(global_params)} parameters, this device's {self.dim}")
        total = torch.zeros(self.dim, dtype=torch.float64)
        if not n:
            return GradientSum(np.zeros(self.dim, dtype=np.int64), math.nan, math.nan)
        load_flat_params(self.model, global_params)
        self.model.train()
        params = {name: p.detach() for name, p in zip(self.names, self.params, strict=True)}
        # Scale so that a clipped gradient (norm <= C) becomes a row of norm <= example_norm.
        scale = self.grid.scale / self.step
        chunk = max(1, min(CHUNK_VALUES // self.dim, rows_per_sum(norm_bound)))
        losses, clipped = [], 0
        for start in range(0, n, chunk):
            rows, loss = self._rows(params, x[start : start + chunk], y[start : start + chunk])
            norms = rows.norm(dim=1, dtype=torch.float64)
            finite = torch.isfinite(norms)  # a NaN or inf anywhere in a row makes its norm one
            factor = torch.where(finite, (self.clip / norms).clamp(max=1.0), 0.0)  # 0 norm: inf, clamped to 1
            clipped += int((norms > self.clip).sum())
            rows.nan_to_num_(0.0, 0.0, 0.0)
            rows *= (factor * scale).to(torch.float32).unsqueeze(1)
            total += round_rows(rows, rounding, norm_bound)
            losses.append(loss.double())
        ints = total.numpy().astype(np.int64)
        return GradientSum(ints, float(torch.cat(losses).mean()), clipped / n)
