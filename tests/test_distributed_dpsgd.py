"""Distributed DP-SGD (privacy.dpsgd.noise=distributed): sample-level DP whose noise the devices
share under SecAgg+ (fedsim.privacy.distributed_sgd).

What would break the guarantee, each written as a test: a device's sum that is not the clipped,
scaled, sampled gradients it claims (checked against per-example autograd, one example at a
time); an example's rounded vector above the norm bound the accountant uses; an epsilon below
the papers' formulas computed here independently; noise the server can remove (secure mode);
a lying server that asks for less noise or a looser bound (active model); configurations the
accounting does not cover.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from clients import flat_params
from clients.params import load_flat_params
from fedsim import randomness, secure_rounds
from fedsim.config import from_dict
from fedsim.errors import ConfigError
from fedsim.models import split_fixed_features
from fedsim.privacy.distributed_sgd import SAMPLE_RATE, encoding, round_rows, rows_per_sum, sensitivity
from fedsim.privacy.skellam import ORDERS, SkellamSGDAccountant
from fedsim.sampling import sample_cohort
from fedsim.secagg import skellam
from fedsim.secure_grid import example_grid
from fedsim.worker import Worker, worker_model
from fake_grid import run_local
from helpers import set_keys

Z = 1.5


def ddp_config(tmp: Path, **over: object) -> dict:
    """8 of 30 devices, one round of distributed DP-SGD (z = 1.5, C = 0.5, lr 0.5, batch 20)."""
    raw: dict = {
        "seed": 5,
        "population": 30,
        "rounds": 1,
        "cohort": {"size": 8, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 60},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "algorithm": {"lr": 0.5, "batch_size": 20},
        "privacy": {"dpsgd": {"noise_multiplier": Z, "max_grad_norm": 0.5, "noise": "distributed"}},
        "secagg": {"name": "secaggplus"},
        "simulation": {"num_workers": 2, "ray_temp_dir": str(tmp / "ray")},
        "output": {"progress": False},
    }
    return set_keys(raw, over)


def final(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "model.pt", weights_only=False)["flat_params"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- the device's side ------------------------------------------------------------------------


def test_each_example_is_rounded_within_the_bound_and_without_bias() -> None:
    dim, norm = 2000, 4096.0
    bound = 4096.0 * 1.001 + 0.5 * math.sqrt(dim)  # what the accountant would take here: tight but attainable
    rng = np.random.default_rng(0)
    u = rng.normal(size=(16, dim))
    u *= norm / np.linalg.norm(u, axis=1, keepdims=True)
    for row in u:  # one row alone: its rounded vector is the whole sum
        q = round_rows(torch.from_numpy(row[None].astype(np.float32)), rng, bound).numpy()
        assert np.all(q == np.round(q)) and np.all(np.abs(q - row) < 1.0 + 1e-3)
        assert float(q @ q) <= bound * bound
    # Unbiased: the mean of many roundings of the same rows approaches their sum.
    rows32 = u.astype(np.float32)
    mean = np.mean([round_rows(torch.from_numpy(rows32.copy()), rng, bound).numpy() for _ in range(200)], axis=0)
    assert np.abs(mean - rows32.astype(np.float64).sum(0)).max() < 0.6  # 16 rows: std <= 2 / sqrt(200) per coordinate
    # A row no draw can fit (a server's too tight bound, or a 1e-43 event) is scaled into the bound
    # and truncated: its device does not fail, whatever the example holds.
    tight = norm * 0.9
    q = round_rows(torch.from_numpy(rows32[:1].copy()), rng, tight).numpy()
    assert float(q @ q) <= tight * tight and np.all(np.abs(q) <= np.abs(rows32[0]) + 1e-3)
    with pytest.raises(ValueError, match="at most"):
        round_rows(torch.zeros(rows_per_sum(bound) + 1, 3), rng, bound)


def test_the_grid_makes_rounding_inflate_the_sensitivity_by_under_a_thousandth(tmp_path: Path) -> None:
    for dim in (10, 246_140, 4_000_000):
        cfg = from_dict(ddp_config(tmp_path))
        grid = example_grid(cfg, dim)
        floor = max(4096, 16 * math.sqrt(dim))  # the smallest power of two >= both
        assert grid.example_norm == 2 ** math.ceil(math.log2(floor)) and grid.example_norm >= floor
        assert grid.step * grid.example_norm == pytest.approx(0.5 * 0.5 / 20, rel=1e-12)  # lr C / B
        d2, d1 = sensitivity(cfg, dim)
        assert grid.example_norm <= d2 <= 1.001 * grid.example_norm
        assert d1 == pytest.approx(d2 * min(math.sqrt(dim), d2))


def test_a_device_sends_its_examples_clipped_scaled_gradients(tmp_path: Path) -> None:
    """Against per-example autograd, one example at a time: the device's integer sum times the
    grid step is -(lr / B) sum of clip(g_i, C) over all its examples, up to rounding."""
    cfg = from_dict(ddp_config(tmp_path, **{"algorithm.batch_size": 25}))
    worker = Worker(cfg)
    params = flat_params(worker.model) + 0.01
    grid = example_grid(cfg, len(params))
    enc = encoding(cfg, len(params))
    model = split_fixed_features(worker_model(cfg, worker.dataset))[1]
    for device in (0, 3):
        report = worker.gradient_sums(params, 1, [device], norm_bound=enc.norm_bound,
                                      rounding=lambda d: np.random.default_rng([d, 2]))  # fmt: skip
        x, y = worker.dataset.device_data(device)
        chosen = range(len(y))
        load_flat_params(model, params)
        expected = torch.zeros(len(params), dtype=torch.float64)
        clipped = 0
        for i in chosen:
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            g = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
            clipped += int(g.norm() > 0.5)
            expected += -(0.5 / 25) * g * min(1.0, 0.5 / float(g.norm()))
        got = torch.from_numpy(report.updates[0].astype(np.float64)) * grid.step
        # Each example's rounding moves a coordinate by less than one step.
        assert (got - expected).abs().max() <= len(chosen) * grid.step
        assert report.dp_events == [(Z, SAMPLE_RATE, 1)] and SAMPLE_RATE == 1.0
        assert report.clip_fractions == [pytest.approx(clipped / len(chosen))]
        assert report.num_examples == [len(y)]
    # An example whose gradient is NaN (e.g. a model that overflows on it) counts as zero: its
    # device still sends, so whether it drops never depends on what an example holds.
    x, y = worker.dataset.device_data(0)
    x, y = x.clone(), y.clone()
    x[0] = float("nan")
    y[1] = 10_000  # a label the model has no class for: cross-entropy raises on it
    # (its device still sends; examples 0 and 1 count as zero)
    worker._feature_cache = type(worker._feature_cache)()
    worker.dataset.device_data = lambda d: (x, y)  # type: ignore[method-assign]
    report = worker.gradient_sums(params, 1, [0], norm_bound=enc.norm_bound, rounding=lambda d: np.random.default_rng(0))
    assert report.failed_ids == [] and report.device_ids == [0]
    without = worker._gradient_sums(params, x[2:], y[2:], norm_bound=enc.norm_bound, rounding=np.random.default_rng(0))
    assert np.abs(report.updates[0] - without.ints).max() <= len(y)  # the same sum, up to rounding


# ---- the accounting -------------------------------------------------------------------------


def _skellam(a: int, l2: float, l1: float, var: float) -> float:
    """Agarwal, Kairouz, Liu 2021, Corollary 3.6."""
    return a * l2 * l2 / (2 * var) + min(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * var * var), 3 * l1 / (2 * var))


def _poisson(a: int, q: float, eps) -> float:  # noqa: ANN001
    """Zhu and Wang 2019, Theorem 5 (the general upper bound), or eps(a) where that is smaller."""
    if q == 1:
        return eps(a)
    terms = [(a - 1) * math.log1p(-q) + math.log(a * q - q + 1),
             math.log(math.comb(a, 2)) + 2 * math.log(q) + (a - 2) * math.log1p(-q) + eps(2)]  # fmt: skip
    terms += [math.log(3) + math.log(math.comb(a, l)) + l * math.log(q) + (a - l) * math.log1p(-q) + (l - 1) * eps(l)
              for l in range(3, a + 1)]  # fmt: skip
    top = max(terms)
    return min((top + math.log(sum(math.exp(t - top) for t in terms))) / (a - 1), eps(a))


def independent_epsilon(events: list[tuple[float, float, int]], l2: float, l1: float, delta: float) -> float:
    rdp = [0.0] * len(ORDERS)
    for z, q, count in events:
        var = (z * l2) ** 2
        for i, a in enumerate(ORDERS):
            rdp[i] += count * _poisson(a, q, lambda k: _skellam(k, l2, l1, var))
    return float(compute_epsilon(np.array(ORDERS, dtype=float), np.array(rdp), delta)[0])


def test_the_accountant_equals_the_papers_formulas_and_is_above_the_gaussian() -> None:
    from fedsim.privacy.accountants import create_accountant
    from fedsim.privacy.events import make_event

    l2, l1 = 4100.0, 4100.0 * 70
    acc = SkellamSGDAccountant(l2=l2, l1=l1)
    gaussian = create_accountant("rdp")
    for events in ([(1.5, 1.0, 3)], [(2.0, 0.4, 5)], [(1.5, 1.0, 2), (1.5, 0.25, 4)]):
        history = tuple((make_event(noise_multiplier=z, sample_rate=q, steps=1), c) for z, q, c in events)
        eps = acc.epsilon(history, 1e-5)
        assert eps == pytest.approx(independent_epsilon(events, l2, l1, 1e-5), rel=1e-9)
        # Skellam with the rounded sensitivity is never more private than the Gaussian of the same z.
        assert eps >= gaussian.epsilon(history, 1e-5)
    # Without sampling and with little L1 correction it is the Gaussian's RDP, within 1%.
    one = ((make_event(noise_multiplier=3.0, sample_rate=1.0, steps=1), 20),)
    assert acc.epsilon(one, 1e-5) == pytest.approx(gaussian.epsilon(one, 1e-5), rel=0.01)


# ---- end to end on the in-process grid --------------------------------------------------------


def server_attack(raw: dict, run_dir: Path, cohort: list[int], z: float) -> tuple[np.ndarray, float, float]:
    """What a server that knows the seed and config can do: rebuild the round's noisy sum from the
    models before and after it, regenerate every device's Skellam share from the seed-derived
    stream and subtract it. Returns (what is left, the noise std per coordinate, the step)."""
    cfg = from_dict(raw)
    initial = flat_params(Worker(cfg).model)
    noisy_sum = (final(run_dir).double() - initial.double()) * len(cohort)
    h = rows(run_dir)[0]["secagg_noise_honest_inputs"]
    dim = len(initial)
    cfg.privacy.dpsgd.noise_multiplier = z
    enc = encoding(cfg, dim)
    step = example_grid(cfg, dim).step
    seeded = randomness.streams(from_dict(set_keys(copy.deepcopy(raw), {"privacy.randomness": "reproducible"})))
    regenerated = sum(skellam(enc.update_variance / h, dim, seeded.numpy(secure_rounds.NOISE_STREAM, 1, d)) for d in cohort)
    return noisy_sum.numpy() - regenerated * step, math.sqrt(len(cohort) / h * enc.update_variance) * step, step


@pytest.mark.parametrize("mode", ["secure", "reproducible"])
def test_the_server_sees_only_the_noisy_sum_and_can_remove_the_noise_only_in_reproducible_mode(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:  # fmt: skip
    received: list[tuple[str, object]] = []
    secure_rounds.RECEIVED.append(lambda stage, content: received.append((stage, content)))
    raw = ddp_config(tmp_path, **({"privacy.randomness": "reproducible"} if mode == "reproducible" else {}))
    try:
        summary = run_local(from_dict(raw), tmp_path / mode)
    finally:
        secure_rounds.RECEIVED.clear()
    sample = summary["privacy"]["sample_level"]
    assert summary["randomness"]["mode"] == mode
    assert sample["accountant"] == "skellam" and sample["distributed_noise"]["aggregate_skellam_variance"] > 0
    assert "1/h" in sample["distributed_noise"]["noise_share"] and "at most C" in sample["assumes"]["threat_model"]
    cfg = from_dict(raw)
    cohort = sample_cohort(population=30, cohort_size=8, method="fixed", rng=randomness.streams(cfg).numpy("cohort", 1))
    if mode == "secure":
        cohort = sorted(int(d) for stage, content in received if stage == "masked_input"
                        for d in content.config_records["devices"]["device_ids"])  # fmt: skip
    left, noise_std, step = server_attack(raw, tmp_path / mode, cohort, Z)
    # The devices' sums: each example's contribution has norm <= lr C / B = 0.0125 (+ rounding).
    worker = Worker(from_dict(set_keys(copy.deepcopy(raw), {"privacy.randomness": "reproducible"})))
    streams = randomness.streams(worker.cfg)
    report = worker.gradient_sums(
        flat_params(worker.model), 1, sorted(cohort), norm_bound=encoding(worker.cfg, len(left)).norm_bound,
        rounding=lambda d: streams.numpy(secure_rounds.EXAMPLE_ROUNDING_STREAM, 1, d),
    )  # fmt: skip
    sums = np.sum(report.updates, axis=0).astype(np.float64) * step
    if mode == "secure":
        # Regenerating from the seed leaves the noise in: far more than the devices' sums could be.
        assert np.linalg.norm(left - sums) > 0.5 * math.sqrt(len(left)) * noise_std
    else:
        # The server regenerates every share and subtracts it: only float error remains.
        assert np.abs(left - sums).max() < 1e-3 * noise_std
        assert "simulation only: the server can remove the noise" in caplog.text
        assert sample["assumes"]["randomness"].startswith("reproducible") and "simulation only" in sample["assumes"]["randomness"]
    # No loss or clipped fraction reaches the server, not even as a cohort sum; the counts do.
    row = rows(tmp_path / mode)[0]
    assert row["train_loss"] is None and row["clip_fraction"] is None
    assert summary["diagnostics_outside_guarantee"]["train_loss"].startswith("not sent under distributed DP-SGD")
    assert row["num_examples"] == sum(worker.dataset.num_examples(d) for d in cohort)
    # Nothing per device in the clear in any message the server received.
    for stage, content in received:
        devices = content.config_records.get("devices")
        if devices is not None:
            for key in ("loss", "num_examples", "clip_fraction"):
                assert list(devices[key]) == [], (stage, key)


def test_every_devices_epsilon_is_the_independent_composition_of_its_steps(tmp_path: Path) -> None:
    raw = ddp_config(tmp_path, rounds=3, **{"privacy.randomness": "reproducible", "privacy.dpsgd.noise_multiplier": None,
                                            "privacy.dpsgd.target_epsilon": 6.0})  # fmt: skip
    summary = run_local(from_dict(raw), tmp_path / "run")
    sample = summary["privacy"]["sample_level"]
    z = sample["noise_multiplier"]
    cfg = from_dict(set_keys(raw, {"privacy.dpsgd.noise_multiplier": z}))
    worker = Worker(cfg)
    l2, l1 = sensitivity(cfg, len(flat_params(worker.model)))
    assert sample["distributed_noise"]["example_l2_sensitivity"] == l2
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    epsilons = []
    for device, history in ledger["devices"].items():
        n = worker.dataset.num_examples(int(device))
        assert all((zz, q, steps) == (z, 1.0, 1) for zz, q, steps, _ in history), (n, history)
        participations = sum(count for *_, count in history)
        epsilons.append(independent_epsilon([(z, 1.0, participations)], l2, l1, 1e-5))
    assert sample["epsilon_max"] == pytest.approx(max(epsilons), rel=1e-9)
    # The analysis module recomputes the same from ledger.json (its sensitivities are recorded),
    # and will not account Skellam events with a Gaussian accountant.
    from analysis.privacy import device_epsilons
    from fedsim.privacy.accountants import create_accountant

    assert ledger["skellam_sensitivity"] == [l2, l1]
    assert device_epsilons(ledger).max == pytest.approx(max(epsilons), rel=1e-9)
    with pytest.raises(ValueError, match="its own accountant"):
        device_epsilons(ledger, create_accountant("rdp"))
    assert max(epsilons) <= 6.0  # calibrated for the median device; the budget admits no one above it
    assert all(r["secagg_noise_honest_inputs"] >= 1 for r in rows(tmp_path / "run"))


# ---- a lying server (active threat model) and configurations outside the accounting ------------


def test_devices_refuse_a_session_with_less_noise_a_looser_bound_or_another_grid(tmp_path: Path) -> None:
    cfg = from_dict(ddp_config(tmp_path, **{"secagg.threat_model": "active"}))
    dim, n = 1000, 8
    choice = secure_rounds.graph_choice(cfg, n)
    enc = encoding(cfg, dim)
    h = secure_rounds.survivor_floor(choice) - choice.corrupt
    fp = secure_rounds.fixed_point(cfg, n, dim=dim)
    honest = {"clip": fp.clip, "bits": fp.bits, "dim": dim, "norm_bound": enc.norm_bound,
              "skellam_mu": enc.update_variance / h, "skellam_mu_count": 0.0, "config": cfg.to_json()}  # fmt: skip
    secure_rounds.check_encoding(honest, cfg, choice)  # type: ignore[arg-type]
    for key, value, message in (
        ("skellam_mu", enc.update_variance / h * 0.99, "noise share"),
        ("norm_bound", enc.norm_bound * 1.01, "rounding norm bound"),
        ("norm_bound", enc.norm_bound * 0.6, "rounding norm bound"),  # would make large examples fall back
        ("dim", 1, "grid|rounding norm bound"),
        ("clip", fp.clip * 2, "grid"),
    ):
        with pytest.raises(ValueError, match=message):
            secure_rounds.check_encoding({**honest, key: value}, cfg, choice)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value", "names"),
    [
        ("secagg.name", "none", "secagg.name"),
        ("privacy.dpsgd.accountant", "pld", "privacy.dpsgd.accountant"),
        ("algorithm.local_epochs", 2, "algorithm.local_epochs"),
        ("algorithm.name", "scaffold", "algorithm.name"),
        ("algorithm.momentum", 0.9, "algorithm.momentum"),
        ("audit.canary_examples", 4, "audit.canary_examples"),
    ],
)
def test_configurations_the_accounting_does_not_cover_are_refused(tmp_path: Path, key: str, value: object, names: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(ddp_config(tmp_path, **{key: value}))
    assert err.value.key == names


def test_a_distributed_worker_builds_no_trainer_and_refuses_to_train(tmp_path: Path) -> None:
    """Devices of distributed DP-SGD only send gradient sums: the worker skips Opacus's trainer
    and the batched one (seconds of start-up), and a job asking it to train gets one clear error."""
    worker = Worker(from_dict(ddp_config(tmp_path)))
    assert worker.trainer is None and worker.vectorized is None
    params = flat_params(worker.model)
    with pytest.raises(RuntimeError, match="gradient sums"):
        worker.train(params, 1, [0, 1])
    enc = encoding(from_dict(ddp_config(tmp_path)), len(params))
    report = worker.gradient_sums(params, 1, [0, 1], norm_bound=enc.norm_bound, rounding=lambda d: np.random.default_rng(d))
    assert report.device_ids == [0, 1] and not report.failed_ids
