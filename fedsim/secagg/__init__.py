"""Secure aggregation: SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) with fixed-point encoding
and Skellam distributed DP noise (Agarwal, Kairouz, Liu 2021).

Transport-free: every stage is a method taking and returning plain dicts (see protocol.py for
the message formats), so the same state machines run in-process or over Flower messages.
"""

from fedsim.secagg.crypto import TamperedShare
from fedsim.secagg.ddp import (
    grid_variance,
    per_device_variance,
    realized_total_variance,
    skellam,
    skellam_tail_bound,
)
from fedsim.secagg.params import GraphChoice, ThreatModel, Unsatisfiable, check_params, choose_params
from fedsim.secagg.protocol import (
    STAGES,
    KeyRegistry,
    ProtocolViolation,
    RoundResult,
    SecAggAborted,
    SecAggDevice,
    SecAggParams,
    SecAggServer,
    neighbour_graph,
    payload_nbytes,
    simulate_round,
    stages,
)
from fedsim.secagg.quantize import FixedPoint, check_modulus_bits, required_modulus_bits, to_ring

__all__ = [
    "STAGES",
    "FixedPoint",
    "GraphChoice",
    "KeyRegistry",
    "ProtocolViolation",
    "RoundResult",
    "SecAggAborted",
    "SecAggDevice",
    "SecAggParams",
    "SecAggServer",
    "TamperedShare",
    "ThreatModel",
    "Unsatisfiable",
    "check_modulus_bits",
    "check_params",
    "choose_params",
    "grid_variance",
    "neighbour_graph",
    "payload_nbytes",
    "per_device_variance",
    "realized_total_variance",
    "required_modulus_bits",
    "simulate_round",
    "skellam",
    "skellam_tail_bound",
    "stages",
    "to_ring",
]
