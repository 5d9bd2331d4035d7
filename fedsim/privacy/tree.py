"""DP-FTRL's noise: tree aggregation with restarts, and its accounting.

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021, "Practical and Private (Deep) Learning
without Sampling or Shuffling" (ICML), Sec. 3-4: instead of fresh noise per round, the server
releases noisy *prefix sums* of the clipped device updates through the binary tree mechanism
(Dwork, Naor, Pitassi, Rothblum 2010; Chan, Shi, Song 2011). Each node of a binary tree over
the rounds 1..T of one tree holds N(0, (z C)^2 I); the noisy prefix sum after round t is

    S~_t = sum_{i <= t} x_i + sum of the noises of the nodes in the dyadic decomposition of [1, t]

(at most floor(log2 t) + 1 nodes). Round t releases the residual S~_t - S~_{t-1}, so a server
SGD step with a constant rate follows the FTRL iterate theta_t = theta_0 + eta S~_t; any other
server step is post-processing. Restarts (Sec. 4, "tree restarts"): every `restart_every`
rounds a new tree starts, with fresh noise and a prefix sum starting again at 0.

Privacy (zero-out adjacency: one device's data replaced by none, its updates 0, in a population
whose size, hence the schedule, is public; each contribution clipped to L2 norm C; replace-one
adjacency doubles every sensitivity and is reported beside it). The released node
sums form one Gaussian mechanism: a device that took part in the rounds P of a tree moves node
v's sum by at most n_v C, n_v = |P intersect v|, so the L2 sensitivity over the released nodes is
C sqrt(sum_v n_v^2). Every node is released once, with independent noise, as an adaptively
chosen Gaussian query; Gaussian DP composes adaptively as mu = sqrt(sum mu_j^2) (Dong, Roth, Su
2022, "Gaussian Differential Privacy", Cor. 3.3), so a device's whole run is mu-GDP with

    mu = sqrt(sum over trees, sum over released nodes of n_v^2) / z

and (epsilon, delta)-DP for delta(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2)
(ibid., Cor. 2.13), which is exact for the Gaussian mechanism (Balle, Wang 2018, Thm. 8). No
amplification by sampling is claimed: the participation pattern is the cyclic schedule of
fedsim.sampling (every device once per cycle of B = population // cohort.size rounds, fixed
before the run, independent of the data), and the reported epsilon is that of the device whose
pattern gives the largest mu. A node that is never used in a prefix is never drawn or released.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from scipy.optimize import brentq
from scipy.stats import norm

Node = tuple[int, int]  # (level, index): the rounds index * 2^level + 1 .. (index + 1) * 2^level of a tree


def decomposition(t: int) -> list[Node]:
    """The dyadic nodes whose rounds partition 1..t (one per set bit of t), largest first."""
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    return [(level, (t >> level) - 1) for level in range(t.bit_length() - 1, -1, -1) if t >> level & 1]


def node_rounds(node: Node) -> range:
    level, index = node
    return range(index * 2**level + 1, (index + 1) * 2**level + 1)


@functools.lru_cache(maxsize=64)
def released_nodes(horizon: int) -> frozenset[Node]:
    """Every node some prefix S~_1 .. S~_horizon uses."""
    return frozenset(node for t in range(1, horizon + 1) for node in decomposition(t))


def sensitivity_squared(rounds: list[int], horizon: int) -> int:
    """sum over the released nodes of a tree of n_v^2, for a device that took part in `rounds`
    (positions 1..horizon within the tree): its L2 sensitivity is C times the square root."""
    counts: dict[Node, int] = {}
    for r in rounds:
        if not 1 <= r <= horizon:
            raise ValueError(f"round {r} is outside the tree's 1..{horizon}")
        level = 0
        while 2**level <= horizon:  # the nodes containing r, one per level
            node = (level, (r - 1) >> level)
            counts[node] = counts.get(node, 0) + 1
            level += 1
    used = released_nodes(horizon) if counts else set()
    return sum(n * n for node, n in counts.items() if node in used)


@functools.lru_cache(maxsize=256)
def cyclic_mu_squared(*, horizon: int, restart_every: int, period: int) -> int:
    """The largest sum_trees sum_v n_v^2 (mu^2 z^2) over the devices of a cyclic schedule: device
    class b takes part in the rounds b+1, b+1+period, ... (1-based) up to `horizon`; trees
    restart every `restart_every` rounds."""
    worst = 0
    for b in range(min(period, horizon)):  # classes whose first round is past the horizon never take part
        total = 0
        for start in range(0, horizon, restart_every):
            end = min(start + restart_every, horizon)
            mine = [r - start for r in range(b + 1, end + 1, period) if r > start]
            if mine:
                total += sensitivity_squared(mine, end - start)
        worst = max(worst, total)
    return worst


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism (Dong, Roth, Su 2022, Cor. 2.13)."""
    if mu <= 0:
        return 0.0
    # e^epsilon Phi(b) as exp(epsilon + log Phi(b)): no overflow at large epsilon.
    second = math.exp(min(epsilon + float(norm.logcdf(-epsilon / mu - mu / 2)), 700.0))
    return max(0.0, float(norm.cdf(-epsilon / mu + mu / 2)) - second)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with delta(epsilon) <= delta for a mu-GDP mechanism."""
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
        if hi > 1e7:
            return math.inf
    return float(brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def gdp_mu(epsilon: float, delta: float) -> float:
    """The largest mu whose mechanism is (epsilon, delta)-DP (delta(epsilon) grows with mu)."""
    lo, hi = 1e-9, 1.0
    while gdp_delta(epsilon, hi) < delta:
        hi *= 2
        if hi > 1e7:
            raise ValueError(f"no Gaussian mechanism has epsilon {epsilon:g} at delta {delta:g} below mu = 1e7")
    return float(brentq(lambda m: gdp_delta(epsilon, m) - delta, lo, hi, xtol=1e-14, rtol=1e-12))


class TreeNoise:
    """The noise of each round's residual release S~_t - S~_{t-1} (float64), tree by tree.

    `node_noise(tree, level, index)` draws a node's N(0, std^2 I) vector; it is called once per
    node that a prefix uses, and the nodes of the current prefix are kept (at most
    log2(restart_every) + 1 vectors), so a checkpoint holds them and secure-mode noise (fresh OS
    entropy, not reproducible from any seed) survives a resume."""

    def __init__(self, restart_every: int, node_noise: Callable[[int, int, int], torch.Tensor]) -> None:
        self.restart_every = restart_every
        self.node_noise = node_noise
        self.tree = -1
        self.position = 0  # the tree's last released position (its prefix S~ is released there)
        self.nodes: dict[Node, torch.Tensor] = {}

    def _prefix(self, t: int) -> torch.Tensor | None:
        parts = [self.nodes[node] for node in decomposition(t)]
        return torch.stack(parts).sum(0) if parts else None

    def residual(self, round_num: int) -> torch.Tensor:
        """The noise of round `round_num`'s release (rounds of one tree in increasing order; a
        round that released nothing is skipped: the next release covers it)."""
        tree, t = divmod(round_num - 1, self.restart_every)
        t += 1
        if tree < self.tree or (tree == self.tree and t <= self.position):
            raise ValueError(f"round {round_num} was released already (tree {self.tree}, position {self.position})")
        if tree != self.tree:
            self.tree, self.position, self.nodes = tree, 0, {}
        before = self._prefix(self.position)
        wanted = decomposition(t)
        for node in wanted:
            if node not in self.nodes:
                self.nodes[node] = self.node_noise(tree, *node).to(torch.float64)
        self.nodes = {node: self.nodes[node] for node in wanted}
        after = self._prefix(t)
        assert after is not None
        self.position = t
        return after if before is None else after - before

    def state_dict(self) -> dict[str, Any]:
        return {"tree": self.tree, "position": self.position, "nodes": {f"{l},{i}": v.clone() for (l, i), v in self.nodes.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tree, self.position = int(state["tree"]), int(state["position"])
        self.nodes = {tuple(int(x) for x in k.split(",")): v.clone() for k, v in state["nodes"].items()}  # type: ignore[misc]
