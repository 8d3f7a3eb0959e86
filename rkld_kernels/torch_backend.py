"""Chunked PyTorch backend: the same math as the Triton kernels, for CPUs and as a fallback.

Rows are processed a chunk at a time in the compute dtype (:func:`compute_dtype`: float32 for
float16/bfloat16 students, float64 for float32 and float64 ones), so no full-vocabulary work
tensor larger than ``chunk_rows x V`` exists besides the gradient itself.
The loss and the gradient of each chunk (optionally pre-multiplied by a scale, so that the usual
backward needs no further pass) come out of one call, eager or through ``torch.compile``.

Math per row, with s~ = s/T, z~ = z/T, p = softmax(s~), q = softmax(z~):

    reverse:  L = sum_v p (log p - log q)      dL/ds_v = p_v ((log p_v - log q_v) - L) / T
    forward:  L = sum_v q (log q - log p)      dL/ds_v = (p_v - q_v) / T

(the reverse gradient is DESIGN.md's p_j (d_j - E_p[d]) / T, since log p - log q = d - lse_s +
lse_z and L = E_p[d] - lse_s + lse_z). Entries whose weight is exactly 0 contribute 0.

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
import warnings

import torch

# Rows of float32 work per chunk are sized to this many elements: small enough to stay in the
# CPU's caches, large enough that the per-op Python overhead is amortised.
_CHUNK_ELEMENTS = 1 << 18


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the losses (and of kept gradients) for inputs of ``dtype``: float32 for
    every input dtype except float64, which is kept (gradcheck, ground truths)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-element math for inputs of ``dtype``: float32 for float16/bfloat16,
    float64 for float32 and float64. float32 inputs need it for their gradient to be within
    2x the float32 rounding floor: exp and log in float32 alone are off by ~1e-6 relative on
    logits of size 10, 16x that floor. (float32 logits is rare in LLM training; the 16-bit
    path is float32 throughout.)"""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


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
             compiled: bool = False, compute: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss per row and, if asked, dL_row/d student ([rows, V]).

    The math runs in ``compute`` (default :func:`compute_dtype` of the student's dtype; the
    fused-linear loss passes float32 for the float32 logits of float16/bfloat16 heads). The
    loss is in that dtype, and never negative: KL >= 0, so a row whose rounded sum falls
    below 0 (a KL of 1e-10 at temperature 0.05 can) is returned as 0, which is also nearer
    the exact value. The gradient is written into ``grad_out`` when given (any float dtype,
    rounded once), else returned in the compute dtype, multiplied by ``grad_scale`` (a 0-d
    tensor, so that a compiled version does not specialise on its value) when given. Inputs
    are 2-D ``[rows, V]`` of any float dtype and strides; they are never modified.

    Non-finite logits (-inf vocabulary masking, NaN) need boolean fix-ups that are slow on CPU.
    On CPU the chunk is first computed without them: every place where they matter turns the
    row's loss into NaN or inf, so a finite loss proves the fast result exact; otherwise the
    chunk is recomputed with the fix-ups. On CUDA (no host syncs; see
    :func:`host_reads_allowed`) the exact path always runs.

    ``compiled=True`` runs both paths through ``torch.compile`` (see :func:`run_rkl_rows`).
    """
    impl = _compiled_rkl_rows() if compiled else _rkl_rows
    compute = compute or compute_dtype(student.dtype)
    if host_reads_allowed(student.device):
        loss, grad = impl(student, original, strengthened, alpha, temperature, reverse,
                          need_grad, grad_out, grad_scale, False, compute)
        if bool(torch.isfinite(loss).all()):
            return loss, grad
    return impl(student, original, strengthened, alpha, temperature, reverse, need_grad,
                grad_out, grad_scale, True, compute)


# A row whose top probability exceeds this gets its top gradient entry from the others (see
# the module docstring). Any value in (1/2, 1) is accurate (the others sum to less than the top
# entry's terms); the triton kernels decide it from the row's student sum with a margin, so
# both use 2/3.
ONE_HOT_TOP_PROBABILITY = 2.0 / 3.0


def _top_from_the_others(grad: torch.Tensor, p_top: torch.Tensor, at_top: torch.Tensor) -> None:
    """In rows where the student's top probability ``p_top`` (``[rows, 1]``; ``at_top`` is the
    bool mask of its column) exceeds 2/3, replace the gradient at the top token by minus the
    sum of the row's other entries (in place; ``grad`` in the compute dtype, any upstream scale
    applied): ``top - sum(row)`` is that sum up to one rounding of its size. Above 1/2 the
    maximum is unique, so the mask has one column. A NaN row is left as it is. (A mask rather
    than ``max``'s indices: reductions with indices are slow on CPU.)"""
    total = grad.sum(dim=-1, keepdim=True).masked_fill_(~(p_top > ONE_HOT_TOP_PROBABILITY), 0.0)
    grad.sub_(at_top * total)


def _rkl_rows(student, original, strengthened, alpha, temperature, reverse, need_grad,
              grad_out, grad_scale, exact_non_finite, compute):
    s = student.to(compute)
    z = teacher_logits(original, strengthened, alpha, compute, exact_non_finite)
    if temperature != 1.0:
        s = s / temperature
        z = z / temperature
    # ATen's log_softmax is one fused, vectorised kernel: cheaper than max/exp/sum by hand.
    log_p = torch.log_softmax(s, dim=-1)
    log_q = torch.log_softmax(z, dim=-1)
    if reverse:
        weight = log_p.exp()
        log_ratio = log_p.sub_(log_q)          # log p - log q, in the log_p buffer
    else:
        weight = log_q.exp()
        log_ratio = log_q.sub_(log_p)          # log q - log p, in the log_q buffer
    if exact_non_finite:
        # Entries of zero weight contribute nothing, but their log ratio may be +-inf, giving
        # 0 * inf = NaN: zero them first. A NaN weight (NaN input) is not zero and propagates.
        log_ratio.masked_fill_(weight == 0, 0.0)
    loss = _row_dot(weight, log_ratio)
    # clamp_min keeps NaN; the gradient below uses the unclamped sum, consistent with weight.
    row_loss = loss.squeeze(-1).clamp_min(0.0)
    if not need_grad:
        return row_loss, None
    if reverse:
        # p_v ((log p_v - log q_v) - L) / T, in the compute dtype; then the top entry of
        # near-one-hot rows; one rounding into a low-precision grad_out.
        p_top = weight.amax(dim=-1, keepdim=True)     # weight is p, unscaled yet
        at_top = weight == p_top if _may_be_one_hot(p_top) else None
        if grad_scale is not None:
            weight.mul_(grad_scale / temperature)
        elif temperature != 1.0:
            weight.div_(temperature)
        if at_top is None:
            return row_loss, torch.mul(log_ratio.sub_(loss), weight, out=grad_out)
        grad = log_ratio.sub_(loss).mul_(weight)
    else:
        # (p_v - q_v) / T. p - q cancels, so both come from the fused softmax (relative error
        # of a few ulp) rather than from exp(log_softmax), whose error grows with |log p|.
        p = torch.softmax(s, dim=-1)
        q = torch.softmax(z, dim=-1)
        p_top = p.amax(dim=-1, keepdim=True)
        at_top = p == p_top if _may_be_one_hot(p_top) else None
        if at_top is None:
            if grad_scale is not None:
                return row_loss, torch.mul(p.sub_(q), grad_scale / temperature, out=grad_out)
            if temperature != 1.0:
                return row_loss, torch.div(p.sub_(q), temperature, out=grad_out)
            return row_loss, torch.sub(p, q, out=grad_out)
        grad = p.sub_(q)
        if grad_scale is not None:
            grad.mul_(grad_scale / temperature)
        elif temperature != 1.0:
            grad.div_(temperature)
    _top_from_the_others(grad, p_top, at_top)
    if grad_out is not None:
        grad_out.copy_(grad)
        grad = grad_out
    return row_loss, grad


def _may_be_one_hot(p_top: torch.Tensor) -> bool:
    """Whether any row may need :func:`_top_from_the_others`: read on the host when that is
    free (CPU, eager), so that the common case keeps its single fused pass into the gradient;
    compiled (the check would break the graph) or off CPU, always (then it costs two fused
    reductions and a pass)."""
    if torch.compiler.is_compiling() or not host_reads_allowed(p_top.device):
        return True
    return bool((p_top > ONE_HOT_TOP_PROBABILITY).any())


def rkl_loss_and_grad(student: torch.Tensor, original: torch.Tensor,
                      strengthened: torch.Tensor | None, keep: torch.Tensor | None,
                      alpha: float, temperature: float, reverse: bool, need_grad: bool,
                      chunk_rows: int | None = None, compiled: bool | None = False,
                      grad_scale: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row losses (accumulation dtype, [rows], 0 at masked rows) and the gradient ([rows, V],
    zero at masked rows), processing ``chunk_rows`` rows at a time.

    With ``grad_scale`` the gradient is pre-scaled and rounded once to the student's dtype.
    Without it (``reduction="none"``, whose per-row upstream gradient is known only in
    backward) it is kept in the accumulation dtype, so that the caller's scaling and the final
    rounding to a float16/bfloat16 student's dtype (autograd casts a gradient to its input's
    dtype) are one rounding, not two.

    Masked rows are skipped entirely on CPU: they cost nothing and cannot leak NaN. Elsewhere
    (no host syncs, see :func:`host_reads_allowed`) every row is computed and the masked ones
    are zeroed afterwards with ``torch.where`` / ``masked_fill``, so NaN there cannot leak
    either. ``compiled``:
    run the per-chunk math through ``torch.compile`` (True), eagerly (False), or decide from
    the call's size (None; see :func:`compile_mode`). ``grad_scale`` (0-d tensor) multiplies
    the gradient as it is computed, at no extra pass.
    """
    rows, vocab = student.shape
    loss = torch.zeros(rows, dtype=accumulation_dtype(student.dtype), device=student.device)
    grad = None
    if need_grad:
        grad_dtype = (student.dtype if grad_scale is not None
                      else accumulation_dtype(student.dtype))
        grad = torch.empty((rows, vocab), dtype=grad_dtype, device=student.device)
        if keep is not None and host_reads_allowed(student.device):
            # Skipped (masked) rows are the only ones never written: zero just those, rather
            # than the whole [rows, V] buffer (a full pass over the gradient's memory).
            grad.index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)
    if keep is not None and not host_reads_allowed(student.device):
        return _masked_loss_and_grad(student, original, strengthened, keep, loss, grad, alpha,
                                     temperature, reverse, need_grad, chunk_rows, compiled,
                                     grad_scale)
    kept = rows
    if keep is not None:
        kept_rows = keep.nonzero().squeeze(1)   # no sync on CPU (host_reads_allowed)
        kept = kept_rows.numel()
    mode = compile_mode(compiled, student.device, kept * vocab)
    chunk_rows = chunk_rows or default_chunk_rows(vocab, compiled=mode != "off")
    if keep is not None:
        bounds = torch.searchsorted(kept_rows, torch.arange(0, rows + chunk_rows, chunk_rows,
                                                            device=keep.device)).tolist()
    for chunk, start in enumerate(range(0, rows, chunk_rows)):
        stop = min(start + chunk_rows, rows)
        if keep is not None:
            lo, hi = bounds[chunk], bounds[chunk + 1]
            if lo == hi:
                continue
            if hi - lo < stop - start:          # partly masked: gather the kept rows only
                index = kept_rows[lo:hi]
                g = strengthened.index_select(0, index) if strengthened is not None else None
                chunk_loss, chunk_grad = run_rkl_rows(
                    mode, student.index_select(0, index), original.index_select(0, index), g,
                    alpha, temperature, reverse, need_grad, grad_scale=grad_scale,
                    caller="fused_rkl_loss")
                loss.index_copy_(0, index, chunk_loss.to(loss.dtype))
                if grad is not None:
                    grad.index_copy_(0, index, chunk_grad.to(grad.dtype))
                continue
        g = strengthened[start:stop] if strengthened is not None else None
        chunk_loss, _ = run_rkl_rows(mode, student[start:stop], original[start:stop], g, alpha,
                                     temperature, reverse, need_grad,
                                     grad_out=grad[start:stop] if grad is not None else None,
                                     grad_scale=grad_scale, caller="fused_rkl_loss")
        loss[start:stop] = chunk_loss
    return loss, grad


def _masked_loss_and_grad(student, original, strengthened, keep, loss, grad, alpha, temperature,
                          reverse, need_grad, chunk_rows, compiled, grad_scale):
    """:func:`rkl_loss_and_grad` without reading ``keep`` on the host: every row is computed,
    then masked rows get loss 0 and gradient 0 (whatever NaN their logits held)."""
    rows, vocab = student.shape
    mode = compile_mode(compiled, student.device, rows * vocab)
    chunk_rows = chunk_rows or default_chunk_rows(vocab, compiled=mode != "off")
    for start in range(0, rows, chunk_rows):
        part = slice(start, min(start + chunk_rows, rows))
        kept = keep[part]
        chunk_loss, _ = run_rkl_rows(mode, student[part], original[part],
                                     strengthened[part] if strengthened is not None else None,
                                     alpha, temperature, reverse, need_grad,
                                     grad_out=grad[part] if grad is not None else None,
                                     grad_scale=grad_scale, caller="fused_rkl_loss")
        loss[part] = torch.where(kept, chunk_loss, 0.0)
        if grad is not None:
            grad[part].masked_fill_(~kept.unsqueeze(1), 0.0)
    return loss, grad


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
                 caller: str = "rkld_kernels", compute: torch.dtype | None = None):
    """:func:`rkl_rows`, through ``torch.compile`` when ``mode`` (see :func:`compile_mode`) says so."""
    args = (student, original, strengthened, alpha, temperature, reverse, need_grad)
    if mode == "on" or (mode == "auto" and not _compile_failed):
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
    return rkl_rows(*args, grad_out=grad_out, grad_scale=grad_scale, compute=compute)


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
