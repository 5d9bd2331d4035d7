"""The privacy/utility Pareto frontier: runs no other run beats on both epsilon and accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (epsilon, accuracy) points, by increasing epsilon.

    Lower epsilon and higher accuracy are better. Point i is dominated if some j has
    epsilon_j <= epsilon_i and accuracy_j >= accuracy_i with at least one strict. Equal
    points do not dominate each other (both are kept). Points with a non-finite
    coordinate are never on the frontier.
    """
    finite = [i for i, (e, a) in enumerate(points) if math.isfinite(e) and math.isfinite(a)]
    frontier = []
    for i in finite:
        ei, ai = points[i]
        dominated = any(
            points[j][0] <= ei and points[j][1] >= ai and (points[j][0] < ei or points[j][1] > ai) for j in finite
        )
        if not dominated:
            frontier.append(i)
    return sorted(frontier, key=lambda i: (points[i][0], -points[i][1], i))
