"""The 2D wavelet scattering transform: fixed, hand-crafted image features (no trainable weights).

Scattering networks (Bruna & Mallat 2013, "Invariant Scattering Convolution Networks", IEEE
TPAMI 35(8), Sec. 3) cascade Morlet wavelet convolutions and complex moduli, then average with
a Gaussian low-pass phi_J:

    S0 x = x * phi_J,   S1 x = |x * psi_{j1,t1}| * phi_J,
    S2 x = ||x * psi_{j1,t1}| * psi_{j2,t2}| * phi_J   (j2 > j1),

sub-sampled by 2^J. With J scales and L angles an image channel gives
K = 1 + J L + L^2 J (J - 1) / 2 channels of (H / 2^J) x (W / 2^J): 81 of 7 x 7 for a 28 x 28
image with J = 2, L = 8. Tramer & Boneh 2021 ("Differentially Private Learning Needs Better
Features (or Much More Data)", ICLR, Sec. 3) show that linear models and small CNNs trained with
DP-SGD on these features beat end-to-end CNNs at the same privacy budget: the features cost no
privacy (they are a fixed function of one example) and the trained model is small.

The filter design (Morlet filters built in space over 5 x 5 periodic tiles, their Fourier
transforms' real parts, periodised to each resolution; reflect padding to a multiple of 2^J
plus a margin of one output pixel, cut off at the end) follows kymatio's (Andreux et al. 2020,
JMLR 21(60)); `tests/test_scattering.py` checks this implementation against kymatio 0.3.0's
output, recorded by `scripts/scattering_reference.py`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def output_channels(J: int, L: int) -> int:
    """Channels per input channel: 1 (order 0) + J L (order 1) + L^2 J (J - 1) / 2 (order 2)."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def padded_size(size: int, J: int) -> int:
    """The padded side: the next multiple of 2^J that leaves a margin of 2^J (kymatio's rule)."""
    return ((size + 2**J) // 2**J + 1) * 2**J


def _gabor(M: int, N: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Gabor filter g_sigma(u) exp(i xi <u, e_theta>) on the M x N torus (5 x 5 periodic tiles)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    curv = rot @ np.diag([1.0, slant * slant]) @ rot.T / (2 * sigma * sigma)
    out = np.zeros((M, N), np.complex128)
    for ex in range(-2, 3):
        for ey in range(-2, 3):
            xx, yy = np.mgrid[ex * M : (ex + 1) * M, ey * N : (ey + 1) * N]
            quad = curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy
            out += np.exp(-quad + 1j * xi * (xx * c + yy * s))
    return out / (2 * math.pi * sigma * sigma / slant)


def _morlet(M: int, N: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Morlet filter: the Gabor filter minus the multiple of its envelope that makes its mean 0."""
    wave = _gabor(M, N, sigma, theta, xi, slant)
    envelope = _gabor(M, N, sigma, theta, 0.0, slant)
    return wave - (wave.sum() / envelope.sum()) * envelope


def _periodize(hat: np.ndarray, res: int) -> np.ndarray:
    """A filter's Fourier transform at resolution 2^-res: zero the band that sub-sampling by 2^res
    would alias, then fold the 2^res x 2^res aliases onto the smaller grid."""
    M, N = hat.shape
    k = 2**res
    mask = np.ones_like(hat)
    start_x, len_x = int(M * 2 ** (-res - 1)), int(M * (1 - 2 ** (-res)))
    start_y, len_y = int(N * 2 ** (-res - 1)), int(N * (1 - 2 ** (-res)))
    mask[start_x : start_x + len_x, :] = 0
    mask[:, start_y : start_y + len_y] = 0
    return (hat * mask).reshape(k, M // k, k, N // k).sum(axis=(0, 2))


def _filter_subsample(u_hat: torch.Tensor, filt: torch.Tensor, k: int) -> torch.Tensor:
    """The Fourier transform of (u * filter) sub-sampled by k in space, from u's transform u_hat
    [..., M, N] (complex) and the filter's real transform, stored twice over as [..., M, N, 2]
    (the real and imaginary parts' factor: a broadcast over a last axis of 1 is slow).

    Sub-sampling by k in space is the mean of the k x k aliased blocks in frequency. Computed on
    the real and imaginary parts block by block: no complex-by-real products, no strided
    reductions (both several times slower on CPU).
    """
    parts = torch.view_as_real(u_hat)
    m, n = filt.shape[-3] // k, filt.shape[-2] // k
    out = None
    for a in range(k):
        for b in range(k):
            block = parts[..., a * m : (a + 1) * m, b * n : (b + 1) * n, :] * filt[..., a * m : (a + 1) * m, b * n : (b + 1) * n, :]
            out = block if out is None else out.add_(block)
    if k > 1:
        out.div_(k * k)
    return torch.view_as_complex(out)


class Scattering2D(nn.Module):
    """The scattering transform of images [B, C, H, W] -> [B, C K, H / 2^J, W / 2^J].

    Channel c K + k of the output is coefficient k of input channel c, in the order order 0,
    order 1 by (j1, angle), order 2 by (j1, angle1, j2, angle2). H and W must be multiples of
    2^J. The filters are constants, not parameters or buffers (a module without state, as
    vectorized cohort training asks; they follow the input to its device); the forward pass runs
    without autograd, so the transform is a fixed input layer for DP-SGD (Opacus computes no
    per-example gradients for a module without parameters).
    """

    def __init__(self, shape: tuple[int, int], J: int = 2, L: int = 8):
        super().__init__()
        height, width = shape
        if J < 1 or L < 1:
            raise ValueError(f"J and L must be at least 1, got J={J}, L={L}")
        if height % 2**J or width % 2**J:
            raise ValueError(f"image sides must be multiples of 2^J = {2**J}, got {height} x {width}")
        self.J, self.L, self.shape = J, L, (height, width)
        M, N = padded_size(height, J), padded_size(width, J)
        self._pad = ((N - width) // 2, (N - width + 1) // 2, (M - height) // 2, (M - height + 1) // 2)
        # phi: a Gaussian of width 0.8 2^(J-1); psi_{j, t}: Morlet filters of width 0.8 2^j, central
        # frequency 3 pi / 4 / 2^j, slant 4 / L, at angles (L / 2 - 1 - t) pi / L.
        filters: dict[str, torch.Tensor] = {}
        phi_hat = np.real(np.fft.fft2(_gabor(M, N, 0.8 * 2 ** (J - 1), 0.0, 0.0, 1.0)))
        for res in range(J):
            filters[f"phi_{res}"] = torch.tensor(_periodize(phi_hat, res), dtype=torch.float32)
        for j in range(J):
            hats = [
                np.real(np.fft.fft2(_morlet(M, N, 0.8 * 2**j, (L // 2 - 1 - t) * math.pi / L, 0.75 * math.pi / 2**j, 4.0 / L)))
                for t in range(L)
            ]
            # Order 1 uses psi_j at full resolution; order 2 uses psi_j2 at the resolution of U1 (j1 < j2).
            for res in range(max(j, 1)):
                stacked = np.stack([_periodize(h, res) for h in hats])
                filters[f"psi_{j}_{res}"] = torch.tensor(stacked, dtype=torch.float32)
        doubled = {name: f.unsqueeze(-1).expand(*f.shape, 2).contiguous() for name, f in filters.items()}
        self._filters = {torch.device("cpu"): doubled}

    def filters(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The filters' Fourier transforms on `device` (copied there once), each [..., M, N, 2]."""
        if device not in self._filters:
            self._filters[device] = {k: v.to(device) for k, v in self._filters[torch.device("cpu")].items()}
        return self._filters[device]

    @property
    def channels_per_input(self) -> int:
        return output_channels(self.J, self.L)

    def _lowpass(self, u_hat: torch.Tensor, res: int, filters: dict[str, torch.Tensor]) -> torch.Tensor:
        """Average U (its Fourier transform at resolution 2^-res) with phi_J, sub-sample to 2^-J,
        cut the margin: the real [..., H / 2^J, W / 2^J] coefficients."""
        s = _filter_subsample(u_hat, filters[f"phi_{res}"], 2 ** (self.J - res))
        return torch.fft.ifft2(s).real[..., 1:-1, 1:-1]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.shape:
            raise ValueError(f"expected images [B, C, {self.shape[0]}, {self.shape[1]}], got {tuple(x.shape)}")
        batch, channels = x.shape[:2]
        J, filters = self.J, self.filters(x.device)
        padded = F.pad(x.reshape(batch * channels, 1, *self.shape), self._pad, mode="reflect")[:, 0]
        x_hat = torch.fft.fft2(padded.to(torch.float32))
        order0 = [self._lowpass(x_hat, 0, filters)[:, None]]
        order1, order2 = [], []
        for j1 in range(J):
            # U1 = |x * psi_{j1, t}| at resolution 2^-j1, for the L angles: [BC, L, M / 2^j1, N / 2^j1]
            u1 = torch.fft.ifft2(_filter_subsample(x_hat[:, None], filters[f"psi_{j1}_0"], 2**j1)).abs()
            u1_hat = torch.fft.fft2(u1)
            order1.append(self._lowpass(u1_hat, j1, filters))
            blocks = []
            for j2 in range(j1 + 1, J):
                # U2 = |U1 * psi_{j2, t2}| at resolution 2^-j2: [BC, L (t1), L (t2), ...]
                filt = filters[f"psi_{j2}_{j1}"]
                u2 = torch.fft.ifft2(_filter_subsample(u1_hat[:, :, None], filt, 2 ** (j2 - j1))).abs()
                blocks.append(self._lowpass(torch.fft.fft2(u2), j2, filters))
            if blocks:
                order2.append(torch.cat(blocks, dim=2).flatten(1, 2))  # (t1, j2, t2) order
        out = torch.cat(order0 + order1 + order2, dim=1)
        return out.reshape(batch, channels * out.shape[1], *out.shape[-2:]).to(x.dtype)
