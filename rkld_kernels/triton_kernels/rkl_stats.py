"""Forward phase: per-row statistics of the KL divergence in one streaming pass over V.

Name the distribution that weights the sum ``w`` and the other one ``u``: ``w = s, u = z`` for
reverse KL(p || q), ``w = z, u = s`` for forward KL(q || p). The kernels work in log2 units:
``x' = x * log2(e) / T``, so that every exponential is one ``exp2`` and the temperature costs
no division. Each thread keeps its own running state over the columns it streams (see
``logits.py`` for the tiles): reference points ``m_w, m_u`` (running maxima of ``w', u'``),
the sums ``l_w = sum 2^(w' - m_w)``, ``l_u = sum 2^(u' - m_u)`` and the cross term

    a = sum_v 2^(w'_v - m_w) * ((w'_v - m_w) - (u'_v - m_u)),

so that KL = ln 2 * (a / l_w - log2 l_w + log2 l_u). This is docs/design.md#streaming-pass's
``E[d] - lse_w + lse_u`` with the maxima taken out of every term before summing: logits of size
1e4 then lose no digits to the cancellation between ``E[d]`` and the log-sum-exps. A thread
takes the maximum of its own columns of a tile (no cross-thread step), rebases its sums when
a maximum grows (see ``rebase``), and only the end of the pass reduces across threads, with the
same rebasing; V-split partial sums merge the same way.

The product ``x * log2(e) / T`` is never rounded on its own: ``w' - m_w`` is one fused
multiply-add of the logit, the scale and the (rounded) reference point, so a logit of 1e4 keeps
its digits. Entries with ``w = -inf`` (zero weight) contribute exactly 0 (never 0 * inf); a
thread that has seen only ``-inf`` uses 0 as its reference (a guard on its scalar maximum, not
on every element); NaN anywhere in a row reaches ``l_w`` or ``l_u`` and so the loss.

float32 logits computed in float32 (``PRECISE``, chosen by the launcher) take a variant whose
gradient is within 2x the error of the naive float32 formula (PyTorch's log-softmaxes in
float32, against float64 of the same inputs; tests/test_precision.py). Above, each exponent
is rounded to float32 in log2 units before its ``exp2`` (half an ulp of ``|w' - m_w|``, 2e-7
relative at logits 10 apart), where the naive formula's ``exp(s - max)`` often gets an exact
argument; every gradient entry inherits the sums' error, and the float32 gradient came out 2-3x
the naive formula's error at T = 1. So the ``PRECISE`` code

- keeps logits as references (``m_w, m_u`` are maxima of ``w, u``): ``w - m_w`` is exact near
  the maximum, where the terms that matter are;
- forms ``(w - m_w) * log2(e) / T`` as ``hi + lo`` (``split_product``: the product's rounding
  error from a fused multiply-add, and the part of ``log2(e) / T`` below float32's resolution,
  from the float64 host scalar) and takes ``2^hi * (1 + ln 2 * lo)`` (``exp2_compensated``),
  in the sums and in every rebasing;
- adds the threads' sums in float64 and computes the row's statistics in float64 (once per
  program, after the loop), rounding each once;
- sums ``b``, the gradient's shift, from differences of logits taken before any scaling:
  reverse ``E_p[s - z]`` (relative to the offset ``m_w - m_u``, see ``offset_difference``),
  forward ``E_q[expm1(d)]`` with ``d = (s - z) / T`` (the log-sum-exp
  difference ``c = log1p(E_q[expm1(d)])`` without the cancellation of two log-sum-exps), the
  plane ``STAT_CROSS`` then holding ``E_p[s - z] * log2(e) / T`` or ``c * log2(e)``.

It costs about 2.6x the plain float32 code's instructions in the stats pass and 2x in the
gradient (no spills, still memory-bound; see bench/kernel_report.py). 16-bit logits keep the
plain code, machine code unchanged; the fused-linear loss's chunk logits are float32 for every
head dtype, so they take ``PRECISE`` when computed in float32.
"""
import triton
import triton.language as tl

from .logits import (
    _max_keep_nan,
    as_thread_tile,
    load_tile,
    nan_max,
    row_geometry,
    teacher_logits,
    tile_offsets,
    to_acc,
)

# Row-statistics layout, shared with the gradient kernel: a [STAT_COUNT, rows] tensor with
# these planes, all in the accumulation dtype and in log2 units (0 at masked rows). Kernels
# may only read globals that are tl.constexpr.
STAT_MAX_STUDENT = tl.constexpr(0)       # m_s: reference point of s * log2(e) / T
STAT_LOG_SUM_STUDENT = tl.constexpr(1)   # log2 of sum 2^(s' - m_s)
STAT_MAX_TEACHER = tl.constexpr(2)
STAT_LOG_SUM_TEACHER = tl.constexpr(3)
STAT_CROSS = tl.constexpr(4)             # a / l_w: E_w[(w' - m_w) - (u' - m_u)]
STAT_COUNT = 5
# Partial sums of one V-split: a [PARTIAL_COUNT, rows, splits] tensor, planes m_w, l_w, m_u, l_u,
# a and (written only by the PRECISE code) b.
PARTIAL_COUNT = 6

LOG2E = tl.constexpr(1.4426950408889634)
# PRECISE forward: a student weight (relative to its thread's reference) above this where the
# teacher's is 0 sends the row's shift to the log-sum-exps (see accumulate_tile); lighter ones
# change the shift by less than float32 can show.
ORPHAN_WEIGHT = tl.constexpr(2.0 ** -100)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def rebase(m_w, l_w, m_u, l_u, a, new_m_w, new_m_u):
    """Express sums taken relative to reference points ``(m_w, m_u)`` relative to
    ``(new_m_w, new_m_u)``, which are at least as large. Returns the rebased ``(l_w, l_u, a)``.

    Every term of ``a`` holds ``-(m_w) + (m_u)``, so moving to the new references subtracts
    ``l_w * (increase of m_w - increase of m_u)`` before the common ``2^-(increase of m_w)``
    scale. A reference still at -inf has only zero terms (or, for ``u``, terms that made ``a``
    infinite), so it moves for free. A growth too large for ``2^-grow`` (the lowest finite
    start below logits near the float32 maximum, where the growth itself overflows) leaves
    nothing of the old sums: ``a`` becomes 0, not ``0 * inf``.
    """
    grow_w = tl.where(m_w == float("-inf"), 0.0, new_m_w - m_w)
    grow_u = tl.where(m_u == float("-inf"), 0.0, new_m_u - m_u)
    scale_w = tl.exp2(-grow_w)
    a = tl.where(scale_w == 0, 0.0, (a - l_w * (grow_w - grow_u)) * scale_w)
    return l_w * scale_w, l_u * tl.exp2(-grow_u), a


@triton.jit
def rebase_finite(m_w, l_w, m_u, l_u, a, new_m_w, new_m_u):
    """``rebase`` for finite reference points (a thread's running state starts at the lowest
    finite value, not at -inf): no -inf guard is needed. An increase from that start overflows
    to inf for logits above about 1e31 (in log2 units) and multiplies empty sums, so ``a``
    takes 0 where the old sums vanish (``2^-grow = 0``) instead of ``0 * inf = NaN``; once per
    tile and thread, not per element."""
    grow_w = new_m_w - m_w
    grow_u = new_m_u - m_u
    scale_w = tl.exp2(-grow_w)
    a = tl.where(scale_w == 0, 0.0, (a - l_w * (grow_w - grow_u)) * scale_w)
    return l_w * scale_w, l_u * tl.exp2(-grow_u), a


@triton.jit
def split_product(x, scale, scale_lo):
    """``x * (scale + scale_lo)`` as ``(hi, lo)``: ``hi`` the rounded product ``x * scale`` and
    ``lo`` its rounding error (an exact fused multiply-add) plus ``x * scale_lo``, the part of
    ``log2(e) / T`` below float32's resolution. ``hi + lo`` is the product to a few float32
    ulps of ``lo``, where ``hi`` alone is off by up to half an ulp of itself."""
    hi = x * scale
    lo = tl.fma(x, scale_lo, tl.fma(x, scale, -hi))
    return hi, lo


@triton.jit
def exp2_compensated(hi, lo):
    """``2^(hi + lo)`` for a small correction ``lo``: ``2^hi * (1 + ln 2 * lo)``. Where ``lo``
    is not small (infinite or NaN operands: an exponent of -inf, +inf or NaN) it is plain
    ``2^hi``."""
    e = tl.exp2(hi)
    return tl.where(tl.abs(lo) < 1.0, tl.fma(e, lo * LN2, e), e)


@triton.jit
def expm1_log2(y):
    """``2^y - 1`` (that is ``expm1(y ln 2)``) to a few float32 ulps of itself: its Taylor
    series, where ``|y ln 2| < 1/2`` (where ``2^y - 1`` would cancel), else ``2^y - 1``."""
    x = y * LN2
    small = tl.abs(x) < 0.5
    t = tl.where(small, x, 0.0)
    series = 1.0 / 40320.0
    series = tl.fma(series, t, 1.0 / 5040.0)
    series = tl.fma(series, t, 1.0 / 720.0)
    series = tl.fma(series, t, 1.0 / 120.0)
    series = tl.fma(series, t, 1.0 / 24.0)
    series = tl.fma(series, t, 1.0 / 6.0)
    series = tl.fma(series, t, 0.5)
    series = tl.fma(series, t, 1.0)
    return tl.where(small, series * t, tl.exp2(y) - 1.0)


@triton.jit
def log1p(r):
    """``ln(1 + r)`` to a few ulps of itself: ``2 atanh(r / (2 + r))`` by its series where
    ``|r| < 1/4``, else ``ln(1 + r)``."""
    small = tl.abs(r) < 0.25
    t = tl.where(small, r, 0.0) / (2.0 + tl.where(small, r, 0.0))
    t2 = t * t
    series = tl.fma(tl.fma(tl.fma(tl.fma(1.0 / 11.0, t2, 1.0 / 9.0), t2, 1.0 / 7.0), t2,
                           1.0 / 5.0), t2, 1.0 / 3.0)
    series = tl.fma(series, t2, 1.0)
    return tl.where(small, 2.0 * t * series, tl.log(1.0 + r))


@triton.jit
def offset_difference(x, y, offset):
    """``(x - y) - offset`` without the rounding of ``x - y`` (its error from a two-sum): exact
    where ``x - y`` is close to ``offset`` (logits 1e4 apart whose maxima are too) and where it
    is exact itself (a student close to its teacher). Infinite operands give ``+-inf`` (the
    error term is dropped where it is NaN)."""
    hi = x - y
    t = hi - x
    lo = (x - (hi - t)) - (y + t)
    return (hi - offset) + tl.where(lo == lo, lo, 0.0)


@triton.jit
def rebase_precise(m_w, l_w, m_u, l_u, a, b, new_m_w, new_m_u, scale, scale_lo,
                   REVERSE: tl.constexpr):
    """``rebase`` for the float32 code's references, which are logits (not log2 units): the
    growth is ``(new - old) * log2(e) / T``, taken as ``hi + lo`` (``split_product``) so that
    ``2^-growth`` is exact to an ulp or two, not to ``growth``'s rounding (which a sum carries
    over to every gradient entry of its row). ``b`` (see ``accumulate_tile``) scales as
    ``l_w`` does (a NaN ``b`` stays NaN), after moving (reverse) from the old offset
    ``m_w - m_u`` to the new one. References at -inf move for free; references that started at
    the lowest finite value give a growth of inf and ``2^-inf = 0``."""
    grow_w, err_w = split_product(tl.where(m_w == float("-inf"), 0.0, new_m_w - m_w), scale,
                                  scale_lo)
    grow_u, err_u = split_product(tl.where(m_u == float("-inf"), 0.0, new_m_u - m_u), scale,
                                  scale_lo)
    scale_w = exp2_compensated(-grow_w, -err_w)
    a = tl.where(scale_w == 0, 0.0, (a - l_w * (grow_w - grow_u)) * scale_w)
    if REVERSE:
        moved = (new_m_w - new_m_u) - (m_w - m_u)
        b -= l_w * tl.where((m_w == float("-inf")) | (m_u == float("-inf")), 0.0, moved)
    b = tl.where((scale_w == 0) & (b == b), 0.0, b * scale_w)
    return l_w * scale_w, l_u * exp2_compensated(-grow_u, -err_u), a, b


@triton.jit
def merge_sums(m_w, l_w, m_u, l_u, a, b, top_w, top_u, scale, scale_lo,
               REVERSE: tl.constexpr, PRECISE: tl.constexpr):
    """The row's sums from per-thread (or per-split) ones: each rebased onto the maxima
    ``top_w`` / ``top_u``, then added up. The ``PRECISE`` code adds in float64 (a float32 tree
    is off by an ulp or so, which every gradient entry of the row inherits) and carries ``b``;
    the plain code returns ``b`` as it came."""
    if PRECISE:
        l_w, l_u, a, b = rebase_precise(m_w, l_w, m_u, l_u, a, b, top_w, top_u, scale, scale_lo,
                                        REVERSE)
        l_w = tl.sum(l_w.to(tl.float64), axis=0)
        l_u = tl.sum(l_u.to(tl.float64), axis=0)
        a = tl.sum(a.to(tl.float64), axis=0)
        b = tl.sum(b.to(tl.float64), axis=0)
    else:
        l_w, l_u, a = rebase(m_w, l_w, m_u, l_u, a, top_w, top_u)
        l_w = tl.sum(l_w, axis=0)
        l_u = tl.sum(l_u, axis=0)
        a = tl.sum(a, axis=0)
    return l_w, l_u, a, b


@triton.jit
def accumulate_tile(m_w, l_w, m_u, l_u, a, b, g_max, student_row, original_row,
                    strengthened_row, offsets, lead, vocab, alpha, scale, scale_lo,
                    HAS_STRENGTHENED: tl.constexpr, REVERSE: tl.constexpr,
                    MASKED: tl.constexpr, TILE_R: tl.constexpr, THREADS: tl.constexpr,
                    TILE_K: tl.constexpr, ACC: tl.constexpr, ALPHA_ZERO: tl.constexpr,
                    PRECISE: tl.constexpr):
    """Fold one tile into the per-thread state (``[THREADS]`` tensors); ``g_max`` is the
    NaN-keeping running maximum of the strengthened logits (see ``logits.teacher_logits``).

    ``PRECISE`` (float32 logits computed in float32; see the module docstring): the references
    ``m_w, m_u`` are logits, every exponential is compensated (``split_product``,
    ``exp2_compensated``), and ``b`` sums the gradient's cross term: reverse
    ``2^(w' - m_w) * (w - u)``, forward ``2^(w' - m_w) * expm1((u - w) / T)``. Otherwise ``b``
    is returned as it came."""
    student = as_thread_tile(load_tile(student_row, offsets, lead, vocab, MASKED),
                             TILE_R, THREADS, TILE_K)
    original = as_thread_tile(load_tile(original_row, offsets, lead, vocab, MASKED),
                              TILE_R, THREADS, TILE_K)
    s = to_acc(student, ACC)
    z = to_acc(original, ACC)
    if HAS_STRENGTHENED:
        strengthened = as_thread_tile(load_tile(strengthened_row, offsets, lead, vocab, MASKED),
                                      TILE_R, THREADS, TILE_K)
        g_max = _max_keep_nan(g_max, nan_max(strengthened).to(ACC))
        z = teacher_logits(z, to_acc(strengthened, ACC), alpha, ALPHA_ZERO)
        teacher = z
    else:
        teacher = original
    # Thread-local maxima (the tile's dims 0 and 2 live in one thread), in log2 units. Inputs
    # used as they are take their maximum in their own dtype: exact, and for 16-bit types two
    # (or three) columns per instruction.
    if PRECISE:
        max_s = tl.max(tl.max(s, axis=2), axis=0)
        max_z = tl.max(tl.max(teacher, axis=2), axis=0).to(ACC)
    else:
        max_s = tl.max(tl.max(s, axis=2), axis=0) * scale
        max_z = tl.max(tl.max(teacher, axis=2), axis=0).to(ACC) * scale
    if REVERSE:
        w, u, max_w, max_u = s, z, max_s, max_z
    else:
        w, u, max_w, max_u = z, s, max_z, max_s
    new_m_w = tl.maximum(m_w, max_w)
    new_m_u = tl.maximum(m_u, max_u)
    if PRECISE:
        l_w, l_u, a, b = rebase_precise(m_w, l_w, m_u, l_u, a, b, new_m_w, new_m_u, scale,
                                        scale_lo, REVERSE)
        # Logits minus their reference: exact near the maximum, where the terms that matter
        # are; then (w - m_w) * log2(e) / T as hi + lo.
        w_rel, w_err = split_product(w - new_m_w[None, :, None], scale, scale_lo)
        u_rel, u_err = split_product(u - new_m_u[None, :, None], scale, scale_lo)
        e_w = exp2_compensated(w_rel, w_err)
        e_u = exp2_compensated(u_rel, u_err)
    else:
        l_w, l_u, a = rebase_finite(m_w, l_w, m_u, l_u, a, new_m_w, new_m_u)
        # The references are finite, so -inf entries give exp2(-inf) = 0 with no guard.
        w_rel = w * scale - new_m_w[None, :, None]
        u_rel = u * scale - new_m_u[None, :, None]
        e_w = tl.exp2(w_rel)
    # Zero weight contributes 0 even where the difference is infinite or NaN.
    d = tl.where(e_w == 0, 0.0, w_rel - u_rel)
    l_w += tl.sum(tl.sum(e_w, axis=2), axis=0)
    if PRECISE:
        l_u += tl.sum(tl.sum(e_u, axis=2), axis=0)
    else:
        l_u += tl.sum(tl.sum(tl.exp2(u_rel), axis=2), axis=0)
    a += tl.sum(tl.sum(e_w * d, axis=2), axis=0)
    if PRECISE:
        if REVERSE:
            offset = (new_m_w - new_m_u)[None, :, None]
            cross = tl.where(e_w == 0, 0.0, e_w * offset_difference(w, u, offset))
        else:
            # E_q[expm1(d)] leaves out student mass where the teacher has none (q = 0, a -inf
            # or underflowed teacher logit): such a column (of a weight that matters) makes
            # b NaN, and the row takes its shift from the log-sum-exps (store_row_stats).
            cross = tl.where(e_w == 0, tl.where(e_u > ORPHAN_WEIGHT, float("nan"), 0.0),
                             e_w * expm1_log2((u - w) * scale))
        b += tl.sum(tl.sum(cross, axis=2), axis=0)
    return new_m_w, l_w, new_m_u, l_u, a, b, g_max


@triton.jit
def store_row_stats(stats_ptr, loss_ptr, row, rows, kept, m_w, l_w, m_u, l_u, a, b, scale,
                    REVERSE: tl.constexpr, ACC: tl.constexpr, PRECISE: tl.constexpr):
    """Finish a row: KL = ln 2 * (a / l_w - log2 l_w + log2 l_u); write it and the statistics
    the gradient needs (student and teacher reference and log2-sum, and ``a / l_w``, the
    reverse gradient's shift without a cancellation), or zeros for a masked row.

    ``PRECISE``: the sums come in float64 and the row's statistics are computed in it and
    rounded once; the references are logits, and the cross plane holds the gradient's shift in
    log2 units from ``b``: reverse ``E_p[s - z] * log2(e) / T``; forward
    ``c = log2 E_q[2^((s - z) log2(e) / T)]``, the difference of the two log-sum-exps, as
    ``log1p(E_q[expm1(d)])`` (accurate where the student is close to its teacher), or from
    the log-sum-exps where it is 10 nats or more (nothing cancels there) or the sum is not
    finite."""
    log_l_w = tl.log2(l_w)
    log_l_u = tl.log2(l_u)
    cross = a / l_w
    loss = (cross - log_l_w + log_l_u) * tl.full([], LN2, ACC)
    if PRECISE:
        if REVERSE:
            # E_p[s - z] relative to the offset m_w - m_u (offset_difference).
            cross = b / l_w * scale
        else:
            ratio = b / l_w
            gap = (m_u - m_w) * scale + (log_l_u - log_l_w)
            near = (gap < 10.0 * LOG2E) & (tl.abs(ratio) < 1e30)
            cross = tl.where(near, log1p(tl.where(near, ratio, 0.0)) * LOG2E, gap)
    if REVERSE:
        m_s, log_l_s, m_z, log_l_z = m_w, log_l_w, m_u, log_l_u
    else:
        m_s, log_l_s, m_z, log_l_z = m_u, log_l_u, m_w, log_l_w
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    tl.store(stats_ptr + STAT_MAX_STUDENT * rows + row, tl.where(kept, m_s, 0.0))
    tl.store(stats_ptr + STAT_LOG_SUM_STUDENT * rows + row, tl.where(kept, log_l_s, 0.0))
    tl.store(stats_ptr + STAT_MAX_TEACHER * rows + row, tl.where(kept, m_z, 0.0))
    tl.store(stats_ptr + STAT_LOG_SUM_TEACHER * rows + row, tl.where(kept, log_l_z, 0.0))
    tl.store(stats_ptr + STAT_CROSS * rows + row, tl.where(kept, cross, 0.0))


@triton.jit
def log2_scale(scale_f32, scale_f64, ACC: tl.constexpr):
    """``log2(e) / T`` in the accumulation dtype, never divided per element: the host's value,
    rounded to float32 or to float64."""
    return acc_scalar(scale_f32, scale_f64, ACC)


@triton.jit
def low_part(value_f64, PRECISE: tl.constexpr):
    """The float64 host scalar minus its float32 rounding (the float32 code's value of it), as
    a float32, or 0 unless ``PRECISE``: the two together carry it to about 48 bits."""
    if PRECISE:
        value = tl.full([], value_f64, tl.float64)
        return (value - value.to(tl.float32).to(tl.float64)).to(tl.float32)
    else:
        return 0.0


@triton.jit
def acc_scalar(value_f32, value_f64, ACC: tl.constexpr):
    """A host scalar (``alpha``, ``T``) in the accumulation dtype: its float32 rounding, or, for
    the float64 path, its float64 value (a float32 T = 0.05 is off by 1.5e-9 relative, which
    moves float32 inputs' gradients by more than their rounding floor). ``tl.full`` keeps the
    interpreter, which hands kernels Python floats, from rounding it to a float32 literal."""
    if ACC == tl.float64:
        return tl.full([], value_f64, tl.float64)
    else:
        return value_f32


@triton.jit
def rkl_stats_kernel(
    student_ptr, original_ptr, strengthened_ptr, keep_ptr,
    stats_ptr, loss_ptr, partial_ptr,
    rows, vocab, tiles_per_split, partial_plane_stride,
    stride_student, stride_original, stride_strengthened,
    alpha, temperature, scale_f32, alpha_f64: tl.float64, scale_f64: tl.float64,
    HAS_STRENGTHENED: tl.constexpr, HAS_KEEP: tl.constexpr, REVERSE: tl.constexpr,
    FINALIZE: tl.constexpr, VEC: tl.constexpr, TILE_R: tl.constexpr, THREADS: tl.constexpr,
    TILE_K: tl.constexpr, FLOOR: tl.constexpr, ACC: tl.constexpr,
    ALPHA_ZERO: tl.constexpr = False, PRECISE: tl.constexpr = False,
):
    """Grid ``(rows, splits)``: program (r, k) streams tiles ``[k * tiles_per_split,
    (k + 1) * tiles_per_split)`` of row r (see ``logits.row_geometry``); full tiles load
    without masks, the partial first and last tiles of a row with them.

    With one split (``FINALIZE``) it writes the row's loss and statistics; otherwise it writes
    its partial sums for ``rkl_stats_combine_kernel``. A masked row runs no tile and loads
    nothing. ``THREADS`` must be ``32 * num_warps``; all tensors must share the row alignment
    modulo ``VEC`` (the launcher checks). ``PRECISE``: the float32 code for float32 logits
    (see the module docstring).
    """
    BLOCK: tl.constexpr = TILE_R * THREADS * TILE_K
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if HAS_KEEP:
        kept = tl.load(keep_ptr + row) != 0
    else:
        kept = True
    student_offset, lead, full_lo, full_hi, n_tiles = row_geometry(row, vocab, stride_student,
                                                                   VEC, BLOCK)
    student_row = student_ptr + student_offset
    original_row = original_ptr + tl.multiple_of(row * stride_original - lead, VEC)
    strengthened_row = strengthened_ptr + tl.multiple_of(row * stride_strengthened - lead, VEC)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(n_tiles, tile_begin + tiles_per_split)
    tile_end = tl.where(kept, tile_end, tile_begin)
    offsets = tile_offsets(TILE_R, THREADS, TILE_K)
    scale = log2_scale(scale_f32, scale_f64, ACC)
    scale_lo = low_part(scale_f64, PRECISE)
    alpha_acc = acc_scalar(alpha, alpha_f64, ACC)

    # Running references start at the lowest finite value (see rebase_finite).
    m_w = tl.full([THREADS], FLOOR, ACC)
    m_u = tl.full([THREADS], FLOOR, ACC)
    l_w = tl.zeros([THREADS], ACC)
    l_u = tl.zeros([THREADS], ACC)
    a = tl.zeros([THREADS], ACC)
    b = tl.zeros([THREADS], ACC)
    g_max = tl.full([THREADS], float("-inf"), ACC)
    # Full tiles: no masks, aligned vector loads.
    for tile in range(tl.maximum(tile_begin, full_lo), tl.minimum(tile_end, full_hi)):
        step = tile * BLOCK
        m_w, l_w, m_u, l_u, a, b, g_max = accumulate_tile(
            m_w, l_w, m_u, l_u, a, b, g_max, student_row + step, original_row + step,
            strengthened_row + step, offsets, lead, vocab, alpha_acc, scale, scale_lo,
            HAS_STRENGTHENED, REVERSE, False, TILE_R, THREADS, TILE_K, ACC, ALPHA_ZERO, PRECISE)
    # The partial tiles, masked: the first (the row starts inside it) and the last (the row
    # ends inside it), each when this split holds it, and the last only if it is not the first.
    # Masked loads are scalar, so these go one repeat (THREADS * TILE_K columns) at a time,
    # which keeps their registers (and code) to a repeat's worth.
    has_head = (tile_begin == 0) & (full_lo > 0) & (tile_begin < tile_end)
    has_tail = (full_hi >= tile_begin) & (full_hi < tile_end) & ((full_hi > 0) | (full_lo == 0))
    sub_offsets = tile_offsets(1, THREADS, TILE_K)
    for i in range(0, (has_head.to(tl.int32) + has_tail.to(tl.int32)) * TILE_R):
        tile = tl.where((i < TILE_R) & has_head, 0, full_hi)
        step = tile * BLOCK + (i % TILE_R) * (THREADS * TILE_K)
        m_w, l_w, m_u, l_u, a, b, g_max = accumulate_tile(
            m_w, l_w, m_u, l_u, a, b, g_max, student_row + step, original_row + step,
            strengthened_row + step, sub_offsets, lead - step, vocab, alpha_acc, scale,
            scale_lo, HAS_STRENGTHENED, REVERSE, True, 1, THREADS, TILE_K, ACC, ALPHA_ZERO,
            PRECISE)

    # A NaN among the strengthened logits makes the row NaN, as it does in the reference; so
    # does +inf at alpha = 0 (the reference's 0 * inf).
    if HAS_STRENGTHENED:
        invalid = g_max != g_max
        if ALPHA_ZERO:
            invalid = invalid | (g_max == float("inf"))
        l_w = tl.where(invalid, float("nan"), l_w)
    # The one cross-thread step: rebase every thread's sums onto the program's maxima.
    top_w = tl.max(m_w, axis=0)
    top_u = tl.max(m_u, axis=0)
    # (once per program, after the loop)
    l_w, l_u, a, b = merge_sums(m_w, l_w, m_u, l_u, a, b, top_w, top_u, scale, scale_lo,
                                REVERSE, PRECISE)
    if FINALIZE:
        store_row_stats(stats_ptr, loss_ptr, row, rows, kept, top_w, l_w, top_u, l_u, a, b,
                        scale, REVERSE, ACC, PRECISE)
    else:
        out = partial_ptr + row * tl.num_programs(1) + split
        tl.store(out, top_w)
        tl.store(out + partial_plane_stride, l_w)
        tl.store(out + 2 * partial_plane_stride, top_u)
        tl.store(out + 3 * partial_plane_stride, l_u)
        tl.store(out + 4 * partial_plane_stride, a)
        if PRECISE:
            tl.store(out + 5 * partial_plane_stride, b)


@triton.jit
def rkl_stats_combine_kernel(
    partial_ptr, keep_ptr, stats_ptr, loss_ptr, rows, splits, partial_plane_stride,
    scale_f32, scale_f64: tl.float64,
    HAS_KEEP: tl.constexpr, REVERSE: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
    ACC: tl.constexpr, PRECISE: tl.constexpr = False,
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
    scale = log2_scale(scale_f32, scale_f64, ACC)
    if PRECISE:
        b = tl.load(parts + 5 * partial_plane_stride, mask=present, other=0.0)
    else:
        b = 0.0
    l_w, l_u, a, b = merge_sums(m_w, l_w, m_u, l_u, a, b, row_m_w, row_m_u, scale,
                                low_part(scale_f64, PRECISE), REVERSE, PRECISE)
    store_row_stats(stats_ptr, loss_ptr, row, rows, kept, row_m_w, l_w, row_m_u, l_u, a, b,
                    scale, REVERSE, ACC, PRECISE)
