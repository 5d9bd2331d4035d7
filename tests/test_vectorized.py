"""clients.vectorized: cohort-vectorized training equals the one-by-one trainers, device for device.

Every test trains the same devices with the same seeds twice, once with LocalTrainer or
DPSGDTrainer (Opacus hooks) device after device and once with VectorizedTrainer.fit_many,
and compares the updates (to float rounding) and the metrics. Each device gets its own
seed, and the devices have different sizes, so a mix-up of seeds, batches, noise streams
or devices would show: `assert_distinguishable` checks that the tolerance is far tighter
than the difference between two devices' (or two seeds') results.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from clients import DPSGDConfig, DPSGDTrainer, LocalTrainer, TrainConfig, TrainResult, new_generator
from clients.params import flat_params
from clients.vectorized import VectorizedTrainer, vectorizable
from fedsim.config import ModelConfig
from fedsim.models import build_model
from helpers import PairDataset

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

RTOL, ATOL = 1e-5, 1e-6
SIZES = (7, 23, 50)


def mlp(d: int = 10, classes: int = 3) -> nn.Module:
    return build_model(ModelConfig(name="mlp", hidden_sizes=[16]), (d,), classes, seed=0)


def small_cnn() -> nn.Module:
    """fedsim's cnn (conv, GroupNorm, ReLU, max-pool twice, dense, output), made small."""
    cfg = ModelConfig(name="cnn", cnn_channels=[4, 8], cnn_dense=16, norm_groups=2)
    return build_model(cfg, (1, 12, 12), 5, seed=0)


def blobs(n: int, seed: int, shape: tuple[int, ...] = (10,), classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, *shape, generator=g)
    x.view(n, -1)[torch.arange(n), y] += 2.0  # learnable, so losses and gradients are not all alike
    return x, y


def devices(sizes=SIZES, shape=(10,), classes=3):
    datas = [blobs(n, seed=100 + i, shape=shape, classes=classes) for i, n in enumerate(sizes)]
    seeds = [(7, 3, i) for i in range(len(sizes))]  # (run seed, round, device id): one per device
    return datas, seeds


def one_by_one(model, cfg, datas, seeds, dp=None) -> list[TrainResult]:
    """The reference: the existing trainers on a copy of the model (Opacus hooks its model)."""
    start = flat_params(model)
    ref_model = copy.deepcopy(model)
    trainer = LocalTrainer(ref_model, cfg) if dp is None else DPSGDTrainer(ref_model, cfg, dp)
    return [trainer.fit(start, data, seed=seed) for data, seed in zip(datas, seeds, strict=True)]


def vectorized(model, cfg, datas, seeds, dp=None, **kwargs) -> list[TrainResult | Exception]:
    return VectorizedTrainer(model, cfg, dp, **kwargs).fit_many(flat_params(model), datas, seeds)


def assert_same(ref: list[TrainResult], out: list[TrainResult]) -> None:
    assert len(ref) == len(out)
    for r, o in zip(ref, out, strict=True):
        assert isinstance(o, TrainResult), o
        torch.testing.assert_close(o.update, r.update, rtol=RTOL, atol=ATOL)
        assert o.update.dtype == torch.float32
        assert o.num_examples == r.num_examples
        assert o.privacy == r.privacy
        assert o.metrics.keys() == r.metrics.keys()
        for key, value in r.metrics.items():
            if math.isnan(value):
                assert math.isnan(o.metrics[key]), key
            else:
                assert o.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def assert_distinguishable(results: list[TrainResult]) -> None:
    """Any two devices' updates differ by far more than the tolerance of assert_same."""
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            gap = (results[i].update - results[j].update).abs().max().item()
            assert gap > 1000 * ATOL, (i, j, gap)


# ----------------------------------------------------------------------------- plain SGD


def test_mlp_matches_local_trainer_unequal_devices_two_epochs():
    model = mlp()
    datas, seeds = devices()
    cfg = TrainConfig(lr=0.1, local_epochs=2, batch_size=10)
    ref = one_by_one(model, cfg, datas, seeds)
    out = vectorized(model, cfg, datas, seeds)
    assert_same(ref, out)
    assert [r.metrics["steps"] for r in out] == [2.0, 6.0, 10.0]  # ceil(n/10) * 2: devices finish at different steps
    assert_distinguishable(ref)
    # The same devices with their seeds rotated give other batches, hence other updates (not for
    # the 7-example device: one batch of everything per epoch, whatever the permutation).
    rotated = vectorized(model, cfg, datas, seeds[1:] + seeds[:1])
    for r, o in zip(ref[1:], rotated[1:], strict=True):
        assert (r.update - o.update).abs().max() > 1000 * ATOL


@pytest.mark.parametrize(
    "cfg",
    [
        TrainConfig(lr=0.05, local_epochs=2, batch_size=10, momentum=0.9, weight_decay=1e-2, proximal_mu=0.5),
        TrainConfig(lr=0.1, local_epochs=3, batch_size=10, momentum=0.5, max_steps=4),  # cuts 23 and 50 mid-epoch
        TrainConfig(lr=0.1, local_epochs=1, batch_size=16, proximal_mu=0.1),  # n=7 < batch: one short batch
    ],
    ids=["momentum-wd-prox", "max_steps", "batch-larger-than-device"],
)
def test_optimizer_options_match_local_trainer(cfg):
    model = mlp()
    datas, seeds = devices()
    ref = one_by_one(model, cfg, datas, seeds)
    assert_same(ref, vectorized(model, cfg, datas, seeds))
    assert_distinguishable(ref)


def test_frozen_parameters_and_datasets_and_generator_seeds():
    """Frozen layers stay out of the update; a Dataset and a torch.Generator seed work as in fit."""
    model = mlp()
    model[1].weight.requires_grad_(False)
    datas, _ = devices()
    cfg = TrainConfig(lr=0.1, momentum=0.9)
    mixed = [datas[0], PairDataset(*datas[1]), datas[2]]
    ref = one_by_one(model, cfg, mixed, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    out = vectorized(model, cfg, mixed, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert_same(ref, out)
    assert out[0].update.numel() == flat_params(model).numel()


def test_empty_device_is_reported_in_its_slot_and_others_train():
    model = mlp()
    datas, seeds = devices()
    empty = (torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))
    wrong_shape = blobs(5, seed=1, shape=(11,))
    cfg = TrainConfig(lr=0.1)
    mixed = [datas[0], empty, datas[1], wrong_shape, datas[2]]
    out = vectorized(model, cfg, mixed, [seeds[0], 9, seeds[1], 9, seeds[2]])
    assert isinstance(out[1], ValueError) and "no training examples" in str(out[1])
    assert isinstance(out[3], ValueError)
    assert_same(one_by_one(model, cfg, datas, seeds), [out[0], out[2], out[4]])
    # The one-by-one path raises the same error for the empty device.
    with pytest.raises(ValueError, match="no training examples"):
        LocalTrainer(copy.deepcopy(model), cfg).fit(flat_params(model), empty, seed=9)


def test_model_left_as_it_was_and_chunking_changes_nothing():
    model = mlp()
    model.eval()
    before = flat_params(model).clone()
    datas, seeds = devices()
    cfg = TrainConfig(lr=0.1, local_epochs=2, momentum=0.9)
    whole = vectorized(model, cfg, datas, seeds)
    for kwargs in ({"max_devices": 1}, {"memory_budget": 1}):
        chunked = vectorized(model, cfg, datas, seeds, **kwargs)
        for a, b in zip(whole, chunked, strict=True):
            torch.testing.assert_close(b.update, a.update, rtol=RTOL, atol=ATOL)
    assert torch.equal(flat_params(model), before)
    assert not any(m.training for m in model.modules())
    assert_same(one_by_one(model, cfg, datas, seeds), whole)


# ----------------------------------------------------------------------------- DP-SGD


def poisson_counts(n: int, cfg: TrainConfig, seed) -> list[int]:
    """The batch sizes DPSGDTrainer draws for a device (the noise seed is drawn first)."""
    g = new_generator(seed)
    torch.randint(0, 2**62, (4,), generator=g)
    num_batches = math.ceil(n / cfg.batch_size)
    steps = cfg.local_epochs * num_batches
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    return [int((torch.rand(n, generator=g) < 1.0 / num_batches).sum()) for _ in range(steps)]


def test_dpsgd_matches_opacus_with_noise_momentum_wd_prox():
    model = mlp()
    datas, seeds = devices()
    cfg = TrainConfig(lr=0.1, local_epochs=2, batch_size=10, momentum=0.9, weight_decay=1e-3, proximal_mu=0.1)
    dp = DPSGDConfig(noise_multiplier=1.1, max_grad_norm=2.0, grad_sample_mode="hooks")
    ref = one_by_one(model, cfg, datas, seeds, dp)
    out = vectorized(model, cfg, datas, seeds, dp)
    assert_same(ref, out)
    assert_distinguishable(ref)
    fractions = [r.metrics["clip_fraction"] for r in ref]
    assert all(0.0 < f < 1.0 for f in fractions), fractions  # the bound clips some examples, not all
    assert [o.privacy.steps for o in out] == [2, 6, 10]
    # Noise is on: the same devices with other seeds (other noise) give different updates.
    other = vectorized(model, cfg, datas, [(8, 3, i) for i in range(3)], dp)
    for r, o in zip(ref, other, strict=True):
        assert (r.update - o.update).abs().max() > 1000 * ATOL


def test_dpsgd_secure_mode_noise_matches_opacus_secure_mode():
    """Opacus's secure_mode draws each noise value as 4 Gaussians / 2 (after one discarded draw):
    the vectorized path must draw the same, or secure runs would differ by training path."""
    model = mlp()
    datas, seeds = devices()
    cfg = TrainConfig(lr=0.1, local_epochs=1, batch_size=10)
    secure = DPSGDConfig(noise_multiplier=1.1, max_grad_norm=2.0, secure_mode=True)
    ref = one_by_one(model, cfg, datas, seeds, secure)
    assert_same(ref, vectorized(model, cfg, datas, seeds, secure))
    plain = one_by_one(model, cfg, datas, seeds, DPSGDConfig(noise_multiplier=1.1, max_grad_norm=2.0))
    for r, p in zip(ref, plain, strict=True):  # same batches, other noise draws
        assert (r.update - p.update).abs().max() > 1000 * ATOL


def test_dpsgd_empty_poisson_batches_and_noise_only_steps():
    """Batch size 1 on 3 examples: q = 1/3, so a step's sample is empty with probability 8/27.

    Seeds are chosen (by replaying the draws) so that one device draws only empty batches
    (loss and clip_fraction nan, every step noise only), one draws some, and at some step
    every device of a one-device chunk is empty (the vectorized path then skips the model).
    """
    cfg = TrainConfig(lr=0.5, local_epochs=1, batch_size=1, momentum=0.5)
    dp = DPSGDConfig(noise_multiplier=0.7, max_grad_norm=0.5)
    candidates = [(5, 0, i) for i in range(400)]
    all_empty = next(s for s in candidates if sum(poisson_counts(3, cfg, s)) == 0)
    some_empty = next(s for s in candidates if 0 in poisson_counts(3, cfg, s) and sum(poisson_counts(3, cfg, s)) > 1)
    datas = [blobs(3, seed=1), blobs(3, seed=2), blobs(12, seed=3)]
    seeds = [all_empty, some_empty, (5, 0, 999)]
    model = mlp()
    ref = one_by_one(model, cfg, datas, seeds, dp)
    assert math.isnan(ref[0].metrics["loss"]) and math.isnan(ref[0].metrics["clip_fraction"])
    assert ref[0].update.abs().max() > 0  # noise-only steps still move the weights
    for kwargs in ({}, {"max_devices": 1}):
        assert_same(ref, vectorized(model, cfg, datas, seeds, dp, **kwargs))


def test_dpsgd_max_steps_and_no_noise():
    model = mlp()
    datas, seeds = devices()
    cfg = TrainConfig(lr=0.1, local_epochs=2, batch_size=10, max_steps=3)
    dp = DPSGDConfig(noise_multiplier=0.0, max_grad_norm=0.3)
    ref = one_by_one(model, cfg, datas, seeds, dp)
    assert_same(ref, vectorized(model, cfg, datas, seeds, dp))
    assert [r.privacy.steps for r in ref] == [2, 3, 3]


# ----------------------------------------------------------------------------- CNN with GroupNorm


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dpsgd"])
def test_cnn_with_groupnorm(private):
    model = small_cnn()
    datas, seeds = devices(sizes=(5, 13, 21), shape=(1, 12, 12), classes=5)
    cfg = TrainConfig(lr=0.1, local_epochs=2, batch_size=8, momentum=0.9, proximal_mu=0.1)
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0) if private else None
    ref = one_by_one(model, cfg, datas, seeds, dp)
    assert_same(ref, vectorized(model, cfg, datas, seeds, dp))
    assert_distinguishable(ref)


# ----------------------------------------------------------------------------- what cannot be vectorized


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * self.scale)


class DataDependent(nn.Module):
    """A forward torch.func cannot vmap: Python control flow on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


@pytest.mark.parametrize(
    "model, words",
    [
        (nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)), "Dropout at '1'"),
        (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), "BatchNorm1d at '1'"),
        (nn.Sequential(nn.Linear(4, 8), nn.InstanceNorm1d(8, track_running_stats=True)), "running statistics"),
        (WithBuffer(), "buffers"),
        (nn.Sequential(nn.ReLU()), "no trainable parameters"),
    ],
    ids=["dropout", "batchnorm", "running-stats", "buffer", "no-params"],
)
def test_unsupported_models_get_a_reason(model, words):
    reason = vectorizable(model, TrainConfig(lr=0.1), None)
    assert reason is not None and words in reason and "\n" not in reason
    with pytest.raises(ValueError, match="cannot vectorize"):
        VectorizedTrainer(model, TrainConfig(lr=0.1))


def test_opacus_hooked_model_and_unvmappable_forward_get_a_reason():
    cfg = TrainConfig(lr=0.1)
    hooked = mlp()
    DPSGDTrainer(hooked, cfg, DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    assert "hooks" in vectorizable(hooked, cfg, None)
    assert vectorizable(mlp(), cfg, None) is None
    assert vectorizable(small_cnn(), cfg, DPSGDConfig(1.0, 1.0)) is None
    # Structurally fine, but its forward branches on data: only a trial step finds that out.
    model = DataDependent()
    assert vectorizable(model, cfg, None) is None
    reason = vectorizable(model, cfg, None, example=blobs(4, seed=0, shape=(4,), classes=2))
    assert reason is not None and reason.startswith("torch.func could not run")
    assert vectorizable(mlp(), cfg, None, example=blobs(4, seed=0)) is None


def test_vectorized_training_without_torch_dynamo_gives_the_same_bits() -> None:
    """clients.vectorized._grads_without_dynamo: torch.func's grad no longer imports torch._dynamo
    (3 s of a worker's first round) while compiled autograd cannot be on; the updates are the
    ones torch's own code gives once torch._dynamo is imported, bit for bit (plain and DP-SGD)."""
    import subprocess
    import sys

    probe = """
import hashlib, sys, torch
from torch import nn
from clients import DPSGDConfig, TrainConfig, flat_params
from clients.vectorized import VectorizedTrainer

def fits(dp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    datas = [(torch.randn(9 + i, 6, 6, generator=g), torch.randint(0, 3, (9 + i,), generator=g)) for i in range(4)]
    results = VectorizedTrainer(model, TrainConfig(lr=0.1, batch_size=4, momentum=0.9), dp).fit_many(
        flat_params(model), datas, seeds=[3, 4, 5, 6])
    return hashlib.sha256(b"".join(r.update.numpy().tobytes() for r in results)).hexdigest()

plain = fits(None)
print("torch._dynamo" in sys.modules)
dp = fits(DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0))
import torch._dynamo
print(fits(None) == plain, fits(DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)) == dp)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "True"], out.stdout
