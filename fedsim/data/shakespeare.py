"""Shakespeare next-character prediction, one device per speaking role (LEAF's task).

The recipe is LEAF's (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings",
data/shakespeare): every speaking role is a device; its text is cut into windows of
`seq_len` (80) characters, each labelled with the character that follows it; the first
(1 - test_fraction) of a role's windows, by position, are its training data and the rest its
held-out test data (split by position, not shuffled, so a test window never sits between
training windows of the same passage). The central test set is the test windows of every
device of the population (evenly thinned to `max_test_examples` when set, because one LSTM
evaluation over every window of Tiny Shakespeare takes minutes on a CPU).

Input: a text in the format of Tiny Shakespeare (`data/shakespeare/README.md`): speeches
separated by blank lines, each opening with a line `NAME:`. A block that does not open with
such a line continues the speech before it (a speech with a blank line inside); text before
the first `NAME:` line belongs to no role and is skipped. A role's text is its speeches
joined by newlines, in file order. Tiny Shakespeare names roles without their play, so a
name that several plays share (GLOUCESTER) is one role: 309 roles instead of LEAF's 1,129.

Vocabulary: fixed, independent of the text, so a model trained on one file reads another:
LEAF's 80 characters, then one index for every other character (Tiny Shakespeare's `$`,
`3`...). It is saved with the run (`vocabulary.json`). A text with bytes that are not UTF-8
or with control characters other than newline and tab is refused (DataError, one line).

Examples reach the models as float32 character indices [n, seq_len] (the dataset interface's
float input; indices below 2^24 are exact), labels int64 [n]; the language models cast back.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from fedsim.config import ShakespeareConfig
from fedsim.data.base import FederatedDataset
from fedsim.data.bundled import bundled_path
from fedsim.errors import ConfigError, DataError

# LEAF's character set (leaf/models/utils/language_utils.py, ALL_LETTERS), in its order.
LEAF_CHARACTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
UNKNOWN = len(LEAF_CHARACTERS)  # the index of every character outside LEAF's set
VOCABULARY_SIZE = UNKNOWN + 1
VOCABULARY_FILE = "vocabulary.json"

_SPEAKER = re.compile(r"^([^\s:][^:]{0,59}):$")  # "NAME:" alone on its line (names are short)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n (\r is normalised away)
_LOOKUP = np.full(0x110000, UNKNOWN, dtype=np.uint8)  # every code point -> its index (1.1 MB)
_LOOKUP[[ord(c) for c in LEAF_CHARACTERS]] = np.arange(len(LEAF_CHARACTERS))


def encode(text: str) -> np.ndarray:
    """Character indices (int64) of `text` in the fixed vocabulary."""
    return _LOOKUP[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)].astype(np.int64)


def decode(indices: list[int] | np.ndarray) -> str:
    """The text of character indices (the unknown index reads as U+FFFD)."""
    return "".join(LEAF_CHARACTERS[i] if i < UNKNOWN else "\ufffd" for i in indices)


def parse_roles(text: str, *, source: str = "text") -> dict[str, str]:
    """Role name -> the role's text (its speeches joined by newlines), in order of first speech.

    Raises DataError for an empty text, a text without `NAME:` speeches, or control
    characters (naming the role that holds them).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DataError(f"shakespeare: {source} is empty (expected speeches opening with a 'NAME:' line)")
    speeches: dict[str, list[str]] = {}
    current: list[str] | None = None
    for block in re.split(r"\n\s*\n", text):
        first, _, body = block.strip("\n").partition("\n")
        match = _SPEAKER.match(first.strip())
        if match:
            current = speeches.setdefault(match.group(1).strip(), [])
            current.append(body)
        elif current is not None and block.strip():
            current.append(block.strip("\n"))
    if not speeches:
        raise DataError(
            f"shakespeare: {source} has no speeches (expected blocks separated by blank lines, each opening "
            f"with a line 'NAME:')"
        )
    roles = {name: "\n".join(parts) for name, parts in speeches.items()}
    for name, role_text in roles.items():
        bad = _CONTROL.search(role_text)
        if bad:
            raise DataError(
                f"shakespeare: {source} role {name!r} holds a non-text character {bad.group()!r} "
                f"(allowed: printable text, newlines and tabs)"
            )
    return roles


def read_text(path: Path) -> str:
    """The UTF-8 text of `path` (DataError, one line, if it is missing or not UTF-8 text)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"shakespeare: cannot read {path} ({err.strerror or type(err).__name__})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"shakespeare: {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line})"
        ) from None


class ShakespeareDataset(FederatedDataset):
    """Device i is the i-th role, in sorted name order, of those with at least min_chars characters."""

    token_inputs = True

    def __init__(self, cfg: ShakespeareConfig, *, population: int) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.input_shape = (cfg.seq_len,)
        self.num_classes = VOCABULARY_SIZE
        self.sequence_targets = cfg.targets == "every"
        self._path = Path(cfg.path) if cfg.path is not None else bundled_path("shakespeare")
        roles = parse_roles(read_text(self._path), source=str(self._path))
        minimum = max(cfg.min_chars, cfg.seq_len + 2)  # one training and one test window at least
        kept = sorted(name for name, text in roles.items() if len(text) >= minimum)
        self.roles_left_out = len(roles) - len(kept)
        self.roles_total = len(roles)
        if population > len(kept):
            raise ConfigError(
                "population",
                f"shakespeare at {self._path} has {len(kept)} roles with at least {minimum} characters "
                f"(dataset.min_chars={cfg.min_chars}, {self.roles_left_out} left out); allowed: 1..{len(kept)}",
            )
        self.roles: list[str] = kept[:population]
        # One int64 array of every device's characters, with offsets: windows are cut on demand.
        encoded = [encode(roles[name]) for name in self.roles]
        self._chars = np.concatenate(encoded) if encoded else np.zeros(0, np.int64)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])

    @property
    def num_devices(self) -> int:
        return len(self.roles)

    def _split(self, device_id: int) -> tuple[int, int, int]:
        """(first character of the role, its training windows, all its windows)."""
        start, end = int(self._offsets[device_id]), int(self._offsets[device_id + 1])
        windows = end - start - self.cfg.seq_len
        test = max(1, math.floor(windows * self.cfg.test_fraction))
        return start, windows - test, windows

    def _windows(self, start: int, first: int, stop: int, keep: int | None, *, every: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows first..stop-1 of the role starting at `start`, evenly thinned to `keep`."""
        return self._cut(_thin(start + np.arange(first, stop), keep), every=every)

    def _cut(self, starts: np.ndarray, *, every: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows beginning at these offsets of the character array, and their next
        characters: the one after each window [n], or with `every` the one after each of its
        positions [n, seq_len] (the window shifted by one; its last column is the former)."""
        positions = starts[:, None] + np.arange(self.cfg.seq_len)[None, :]
        x = self._chars[positions]
        y = self._chars[positions + 1] if every else self._chars[starts + self.cfg.seq_len]
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)

    def num_examples(self, device_id: int) -> int:
        self.check_device_id(device_id)
        train = self._split(device_id)[1]
        return min(train, self.cfg.max_train_windows) if self.cfg.max_train_windows else train

    def device_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_device_id(device_id)
        start, train, _ = self._split(device_id)
        return self._windows(start, 0, train, self.cfg.max_train_windows, every=self.sequence_targets)

    def device_test_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out windows of one device: the last test_fraction of its windows, by position."""
        self.check_device_id(device_id)
        start, train, windows = self._split(device_id)
        return self._windows(start, train, windows, None)

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = []
        for device_id in range(self.num_devices):
            start, train, windows = self._split(device_id)
            starts.append(start + np.arange(train, windows))
        # Thinned evenly over all devices' test windows in device order: every role keeps its share.
        return self._cut(_thin(np.concatenate(starts), self.cfg.max_test_examples))

    def notes(self) -> list[str]:
        """Lines about the population for the run's terminal output."""
        minimum = max(self.cfg.min_chars, self.cfg.seq_len + 2)
        return [
            f"shakespeare: {self.num_devices} devices (roles) from {self._path}; {self.roles_left_out} of "
            f"{self.roles_total} roles left out with fewer than {minimum} characters (dataset.min_chars)"
        ]

    def save(self, run_dir: Path) -> None:
        """Write the vocabulary (index -> character) with the run, so its model can be read later."""
        vocabulary = {
            "characters": list(LEAF_CHARACTERS),
            "unknown_index": UNKNOWN,
            "size": VOCABULARY_SIZE,
            "source": "LEAF's Shakespeare character set; every other character maps to unknown_index",
        }
        (Path(run_dir) / VOCABULARY_FILE).write_text(json.dumps(vocabulary, indent=1) + "\n")

    def final_summary(self, model: torch.nn.Module, generator: torch.Generator) -> dict:
        """What the model writes: a sampled continuation of dataset.prompt (for summary.json)."""
        return {"sample": sample_continuation(model, self.cfg.prompt, self.cfg.sample_chars, self.cfg.seq_len, generator)}


def _thin(positions: np.ndarray, keep: int | None) -> np.ndarray:
    """`keep` evenly spaced entries of `positions`, first and last included (all if fewer)."""
    if keep is None or len(positions) <= keep:
        return positions
    return positions[np.linspace(0, len(positions) - 1, keep).round().astype(np.int64)]


def sample_continuation(
    model: torch.nn.Module, prompt: str, length: int, seq_len: int, generator: torch.Generator
) -> dict[str, str]:
    """`length` characters drawn one at a time from the model's softmax after `prompt`.

    The model reads the last `seq_len` characters (the prompt left-padded with spaces); the
    draws come from `generator` only, so a seeded generator repeats the text exactly.
    """
    context = [LEAF_CHARACTERS.index(" ")] * seq_len + encode(prompt).tolist()
    drawn: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(length):
                x = torch.tensor([context[-seq_len:]], dtype=torch.float32)
                probs = torch.softmax(model(x)[0].double(), dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
                drawn.append(nxt)
                context.append(nxt)
    finally:
        model.train(was_training)
    return {"prompt": prompt, "continuation": decode(drawn)}
