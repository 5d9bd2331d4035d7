"""User-level DP on the server side of a run: DP-FedAvg (McMahan et al. 2018, Alg. 1).

Per round t, with clip norm C_t (fixed, or adaptive: Andrew et al. 2021):
    devices:  Delta_i <- Delta_i * min(1, C_t / ||Delta_i||)          (fedsim.worker, on the device)
    server:   Delta   <- (sum_i Delta_i + N(0, (z_Delta C_t)^2 I)) / m      (this module)
with m the *expected* cohort size (q N for Poisson sampling, k for fixed-size), never the
number of replies: one device changes the sum by at most C_t whether or not others drop, so
failed devices neither break the guarantee nor change the accounting. With adaptive
clipping the noisy count of updates within C_t is released too, and z_Delta is chosen so the
pair is a Gaussian mechanism with the configured z (Andrew et al. 2021, Thm. 1).

Every round that runs releases and is accounted (issue 14, defect 4): a Poisson round that
sampled no device, or whose devices all failed, releases the noise alone (the sum over nobody is
0), exactly the subsampled Gaussian mechanism the accountant composes; skipping it would be
visible (an unchanged model) and would under-count. A round releases nothing only when SecAgg+
aborted before the server could unmask a sum, or every worker failed and the run stops; those
rounds are listed with their reason and not accounted, on the assumption that an abort does
not depend on private data (dropouts and worker failures are independent of the devices'
data; a SecAgg+ abort for fewer than 2 sampled devices depends on the cohort size only, which
the server sees but the released model does not show beyond "no step this round").

Accounting (fedsim.privacy.user_level): Poisson cohorts with add/remove-one-device adjacency
(PLD or RDP), fixed-size cohorts with replace-one adjacency (RDP). With
`noise_cohort_size` M' the server adds the noise of a cohort of M' devices (std scaled by
m / M'): the reported epsilon is then the guarantee of that larger deployment, not of this
simulation, and every output says so.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import dp_accounting
import torch
from dp_accounting.pld import pld_privacy_accountant as pld
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from fedsim import randomness
from fedsim.config import FedsimConfig
from fedsim.errors import ConfigError, FedsimError
from fedsim.privacy.accountants import choose_pld_interval
from fedsim.privacy.user_level import (
    PLD_VALUE_DISCRETIZATION_INTERVAL,
    AdaptiveClipping,
    UserLevelAccounting,
    calibrate_user_noise,
    gaussian_sum_noise,
    update_noise_multiplier,
)
from fedsim.worker import DeviceReport


class UserLevelDP:
    """The run's user-level DP state: clip norm, central noise, accounting, budget."""

    def __init__(self, cfg: FedsimConfig) -> None:
        user = cfg.privacy.dpfedavg
        assert user is not None
        self.cfg, self.user = cfg, user
        self.expected_cohort = float(cfg.cohort.size)  # Poisson: q N = cohort.size; fixed: k
        # Andrew et al. 2021 suggest sigma_b = expected cohort / 20 for the noisy count.
        self.count_noise = (user.count_noise_multiplier or self.expected_cohort / 20) if user.adaptive_clipping else None
        self.calibrated = user.noise_multiplier is None
        if user.noise_multiplier is None:
            assert user.target_epsilon is not None
            try:
                user.noise_multiplier = calibrate_user_noise(
                    target_epsilon=user.target_epsilon,
                    delta=user.delta,
                    rounds=cfg.rounds,
                    accounting=self._accounting(1.0),
                )
            except ValueError as err:
                raise ConfigError("privacy.dpfedavg.target_epsilon", str(err)) from None
        self.noise_multiplier = user.noise_multiplier
        # After calibration: the calibrated z is part of the config fingerprint the workers see.
        self.streams = randomness.streams(cfg)
        # PLD: the coarsest discretisation within 1% of the 1e-4 epsilon over the planned rounds.
        self.pld_interval, self.pld_intervals_tried = PLD_VALUE_DISCRETIZATION_INTERVAL, {}
        if user.accountant == "pld" and self.noise_multiplier > 0:
            self.pld_interval, self.pld_intervals_tried = choose_pld_interval(
                lambda interval: self._accounting(self.noise_multiplier, interval).epsilon(rounds=cfg.rounds, delta=user.delta)
            )
        self.accounting = self._accounting(self.noise_multiplier, self.pld_interval)
        if self.count_noise is not None:
            try:
                self.update_noise = update_noise_multiplier(
                    noise_multiplier=self.noise_multiplier, count_noise_multiplier=self.count_noise
                )
            except ValueError as err:
                raise ConfigError("privacy.dpfedavg.count_noise_multiplier", str(err)) from None
            self.clipping: AdaptiveClipping | None = AdaptiveClipping(
                initial_clip_norm=user.clip_norm,
                target_quantile=user.target_quantile,
                learning_rate=user.clip_learning_rate,
                count_noise_multiplier=self.count_noise,
                expected_cohort_size=self.expected_cohort,
            )
        else:
            self.update_noise = self.noise_multiplier
            self.clipping = None
        self.fixed_clip = user.clip_norm
        # noise_cohort_size: the noise of a mean over M' devices, on a mean over m devices.
        self.noise_scale = self.expected_cohort / user.noise_cohort_size if user.noise_cohort_size else 1.0
        self._last: dict[str, Any] = {}
        self.rounds_released = 0  # rounds whose noised sum was released (aborted rounds release nothing)
        self.rounds_noise_only = 0  # of those, rounds whose sum was over no device (noise alone)
        self.not_released: list[dict[str, Any]] = []  # rounds that ran and released nothing: round, reason
        # Distributed noise: devices add Skellam shares on the SecAgg+ grid; the realized noise
        # depends on how many devices survive, so each round is accounted with its own z.
        self.distributed = user.noise == "distributed"
        self.realized_z: list[float] = []
        self._composed = _RoundByRound(self.accounting) if self.distributed else None

    def _accounting(self, z: float, pld_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL) -> UserLevelAccounting:
        return UserLevelAccounting(
            accountant=self.user.accountant,
            sampling=self.cfg.cohort.sampling,
            population=self.cfg.population,
            cohort_size=self.cfg.cohort.size,
            noise_multiplier=z,
            pld_interval=pld_interval,
        )

    @property
    def clip_norm(self) -> float:
        """C for the round about to start (devices clip to it)."""
        return self.clipping.clip_norm if self.clipping else self.fixed_clip

    def epsilon(self, rounds: int) -> float:
        """Epsilon after `rounds` released rounds (distributed noise: of the realized noise so far)."""
        if not rounds:
            return 0.0
        if self._composed is not None and rounds == len(self.realized_z):
            return self._composed.epsilon(self.user.delta)
        if self._composed is not None and rounds == len(self.realized_z) + 1:
            return self._composed.epsilon_with(self.noise_multiplier, self.user.delta)  # planned z for the next round
        return self.accounting.epsilon(rounds=rounds, delta=self.user.delta)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the sum of clipped updates (float units)."""
        return self.update_noise * self.clip_norm * self.noise_scale

    def device_noise_variance(self, step: float) -> float:
        """Per-device Skellam variance on a grid of spacing `step` so that the expected cohort's
        shares sum to the planned noise (Agarwal, Kairouz, Liu 2021)."""
        return (self.noise_std / step) ** 2 / self.expected_cohort

    def check_budget(self, round_num: int) -> None:
        """Stop before the round that would take the run past its user-level budget."""
        target, released = self.user.target_epsilon, self.rounds_released + 1
        if target is not None and self.epsilon(released) > target * (1 + 1e-9):
            raise FedsimError(
                f"user-level privacy budget reached: round {round_num} would make epsilon "
                f"{self.epsilon(released):.4g} > target {target:g} (delta={self.user.delta:g}); "
                f"stopped after round {round_num - 1}"
            )

    def describe(self) -> str:
        text = (
            f"DP-FedAvg (user-level): z={self.noise_multiplier:.4g}, clip_norm={self.clip_norm:g}"
            f"{' (adaptive, quantile ' + str(self.user.target_quantile) + ')' if self.clipping else ''}, "
            f"denominator={self.expected_cohort:g}; {self.accounting.describe().rstrip('.')}; "
            f"epsilon after {self.cfg.rounds} rounds = {self.epsilon(self.cfg.rounds):.4g} at delta={self.user.delta:g}"
        )
        if self.calibrated:
            text += f" (z calibrated for target epsilon {self.user.target_epsilon:g})"
        if self.user.noise_cohort_size:
            text += (
                f"; SIMULATED: noise of a {self.user.noise_cohort_size}-device cohort, so epsilon describes that "
                f"deployment, not this run"
            )
        return text

    def aggregate(
        self,
        total: torch.Tensor,
        reports: list[DeviceReport],
        round_num: int,
        *,
        realized_noise_std: float | None = None,
        noise_only: bool = False,
    ) -> torch.Tensor:
        """The noised mean update of the round: (sum of clipped updates + noise) / expected cohort.

        `total` is the float64 sum of the clipped updates (in the clear, or from secure
        aggregation); `noise_only`: no device update is in it (zeros), the release is the noise.
        """
        clip = self.clip_norm
        std = self.noise_std
        if self.distributed:
            # The devices' shares are already in `total`; account for what the survivors added.
            assert realized_noise_std is not None, "distributed noise needs the realized noise of the round"
            std = realized_noise_std
            self.realized_z.append(realized_noise_std / (clip * self.noise_scale) if clip else 0.0)
            assert self._composed is not None
            self._composed.add(self.realized_z[-1])
            mean = (total / self.expected_cohort).to(torch.float32)
        else:
            generator = self.streams.torch("dpfedavg-noise", round_num)
            noise = gaussian_sum_noise(total.numel(), std=std, generator=generator, secure=self.streams.mode == "secure")
            mean = ((total + noise.to(torch.float64)) / self.expected_cohort).to(torch.float32)
        self.rounds_released += 1
        self.rounds_noise_only += noise_only
        within = [b for r in reports for b in r.within_bound]
        if self.clipping is not None:
            count_gen = self.streams.torch("dpfedavg-count", round_num)
            self.clipping.update(within, generator=count_gen)
        self._last = {
            "user_epsilon": self.epsilon(self.rounds_released),
            "user_delta": self.user.delta,
            "user_noise_multiplier": self.noise_multiplier,
            "clip_norm": clip,
            "update_clipped_fraction": (1 - sum(within) / len(within)) if within else None,
            "user_noise_std": std,
            "user_noise": "distributed" if self.distributed else "central",
            "user_realized_noise_multiplier": self.realized_z[-1] if self.distributed else None,
            "simulated_cohort_size": self.user.noise_cohort_size,
            "user_release": "noise_only" if noise_only else "noised_sum",
        }
        return mean

    def no_release(self, round_num: int, reason: str) -> None:
        """Record a round that ran and released nothing (not accounted; see the module doc)."""
        self.not_released.append({"round": round_num, "reason": reason})
        self._last = {
            "user_epsilon": self.epsilon(self.rounds_released),
            "user_delta": self.user.delta,
            "user_release": "none",
            "user_release_reason": reason,
        }

    def round_metrics(self) -> dict[str, Any]:
        return self._last or {"user_epsilon": self.epsilon(self.rounds_released), "user_delta": self.user.delta}

    def summary(self) -> dict[str, Any]:
        rounds_done = self.rounds_released
        return {
            "user_level": {
                "mechanism": "DP-FedAvg (McMahan et al. 2018): device-side clipping, central Gaussian noise",
                "assumes": self.assumptions(),
                "accounting": self.accounting.describe(),
                "accountant": self.user.accountant,
                "pld_discretization": self.pld_interval if self.user.accountant == "pld" else None,
                "pld_planned_epsilon_by_discretization": {f"{k:g}": v for k, v in self.pld_intervals_tried.items()} or None,
                "delta": self.user.delta,
                "noise_multiplier": self.noise_multiplier,
                "update_noise_multiplier": self.update_noise,
                "adaptive_clipping": self.clipping is not None,
                "final_clip_norm": self.clip_norm,
                "epsilon": self.epsilon(rounds_done),
                "rounds": rounds_done,
                "rounds_noise_only": self.rounds_noise_only,
                "rounds_not_released": list(self.not_released),
                "rounds_accounted": (
                    "every round that ran and released: a round with no device update (empty Poisson cohort, every "
                    "device failed) released the noise alone and is accounted like any other; rounds in "
                    "rounds_not_released released no aggregate (SecAgg+ aborted before unmasking, or every worker "
                    "failed and the run stopped) and are not accounted, assuming aborts do not depend on private data"
                ),
                "target_epsilon": self.user.target_epsilon,
                "calibrated": self.calibrated,
                "simulated_cohort_size": self.user.noise_cohort_size,
                "noise": self.user.noise,
                "distributed_noise": (
                    "devices add Skellam shares (Agarwal, Kairouz, Liu 2021) before masking; epsilon composes each "
                    "round's realized noise (fewer survivors, less noise), each accounted as a Gaussian of the same "
                    "variance with sensitivity C (stochastic rounding's norm growth is not included)"
                )
                if self.distributed
                else None,
                "note": (
                    f"noise simulates a cohort of {self.user.noise_cohort_size}: epsilon holds for that deployment, "
                    "not for this simulation"
                )
                if self.user.noise_cohort_size
                else None,
            }
        }

    def assumptions(self) -> dict[str, str]:
        """What the user-level epsilon rests on, each stated (summary.json `assumes`)."""
        mode, reason = randomness.resolve(self.cfg)
        fixed = self.cfg.cohort.sampling == "fixed"
        return {
            "accountant": (
                f"dp_accounting {'RDP' if self.user.accountant == 'rdp' or fixed else 'PLD'}"
                + (f" (discretisation {self.pld_interval:g}, pessimistic: an upper bound)" if self.user.accountant == "pld" and not fixed else "")
            ),
            "adjacency": (
                "replace-one device (one device's whole data set swapped for another's; sensitivity 2C)"
                if fixed
                else "add/remove-one device (a device's whole data set; sensitivity C)"
            ),
            "sampling": (
                f"exactly {self.cfg.cohort.size} of {self.cfg.population} devices per round, uniformly without replacement"
                if fixed
                else f"Poisson: each of {self.cfg.population} devices joins each round independently with "
                f"q = {self.cfg.cohort.size / self.cfg.population:.6g}"
            )
            + "; which devices were sampled stays secret from whoever sees the outputs (amplification by sampling)",
            "rounds": "every round that ran and released is accounted, noise-only rounds included; see rounds_not_released",
            "threat_model": (
                "the guarantee is about what is released (models, covered metrics) against anyone who sees it; the "
                "server is trusted to sample, clip-check and add the noise, and "
                + ("sees only the SecAgg+ sum of the survivors' updates" if self.cfg.secagg.name != "none" else "sees each clipped update")
                + "; device dropouts, worker failures and SecAgg+ aborts do not depend on private data"
            ),
            "randomness": f"{mode} ({reason})"
            + ("; the noise is a function of the seed and the config, so whoever knows both can remove it" if mode == "reproducible" else ""),
        }

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the accounting and the clipping exactly."""
        return {
            "rounds_released": self.rounds_released,
            "rounds_noise_only": self.rounds_noise_only,
            "not_released": list(self.not_released),
            "realized_z": list(self.realized_z),
            "clipping": self.clipping.state_dict() if self.clipping else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_released = int(state["rounds_released"])
        self.rounds_noise_only = int(state.get("rounds_noise_only", 0))
        self.not_released = list(state.get("not_released", []))
        self.realized_z = [float(z) for z in state.get("realized_z", [])]
        if self._composed is not None:
            self._composed.zs = list(self.realized_z)
        if self.clipping is not None and state.get("clipping"):
            self.clipping.load_state_dict(state["clipping"])



class _RoundByRound:
    """Composition of per-round events with different noise multipliers (distributed noise).

    The same events and adjacency as `UserLevelAccounting` (Poisson: add/remove, PLD or RDP;
    fixed size: replace-one, RDP, z/2), composed one round at a time with dp-accounting.
    """

    def __init__(self, accounting: UserLevelAccounting) -> None:
        self.accounting = accounting
        self.zs: list[float] = []

    def _event(self, z: float) -> dp_accounting.DpEvent:
        a = self.accounting
        if a.sampling == "fixed":
            return dp_accounting.SampledWithoutReplacementDpEvent(a.population, a.cohort_size, dp_accounting.GaussianDpEvent(z / 2))
        return dp_accounting.PoissonSampledDpEvent(a.cohort_size / a.population, dp_accounting.GaussianDpEvent(z))

    def add(self, z: float) -> None:
        self.zs.append(z)

    def epsilon_with(self, next_z: float, delta: float) -> float:
        return self._epsilon([*self.zs, next_z], delta)

    def epsilon(self, delta: float) -> float:
        return self._epsilon(self.zs, delta)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one accountant per run, few distinct calls per round
    def _cached(self, zs: tuple[float, ...], delta: float) -> float:
        if any(z <= 0 for z in zs):
            return math.inf
        a = self.accounting
        if a.sampling == "fixed":
            acc: dp_accounting.PrivacyAccountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        elif a.accountant == "rdp":
            acc = rdp.RdpAccountant()
        else:
            acc = pld.PLDAccountant(value_discretization_interval=1e-3)
        for z, count in _runs(zs):
            acc.compose(self._event(z), count)
        return acc.get_epsilon(delta)

    def _epsilon(self, zs: list[float], delta: float) -> float:
        return self._cached(tuple(zs), delta) if zs else 0.0


def _runs(zs: tuple[float, ...]) -> list[tuple[float, int]]:
    """Consecutive equal values grouped: (z, count) pairs (compose(event, count) is cheaper)."""
    out: list[tuple[float, int]] = []
    for z in zs:
        if out and out[-1][0] == z:
            out[-1] = (z, out[-1][1] + 1)
        else:
            out.append((z, 1))
    return out
