"""Server-side aggregation: the weighted mean and the strategies' server steps (Reddi et al. 2021)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import strategies
from fedsim.aggregation import RunningSum, leaf
from fedsim.reports import FINITE_CHUNK, all_finite
from fedsim.config import AlgorithmConfig, FedsimConfig


def build_server_optimizer(algorithm: AlgorithmConfig) -> strategies.Strategy:
    return strategies.build(FedsimConfig(algorithm=algorithm), num_params=2)


def test_weighted_mean_weights_by_examples() -> None:
    total = RunningSum(2)
    total.add_all([(5, torch.tensor([1.0, 0.0]), 1.0), (2, torch.tensor([0.0, 4.0]), 3.0)])
    assert total.count == 2
    assert torch.equal(total.mean(), torch.tensor([0.25, 3.0]))


def test_mean_is_bitwise_independent_of_arrival_order() -> None:
    g = torch.Generator().manual_seed(0)
    ups = [(i, torch.randn(1000, generator=g) * 10 ** (i % 7 - 3), float(i + 1)) for i in range(40)]
    a, b = RunningSum(1000), RunningSum(1000)
    a.add_all(ups)
    b.add_all(ups[::-1][25:] + ups[::-1][:25])  # another arrival order (split over workers: tests/test_tree_sums.py)
    assert torch.equal(a.total, b.total) and torch.equal(a.mean(), b.mean())
    # Without the fixed order, the same numbers summed in another order differ in the last bits.
    naive_fwd = sum((u * w for _, u, w in ups), torch.zeros(1000))
    naive_rev = sum((u * w for _, u, w in ups[::-1]), torch.zeros(1000))
    assert not torch.equal(naive_fwd, naive_rev)


def test_empty_sum_refuses_to_average() -> None:
    with pytest.raises(ValueError, match="no device updates"):
        RunningSum(3).mean()


def test_fedavg_step_is_params_plus_server_lr_times_delta() -> None:
    opt = build_server_optimizer(AlgorithmConfig(name="fedavg", server_lr=0.5))
    new = opt.step(torch.tensor([1.0, 2.0]), torch.tensor([2.0, -2.0]))
    assert torch.equal(new, torch.tensor([2.0, 1.0]))


def test_fedadam_matches_reddi_algorithm_2_by_hand() -> None:
    cfg = AlgorithmConfig(name="fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    opt = build_server_optimizer(cfg)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    d1, d2 = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    x1 = opt.step(x, d1)
    x2 = opt.step(x1, d2)
    m, v = torch.zeros(2, dtype=torch.float64), torch.full((2,), 1e-6, dtype=torch.float64)
    ref = x.clone()
    for d in (d1, d2):
        m = 0.9 * m + 0.1 * d
        v = 0.99 * v + 0.01 * d * d
        ref = ref + 0.1 * m / (v.sqrt() + 1e-3)
    assert torch.allclose(x2, ref, rtol=0, atol=1e-12)


def test_fedyogi_second_moment_is_additive_with_sign() -> None:
    cfg = AlgorithmConfig(name="fedyogi", server_lr=0.1, beta1=0.0, beta2=0.5, tau=1e-3)
    opt = build_server_optimizer(cfg)
    x = torch.zeros(1, dtype=torch.float64)
    opt.step(x, torch.tensor([2.0], dtype=torch.float64))
    # v0 = tau^2 < delta^2 = 4, so v1 = v0 + (1 - b2) * 4 = 1e-6 + 2
    assert opt.v is not None and opt.v.item() == pytest.approx(1e-6 + 2.0, abs=1e-12)
    opt.step(x, torch.tensor([0.0], dtype=torch.float64))
    # v1 > 0 = delta^2, so v stays: v2 = v1 - 0.5 * 0 * sign(.) = v1
    assert opt.v.item() == pytest.approx(1e-6 + 2.0, abs=1e-12)
    state = opt.state_dict()
    other = build_server_optimizer(cfg)
    other.load_state_dict(state)
    y = torch.tensor([0.3], dtype=torch.float64)
    assert torch.equal(opt.step(y, y), other.step(y, y))


def test_fedadagrad_matches_reddi_algorithm_2_by_hand() -> None:
    cfg = AlgorithmConfig(name="fedadagrad", server_lr=0.1, beta1=0.9, tau=1e-3)
    opt = build_server_optimizer(cfg)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    deltas = [torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)]
    y = x
    for d in deltas:
        y = opt.step(y, d)
    m, v, ref = torch.zeros(2, dtype=torch.float64), torch.full((2,), 1e-6, dtype=torch.float64), x.clone()
    for d in deltas:
        m = 0.9 * m + 0.1 * d
        v = v + d * d  # Adagrad: the squares add up, no decay
        ref = ref + 0.1 * m / (v.sqrt() + 1e-3)
    assert torch.allclose(y, ref, rtol=0, atol=1e-12)


def test_fedavgm_is_server_momentum_by_hand_and_resumes_exactly() -> None:
    cfg = AlgorithmConfig(name="fedavgm", server_lr=0.5, beta1=0.8)
    opt = build_server_optimizer(cfg)
    deltas = [torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64),
              torch.tensor([-1.0, 0.25], dtype=torch.float64)]  # fmt: skip
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y = opt.step(opt.step(x, deltas[0]), deltas[1])
    resumed = build_server_optimizer(cfg)
    resumed.load_state_dict(opt.state_dict())  # a checkpoint after round 2
    y3, y3_resumed = opt.step(y, deltas[2]), resumed.step(y, deltas[2])
    v, ref = torch.zeros(2, dtype=torch.float64), x.clone()
    for d in deltas:
        v = 0.8 * v + d  # Hsu et al. 2019: v <- beta v + Delta; x <- x + eta v
        ref = ref + 0.5 * v
    assert torch.allclose(y3, ref, rtol=0, atol=1e-12)
    assert torch.equal(y3_resumed, y3)
    momentum_free = build_server_optimizer(AlgorithmConfig(name="fedavgm", server_lr=0.5, beta1=0.0))
    plain = build_server_optimizer(AlgorithmConfig(name="fedavg", server_lr=0.5))
    for d in deltas:  # beta = 0 is FedAvg
        assert torch.equal(momentum_free.step(x, d), plain.step(x, d))


def test_every_registered_strategy_builds_and_names_itself() -> None:
    from fedsim.registry import STRATEGIES

    for name in STRATEGIES.names():
        strategy = strategies.build(FedsimConfig(algorithm=AlgorithmConfig(name=name)), num_params=3)
        assert strategy.summary()["name"] == name
        strategy.close()


def test_unknown_strategy_names_the_key_and_the_allowed_names() -> None:
    from fedsim.config import validate
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"algorithm.name.*'fedsgd'.*fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, scaffold"):
        validate(FedsimConfig(algorithm=AlgorithmConfig(name="fedsgd")))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_a_leaf_is_the_update_widened_then_weighted_bit_for_bit(dtype) -> None:
    """leaf() widens inside the multiply; the tree's bits rest on it equalling widen-then-multiply."""
    rng = np.random.default_rng(1)
    update = (rng.standard_normal(5000) * 10.0 ** rng.integers(-4, 4, 5000)).astype(dtype)
    for weight in (1.0, 37.0, 0.1, 1 / 3):
        expected = update.astype(np.float64) * weight
        assert np.array_equal(leaf(update, weight).view(np.int64), expected.view(np.int64))
        out = np.empty(5000)
        assert leaf(update, weight, out=out) is out and np.array_equal(out, expected)


@pytest.mark.parametrize("where", [0, FINITE_CHUNK - 1, FINITE_CHUNK, 2 * FINITE_CHUNK + 7])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_value_in_any_chunk(where: int, bad: float) -> None:
    values = np.ones(2 * FINITE_CHUNK + 8, dtype=np.float32)
    assert all_finite(values) and all_finite(values.astype(np.float64)) and all_finite(values.reshape(-1, 8))
    values[where] = bad
    assert not all_finite(values) and not all_finite(values.astype(np.float64)) and not all_finite(values.reshape(-1, 8))
    # Finite float32 values whose float32 sum would overflow are still finite.
    assert all_finite(np.full(10, np.finfo(np.float32).max, dtype=np.float32))
    assert all_finite(np.zeros(0, dtype=np.float32))
