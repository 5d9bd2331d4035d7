"""SecAgg+ over Flower: exact sums, what the server receives, dropouts at every stage, aborts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from clients import flat_params
from fedsim import randomness, secure_rounds, wire
from fedsim.config import from_dict
from fedsim.privacy.dpfedavg import UserLevelDP
from fedsim.run import run
from fedsim.sampling import sample_cohort
from fedsim.secagg import skellam
from fedsim.worker import Worker
from fake_grid import run_local
from helpers import set_keys

pytestmark = pytest.mark.ray


def secure_config(tmp: Path, **over: object) -> dict:
    raw: dict = {
        "seed": 5,
        "population": 30,
        "rounds": 2,
        "cohort": {"size": 8, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 60},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "privacy": {"dpfedavg": {"noise_multiplier": 0.0, "clip_norm": 0.5, "accountant": "rdp"}},
        "secagg": {"name": "secaggplus", "bits": 20},
        "simulation": {"num_workers": 2, "ray_temp_dir": str(tmp / "ray")},
        "output": {"progress": False},
    }
    return set_keys(raw, over)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "model.pt", weights_only=False)["flat_params"]


def test_secure_sum_matches_the_plain_sum_up_to_quantization(tmp_path: Path) -> None:
    received: list[tuple[str, object]] = []
    secure_rounds.RECEIVED.append(lambda stage, content: received.append((stage, content)))
    try:
        run_local(from_dict(secure_config(tmp_path)), tmp_path / "secure")
    finally:
        secure_rounds.RECEIVED.clear()
    assert all(r["secagg_survivors_unmask"] == 8 for r in rows(tmp_path / "secure"))
    # The plain sum of round 1, computed here from the same config's streams (a plain twin run
    # would have another randomness fingerprint, hence other cohorts): the same devices, clipped,
    # no noise, summed in the clear. Only 20-bit stochastic rounding separates the two models.
    cfg = from_dict(secure_config(tmp_path, rounds=1))
    run_local(cfg, tmp_path / "secure1")
    worker = Worker(cfg)
    start = flat_params(worker.model)
    cohort = sample_cohort(population=30, cohort_size=8, method="fixed", rng=randomness.streams(cfg).numpy("cohort", 1))
    report = worker.train(start, 1, cohort, clip_norm=0.5)
    plain = start + torch.stack([torch.as_tensor(u, dtype=torch.float64) for u in report.updates]).sum(0).float() / 8
    step = 2 * 0.5 / (2**20 - 1)
    diff = (final(tmp_path / "secure1") - plain).abs().max().item()
    assert diff < 2 * 8 * step, diff

    # Everything the server received: no device's quantized update is among it, and every
    # masked vector looks uniform modulo 2^m.
    cfg = from_dict(secure_config(tmp_path))
    worker = Worker(cfg)
    cohort = sample_cohort(population=30, cohort_size=8, method="fixed", rng=np.random.default_rng(5))
    report = worker.train(flat_params(worker.model), 1, cohort, clip_norm=0.5)
    fp = secure_rounds.fixed_point(cfg, len(cohort))
    streams = randomness.streams(cfg)
    assert streams.mode == "reproducible"  # so the test can rebuild each device's encoding
    bound = UserLevelDP(cfg, num_params=len(report.updates[0])).rounding_bound(0.5)
    plain = [
        fp.encode(u, streams.numpy(secure_rounds.ROUNDING_STREAM, 1, d), max_norm=bound)
        for d, u in zip(report.device_ids, report.updates, strict=True)
    ]
    masked = [wire.unpack(arr) for stage, content in received if stage == "masked_input"
              for arr in content.array_records["masked"].values()]  # fmt: skip
    assert len(masked) == 16  # 8 devices x 2 rounds, each seen only masked
    for vector in masked:
        assert not any(np.array_equal(vector[: len(x)], x) for x in plain)
        top = (vector.astype(np.uint64) >> np.uint64(fp.modulus_bits - 4)).astype(np.int64)
        counts = np.bincount(top, minlength=16)
        assert stats.chisquare(counts).pvalue > 1e-4
    for stage, content in received:
        for record in content.array_records.values():
            for arr in record.values():
                values = wire.unpack(arr)
                assert not any(np.array_equal(values[: len(x)], x) for x in plain), stage


def test_dropouts_at_every_stage_still_give_a_round(tmp_path: Path) -> None:
    # 28% of devices drop somewhere: at cohort 12 only a round-abort budget of 2^-3 fits.
    raw = secure_config(
        tmp_path, rounds=3, cohort={"size": 12, "sampling": "fixed"}, population=40,
        **{"secagg.drop_advertise_keys": 0.08, "secagg.drop_share_keys": 0.08,
           "secagg.drop_masked_input": 0.08, "secagg.drop_unmask": 0.08,
           "secagg.max_corrupt_fraction": 0.1, "secagg.correctness_bits": 3},
    )  # fmt: skip
    run_local(from_dict(raw), tmp_path / "drops")
    rs = rows(tmp_path / "drops")
    assert len(rs) == 3
    trained = [r for r in rs if "secagg_aborted" not in r]
    assert trained, rs
    assert any(r["secagg_survivors_masked_input"] < 12 for r in rs)
    for r in trained:
        assert r["devices_trained"] == r["secagg_survivors_masked_input"]
        assert r["secagg_survivors_unmask"] <= r["secagg_survivors_masked_input"]


def test_too_few_survivors_abort_the_round_and_the_next_one_trains(tmp_path: Path) -> None:
    # An explicit (k, t) is checked for security only: this complete graph with t = 5 of 7 is safe
    # against the 0 colluders of gamma = 0.1 at cohort 8, but aborts often at 40% dropout.
    raw = secure_config(tmp_path, rounds=6, **{"secagg.drop_masked_input": 0.4, "secagg.max_corrupt_fraction": 0.1,
                                                "secagg.neighbours": 7, "secagg.threshold": 5})  # fmt: skip
    summary = run_local(from_dict(raw), tmp_path / "abort")
    rs = rows(tmp_path / "abort")
    aborted = [r for r in rs if "secagg_aborted" in r]
    trained = [r for r in rs if "secagg_aborted" not in r]
    assert aborted and trained, [(r["round"], r.get("secagg_aborted")) for r in rs]
    for r in aborted:
        assert r["devices_trained"] == 0
    # Aborted rounds release nothing: user-level accounting counts only the released rounds.
    assert summary["privacy"]["user_level"]["rounds"] == len(trained)


def distributed_config(tmp: Path, **over: object) -> dict:
    """One round, 8 of 30 devices, distributed Skellam noise and adaptive clipping (noisy count)."""
    return secure_config(
        tmp, rounds=1,
        **{"privacy.dpfedavg.noise_multiplier": 1.0, "privacy.dpfedavg.noise": "distributed",
           "privacy.dpfedavg.adaptive_clipping": True, "privacy.dpfedavg.count_noise_multiplier": 2.0, **over},
    )  # fmt: skip


def server_attack(cfg_raw: dict, run_dir: Path, cohort: list[int]) -> tuple[np.ndarray, float, Worker]:
    """What a server that knows the run seed and config can do: rebuild the round's noisy sum
    from what it holds (the model before and after the round), regenerate every device's Skellam
    share from the seed-derived stream, subtract it. Returns (what is left, noise std, worker)."""
    cfg = from_dict(cfg_raw)
    worker = Worker(cfg)
    initial = flat_params(worker.model)
    noisy_sum = (final(run_dir).double() - initial.double()) * cfg.cohort.size
    h = rows(run_dir)[0]["secagg_noise_honest_inputs"]  # each device added 1/h of the round's variance
    dim = len(initial)
    dp = UserLevelDP(cfg, num_params=dim)
    mu = dp.secure_encoding().update_variance / h
    fp = secure_rounds.fixed_point(cfg, 8)
    # The seed-derived streams of this config (privacy.randomness is not in the fingerprint).
    seeded = randomness.streams(from_dict(set_keys(copy.deepcopy(cfg_raw), {"privacy.randomness": "reproducible"})))
    regenerated = sum(skellam(mu, dim, seeded.numpy(secure_rounds.NOISE_STREAM, 1, d)) for d in cohort)
    return noisy_sum.numpy() - regenerated * fp.step, float(np.sqrt(8 / h)) * dp.noise_std, worker


def test_server_view_cannot_remove_the_distributed_noise_and_sees_no_per_device_value(tmp_path: Path) -> None:
    received: list[tuple[str, object]] = []
    secure_rounds.RECEIVED.append(lambda stage, content: received.append((stage, content)))
    raw = distributed_config(tmp_path)
    try:
        summary = run_local(from_dict(raw), tmp_path / "secure")
    finally:
        secure_rounds.RECEIVED.clear()
    assert summary["privacy"]["user_level"]["distributed_noise"]["randomness"] == "secure"  # auto, distributed
    cohort = sorted(int(d) for stage, content in received if stage == "masked_input"
                    for d in content.config_records["devices"]["device_ids"])  # fmt: skip
    assert len(cohort) == 8
    left, noise_std, _ = server_attack(raw, tmp_path / "secure", cohort)
    # Regenerating from the run seed leaves the noise in: the sum of 8 clipped updates has norm
    # <= 8 C (= 4, rounding aside), so whatever is left beyond that is noise the server cannot remove.
    assert np.linalg.norm(left) - 8 * 0.5 * 1.01 > 0.5 * np.sqrt(len(left)) * noise_std, (np.linalg.norm(left), noise_std)

    # No side channel: nothing per device in the clear, in any message of any stage.
    assert received
    for stage, content in received:
        devices = content.config_records.get("devices")
        if devices is not None:
            for key in ("loss", "num_examples", "within_bound", "clip_fraction"):
                assert list(devices[key]) == [], (stage, key)
        for position, fields in wire.read_payloads(content.config_records.get("dev")).items():
            assert not {"loss", "num_examples", "within_bound"} & set(fields), (stage, position)
    row = rows(tmp_path / "secure")[0]
    assert row["update_clipped_fraction"] is not None  # the noisy count's fraction
    assert row["train_loss"] > 0


def test_reproducible_distributed_noise_is_removable_and_the_run_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = distributed_config(tmp_path, **{"privacy.randomness": "reproducible"})
    summary = run_local(from_dict(raw), tmp_path / "repro")
    cfg = from_dict(raw)
    cohort = sample_cohort(population=30, cohort_size=8, method="fixed", rng=randomness.streams(cfg).numpy("cohort", 1))
    left, noise_std, worker = server_attack(raw, tmp_path / "repro", cohort)
    report = worker.train(flat_params(worker.model), 1, cohort, clip_norm=0.5)
    error = left - np.sum(report.updates, axis=0, dtype=np.float64)
    # The server regenerates every share and subtracts it: only rounding and float error remain.
    assert np.abs(error).max() < 1e-3 < noise_std, (np.abs(error).max(), noise_std)
    assert "simulation only: the server can remove the noise" in caplog.text  # printed even without progress lines
    distributed = summary["privacy"]["user_level"]["distributed_noise"]
    assert distributed["randomness"] == "reproducible"
    assert any(a.startswith("simulation only: the server can remove the noise") for a in distributed["assumptions"])
    # The cohort values arrive as sums inside the masked vectors.
    row = rows(tmp_path / "repro")[0]
    assert row["num_examples"] == sum(report.num_examples)
    assert row["train_loss"] == pytest.approx(np.mean(report.losses), abs=1e-3)  # mean over devices


def test_calibrated_distributed_run_never_ends_above_its_target_with_dropouts(tmp_path: Path) -> None:
    raw = secure_config(
        tmp_path, rounds=3, population=40, cohort={"size": 12, "sampling": "fixed"},
        **{"privacy.dpfedavg.noise_multiplier": None, "privacy.dpfedavg.target_epsilon": 2.0,
           "privacy.dpfedavg.noise": "distributed", "secagg.drop_masked_input": 0.3,
           "secagg.max_corrupt_fraction": 0.1, "secagg.correctness_bits": 6},
    )  # fmt: skip
    summary = run_local(from_dict(raw), tmp_path / "target")
    rs = [r for r in rows(tmp_path / "target") if "secagg_aborted" not in r]
    assert rs and any(r["devices_trained"] < 12 for r in rs)
    assert all(r["user_epsilon"] <= 2.0 for r in rs)
    assert summary["privacy"]["user_level"]["epsilon"] <= 2.0


def test_rounds_at_30_percent_masked_input_dropout_abort_at_most_at_the_configured_rate(tmp_path: Path) -> None:
    from fedsim.secagg import ThreatModel, choose_params

    raw = secure_config(
        tmp_path, rounds=4, population=60, cohort={"size": 30, "sampling": "fixed"},
        **{"secagg.drop_masked_input": 0.3, "secagg.max_corrupt_fraction": 0.1},
    )  # fmt: skip
    summary = run_local(from_dict(raw), tmp_path / "d30")
    rs = rows(tmp_path / "d30")
    # k and t are chosen for 30% dropout: a round aborts with probability <= 2^-20, so none of these does.
    assert [r.get("secagg_aborted") for r in rs] == [None] * 4
    assert all(r["secagg_survivors_masked_input"] < 30 for r in rs)  # devices did drop
    choice = choose_params(30, ThreatModel("semi_honest", 0.1, None, 0.3))
    sa = summary["secagg"]
    assert (sa["neighbours_k"], sa["threshold_t"]) == (choice.neighbours, choice.threshold)
    assert all((r["secagg_k"], r["secagg_t"]) == (choice.neighbours, choice.threshold) for r in rs)
    assert sa["log2_abort_bound"] <= -20 and sa["log2_insecure_bound"] is None  # null: impossible (3 + 22 < k = 26)
    assert sa["insecure_probability_bound"].startswith("0 ")
    assert sa["threat_model"] == "semi_honest" and sa["max_corrupt_devices"] == 3
    assert any("collude" in a for a in sa["assumptions"]) and "k=26" in sa["guarantee"]


def test_same_seed_gives_the_same_graph_survivors_and_model_with_dropouts(tmp_path: Path) -> None:
    # A small explicit k, so which devices survive pruning depends on the graph.
    raw = secure_config(
        tmp_path, rounds=3, population=30, cohort={"size": 12, "sampling": "fixed"},
        **{"secagg.drop_share_keys": 0.25, "secagg.max_corrupt_fraction": 0.0, "secagg.max_dropout_fraction": 0.1,
           "secagg.neighbours": 4, "secagg.threshold": 3},
    )  # fmt: skip
    first = run(from_dict(raw), tmp_path / "a")
    second = run_local(from_dict(raw), tmp_path / "b")  # the in-process grid: same ClientApp, no Ray start-up
    assert first["secagg"]["randomness"].startswith("reproducible")
    assert [r["secagg_survivors_masked_input"] for r in rows(tmp_path / "a")] == [
        r["secagg_survivors_masked_input"] for r in rows(tmp_path / "b")]  # fmt: skip
    assert first["model_sha256"] == second["model_sha256"]


def test_impossible_threat_model_is_refused_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from fedsim.errors import ConfigError
    from fedsim.server_app import prepare

    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "secagg=secaggplus", "secagg.threat_model=active", "secagg.drop_masked_input=0.4",
         "cohort.size=8", "cohort.sampling=fixed", "population=20", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "secagg.max_corrupt_fraction" in lines[0] and "no k <= cohort size 8" in lines[0], lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    raw = secure_config(tmp_path, **{"secagg.neighbours": 2, "secagg.threshold": 2})  # 2 colluders can hold both shares
    with pytest.raises(ConfigError, match=r"secagg.neighbours.*unsafe"):
        prepare(from_dict(raw))


def test_active_threat_model_rounds_sum_every_device_through_the_consistency_check(tmp_path: Path) -> None:
    # (That the active sum is exact is checked on the protocol objects, test_secagg.py: the
    # threat model is part of the run's randomness fingerprint, so a semi-honest twin run
    # would train on other cohorts and could not be compared bit for bit.)
    from fedsim.secagg import ThreatModel, choose_params

    active = run_local(from_dict(secure_config(tmp_path, **{"secagg.threat_model": "active"})), tmp_path / "active")
    rs = rows(tmp_path / "active")
    assert len(rs) == 2 and not any("secagg_aborted" in r for r in rs)
    assert all(r["secagg_survivors_consistency"] == 8 and r["secagg_survivors_unmask"] == 8 for r in rs)
    assert all(r["secagg_bytes_per_device_consistency"] > 0 and r["secagg_devices_rejected"] == 0 for r in rs)
    assert active["secagg"]["threat_model"] == "active"
    assert any("key registry" in a for a in active["secagg"]["assumptions"])
    choice = choose_params(8, ThreatModel("active", 0.33))
    assert (active["secagg"]["neighbours_k"], active["secagg"]["threshold_t"]) == (choice.neighbours, choice.threshold)
