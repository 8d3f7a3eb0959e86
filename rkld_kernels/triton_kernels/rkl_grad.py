"""Backward phase: dL/ds for one block of one row, recomputed from the logits and row statistics.

With log p = (s~ - m_s) - log l_s and log q = (z~ - m_z) - log l_z (statistics from
``rkl_stats_kernel``):

    reverse:  dL/ds_v = p_v ((log p_v - log q_v) - L) / T      (0 where p_v = 0)
    forward:  dL/ds_v = (p_v - q_v) / T

which is DESIGN.md's p (d - E_p[d]) / T written with the maxima taken out, so large logits
lose no digits. The upstream per-row gradient multiplies the result; masked rows get zeros
without loading their logits.
"""
import triton
import triton.language as tl

from .logits import load_tempered_logits
from .rkl_stats import (
    STAT_LOG_SUM_STUDENT,
    STAT_LOG_SUM_TEACHER,
    STAT_LOSS,
    STAT_MAX_STUDENT,
    STAT_MAX_TEACHER,
)


@triton.jit
def rkl_grad_kernel(
    grad_ptr, student_ptr, original_ptr, strengthened_ptr, keep_ptr, stats_ptr, grad_rows_ptr,
    rows, vocab,
    stride_student, stride_original, stride_strengthened, stride_grad_rows,
    alpha, temperature,
    HAS_STRENGTHENED: tl.constexpr, HAS_KEEP: tl.constexpr, REVERSE: tl.constexpr,
    SCALE_BY_TEMPERATURE: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """Grid ``(rows, cdiv(V, BLOCK_V))``: program (r, b) writes ``grad[r, b*BLOCK_V : (b+1)*BLOCK_V]``
    of the contiguous ``[rows, V]`` gradient, in the gradient's dtype."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    if HAS_KEEP:
        kept = tl.load(keep_ptr + row) != 0
    else:
        kept = True
    cols = tl.max_contiguous(tl.multiple_of(block * BLOCK_V + tl.arange(0, BLOCK_V), BLOCK_V),
                             BLOCK_V)
    # A masked row loads nothing: its column limit is 0.
    load_limit = tl.where(kept, vocab, 0)
    s, z = load_tempered_logits(student_ptr + row * stride_student,
                                original_ptr + row * stride_original,
                                strengthened_ptr + row * stride_strengthened,
                                cols, cols < load_limit, alpha, temperature, HAS_STRENGTHENED,
                                SCALE_BY_TEMPERATURE, ACC)
    log_p = (s - tl.load(stats_ptr + STAT_MAX_STUDENT * rows + row)) \
        - tl.load(stats_ptr + STAT_LOG_SUM_STUDENT * rows + row)
    log_q = (z - tl.load(stats_ptr + STAT_MAX_TEACHER * rows + row)) \
        - tl.load(stats_ptr + STAT_LOG_SUM_TEACHER * rows + row)
    p = tl.exp(log_p)
    if REVERSE:
        loss = tl.load(stats_ptr + STAT_LOSS * rows + row)
        grad = tl.where(p == 0, 0.0, p * ((log_p - log_q) - loss))
    else:
        grad = p - tl.exp(log_q)
    scale = tl.load(grad_rows_ptr + row * stride_grad_rows).to(ACC)
    if SCALE_BY_TEMPERATURE:
        scale = scale / temperature
    grad = tl.where(kept, grad * scale, 0.0)
    tl.store(grad_ptr + row * vocab + cols, grad.to(grad_ptr.dtype.element_ty),
             mask=cols < vocab)
