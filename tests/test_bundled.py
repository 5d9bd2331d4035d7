"""The bundled datasets: found from the package (never the working directory), sha256-checked,
and a damaged or missing copy stops a run with one line and exit status 2."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim import resources
from fedsim.config import FemnistConfig, from_dict
from fedsim.data import bundled, load_dataset
from fedsim.errors import DataError

REPO = Path(__file__).resolve().parent.parent


def _copy_bundle(name: str, root: Path) -> Path:
    """A copy of the bundled files of `name` under root (a stand-in data/ folder)."""
    for relative in bundled.BUNDLES[name].sha256:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(resources.resource_dir("data") / relative, target)
    return root


def _flip_one_byte(path: Path, offset: int = 1000) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))


def test_bundled_paths_are_the_repository_data_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert bundled.bundled_path("femnist") == REPO / "data" / "femnist"
    shakespeare = bundled.bundled_path("shakespeare")
    assert shakespeare == REPO / "data" / "shakespeare" / "input.txt"
    assert shakespeare.stat().st_size == 1_115_394


def test_femnist_default_config_loads_the_bundled_105_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = from_dict({"dataset": {"name": "femnist"}, "population": 105, "cohort": {"size": 10}})
    assert cfg.dataset == FemnistConfig(path=None)
    data = load_dataset(cfg.dataset, population=105, seed=0)
    assert data.num_devices == 105
    assert sum(data.num_examples(k) for k in range(105)) == 14_708
    assert len(data.test_data()[1]) == 1_685


def test_each_data_readme_states_the_sha256_that_is_checked() -> None:
    for name, bundle in bundled.BUNDLES.items():
        readme = (REPO / "data" / name / "README.md").read_text()
        for digest in bundle.sha256.values():
            assert digest in readme, (name, digest)
        assert re.search(r"[Ll]icen[cs]e", readme) and "Source" in readme


def test_an_altered_bundled_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    root = _copy_bundle("femnist", tmp_path)
    bundled.verify("femnist", root=root)  # an exact copy passes
    _flip_one_byte(root / "femnist" / "test" / "femnist_test.json.gz")
    with pytest.raises(DataError) as err:
        bundled.verify("femnist", root=root)
    message = str(err.value)
    assert "femnist_test.json.gz" in message and "0afc1734" in message and "\n" not in message


def test_a_file_changed_after_its_check_is_checked_again(tmp_path: Path) -> None:
    root = _copy_bundle("shakespeare", tmp_path)
    bundled.verify("shakespeare", root=root)
    text = root / "shakespeare" / "input.txt"
    _flip_one_byte(text)
    with pytest.raises(DataError, match="sha256"):
        bundled.verify("shakespeare", root=root)


def test_each_file_is_hashed_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _copy_bundle("femnist", tmp_path)
    # Files changed within bundled.MEMO_AFTER_NS of their hashing are hashed at every call (a
    # rewrite in the same timestamp tick would not show); these were copied just now.
    time.sleep(2 * bundled.MEMO_AFTER_NS / 1e9)
    opened: list[str] = []
    real_open = open

    def counting_open(path, *args, **kwargs):  # noqa: ANN001, ANN202 - the builtin's signature
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(bundled, "open", counting_open, raising=False)
    for _ in range(3):
        bundled.verify("femnist", root=root)
    assert sorted(opened) == sorted(str(root / f) for f in bundled.BUNDLES["femnist"].sha256)


def test_missing_bundled_file_says_where_it_belongs(tmp_path: Path) -> None:
    (tmp_path / "femnist" / "train").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        bundled.verify("femnist", root=tmp_path)
    assert "femnist_train.json.gz" in str(err.value) and "dataset.path" in str(err.value)


def test_unknown_bundled_dataset_lists_the_bundled_ones() -> None:
    with pytest.raises(DataError, match="femnist, shakespeare"):
        bundled.bundled_path("mnist_of_mars")


def _fedsim_with_data_root(root: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`fedsim ARGS` with the packaged-data location pointed at root (as in an installed wheel)."""
    code = (
        "import sys; from pathlib import Path; import fedsim.resources as r; "
        f"r.WHEEL_DIR = Path({str(root)!r}); "
        "from fedsim.__main__ import main; sys.argv = ['fedsim', *sys.argv[1:]]; main()"
    )
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_altered_bundled_femnist_stops_the_run_with_one_line_and_exit_2(tmp_path: Path) -> None:
    _copy_bundle("femnist", tmp_path / "pkg" / "data")
    _flip_one_byte(tmp_path / "pkg" / "data" / "femnist" / "train" / "femnist_train.json.gz")
    proc = _fedsim_with_data_root(tmp_path / "pkg", "dataset=femnist", f"output.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "femnist_train.json.gz" in lines[0] and "sha256" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_no_file_in_the_repository_refers_to_the_old_shared_folder() -> None:
    needle = "../" + "shared"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = [
        f for f in tracked
        if (REPO / f).is_file() and not f.startswith("data/") and needle in (REPO / f).read_text(errors="ignore")
    ]  # fmt: skip
    assert offenders == []
