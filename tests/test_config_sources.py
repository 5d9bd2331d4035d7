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
from collections.abc import Iterator
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fedsim import config as C
from fedsim.__main__ import CONF_DIR

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "experiment")
OPTIONS = [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]

# What an option sets differently from the dataclass defaults, on purpose (dotted keys).
DIFFERS_ON_PURPOSE: dict[str, set[str]] = {
    "algorithm=fedadam": {"algorithm.name", "algorithm.server_lr"},
    "algorithm=fedyogi": {"algorithm.name", "algorithm.server_lr"},
    "algorithm=fedadagrad": {"algorithm.name", "algorithm.server_lr"},
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
    "model=transformer": {"model.name", "model.hidden"},
    "privacy=dpfedavg_target": {"privacy.dpfedavg.noise_multiplier", "privacy.dpfedavg.target_epsilon"},
    "privacy=dpfedavg_production": {"privacy.dpfedavg.noise_multiplier", "privacy.dpfedavg.target_epsilon",
                                    "privacy.dpfedavg.noise_cohort_size"},
    "privacy=dpsgd_target": {"privacy.dpsgd.noise_multiplier", "privacy.dpsgd.target_epsilon"},
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


@pytest.mark.parametrize("group", ["algorithm", "cohort"])
def test_checks_declared_on_fields_run_in_validate(group: str) -> None:
    """A field's own check (metadata=checked(...), next to the field) refuses a bad value with
    the field's key when the whole config is validated."""
    from fedsim.errors import ConfigError

    cls = type(getattr(C.FedsimConfig(), group))
    checked_fields = [f for f in dataclasses.fields(cls) if f.metadata.get("checks")]
    assert checked_fields
    for f in checked_fields:
        key = f"{group}.{f.name}"
        bad = next(v for v in (-1, 1.5, "no-such-name") if _refused(f, v, key))
        cfg = C.FedsimConfig()
        setattr(getattr(cfg, group), f.name, bad)
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            C.validate(cfg)


def _refused(f: dataclasses.Field, value: object, key: str) -> bool:
    """Does the field's own check refuse `value` (a value of the field's type)?"""
    from fedsim.errors import ConfigError

    if isinstance(value, str) != (f.type in ("str", str)):
        return False
    try:
        for check in f.metadata["checks"]:
            check(value, key)
    except ConfigError:
        return True
    return False
