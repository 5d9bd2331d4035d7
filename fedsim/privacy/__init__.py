"""Sample-level differential privacy of DP-SGD on each device: events, accountants, ledger, calibration.

Only numpy, opacus.accountants and dp_accounting are used here (no torch models, no Flower),
so the server can account privacy without the training stack.
"""

from fedsim.privacy.accountants import (
    ACCOUNTANTS,
    Accountant,
    PLDAccountant,
    PRVAccountant,
    RDPAccountant,
    create_accountant,
)
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
