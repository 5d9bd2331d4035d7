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

Nothing is drawn per device up front, so memory does not depend on the population (10^9
devices cost what 1,000 do). Every per-device quantity is a function of (seed, device id),
computed when asked for, the same in the server and in every worker:

* its size (recipe_version 2, the default): a counter-based generator, Philox-4x64 (Salmon et
  al. 2011, "Parallel random numbers: as easy as 1, 2, 3") keyed by the run seed, with the
  device id as its counter, gives one uniform u per device; the size is the inverse of the
  size distribution's CDF at u, read from a table with one entry per possible size. That
  distribution is LEAF's: clip(floor(lognormal(size_mu, size_sigma)) + size_min, size_min,
  size_max). recipe_version 1 (fedsim before 2026-11-30) drew every size up front from one
  sequential stream, an O(population) array in every process; it is kept to reproduce older
  runs, and `fedsim.capacity` refuses it where those arrays would not fit.
* its train/test split: LEAF's, a function of its size;
* its model, features and labels: an RNG seeded by (seed, device id), so they do not depend
  on which devices were asked first.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedsim.config import SyntheticConfig
from fedsim.data.base import FederatedDataset

# Distinct stream tags, so the sizes, the shared iid model and the devices' data never reuse
# the random numbers of one another (recipe_version 2 keys its size generator with a stream of
# its own, so its sizes share nothing with version 1's either).
_SIZES_STREAM = 0
_SIZES_V2_STREAM = 4
_SHARED_MODEL_STREAM = 1
_DEVICE_STREAM = 2
_LEAF_STRUCTURE_STREAM = 3
# size_counts counts every device's size up to this population (a fraction of a second), and uses the
# expected counts beyond: a budget stop that needs the exact number of devices too small to
# ever join matters when a population can be exhausted, not at 10^9 devices.
EXACT_COUNT_LIMIT = 1_000_000
_COUNT_CHUNK = 1 << 20


class SyntheticDataset(FederatedDataset):
    """Synthetic(alpha, beta) devices, generated lazily and deterministically per device."""

    def __init__(self, cfg: SyntheticConfig, *, population: int, seed: int) -> None:
        self.name = cfg.name
        self.input_shape = (cfg.num_features,)
        self.num_classes = cfg.num_classes
        self._cfg = cfg
        self._population = population
        self._seed = seed
        self._sizes = SizeGenerator(cfg, seed=seed)
        # recipe_version 1 only: every device's size, drawn up front (O(population)).
        self._v1_total: np.ndarray | None = None
        self._v1_train: np.ndarray | None = None
        if cfg.recipe_version == 1:
            total = device_sizes(cfg, population=population, seed=seed)
            self._v1_train = train_part(total, cfg.test_fraction).astype(np.int32)
            self._v1_total = total.astype(np.int32)
        # Feature scales sqrt(j^-1.2), j = 1..num_features: the diagonal covariance of LEAF.
        self._feature_std = np.power(np.arange(1, cfg.num_features + 1, dtype=np.float64), -0.6)
        self._shared_model = self._draw_shared_model() if cfg.iid else None
        self._leaf_q, self._leaf_means = self._draw_leaf_structure() if cfg.recipe == "leaf" else (None, None)
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_devices(self) -> int:
        return self._population

    def num_examples(self, device_id: int) -> int:
        return self._split(device_id)[0]

    def heldout_examples(self, device_id: int) -> int:
        """Examples of one device held out for the central test set (never trained on)."""
        n_train, n_total = self._split(device_id)
        return n_total - n_train

    def size_counts(self) -> dict[int, float]:
        """Devices of each training size: exact up to EXACT_COUNT_LIMIT devices (counted in
        chunks, under a second), beyond that the expected counts (population x probability)."""
        if self._v1_train is not None:
            sizes, counts = np.unique(self._v1_train, return_counts=True)
            return {int(n): float(c) for n, c in zip(sizes, counts, strict=True)}
        if self._population <= EXACT_COUNT_LIMIT:
            seen = np.zeros(self._cfg.size_max + 1, dtype=np.int64)
            for first in range(0, self._population, _COUNT_CHUNK):
                totals = self._sizes.totals(first, min(_COUNT_CHUNK, self._population - first))
                seen += np.bincount(train_part(totals, self._cfg.test_fraction), minlength=len(seen))
            return {int(n): float(seen[n]) for n in np.flatnonzero(seen)}
        shares: dict[int, float] = {}
        for total, p in self._sizes.total_distribution().items():
            n_train = int(train_part(np.array([total]), self._cfg.test_fraction)[0])
            shares[n_train] = shares.get(n_train, 0.0) + p * self._population
        return shares

    def _split(self, device_id: int) -> tuple[int, int]:
        """(train examples, all examples) of one device."""
        self.check_device_id(device_id)
        if self._v1_train is not None and self._v1_total is not None:
            return int(self._v1_train[device_id]), int(self._v1_total[device_id])
        total = self._sizes.totals(device_id, 1)
        return int(train_part(total, self._cfg.test_fraction)[0]), int(total[0])

    def device_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_train, _ = self._split(device_id)
        x, y = self._generate(device_id)
        return torch.from_numpy(x[:n_train].copy()), torch.from_numpy(y[:n_train].copy())

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test is None:
            xs, ys = [], []
            for device_id in range(min(self._cfg.eval_devices, self._population)):
                n_train, _ = self._split(device_id)
                x, y = self._generate(device_id)
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
        n = self._split(device_id)[1]
        rng = np.random.default_rng([self._seed, device_id, _DEVICE_STREAM])
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


def train_part(total: np.ndarray, test_fraction: float) -> np.ndarray:
    """LEAF's split of devices with `total` examples: floor((1 - test_fraction) * n), at least 1."""
    # The epsilon keeps e.g. 0.9 * 30 = 26.999... from losing an example to rounding.
    train = np.floor((1.0 - test_fraction) * total + 1e-9).astype(np.int64)
    return np.clip(train, 1, total)


class SizeGenerator:
    """recipe_version 2: device sizes as a pure function of (seed, device id), in O(1) memory.

    Device d's uniform is the first 64-bit word that Philox-4x64, keyed by (seed, stream),
    outputs for counter d + 1 (numpy's Philox steps its counter before each block), turned
    into a double in [0, 1) from its top 53 bits; its total size is
    size_min + #{j : cdf[j] <= u}, with cdf[j] = P(floor(L) <= j) = P(L < j + 1) for
    L ~ lognormal(size_mu, size_sigma), j = 0 .. size_max - size_min - 1: inverse-transform
    sampling of clip(floor(L) + size_min, size_min, size_max), exact up to the float rounding
    of the table. Integer and comparison operations only after the table, so a range of
    devices computed at once (`totals(first, count)`) gives each device the value it gets alone.
    """

    def __init__(self, cfg: SyntheticConfig, *, seed: int) -> None:
        self._fixed = cfg.examples_per_device
        self._size_min = cfg.size_min
        # A 128-bit Philox key from the run seed; SeedSequence spreads seeds 0, 1, 2, ... apart.
        self._key = np.random.SeedSequence([seed, _SIZES_V2_STREAM]).generate_state(2, np.uint64)
        self._cdf = None if self._fixed is not None else _floor_lognormal_cdf(cfg)

    def totals(self, first: int, count: int) -> np.ndarray:
        """Total examples (train + held out) of devices first .. first + count - 1, int64."""
        if self._fixed is not None:
            return np.full(count, self._fixed, dtype=np.int64)
        assert self._cdf is not None
        words = np.random.Philox(key=self._key, counter=[first, 0, 0, 0]).random_raw(4 * count)
        u = (words[::4] >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return self._size_min + np.searchsorted(self._cdf, u, side="right").astype(np.int64)

    def total_distribution(self) -> dict[int, float]:
        """{total examples: probability} of one device."""
        if self._fixed is not None:
            return {self._fixed: 1.0}
        assert self._cdf is not None
        mass = np.diff(self._cdf, prepend=0.0, append=1.0)
        return {self._size_min + j: float(p) for j, p in enumerate(mass) if p > 0}


def _floor_lognormal_cdf(cfg: SyntheticConfig) -> np.ndarray:
    """cdf[j] = P(L < j + 1), L ~ lognormal(size_mu, size_sigma), j = 0 .. size_max - size_min - 1."""
    mu, sigma = cfg.size_mu, cfg.size_sigma

    def below(x: float) -> float:  # P(L < x) = Phi((ln x - mu) / sigma); sigma 0: L = e^mu
        if sigma == 0:
            return 1.0 if mu < math.log(x) else 0.0
        return 0.5 * math.erfc(-(math.log(x) - mu) / (sigma * math.sqrt(2.0)))

    # math (libm), not numpy's SIMD loops: one scalar path, whatever the CPU's vector width.
    return np.array([below(j + 1.0) for j in range(cfg.size_max - cfg.size_min)], dtype=np.float64)


def device_sizes(cfg: SyntheticConfig, *, population: int, seed: int) -> np.ndarray:
    """recipe_version 1: total examples (train + held out) of every device, as one int64 array.

    examples_per_device if set, else clip(floor(lognormal(size_mu, size_sigma)) + size_min,
    size_min, size_max): the lognormal sizes of LEAF/FedProx, bounded on both sides.
    """
    if cfg.examples_per_device is not None:
        return np.full(population, cfg.examples_per_device, dtype=np.int64)
    rng = np.random.default_rng([seed, _SIZES_STREAM])
    raw = np.floor(rng.lognormal(cfg.size_mu, cfg.size_sigma, population))
    # Clip in float before casting: a far lognormal tail would overflow int64.
    return np.clip(raw + cfg.size_min, cfg.size_min, cfg.size_max).astype(np.int64)
