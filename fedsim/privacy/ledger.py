"""The privacy ledger: every device's history of DP-SGD events, and budget checks on it.

The server records one event per participation (before the round's update is applied) and
asks the ledger for epsilons. Invariants, all maintained incrementally by `record`:

* `_histories[d]` is device d's canonical history (events.History); only devices that ever
  trained have an entry. A device that never trained has the empty history, epsilon 0.
* `_population[h]` is the number of devices whose history is h (no zero entries), so
  population statistics cost one accountant call per DISTINCT history, never per device:
  with a fixed event per device size, distinct histories number about (distinct sizes) x
  (distinct participation counts), while devices number thousands.
* `_exhausted` is the set of trained devices that cannot participate again with their last
  event without exceeding target_epsilon (always empty without a target).
* Every epsilon is `accountant.epsilon(history, delta)`, which the accountant caches by
  (history, delta); budget checks are further cached by (history, next event).

The budget is a per-device (epsilon, delta) guarantee for that device's examples
(sample-level DP; Abadi et al. 2016): a device whose next participation would take its
epsilon above target_epsilon must be left out of the cohort (`can_participate`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from fedsim.privacy.accountants import Accountant
from fedsim.privacy.events import (
    EMPTY_HISTORY,
    DPSGDEvent,
    History,
    add_participation,
    as_event,
    make_event,
    make_history,
)

_JSON_KEYS = {"accountant", "delta", "target_epsilon", "devices", "last_events", "pld_discretization", "skellam_sensitivity"}


def _check_device_id(device_id: Any) -> int:
    if isinstance(device_id, bool) or not isinstance(device_id, int):
        raise ValueError(f"device id must be an int, got {device_id!r}")
    return device_id


def _check_target(target_epsilon: Any) -> float | None:
    if target_epsilon is None:
        return None
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be a positive number or None, got {target_epsilon!r}")
    return float(target_epsilon)


def _weighted_median(values: list[tuple[float, int]]) -> float:
    """Median of the multiset {value: multiplicity} (mean of the two middle ones when even)."""
    values = sorted(values)
    n = sum(m for _, m in values)
    lo_rank, hi_rank = (n - 1) // 2, n // 2  # 0-based ranks of the middle element(s)
    lo = hi = None
    seen = 0
    for value, m in values:
        if lo is None and lo_rank < seen + m:
            lo = value
        if hi_rank < seen + m:
            hi = value
            break
        seen += m
    assert lo is not None and hi is not None
    return lo if lo == hi else (lo + hi) / 2


class PrivacyLedger:
    """Per-device history of privacy events, keyed by device id, for devices that ever trained."""

    def __init__(self, accountant: Accountant, *, delta: float, target_epsilon: float | None) -> None:
        if not isinstance(accountant, Accountant):
            raise ValueError(f"accountant must be a fedsim Accountant, got {accountant!r}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.accountant = accountant
        self.delta = float(delta)
        self.target_epsilon = _check_target(target_epsilon)
        self._histories: dict[int, History] = {}
        self._last_event: dict[int, DPSGDEvent] = {}
        self._population: Counter[History] = Counter()
        self._exhausted: set[int] = set()
        self._fits: dict[tuple[History, DPSGDEvent], bool] = {}

    # -- recording ---------------------------------------------------------------------------

    def record(self, device_id: int, event: DPSGDEvent) -> None:
        """One participation of `device_id` that spent `event`."""
        device_id = _check_device_id(device_id)
        event = as_event(event)
        old = self._histories.get(device_id, EMPTY_HISTORY)
        new = add_participation(old, event)
        self._set(device_id, new, event)

    def _set(self, device_id: int, history: History, last_event: DPSGDEvent) -> None:
        old = self._histories.get(device_id)
        if old is not None:
            self._population[old] -= 1
            if not self._population[old]:
                del self._population[old]
        self._histories[device_id] = history
        self._last_event[device_id] = last_event
        self._population[history] += 1
        if self.target_epsilon is not None:
            if self._fits_next(history, last_event):
                self._exhausted.discard(device_id)
            else:
                self._exhausted.add(device_id)

    # -- queries -----------------------------------------------------------------------------

    def history(self, device_id: int) -> History:
        """The device's canonical history; () if it never trained."""
        return self._histories.get(device_id, EMPTY_HISTORY)

    def last_event(self, device_id: int) -> DPSGDEvent | None:
        return self._last_event.get(device_id)

    def epsilon(self, device_id: int) -> float:
        """epsilon of the device at the ledger's delta; 0.0 if it never trained."""
        return self.accountant.epsilon(self.history(device_id), self.delta)

    def num_devices(self) -> int:
        """Devices that trained at least once."""
        return len(self._histories)

    def participations(self) -> dict[int, int]:
        """{device: participations recorded} for every device that trained."""
        return {d: sum(count for _, count in h) for d, h in self._histories.items()}

    def distinct_histories(self) -> int:
        return len(self._population)

    def epsilon_stats(self, device_ids: Iterable[int] | None = None) -> dict[str, float]:
        """{"max", "median"} of epsilon over `device_ids` (each counted once), or over every trained device.

        One accountant call per distinct history among them. Devices in `device_ids` that
        never trained count with epsilon 0. With no devices at all both are 0.0 (nobody has
        spent anything).
        """
        if device_ids is None:
            population: Mapping[History, int] = self._population
        else:
            population = Counter(self._histories.get(d, EMPTY_HISTORY) for d in set(device_ids))
        if not population:
            return {"max": 0.0, "median": 0.0}
        eps = [(self.accountant.epsilon(h, self.delta), n) for h, n in population.items()]
        return {"max": max(e for e, _ in eps), "median": _weighted_median(eps)}

    def can_participate(self, device_id: int, event: DPSGDEvent) -> bool:
        """Would the device's epsilon after one more participation spending `event` stay <= target?"""
        if self.target_epsilon is None:
            return True
        return self._fits_next(self.history(device_id), as_event(event))

    def _fits_next(self, history: History, event: DPSGDEvent) -> bool:
        key = (history, event)
        fits = self._fits.get(key)
        if fits is None:
            assert self.target_epsilon is not None
            eps = self.accountant.epsilon(add_participation(history, event), self.delta)
            fits = self._fits[key] = eps <= self.target_epsilon
        return fits

    def exhausted_count(self) -> int:
        """Trained devices that cannot participate again with their last event (0 without a target)."""
        return len(self._exhausted)

    # -- persistence -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """JSON-able state: {"accountant", "delta", "target_epsilon", "devices": {id: [[z, q, steps, count], ...]}}.

        Device ids are strings (JSON object keys). "last_events" ({id: [z, q, steps]}) is
        written only for devices with more than one distinct event, the only ones whose last
        event (which `exhausted_count` uses) the history does not determine.
        """
        devices = {
            str(d): [[e.noise_multiplier, e.sample_rate, e.steps, c] for e, c in h]
            for d, h in sorted(self._histories.items())
        }
        last = {
            str(d): [e.noise_multiplier, e.sample_rate, e.steps]
            for d, e in sorted(self._last_event.items())
            if len(self._histories[d]) > 1
        }
        data: dict[str, Any] = {
            "accountant": self.accountant.name,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "devices": devices,
            # PLD: the discretisation the run chose (fedsim.privacy.accountants.choose_pld_interval)
            **({"pld_discretization": self.accountant.value_discretization_interval} if self.accountant.name == "pld" else {}),
            # Skellam (distributed DP-SGD): one example's L2 and L1 sensitivity in grid steps, which
            # the accountant needs to recompute any epsilon (fedsim.privacy.skellam.SkellamSGDAccountant)
            **({"skellam_sensitivity": [self.accountant.l2, self.accountant.l1]} if self.accountant.name == "skellam" else {}),  # type: ignore[attr-defined]
        }
        if last:
            data["last_events"] = last
        return data

    @classmethod
    def from_json(cls, data: Any, accountant: Accountant) -> PrivacyLedger:
        """The ledger `to_json` wrote; ValueError naming the first thing that is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"ledger must be a JSON object, got {type(data).__name__}")
        missing = {"accountant", "delta", "target_epsilon", "devices"} - data.keys()
        if missing:
            raise ValueError(f"ledger is missing {', '.join(sorted(missing))}")
        unknown = set(data.keys()) - _JSON_KEYS
        if unknown:
            raise ValueError(f"ledger has unknown keys {', '.join(sorted(map(str, unknown)))}")
        if data["accountant"] != accountant.name:
            raise ValueError(
                f"ledger accountant is {data['accountant']!r} but the given accountant is {accountant.name!r}"
            )
        try:
            ledger = cls(accountant, delta=data["delta"], target_epsilon=data["target_epsilon"])
        except ValueError as err:
            raise ValueError(f"ledger: {err}") from None

        devices = data["devices"]
        if not isinstance(devices, Mapping):
            raise ValueError(f"ledger devices must be an object, got {type(devices).__name__}")
        last_events = data.get("last_events", {})
        if not isinstance(last_events, Mapping):
            raise ValueError(f"ledger last_events must be an object, got {type(last_events).__name__}")

        histories: dict[int, History] = {}
        for key, entries in devices.items():
            device_id = _parse_id(key, "devices")
            if device_id in histories:
                raise ValueError(f"ledger devices: device id {device_id} appears twice")
            if not isinstance(entries, list) or not entries:
                raise ValueError(f"ledger devices[{key!r}] must be a non-empty list of [z, q, steps, count]")
            pairs: list[tuple[DPSGDEvent, int]] = []
            for i, entry in enumerate(entries):
                where = f"ledger devices[{key!r}][{i}]"
                if not isinstance(entry, (list, tuple)) or len(entry) != 4:
                    raise ValueError(f"{where} must be [noise_multiplier, sample_rate, steps, count], got {entry!r}")
                z, q, steps, count = entry
                try:
                    event = make_event(noise_multiplier=z, sample_rate=q, steps=steps)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise ValueError(f"{where}: count must be an integer >= 1, got {count!r}")
                pairs.append((event, count))
            if len({e for e, _ in pairs}) != len(pairs):
                raise ValueError(f"ledger devices[{key!r}] lists the same event twice")
            histories[device_id] = make_history(pairs)

        lasts: dict[int, DPSGDEvent] = {}
        for key, entry in last_events.items():
            device_id = _parse_id(key, "last_events")
            where = f"ledger last_events[{key!r}]"
            if device_id not in histories:
                raise ValueError(f"{where}: device {device_id} has no history")
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(f"{where} must be [noise_multiplier, sample_rate, steps], got {entry!r}")
            try:
                event = make_event(noise_multiplier=entry[0], sample_rate=entry[1], steps=entry[2])
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            if all(e != event for e, _ in histories[device_id]):
                raise ValueError(f"{where}: {entry!r} is not in the device's history")
            lasts[device_id] = event

        for device_id, history in histories.items():
            # Without a stored last event (single-event histories, or a ledger written by
            # another tool), the most-spent event stands in: it is the device's usual one.
            last = lasts.get(device_id) or max(history, key=lambda pair: (pair[1], pair[0]))[0]
            ledger._set(device_id, history, last)
        return ledger

    def __repr__(self) -> str:
        target = "none" if self.target_epsilon is None else f"{self.target_epsilon:g}"
        return (
            f"PrivacyLedger(accountant={self.accountant.name!r}, delta={self.delta:g}, target_epsilon={target}, "
            f"devices={self.num_devices()}, distinct_histories={self.distinct_histories()})"
        )


def _parse_id(key: Any, where: str) -> int:
    if isinstance(key, bool):
        raise ValueError(f"ledger {where}: device id must be an integer, got {key!r}")
    if isinstance(key, int):
        return key
    if isinstance(key, str):
        try:
            value = int(key)
        except ValueError:
            pass
        else:
            if str(value) == key:  # reject " 1", "01", "+1": a canonical writer never makes them
                return value
    raise ValueError(f"ledger {where}: device id must be an integer, got {key!r}")

