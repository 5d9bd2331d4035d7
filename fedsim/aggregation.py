"""Combining device updates: the weighted sum behind the mean update
Delta_t = sum_i w_i Delta_i / sum_i w_i that every strategy steps with (fedsim.strategies).

Reproducibility: float addition is not associative, so the order of the sum is fixed by the
cohort alone, as a balanced binary tree over the positions 0..n-1 of the sorted cohort: a leaf
is one device's w_i u_i in float64, a node the sum of its two children (left + right; a child
with no trained device is skipped, never added as zeros), the total the root. A worker holds a
contiguous range of positions; it sends the sums of the maximal tree nodes inside its range
(`tree_nodes`: one vector when the range is a whole subtree, as for 2 workers, at most about
2 log2(n) otherwise), and the server finishes the same tree (`tree_total`) over those node
sums, or over leaves it makes from devices' rows (the classic layout, strategies that read each
device's update). Either way the same additions run on the same values in the same tree, so
the model is the same bits with 1, 2 or 16 workers, with rows or sums, in the classic layout,
whatever order the replies arrive in. numpy's elementwise multiply and add are exact IEEE
operations (no fused multiply-add), so worker and server agree.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

Node = tuple[int, int]  # [lo, hi): the tree node over cohort positions lo..hi-1


def leaf(update: np.ndarray, weight: float) -> np.ndarray:
    """One device's w_i u_i in float64 (a fresh array)."""
    return np.multiply(np.asarray(update, dtype=np.float64), weight)


def tree_nodes(lo: int, hi: int, n: int) -> list[Node]:
    """The maximal nodes of the balanced binary tree over [0, n) that lie inside [lo, hi), left
    to right (a node [a, b) splits at (a + b) // 2)."""
    out: list[Node] = []

    def walk(a: int, b: int) -> None:
        if b <= lo or a >= hi:
            return
        if lo <= a and b <= hi:
            out.append((a, b))
            return
        mid = (a + b) // 2
        walk(a, mid)
        walk(mid, b)

    if 0 <= lo < hi <= n:
        walk(0, n)
    return out


def tree_total(parts: Mapping[Node, np.ndarray], lo: int, hi: int) -> np.ndarray | None:
    """The tree's sum over node [lo, hi) from `parts` (node sums and/or leaves (p, p + 1)), or None
    when no part lies inside it. A part's array is never written to."""
    if (lo, hi) in parts:
        return parts[(lo, hi)]
    if hi - lo <= 1:
        return None
    mid = (lo + hi) // 2
    left, right = tree_total(parts, lo, mid), tree_total(parts, mid, hi)
    if left is None:
        return right
    if right is None:
        return left
    return left + right


class RunningSum:
    """The round's (weighted) sum of device updates, finished over the cohort's tree."""

    def __init__(self, num_params: int) -> None:
        self.total = torch.zeros(num_params, dtype=torch.float64)
        self.weight = 0.0
        self.count = 0

    def add_tree(self, parts: Mapping[Node, np.ndarray], n: int, weight: float, count: int) -> None:
        """Set the total to the tree's root over `parts` (see the module doc); `weight` and
        `count` are the summed weights and devices of the parts."""
        root = tree_total(parts, 0, n)
        if root is not None:
            self.total = torch.from_numpy(np.array(root, dtype=np.float64))  # a copy: parts may be read-only views
        self.weight += weight
        self.count += count

    def add_all(self, updates: list[tuple[int, torch.Tensor | np.ndarray, float]]) -> None:
        """The round's total from (device_id, update, weight) rows, once: the tree over their
        device-id ranks, whatever order the rows come in."""
        if self.count:
            raise ValueError("add_all sets a round's total once; make a new RunningSum")
        rows = sorted(updates, key=lambda t: t[0])
        parts = {(i, i + 1): leaf(np.asarray(u), w) for i, (_, u, w) in enumerate(rows)}
        self.add_tree(parts, len(rows), sum(w for _, _, w in rows), len(rows))

    def mean(self) -> torch.Tensor:
        if self.weight <= 0:
            raise ValueError("no device updates to average")
        return (self.total / self.weight).to(torch.float32)
