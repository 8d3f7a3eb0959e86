"""Forward+backward of the RKLD loss from hidden states and lm_head weights:
``fused_linear_rkl_loss`` against materialised logits and against Liger-Kernel's fused-linear JSD.

Cases (one table per configuration, printed at the end of the run; ``--benchmark-json`` holds the
same figures, peak memory and FLOP rates in each benchmark's ``extra_info``):

- ``naive``: ``F.linear`` for each model (full ``[tokens, V]`` logits) and
  :func:`rkld_kernels.reference_rkl_loss`, with autograd; what a user would write. The baseline
  of the tables it is in.
- ``ours``: ``fused_linear_rkl_loss(..., backend="auto")``: chunked torch on CPU, triton on CUDA.
- ``ours float64``: the same with ``compute_dtype=torch.float64`` (float64 GEMMs and math for
  float32 heads, the rounding floor's option): its cost beside the default, in the unmasked
  two-teacher table of float32 inputs.
- ``liger eager`` / ``liger compiled``: Liger-Kernel's chunked
  ``LigerFusedLinearJSDLoss(beta=1.0, weight_hard_loss=0.0, weight_soft_loss=1.0)`` with
  ``compiled=False`` / ``True``. With beta = 1 its loss is KL(student || teacher) averaged over
  unmasked tokens, i.e. our reverse loss without a strengthened model, so it runs in the
  single-teacher tables only (and its loss is checked against ours).
- ``liger triton``: Liger's Triton ``LigerFusedLinearJSD(jsd_beta=1.0)``; CUDA only.

Shapes: CPU 4096 tokens, H = 256, V = 32000, fp32; CUDA 8192 tokens, H = 4096, V = 128256,
bf16. Two teachers (original and strengthened, each with its own lm_head) and one teacher, each
also with half the positions masked (``labels = -100``). On CPU naive runs in the unmasked
two-teacher table only (it costs the same whatever the mask, and takes most of the run's time);
the single-teacher tables compare against liger compiled.

FLOP rates: a forward+backward costs 10 * tokens * H * V FLOP with two teachers (three logits
GEMMs, dX and dW) and 8 * tokens * H * V with one; "GFLOP/s" is that over the measured time
(also for masked tables, so it shows the work saved), and "x GEMM bound" is the time over that
FLOP count at this machine's GEMM rate: the best rate of an lm_head-shaped GEMM (tokens x H
times H x V; fp32 on CPU, bf16 on CUDA) measured in the run, once at the start and again after
each case's timing.

Peak memory: on CPU the high-water RSS above the inputs (``_memory.py``: fresh subprocess, one
warm-up call, then the measured call); on CUDA the allocator's peak above what was allocated.
The scaling table (ours at 4k, 16k and 64k tokens, naive where it fits) runs each case once in
a fresh subprocess that resets the RSS high-water mark after building its inputs
(``python bench/test_bench_fused_linear.py '<json>'``); ours first compiles its vocabulary pass
on 64 tokens, other one-off costs (thread pools) are included.

Targets (notes under the tables say whether this run met them):
CPU two teachers: ours >= 2x faster than naive, <= 1/8 of its peak extra memory, <= 1.25x the
GEMM bound. CPU one teacher: ours at least as fast as liger compiled and >= 1.5x faster than
liger eager; half masked: >= 1.7x faster than liger compiled. CUDA: >= 600 TFLOP/s effective
with two teachers, >= 2x faster than liger (chunked compiled and Triton) with one, and at
32768 tokens <= 2 GiB peak extra memory.

Run: ``pytest bench/test_bench_fused_linear.py [--benchmark-json results.json]``
"""
from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _memory import cpu_peak_extra_bytes, cuda_peak_extra_bytes, rss_high_water_resettable

from rkld_kernels import fused_linear_rkl_loss, reference_rkl_loss

ALPHA = 8.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (tokens, H, V, dtype) of the main tables.
SHAPE = {"cpu": (4096, 256, 32000, "float32"), "cuda": (8192, 4096, 128256, "bfloat16")}[DEVICE]
# Tokens of the scaling table (peak memory of ours as the sequence grows).
SCALING_TOKENS = {"cpu": (4096, 16384, 65536), "cuda": (8192, 32768)}[DEVICE]
ROUNDS = {"cpu": 2, "cuda": 10}[DEVICE]
LIGER_IMPLS = ("liger eager", "liger compiled", "liger triton")


# --- inputs and the implementations ---------------------------------------------------------

def build_inputs(tokens: int, hidden: int, vocab: int, dtype: str, device: str, teachers: int,
                 masked: bool) -> dict:
    """Hidden states and lm_heads of the three models (or two), and labels.

    Weights are scaled so that logits have a standard deviation of about 2; the strengthened
    model's hidden states and head are perturbed copies of the original's, so about half of the
    logits rose. ``masked`` sets half of the labels to -100 (random positions).
    """
    gen = torch.Generator(device).manual_seed(0)
    kw = {"dtype": getattr(torch, dtype), "device": device, "generator": gen}
    scale = 2.0 / hidden ** 0.5
    inputs = {
        "student_hidden": torch.randn(tokens, hidden, **kw).requires_grad_(),
        "student_weight": (torch.randn(vocab, hidden, **kw) * scale).requires_grad_(),
        "original_hidden": torch.randn(tokens, hidden, **kw),
        "original_weight": torch.randn(vocab, hidden, **kw) * scale,
        "labels": torch.randint(0, vocab, (tokens,), device=device, generator=gen),
    }
    if teachers == 2:
        inputs["strengthened_hidden"] = (inputs["original_hidden"]
                                         + 0.3 * torch.randn(tokens, hidden, **kw))
        inputs["strengthened_weight"] = (inputs["original_weight"]
                                         + 0.1 * scale * torch.randn(vocab, hidden, **kw))
    if masked:
        drop = torch.rand(tokens, device=device, generator=gen) < 0.5
        inputs["labels"] = inputs["labels"].masked_fill(drop, -100)
    return inputs


def naive_loss(inp: dict) -> torch.Tensor:
    strengthened = (F.linear(inp["strengthened_hidden"], inp["strengthened_weight"])
                    if "strengthened_hidden" in inp else None)
    return reference_rkl_loss(F.linear(inp["student_hidden"], inp["student_weight"]),
                              F.linear(inp["original_hidden"], inp["original_weight"]),
                              strengthened, alpha=ALPHA, labels=inp["labels"])


def ours_loss(inp: dict, compiled: bool | None = None,
              compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    return fused_linear_rkl_loss(inp["student_hidden"], inp["student_weight"],
                                 inp["original_hidden"], inp["original_weight"],
                                 inp.get("strengthened_hidden"), inp.get("strengthened_weight"),
                                 alpha=ALPHA, labels=inp["labels"], backend="auto",
                                 compiled=compiled, compute_dtype=compute_dtype)


def ours_float64_loss(inp: dict) -> torch.Tensor:
    return ours_loss(inp, compute_dtype=torch.float64)


def liger_loss(impl: str):
    if impl == "liger triton":
        from liger_kernel.transformers import LigerFusedLinearJSD
        module = LigerFusedLinearJSD(jsd_beta=1.0)
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        module = LigerFusedLinearJSDLoss(beta=1.0, weight_hard_loss=0.0, weight_soft_loss=1.0,
                                         compiled=impl == "liger compiled")

    def loss(inp: dict) -> torch.Tensor:
        return module(inp["student_hidden"], inp["student_weight"], inp["original_hidden"],
                      inp["original_weight"], inp["labels"])

    return loss


def make_step(impl: str, inp: dict):
    """One forward+backward that drops its gradients; returns the loss as a float (which also
    waits for the device)."""
    fn = ({"naive": naive_loss, "ours": ours_loss, "ours float64": ours_float64_loss}.get(impl)
          or liger_loss(impl))

    def step() -> float:
        loss = fn(inp)
        loss.backward()
        inp["student_hidden"].grad = None
        inp["student_weight"].grad = None
        return loss.item()

    return step


def memory_case(impl: str, tokens: int, hidden: int, vocab: int, dtype: str, teachers: int,
                masked: bool):
    """Factory for ``_memory.cpu_peak_extra_bytes``: builds the CPU inputs, returns the step."""
    return make_step(impl, build_inputs(tokens, hidden, vocab, dtype, "cpu", teachers, masked))


def flop_count(tokens: int, hidden: int, vocab: int, teachers: int) -> float:
    return (10 if teachers == 2 else 8) * tokens * hidden * vocab


def group_name(teachers: int, masked: bool, tokens: int, hidden: int, vocab: int, dtype: str):
    who = "two teachers" if teachers == 2 else "one teacher"
    mask = ", half masked" if masked else ""
    return (f"fused_linear_rkl_loss fwd+bwd: {DEVICE} {tokens} tokens x H {hidden} x V {vocab} "
            f"{dtype}, {who}{mask}")


# --- machine reference ----------------------------------------------------------------------

class GemmRate:
    """FLOP/s of one lm_head-shaped GEMM (tokens x H times H x V) on this machine: the best of
    every measurement in the run. Each case measures again right after its own timing, so that
    a busy moment on a shared machine cannot make the GEMM bound look slower than it is."""

    def __init__(self):
        tokens, hidden, vocab, dtype = SHAPE
        gen = torch.Generator(DEVICE).manual_seed(1)
        kw = {"dtype": getattr(torch, dtype), "device": DEVICE, "generator": gen}
        self.x, self.w = torch.randn(tokens, hidden, **kw), torch.randn(vocab, hidden, **kw)
        self.flops = 2 * tokens * hidden * vocab
        self.best = 0.0

    def measure(self, repeats: int) -> float:
        for _ in range(repeats):
            _sync()
            start = time.perf_counter()
            torch.mm(self.x, self.w.t())
            _sync()
            self.best = max(self.best, self.flops / (time.perf_counter() - start))
        return self.best


@pytest.fixture(scope="session")
def gemm_rate() -> GemmRate:
    rate = GemmRate()
    rate.measure(6)
    return rate


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# --- the main tables --------------------------------------------------------------------------

def cases():
    """(impl, teachers, masked) of the main tables on this device."""
    out = []
    for teachers in (2, 1):
        for masked in (False, True):
            impls = ["ours"]
            # On CPU naive costs the same whatever the mask and takes most of the run's time:
            # it is the baseline of the unmasked two-teacher table only.
            if DEVICE == "cuda" or (teachers == 2 and not masked):
                impls.insert(0, "naive")
            if teachers == 2 and not masked and SHAPE[3] == "float32":
                impls.append("ours float64")
            if teachers == 1:
                impls += [i for i in LIGER_IMPLS if i != "liger triton" or DEVICE == "cuda"]
            out += [(impl, teachers, masked) for impl in impls]
    return out


def baseline_of(teachers: int, masked: bool) -> str:
    if DEVICE == "cuda" or (teachers == 2 and not masked):
        return "naive"
    return "liger compiled" if teachers == 1 else "ours"


def skip_reason(impl: str) -> str | None:
    if impl.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install -e .[bench])"
    return None


@functools.lru_cache(maxsize=None)
def ours_reference_loss(teachers: int, masked: bool) -> float:
    """Our loss on the table's inputs: Liger must agree with it (same quantity, see above)."""
    inp = build_inputs(*SHAPE, DEVICE, teachers, masked)
    with torch.no_grad():
        return ours_loss(inp, compiled=False).item()     # (no second compilation for no-grad)


@pytest.fixture(scope="module", autouse=True)
def target_notes(bench_table, gemm_rate):
    """After the module's cases ran, say under each table whether its targets were met."""
    yield
    tokens, hidden, vocab, dtype = SHAPE
    bound_note = (f"GEMM rate, best measured in this run ({dtype}, {tokens} x {hidden} x "
                  f"{vocab}): {gemm_rate.best / 1e9:.0f} GFLOP/s")
    for teachers in (2, 1):
        for masked in (False, True):
            group = group_name(teachers, masked, *SHAPE)
            if not bench_table.rows(group):
                continue
            bench_table.note(group, bound_note)
            for label, met, value in _targets(bench_table, group, teachers, masked):
                bench_table.note(group, f"target {label}: measured {value} -> "
                                        f"{'met' if met else 'NOT met'}")
    for label, met, value in _scaling_targets(bench_table):
        bench_table.note(scaling_group(), f"target {label}: measured {value} -> "
                                          f"{'met' if met else 'NOT met'}")


def _seconds(table, group, name):
    row = table.row(group, name)
    return row["seconds"] if row else None


def _targets(table, group, teachers, masked):
    ours = table.row(group, "ours")
    if ours is None or ours["seconds"] is None:
        return
    t = ours["seconds"]

    def faster(name, factor):
        other = _seconds(table, group, name)
        if other is not None:
            yield (f"ours >= {factor}x faster than {name}", other / t >= factor,
                   f"{other / t:.2f}x")

    if DEVICE == "cpu":
        if teachers == 2 and not masked:
            yield from faster("naive", 2.0)
            naive = table.row(group, "naive")
            if naive and naive["peak_bytes"] and ours["peak_bytes"] is not None:
                ratio = ours["peak_bytes"] / naive["peak_bytes"]
                yield "ours peak extra memory <= 1/8 of naive", ratio <= 1 / 8, f"{ratio:.3f}"
            bound = ours["extra"].get("x GEMM bound")
            if bound is not None:
                yield "ours <= 1.25x the GEMM-bound time", bound <= 1.25, f"{bound:.2f}x"
        if teachers == 1 and not masked:
            yield from faster("liger compiled", 1.0)
            yield from faster("liger eager", 1.5)
        if teachers == 1 and masked:
            yield from faster("liger compiled", 1.7)
    else:
        if teachers == 2 and not masked:
            tflops = ours["extra"].get("GFLOP/s")
            if tflops is not None:
                yield ("ours >= 600 TFLOP/s effective", tflops >= 600e3,
                       f"{tflops / 1e3:.0f} TFLOP/s")
        if teachers == 1 and not masked:
            yield from faster("liger compiled", 2.0)
            yield from faster("liger triton", 2.0)


@pytest.mark.parametrize("impl, teachers, masked", cases(),
                         ids=[f"{i.replace(' ', '-')}-{t}teacher{'-masked' if m else ''}"
                              for i, t, m in cases()])
def test_fused_linear_fwd_bwd(benchmark, bench_table, gemm_rate, impl, teachers, masked):
    tokens, hidden, vocab, dtype = SHAPE
    group = group_name(teachers, masked, *SHAPE)
    benchmark.group = group
    reason = skip_reason(impl)
    if reason:
        bench_table.note(group, f"{impl} skipped: {reason}")
        pytest.skip(reason)

    inp = build_inputs(tokens, hidden, vocab, dtype, DEVICE, teachers, masked)
    step = make_step(impl, inp)
    extra = {}
    start = time.perf_counter()
    loss = step()                  # warm-up: thread pools, autotuning, torch.compile
    if impl == "liger compiled":
        extra["warm-up s"] = time.perf_counter() - start
    if impl.startswith("liger"):
        expected = ours_reference_loss(teachers, masked)
        assert loss == pytest.approx(expected, rel=1e-3 if dtype == "float32" else 3e-2), (
            f"{impl} computes a different loss ({loss}) than ours ({expected})")

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0)
    seconds = bench_table.seconds_of(benchmark)
    if seconds:
        flops = flop_count(tokens, hidden, vocab, teachers)
        extra["GFLOP/s"] = flops / seconds / 1e9
        extra["x GEMM bound"] = seconds / (flops / gemm_rate.measure(3))

    peak = None
    if DEVICE == "cuda":
        peak = cuda_peak_extra_bytes(step)
    elif not masked and impl != "liger compiled":
        # (liger compiled would pay its compilation again in the subprocess; its memory is
        # that of liger eager plus the compiled chunk's buffers.)
        del step, inp    # free this process's inputs before the subprocess builds its own
        peak = cpu_peak_extra_bytes(f"{Path(__file__).resolve()}:memory_case", impl=impl,
                                    tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype,
                                    teachers=teachers, masked=masked)
    bench_table.record(group, impl, seconds, peak, baseline=impl == baseline_of(teachers, masked),
                       benchmark=benchmark, **extra)


# --- scaling: peak memory as the sequence grows --------------------------------------------------

def scaling_group() -> str:
    _, hidden, vocab, dtype = SHAPE
    return (f"fused_linear_rkl_loss peak extra memory vs tokens: {DEVICE} H {hidden} x V {vocab} "
            f"{dtype}, two teachers, one call")


def naive_fits(tokens: int, vocab: int, dtype: str) -> bool:
    """Naive holds about 10 [tokens, V] tensors at its peak (three logits, the teacher, two
    log-softmaxes, the weights, their gradients); run it only where that is under half the
    memory available now."""
    need = 10 * tokens * vocab * getattr(torch, dtype).itemsize
    if DEVICE == "cuda":
        available = torch.cuda.mem_get_info()[0]
    else:
        psutil = pytest.importorskip("psutil")
        available = psutil.virtual_memory().available
    return need < available / 2


def run_once_in_subprocess(case: dict, timeout_s: float = 900.0) -> dict:
    """Run one case in a fresh process (see ``_single_run``); returns its seconds and bytes."""
    command = [sys.executable, str(Path(__file__).resolve()), json.dumps(case)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"scaling case {case} failed with exit code {done.returncode}:\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _single_run(case: dict) -> dict:
    """Build the inputs, reset the RSS high-water mark, run the step once; report the time and
    the high-water RSS above the RSS after building the inputs."""
    status = Path("/proc/self/status")

    def kib(field):
        line = next(line for line in status.read_text().splitlines() if line.startswith(field))
        return int(line.split()[1])

    if case["impl"] == "ours":
        # One-off cost paid first, on a few tokens: compiling the vocabulary pass, which the
        # real call (large enough for compiled=None to choose it) then reuses.
        ours_loss(build_inputs(64, *SHAPE[1:], "cpu", 2, False), compiled=True).backward()
    step = make_step(case["impl"], build_inputs(case["tokens"], *SHAPE[1:], "cpu", 2, False))
    before = kib("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")     # resets VmHWM to the current RSS
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_bytes": (kib("VmHWM:") - before) * 1024}


@pytest.mark.parametrize("impl, tokens", [("ours", t) for t in SCALING_TOKENS]
                         + [("naive", t) for t in SCALING_TOKENS],
                         ids=[f"ours-{t}" for t in SCALING_TOKENS]
                         + [f"naive-{t}" for t in SCALING_TOKENS])
def test_peak_memory_scaling(bench_table, impl, tokens):
    _, hidden, vocab, dtype = SHAPE
    group = scaling_group()
    if impl == "naive" and not naive_fits(tokens, vocab, dtype):
        bench_table.note(group, f"naive {tokens}: skipped, its ~10 [tokens, V] tensors do not fit")
        pytest.skip("naive does not fit in memory")
    if DEVICE == "cuda":
        step = make_step(impl, build_inputs(tokens, hidden, vocab, dtype, DEVICE, 2, False))
        step()
        _sync()
        start = time.perf_counter()
        peak = cuda_peak_extra_bytes(step)
        seconds = time.perf_counter() - start
    else:
        if not rss_high_water_resettable():
            pytest.skip("needs Linux's /proc/self/clear_refs to reset the RSS high-water mark")
        result = run_once_in_subprocess({"impl": impl, "tokens": tokens})
        seconds, peak = result["seconds"], result["extra_bytes"]
    flops = flop_count(tokens, hidden, vocab, 2)
    bench_table.record(group, f"{impl} {tokens}", seconds, peak,
                       baseline=(impl, tokens) == ("ours", SCALING_TOKENS[0]),
                       **{"GFLOP/s": flops / seconds / 1e9})


def _scaling_targets(table):
    if DEVICE != "cuda":
        return
    row = table.row(scaling_group(), "ours 32768")
    if row and row["peak_bytes"] is not None:
        gib = row["peak_bytes"] / 2 ** 30
        yield "ours at 32768 tokens <= 2 GiB peak extra memory", gib <= 2, f"{gib:.2f} GiB"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python test_bench_fused_linear.py "
                         "'{\"impl\": \"ours\", \"tokens\": 4096}'")
    print(json.dumps(_single_run(json.loads(sys.argv[1]))))
