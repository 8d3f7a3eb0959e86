"""Chunked PyTorch backend: the same math as the Triton kernels, for CPUs and as a fallback.

Rows are processed a chunk at a time in the compute dtype (:func:`compute_dtype`: float32 for
float16/bfloat16/float32 students, float64 for float64 ones, or float64 when the caller asks for
it with the losses' ``compute_dtype=torch.float64`` option), so no full-vocabulary work tensor
larger than ``chunk_rows x V`` exists besides the gradient itself.

This module is the one place of the per-row math (:func:`rkl_rows`): the single-device and the
vocabulary-parallel paths of both losses run it (the latter with ``group``: each rank holds a
slice of the vocabulary and a few per-row floats are all-reduced, see
``rkld_kernels.tensor_parallel``), and so does the double backward (``differentiable=True``:
the same formulas without in-place ops, so that autograd can differentiate them).
The loss and the gradient of each chunk (optionally pre-multiplied by a scale, so that the usual
backward needs no further pass) come out of one call, eager or through ``torch.compile``.

Math per row, with s~ = s/T, z~ = z/T, p = softmax(s~), q = softmax(z~), d = (s - z) / T:

    reverse:  L = sum_v p (log p - log q)      dL/ds_v = p_v (d_v - E_p[d]) / T
    forward:  L = sum_v q (log q - log p)      dL/ds_v = (p_v - q_v) / T = q_v expm1(d_v - c) / T

with c = lse_s - lse_z = log E_q[exp(d)] = log1p(E_q[expm1(d)]) (docs/design.md#closed-forms;
log p - log q = d - c). The gradient is taken from d, formed before the division by T: where the student
is close to its teacher (the start of unlearning) d is nearly exact, while log p and log q are
each off by an ulp of |log p| (~1e-6 at logits of size 10 in float32), far more than their
difference; q (forward) comes from the fused softmax (a few ulp), p (reverse) from exp(log p)
(an error of p's own size, which the naive formula shares). So in float32 the gradient's
error is well under that of the naive float32 formula (0.0x-0.8x on tests/test_precision.py's
cases). In forward, q expm1(x) is computed as exp(log q + x) - q where x >= 1 (nothing cancels
there, and exp(x) alone could overflow), and c from the log-sum-exps where c >= 10. Entries whose
weight is exactly 0 contribute 0.

A row's gradient entries sum to 0 (sum_v p_v = sum_v q_v = 1). Where the student is nearly
one-hot, the entry at its top token t is a difference of two numbers far larger than itself
(reverse: p_t (r_t - L) with L ~ r_t; forward: p_t - q_t with both ~ 1) and the compute dtype
cannot resolve it; every other entry is accurate. So in rows whose top probability exceeds 2/3
the top entry is taken as minus the sum of the others (see :func:`_top_from_the_others`); in
closed form, with d = s~ - z~ as above and any upstream scale applied,

    reverse:  dL/ds_t = p_t sum_{v != t} p_v (d_t - d_v) / T
    forward:  dL/ds_t = -sum_{v != t} (p_v - q_v) / T

(reverse: r_t - L = sum_{v != t} p_v (r_t - r_v), and r_t - r_v = d_t - d_v), sums of terms
that are each accurate. The strengthened teacher enters only through q (or d).
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

# Rows of float32 work per chunk are sized to this many elements: small enough to stay in the
# CPU's caches, large enough that the per-op Python overhead is amortised.
_CHUNK_ELEMENTS = 1 << 18


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the losses (and of kept gradients) for inputs of ``dtype``: float32 for
    every input dtype except float64, which is kept (gradcheck, ground truths)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The values the losses' ``compute_dtype`` option accepts (None: the default of the input dtype).
COMPUTE_DTYPES = (torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype, requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the per-element math for inputs of ``dtype``: ``requested`` (the losses'
    ``compute_dtype`` option) when given, else float32 for float16/bfloat16/float32 inputs and
    float64 for float64 ones.

    float32 arithmetic meets the precision contract for float32 inputs in its float32 form
    (loss within 1e-3, gradient error at most 2x that of the naive float32 formula); reaching
    the float32 rounding floor itself needs float64 (exp and log in float32 alone are off by
    ~1e-6 relative on logits of size 10, 16x that floor), which costs 2-3x and is therefore
    the explicit option ``compute_dtype=torch.float64``. The rule is the same on every backend
    (the Triton kernels' float32 code for float32 logits is their ``PRECISE`` variant)."""
    if requested is not None:
        return requested
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_compute_dtype(fn: str, requested, input_dtype: torch.dtype | None = None) -> None:
    """One-line error for a bad ``compute_dtype`` option of the losses."""
    if requested is not None and requested not in COMPUTE_DTYPES:
        raise ValueError(f"{fn}: compute_dtype must be None (float32 inside, float64 for "
                         f"float64 inputs), torch.float32 or torch.float64; got {requested!r}")
    if (requested is not None and input_dtype is not None and input_dtype.is_floating_point
            and torch.promote_types(requested, input_dtype) != requested):
        raise ValueError(f"{fn}: compute_dtype must be at least as precise as the inputs "
                         f"({input_dtype}); got {requested}")


# Compiled, the per-chunk math is a few fused loops that stream each row, so cache residency
# matters less than amortising the call overhead and giving both threads whole rows.
_COMPILED_CHUNK_ELEMENTS = 1 << 23


def host_reads_allowed(device: torch.device) -> bool:
    """Whether the torch backend may read device values on the host (``nonzero``, ``bool(t)``).

    On CPU that costs no synchronisation, and the shortcuts it enables (skipping masked rows,
    a fast path without the non-finite fix-ups) pay. Elsewhere the backend stays sync-free, so
    that a CUDA training step can be captured in a CUDA graph. (Tests switch this off to check
    the sync-free path on CPU.)
    """
    return device.type == "cpu"


def default_chunk_rows(vocab_size: int, compiled: bool = False) -> int:
    elements = _COMPILED_CHUNK_ELEMENTS if compiled else _CHUNK_ELEMENTS
    return max(1, elements // max(1, vocab_size))


def teacher_logits(original: torch.Tensor, strengthened: torch.Tensor | None, alpha: float,
                   dtype: torch.dtype, exact_non_finite: bool = True) -> torch.Tensor:
    """``o - alpha * relu(g - o)`` in ``dtype``; same semantics as
    :func:`rkld_kernels.reference.unlearning_teacher_logits`. May return ``original`` itself
    (never modify the result in place).

    With ``exact_non_finite=False`` the boolean fix-up that keeps ``-inf`` entries of ``o`` at
    ``-inf`` is skipped; where it would have mattered the result holds NaN instead, which the
    caller detects (see :func:`rkl_rows`).
    """
    o = original.to(dtype)
    if strengthened is None:
        return o
    boost = torch.sub(strengthened.to(dtype), o).clamp_min_(0.0)   # relu that keeps NaN
    teacher = torch.add(o, boost, alpha=-alpha)
    if exact_non_finite:
        # relu(g - o) is +inf or NaN where o == -inf; the teacher entry must stay -inf there.
        teacher.masked_fill_(torch.isneginf(o), float("-inf"))
    return teacher


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[r, v] * b[r, v] as a [rows, 1] column (measured faster on CPU than bmm/vecdot)."""
    return (a * b).sum(dim=-1, keepdim=True)


def rkl_rows(student: torch.Tensor, original: torch.Tensor, strengthened: torch.Tensor | None,
             alpha: float, temperature: float, reverse: bool, need_grad: bool,
             grad_out: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None, *,
             compiled: bool = False, compute: torch.dtype | None = None, group=None,
             differentiable: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss per row and, if asked, dL_row/d student ([rows, V]).

    The math runs in ``compute`` (default :func:`compute_dtype` of the student's dtype; the
    fused-linear loss passes the dtype of its logits). The loss is in that dtype, and never
    negative: KL >= 0, so a row whose rounded sum falls below 0 (a KL of 1e-10 at temperature
    0.05 can) is returned as 0, which is also nearer the exact value. The gradient is written
    into ``grad_out`` when given (any float dtype, rounded once), else returned in the compute
    dtype, multiplied by ``grad_scale`` (a 0-d tensor, so that a compiled version does not
    specialise on its value) when given. Inputs are 2-D ``[rows, V]`` of any float dtype and
    strides; they are never modified.

    ``group``: the rows are this rank's slice of the vocabulary (vocabulary parallelism); the
    per-row log-sum-exps, the loss and the one-hot fix-up's row sums are all-reduced over the
    process group, every rank calls this with the same rows (see :func:`_vocab_parallel`).
    ``differentiable``: the same formulas with out-of-place ops and no host reads, for a
    backward with ``create_graph=True`` (no ``grad_out``).

    Non-finite logits (-inf vocabulary masking, NaN) need boolean fix-ups that are slow on CPU.
    On CPU the chunk is first computed without them: every place where they matter turns the
    row's loss into NaN or inf, so a finite loss proves the fast result exact; otherwise the
    chunk is recomputed with the fix-ups (the loss is the all-reduced one under ``group``, so
    every rank decides alike). On CUDA (no host syncs; see :func:`host_reads_allowed`) the
    exact path always runs.

    ``compiled=True`` runs both paths through ``torch.compile`` (see :func:`run_rkl_rows`).
    """
    compiled = compiled and group is None and not differentiable
    impl = _compiled_rkl_rows() if compiled else _rkl_rows
    compute = compute or compute_dtype(student.dtype)
    args = (student, original, strengthened, alpha, temperature, reverse, need_grad, grad_out,
            grad_scale)
    if not host_reads_allowed(student.device) or differentiable:
        return impl(*args, True, compute, group, differentiable)
    # Compiled, the graph cannot ask the host whether a row needs the one-hot fix-up, so it
    # would always pay its extra reduction and pass over the gradient; instead it returns the
    # rows' top probabilities and the fix-up runs afterwards on the rows that need it (when the
    # gradient is kept in the compute dtype, whose entries the fix-up sums).
    defer = compiled and need_grad and (grad_out is None or grad_out.dtype == compute)
    out = impl(*args, False, compute, group, False, defer)
    if not bool(torch.isfinite(out[0]).all()):
        out = impl(*args, True, compute, group, False, defer)
    if defer:
        _fix_top_rows(out[1], student, out[2])
    return out[0], out[1]


def _fix_top_rows(grad: torch.Tensor, student: torch.Tensor, p_top: torch.Tensor) -> None:
    """:func:`_top_from_the_others` after the fact, in place, on the rows of ``grad`` (compute
    dtype, scale applied) whose top probability ``p_top`` ([rows, 1]) exceeds 2/3 (a host
    read: CPU only). There the maximum is unique, so the top token is the student logits'
    argmax (a NaN row has a NaN ``p_top`` and is left as it is)."""
    rows = (p_top.squeeze(-1) > ONE_HOT_TOP_PROBABILITY).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    total = grad.index_select(0, rows).sum(dim=-1)
    top = student.index_select(0, rows).argmax(dim=-1)
    grad.index_put_((rows, top), -total, accumulate=True)


# A row whose top probability exceeds this gets its top gradient entry from the others (see
# the module docstring). Any value in (1/2, 1) is accurate (the others sum to less than the top
# entry's terms); the triton kernels decide it from the row's student sum with a margin, so
# both use 2/3.
ONE_HOT_TOP_PROBABILITY = 2.0 / 3.0


class _Ops:
    """The in-place ops of :func:`_rkl_rows` (on its own temporaries), or their out-of-place
    forms when autograd must differentiate the result (``differentiable``)."""

    def __init__(self, differentiable: bool):
        self.differentiable = differentiable

    def sub(self, a, b):
        return a - b if self.differentiable else a.sub_(b)

    def add(self, a, b):
        return a + b if self.differentiable else a.add_(b)

    def mul(self, a, b):
        return a * b if self.differentiable else a.mul_(b)

    def div(self, a, b):
        return a / b if self.differentiable else a.div_(b)

    def fill(self, a, mask, value):
        return a.masked_fill(mask, value) if self.differentiable else a.masked_fill_(mask, value)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``t`` over the ranks of ``group`` (in place; returns ``t``)."""
    import torch.distributed as dist
    dist.all_reduce(t, group=group)
    return t


def _vocab_parallel(s: torch.Tensor, z: torch.Tensor, group):
    """Per-row shifts ``lse_k - lse`` ([rows, 1] each) from this rank's log-sum-exps ``lse_k``
    of the (tempered) student and teacher logits to the full vocabulary's ``lse``, from one
    all-reduce of ``world x rows x 2`` floats. ``log_softmax`` of the shard plus the shift is
    the full vocabulary's log-probability; on one rank the shift is exactly 0. Also returns
    ``lse_s - lse_z`` of the full rows ([rows, 1])."""
    import torch.distributed as dist
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = torch.stack([torch.logsumexp(s, dim=-1), torch.logsumexp(z, dim=-1)])   # [2, rows]
    every = local.new_zeros((world, *local.shape))
    every[rank] = local
    full = torch.logsumexp(_all_reduce(every, group), dim=0)
    shift = (local - full).unsqueeze(-1)
    return shift[0], shift[1], (full[0] - full[1]).unsqueeze(-1)


def _to_full(log_k: torch.Tensor, shift: torch.Tensor, ops: _Ops) -> torch.Tensor:
    """The full vocabulary's log-probabilities from a shard's ``log_softmax``: a shard whose
    logits are all -inf holds no mass (shift -inf) and its NaN entries become -inf."""
    return ops.fill(ops.add(log_k, shift), torch.isneginf(shift), float("-inf"))


def _top_from_the_others(grad: torch.Tensor, p_top: torch.Tensor, at_top: torch.Tensor,
                         group, ops: _Ops) -> torch.Tensor:
    """In rows where the student's top probability ``p_top`` (``[rows, 1]``; ``at_top`` is the
    bool mask of its column) exceeds 2/3, replace the gradient at the top token by minus the
    sum of the row's other entries (``grad`` in the compute dtype, any upstream scale applied):
    ``top - sum(row)`` is that sum up to one rounding of its size. Above 1/2 the maximum is
    unique, so the mask has one column (and under ``group`` one rank holds it; the row sums are
    all-reduced). A NaN row is left as it is. (A mask rather than ``max``'s indices: reductions
    with indices are slow on CPU.)"""
    total = grad.sum(dim=-1, keepdim=True)
    if group is not None:
        total = _all_reduce(total, group)
    total = ops.fill(total, ~(p_top > ONE_HOT_TOP_PROBABILITY), 0.0)
    return ops.sub(grad, at_top * total)


def _q_expm1(q: torch.Tensor, log_q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``q (exp(x) - 1)`` without cancellation or overflow: ``q expm1(x)`` where x < 1 (where
    exp(x) is near 1 and the difference cancels), ``exp(log q + x) - q`` elsewhere (where it
    does not, and where exp(x) alone could overflow while q exp(x) is a probability)."""
    small = x < 1.0
    return torch.where(small, q * torch.expm1(x.clamp(max=1.0)),
                       torch.exp(torch.where(small, 0.0, log_q + x)) - q)


# 1/k! for k = 2..13: expm1(e) - e = e^2 (1/2 + e/6 + ...); for |e| <= 1/4 the first term
# left out is below 1e-17 of the sum (float64 rounding).
_EXPM1_MINUS_X = tuple(1.0 / math.factorial(k) for k in range(2, 14))


def _q_expm1_minus(q: torch.Tensor, e: torch.Tensor, q_expm1_e: torch.Tensor) -> torch.Tensor:
    """``q (expm1(e) - e)`` >= 0 without cancellation: its Taylor series where |e| <= 1/4
    (where expm1(e) and e nearly cancel), ``q expm1(e) - q e`` elsewhere (at most 3 bits lost
    there; ``q_expm1_e`` from :func:`_q_expm1`, finite where exp(e) alone would overflow);
    +inf where e = -inf."""
    small = e.abs() <= 0.25
    x = torch.where(small, e, 0.0)
    series = torch.full_like(x, _EXPM1_MINUS_X[-1])
    for coefficient in reversed(_EXPM1_MINUS_X[:-1]):
        series = series * x + coefficient
    return torch.where(small, q * (x * x) * series, q_expm1_e - q * e)


def _full_probabilities(x: torch.Tensor, shift: torch.Tensor | None, ops: _Ops) -> torch.Tensor:
    """softmax(x) over the row (fused: a few ulp of relative error), or under vocabulary
    parallelism the slice's softmax times its share ``exp(shift)`` of the row's mass (0 for a
    slice of -inf logits)."""
    prob = torch.softmax(x, dim=-1)
    if shift is None:
        return prob
    return ops.fill(ops.mul(prob, shift.exp()), torch.isneginf(shift), 0.0)


def _row_max(t: torch.Tensor) -> torch.Tensor:
    """Per-row maximum ``[rows, 1]`` (0 for a rank's empty vocabulary slice)."""
    if t.shape[-1] == 0:
        return t.new_zeros((t.shape[0], 1))
    return t.amax(dim=-1, keepdim=True)


def _rkl_rows(student, original, strengthened, alpha, temperature, reverse, need_grad,
              grad_out, grad_scale, exact_non_finite, compute, group=None,
              differentiable=False, defer_top=False):
    # defer_top: leave the one-hot fix-up to the caller and return the rows' top probabilities
    # as a third result (see rkl_rows).
    ops = _Ops(differentiable)
    s = student.to(compute)
    z = teacher_logits(original, strengthened, alpha, compute, exact_non_finite)
    # d = (s - z) / T, the difference taken before the division (exact where s ~ z).
    d = s - z
    if temperature != 1.0:
        d = ops.div(d, temperature)
        s = s / temperature
        z = z / temperature
    # ATen's log_softmax is one fused, vectorised kernel: cheaper than max/exp/sum by hand.
    log_p = torch.log_softmax(s, dim=-1)
    log_q = torch.log_softmax(z, dim=-1)
    if group is not None:
        shift_s, shift_z, lse_gap = _vocab_parallel(s, z, group)
        log_p, log_q = _to_full(log_p, shift_s, ops), _to_full(log_q, shift_z, ops)
    # Under group the one-hot fix-up all-reduces: every rank takes it (the top is on one).
    fix_top = group is not None or differentiable
    if reverse:
        weight = log_p.exp()
        log_ratio = ops.sub(log_p, log_q)      # log p - log q, in the log_p buffer
        if exact_non_finite:
            # Entries of zero weight contribute nothing, but their log ratio may be +-inf,
            # giving 0 * inf = NaN: zero them first. A NaN weight (NaN input) is not zero and
            # propagates.
            log_ratio = ops.fill(log_ratio, weight == 0, 0.0)
        loss = _row_dot(weight, log_ratio)
        if group is not None:
            loss = _all_reduce(loss, group)
    else:
        # With e = d - c = log p - log q (c = lse_s - lse_z = log E_q[exp(d)], taken as
        # log1p(E_q[expm1(d)]) near the teacher), L = -E_q[e] = E_q[expm1(e) - e] + (the
        # student's mass outside the teacher's support, since E_q[exp(e)] is the rest): a sum
        # of terms >= 0 that cancels nothing, and an error in c moves it only at second order
        # (E_q[expm1(e)] = 0). sum q (log q - log p) instead adds terms each off by an ulp of
        # |log q|: measured on SmolLM2's lm_head in bfloat16, 1.8x the contract's 1e-3 on a
        # row of loss 4e-4.
        q = _full_probabilities(z, shift_z if group is not None else None, ops)
        spread = _q_expm1(q, log_q, d)
        if exact_non_finite:
            # -inf teacher entries (q = 0 and d = +inf or NaN) hold no mass. (Not q == 0: an
            # underflowed q times exp(d) may be most of the student's mass.)
            teacher_hole = torch.isneginf(log_q)
            spread = ops.fill(spread, teacher_hole, 0.0)
            # The sum over the teacher's support then misses the student's mass outside it,
            # so rows with such mass take c from the log-sum-exps (nothing cancels there).
            escaped = (teacher_hole & ~torch.isneginf(s)).any(dim=-1, keepdim=True)
        shift = spread.sum(dim=-1, keepdim=True)
        if group is not None:
            shift = _all_reduce(shift, group)
        else:
            lse_gap = torch.logsumexp(s, dim=-1, keepdim=True) - torch.logsumexp(
                z, dim=-1, keepdim=True)
        # Where the student is far from the teacher (c >= 10) there is nothing to cancel and
        # E_q[expm1(d)] could overflow: c from the log-sum-exps.
        c = torch.where(lse_gap < 10.0, torch.log1p(shift), lse_gap)
        if exact_non_finite:
            if group is not None:
                escaped = _all_reduce(escaped.to(shift.dtype), group) > 0
            c = torch.where(escaped, lse_gap, c)
        e = ops.sub(d, c)
        q_expm1_e = _q_expm1(q, log_q, e)           # p - q, the gradient's numerator
        terms = _q_expm1_minus(q, e, q_expm1_e)
        if exact_non_finite:
            p = _full_probabilities(s, shift_s if group is not None else None, ops)
            outside = q == 0
            terms = ops.fill(terms, outside, 0.0)
            terms = terms + torch.where(outside, p, 0.0)
        loss = terms.sum(dim=-1, keepdim=True)
        if group is not None:
            loss = _all_reduce(loss, group)
    # clamp_min keeps NaN; the gradient below uses the unclamped sum, consistent with weight.
    row_loss = loss.squeeze(-1).clamp_min(0.0)
    if not need_grad:
        return row_loss, None
    # The gradient from d = (s - z) / T (exact where the student is close to its teacher)
    # rather than from log p - log q (each log-softmax off by an ulp of |log p|, far more than
    # their difference): see the module docstring.
    if reverse:
        # p_v (d_v - E_p[d]) / T.
        p = weight              # exp(log p): its relative error (~ulp x |log p|) is p's alone
        if exact_non_finite:
            d = ops.fill(d, p == 0, 0.0)
        mean_d = _row_dot(p, d)
        if group is not None:
            mean_d = _all_reduce(mean_d, group)
        p_top = _row_max(p)
        at_top = p == p_top if not defer_top and (fix_top or _may_be_one_hot(p_top)) else None
        if grad_scale is not None:
            p = ops.mul(p, grad_scale / temperature)
        elif temperature != 1.0:
            p = ops.div(p, temperature)
        if at_top is None:
            grad = torch.mul(d.sub_(mean_d), p, out=grad_out)
            return (row_loss, grad, p_top) if defer_top else (row_loss, grad)
        grad = ops.mul(ops.sub(d, mean_d), p)
    else:
        # p_v - q_v = q_v expm1(d_v - c) / T: each factor accurate, no difference of two
        # probabilities (c and the terms from the loss above).
        grad = q_expm1_e
        if exact_non_finite:
            # Where q = 0 the gradient is p itself (d may be infinite or NaN there).
            grad = torch.where(outside, p, grad)
        p_top = _row_max(grad + q)
        at_top = (grad + q == p_top if not defer_top and (fix_top or _may_be_one_hot(p_top))
                  else None)
        if grad_scale is not None:
            grad = ops.mul(grad, grad_scale / temperature)
        elif temperature != 1.0:
            grad = ops.div(grad, temperature)
        if at_top is None:
            if grad_out is not None:
                grad_out.copy_(grad)
                grad = grad_out
            return (row_loss, grad, p_top) if defer_top else (row_loss, grad)
    grad = _top_from_the_others(grad, p_top, at_top, group, ops)
    if grad_out is not None:
        grad_out.copy_(grad)
        grad = grad_out
    return row_loss, grad


def _may_be_one_hot(p_top: torch.Tensor) -> bool:
    """Whether any row may need :func:`_top_from_the_others`: read on the host when that is
    free (CPU, eager), so that the common case keeps its single fused pass into the gradient;
    compiled (the check would break the graph) or off CPU, always (then it costs two fused
    reductions and a pass). On CPU the compiled path mostly avoids that: :func:`rkl_rows` runs
    it with ``defer_top`` and fixes only the rows that need it after the graph."""
    if torch.compiler.is_compiling() or not host_reads_allowed(p_top.device):
        return True
    return bool((p_top > ONE_HOT_TOP_PROBABILITY).any())


def differentiable_rows_grad(student: torch.Tensor, original: torch.Tensor,
                             strengthened: torch.Tensor | None, keep: torch.Tensor | None,
                             alpha: float, temperature: float, reverse: bool,
                             compute: torch.dtype) -> torch.Tensor:
    """dL_row/d student ``[rows, V]`` (``compute`` dtype) from :func:`rkl_rows` with
    ``differentiable=True``, for double backward and ``torch.func``: autograd can
    differentiate it (exact second derivatives, at the naive formula's memory). Masked rows are
    replaced by zeros before any op (so NaN there cannot reach a derivative) and get gradient 0.
    """
    s, o = student.to(compute), original.to(compute)
    g = strengthened.to(compute) if strengthened is not None else None
    if keep is not None:
        kept = keep.unsqueeze(-1)
        s, o = torch.where(kept, s, 0.0), torch.where(kept, o, 0.0)
        g = torch.where(kept, g, 0.0) if g is not None else None
    _, grad = rkl_rows(s, o, g, alpha, temperature, reverse, True, compute=compute,
                       differentiable=True)
    return torch.where(keep.unsqueeze(-1), grad, 0.0) if keep is not None else grad


def rkl_loss_and_grad(student: torch.Tensor, original: torch.Tensor,
                      strengthened: torch.Tensor | None, keep: torch.Tensor | None,
                      alpha: float, temperature: float, reverse: bool, need_grad: bool,
                      chunk_rows: int | None = None, compiled: bool | None = False,
                      grad_scale: torch.Tensor | None = None, compute: torch.dtype | None = None,
                      group=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row losses (accumulation dtype, [rows], 0 at masked rows) and the gradient ([rows, V],
    zero at masked rows), processing ``chunk_rows`` rows at a time: the chunk loop of
    ``fused_rkl_loss``'s torch backend, single-device and vocabulary-parallel (``group``: the
    rows are this rank's vocabulary slice; see :func:`rkl_rows`).

    With ``grad_scale`` the gradient is pre-scaled and rounded once to the student's dtype.
    Without it (``reduction="none"``, whose per-row upstream gradient is known only in
    backward) it is kept in the compute dtype, so that the caller's scaling and the final
    rounding to the student's dtype (autograd casts a gradient to its input's dtype) are one
    rounding, not two.

    Masked rows are skipped entirely on CPU: they cost nothing and cannot leak NaN. Elsewhere
    (no host syncs, see :func:`host_reads_allowed`) every row is computed and the masked ones
    are zeroed afterwards with ``torch.where`` / ``masked_fill``, so NaN there cannot leak
    either. ``compiled``: run the per-chunk math through ``torch.compile`` (True), eagerly
    (False), or decide from the call's size (None; see :func:`compile_mode`); the
    vocabulary-parallel path runs eagerly. ``grad_scale`` (0-d tensor) multiplies the gradient
    as it is computed, at no extra pass. ``compute``: see :func:`compute_dtype`.
    """
    rows, vocab = student.shape
    compute = compute or compute_dtype(student.dtype)
    loss = torch.zeros(rows, dtype=accumulation_dtype(student.dtype), device=student.device)
    skip_masked = keep is not None and host_reads_allowed(student.device)
    grad = None
    if need_grad:
        grad_dtype = student.dtype if grad_scale is not None else compute
        grad = torch.empty((rows, vocab), dtype=grad_dtype, device=student.device)
        if skip_masked:
            # Skipped (masked) rows are the only ones never written: zero just those, rather
            # than the whole [rows, V] buffer (a full pass over the gradient's memory).
            grad.index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)
    kept = rows
    if skip_masked:
        kept_rows = keep.nonzero().squeeze(1)   # no sync on CPU (host_reads_allowed)
        kept = kept_rows.numel()
    mode = "off" if group is not None else compile_mode(compiled, student.device, kept * vocab)
    # Under ``group`` every rank must cut the same chunks: they are sized by the widest slice.
    chunk_rows = chunk_rows or default_chunk_rows(group_max(vocab, group),
                                                  compiled=mode != "off")
    if skip_masked:
        bounds = torch.searchsorted(kept_rows, torch.arange(0, rows + chunk_rows, chunk_rows,
                                                            device=keep.device)).tolist()
    options = dict(caller="fused_rkl_loss", compute=compute, group=group)
    for chunk, start in enumerate(range(0, rows, chunk_rows)):
        part = slice(start, min(start + chunk_rows, rows))
        if skip_masked:
            lo, hi = bounds[chunk], bounds[chunk + 1]
            if lo == hi:
                continue
            if hi - lo < part.stop - start:     # partly masked: gather the kept rows only
                index = kept_rows[lo:hi]
                g = strengthened.index_select(0, index) if strengthened is not None else None
                chunk_loss, chunk_grad = run_rkl_rows(
                    mode, student.index_select(0, index), original.index_select(0, index), g,
                    alpha, temperature, reverse, need_grad, grad_scale=grad_scale, **options)
                loss.index_copy_(0, index, chunk_loss.to(loss.dtype))
                if grad is not None:
                    grad.index_copy_(0, index, chunk_grad.to(grad.dtype))
                continue
        chunk_loss, _ = run_rkl_rows(mode, student[part], original[part],
                                     strengthened[part] if strengthened is not None else None,
                                     alpha, temperature, reverse, need_grad,
                                     grad_out=grad[part] if grad is not None else None,
                                     grad_scale=grad_scale, **options)
        if keep is not None and not skip_masked:
            # Sync-free masking: every row was computed; masked ones get loss 0 and
            # gradient 0, whatever NaN their logits held.
            kept_part = keep[part]
            loss[part] = torch.where(kept_part, chunk_loss, 0.0)
            if grad is not None:
                grad[part].masked_fill_(~kept_part.unsqueeze(1), 0.0)
        else:
            loss[part] = chunk_loss
    return loss, grad


def group_max(value: int, group) -> int:
    """``value``'s maximum over the ranks of ``group`` (``value`` itself without one): chunk
    sizes of the vocabulary-parallel path, which every rank must cut alike."""
    if group is None:
        return value
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.int64,
                     device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


# ---------------------------------------------------------------------------------------------
# torch.compile of the vocabulary pass
# ---------------------------------------------------------------------------------------------
# Eager rkl_rows makes about a dozen elementwise passes over its rows; compiled by inductor they
# fuse into a few loops (measured 2.5-3x faster per element on this project's 2-core CPU). The
# one-off compilation takes about 10-20 s on such a CPU, so with ``compiled=None`` it is used
# only for calls of at least this many kept-row x V elements (1024 rows at V = 32768), where a
# training loop soon pays it back; small calls (tests, short sequences) stay eager.
COMPILE_MIN_ELEMENTS = 1 << 25


def compile_mode(compiled: bool | None, device: torch.device, elements: int) -> str:
    """How to run :func:`rkl_rows`: ``"on"`` (compile; errors raise), ``"off"`` (eager) or
    ``"auto"`` (compile, fall back to eager with a warning if compilation fails), from the
    user's ``compiled`` argument (None = automatic) and the call's size."""
    if compiled is False:
        return "off"
    if compiled:
        return "on"
    return "auto" if device.type == "cpu" and elements >= COMPILE_MIN_ELEMENTS else "off"


def check_compiled_arg(fn: str, compiled) -> None:
    if compiled is not None and not isinstance(compiled, bool):
        raise TypeError(f"{fn}: compiled must be None (automatic), True or False; got "
                        f"{compiled!r}")


def run_rkl_rows(mode: str, student, original, strengthened, alpha: float, temperature: float,
                 reverse: bool, need_grad: bool, grad_out=None, grad_scale=None,
                 caller: str = "rkld_kernels", compute: torch.dtype | None = None,
                 group=None):
    """:func:`rkl_rows`, through ``torch.compile`` when ``mode`` (see :func:`compile_mode`) says
    so (never under ``group``: the vocabulary-parallel path runs eagerly)."""
    args = (student, original, strengthened, alpha, temperature, reverse, need_grad)
    if group is None and (mode == "on" or (mode == "auto" and not _compile_failed)):
        try:
            return rkl_rows(*args, grad_out=grad_out, grad_scale=grad_scale, compiled=True,
                            compute=compute)
        except _compiler_errors() as err:
            if mode == "on":
                raise
            _compile_failed.append(err)
            warnings.warn(f"{caller}: torch.compile of the vocabulary pass failed "
                          f"({type(err).__name__}: {err}); using eager PyTorch from now on "
                          f"(compiled=False skips the attempt)", RuntimeWarning, stacklevel=3)
    return rkl_rows(*args, grad_out=grad_out, grad_scale=grad_scale, compute=compute,
                    group=group)


# Holds the error once torch.compile has failed in this process (e.g. no C++ compiler for
# inductor), so that the automatic choice stops retrying on every call.
_compile_failed: list[BaseException] = []


@functools.lru_cache(maxsize=None)
def _compiled_rkl_rows():
    # dynamic=True: one compilation serves every block height and vocabulary size; the fast and
    # the exact path (a Python bool) are two graphs. The host-side check between them stays
    # outside the compiled code, so there is no graph break.
    return torch.compile(_rkl_rows, dynamic=True)


def _compiler_errors() -> tuple[type[BaseException], ...]:
    import torch._dynamo.exc
    import torch._inductor.exc
    return tuple(err for err in (getattr(torch._dynamo.exc, "BackendCompilerFailed", None),
                                 getattr(torch._inductor.exc, "InductorError", None))
                 if err is not None)
