#!/usr/bin/env bash
# Set up (idempotent), then run the test suite. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m slow` for the slow tests, `-k uan` for a subset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q "$@"
