"""The interface the round loop sees of a privacy mechanism.

fedsim.server_app.run_rounds keeps the run's active mechanisms in a list, in this order:
sample-level DP-SGD on the devices (fedsim.privacy.sample_level.SampleLevelDP), then the
user-level release, DP-FedAvg or DP-FTRL (fedsim.privacy.dpfedavg.UserLevelDP). Per round the
loop calls, on each in that order:

    before_round(round_num)          raise FedsimError to stop before a round that would break a budget
    admit(cohort) -> cohort          leave out devices that may not train (over budget)
    ... the devices train, with what the mechanisms ask of them (DP-SGD's sigma and C from the
        config; the user-level clip norm and, under SecAgg+, the encoding from UserLevelDP) ...
    after_devices(round_num, reports, run_dir) -> metrics
                                     what came back is accounted (and saved) before the update
    ... the user-level mechanism, if any, turns the sum into the released mean (its `aggregate`
        or `no_release`); without one the mean is the plain weighted mean ...

and at the end `finish(run_dir)` and `summary()` (merged into summary.json's "privacy");
`checkpoint_key`, `state_dict` and `load_state_dict` carry each through checkpoints. Secure
aggregation (fedsim.secure_rounds) decides how the sum travels, not what is released, and the
audit (fedsim.audit.RunAudit) observes the run: neither is in the list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsim.reports import DeviceReport


class Mechanism:
    checkpoint_key = ""  # the checkpoint entry holding state_dict()

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

    def finish(self, run_dir: Path) -> None:
        """The run is over (or stopped): write what the mechanism keeps on disk."""
        del run_dir

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> Any:
        raise NotImplementedError

    def load_state_dict(self, state: Any) -> None:
        raise NotImplementedError
