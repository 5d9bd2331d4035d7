"""Cost of sample-level DP: a DP-SGD device update against a plain one, and the ledger per round.

1. Device update: the same model, data and seed through `clients.LocalTrainer` and
   `clients.DPSGDTrainer` (Opacus hooks and ew), one torch thread, median of many fits;
   prints microseconds per update and the DP/plain ratio. Workloads: the tiny MLP (60-32-10,
   50 examples, batch 10) and the FEMNIST DP CNN of conf/experiment/femnist_dpsgd.yaml on one
   140-example device (batch 20). Then the same updates through `clients.VectorizedTrainer`
   (25 devices per batched fit, what workers do with simulation.vectorize): per device,
   plain and DP-SGD, and DP-SGD against the one-by-one plain update.
2. Server ledger: a population of 100,000 synthetic devices (their real sizes), 50 devices per
   round; per round the budget check of the sampled cohort, recording the events, and the
   epsilon max/median over everyone and over the cohort, as the ServerApp does. Prints
   milliseconds per round for each accountant (RDP, PLD at each discretisation
   `choose_pld_interval` may pick, PRV). Workers never compute epsilon.

    python bench/dpsgd_cost.py            # both parts
    python bench/dpsgd_cost.py ledger     # the server ledger only
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from clients import DPSGDConfig, DPSGDTrainer, LocalTrainer, TrainConfig, flat_params
from clients.vectorized import VectorizedTrainer
from fedsim.config import ModelConfig, SyntheticConfig
from fedsim.data import load_dataset
from fedsim.models import build_model
from fedsim.privacy import PrivacyLedger, create_accountant
from fedsim.privacy.accountants import PLD_INTERVALS
from fedsim.privacy.sample_level import dpsgd_event
from fedsim.sampling import sample_cohort


def time_fits(trainer: LocalTrainer | DPSGDTrainer, params: torch.Tensor, data: tuple, reps: int) -> float:
    for i in range(3):  # warm-up
        trainer.fit(params, data, seed=(0, 0, i))
    times = []
    for i in range(reps):
        t = time.perf_counter()
        trainer.fit(params, data, seed=(0, 1, i))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def device_updates() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    workloads = [
        ("tiny MLP 60-32-10, 50 ex, batch 10", ModelConfig(name="mlp", hidden_sizes=[32]), (60,), 10,
         (torch.randn(50, 60, generator=g), torch.randint(0, 10, (50,), generator=g)), 10, 300),
        ("FEMNIST DP CNN, 140 ex, batch 20", ModelConfig(name="cnn", cnn_channels=[16, 32], cnn_dense=64), (1, 28, 28), 62,
         (torch.rand(140, 1, 28, 28, generator=g), torch.randint(0, 62, (140,), generator=g)), 20, 20),
    ]  # fmt: skip
    print("device update (1 local epoch, 1 torch thread, median)")
    print(f"{'workload':<38} | {'plain us':>9} | {'dp hooks us':>11} | {'ratio':>5} | {'dp ew us':>9} | {'ratio':>5}")
    for name, mcfg, shape, classes, data, batch, reps in workloads:
        cfg = TrainConfig(lr=0.1, local_epochs=1, batch_size=batch)
        plain = time_fits(LocalTrainer(build_model(mcfg, shape, classes, seed=0), cfg), flat_params(build_model(mcfg, shape, classes, seed=0)), data, reps)
        row = [plain]
        for mode in ("hooks", "ew"):
            model = build_model(mcfg, shape, classes, seed=0)
            dp = DPSGDTrainer(model, cfg, DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode))
            row.append(time_fits(dp, flat_params(build_model(mcfg, shape, classes, seed=0)), data, reps))
        print(f"{name:<38} | {row[0]:>9.0f} | {row[1]:>11.0f} | {row[1] / row[0]:>4.1f}x | {row[2]:>9.0f} | {row[2] / row[0]:>4.1f}x")
    vectorized_updates(workloads)


def time_groups(trainer: VectorizedTrainer, params: torch.Tensor, datas: list, reps: int) -> float:
    """Median microseconds per device update when `trainer` fits the whole group at once."""
    for i in range(2):  # warm-up
        trainer.fit_many(params, datas, [(0, 0, i, d) for d in range(len(datas))])
    times = []
    for i in range(reps):
        t = time.perf_counter()
        trainer.fit_many(params, datas, [(0, 1, i, d) for d in range(len(datas))])
        times.append(time.perf_counter() - t)
    return statistics.median(times) / len(datas) * 1e6


def vectorized_updates(workloads: list, group: int = 25) -> None:
    """The same updates through clients.VectorizedTrainer, `group` devices per batched fit
    (what fedsim's workers do with simulation.vectorize on: 50 devices / 2 workers)."""
    print(f"\nvectorized device update ({group} devices per batched fit, 1 torch thread, median per device)")
    print(f"{'workload':<38} | {'plain us':>9} | {'dp us':>9} | {'dp/plain':>8} | {'dp / one-by-one plain':>21}")
    for name, mcfg, shape, classes, data, batch, reps in workloads:
        cfg = TrainConfig(lr=0.1, local_epochs=1, batch_size=batch)
        params = flat_params(build_model(mcfg, shape, classes, seed=0))
        g = torch.Generator().manual_seed(1)
        # Different data per device (same shapes as the one-by-one workload).
        datas = [(data[0][torch.randperm(len(data[1]), generator=g)], data[1]) for _ in range(group)]
        one_by_one = time_fits(LocalTrainer(build_model(mcfg, shape, classes, seed=0), cfg), params, datas[0], max(reps // 5, 5))
        plain = time_groups(VectorizedTrainer(build_model(mcfg, shape, classes, seed=0), cfg), params, datas, max(reps // 20, 3))
        dp_cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)
        dp = time_groups(VectorizedTrainer(build_model(mcfg, shape, classes, seed=0), cfg, dp_cfg), params, datas, max(reps // 20, 3))
        print(f"{name:<38} | {plain:>9.0f} | {dp:>9.0f} | {dp / plain:>7.1f}x | {dp / one_by_one:>20.1f}x")


def ledger_rounds(population: int = 100_000, cohort: int = 50, rounds: int = 30) -> None:
    ds = load_dataset(SyntheticConfig(), population=population, seed=0)
    print(f"\nserver ledger, population {population:,}, cohort {cohort}, {rounds} rounds, sigma 1.0, batch 10")
    print(f"{'accountant':<10} | {'ms/round (mean)':>15} | {'ms/round (last 10)':>18} | {'distinct histories':>18}")
    setups = [("rdp", {})] + [(f"pld@{i:g}", {"value_discretization_interval": i}) for i in PLD_INTERVALS] + [("prv", {})]
    for name, options in setups:
        ledger = PrivacyLedger(create_accountant(name.split("@")[0], **options), delta=1e-5, target_epsilon=8.0)
        per_round = []
        for r in range(1, rounds + 1):
            t = time.perf_counter()
            ids = sample_cohort(population=population, cohort_size=cohort, method="poisson", rng=np.random.default_rng([0, r]))
            events = {d: dpsgd_event(num_examples=ds.num_examples(d), batch_size=10, local_epochs=1, noise_multiplier=1.0) for d in ids}
            admitted = [d for d in ids if ledger.can_participate(d, events[d])]
            for d in admitted:
                ledger.record(d, events[d])
            ledger.epsilon_stats()
            ledger.epsilon_stats(admitted)
            ledger.exhausted_count()
            per_round.append(time.perf_counter() - t)
        print(f"{name:<10} | {statistics.mean(per_round) * 1e3:>15.1f} | {statistics.mean(per_round[-10:]) * 1e3:>18.1f} | {ledger.distinct_histories():>18}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["ledger"]:
        device_updates()
    ledger_rounds()
