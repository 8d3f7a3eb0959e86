#!/usr/bin/env bash
# Installs what is missing, then runs the end-to-end unlearning demo on the built-in synthetic
# benchmark (CPU is enough, no network). Extra arguments go to `rkld demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m rkld demo "$@"
