"""Where every random draw that touches a release comes from: one rule, two modes.

`privacy.randomness` (auto | reproducible | secure) picks the mode of a run:

- reproducible: every stream is a pure function of (run seed, config fingerprint, stream name,
  *ints) through numpy's SeedSequence, with no 32-bit truncation anywhere (torch generators get
  their whole MT19937 state from SeedSequence, `clients.seeding`). Same seed and config give a
  bit-identical run; two configs that differ in any value that changes the result (z, C, the
  cohort size...) have different fingerprints, so they never share noise or cohorts (publishing
  both members of a sweep then does not cancel the noise). The noise is only as secret as the
  seed and the config: whoever knows both can regenerate it and subtract it. That is fine for
  simulation and wrong for a deployment.
- secure: every stream is seeded with fresh entropy from the OS CSPRNG (os.urandom through
  numpy's SeedSequence / `secrets`), never reproducible. The generators themselves are numpy's
  PCG64 and torch's MT19937, not cryptographic PRGs: their output is unpredictable to anyone
  who does not see the generator's earlier outputs, and DP noise is never published alone.
- auto: secure when engine=deployment (real devices, a real server) or when SecAgg+ runs with
  distributed DP noise (the point of distributed noise is that the server cannot remove it;
  noise derived from a seed the server knows would defeat it); reproducible otherwise.

The fingerprint covers every config value that changes the result; it excludes simulation.*
(layout, workers, timeouts: the result is the same by design), output.*, checkpoint.*,
engine/superlink* and resume, and privacy.randomness itself (auto resolving to reproducible and
an explicit reproducible give the same run).

SecAgg+ secrets that never change the result (X25519 keys, self-mask seeds, Shamir coefficients)
do not come from here: they come from the OS CSPRNG in every mode (fedsim.secagg).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from clients.seeding import new_generator

if TYPE_CHECKING:
    from fedsim.config import FedsimConfig

MODES = ("auto", "reproducible", "secure")
# Top-level config keys that never change the result of a run (see the module doc).
_NOT_IN_FINGERPRINT = ("simulation", "output", "checkpoint", "engine", "superlink", "superlink_ca", "resume")


def resolve(cfg: FedsimConfig) -> tuple[str, str]:
    """(mode, reason): the resolved randomness mode of `cfg` and why."""
    asked = cfg.privacy.randomness
    if asked != "auto":
        return asked, f"privacy.randomness={asked}"
    if cfg.engine == "deployment":
        return "secure", "auto: engine=deployment runs real devices, so noise must not be derivable from the run seed"
    user = cfg.privacy.dpfedavg
    if cfg.secagg.name != "none" and user is not None and user.noise == "distributed":
        return "secure", "auto: distributed DP noise under SecAgg+ must be unknown to the server, which knows the run seed"
    return "reproducible", "auto: a simulation without distributed noise, so same seed + config gives the same run"


def mode(cfg: FedsimConfig) -> str:
    """"reproducible" or "secure": the resolved `privacy.randomness` of `cfg`."""
    return resolve(cfg)[0]


def fingerprint(cfg: FedsimConfig) -> int:
    """128-bit BLAKE2b hash of every config value that changes the result (see the module doc)."""
    values = cfg.to_dict()
    for key in _NOT_IN_FINGERPRINT:
        values.pop(key, None)
    values["privacy"].pop("randomness", None)
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "little")


def _words(value: int, count: int) -> list[int]:
    return [(value >> (32 * i)) & 0xFFFFFFFF for i in range(count)]


def _stream_id(stream: str) -> int:
    return int.from_bytes(hashlib.blake2b(stream.encode(), digest_size=16).digest(), "little")


def derive(seed: int, fp: int, stream: str, *ints: int) -> np.random.SeedSequence:
    """The SeedSequence of (seed, fingerprint, stream, *ints) in reproducible mode.

    Every field has a fixed width (seed 64 bits, fingerprint and stream name 128 bits each, then
    the count of ints and 64 bits per int), so distinct inputs never give the same entropy words.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    words = _words(seed, 2) + _words(fp, 4) + _words(_stream_id(stream), 4) + [len(ints)]
    for value in ints:
        if not 0 <= value < 2**64:
            raise ValueError(f"stream ints must be in [0, 2**64), got {ints}")
        words += _words(int(value), 2)
    return np.random.SeedSequence(words)


@dataclass(frozen=True)
class Streams:
    """The random streams of one run (mode, seed and fingerprint computed once).

    `fedsim.randomness.streams(cfg)` builds it; code that draws per device holds one instead of
    recomputing the fingerprint per draw.
    """

    mode: str
    seed: int
    fingerprint: int

    def seed_sequence(self, stream: str, *ints: int) -> np.random.SeedSequence:
        """Reproducible: derived from (seed, fingerprint, stream, *ints); secure: 256 fresh OS bits."""
        if self.mode == "secure":
            return np.random.SeedSequence(secrets.randbits(256))
        return derive(self.seed, self.fingerprint, stream, *ints)

    def numpy(self, stream: str, *ints: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(self.seed_sequence(stream, *ints)))

    def torch(self, stream: str, *ints: int) -> torch.Generator:
        return new_generator(self.seed_sequence(stream, *ints))


def streams(cfg: FedsimConfig) -> Streams:
    """The `Streams` of `cfg`."""
    return Streams(mode=mode(cfg), seed=cfg.seed, fingerprint=fingerprint(cfg))


def numpy_generator(cfg: FedsimConfig, stream: str, *ints: int) -> np.random.Generator:
    """A numpy Generator (PCG64) for `stream` at `ints` (e.g. round, device); see the module doc."""
    return streams(cfg).numpy(stream, *ints)


def torch_generator(cfg: FedsimConfig, stream: str, *ints: int) -> torch.Generator:
    """A torch CPU Generator, its whole MT19937 state from the stream's SeedSequence."""
    return streams(cfg).torch(stream, *ints)
