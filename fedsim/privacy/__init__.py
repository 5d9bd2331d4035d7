"""Sample-level differential privacy of DP-SGD on each device: events, accountants, ledger, calibration.

Only numpy, opacus.accountants and dp_accounting are used here (no torch models, no Flower),
so the server can account privacy without the training stack.

The names below are loaded on first use (PEP 562): the accountants import Opacus and
dp_accounting (about 1.5 s), which a run without differential privacy, and a worker, never
needs; `import fedsim.privacy.published` (or any light submodule) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsim.privacy.accountants import ACCOUNTANTS, Accountant, PLDAccountant, PRVAccountant, RDPAccountant, create_accountant
    from fedsim.privacy.calibration import MAX_NOISE_MULTIPLIER, calibrate_noise_multiplier
    from fedsim.privacy.events import (
        EMPTY_HISTORY,
        DPSGDEvent,
        History,
        add_participation,
        as_event,
        make_event,
        make_history,
        total_steps,
    )
    from fedsim.privacy.ledger import PrivacyLedger

_EXPORTS = {
    "fedsim.privacy.accountants": ("ACCOUNTANTS", "Accountant", "PLDAccountant", "PRVAccountant", "RDPAccountant", "create_accountant"),
    "fedsim.privacy.calibration": ("MAX_NOISE_MULTIPLIER", "calibrate_noise_multiplier"),
    "fedsim.privacy.events": ("EMPTY_HISTORY", "DPSGDEvent", "History", "add_participation", "as_event", "make_event",
                              "make_history", "total_steps"),  # fmt: skip
    "fedsim.privacy.ledger": ("PrivacyLedger",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'fedsim.privacy' has no attribute {name!r}")


__all__ = [
    "ACCOUNTANTS",
    "EMPTY_HISTORY",
    "MAX_NOISE_MULTIPLIER",
    "Accountant",
    "DPSGDEvent",
    "History",
    "PLDAccountant",
    "PRVAccountant",
    "PrivacyLedger",
    "RDPAccountant",
    "add_participation",
    "as_event",
    "calibrate_noise_multiplier",
    "create_accountant",
    "make_event",
    "make_history",
    "total_steps",
]
assert set(__all__) == set(_MODULE_OF)
