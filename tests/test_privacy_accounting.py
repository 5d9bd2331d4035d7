"""fedsim.privacy: accountants against the libraries called directly, ledger, calibration.

Every reference value is computed here with Opacus / dp_accounting directly (their own
accountant classes and histories), not through fedsim's code path.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from dataclasses import dataclass

import dp_accounting
import pytest
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant as DpaPLDAccountant
from opacus.accountants import PRVAccountant as OpacusPRV
from opacus.accountants import RDPAccountant as OpacusRDP
from opacus.accountants.utils import get_noise_multiplier

from fedsim.privacy import (
    DPSGDEvent,
    PrivacyLedger,
    calibrate_noise_multiplier,
    create_accountant,
    make_history,
)
from fedsim.privacy.accountants import DEFAULT_VALUE_DISCRETIZATION_INTERVAL

DELTA = 1e-5

# Opacus warns when the best RDP order is at the edge of its grid; irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")


def history(*entries: tuple[float, float, int, int]):
    """fedsim history from (z, q, steps, count) rows."""
    return make_history((DPSGDEvent(z, q, s), c) for z, q, s, c in entries)


def opacus_history(entries):
    """Opacus accountant history in fedsim's canonical (sorted) order: [(z, q, steps * count)]."""
    return [(z, q, s * c) for z, q, s, c in sorted(entries)]


def opacus_rdp(entries, delta=DELTA) -> float:
    acc = OpacusRDP()
    acc.history = opacus_history(entries)
    return acc.get_epsilon(delta)


def opacus_prv(entries, delta=DELTA, *, eps_error: float) -> float:
    acc = OpacusPRV()
    acc.history = opacus_history(entries)
    return acc.get_epsilon(delta, eps_error=eps_error, delta_error=delta / 1000)


def dpa_pld(entries, delta=DELTA, interval=DEFAULT_VALUE_DISCRETIZATION_INTERVAL) -> float:
    acc = DpaPLDAccountant(value_discretization_interval=interval)
    for z, q, s, c in entries:
        g = dp_accounting.GaussianDpEvent(z)
        acc.compose(g if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, g), s * c)
    return acc.get_epsilon(delta)


RDP_CASES = [
    [(1.0, 0.1, 100, 1)],
    [(1.1, 0.01, 50, 20)],
    [(0.7, 1.0, 10, 3)],
    [(3.0, 0.02, 200, 7)],
    [(1.0, 0.1, 100, 3), (2.0, 0.05, 40, 2)],  # two events
]


# -- RDP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("entries", RDP_CASES)
def test_rdp_equals_opacus(entries):
    eps = create_accountant("rdp").epsilon(history(*entries), DELTA)
    ref = opacus_rdp(entries)
    assert eps == pytest.approx(ref, rel=1e-6)
    assert eps == ref  # same arithmetic, so bit-for-bit


def test_rdp_equals_opacus_stepped_accountant():
    """Opacus's own step() bookkeeping (one call per DP-SGD step) gives the same epsilon."""
    acc = OpacusRDP()
    for _ in range(3 * 20):
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    for _ in range(2 * 15):
        acc.step(noise_multiplier=2.0, sample_rate=0.05)
    eps = create_accountant("rdp").epsilon(history((2.0, 0.05, 15, 2), (1.0, 0.1, 20, 3)), DELTA)
    assert eps == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)


# -- PRV ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("entries", [[(1.0, 0.1, 100, 1)], [(1.0, 0.1, 50, 2), (2.0, 0.05, 40, 3)]])
def test_prv_equals_opacus_fixed_error(entries):
    eps = create_accountant("prv", eps_error=0.01).epsilon(history(*entries), DELTA)
    assert eps == pytest.approx(opacus_prv(entries, eps_error=0.01), rel=1e-6)


@pytest.mark.parametrize("entries", [[(1.0, 0.1, 100, 1)], [(3.0, 0.01, 10, 1)]])
def test_prv_equals_opacus_relative_error(entries):
    """Default PRV: eps_error = min(0.01, max(0.005 * first-pass epsilon, 1e-4))."""
    first = opacus_prv(entries, eps_error=0.01)
    eps_error = min(0.01, max(0.005 * first, 1e-4))
    ref = first if eps_error == 0.01 else opacus_prv(entries, eps_error=eps_error)
    eps = create_accountant("prv").epsilon(history(*entries), DELTA)
    assert eps == pytest.approx(ref, rel=1e-6)


# -- PLD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries", [[(1.0, 0.1, 100, 1)], [(2.0, 1.0, 10, 4)], [(1.0, 0.1, 50, 2), (2.0, 0.05, 40, 3)]]
)
def test_pld_equals_dp_accounting(entries):
    eps = create_accountant("pld").epsilon(history(*entries), DELTA)
    assert eps == pytest.approx(dpa_pld(entries), rel=1e-6)


PLD_VS_PRV = [
    [(1.0, 0.1, 100, 1)],  # eps ~7.05
    [(0.5, 0.01, 1000, 1)],  # eps ~13.4
    [(2.0, 1.0, 10, 1)],  # no sampling, eps ~7.5
    [(2.0, 0.1, 1000, 1)],  # eps ~8.3
    [(3.0, 0.01, 100, 1)],  # small eps ~0.113: needs PRV's relative eps_error
    [(1.0, 0.1, 50, 2), (2.0, 0.05, 40, 3)],  # two events
]


@pytest.mark.parametrize("entries", PLD_VS_PRV)
def test_pld_agrees_with_prv_within_2_percent(entries):
    h = history(*entries)
    pld = create_accountant("pld").epsilon(h, DELTA)
    prv = create_accountant("prv").epsilon(h, DELTA)
    assert pld == pytest.approx(prv, rel=0.02)
    # Both numerical accountants are tighter than the RDP bound.
    assert max(pld, prv) < create_accountant("rdp").epsilon(h, DELTA)


# -- common behaviour --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_degenerate_histories(name):
    acc = create_accountant(name)
    assert acc.name == name
    assert acc.epsilon((), DELTA) == 0.0
    assert acc.epsilon(history((0.0, 0.1, 10, 1)), DELTA) == math.inf  # no noise, no privacy
    assert acc.epsilon(history((0.0, 0.1, 10, 1), (1.0, 0.1, 10, 1)), DELTA) == math.inf
    assert acc.epsilon(history((1.0, 0.0, 10, 1), (1.0, 0.5, 0, 3)), DELTA) == 0.0  # nothing released
    assert acc.num_computations == 0


def test_create_accountant_rejects_unknown_name():
    with pytest.raises(ValueError, match="allowed: rdp, prv, pld"):
        create_accountant("gdp")
    with pytest.raises(ValueError, match="delta"):
        create_accountant("rdp").epsilon((), 0.0)


def test_non_canonical_history_is_canonicalised():
    acc = create_accountant("rdp")
    e1, e2 = DPSGDEvent(1.0, 0.1, 10), DPSGDEvent(2.0, 0.1, 10)
    canonical = acc.epsilon(((e1, 3), (e2, 1)), DELTA)
    assert acc.epsilon([(e2, 1), (e1, 2), (e1, 1)], DELTA) == canonical
    assert acc.num_computations == 1


def test_cache_one_computation_per_distinct_history(monkeypatch):
    acc = create_accountant("rdp")
    calls = []
    real = acc._compute
    monkeypatch.setattr(acc, "_compute", lambda h, d: calls.append(h) or real(h, d))
    ledger = PrivacyLedger(acc, delta=DELTA, target_epsilon=None)
    events = [DPSGDEvent(1.0, 0.1, 20), DPSGDEvent(1.0, 0.05, 40), DPSGDEvent(1.5, 0.1, 20)]
    for d in range(1000):
        for _ in range(1 + d % 3):  # devices 0, 3, 6... once; 1, 4, ... twice; 2, 5, ... 3 times
            ledger.record(d, events[d % 3])
    assert ledger.distinct_histories() == 3
    eps = [ledger.epsilon(d) for d in range(1000)]
    stats = ledger.epsilon_stats()
    # Fresh (equal, not identical) history tuples hit the cache too.
    for d in range(3):
        assert acc.epsilon(((DPSGDEvent(*vars(events[d]).values()), 1 + d % 3),), DELTA) == eps[d]
    assert len(calls) == 3 and acc.num_computations == 3
    assert stats["max"] == max(eps) and stats["median"] == statistics.median(eps)


# -- ledger ------------------------------------------------------------------------------------


def test_ledger_record_history_epsilon():
    ledger = PrivacyLedger(create_accountant("rdp"), delta=DELTA, target_epsilon=None)
    e1, e2 = DPSGDEvent(1.0, 0.1, 20), DPSGDEvent(2.0, 0.05, 10)
    ledger.record(7, e1)
    ledger.record(7, e2)
    ledger.record(7, e1)
    ledger.record(3, e2)
    assert ledger.history(7) == ((e1, 2), (e2, 1))
    assert ledger.history(3) == ((e2, 1),)
    assert ledger.history(99) == () and ledger.epsilon(99) == 0.0
    assert ledger.num_devices() == 2
    assert ledger.epsilon(7) == pytest.approx(opacus_rdp([(1.0, 0.1, 20, 2), (2.0, 0.05, 10, 1)]), rel=1e-6)
    assert ledger.epsilon(3) == pytest.approx(opacus_rdp([(2.0, 0.05, 10, 1)]), rel=1e-6)


def test_ledger_accepts_an_equivalent_event_class():
    """clients.dp.DPSGDEvent is a separate (unordered) dataclass with the same fields."""

    @dataclass(frozen=True)
    class ClientEvent:
        noise_multiplier: float
        sample_rate: float
        steps: int

    ledger = PrivacyLedger(create_accountant("rdp"), delta=DELTA, target_epsilon=None)
    ledger.record(1, ClientEvent(1, 0.1, 20))
    ledger.record(1, DPSGDEvent(1.0, 0.1, 20))
    assert ledger.history(1) == ((DPSGDEvent(1.0, 0.1, 20), 2),)


def test_epsilon_stats_on_hand_built_population():
    ledger = PrivacyLedger(create_accountant("rdp"), delta=DELTA, target_epsilon=None)
    plan = {  # device -> participations with (1.0, 0.1, 50)
        0: 1, 1: 1, 2: 2, 3: 4, 4: 4, 5: 4, 6: 9,
    }
    for d, k in plan.items():
        for _ in range(k):
            ledger.record(d, DPSGDEvent(1.0, 0.1, 50))
    ref = {d: opacus_rdp([(1.0, 0.1, 50, k)]) for d, k in plan.items()}
    everyone = ledger.epsilon_stats()
    assert everyone["max"] == pytest.approx(ref[6], rel=1e-9)
    assert everyone["median"] == pytest.approx(ref[3], rel=1e-9)  # 7 devices: the 4th smallest
    # Subset with an even count and an untrained device (epsilon 0); duplicates count once.
    subset = ledger.epsilon_stats([0, 2, 6, 100, 2])
    assert subset["max"] == pytest.approx(ref[6], rel=1e-9)
    assert subset["median"] == pytest.approx((ref[0] + ref[2]) / 2, rel=1e-9)
    assert ledger.epsilon_stats([]) == {"max": 0.0, "median": 0.0}


def test_can_participate_flips_at_the_budget():
    e = DPSGDEvent(1.0, 0.1, 100)
    eps = {k: opacus_rdp([(1.0, 0.1, 100, k)]) for k in (3, 4)}
    target = (eps[3] + eps[4]) / 2  # three participations fit, a fourth does not
    ledger = PrivacyLedger(create_accountant("rdp"), delta=DELTA, target_epsilon=target)
    for k in range(3):
        assert ledger.can_participate(5, e), k
        ledger.record(5, e)
        assert ledger.exhausted_count() == (1 if k == 2 else 0)
    assert not ledger.can_participate(5, e)
    assert ledger.epsilon(5) <= target
    # A much cheaper event still fits: the check is per (history, event).
    small = DPSGDEvent(1.0, 0.1, 1)
    assert opacus_rdp(sorted([(1.0, 0.1, 100, 3), (1.0, 0.1, 1, 1)])) <= target
    assert ledger.can_participate(5, small)
    assert ledger.can_participate(6, e)  # an untrained device
    # No target: everyone can always participate, nobody is exhausted.
    free = PrivacyLedger(create_accountant("rdp"), delta=DELTA, target_epsilon=None)
    for _ in range(50):
        free.record(1, e)
    assert free.can_participate(1, e) and free.exhausted_count() == 0


def test_ledger_json_roundtrip():
    acc = create_accountant("rdp")
    e1, e2 = DPSGDEvent(1.0, 0.1, 100), DPSGDEvent(0.8, 0.2, 30)
    target = opacus_rdp([(1.0, 0.1, 100, 2)]) * 1.01
    ledger = PrivacyLedger(acc, delta=DELTA, target_epsilon=target)
    for d in range(6):
        for _ in range(1 + d % 2):
            ledger.record(d, e1)
    ledger.record(9, e1)
    ledger.record(9, e2)  # two events: its last event is stored explicitly
    data = json.loads(json.dumps(ledger.to_json()))
    assert set(data) == {"accountant", "delta", "target_epsilon", "devices", "last_events"}
    assert data["devices"]["1"] == [[1.0, 0.1, 100, 2]]
    again = PrivacyLedger.from_json(data, create_accountant("rdp"))
    assert again.num_devices() == ledger.num_devices() == 7
    for d in [*range(6), 9, 42]:
        assert again.history(d) == ledger.history(d)
        assert again.epsilon(d) == ledger.epsilon(d)
    # Devices 1, 3, 5 (two e1 participations) cannot take a third; device 9 depends on e2.
    nine_exhausted = opacus_rdp(sorted([(1.0, 0.1, 100, 1), (0.8, 0.2, 30, 2)])) > target
    assert again.exhausted_count() == ledger.exhausted_count() == 3 + nine_exhausted
    assert again.last_event(9) == e2
    assert again.epsilon_stats() == ledger.epsilon_stats()


GOOD = {"accountant": "rdp", "delta": 1e-5, "target_epsilon": 8.0, "devices": {"1": [[1.0, 0.1, 100, 2]]}}


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], "JSON object"),
        ({k: v for k, v in GOOD.items() if k != "devices"}, "missing devices"),
        ({**GOOD, "extra": 1}, "unknown keys extra"),
        ({**GOOD, "accountant": "prv"}, "accountant is 'prv'"),
        ({**GOOD, "delta": 2}, "delta"),
        ({**GOOD, "target_epsilon": -1}, "target_epsilon"),
        ({**GOOD, "devices": [[1.0, 0.1, 100, 2]]}, "devices must be an object"),
        ({**GOOD, "devices": {"x": [[1.0, 0.1, 100, 2]]}}, "device id"),
        ({**GOOD, "devices": {"1": []}}, r"devices\['1'\] must be a non-empty list"),
        ({**GOOD, "devices": {"1": [[1.0, 0.1, 100]]}}, r"devices\['1'\]\[0\]"),
        ({**GOOD, "devices": {"1": [[1.0, 1.5, 100, 2]]}}, "sample_rate"),
        ({**GOOD, "devices": {"1": [["a", 0.1, 100, 2]]}}, "noise_multiplier"),
        ({**GOOD, "devices": {"1": [[1.0, 0.1, -3, 2]]}}, "steps"),
        ({**GOOD, "devices": {"1": [[1.0, 0.1, 100, 0]]}}, "count"),
        ({**GOOD, "devices": {"1": [[1.0, 0.1, 100, 1], [1.0, 0.1, 100, 1]]}}, "same event twice"),
        ({**GOOD, "last_events": {"2": [1.0, 0.1, 100]}}, "no history"),
        ({**GOOD, "last_events": {"1": [2.0, 0.1, 100]}}, "not in the device's history"),
    ],
)
def test_from_json_rejects_garbage(data, message):
    with pytest.raises(ValueError, match=message):
        PrivacyLedger.from_json(data, create_accountant("rdp"))


# -- calibration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, q, steps, participations",
    [(3.0, 0.1, 50, 4), (8.0, 0.02, 100, 10), (1.0, 0.05, 20, 5)],
)
def test_calibration_rdp_matches_opacus(target, q, steps, participations):
    z = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps_per_participation=steps,
        participations=participations, accountant=create_accountant("rdp"), tolerance=0.01,
    )
    eps = opacus_rdp([(z, q, steps, participations)])
    assert target * 0.99 <= eps <= target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_noise_multiplier(
            target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps * participations, accountant="rdp"
        )
    assert z == pytest.approx(ref, rel=0.02)


@pytest.mark.parametrize("name", ["pld", "prv"])
def test_calibration_numerical_accountants(name):
    acc = create_accountant(name)
    z = calibrate_noise_multiplier(
        target_epsilon=2.0, delta=DELTA, sample_rate=0.1, steps_per_participation=20,
        participations=3, accountant=acc, tolerance=0.02,
    )
    eps = acc.epsilon(history((z, 0.1, 20, 3)), DELTA)
    assert 2.0 * 0.98 <= eps <= 2.0
    ref = dpa_pld([(z, 0.1, 20, 3)]) if name == "pld" else None
    if ref is not None:
        assert eps == pytest.approx(ref, rel=1e-6)


def test_calibration_unreachable_target():
    with pytest.raises(
        ValueError, match=r"target_epsilon=0.001 cannot be reached: even noise_multiplier=1000 gives epsilon=0\.2"
    ):
        calibrate_noise_multiplier(
            target_epsilon=0.001, delta=DELTA, sample_rate=1.0, steps_per_participation=50,
            participations=100, accountant=create_accountant("rdp"),
        )
    with pytest.raises(ValueError, match="participations"):
        calibrate_noise_multiplier(
            target_epsilon=1.0, delta=DELTA, sample_rate=0.1, steps_per_participation=50,
            participations=0, accountant=create_accountant("rdp"),
        )
