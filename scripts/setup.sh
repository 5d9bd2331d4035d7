#!/usr/bin/env bash
# Create .venv and install fedsim with its test extras. torch==2.13.0 goes first: a bare
# `torch` requirement with nothing installed would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip_install() {
  # pip warns about every missing local index directory of this machine's pip.conf: drop those lines.
  .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
pip_install torch==2.13.0
# setuptools reminds every editable install that same-named folders in the working directory
# may shadow the package: informational, nothing to act on, so it stays out of the output.
PYTHONWARNINGS="ignore:Editable installation" pip_install -e ".[test]"
if [ "${1:-}" = "--bench" ]; then
  # pfl-research for bench/speed.py. pfl 0.6.0 pins dp-accounting<0.6, which would downgrade
  # fedsim's PLD accounting; it runs with 0.6.0, so its two packages go in without the resolver.
  pip_install --no-deps "pfl==0.6.0" "prv-accountant==0.2.0"
fi
