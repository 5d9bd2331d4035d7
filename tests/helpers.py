"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from torch.utils.data import Dataset


class PairDataset(Dataset):
    """A map-style dataset of (x, int label) pairs, as most user datasets give them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def set_keys(raw: dict, over: dict[str, object]) -> dict:
    """Set dotted keys ("simulation.num_workers") in a nested config dict, in place; return it."""
    for key, value in over.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


def free_port() -> int:
    """A TCP port nothing listens on right now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Does something accept connections on 127.0.0.1:port?"""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below `pid` (Linux /proc): a test that kills a
    worker must pick one of its own run, not one of another test running at the same time."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            found[p] = (Path("/proc") / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        todo.extend(children.get(p, []))
    return found
