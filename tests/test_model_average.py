"""algorithm.model_ema: the server evaluates and saves an average of the global models over
rounds, computed independently here from the checkpoints' models; the rounds themselves (and so
the privacy accounting) are those of the run without it, and a resumed run continues the average."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clients import evaluate
from fake_grid import run_local
from fedsim.api import compose
from fedsim.data import load_dataset
from fedsim.errors import ConfigError, FedsimError
from fedsim.models import model_for
from clients.params import load_flat_params

ARGS = [
    "population=40", "cohort.size=8", "cohort.sampling=fixed", "dataset.size_max=60", "model=mlp",
    "privacy=dpsgd", "privacy.dpsgd.noise_multiplier=1.5", "algorithm.lr=0.3", "rounds=6", "eval_every=1",
    "output.progress=false", "simulation.num_workers=2", "checkpoint.every=1", "checkpoint.keep=10",
]  # fmt: skip
DECAY = 0.7


def _checkpoint_params(run_dir: Path) -> list[torch.Tensor]:
    paths = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    return [torch.load(p, weights_only=False)["params"] for p in paths]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_average_is_evaluated_and_saved_and_the_rounds_are_unchanged(tmp_path: Path) -> None:
    plain = run_local(compose(ARGS), tmp_path / "plain")
    averaged = run_local(compose([*ARGS, f"algorithm.model_ema={DECAY}"]), tmp_path / "avg")
    raw, raw_avg = _checkpoint_params(tmp_path / "plain"), _checkpoint_params(tmp_path / "avg")
    assert len(raw) == 6 and all(torch.equal(a, b) for a, b in zip(raw, raw_avg, strict=True))  # same rounds
    assert plain["privacy"] == averaged["privacy"]  # the same accounting
    # The average, computed here from the initial model and the rounds' models.
    cfg = compose(ARGS)
    dataset = load_dataset(cfg.dataset, population=cfg.population, seed=cfg.seed)
    model = model_for(cfg, dataset)
    avg = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    for params in raw:
        avg = DECAY * avg + (1 - DECAY) * params.double()
    saved = torch.load(tmp_path / "avg" / "model.pt", weights_only=False)
    torch.testing.assert_close(saved["flat_params"], avg.float(), rtol=0, atol=1e-7)
    assert not torch.allclose(saved["flat_params"], raw[-1], atol=1e-3)  # not the last round's model
    load_flat_params(model, saved["flat_params"])
    assert averaged["final_test_accuracy"] == pytest.approx(evaluate(model, dataset.test_data())["accuracy"])
    assert _rows(tmp_path / "avg")[-1]["test_accuracy"] == averaged["final_test_accuracy"]
    assert averaged["model_average"]["decay"] == DECAY and averaged["model_average"]["rounds_averaged"] == 6
    assert "model_average" not in plain


def test_a_resumed_run_continues_the_average(tmp_path: Path) -> None:
    args = [*ARGS, f"algorithm.model_ema={DECAY}"]
    whole = run_local(compose(args), tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    for path in (cut / "checkpoints").glob("round_*.pt"):
        if int(path.stem.split("_")[1]) > 3:
            path.unlink()
    (cut / "summary.json").unlink()
    resumed = run_local(compose([*args, f"resume={cut}"]), cut)
    assert resumed["resumed_from_round"] == 3
    assert resumed["model_sha256"] == whole["model_sha256"]  # the saved average, bit for bit
    # A checkpoint of a run without the average cannot continue one with it.
    plain = tmp_path / "plain"
    run_local(compose([*ARGS, "rounds=2"]), plain)
    state = torch.load(plain / "checkpoints" / "round_000002.pt", weights_only=False)
    state["config"]["algorithm"]["model_ema"] = DECAY
    torch.save(state, plain / "checkpoints" / "round_000002.pt")
    (plain / "summary.json").unlink()
    with pytest.raises(FedsimError, match="no model average with algorithm.model_ema=0.7"):
        run_local(compose([*ARGS, "rounds=2", f"algorithm.model_ema={DECAY}", f"resume={plain}"]), plain)


def test_a_decay_outside_zero_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        compose([*ARGS, "algorithm.model_ema=1.0"])
    assert err.value.key == "algorithm.model_ema" and "must be in [0, 1), got 1.0" in str(err.value)


def test_the_user_level_audit_scores_the_saved_average_as_the_final_model(tmp_path: Path, capsys) -> None:
    """The audit's final-model test scores the model the run releases (model.pt: the average), so
    fedsim-audit's recheck against model.pt agrees with the run."""
    from fedsim import audit
    from fedsim.config import from_dict

    cfg = from_dict({
        "seed": 5, "population": 60, "rounds": 4, "cohort": {"size": 12},
        "dataset": {"name": "synthetic", "size_max": 40}, "model": {"name": "mlp", "hidden_sizes": [16]},
        "privacy": {"dpfedavg": {"noise_multiplier": 1.0}}, "audit": {"canaries": 30, "bootstrap": 20},
        "algorithm": {"model_ema": DECAY}, "output": {"progress": False},
    })  # fmt: skip
    run_local(cfg, tmp_path / "r")
    capsys.readouterr()
    assert audit.main([str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out)["final_model_rechecked"] is True
