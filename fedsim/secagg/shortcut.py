"""SecAgg+'s simulation shortcut (`secagg.simulation_shortcut`, simulation only, NOT what devices
do): the protocol's decisions without its cryptography, in one message per worker.

The faithful protocol (fedsim.secagg.protocol) runs four stages (five in the active threat
model); which devices end in the sum, and whether the round aborts, depends only on who drops
at which stage and on the public neighbour graph. Devices drop at a stage by the run's seeded
fault model (`secagg.drop_<stage>`, fedsim.secure_rounds._dropped) or by failing at the masked
input (training, encoding): the first two stages' drops are known before anything is sent.
`ShortcutSession` takes the server's decisions of the faithful protocol from them, with the
protocol's own rules and abort reasons (`prune`, `pruned_too_far`, `survivor_problem`,
`too_few_answers`, `cannot_rebuild` in fedsim.secagg.protocol):

    before_training   the devices left after stages 1-2 (drops, then the server's pruning of
                      devices with fewer than t live neighbours, twice), or the abort there;
                      only these devices are asked for their input
    finish            the workers' sums of their devices' inputs mod 2^m: the masked-input
                      survivors U3, the survivor floor and the holders of every secret the
                      server would rebuild, (active) every survivor signing U3, the unmask
                      stage's answers and each secret's t shares -> the sum, or the abort

No key is drawn, no share made, no mask expanded: every mask of the faithful protocol cancels
in the survivors' sum (pairwise masks of two survivors cancel each other; the server removes
the survivors' self masks and their masks with devices that dropped after sharing keys), so
the sum of the survivors' inputs mod 2^m is the faithful protocol's sum, bit for bit.
tests/test_secagg_shortcut.py holds this to the faithful protocol over random drop patterns
at every stage in both threat models (the sum, the survivors, the devices dropped after
sharing, every abort reason; the survivors per stage in whole runs).

What the shortcut does not model: faults that only a dishonest party or a corrupted message
causes (unusable or reused keys, share ciphertexts that do not open, malformed replies, a
refused signature): honest devices never produce them, and in the faithful protocol they drop
the device alone. Nor a worker that misses a stage the shortcut does not send: one that times
out there restarts the faithful round, and one that fails or refuses every message (missing
data, a mismatched fedsim) loses its devices at the first stage in the faithful protocol, at
the masked input here (the pruning after the first stage can then differ). The server could
read each worker's sum of inputs: no security claim holds (summary.json says so, and a worker
outside fedsim's simulation engine refuses the session).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from fedsim.secagg.protocol import (
    SecAggAborted,
    SecAggParams,
    cannot_rebuild,
    prune,
    pruned_too_far,
    survivor_problem,
    too_few_answers,
)


class ShortcutSession:
    """The server's side of one shortcut session (module doc).

    `dropped(stage, i)`: whether device i (a cohort position) drops at `stage` (one of
    advertise_keys, share_keys, unmask: the masked-input drops are the workers' to apply).
    Attributes: `answered` {stage: how many devices answered it} for the stages reached; `live`
    (asked for the masked input; SecAggServer's `_live`); as SecAggServer's: `masked` (U3, in
    the sum; `survivors`),
    `dropped_after_sharing`, `rejected` {device: "stage: reason"}. Raises SecAggAborted where
    the faithful protocol's server aborts, with its reason.
    """

    def __init__(self, params: SecAggParams, dropped: Callable[[str, int], bool]) -> None:
        self.params, self.graph, self._dropped = params, params.graph, dropped
        self.answered: dict[str, int] = {}
        self.live: frozenset[int] = frozenset()
        self.masked: frozenset[int] = frozenset()
        self.dropped_after_sharing: frozenset[int] = frozenset()
        self.rejected: dict[int, str] = {}

    @property
    def survivors(self) -> frozenset[int]:
        """Devices whose inputs are in the sum."""
        return self.masked

    def _pruned(self, alive: Iterable[int], stage: str) -> frozenset[int]:
        live = prune(self.graph, alive, self.params.threshold)
        reason = pruned_too_far(len(live), self.params.threshold, stage)
        if reason:
            raise SecAggAborted(reason)
        return live

    def before_training(self) -> frozenset[int]:
        """Stages 1 and 2: the devices asked for their masked input (cohort positions)."""
        advertised = [i for i in range(self.params.num_devices) if not self._dropped("advertise_keys", i)]
        self.answered["advertise_keys"] = len(advertised)
        asked = self._pruned(advertised, "share_keys")
        shared = [i for i in sorted(asked) if not self._dropped("share_keys", i)]
        self.answered["share_keys"] = len(shared)
        self.live = self._pruned(shared, "masked_input")
        return self.live

    def finish(self, sums: Iterable[tuple[list[int], np.ndarray | None]]) -> np.ndarray:
        """Stages 3 and 4 from the workers' (members, sum of their inputs mod 2^m) -> the sum of
        the survivors' inputs mod 2^m (uint64). A sum that is not a vector of the session's
        length rejects its members (as a malformed masked input does); a member that was not
        asked for its input, or appears twice, aborts the round (a worker's fault, never an
        honest device's)."""
        p, t = self.params, self.params.threshold
        total = np.zeros(p.vector_length, dtype=p.dtype)
        received: set[int] = set()
        accepted: set[int] = set()
        for members, vector in sums:
            stray = [i for i in members if i not in self.live or i in received]
            if stray:
                raise SecAggAborted(f"round aborted: device {stray[0]}'s input is inside a worker's sum, but it was "
                                    "not asked for one or is in another sum too")  # fmt: skip
            received.update(members)
            ok = vector is not None and np.shape(vector) == (p.vector_length,) \
                and np.issubdtype(np.asarray(vector).dtype, np.integer)
            if not ok:
                for i in members:
                    self.rejected[i] = "masked_input: its worker's sum of inputs is malformed"
                continue
            total += np.asarray(vector).astype(p.dtype, copy=False)  # wraps mod 2^32 / 2^64: exact mod 2^m
            accepted.update(members)
        self.answered["masked_input"] = len(received)
        self.masked = frozenset(accepted)
        graph = self.graph
        reason = survivor_problem(p, self.masked, self.live, lambda i: sum(1 for j in graph[i] if j in self.masked))
        if reason:
            raise SecAggAborted(reason)
        self.dropped_after_sharing = self.live - self.masked
        if p.active:
            # Every survivor signs U3: it is in U3, U3 meets the floor (checked above), and (the
            # holders check above) each has >= t neighbours in U3, whose signatures it needs.
            self.answered["consistency"] = len(self.masked)
        # Unmask: a survivor that does not drop answers (each has >= t surviving neighbours whose
        # shares it holds, which is all its own check asks).
        responded = frozenset(i for i in self.masked if not self._dropped("unmask", i))
        self.answered["unmask"] = len(responded)
        if len(responded) < t:
            raise SecAggAborted(too_few_answers(len(responded), t))
        # Each secret is rebuilt from the shares its answering neighbours reveal: the survivors'
        # self-mask seeds, then the mask keys of the devices that dropped after sharing keys
        # next to a survivor (in this order, as the faithful server rebuilds them).
        rebuilt = [("self-mask seed of", i) for i in sorted(self.masked)]
        rebuilt += [("mask key of dropped", j) for j in sorted(self.dropped_after_sharing)
                    if any(l in self.masked for l in graph[j])]  # fmt: skip
        for what, i in rebuilt:
            shares = sum(1 for j in graph[i] if j in responded)
            if shares < t:
                raise SecAggAborted(cannot_rebuild(what, i, f"{shares} shares given, {t} needed to reconstruct"))
        result = total.astype(np.uint64)
        if p.modulus_bits < 64:
            result &= np.uint64((1 << p.modulus_bits) - 1)
        return result
