"""Which worker simulates which devices in a round: the cohort cut over the live workers.

Used by the round loop (fedsim.server_app) and by the sample-level audit's canary devices
(fedsim.audit), which send their own plain jobs; neither depends on the other for it.
"""

from __future__ import annotations

import numpy as np

from fedsim import wire


def cohort_groups(cohort: list[int], device_group: int) -> list[list[int]]:
    """The round's device groups for vectorized training: the sorted cohort cut into near-equal
    contiguous groups of at most `device_group` devices. They depend on the cohort alone, never
    on the workers: a group trains as one batched computation, so a device's update depends on
    its group, and the model is the same bits whatever the number of workers. The number of
    groups is ceil(len / device_group) rounded up to an even number (machines have an even
    number of cores: a cohort of 50 in groups of at most 32 is 2 x 25, so 2 workers share it
    evenly), and at most one group per device.
    """
    if not cohort:
        return []
    ordered = np.sort(np.asarray(cohort, dtype=np.int64))
    count = -(-len(ordered) // device_group)
    count = min(count + count % 2, len(ordered))
    return [[int(d) for d in group] for group in np.array_split(ordered, count)]


def assign_devices(
    cohort: list[int], nodes: list[int], layout: str, device_group: int | None = None
) -> list[wire.Assignment]:
    """(node id, device ids) per worker that has work this round; `.groups` the group sizes.

    multiplexed: the sorted cohort is cut into near-equal contiguous chunks, one per worker (a
    worker's devices are then a contiguous range of the cohort: fedsim.aggregation's tree sums
    follow from it). With `device_group` (vectorized training, RunSetup.vectorized), the
    cohort's groups (`cohort_groups`) go to the workers whole, contiguously, near-equal group
    counts per worker; a worker past the last group has no job.
    classic: device d is simulated by the d-th SuperNode (nodes sorted by id), alone.
    """
    if layout == "classic":
        return [wire.Assignment(nodes[d], [d]) for d in cohort]
    if device_group is None:
        chunks = np.array_split(np.sort(np.asarray(cohort, dtype=np.int64)), len(nodes))
        return [wire.Assignment(node, chunk.tolist()) for node, chunk in zip(nodes, chunks, strict=True) if len(chunk)]
    groups = cohort_groups(cohort, device_group)
    if not groups:
        return []
    per_worker = np.array_split(np.arange(len(groups)), min(len(nodes), len(groups)))  # nodes idle past the groups
    return [
        wire.Assignment(node, [d for g in mine for d in groups[g]], [len(groups[g]) for g in mine])
        for node, mine in zip(nodes, per_worker, strict=False)
    ]
