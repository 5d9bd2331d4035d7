"""The YAML configs and the dataclasses of fedsim/config.py say the same defaults (issue 16 item 2).

conf/config.yaml with its default group options must compose to exactly the dataclass defaults
(`FedsimConfig()`), key for key: a run from the command line and one from
`fedsim.simulate(config={...})` or `from_dict` then start from the same values. Every other
option of a group (conf/<group>/<option>.yaml) must list the same keys and may differ only in
the values that make it that option (DIFFERS_ON_PURPOSE below); anything else is a
disagreement. (Experiments, conf/experiment/, are deliberate overrides and are not compared.)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fedsim import config as C
from fedsim.__main__ import CONF_DIR
from helpers import set_keys

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "experiment")
OPTIONS = [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]

# What an option sets differently from the dataclass defaults, on purpose (dotted keys).
DIFFERS_ON_PURPOSE: dict[str, set[str]] = {
    "algorithm=fedadam": {"algorithm.name", "algorithm.server_lr"},
    "algorithm=fedyogi": {"algorithm.name", "algorithm.server_lr"},
    "algorithm=fedadagrad": {"algorithm.name", "algorithm.server_lr"},
    "algorithm=fedavgm": {"algorithm.name", "algorithm.server_lr"},
    "algorithm=scaffold": {"algorithm.name"},
    "algorithm=fedprox": {"algorithm.name", "algorithm.proximal_mu"},
    "audit=sample": {"audit.canary_examples"},
    "audit=user": {"audit.canaries"},
    "dataset=femnist": {"population", "cohort.size"},  # @package _global_: the data decide them
    "dataset=shakespeare": {"population", "cohort.size"},
    "model=cnn": {"model.name"},
    "model=custom": {"model.name"},
    "model=logreg": {"model.name"},
    "model=lstm": {"model.name"},
    "model=mlp": {"model.name"},
    "model=scatternet": {"model.name"},
    "model=transformer": {"model.name", "model.hidden"},
    "privacy=dpfedavg_target": {"privacy.dpfedavg.noise_multiplier", "privacy.dpfedavg.target_epsilon"},
    "privacy=dpfedavg_production": {"privacy.dpfedavg.noise_multiplier", "privacy.dpfedavg.target_epsilon",
                                    "privacy.dpfedavg.noise_cohort_size"},
    "privacy=dpsgd_target": {"privacy.dpsgd.noise_multiplier", "privacy.dpsgd.target_epsilon"},
    "privacy=dpsgd_distributed": {"privacy.dpsgd.noise_multiplier", "privacy.dpsgd.target_epsilon", "privacy.dpsgd.noise"},
    "privacy=dpftrl": {"privacy.dpfedavg.noise"},
    "privacy=dpftrl_target": {"privacy.dpfedavg.noise", "privacy.dpfedavg.noise_multiplier", "privacy.dpfedavg.target_epsilon"},
    "secagg=secaggplus": {"secagg.name"},
    "simulation=classic": {"simulation.layout"},
}
MISSING = "<not in this source>"


@pytest.fixture(scope="module")
def hydra() -> Iterator[None]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def composed(overrides: list[str]) -> dict[str, Any]:
    raw: Any = OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
    raw.pop("experiment", None)
    return raw


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flat(value, f"{prefix}{key}.")
        elif value is not None or not prefix.startswith("privacy."):
            out[f"{prefix}{key}"] = value  # privacy.dpsgd: null and an absent mechanism are the same
    return out


def dataclass_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """FedsimConfig() with the dataset class and the privacy mechanisms the composed `raw` chose."""
    cfg = C.FedsimConfig()
    cfg.dataset = C.DATASETS[raw["dataset"]["name"]]()
    privacy = raw.get("privacy") or {}
    cfg.privacy.dpsgd = C.DPSGDPrivacyConfig() if "dpsgd" in privacy else None
    cfg.privacy.dpfedavg = C.DPFedAvgPrivacyConfig() if "dpfedavg" in privacy else None
    return flat(dataclasses.asdict(cfg))


def disagreements(overrides: list[str]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (YAML value, dataclass default)} wherever the two differ."""
    yaml, code = flat(composed(overrides)), dataclass_defaults(composed(overrides))
    return {
        key: (yaml.get(key, MISSING), code.get(key, MISSING))
        for key in sorted(set(yaml) | set(code))
        if yaml.get(key, MISSING) != code.get(key, MISSING)
    }


def test_default_config_is_the_dataclass_defaults(hydra: None) -> None:
    assert disagreements([]) == {}, "conf/config.yaml (YAML value, dataclass default)"


@pytest.mark.parametrize("option", OPTIONS)
def test_group_option_differs_from_the_defaults_only_where_it_means_to(hydra: None, option: str) -> None:
    found = disagreements([option])
    unexpected = {k: v for k, v in found.items() if k not in DIFFERS_ON_PURPOSE.get(option, set())}
    assert unexpected == {}, f"{option}: (YAML value, dataclass default)"
    # A listed difference that is gone is stale: the table must say what the options do.
    assert set(found) == DIFFERS_ON_PURPOSE.get(option, set()), f"{option}: no longer differs on {DIFFERS_ON_PURPOSE[option] - set(found)}"


def test_every_option_is_compared() -> None:
    assert {"dataset=huggingface", "model=auto", "privacy=dpsgd", "simulation=default"} <= set(OPTIONS)
    assert set(DIFFERS_ON_PURPOSE) <= set(OPTIONS)


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_privacy_none_makes_every_experiment_non_private(hydra: None, experiment: str) -> None:
    # The README's non-private rows (`fedsim experiment=X privacy=none`): an experiment that set
    # privacy keys in its own body would keep a mechanism after privacy=none, silently private.
    raw = composed([f"experiment={experiment}", "privacy=none"])
    privacy = C.from_dict(raw).privacy
    assert privacy.dpsgd is None and privacy.dpfedavg is None, raw["privacy"]


def test_every_registered_strategy_has_its_config_option() -> None:
    """`fedsim algorithm=<name>` works for each name the registry allows, and no option names
    a strategy the registry does not know."""
    from fedsim.registry import STRATEGIES

    options = {p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml")}
    assert options == set(STRATEGIES.names())


def test_registries_and_config_groups_name_the_same_models_and_datasets() -> None:
    """The names a config may use come from fedsim.registry; conf/ has an option for each and
    fedsim.config a dataclass for each dataset."""
    from fedsim.registry import DATASETS, MODELS

    assert {p.stem for p in (CONF_DIR / "model").glob("*.yaml")} == set(MODELS.names())
    assert {p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")} == set(DATASETS.names()) == set(C.DATASETS)


# Every config dataclass that declares checks on its fields: the top level, each group, each
# dataset's group and the optional privacy groups (found in fedsim.config, so a new one is covered).
CHECKED_GROUPS = [
    cls
    for cls in vars(C).values()
    if isinstance(cls, type) and dataclasses.is_dataclass(cls) and any(f.metadata.get("checks") for f in dataclasses.fields(cls))
]
# Values tried on each checked field (those of the field's type): every one its own checks refuse
# must be refused by validate with the same key and message.
CANDIDATES: tuple[Any, ...] = (-1, 0, 1, 1.5, 2**64, "no-such-name", " ", [-1], [1], ["no-such-name"])


def _config_with(cls: type) -> tuple[C.FedsimConfig, Any, str]:
    """A valid config in which the group `cls` is active: (the config, the group, its key prefix)."""
    cfg = C.FedsimConfig()
    if cls is C.FedsimConfig:
        return cfg, cfg, ""
    if cls in C.DATASETS.values():
        cfg.dataset = cls(target="package.module:factory") if cls is C.CustomDatasetConfig else cls()
        return cfg, cfg.dataset, "dataset"
    if cls is C.DPSGDPrivacyConfig:
        cfg.privacy.dpsgd = cls()
        return cfg, cfg.privacy.dpsgd, "privacy.dpsgd"
    if cls is C.DPFedAvgPrivacyConfig:
        cfg.privacy.dpfedavg = cls()
        return cfg, cfg.privacy.dpfedavg, "privacy.dpfedavg"
    (name,) = [f.name for f in dataclasses.fields(C.FedsimConfig) if type(getattr(cfg, f.name)) is cls]
    return cfg, getattr(cfg, name), name


def test_every_config_group_with_a_check_is_walked() -> None:
    names = {cls.__name__ for cls in CHECKED_GROUPS}
    assert names >= {
        "FedsimConfig", "CohortConfig", "AlgorithmConfig", "ModelConfig", "SimulationConfig", "PrivacyConfig",
        "DPSGDPrivacyConfig", "DPFedAvgPrivacyConfig", "SecAggConfig", "OutputConfig", "FaultsConfig", "AuditConfig",
        "CheckpointConfig", *(cls.__name__ for cls in C.DATASETS.values()),
    }  # fmt: skip


@pytest.mark.parametrize("cls", CHECKED_GROUPS, ids=lambda cls: cls.__name__)
def test_checks_declared_on_fields_run_in_validate(cls: type) -> None:
    """A field's own check (metadata=checked(...), next to the field) refuses a bad value with
    the field's key and message when the whole config is validated, with the group active."""
    from fedsim.errors import ConfigError

    cfg, _, prefix = _config_with(cls)
    C.validate(cfg)  # valid as built
    hints = typing.get_type_hints(cls)
    checked_fields = [f for f in dataclasses.fields(cls) if f.metadata.get("checks")]
    assert checked_fields
    for f in checked_fields:
        key = f"{prefix}.{f.name}" if prefix else f.name
        refused = [(v, err) for v in CANDIDATES if _fits(hints[f.name], v) and (err := _refusal(f, v, key))]
        assert refused, f"no candidate value is refused by the checks of {key}"
        for bad, own in refused:
            assert own.key == key or own.key.startswith(f"{key}["), own  # a list's element: key[i]
            cfg, group, _ = _config_with(cls)
            setattr(group, f.name, bad)
            with pytest.raises(ConfigError) as err:
                C.validate(cfg)
            assert str(err.value) == str(own), (key, bad)


def _fits(tp: Any, value: object) -> bool:
    """Is `value` of type `tp` (as from_dict would build it)?"""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_fits(item, v) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return tp in (str, bool) and isinstance(value, tp)


def _refusal(f: dataclasses.Field, value: object, key: str) -> Exception | None:
    """The ConfigError the field's own checks raise for `value`, or None if they accept it."""
    from fedsim.errors import ConfigError

    try:
        for check in f.metadata["checks"]:
            check(value, key)
    except ConfigError as err:
        return err
    return None


@pytest.mark.parametrize(
    ("over", "key", "message"),
    [
        # model.norm_groups divides the cnn channel counts: 0 raised ZeroDivisionError before its own check ran
        ({"model.norm_groups": 0}, "model.norm_groups", "must be > 0, got 0"),
        ({"model.norm_groups": -8}, "model.norm_groups", "must be > 0, got -8"),
        ({"model.name": "transformer", "model.heads": 0}, "model.heads", "must be > 0, got 0"),
        ({"secagg.bits": 1, "secagg.modulus_bits": 8}, "secagg.bits", "must be in 2..32, got 1"),
        ({"dataset.size_min": 0, "dataset.size_max": 0}, "dataset.size_min", "must be > 0, got 0"),
    ],
)
def test_a_fields_own_check_runs_before_the_cross_key_checks_that_read_it(over: dict, key: str, message: str) -> None:
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        C.from_dict(set_keys({}, over))
    assert (err.value.key, str(err.value)) == (key, f"config key '{key}': {message}")
