"""fedsim.scattering and model.name=scatternet: the scattering transform equals an independent
implementation's (kymatio 0.3.0, recorded by scripts/scattering_reference.py), and the
ScatterNet model trains with DP-SGD vectorized exactly as one by one."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from clients import DPSGDConfig, DPSGDTrainer, TrainConfig
from clients.params import flat_params
from clients.vectorized import VectorizedTrainer, vectorizable
from fedsim import randomness
from fedsim.config import ModelConfig, from_dict
from fedsim.errors import ConfigError
from fedsim.models import FixedFeatures, build_model, model_for, split_fixed_features
from fedsim.scattering import Scattering2D, output_channels
from fedsim.worker import FeatureCache, Worker, device_seed

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

REFERENCE = Path(__file__).parent / "data" / "scattering_reference.npz"


@pytest.mark.parametrize("case", ["femnist_J2", "noise_rgb_J3", "noise_J1"])
def test_equals_kymatio(case: str) -> None:
    """Every coefficient, in kymatio's order, to float32 rounding (kymatio normalises by 2 x 3.1415
    where fedsim uses pi: a relative 3e-5). A wrong filter, angle, scale order, padding or
    sub-sampling changes coefficients by far more (checked below for two such mistakes)."""
    ref = np.load(REFERENCE)
    x, expected, J = ref[f"{case}_input"], ref[f"{case}_output"], int(ref[f"{case}_J"])
    transform = Scattering2D(x.shape[-2:], J=J, L=8)
    out = transform(torch.from_numpy(x)).numpy()
    assert out.shape == expected.shape == (x.shape[0], x.shape[1] * output_channels(J, 8), x.shape[2] // 2**J, x.shape[3] // 2**J)
    scale = np.abs(expected).max()
    assert np.abs(out - expected).max() <= 1e-4 * scale
    # The test's tolerance is far tighter than what two plausible mistakes produce:
    swapped = out.reshape(out.shape[0], x.shape[1], -1, *out.shape[-2:])[:, :, ::-1].reshape(out.shape)
    assert np.abs(swapped - expected).max() > 100 * 1e-4 * scale  # coefficients in another order
    shifted = Scattering2D(x.shape[-2:], J=J, L=8)(torch.from_numpy(np.roll(x, 1, axis=-1))).numpy()
    assert np.abs(shifted - expected).max() > 10 * 1e-4 * scale  # an input off by one pixel


def test_shapes_channels_and_no_state() -> None:
    assert [output_channels(J, 8) for J in (1, 2, 3)] == [9, 81, 217]
    assert output_channels(2, 6) == 1 + 12 + 36
    transform = Scattering2D((28, 28))
    x = torch.rand(3, 2, 28, 28, requires_grad=True)
    out = transform(x)
    assert out.shape == (3, 2 * 81, 7, 7) and out.dtype == torch.float32
    assert not out.requires_grad  # a fixed input layer: no gradient flows through it
    assert list(transform.parameters()) == [] and list(transform.buffers()) == []
    # Channel c's coefficients are those of image c alone.
    alone = transform(x[:, 1:].detach())
    torch.testing.assert_close(out[:, 81:], alone)
    # Per example (what leaves DP-SGD's per-example guarantee as it is): the scatternet front gives
    # an example the same features alone as inside any batch.
    front = _scatternet("linear")[0]
    batch = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(front(batch)[2:3], front(batch[2:3]), rtol=1e-5, atol=1e-6)
    # Order 0 is a local average: a constant image gives its constant there and nothing else.
    flat = transform(torch.full((1, 1, 28, 28), 0.5))
    torch.testing.assert_close(flat[0, 0], torch.full((7, 7), 0.5), rtol=1e-4, atol=1e-5)
    assert flat[0, 1:].abs().max() < 1e-4  # Morlet filters have zero mean


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 2\\^J = 4, got 30 x 28"):
        Scattering2D((30, 28))
    with pytest.raises(ValueError, match="expected images \\[B, C, 28, 28\\], got \\(2, 28, 28\\)"):
        Scattering2D((28, 28))(torch.rand(2, 28, 28))


def _scatternet(head: str, classes: int = 62, shape=(1, 28, 28)) -> torch.nn.Module:
    cfg = ModelConfig(name="scatternet", scatter_head=head, cnn_channels=[8, 16], cnn_dense=16, norm_groups=4)
    return build_model(cfg, shape, classes, seed=0)


def test_scatternet_heads_and_sizes() -> None:
    linear, cnn = _scatternet("linear"), _scatternet("cnn")
    assert sum(p.numel() for p in linear.parameters()) == 81 * 7 * 7 * 62 + 62
    conv = 81 * 8 * 25 + 8 + 2 * 8 + 8 * 16 * 25 + 16 + 2 * 16  # 5x5 convs and their GroupNorms
    assert sum(p.numel() for p in cnn.parameters()) == conv + (16 * 1 * 1) * 16 + 16 + 16 * 62 + 62
    x = torch.rand(4, 1, 28, 28)
    assert linear(x).shape == cnn(x).shape == (4, 62)
    assert ModuleValidator.validate(linear, strict=False) == [] and ModuleValidator.validate(cnn, strict=False) == []
    rgb = _scatternet("linear", classes=10, shape=(3, 32, 32))
    assert rgb(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((60,), "scatternet needs image input (C, H, W); dataset gives (60,)"),
        ((1, 30, 30), "scatternet needs image sides that are multiples of 4, at least 8; dataset gives (1, 30, 30)"),
    ],
)
def test_scatternet_on_other_inputs_is_a_config_error(shape, message) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="scatternet"), shape, 10, seed=0)
    assert err.value.key == "model.name" and message in str(err.value)


def test_scatternet_dpsgd_vectorized_equals_opacus() -> None:
    """DP-SGD on the head only: the vectorized trainer and Opacus's hooks give the same updates for
    devices of different sizes, and the two devices' updates differ (no mix-up)."""
    model = _scatternet("linear", classes=5, shape=(1, 12, 12))
    g = torch.Generator().manual_seed(0)
    datas = [(torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in (6, 15)]
    seeds = [(1, 2, 0), (1, 2, 1)]
    cfg = TrainConfig(lr=0.5, batch_size=5, local_epochs=2)
    dp = DPSGDConfig(noise_multiplier=0.8, max_grad_norm=0.5)
    assert vectorizable(model, cfg, dp, example=datas[0]) is None
    start = flat_params(model)
    ref = [DPSGDTrainer(copy.deepcopy(model), cfg, dp).fit(start, d, seed=s) for d, s in zip(datas, seeds, strict=True)]
    out = VectorizedTrainer(model, cfg, dp).fit_many(start, datas, seeds)
    for r, o in zip(ref, out, strict=True):
        torch.testing.assert_close(o.update, r.update, rtol=1e-5, atol=1e-6)
        assert o.privacy == r.privacy
    assert (ref[0].update - ref[1].update).abs().max() > 1e-3


# ----------------------------------------------------------------------------- workers: features once per device


def _femnist_cfg(vectorize: str) -> object:
    return from_dict({
        "seed": 3, "population": 105, "cohort": {"size": 4}, "dataset": {"name": "femnist"},
        "model": {"name": "scatternet"}, "algorithm": {"lr": 0.5, "batch_size": 16, "local_epochs": 2},
        "privacy": {"dpsgd": {"noise_multiplier": 1.1, "max_grad_norm": 1.0}},
        "simulation": {"vectorize": vectorize},
    })  # fmt: skip


@pytest.mark.parametrize("vectorize", ["on", "off"])
def test_worker_trains_the_head_on_features_kept_per_device(vectorize: str, monkeypatch) -> None:
    """A worker computes a device's scattering features once and trains the head on them: the
    updates equal DP-SGD on the whole model from the raw images (features at every step), and a
    device's second round reads no data."""
    cfg = _femnist_cfg(vectorize)
    worker = Worker(cfg)
    assert isinstance(worker.features, FixedFeatures) and list(worker.model.parameters())
    full = model_for(cfg, worker.dataset)
    assert split_fixed_features(full)[1][-1].weight.shape == worker.model[-1].weight.shape
    params = torch.cat([p.detach().reshape(-1) for p in full.parameters()])
    ids = [0, 5, 9]
    report = worker.train(params, 1, ids, groups=[3] if vectorize == "on" else None)
    assert report.device_ids == ids and not report.failed_ids
    streams = randomness.streams(cfg)
    for row, d in zip(report.updates, ids, strict=True):
        ref = DPSGDTrainer(model_for(cfg, worker.dataset), TrainConfig(lr=0.5, batch_size=16, local_epochs=2),
                           DPSGDConfig(noise_multiplier=1.1, max_grad_norm=1.0))  # fmt: skip
        expected = ref.fit(params, worker.dataset.device_data(d), seed=device_seed(streams, 1, d)).update
        torch.testing.assert_close(torch.from_numpy(np.asarray(row)), expected, rtol=1e-4, atol=1e-5)
    assert np.abs(report.updates[0] - report.updates[1]).max() > 1e-3
    calls = []
    monkeypatch.setattr(worker.dataset, "device_data", lambda d: calls.append(d) or (_ for _ in ()).throw(AssertionError))
    again = worker.train(params, 1, ids, groups=[3] if vectorize == "on" else None)
    assert calls == [] and all(np.array_equal(a, b) for a, b in zip(again.updates, report.updates, strict=True))


def test_feature_cache_keeps_the_recent_devices_within_its_budget() -> None:
    item = (torch.zeros(256, 1024), torch.zeros(0, dtype=torch.int64))  # 1 MiB
    cache = FeatureCache(budget_mb=2.5)
    for d in range(3):
        cache.put(d, item)
    assert cache.get(0) is None and cache.get(1) is not None and cache.nbytes == 2 * 2**20
    cache.put(3, item)  # 1 was just read: 2 goes
    assert cache.get(2) is None and cache.get(1) is not None and cache.get(3) is not None
    big = (torch.zeros(3 * 2**18 * 4 // 4, 1), torch.zeros(0))  # 3 MiB: never kept, still returned
    assert cache.put(9, big) is big and cache.get(9) is None and cache.nbytes == 2 * 2**20


def test_a_scatternet_run_evaluates_the_whole_model(tmp_path) -> None:
    """A FEMNIST run end to end (in-process workers): the server evaluates the head on the test
    set's features computed once, which must equal the whole model on the raw test images."""
    import json

    from clients import evaluate
    from fake_grid import run_local

    cfg = from_dict({
        "seed": 0, "rounds": 2, "eval_every": 1, "population": 105, "cohort": {"size": 4, "sampling": "fixed"},
        "dataset": {"name": "femnist", "max_test_examples": 300}, "model": {"name": "scatternet"},
        "algorithm": {"lr": 0.1, "batch_size": 20}, "output": {"dir": str(tmp_path / "r"), "progress": False},
    })  # fmt: skip
    summary = run_local(cfg, tmp_path / "r", workers=2)
    rounds = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["devices_trained"] for r in rounds] == [4, 4]
    model = model_for(cfg, Worker(cfg).dataset)
    model.load_state_dict(torch.load(tmp_path / "r" / "model.pt", weights_only=True)["state_dict"])
    test = Worker(cfg).dataset.test_data()
    whole = evaluate(model, test)
    assert rounds[-1]["test_accuracy"] == pytest.approx(whole["accuracy"], abs=1e-9)
    assert rounds[-1]["test_loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert summary["final_test_accuracy"] == rounds[-1]["test_accuracy"] > 0.05  # learnt something in 2 rounds
