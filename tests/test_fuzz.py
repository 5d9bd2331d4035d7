"""Property-based tests (hypothesis): whatever a user puts in a config value or a LEAF data
file, fedsim accepts it or refuses it with one line (ConfigError / DataError: exit status 2),
never a traceback.

The properties call the validation and loading functions, and the command line's own check
(`fedsim.__main__.precheck`), in this process; two command-line runs check the exit status
and that a refused run leaves no directory that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import math
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.__main__ import precheck
from fedsim.config import (
    DPFedAvgPrivacyConfig,
    DPSGDPrivacyConfig,
    FedsimConfig,
    FemnistConfig,
    SyntheticConfig,
    from_dict,
)
from fedsim.data import load_dataset
from fedsim.data.leaf import FEMNIST_CLASSES, PIXELS
from fedsim.errors import FedsimError
from helpers import set_keys

REPO = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema (the synthetic dataset, both privacy levels)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if f.name == "dataset":
            keys += leaf_keys(SyntheticConfig, "dataset.")
        elif f.name == "privacy":
            keys += leaf_keys(DPSGDPrivacyConfig, "privacy.dpsgd.") + leaf_keys(DPFedAvgPrivacyConfig, "privacy.dpfedavg.")
        elif dataclasses.is_dataclass(tp) or inner:
            keys += leaf_keys(tp if dataclasses.is_dataclass(tp) else inner[0], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


KEYS = leaf_keys(FedsimConfig)
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),  # unicode, empty, control characters
    st.lists(st.one_of(st.integers(-5, 100), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def one_line(err: BaseException) -> str:
    message = str(err)
    assert message and "\n" not in message, repr(message)
    return message


def floats_in(value: object) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in floats_in(v)]
    if isinstance(value, list):
        return [f for v in value for f in floats_in(v)]
    return []


@FUZZ
@given(key=st.sampled_from(KEYS), value=ANY_VALUE, second=st.sampled_from(KEYS), value2=ANY_VALUE)
def test_any_config_values_are_accepted_or_refused_in_one_line_naming_a_key(
    key: str, value: object, second: str, value2: object
) -> None:
    raw = set_keys({}, {key: value, second: value2}) if not second.startswith(key + ".") else set_keys({}, {key: value})
    try:
        cfg = from_dict(raw)
    except FedsimError as err:
        assert one_line(err).startswith("config key '"), str(err)
        return
    # Accepted: then every number in it is usable (no NaN learning rate, no infinite timeout).
    assert all(math.isfinite(f) for f in floats_in(cfg.to_dict())), cfg.to_dict()


def cli_check(overrides: list[str]) -> tuple[int, str]:
    """The command line's check of `overrides` (what `fedsim` runs before any job): exit code, stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            precheck(overrides)
        except SystemExit as done:
            return int(done.code or 0), err.getvalue()
    return 0, err.getvalue()


CLI_KEYS = ["rounds", "seed", "cohort.size", "algorithm.lr", "simulation.round_timeout_s",
            "simulation.max_missed_rounds", "faults.device_failure_rate", "model.hidden_sizes"]  # fmt: skip
CLI_VALUES = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-1", "0", "99999999999999999999999", "''", "null", "[1,x]",
                     "${oops}", "${oc.env:NOPE}", "{a: 1}", "ünïcödé", "3.5", "true", "[]"]),  # fmt: skip
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(CLI_KEYS), value=CLI_VALUES)
def test_any_command_line_value_is_accepted_or_refused_with_one_line_and_status_2(key: str, value: str) -> None:
    code, err = cli_check([f"{key}={value}", "simulation.num_workers=1"])
    if code == 0:
        assert err == ""
        return
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: ") and "Traceback" not in err, err


# ----------------------------------------------------------------------------- LEAF files


def good_leaf(rng: np.random.Generator, users: list[str], per_user: int = 3) -> dict:
    return {
        "users": users,
        "num_samples": [per_user] * len(users),
        "user_data": {
            u: {"x": rng.random((per_user, PIXELS)).round(3).tolist(), "y": rng.integers(0, FEMNIST_CLASSES, per_user).tolist()}
            for u in users
        },
    }


BAD_SCALARS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1, 10**20, 1.5, "7", None, True, [], {}]),
    st.text(max_size=4),
)


@st.composite
def leaf_files(draw: st.DrawFn) -> tuple[bytes, str]:
    """A LEAF file, perhaps broken: (file bytes, file name)."""
    users = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3, unique=True))
    content: typing.Any = good_leaf(np.random.default_rng(draw(st.integers(0, 99))), users)
    user = users[0]
    fault = draw(st.sampled_from(["none", "pixel", "label", "row", "counts", "users", "user_data", "drop_key",
                                  "labels_shape", "whole", "truncate", "bytes"]))  # fmt: skip
    if fault == "pixel":
        content["user_data"][user]["x"][0][draw(st.integers(0, PIXELS - 1))] = draw(BAD_SCALARS)
    elif fault == "label":
        content["user_data"][user]["y"][0] = draw(BAD_SCALARS)
    elif fault == "row":
        content["user_data"][user]["x"][0] = draw(st.one_of(BAD_SCALARS, st.lists(st.floats(0, 1), max_size=5)))
    elif fault == "counts":
        content["num_samples"] = [draw(st.one_of(st.integers(-(10**30), 10**30), BAD_SCALARS))] * len(users)
    elif fault == "users":
        content["users"] = draw(st.one_of(BAD_SCALARS, st.lists(BAD_SCALARS, max_size=2)))
    elif fault == "user_data":
        content["user_data"][user] = draw(BAD_SCALARS)
    elif fault == "drop_key":
        del content[draw(st.sampled_from(["users", "user_data"]))]
    elif fault == "labels_shape":
        content["user_data"][user]["y"] = [content["user_data"][user]["y"]]
    elif fault == "whole":
        content = draw(BAD_SCALARS)
    data = json.dumps(content, ensure_ascii=draw(st.booleans())).encode()
    if fault == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif fault == "bytes":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at + 1 :]
    if draw(st.booleans()):
        data = gzip.compress(data)
        if draw(st.booleans()):  # a truncated download
            data = data[: draw(st.integers(0, len(data) - 1))]
        return data, "part.json.gz"
    return data, "part.json"


@FUZZ
@given(train=leaf_files(), test=leaf_files(), population=st.integers(1, 4))
def test_any_leaf_file_loads_or_is_refused_in_one_line(train: tuple[bytes, str], test: tuple[bytes, str], population: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for split, (data, name) in (("train", train), ("test", test)):
            (root / split).mkdir()
            (root / split / name).write_bytes(data)
        try:
            dataset = load_dataset(FemnistConfig(path=str(root)), population=population, seed=0)
        except FedsimError as err:
            assert one_line(err).startswith(("femnist: ", "config key 'population'")), str(err)
            return
        # Loaded: then every example is usable.
        for device in range(dataset.num_devices):
            x, y = dataset.device_data(device)
            assert bool(x.isfinite().all()) and (y.numel() == 0 or (0 <= int(y.min()) and int(y.max()) < FEMNIST_CLASSES))


def test_a_nan_pixel_file_stops_the_cli_with_one_line_and_no_finished_run_directory(tmp_path: Path) -> None:
    content = good_leaf(np.random.default_rng(0), ["w1", "w2"])
    content["user_data"]["w2"]["x"][1][5] = math.nan
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
        (tmp_path / "data" / split / "f.json").write_text(json.dumps(content))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedsim", "dataset=femnist", f"dataset.path={tmp_path / 'data'}", "population=2",
           "cohort.size=2", "rounds=1", f"output.dir={out}", f"hydra.run.dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()
    assert len(last) == 1 and "user 'w2' has NaN or infinite pixel values" in last[0], proc.stderr
    assert not (out / "summary.json").exists() and not (out / "metrics.jsonl").exists() and not (out / ".fedsim.lock").exists()


@pytest.mark.parametrize("override", ["algorithm.lr=nan", "rounds=${oops}"])
def test_the_cli_refuses_nan_and_broken_interpolations_with_status_2(override: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedsim", override], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("fedsim: error: ") and override.split("=")[0] in line, line
