"""Forward phase: per-row statistics of the KL divergence in one streaming pass over V.

Name the distribution that weights the sum ``w`` and the other one ``u``: ``w = s~, u = z~``
for reverse KL(p || q), ``w = z~, u = s~`` for forward KL(q || p) (s~ = s/T, z~ = z/T).
A pass keeps, per row, the running maxima ``m_w, m_u``, the sums ``l_w = sum exp(w - m_w)``,
``l_u = sum exp(u - m_u)`` and the cross term

    a = sum_v exp(w_v - m_w) * ((w_v - m_w) - (u_v - m_u)),

so that KL = a / l_w - log l_w + log l_u. This is DESIGN.md's ``E[d] - lse_w + lse_u`` with the
maxima taken out of every term before summing: logits of size 1e4 then lose no digits to the
cancellation between ``E[d]`` and the log-sum-exps. When a maximum grows, the partial sums are
rebased onto it (see ``rebase``); the same rebasing merges partial sums of V-splits.

Entries with ``w = -inf`` (zero weight) contribute exactly 0 (never 0 * inf); NaN anywhere in a
row reaches ``l_w`` or ``l_u`` and so the loss.
"""
import triton
import triton.language as tl

from .logits import load_tempered_logits

# Row-statistics layout, shared with the gradient kernel: a [STAT_COUNT, rows] tensor with
# these planes, all in the accumulation dtype (0 at masked rows). Kernels may only read globals
# that are tl.constexpr.
STAT_MAX_STUDENT = tl.constexpr(0)
STAT_LOG_SUM_STUDENT = tl.constexpr(1)
STAT_MAX_TEACHER = tl.constexpr(2)
STAT_LOG_SUM_TEACHER = tl.constexpr(3)
STAT_LOSS = tl.constexpr(4)
STAT_COUNT = 5
# Partial sums of one V-split: a [PARTIAL_COUNT, rows, splits] tensor, planes m_w, l_w, m_u, l_u, a.
PARTIAL_COUNT = 5


@triton.jit
def rebase(m_w, l_w, m_u, l_u, a, new_m_w, new_m_u):
    """Express sums taken relative to maxima ``(m_w, m_u)`` relative to ``(new_m_w, new_m_u)``,
    which are at least as large. Returns the rebased ``(l_w, l_u, a)``.

    Every term of ``a`` holds ``-(m_w) + (m_u)``, so moving to the new maxima subtracts
    ``l_w * (increase of m_w - increase of m_u)`` before the common ``exp(-increase of m_w)``
    scale. A sum with nothing in it (``l_w == 0``) needs no shift, even if a maximum was -inf.
    """
    # How much each maximum grew, 0 when both are -inf (nothing seen yet).
    grow_w = tl.where(new_m_w == m_w, 0.0, new_m_w - m_w)
    grow_u = tl.where(new_m_u == m_u, 0.0, new_m_u - m_u)
    scale_w = tl.exp(-grow_w)
    shift = tl.where(l_w == 0, 0.0, l_w * (grow_w - grow_u))
    return l_w * scale_w, l_u * tl.exp(-grow_u), (a - shift) * scale_w


@triton.jit
def store_row_stats(stats_ptr, loss_ptr, row, rows, kept, m_w, l_w, m_u, l_u, a,
                    REVERSE: tl.constexpr):
    """Finish a row: KL = a / l_w - log l_w + log l_u; write it and the statistics the gradient
    needs (student and teacher max and log-sum), or zeros for a masked row."""
    log_l_w = tl.log(l_w)
    log_l_u = tl.log(l_u)
    loss = a / l_w - log_l_w + log_l_u
    if REVERSE:
        m_s, log_l_s, m_z, log_l_z = m_w, log_l_w, m_u, log_l_u
    else:
        m_s, log_l_s, m_z, log_l_z = m_u, log_l_u, m_w, log_l_w
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    tl.store(stats_ptr + STAT_MAX_STUDENT * rows + row, tl.where(kept, m_s, 0.0))
    tl.store(stats_ptr + STAT_LOG_SUM_STUDENT * rows + row, tl.where(kept, log_l_s, 0.0))
    tl.store(stats_ptr + STAT_MAX_TEACHER * rows + row, tl.where(kept, m_z, 0.0))
    tl.store(stats_ptr + STAT_LOG_SUM_TEACHER * rows + row, tl.where(kept, log_l_z, 0.0))
    tl.store(stats_ptr + STAT_LOSS * rows + row, tl.where(kept, loss, 0.0))


@triton.jit
def rkl_stats_kernel(
    student_ptr, original_ptr, strengthened_ptr, keep_ptr,
    stats_ptr, loss_ptr, partial_ptr,
    rows, vocab, cols_per_split, partial_plane_stride,
    stride_student, stride_original, stride_strengthened,
    alpha, temperature,
    HAS_STRENGTHENED: tl.constexpr, HAS_KEEP: tl.constexpr, REVERSE: tl.constexpr,
    SCALE_BY_TEMPERATURE: tl.constexpr, FINALIZE: tl.constexpr,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """Grid ``(rows, splits)``: program (r, k) streams columns
    ``[k * cols_per_split, (k + 1) * cols_per_split)`` of row r, BLOCK_V at a time.

    With one split (``FINALIZE``) it writes the row's loss and statistics; otherwise it writes
    its partial sums for ``rkl_stats_combine_kernel``. A masked row runs no loop iteration and
    loads nothing.
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if HAS_KEEP:
        kept = tl.load(keep_ptr + row) != 0
    else:
        kept = True
    col_begin = split * cols_per_split
    col_end = tl.minimum(vocab, col_begin + cols_per_split)
    col_end = tl.where(kept, col_end, col_begin)

    student_row = student_ptr + row * stride_student
    original_row = original_ptr + row * stride_original
    strengthened_row = strengthened_ptr + row * stride_strengthened
    m_w = tl.full([], float("-inf"), ACC)
    m_u = tl.full([], float("-inf"), ACC)
    l_w = tl.zeros([], ACC)
    l_u = tl.zeros([], ACC)
    a = tl.zeros([], ACC)
    for start in range(col_begin, col_end, BLOCK_V):
        # start is a multiple of BLOCK_V (cols_per_split is), which lets loads vectorise.
        cols = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK_V), BLOCK_V), BLOCK_V)
        s, z = load_tempered_logits(student_row, original_row, strengthened_row, cols,
                                    cols < col_end, alpha, temperature, HAS_STRENGTHENED,
                                    SCALE_BY_TEMPERATURE, ACC)
        if REVERSE:
            w, u = s, z
        else:
            w, u = z, s
        new_m_w = tl.maximum(m_w, tl.max(w, axis=0))
        new_m_u = tl.maximum(m_u, tl.max(u, axis=0))
        l_w, l_u, a = rebase(m_w, l_w, m_u, l_u, a, new_m_w, new_m_u)
        m_w, m_u = new_m_w, new_m_u
        # Offsets from the maxima; -inf entries stay -inf even while a maximum is still -inf.
        w_rel = tl.where(w == float("-inf"), float("-inf"), w - m_w)
        u_rel = tl.where(u == float("-inf"), float("-inf"), u - m_u)
        e_w = tl.exp(w_rel)
        l_w += tl.sum(e_w, axis=0)
        l_u += tl.sum(tl.exp(u_rel), axis=0)
        a += tl.sum(tl.where(e_w == 0, 0.0, e_w * (w_rel - u_rel)), axis=0)

    if FINALIZE:
        store_row_stats(stats_ptr, loss_ptr, row, rows, kept, m_w, l_w, m_u, l_u, a, REVERSE)
    else:
        out = partial_ptr + row * tl.num_programs(1) + split
        tl.store(out, m_w)
        tl.store(out + partial_plane_stride, l_w)
        tl.store(out + 2 * partial_plane_stride, m_u)
        tl.store(out + 3 * partial_plane_stride, l_u)
        tl.store(out + 4 * partial_plane_stride, a)


@triton.jit
def rkl_stats_combine_kernel(
    partial_ptr, keep_ptr, stats_ptr, loss_ptr, rows, splits, partial_plane_stride,
    HAS_KEEP: tl.constexpr, REVERSE: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
):
    """Grid ``(rows,)``: merge a row's per-split partial sums (rebased onto the row maxima) and
    finish the row as ``rkl_stats_kernel`` does with a single split."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_KEEP:
        kept = tl.load(keep_ptr + row) != 0
    else:
        kept = True
    k = tl.arange(0, SPLITS_BLOCK)
    present = k < splits
    parts = partial_ptr + row * splits + k
    m_w = tl.load(parts, mask=present, other=float("-inf"))
    l_w = tl.load(parts + partial_plane_stride, mask=present, other=0.0)
    m_u = tl.load(parts + 2 * partial_plane_stride, mask=present, other=float("-inf"))
    l_u = tl.load(parts + 3 * partial_plane_stride, mask=present, other=0.0)
    a = tl.load(parts + 4 * partial_plane_stride, mask=present, other=0.0)
    row_m_w = tl.max(m_w, axis=0)
    row_m_u = tl.max(m_u, axis=0)
    l_w, l_u, a = rebase(m_w, l_w, m_u, l_u, a, row_m_w, row_m_u)
    store_row_stats(stats_ptr, loss_ptr, row, rows, kept, row_m_w, tl.sum(l_w, axis=0),
                    row_m_u, tl.sum(l_u, axis=0), tl.sum(a, axis=0), REVERSE)
