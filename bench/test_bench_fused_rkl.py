"""Forward+backward of the RKLD loss from logits: ``fused_rkl_loss`` against what people use today.

Cases, one table per shape (printed at the end of the run; ``--benchmark-json`` holds the same
figures, with peak memory and bandwidth in each benchmark's ``extra_info``):

- ``naive``: materialised teacher (``unlearning_teacher_logits``), two ``log_softmax`` and
  ``F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")`` = KL(p || q), in the
  logits' dtype, as a user would write it. The baseline of each table.
- ``compiled``: ``torch.compile`` of ``naive`` (static shapes). On CPU it is kept only when its
  compilation takes under ``COMPILE_LIMIT_S``; the compile time is a column of the table.
- ``liger``: materialised teacher log-probs + Liger-Kernel's JSD with beta=1, which is
  KL(student || teacher) over log-probabilities (student log-probs through autograd). CUDA only.
- ``ours``: ``fused_rkl_loss(..., backend="auto")``: triton on CUDA, chunked torch on CPU.
- ``ours float64``: the same with ``compute_dtype=torch.float64`` (float64 arithmetic for
  float32 inputs, the rounding floor's option): its cost in the same table. float32 shapes only.

Shapes: CPU 2048 x 32000 fp32; CUDA 8192 x 32000, 8192 x 128256 and 16384 x 128256 bf16.
Peak memory is what one step needs above its inputs (see ``_memory.py``). On CUDA the table also
shows the bandwidth each case achieves on the bytes the two fused kernels must move (forward
reads student, original and strengthened; backward reads them again and writes the gradient:
7 x rows x V x element size), next to the device copy bandwidth measured in the same run.

Targets (notes under the tables say whether this run met them):
CPU 2048 x 32000 fp32: ours >= 5x faster than naive, >= 1.2x torch.compile of naive, <= 1/3 of
naive's peak extra memory.
CUDA 8192 x 128256 bf16: ours >= 75 % of copy bandwidth, >= 5x naive, >= 3x liger.

Run: ``pytest bench/test_bench_fused_rkl.py [--benchmark-json results.json]``
"""
from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _memory import cpu_peak_extra_bytes, cuda_peak_extra_bytes

from rkld_kernels import fused_rkl_loss, reference_rkl_loss, unlearning_teacher_logits

ALPHA = 8.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {
    "cpu": [(2048, 32000, "float32")],
    "cuda": [(8192, 32000, "bfloat16"), (8192, 128256, "bfloat16"), (16384, 128256, "bfloat16")],
}
ROUNDS = {"cpu": 3, "cuda": 10}
IMPLS = ("naive", "compiled", "liger", "ours", "ours float64")
COMPILE_LIMIT_S = 60.0
# Loss agreement with the float64 ground truth. The fused loss accumulates in fp32 whatever the
# input dtype; the baselines compute log-probs in the logits' dtype, so bf16 costs them ~1 %.
RTOL = {"ours": 1e-3, "ours float64": 1e-3, "float32": 1e-3, "bfloat16": 5e-2}
# (device, rows, vocab, dtype) -> targets as (measure, other case, bound); notes say if met.
TARGETS = {
    ("cpu", 2048, 32000, "float32"): [("speed-up", "naive", 5.0), ("speed-up", "compiled", 1.2),
                                      ("memory", "naive", 1 / 3)],
    ("cuda", 8192, 128256, "bfloat16"): [("speed-up", "naive", 5.0), ("speed-up", "liger", 3.0),
                                         ("fraction of copy bandwidth", None, 0.75)],
}


def group_name(device: str, rows: int, vocab: int, dtype: str) -> str:
    return f"fused_rkl_loss fwd+bwd: {device} {rows} x {vocab} {dtype}"


def build_inputs(rows: int, vocab: int, dtype: str, device: str):
    """Student (requires grad), original and strengthened logits, the same for every case."""
    gen = torch.Generator(device).manual_seed(0)
    kw = {"dtype": getattr(torch, dtype), "device": device, "generator": gen}
    student = torch.randn(rows, vocab, **kw).requires_grad_()
    original = torch.randn(rows, vocab, **kw)
    # Strengthening raised some logits and lowered others a little.
    strengthened = original + 0.1 * torch.randn(rows, vocab, **kw)
    return student, original, strengthened


def naive_rkl(student, original, strengthened):
    teacher = unlearning_teacher_logits(original, strengthened, ALPHA)
    return F.kl_div(torch.log_softmax(teacher, dim=-1), torch.log_softmax(student, dim=-1),
                    log_target=True, reduction="batchmean")


def liger_rkl(student, original, strengthened):
    from liger_kernel.transformers.functional import liger_jsd

    with torch.no_grad():
        teacher_log_probs = torch.log_softmax(
            unlearning_teacher_logits(original, strengthened, ALPHA), dim=-1)
    # beta=1 makes Liger's generalised JSD the reverse KL, sum exp(x) (x - y), x = student log-probs.
    return liger_jsd(torch.log_softmax(student, dim=-1), teacher_log_probs, beta=1.0)


def ours_rkl(student, original, strengthened):
    return fused_rkl_loss(student, original, strengthened, alpha=ALPHA, backend="auto")


def ours_float64_rkl(student, original, strengthened):
    return fused_rkl_loss(student, original, strengthened, alpha=ALPHA, backend="auto",
                          compute_dtype=torch.float64)


def loss_function(impl: str):
    if impl == "compiled":
        return torch.compile(naive_rkl, dynamic=False)
    return {"naive": naive_rkl, "liger": liger_rkl, "ours": ours_rkl,
            "ours float64": ours_float64_rkl}[impl]


def make_step(impl: str, student, original, strengthened):
    """One forward+backward; returns the loss as a float (which also waits for the device)."""
    fn = loss_function(impl)

    def step() -> float:
        loss = fn(student, original, strengthened)
        loss.backward()
        student.grad = None
        return loss.item()

    return step


def memory_case(impl: str, rows: int, vocab: int, dtype: str):
    """Factory for ``_memory.cpu_peak_extra_bytes``: builds the CPU inputs, returns the step."""
    return make_step(impl, *build_inputs(rows, vocab, dtype, "cpu"))


@functools.lru_cache(maxsize=None)
def expected_loss(rows: int, vocab: int, dtype: str, device: str) -> float:
    """Mean reverse KL of the benchmark inputs from the reference formula in float64."""
    student, original, strengthened = build_inputs(rows, vocab, dtype, device)
    total = 0.0
    with torch.no_grad():
        for start in range(0, rows, 256):
            chunk = slice(start, start + 256)
            total += reference_rkl_loss(student[chunk].double(), original[chunk].double(),
                                        strengthened[chunk].double(), alpha=ALPHA,
                                        reduction="sum").item()
    return total / rows


def skip_reason(impl: str, dtype: str = "float32") -> str | None:
    if impl == "ours float64" and dtype != "float32":
        return "the float64 option is measured for float32 inputs"
    if impl == "liger":
        if DEVICE != "cuda":
            return "Liger-Kernel is Triton-only and needs a CUDA device"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install -e .[bench])"
    return None


@pytest.fixture(scope="module", autouse=True)
def target_notes(bench_table):
    """After the module's cases ran, say under each target shape's table whether it was met."""
    yield
    for (device, rows, vocab, dtype), targets in TARGETS.items():
        group = group_name(device, rows, vocab, dtype)
        ours = bench_table.row(group, "ours")
        if ours is None:
            continue
        for measure, other_name, bound in targets:
            value = _target_value(measure, ours, bench_table.row(group, other_name))
            if value is None:
                continue
            at_most = measure == "memory"
            met = value <= bound if at_most else value >= bound
            against = f" vs {other_name}" if other_name else ""
            bench_table.note(group, f"target ours {measure}{against} {'<=' if at_most else '>='} "
                                    f"{bound:.2f}: measured {value:.2f} -> "
                                    f"{'met' if met else 'NOT met'}")


def _target_value(measure: str, ours: dict, other: dict | None) -> float | None:
    """The measured value of a target, or None when a row it needs is missing."""
    if measure == "fraction of copy bandwidth":
        percent = ours["extra"].get("% of copy")
        return percent / 100 if percent is not None else None
    if other is None:
        return None
    if measure == "speed-up":
        if ours["seconds"] is None or other["seconds"] is None:
            return None
        return other["seconds"] / ours["seconds"]
    if ours["peak_bytes"] is None or not other["peak_bytes"]:
        return None
    return ours["peak_bytes"] / other["peak_bytes"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows,vocab,dtype", SHAPES[DEVICE],
                         ids=[f"{r}x{v}-{d}" for r, v, d in SHAPES[DEVICE]])
def test_fused_rkl_fwd_bwd(benchmark, bench_table, request, rows, vocab, dtype, impl):
    group = group_name(DEVICE, rows, vocab, dtype)
    benchmark.group = group
    reason = skip_reason(impl, dtype)
    if reason:
        bench_table.note(group, f"{impl} skipped: {reason}")
        pytest.skip(reason)

    expected = expected_loss(rows, vocab, dtype, DEVICE)
    step = make_step(impl, *build_inputs(rows, vocab, dtype, DEVICE))
    extra = {}
    start = time.perf_counter()
    loss = step()
    first_call = time.perf_counter() - start
    if impl == "compiled":
        start = time.perf_counter()
        step()
        compile_s = max(0.0, first_call - (time.perf_counter() - start))
        extra["compile s"] = compile_s
        if DEVICE == "cpu" and compile_s > COMPILE_LIMIT_S:
            reason = f"torch.compile took {compile_s:.0f} s to compile (limit {COMPILE_LIMIT_S:.0f} s)"
            bench_table.note(group, f"compiled skipped: {reason}")
            pytest.skip(reason)
    rtol = RTOL[impl] if impl.startswith("ours") else RTOL[dtype]
    assert loss == pytest.approx(expected, rel=rtol), (
        f"{impl} computes a different loss ({loss}) than the float64 reference ({expected})")

    # The calls above were the warm-up (allocator, thread pools, autotuning, compilation).
    benchmark.pedantic(step, rounds=ROUNDS[DEVICE], warmup_rounds=0)
    seconds = bench_table.seconds_of(benchmark)

    if DEVICE == "cuda":
        peak = cuda_peak_extra_bytes(step)
        if seconds:
            copy_bandwidth = request.getfixturevalue("cuda_copy_bandwidth")
            bench_table.note(group, f"device copy bandwidth: {copy_bandwidth / 1e9:.0f} GB/s")
            moved = 7 * rows * vocab * getattr(torch, dtype).itemsize
            extra["GB/s"] = moved / seconds / 1e9
            extra["% of copy"] = 100 * moved / seconds / copy_bandwidth
    else:
        del step   # frees this process's inputs before the subprocess builds its own
        peak = cpu_peak_extra_bytes(f"{Path(__file__).resolve()}:memory_case",
                                    impl=impl, rows=rows, vocab=vocab, dtype=dtype)
    bench_table.record(group, impl, seconds, peak, baseline=impl == "naive", benchmark=benchmark,
                       **extra)
