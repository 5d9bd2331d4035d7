"""Checkpoints: everything a run needs to continue at round r+1 as if it had never stopped.

A checkpoint is a plain dict saved with torch.save (open it with torch.load):
    version, round (last completed), config (the resolved run config), params (flat float32),
    server_optimizer (the strategy's state_dict: FedAdam's moments, SCAFFOLD's c and the index of
    its control-variate file), sample_ledger (ledger.json content or None),
    user_level (released rounds, distributed noise: each released round's clip norm, adaptive-clipping
    state, DP-FTRL's open tree nodes, or None), rows (metrics.jsonl so far), elapsed_s, audit,
    data_sha256 and fingerprint (`identity`: what the run read and how its draws are keyed).
Cohorts, device training and server noise are seeded by (seed, round, ...), so a run resumed at
round r ends with the same model, bit for bit, as the uninterrupted run. The one random state
carried between rounds is DP-FTRL's open tree nodes (noise still inside the released prefix
sums); with privacy.randomness=secure that would be secret noise on disk, so DP-FTRL refuses
checkpoints in that mode. With secure randomness a resume is not bit-identical: the rounds after
the checkpoint run again with fresh noise, so the privacy they spent the first time stays
counted (Mechanism.resumed: the sample-level ledger.json, the user-level rows of metrics.jsonl).
A resume refuses data files whose bytes changed since the checkpoint (`check_identity`), and
warns when the fedsim resuming derives another randomness fingerprint from the run's config
than the one that wrote it (then the rounds after it are not bit-identical).

Writes are atomic (a temporary file in the same directory, fsync, os.replace): a crash while
writing leaves the previous checkpoint as it was. Reading checks everything it restores and
refuses, with one line naming the problem, a file that is truncated, not a checkpoint, or
whose privacy ledger is missing or disagrees with its metrics (resuming with a fresh ledger
would silently overspend every device's budget).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fedsim.errors import DataError, FedsimError, StorageError

if TYPE_CHECKING:
    from fedsim.config import FedsimConfig

VERSION = 1
CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(run_dir: Path, round_num: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"round_{round_num:06d}.pt"


def kept_rounds(run_dir: Path) -> list[int]:
    """Rounds of the checkpoints on disk in `run_dir` (the ones a resume can go back to)."""
    rounds = []
    for p in (run_dir / CHECKPOINT_DIR).glob("round_*.pt"):
        try:
            rounds.append(int(p.stem.split("_", 1)[1]))
        except ValueError:
            continue
    return sorted(rounds)


def save(path: Path, state: dict[str, Any], *, keep: int) -> None:
    """Write `state` to `path` atomically, then keep only the newest `keep` checkpoints there.

    A write that fails (disk full, I/O error) raises StorageError naming the file and the
    newest checkpoint that is still valid; nothing older is removed then.
    """
    import torch  # here, not at the top: the launcher imports this module before Ray starts (fedsim.run)

    with writing("checkpoint", path):
        atomic_write(path, lambda f: torch.save({"version": VERSION, **state}, f))
    for old in sorted(path.parent.glob("round_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)


def identity(cfg: FedsimConfig) -> dict[str, str | None]:
    """What a resume checks a checkpoint's run against (`check_identity`): `data_sha256`, the
    sha256 of the data files' bytes (fedsim.data.identity; None for data without files of its
    own: bundled, synthetic, Hub, custom), and `fingerprint`, the randomness fingerprint the
    rounds' draws are keyed by (reproducible mode; None with secure randomness)."""
    from fedsim import randomness
    from fedsim.data import identity as data_identity

    reproducible = randomness.mode(cfg) == "reproducible"
    return {
        "data_sha256": data_identity.content_sha256(cfg.dataset),
        "fingerprint": f"{randomness.fingerprint(cfg):032x}" if reproducible else None,
    }


def check_identity(path: Path, state: dict[str, Any], cfg: FedsimConfig) -> str | None:
    """Refuse to resume `state` (read from `path`) on data whose bytes changed since it was
    written: the rounds after it would train on other data than the rounds before, under the
    same run (DataError, one line with both digests). Return a warning (None: nothing to say)
    when the run's random streams cannot be the checkpointed run's: a fedsim that derives
    another fingerprint from the same config (an older or newer version), or a checkpoint that
    predates these checks and so cannot be compared."""
    from fedsim.data.identity import location_key

    now = identity(cfg)
    saved_data = state.get("data_sha256")
    if saved_data is not None and now["data_sha256"] is not None and saved_data != now["data_sha256"]:
        raise DataError(
            f"resume: the data files of dataset.{location_key(cfg.dataset)} hold other bytes than when {path.name} was written "
            f"(sha256 {saved_data[:16]}..., now {now['data_sha256'][:16]}...): a resumed run must read the same data; "
            "restore the files or start a new run"
        )
    if saved_data is not None and now["data_sha256"] is None:
        return None  # the files cannot be read now: the loader says what is wrong
    if "fingerprint" not in state:  # written before checkpoints recorded what they were made from
        if now["data_sha256"] is None and now["fingerprint"] is None:
            return None
        return (
            f"{path.name} was written by an older fedsim and records neither its data's digest nor its random streams' "
            "fingerprint: the resume cannot check that the data is unchanged, and in reproducible mode the rounds after it "
            "may draw other random numbers than the uninterrupted run"
        )
    if now["fingerprint"] is not None and state["fingerprint"] is not None and state["fingerprint"] != now["fingerprint"]:
        return (
            f"this fedsim derives another randomness fingerprint from the run's config ({now['fingerprint'][:12]}...) "
            f"than the one that wrote {path.name} ({state['fingerprint'][:12]}...): the rounds after round "
            f"{state['round']} are not bit-identical to an uninterrupted run"
        )
    return None


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` into a temporary file beside `path`, fsync, rename: `path` is either its old
    content or the complete new one, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Turn a failed write (ENOSPC, EIO, ...) into one line naming the file and what is still
    valid (StorageError, exit status 2) instead of a traceback."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        found = sorted((run_dir / CHECKPOINT_DIR).glob("round_*.pt"))
        kept = f"the newest valid checkpoint is {found[-1]} (fedsim resume={run_dir})" if found else "no checkpoint was written"
        raise StorageError(f"cannot write the {what} {path}: {reason}; {kept}") from None


def latest(path: Path) -> Path:
    """`path` itself if it is a file; the newest checkpoint of a run (or checkpoints) directory."""
    if path.is_file():
        return path
    for folder in (path / CHECKPOINT_DIR, path):
        found = sorted(folder.glob("round_*.pt")) if folder.is_dir() else []
        if found:
            return found[-1]
    raise FedsimError(f"resume: no checkpoint (round_*.pt) at {path}")


def load(path: Path) -> dict[str, Any]:
    """Read and check a checkpoint; FedsimError (one line, exit 2) when it cannot be used."""
    import torch

    path = latest(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise FedsimError(f"resume: {path} is not a readable checkpoint (truncated or corrupt: {reason})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise FedsimError(f"resume: {path} is not a fedsim checkpoint (version {VERSION})")
    missing = [k for k in ("round", "config", "params", "server_optimizer", "rows") if k not in state]
    if missing:
        raise FedsimError(f"resume: {path} lacks {', '.join(missing)}")
    if len(state["rows"]) != state["round"]:
        raise FedsimError(f"resume: {path} holds {len(state['rows'])} rounds of metrics for round {state['round']}")
    privacy = state["config"].get("privacy") or {}
    if privacy.get("dpsgd") is not None:
        ledger = state.get("sample_ledger")
        if not isinstance(ledger, dict) or "devices" not in ledger:
            raise FedsimError(f"resume: {path} has no privacy ledger although DP-SGD is on: refusing to reset budgets")
        participations = sum(int(e[3]) for entries in ledger["devices"].values() for e in entries)
        trained = sum(int(r.get("devices_trained") or 0) for r in state["rows"])
        # More participations than the metrics' rounds is privacy carried from rounds that ran again
        # after a resume with secure randomness (Mechanism.resumed); fewer would reset budgets.
        if participations < trained:
            raise FedsimError(
                f"resume: {path} ledger records {participations} device participations but the metrics "
                f"{trained}: the ledger is inconsistent, refusing to resume"
            )
    if privacy.get("dpfedavg") is not None and not isinstance(state.get("user_level"), dict):
        raise FedsimError(f"resume: {path} has no user-level privacy state although DP-FedAvg is on")
    return state
