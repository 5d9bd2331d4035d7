"""Which published metrics the run's guarantee covers, and which are diagnostics outside it.

A differential-privacy guarantee covers what is computed from the mechanism's noised releases
(and public configuration): the released models, their evaluation on the server's own test
data, the clip norm adaptive clipping derives from the noisy count, the epsilons the
accountant derives from public parameters. Everything else fedsim logs per round (the
cohort's mean training loss, example and device counts, clipped fractions, timings, bytes) is
computed from the devices' data without noise: useful to debug a simulation, and outside every
epsilon the run reports (issue 14, defect 6). `summary.json` lists those keys under
`diagnostics_outside_guarantee` with the reason, and `output.private_metrics_only=true` leaves
them out of metrics.jsonl; it also keeps the devices' training losses and clipped fractions on
the devices (fedsim.worker.keep_diagnostics), so the server never receives those either.

Assumption behind "covered": the central test set belongs to the server (it is not device
training data), so evaluating a released model on it is post-processing.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedsim.config import FedsimConfig

# Covered whenever some DP mechanism is on: post-processing of released models, public values.
_ALWAYS = {
    "round": "the round number (public)",
    "test_accuracy": "the released model evaluated on the server's test set (post-processing)",
    "test_loss": "the released model evaluated on the server's test set (post-processing)",
}
# Covered by user-level DP-FedAvg: the accountant's output from public parameters, the config,
# and the clip norm (fixed, or updated from the noisy count only: Andrew et al. 2021).
_USER = {
    "user_epsilon": "accounted from public parameters (z, q, rounds)",
    "user_delta": "configuration",
    "user_noise_multiplier": "configuration (or calibrated from public parameters)",
    "user_noise_std": "z times the clip norm (public; noise=tree: the std of each tree node)",
    "user_noise": "configuration",
    "clip_norm": "fixed by the config, or updated from the noisy clipped count only (accounted)",
    "simulated_cohort_size": "configuration",
}
_SAMPLE = {
    "sample_delta": "configuration",
    "noise_multiplier": "configuration (or calibrated from public parameters before the run)",
}
# Why each known diagnostic is outside; keys not listed get the generic reason.
_OUTSIDE = {
    "train_loss": "un-noised example-weighted mean of the trained devices' training losses",
    "num_examples": "un-noised count of the trained devices' examples",
    "clip_fraction": "un-noised mean over the trained devices of the fraction of their per-example gradients DP-SGD clipped",
    "update_clipped_fraction": "un-noised fraction of the cohort's updates that user-level clipping clipped",
    "cohort_size": "un-noised count of sampled devices (Poisson: depends on who is in the population)",
    "devices_trained": "un-noised count of devices whose update was aggregated",
    "devices_failed": "un-noised count of devices that failed",
    "devices_late": "un-noised count of devices past the round deadline (depends on their data sizes)",
    "user_release": "says whether the round's sum was over no device (an un-noised fact about the cohort)",
    "user_release_reason": "says why the round released nothing (un-noised facts about the cohort)",
    "user_realized_noise_multiplier": "depends on how many sampled devices survived (un-noised)",
    "sample_epsilon_max": "per-device epsilons depend on each device's example count and participations",
    "sample_epsilon_median": "per-device epsilons depend on each device's example count and participations",
    "sample_epsilon_cohort_max": "per-device epsilons of the round's cohort (un-noised facts about who trained)",
    "sample_epsilon_cohort_median": "per-device epsilons of the round's cohort (un-noised facts about who trained)",
    "sample_devices_over_budget": "un-noised count of devices excluded by their budget",
}
GENERIC = "computed from the devices' data or the cohort without noise (timing, sizes, counts)"
# Under SecAgg+ the server has only cohort sums of what devices append to their masked vector
# (fedsim.secure_rounds.encode_stats / cohort_metrics), so some statistics are other quantities.
_SECURE_OUTSIDE = {
    "train_loss": "un-noised device-weighted mean (each summed device's mean training loss, clipped to [0, 64]), "
    "from the SecAgg+ cohort sum; not example-weighted",
    "num_examples": "un-noised total of the summed devices' example counts (each capped at 65,535), from the SecAgg+ cohort sum",
    "clip_fraction": "un-noised mean, over the summed devices that drew an example, of the fraction of their "
    "per-example gradients DP-SGD clipped, from SecAgg+ cohort sums",
    "update_clipped_fraction": "un-noised fraction of the summed devices' updates that user-level clipping clipped, "
    "from the SecAgg+ sum of their clipping bits",
}
_DISTRIBUTED_OUTSIDE = {
    "update_clipped_fraction": "the noisy clipped count (accounted, distributed noise) divided by the un-noised number "
    "of devices summed",
}


# Distributed DP-SGD sends neither (fedsim.secure_rounds.stats_names): the keys stay, always null.
_DISTRIBUTED_SGD_OUTSIDE = {
    "train_loss": "not sent under distributed DP-SGD (always null): a device's loss is not covered by its epsilon",
    "clip_fraction": "not sent under distributed DP-SGD (always null): a device's clipped fraction is not covered by its epsilon",
}


# output.private_metrics_only: the devices keep them (fedsim.worker.keep_diagnostics), so the
# server never receives them either.
_KEPT_ON_DEVICES = {
    "train_loss": "not sent with output.private_metrics_only (the devices keep their training losses)",
    "clip_fraction": "not sent with output.private_metrics_only (the devices keep their clipped fractions)",
}


def covered_metrics(cfg: FedsimConfig) -> dict[str, str]:
    """Metric keys the run's guarantee covers, with why (none without a DP mechanism)."""
    if cfg.privacy.dpsgd is None and cfg.privacy.dpfedavg is None:
        return {}
    out = dict(_ALWAYS)
    if cfg.privacy.dpfedavg is not None:
        out |= _USER
    if cfg.privacy.dpsgd is not None:
        out |= _SAMPLE
    return out


def outside_guarantee(cfg: FedsimConfig, keys: Iterable[str]) -> dict[str, str]:
    """The keys among `keys` the guarantee does not cover, each with the reason."""
    covered = covered_metrics(cfg)
    if not covered:
        return {k: "no differential-privacy mechanism is on: nothing is covered" for k in sorted(set(keys))}
    reasons = dict(_OUTSIDE)
    if cfg.secagg.name != "none":
        reasons |= _SECURE_OUTSIDE
        user = cfg.privacy.dpfedavg
        if user is not None and user.noise == "distributed":
            reasons |= _DISTRIBUTED_OUTSIDE
        if cfg.privacy.dpsgd is not None and cfg.privacy.dpsgd.noise == "distributed":
            reasons |= _DISTRIBUTED_SGD_OUTSIDE
    if cfg.output.private_metrics_only:
        reasons |= _KEPT_ON_DEVICES
    return {k: reasons.get(k, GENERIC) for k in sorted(set(keys)) if k not in covered}
