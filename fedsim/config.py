"""The typed run configuration: Hydra composes it, this module checks it before anything starts.

Every key a user can set lives in one of the dataclasses below, with its default and a
one-line comment. `from_dict` turns a plain (resolved) dict into a `FedsimConfig`, refusing
unknown keys and values outside their allowed range with a `ConfigError` that names the key.
The same function rebuilds the config inside workers from the JSON the server sends them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError
from fedsim.registry import LOGGERS, MODELS, STRATEGIES

def _positive(value: float | int | None, key: str, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


# Field checks next to the field: `field(default=..., metadata=checked(positive()))`. A check is
# called as check(value, "group.key") and raises ConfigError; `check_fields` runs every check of
# a config group (validate calls it where the group's checks belong). Cross-key constraints stay
# in validate, each raised under the key it refuses.
Check = Any


def checked(*checks: Check) -> dict[str, Any]:
    return {"checks": checks}


def positive(*, allow_zero: bool = False) -> Check:
    return lambda value, key: _positive(value, key, allow_zero=allow_zero)


def one_of(*allowed: str) -> Check:
    return lambda value, key: _choice(value, key, allowed)


def in_unit_interval(value: float | None, key: str) -> None:
    """[0, 1) (None passes: an optional field left unset)"""
    if value is not None and not 0 <= value < 1:
        raise ConfigError(key, f"must be in [0, 1), got {value}")


def in_open_unit_interval(value: float, key: str) -> None:
    """(0, 1)"""
    if not 0 < value < 1:
        raise ConfigError(key, f"must be in (0, 1), got {value}")


def at_least(n: int) -> Check:
    def check(value: int, key: str) -> None:
        if value < n:
            raise ConfigError(key, f"must be >= {n}, got {value}")

    return check


def in_range(lo: int, hi: int, *, integer: bool = False) -> Check:
    """lo..hi, both included."""

    def check(value: int, key: str) -> None:
        if not lo <= value <= hi:
            raise ConfigError(key, f"must be {'an integer ' if integer else ''}in {lo}..{hi}, got {value}")

    return check


def zero_or_at_least(n: int, why: str) -> Check:
    """0 (off), or at least n."""

    def check(value: int, key: str) -> None:
        if 0 < value < n:
            raise ConfigError(key, f"must be 0 (off) or at least {n} ({why}), got {value}")

    return check


def unsigned_64(value: int, key: str) -> None:
    """An integer in [0, 2**64) (a seed)."""
    if isinstance(value, bool) or not 0 <= value < 2**64:
        raise ConfigError(key, f"must be an integer in [0, 2**64), got {value}")


def version_of(*versions: int) -> Check:
    def check(value: int, key: str) -> None:
        if value not in versions:
            raise ConfigError(key, f"unknown version {value}; allowed: {', '.join(map(str, versions))}")

    return check


def not_blank(message: str) -> Check:
    """A string with more than white space in it (None passes: an optional field left unset)."""

    def check(value: str | None, key: str) -> None:
        if value is not None and not value.strip():
            raise ConfigError(key, message)

    return check


def import_target(needed_by: str) -> Check:
    """A "package.module:factory" path, which `needed_by` needs."""

    def check(value: str | None, key: str) -> None:
        if not value or ":" not in value:
            raise ConfigError(key, f"{needed_by} needs {key}='package.module:factory', got {value!r}")

    return check


def length(n: int, what: str) -> Check:
    def check(value: list, key: str) -> None:
        if len(value) != n:
            raise ConfigError(key, f"must list exactly {n} {what}, got {value}")

    return check


def each(check: Check) -> Check:
    """Run `check` on every element of a list field, naming it key[i]."""

    def check_each(value: list, key: str) -> None:
        for i, item in enumerate(value):
            check(item, f"{key}[{i}]")

    return check_each


def registered(registry: Any) -> Check:
    return lambda value, key: registry.check(value)


def registered_once(registry: Any, kind: str) -> Check:
    """A list of names registered in `registry` (no "module:attribute" paths), none twice."""

    def check(value: list[str], key: str) -> None:
        for i, name in enumerate(value):
            if name not in registry:
                raise ConfigError(key, f"unknown {kind} {name!r}; allowed: {', '.join(registry)}")
            if name in value[:i]:
                raise ConfigError(key, f"{name!r} is listed twice; allowed: each of {', '.join(registry)} once")

    return check


def check_fields(group: Any, prefix: str) -> None:
    """Run the checks declared on the fields of the config dataclass `group` (not nested groups),
    in the order of the fields; prefix "" for the top-level keys."""
    for f in dataclasses.fields(group):
        for check in f.metadata.get("checks", ()):
            check(getattr(group, f.name), f"{prefix}.{f.name}" if prefix else f.name)


# ----------------------------------------------------------------------------- datasets


@dataclass
class SyntheticConfig:
    """Synthetic federated data for any population, two published recipes.

    recipe=leaf (Caldas et al. 2018, LEAF, data/synthetic): a shared tensor Q ~ N(0, 1) and
    num_clusters cluster means; device k picks a cluster c, draws model_info ~ N(mu_c, 0.1),
    gets the model w_k = Q model_info, features x ~ N(v_k, Sigma) with v_k ~ N(B_k, 1),
    B_k ~ N(0, 1), Sigma = diag(j^-1.2), and labels y = argmax(softmax([1, x] w_k + N(0, 0.1))).
    recipe=fedprox (Li et al. 2020, FedProx Sec. 5.1, Synthetic(alpha, beta)): u_k ~ N(0, alpha),
    B_k ~ N(0, beta), W_k, b_k ~ N(u_k, 1), x ~ N(v_k, Sigma), y = argmax(softmax(W_k x + b_k)):
    every device has an independent model, which no single global model fits well.
    """

    name: str = "synthetic"
    # leaf (devices share structure through Q) | fedprox (independent models)
    recipe: str = field(default="leaf", metadata=checked(one_of("leaf", "fedprox")))
    # leaf: clusters of device models (LEAF's default prob_clusters is [1.0])
    num_clusters: int = field(default=1, metadata=checked(positive()))
    # leaf: spread of a device's model_info around its cluster mean
    model_noise: float = field(default=0.1, metadata=checked(positive(allow_zero=True)))
    # fedprox: spread of the per-device models (u_k ~ N(0, alpha))
    alpha: float = field(default=1.0, metadata=checked(positive(allow_zero=True)))
    # fedprox: spread of the per-device feature means (B_k ~ N(0, beta))
    beta: float = field(default=1.0, metadata=checked(positive(allow_zero=True)))
    num_features: int = field(default=60, metadata=checked(positive()))  # input dimension (LEAF: 60)
    num_classes: int = field(default=10, metadata=checked(at_least(2)))  # output classes
    # device sizes: floor(lognormal(size_mu, size_sigma)) + size_min, at most size_max: every device
    # has at least size_min and at most size_max examples (LEAF: lognormal(3, 2) + 5, at most 1000)
    size_mu: float = 3.0
    size_sigma: float = field(default=2.0, metadata=checked(positive(allow_zero=True)))
    size_min: int = field(default=5, metadata=checked(positive()))
    size_max: int = field(default=1000, metadata=checked(positive()))
    # fixed size for every device (overrides lognormal)
    examples_per_device: int | None = field(default=None, metadata=checked(positive()))
    # share of each device's examples held out (LEAF: 10%)
    test_fraction: float = field(default=0.1, metadata=checked(in_open_unit_interval))
    # central test set = held-out part of devices 0..eval_devices-1
    eval_devices: int = field(default=200, metadata=checked(positive()))
    iid: bool = False  # True: one shared model and feature mean (LEAF's synthetic_iid)
    # 2: sizes from (seed, device id), O(1) memory | 1: sizes drawn up front (runs before 2026-11-30)
    recipe_version: int = field(default=2, metadata=checked(version_of(1, 2)))


@dataclass
class FemnistConfig:
    """LEAF FEMNIST: any directory of LEAF JSON files (plain or .gz), one device per writer."""

    name: str = "femnist"
    path: str | None = None  # directory holding train/ and test/ (or the JSON files); None = the bundled 105 writers
    max_test_examples: int | None = field(default=None, metadata=checked(positive()))  # cap on the central test set (None = all)


@dataclass
class FashionMnistConfig:
    """Fashion-MNIST from Debian's dataset-fashion-mnist idx files, partitioned over devices."""

    name: str = "fashion_mnist"
    path: str = "/usr/share/datasets/fashion-mnist"  # directory with the four idx(.gz) files
    partition: str = field(default="iid", metadata=checked(one_of("iid", "dirichlet", "shards")))  # iid | dirichlet | shards
    # label skew for partition=dirichlet (smaller = more skewed)
    dirichlet_alpha: float = field(default=0.5, metadata=checked(positive()))
    shards_per_device: int = field(default=2, metadata=checked(positive()))  # label-sorted shards per device for partition=shards
    # cap on the central test set (None = all 10,000)
    max_test_examples: int | None = field(default=None, metadata=checked(positive()))


@dataclass
class HuggingFaceConfig:
    """Any Hugging Face dataset through flwr-datasets (online), or local files (offline)."""

    name: str = "huggingface"
    hf_name: str = "ylecun/mnist"  # a Hub dataset id, or a builder (parquet, csv, json) with data_files
    data_files: dict[str, str] | None = None  # split -> file or glob, for local builders
    train_split: str = "train"  # split partitioned over devices
    test_split: str | None = "test"  # central test split (None = no central evaluation)
    # iid | dirichlet | natural (natural groups by partition_by)
    partition: str = field(default="iid", metadata=checked(one_of("iid", "dirichlet", "natural")))
    partition_by: str = "label"  # label column for dirichlet, grouping column for natural
    dirichlet_alpha: float = field(default=0.5, metadata=checked(positive()))  # label skew for partition=dirichlet
    feature_key: str = "image"  # column holding the input (image or vector)
    label_key: str = "label"  # column holding the integer class
    num_classes: int | None = field(default=None, metadata=checked(positive()))  # None = 1 + the largest label in the train split
    max_test_examples: int | None = field(default=None, metadata=checked(positive()))  # cap on the central test set


@dataclass
class ShakespeareConfig:
    """Next-character prediction on a text of `NAME:` speeches, one device per role (LEAF's recipe)."""

    name: str = "shakespeare"
    path: str | None = None  # a text of NAME: speeches (Tiny Shakespeare's format); None = the bundled Tiny Shakespeare
    seq_len: int = field(default=80, metadata=checked(positive()))  # characters a model reads to predict the next one (LEAF: 80)
    # What a training window teaches: "last", the character after it (LEAF); "every", the next
    # character at each of its positions (TFF's recipe: seq_len labels per window, for the same
    # compute). Evaluation always scores the character after each test window.
    targets: str = field(default="last", metadata=checked(one_of("last", "every")))
    # roles with fewer characters are left out (the count is printed)
    min_chars: int = field(default=1000, metadata=checked(positive(allow_zero=True)))
    # last share of each role's windows, by position, held out (LEAF: 0.2)
    test_fraction: float = field(default=0.2, metadata=checked(in_open_unit_interval))
    # evenly thin each device's training windows to this many (None = all)
    max_train_windows: int | None = field(default=None, metadata=checked(positive()))
    # evenly thin the central test set (None = every role's test windows)
    max_test_examples: int | None = field(default=5000, metadata=checked(positive()))
    prompt: str = "ROMEO:\n"  # the run ends by sampling a continuation of this text (summary.json)
    sample_chars: int = field(default=200, metadata=checked(positive(allow_zero=True)))  # characters sampled after the prompt


@dataclass
class CustomDatasetConfig:
    """A user's own population: `package.module:factory`, called as factory(population=N, seed=S).

    The factory returns a `fedsim.data.FederatedDataset` with exactly N devices; workers import
    the same target, so its module must be importable there too (on the launcher's sys.path).
    """

    name: str = "custom"
    # "package.module:factory" (required)
    target: str | None = field(default=None, metadata=checked(import_target("dataset=custom")))


DATASETS: dict[str, type] = {
    "synthetic": SyntheticConfig,
    "femnist": FemnistConfig,
    "fashion_mnist": FashionMnistConfig,
    "huggingface": HuggingFaceConfig,
    "shakespeare": ShakespeareConfig,
    "custom": CustomDatasetConfig,
}
DatasetConfig = (
    SyntheticConfig | FemnistConfig | FashionMnistConfig | HuggingFaceConfig | ShakespeareConfig | CustomDatasetConfig
)

# ----------------------------------------------------------------------------- the rest


@dataclass
class ModelConfig:
    # auto (cnn for images, mlp for vectors) | logreg | mlp | cnn | scatternet | lstm | transformer | custom
    name: str = field(default="auto", metadata=checked(registered(MODELS)))
    hidden_sizes: list[int] = field(default_factory=lambda: [64], metadata=checked(each(positive())))  # mlp hidden layer widths
    # the two 5x5 conv layers
    cnn_channels: list[int] = field(
        default_factory=lambda: [32, 64], metadata=checked(length(2, "conv widths"), each(positive()))
    )
    cnn_dense: int = field(default=256, metadata=checked(positive()))  # width of the cnn's dense layer
    # GroupNorm groups in the cnn (no BatchNorm: DP-SGD needs per-example grads)
    norm_groups: int = field(default=8, metadata=checked(positive()))
    # mlp and cnn hidden activation: relu, or tanh (a tempered sigmoid: bounded activations keep
    # DP-SGD's clipped gradients more informative; Papernot et al. 2021, AAAI, Sec. 4)
    activation: str = field(default="relu", metadata=checked(one_of("relu", "tanh")))
    # scatternet: the trainable head on the scattering features, linear | cnn (Tramer & Boneh 2021)
    scatter_head: str = field(default="linear", metadata=checked(one_of("linear", "cnn")))
    target: str | None = None  # name=custom: "package.module:factory", called as factory(input_shape, num_classes)
    # lstm: character embedding width (LEAF: 8); transformer: ignored (embeds at model.hidden)
    embed: int = field(default=8, metadata=checked(positive()))
    # lstm: hidden units per layer (LEAF: 256); transformer: the model width
    hidden: int = field(default=256, metadata=checked(positive()))
    layers: int = field(default=2, metadata=checked(positive()))  # lstm / transformer: stacked layers (LEAF's LSTM: 2)
    heads: int = field(default=4, metadata=checked(positive()))  # transformer: attention heads (must divide model.hidden)


@dataclass
class AlgorithmConfig:
    """Local training on devices and the server's update (Reddi et al. 2021, Alg. 2)."""

    # a registered strategy (fedsim.registry.STRATEGIES): fedavg | fedprox | fedavgm | fedadam | fedyogi | fedadagrad | scaffold
    name: str = field(default="fedavg", metadata=checked(registered(STRATEGIES)))
    lr: float = field(default=0.05, metadata=checked(positive()))  # device (client) SGD learning rate
    local_epochs: int = field(default=1, metadata=checked(positive()))  # passes over a device's data per round
    batch_size: int = field(default=10, metadata=checked(positive()))  # device minibatch size
    momentum: float = field(default=0.0, metadata=checked(positive(allow_zero=True)))  # device SGD momentum
    weight_decay: float = field(default=0.0, metadata=checked(positive(allow_zero=True)))  # device SGD weight decay
    # FedProx proximal term mu/2 ||w - w_global||^2 (Li et al. 2020)
    proximal_mu: float = field(default=0.0, metadata=checked(positive(allow_zero=True)))
    # server step size (eta in Reddi et al.; 1.0 = plain FedAvg)
    server_lr: float = field(default=1.0, metadata=checked(positive()))
    # Server-side exponential moving average of the global model over rounds, evaluated and saved
    # instead of the last round's model (parameter averaging, De et al. 2022, "Unlocking
    # High-Accuracy Differentially Private Image Classification through Scale", Sec. 3.3): the
    # decay per round, 0 = off. Post-processing of the models the rounds release: no privacy cost.
    model_ema: float = field(default=0.0, metadata=checked(in_unit_interval))
    beta1: float = field(default=0.9, metadata=checked(in_unit_interval))  # FedAdam/FedYogi/FedAdagrad first-moment decay; FedAvgM's server momentum
    beta2: float = field(default=0.99, metadata=checked(in_unit_interval))  # FedAdam/FedYogi second-moment decay
    # FedAdam/FedYogi/FedAdagrad adaptivity (epsilon in the denominator)
    tau: float = field(default=1e-3, metadata=checked(positive()))


@dataclass
class CohortConfig:
    size: int = field(default=50, metadata=checked(positive()))  # devices per round: exact (fixed) or expected (poisson, rate q = size/population)
    sampling: str = field(default="poisson", metadata=checked(one_of("poisson", "fixed", "cyclic")))  # poisson (each device independently with rate q) | fixed (k without replacement) | cyclic (each device once per population // size rounds, no randomness: DP-FTRL)


@dataclass
class SimulationConfig:
    # multiplexed (workers train many devices) | classic (one SuperNode per device)
    layout: str = field(default="multiplexed", metadata=checked(one_of("multiplexed", "classic")))
    # worker SuperNodes (None = one per CPU); ignored by classic
    num_workers: int | None = field(default=None, metadata=checked(positive()))
    # Ray CPUs per ClientApp actor (2 cores / 1.0 = 2 parallel workers)
    cpus_per_worker: float = field(default=1.0, metadata=checked(positive()))
    # where the workers run: processes (child processes of this one, no Ray: one Linux machine, a
    # faster start) | ray (Ray actors: a cluster, GPUs shared out, the active threat model's key
    # registry) | auto (processes, unless ray_address is set, GPUs are used, secagg's threat model
    # is active or this is not Linux)
    backend: str = field(default="auto", metadata=checked(one_of("auto", "ray", "processes")))
    # torch threads per worker (more is 10-35x slower on small models)
    torch_threads: int = field(default=1, metadata=checked(positive()))
    # give up on a worker's reply after this long
    round_timeout_s: float | None = field(default=600.0, metadata=checked(positive()))
    # resend a failed (or silent) worker's job this many times per round
    retries: int = field(default=2, metadata=checked(positive(allow_zero=True)))
    # drop a late worker after this many deadlines (round_timeout_s) missed in a row
    max_missed_rounds: int = field(default=5, metadata=checked(positive()))
    # Flower and Ray log level (DEBUG | INFO | WARNING | ERROR)
    log_level: str = field(default="WARNING", metadata=checked(one_of("DEBUG", "INFO", "WARNING", "ERROR")))
    ray_temp_dir: str | None = None  # Ray's session directory (None = Ray's default /tmp/ray)
    # attach to a running Ray cluster ("auto" or HOST:PORT); None = start Ray here
    ray_address: str | None = field(default=None, metadata=checked(not_blank("must be 'auto', HOST:PORT or null")))
    # train a worker's devices as one batched computation: auto | on | off
    vectorize: str = field(default="auto", metadata=checked(one_of("auto", "on", "off")))
    # where workers train: cpu | cuda (every worker's torch must see a GPU; workers share them as
    # fractional Ray GPUs) | auto (cuda where torch sees one, else cpu). Results equal the CPU's
    # to float tolerance, not bit for bit (other kernels).
    device: str = field(default="auto", metadata=checked(one_of("auto", "cpu", "cuda")))
    # at most this many devices per batched computation (vectorized training; the groups depend on the
    # cohort only: ceil(n / device_group) of them, rounded up to even, so more workers than that stay idle)
    device_group: int = field(default=32, metadata=checked(positive()))


@dataclass
class DPSGDPrivacyConfig:
    """Sample-level DP: every device trains with DP-SGD (Abadi et al. 2016) through Opacus."""

    # sigma; null: calibrate it from target_epsilon before training
    noise_multiplier: float | None = field(default=1.0, metadata=checked(positive(allow_zero=True)))
    max_grad_norm: float = field(default=1.0, metadata=checked(positive()))  # C, the per-example L2 clipping bound
    # per-device budget; devices that would exceed it are not sampled
    target_epsilon: float | None = field(default=None, metadata=checked(positive()))
    delta: float = field(default=1e-5, metadata=checked(in_open_unit_interval))  # the delta of every reported (epsilon, delta)
    # rdp (Opacus) | prv (Opacus) | pld (dp-accounting)
    accountant: str = field(default="rdp", metadata=checked(one_of("rdp", "prv", "pld")))
    # Opacus per-example gradients: hooks | ew | functorch
    grad_sample_mode: str = field(default="hooks", metadata=checked(one_of("hooks", "ew", "functorch")))
    fix_model: bool = False  # let Opacus's ModuleValidator replace incompatible layers (BatchNorm -> GroupNorm)
    # calibration: rounds a device joins (null: ceil(rounds * q))
    assumed_participations: int | None = field(default=None, metadata=checked(positive()))
    # local: each device adds all of its noise (trusts nobody) | distributed: under SecAgg+ each device sends one
    # DP-SGD gradient sum per round with 1/h of the noise as a Skellam share (fedsim.privacy.distributed_sgd)
    noise: str = field(default="local", metadata=checked(one_of("local", "distributed")))


@dataclass
class DPFedAvgPrivacyConfig:
    """User-level DP: DP-FedAvg (McMahan et al. 2018), each device's whole update clipped to C,
    Gaussian noise z*C on the sum, divided by the expected cohort size."""

    # z; null: calibrate it from target_epsilon over the planned rounds
    noise_multiplier: float | None = field(default=1.0, metadata=checked(positive(allow_zero=True)))
    clip_norm: float = field(default=1.0, metadata=checked(positive()))  # C (the initial C with adaptive clipping)
    # user-level budget of the run; the run stops before exceeding it
    target_epsilon: float | None = field(default=None, metadata=checked(positive()))
    delta: float = field(default=1e-5, metadata=checked(in_open_unit_interval))  # should be below 1 / population
    # pld (dp-accounting, Poisson cohorts) | rdp (dp-accounting; also fixed-size cohorts)
    accountant: str = field(default="pld", metadata=checked(one_of("pld", "rdp")))
    adaptive_clipping: bool = False  # track a quantile of update norms (Andrew et al. 2021)
    # adaptive: fraction of updates that should fall within C
    target_quantile: float = field(default=0.5, metadata=checked(in_open_unit_interval))
    clip_learning_rate: float = field(default=0.2, metadata=checked(positive()))  # adaptive: eta_C of the geometric update
    # adaptive: sigma_b of the noisy count (null: cohort / 20)
    count_noise_multiplier: float | None = field(default=None, metadata=checked(positive()))
    # add noise as if the cohort had this many devices (a labelled simulation)
    noise_cohort_size: int | None = field(default=None, metadata=checked(positive()))
    # central (the server adds it) | distributed (devices add Skellam shares under SecAgg+) | tree (DP-FTRL: central noise through tree aggregation, Kairouz et al. 2021; needs cohort.sampling=cyclic)
    noise: str = field(default="central", metadata=checked(one_of("central", "distributed", "tree")))
    # noise=tree: a new tree every k rounds (null: one cycle, population // cohort.size rounds)
    tree_restart_every: int | None = field(default=None, metadata=checked(positive()))


@dataclass
class CheckpointConfig:
    # write a checkpoint every k rounds, at the end and on Ctrl-C (0: never)
    every: int = field(default=0, metadata=checked(positive(allow_zero=True)))
    keep: int = field(default=2, metadata=checked(positive()))  # newest checkpoints kept in <run dir>/checkpoints/


@dataclass
class FaultsConfig:
    # each sampled device raises instead of training, seeded per (round, device)
    device_failure_rate: float = field(default=0.0, metadata=checked(in_unit_interval))
    # each sampled device sends an all-NaN update (a faulty device), seeded likewise
    nan_update_rate: float = field(default=0.0, metadata=checked(in_unit_interval))
    # each sampled device is a straggler this round with this probability
    straggler_rate: float = field(default=0.0, metadata=checked(in_unit_interval))
    straggler_slowdown: float = field(default=10.0, metadata=checked(positive()))  # a straggler computes this many times slower
    # simulated device compute time per example and epoch
    seconds_per_example: float = field(default=0.001, metadata=checked(positive()))
    # simulated seconds: devices that would finish later drop out
    round_deadline_s: float | None = field(default=None, metadata=checked(positive()))
    # Worker faults (chaos): per round, with these probabilities, one worker (a seeded choice) is
    # told in its job to SIGKILL its own process, or to SIGSTOP it for worker_pause_s (a detached
    # helper sends SIGCONT). Only the first send of a job carries the fault.
    worker_kill_rate: float = field(default=0.0, metadata=checked(in_unit_interval))
    worker_pause_rate: float = field(default=0.0, metadata=checked(in_unit_interval))
    worker_pause_s: float = field(default=5.0, metadata=checked(positive()))


@dataclass
class PrivacyConfig:
    """Privacy mechanisms, each optional and composable: privacy=dpsgd, privacy=[dpsgd,dpfedavg]."""

    dpsgd: DPSGDPrivacyConfig | None = None  # sample-level DP-SGD on every device
    dpfedavg: DPFedAvgPrivacyConfig | None = None  # user-level DP-FedAvg
    # auto | reproducible (seed + config) | secure (OS entropy); see fedsim.randomness
    randomness: str = field(default="auto", metadata=checked(one_of("auto", "reproducible", "secure")))


@dataclass
class SecAggConfig:
    """Secure aggregation: SecAgg+ (Bell et al. 2020) over the round's cohort."""

    name: str = field(default="none", metadata=checked(one_of("none", "secaggplus")))  # none | secaggplus
    # fixed-point bits per coordinate (signed grid of 2^bits - 1 levels); 2..32: a signed grid
    # [-L, L], L = 2^(bits-1) - 1, needs 2 bits
    bits: int = field(default=16, metadata=checked(in_range(2, 32)))
    # per-coordinate range [-r, r] (null: the DP-FedAvg clip norm, else 1.0)
    clip_range: float | None = field(default=None, metadata=checked(positive()))
    modulus_bits: int | None = None  # sums live mod 2^m (null: the smallest m that cannot overflow)
    # What the protocol must withstand (fedsim.secagg.params): k and t are chosen from these.
    # semi_honest (honest-but-curious server) | active (it may lie about dropouts)
    threat_model: str = field(default="semi_honest", metadata=checked(one_of("semi_honest", "active")))
    # gamma: fraction of the cohort that may collude with the server
    max_corrupt_fraction: float = field(default=0.33, metadata=checked(in_unit_interval))
    # delta (null: from the drop_* rates and faults.*_rate, w.p. 1 - 2^-(eta+1))
    max_dropout_fraction: float | None = field(default=None, metadata=checked(in_unit_interval))
    # sigma: the guarantee fails with probability <= 2^-sigma
    security_bits: int = field(default=40, metadata=checked(in_range(1, 128, integer=True)))
    # eta: a round aborts with probability <= 2^-eta
    correctness_bits: int = field(default=20, metadata=checked(in_range(1, 128, integer=True)))
    # k of the neighbour graph (null: the cheapest k meeting the threat model)
    neighbours: int | None = field(default=None, metadata=checked(positive()))
    # Shamir threshold t (null: the smallest t the threat model allows); checked against it
    threshold: int | None = field(default=None, metadata=checked(positive()))
    # fault model: each device drops at this stage with this probability
    drop_advertise_keys: float = field(default=0.0, metadata=checked(in_unit_interval))
    drop_share_keys: float = field(default=0.0, metadata=checked(in_unit_interval))
    drop_masked_input: float = field(default=0.0, metadata=checked(in_unit_interval))
    drop_unmask: float = field(default=0.0, metadata=checked(in_unit_interval))
    # SIMULATION ONLY, not what devices do: each worker sends its devices' unmasked sum in one
    # message, no key, share or mask is made, and the server takes the faithful protocol's decisions
    # from the seeded drops (fedsim.secagg.shortcut): survivors, aborts and the sum are the faithful
    # protocol's, bit for bit; the server could read each worker's sum
    simulation_shortcut: bool = False


@dataclass
class AuditConfig:
    """Empirical privacy auditing: an epsilon measured on the run next to the accountant's (fedsim.audit)."""

    # user-level (DP-FedAvg): 2x this many candidate canary devices, each inserted w.p. 1/2 (0: off)
    canaries: int = field(
        default=0, metadata=checked(positive(allow_zero=True), zero_or_at_least(10, "Gaussians are fitted to them"))
    )
    # sample-level (DP-SGD): canary examples, each included with probability 1/2 (0: off)
    canary_examples: int = field(default=0, metadata=checked(positive(allow_zero=True)))
    # sample-level: canary devices that hold the canary examples (sampled like any device)
    canary_devices: int = field(default=10, metadata=checked(positive()))
    # of every interval and lower bound the audit reports
    confidence: float = field(default=0.95, metadata=checked(in_open_unit_interval))
    # resamples for the interval of the user-level estimate
    bootstrap: int = field(default=200, metadata=checked(positive(allow_zero=True)))
    # TESTS ONLY (needs FEDSIM_ALLOW_BROKEN=1): none | no_noise (noise drawn, not added)
    break_mechanism: str = field(default="none", metadata=checked(one_of("none", "no_noise")))


@dataclass
class OutputConfig:
    dir: str | None = None  # run directory (None = Hydra's run directory, or ./outputs/run)
    save_model: bool = True  # write model.pt at the end
    progress: bool = True  # one line per round on stderr
    report: bool = False  # write report.md/html (fedsim-report) into the run directory at the end
    private_metrics_only: bool = False  # metrics.jsonl keeps only what the DP guarantee covers (fedsim.privacy.published)
    # Experiment trackers fed as the run goes (fedsim.trackers; extra: pip install -e ".[trackers]"):
    # tensorboard (<run dir>/tensorboard/) | mlflow (a file store in <run dir>/mlruns/)
    loggers: list[str] = field(default_factory=list, metadata=checked(registered_once(LOGGERS, "logger")))
    # loggers=[mlflow]: another tracking URI (sqlite:///..., http://...); None = <run dir>/mlruns
    mlflow_uri: str | None = field(
        default=None, metadata=checked(not_blank("must be a tracking URI (sqlite:///..., http://..., a directory) or null"))
    )
    # loggers=[mlflow]: the MLflow experiment the run is logged under
    mlflow_experiment: str = field(
        default="fedsim", metadata=checked(not_blank("must name an MLflow experiment, got an empty string"))
    )


@dataclass
class FedsimConfig:
    seed: int = field(default=0, metadata=checked(unsigned_64))  # seeds sampling, model init and every device's training
    # devices in the population (femnist: at most its writers; shakespeare: its roles)
    population: int = field(default=1000, metadata=checked(positive()))
    rounds: int = field(default=30, metadata=checked(positive()))  # federated rounds
    # central evaluation every k rounds (and always after the last)
    eval_every: int = field(default=1, metadata=checked(positive()))
    cohort: CohortConfig = field(default_factory=CohortConfig)
    dataset: DatasetConfig = field(default_factory=SyntheticConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str | None = None  # a checkpoint file or run directory: continue that run (its config wins)
    # simulation (Flower's simulation engine, Ray) | deployment (a running SuperLink)
    engine: str = field(default="simulation", metadata=checked(one_of("simulation", "deployment")))
    superlink: str | None = None  # deployment: the SuperLink's HOST:PORT, or a connection name in $FLWR_HOME/config.toml
    superlink_ca: str | None = None  # deployment: CA certificate (PEM) to reach the SuperLink over TLS; None = insecure

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def worker_backend(self) -> str:
        """Where the simulation engine's workers run: "processes" or "ray" (simulation.backend;
        auto: Ray for a cluster, for GPUs, which Ray shares out, for the active threat model's
        key registry, and off Linux; processes otherwise)."""
        s = self.simulation
        if s.backend != "auto":
            return s.backend
        # GPUs: Ray shares them among the workers (fractional GPUs, one device each); worker
        # processes would all take the first one.
        gpus = s.device == "cuda" or (s.device == "auto" and nvidia_gpus_present())
        ray = s.ray_address or self.needs_key_registry or gpus or not sys.platform.startswith("linux")
        return "ray" if ray else "processes"

    @property
    def needs_key_registry(self) -> bool:
        """SecAgg+ in the active threat model: its devices read each other's keys from a PKI
        (fedsim.pki), a Ray actor in the simulator, never from the server's messages."""
        return self.secagg.name != "none" and self.secagg.threat_model == "active"

    @property
    def num_workers(self) -> int:
        """Worker SuperNodes of this run (classic layout: one per device)."""
        if self.simulation.layout == "classic":
            return self.population
        return self.simulation.num_workers or usable_cpus()


def nvidia_gpus_present() -> bool:
    """Whether this machine's NVIDIA driver lists a GPU (/proc/driver/nvidia/gpus), without
    importing torch (CUDA_VISIBLE_DEVICES set to nothing hides them)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        return any(Path("/proc/driver/nvidia/gpus").iterdir())
    except OSError:
        return False


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process can keep busy: those it may run on (its affinity), fewer under a CPU
    quota (a container started with `--cpus=2` on a 64-core host: 2). The quota is cgroup v2's
    `cpu.max` ("200000 100000": 2 CPUs) of this process's cgroup and each of its parents, or
    cgroup v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`; the smallest wins, rounded up. Ray
    counts a container's CPUs alike. Unreadable files count as no quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quotas: list[float] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, path = line.partition(":")[2].partition(":")
        parts = Path(path).parts[1:]  # "/a/b" -> ("a", "b"); the process's cgroup, then its parents
        within = [parts[:k] for k in range(len(parts), -1, -1)]
        if hierarchy == "":  # cgroup v2: "0::/path"
            for folder in within:
                quotas += _quota(cgroup_root.joinpath(*folder, "cpu.max"), None)
        elif "cpu" in hierarchy.split(","):  # cgroup v1: the cpu controller, alone or with cpuacct
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                for folder in within:
                    base = cgroup_root.joinpath(mount, *folder)
                    quotas += _quota(base / "cpu.cfs_quota_us", base / "cpu.cfs_period_us")
    if quotas:
        cpus = min(cpus, max(1, math.ceil(min(quotas) - 1e-9)))
    return max(1, cpus)


def _quota(first: Path, period_file: Path | None) -> list[float]:
    """[quota / period in CPUs] from cgroup v2's cpu.max (period_file None) or v1's two files; [] for no quota."""
    try:
        if period_file is None:
            quota, _, period = first.read_text().strip().partition(" ")
        else:
            quota, period = first.read_text().strip(), period_file.read_text().strip()
        if quota in ("max", "-1") or not period:
            return []
        return [int(quota) / int(period)] if int(quota) > 0 and int(period) > 0 else []
    except (OSError, ValueError):
        return []


# ----------------------------------------------------------------------------- parsing


def from_dict(raw: dict[str, Any]) -> FedsimConfig:
    """Build and validate a FedsimConfig from a plain dict (a resolved Hydra config or JSON)."""
    raw = dict(raw)
    ds = raw.get("dataset", {}) or {}
    if not isinstance(ds, dict):
        raise ConfigError("dataset", "must be a mapping with a 'name'")
    ds_name = ds.get("name", "synthetic")
    if not isinstance(ds_name, str) or ds_name not in DATASETS:
        raise ConfigError("dataset.name", f"unknown dataset {ds_name!r}; allowed: {', '.join(DATASETS)}")
    raw["dataset"] = _build(DATASETS[ds_name], ds, "dataset")
    cfg = _build(FedsimConfig, raw, "")
    validate(cfg)
    return cfg


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if dataclasses.is_dataclass(raw):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "<root>", f"must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(path, f"unknown key; allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        if any(isinstance(value, c) for c in classes):
            return value  # the dataset union, built by from_dict
        if len(classes) == 1:
            return _build(classes[0], value, path)
        last: ConfigError | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as err:
                last = err
        assert last is not None
        raise last
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):  # YAML's .nan/.inf: no key means anything by them (null does)
            raise ConfigError(path, f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {value!r}")
        return value
    return value






# Values a run derives from others when they are null: calibration solves the noise multiplier
# for target_epsilon (fedsim.privacy.sample_level, fedsim.privacy.dpfedavg) and writes it into
# the run's config (config.yaml, the workers' copy, the randomness fingerprint). A resume given
# null here and the same target is the same run (fedsim.run.changed_keys).
CALIBRATED_KEYS = ("privacy.dpsgd.noise_multiplier", "privacy.dpfedavg.noise_multiplier")


def validate(cfg: FedsimConfig) -> None:
    """Check ranges and cross-key constraints that types alone do not express."""
    check_fields(cfg, "")  # seed, population, rounds, eval_every, engine
    check_fields(cfg.privacy, "privacy")  # randomness (its mechanisms' groups are checked below)
    check_fields(cfg.cohort, "cohort")
    if cfg.cohort.size > cfg.population:
        raise ConfigError(
            "cohort.size", f"{cfg.cohort.size} is larger than the population ({cfg.population}); allowed: 1..{cfg.population}"
        )

    ds = cfg.dataset
    check_fields(ds, "dataset")
    if isinstance(ds, SyntheticConfig):
        if ds.size_max < ds.size_min:
            raise ConfigError("dataset.size_max", f"must be >= dataset.size_min ({ds.size_min}), got {ds.size_max}")
        if ds.recipe_version == 2 and ds.size_max - ds.size_min > 1_000_000:
            # The size distribution is a table with one entry per possible size (fedsim/data/synthetic.py).
            raise ConfigError(
                "dataset.size_max",
                f"at most dataset.size_min + 1,000,000 ({ds.size_min + 1_000_000}) with dataset.recipe_version=2, "
                f"got {ds.size_max}",
            )
    elif isinstance(ds, ShakespeareConfig):
        if ds.targets == "every" and cfg.model.name not in ("lstm", "transformer"):
            raise ConfigError("dataset.targets", f"every: needs a sequence model; allowed models: lstm, transformer (got {cfg.model.name})")
        if ds.targets == "every" and cfg.audit.canary_examples:
            raise ConfigError("dataset.targets", "every: example canaries carry one label each; allowed with audit.canary_examples: last")

    m = cfg.model
    check_fields(m, "model")  # norm_groups > 0 before it divides the channel counts below
    for c in m.cnn_channels:
        if c % m.norm_groups:
            raise ConfigError("model.norm_groups", f"must divide every cnn channel count ({m.cnn_channels}), got {m.norm_groups}")
    if m.name == "custom" and (not m.target or ":" not in m.target):
        raise ConfigError("model.target", f"model.name=custom needs model.target='package.module:factory', got {m.target!r}")
    if m.name == "transformer" and m.hidden % m.heads:
        raise ConfigError("model.heads", f"must divide model.hidden ({m.hidden}) for the transformer, got {m.heads}")

    check_fields(cfg.algorithm, "algorithm")

    s = cfg.simulation
    check_fields(s, "simulation")
    ncpu = usable_cpus()
    if s.cpus_per_worker > ncpu and not s.ray_address:
        raise ConfigError("simulation.cpus_per_worker", f"{s.cpus_per_worker} exceeds the {ncpu} CPUs this process can use")
    if cfg.engine == "deployment":
        if not cfg.superlink:
            raise ConfigError("superlink", "engine=deployment needs the SuperLink: superlink=HOST:PORT (or a connection name)")
        if s.layout == "classic":
            raise ConfigError("simulation.layout", "the deployment engine runs the multiplexed layout only")
        if s.ray_address:
            raise ConfigError("simulation.ray_address", "applies to engine=simulation only")
    if s.backend == "processes" and not sys.platform.startswith("linux"):
        raise ConfigError("simulation.backend", f"processes needs Linux (fork, file descriptors over Unix sockets); on {sys.platform} use ray or auto")
    if s.backend == "processes" and s.ray_address:
        raise ConfigError("simulation.backend", "processes runs the workers on this machine; with simulation.ray_address use ray or auto")
    if s.backend == "processes" and cfg.needs_key_registry:
        raise ConfigError("simulation.backend", "processes has no key registry for secagg.threat_model=active "
                          "(a Ray actor, fedsim.pki); allowed with it: ray, auto")  # fmt: skip
    if s.layout == "classic" and cfg.population > 100_000:
        raise ConfigError("simulation.layout", "classic (one SuperNode per device) supports populations up to 100,000")

    dp = cfg.privacy.dpsgd
    if dp is not None:
        check_fields(dp, "privacy.dpsgd")
        if dp.noise_multiplier is None and dp.target_epsilon is None:
            raise ConfigError(
                "privacy.dpsgd.noise_multiplier", "is null, so privacy.dpsgd.target_epsilon must be set to calibrate it"
            )
        if dp.noise == "distributed":
            validate_distributed_dpsgd(cfg)
    user = cfg.privacy.dpfedavg
    if user is not None:
        check_fields(user, "privacy.dpfedavg")
        if user.noise_multiplier is None and user.target_epsilon is None:
            raise ConfigError(
                "privacy.dpfedavg.noise_multiplier", "is null, so privacy.dpfedavg.target_epsilon must be set to calibrate it"
            )
        if cfg.cohort.sampling == "fixed" and user.accountant == "pld":
            raise ConfigError(
                "privacy.dpfedavg.accountant",
                "fixed-size cohorts have no PLD accountant in dp-accounting; allowed: cohort.sampling=poisson, "
                "or privacy.dpfedavg.accountant=rdp (replace-one adjacency)",
            )
        if user.noise == "tree":
            # DP-FTRL's accounting (fedsim.privacy.tree) is for a fixed, public participation
            # pattern and one clip norm; the combinations below are not covered by it.
            if cfg.cohort.sampling != "cyclic":
                raise ConfigError("cohort.sampling", f"{cfg.cohort.sampling}: DP-FTRL (privacy.dpfedavg.noise=tree) is "
                                                     "accounted for the cyclic schedule, without amplification by sampling; "
                                                     "allowed: cyclic")  # fmt: skip
            for key, bad, allowed in (
                ("adaptive_clipping", user.adaptive_clipping, "false"),
                ("noise_cohort_size", user.noise_cohort_size is not None, "null"),
            ):
                if bad:
                    raise ConfigError(f"privacy.dpfedavg.{key}", f"not accounted with noise=tree (DP-FTRL); allowed: {allowed}")
            if cfg.secagg.name != "none":
                raise ConfigError("secagg.name", "secure aggregation with noise=tree (DP-FTRL) is not built yet; allowed: none")
            if cfg.privacy.dpsgd is not None and cfg.privacy.dpsgd.target_epsilon is not None:
                # Sample-level budgets stop the run when too few devices have budget left, which
                # depends on the devices' example counts: the number of releases would depend on data.
                raise ConfigError("privacy.dpsgd.target_epsilon", "a sample-level budget stops the run at a round that "
                                                                  "depends on the devices' data, which DP-FTRL's accounting "
                                                                  "does not cover; allowed with noise=tree: null")  # fmt: skip
            if cfg.audit.canaries:
                raise ConfigError("audit.canaries", "the user-level audit assumes fresh noise each round, not DP-FTRL's "
                                                    "tree-correlated noise; allowed with privacy.dpfedavg.noise=tree: 0")  # fmt: skip
        elif cfg.cohort.sampling == "cyclic":
            raise ConfigError("cohort.sampling", "cyclic: DP-FedAvg's accountants assume random cohorts (amplification "
                                                 "by sampling); allowed: poisson, fixed, or privacy.dpfedavg.noise=tree")  # fmt: skip
        if user.noise == "distributed" and cfg.secagg.name == "none":
            raise ConfigError(
                "privacy.dpfedavg.noise", "distributed noise needs secure aggregation; allowed: secagg=secaggplus, or noise=central"
            )
        if cfg.secagg.name != "none" and cfg.cohort.sampling == "poisson":
            # Under SecAgg+ the sampled cohort size n decides whether a round releases anything
            # (it aborts for n < 2 or when no secure (k, t) exists for n) and, with distributed
            # noise, how much noise it carries (shares sized by h = max(t, n - D) - C). Both are
            # visible in the released models and depend on whether a given user was sampled,
            # which the Poisson-subsampled accountant does not cover (a review bounded epsilon
            # below by 2.64 where 0.62 was reported). Fixed-size cohorts keep n public and constant.
            raise ConfigError(
                "cohort.sampling",
                "with secagg=secaggplus and DP-FedAvg the sampled cohort size decides whether a round aborts (and, with "
                "distributed noise, how much noise it carries), which reveals who was sampled beyond what Poisson "
                "amplification covers; allowed: cohort.sampling=fixed (with privacy.dpfedavg.accountant=rdp), or secagg=none",
            )
        if cfg.secagg.name != "none" and cfg.faults.round_deadline_s is not None:
            # The one simulated dropout that depends on a device's data (its example count): with it,
            # whether a secure round keeps t survivors, hence releases, would depend on private data.
            raise ConfigError(
                "faults.round_deadline_s",
                "drops devices by their example count, so with secagg=secaggplus and DP-FedAvg whether a round aborts "
                "would depend on private data, which no accountant covers; allowed: null, or secagg=none",
            )
        if cfg.secagg.name != "none" and dp is not None and dp.target_epsilon is not None:
            # Devices over their DP-SGD budget leave the sampled cohort (SampleLevelDP.admit), and when
            # a device runs out depends on its example count: the secure round's size, hence its
            # (k, t), whether it aborts and the distributed noise total, would depend on private data.
            raise ConfigError(
                "privacy.dpsgd.target_epsilon",
                "leaves devices over their sample-level budget out of the cohort, so with secagg=secaggplus and "
                "DP-FedAvg the secure round's size (whether it aborts, its noise) would depend on their data; allowed: "
                "null with privacy.dpsgd.noise_multiplier set, or secagg=none",
            )
    if cfg.output.private_metrics_only and cfg.privacy.dpsgd is None and cfg.privacy.dpfedavg is None:
        raise ConfigError(
            "output.private_metrics_only",
            "no differential-privacy mechanism is on, so no metric is covered; allowed: privacy=dpsgd and/or dpfedavg",
        )
    validate_output(cfg.output)
    check_fields(cfg.checkpoint, "checkpoint")
    check_fields(cfg.faults, "faults")
    validate_audit(cfg)
    sa = cfg.secagg
    check_fields(sa, "secagg")
    if sa.modulus_bits is not None and not sa.bits <= sa.modulus_bits <= 64:
        raise ConfigError("secagg.modulus_bits", f"must be in {sa.bits}..64 (secagg.bits..64), got {sa.modulus_bits}")
    if cfg.needs_key_registry and cfg.engine == "deployment":
        # The active model needs a key registry the SuperNodes reach without the server (fedsim.pki);
        # a deployment has none, and keys the server could relay or derive would void the check.
        raise ConfigError(
            "secagg.threat_model",
            "active needs a key registry the devices reach without the server, which engine=deployment does not "
            "have; allowed with engine=deployment: semi_honest (or engine=simulation for active)",
        )
    if sa.name != "none" and sa.simulation_shortcut and cfg.engine == "deployment":
        raise ConfigError(
            "secagg.simulation_shortcut",
            "true sends every device's update unmasked, which engine=deployment (real SuperNodes over a network) "
            "does not allow; allowed with engine=deployment: false (or engine=simulation for the shortcut)",
        )
    if sa.threshold is not None and sa.neighbours is None:
        raise ConfigError("secagg.threshold", "needs secagg.neighbours too (a threshold only means something for a given k)")
    if sa.name != "none" and cfg.cohort.size < 2:
        raise ConfigError("cohort.size", "secure aggregation needs cohorts of at least 2 devices")


def validate_output(out: OutputConfig) -> None:
    """Logger names come from fedsim.registry.LOGGERS. Whether their packages are installed is
    checked where the run starts (fedsim.run, the command line's precheck, RunLog), not here:
    workers and readers of a finished run's config.yaml do not need them. The output group's
    checks are all on single fields, declared next to them."""
    check_fields(out, "output")


BROKEN_ENV = "FEDSIM_ALLOW_BROKEN"  # audit.break_mechanism is refused unless this is 1
#: Set to "1" in the environment of the simulation engine's worker processes by fedsim's launcher
#: (fedsim.run: the worker template's environment, the environment Ray's raylet starts with, or
#: an attached cluster's job runtime_env), never by the server's messages: a worker accepts secagg.simulation_shortcut (it
#: then sends its devices' inputs as one unmasked sum) only where it is set (fedsim.secure_rounds).
SIMULATION_ENV = "FEDSIM_SIMULATION_ENGINE"


def validate_distributed_dpsgd(cfg: FedsimConfig) -> None:
    """privacy.dpsgd.noise=distributed: what its mechanism and accounting cover
    (fedsim.privacy.distributed_sgd): one clipped gradient sum per device and round, summed
    under SecAgg+, no other noise or release, and the Skellam RDP accountant."""
    a, dp = cfg.algorithm, cfg.privacy.dpsgd
    assert dp is not None
    checks = (
        ("secagg.name", cfg.secagg.name != "secaggplus", f"{cfg.secagg.name}: distributed DP-SGD noise is a share of "
         "the noise each device adds under secure aggregation; allowed: secaggplus (or privacy.dpsgd.noise=local)"),
        ("privacy.dpfedavg", cfg.privacy.dpfedavg is not None, "is set: distributed DP-SGD noise releases the round's "
         "sum itself; allowed: privacy.dpfedavg=null (privacy=dpsgd)"),
        ("privacy.dpsgd.accountant", dp.accountant != "rdp", f"{dp.accountant}: distributed noise is Skellam, accounted "
         "by its own RDP bound (Agarwal et al. 2021); allowed: rdp"),
        ("algorithm.local_epochs", a.local_epochs != 1, f"{a.local_epochs}: with distributed noise each device takes "
         "one DP-SGD step per round (its clipped gradient sum, DP-FedSGD); allowed: 1"),
        ("algorithm.name", a.name in ("fedprox", "scaffold"), f"{a.name}: changes the devices' local training, which "
         "distributed DP-SGD replaces by one gradient sum; allowed: a server optimizer (fedavg, fedavgm, fedadam, "
         "fedadagrad, fedyogi)"),
        ("algorithm.momentum", a.momentum != 0, f"{a.momentum}: devices take no local steps with distributed noise; "
         "allowed: 0 (momentum on the server: algorithm=fedavgm)"),
        ("algorithm.weight_decay", a.weight_decay != 0, f"{a.weight_decay}: devices send only their clipped "
         "gradients with distributed noise; allowed: 0"),
        ("audit.canary_examples", cfg.audit.canary_examples > 0, "the sample-level audit's canary devices train "
         "apart from the secure sum, which distributed noise does not cover; allowed: 0"),
    )
    for key, bad, why in checks:
        if bad:
            raise ConfigError(key, why)


def validate_audit(cfg: FedsimConfig) -> None:
    au = cfg.audit
    check_fields(au, "audit")
    if au.canaries and cfg.privacy.dpfedavg is None:
        raise ConfigError("audit.canaries", "audits user-level DP: it needs privacy=dpfedavg (or privacy.dpfedavg set)")
    if au.canary_examples and cfg.privacy.dpsgd is None:
        raise ConfigError("audit.canary_examples", "audits sample-level DP: it needs privacy=dpsgd (or privacy.dpsgd set)")
    if au.canary_examples and au.canary_examples < au.canary_devices:
        raise ConfigError("audit.canary_examples", f"must be 0 or at least audit.canary_devices ({au.canary_devices})")
    if au.break_mechanism != "none" and os.environ.get(BROKEN_ENV) != "1":
        raise ConfigError(
            "audit.break_mechanism",
            f"{au.break_mechanism!r} breaks the privacy mechanism on purpose and is for tests only; allowed: none "
            f"(set {BROKEN_ENV}=1 to run a broken mechanism)",
        )


def resolve_paths(cfg: FedsimConfig, base: Path | None = None) -> FedsimConfig:
    """Make data paths absolute (workers may run with another working directory)."""
    base = base or Path.cwd()
    ds = cfg.dataset
    if isinstance(ds, (FemnistConfig, FashionMnistConfig, ShakespeareConfig)) and ds.path is not None:  # None: the bundled copy
        ds.path = str((base / os.path.expanduser(ds.path)).resolve())
    elif isinstance(ds, HuggingFaceConfig) and ds.data_files:
        ds.data_files = {
            k: v if "://" in v else str((base / os.path.expanduser(v)).absolute()) for k, v in ds.data_files.items()
        }
    return cfg
