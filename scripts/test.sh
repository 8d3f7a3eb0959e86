#!/usr/bin/env bash
# Installs what is missing, then runs the test suite (CPU is enough; Triton runs in its interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest tests -q "$@"
