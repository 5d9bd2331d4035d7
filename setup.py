"""The one packaging step pyproject.toml cannot express: a wheel carries fedsim's Hydra
configs (conf/) and bundled datasets (data/) inside the package, as fedsim/_bundled/conf and
fedsim/_bundled/data, where fedsim.resources finds them once installed. The top-level folders
stay the only source: they are copied at build time, never duplicated in the repository.
Editable installs (`pip install -e .`) read the top-level folders directly and copy nothing."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
RESOURCES = ("conf", "data")


class BuildPyWithResources(build_py):
    """build_py, then conf/ and data/ into the build's fedsim/_bundled/."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name in RESOURCES:
            source = ROOT / name
            if not source.is_dir():  # an sdist without them cannot make a working wheel
                raise FileNotFoundError(f"fedsim build: {source} is missing (conf/ and data/ belong in every build)")
            target = Path(self.build_lib) / "fedsim" / "_bundled" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


setup(cmdclass={"build_py": BuildPyWithResources})
