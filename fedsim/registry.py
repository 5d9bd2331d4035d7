"""Registries: the names a config may use, and the code each name stands for.

A registry maps a name (what a config says: `algorithm.name=scaffold`) to an implementation
given as "module:attribute", imported only when a run builds it. So the config layer can
list and check the allowed names without importing torch-heavy implementations (and without
an import cycle), and adding an implementation is one new file plus one `add` line here.

From Python, a plug-in of your own is one call before the run starts:

    from fedsim.registry import STRATEGIES
    STRATEGIES.add("mystrategy", "mypackage.strategies:MyStrategy", "what it does, in one line")

(the worker processes must import the same registration: put it in a module they import, or
name the implementation directly as `algorithm.name=mypackage.strategies:MyStrategy`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from fedsim.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "package.module:attribute"
    doc: str  # one line: what it is, with the paper it follows


class Registry:
    """Names of one kind of plug-in (strategies, loggers, ...) and where their code is."""

    def __init__(self, kind: str, key: str, *, targets: bool = True) -> None:
        self.kind = kind  # "strategy", "logger", ...
        self.key = key  # the config key that names one: "algorithm.name", ...
        self.targets = targets  # a "module:attribute" path is a valid name too
        self._entries: dict[str, Entry] = {}
        self._objects: dict[str, Any] = {}  # registered as objects (registry[name] = obj)

    def add(self, name: str, target: str, doc: str) -> None:
        """Register `name` for the implementation at `target` ("module:attribute")."""
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target must be 'module:attribute', got {target!r}")
        if name in self._entries and self._entries[name].target != target:
            raise ValueError(f"{self.kind} {name!r} is already registered for {self._entries[name].target}")
        self._entries[name] = Entry(name, target, doc)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries) + tuple(n for n in self._objects if n not in self._entries)

    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries.values())

    def check(self, name: str) -> None:
        """ConfigError naming the key and the allowed names unless `name` is registered (or
        is itself a "module:attribute" path, a plug-in named directly)."""
        if name not in self and not (self.targets and _is_target(name)):
            own = " (or package.module:Class for your own)" if self.targets else ""
            raise ConfigError(self.key, f"unknown value {name!r}; allowed: {', '.join(self.names())}{own}")

    # A mapping of names to implementations, too: `name in registry`, `registry[name]` (imported
    # now), iteration over the names; `registry[name] = obj` registers an object directly (a
    # plug-in defined in a notebook, a test's stand-in) and `del registry[name]` removes it.
    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._objects

    def __iter__(self) -> Any:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, name: str) -> Any:
        if name in self._objects:
            return self._objects[name]
        if name not in self._entries:
            raise KeyError(name)
        return self.load(name)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def __setitem__(self, name: str, obj: Any) -> None:
        self._objects[name] = obj

    def __delitem__(self, name: str) -> None:
        if name in self._objects:
            del self._objects[name]
        else:
            del self._entries[name]

    def load(self, name: str) -> Any:
        """The implementation registered as `name` (imported now)."""
        self.check(name)
        if name in self._objects:
            return self._objects[name]
        target = self._entries[name].target if name in self._entries else name
        module_name, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(self.key, f"{name!r}: cannot import {target}: {err}") from None


def _is_target(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr.isidentifier())


# Strategies: a round's server side (fedsim.strategies.base.Strategy). Reddi et al. 2021
# ("Adaptive Federated Optimization", Alg. 2) for the server optimizers.
STRATEGIES = Registry("strategy", "algorithm.name")
STRATEGIES.add("fedavg", "fedsim.strategies.fedavg:FedAvg", "FedAvg (McMahan et al. 2017): x <- x + eta * mean update")
STRATEGIES.add("fedprox", "fedsim.strategies.fedavg:FedProx",
               "FedProx (Li et al. 2020): FedAvg's server step, devices add mu/2 ||w - x||^2 (algorithm.proximal_mu)")  # fmt: skip
STRATEGIES.add("fedavgm", "fedsim.strategies.momentum:FedAvgM",
               "FedAvgM (Hsu et al. 2019): server momentum v <- beta1 v + Delta, x <- x + eta v")  # fmt: skip
STRATEGIES.add("fedadam", "fedsim.strategies.adaptive:FedAdam", "FedAdam (Reddi et al. 2021, Alg. 2)")
STRATEGIES.add("fedyogi", "fedsim.strategies.adaptive:FedYogi", "FedYogi (Reddi et al. 2021, Alg. 2)")
STRATEGIES.add("fedadagrad", "fedsim.strategies.adaptive:FedAdagrad", "FedAdagrad (Reddi et al. 2021, Alg. 2)")
STRATEGIES.add("scaffold", "fedsim.strategies.scaffold:Scaffold",
               "SCAFFOLD (Karimireddy et al. 2020, Alg. 1, option II): control variates correct client drift")  # fmt: skip

# Experiment trackers (fedsim.trackers.Tracker), for output.loggers.
LOGGERS = Registry("logger", "output.loggers")
LOGGERS.add("tensorboard", "fedsim.trackers:TensorBoardTracker", "TensorBoard event files in <run dir>/tensorboard/")
LOGGERS.add("mlflow", "fedsim.trackers:MLflowTracker", "MLflow runs in a local file store (<run dir>/mlruns) or output.mlflow_uri")

# Models (fedsim.models.build_model): (model config, input shape, classes) -> nn.Module. "auto"
# is resolved before (cnn for images, else mlp); your own module: model.name=custom model.target=...
MODELS = Registry("model", "model.name", targets=False)
MODELS.add("auto", "fedsim.models:mlp", "cnn for images (C, H, W), mlp otherwise (resolved by build_model)")
MODELS.add("logreg", "fedsim.models:logreg", "multinomial logistic regression")
MODELS.add("mlp", "fedsim.models:mlp", "ReLU MLP (model.hidden_sizes)")
MODELS.add("cnn", "fedsim.models:cnn", "LEAF/McMahan CNN with GroupNorm (DP-SGD compatible)")
MODELS.add("scatternet", "fedsim.models:scatternet", "fixed scattering features + linear or CNN head (Tramer & Boneh 2021)")
MODELS.add("lstm", "fedsim.models:lstm", "LEAF's Shakespeare LSTM (Opacus DPLSTM under DP-SGD)")
MODELS.add("transformer", "fedsim.models:transformer", "small causal character transformer")
MODELS.add("custom", "fedsim.models:custom", "any nn.Module from model.target='pkg.module:factory'")

# Datasets (fedsim.data.load_dataset): (dataset config, population, seed) -> FederatedDataset.
# Each name's config dataclass (the schema of dataset.*) is fedsim.config.DATASETS[name].
DATASETS = Registry("dataset", "dataset.name", targets=False)
DATASETS.add("synthetic", "fedsim.data.loaders:synthetic", "LEAF or FedProx synthetic data, any population")
DATASETS.add("femnist", "fedsim.data.loaders:femnist", "LEAF FEMNIST, one device per writer")
DATASETS.add("fashion_mnist", "fedsim.data.loaders:fashion_mnist", "Fashion-MNIST, iid/Dirichlet/shards partitions")
DATASETS.add("huggingface", "fedsim.data.loaders:huggingface", "any Hugging Face dataset through flwr-datasets")
DATASETS.add("shakespeare", "fedsim.data.loaders:shakespeare", "Tiny Shakespeare, one device per speaking role")
DATASETS.add("custom", "fedsim.data.loaders:custom", "your own FederatedDataset from dataset.target")

# Privacy mechanisms (fedsim.mechanisms.Mechanism), in the order a run composes them: what the
# devices do first, the user-level release next, how the sum travels last. Each class decides
# from the config whether it is active (`enabled(cfg)`); the config groups privacy= and secagg=
# switch them.
MECHANISMS = Registry("privacy mechanism", "privacy", targets=False)
MECHANISMS.add("dpsgd", "fedsim.privacy.sample_level:SampleLevelDP",
               "sample-level DP-SGD on each device (Abadi et al. 2016) with a per-device ledger and budget")  # fmt: skip
MECHANISMS.add("dpfedavg", "fedsim.privacy.dpfedavg:UserLevelDP",
               "user-level DP-FedAvg (McMahan et al. 2018), distributed noise (Kairouz et al. 2021a), "
               "or DP-FTRL tree noise (Kairouz et al. 2021b)")  # fmt: skip
MECHANISMS.add("secaggplus", "fedsim.secure_rounds:SecureAggregation",
               "SecAgg+ (Bell et al. 2020): the server sees only the cohort's sum")  # fmt: skip
# The config key that switches each built-in mechanism on (null or "none": off). `mechanisms.build`
# imports a mechanism only when its key is set (the accountants take seconds to import);
# the class's own `enabled(cfg)` decides. A mechanism without an entry here is always imported.
MECHANISM_SWITCHES = {"dpsgd": "privacy.dpsgd", "dpfedavg": "privacy.dpfedavg", "secaggplus": "secagg.name"}
