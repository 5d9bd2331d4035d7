"""The interface the round loop sees of a privacy mechanism, and how a run's list is built.

A mechanism is registered in `fedsim.registry.MECHANISMS` (name -> "module:Class"); the
registry's order is the documented composition order, and `build` makes the run's list of the
active ones (each class decides from the config: `enabled(cfg)`):

    1. dpsgd       sample-level DP-SGD on the devices (fedsim.privacy.sample_level.SampleLevelDP):
                   what a device does before its update leaves it (clip per example, add noise),
                   its ledger and per-device budgets
    2. dpfedavg    the user-level release, DP-FedAvg or DP-FTRL (fedsim.privacy.dpfedavg.UserLevelDP):
                   each device clips its update; the server (or, distributed, the devices) adds
                   the noise that turns the sum into the released mean, and accounts it
    3. secaggplus  SecAgg+ (fedsim.secure_rounds.SecureAggregation): how the sum travels (the
                   server only sees the sum of the cohort's masked updates), not what is released

Per round the loop (fedsim.server_app.run_rounds) calls, on each in that order:

    before_round(round_num)          raise FedsimError to stop before a round that would break a budget
    admit(cohort) -> cohort          leave out devices that may not train (over budget)
    ... the devices train, with what the mechanisms ask of them (DP-SGD's sigma and C from the
        config; from the releasing mechanism, `clip_norm` and, under SecAgg+, `secure_encoding()`) ...
    after_devices(round_num, reports, run_dir) -> metrics
                                     what came back is accounted (and saved) before the update

then the round's release: the one mechanism with `releases = True`, if any, turns the sum into
the released mean (`release`; a round that ran but could not release anything: `no_release`;
its `round_metrics()` join the round's metrics); without one the release is the plain weighted
mean. At the end `finish(run_dir)` and `summary()`, merged into summary.json[summary_key]
("privacy", or "secagg"); `checkpoint_key`, `state_dict` and `load_state_dict` carry each
through checkpoints, and `resumed(run_dir, round, lost)` lets a mechanism keep counting what the
rounds after the checkpoint spent (secure randomness: they run again with fresh noise). The
audit (fedsim.audit.RunAudit) observes the run and is not in the list.

To add a mechanism: a subclass in a new module, one `MECHANISMS.add` line in fedsim/registry.py
at its place in the order, and the config key its `enabled` reads (docs/architecture.md); a
`MECHANISM_SWITCHES` entry naming that key lets runs without it skip the import.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.errors import ConfigError
from fedsim.registry import MECHANISM_SWITCHES, MECHANISMS
from fedsim.runstate import config_value
from fedsim.reports import DeviceReport

if TYPE_CHECKING:
    import torch

    from fedsim.config import FedsimConfig
    from fedsim.data import FederatedDataset


class Mechanism:
    checkpoint_key = ""  # the checkpoint entry holding state_dict() ("": the mechanism keeps no state)
    summary_key = "privacy"  # the summary.json entry summary() is merged into
    releases = False  # True: turns the round's sum into the released update (at most one active)
    clip_norm: float | None = None  # a releasing mechanism: each device clips its update to this L2 norm

    @classmethod
    def enabled(cls, cfg: FedsimConfig) -> bool:
        """Whether the run's config switches this mechanism on."""
        raise NotImplementedError

    @classmethod
    def create(cls, cfg: FedsimConfig, dataset: FederatedDataset, model: torch.nn.Module) -> tuple[Mechanism, torch.nn.Module]:
        """Build for the run (before any start-up: a bad setting fails in a second); `cfg` is
        the run's working copy, into which calibration may write (fedsim.runstate). Returns the
        mechanism and the model the run trains (DP-SGD may replace layers Opacus cannot train)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def before_round(self, round_num: int) -> None:
        """Stop (FedsimError) before a round the mechanism's budget does not allow."""
        del round_num

    def admit(self, cohort: list[int]) -> list[int]:
        return cohort

    def after_devices(self, round_num: int, reports: list[DeviceReport], run_dir: Path) -> dict[str, Any]:
        """The round's device replies are in (and will be released): account them; round metrics."""
        del round_num, reports, run_dir
        return {}

    # A releasing mechanism (releases = True) implements these three and `clip_norm`.
    def secure_encoding(self) -> Any:
        """Under SecAgg+: how a device encodes its clipped update as integers (None: the default)."""
        return None

    def release(
        self,
        total: torch.Tensor,
        reports: list[DeviceReport],
        round_num: int,
        *,
        count_sum: float | None = None,
        count_devices: int = 0,
        noise_only: bool = False,
    ) -> torch.Tensor:
        """The released mean update from the float64 sum of the devices' clipped updates."""
        raise NotImplementedError

    def no_release(self, round_num: int, reason: str) -> None:
        """The round ran and nothing could be released (say why in the round's metrics)."""
        raise NotImplementedError

    def round_metrics(self) -> dict[str, Any]:
        return {}

    def finish(self, run_dir: Path) -> None:
        """The run is over (or stopped): write what the mechanism keeps on disk."""
        del run_dir

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> Any:
        return None

    def resumed(self, run_dir: Path, round_num: int, lost: list[dict]) -> None:
        """After `load_state_dict` on a resume from the checkpoint of `round_num`: what happened
        after it (the run directory; `lost`, the metrics rows of the rounds about to run again)
        may still count."""
        del run_dir, round_num, lost

    def load_state_dict(self, state: Any) -> None:
        del state


def build(cfg: FedsimConfig, dataset: FederatedDataset, model: torch.nn.Module) -> tuple[list[Mechanism], torch.nn.Module]:
    """The run's active mechanisms in the registry's order, and the model they leave to train."""
    active: list[Mechanism] = []
    for name in MECHANISMS:
        if name in MECHANISM_SWITCHES and config_value(cfg, MECHANISM_SWITCHES[name]) in (None, "none"):
            continue  # switched off: not even imported
        cls = MECHANISMS[name]
        if cls.enabled(cfg):
            mechanism, model = cls.create(cfg, dataset, model)
            active.append(mechanism)
    releasing = [m for m in active if m.releases]
    if len(releasing) > 1:
        raise ConfigError("privacy", "at most one mechanism may release the round's update; these would: "
                          + ", ".join(type(m).__name__ for m in releasing))  # fmt: skip
    return active, model


def releaser(mechanisms: list[Mechanism]) -> Mechanism | None:
    """The mechanism that releases the round's update (user-level DP), or None (the plain mean)."""
    return next((m for m in mechanisms if m.releases), None)


def find(mechanisms: list[Mechanism], cls: type) -> Any:
    """The active mechanism of class `cls`, or None."""
    return next((m for m in mechanisms if isinstance(m, cls)), None)
