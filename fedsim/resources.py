"""Where fedsim's own files live: the Hydra configs (`conf`) and the bundled datasets (`data`).

In the repository (a clone, or `pip install -e .`) they are the top-level `conf/` and `data/`
folders beside the `fedsim` package. A built wheel carries copies of both inside the package,
as `fedsim/_bundled/conf` and `fedsim/_bundled/data` (setup.py copies them at build time, so
the top-level folders stay the one source). Both places are found from this file's location,
never from the working directory, so `fedsim` works the same from any folder.

This module imports nothing heavy: the command line asks it for the config directory before
torch is loaded.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPOSITORY_DIR = PACKAGE_DIR.parent
WHEEL_DIR = PACKAGE_DIR / "_bundled"  # where setup.py puts conf/ and data/ inside a wheel
KINDS = ("conf", "data")


def candidates(kind: str) -> tuple[Path, Path]:
    """Where `kind` ("conf" or "data") may live, in lookup order: inside the installed package
    first (an installed wheel's site-packages may hold an unrelated top-level `conf/`), then
    the repository's top-level folder."""
    if kind not in KINDS:
        raise ValueError(f"fedsim.resources: kind must be one of {KINDS}, got {kind!r}")
    return WHEEL_DIR / kind, REPOSITORY_DIR / kind


def resource_dir(kind: str) -> Path | None:
    """The directory holding fedsim's `kind` ("conf" or "data") files, or None when neither
    candidate exists (callers say where to put them)."""
    return next((path for path in candidates(kind) if path.is_dir()), None)
