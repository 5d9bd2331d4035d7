"""clients.dp: DP-SGD (Abadi et al. 2016, Alg. 1) on one device, built on Opacus.

The noise and clipping tests use lr = 1 and one step with q = 1 (n <= batch size), where
the update is exactly -(sum of clipped per-example gradients + N(0, sigma^2 C^2 I)) / n,
so both parts can be checked against closed forms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from clients import DPSGDConfig, DPSGDEvent, DPSGDTrainer, LocalTrainer, TrainConfig, TrainResult, check_model
from clients.params import flat_params
from helpers import PairDataset

# clients.dp silences this harmless torch warning at import; pytest restores the filters per
# test, so it is repeated here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def init(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Deterministic weights from a private generator (the global RNG is left alone)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def mlp(seed: int = 0, d: int = 10, hidden: int = 16, classes: int = 3) -> nn.Module:
    return init(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes)), seed)


def blobs(n: int, seed: int, d: int = 10, classes: int = 3, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = scale * (2.0 * torch.eye(classes, d)[y] + torch.randn(n, d, generator=g))
    return x, y


def fit(trainer: DPSGDTrainer | LocalTrainer, data, seed) -> TrainResult:
    """From the model's initial weights (kept in `trainer.start`, set on first use)."""
    if not hasattr(trainer, "start"):
        trainer.start = flat_params(trainer.model).clone()
    return trainer.fit(trainer.start, data, seed=seed)


def zero_grad_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss with every per-example gradient exactly 0: the update is pure noise."""
    return (out * 0.0).mean()


def noise_std_check(updates: torch.Tensor, expected: float, *, known_mean: torch.Tensor | None = None):
    """(empirical std / expected, passes) for the noise in `updates` (seeds x coordinates).

    Pooled over coordinates, s^2 * dof / expected^2 is chi-square with dof degrees of freedom,
    so s / expected has standard error 1 / sqrt(2 dof); 6 of those (or 5%, whichever is
    tighter) is the tolerance.
    """
    seeds, coords = updates.shape
    if known_mean is None:
        resid, dof = updates - updates.mean(0), (seeds - 1) * coords
    else:
        resid, dof = updates - known_mean, seeds * coords
    ratio = math.sqrt(resid.double().pow(2).sum().item() / dof) / expected
    tol = min(0.05, 6 / math.sqrt(2 * dof))
    return ratio, abs(ratio - 1) < tol


# ----------------------------------------------------------------------------- noise


def test_noise_std_is_sigma_c_over_expected_batch_size_and_centred_on_the_clipped_mean() -> None:
    sigma, c, n, seeds = 1.3, 0.5, 8, 20
    data = blobs(n, seed=1, d=200, classes=10)
    cfg = TrainConfig(lr=1.0, batch_size=10)  # q = 1: every example every step, one step

    def updates(noise_multiplier: float) -> torch.Tensor:
        trainer = DPSGDTrainer(init(nn.Linear(200, 10), 0), cfg, DPSGDConfig(noise_multiplier, c))
        results = [fit(trainer, data, seed=(7, s)) for s in range(seeds)]
        assert all(r.privacy == DPSGDEvent(noise_multiplier, 1.0, 1) for r in results)
        return torch.stack([r.update for r in results])

    noisy, clean = updates(sigma), updates(0.0)
    assert noisy.shape == (seeds, 2010)
    expected = sigma * c / n  # lr * sigma * C / expected_batch_size
    ratio, ok = noise_std_check(noisy, expected)
    assert ok, f"noise std {ratio:.4f} x sigma*C/(q*n)"

    # Without noise the updates do not vary at all: the same check fails, so it detects missing noise.
    assert torch.equal(clean, clean[:1].expand_as(clean))
    ratio0, ok0 = noise_std_check(clean, expected)
    assert ratio0 < 1e-6 and not ok0  # (not exactly 0: rounding in the mean)

    # The noise is centred on the noiseless (clipped-mean) update: z-scores ~ N(0, 1) per coordinate.
    z = (noisy.mean(0) - clean[0]) / (expected / math.sqrt(seeds))
    assert abs(z.mean().item()) < 6 / math.sqrt(z.numel())
    assert abs(z.std().item() - 1) < 6 / math.sqrt(2 * z.numel())


def test_noise_is_divided_by_the_expected_not_the_realised_batch_size() -> None:
    # n = 30, B = 10: q = 1/3, Poisson batches of 10 on average but varying; every gradient
    # is 0, so the update is -lr * noise / (q * n) with lr = 0.5, q * n = 10.
    sigma, c, seeds = 0.8, 2.0, 20
    cfg = TrainConfig(lr=0.5, batch_size=10, max_steps=1)
    trainer = DPSGDTrainer(init(nn.Linear(200, 10), 0), cfg, DPSGDConfig(sigma, c), loss_fn=zero_grad_loss)
    data = blobs(30, seed=2, d=200, classes=10)
    results = [fit(trainer, data, seed=s) for s in range(seeds)]
    assert results[0].privacy == DPSGDEvent(sigma, 1 / 3, 1)
    updates = torch.stack([r.update for r in results])
    ratio, ok = noise_std_check(updates, 0.5 * sigma * c / 10, known_mean=torch.zeros(()))
    assert ok, f"noise std {ratio:.4f} x lr*sigma*C/(q*n)"


def test_empty_poisson_batches_are_noise_only_steps_and_counted() -> None:
    # n = 2, B = 1: q = 1/2, so a quarter of the steps draw no example at all.
    sigma, c, steps, seeds = 1.0, 1.0, 40, 20
    model = init(nn.Linear(50, 4), 0)
    forwards = []
    model.register_forward_hook(lambda m, inp, out: forwards.append(inp[0].shape[0]))
    cfg = TrainConfig(lr=1.0, batch_size=1, local_epochs=20)
    trainer = DPSGDTrainer(model, cfg, DPSGDConfig(sigma, c), loss_fn=zero_grad_loss)
    data = blobs(2, seed=3, d=50, classes=4)
    results = [fit(trainer, data, seed=s) for s in range(seeds)]
    assert all(r.privacy == DPSGDEvent(sigma, 0.5, steps) and r.metrics["steps"] == steps for r in results)
    assert 0 < len(forwards) < steps * seeds * 0.9  # ~25% of the steps were empty (no forward pass)
    assert min(forwards) >= 1
    # Every step, empty or not, added N(0, sigma^2 C^2) / (q n = 1): 40 noise draws per update.
    updates = torch.stack([r.update for r in results])
    ratio, ok = noise_std_check(updates, math.sqrt(steps) * sigma * c, known_mean=torch.zeros(()))
    assert ok, f"noise std {ratio:.4f} x sqrt(steps)*sigma*C"


def test_a_fit_that_is_all_empty_batches_reports_nan_loss_and_clip_fraction() -> None:
    trainer = DPSGDTrainer(mlp(0), TrainConfig(lr=0.1, batch_size=1, max_steps=1), DPSGDConfig(1.0, 1.0))
    data = blobs(20, seed=4)  # q = 1/20: (19/20)^20 = 36% of single-step fits draw nothing
    results = [fit(trainer, data, seed=s) for s in range(20)]
    empty = [r for r in results if math.isnan(r.metrics["loss"])]
    assert empty and len(empty) < 20
    assert all(math.isnan(r.metrics["clip_fraction"]) and r.privacy.steps == 1 for r in empty)
    assert all(r.update.abs().sum() > 0 for r in empty)  # the noise was still applied


# ----------------------------------------------------------------------------- clipping


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def test_clipping_bounds_each_example_to_c() -> None:
    c, n = 0.1, 6
    # Large inputs and near-zero weights (softmax ~ uniform): per-example gradient norms >> C.
    x, y = blobs(n, seed=5, d=5, scale=100.0)

    def linear() -> nn.Module:
        return init(nn.Linear(5, 3), 1, scale=1e-3)

    grads = per_example_grads(linear(), x, y)
    norms = grads.norm(dim=1)
    assert norms.min() > 20 * c
    # Opacus's clip factor: C / (norm + 1e-6), at most 1.
    expected = -(grads * (c / (norms + 1e-6)).unsqueeze(1)).mean(0)
    assert grads.mean(0).norm() > 5 * c  # without clipping the step would be much longer

    cfg = TrainConfig(lr=1.0, batch_size=10)
    result = fit(DPSGDTrainer(linear(), cfg, DPSGDConfig(0.0, c)), (x, y), seed=0)
    assert result.update.norm() <= c
    torch.testing.assert_close(result.update, expected, rtol=1e-5, atol=1e-8)
    assert result.metrics["clip_fraction"] == 1.0

    # With a bound no gradient reaches, DP-SGD without noise is plain SGD.
    dp = fit(DPSGDTrainer(linear(), cfg, DPSGDConfig(0.0, 1e6)), (x, y), seed=0)
    plain = fit(LocalTrainer(linear(), cfg), (x, y), seed=0)
    assert dp.metrics["clip_fraction"] == 0.0
    torch.testing.assert_close(dp.update, plain.update, rtol=1e-5, atol=1e-5)


def test_clip_fraction_counts_the_examples_above_c() -> None:
    x, y = blobs(8, seed=6, d=5)
    grads = per_example_grads(init(nn.Linear(5, 3), 1), x, y)
    sorted_norms = grads.norm(dim=1).sort().values
    c = (sorted_norms[3] + sorted_norms[4]).item() / 2  # half the examples above C, none near it
    result = fit(
        DPSGDTrainer(init(nn.Linear(5, 3), 1), TrainConfig(lr=1.0, batch_size=8), DPSGDConfig(0.0, c)),
        (x, y),
        seed=0,
    )
    assert result.metrics["clip_fraction"] == (grads.norm(dim=1) > c).float().mean().item()
    assert 0 < result.metrics["clip_fraction"] < 1


def test_equals_stock_opacus_gradsamplemodule_and_dpoptimizer() -> None:
    # q = 1 makes the batches deterministic (all examples), so the same model driven by a
    # stock Opacus GradSampleModule + DPOptimizer, as make_private builds them, must agree.
    n, c, lr, epochs = 8, 2.0, 0.2, 3
    x, y = blobs(n, seed=7)
    cfg = TrainConfig(lr=lr, batch_size=8, momentum=0.9, local_epochs=epochs)
    ours = fit(DPSGDTrainer(mlp(2), cfg, DPSGDConfig(0.0, c)), (x, y), seed=0)
    assert 0 < ours.metrics["clip_fraction"] < 1

    model = mlp(2)
    start = flat_params(model)
    gsm = GradSampleModule(model)
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
        noise_multiplier=0.0,
        max_grad_norm=c,
        expected_batch_size=int(n * 1.0),  # make_private: int(len(dataset) * sample_rate)
    )
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(gsm(x), y).backward()
        opt.step()
    torch.testing.assert_close(ours.update, flat_params(model) - start, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- reuse and seeds


def test_reused_trainer_is_bit_identical_to_itself_and_to_a_fresh_one() -> None:
    cfg = TrainConfig(lr=0.1, batch_size=5, momentum=0.9, local_epochs=2)
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=0.7)
    device_a, device_b = blobs(23, seed=8), blobs(40, seed=9)
    trainer = DPSGDTrainer(mlp(3), cfg, dp)
    first_a = fit(trainer, device_a, seed=(0, 1, 0))
    b = fit(trainer, device_b, seed=(0, 1, 1))
    second_a = fit(trainer, device_a, seed=(0, 1, 0))
    assert torch.equal(first_a.update, second_a.update)
    assert first_a.metrics == second_a.metrics and first_a.privacy == second_a.privacy
    assert b.privacy == DPSGDEvent(1.0, 1 / 8, 16)

    fresh = fit(DPSGDTrainer(mlp(3), cfg, dp), device_a, seed=(0, 1, 0))
    assert torch.equal(first_a.update, fresh.update)

    other_seed = fit(trainer, device_a, seed=(0, 2, 0))
    assert not torch.allclose(first_a.update, other_seed.update, atol=1e-3)


def test_a_fit_that_raised_mid_step_leaves_nothing_behind() -> None:
    calls = 0

    def flaky_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:  # after the forward pass: the hooks hold this batch's activations
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    cfg = TrainConfig(lr=0.1, batch_size=5, momentum=0.9)
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=0.7)
    data = blobs(23, seed=10)
    trainer = DPSGDTrainer(mlp(4), cfg, dp, loss_fn=flaky_loss)
    with pytest.raises(RuntimeError, match="boom"):
        fit(trainer, data, seed=1)
    after = fit(trainer, data, seed=1)
    fresh = fit(DPSGDTrainer(mlp(4), cfg, dp), data, seed=1)
    assert torch.equal(after.update, fresh.update)


def test_dataset_items_give_the_same_update_as_tensors() -> None:
    x, y = blobs(23, seed=11)
    cfg, dp = TrainConfig(lr=0.1, batch_size=5), DPSGDConfig(1.0, 1.0)
    trainer = DPSGDTrainer(mlp(5), cfg, dp)
    assert torch.equal(fit(trainer, (x, y), seed=3).update, fit(trainer, PairDataset(x, y), seed=3).update)


# ----------------------------------------------------------------------------- accounting event


@pytest.mark.parametrize(
    ("n", "batch_size", "epochs", "max_steps", "rate", "steps"),
    [
        (25, 10, 1, None, 1 / 3, 3),
        (30, 1, 2, None, 1 / 30, 60),
        (5, 10, 3, None, 1.0, 3),
        (100, 10, 2, 7, 1 / 10, 7),
        (49, 1, 1, None, 1 / 49, 49),  # make_private's int(49 * (1/49)) would be 0
    ],
)
def test_event_has_opacus_sample_rate_and_step_count(n, batch_size, epochs, max_steps, rate, steps) -> None:
    cfg = TrainConfig(lr=0.05, batch_size=batch_size, local_epochs=epochs, max_steps=max_steps)
    result = fit(DPSGDTrainer(mlp(6), cfg, DPSGDConfig(0.9, 1.0)), blobs(n, seed=12), seed=0)
    assert result.privacy == DPSGDEvent(noise_multiplier=0.9, sample_rate=rate, steps=steps)
    assert result.metrics["steps"] == steps and result.num_examples == n
    assert torch.isfinite(result.update).all() and math.isfinite(result.metrics["loss"])


@pytest.mark.parametrize("vectorized", [False, True])
def test_one_example_more_or_less_runs_the_same_mechanism_under_a_public_count(vectorized: bool) -> None:
    """The attack this closes: with q and steps read from len(data), a device of exactly k
    batches (n = kB) takes k + 1 steps once one example is added, so its update carries one
    more step of noise (its squared norm grows by ~1/k, which 10^5 coordinates measure to
    0.5%) and the add/remove-one epsilon of its event is false. With the public count the
    neighbouring data sets (n - 1, n, n + 1 examples) run the same q, the same steps, the
    same expected batch size, and report the same count."""
    from clients.vectorized import VectorizedTrainer

    cfg, dp = TrainConfig(lr=0.05, batch_size=10, local_epochs=1), DPSGDConfig(1.0, 1.0)
    x, y = blobs(21, seed=3)
    neighbours = [(x[:19], y[:19]), (x[:20], y[:20]), (x, y)]  # public count 20 = 2 batches of 10
    assert fit(DPSGDTrainer(mlp(6), cfg, dp), neighbours[2], seed=0).privacy.steps == 3  # from len(data): the leak
    if vectorized:
        trainer = VectorizedTrainer(mlp(6), cfg, dp)
        results = trainer.fit_many(flat_params(trainer.model), neighbours, [0, 0, 0], public_examples=[20, 20, 20])
    else:
        trainer = DPSGDTrainer(mlp(6), cfg, dp)
        start = flat_params(trainer.model).clone()
        results = [trainer.fit(start, data, seed=0, public_examples=20) for data in neighbours]
    for r in results:
        assert r.privacy == DPSGDEvent(noise_multiplier=1.0, sample_rate=0.5, steps=2)
        assert r.num_examples == 20 and r.metrics["steps"] == 2
    with pytest.raises(ValueError, match="public_examples must be a positive int"):
        DPSGDTrainer(mlp(6), cfg, dp).fit(flat_params(mlp(6)), neighbours[0], seed=0, public_examples=0)


def test_the_public_count_scales_the_noise_like_the_data_size_it_replaces() -> None:
    """Noise std = sigma C / (public / batches): the normalization follows the public count,
    not the data given (pure-noise updates: every per-example gradient is 0)."""
    cfg = TrainConfig(lr=1.0, batch_size=100, local_epochs=1)
    trainer = DPSGDTrainer(mlp(1), cfg, DPSGDConfig(2.0, 0.5), loss_fn=zero_grad_loss)
    start = flat_params(trainer.model).clone()
    data = blobs(7, seed=1)  # one batch: q = 1, expected batch size = the public count 40
    updates = torch.stack([trainer.fit(start, data, seed=s, public_examples=40).update for s in range(40)])
    ratio, ok = noise_std_check(updates, 2.0 * 0.5 / 40, known_mean=torch.zeros(updates.shape[1]))
    assert ok, ratio


def test_plain_trainer_records_no_privacy_event() -> None:
    assert fit(LocalTrainer(mlp(0), TrainConfig(lr=0.1)), blobs(10, seed=0), seed=0).privacy is None


# ----------------------------------------------------------------------------- FedProx


def test_fedprox_term_is_added_after_noise_like_the_plain_trainer() -> None:
    # sigma = 0, no clipping, q = 1: DP-SGD is full-batch SGD, so with FedProx it must match
    # LocalTrainer's FedProx step for step (the proximal pull acts from the second step on).
    x, y = blobs(8, seed=13)
    cfg = TrainConfig(lr=0.3, batch_size=10, local_epochs=4, proximal_mu=2.0)
    dp = fit(DPSGDTrainer(mlp(7), cfg, DPSGDConfig(0.0, 1e6)), (x, y), seed=0)
    plain = fit(LocalTrainer(mlp(7), cfg), (x, y), seed=0)
    torch.testing.assert_close(dp.update, plain.update, rtol=1e-5, atol=1e-6)
    no_prox_cfg = TrainConfig(lr=0.3, batch_size=10, local_epochs=4)
    no_prox = fit(DPSGDTrainer(mlp(7), no_prox_cfg, DPSGDConfig(0.0, 1e6)), (x, y), seed=0)
    assert (dp.update - no_prox.update).norm() > 1e-2 * no_prox.update.norm()


# ----------------------------------------------------------------------------- grad sample modes


def test_ew_and_functorch_modes_match_hooks() -> None:
    cfg = TrainConfig(lr=0.1, batch_size=5, local_epochs=2)
    data = blobs(23, seed=14)
    results = {
        mode: fit(DPSGDTrainer(mlp(8), cfg, DPSGDConfig(1.0, 0.5, mode)), data, seed=5)
        for mode in ("hooks", "ew", "functorch")
    }
    for mode in ("ew", "functorch"):
        torch.testing.assert_close(results[mode].update, results["hooks"].update, rtol=1e-5, atol=1e-6)
        assert results[mode].metrics["clip_fraction"] == results["hooks"].metrics["clip_fraction"]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="hooks, ew, functorch"):
        DPSGDConfig(1.0, 1.0, "ghost")
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPSGDConfig(-0.1, 1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPSGDConfig(1.0, 0.0)
    trainer = DPSGDTrainer(mlp(0), TrainConfig(lr=0.1), DPSGDConfig(1.0, 1.0))
    with pytest.raises(ValueError, match="no training examples"):
        trainer.fit(flat_params(trainer.model), (torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)), seed=0)


# ----------------------------------------------------------------------------- check_model


def bn_model() -> nn.Module:
    return init(nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)), 9)


def test_check_model_names_batchnorm_and_the_fix_key_in_one_line() -> None:
    with pytest.raises(ValueError) as err:
        check_model(bn_model())
    message = str(err.value)
    assert "\n" not in message
    assert "BatchNorm1d at '1'" in message and "GroupNorm" in message
    assert "privacy.dpsgd.fix_model=true" in message
    with pytest.raises(ValueError, match="BatchNorm1d at '1'"):  # the trainer checks first
        DPSGDTrainer(bn_model(), TrainConfig(lr=0.1), DPSGDConfig(1.0, 1.0))
    fine = mlp(0)
    assert check_model(fine) is fine


def test_check_model_does_not_offer_a_fix_that_cannot_work() -> None:
    # BatchNorm without affine parameters mixes examples too, but Opacus's fixer skips it.
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="BatchNorm1d at '1'") as err:
        check_model(model)
    assert "fix_model" not in str(err.value)
    with pytest.raises(ValueError, match="even after Opacus's replacements"):
        check_model(model, fix=True)


def test_check_model_fix_replaces_batchnorm_and_the_result_trains() -> None:
    original = bn_model()
    fixed = check_model(original, fix=True)
    assert isinstance(original[1], nn.BatchNorm1d)  # Opacus fixes a copy
    assert isinstance(fixed[1], nn.GroupNorm)
    assert ModuleValidator.is_valid(fixed) and check_model(fixed) is fixed
    trainer = DPSGDTrainer(fixed, TrainConfig(lr=0.1, batch_size=5), DPSGDConfig(1.0, 1.0))
    result = fit(trainer, blobs(20, seed=15), seed=0)
    assert torch.isfinite(result.update).all() and result.update.abs().sum() > 0


def test_a_device_whose_data_is_empty_takes_noise_only_steps_under_a_public_count() -> None:
    """One example removed from a device of one: without a public count the fit raises (the
    device would fail, which the server sees); with it, the same event and count as with the
    example, and an update of pure noise."""
    cfg, dp = TrainConfig(lr=1.0, batch_size=10, local_epochs=2), DPSGDConfig(1.0, 1.0)
    trainer = DPSGDTrainer(mlp(2), cfg, dp)
    start = flat_params(trainer.model).clone()
    x, y = blobs(1, seed=4)
    empty = (x[:0], y[:0])
    with pytest.raises(ValueError, match="no training examples"):
        trainer.fit(start, empty, seed=0)
    one = trainer.fit(start, (x, y), seed=0, public_examples=1)
    none = trainer.fit(start, empty, seed=0, public_examples=1)
    assert none.privacy == one.privacy == DPSGDEvent(noise_multiplier=1.0, sample_rate=1.0, steps=2)
    assert none.num_examples == one.num_examples == 1 and math.isnan(none.metrics["loss"])
    assert torch.isfinite(none.update).all() and none.update.abs().sum() > 0
