"""Split a labelled dataset over devices: iid, Dirichlet label skew, and label-sorted shards.

Every partitioner returns a `Partition`: one int64 array holding the example indices of all
devices back to back, and `offsets` (num_parts + 1 ints) marking where each device's slice
starts, so memory is O(examples + devices) whatever the population. Each example is used by
at most one device; iid and shards use every example exactly once.

Recipes:
- iid: a random permutation cut into near-equal parts.
- dirichlet: label skew of Hsu et al. 2019 ("Measuring the effects of non-identical data
  distribution for federated visual classification"), in the per-class form of Yurochkin et
  al. 2019 that most FL code uses: for each class c, p_c ~ Dir(alpha * 1_K) over the K devices
  and class c's examples are dealt out in those proportions.
- shards: the pathological non-iid split of McMahan et al. 2017 (FedAvg, Sec. 3): sort by
  label, cut into K * shards_per_part shards, deal shards_per_part random shards to each device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Partition:
    """Example indices of every device: device k owns indices[offsets[k]:offsets[k + 1]]."""

    indices: np.ndarray  # int64 [total examples assigned]
    offsets: np.ndarray  # int64 [num_parts + 1], offsets[0] == 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def part(self, k: int) -> np.ndarray:
        """Indices owned by device k (a view; do not modify)."""
        return self.indices[self.offsets[k] : self.offsets[k + 1]]

    def sizes(self) -> np.ndarray:
        """Number of examples of every device."""
        return np.diff(self.offsets)


def iid_partition(num_examples: int, num_parts: int, rng: np.random.Generator) -> Partition:
    """A random permutation of all examples cut into num_parts parts whose sizes differ by <= 1."""
    _check_parts(num_examples, num_parts)
    indices = rng.permutation(num_examples).astype(np.int64)
    offsets = (np.arange(num_parts + 1, dtype=np.int64) * num_examples) // num_parts
    return Partition(indices, offsets)


def dirichlet_partition(
    labels: np.ndarray, num_parts: int, alpha: float, rng: np.random.Generator
) -> Partition:
    """Per-class Dirichlet(alpha) label skew (Hsu et al. 2019; Yurochkin et al. 2019).

    Every device ends with at least one example: a draw can leave devices empty (with small
    alpha or many devices, almost surely), and re-drawing until none is empty may never end,
    so each empty device instead receives one example picked at random from the surplus of
    the devices holding two or more (every donor keeps at least one). The Dirichlet draw of
    all other devices is kept, minus at most the donated examples.
    """
    labels = np.asarray(labels)
    _check_parts(len(labels), num_parts)
    owner = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_parts, alpha))
        # Cumulative cut points, with the last forced to the class size against rounding.
        cuts = np.floor(np.cumsum(proportions) * len(members)).astype(np.int64)
        cuts[-1] = len(members)
        counts = np.diff(cuts, prepend=0)
        owner[members] = np.repeat(np.arange(num_parts, dtype=np.int64), counts)
    _fill_empty_parts(owner, num_parts, rng)
    return _group_by_owner(owner, num_parts)


def shard_partition(
    labels: np.ndarray, num_parts: int, shards_per_part: int, rng: np.random.Generator
) -> Partition:
    """Label-sorted shards, shards_per_part random ones per device (McMahan et al. 2017)."""
    labels = np.asarray(labels)
    num_shards = num_parts * shards_per_part
    if num_shards > len(labels):
        raise ValueError(f"{num_shards} shards need at least as many examples, got {len(labels)}")
    _check_parts(len(labels), num_parts)
    # Shuffle before the stable sort so the examples of one label are in random order.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shard_bounds = (np.arange(num_shards + 1, dtype=np.int64) * len(labels)) // num_shards
    shard_of_position = np.repeat(np.arange(num_shards), np.diff(shard_bounds))
    part_of_shard = np.empty(num_shards, dtype=np.int64)
    part_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // shards_per_part
    owner = np.empty(len(labels), dtype=np.int64)
    owner[by_label] = part_of_shard[shard_of_position]
    return _group_by_owner(owner, num_parts)


def _check_parts(num_examples: int, num_parts: int) -> None:
    if not 1 <= num_parts <= num_examples:
        raise ValueError(f"cannot split {num_examples} examples into {num_parts} non-empty parts")


def _fill_empty_parts(owner: np.ndarray, num_parts: int, rng: np.random.Generator) -> None:
    """Give every part that owns nothing one example from another part's surplus (in place)."""
    counts = np.bincount(owner, minlength=num_parts)
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return
    # The first example of every non-empty part (in a random order) stays; all others may go.
    order = rng.permutation(len(owner))
    _, first_positions = np.unique(owner[order], return_index=True)
    surplus = np.ones(len(owner), dtype=bool)
    surplus[order[first_positions]] = False
    donated = rng.choice(np.flatnonzero(surplus), size=len(empty), replace=False)
    owner[donated] = empty


def _group_by_owner(owner: np.ndarray, num_parts: int) -> Partition:
    indices = np.argsort(owner, kind="stable").astype(np.int64)
    offsets = np.zeros(num_parts + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=num_parts), out=offsets[1:])
    return Partition(indices, offsets)
