#!/usr/bin/env bash
# The test command: installs what the suite needs (idempotent), builds the offline weights it checks, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/install.sh
$PYTHON -m offline_kit.preset
ruff check . && ruff format --check .
HF_HUB_OFFLINE=1 $PYTHON -m pytest -q "$@"
