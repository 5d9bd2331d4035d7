"""The privacy/utility report: numbers equal the metrics files, real PNGs, ledger recomputation, broken runs listed."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from analysis import config_differences, device_epsilons, pareto_frontier, read_csv, write_report
from analysis.__main__ import main
from fedsim.privacy import PrivacyLedger, create_accountant, make_event

DELTA = 1e-5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SWEEP_PNGS = [
    "accuracy_vs_round", "epsilon_vs_round", "accuracy_vs_epsilon_sample_level",
    "device_epsilon_histogram", "clipping_and_noise",
]


def write_run(
    path: Path,
    rows: list[dict[str, Any]],
    *,
    config: dict[str, Any] | None,
    summary: bool = True,
    overrides: list[str] | None = None,
    ledger: dict[str, Any] | None = None,
) -> Path:
    """A run directory as fedsim writes it (see fedsim/runlog.py)."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if summary:
        evaluated = [r for r in rows if r.get("test_accuracy") is not None]
        (path / "summary.json").write_text(json.dumps({
            "rounds": len(rows), "final_test_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
        }))
    if overrides is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if ledger is not None:
        (path / "ledger.json").write_text(json.dumps(ledger) + "\n")
    return path


def base_row(round_number: int, rounds: int, accuracy: float) -> dict[str, Any]:
    evaluated = round_number % 2 == 0 or round_number == rounds
    return {
        "round": round_number, "cohort_size": 3, "devices_trained": 3, "devices_failed": 0, "num_examples": 90,
        "train_loss": 2.0 / round_number + 0.123456789,
        "test_accuracy": accuracy * (1 - 0.5 / round_number) if evaluated else None,
        "test_loss": 1.0 / round_number + 0.0987654321 if evaluated else None,
        "round_time_s": 0.51234, "train_time_s": 0.2, "elapsed_s": 0.51234 * round_number,
        "bytes_sent": 1000, "bytes_received": 3000, "worker_peak_rss_mb": 100.5,
    }


def config(name: str, dpsgd: dict[str, Any] | None, hidden: int = 64) -> dict[str, Any]:
    return {
        "seed": 0, "rounds": 5, "model": {"name": "mlp", "hidden_sizes": [hidden]},
        "privacy": {"dpsgd": dpsgd, "dpfedavg": None}, "output": {"dir": f"/runs/{name}"},
    }


def sample_level_run(path: Path, z: float, target: float, accuracy: float, *, rounds: int = 5,
                     hidden: int = 64, **kwargs: Any) -> Path:
    """A DP-SGD run: 4 devices, 3 per round; metrics and ledger.json from fedsim's own PrivacyLedger."""
    ledger = PrivacyLedger(create_accountant("rdp"), delta=DELTA, target_epsilon=target)
    rows = []
    for r in range(1, rounds + 1):
        trained = [(r + k) % 4 for k in range(3)]
        for d in trained:
            ledger.record(d, make_event(noise_multiplier=z, sample_rate=0.1 + 0.05 * d, steps=10))
        stats, cohort = ledger.epsilon_stats(), ledger.epsilon_stats(trained)
        rows.append({
            **base_row(r, rounds, accuracy),
            "sample_epsilon_max": stats["max"], "sample_epsilon_median": stats["median"],
            "sample_epsilon_cohort_max": cohort["max"], "sample_epsilon_cohort_median": cohort["median"],
            "sample_delta": DELTA, "noise_multiplier": z, "clip_fraction": 1.0 - 0.1 * r,
            "devices_exhausted": ledger.exhausted_count(),
        })
    dpsgd = {"noise_multiplier": z, "target_epsilon": target, "delta": DELTA}
    return write_run(path, rows, config=config(path.name, dpsgd, hidden), ledger=ledger.to_json(), **kwargs)


def non_private_run(path: Path, accuracy: float, rounds: int = 5, **kwargs: Any) -> Path:
    rows = [base_row(r, rounds, accuracy) for r in range(1, rounds + 1)]
    return write_run(path, rows, config=config(path.name, None), **kwargs)


def md_table(report: str, heading: str) -> list[dict[str, str]]:
    """The first Markdown table after `heading`, as dicts keyed by the header."""
    lines = report[report.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    header, body = table[0], table[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 600 and height >= 300, (path, width, height)
    assert len(data) > 20_000, (path, len(data))  # drawn lines, text and legend, not an empty canvas
    svg = path.with_suffix(".svg").read_text()
    assert svg.startswith("<?xml") and "</svg>" in svg


def final_metrics(run_dir: Path) -> dict[str, Any]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the truncated last line of an interrupted run
            pass
    return [r for r in rows if r["test_accuracy"] is not None][-1]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """multirun/0..3 (DP-SGD targets 1, 2, 4, 8; run 3 with a larger model) and a non-private run beside it."""
    root = tmp_path / "runs"
    for i, (z, target, acc) in enumerate([(3.0, 1.0, 0.41), (2.0, 2.0, 0.52), (1.3, 4.0, 0.6), (0.9, 8.0, 0.58)]):
        sample_level_run(root / "multirun" / str(i), z, target, acc, hidden=128 if i == 3 else 64,
                         overrides=["experiment=femnist_dpsgd", f"privacy.dpsgd.target_epsilon={target:g}"])
    non_private_run(root / "none", 0.7, overrides=["experiment=femnist_dpsgd", "privacy=none"])
    return root


def test_sweep_report_has_plots_and_the_metrics_numbers(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    for stem in SWEEP_PNGS:
        assert_png(out / f"{stem}.png")
    report = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for stem in SWEEP_PNGS:
        assert f"]({stem}.png)" in report and f'src="{stem}.png"' in html
    assert "Plots not drawn" not in report

    final = {r["run"]: r for r in md_table(report, "## Final accuracy and privacy per run")}
    assert list(final) == ["multirun/0", "multirun/1", "multirun/2", "multirun/3", "none"]
    csv_final = {}
    for row in read_csv(out / "table.csv"):
        csv_final.setdefault(row["run"], {})[int(row["round"])] = row
    for name, cells in final.items():
        metrics = final_metrics(sweep / name)
        assert cells["final round"] == str(metrics["round"])
        assert cells["status"] == "ok"
        for column, key in [("test accuracy", "test_accuracy"), ("test loss", "test_loss"),
                            ("sample-level epsilon max", "sample_epsilon_max"),
                            ("sample-level epsilon median", "sample_epsilon_median")]:
            value = metrics.get(key)
            if value is None:
                assert cells[column] == "-" and name == "none"
                continue
            assert cells[column] == f"{value:.4g}"
            assert float(cells[column]) == pytest.approx(value, rel=1e-3)
            # table.csv: full precision, the same float
            assert float(csv_final[name][metrics["round"]][key]) == value
    assert final["none"]["privacy"] == "non-private"
    assert final["multirun/2"]["label"] == "privacy.dpsgd.target_epsilon=4"  # shared overrides dropped

    # Pareto: run 3 (eps 8, acc 0.58) is beaten by run 2 (eps 4, acc 0.6).
    assert [r for r, c in final.items() if c["Pareto frontier"]] == ["multirun/0", "multirun/1", "multirun/2"]

    diffs = md_table(report, "## Config differences")
    assert {d["key"] for d in diffs} == {
        "privacy.dpsgd", "privacy.dpsgd.noise_multiplier", "privacy.dpsgd.target_epsilon",
        "privacy.dpsgd.delta", "model.hidden_sizes", "output.dir",
    }
    by_key = {d["key"]: d for d in diffs}
    assert by_key["model.hidden_sizes"]["multirun/3"] == "[128]"
    assert by_key["privacy.dpsgd"]["none"] == "null" and by_key["privacy.dpsgd"]["multirun/0"] == "(absent)"
    assert "## Skipped runs\n\nNone." in report and "## Partial runs\n\nNone." in report


def test_config_differences_lists_exactly_the_differing_keys() -> None:
    a = {"seed": 0, "model": {"name": "cnn", "channels": [16, 32]}, "privacy": {"dpsgd": None}}
    b = {"seed": 0, "model": {"name": "cnn", "channels": [16, 64]}, "privacy": {"dpsgd": {"z": 1.0}}}
    assert config_differences({"a": a, "b": b}) == {
        "model.channels": {"a": [16, 32], "b": [16, 64]},
        "privacy.dpsgd": {"a": None},
        "privacy.dpsgd.z": {"b": 1.0},
    }
    assert config_differences({"a": a, "b": dict(a)}) == {}
    assert config_differences({"a": a}) == {}


def test_pareto_frontier_on_hand_made_points() -> None:
    points = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.55), (3.0, 0.6), (0.5, 0.4), (4.0, 0.9), (math.inf, 1.0), (1.0, 0.5)]
    # (2, .55) and (3, .6) are dominated by (2, .6); equal points (1, .5) are both kept; inf is never on it.
    assert pareto_frontier(points) == [4, 0, 7, 1, 5]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(1.0, 0.1)]) == [0]
    assert pareto_frontier([(1.0, 0.9), (2.0, 0.1), (0.5, 0.1)]) == [2, 0]


def test_recomputed_epsilon_equals_the_accountant_called_directly(tmp_path: Path) -> None:
    # A ledger written by fedsim's own PrivacyLedger with RDP at delta 1e-5 and a budget.
    ledger = PrivacyLedger(create_accountant("rdp"), delta=DELTA, target_epsilon=20.0)
    small = make_event(noise_multiplier=1.1, sample_rate=0.1, steps=10)
    large = make_event(noise_multiplier=0.9, sample_rate=0.25, steps=4)
    for device, events in {0: [small] * 3, 1: [small] * 5 + [large], 2: [large]}.items():
        for event in events:
            ledger.record(device, event)
    data = ledger.to_json()
    stats = ledger.epsilon_stats()
    rows = [{**base_row(1, 1, 0.5), "sample_epsilon_max": stats["max"], "sample_epsilon_median": stats["median"],
             "sample_delta": DELTA, "noise_multiplier": 1.1, "clip_fraction": 0.5}]
    run = write_run(tmp_path / "run", rows, config=config("run", {"noise_multiplier": 1.1}), ledger=data)

    assert main([str(run), "--accountant", "pld", "--delta", "1e-6"]) == 0
    pld = create_accountant("pld")
    direct = sorted(pld.epsilon(ledger.history(d), 1e-6) for d in (0, 1, 2))
    assert device_epsilons(data, create_accountant("pld"), 1e-6).epsilons == {
        d: pld.epsilon(ledger.history(d), 1e-6) for d in (0, 1, 2)
    }
    out = run / "report"  # the default output directory
    (row,) = [r for r in read_csv(out / "table.csv") if r["recomputed_sample_epsilon_max"] is not None]
    assert float(row["recomputed_sample_epsilon_max"]) == direct[-1]
    assert float(row["recomputed_sample_epsilon_median"]) == direct[1]
    assert (row["recomputed_accountant"], float(row["recomputed_delta"])) == ("pld", 1e-6)
    report = (out / "report.md").read_text()
    (cells,) = md_table(report, "## Final accuracy and privacy per run")
    assert cells["recomputed sample-level epsilon max (pld, delta=1e-06)"] == f"{direct[-1]:.4g}"
    assert cells["recomputed sample-level epsilon median (pld, delta=1e-06)"] == f"{direct[1]:.4g}"
    assert "recomputed with pld, delta=1e-06" in report  # the histogram uses the recomputed numbers
    assert_png(out / "device_epsilon_histogram.png")

    # The ledger's own accountant and delta give back what the run logged; the report dir is no run.
    assert write_report(run, tmp_path / "own") == tmp_path / "own" / "report.md"
    own = md_table((tmp_path / "own" / "report.md").read_text(), "## Final accuracy and privacy per run")
    assert own[0]["sample-level epsilon max"] == f"{stats['max']:.4g}" and len(own) == 1
    assert "## Notes" not in (tmp_path / "own" / "report.md").read_text()  # ledger agrees with metrics


def test_broken_runs_are_listed_and_the_rest_is_reported(sweep: Path, tmp_path: Path, capsys: Any) -> None:
    broken = sweep / "broken"
    truncated = sample_level_run(broken / "truncated", 2.0, 2.0, 0.5, summary=False)
    with open(truncated / "metrics.jsonl", "a") as f:
        f.write('{"round": 6, "cohort_size": 3, "test_acc')
    no_config = non_private_run(broken / "no_config", 0.6)
    (no_config / "config.yaml").unlink()
    non_private_run(broken / "no_summary", 0.65, summary=False)
    bad_ledger = sample_level_run(broken / "bad_ledger", 2.0, 2.0, 0.5)
    (bad_ledger / "ledger.json").write_text('{"accountant": "rdp", "devi')
    (broken / "empty").mkdir()
    (broken / "empty" / "metrics.jsonl").write_text("")
    (broken / "died" / ".hydra").mkdir(parents=True)  # a Hydra job that never got to its first round
    (broken / "died" / ".hydra" / "overrides.yaml").write_text("- seed=1\n")

    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    assert "9 runs, 4 partial, 2 skipped" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    skipped = report[report.index("## Skipped runs"):]
    assert "broken/empty" in skipped and "metrics.jsonl is empty" in skipped
    assert "broken/died" in skipped and "no metrics.jsonl" in skipped
    partial = report[report.index("## Partial runs"):report.index("## Skipped runs")]
    assert "broken/truncated" in partial and "line 6 is truncated" in partial and "no summary.json" in partial
    assert "broken/no_config" in partial and "no config.yaml" in partial
    assert "broken/no_summary" in partial and "did not finish" in partial
    assert "broken/bad_ledger" in partial and "ledger.json unreadable" in partial

    final = {r["run"]: r for r in md_table(report, "## Final accuracy and privacy per run")}
    assert {r for r, c in final.items() if c["status"] == "partial"} == {
        "broken/truncated", "broken/no_config", "broken/no_summary", "broken/bad_ledger"}
    assert final["broken/truncated"]["rounds"] == "5"  # the 5 complete lines are used
    assert final["broken/truncated"]["test accuracy"] == f"{final_metrics(truncated)['test_accuracy']:.4g}"
    assert "broken/empty" not in final and "broken/died" not in final
    assert "Left out (no readable config.yaml): broken/no_config." in report
    for stem in SWEEP_PNGS:
        assert_png(out / f"{stem}.png")
    assert 'class="partial"' in (out / "report.html").read_text()


def test_no_runs_and_bad_arguments_are_one_line_and_status_2(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run directory" in err
    assert not (tmp_path / "empty" / "report").exists()

    non_private_run(tmp_path / "run", 0.5)
    assert main([str(tmp_path / "run"), "--accountant", "gdp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown accountant 'gdp'" in err
    assert main([str(tmp_path / "run"), "--delta", "1.5"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_non_private_runs_only_skip_the_privacy_plots_with_a_note(tmp_path: Path) -> None:
    non_private_run(tmp_path / "a", 0.5)
    non_private_run(tmp_path / "b", 0.6, rounds=4)
    report = write_report(tmp_path).read_text()
    notes = report[report.index("### Plots not drawn"):]
    for title in ("Epsilon per round", "Final accuracy vs epsilon", "Per-device epsilon",
                  "Clipping and noise"):
        assert title in notes
    assert_png(tmp_path / "report" / "accuracy_vs_round.png")
    assert not (tmp_path / "report" / "epsilon_vs_round.png").exists()
    # No overrides.yaml: runs are named by their config differences.
    assert {r["label"] for r in md_table(report, "## Final accuracy and privacy per run")} == {"a", "b"}


def _bench_module(name: str) -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.browser
def test_the_html_report_renders_in_a_real_browser(sweep: Path, tmp_path: Path) -> None:
    """report.html in headless Chromium (bench/report_screenshot.py): every image is there, the
    plots are drawn on the rendered page, legends are short labels; and the check is not blind:
    the same page with its images gone fails it."""
    shots = _bench_module("report_screenshot")
    if shots.browser() is None:
        if os.environ.get("CI") == "true":  # .ci/run installs it: a skip there would hide a missing install step
            pytest.fail("CI=true and no Chromium: .ci/run must install it (apt-get install chromium)")
        pytest.skip("needs headless Chromium (apt-get install chromium; .ci/run installs it)")
    from analysis import build_report

    report = build_report(sweep, tmp_path / "report")
    png = tmp_path / "shot.png"
    shots.screenshot(tmp_path / "report" / "report.html", png)
    assert shots.check(tmp_path / "report", png, report.labels) == []
    for image in (tmp_path / "report").glob("*.png"):
        image.unlink()
    shots.screenshot(tmp_path / "report" / "report.html", broken := tmp_path / "broken.png")
    problems = shots.check(tmp_path / "report", broken, report.labels)
    assert any("not drawn" in p for p in problems) and any("not in" in p for p in problems)
