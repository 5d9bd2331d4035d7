"""Checkpoints and faults: resume after SIGKILL bit-identically, refuse bad checkpoints, survive NaN devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsim import checkpoint
from fedsim.config import FedsimConfig, from_dict
from fedsim.errors import DataError, FedsimError
from fedsim.run import run
from fake_grid import run_local
from fedsim.api import compose
from helpers import descendants

REPO = Path(__file__).resolve().parent.parent
ARGS = [
    "population=60", "cohort.size=10", "cohort.sampling=fixed", "dataset.size_max=200", "model=mlp",
    "privacy=[dpsgd,dpfedavg]", "privacy.dpfedavg.accountant=rdp", "output.progress=false", "simulation.num_workers=1",
]  # fmt: skip


def fedsim(tmp: Path, *args: str, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedsim", *args, f"simulation.ray_temp_dir={tmp / 'ray'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,  # type: ignore[arg-type]
    )  # fmt: skip


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.ray
def test_sigkill_mid_run_then_resume_gives_the_same_model_and_epsilon(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_local(compose([*ARGS, "rounds=8"]), whole)  # the uninterrupted run, on the in-process grid

    proc = fedsim(tmp_path, *ARGS, "rounds=8", "checkpoint.every=1", f"hydra.run.dir={killed}", start_new_session=True)
    deadline = time.monotonic() + 300
    def newest_checkpoint() -> int:
        found = sorted((killed / "checkpoints").glob("round_*.pt"))
        return int(found[-1].stem.split("_")[1]) if found else 0

    while newest_checkpoint() < 3:  # (keep=2 removes older files: look for any round >= 3)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray processes, mid-round
    proc.wait(timeout=60)
    assert not (killed / "summary.json").exists()

    again = fedsim(tmp_path, f"resume={killed}", f"hydra.run.dir={tmp_path / 'hydra'}")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    a, b = summary(whole), summary(killed)
    assert b["resumed_from_round"] >= 3
    assert b["model_sha256"] == a["model_sha256"]
    assert b["privacy"]["sample_level"]["epsilon_max"] == a["privacy"]["sample_level"]["epsilon_max"]
    assert b["privacy"]["user_level"]["epsilon"] == a["privacy"]["user_level"]["epsilon"]
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, 9))


def test_truncated_checkpoint_is_refused_with_one_line(tmp_path: Path) -> None:
    good = tmp_path / "run" / "checkpoints" / "round_000002.pt"
    checkpoint.save(good, {"round": 0, "config": {}, "params": torch.zeros(3), "server_optimizer": {}, "rows": []}, keep=2)
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", f"resume={good}"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "truncated or corrupt" in lines[0] and "round_000002.pt" in lines[0], proc.stderr


def test_checkpoint_without_a_consistent_ledger_is_refused(tmp_path: Path) -> None:
    cfg = from_dict({"privacy": {"dpsgd": {"noise_multiplier": 1.0}}}).to_dict()
    base = {"round": 1, "config": cfg, "params": torch.zeros(3), "server_optimizer": {}, "rows": [{"devices_trained": 5}]}
    path = tmp_path / "round_000001.pt"
    checkpoint.save(path, base, keep=2)
    with pytest.raises(FedsimError, match="no privacy ledger"):
        checkpoint.load(path)
    ledger = {"accountant": "rdp", "delta": 1e-5, "target_epsilon": None, "devices": {"3": [[1.0, 0.1, 10, 4]]}}
    checkpoint.save(path, base | {"sample_ledger": ledger}, keep=2)
    with pytest.raises(FedsimError, match="inconsistent"):
        checkpoint.load(path)  # 4 participations in the ledger, 5 in the metrics


def test_atomic_save_keeps_the_newest_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    for r in range(1, 5):
        checkpoint.save(checkpoint.checkpoint_path(tmp_path, r), {"round": r}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["round_000003.pt", "round_000004.pt"]


@pytest.mark.ray
def test_nan_updates_from_ten_percent_of_devices_leave_the_model_finite(tmp_path: Path) -> None:
    def config(rate: float) -> dict:
        return {
            "seed": 2, "population": 100, "rounds": 6, "cohort": {"size": 20, "sampling": "fixed"},
            "dataset": {"name": "synthetic", "size_max": 100}, "model": {"name": "mlp", "hidden_sizes": [16]},
            "faults": {"nan_update_rate": rate},
            "simulation": {"num_workers": 1, "ray_temp_dir": str(tmp_path / "ray")}, "output": {"progress": False},
        }  # fmt: skip

    clean = run_local(from_dict(config(0.0)), tmp_path / "clean")  # in-process grid: no second Ray start-up
    faulty = run(from_dict(config(0.1)), tmp_path / "faulty")
    params = torch.load(tmp_path / "faulty" / "model.pt", weights_only=False)["flat_params"]
    assert torch.isfinite(params).all()
    assert faulty["devices_failed"] > 0  # the NaN devices were rejected, counted, and the rounds went on
    assert abs(faulty["final_test_accuracy"] - clean["final_test_accuracy"]) < 0.1


def worker_processes(launcher: int, backend: str) -> list[int]:
    """The run's worker processes: Ray's ClientApp actors, or the processes forked from fedsim's
    worker template (`fedsim.local_workers`; the template itself serves no message)."""
    found = descendants(launcher)
    if backend == "ray":
        return [p for p, cmd in found.items() if cmd.startswith("ray::ClientAppActor")]
    forked = {p for p, cmd in found.items() if "fedsim.local_workers import template" in cmd}  # with the workers
    return [p for p in forked if parent(p) in forked]


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.ray
@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_a_worker_process_dying_mid_run_is_retried_and_changes_nothing(tmp_path: Path, backend: str) -> None:
    # device_group=10: four vectorized groups, so both workers have a job every round.
    args = ["population=100", "cohort.size=30", "cohort.sampling=fixed", "rounds=8", "privacy=dpsgd",
            "output.progress=false", "simulation.num_workers=2", "simulation.device_group=10"]  # fmt: skip
    run_local(compose(args), tmp_path / "ref")  # the fault-free run, on the in-process grid
    proc = fedsim(tmp_path, *args, f"simulation.backend={backend}", f"hydra.run.dir={tmp_path / 'hit'}")
    metrics = tmp_path / "hit" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    # One of this run's own workers (other tests may run Ray at the same time).
    actors = worker_processes(proc.pid, backend)
    assert actors, f"no {backend} worker process to kill"
    os.kill(min(actors), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 8
    assert sum(r["workers_failed"] for r in rows) >= 1, "the kill did not hit a round"
    assert all(r["devices_failed"] == 0 for r in rows)  # every failed job was resent and trained
    assert summary(tmp_path / "hit")["model_sha256"] == summary(tmp_path / "ref")["model_sha256"]


@pytest.mark.parametrize("mode", ["secure", "reproducible"])
def test_rounds_after_the_checkpoint_stay_counted_when_they_rerun_with_fresh_noise(tmp_path: Path, mode: str) -> None:
    """A crash after round 3, resumed from the checkpoint of round 2: round 3 runs again. With secure
    randomness its first release (other noise) was already out, so both count; with reproducible
    randomness the rerun repeats it bit for bit, so it counts once."""
    raw = {
        "seed": 3, "population": 20, "rounds": 3, "cohort": {"size": 5, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 40}, "model": {"name": "mlp", "hidden_sizes": [4]},
        "privacy": {"dpsgd": {"noise_multiplier": 1.0}, "randomness": mode},
        "checkpoint": {"every": 2, "keep": 3}, "output": {"progress": False}, "simulation": {"num_workers": 1},
    }  # fmt: skip
    run_dir = tmp_path / "run"
    run_local(from_dict(raw), run_dir)
    done = json.loads((run_dir / "ledger.json").read_text())["devices"]
    (run_dir / "summary.json").unlink()  # as if the run had died after round 3's accounting
    checkpoint.checkpoint_path(run_dir, 3).unlink()
    run_local(from_dict(raw | {"resume": str(run_dir)}), tmp_path / "unused")
    again = json.loads((run_dir / "ledger.json").read_text())["devices"]
    counts = {d: sum(e[3] for e in h) for d, h in again.items()}
    first = {d: sum(e[3] for e in h) for d, h in done.items()}
    assert sum(first.values()) == 15
    assert sum(counts.values()) == (20 if mode == "secure" else 15)
    assert all(counts[d] >= c for d, c in first.items())
    # A second crash before any new checkpoint, resumed from the same one: round 3 three times.
    (run_dir / "summary.json").unlink()
    checkpoint.checkpoint_path(run_dir, 3).unlink()
    run_local(from_dict(raw | {"resume": str(run_dir)}), tmp_path / "unused")
    third = json.loads((run_dir / "ledger.json").read_text())["devices"]
    assert sum(e[3] for h in third.values() for e in h) == (25 if mode == "secure" else 15)


@pytest.mark.parametrize("mode", ["secure", "reproducible"])
def test_user_level_rounds_after_the_checkpoint_stay_counted_when_they_rerun_with_fresh_noise(tmp_path: Path, mode: str) -> None:
    raw = {
        "seed": 3, "population": 20, "rounds": 3, "cohort": {"size": 5, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 40}, "model": {"name": "mlp", "hidden_sizes": [4]},
        "privacy": {"dpfedavg": {"noise_multiplier": 1.0, "accountant": "rdp"}, "randomness": mode},
        "checkpoint": {"every": 2, "keep": 3}, "output": {"progress": False}, "simulation": {"num_workers": 1},
    }  # fmt: skip
    run_dir = tmp_path / "run"
    first = run_local(from_dict(raw), run_dir)["privacy"]["user_level"]
    (run_dir / "summary.json").unlink()  # as if the run had died after round 3's row
    checkpoint.checkpoint_path(run_dir, 3).unlink()
    again = run_local(from_dict(raw | {"resume": str(run_dir)}), tmp_path / "unused")["privacy"]["user_level"]
    assert first["rounds"] == 3
    assert again["rounds"] == (4 if mode == "secure" else 3)
    assert (again["epsilon"] > first["epsilon"]) if mode == "secure" else (again["epsilon"] == first["epsilon"])
    # A second crash before any new checkpoint, resumed from the same one: round 3 has now been
    # released three times (the carried count was written into the checkpoint on the first resume).
    (run_dir / "summary.json").unlink()
    checkpoint.checkpoint_path(run_dir, 3).unlink()
    third = run_local(from_dict(raw | {"resume": str(run_dir)}), tmp_path / "unused")["privacy"]["user_level"]
    assert third["rounds"] == (5 if mode == "secure" else 3)


def test_a_resume_reads_moved_data_refuses_edited_data_and_warns_on_other_streams(tmp_path: Path) -> None:
    """The checkpoint records the data's sha256 and the randomness fingerprint: the same bytes in
    another folder resume bit-identically; edited bytes are refused with one line (exit 2); a
    checkpoint whose fingerprint this fedsim does not derive, or that predates these records, warns."""
    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    moved.mkdir()
    text = "".join(f"R{i}:\n" + "to be or not to be, " * 12 + "\n\n" for i in range(4))
    (first / "play.txt").write_text(text)
    raw = {
        "seed": 1, "population": 4, "rounds": 3, "cohort": {"size": 4, "sampling": "fixed"},
        "dataset": {"name": "shakespeare", "path": str(first / "play.txt"), "seq_len": 8, "min_chars": 50},
        "model": {"name": "transformer", "hidden": 16, "layers": 1, "heads": 2},
        "algorithm": {"lr": 0.5, "batch_size": 10}, "checkpoint": {"every": 1, "keep": 3},
        "output": {"progress": False}, "simulation": {"num_workers": 1},
    }  # fmt: skip
    run_dir = tmp_path / "run"
    whole = run_local(from_dict(raw), run_dir)
    path = checkpoint.checkpoint_path(run_dir, 2)
    state = checkpoint.load(path)
    assert state["data_sha256"] == whole["randomness"]["data_sha256"] and len(state["data_sha256"]) == 64
    assert state["fingerprint"] == whole["randomness"]["fingerprint"]
    assert checkpoint.check_identity(path, state, from_dict(state["config"])) is None

    # The run died after round 2 and its data moved: resume from the new place, same model.
    (moved / "renamed.txt").write_text(text)
    (first / "play.txt").unlink()
    (run_dir / "summary.json").unlink()
    checkpoint.checkpoint_path(run_dir, 3).unlink()
    elsewhere = raw | {"resume": str(run_dir), "dataset": raw["dataset"] | {"path": str(moved / "renamed.txt")}}
    again = run_local(from_dict(elsewhere), tmp_path / "unused")
    assert again["resumed_from_round"] == 2 and again["model_sha256"] == whole["model_sha256"]

    # Edited data: refused, on the command line with one line and exit status 2.
    (run_dir / "summary.json").unlink()
    checkpoint.checkpoint_path(run_dir, 3).unlink()
    (moved / "renamed.txt").write_text(text.replace("to be", "to ba", 1))
    with pytest.raises(DataError, match=r"dataset\.path=\S+renamed\.txt holds other bytes than the run read"):
        run_local(from_dict(elsewhere), tmp_path / "unused")
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", f"resume={run_dir}", "dataset=shakespeare", f"dataset.path={moved / 'renamed.txt'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "holds other bytes" in lines[0], proc.stderr
    (first / "play.txt").write_text(text + " ")  # edited where the checkpoint's config reads it
    with pytest.raises(DataError, match=r"dataset\.path hold other bytes than when round_000002\.pt was written"):
        run_local(from_dict(raw | {"resume": str(run_dir)}), tmp_path / "unused")

    # Other streams, or no records at all: a warning, not a refusal.
    (first / "play.txt").write_text(text)
    cfg = from_dict(checkpoint.load(path)["config"])
    state = checkpoint.load(path)
    other = checkpoint.check_identity(path, state | {"fingerprint": "0" * 32}, cfg)
    assert other is not None and "not bit-identical" in other and "round 2" in other
    older = {k: v for k, v in state.items() if k not in ("data_sha256", "fingerprint")}
    assert "older fedsim" in (checkpoint.check_identity(path, older, cfg) or "")


def test_a_resume_may_move_hugging_face_data_files_and_says_why_when_it_may_not(tmp_path: Path) -> None:
    """data_files is a dict (split -> file): its entries are config keys of their own, and all of
    them moving to files with the recorded bytes is a move, not a config change."""
    from fedsim.data import identity
    from fedsim.errors import ConfigError
    from fedsim.run import _moved_data, changed_keys

    def data_in(folder: Path, test_rows: str = "3,1\n") -> FedsimConfig:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.csv").write_text("x,label\n1,0\n2,1\n")
        (folder / "test.csv").write_text("x,label\n" + test_rows)
        files = {"train": str(folder / "train.csv"), "test": str(folder / "test.csv")}
        return from_dict({"dataset": {"name": "huggingface", "hf_name": "csv", "data_files": files}})

    saved, given = data_in(tmp_path / "a"), data_in(tmp_path / "b")
    path = tmp_path / "round_000002.pt"
    state = {"data_sha256": identity.content_sha256(saved.dataset)}
    changed = changed_keys(saved.to_dict(), given.to_dict(), None)
    assert changed == ["dataset.data_files.test", "dataset.data_files.train"]
    assert _moved_data(path, state, saved, given, changed) == (changed, given.dataset.data_files)
    assert _moved_data(path, state, saved, given, [*changed, "rounds"]) is None  # not only a move: refused as before
    with pytest.raises(DataError, match=r"dataset\.data_files=.* holds other bytes than the run read"):
        _moved_data(path, state, saved, data_in(tmp_path / "c", "4,0\n"), changed)
    with pytest.raises(ConfigError, match="recorded no digest of its data"):
        _moved_data(path, {}, saved, given, changed)
    (tmp_path / "b" / "test.csv").unlink()
    with pytest.raises(DataError, match="cannot be read"):
        _moved_data(path, state, saved, given, changed)
