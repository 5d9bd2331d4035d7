"""The built wheel is a working fedsim on its own: configs and bundled data inside, usable from
any directory without the repository (pip install of dist/fedsim-*.whl, then `fedsim`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedsim.data.bundled import BUNDLES

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "outputs", "multirun", "*.egg-info", "__pycache__", ".pytest_cache"
)


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the built wheel, the directory it is installed into), built from a copy of the sources
    so the repository gets no build/ or egg-info."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(source)])
    (wheel,) = (tmp / "dist").glob("fedsim-*.whl")
    target = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)])
    return wheel, target


def _alone(target: Path) -> dict[str, str]:
    """An environment where fedsim can only come from `target` (not the repository)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), FLWR_LOG_LEVEL="WARNING", FLWR_TELEMETRY_ENABLED="0")
    return env


def test_wheel_carries_every_config_and_bundled_data_file(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"fedsim/_bundled/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    data = {f"fedsim/_bundled/data/{relative}" for bundle in BUNDLES.values() for relative in bundle.sha256}
    assert configs and configs <= names
    assert data <= names


@pytest.mark.ray
def test_installed_wheel_runs_fedsim_from_an_unrelated_directory(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, target = installed
    cwd = tmp_path / "anywhere"
    cwd.mkdir()
    where = _run(
        [sys.executable, "-c", "import fedsim.__main__ as m, fedsim.data.bundled as b; "
         "print(m.CONF_DIR); print(b.bundled_path('femnist')); print(b.bundled_path('shakespeare'))"],
        cwd=cwd, env=_alone(target),
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(target / "fedsim" / "_bundled") for p in where), where  # sha256-checked copies

    fedsim = target / "bin" / "fedsim"  # the console script the wheel installs
    run_dir = tmp_path / "run"
    proc = _run(
        [str(fedsim), "rounds=2", "population=60", "cohort.size=6", "simulation.num_workers=1",
         f"simulation.ray_temp_dir={tmp_path / 'ray'}", f"output.dir={run_dir}"],
        cwd=cwd, env=_alone(target),
    )  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["stopped_early"] is None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    assert "Traceback" not in proc.stderr
    tail = proc.stderr.strip().splitlines()[-2:]  # where the outputs are, and the result in one line
    assert tail[0].startswith(f"[fedsim] outputs: {run_dir} (") and "summary.json" in tail[0]
    assert tail[1].startswith(f"[fedsim] done: final test accuracy {summary['final_test_accuracy']:.4f} | 2 rounds |")


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_installed_wheel_takes_the_users_own_config_directory(
    installed: tuple[Path, Path], tmp_path: Path, how: str
) -> None:
    _, target = installed
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\nrounds: 7\ncohort:\n  size: 3\n")
    (mine / "broken.yaml").write_text("# @package _global_\nrounds: 0\n")
    where = f"--config-dir={tmp_path / 'my_conf'}" if how == "--config-dir" else f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    fedsim = str(target / "bin" / "fedsim")

    shown = _run([fedsim, where, "experiment=mine", "--cfg", "job"], cwd=tmp_path, env=_alone(target)).stdout
    assert "rounds: 7" in shown and "size: 3" in shown

    # A bad value in the user's own config is caught by the check before any run starts.
    proc = subprocess.run(
        [fedsim, where, "experiment=broken", f"output.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=_alone(target), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "fedsim: error: config key 'rounds': must be > 0, got 0"
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()  # no Hydra job started
