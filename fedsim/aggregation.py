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
operations (no fused multiply-add), and IEEE addition is commutative, so adding in place into
either child gives the same bits as left + right: the tree runs with O(depth) live vectors.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

Node = tuple[int, int]  # [lo, hi): the tree node over cohort positions lo..hi-1
Row = tuple[np.ndarray, float]  # a device's update (float32) and its weight: the leaf w * u


def leaf(update: np.ndarray, weight: float, out: np.ndarray | None = None) -> np.ndarray:
    """One device's w_i u_i in float64 (into `out` if given, else a fresh array).

    The ufunc widens u to float64 as it multiplies (exactly, then one rounding: the same bits as
    widening first), with no float64 copy of u beside the result: that copy made a leaf 6 ms
    instead of 0.5 ms for an 858k-parameter update (fresh pages for two 6.9 MB arrays)."""
    return np.multiply(np.asarray(update), weight, out=out, dtype=np.float64)


def tree_nodes(lo: int, hi: int, n: int) -> list[Node]:
    """The maximal nodes of the balanced binary tree over [0, n) that lie inside [lo, hi), left
    to right (a node [a, b) splits at (a + b) // 2)."""
    out: list[Node] = []
    if 0 <= lo < hi <= n:
        _nodes(0, n, lo, hi, out)
    return out


def _nodes(a: int, b: int, lo: int, hi: int, out: list[Node]) -> None:
    if b <= lo or a >= hi:
        return
    if lo <= a and b <= hi:
        out.append((a, b))
        return
    mid = (a + b) // 2
    _nodes(a, mid, lo, hi, out)
    _nodes(mid, b, lo, hi, out)


def tree_total(
    lo: int, hi: int, *, sums: Mapping[Node, np.ndarray] | None = None, rows: Mapping[int, Row] | None = None
) -> np.ndarray | None:
    """The tree's sum over node [lo, hi), from node sums already made (`sums`, never written to)
    and from devices' rows at their positions (`rows`, made into leaves as the walk reaches
    them), or None when nothing lies inside it. The result may be one of `sums`' arrays."""
    if lo >= hi:
        return None
    # (A module-level walk, not a recursive closure: a closure that calls itself is a reference
    # cycle, which kept every row of the round alive until the garbage collector ran.)
    return _walk(lo, hi, sums or {}, rows or {}, [])[0]


def _walk(
    a: int, b: int, sums: Mapping[Node, np.ndarray], rows: Mapping[int, Row], scratch: list[np.ndarray]
) -> tuple[np.ndarray | None, bool]:
    """(sum over [a, b), owned: a fresh array the walk may write into)."""
    if (a, b) in sums:
        return sums[(a, b)], False
    if b - a == 1:
        row = rows.get(a)
        return (leaf(*row), True) if row is not None else (None, False)
    mid = (a + b) // 2
    left, left_owned = _walk(a, mid, sums, rows, scratch)
    if left is not None and left_owned and b - mid == 1 and mid in rows and (mid, b) not in sums:  # a right leaf, via scratch
        if not scratch:
            scratch.append(np.empty_like(left))
        left += leaf(*rows[mid], out=scratch[0])
        return left, True
    right, right_owned = _walk(mid, b, sums, rows, scratch)
    if left is None or right is None:
        return (right, right_owned) if left is None else (left, left_owned)
    if left_owned:
        left += right
        return left, True
    if right_owned:
        right += left  # = left + right: IEEE addition commutes
        return right, True
    return left + right, True


class TreeFolder:
    """The sums of the cohort tree's maximal nodes inside [lo, hi) (`tree_nodes`), folded while
    the rows arrive: a node is summed as soon as every position under it has arrived (`add`) or
    is known to hold no trained device (`skip`), so a job's rows need not all be alive at once
    (in position order at most O(log n) of them are). The additions are `tree_total`'s (a leaf
    is w u in float64, a node left + right, an empty child skipped), so `finish` gives the same
    bits as `tree_total(*node, rows=...)` for each node, whatever order the positions come in."""

    def __init__(self, lo: int, hi: int, n: int) -> None:
        self.roots = tree_nodes(lo, hi, n)
        self.lo, self.hi = lo, hi
        # Complete nodes whose parent is not: a float64 array (owned), a row not yet made a
        # leaf, or None (nothing trained under it).
        self._done: dict[Node, np.ndarray | Row | None] = {}
        self._seen: set[int] = set()

    def add(self, position: int, row: Row) -> None:
        """Position `position`'s device trained: its (update, weight) row (only read)."""
        self._arrive(position, row)

    def skip(self, position: int) -> None:
        """Position `position`'s device has no row (it failed or was rejected)."""
        self._arrive(position, None)

    def finish(self) -> list[tuple[Node, np.ndarray]]:
        """(node, float64 sum) of every root node that holds a trained device, left to right.
        Every position of [lo, hi) must have been added or skipped."""
        if len(self._seen) != self.hi - self.lo:
            raise ValueError(f"positions {sorted(set(range(self.lo, self.hi)) - self._seen)[:5]} neither added nor skipped")
        out = []
        for root in self.roots:
            value = _owned(self._done.pop(root))
            if value is not None:
                out.append((root, value))
        return out

    def _arrive(self, position: int, value: Row | None) -> None:
        if not self.lo <= position < self.hi or position in self._seen:
            raise ValueError(f"position {position} is outside [{self.lo}, {self.hi}) or came twice")
        self._seen.add(position)
        path = self._path(position)  # root ... leaf
        node: Node = path[-1]
        self._done[node] = value
        for parent in reversed(path[:-1]):
            mid = (parent[0] + parent[1]) // 2
            left, right = (parent[0], mid), (mid, parent[1])
            if left not in self._done or right not in self._done:
                break
            self._done[parent] = _combine(self._done.pop(left), self._done.pop(right))
            node = parent
        waiting = self._done[node]
        if isinstance(waiting, tuple) and _pins_more(waiting[0]):
            # A row left waiting for its sibling is copied: as a view (a vectorized group's
            # updates are rows of one [devices, params] tensor) it would keep the whole group's
            # tensor alive.
            self._done[node] = (np.array(waiting[0]), waiting[1])

    def _path(self, position: int) -> list[Node]:
        root = next(r for r in self.roots if r[0] <= position < r[1])
        path = [root]
        a, b = root
        while b - a > 1:
            mid = (a + b) // 2
            a, b = (a, mid) if position < mid else (mid, b)
            path.append((a, b))
        return path


def _pins_more(row: np.ndarray) -> bool:
    """Whether `row` is a view that keeps a larger buffer alive (a numpy base or torch storage)."""
    base = row.base
    if base is None:
        return False
    if isinstance(base, torch.Tensor):
        return base.untyped_storage().nbytes() > row.nbytes
    return getattr(base, "nbytes", 0) > row.nbytes


def _owned(value: np.ndarray | Row | None) -> np.ndarray | None:
    """A node's value as a float64 array the folder owns (a row becomes its leaf)."""
    return leaf(*value) if isinstance(value, tuple) else value


def _combine(left: np.ndarray | Row | None, right: np.ndarray | Row | None) -> np.ndarray | Row | None:
    if left is None or right is None:
        return right if left is None else left  # an empty child is skipped, never added as zeros
    total = _owned(left)
    total += leaf(*right) if isinstance(right, tuple) else right  # IEEE addition commutes: left + right
    return total


class RunningSum:
    """The round's (weighted) sum of device updates, finished over the cohort's tree."""

    def __init__(self, num_params: int) -> None:
        self.total = torch.zeros(num_params, dtype=torch.float64)
        self.weight = 0.0
        self.count = 0

    def add_tree(
        self, n: int, weight: float, count: int, *, sums: Mapping[Node, np.ndarray] | None = None,
        rows: Mapping[int, Row] | None = None,
    ) -> None:  # fmt: skip
        """Set the total to the tree's root over [0, n) from node sums and rows (`tree_total`);
        `weight` and `count` are the summed weights and devices of what went in."""
        root = tree_total(0, n, sums=sums, rows=rows)
        if root is not None:
            self.total = torch.from_numpy(np.array(root, dtype=np.float64))  # a copy: sums may be read-only views
        self.weight += weight
        self.count += count

    def add_all(self, updates: list[tuple[int, torch.Tensor | np.ndarray, float]]) -> None:
        """The round's total from (device_id, update, weight) rows, once: the tree over their
        device-id ranks, whatever order the rows come in."""
        if self.count:
            raise ValueError("add_all sets a round's total once; make a new RunningSum")
        ordered = sorted(updates, key=lambda t: t[0])
        rows = {i: (np.asarray(u), w) for i, (_, u, w) in enumerate(ordered)}
        self.add_tree(len(ordered), sum(w for _, _, w in ordered), len(ordered), rows=rows)

    def mean(self) -> torch.Tensor:
        if self.weight <= 0:
            raise ValueError("no device updates to average")
        return (self.total / self.weight).to(torch.float32)
