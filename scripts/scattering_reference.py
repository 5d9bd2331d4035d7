"""Record kymatio's scattering coefficients for tests/test_scattering.py (an independent check of
fedsim.scattering; kymatio is not a fedsim dependency).

    pip install --target /tmp/kymlib --no-deps kymatio==0.3.0 appdirs configparser
    PYTHONPATH=/tmp/kymlib python scripts/scattering_reference.py tests/data/scattering_reference.npz

kymatio 0.3.0's top-level `kymatio.torch` imports its 3D transform, which needs
scipy.special.sph_harm (removed in scipy 1.15): this script imports the 2D front end directly.
Inputs: two FEMNIST training images (the bundled writer files, first two examples of the first
writer), and seeded uniform noise for a 3-channel 16 x 24 case with J = 3 and a J = 1 case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

from fedsim.config import FemnistConfig
from fedsim.data import load_dataset


def cases() -> dict[str, tuple[np.ndarray, int]]:
    """name -> (input [B, C, H, W] float32, J): the inputs the test feeds both implementations."""
    femnist = load_dataset(FemnistConfig(), population=105, seed=0)
    images = femnist.device_data(0)[0][:2].numpy()
    rng = np.random.default_rng(0)
    return {
        "femnist_J2": (images, 2),
        "noise_rgb_J3": (rng.random((2, 3, 16, 24), dtype=np.float32), 3),
        "noise_J1": (rng.random((1, 1, 12, 8), dtype=np.float32), 1),
    }


def main(out: str) -> None:
    arrays = {}
    for name, (x, J) in cases().items():
        transform = ScatteringTorch2D(J=J, shape=x.shape[-2:], L=8)
        arrays[f"{name}_input"] = x
        arrays[f"{name}_output"] = transform(torch.from_numpy(x)).flatten(1, 2).numpy()
        arrays[f"{name}_J"] = np.array(J)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parents[1] / "tests/data/scattering_reference.npz"))
