"""fedsim's ServerApp: the round loop, readable in one screen.

Per round: sample a cohort of device ids (seeded, `fedsim.sampling`), send each worker one
message naming its devices, sum the replies in device-id order (`fedsim.aggregation`), take
the server optimizer step, evaluate centrally every `eval_every` rounds, log the round.
A device is not a Flower node: workers are SuperNodes that simulate many devices each
(in the classic layout, one SuperNode per device: same cohort, same seeds, same model).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients import evaluate, flat_params, load_flat_params
from fedsim import checkpoint, mechanisms, randomness, runstate, strategies, wire
from fedsim.audit import RunAudit
from fedsim.capacity import peak_rss_mb
from fedsim.config import FedsimConfig, from_dict
from fedsim.data import FederatedDataset, load_dataset
from fedsim.errors import ConfigError, FedsimError, RunInterrupted
from fedsim.mechanisms import Mechanism
from fedsim.models import model_for, split_fixed_features
from fedsim.privacy import published
from fedsim.placement import assign_devices
from fedsim.runlog import ROUND_FIELDS, RoundMetrics, RunLog, rows_after
from fedsim.sampling import sample_cohort
from fedsim.exchange import exchange
from fedsim.transport import SYSTEM_CLOCK, Clock, Workers, wait_for_workers
from fedsim.worker import job_config_json, use_vectorized

log = logging.getLogger("fedsim")
RUN_CONFIG_KEY = "fedsim-config"  # the run config entry holding the resolved config as JSON


@dataclass
class RunSetup:
    """Everything a run needs before its first round; built once, before Ray starts, so that
    bad data, an incompatible model or an unreachable privacy target fail in a second."""

    dataset: FederatedDataset
    model: torch.nn.Module
    # The active privacy mechanisms in their composition order (fedsim.mechanisms: DP-SGD's
    # ledger and budgets, the user-level release, SecAgg+), built and calibrated.
    mechanisms: list[Mechanism]
    resume: dict | None = None  # a checked checkpoint to continue from (fedsim.checkpoint.load)
    vectorized: bool = False  # devices train in batched groups (fedsim.worker.use_vectorized), not one by one
    vectorized_why: str = ""  # why the run trains vectorized or not (fedsim.worker.use_vectorized)
    derived: dict[str, float] = field(default_factory=dict)  # calibrated values (fedsim.runstate)


def prepare(cfg: FedsimConfig, dataset: FederatedDataset | None = None, resume: dict | None = None) -> RunSetup:
    """Data, model, privacy mechanisms (calibrated) and checks; `cfg` is left as given, the
    calibrated values are in `RunSetup.derived` (fedsim.runstate)."""
    given, cfg = cfg, copy.deepcopy(cfg)  # calibration writes into the copy
    if dataset is None:
        dataset = load_dataset(cfg.dataset, population=cfg.population, seed=cfg.seed)
    model = model_for(cfg, dataset)
    if getattr(model, "reads_tokens", False) and not dataset.token_inputs:
        raise ConfigError("model.name", f"{cfg.model.name} reads character indices, which dataset {cfg.dataset.name} "
                          "does not give; allowed with it: auto, logreg, mlp, cnn, custom (lstm/transformer: dataset=shakespeare)")  # fmt: skip
    strategies.strategy_class(cfg).check(cfg)  # e.g. SCAFFOLD under SecAgg+: refused before any start-up
    # Calibration (sigma, z) happens here, into the copy, before the config goes out.
    active, model = mechanisms.build(cfg, dataset, model)
    # simulation.vectorize=on with a model torch.func cannot batch fails here (ConfigError).
    vectorized, why = use_vectorized(cfg, model, dataset)
    return RunSetup(dataset=dataset, model=model, mechanisms=active, resume=resume,
                    vectorized=vectorized, vectorized_why=why,
                    derived=runstate.derived_values(given, cfg))  # fmt: skip


STOP = threading.Event()  # set by Ctrl-C (fedsim.run): the loop stops at the next round boundary


def run_rounds(
    cfg: FedsimConfig, grid: Grid, run_dir: Path, setup: RunSetup | None = None, *, clock: Clock = SYSTEM_CLOCK
) -> dict:
    """Run every round of `cfg` over the workers reachable through `grid`; return the summary.
    (`clock`: what worker timeouts are measured with; tests pass a fake one.)"""
    torch.set_num_threads(cfg.simulation.torch_threads)
    setup = setup or prepare(cfg)
    cfg = runstate.effective(cfg, setup.derived)  # what config.yaml, the workers and the fingerprint see
    model, active = setup.model, setup.mechanisms
    release = mechanisms.releaser(active)  # the user-level release (DP-FedAvg, DP-FTRL) or None: the plain mean
    test_x, test_y = setup.dataset.test_data()
    features, eval_model = split_fixed_features(model)  # a fixed first layer: the test set's features once
    if features is not None:
        test_x = features(test_x)
    params = flat_params(model)
    strategy = strategies.build(cfg, len(params), run_dir)
    average = ModelAverage(cfg.algorithm.model_ema, params) if cfg.algorithm.model_ema else None
    # The deployment engine without simulation.num_workers: every SuperNode connected at the start.
    expected = cfg.simulation.num_workers if cfg.engine == "deployment" else cfg.num_workers
    workers = Workers(
        wait_for_workers(grid, expected, timeout_s=cfg.simulation.round_timeout_s or 600.0, clock=clock),
        timeout_s=cfg.simulation.round_timeout_s,
        max_missed_rounds=cfg.simulation.max_missed_rounds,
        clock=clock,
    )
    config_json = job_config_json(cfg)  # with the sha256 of the data the server read: workers check theirs
    streams = randomness.streams(cfg)  # after prepare: a calibrated z is part of the fingerprint
    # What every checkpoint records of the data and the streams: as the run started, not as the
    # files are when it writes (data rewritten or deleted mid-run must not pass a later resume).
    started = checkpoint.identity(cfg)
    covered = frozenset(published.covered_metrics(cfg))
    # A resumed run's rounds after its checkpoint (their rows, before RunLog rewrites metrics.jsonl).
    lost = rows_after(run_dir, int(setup.resume["round"])) if setup.resume is not None else []
    runlog = RunLog(run_dir, cfg, keep=covered if cfg.output.private_metrics_only else None)
    first_round, elapsed_before = 1, 0.0
    if setup.resume is not None:
        params, first_round, elapsed_before = restore(setup.resume, strategy, active, runlog, lost)
        if average is not None:
            average.load_state_dict(setup.resume["model_average"])
    audit = RunAudit.start(cfg, setup, params)  # canaries (fedsim.audit), or None
    if lost and randomness.mode(cfg) == "secure":
        # The privacy of the rounds after the checkpoint stays counted (Mechanism.resumed): written
        # into that checkpoint now, so a second crash before the next checkpoint keeps it too.
        save_checkpoint(cfg, run_dir, first_round - 1, params, strategy, active, runlog, elapsed_before, started, audit, average)
    if (line := strategy.describe()) is not None:
        runlog.note(line)
    for described in (*active, audit):
        if described:
            runlog.note(described.describe())
    for line in setup.dataset.notes():
        runlog.note(line)
    setup.dataset.save(run_dir)
    random_desc = randomness.describe(cfg)
    runlog.note(f"randomness: {random_desc['mode']} ({random_desc['reason']})" + (
        f"; {random_desc['warning']}" if "warning" in random_desc else ""))  # fmt: skip
    stopped: FedsimError | None = None
    start = time.perf_counter() - elapsed_before
    try:
        for round_num in range(first_round, cfg.rounds + 1):
            t0 = time.perf_counter()
            try:
                if STOP.is_set():
                    raise RunInterrupted(f"interrupted after round {round_num - 1}; continue with: fedsim resume={run_dir}")
                for mechanism in active:
                    mechanism.before_round(round_num)
            except FedsimError as err:
                stopped = err
                break
            sampled = sample_cohort(
                population=cfg.population,
                cohort_size=cfg.cohort.size,
                method=cfg.cohort.sampling,
                rng=streams.numpy("cohort", round_num),
                round_num=round_num,
            )
            cohort = sampled
            for mechanism in active:
                cohort = mechanism.admit(cohort)  # leave out devices over budget
            alive = workers.wait_for_alive(grid)  # when every worker is late: until one answers again
            if not alive:
                stopped = FedsimError(f"round {round_num}: every worker is lost: " + "; ".join(
                    f"worker {n}: {why}" for n, why in workers.lost.items()))  # fmt: skip
                break
            def replan(nodes: list[int], cohort: list[int] = cohort) -> list[wire.Assignment]:
                return assign_devices(cohort, workers.nodes if cfg.simulation.layout == "classic" else nodes,
                                      cfg.simulation.layout, cfg.simulation.device_group if setup.vectorized else None)  # fmt: skip

            out = exchange(cfg, grid, replan(alive), params, round_num, config_json, release, workers, replan, strategy)
            workers.drop_unclaimed()  # late copies of this round's jobs that another copy answered
            if audit:  # user-level canaries join the released sum; sample-level canary devices train apart
                out.total = audit.during_round(out, round_num, params, release, grid, workers, config_json)
            out.stats["devices_failed"] = len(cohort) - out.count
            out.stats["workers_lost"] = len(workers.lost)
            out.stats.setdefault("workers_late", 0)
            if out.stats.pop("all_workers_failed", False):
                # Every worker answered with an error (after the retries): a setup problem such
                # as missing data. Stop with the workers' own words rather than train nothing.
                stopped = FedsimError(f"round {round_num}: every worker failed: {out.stats['worker_errors'][0]}")

            privacy: dict = {}
            noise_only = False
            if release and out.total is None and out.aborted is None and not stopped:
                # The round ran: with no device update (empty Poisson cohort, every reply lost)
                # the release is the noise alone, and it is accounted (issue 14, defect 4).
                out.total, noise_only = torch.zeros(len(params), dtype=torch.float64), True
            if release and out.total is None:
                release.no_release(round_num, out.aborted or str(stopped))
                privacy |= release.round_metrics()
            if out.total is not None:
                # Privacy spent is recorded (and, with checkpoints, saved) before the update that spent it.
                for mechanism in active:
                    privacy |= mechanism.after_devices(round_num, out.reports, run_dir)
                if release:
                    noised = release.release(
                        out.total, out.reports, round_num, count_sum=out.count_sum, count_devices=out.count,
                        noise_only=noise_only,
                    )  # fmt: skip
                    params = strategy.step(params, noised)
                    privacy |= release.round_metrics()
                elif out.count:
                    params = strategy.step(params, (out.total / out.weight).to(torch.float32))
                if out.count and strategy.needs_device_updates:
                    privacy |= strategy.observe(round_num, out.reports)
            if out.total is None or (out.count == 0 and not release):
                log.warning("round %d: no device update was aggregated; the model is unchanged", round_num)

            if average is not None:
                average.update(params)
            test_acc = test_loss = None
            if round_num % cfg.eval_every == 0 or round_num == cfg.rounds:
                load_flat_params(model, released(params, average))
                ev = evaluate(eval_model, (test_x, test_y))
                test_acc, test_loss = ev["accuracy"], ev["loss"]
            if audit:
                privacy |= audit.after_round(params, evaluated=test_acc is not None, user_dp=release)
            now = time.perf_counter()
            runlog.round(
                RoundMetrics(
                    round=round_num,
                    cohort_size=len(sampled),
                    devices_trained=out.count,
                    test_accuracy=test_acc,
                    test_loss=test_loss,
                    round_time_s=now - t0,
                    elapsed_s=now - start,
                    **{k: v for k, v in out.stats.items() if k in ROUND_FIELDS},
                ),
                privacy | {k: v for k, v in out.stats.items() if k not in ROUND_FIELDS},
            )
            every = cfg.checkpoint.every
            if every and (round_num % every == 0 or round_num == cfg.rounds or STOP.is_set()):
                save_checkpoint(cfg, run_dir, round_num, params, strategy, active, runlog, now - start, started, audit, average)
            if stopped:
                break
    except BaseException:
        runlog.close()
        strategy.close()
        raise
    final = released(params, average)  # the model the run saves (the average with model_ema)
    load_flat_params(model, final)
    extra = {
        "num_params": len(params),
        "num_workers": len(workers.nodes),
        "workers_lost": {str(node): why for node, why in workers.lost.items()},
        # Workers that missed a deadline (times, over the run) but were not dropped for it.
        "workers_late": {str(node): n for node, n in workers.late_count.items() if node not in workers.lost},
        "late_replies_discarded": workers.late_replies_discarded,
        "server_peak_rss_mb": peak_rss_mb(),
        "stopped_early": str(stopped) if stopped else None,
        "resumed_from_round": first_round - 1 if setup.resume is not None else None,
        # how devices trained: "vectorized (auto: DP-SGD)", "one by one (simulation.vectorize=off)", ...
        "device_training": ("vectorized" if setup.vectorized else "one by one") + f" ({setup.vectorized_why})",
    }
    extra["randomness"] = random_desc
    extra["derived"] = dict(setup.derived)  # values the run solved for (calibrated noise multipliers)
    extra["diagnostics_outside_guarantee"] = published.outside_guarantee(cfg, runlog.keys)
    extra["metrics_outside_guarantee_written"] = not cfg.output.private_metrics_only
    extra["strategy"] = strategy.summary()
    if average is not None:
        extra["model_average"] = average.summary()
    strategy.close()
    extra["privacy"] = {}
    for mechanism in active:
        mechanism.finish(run_dir)
        extra[mechanism.summary_key] = extra.get(mechanism.summary_key, {}) | mechanism.summary()
    if audit:
        extra["audit"] = audit.summary(run_dir, final, release)  # its final-model test scores the saved model
    language = setup.dataset.final_summary(model, streams.torch("final_sample", 0))
    if language:
        # Per-character perplexity exp(mean cross-entropy in nats) of the last central evaluation.
        losses = [row.test_loss for row in runlog.rows if row.test_loss is not None]
        extra["language"] = {"final_test_perplexity": math.exp(losses[-1]) if losses else None, **language}
    summary = runlog.finish(model, final, extra)
    if stopped:
        raise stopped  # after the outputs are written: nothing is lost
    return summary


def save_checkpoint(
    cfg: FedsimConfig,
    run_dir: Path,
    round_num: int,
    params: torch.Tensor,
    strategy: strategies.Strategy,
    active: list[Mechanism],
    runlog: RunLog,
    elapsed_s: float,
    identity: dict[str, str | None],
    audit: RunAudit | None = None,
    average: ModelAverage | None = None,
) -> None:
    """Save round `round_num`'s state (fedsim.checkpoint), with `identity`, the run's
    `checkpoint.identity` as it started."""
    checkpoint.save(
        checkpoint.checkpoint_path(run_dir, round_num),
        {
            "round": round_num,
            "config": cfg.to_dict(),
            "params": params.clone(),
            "server_optimizer": strategy.state_dict(),
            "sample_ledger": None,  # each mechanism's state under its checkpoint_key
            "user_level": None,
            **{m.checkpoint_key: m.state_dict() for m in active if m.checkpoint_key},
            "rows": runlog.row_dicts(),
            "elapsed_s": elapsed_s,
            "audit": audit.state_dict() if audit else None,
            "model_average": average.state_dict() if average else None,
            # What a resume checks (fedsim.run._resumed): the data's bytes and the random streams.
            **identity,
        },
        keep=cfg.checkpoint.keep,
    )
    strategy.checkpointed(round_num, checkpoint.kept_rounds(run_dir))


def restore(
    state: dict,
    strategy: strategies.Strategy,
    active: list[Mechanism],
    runlog: RunLog,
    lost: list[dict] | None = None,
) -> tuple[torch.Tensor, int, float]:
    """Put a checkpoint's state back; returns (params, first round to run, elapsed seconds).
    `lost`: the metrics rows of rounds that ran after the checkpoint (they will run again)."""
    strategy.load_state_dict(state["server_optimizer"])
    for mechanism in active:
        if mechanism.checkpoint_key:
            mechanism.load_state_dict(state[mechanism.checkpoint_key])
        mechanism.resumed(runlog.dir, int(state["round"]), lost or [])
    runlog.restore_rows(state["rows"])
    return state["params"].clone(), int(state["round"]) + 1, float(state.get("elapsed_s", 0.0))


class ModelAverage:
    """An exponential moving average of the global model over rounds (algorithm.model_ema):
    after round t, avg_t = beta avg_{t-1} + (1 - beta) w_t, from avg_0 = the initial model, in
    float64. Parameter averaging of De et al. 2022 (Sec. 3.3; per round here, where they average
    per step). The run evaluates and saves the average; devices keep training from w_t, so the
    rounds, their releases and the privacy accounting are those of the run without it (the
    average is post-processing of the released models: it costs no privacy).
    """

    def __init__(self, decay: float, initial: torch.Tensor) -> None:
        self.decay = float(decay)
        self.avg = initial.detach().to(torch.float64).clone()
        self.rounds = 0

    def update(self, params: torch.Tensor) -> None:
        self.avg.mul_(self.decay).add_(params.detach().to(torch.float64), alpha=1.0 - self.decay)
        self.rounds += 1

    @property
    def params(self) -> torch.Tensor:
        """The average as the model's float32 flat parameters."""
        return self.avg.to(torch.float32)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "avg": self.avg.clone(), "rounds": self.rounds}

    def load_state_dict(self, state: dict | None) -> None:
        if not state or float(state["decay"]) != self.decay:
            raise FedsimError("resume: the checkpoint holds no model average with algorithm.model_ema="
                              f"{self.decay} (it was written by a run without it or with another decay)")  # fmt: skip
        self.avg, self.rounds = state["avg"].clone().to(torch.float64), int(state["rounds"])

    def summary(self) -> dict:
        return {"decay": self.decay, "rounds_averaged": self.rounds,
                "evaluated_and_saved": "the average (test metrics, model.pt, model_sha256)",
                "reference": "De et al. 2022, Sec. 3.3 (parameter averaging), per round"}  # fmt: skip


def released(params: torch.Tensor, average: ModelAverage | None) -> torch.Tensor:
    """The model a run evaluates and saves: the average with algorithm.model_ema, else the params."""
    return params if average is None else average.params


def make_server_app(cfg: FedsimConfig, run_dir: Path, result: dict, setup: RunSetup | None = None) -> ServerApp:
    """A ServerApp for an in-process run; the summary lands in `result`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        del context
        result.update(run_rounds(cfg, grid, run_dir, setup))

    return app


# For `flwr run`: the config arrives as one run config entry (see docs/architecture.md).
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedsim import deploy

    raw = context.run_config.get(RUN_CONFIG_KEY)
    if not isinstance(raw, str) or not raw.strip():
        message = (
            f"run config entry '{RUN_CONFIG_KEY}' is empty: pass the resolved config as JSON, "
            f"e.g. flwr run . <superlink> --run-config \"{RUN_CONFIG_KEY}='<json>'\" (or use fedsim engine=deployment)"
        )
        deploy.ship_error(message)
        raise FedsimError(message)
    try:
        cfg = from_dict(json.loads(raw))
    except (json.JSONDecodeError, FedsimError) as err:
        deploy.ship_error(f"run config entry '{RUN_CONFIG_KEY}': {err}")
        raise FedsimError(f"run config entry '{RUN_CONFIG_KEY}': {err}") from None
    run_dir = Path(cfg.output.dir or "outputs/flwr-run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # the launcher's path does not exist here (another machine): a local one
        run_dir = Path(tempfile.mkdtemp(prefix="fedsim-run-"))
    cfg.output.progress = True  # the progress lines are the run's log on the launcher's terminal
    try:
        run_rounds(cfg, grid, run_dir)
    except FedsimError as err:
        deploy.ship_outputs(run_dir)  # what was written before the error (nothing is lost)
        deploy.ship_error(str(err))
        raise
    deploy.ship_outputs(run_dir)
