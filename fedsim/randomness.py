"""Where every random draw that touches a release comes from: one rule, two modes.

`privacy.randomness` (auto | reproducible | secure) picks the mode of a run:

- reproducible: every stream is a pure function of (run seed, config fingerprint, stream name,
  *ints), with no 32-bit truncation anywhere. numpy's SeedSequence hashes (seed, fingerprint,
  stream name, number of ints) into a 128-bit Philox key (Salmon et al. 2011, "Parallel random
  numbers: as easy as 1, 2, 3"); the ints (round, device, ...) are the high words of Philox's
  256-bit counter, whose low 64-bit word is the position inside the stream. Philox is a
  bijection of the counter under a key, so two (round, device) pairs of one stream draw from
  disjoint blocks as long as neither draws 2^66 values: no two device fits ever share draws.
  Torch generators get their whole MT19937 state (624 words) from such a stream
  (`clients.seeding`), not the 32 bits manual_seed keeps. Same seed and config give a
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
engine/superlink* and resume, the worker-process faults (faults.worker_kill_rate,
worker_pause_rate, worker_pause_s: resent jobs, same result), and privacy.randomness itself (auto
resolving to reproducible and an explicit reproducible give the same run). Data read from files
(dataset.path, a Hugging Face builder's local data_files) enters by the sha256 of the files
read, not by their location (fedsim.data.identity): the same data in another folder or clone
gives the same run, and edited data another.

SecAgg+ secrets that never change the result (X25519 keys, self-mask seeds, Shamir coefficients)
do not come from here: they come from the OS CSPRNG in every mode (fedsim.secagg).
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from clients.seeding import new_generator
from fedsim.data import identity

if TYPE_CHECKING:
    from fedsim.config import FedsimConfig

MODES = ("auto", "reproducible", "secure")
# Top-level config keys that never change the result of a run (see the module doc).
_NOT_IN_FINGERPRINT = ("simulation", "output", "checkpoint", "engine", "superlink", "superlink_ca", "resume")
# Keys of fingerprinted groups left out too. Faults of worker processes (killed, frozen): the
# transport resends their jobs, so by design they change when a run ends, never what it computes
# (tests/test_chaos.py holds fedsim to that). SecAgg+'s simulation shortcut changes how the sum is computed, never what it is: the faithful
# protocol's sum bit for bit (tests/test_secagg_shortcut.py), so it keeps the run's randomness.
# The server's model average (algorithm.model_ema) is post-processing of the models the rounds
# release: with or without it a run trains the same models bit for bit (tests/test_model_average.py),
# so in reproducible randomness publishing both members of such a sweep releases one noisy
# trajectory, not two (in secure randomness every run draws fresh noise: two runs, two releases).
_KEYS_NOT_IN_FINGERPRINT = (
    ("faults", "worker_kill_rate"), ("faults", "worker_pause_rate"), ("faults", "worker_pause_s"),
    ("secagg", "simulation_shortcut"), ("algorithm", "model_ema"),
)  # fmt: skip
# Keys added after runs were recorded, with the value that keeps the old behaviour: left out of
# the fingerprint at that value, so a run that does not use them keeps its randomness (and its
# model, bit for bit: scripts/golden.py). A new key of a fingerprinted group goes here too.
_ADDED_LATER = {("privacy", "dpfedavg", "tree_restart_every"): None, ("model", "activation"): "relu", ("model", "scatter_head"): "linear",
                ("privacy", "dpsgd", "noise"): "local"}


def resolve(cfg: FedsimConfig) -> tuple[str, str]:
    """(mode, reason): the resolved randomness mode of `cfg` and why."""
    asked = cfg.privacy.randomness
    if asked != "auto":
        return asked, f"privacy.randomness={asked}"
    if cfg.engine == "deployment":
        return "secure", "auto: engine=deployment runs real devices, so noise must not be derivable from the run seed"
    if distributed_noise(cfg):
        return "secure", "auto: distributed DP noise under SecAgg+ must be unknown to the server, which knows the run seed"
    return "reproducible", "auto: a simulation without distributed noise, so same seed + config gives the same run"


def distributed_noise(cfg: FedsimConfig) -> bool:
    """Whether devices add the run's DP noise as shares under SecAgg+ (user- or sample-level)."""
    user, dp = cfg.privacy.dpfedavg, cfg.privacy.dpsgd
    return cfg.secagg.name != "none" and (
        (user is not None and user.noise == "distributed") or (dp is not None and dp.noise == "distributed"))


def mode(cfg: FedsimConfig) -> str:
    """"reproducible" or "secure": the resolved `privacy.randomness` of `cfg`."""
    return resolve(cfg)[0]


def fingerprint(cfg: FedsimConfig) -> int:
    """128-bit BLAKE2b hash of every config value that changes the result (see the module doc)."""
    values = cfg.to_dict()
    for key in _NOT_IN_FINGERPRINT:
        values.pop(key, None)
    values["privacy"].pop("randomness", None)
    for group, key in _KEYS_NOT_IN_FINGERPRINT:
        values.get(group, {}).pop(key, None)
    for (*path, key), unchanged in _ADDED_LATER.items():
        group = values
        for part in path:
            group = group.get(part) if isinstance(group, dict) else None
        if isinstance(group, dict) and key in group and group[key] == unchanged:
            del group[key]
    # The data by its bytes, not its location (fedsim.data.identity): same data in another
    # folder, same run; edited data, another run.
    if (content := identity.content_sha256(cfg.dataset)) is not None:
        values["dataset"].pop(identity.location_key(cfg.dataset), None)
        values["dataset"]["content_sha256"] = content
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "little")


MAX_INTS = 3  # ints per stream: the free words of Philox's counter


def _words(value: int, count: int) -> list[int]:
    return [(value >> (32 * i)) & 0xFFFFFFFF for i in range(count)]


@functools.lru_cache(maxsize=1024)
def philox_key(seed: int, fp: int, stream: str, count: int) -> int:
    """The 128-bit Philox key of `stream` with `count` ints: SeedSequence of fixed-width words
    (seed 64 bits, fingerprint 128, BLAKE2b-128 of the stream name, the count)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    name = int.from_bytes(hashlib.blake2b(stream.encode(), digest_size=16).digest(), "little")
    words = np.array(_words(seed, 2) + _words(fp, 4) + _words(name, 4) + [count], dtype=np.uint32)
    low, high = np.random.SeedSequence(words).generate_state(2, np.uint64)
    return int(low) | int(high) << 64


def philox_counter(ints: tuple[int, ...]) -> list[int]:
    """Philox's starting counter for a stream's ints: word 0 (the position) is 0, the ints follow."""
    if len(ints) > MAX_INTS:
        raise ValueError(f"a stream takes at most {MAX_INTS} ints, got {ints}")
    for value in ints:
        if not 0 <= value < 2**64:
            raise ValueError(f"stream ints must be in [0, 2**64), got {ints}")
    return [0, *(int(v) for v in ints), *[0] * (MAX_INTS - len(ints))]


@dataclass(frozen=True)
class Streams:
    """The random streams of one run (mode, seed and fingerprint computed once).

    `fedsim.randomness.streams(cfg)` builds it; code that draws per device holds one instead of
    recomputing the fingerprint per draw.
    """

    mode: str
    seed: int
    fingerprint: int

    def bit_generator(self, stream: str, *ints: int) -> np.random.BitGenerator:
        """Reproducible: Philox(key of (seed, fingerprint, stream), counter (0, *ints));
        secure: PCG64 seeded with 256 fresh bits from the OS CSPRNG (`secrets`)."""
        if self.mode == "secure":
            philox_counter(ints)  # the same argument checks in both modes
            return np.random.PCG64(np.random.SeedSequence(secrets.randbits(256)))
        return np.random.Philox(key=philox_key(self.seed, self.fingerprint, stream, len(ints)), counter=philox_counter(ints))

    def numpy(self, stream: str, *ints: int) -> np.random.Generator:
        return np.random.Generator(self.bit_generator(stream, *ints))

    def torch(self, stream: str, *ints: int) -> torch.Generator:
        return new_generator(self.bit_generator(stream, *ints))


def streams(cfg: FedsimConfig) -> Streams:
    """The `Streams` of `cfg`."""
    return Streams(mode=mode(cfg), seed=cfg.seed, fingerprint=fingerprint(cfg))


def numpy_generator(cfg: FedsimConfig, stream: str, *ints: int) -> np.random.Generator:
    """A numpy Generator (PCG64) for `stream` at `ints` (e.g. round, device); see the module doc."""
    return streams(cfg).numpy(stream, *ints)


def torch_generator(cfg: FedsimConfig, stream: str, *ints: int) -> torch.Generator:
    """A torch CPU Generator, its whole MT19937 state from the stream's SeedSequence."""
    return streams(cfg).torch(stream, *ints)


SERVER_CAN_REMOVE_NOISE = "simulation only: the server can remove the noise"


def describe(cfg: FedsimConfig) -> dict[str, object]:
    """What summary.json says about the run's randomness: the mode, why, and what holds."""
    resolved, reason = resolve(cfg)
    out: dict[str, object] = {"mode": resolved, "reason": reason}
    if resolved == "reproducible":
        out["fingerprint"] = f"{fingerprint(cfg):032x}"
        if (content := identity.content_sha256(cfg.dataset)) is not None:
            out["data_sha256"] = content  # what the fingerprint holds of the data instead of its location
        out["holds"] = (
            "every draw (cohorts, faults, device training, DP noise) is Philox keyed by SeedSequence(seed, config "
            "fingerprint, stream) at counter (round, device): same seed + config gives the same run; configs that "
            "differ in any result-changing value (data files by the sha256 of their bytes, data_sha256, not their "
            "location) share no draws. Anyone who knows the seed and the config can "
            "regenerate, hence remove, the DP noise: the reported epsilon is what a deployment with secret "
            "randomness would get, not a property of these outputs against such a reader"
        )
    else:
        out["holds"] = (
            "every stream is seeded with 256 fresh bits from the OS CSPRNG (secrets); the generators are PCG64 "
            "(numpy) and MT19937 (torch, whole 624-word state from PCG64), not cryptographic PRGs, and their raw "
            "outputs are never published; DP-SGD uses Opacus's secure_mode noise (4 Gaussians / 2, Holohan & "
            "Braghin 2021) and central DP-FedAvg noise the same construction; torchcsprng (Opacus's CSPRNG "
            "generator) has no build for torch 2.13, so it is not used; runs are not reproducible"
        )
    if resolved == "reproducible" and distributed_noise(cfg):
        out["warning"] = SERVER_CAN_REMOVE_NOISE
    return out
