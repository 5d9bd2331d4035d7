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
not depend on private data: dropouts and worker failures are independent of the devices' data,
and SecAgg+ runs with DP-FedAvg only on fixed-size cohorts (config.validate), because with
Poisson cohorts whether a round aborts depends on the sampled size (n < 2, or no secure
(k, t) for n), hence on whether a given user was sampled, which the Poisson-subsampled
accountant does not cover. The one data-dependent way a device can drop from a secure round,
its update failing conditional rounding fedsim.secagg.quantize.MAX_ROUNDING_DRAWS times in a row, has probability
<= beta^200 = e^-100 for every update within the clip norm (Kairouz, Liu, Steinke 2021, Thm. 1:
each draw fails with probability <= beta = e^-0.5), negligible next to any delta; the simulated
round deadline (faults.round_deadline_s), which drops devices by their example count, and
sample-level budgets (privacy.dpsgd.target_epsilon), which leave exhausted devices out of the
cohort, are refused with SecAgg+ and DP-FedAvg.

Accounting (fedsim.privacy.user_level): Poisson cohorts with add/remove-one-device adjacency
(PLD or RDP), fixed-size cohorts with replace-one adjacency (RDP). With
`noise_cohort_size` M' the server adds the noise of a cohort of M' devices (std scaled by
m / M'): the reported epsilon is then the guarantee of that larger deployment, not of this
simulation, and every output says so.

Under SecAgg+ devices send randomly rounded integer vectors (fedsim.secagg.quantize): the
sensitivity is the conditional-rounding norm bound D2 grid steps (>= C), and the noise std is
z_Delta D2 steps (central or distributed). Distributed noise (privacy.dpfedavg.noise=distributed):
the devices add Skellam shares sized so that the fewest honest inputs a released sum can hold
(fedsim.secure_rounds: max(t, n - D) inputs minus C colluders) already carry the round's
noise, and the rounds are accounted by fedsim.privacy.skellam (the discrete mechanism actually
run, not a Gaussian of the same variance).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from clients import flat_params
from fedsim import randomness
from fedsim.config import FedsimConfig
from fedsim.errors import ConfigError, FedsimError
from fedsim.privacy.calibration import solve_noise_multiplier
from fedsim.privacy.skellam import SkellamBlock, SkellamRound, l1_bound, rounded_norm_bound, skellam_epsilon
from fedsim.privacy import tree as tree_dp
from fedsim.privacy.accountants import choose_pld_interval
from fedsim.privacy.user_level import (
    PLD_VALUE_DISCRETIZATION_INTERVAL,
    AdaptiveClipping,
    UserLevelAccounting,
    calibrate_user_noise,
    gaussian_sum_noise,
    update_noise_multiplier,
)
from fedsim.mechanisms import Mechanism
from fedsim.reports import DeviceReport
from fedsim.sampling import cyclic_period
from fedsim.secagg.quantize import MAX_ROUNDING_DRAWS
from fedsim.secure_grid import SecureEncoding, grid_step

log = logging.getLogger("fedsim")

#: Printed and recorded when distributed noise is derived from the run seed (privacy.randomness=reproducible).
SIMULATION_ONLY = (
    "simulation only: the server can remove the noise (privacy.randomness=reproducible derives every device's "
    "noise from the run seed and config, which the server knows)"
)


class UserLevelDP(Mechanism):
    """The run's user-level DP state: clip norm, central noise, accounting, budget."""

    def __init__(self, cfg: FedsimConfig, *, num_params: int | None = None) -> None:
        """`num_params`: the model's size, needed under SecAgg+ (the rounding bound depends on it)."""
        user = cfg.privacy.dpfedavg
        assert user is not None
        self.cfg, self.user = cfg, user
        self.distributed = user.noise == "distributed"
        # DP-FTRL (noise=tree): tree-aggregated central noise over the cyclic schedule (fedsim.privacy.tree).
        self.tree = user.noise == "tree"
        self.tree_restart_every = user.tree_restart_every or cyclic_period(cfg.population, cfg.cohort.size)
        if self.tree and cfg.checkpoint.every and randomness.mode(cfg) == "secure":
            # A checkpoint would hold the noise of the open tree nodes, which the released prefixes
            # still contain: whoever reads it could remove that noise (and a resume would re-release
            # the rounds after it with fresh noise).
            raise ConfigError("checkpoint.every", "with privacy.dpfedavg.noise=tree and privacy.randomness=secure a "
                                                  "checkpoint would hold the open tree nodes' noise; allowed: 0")  # fmt: skip
        # Under SecAgg+ devices send randomly rounded integer vectors: the sensitivity is the
        # norm bound after conditional rounding (D2 grid steps), not C (fedsim.privacy.skellam).
        self.grid_step: float | None = None
        self.num_params = num_params
        if cfg.secagg.name == "secaggplus":
            if num_params is None:
                raise ValueError("UserLevelDP under SecAgg+ needs num_params (the rounding bound depends on it)")
            self.grid_step = grid_step(cfg)
        # Poisson: q N = cohort.size; fixed: k; cyclic: population / cycle length (cohorts of its floor or ceil)
        self.expected_cohort = (cfg.population / cyclic_period(cfg.population, cfg.cohort.size)
                                if cfg.cohort.sampling == "cyclic" else float(cfg.cohort.size))  # fmt: skip
        # Andrew et al. 2021 suggest sigma_b = expected cohort / 20 for the noisy count.
        self.count_noise = (user.count_noise_multiplier or self.expected_cohort / 20) if user.adaptive_clipping else None
        # noise_cohort_size: the noise of a mean over M' devices, on a mean over m devices.
        self.noise_scale = self.expected_cohort / user.noise_cohort_size if user.noise_cohort_size else 1.0
        self.calibrated = user.noise_multiplier is None
        if user.noise_multiplier is None:
            assert user.target_epsilon is not None
            try:
                if self.tree:  # mu-GDP is exact: z = sqrt(max sum n_v^2) / mu(target epsilon, delta)
                    user.noise_multiplier = math.sqrt(self._tree_mu_squared(cfg.rounds)) / tree_dp.gdp_mu(
                        user.target_epsilon, user.delta)  # fmt: skip
                elif self.distributed:  # calibrated on the Skellam accounting of the mechanism actually run
                    first, sigma_b = user.clip_norm, self.count_noise

                    def epsilon(z: float) -> float:
                        if sigma_b is not None and z >= 2 * sigma_b:
                            return 0.0  # no update noise is left: refused below (count_noise_multiplier)
                        return skellam_epsilon([self._skellam_round(first, z)] * cfg.rounds, user.delta)

                    user.noise_multiplier = solve_noise_multiplier(
                        epsilon,
                        target_epsilon=user.target_epsilon,
                        tolerance=0.01,
                        setting=f"after {cfg.rounds} rounds, delta={user.delta:g}, distributed Skellam noise",
                    )
                else:
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
        if user.accountant == "pld" and self.noise_multiplier > 0 and not self.tree:
            self.pld_interval, self.pld_intervals_tried = choose_pld_interval(
                lambda interval: self._accounting(self.noise_multiplier, interval).epsilon(rounds=cfg.rounds, delta=user.delta)
            )
        # noise=tree is accounted by fedsim.privacy.tree (epsilon), not by a sampled-Gaussian accountant.
        self.accounting = None if self.tree else self._accounting(self.noise_multiplier, self.pld_interval)
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
        self._last: dict[str, Any] = {}
        self.rounds_released = 0  # rounds whose noised sum was released (aborted rounds release nothing)
        # Distributed noise: the clip norm of every released round (its Skellam mechanism
        # follows from it, `_skellam_round`); accounted by fedsim.privacy.skellam.
        self.released_clips: list[float] = []
        self.rounds_noise_only = 0  # of those, rounds whose sum was over no device (noise alone)
        self.not_released: list[dict[str, Any]] = []  # rounds that ran and released nothing: round, reason
        self.last_released_round = 0  # noise=tree: the horizon of the released prefixes
        self.tree_noise = tree_dp.TreeNoise(self.tree_restart_every, self._tree_node_noise) if self.tree else None

    def _tree_epsilon(self, horizon: int, factor: float = 1.0) -> float:
        """Epsilon of the worst device over rounds 1..horizon (factor 2: replace-one adjacency)."""
        if not horizon:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        return tree_dp.gdp_epsilon(factor * math.sqrt(self._tree_mu_squared(horizon)) / self.noise_multiplier, self.user.delta)

    def _tree_mu_squared(self, horizon: int) -> int:
        return tree_dp.cyclic_mu_squared(horizon=horizon, restart_every=self.tree_restart_every,
                                         period=cyclic_period(self.cfg.population, self.cfg.cohort.size))  # fmt: skip

    def _tree_node_noise(self, tree: int, level: int, index: int) -> torch.Tensor:
        """One tree node's N(0, (z C)^2 I): its own stream, so a node is the same draw whichever
        round first needs it (secure mode: fresh OS entropy, kept in checkpoints)."""
        assert self.num_params is not None
        generator = self.streams.torch("dpftrl-node", tree, level, index)
        noise = gaussian_sum_noise(self.num_params, std=self.noise_std, generator=generator, secure=self.streams.mode == "secure")
        if self.cfg.audit.break_mechanism == "no_noise":  # tests only (fedsim.audit): drawn, not added
            noise = torch.zeros_like(noise)
        return noise

    def _accounting(self, z: float, pld_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL) -> UserLevelAccounting:
        return UserLevelAccounting(
            accountant=self.user.accountant,
            sampling=self.cfg.cohort.sampling,
            population=self.cfg.population,
            cohort_size=self.cfg.cohort.size,
            noise_multiplier=z,
            pld_interval=pld_interval,
        )

    def _update_z(self, z: float) -> float:
        """The update's share z_Delta of the combined multiplier z (Andrew et al. 2021, Thm. 1)."""
        if self.count_noise is None:
            return z
        return update_noise_multiplier(noise_multiplier=z, count_noise_multiplier=self.count_noise)

    def rounding_bound(self, clip: float) -> float:
        """D2: a device's L2 norm bound in grid steps after conditional randomized rounding."""
        assert self.grid_step is not None and self.num_params is not None
        return rounded_norm_bound(clip / self.grid_step, self.num_params)

    def _skellam_round(self, clip: float, z: float | None = None, sampling: str | None = None) -> SkellamRound:
        """The distributed mechanism of one round at clip norm `clip` (see `secure_encoding`)."""
        z = self.noise_multiplier if z is None else z
        d2 = self.rounding_bound(clip)
        assert self.num_params is not None
        blocks = [SkellamBlock(variance=(self._update_z(z) * d2 * self.noise_scale) ** 2, l2=d2, l1=l1_bound(d2, self.num_params))]
        if self.count_noise is not None:
            # The count coordinate carries sum_i (2 b_i - 1): one device moves it by 1, and its
            # noise std 2 sigma_b is sigma_b on the centred count sum_i (b_i - 1/2).
            blocks.append(SkellamBlock(variance=(2 * self.count_noise) ** 2, l2=1.0, l1=1.0))
        return SkellamRound(tuple(blocks), sampling or self.cfg.cohort.sampling, self.cfg.population, self.cfg.cohort.size)

    def secure_encoding(self, clip: float | None = None) -> SecureEncoding:
        """The next round's rounding bound and, with distributed noise, the Skellam variance the
        survivors must reach (whatever drops out or colludes, within the threat model), at clip
        norm `clip` (default: the current one; devices check a round's encoding with theirs)."""
        clip = self.clip_norm if clip is None else clip
        if not self.distributed:
            return SecureEncoding(norm_bound=self.rounding_bound(clip))
        blocks = self._skellam_round(clip).blocks
        return SecureEncoding(
            norm_bound=self.rounding_bound(clip),
            update_variance=blocks[0].variance,
            count_variance=blocks[1].variance if len(blocks) > 1 else 0.0,
        )

    @property
    def clip_norm(self) -> float:
        """C for the round about to start (devices clip to it)."""
        return self.clipping.clip_norm if self.clipping else self.fixed_clip

    def epsilon(self, rounds: int, *, sampling: str | None = None) -> float:
        """Epsilon after `rounds` released rounds. Distributed noise: the Skellam composition of
        the released rounds, then (beyond them) rounds at the current clip norm; `sampling`
        "none" gives the guarantee against the server, which knows the cohort."""
        if not rounds:
            return 0.0
        if self.tree:
            return self._tree_epsilon(rounds)
        if self.distributed:
            done = [self._skellam_round(c, sampling=sampling) for c in self.released_clips[:rounds]]
            ahead = [self._skellam_round(self.clip_norm, sampling=sampling)] * (rounds - len(done))
            return skellam_epsilon(done + ahead, self.user.delta)
        return self.accounting.epsilon(rounds=rounds, delta=self.user.delta)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the sum of clipped updates (float units).

        Under SecAgg+ the sensitivity is the rounded norm bound D2 grid steps (>= C), and the
        noise std is z_Delta D2 steps; distributed: the guaranteed total (the fewest honest inputs)."""
        if self.grid_step is None:
            return self.update_noise * self.clip_norm * self.noise_scale
        return self.update_noise * self.rounding_bound(self.clip_norm) * self.grid_step * self.noise_scale

    def check_budget(self, round_num: int) -> None:
        """Stop before the round that would take the run past its user-level budget."""
        # noise=tree: the horizon is the round number (every prefix up to it counts as released)
        target, released = self.user.target_epsilon, round_num if self.tree else self.rounds_released + 1
        if target is not None and self.epsilon(released) > target * (1 + 1e-9):
            raise FedsimError(
                f"user-level privacy budget reached: round {round_num} would make epsilon "
                f"{self.epsilon(released):.4g} > target {target:g} (delta={self.user.delta:g}); "
                f"stopped after round {round_num - 1}"
            )

    def describe(self) -> str:
        text = (
            f"{'DP-FTRL' if self.tree else 'DP-FedAvg'} (user-level): z={self.noise_multiplier:.4g}, clip_norm={self.clip_norm:g}"
            f"{' (adaptive, quantile ' + str(self.user.target_quantile) + ')' if self.clipping else ''}, "
            f"denominator={self.expected_cohort:g}; {self._accounting_text().rstrip('.')}; "
            f"epsilon after {self.cfg.rounds} rounds = {self.epsilon(self.cfg.rounds):.4g} at delta={self.user.delta:g}"
        )
        if self.calibrated:
            text += f" (z calibrated for target epsilon {self.user.target_epsilon:g})"
        if self.grid_step is not None:
            growth = self.rounding_bound(self.clip_norm) * self.grid_step / self.clip_norm
            text += f"; SecAgg+ rounding: sensitivity {growth:.4g} x C (conditional randomized rounding)"
        if self.distributed:
            from fedsim import randomness

            if randomness.mode(self.cfg) != "secure":
                text += "; " + SIMULATION_ONLY
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
        count_sum: float | None = None,
        count_devices: int = 0,
        noise_only: bool = False,
    ) -> torch.Tensor:
        """The noised mean update of the round: (sum of clipped updates + noise) / expected cohort.

        `total` is the float64 sum of the clipped updates (in the clear, or from secure
        aggregation); `noise_only`: no device update is in it (zeros), the release is the noise.
        Under SecAgg+ the clipping bits arrive only as `count_sum` = sum_i (2 b_i - 1) over the
        `count_devices` devices in the sum (with distributed noise: plus the devices' noise).
        """
        clip = self.clip_norm
        std = self.noise_std
        if self.distributed:
            # The devices' shares are already in `total`, at least the guaranteed noise.
            self.released_clips.append(clip)
            mean = (total / self.expected_cohort).to(torch.float32)
        elif self.tree_noise is not None:
            # DP-FTRL: this round's release is S~_t - S~_{t-1}, its noise the difference of two
            # prefixes' node noises (fedsim.privacy.tree.TreeNoise); the sum itself is this round's.
            noise = self.tree_noise.residual(round_num)
            mean = ((total + noise) / self.expected_cohort).to(torch.float32)
        else:
            generator = self.streams.torch("dpfedavg-noise", round_num)
            noise = gaussian_sum_noise(total.numel(), std=std, generator=generator, secure=self.streams.mode == "secure")
            if self.cfg.audit.break_mechanism == "no_noise":  # tests only (fedsim.audit): drawn, not added
                noise = torch.zeros_like(noise)
            mean = ((total + noise.to(torch.float64)) / self.expected_cohort).to(torch.float32)
        self.rounds_released += 1
        self.last_released_round = round_num
        self.rounds_noise_only += noise_only
        within = [b for r in reports for b in r.within_bound]
        if count_sum is None:
            count_sum, count_devices = float(sum(2 * int(b) - 1 for b in within)), len(within)
        if self.clipping is not None:
            if self.distributed:  # the devices' Skellam noise is already in the count
                self.clipping.update_with_count(count_sum / 2)
            else:
                count_gen = self.streams.torch("dpfedavg-count", round_num)
                self.clipping.update_with_count(count_sum / 2, generator=count_gen)
        self._last = {
            "user_epsilon": self.epsilon(self._horizon()),
            "user_delta": self.user.delta,
            "user_noise_multiplier": self.noise_multiplier,
            "clip_norm": clip,
            # sum_i (2 b_i - 1) = 2 (in bound) - n; with distributed noise, the noisy count
            "update_clipped_fraction": 0.5 - count_sum / (2 * count_devices) if count_devices else None,
            "user_noise_std": std,
            "user_noise": self.user.noise,
            "simulated_cohort_size": self.user.noise_cohort_size,
            "user_release": "noise_only" if noise_only else "noised_sum",
        }
        if self.distributed:
            self._last["user_epsilon_vs_server"] = self.epsilon(self.rounds_released, sampling="none")
        return mean

    def no_release(self, round_num: int, reason: str) -> None:
        """Record a round that ran and released nothing (not accounted; see the module doc)."""
        self.not_released.append({"round": round_num, "reason": reason})
        self._last = {
            "user_epsilon": self.epsilon(self._horizon()),
            "user_delta": self.user.delta,
            "user_release": "none",
            "user_release_reason": reason,
        }

    def round_metrics(self) -> dict[str, Any]:
        return self._last or {"user_epsilon": self.epsilon(self._horizon()), "user_delta": self.user.delta}

    def _horizon(self) -> int:
        """What `epsilon` composes now: released rounds (noise=tree: the last released round
        number, since every prefix up to it may have been released)."""
        return self.last_released_round if self.tree else self.rounds_released

    def summary(self) -> dict[str, Any]:
        rounds_done = self.rounds_released
        return {
            "user_level": {
                "mechanism": "DP-FedAvg (McMahan et al. 2018): device-side clipping, "
                + ("distributed Skellam noise" if self.distributed else "central Gaussian noise")
                if not self.tree else "DP-FTRL (Kairouz et al. 2021): device-side clipping, central Gaussian noise "
                "through tree aggregation with restarts (each round releases a difference of noisy prefix sums)",
                "tree": self._tree_summary() if self.tree else None,
                "epsilon_replace_one": self._tree_epsilon(self._horizon(), factor=2.0) if self.tree else None,
                "assumes": self.assumptions(),
                "accounting": self._accounting_text(),
                "accountant": "gdp" if self.tree else self.user.accountant,
                "pld_discretization": self.pld_interval if self.user.accountant == "pld" else None,
                "pld_planned_epsilon_by_discretization": {f"{k:g}": v for k, v in self.pld_intervals_tried.items()} or None,
                "delta": self.user.delta,
                "delta_vs_population": self.delta_check(),
                "noise_multiplier": self.noise_multiplier,
                "update_noise_multiplier": self.update_noise,
                "adaptive_clipping": self.clipping is not None,
                "final_clip_norm": self.clip_norm,
                "epsilon": self.epsilon(self._horizon()),
                "rounds": rounds_done,
                "rounds_noise_only": self.rounds_noise_only,
                "rounds_not_released": list(self.not_released),
                "rounds_accounted": (
                    (
                        "every released tree node up to the last released round: DP-FTRL composes the nodes of all "
                        "prefixes up to it, whatever each round's cohort was (a round with no device update released "
                        "its noise alone); "
                        if self.tree
                        else "every round that ran and released: a round with no device update (empty Poisson "
                        "cohort, every device failed) released the noise alone and is accounted like any other; "
                    )
                    + "rounds in rounds_not_released released no aggregate (SecAgg+ aborted before unmasking, or "
                    "every worker failed and the run stopped) and are not accounted, assuming aborts do not depend "
                    "on private data"
                ),
                "target_epsilon": self.user.target_epsilon,
                "calibrated": self.calibrated,
                "simulated_cohort_size": self.user.noise_cohort_size,
                "noise": self.user.noise,
                "distributed_noise": self._distributed_summary() if self.distributed else None,
                "secure_aggregation_rounding": self._rounding_summary() if self.grid_step is not None else None,
                "note": (
                    f"noise simulates a cohort of {self.user.noise_cohort_size}: epsilon holds for that deployment, "
                    "not for this simulation"
                )
                if self.user.noise_cohort_size
                else None,
            }
        }

    def _tree_summary(self) -> dict[str, Any]:
        horizon = self._horizon()
        return {
            "restart_every": self.tree_restart_every,
            "cycle_rounds": cyclic_period(self.cfg.population, self.cfg.cohort.size),
            "mu_squared_times_z_squared": self._tree_mu_squared(horizon) if horizon else 0,
            "gdp_mu": math.sqrt(self._tree_mu_squared(horizon)) / self.noise_multiplier if horizon and self.noise_multiplier else None,
            "last_released_round": self.last_released_round,
        }

    def _accounting_text(self) -> str:
        if self.tree:
            return (
                f"DP-FTRL tree aggregation: Gaussian DP (Dong, Roth, Su 2022) of every released tree node, for the device "
                f"of the cyclic schedule (a cycle of {cyclic_period(self.cfg.population, self.cfg.cohort.size)} rounds) "
                f"with the largest sensitivity, trees restarted every {self.tree_restart_every} rounds; no amplification "
                "by sampling"
            )
        if not self.distributed:
            return self.accounting.describe()
        return (
            "distributed Skellam noise (Agarwal, Kairouz, Liu 2021) sized for the fewest honest inputs a released sum "
            f"can hold, RDP accounting of the discrete mechanism ({self.cfg.cohort.sampling} cohorts of {self.cfg.cohort.size}/"
            f"{self.cfg.population}, sensitivity after conditional randomized rounding)"
        )

    def _rounding_summary(self) -> dict[str, Any]:
        assert self.grid_step is not None
        clip = self.clip_norm
        d2 = self.rounding_bound(clip)
        return {
            "grid_step": self.grid_step,
            "dimension": self.num_params,
            "clip_norm_in_steps": clip / self.grid_step,
            "rounded_norm_bound_in_steps": d2,
            "sensitivity_growth": d2 * self.grid_step / clip,
            "rounding": (
                f"conditional randomized rounding (Kairouz, Liu, Steinke 2021, Thm 1, beta=e^-0.5): a device's "
                f"rounding is redrawn until its norm is <= D2 = {d2:.6g} steps, so the sensitivity is D2 steps = "
                f"{d2 * self.grid_step / clip:.6g} x C, and the noise is sized for it"
            ),
        }

    def _distributed_summary(self) -> dict[str, Any]:
        from fedsim import randomness

        mode, why = randomness.resolve(self.cfg)
        rnd = self._skellam_round(self.clip_norm)
        return {
            "mechanism": (
                "each device adds Skellam noise (Agarwal, Kairouz, Liu 2021) to its randomly rounded integer update "
                "before SecAgg+ masking; the sum carries the survivors' noise"
                + (
                    ". SIMULATION SHORTCUT (secagg.simulation_shortcut): no mask is applied, so the server sees each "
                    "worker's sum of its devices' updates with only their shares of the noise (a single device's, "
                    "where a worker holds one); the epsilon holds for the released model, not against this run's server"
                    if self.cfg.secagg.simulation_shortcut else ""
                )  # fmt: skip
            ),
            "noise_sizing": (
                "each device adds 1/h of the round's noise variance, h = max(t, n - D) - C: the server sums at least "
                "max(t, n - D) masked inputs or aborts before unmasking (t the Shamir threshold, D the dropouts the "
                "SecAgg+ threat model budgets for), and up to C = floor(gamma n) of them may collude with the server "
                "and strip their own share; so every released round carries at least the accounted noise whatever "
                "drops out, and epsilon does not depend on how many survived (metrics: secagg_noise_min_inputs, "
                "secagg_noise_honest_inputs)"
            ),
            "noise_variance_per_coordinate": [b.variance for b in rnd.blocks],  # grid units: update, count
            "accounting": (
                "RDP of the Skellam mechanism with L1 and L2 sensitivity (Agarwal, Kairouz, Liu 2021, Cor. 3.6), "
                "sensitivity = the conditional-rounding norm bound, update and clipped-count blocks composed per round, "
                + (
                    "Poisson subsampling (Zhu and Wang 2019, Thm 5), add/remove-one-device adjacency"
                    if self.cfg.cohort.sampling == "poisson"
                    else "sampling without replacement (Wang, Balle, Kasiviswanathan 2019, Thm 9), replace-one adjacency"
                )
                + "; rounds composed by adding RDP, converted with dp_accounting's compute_epsilon"
                + (" (the configured PLD accountant does not apply to Skellam)" if self.user.accountant == "pld" else "")
            ),
            "epsilon_vs_server": self.epsilon(self.rounds_released, sampling="none"),
            "epsilon_vs_server_means": (
                "the server picks the cohort, so against it there is no amplification by sampling: the same rounds "
                "without subsampling, replace-one adjacency of the device's data"
            ),
            "adaptive_clipping_count": (
                "the clipped-count bits travel inside the masked vector as sum_i (2 b_i - 1) with their own Skellam "
                f"noise (std 2 sigma_b = {2 * self.count_noise:g} at the fewest honest inputs), accounted with the update"
                if self.count_noise is not None
                else None
            ),
            "randomness": mode,
            "randomness_reason": why,
            "assumptions": [
                "at least max(t, n - D) masked inputs in every released sum: semi_honest, the server follows this abort "
                "rule; active, every device also checks it (it signs and unmasks only survivor sets that large, t and D "
                "computed from the public run config and the session's n) and refuses a noise share below 1/h of the "
                "accounted variance",
                "at most C = floor(gamma n) devices of a cohort collude with the server (secagg.max_corrupt_fraction); "
                "the others keep their noise secret",
                "the cohort is secret from whoever reads the released model (else see epsilon_vs_server)",
                "secure randomness: noise and rounding come from the OS CSPRNG on each device"
                if mode == "secure"
                else SIMULATION_ONLY,
            ],
        }

    def accounted_population(self) -> int:
        """The population the accountant describes: the run's, or with `noise_cohort_size` M' the
        deployment it simulates (same sampling rate q = m/N, so N' = N M'/m)."""
        n = self.cfg.population
        if self.user.noise_cohort_size:
            return max(n, round(n * self.user.noise_cohort_size / self.cfg.cohort.size))
        return n

    def delta_check(self) -> dict[str, Any]:
        """delta against 1/N for the N devices the guarantee covers.

        An (epsilon, delta) guarantee with delta >= 1/N is met by a mechanism that publishes one
        random device's whole data set with probability delta: about delta N devices exposed
        (Dwork and Roth 2014, Sec. 2.3: delta must be less than the inverse of any polynomial
        in the database size). fedsim does not change a configured delta; it states the problem
        here (summary.json `user_level.delta_vs_population`) and in a warning at the start."""
        n = self.accounted_population()
        delta = self.user.delta
        out: dict[str, Any] = {"delta": delta, "population": n, "one_over_population": 1.0 / n, "delta_times_population": delta * n}
        if delta * n >= 1:
            out["warning"] = (
                f"privacy.dpfedavg.delta = {delta:g} is not below 1/population = {1.0 / n:.3g} ({n:,} devices"
                + (", the simulated deployment's" if n != self.cfg.population else "")
                + f"): a mechanism that publishes a random device's whole data with probability delta meets "
                f"this (epsilon, delta), about {delta * n:,.0f} devices; set privacy.dpfedavg.delta below "
                f"{1.0 / n:.3g} (e.g. {_suggested_delta(n):.1g})"
            )
        return out

    def assumptions(self) -> dict[str, str]:
        """What the user-level epsilon rests on, each stated (summary.json `assumes`)."""
        mode, reason = randomness.resolve(self.cfg)
        fixed = self.cfg.cohort.sampling == "fixed"
        if self.tree:
            return self._tree_assumptions(mode, reason)
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
            "delta": (
                f"delta = {self.user.delta:g} against {self.accounted_population():,} devices: "
                + ("below 1/population" if self.user.delta * self.accounted_population() < 1 else "NOT below 1/population, see delta_vs_population")
            ),
            "threat_model": (
                "the guarantee is about what is released (models, covered metrics) against anyone who sees it; the "
                "server is trusted to sample, clip-check and add the noise, and "
                + (
                    "sees each worker's sum of clipped updates (SecAgg+ simulation shortcut: inputs travel unmasked)"
                    if self.cfg.secagg.name != "none" and self.cfg.secagg.simulation_shortcut
                    else "sees only the SecAgg+ sum of the survivors' updates" if self.cfg.secagg.name != "none"
                    else "sees each clipped update"
                )  # fmt: skip
                + "; device dropouts, worker failures and SecAgg+ aborts do not depend on private data"
                + (
                    " (SecAgg+ runs only on fixed-size cohorts, so whether a round aborts does not depend on who was "
                    f"sampled; a device drops for its data only if conditional rounding fails {MAX_ROUNDING_DRAWS} times "
                    f"in a row, probability <= e^-{MAX_ROUNDING_DRAWS / 2:g} per device and round, Kairouz, Liu, Steinke "
                    "2021, Thm. 1; a device whose "
                    "training gives a non-finite update drops, assumed not to happen for private data)"
                    if self.cfg.secagg.name != "none" else ""
                )  # fmt: skip
            ),
            "randomness": f"{mode} ({reason})"
            + ("; the noise is a function of the seed and the config, so whoever knows both can remove it" if mode == "reproducible" else ""),
        }

    def _tree_assumptions(self, mode: str, reason: str) -> dict[str, str]:
        period = cyclic_period(self.cfg.population, self.cfg.cohort.size)
        return {
            "accountant": "Gaussian DP of the released tree nodes (Dong, Roth, Su 2022, Cor. 2.13 and 3.3): exact for "
                          "the Gaussian mechanism, no discretisation",
            "adjacency": (
                "zero-out: one device's whole data set replaced by none (its updates become 0) in a population whose "
                "size, and so the cyclic schedule and the denominator, are public; sensitivity C per participation. "
                "Replace-one (one device's data swapped for another's) doubles mu: epsilon_replace_one"
            ),
            "sampling": (
                f"cyclic, no randomness: device i trains in the rounds r with (r - 1) mod {period} = i mod {period}, "
                "fixed before the run and public; no amplification by sampling is claimed"
            ),
            "rounds": "every prefix up to the last released round counts as released (a round that released nothing "
                      "only removes nodes and contributions)",
            "delta": (
                f"delta = {self.user.delta:g} against {self.accounted_population():,} devices: "
                + ("below 1/population" if self.user.delta * self.accounted_population() < 1 else "NOT below 1/population, see delta_vs_population")
            ),
            "threat_model": (
                "the guarantee is about what is released (models, covered metrics) against anyone who sees it; the "
                "server is trusted to clip-check and add the noise, and sees each clipped update; a node's noise is "
                "drawn once and kept while a prefix uses it"
                + ("; with privacy.randomness=secure checkpoints are refused (they would hold the open nodes' noise)"
                   if mode == "secure" else "")  # fmt: skip
            ),
            "randomness": f"{mode} ({reason})"
            + ("; the noise is a function of the seed and the config, so whoever knows both can remove it" if mode == "reproducible" else ""),
        }

    # The round loop's interface (fedsim.mechanisms.Mechanism): the releasing mechanism.
    checkpoint_key = "user_level"
    releases = True

    @classmethod
    def enabled(cls, cfg: FedsimConfig) -> bool:
        return cfg.privacy.dpfedavg is not None

    @classmethod
    def create(cls, cfg: FedsimConfig, dataset: Any, model: torch.nn.Module) -> tuple[UserLevelDP, torch.nn.Module]:
        del dataset
        # May calibrate z (into cfg: prepare's working copy); under SecAgg+ the rounding bound
        # depends on the model's size.
        user_dp = cls(cfg, num_params=len(flat_params(model)))
        if "warning" in (delta_check := user_dp.delta_check()):
            log.warning("%s", delta_check["warning"])
        if user_dp.distributed and randomness.mode(cfg) != "secure":
            log.warning(SIMULATION_ONLY)  # said even without progress lines: it voids the distributed guarantee
        return user_dp, model

    release = aggregate  # the interface's name for it

    def before_round(self, round_num: int) -> None:
        self.check_budget(round_num)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the accounting and the clipping exactly."""
        return {
            "rounds_released": self.rounds_released,
            "released_clips": list(self.released_clips),
            "rounds_noise_only": self.rounds_noise_only,
            "not_released": list(self.not_released),
            "clipping": self.clipping.state_dict() if self.clipping else None,
            "last_released_round": self.last_released_round,
            "tree_noise": self.tree_noise.state_dict() if self.tree_noise else None,
        }

    def resumed(self, run_dir: Path, round_num: int, lost: list[dict]) -> None:
        """Secure randomness: the rounds after the checkpoint run again with fresh noise while their
        first releases were already seen, so each of them that its metrics row shows released (or
        does not say: output.private_metrics_only) stays counted, at its clip norm. A crash after
        a round's release and before its row was written is not seen here (at most that round).
        Reproducible randomness repeats those rounds bit for bit: nothing to add. DP-FTRL refuses
        checkpoints with secure randomness."""
        del run_dir
        if self.tree or randomness.mode(self.cfg) != "secure":
            return
        later = [row for row in lost if row.get("user_release") != "none"]
        for row in later:
            self.rounds_released += 1
            if self.distributed:
                self.released_clips.append(float(row.get("clip_norm") or self.clip_norm))
        if later:
            log.warning("resume with secure randomness: %d released rounds after the checkpoint of round %d stay counted "
                        "(those rounds run again with fresh noise)", len(later), round_num)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_released = int(state["rounds_released"])
        self.released_clips = [float(c) for c in state.get("released_clips", [])]
        self.rounds_noise_only = int(state.get("rounds_noise_only", 0))
        self.not_released = list(state.get("not_released", []))
        if self.clipping is not None and state.get("clipping"):
            self.clipping.load_state_dict(state["clipping"])
        self.last_released_round = int(state.get("last_released_round", self.rounds_released))
        if self.tree_noise is not None and state.get("tree_noise"):
            self.tree_noise.load_state_dict(state["tree_noise"])


def _suggested_delta(population: int) -> float:
    """A delta well below 1/N: the next power of ten under 1/(10 N)."""
    import math

    return 10.0 ** math.floor(math.log10(1.0 / (10 * population)) + 1e-9)
