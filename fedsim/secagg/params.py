"""Choosing SecAgg+'s neighbour count k and Shamir threshold t from a stated threat model.

Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS,
sec. 3-4) show that SecAgg over a sparse random graph keeps the guarantee of the complete graph
(the server learns only the sum of the honest survivors' inputs) if the graph G, the corrupt
set C and the dropout set D satisfy, except with probability 2^-sigma:

  (S1) the subgraph of G on the honest devices that survive is connected (otherwise the server
       learns the sum of each connected part separately);
  (S2) every honest device i has fewer than t corrupt neighbours (|N(i) & C| < t), so the
       colluders alone never hold t shares of its secrets; against a server that may lie about
       who dropped (Bell et al.'s semi-malicious setting, Bonawitz et al. 2017 sec. 6) the
       stronger 2t > k + |N(i) & C|: the server can split i's k - c honest neighbours into one
       group told "i survived" (they reveal b_i-shares) and one told "i dropped" (s_i-shares),
       and rebuilds both secrets only if both groups plus the c colluders reach t, i.e. only if
       k - c + 2c >= 2t;

and, for correctness, except with probability 2^-eta:

  (C)  every device keeps at least t neighbours that survive every stage, so each secret the
       server needs has t shares (a round aborts otherwise).

Our graph is the Harary graph H(k, n) over a uniformly random ordering of the cohort (each
device joined to the k/2 nearest on either side of a ring), as in Google's SecAgg+ parameter
finder for Bell et al.'s construction; k = n - 1 is the complete graph (classic SecAgg). The
probabilities are computed exactly, with integers, under these assumptions:

  * at most C = floor(gamma n) devices of the cohort collude with the server, and at most
    D devices drop out (at any stage) in a round; which ones does not depend on the ring order
    (static corruption; the order is public randomness drawn after the cohort is fixed);
  * then a fixed device's k neighbours are a uniformly random k-subset of the other n - 1, so
    its number of corrupt (dropped) neighbours is hypergeometric: Hyp(N=n-1, K=C (D), draws=k);
  * S1: removing a set B from H(k, n) disconnects it only if B contains two disjoint,
    non-adjacent runs of k/2 consecutive ring positions (with one run or none, consecutive
    remaining devices are at most k/2 apart around the ring, hence joined). There are
    n (n - k - 1) / 2 such pairs and each lies inside B (|B| <= C + D) with probability
    C(|B|, k) / C(n, k): a union bound.
  * S2 and C: a union bound over the n devices of the hypergeometric tail.

sigma is split evenly between S1 and S2 (2^-(sigma+1) each) and eta between "more than D
dropouts" and C (2^-(eta+1) each). D is either given (max_dropout_fraction: an assumption the
run cannot check) or derived from the configured per-stage dropout rates: each device drops
independently with probability p = 1 - prod(1 - rate), and D is the smallest count with
P(Binomial(n, p) > D) <= 2^-(eta+1). t is the smallest threshold that S2 allows (at least 2;
in the active model S2 itself puts t above k/2); the search returns the smallest even k for
which that t also satisfies C, else the complete graph, else it refuses. A smaller t keeps
more rounds alive under dropouts; a larger one only matters against more colluders, which
the threat model says there are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

__all__ = [
    "THREAT_MODELS",
    "GraphChoice",
    "ThreatModel",
    "Unsatisfiable",
    "check_params",
    "choose_params",
    "dropout_bound",
]

THREAT_MODELS = ("semi_honest", "active")


class Unsatisfiable(ValueError):
    """No (k, t) meets the threat model for this cohort, or a given (k, t) does not."""


@dataclass(frozen=True)
class ThreatModel:
    """What SecAgg+ must withstand in one round.

    model: "semi_honest" (the server follows the protocol and reports dropouts truthfully) or
    "active" (it may lie about who dropped; devices then also run the consistency check).
    max_corrupt_fraction gamma: fraction of the cohort that colludes with the server.
    max_dropout_fraction delta: fraction of the cohort that may drop (None: derive it from
    dropout_rate). dropout_rate: each device's probability of dropping at some stage.
    security_bits sigma: the guarantee fails with probability <= 2^-sigma.
    correctness_bits eta: a round aborts with probability <= 2^-eta (under the dropout model).
    """

    model: str = "semi_honest"
    max_corrupt_fraction: float = 0.0
    max_dropout_fraction: float | None = None
    dropout_rate: float = 0.0
    security_bits: int = 40
    correctness_bits: int = 20

    def __post_init__(self) -> None:
        if self.model not in THREAT_MODELS:
            raise ValueError(f"threat model {self.model!r}; allowed: {', '.join(THREAT_MODELS)}")
        if not 0 <= self.max_corrupt_fraction < 1:
            raise ValueError(f"max_corrupt_fraction must be in [0, 1), got {self.max_corrupt_fraction}")
        if self.max_dropout_fraction is not None and not 0 <= self.max_dropout_fraction < 1:
            raise ValueError(f"max_dropout_fraction must be in [0, 1), got {self.max_dropout_fraction}")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.security_bits < 1 or self.correctness_bits < 1:
            raise ValueError("security_bits and correctness_bits must be >= 1")

    def corrupt(self, n: int) -> int:
        """C: colluding devices in a cohort of n (floor, with a guard against float error)."""
        return min(n, math.floor(self.max_corrupt_fraction * n + 1e-9))

    def dropouts(self, n: int) -> int:
        """D: devices that may drop out of a cohort of n."""
        if self.max_dropout_fraction is not None:
            return min(n, math.floor(self.max_dropout_fraction * n + 1e-9))
        return dropout_bound(n, self.dropout_rate, self.correctness_bits + 1)


@dataclass(frozen=True)
class GraphChoice:
    """A (k, t) for a cohort of n and what it guarantees (log2 of the failure bounds)."""

    n: int
    neighbours: int  # k
    threshold: int  # t
    corrupt: int  # C
    dropouts: int  # D
    log2_insecure: float  # log2 of the union bound on S1 or S2 failing (-inf: impossible)
    log2_abort: float  # log2 of the bound on a round aborting (given at most D dropouts if D is configured)
    threat: ThreatModel

    @property
    def complete(self) -> bool:
        return self.neighbours == self.n - 1

    def describe(self) -> str:
        """One line for logs and summary.json."""
        tm = self.threat
        graph = "complete graph" if self.complete else f"Harary graph, k={self.neighbours}"
        where = "given" if tm.max_dropout_fraction is not None else f"from drop rates, p={tm.dropout_rate:.3g}"
        return (
            f"SecAgg+ {tm.model} over a cohort of {self.n}: {graph}, t={self.threshold}; holds against up to "
            f"{self.corrupt} colluding devices (gamma={tm.max_corrupt_fraction:.3g}) and {self.dropouts} dropouts "
            f"({where}) except with probability <= {_bound(self.log2_insecure)} (sigma={tm.security_bits}); "
            f"aborts with probability <= {_bound(self.log2_abort)} (eta={tm.correctness_bits})"
        )

    def as_dict(self) -> dict:
        tm = self.threat
        return {
            "threat_model": tm.model,
            "cohort": self.n,
            "neighbours_k": self.neighbours,
            "threshold_t": self.threshold,
            "complete_graph": self.complete,
            "max_corrupt_fraction_gamma": tm.max_corrupt_fraction,
            "max_corrupt_devices": self.corrupt,
            "max_dropout_fraction_delta": self.dropouts / self.n,
            "max_dropouts": self.dropouts,
            "dropout_bound_from": "config" if tm.max_dropout_fraction is not None else f"drop rates (p={tm.dropout_rate:.6g})",
            "security_bits_sigma": tm.security_bits,
            "correctness_bits_eta": tm.correctness_bits,
            # log2 of the bounds; null: the event is impossible under the assumptions (JSON has no -inf)
            "log2_insecure_bound": _finite_or_none(self.log2_insecure),
            "log2_abort_bound": _finite_or_none(self.log2_abort),
            "insecure_probability_bound": _bound(self.log2_insecure),
            "abort_probability_bound": _bound(self.log2_abort),
        }


def _finite_or_none(x: float) -> float | None:
    return None if x == -math.inf else x


def _bound(log2_p: float) -> str:
    return "0 (impossible under these assumptions)" if log2_p == -math.inf else f"2^{log2_p:.1f}"


def _log2(x: Fraction | int) -> float:
    if x <= 0:
        return -math.inf
    x = Fraction(x)
    return math.log2(x.numerator) - math.log2(x.denominator)


def _hyp_count(n_others: int, bad: int, draws: int, x: int) -> int:
    """C(bad, x) C(n_others - bad, draws - x): P(Hyp(N=n_others, K=bad, draws) = x) times C(n_others, draws)."""
    bad = min(bad, n_others)
    if x < 0 or x > min(bad, draws) or draws - x > n_others - bad:
        return 0
    return math.comb(bad, x) * math.comb(n_others - bad, draws - x)


def _hyp_tail(n_others: int, bad: int, draws: int, at_least: int) -> int:
    """P(Hyp >= at_least) times C(n_others, draws)."""
    return sum(_hyp_count(n_others, bad, draws, x) for x in range(max(at_least, 0), draws + 1))


def _smallest_tail_index(n_others: int, bad: int, draws: int, denominator: int, scale: int) -> int:
    """Smallest c with scale * P(Hyp >= c) * denominator-units <= denominator (exact integers).

    Walks down from the top and stops at the first tail that is too large, so it costs
    draws - c terms.
    """
    tail = 0
    for c in range(draws, -1, -1):
        tail += _hyp_count(n_others, bad, draws, c)
        if scale * tail > denominator:
            return c + 1
    return 0


def dropout_bound(n: int, rate: float, bits: int) -> int:
    """Smallest D with P(Binomial(n, rate) > D) <= 2^-bits, in exact integer arithmetic.

    The rate is first rounded up to a multiple of 2^-16: a larger p only makes the tail heavier
    (the binomial is stochastically increasing in p), so the D returned is safe for `rate`, and
    the integers stay around 16 n bits instead of 53 n.
    """
    if rate <= 0:
        return 0
    scale = 1 << 16
    a = min(scale - 1, math.ceil(rate * scale))  # p' = a / 2^16 >= rate
    q = scale - a
    # P(X = x) 2^(16 n) = C(n, x) a^x q^(n - x); walk down from x = n, stopping at the first tail too large.
    limit = 1 << (16 * n - bits)  # P(X > D) <= 2^-bits  <=>  tail(D) 2^-16n <= 2^-bits
    tail, a_pow, q_pow = 0, a**n, 1
    for d in range(n, -1, -1):
        if tail > limit:  # tail = P(X > d) 2^(16 n)
            return d + 1
        tail += math.comb(n, d) * a_pow * q_pow
        if d:
            a_pow //= a  # exact: a_pow = a^d
            q_pow *= q
    return 0


@dataclass(frozen=True)
class _Bounds:
    """For one k: the smallest secure t and the largest t that meets the correctness budget."""

    t_min: int | None  # None: no t <= k is secure
    t_max: int  # largest t whose abort bound is <= 2^-(eta+1) (may be < t_min)
    log2_insecure: float
    log2_abort: float


def _bounds(n: int, k: int, corrupt: int, dropouts: int, tm: ThreatModel, t: int | None = None) -> _Bounds:
    """Exact union bounds of the module docstring for k (and t if given, else the smallest secure t)."""
    sigma, eta = tm.security_bits, tm.correctness_bits
    floor_t = k // 2 + 1 if tm.model == "active" else min(2, k)
    if k == n - 1:  # complete graph: every other device is a neighbour, always connected
        c_star = corrupt + 1  # an honest device has exactly C corrupt neighbours
        s1, s2_of = Fraction(0), (lambda at_least: Fraction(int(corrupt >= at_least)))
        abort_of = lambda t_: Fraction(int(n - 1 - dropouts < t_))  # noqa: E731
        t_max = n - 1 - dropouts
    else:
        denominator = math.comb(n - 1, k)
        # S1: two disjoint non-adjacent runs of k/2 bad ring positions, n (n-k-1)/2 pairs.
        s1 = Fraction(n * (n - k - 1) * math.comb(min(n, corrupt + dropouts), k), 2 * math.comb(n, k))
        if s1 > Fraction(1, 2 ** (sigma + 1)):
            return _Bounds(None, 0, _log2(s1), 0.0)
        c_star = _smallest_tail_index(n - 1, corrupt, k, denominator, n << (sigma + 1))
        s2_of = lambda at_least: Fraction(n * _hyp_tail(n - 1, corrupt, k, at_least), denominator)  # noqa: E731
        # A device aborts when >= k - t + 1 of its neighbours drop: allowed iff that tail fits 2^-(eta+1).
        e_star = _smallest_tail_index(n - 1, dropouts, k, denominator, n << (eta + 1))
        abort_of = lambda t_: min(Fraction(1), Fraction(n * _hyp_tail(n - 1, dropouts, k, k - t_ + 1), denominator))  # noqa: E731
        t_max = k + 1 - e_star
    if tm.model == "semi_honest":  # S2: fewer than t corrupt neighbours
        t_min: int | None = max(floor_t, c_star)
    else:  # S2 against a lying server: 2t > k + corrupt neighbours, i.e. 2t - k >= c_star
        t_min = max(floor_t, -(-(k + c_star) // 2))
    if t_min > k:
        t_min = None
    t_eval = t if t is not None else t_min
    if t_eval is None:
        return _Bounds(None, t_max, 0.0, 0.0)
    at_least = t_eval if tm.model == "semi_honest" else 2 * t_eval - k
    return _Bounds(t_min, t_max, _log2(s1 + s2_of(at_least)), _log2(abort_of(t_eval)))


def _choice(n: int, k: int, t: int, tm: ThreatModel, corrupt: int, dropouts: int, b: _Bounds) -> GraphChoice:
    log2_abort = b.log2_abort
    if tm.max_dropout_fraction is None and dropouts < n and tm.dropout_rate > 0:
        # D came from the drop rates: add the chance that more than D devices drop (<= 2^-(eta+1)).
        log2_abort = math.log2(2.0 ** -(tm.correctness_bits + 1) + 2.0**log2_abort)
    return GraphChoice(
        n=n, neighbours=k, threshold=t, corrupt=corrupt, dropouts=dropouts,
        log2_insecure=b.log2_insecure, log2_abort=log2_abort, threat=tm,
    )  # fmt: skip


@lru_cache(maxsize=256)
def choose_params(n: int, tm: ThreatModel) -> GraphChoice:
    """The cheapest (smallest k, then smallest t) Harary graph meeting `tm` for a cohort of n.

    Raises Unsatisfiable (with the reason) if not even the complete graph does.
    """
    if n < 2:
        raise Unsatisfiable(f"secure aggregation needs at least 2 devices, got {n}")
    corrupt, dropouts = tm.corrupt(n), tm.dropouts(n)
    for k in [*range(2, n - 1, 2), n - 1]:
        b = _bounds(n, k, corrupt, dropouts, tm)
        if b.t_min is not None and b.t_min <= b.t_max:
            return _choice(n, k, b.t_min, tm, corrupt, dropouts, b)
    k = n - 1
    rule = "t > C" if tm.model == "semi_honest" else "2t > k + C"
    if b.t_min is None:
        raise Unsatisfiable(
            f"no k <= cohort size {n} is secure against {corrupt} colluding devices ({tm.model}: needs {rule} "
            f"with t <= k = {k}); lower max_corrupt_fraction or grow the cohort"
        )
    raise Unsatisfiable(
        f"no k <= cohort size {n} both holds against {corrupt} colluding devices ({tm.model}: {rule}, so t >= "
        f"{b.t_min} even on the complete graph) and keeps t neighbours through {dropouts} dropouts (abort "
        f"probability <= 2^-{tm.correctness_bits}; only {n - 1 - dropouts} would remain); lower the drop rates or "
        "max_dropout_fraction, max_corrupt_fraction or correctness_bits, or grow the cohort"
    )


def check_params(n: int, k: int, t: int | None, tm: ThreatModel) -> GraphChoice:
    """Check an explicit k (and t; None: the smallest safe t for k) against `tm`.

    Raises Unsatisfiable saying which bound fails. Only security is enforced: an explicit t
    that aborts more often than 2^-eta is allowed (its abort bound is reported).
    """
    corrupt, dropouts = tm.corrupt(n), tm.dropouts(n)
    if t is None:
        t = _bounds(n, k, corrupt, dropouts, tm).t_min or k
    if not (k == n - 1 or (k % 2 == 0 and 2 <= k < n - 1)) or not 1 <= t <= k:
        raise Unsatisfiable(f"k={k}, t={t} for a cohort of {n}: need k even in [2, n-2] or k = n-1, and 1 <= t <= k")
    b = _bounds(n, k, corrupt, dropouts, tm, t)
    if b.t_min is None or t < b.t_min:
        rule = "fewer than t corrupt neighbours" if tm.model == "semi_honest" else "2t > k + corrupt neighbours, t > k/2"
        raise Unsatisfiable(
            f"k={k}, t={t} is unsafe for a cohort of {n} against {corrupt} colluding devices and {dropouts} dropouts "
            f"({tm.model} needs the honest survivors connected and {rule}, except with probability "
            f"2^-{tm.security_bits}; " + (f"smallest safe t for this k: {b.t_min})" if b.t_min else "no t is safe for this k)")
        )
    return _choice(n, k, t, tm, corrupt, dropouts, b)
