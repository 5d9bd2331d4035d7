#!/usr/bin/env bash
# Set up (idempotent) and run fedsim; arguments are Hydra overrides, e.g. rounds=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fedsim "$@"
