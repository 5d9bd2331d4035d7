"""Per-device state kept on disk: SCAFFOLD's control variates for up to millions of devices.

One file of fixed-size rows (num_params float32 each) and, in memory, only the index of the
devices that have a row (a dict: a few dozen bytes per device that ever trained). Memory is
bounded by one cohort's rows; the file by the devices that trained (plus the rows kept for
checkpoints, below). A device without a row reads as zeros (SCAFFOLD's c_i = 0 at start).

Checkpoints and resume. A write never overwrites the row a device had: it goes to a free
slot, and the old slot is kept while a checkpoint on disk may still need it. A slot written
in round r_w and superseded in round r_new holds the device's state for the rounds
[r_w, r_new); it is freed once no kept checkpoint's round falls in that range (at once when
the run keeps no checkpoint in it). The store's state_dict (index, free slots, file length)
goes into each checkpoint, and the file is fsynced first, so resuming from any kept
checkpoint reads exactly the rows that checkpoint saw: the resumed run is bit-identical.
Rows appended after the checkpoint lie past its file length and are written over.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


class ControlStore:
    def __init__(self, path: Path, num_params: int) -> None:
        self.path = path
        self.num_params = num_params
        self.row_bytes = 4 * num_params
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.index: dict[int, int] = {}  # device id -> slot
        self.written: dict[int, int] = {}  # slot -> round it was written
        self.pending: list[tuple[int, int, int]] = []  # superseded slots still needed: (slot, r_w, r_new)
        self.free: list[int] = []  # reusable slots, kept sorted (lowest first: deterministic files)
        self.slots = 0  # rows in the file that are in use or free
        self.kept: list[int] = []  # rounds of the checkpoints on disk

    def rows(self, device_ids: list[int]) -> np.ndarray:
        """float32 [len(device_ids), num_params]: each device's row (zeros if it has none)."""
        out = np.zeros((len(device_ids), self.num_params), dtype=np.float32)
        for i, d in enumerate(device_ids):
            slot = self.index.get(d)
            if slot is not None:
                buf = os.pread(self._fd, self.row_bytes, slot * self.row_bytes)
                if len(buf) != self.row_bytes:
                    raise OSError(f"{self.path}: slot {slot} is cut short (file truncated?)")
                out[i] = np.frombuffer(buf, dtype=np.float32)
        return out

    def write(self, round_num: int, rows: dict[int, np.ndarray]) -> None:
        """Set the rows of these devices as of round `round_num`."""
        for d in sorted(rows):
            row = np.ascontiguousarray(rows[d], dtype=np.float32)
            if row.shape != (self.num_params,):
                raise ValueError(f"device {d}: row of shape {row.shape}, expected ({self.num_params},)")
            slot = self._allocate()
            os.pwrite(self._fd, row.tobytes(), slot * self.row_bytes)
            old = self.index.get(d)
            if old is not None:
                self.pending.append((old, self.written.pop(old), round_num))
            self.index[d] = slot
            self.written[slot] = round_num
        self._release()

    def _allocate(self) -> int:
        if self.free:
            return self.free.pop(0)
        self.slots += 1
        return self.slots - 1

    def _release(self) -> None:
        still = []
        for slot, r_w, r_new in self.pending:
            if any(r_w <= r < r_new for r in self.kept):
                still.append((slot, r_w, r_new))
            else:
                self.free.append(slot)
        self.pending = still
        self.free.sort()

    def checkpointed(self, kept_rounds: list[int]) -> None:
        """The checkpoints now on disk (after one was written and old ones removed)."""
        self.kept = sorted(kept_rounds)
        self._release()

    def flush(self) -> None:
        os.fsync(self._fd)

    def state_dict(self, round_num: int) -> dict[str, Any]:
        """For a checkpoint of round `round_num` (the file is fsynced first)."""
        self.flush()
        ids = np.fromiter(self.index.keys(), dtype=np.int64, count=len(self.index))
        return {
            "round": round_num,
            "ids": ids,
            "slots": np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index)),
            "written": np.array([self.written[s] for s in self.index.values()], dtype=np.int64),
            "pending": np.array(self.pending, dtype=np.int64).reshape(-1, 3),
            "free": np.array(self.free, dtype=np.int64),
            "file_slots": self.slots,
            "kept": list(self.kept),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = dict(zip(state["ids"].tolist(), state["slots"].tolist(), strict=True))
        self.written = dict(zip(state["slots"].tolist(), state["written"].tolist(), strict=True))
        self.pending = [tuple(p) for p in state["pending"].tolist()]  # type: ignore[misc]
        self.free = state["free"].tolist()
        self.slots = int(state["file_slots"])
        # The checkpoint being resumed from is kept too: a second crash may come back to it.
        self.kept = sorted(set(state["kept"]) | {int(state["round"])})
        size = os.fstat(self._fd).st_size
        if size < self.slots * self.row_bytes:
            raise OSError(f"{self.path} has {size} bytes, the checkpoint needs {self.slots * self.row_bytes}")

    def file_bytes(self) -> int:
        return self.slots * self.row_bytes

    def close(self, *, delete: bool = False) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if delete:
            self.path.unlink(missing_ok=True)
