"""Backward phase: dL/ds for one tile of one row, recomputed from the logits and row statistics.

In log2 units (``x' = x * log2(e) / T``, statistics from ``rkl_stats_kernel``), with
``x_s = s' - m_s`` and ``x_z = z' - m_z`` (one fused multiply-add each, so large logits keep
their digits), ``log2 p = x_s - log2 l_s`` and ``log2 q = x_z - log2 l_z``:

    reverse:  dL/ds_v = p_v ((ln p_v - ln q_v) - L) / T
                      = p_v * ln 2 * ((x_s - x_z) - E_p[x_s - x_z]) / T
    forward:  dL/ds_v = (p_v - q_v) / T

which is DESIGN.md's p (d - E_p[d]) / T with the maxima taken out (0 where p_v = 0);
``E_p[x_s - x_z]`` is the statistics' ``a / l_w``. The
upstream per-row gradient, ln 2 and 1/T fold into one per-row factor; masked rows get zeros
without loading their logits.
"""
import triton
import triton.language as tl

from .logits import load_tile, row_geometry, teacher_logits, tile_offsets, to_acc
from .rkl_stats import (
    LN2,
    STAT_CROSS,
    STAT_LOG_SUM_STUDENT,
    STAT_LOG_SUM_TEACHER,
    STAT_MAX_STUDENT,
    STAT_MAX_TEACHER,
    log2_scale,
)


@triton.jit
def grad_tile(grad_row, student_row, original_row, strengthened_row, offsets, lead, vocab,
              alpha, scale, m_s, log_l_s, m_z, log_l_z, shift, factor,
              HAS_STRENGTHENED: tl.constexpr, REVERSE: tl.constexpr, MASKED: tl.constexpr,
              ACC: tl.constexpr):
    """Write one tile of the gradient (``shift`` and ``factor`` are the per-row constants)."""
    s = to_acc(load_tile(student_row, offsets, lead, vocab, MASKED), ACC)
    z = to_acc(load_tile(original_row, offsets, lead, vocab, MASKED), ACC)
    if HAS_STRENGTHENED:
        g = to_acc(load_tile(strengthened_row, offsets, lead, vocab, MASKED), ACC)
        z = teacher_logits(z, g, alpha)
    x_s = s * scale - m_s
    x_z = z * scale - m_z
    p = tl.exp2(x_s - log_l_s)
    if REVERSE:
        grad = tl.where(p == 0, 0.0, p * ((x_s - x_z) - shift)) * factor
    else:
        grad = (p - tl.exp2(x_z - log_l_z)) * factor
    grad = grad.to(grad_row.dtype.element_ty)
    if MASKED:
        tl.store(grad_row + offsets, grad, mask=(offsets >= lead) & (offsets < vocab + lead))
    else:
        tl.store(grad_row + offsets, grad)


@triton.jit
def rkl_grad_kernel(
    grad_ptr, student_ptr, original_ptr, strengthened_ptr, keep_ptr, stats_ptr, grad_rows_ptr,
    rows, vocab,
    stride_student, stride_original, stride_strengthened, stride_grad_rows,
    alpha, temperature, scale_f32,
    HAS_STRENGTHENED: tl.constexpr, HAS_KEEP: tl.constexpr, REVERSE: tl.constexpr,
    VEC: tl.constexpr, TILE_R: tl.constexpr, THREADS: tl.constexpr, TILE_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Grid ``(rows, tiles)``: program (r, b) writes tile b of row r of the contiguous
    ``[rows, V]`` gradient, in the gradient's dtype (tiles as in ``logits.row_geometry``; the
    gradient shares the inputs' row alignment modulo ``VEC``, the launcher checks)."""
    BLOCK: tl.constexpr = TILE_R * THREADS * TILE_K
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    if HAS_KEEP:
        kept = tl.load(keep_ptr + row) != 0
    else:
        kept = True
    grad_offset, lead, full_lo, full_hi, n_tiles = row_geometry(row, vocab, vocab, VEC, BLOCK)
    step = tile * BLOCK
    grad_row = grad_ptr + grad_offset + step
    offsets = tile_offsets(TILE_R, THREADS, TILE_K)
    tile_lead = lead - tile * BLOCK
    if tile < n_tiles:
        if kept:
            student_row = student_ptr + tl.multiple_of(row * stride_student - lead, VEC) + step
            original_row = original_ptr + tl.multiple_of(row * stride_original - lead, VEC) + step
            strengthened_row = (strengthened_ptr
                                + tl.multiple_of(row * stride_strengthened - lead, VEC) + step)
            scale = log2_scale(temperature, scale_f32, ACC)
            m_s = tl.load(stats_ptr + STAT_MAX_STUDENT * rows + row)
            log_l_s = tl.load(stats_ptr + STAT_LOG_SUM_STUDENT * rows + row)
            m_z = tl.load(stats_ptr + STAT_MAX_TEACHER * rows + row)
            log_l_z = tl.load(stats_ptr + STAT_LOG_SUM_TEACHER * rows + row)
            factor = tl.load(grad_rows_ptr + row * stride_grad_rows).to(ACC) / temperature
            if REVERSE:
                shift = tl.load(stats_ptr + STAT_CROSS * rows + row)
                factor = factor * tl.full([], LN2, ACC)
            else:
                shift = 0.0
            if (tile >= full_lo) & (tile < full_hi):
                grad_tile(grad_row, student_row, original_row, strengthened_row, offsets,
                          tile_lead, vocab, alpha, scale, m_s, log_l_s, m_z, log_l_z, shift,
                          factor, HAS_STRENGTHENED, REVERSE, False, ACC)
            else:
                # A partial tile loads masked (scalar) columns: one repeat at a time keeps its
                # registers to a repeat's worth.
                sub_offsets = tile_offsets(1, THREADS, TILE_K)
                for sub in range(0, TILE_R):
                    sub_step = sub * (THREADS * TILE_K)
                    grad_tile(grad_row + sub_step, student_row + sub_step,
                              original_row + sub_step, strengthened_row + sub_step,
                              sub_offsets, tile_lead - sub_step, vocab, alpha, scale, m_s,
                              log_l_s, m_z, log_l_z, shift, factor, HAS_STRENGTHENED, REVERSE,
                              True, ACC)
        else:
            zeros = tl.zeros([BLOCK], grad_ptr.dtype.element_ty)
            tl.store(grad_row + offsets, zeros,
                     mask=(offsets >= tile_lead) & (offsets < vocab + tile_lead))
