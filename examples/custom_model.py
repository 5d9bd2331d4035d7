"""Your own torch model, trained by federated DP-SGD on every device (sample-level DP).

    python examples/custom_model.py                  # 1,000 devices, 30 rounds
    python examples/custom_model.py --rounds 3 --population 100 simulation.num_workers=2

fedsim imports the model as `model.target=custom_model:make_model` (this file's directory is on
sys.path, and the simulator's workers inherit it) and calls make_model(input_shape, num_classes).
DP-SGD needs per-example gradients: no BatchNorm (use GroupNorm/LayerNorm), as in this model.
"""

from __future__ import annotations

import argparse

from torch import nn

import fedsim


def make_model(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A two-layer tanh MLP with LayerNorm: bounded activations suit clipped gradients."""
    (features,) = input_shape  # the synthetic dataset's examples are vectors
    return nn.Sequential(nn.Linear(features, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, num_classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--epsilon", type=float, default=8.0, help="per-device target epsilon (sigma is calibrated)")
    parser.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    parser.add_argument("overrides", nargs="*", help="more fedsim overrides (key=value), as on the command line")
    args = parser.parse_args()

    result = fedsim.simulate(
        [
            "model=custom",
            "model.target=custom_model:make_model",
            "privacy=dpsgd_target",  # sigma calibrated so no device exceeds the target epsilon
            f"privacy.dpsgd.target_epsilon={args.epsilon}",
            f"population={args.population}",
            f"rounds={args.rounds}",
            f"cohort.size={args.cohort}",
            "simulation.num_workers=1",
            *args.overrides,
        ],
        output_dir=args.out,
    )
    sample = result.summary["privacy"]["sample_level"]
    print(f"final test accuracy: {result.summary['final_test_accuracy']:.4f}")
    print(f"per-device epsilon: max {sample['epsilon_max']:.3f}, median {sample['epsilon_median']:.3f} (target {args.epsilon:g}, delta {sample['delta']:g})")
    print(f"model: {type(result.model).__name__} with {sum(p.numel() for p in result.model.parameters())} parameters")
    print(f"run directory: {result.run_dir}")


if __name__ == "__main__":
    main()
