"""Shakespeare next-character prediction: parsing, LEAF's windows and split, bad input, the two
language models (shapes, DP-SGD, vectorized), and one tiny run end to end.

Tiny on purpose: a generated play of a few roles, seq_len 8, hidden sizes of 8-16.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clients.dp import DPSGDConfig, DPSGDTrainer
from clients.params import flatten_list, load_flat_params, trainable_params
from clients.training import TrainConfig
from clients.vectorized import VectorizedTrainer, vectorizable
from fedsim import randomness
from fedsim.config import ModelConfig, ShakespeareConfig, from_dict
from fedsim.data import load_dataset
from fedsim.data.shakespeare import (
    LEAF_CHARACTERS,
    UNKNOWN,
    VOCABULARY_SIZE,
    ShakespeareDataset,
    decode,
    encode,
    parse_roles,
)
from fedsim.errors import ConfigError, DataError
from fedsim.models import build_model, checked_model
from fedsim.run import run

REPO = Path(__file__).resolve().parent.parent
SEQ = 8

# Three roles: ALICE speaks 2 speeches (60 + 1 + 40 = 101 characters joined), BOB 30, CAROL 200.
ALICE_1 = "a" * 59 + "b"
ALICE_2 = "c" * 40
PLAY = (
    "A prologue before any speaker, which belongs to no role.\n\n"
    f"ALICE:\n{ALICE_1}\n\n"
    f"BOB:\n{'x' * 30}\n\n"
    f"CAROL:\n{'Hello there, friend! ' * 10}\n\n"
    f"ALICE:\n{ALICE_2}\n"
)


def write(tmp_path: Path, text: str | bytes, name: str = "play.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def dataset(path: Path, population: int, **over: object) -> ShakespeareDataset:
    cfg = ShakespeareConfig(path=str(path), seq_len=SEQ, min_chars=50, max_test_examples=None, **over)  # type: ignore[arg-type]
    return ShakespeareDataset(cfg, population=population)


# ----------------------------------------------------------------------------- parsing


def test_roles_join_their_speeches_in_file_order_and_skip_text_before_the_first_speaker() -> None:
    roles = parse_roles(PLAY)
    assert list(roles) == ["ALICE", "BOB", "CAROL"]
    assert roles["ALICE"] == ALICE_1 + "\n" + ALICE_2
    assert roles["BOB"] == "x" * 30
    assert "prologue" not in "".join(roles.values())


def test_the_bundled_text_has_309_roles_and_min_chars_leaves_out_the_small_ones() -> None:
    ds = load_dataset(ShakespeareConfig(), population=141, seed=0)
    assert ds.roles_total == 309 and ds.roles_left_out == 168 and ds.num_devices == 141
    assert "168 of 309 roles left out" in ds.notes()[0]
    with pytest.raises(ConfigError, match="141 roles with at least 1000 characters.*allowed: 1..141"):
        load_dataset(ShakespeareConfig(), population=142, seed=0)


def test_min_chars_leaves_out_short_roles_and_devices_are_roles_in_sorted_order(tmp_path: Path) -> None:
    ds = dataset(write(tmp_path, PLAY), population=2)
    assert ds.roles == ["ALICE", "CAROL"]  # BOB's 30 characters < min_chars 50
    assert ds.roles_left_out == 1
    with pytest.raises(ConfigError, match="population"):
        dataset(write(tmp_path, PLAY), population=3)


def test_windows_predict_the_next_character_and_the_test_part_is_the_end_of_each_role(tmp_path: Path) -> None:
    ds = dataset(write(tmp_path, PLAY), population=2, test_fraction=0.2)
    text = parse_roles(PLAY)["ALICE"]  # 101 characters: 93 windows of 8, 18 of them test
    x, y = ds.device_data(0)
    tx, ty = ds.device_test_data(0)
    assert (len(y), len(ty)) == (75, 18) and ds.num_examples(0) == 75
    assert x.dtype == torch.float32 and x.shape == (75, SEQ) and y.dtype == torch.int64
    windows = [decode(row.long().tolist()) for row in torch.cat([x, tx])]
    targets = decode(torch.cat([y, ty]).tolist())
    assert windows == [text[i : i + SEQ] for i in range(93)]  # every position, in order: split by position
    assert targets == text[SEQ:]
    # The central test set is every device's test windows.
    cx, cy = ds.test_data()
    assert torch.equal(cy, torch.cat([ty, ds.device_test_data(1)[1]]))
    assert torch.equal(cx[: len(tx)], tx)


def test_max_train_windows_thins_evenly_over_the_whole_training_part(tmp_path: Path) -> None:
    ds = dataset(write(tmp_path, PLAY), population=2, max_train_windows=5)
    full = dataset(write(tmp_path, PLAY), population=2).device_data(0)[1]
    _, y = ds.device_data(0)
    assert ds.num_examples(0) == 5 and torch.equal(y, full[[0, 18, 37, 56, 74]])


def test_vocabulary_is_leafs_80_characters_plus_one_unknown_and_is_saved_with_the_run(tmp_path: Path) -> None:
    assert len(LEAF_CHARACTERS) == 80 and VOCABULARY_SIZE == 81
    assert encode("a$\n").tolist() == [LEAF_CHARACTERS.index("a"), UNKNOWN, 0]
    ds = dataset(write(tmp_path, PLAY), population=2)
    assert ds.num_classes == 81
    ds.save(tmp_path)
    saved = json.loads((tmp_path / "vocabulary.json").read_text())
    assert "".join(saved["characters"]) == LEAF_CHARACTERS and saved["unknown_index"] == 80


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "is empty"),
        ("  \n\n \n", "is empty"),
        ("Just prose, no speaker anywhere.\n\nAnother paragraph.\n", "no speeches"),
        ("ALICE:\nfine words\n\nBOB:\nbad \x01 byte here\n", "role 'BOB' holds a non-text character"),
        (b"ALICE:\nnot utf-8 \xff\xfe here\n", "is not UTF-8 text (byte 0xff on line 2)"),
    ],
)
def test_bad_text_is_a_data_error_naming_the_problem(tmp_path: Path, content: str | bytes, fragment: str) -> None:
    with pytest.raises(DataError, match="^shakespeare: ") as err:
        dataset(write(tmp_path, content), population=1)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_cli_with_a_text_without_speeches_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "no speaker here\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "dataset=shakespeare", "model=lstm", f"dataset.path={path}",
         "population=1", "cohort.size=1", f"output.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "no speeches" in lines[0] and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- models


def tiny_model(name: str, *, dp: bool = False) -> torch.nn.Module:
    cfg = ModelConfig(name=name, embed=4, hidden=16, layers=2, heads=2)
    model = build_model(cfg, (SEQ,), VOCABULARY_SIZE, seed=0)
    return checked_model(model, fix=False) if dp else model


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_language_models_give_next_character_logits_from_float_indices(name: str) -> None:
    x = torch.randint(0, VOCABULARY_SIZE, (5, SEQ))
    model = tiny_model(name)
    assert model(x.float()).shape == (5, VOCABULARY_SIZE)
    assert torch.equal(model(x.float()), model(x))


def test_lstm_has_leafs_default_shape() -> None:
    model = build_model(ModelConfig(name="lstm"), (80,), VOCABULARY_SIZE, seed=0)
    assert model.embedding.embedding_dim == 8
    assert (model.lstm.hidden_size, model.lstm.num_layers) == (256, 2)


def test_transformer_is_causal_the_last_prediction_ignores_nothing_but_earlier_ones_ignore_the_future() -> None:
    model = tiny_model("transformer")
    x = torch.randint(0, VOCABULARY_SIZE, (1, SEQ))
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % VOCABULARY_SIZE
    assert not torch.allclose(model(x), model(changed))  # the last character matters
    prefix = model.__class__(VOCABULARY_SIZE, SEQ, width=16, layers=2, heads=2)
    prefix.load_state_dict(model.state_dict())
    # Predicting from the first SEQ-1 characters: the same whether or not a later one changes,
    # read through the hidden states of position SEQ-2 (a causal model never looks ahead).
    h_a, h_b = [_hidden(model, t)[:, -2] for t in (x, changed)]
    assert torch.allclose(h_a, h_b, atol=1e-6)


def _hidden(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens = x.long()
    h = model.token(tokens) + model.position(torch.arange(tokens.shape[-1]).expand_as(tokens))
    for block in model.blocks:
        h = block(h)
    return h


def test_dp_sgd_swaps_the_lstm_for_dplstm_with_the_same_function() -> None:
    plain, private = tiny_model("lstm"), tiny_model("lstm", dp=True)
    assert type(private.lstm).__name__ == "DPLSTM"
    x = torch.randint(0, VOCABULARY_SIZE, (3, SEQ)).float()
    assert torch.allclose(plain(x), private(x), atol=1e-6)


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_dp_sgd_step_clips_each_example_and_vectorized_training_gives_the_same_update(name: str) -> None:
    x = torch.randint(0, VOCABULARY_SIZE, (20, SEQ)).float()
    y = torch.randint(0, VOCABULARY_SIZE, (20,))
    config, dp = TrainConfig(lr=0.5, batch_size=10), DPSGDConfig(noise_multiplier=0.0, max_grad_norm=0.01)
    model = tiny_model(name, dp=True)
    start = flatten_list(trainable_params(model)).clone()
    result = DPSGDTrainer(model, config, dp).fit(start, (x, y), seed=7)
    # Without noise each step moves the weights by at most lr * C * (sampled / expected batch).
    steps = int(result.metrics["steps"])
    assert 0 < result.update.norm() <= 0.5 * 0.01 * steps * 20 / 10 + 1e-6
    assert result.metrics["clip_fraction"] == 1.0  # C = 0.01 clips every example's gradient
    assert vectorizable(tiny_model(name, dp=True), config, dp, example=(x[:2], y[:2])) is None
    vectorized = VectorizedTrainer(tiny_model(name, dp=True), config, dp).fit_many(start, [(x, y)], [7])[0]
    assert torch.allclose(vectorized.update, result.update, atol=1e-6)


def test_plain_lstm_is_not_vectorized_and_says_why() -> None:
    reason = vectorizable(tiny_model("lstm"), TrainConfig(lr=0.1))
    assert reason is not None and "LSTM" in reason and "one by one" in reason


@pytest.mark.parametrize("privacy", [None, "dpsgd"])
def test_auto_trains_the_text_models_one_by_one_and_on_still_vectorizes_the_transformer(
    tmp_path: Path, privacy: str | None
) -> None:
    from fedsim.worker import use_vectorized

    ds = dataset(write(tmp_path, PLAY), population=2)
    raw: dict = {"population": 2, "cohort": {"size": 2}, "dataset": {"name": "shakespeare", "path": str(tmp_path / "play.txt"),
                 "seq_len": SEQ, "min_chars": 50}, "model": {"name": "transformer", "hidden": 16, "heads": 2}}  # fmt: skip
    if privacy:
        raw["privacy"] = {"dpsgd": {}}
    model = tiny_model("transformer", dp=privacy is not None)
    vectorized, why = use_vectorized(from_dict(raw), model, ds)
    assert not vectorized and "one by one" in why
    raw["simulation"] = {"vectorize": "on"}
    assert use_vectorized(from_dict(raw), model, ds)[0]


def test_text_models_on_a_feature_dataset_are_refused_before_the_run_starts() -> None:
    from fedsim.server_app import prepare

    with pytest.raises(ConfigError, match="model.name.*lstm reads character indices"):
        prepare(from_dict({"population": 20, "cohort": {"size": 2}, "dataset": {"name": "synthetic"}, "model": {"name": "lstm"}}))


def test_config_rejects_heads_that_do_not_divide_the_width() -> None:
    with pytest.raises(ConfigError, match="model.heads"):
        from_dict({"model": {"name": "transformer", "hidden": 30, "heads": 4}})


# ----------------------------------------------------------------------------- targets=every


def test_every_position_targets_are_the_window_shifted_by_one_and_test_labels_stay_the_next_character(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, PLAY)
    last, every = dataset(path, 2), dataset(path, 2, targets="every")
    for device in range(2):
        x, y = last.device_data(device)
        xe, ye = every.device_data(device)
        assert torch.equal(xe, x) and ye.shape == (len(x), SEQ) and ye.dtype == torch.int64
        assert torch.equal(ye[:, :-1], x[:, 1:].long())  # each position's next character...
        assert torch.equal(ye[:, -1], y)  # ...and the last one is LEAF's label
        assert torch.equal(every.device_test_data(device)[1], last.device_test_data(device)[1])
    assert torch.equal(every.test_data()[1], last.test_data()[1])


def every_model(name: str, *, dp: bool = False) -> torch.nn.Module:
    cfg = ModelConfig(name=name, embed=4, hidden=16, layers=2, heads=2)
    model = build_model(cfg, (SEQ,), VOCABULARY_SIZE, seed=0, sequence_targets=True)
    return checked_model(model, fix=False) if dp else model


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_sequence_models_train_on_every_position_and_evaluate_the_last(name: str) -> None:
    x = torch.randint(0, VOCABULARY_SIZE, (5, SEQ)).float()
    model = every_model(name).train()
    logits = model(x)
    assert logits.shape == (5, VOCABULARY_SIZE, SEQ)  # F.cross_entropy's [n, classes, positions]
    model.eval()
    assert torch.allclose(model(x), logits[:, :, -1], atol=1e-6)
    assert torch.equal(tiny_model(name).eval()(x), model(x))  # same weights as the one-target model


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_every_position_loss_is_the_mean_over_windows_and_positions_for_all_three_trainers(name: str) -> None:
    from clients.training import LocalTrainer

    x = torch.randint(0, VOCABULARY_SIZE, (20, SEQ)).float()
    y = torch.randint(0, VOCABULARY_SIZE, (20, SEQ))
    config = TrainConfig(lr=0.5, batch_size=10)
    model = every_model(name)
    start = flatten_list(trainable_params(model)).clone()
    # One full batch of plain SGD: the update is -lr x the gradient of the mean over windows and
    # positions, computed here by hand from the [n, classes, positions] logits.
    plain = LocalTrainer(model, TrainConfig(lr=0.5, batch_size=20)).fit(start, (x, y), seed=3)
    by_hand = every_model(name).train()
    logits = by_hand(x)
    loss = torch.stack([F.cross_entropy(logits[i].T, y[i]) for i in range(20)]).mean()
    grads = torch.autograd.grad(loss, list(by_hand.parameters()))
    assert torch.allclose(plain.update, -0.5 * flatten_list(list(grads)), atol=1e-6)
    # DP-SGD without noise and a clip so large nothing is clipped: Opacus's per-example
    # gradients of the per-window loss sum to the plain batch gradient, and the vectorized
    # trainer's per-example loss (mean over positions) gives the same update.
    dp = DPSGDConfig(noise_multiplier=0.0, max_grad_norm=1e6)
    private = DPSGDTrainer(every_model(name, dp=True), config, dp).fit(start, (x, y), seed=7)
    assert private.metrics["clip_fraction"] == 0.0
    vectorized = VectorizedTrainer(every_model(name, dp=True), config, dp).fit_many(start, [(x, y)], [7])[0]
    assert torch.allclose(vectorized.update, private.update, atol=1e-5)
    # Clipped: each window's gradient is clipped whole (its positions together are one example).
    dp_clip = DPSGDConfig(noise_multiplier=0.0, max_grad_norm=0.01)
    clipped = DPSGDTrainer(every_model(name, dp=True), config, dp_clip).fit(start, (x, y), seed=7)
    steps = int(clipped.metrics["steps"])
    assert clipped.metrics["clip_fraction"] == 1.0
    assert 0 < clipped.update.norm() <= 0.5 * 0.01 * steps * 20 / 10 + 1e-6


def test_dp_sgd_on_text_states_that_an_example_is_an_overlapping_window(tmp_path: Path) -> None:
    from fedsim.privacy.sample_level import SampleLevelDP

    path = write(tmp_path, PLAY)
    cfg = from_dict({"population": 2, "cohort": {"size": 2}, "privacy": {"dpsgd": {"noise_multiplier": 1.0}},
                     "dataset": {"name": "shakespeare", "path": str(path), "seq_len": SEQ, "min_chars": 50},
                     "model": {"name": "lstm"}})  # fmt: skip
    adjacency = SampleLevelDP(cfg, dataset(path, 2)).assumptions()["adjacency"]
    assert f"up to k = {SEQ + 1} examples" in adjacency and "not (epsilon, delta)" in adjacency


def test_targets_every_is_refused_for_models_that_read_one_label_and_with_example_canaries() -> None:
    base = {"dataset": {"name": "shakespeare", "targets": "every"}}
    with pytest.raises(ConfigError, match="dataset.targets.*allowed models: lstm, transformer"):
        from_dict({**base, "model": {"name": "mlp"}})
    with pytest.raises(ConfigError, match="dataset.targets"):
        from_dict({"dataset": {"name": "shakespeare", "targets": "all"}, "model": {"name": "lstm"}})
    with pytest.raises(ConfigError, match="dataset.targets.*canaries"):
        from_dict({**base, "model": {"name": "lstm"}, "privacy": {"dpsgd": {}},
                   "audit": {"canary_examples": 20, "canary_devices": 10}})  # fmt: skip


# ----------------------------------------------------------------------------- end to end


@pytest.mark.ray
def test_tiny_run_on_a_text_file_learns_reports_perplexity_and_repeats_its_sample(tmp_path: Path) -> None:
    # A repetitive play: a model that learns at all predicts most of its characters after 3 rounds.
    path = write(tmp_path, "".join(f"R{i}:\n" + "to be or not to be, " * 12 + "\n\n" for i in range(4)))
    raw = {
        "seed": 1,
        "population": 4,
        "rounds": 3,
        "cohort": {"size": 4, "sampling": "fixed"},
        "dataset": {"name": "shakespeare", "path": str(path), "seq_len": SEQ, "min_chars": 50,
                    "max_test_examples": None, "prompt": "to be", "sample_chars": 30},
        "model": {"name": "transformer", "hidden": 16, "layers": 1, "heads": 2},
        "algorithm": {"lr": 0.5, "batch_size": 10},
        "simulation": {"num_workers": 1, "ray_temp_dir": str(tmp_path / "ray")},
        "output": {"progress": False},
    }  # fmt: skip
    summary = run(from_dict(raw), tmp_path / "a")
    assert summary["final_test_accuracy"] > 0.5
    language = summary["language"]
    assert language["final_test_perplexity"] == pytest.approx(torch.tensor(summary["final_test_loss"]).exp().item())
    assert language["sample"]["prompt"] == "to be" and len(language["sample"]["continuation"]) == 30
    assert (tmp_path / "a" / "vocabulary.json").is_file()
    # The sample is drawn from the run's "final_sample" stream only: redrawing it from the saved
    # model and that stream gives the same text (a second run would; this costs no Ray start).
    cfg = from_dict(raw)
    ds = load_dataset(cfg.dataset, population=cfg.population, seed=cfg.seed)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, seed=cfg.seed)
    load_flat_params(model, torch.load(tmp_path / "a" / "model.pt", weights_only=False)["flat_params"])
    redrawn = ds.final_summary(model, randomness.streams(cfg).torch("final_sample", 0))
    assert redrawn["sample"] == language["sample"]
