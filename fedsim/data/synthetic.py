"""Synthetic federated data for any population: LEAF's recipe and FedProx's Synthetic(alpha, beta).

recipe=leaf, Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings" (data/synthetic):
a shared tensor Q ~ N(0, 1) of shape [num_features + 1, num_classes, num_clusters] and cluster
means mu_c ~ N(l_c, 1), l_c ~ N(0, 1). Device k picks a cluster c uniformly, draws
model_info_k ~ N(mu_c, model_noise) and gets the model w_k = Q model_info_k; its features are
x ~ N(v_k, Sigma) with v_k ~ N(B_k, 1), B_k ~ N(0, 1), Sigma = diag(j^-1.2); its labels
y = argmax(softmax([1, x] w_k + N(0, 0.1))). Devices share structure through Q, so one
global model can fit them (with one cluster, up to the scale of w_k).

recipe=fedprox, Li et al. 2020, "Federated Optimization in Heterogeneous Networks", Sec. 5.1:
device k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta); its softmax model W_k ~ N(u_k, 1)
[num_features x num_classes] and b_k ~ N(u_k, 1); its features x ~ N(v_k, Sigma) with
v_k ~ N(B_k, 1); its labels y = argmax(softmax(W_k x + b_k)). As in the FedProx reference
code, alpha and beta are the standard deviations numpy draws with.

With iid=True (LEAF's synthetic_iid, FedProx's Synthetic-IID) all devices share one
W, b ~ N(0, 1) and the feature mean 0.

Only the device sizes are drawn up front (one vectorized numpy call, so 100,000 devices cost
a few hundred kB); a device's model, features and labels are generated when asked for, from
an RNG seeded by (seed, device id), so they do not depend on which devices were asked first.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.config import SyntheticConfig
from fedsim.data.base import FederatedDataset

# Distinct stream tags, so the sizes, the shared iid model and the devices' data never reuse
# the random numbers of one another.
_SIZES_STREAM = 0
_SHARED_MODEL_STREAM = 1
_DEVICE_STREAM = 2
_LEAF_STRUCTURE_STREAM = 3


class SyntheticDataset(FederatedDataset):
    """Synthetic(alpha, beta) devices, generated lazily and deterministically per device."""

    def __init__(self, cfg: SyntheticConfig, *, population: int, seed: int) -> None:
        self.name = cfg.name
        self.input_shape = (cfg.num_features,)
        self.num_classes = cfg.num_classes
        self._cfg = cfg
        self._population = population
        self._seed = seed
        total = device_sizes(cfg, population=population, seed=seed)
        # LEAF's split: the train part is floor((1 - test_fraction) * n), at least 1 example;
        # the epsilon keeps e.g. 0.9 * 30 = 26.999... from losing an example to rounding.
        train = np.floor((1.0 - cfg.test_fraction) * total + 1e-9).astype(np.int64)
        self._train_sizes = np.clip(train, 1, total).astype(np.int32)
        self._total_sizes = total.astype(np.int32)
        # Feature scales sqrt(j^-1.2), j = 1..num_features: the diagonal covariance of LEAF.
        self._feature_std = np.power(np.arange(1, cfg.num_features + 1, dtype=np.float64), -0.6)
        self._shared_model = self._draw_shared_model() if cfg.iid else None
        self._leaf_q, self._leaf_means = self._draw_leaf_structure() if cfg.recipe == "leaf" else (None, None)
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_devices(self) -> int:
        return self._population

    def num_examples(self, device_id: int) -> int:
        self.check_device_id(device_id)
        return int(self._train_sizes[device_id])

    def heldout_examples(self, device_id: int) -> int:
        """Examples of one device held out for the central test set (never trained on)."""
        self.check_device_id(device_id)
        return int(self._total_sizes[device_id] - self._train_sizes[device_id])

    def device_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_device_id(device_id)
        x, y = self._generate(device_id)
        n_train = self._train_sizes[device_id]
        return torch.from_numpy(x[:n_train].copy()), torch.from_numpy(y[:n_train].copy())

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test is None:
            xs, ys = [], []
            for device_id in range(min(self._cfg.eval_devices, self._population)):
                x, y = self._generate(device_id)
                n_train = self._train_sizes[device_id]
                xs.append(x[n_train:])
                ys.append(y[n_train:])
            self._test = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
        return self._test

    def _draw_shared_model(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self._seed, _SHARED_MODEL_STREAM])
        weights = rng.normal(0.0, 1.0, (self._cfg.num_features, self._cfg.num_classes))
        bias = rng.normal(0.0, 1.0, self._cfg.num_classes)
        return weights, bias

    def _draw_leaf_structure(self) -> tuple[np.ndarray, np.ndarray]:
        """LEAF's shared Q [F + 1, C, K] and the K cluster means (side information of size K)."""
        cfg = self._cfg
        rng = np.random.default_rng([self._seed, _LEAF_STRUCTURE_STREAM])
        k = cfg.num_clusters
        q = rng.normal(0.0, 1.0, (cfg.num_features + 1, cfg.num_classes, k))
        means = np.stack([rng.normal(rng.normal(0.0, 1.0), 1.0, k) for _ in range(k)])
        return q, means

    def _generate(self, device_id: int) -> tuple[np.ndarray, np.ndarray]:
        """All examples of one device (train part first, then the held-out part)."""
        cfg = self._cfg
        rng = np.random.default_rng([self._seed, device_id, _DEVICE_STREAM])
        n = int(self._total_sizes[device_id])
        if self._shared_model is not None:
            weights, bias = self._shared_model
            feature_mean = np.zeros(cfg.num_features)
        elif self._leaf_q is not None and self._leaf_means is not None:
            cluster = int(rng.integers(cfg.num_clusters))
            model_info = rng.normal(self._leaf_means[cluster], cfg.model_noise)
            w = self._leaf_q @ model_info  # [F + 1, C]: row 0 is the bias of the [1, x] input
            feature_mean = rng.normal(rng.normal(0.0, 1.0), 1.0, cfg.num_features)  # v_k ~ N(B_k, 1)
            x = (feature_mean + rng.standard_normal((n, cfg.num_features)) * self._feature_std).astype(np.float32)
            logits = x.astype(np.float64) @ w[1:] + w[0] + rng.normal(0.0, 0.1, (n, cfg.num_classes))
            return x, np.argmax(logits, axis=1).astype(np.int64)
        else:
            model_mean = rng.normal(0.0, cfg.alpha)  # u_k
            feature_center = rng.normal(0.0, cfg.beta)  # B_k
            feature_mean = rng.normal(feature_center, 1.0, cfg.num_features)  # v_k
            weights = rng.normal(model_mean, 1.0, (cfg.num_features, cfg.num_classes))
            bias = rng.normal(model_mean, 1.0, cfg.num_classes)
        x = (feature_mean + rng.standard_normal((n, cfg.num_features)) * self._feature_std).astype(np.float32)
        # Labels from the float32 features the model will see; softmax is monotone, so argmax of
        # the logits is the argmax of the softmax.
        y = np.argmax(x.astype(np.float64) @ weights + bias, axis=1).astype(np.int64)
        return x, y


def device_sizes(cfg: SyntheticConfig, *, population: int, seed: int) -> np.ndarray:
    """Total examples (train + held out) of every device, as one int64 array.

    examples_per_device if set, else clip(floor(lognormal(size_mu, size_sigma)) + size_min,
    size_min, size_max): the lognormal sizes of LEAF/FedProx, bounded on both sides.
    """
    if cfg.examples_per_device is not None:
        return np.full(population, cfg.examples_per_device, dtype=np.int64)
    rng = np.random.default_rng([seed, _SIZES_STREAM])
    raw = np.floor(rng.lognormal(cfg.size_mu, cfg.size_sigma, population))
    # Clip in float before casting: a far lognormal tail would overflow int64.
    return np.clip(raw + cfg.size_min, cfg.size_min, cfg.size_max).astype(np.int64)
