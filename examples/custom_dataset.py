"""Your own federated data: a FederatedDataset subclass, plugged in with dataset=custom.

    python examples/custom_dataset.py                  # 500 devices, 20 rounds
    python examples/custom_dataset.py --rounds 3 --population 50

fedsim calls `make_population(population=N, seed=S)` (named by dataset.target) in the server and
in every worker, so the data must be a deterministic function of (device id, seed), as here:
each device draws its own examples from a generator seeded with (seed, device id).
"""

from __future__ import annotations

import argparse

import torch

import fedsim
from fedsim.data import FederatedDataset

FEATURES, CLASSES = 16, 4


class GaussianClasses(FederatedDataset):
    """Four Gaussian classes shared by every device; each device has its own label mix (softmax
    of Gaussian scores: a few labels dominate, a non-iid split) and 20-80 examples."""

    name = "gaussian_classes"
    input_shape = (FEATURES,)
    num_classes = CLASSES

    def __init__(self, population: int, seed: int) -> None:
        self.population, self.seed = population, seed
        self.centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(seed)) * 1.5

    @property
    def num_devices(self) -> int:
        return self.population

    def _examples(self, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.centers[labels] + torch.randn(len(labels), FEATURES, generator=generator)
        return x.float(), labels.long()

    def device_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_device_id(device_id)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + device_id + 1)
        mix = torch.softmax(2.0 * torch.randn(CLASSES, generator=generator), dim=0)  # a few labels dominate
        size = int(torch.randint(20, 81, (), generator=generator))
        labels = torch.multinomial(mix, size, replacement=True, generator=generator)
        return self._examples(labels, generator)

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003)
        return self._examples(torch.arange(1000) % CLASSES, generator)


def make_population(population: int, seed: int) -> GaussianClasses:
    """What dataset.target names: fedsim passes the run's population and seed."""
    return GaussianClasses(population, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    parser.add_argument("overrides", nargs="*", help="more fedsim overrides (key=value), as on the command line")
    args = parser.parse_args()

    data = make_population(args.population, seed=0)
    sizes = [data.num_examples(d) for d in range(data.num_devices)]
    print(f"devices: {data.num_devices}, training examples: {sum(sizes)} ({min(sizes)}-{max(sizes)} per device)")
    result = fedsim.simulate(
        [
            "dataset=custom",
            "dataset.target=custom_dataset:make_population",
            "model=mlp",
            f"population={args.population}",
            f"rounds={args.rounds}",
            f"cohort.size={args.cohort}",
            "algorithm.lr=0.1",
            "simulation.num_workers=1",
            *args.overrides,
        ],
        output_dir=args.out,
    )
    print(f"final test accuracy: {result.summary['final_test_accuracy']:.4f} (chance: {1 / CLASSES:.2f})")
    print(f"run directory: {result.run_dir}")


if __name__ == "__main__":
    main()
