"""Which worker simulates which devices in a round: the cohort cut over the live workers.

Used by the round loop (fedsim.server_app) and by the sample-level audit's canary devices
(fedsim.audit), which send their own plain jobs; neither depends on the other for it.
"""

from __future__ import annotations

import numpy as np

from fedsim import wire


def assign_devices(
    cohort: list[int], nodes: list[int], layout: str, device_group: int | None = None
) -> list[wire.Assignment]:
    """(node id, device ids) per worker that has work this round; `.groups` the group sizes.

    multiplexed: the sorted cohort is cut into near-equal contiguous chunks, one per worker.
    With `device_group` (vectorized training, RunSetup.device_group), the sorted cohort is
    first cut into near-equal groups, which depend on the cohort alone, never on the workers:
    a device's batched update depends on its group, so this keeps runs bit-identical whatever
    the number of workers. The number of groups is ceil(len / device_group) rounded up to an
    even number (machines have an even number of cores: a cohort of 50 in groups of at most
    32 is 2 x 25, so 2 workers share it evenly). Whole groups then go to the workers,
    contiguously, near-equal group counts per worker.
    classic: device d is simulated by the d-th SuperNode (nodes sorted by id), alone.
    """
    if layout == "classic":
        return [wire.Assignment(nodes[d], [d]) for d in cohort]
    if device_group is None:
        chunks = np.array_split(np.asarray(cohort, dtype=np.int64), len(nodes))
        return [wire.Assignment(node, chunk.tolist()) for node, chunk in zip(nodes, chunks, strict=True) if len(chunk)]
    if not cohort:
        return []
    ordered = np.sort(np.asarray(cohort, dtype=np.int64))
    count = -(-len(ordered) // device_group)
    count = min(count + count % 2, len(ordered))
    groups = np.array_split(ordered, count)
    per_worker = np.array_split(np.arange(len(groups)), min(len(nodes), len(groups)))  # nodes idle past the groups
    return [
        wire.Assignment(node, [int(d) for g in mine for d in groups[g]], [len(groups[g]) for g in mine])
        for node, mine in zip(nodes, per_worker, strict=False)
    ]
