"""fedsim from Python: `fedsim.simulate(...)` runs one experiment in this process and returns
its results, for notebooks and scripts.

    import fedsim
    result = fedsim.simulate(["experiment=femnist_fedavg", "rounds=5"])
    result.metrics[-1]["test_accuracy"], result.summary["model_sha256"]
    result.dataframe()            # per-round metrics as a pandas DataFrame (pandas installed)
    result.model                  # the final model (torch.nn.Module)

The run is the same as `fedsim OVERRIDES` on the command line (the same configs, checks,
Flower simulation and run directory), without Hydra's job machinery: bad input raises
`fedsim.errors.FedsimError` (ConfigError, DataError) instead of exiting.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.config import FedsimConfig, from_dict
from fedsim.errors import ConfigError

if TYPE_CHECKING:
    import pandas
    import torch


@dataclass
class SimulationResult:
    """What one run produced, read back from its run directory."""

    run_dir: Path  # the run directory: config.yaml, metrics.jsonl, model.pt, summary.json, ...
    config: FedsimConfig  # the validated config that ran
    metrics: list[dict[str, Any]]  # metrics.jsonl: one record per round
    summary: dict[str, Any]  # summary.json: final accuracy, timings, privacy guarantees
    model: torch.nn.Module | None = field(repr=False)  # the final model (None with output.save_model=false)

    def dataframe(self) -> pandas.DataFrame:
        """The per-round metrics as a pandas DataFrame, one row per round."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("SimulationResult.dataframe needs pandas (pip install pandas); .metrics has the same records") from None
        return pd.DataFrame.from_records(self.metrics)


def compose(overrides: Sequence[str] = ()) -> FedsimConfig:
    """The validated config `fedsim OVERRIDES` would run (fedsim's Hydra configs, no sweeps)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedsim.__main__ import CONF_DIR, config_from_hydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return config_from_hydra(hydra_compose(config_name="config", overrides=list(overrides)))
    finally:
        GlobalHydra.instance().clear()


def simulate(
    overrides: Sequence[str] | None = None,
    *,
    config: FedsimConfig | dict[str, Any] | None = None,
    output_dir: str | Path | None = None,
) -> SimulationResult:
    """Run one fedsim experiment in this process and return its results.

    Args:
        overrides: Hydra overrides, as on the command line (["rounds=5", "privacy=dpsgd"]).
        config: instead of overrides, a `FedsimConfig` or a plain dict of the same shape
            (checked like the command line's; keys left out keep their defaults).
        output_dir: the run directory; default `config.output.dir`, else a new temporary
            directory (its path is `result.run_dir`).

    Returns:
        A `SimulationResult` with the per-round metrics, the summary and the final model.

    Raises:
        ConfigError / DataError (fedsim.errors) for bad input, as the command line reports them.
    """
    if overrides is not None and config is not None:
        raise ValueError("simulate: give overrides or config, not both")
    if isinstance(config, FedsimConfig):
        cfg = from_dict(config.to_dict())  # a copy, checked: the caller's object is left as it was
    elif config is not None:
        cfg = from_dict(dict(config))
    else:
        cfg = compose(overrides or ())
    if cfg.resume:
        raise ConfigError(
            "resume", "simulate starts new runs; resume on the command line (fedsim resume=DIR), then load_result(DIR)"
        )
    if output_dir is not None:
        cfg.output.dir = str(output_dir)
    elif cfg.output.dir is None:
        cfg.output.dir = tempfile.mkdtemp(prefix="fedsim-run-")

    from fedsim.run import run

    run(cfg, cfg.output.dir)
    return load_result(Path(cfg.output.dir).absolute())


def load_result(run_dir: str | Path) -> SimulationResult:
    """A finished run's results from its directory (what `simulate` returns)."""
    import torch
    import yaml

    from fedsim.data import load_dataset
    from fedsim.models import checked_model, model_for

    run_dir = Path(run_dir)
    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    model = None
    if (run_dir / "model.pt").is_file():
        saved = torch.load(run_dir / "model.pt", weights_only=False)
        dataset = load_dataset(cfg.dataset, population=cfg.population, seed=cfg.seed)
        model = model_for(cfg, dataset)
        if cfg.privacy.dpsgd is not None:
            model = checked_model(model, fix=cfg.privacy.dpsgd.fix_model)  # the architecture that trained
        model.load_state_dict(saved["state_dict"])
    return SimulationResult(run_dir=run_dir, config=cfg, metrics=metrics, summary=summary, model=model)
