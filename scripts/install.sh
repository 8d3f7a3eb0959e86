#!/usr/bin/env bash
# Installs the project and its test/pipeline extras into the current Python.
# A torch that is already installed is never replaced; without one, the CPU build 2.13.0 is
# installed first (a bare `torch` requirement would otherwise pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[install] no torch found: installing the CPU build torch==2.13.0"
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
