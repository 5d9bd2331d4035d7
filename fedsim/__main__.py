"""`fedsim` / `python -m fedsim`: Hydra over conf/config.yaml, then `fedsim.run.run`.

Before Hydra starts a run (or every job of a `-m` sweep), the command line is composed and
checked once here: a bad override, an unknown config group option or a value outside its
range ends the command with one line on stderr and exit status 2, before any job starts.
"""

from __future__ import annotations

import os

# One BLAS thread per process, set before numpy loads (Ray workers inherit it): the simulator
# parallelises over workers, multi-threaded OpenBLAS only oversubscribes 2 cores on its small
# matrices, and its thread pool was seen spinning forever in exec_blas when the ServerApp's
# thread called it after the main thread had (a CI run hung in SyntheticDataset.test_data).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedsim import resources
from fedsim.capacity import check_fits
from fedsim.config import FedsimConfig, from_dict
from fedsim.errors import ConfigError, FedsimError, RunInterrupted
from fedsim.trackers import check_installed

# The repository's conf/, or its copy inside an installed wheel (fedsim.resources).
CONF_DIR = resources.resource_dir("conf") or resources.candidates("conf")[1]
EXIT_BAD_INPUT = 2
# Hydra configs that an optional extra brings: a missing one is named with what to install.
FROM_EXTRAS = {"hydra/sweeper/optuna": "Hydra's Optuna sweeper is not installed: pip install 'fedsim[tune]'"}


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print one line naming the problem and exit with status 2 (130 for Ctrl-C)."""
    sys.stderr.write(f"fedsim: {'error: ' if code == EXIT_BAD_INPUT else ''}{message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def config_from_hydra(dcfg: DictConfig) -> FedsimConfig:
    try:
        raw: Any = OmegaConf.to_container(dcfg, resolve=True)
    except OmegaConfBaseException as err:  # rounds=${oops}: an interpolation that cannot resolve
        raise ConfigError(str(getattr(err, "full_key", None) or "<config>"), f"cannot be resolved: {_one_line(err)}") from None
    raw.pop("experiment", None)  # experiment configs are @package _global_; nothing is left under the key
    return from_dict(raw)


def _one_line(err: BaseException) -> str:
    """Hydra's multi-line composition errors, folded into one readable line."""
    lines = [ln.strip() for ln in str(err).split("Config search path")[0].splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type="))]
    out: list[str] = []
    for ln in lines:
        if out and out[-1].endswith(":"):
            out[-1] += " " + ln
        elif out and out[-1].startswith("Available options"):
            out[-1] += ", " + ln
        else:
            out.append(ln)
    return "; ".join(out) or type(err).__name__


def precheck(argv: list[str]) -> None:
    """Compose and validate the config for every value a sweep would take; fail() on error."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(argv)
    if args.multirun and (args.cfg or args.info or args.shell_completion):
        fail("only one of --multirun (-m), --cfg, --info and --shell-completion can be given")
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return  # Hydra prints something and exits; nothing runs
    if not CONF_DIR.is_dir():
        packaged, repository = resources.candidates("conf")
        fail(f"config directory not found at {repository} nor {packaged}: reinstall fedsim (a wheel built from its repository, or pip install -e .)")
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception as err:  # Hydra's grammar errors
        fail(f"bad override: {_one_line(err)}")
    base = [o.input_line for o in parsed if not o.is_sweep_override() and o.get_key_element() != "hydra.searchpath"]
    # The user's config directories (--config-dir, hydra.searchpath) take part in the check as in the run.
    searchpath = [f"file://{Path(args.config_dir).absolute()}"] if args.config_dir else []
    for o in parsed:
        if o.get_key_element() == "hydra.searchpath" and not o.is_sweep_override():
            value = o.value()
            searchpath += [str(v) for v in (value if isinstance(value, list) else [value])]
    if searchpath:
        base.append("hydra.searchpath=[" + ",".join(f"'{entry}'" for entry in searchpath) + "]")
    # Sweeps are checked one parameter at a time (the others at their first value), so every
    # value of every swept parameter is composed once without the full cross product.
    sweeps = [o for o in parsed if o.is_sweep_override()]
    heads = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in sweeps]
    trials = [base + heads]
    for i, o in enumerate(sweeps):
        for v in list(o.sweep_string_iterator())[1:]:
            trials.append(base + heads[:i] + [f"{o.get_key_element()}={v}"] + heads[i + 1 :])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            for overrides in trials:
                try:
                    dcfg = compose(config_name=args.config_name or "config", overrides=overrides)
                except Exception as err:
                    message = _one_line(err)
                    fail(next((f"{message} ({hint})" for path, hint in FROM_EXTRAS.items() if f"'{path}'" in message), message))
                try:
                    cfg = config_from_hydra(dcfg)
                    check_fits(cfg)
                    if cfg.engine == "simulation":  # deployment: the trackers run beside the SuperLink
                        check_installed(cfg.output.loggers)
                except FedsimError as err:
                    fail(str(err))
    finally:
        GlobalHydra.instance().clear()


_SWEEP_RUNS: dict[str, int] = {}  # a -m sweep's directory -> its jobs that ran in this process


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(dcfg: DictConfig) -> float | None:
    from hydra.types import RunMode

    from fedsim.run import run, server_malloc

    server_malloc()  # this process is the command's own: the server's memory settings
    started = time.perf_counter()
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep_dir = str(Path(HydraConfig.get().sweep.dir).absolute())
        _SWEEP_RUNS[sweep_dir] = _SWEEP_RUNS.get(sweep_dir, 0) + 1
    try:
        cfg = config_from_hydra(dcfg)
        run_dir = cfg.output.dir or HydraConfig.get().runtime.output_dir
        summary = run(cfg, run_dir, overrides=_override_keys())
    except BaseException as err:
        user_error = _find_user_error(err)
        if user_error is None and isinstance(err, KeyboardInterrupt):  # Ctrl-C before round 1, or twice
            fail("interrupted (Ctrl-C)", RunInterrupted.exit_code)
        if user_error is None:
            raise
        fail(str(user_error), user_error.exit_code)
    if cfg.output.progress:
        where = Path(cfg.resume).expanduser().absolute() if cfg.resume else Path(run_dir).absolute()
        for line in end_of_run(summary, where, time.perf_counter() - started, resumed=bool(cfg.resume)):
            sys.stderr.write(f"[fedsim] {line}\n")
        sys.stderr.flush()
    return summary.get("final_test_accuracy")


def end_of_run(summary: dict[str, Any], run_dir: Path, wall_s: float, *, resumed: bool = False) -> list[str]:
    """The two lines a finished run ends with: where its outputs are, and its result in one line
    (final accuracy, the epsilon of every privacy guarantee in force, wall time)."""
    if resumed:
        where = f"outputs: in the resumed run's directory ({run_dir})"
    else:
        found = run_dir.iterdir() if run_dir.is_dir() else ()
        files = sorted(p.name + ("/" if p.is_dir() else "") for p in found if not p.name.startswith("."))
        where = f"outputs: {run_dir}" + (f" ({', '.join(files)})" if files else "")
    accuracy = summary.get("final_test_accuracy")
    parts = [
        f"final test accuracy {accuracy:.4f}" if accuracy is not None else "no evaluation",
        f"{summary.get('rounds', 0)} rounds",
    ]
    privacy = summary.get("privacy") or {}
    sample = privacy.get("sample_level")
    if sample:
        parts.append(
            f"sample-level epsilon {_g(sample.get('epsilon_max'))} per device (max; median "
            f"{_g(sample.get('epsilon_median'))}), delta {_g(sample.get('delta'))}"
        )
    user = privacy.get("user_level")
    if user:
        simulated = f", for cohorts of {user['simulated_cohort_size']}" if user.get("simulated_cohort_size") else ""
        parts.append(f"user-level epsilon {_g(user.get('epsilon'))}, delta {_g(user.get('delta'))}{simulated}")
    if summary.get("stopped_early"):
        parts.append(f"stopped early: {summary['stopped_early']}")
    parts.append(f"{wall_s:.1f} s wall")
    return [where, "done: " + " | ".join(parts)]


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _override_keys() -> list[str]:
    """The config keys set on the command line ("rounds", "privacy", "model.hidden_sizes")."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    return [k for k in keys if not k.startswith("hydra.")]


def _find_user_error(err: BaseException | None) -> FedsimError | None:
    """Flower re-raises the ServerApp's exceptions, sometimes wrapped: find ours in the chain."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, FedsimError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def main() -> None:
    # Ctrl-C must reach this command: a parent may have left SIGINT blocked in the signal mask it
    # handed down (blocked signals stay pending across exec; Ray's process starter blocks it),
    # which made Ctrl-C on the deployment engine a no-op. An ignored SIGINT (a background job)
    # is the caller's choice and stays ignored.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    precheck(sys.argv[1:])
    _hydra_main()
    for sweep_dir, jobs in _SWEEP_RUNS.items():
        # Each job ended with its own lines; the sweep as a whole is read by the report.
        sys.stderr.write(f"[fedsim] sweep: {jobs} runs in {sweep_dir}; compare them with: fedsim-report {sweep_dir}\n")


if __name__ == "__main__":
    main()
