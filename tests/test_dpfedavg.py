"""DP-FedAvg on the server: the noise on the sum has std z*C, the denominator is fixed."""

from __future__ import annotations

import torch

from fedsim.aggregation import RunningSum
from fedsim.config import from_dict
from fedsim.privacy.dpfedavg import UserLevelDP
from fedsim.reports import DeviceReport


def user_dp(**dpfedavg: object) -> UserLevelDP:
    cfg = from_dict(
        {
            "population": 1000,
            "rounds": 10,
            "cohort": {"size": 50},
            "privacy": {"dpfedavg": {"noise_multiplier": 1.3, "clip_norm": 0.7, **dpfedavg}},
        }
    )
    return UserLevelDP(cfg)


def test_server_noise_on_the_sum_has_std_z_times_c() -> None:
    dp = user_dp()
    total = torch.zeros(200_000, dtype=torch.float64)  # no device contributed: out comes noise / denominator
    noise_sum = dp.aggregate(total, [], round_num=1).double() * 50
    assert abs(noise_sum.std().item() / (1.3 * 0.7) - 1) < 0.01
    assert abs(noise_sum.mean().item()) < 5 * 1.3 * 0.7 / 200_000**0.5
    # Reproducible per round, different across rounds.
    assert torch.equal(dp.aggregate(total, [], round_num=1), user_dp().aggregate(total, [], round_num=1))
    assert not torch.equal(dp.aggregate(total, [], round_num=2), dp.aggregate(total, [], round_num=1))


def test_denominator_is_the_expected_cohort_not_the_number_of_replies() -> None:
    dp = user_dp(noise_multiplier=0.0)
    total = RunningSum(3)
    total.add_all([(i, torch.tensor([0.5, 0.0, -0.5]), 1.0) for i in range(10)])  # 10 of 50 expected devices replied
    mean = dp.aggregate(total.total, [DeviceReport(device_ids=list(range(10)), within_bound=[True] * 10)], round_num=1)
    assert torch.allclose(mean, torch.tensor([0.1, 0.0, -0.1]))  # 5.0 / 50, not 5.0 / 10


def test_simulated_cohort_scales_noise_and_is_labelled() -> None:
    dp = user_dp(noise_cohort_size=500)
    noise_sum = dp.aggregate(torch.zeros(100_000, dtype=torch.float64), [], round_num=1).double() * 50
    assert abs(noise_sum.std().item() / (1.3 * 0.7 * 50 / 500) - 1) < 0.02
    assert "SIMULATED" in dp.describe()
    assert dp.summary()["user_level"]["simulated_cohort_size"] == 500


def test_adaptive_clipping_moves_c_toward_the_norms_devices_report() -> None:
    dp = user_dp(adaptive_clipping=True, target_quantile=0.5, clip_norm=1.0)
    start = dp.clip_norm
    # Every update was within C: C is too large, so it shrinks.
    dp.aggregate(torch.zeros(4, dtype=torch.float64), [DeviceReport(device_ids=list(range(50)), within_bound=[True] * 50)], round_num=1)
    assert dp.clip_norm < start
    assert dp.update_noise > dp.noise_multiplier  # the count release costs some of the noise budget
