"""The ScatterNet variants of the README's FEMNIST tuning (fewer features), as custom models.

    python examples/scatternet_variants.py pool3                    # one variant, epsilon 8, 100 rounds
    python examples/scatternet_variants.py j3 --rounds 2 algorithm.batch_size=20

Each is a FixedFeatures front (fedsim.models: computed once per device by the workers) and a
linear layer; the README's rows were run with `experiment=femnist_dpsgd model.name=scatternet
algorithm.batch_size=140 algorithm.lr=1.0 privacy.dpsgd.target_epsilon=8 eval_every=20` and
`model=custom model.target=scatternet_variants:NAME` (this file's directory on sys.path):
pool3 0.630, pool4 0.626, angles4 0.658, j3 0.559 at epsilon 8, against the built-in
scatternet's 0.675 (the README's table). Those runs had these definitions under another module
name, which is part of the config fingerprint: a rerun draws other random streams.
"""

from __future__ import annotations

import argparse

from torch import nn

import fedsim
from fedsim.models import FixedFeatures
from fedsim.scattering import Scattering2D


def _linear(front: FixedFeatures, features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(front, nn.Flatten(), nn.Linear(features, num_classes))


def pool3(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The built-in front (J=2, L=8, GroupNorm in 27 groups), its 7 x 7 maps averaged to 3 x 3."""
    channels, height, width = input_shape
    scattering = Scattering2D((height, width), J=2, L=8)
    c = channels * scattering.channels_per_input
    return _linear(FixedFeatures(scattering, nn.GroupNorm(27, c, affine=False), nn.AdaptiveAvgPool2d(3)), c * 9, num_classes)


def pool4(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The same, averaged to 4 x 4."""
    channels, height, width = input_shape
    scattering = Scattering2D((height, width), J=2, L=8)
    c = channels * scattering.channels_per_input
    return _linear(FixedFeatures(scattering, nn.GroupNorm(27, c, affine=False), nn.AdaptiveAvgPool2d(4)), c * 16, num_classes)


def angles4(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """4 angles instead of 8: 25 channels per image channel, GroupNorm in groups of 5."""
    channels, height, width = input_shape
    scattering = Scattering2D((height, width), J=2, L=4)
    c = channels * scattering.channels_per_input
    return _linear(FixedFeatures(scattering, nn.GroupNorm(c // 5, c, affine=False)), c * (height // 4) * (width // 4), num_classes)


class _Pad2(nn.Module):
    """Zero padding by 2 pixels a side (28 x 28 -> 32 x 32, a multiple of 2^3)."""

    def forward(self, x):  # noqa: ANN001, ANN201
        return nn.functional.pad(x, (2, 2, 2, 2))


def j3(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """J = 3 on the image padded to 32 x 32: 217 channels of 4 x 4, GroupNorm in groups of 7."""
    channels, height, width = input_shape
    scattering = Scattering2D((height + 4, width + 4), J=3, L=8)
    c = channels * scattering.channels_per_input
    front = FixedFeatures(_Pad2(), scattering, nn.GroupNorm(c // 7, c, affine=False))
    return _linear(front, c * ((height + 4) // 8) * ((width + 4) // 8), num_classes)


VARIANTS = {"pool3": pool3, "pool4": pool4, "angles4": angles4, "j3": j3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    parser.add_argument("overrides", nargs="*", help="more fedsim overrides (key=value)")
    args = parser.parse_intermixed_args()  # options and overrides in any order
    result = fedsim.simulate(
        [
            "experiment=femnist_dpsgd", "model=custom", f"model.target=scatternet_variants:{args.variant}",
            "algorithm.batch_size=140", "algorithm.lr=1.0", "privacy.dpsgd.target_epsilon=8", "eval_every=20",
            f"rounds={args.rounds}", *args.overrides,
        ],
        output_dir=args.out,
    )  # fmt: skip
    params = sum(p.numel() for p in result.model.parameters())
    print(f"{args.variant}: {params} trained parameters, final test accuracy {result.summary['final_test_accuracy']:.4f}")
    print(f"run directory: {result.run_dir}")


if __name__ == "__main__":
    main()
