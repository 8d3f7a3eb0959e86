#!/usr/bin/env bash
# GPU check for a CUDA machine without network access (torch, triton, pytest and
# pytest-benchmark already installed; torch is never reinstalled or upgraded here).
#
#   bash bench/gpu_check.sh OUTDIR
#
# Steps, each under its own time limit; the limits add up to 535 s, so the whole script ends
# within 9 minutes even when a step hangs:
#   1. env.txt        GPU, driver, torch / triton / python versions
#   2. install.log    the project, editable, without dependencies (PYTHONPATH is set as well)
#   3. tests.log      the Triton-backend tests and the fused_rkl tests, on CUDA
#   4. bandwidth.txt  device-to-device copy bandwidth, the roofline of the logits kernels
#   5. bench.log      the benchmarks, with machine-readable results in bench.json
#   6. kernel_report.txt  the kernels' machine code for this GPU and the roofline model's
#                     predicted time of each pass beside its measured time at the benchmark
#                     shapes (bench/kernel_report.py --measure), JSON in kernel_report.json
#   7. fused_linear_tests.log, fused_linear_bench.log  the lm_head-fused loss (below)
#   8. cuda_ops.log   the operators on CUDA: compiled steps equal to eager, and training
#                     steps of both losses captured in CUDA graphs and replayed
# summary.txt lists every step with its exit status and duration. A failing step does not stop
# the next one; the script exits non-zero if any step failed.
set -uo pipefail

OUTDIR=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"
failed=0

# The kernels must be compiled for the GPU, not run by Triton's interpreter.
unset TRITON_INTERPRET
# Fallback in case the editable install below cannot run (no setuptools, read-only site-packages).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# run_step NAME LIMIT_SECONDS LOGFILE COMMAND...: run COMMAND with a time limit, log its
# output, and add one line to the summary.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    local verdict=ok
    if [ "$rc" -ne 0 ]; then
        verdict="FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", over ${limit}s"))"
        failed=1
    fi
    printf '%-10s %-40s %4ds  (%s)\n' "$name" "$verdict" "$((SECONDS - start))" "$log" \
        | tee -a "$SUMMARY"
}

run_step env 20 "$OUTDIR/env.txt" bash -c "
    nvidia-smi
    $PY -c 'import sys, torch, triton
print(\"python\", sys.version.split()[0])
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)
print(\"triton\", triton.__version__)
print(\"device\", torch.cuda.get_device_name(0))'"

run_step install 35 "$OUTDIR/install.log" \
    "$PY" -m pip install --no-deps --no-build-isolation -e .

# Every test file of the logits loss that exists; the others' absence is not an error.
shopt -s nullglob
test_files=(tests/test_triton_backend.py tests/test_fused_rkl*.py)
shopt -u nullglob
run_step tests 90 "$OUTDIR/tests.log" "$PY" -m pytest -q -ra "${test_files[@]}"

run_step bandwidth 30 "$OUTDIR/bandwidth.txt" "$PY" - <<'EOF'
"""Device copy bandwidth: best of 20 copies of 2 GiB, counting bytes read plus bytes written."""
import torch

nbytes = 2 * 2**30
src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
best_ms = float("inf")
for _ in range(20):
    start.record()
    dst.copy_(src)
    stop.record()
    stop.synchronize()
    best_ms = min(best_ms, start.elapsed_time(stop))
print(f"device: {torch.cuda.get_device_name(0)}")
print(f"copy of {nbytes / 2**30:.0f} GiB: best {best_ms:.3f} ms, "
      f"{2 * nbytes / best_ms / 1e9:.0f} GB/s (read + write)")
EOF

# (the fused-linear benchmarks run in their own step below)
run_step bench 100 "$OUTDIR/bench.log" \
    "$PY" -m pytest bench/ -q -ra --ignore=bench/test_bench_fused_linear.py \
    --benchmark-json "$OUTDIR/bench.json"

# The model is tested by its first GPU run: prediction beside measurement, per pass and shape.
run_step report 45 "$OUTDIR/kernel_report.txt" \
    "$PY" bench/kernel_report.py --bench-only --measure --targets device \
    --cache "$OUTDIR/kernel_code" --json-out "$OUTDIR/kernel_report.json"

# ---------------------------------------------------------------------------------------------
# fused_linear_rkl_loss (the lm_head-fused loss), at most 155 s:
#   fused_linear_tests.log  its tests, the triton-backend ones on CUDA
#   fused_linear_bench.log  its benchmarks (H 4096, V 128256, bf16: 8192 tokens against naive,
#                           Liger's chunked JSD and Liger's Triton JSD; 32768 tokens for peak
#                           memory), machine-readable in fused_linear_bench.json
# ---------------------------------------------------------------------------------------------
run_step fl-tests 45 "$OUTDIR/fused_linear_tests.log" \
    "$PY" -m pytest -q -ra tests/test_fused_linear.py
run_step fl-bench 110 "$OUTDIR/fused_linear_bench.log" \
    "$PY" -m pytest bench/test_bench_fused_linear.py -q -ra \
    --benchmark-json "$OUTDIR/fused_linear_bench.json"

run_step cuda-ops 60 "$OUTDIR/cuda_ops.log" \
    "$PY" -m pytest -q -ra tests/test_custom_ops_cuda.py

echo "logs in $OUTDIR" | tee -a "$SUMMARY"
exit "$failed"
