"""Backward phase: dL/ds for one tile of one row, recomputed from the logits and row statistics.

In log2 units (``x' = x * log2(e) / T``, statistics from ``rkl_stats_kernel``), with
``x_s = s' - m_s`` and ``x_z = z' - m_z`` (one fused multiply-add each, so large logits keep
their digits), ``log2 p = x_s - log2 l_s`` and ``log2 q = x_z - log2 l_z``:

    reverse:  dL/ds_v = p_v ((ln p_v - ln q_v) - L) / T
                      = p_v * ln 2 * ((x_s - x_z) - E_p[x_s - x_z]) / T
    forward:  dL/ds_v = (p_v - q_v) / T

which is p (d - E_p[d]) / T (docs/design.md#closed-forms) with the maxima taken out (0 where p_v = 0);
``E_p[x_s - x_z]`` is the statistics' ``a / l_w``. The
upstream per-row gradient, ln 2 and 1/T fold into one per-row factor; masked rows get zeros
without loading their logits.

The ``PRECISE`` code (float32 logits in float32; see ``rkl_stats``) takes the references as
logits, p (and q) from compensated exponentials (``probability``), and d = (s - z) log2(e) / T
with the difference taken before the scaling (exact where the student is close to its teacher):

    reverse:  dL/ds_v = p_v * ln 2 * (d_v - E_p[d]) / T
    forward:  dL/ds_v = q_v expm1((d_v - c) ln 2) / T  where (d_v - c) ln 2 < 1,
                      = (p_v - q_v) / T                  elsewhere

with ``E_p[d]`` and ``c = log2 E_q[2^d]`` (the log-sum-exp difference) from the statistics' cross
plane; ``expm1`` by its series near 0, so nothing cancels where p ~ q.

Nearly one-hot students. A row's gradient entries sum to 0. Where the student's top
probability p_t is close to 1, the entry at t is a difference of two numbers far larger than
itself (reverse: ``(x_s - x_z) - E_p[x_s - x_z]`` at t; forward: ``p_t - q_t``), below the
accumulation dtype's resolution of them, while every other entry is accurate. So in rows where
``p_t > 2/3`` (read from the statistics: ``p_t ~ 1 / l_s``, i.e. ``log2 l_s < log2 1.5``), every
program also writes its tile's sum of the unrounded gradient, the column of the top token (the
one entry with ``p > 1/2``) or -1 where the tile does not hold it, and that entry's unrounded
value (0 elsewhere); ``rkl_grad_top_kernel`` then writes ``entry - sum of the row``, which is
minus the sum of the other entries up to one rounding of its size. Every program of a one-hot
row writes its three slots, so the top kernel never reads a slot nobody wrote. Each thread
keeps its own share of those sums through the tile and the threads combine once per program,
after the loop (no barrier or shuffle inside it). Other rows take the plain code (one compare
and branch more per program).
"""
import triton
import triton.language as tl

from .logits import as_thread_tile, load_tile, row_geometry, teacher_logits, tile_offsets, to_acc
from .rkl_stats import (
    LN2,
    STAT_CROSS,
    STAT_LOG_SUM_STUDENT,
    STAT_LOG_SUM_TEACHER,
    STAT_MAX_STUDENT,
    STAT_MAX_TEACHER,
    acc_scalar,
    exp2_compensated,
    expm1_log2,
    log2_scale,
    low_part,
    offset_difference,
)

# Rows whose log2 of the student's sum (relative to its maximum) lies in this range have a top
# probability above 2/3 (p_t = 2^(x_t) / l_s with x_t = 0 up to the rounding of the maximum).
# The lower bound keeps out rows without a finite student logit (l_s = 0), which have no top.
ONE_HOT_LOG2_SUM = tl.constexpr(0.5849625007211562)      # log2(1.5)
NO_TOP_LOG2_SUM = tl.constexpr(-1.0)


@triton.jit
def one_hot_row(log_l_s):
    """Whether a row takes the one-hot path (see the module docstring); the same test in both
    kernels, on the same statistic."""
    return (log_l_s < ONE_HOT_LOG2_SUM) & (log_l_s > NO_TOP_LOG2_SUM)


@triton.jit
def probability(x, m, log_l, scale, scale_lo):
    """``2^((x - m) log2(e) / T - log2 l)`` for the ``PRECISE`` code (``m`` a logit): ``x - m``
    is exact near the maximum, and the exponent's rounding error is recovered by a fused
    multiply-add (exactly for the product, to half an ulp of ``log2 l`` for the sum) and
    applied by ``exp2_compensated``."""
    x_rel = x - m
    hi = tl.fma(x_rel, scale, -log_l)
    lo = tl.fma(x_rel, scale_lo, tl.fma(x_rel, scale, -hi) - log_l)
    return exp2_compensated(hi, lo)


@triton.jit
def grad_tile(grad_row, student_row, original_row, strengthened_row, offsets, lead, vocab,
              alpha, scale, scale_lo, m_s, log_l_s, m_z, log_l_z, shift, factor,
              HAS_STRENGTHENED: tl.constexpr, REVERSE: tl.constexpr, MASKED: tl.constexpr,
              ONE_HOT: tl.constexpr, THREADS: tl.constexpr, TILE_K: tl.constexpr,
              ACC: tl.constexpr, ALPHA_ZERO: tl.constexpr, PRECISE: tl.constexpr = False):
    """Write one tile of the gradient (``shift`` and ``factor`` are the per-row constants).
    With ``ONE_HOT`` (one repeat: ``THREADS x TILE_K`` columns) also return each thread's
    share of the one-hot sums as ``[THREADS]`` tensors: the sum of its unrounded gradient, the
    column of the top token if it holds it (else -1) and that entry (else 0); no
    cross-thread step. Else return zeros."""
    s = to_acc(load_tile(student_row, offsets, lead, vocab, MASKED), ACC)
    z = to_acc(load_tile(original_row, offsets, lead, vocab, MASKED), ACC)
    if HAS_STRENGTHENED:
        g = to_acc(load_tile(strengthened_row, offsets, lead, vocab, MASKED), ACC)
        z = teacher_logits(z, g, alpha, ALPHA_ZERO)
    if PRECISE:
        p = probability(s, m_s, log_l_s, scale, scale_lo)
        # d = (s - z) log2(e) / T, the difference taken before the scaling; shift in the
        # same units (see the module docstring).
        if REVERSE:
            d = offset_difference(s, z, m_s - m_z) * scale - shift
        else:
            d = (s - z) * scale - shift
        if REVERSE:
            grad = tl.where(p == 0, 0.0, p * d) * factor
        else:
            q = probability(z, m_z, log_l_z, scale, scale_lo)
            # p - q = q expm1(d) where the student is close to its teacher (d < 1 nat);
            # elsewhere nothing cancels (and where q = 0, p is the gradient).
            near = d * LN2 < 1.0
            grad = tl.where(near, q * expm1_log2(tl.where(near, d, 0.0)), p - q) * factor
    else:
        x_s = s * scale - m_s
        x_z = z * scale - m_z
        p = tl.exp2(x_s - log_l_s)
        if REVERSE:
            grad = tl.where(p == 0, 0.0, p * ((x_s - x_z) - shift)) * factor
        else:
            grad = (p - tl.exp2(x_z - log_l_z)) * factor
    if ONE_HOT:
        # Columns outside the row hold p = 0 and gradient 0 (their logits load as -inf). At
        # most one entry of a row has p > 1/2. The tile's dims 0 and 2 live in one thread.
        is_top = p > 0.5
        total = tl.sum(tl.sum(as_thread_tile(grad, 1, THREADS, TILE_K), axis=2), axis=0)
        column = tl.where(is_top, offsets - lead, -1)
        top_column = tl.max(tl.max(as_thread_tile(column, 1, THREADS, TILE_K), axis=2), axis=0)
        entry = tl.where(is_top, grad, 0.0)
        top_entry = tl.sum(tl.sum(as_thread_tile(entry, 1, THREADS, TILE_K), axis=2), axis=0)
    else:
        total = tl.zeros([THREADS], ACC)
        top_column = tl.full([THREADS], -1, tl.int32)
        top_entry = tl.zeros([THREADS], ACC)
    rounded = grad.to(grad_row.dtype.element_ty)
    if MASKED:
        tl.store(grad_row + offsets, rounded, mask=(offsets >= lead) & (offsets < vocab + lead))
    else:
        tl.store(grad_row + offsets, rounded)
    return total, top_column, top_entry


@triton.jit
def partial_grad_tile(grad_row, student_row, original_row, strengthened_row, tile_lead, vocab,
                      alpha, scale, scale_lo, m_s, log_l_s, m_z, log_l_z, shift, factor,
                      HAS_STRENGTHENED: tl.constexpr, REVERSE: tl.constexpr,
                      ONE_HOT: tl.constexpr, TILE_R: tl.constexpr, THREADS: tl.constexpr,
                      TILE_K: tl.constexpr, ACC: tl.constexpr, ALPHA_ZERO: tl.constexpr,
                      MASKED: tl.constexpr = True, PRECISE: tl.constexpr = False):
    """``grad_tile`` one repeat at a time: for a partial tile (``MASKED``), whose masked
    (scalar) loads keep their registers to a repeat's worth that way, and for the one-hot rows'
    tiles (full ones without masks). With ``ONE_HOT`` returns the tile's sum of the unrounded
    gradient, the top token's column (-1 if the tile does not hold it) and its entry (0 if
    not), combined across threads once, after the loop; else zeros."""
    sub_offsets = tile_offsets(1, THREADS, TILE_K)
    total = tl.zeros([THREADS], ACC)
    top_column = tl.full([THREADS], -1, tl.int32)
    top_entry = tl.zeros([THREADS], ACC)
    for sub in range(0, TILE_R):
        sub_step = sub * (THREADS * TILE_K)
        part, column, entry = grad_tile(
            grad_row + sub_step, student_row + sub_step, original_row + sub_step,
            strengthened_row + sub_step, sub_offsets, tile_lead - sub_step, vocab, alpha,
            scale, scale_lo, m_s, log_l_s, m_z, log_l_z, shift, factor, HAS_STRENGTHENED,
            REVERSE, MASKED, ONE_HOT, THREADS, TILE_K, ACC, ALPHA_ZERO, PRECISE)
        if ONE_HOT:
            total += part
            top_column = tl.maximum(top_column, column)
            top_entry += entry
    return tl.sum(total, axis=0), tl.max(top_column, axis=0), tl.sum(top_entry, axis=0)


@triton.jit
def rkl_grad_kernel(
    grad_ptr, student_ptr, original_ptr, strengthened_ptr, keep_ptr, stats_ptr, grad_rows_ptr,
    rows, vocab,
    stride_student, stride_original, stride_strengthened, stride_grad_rows,
    alpha, inv_temperature, scale_f32, alpha_f64: tl.float64,
    inv_temperature_f64: tl.float64, scale_f64: tl.float64, tile_sums_ptr, top_index_ptr,
    top_grad_ptr,
    HAS_STRENGTHENED: tl.constexpr, HAS_KEEP: tl.constexpr, REVERSE: tl.constexpr,
    VEC: tl.constexpr, TILE_R: tl.constexpr, THREADS: tl.constexpr, TILE_K: tl.constexpr,
    ACC: tl.constexpr, ALPHA_ZERO: tl.constexpr = False, PRECISE: tl.constexpr = False,
):
    """Grid ``(rows, tiles)``: program (r, b) writes tile b of row r of the contiguous
    ``[rows, V]`` gradient, in the gradient's dtype (tiles as in ``logits.row_geometry``; the
    gradient shares the inputs' row alignment modulo ``VEC``, the launcher checks). In one-hot
    rows it also writes slot ``[r, b]`` of ``tile_sums`` and ``top_grad`` (``[rows, tiles]``
    accumulation-dtype buffers) and ``top_index`` (int32): the tile's sum of the unrounded
    gradient, and the top token's unrounded entry and column where the tile holds it (else 0
    and -1)."""
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
            scale = log2_scale(scale_f32, scale_f64, ACC)
            scale_lo = low_part(scale_f64, PRECISE)
            alpha_acc = acc_scalar(alpha, alpha_f64, ACC)
            # 1 / T from the host (rounded once): a division would cost a program more
            # instructions than a V-split tile has columns per thread.
            inv_temperature_acc = acc_scalar(inv_temperature, inv_temperature_f64, ACC)
            m_s = tl.load(stats_ptr + STAT_MAX_STUDENT * rows + row)
            log_l_s = tl.load(stats_ptr + STAT_LOG_SUM_STUDENT * rows + row)
            m_z = tl.load(stats_ptr + STAT_MAX_TEACHER * rows + row)
            log_l_z = tl.load(stats_ptr + STAT_LOG_SUM_TEACHER * rows + row)
            factor = tl.load(grad_rows_ptr + row * stride_grad_rows).to(ACC) * inv_temperature_acc
            if REVERSE or PRECISE:
                shift = tl.load(stats_ptr + STAT_CROSS * rows + row)
            else:
                shift = 0.0
            if REVERSE:
                factor = factor * tl.full([], LN2, ACC)
            full = (tile >= full_lo) & (tile < full_hi)
            if one_hot_row(log_l_s):
                # One repeat at a time, as partial tiles go: the extra sums keep a whole tile's
                # gradient alive otherwise, and its registers would be the whole kernel's (the
                # plain path's occupancy with them). Full tiles load without masks (16 bytes a
                # load also in rows off the 16-byte grid).
                if full:
                    total, top_column, top_entry = partial_grad_tile(
                        grad_row, student_row, original_row, strengthened_row, tile_lead, vocab,
                        alpha_acc, scale, scale_lo, m_s, log_l_s, m_z, log_l_z, shift, factor,
                        HAS_STRENGTHENED, REVERSE, True, TILE_R, THREADS, TILE_K, ACC,
                        ALPHA_ZERO, False, PRECISE)
                else:
                    total, top_column, top_entry = partial_grad_tile(
                        grad_row, student_row, original_row, strengthened_row, tile_lead, vocab,
                        alpha_acc, scale, scale_lo, m_s, log_l_s, m_z, log_l_z, shift, factor,
                        HAS_STRENGTHENED, REVERSE, True, TILE_R, THREADS, TILE_K, ACC,
                        ALPHA_ZERO, True, PRECISE)
                slot = row * tl.num_programs(1) + tile
                tl.store(tile_sums_ptr + slot, total)
                tl.store(top_index_ptr + slot, top_column)
                tl.store(top_grad_ptr + slot, top_entry)
            elif full:
                grad_tile(grad_row, student_row, original_row, strengthened_row, offsets,
                          tile_lead, vocab, alpha_acc, scale, scale_lo, m_s, log_l_s, m_z,
                          log_l_z, shift, factor, HAS_STRENGTHENED, REVERSE, False, False,
                          THREADS, TILE_K, ACC, ALPHA_ZERO, PRECISE)
            else:
                partial_grad_tile(grad_row, student_row, original_row, strengthened_row,
                                  tile_lead, vocab, alpha_acc, scale, scale_lo, m_s, log_l_s, m_z,
                                  log_l_z, shift, factor, HAS_STRENGTHENED, REVERSE, False,
                                  TILE_R, THREADS, TILE_K, ACC, ALPHA_ZERO, True, PRECISE)
        else:
            zeros = tl.zeros([BLOCK], grad_ptr.dtype.element_ty)
            tl.store(grad_row + offsets, zeros,
                     mask=(offsets >= tile_lead) & (offsets < vocab + tile_lead))


@triton.jit
def rkl_grad_top_kernel(
    grad_ptr, keep_ptr, stats_ptr, tile_sums_ptr, top_index_ptr, top_grad_ptr, rows, vocab,
    tiles, HAS_KEEP: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
    SUMS_BLOCK: tl.constexpr,
):
    """Grid ``(rows,)``: in each kept one-hot row (the same test on the same statistic as
    ``rkl_grad_kernel``), overwrite the top token's gradient with its unrounded entry minus
    the row's sum (the sum of ``tile_sums[r, :n_tiles]``), i.e. minus the sum of the others.
    The column is the largest of ``top_index[r, :n_tiles]`` (-1 in every tile without the top
    token; a row without one, which the statistics should not allow, is left as it is). Other
    rows read nothing but their statistic."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_KEEP:
        kept = tl.load(keep_ptr + row) != 0
    else:
        kept = True
    log_l_s = tl.load(stats_ptr + STAT_LOG_SUM_STUDENT * rows + row)
    if kept & one_hot_row(log_l_s):
        _, _, _, _, n_tiles = row_geometry(row, vocab, vocab, VEC, BLOCK)
        total = tl.zeros([], tile_sums_ptr.dtype.element_ty)
        entry = tl.zeros([], top_grad_ptr.dtype.element_ty)
        column = tl.full([], -1, tl.int32)
        for start in range(0, n_tiles, SUMS_BLOCK):
            k = start + tl.arange(0, SUMS_BLOCK)
            inside = k < n_tiles
            total += tl.sum(tl.load(tile_sums_ptr + row * tiles + k, mask=inside, other=0.0),
                            axis=0)
            entry += tl.sum(tl.load(top_grad_ptr + row * tiles + k, mask=inside, other=0.0),
                            axis=0)
            column = tl.maximum(column, tl.max(tl.load(top_index_ptr + row * tiles + k,
                                                       mask=inside, other=-1), axis=0))
        if (column >= 0) & (column < vocab):
            tl.store(grad_ptr + row * vocab + column, (entry - total).to(grad_ptr.dtype.element_ty))
