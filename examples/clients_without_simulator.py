"""fedsim's client code on plain tensors: no simulator, no Flower, Ray or Hydra.

    python examples/clients_without_simulator.py [--rounds 20]

`clients` trains one model object device after device (LocalTrainer, or DPSGDTrainer for
DP-SGD), returning each device's update as a flat vector; here a ten-line FedAvg loop averages
them. The DP-SGD part reports each device's epsilon from the privacy events the trainer returns
(Opacus's RDP accountant: Mironov 2017; Mironov, Talwar & Zhang 2019 for the subsampled
Gaussian), the same accounting fedsim's simulator does per device.
"""

from __future__ import annotations

import argparse

import torch
from opacus.accountants import RDPAccountant
from torch import nn

from clients import DPSGDConfig, DPSGDTrainer, LocalTrainer, TrainConfig, evaluate, flat_params

DELTA = 1e-5


def make_devices(num_devices: int, seed: int = 0) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """Devices with 100 examples each from a shared linear rule, and a test set of 2,000."""
    generator = torch.Generator().manual_seed(seed)
    rule = torch.randn(20, 3, generator=generator)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 20, generator=generator)
        return x, (x @ rule).argmax(dim=1)

    return [draw(100) for _ in range(num_devices)], draw(2000)


def fedavg(trainer: LocalTrainer | DPSGDTrainer, devices: list, rounds: int) -> list:
    """FedAvg (McMahan et al. 2017): every device trains from the global weights, the server
    adds the example-weighted mean update. Returns every fit's privacy event (None without DP)."""
    global_params = flat_params(trainer.model).clone()
    events = []
    for round_num in range(rounds):
        total, weight = torch.zeros_like(global_params), 0
        for device_id, data in enumerate(devices):
            result = trainer.fit(global_params, data, seed=(round_num, device_id))
            total += result.update * result.num_examples
            weight += result.num_examples
            events.append(result.privacy)
        global_params += total / weight
    torch.nn.utils.vector_to_parameters(global_params, trainer.model.parameters())
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    devices, test = make_devices(args.devices)
    config = TrainConfig(lr=0.1, local_epochs=1, batch_size=10)

    plain = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))
    fedavg(LocalTrainer(plain, config), devices, args.rounds)
    print(f"non-private test accuracy: {evaluate(plain, test)['accuracy']:.4f}")

    private = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))
    dp = DPSGDConfig(noise_multiplier=args.noise_multiplier, max_grad_norm=1.0)
    events = fedavg(DPSGDTrainer(private, config, dp), devices, args.rounds)
    print(f"DP-SGD test accuracy: {evaluate(private, test)['accuracy']:.4f}")

    # Every device took part in every round: its epsilon composes all of its own fits.
    per_device = events[0 :: len(devices)]  # device 0's events (all devices have equal sizes here)
    accountant = RDPAccountant()
    for event in per_device:
        accountant.history.append((event.noise_multiplier, event.sample_rate, event.steps))
    print(f"per-device epsilon: {accountant.get_epsilon(DELTA):.3f} at delta {DELTA:g} "
          f"({len(per_device)} fits of {per_device[0].steps} steps at sample rate {per_device[0].sample_rate:g}, "
          f"sigma {args.noise_multiplier:g})")  # fmt: skip


if __name__ == "__main__":
    main()
