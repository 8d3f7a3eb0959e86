"""``fused_linear_rkl_loss``: the RKLD loss from hidden states and lm_head weights, token-chunked.

For each model the logits are ``hidden @ weight.T + bias``. They are never built for all tokens
at once: the kept tokens (``labels != ignore_index``; masked ones are dropped before any matmul,
or, with ``drop_masked=False``, computed and zeroed without a host sync) are processed
``chunk_size`` at a time, and for each chunk

1. three GEMMs build the student, original and strengthened logits ``[chunk, V]``, in float32
   for float16/bfloat16/float32 inputs and in float64 for float64 inputs or under the
   ``compute_dtype=torch.float64`` option (see "Precision");
2. the vocabulary part -- loss per row and dL/d(student logits) -- is
   :func:`rkld_kernels.torch_backend.rkl_rows` (torch backend) or the two Triton kernels of
   :mod:`rkld_kernels.triton_backend` (triton backend);
3. two GEMMs turn dL/dlogits into gradients: ``dX[chunk] = dlogits @ W`` (into a float32
   ``[tokens, H]`` buffer) and ``dW += dlogits.T @ X[chunk]`` (accumulated in place into one
   ``[V, H]`` accumulator, float32 by default, float64 under the float64 option), plus
   ``db += dlogits.sum(0)``.

Peak extra memory is ``O(chunk * V + V * H + tokens * H)``: it does not grow with tokens x V.

Precision. At the start of unlearning the student equals the original model, so p ~ q on most
of the vocabulary and the loss and its gradient are small differences of large numbers: logits
rounded to bfloat16 (about 0.04 on logits of size 10) are as large as what the loss is made of.
So no logit is ever rounded to a low-precision dtype. For float16/bfloat16 heads the GEMMs
accumulate in float32 and write float32 (:func:`gemm_mode`: ``torch.mm(..., out_dtype=
torch.float32)`` on CUDA, a float32 upcast elsewhere); the vocabulary pass runs in float32; the
dX GEMM is fed dL/dlogits exactly enough (float32, or on CUDA two low-precision terms hi + lo)
that dX is as exact as from float32; dX, dW and db stay in float32 until the upstream gradient
has scaled them, then each is rounded once to its parameter's dtype. float32 heads run float32
GEMMs and math (on CUDA subject to torch's TF32 settings), held to 2x the naive float32
formula's error. ``compute_dtype=torch.float64`` gives them the same treatment one level up:
GEMMs, vocabulary pass and dX/dW/db in float64 (each weight converted once per call), for the
float32 rounding floor, which float32 arithmetic cannot reach (dX alone sums V terms that
largely cancel). That costs float64 GEMMs (on CPU about 2x float32's time; on GPUs their
float64 rate), float64 vocabulary passes and twice the chunk memory, so the default chunk is
half as long.
The result meets the precision contract of the README (see :func:`fused_linear_rkl_loss`), tested in
``tests/test_precision.py``.

When the gradient is computed. With ``reduction="mean"`` or ``"sum"`` the upstream gradient is
one scalar, so the whole gradient is computed during the forward pass and the backward only
multiplies it by ``grad_output``. With ``reduction="none"`` every position has its own upstream
gradient ``g_i`` and ``dW = sum_i g_i dlogits_i^T x_i`` depends on all of them, so the forward
computes losses only and the backward recomputes the chunks with each row of dlogits scaled by
``g_i`` (exact, at the price of the three logits GEMMs once more).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import _checks
from ._custom_ops import (
    COMPILED_CODES,
    COMPILED_FROM_CODE,
    custom_op,
    function_route,
    functorch_active,
    mean_divisor,
    process_group,
    tracing,
    vmap_by_loop,
)
from .fused_rkl import fused_rkl_loss, resolve_backend
from .tensor_parallel import is_dtensor, vocab_parallel_linear_rkl_loss
from .torch_backend import compute_dtype as compute_dtype_of
from .torch_backend import (
    _all_reduce,
    accumulation_dtype,
    check_compiled_arg,
    check_compute_dtype,
    compile_mode,
    compute_dtype,
    differentiable_rows_grad,
    group_max,
    run_rkl_rows,
)

_FN = "fused_linear_rkl_loss"

# Default chunk size: the [chunk, V] buffers alive at once are kept within a per-device byte
# budget, counted as rows of the compute dtype (float32, float64 for float32/float64 heads):
# the three logits and the gradient during the vocabulary pass, plus one for its temporaries
# or, in the gradient GEMMs, for the gradient's two low-precision halves (CUDA,
# float16/bfloat16). Bigger chunks make the GEMMs
# more efficient (on CPU the weight-gradient GEMM, whose inner dimension is the chunk, needs a
# few hundred rows) and cost memory.
_BUFFERS_PER_ROW = 5
_CHUNK_BUDGET_BYTES = {"cuda": 1 << 30}
_DEFAULT_CHUNK_BUDGET_BYTES = 160 << 20       # 262 tokens at V = 32000

# The torch backend hands rkl_rows this many bytes of float32 rows at a time (32 rows at
# V = 32000). Its dozen elementwise passes then work on a few such buffers, which stay in a CPU's
# last-level cache instead of streaming a whole chunk through memory each time (a whole 256-row
# chunk measured about 2x slower per element); fewer, larger calls amortise the per-op overhead.
# On CUDA a whole chunk goes in one call, which is what keeps the GPU busy; so it does compiled
# (torch.compile fuses the passes into a few streaming loops, and each call's OpenMP barriers
# can cost more on a busy 2-core CPU than the cache misses they would save: in a 1024-token
# benchmark there, 32-row calls measured 1.07x the time of whole-chunk calls).
_CPU_PASS_BYTES = 4 << 20

def default_chunk_size(vocab_size: int, device: torch.device | str,
                       dtype: torch.dtype = torch.bfloat16,
                       compute: torch.dtype | None = None) -> int:
    """Tokens per chunk when ``chunk_size=None``: the largest chunk whose ``[chunk, V]`` work
    buffers (``_BUFFERS_PER_ROW`` rows of V per token in the compute dtype ``compute``, by
    default that of ``dtype`` heads: float32, float64 for float64) fit the device's budget
    (1 GiB on CUDA, 160 MiB elsewhere), at least 1."""
    device_type = torch.device(device).type
    budget = _CHUNK_BUDGET_BYTES.get(device_type, _DEFAULT_CHUNK_BUDGET_BYTES)
    element = _element_size(compute_dtype(dtype, compute))
    return max(1, budget // (_BUFFERS_PER_ROW * element * max(1, vocab_size)))


@dataclass(frozen=True)
class _Plan:
    """Everything the chunk loop needs besides the tensors."""
    alpha: float
    temperature: float
    reverse: bool
    chunk_size: int
    accum_dtype: torch.dtype | None
    backend: str            # "torch" or "triton"
    rows_per_pass: int      # torch backend: rows per rkl_rows call within a chunk
    compile: str            # torch backend: "off", "on" (errors raise) or "auto" (fall back)
    per_row: bool           # reduction == "none": losses per row, gradient in backward
    need_dx: bool
    need_dw: bool
    need_db: bool
    compute: torch.dtype    # dtype of the logits, the vocabulary pass and dX/dW/db
    precise: bool = False   # triton: float32 heads in float32 take the kernels' PRECISE code
    group: object = None    # vocabulary parallelism: the process group to all-reduce over


# ---------------------------------------------------------------------------------------------
# The operators: rkld::linear_rkl_loss and, for reduction="none", its backward
# ---------------------------------------------------------------------------------------------
def _make_plan(xs, ws, bs, alpha, temperature, reverse, chunk_size, accum_dtype, backend,
               compiled, per_row, need_dx, need_dw, need_db, compute=None,
               group=None) -> _Plan:
    rows, device = xs.shape[0], xs.device
    compute = compute_dtype(ws.dtype, compute)
    # Under ``group`` every rank must cut the same chunks (each chunk all-reduces): sized by
    # the widest vocabulary slice.
    vocab = max(1, group_max(ws.shape[0], group))
    chunk_size = chunk_size or default_chunk_size(vocab, device, ws.dtype, compute)
    mode = (compile_mode(COMPILED_FROM_CODE[compiled], device, rows * vocab)
            if backend == "torch" and group is None else "off")
    return _Plan(alpha=alpha, temperature=temperature, reverse=reverse, chunk_size=chunk_size,
                 accum_dtype=accum_dtype, backend=backend,
                 rows_per_pass=(max(1, _CPU_PASS_BYTES // (_element_size(compute) * vocab))
                                if device.type == "cpu" and mode == "off" else chunk_size),
                 compile=mode,
                 per_row=per_row, need_dx=need_dx, need_dw=need_dw,
                 need_db=need_db and bs is not None, compute=compute,
                 precise=ws.dtype == torch.float32 and compute == torch.float32, group=group)


def _masked_run(inputs, keep, drop_masked, options, *, grads, row_scale=None, compute=None,
                group=None):
    """:func:`_run_chunks` over all positions with masked ones (``keep`` False) at loss 0 and
    hidden gradient 0: dropped before the GEMMs (``drop_masked``; one ``nonzero``, a host sync
    on CUDA) or computed and zeroed (sync-free)."""
    xs, ws, bs, xo, wo, bo, xg, wg, bg = inputs
    positions = xs.shape[0]
    kept = None
    if keep is not None and drop_masked:
        kept = keep.nonzero().squeeze(1)
        if kept.numel() == positions:
            kept = None                            # nothing masked: keep the views, no gather
        else:
            xs, xo = xs.index_select(0, kept), xo.index_select(0, kept)
            xg = xg.index_select(0, kept) if xg is not None else None
            row_scale = row_scale.index_select(0, kept) if row_scale is not None else None
        keep = None
    plan = _make_plan(xs, ws, bs, *options, compute=compute, group=group)
    loss_rows, (dx, dw, db) = _run_chunks(plan, (xs, ws, bs, xo, wo, bo, xg, wg, bg),
                                          grads=grads, row_scale=row_scale, keep=keep)
    if kept is not None:
        loss_rows = loss_rows.new_zeros(positions).index_copy(0, kept, loss_rows)
        if dx is not None:
            dx = dx.new_zeros((positions, dx.shape[1])).index_copy(0, kept, dx)
    return loss_rows, dx, dw, db


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


def _linear_rkl_loss_impl(
        xs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None, xo: torch.Tensor,
        wo: torch.Tensor, bo: torch.Tensor | None, xg: torch.Tensor | None,
        wg: torch.Tensor | None, bg: torch.Tensor | None, keep: torch.Tensor | None,
        alpha: float, temperature: float, reverse: bool, chunk_size: int,
        accum_dtype: torch.dtype | None, backend: str, compiled: str, per_row: bool,
        need_dx: bool, need_dw: bool, need_db: bool, drop_masked: bool,
        dx_dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None,
        group_name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of 2-D hidden states ``[positions, H]``: per position (``per_row``; 0 where ``keep``
    is False) or the sum over kept positions (0-d), and, unless ``per_row``, the gradient of
    that sum: ``dx`` ``[positions, H_s]`` in the hidden dtype, ``dw`` ``[V, H_s]`` and ``db``
    ``[V]`` in ``accum_dtype`` (or the weight's); empty tensors for those not asked for.
    ``chunk_size`` 0 picks :func:`default_chunk_size`. ``dx_dtype``: the dtype ``dx`` is kept
    in until backward (None: the compute dtype of ``xs``); the public function resolves it and
    ``accum_dtype`` before the call, so that a compiled graph names the dtypes of the gradient
    buffers it reads (torch.compile's caches key a graph by its operator calls and arguments,
    not by what the fake implementation returns). ``compute_dtype``: the dtype of the logits
    and the math (the loss's option; None: :func:`compute_dtype` of the weight's).
    ``group_name``: the weights are this rank's slice of the vocabulary and the chunk loop
    all-reduces over that process group (``tensor_parallel``)."""
    options = (alpha, temperature, reverse, chunk_size, accum_dtype, backend, compiled,
               per_row, need_dx, need_dw, need_db)
    inputs = (xs, ws, bs, xo, wo, bo, xg, wg, bg)
    loss_rows, dx, dw, db = _masked_run(inputs, keep, drop_masked, options, grads=not per_row,
                                        compute=compute_dtype,
                                        group=process_group(group_name))
    loss = loss_rows if per_row else loss_rows.sum()
    return loss, *_as_fake_says(xs, ws, bs, accum_dtype, dx_dtype, dx, dw, db, compute_dtype)


def _grad_dtypes(xs, ws, bs, accum_dtype, dx_dtype, compute=None):
    """The dtypes of the (dx, dw, db) buffers: dx in ``dx_dtype`` (None: the compute dtype of
    the hidden states; backward rounds it once to theirs), dw and db in ``accum_dtype`` (None:
    the compute dtype of the weight / bias). ``compute``: the loss's compute_dtype option."""
    return (dx_dtype or compute_dtype(xs.dtype, compute),
            accum_dtype or compute_dtype(ws.dtype, compute),
            accum_dtype or compute_dtype(bs.dtype, compute) if bs is not None else None)


def _as_fake_says(xs, ws, bs, accum_dtype, dx_dtype, dx, dw, db, compute=None):
    """The gradient buffers in the dtypes the fake implementation promises (a no-op unless a
    caller passed dtypes other than those the chunks compute in); empty tensors for None."""
    dtypes = _grad_dtypes(xs, ws, bs, accum_dtype, dx_dtype, compute)
    return tuple(like.new_empty(0) if t is None else t if t.dtype == dtype else t.to(dtype)
                 for t, like, dtype in zip((dx, dw, db), (xs, ws, ws), dtypes))


linear_rkl_loss_op = custom_op("linear_rkl_loss", _linear_rkl_loss_impl)


@linear_rkl_loss_op.register_fake
def _linear_rkl_loss_fake(xs, ws, bs, xo, wo, bo, xg, wg, bg, keep, alpha, temperature, reverse,
                          chunk_size, accum_dtype, backend, compiled, per_row, need_dx, need_dw,
                          need_db, drop_masked, dx_dtype=None, compute_dtype=None,
                          group_name=None):
    loss = xs.new_empty((xs.shape[0],) if per_row else (), dtype=accumulation_dtype(ws.dtype))
    return (loss, *_fake_grads(xs, ws, bs, accum_dtype, not per_row and need_dx,
                               not per_row and need_dw, not per_row and need_db, dx_dtype,
                               compute_dtype))


def _fake_grads(xs, ws, bs, accum_dtype, need_dx, need_dw, need_db, dx_dtype=None,
                compute=None):
    dx_type, dw_type, db_type = _grad_dtypes(xs, ws, bs, accum_dtype, dx_dtype, compute)
    dx = xs.new_empty(xs.shape, dtype=dx_type) if need_dx else xs.new_empty(0)
    dw = ws.new_empty(ws.shape, dtype=dw_type) if need_dw else ws.new_empty(0)
    db = (ws.new_empty(ws.shape[:1], dtype=db_type) if need_db and bs is not None
          else ws.new_empty(0))
    return dx, dw, db


def _linear_rkl_loss_backward_impl(
        xs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None, xo: torch.Tensor,
        wo: torch.Tensor, bo: torch.Tensor | None, xg: torch.Tensor | None,
        wg: torch.Tensor | None, bg: torch.Tensor | None, keep: torch.Tensor | None,
        grad_rows: torch.Tensor, alpha: float, temperature: float, reverse: bool,
        chunk_size: int, accum_dtype: torch.dtype | None, backend: str, compiled: str,
        need_dx: bool, need_dw: bool, need_db: bool, drop_masked: bool,
        dx_dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None,
        group_name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_i grad_rows[i] * loss_i`` (``reduction="none"``): the chunks are
    recomputed with each row of dL/dlogits scaled by its upstream gradient."""
    options = (alpha, temperature, reverse, chunk_size, accum_dtype, backend, compiled, True,
               need_dx, need_dw, need_db)
    inputs = (xs, ws, bs, xo, wo, bo, xg, wg, bg)
    _, dx, dw, db = _masked_run(inputs, keep, drop_masked, options, grads=True,
                                row_scale=grad_rows, compute=compute_dtype,
                                group=process_group(group_name))
    return _as_fake_says(xs, ws, bs, accum_dtype, dx_dtype, dx, dw, db, compute_dtype)


linear_rkl_loss_backward_op = custom_op("linear_rkl_loss_backward",
                                        _linear_rkl_loss_backward_impl)


@linear_rkl_loss_backward_op.register_fake
def _linear_rkl_loss_backward_fake(xs, ws, bs, xo, wo, bo, xg, wg, bg, keep, grad_rows, alpha,
                                   temperature, reverse, chunk_size, accum_dtype, backend,
                                   compiled, need_dx, need_dw, need_db, drop_masked,
                                   dx_dtype=None, compute_dtype=None, group_name=None):
    return _fake_grads(xs, ws, bs, accum_dtype, need_dx, need_dw, need_db, dx_dtype,
                       compute_dtype)


def _linear_setup_context(ctx, inputs, output):
    xs, ws, bs, xo, wo, bo, xg, wg, bg, keep, *options = inputs
    _, dx, dw, db = output
    ctx.mark_non_differentiable(dx, dw, db)
    # No zero-filled incoming gradients for the gradient buffers (never used).
    ctx.set_materialize_grads(False)
    ctx.options = tuple(options) + (None,) * (15 - len(options))   # defaults of the last
    ctx.save_for_backward(xs, ws, bs, xo, wo, bo, xg, wg, bg, keep)
    # Gradients of the sum, computed in forward; the first backward scales them by the scalar
    # grad_output (in place when eager: the buffers are private to this graph node).
    ctx.grads = None if options[7] else (dx, dw, db)


def _linear_backward(ctx, grad_loss, _gdx, _gdw, _gdb):
    xs, ws, bs, xo, wo, bo, xg, wg, bg, keep = ctx.saved_tensors
    (alpha, temperature, reverse, chunk_size, accum_dtype, backend, compiled, per_row,
     need_dx, need_dw, need_db, drop_masked, dx_dtype, compute_dtype, group_name) = ctx.options
    none = (None,) * 22                        # the mask and the options
    want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    want_db = bs is not None and ctx.needs_input_grad[2]
    if grad_loss is None or not (want_dx or want_dw or want_db):
        return (None, None, None, *none)
    if torch.is_grad_enabled():
        # create_graph=True (double backward, torch.func.grad): differentiable recomputation.
        if group_name:
            raise RuntimeError(f"{_FN}: vocabulary-sharded (DTensor) lm_heads support one "
                               f"backward; second derivatives (create_graph=True) and "
                               f"torch.func transforms are not implemented for them")
        dx, dw, db = _differentiable_linear_grads(xs, ws, bs, xo, wo, bo, xg, wg, bg, keep,
                                                  grad_loss, alpha, temperature, reverse,
                                                  compute_dtype)
    elif per_row:
        dx, dw, db = linear_rkl_loss_backward_op(
            xs, ws, bs, xo, wo, bo, xg, wg, bg, keep, grad_loss, alpha, temperature, reverse,
            chunk_size, accum_dtype, backend, compiled, want_dx, want_dw, want_db, drop_masked,
            dx_dtype, compute_dtype, group_name)
    else:
        if ctx.grads is None:
            raise RuntimeError(
                f"{_FN} computes the gradient during the forward pass and supports one "
                f"backward pass per forward for reduction='mean'/'sum'; recompute the loss, "
                f"or use reduction='none' (recomputes in backward) or backend='reference'")
        (dx, dw, db), ctx.grads = ctx.grads, None
        if tracing(grad_loss):
            dx, dw, db = (torch.mul(t, grad_loss).to(t.dtype) for t in (dx, dw, db))
        else:
            for grad in (dx, dw, db):
                grad.mul_(grad_loss)
    # Each gradient is rounded to its parameter's dtype once, after the scaling.
    return (_cast(dx, xs.dtype) if want_dx else None, _cast(dw, ws.dtype) if want_dw else None,
            _cast(db, bs.dtype) if want_db else None, *none)


def _differentiable_linear_grads(xs, ws, bs, xo, wo, bo, xg, wg, bg, keep, grad_loss, alpha,
                                 temperature, reverse, compute=None):
    """(dx, dw, db) of the loss with differentiable ops on the full logits (double backward):
    the logits in the compute dtype, then the chunk loop's per-row math
    (``torch_backend.rkl_rows``, differentiable form) on all rows at once."""
    compute = compute_dtype(ws.dtype, compute)

    def logits(x, w, b):
        return torch.nn.functional.linear(x.to(compute), w.to(compute),
                                          b.to(compute) if b is not None else None)

    dlogits = differentiable_rows_grad(logits(xs, ws, bs), logits(xo, wo, bo),
                                       logits(xg, wg, bg) if xg is not None else None, keep,
                                       alpha, temperature, reverse, compute)
    dlogits = dlogits * (grad_loss.unsqueeze(-1) if grad_loss.dim() else grad_loss)
    xs_kept = torch.where(keep.unsqueeze(-1), xs, 0.0) if keep is not None else xs
    dx = (dlogits @ ws.to(compute)).to(xs.dtype)
    dw = dlogits.t() @ xs_kept.to(compute)
    db = dlogits.sum(0) if bs is not None else None
    return dx, dw, db


linear_rkl_loss_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)
linear_rkl_loss_op.register_vmap(functools.partial(vmap_by_loop, linear_rkl_loss_op))
_LinearRKLFunction = function_route(linear_rkl_loss_op, _linear_setup_context, _linear_backward,
                                    "_LinearRKLFunction")


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _run_chunks(plan: _Plan, inputs, *, grads: bool, row_scale: torch.Tensor | None = None,
                keep: torch.Tensor | None = None):
    """One pass over the kept rows, ``plan.chunk_size`` at a time.

    Returns the loss per row (float32, float64 for a float64 student) and, when ``grads``,
    ``(dx, dw, db)``: dL/d student hidden ``[n, H_s]`` in the compute dtype, and the weight and
    bias gradients in the accumulation dtype (None for those the plan does not ask for); the
    caller rounds each once to its parameter's dtype. Each row's dL/dlogits is multiplied by
    ``row_scale[row]`` when given (``reduction="none"``'s backward). Rows where the bool mask
    ``keep`` is False get loss 0 and contribute exactly nothing to any gradient (NaN hidden
    states or logits there included: they are zeroed before the weight-gradient GEMM).

    The one chunk loop of the loss, single-device and vocabulary-parallel: with ``plan.group``
    the weights are this rank's vocabulary slice, the vocabulary pass all-reduces a few floats
    per row (``torch_backend.rkl_rows``) and ``dx``, a sum over the slices, is all-reduced once.
    """
    xs, ws, bs, xo, wo, bo, xg, wg, bg = inputs
    need_dx, need_dw, need_db = (grads and plan.need_dx, grads and plan.need_dw,
                                 grads and plan.need_db)
    need_grad = need_dx or need_dw or need_db
    rows, vocab = xs.shape[0], ws.shape[0]
    device = xs.device
    compute = plan.compute
    student_head, original_head = _Head(xs, ws, bs, compute), _Head(xo, wo, bo, compute)
    strengthened_head = (_Head(xg, wg, bg, compute, original_head) if xg is not None
                         else None)
    loss_rows = torch.empty(rows, dtype=accumulation_dtype(ws.dtype), device=device)
    dx = (torch.empty(xs.shape, dtype=compute_dtype(xs.dtype, compute), device=device)
          if need_dx else None)
    dw = (torch.zeros(ws.shape, dtype=plan.accum_dtype or compute_dtype(ws.dtype, compute),
                      device=device) if need_dw else None)
    db = (torch.zeros(vocab, dtype=plan.accum_dtype or compute_dtype(bs.dtype, compute),
                      device=device) if need_db else None)
    for start in range(0, rows, plan.chunk_size):
        stop = min(start + plan.chunk_size, rows)
        student = student_head.logits(start, stop)
        original = original_head.logits(start, stop)
        strengthened = (strengthened_head.logits(start, stop) if strengthened_head is not None
                        else None)
        scale = row_scale[start:stop] if row_scale is not None else None
        loss_rows[start:stop], dlogits = _vocabulary_pass(plan, student, original, strengthened,
                                                          need_grad, scale)
        kept = keep[start:stop] if keep is not None else None
        if kept is not None:
            _zero_masked_rows(kept, loss_rows[start:stop], dlogits)
        del student, original, strengthened      # free the chunk's logits before the grad GEMMs
        if not need_grad:
            continue
        if need_db:
            db.add_(dlogits.sum(0))
        student_head.gradient_gemms(dlogits, start, stop, dx, dw, kept)
    if dx is not None and plan.group is not None:
        _all_reduce(dx, plan.group)              # dX = sum over the vocabulary slices
    return loss_rows, (dx, dw, db)


def _zero_masked_rows(keep: torch.Tensor, loss: torch.Tensor, dlogits: torch.Tensor | None):
    loss.masked_fill_(~keep, 0.0)
    if dlogits is not None:
        dlogits.masked_fill_(~keep.unsqueeze(1), 0.0)


def _kept_rows(x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """``x`` with masked rows (``kept`` False) set to 0, without a host sync: their dL/dlogits
    is 0, but 0 x NaN is NaN in the weight-gradient GEMM (padding may hold anything)."""
    return x if kept is None else torch.where(kept.unsqueeze(1), x, 0.0)


def gemm_mode(dtype: torch.dtype, device: torch.device, compute: torch.dtype | None = None
              ) -> str:
    """How the GEMMs of an lm_head with ``dtype`` weights on ``device`` produce logits in the
    compute dtype ``compute`` (default :func:`compute_dtype` of ``dtype``: float32, float64 for
    float64), so that logits are never rounded to a low-precision dtype before the softmax:

    - ``"native"``: the weights are in the compute dtype (float32 by default, float64); the
      GEMMs run in it (on CUDA, float32 GEMMs follow torch's TF32 settings).
    - ``"fp32_out"``: float16/bfloat16 computed in float32 on CUDA: GEMMs in the input dtype
      with float32 accumulation and float32 output (``torch.mm(..., out_dtype=torch.float32)``).
    - ``"upcast"``: the weight is converted to the compute dtype once per call and the hidden
      rows chunk by chunk: float16/bfloat16 off CUDA (or with a torch that lacks
      ``out_dtype``), and any head with ``compute_dtype=torch.float64`` (GEMMs, vocabulary
      pass and gradients in float64). Products of float16/bfloat16 numbers are exact in
      float32, so float32 upcasting computes what ``"fp32_out"`` computes (a CPU's bf16 GEMMs
      would round their output to bf16, and on AVX2 they run about 10x slower than float32).
    """
    compute = compute_dtype(dtype, compute)
    if dtype == compute:
        return "native"
    if (compute == torch.float32 and dtype in (torch.float16, torch.bfloat16)
            and _fp32_out_gemms(torch.device(device))):
        return "fp32_out"
    return "upcast"


def _fp32_out_gemms(device: torch.device) -> bool:
    """Whether float16/bfloat16 GEMMs with float32 output, accumulating into a float32 ``out``,
    run on ``device``: CUDA with a torch whose ``mm``/``addmm`` take ``out_dtype``."""
    if device.type != "cuda" or "dtype_out" not in torch.ops.aten.addmm.overloads():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe_fp32_out_gemms(index)


@functools.lru_cache(maxsize=None)
def _probe_fp32_out_gemms(device_index: int) -> bool:
    # Some torch builds take out_dtype but refuse a float32 accumulator in addmm (they require
    # it in the operands' dtype): ask the device once rather than parse version strings.
    device = torch.device("cuda", device_index)
    a = torch.ones((1, 1), dtype=torch.bfloat16, device=device)
    acc = torch.zeros((1, 1), dtype=torch.float32, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


class _Head:
    """One model's lm_head in the chunk loop: logits of rows ``[start, stop)`` in the compute
    dtype and, for the student, the gradient GEMMs, in the :func:`gemm_mode` of its dtype,
    device and compute dtype."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 compute: torch.dtype, sharing: _Head | None = None):
        self.compute = compute_dtype(weight.dtype, compute)
        self.mode = gemm_mode(weight.dtype, weight.device, self.compute)
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.source = (weight, bias)
        if self.mode == "upcast":
            if sharing is not None and sharing.source[0] is weight:
                self.weight = sharing.weight      # one wide copy of a shared lm_head
            else:
                self.weight = weight.to(self.compute)
            if bias is not None:
                self.bias = (sharing.bias if sharing is not None and sharing.source[1] is bias
                             else bias.to(self.compute))

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        x = self.hidden[start:stop]
        return x.to(self.compute) if self.mode == "upcast" else x

    def logits(self, start: int, stop: int) -> torch.Tensor:
        x, weight, bias = self._rows(start, stop), self.weight, self.bias
        if self.mode == "fp32_out":
            return _mm_fp32(x, weight.t(), bias)
        return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())

    def gradient_gemms(self, dlogits: torch.Tensor, start: int, stop: int,
                       dx: torch.Tensor | None, dw: torch.Tensor | None,
                       kept: torch.Tensor | None = None) -> None:
        """``dx[start:stop] = dlogits @ W`` and ``dw += dlogits^T x[start:stop]`` (each when not
        None) from the chunk's dL/dlogits in the compute dtype, which this may overwrite.
        ``dx`` is in the compute dtype; ``dw`` too, or in the dtype the caller chose. Rows where
        ``kept`` is False (dL/dlogits 0 there) have their hidden states zeroed for dW."""
        x = _kept_rows(self._rows(start, stop), kept) if dw is not None else None
        if self.mode != "fp32_out":
            if dw is not None:
                # In the accumulator's dtype, straight into it (no [V, H] temporary).
                dw.addmm_(dlogits.to(dw.dtype).t(), x.to(dw.dtype))
            if dx is not None:
                torch.mm(dlogits.to(self.weight.dtype), self.weight, out=dx[start:stop])
            return
        # Low-precision GEMMs need dL/dlogits in the weight's dtype. Rounded once, it costs dW
        # about one more rounding's worth of error (1.4x that of rounding the exact dW). dX =
        # dlogits @ W sums V terms that largely cancel (a row of dlogits sums to 0 and lm_head
        # rows share a mean direction), which magnifies the same rounding past 2x; so dX gets
        # dlogits as two terms, hi + lo (16 significant bits), each a float32-accumulated GEMM.
        low = self.weight.dtype
        hi = dlogits.to(low)
        if dw is not None:
            if dw.dtype == torch.float32:
                _addmm_fp32_(dw, hi.t(), x)
            elif dw.dtype == low:
                dw.addmm_(hi.t(), x)
            else:
                dw.addmm_(dlogits.to(dw.dtype).t(), x.to(dw.dtype))
        if dx is not None:
            lo = dlogits.sub_(hi).to(low)          # the remainder is exact in float32
            out = dx[start:stop]
            out.copy_(_mm_fp32(hi, self.weight))
            _addmm_fp32_(out, lo, self.weight)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` of float16/bfloat16 operands, accumulated and returned in float32.
    Off CUDA (tests of the CUDA scheme) it is emulated by upcasting, which computes the same
    (products of float16/bfloat16 numbers are exact in float32)."""
    if a.device.type == "cuda":
        out = torch.mm(a, b, out_dtype=torch.float32)
        # The bias separately: some torch builds size addmm(out_dtype=...)'s result by the
        # bias's shape, so a (V,) bias would not broadcast.
        return out.add_(bias) if bias is not None else out
    if bias is not None:
        return torch.addmm(bias.float(), a.float(), b.float())
    return torch.mm(a.float(), b.float())


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into a float32 ``acc`` from float16/bfloat16 operands, accumulated in
    float32 (emulated by upcasting off CUDA, as in :func:`_mm_fp32`)."""
    if acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _vocabulary_pass(plan: _Plan, student, original, strengthened, need_grad: bool,
                     row_scale: torch.Tensor | None):
    """Loss per row of one chunk's logits and, if ``need_grad``, dL/d student logits with row
    ``r`` multiplied by ``row_scale[r]`` (1 when None)."""
    if plan.backend == "triton":
        from .triton_backend import triton_rkl_backward, triton_rkl_forward
        # The logits' dtype is the compute dtype. The float32 logits of float16/bfloat16 heads
        # take the plain float32 code (their contract is the 16-bit rounding floor); those of
        # float32 heads the PRECISE one (the float32 rule).
        hyper = (plan.alpha, plan.temperature, plan.reverse)
        loss, stats = triton_rkl_forward(student, original, strengthened, None, *hyper,
                                         compute=student.dtype, precise=plan.precise)
        if not need_grad:
            return loss, None
        if row_scale is None:
            row_scale = loss.new_ones(()).expand(loss.shape[0])
        return loss, triton_rkl_backward(student, original, strengthened, None, stats,
                                         row_scale, *hyper, compute=student.dtype,
                                         precise=plan.precise)
    # rkl_rows makes a dozen elementwise passes over its rows; a few rows at a time they stay
    # in the CPU's caches instead of streaming through memory.
    # The logits come in the compute dtype, which is what rkl_rows computes in. Under
    # plan.group every rank makes the same calls (rows_per_pass is sized alike).
    rows, vocab = student.shape
    loss = torch.empty(rows, dtype=student.dtype, device=student.device)
    grad = (torch.empty((rows, vocab), dtype=student.dtype, device=student.device)
            if need_grad else None)
    for start in range(0, rows, plan.rows_per_pass):
        part = slice(start, start + plan.rows_per_pass)
        loss[part], _ = run_rkl_rows(plan.compile, student[part], original[part],
                                     strengthened[part] if strengthened is not None else None,
                                     plan.alpha, plan.temperature, plan.reverse, need_grad,
                                     grad_out=grad[part] if grad is not None else None,
                                     caller=_FN, compute=student.dtype, group=plan.group)
    if grad is not None and row_scale is not None:
        grad.mul_(row_scale.unsqueeze(1))
    return loss, grad


def _validate(student_hidden, student_weight, student_bias, original_hidden, original_weight,
              original_bias, strengthened_hidden, strengthened_weight, strengthened_bias,
              labels, chunk_size, accum_dtype, compiled, fn: str = _FN,
              ignore_index: int | None = None) -> None:
    """Raise a clear error for every input the loss cannot use. The strengthened weight and
    bias are the resolved ones (the original head's when the strengthened head is shared)."""
    heads = [("student", student_hidden, student_weight, student_bias),
             ("original", original_hidden, original_weight, original_bias)]
    if strengthened_hidden is not None:
        heads.append(("strengthened", strengthened_hidden, strengthened_weight, strengthened_bias))
    for model, hidden, weight, bias in heads:
        _checks.check_float_tensor(fn, f"{model}_hidden", hidden)
        _checks.check_float_tensor(fn, f"{model}_weight", weight)
        if bias is not None:
            _checks.check_float_tensor(fn, f"{model}_bias", bias)
    vocab = student_weight.shape[0] if student_weight.dim() == 2 else None
    if vocab == 0:
        raise ValueError(f"{fn}: the vocabulary size V (rows of the weights) must be at least 1; "
                         f"got student_weight of shape {tuple(student_weight.shape)}")
    for model, hidden, weight, bias in heads:
        if weight.dim() != 2:
            raise ValueError(f"{fn}: {model}_weight must be a 2-D (V, H) lm_head weight; got "
                             f"shape {tuple(weight.shape)}")
        if hidden.dim() == 0:
            raise ValueError(f"{fn}: {model}_hidden must have shape (..., H); got a 0-d tensor")
        if hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"{fn}: {model}_hidden's last dimension must equal the hidden size "
                             f"of {model}_weight (V, H) = {tuple(weight.shape)}, i.e. "
                             f"{weight.shape[1]}; got {model}_hidden of shape "
                             f"{tuple(hidden.shape)}")
        if weight.shape[0] != vocab:
            raise ValueError(f"{fn}: every lm_head must have the student's vocabulary size "
                             f"V = {vocab}; got {model}_weight of shape {tuple(weight.shape)}"
                             + _checks.PADDING_HINT)
        if hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(f"{fn}: {model}_hidden must have the token shape of student_hidden, "
                             f"{tuple(student_hidden.shape[:-1])} (+ hidden size); got "
                             f"{tuple(hidden.shape)}")
        if bias is not None and tuple(bias.shape) != (vocab,):
            raise ValueError(f"{fn}: {model}_bias must have shape (V,) = ({vocab},); got "
                             f"{tuple(bias.shape)}")
        if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
            got = f"hidden {hidden.dtype}, weight {weight.dtype}"
            got += f", bias {bias.dtype}" if bias is not None else ""
            raise TypeError(f"{fn}: the {model} model's hidden states, weight and bias must share "
                            f"one dtype (cast them, e.g. hidden.to(weight.dtype)); got {got}")
    for model, hidden, weight, bias in heads[1:]:
        for part, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            if t is not None:
                _checks.check_frozen(fn, f"{model}_{part}", t)
    _checks.check_labels(fn, labels, student_hidden.shape[:-1], "student_hidden (without H)",
                         ignore_index)
    named = {f"{model}_{part}": t for model, *tensors in heads
             for part, t in zip(("hidden", "weight", "bias"), tensors)}
    named["labels"] = labels
    _checks.check_same_device(fn, named)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be None (chosen from a memory budget) or an "
                         f"int >= 1 (tokens per chunk); got {chunk_size!r}")
    if accum_dtype is not None:
        if not isinstance(accum_dtype, torch.dtype) or not accum_dtype.is_floating_point:
            raise TypeError(f"{fn}: accum_dtype must be None or a floating torch.dtype such as "
                            f"torch.float32; got {accum_dtype!r}")
        if torch.promote_types(accum_dtype, student_weight.dtype) != accum_dtype:
            raise ValueError(f"{fn}: accum_dtype must be at least as precise as student_weight "
                             f"({student_weight.dtype}); got {accum_dtype}")
    check_compiled_arg(fn, compiled)


def fused_linear_rkl_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                          original_hidden: torch.Tensor, original_weight: torch.Tensor,
                          strengthened_hidden: torch.Tensor | None = None,
                          strengthened_weight: torch.Tensor | None = None, *,
                          student_bias: torch.Tensor | None = None,
                          original_bias: torch.Tensor | None = None,
                          strengthened_bias: torch.Tensor | None = None,
                          alpha: float = 8.0, labels: torch.Tensor | None = None,
                          ignore_index: int = -100, temperature: float = 1.0,
                          direction: str = "reverse", reduction: str = "mean",
                          chunk_size: int | None = None, accum_dtype: torch.dtype | None = None,
                          backend: str = "auto", compiled: bool | None = None,
                          drop_masked: bool = True, vocab_size: int | None = None,
                          compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`~rkld_kernels.fused_rkl_loss` of the logits ``hidden @ weight.T + bias`` of the
    three models, without ever building a ``[tokens, V]`` tensor.

    The kept tokens are processed ``chunk_size`` at a time (see the module docstring for the
    algorithm); peak extra memory is a few float32 ``[chunk, V]`` buffers plus the ``[V, H]``
    weight gradient and the ``[tokens, H]`` hidden gradient (both float32 until the backward
    rounds them to the parameters' dtypes), whatever the number of tokens. Off CUDA, each
    float16/bfloat16 lm_head weight is also converted to float32 once per call (``V x H x 4``
    bytes; see :func:`gemm_mode`). With ``compute_dtype=torch.float64`` the buffers and
    gradients are float64 and every head is converted to float64 once per call.

    Precision contract (torch and triton backends; ``reference`` computes naively in the
    inputs' dtype): for float16/bfloat16/float32 inputs the loss (float32) is within 1e-3
    relative of the float64 loss of the same rounded inputs (or 1e-6 absolute when smaller)
    and never negative; each gradient of float16/bfloat16 inputs is within 2x the error of
    rounding the exact gradient to its dtype, each of float32 inputs within 2x the error of
    the naive float32 formula (float32 GEMMs and math; on CUDA they follow torch's TF32
    settings), or of the float32 rounding floor with ``compute_dtype=torch.float64``; float64
    inputs are float64 throughout. Logits are never rounded to a low-precision dtype (see the
    module docstring).

    Args:
        student_hidden: ``(..., H_s)`` input of the student's lm_head (float32 / bfloat16 /
            float16 / float64).
        student_weight: ``(V, H_s)`` student lm_head weight, same dtype as ``student_hidden``.
        original_hidden, original_weight: ``(..., H_t)`` and ``(V, H_t)``: the original model's
            lm_head input and weight (frozen).
        strengthened_hidden: ``(..., H_t)`` lm_head input of the strengthened model (frozen), or
            None: the teacher is then the original model itself (plain distillation).
        strengthened_weight: ``(V, H_t)``, or None when the strengthened model shares the
            original's lm_head (then ``strengthened_bias=None`` also means the original's bias).
        student_bias, original_bias, strengthened_bias: optional ``(V,)`` lm_head biases.
        alpha, labels, ignore_index, temperature, direction, reduction: as in
            :func:`~rkld_kernels.fused_rkl_loss`. ``labels`` has the token shape ``(...)``.
            Masked tokens are dropped before any matmul (see ``drop_masked``).
        chunk_size: tokens per chunk; None picks :func:`default_chunk_size` from a per-device
            memory budget.
        accum_dtype: dtype of the weight/bias gradient accumulators. None (default): float32
            for a float16/bfloat16 lm_head (the gradient is summed over chunks in float32 and
            rounded once at the end, as the precision contract needs), float32 for float32 heads,
            float64 for float64 ones and under ``compute_dtype=torch.float64`` (the compute
            dtype). ``torch.bfloat16`` for a bfloat16 head halves the accumulator's memory
            but rounds after every chunk, so the weight gradient drifts beyond the contract
            when there is more than one chunk.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere), ``"triton"`` (chunk logits by
            matmul, vocabulary part by the Triton kernels), ``"torch"`` (vocabulary part by
            chunked PyTorch) or ``"reference"`` (materialises all logits and calls
            ``fused_rkl_loss(backend="reference")``; the specification, for tests).
        compiled: torch backend: run the vocabulary pass (rkl_rows) through ``torch.compile``,
            which fuses its elementwise passes (on CPU about 1.8x faster per element, after a
            one-off compilation of about ten seconds per process). None: on CPU for calls with
            at least 2**25 kept-token x V elements, falling back to eager PyTorch with a
            warning if compilation fails; True: always (failures raise); False: never. The
            first compiled call logs one "graph break" note from torch.compile (rkl_rows checks
            its fast path on the host); it is expected.
        drop_masked: True (default): masked tokens are dropped before the GEMMs, so they cost
            nothing; finding them is one ``nonzero``, a host sync on CUDA. False: every token
            goes through the GEMMs and masked ones are zeroed, with no host sync (for CUDA
            graph capture; costs the masked tokens' share of the compute).
        vocab_size: use only the first ``vocab_size`` rows of every lm_head weight (and bias),
            for models whose vocabularies differ only by padding (e.g. 152064 vs 151936 rows).
            None: every weight must have the student's number of rows.
        compute_dtype: the dtype of the logits and of the arithmetic inside, on every backend
            (torch, triton, vocabulary-parallel). None (default): float32 for
            float16/bfloat16/float32 heads, float64 for float64 ones.
            ``torch.float64``: float64 GEMMs, vocabulary pass and gradient accumulators, for
            the last digits of float32 inputs; measured on this project's CPU it costs about
            2.8x the float32 default's time and twice its chunk memory plus a float64 copy of
            each head (on GPUs, their float64 GEMM rate).

    Returns:
        The loss in float32 (float64 when the student is float64); shape ``(...)`` for
        ``reduction="none"``, else a scalar.

    Gradients reach ``student_hidden`` and, when they require grad, ``student_weight`` and
    ``student_bias``; teachers must not require grad. With ``mean``/``sum`` the gradient is
    computed during the forward pass (one backward per forward); with ``none`` the backward
    recomputes the chunks to honour a per-position ``grad_output`` exactly. A backward with
    ``create_graph=True`` (second derivatives) and ``torch.func`` transforms recompute the
    gradient from the full logits with differentiable PyTorch ops: exact, with the naive
    formula's memory.

    The loss is the custom operator ``torch.ops.rkld.linear_rkl_loss``: ``torch.compile``
    (``fullgraph=True``) traces it without a graph break and runs its backward compiled.
    Weights given as DTensors sharded over the vocabulary (``Shard(0)``, tensor parallelism)
    are handled by :func:`rkld_kernels.tensor_parallel.vocab_parallel_linear_rkl_loss`.
    """
    _checks.check_options(_FN, alpha=alpha, temperature=temperature, direction=direction,
                          reduction=reduction, backend=backend)
    check_compute_dtype(_FN, compute_dtype, getattr(student_weight, "dtype", None))
    if not isinstance(drop_masked, bool):
        raise TypeError(f"{_FN}: drop_masked must be True or False; got {drop_masked!r}")
    if strengthened_hidden is None and (strengthened_weight is not None
                                        or strengthened_bias is not None):
        raise ValueError(f"{_FN}: strengthened_weight/strengthened_bias were given without "
                         f"strengthened_hidden; pass the strengthened model's hidden states too, "
                         f"or neither (the teacher is then the original model)")
    if strengthened_hidden is not None and strengthened_weight is None:
        strengthened_weight = original_weight      # one lm_head shared by both teachers
        if strengthened_bias is None:
            strengthened_bias = original_bias
    heads = (student_weight, student_bias, original_weight, original_bias, strengthened_weight,
             strengthened_bias)
    if any(is_dtensor(t) for t in heads):
        return vocab_parallel_linear_rkl_loss(
            student_hidden, student_weight, original_hidden, original_weight,
            strengthened_hidden, strengthened_weight, student_bias=student_bias,
            original_bias=original_bias, strengthened_bias=strengthened_bias, alpha=alpha,
            labels=labels, ignore_index=ignore_index, temperature=temperature,
            direction=direction, reduction=reduction, chunk_size=chunk_size,
            accum_dtype=accum_dtype, backend=backend, vocab_size=vocab_size,
            compute_dtype=compute_dtype, drop_masked=drop_masked)
    if vocab_size is not None:
        named = {"student_weight": student_weight, "original_weight": original_weight,
                 "strengthened_weight": strengthened_weight}
        _checks.check_vocab_size(_FN, vocab_size, {name: w.shape[0] for name, w in named.items()
                                                   if isinstance(w, torch.Tensor) and w.dim()})
        (student_weight, student_bias, original_weight, original_bias, strengthened_weight,
         strengthened_bias) = (t[:vocab_size] if isinstance(t, torch.Tensor) and t.dim() else t
                               for t in heads)
    _validate(student_hidden, student_weight, student_bias, original_hidden, original_weight,
              original_bias, strengthened_hidden, strengthened_weight, strengthened_bias,
              labels, chunk_size, accum_dtype, compiled, ignore_index=ignore_index)
    device = student_hidden.device
    backend = resolve_backend(backend, device)

    if backend == "reference":
        def logits(hidden, weight, bias):
            return torch.nn.functional.linear(hidden, weight, bias)
        return fused_rkl_loss(
            logits(student_hidden, student_weight, student_bias),
            logits(original_hidden, original_weight, original_bias),
            logits(strengthened_hidden, strengthened_weight, strengthened_bias)
            if strengthened_hidden is not None else None,
            alpha=alpha, labels=labels, ignore_index=ignore_index, temperature=temperature,
            direction=direction, reduction=reduction, backend="reference")

    leading_shape = student_hidden.shape[:-1]
    xs = student_hidden.reshape(-1, student_hidden.shape[-1])
    xo = original_hidden.reshape(-1, original_hidden.shape[-1])
    xg = (strengthened_hidden.reshape(-1, strengthened_hidden.shape[-1])
          if strengthened_hidden is not None else None)
    keep = labels.reshape(-1) != ignore_index if labels is not None else None
    return run_linear_rkl_loss(
        xs, student_weight, student_bias, xo, original_weight, original_bias, xg,
        strengthened_weight, strengthened_bias, keep, leading_shape, alpha=alpha,
        temperature=temperature, direction=direction, reduction=reduction,
        chunk_size=chunk_size, accum_dtype=accum_dtype, backend=backend, compiled=compiled,
        drop_masked=drop_masked, compute_dtype=compute_dtype)


def run_linear_rkl_loss(xs, ws, bs, xo, wo, bo, xg, wg, bg, keep, leading_shape, *, alpha,
                        temperature, direction, reduction, chunk_size, accum_dtype, backend,
                        compiled, drop_masked, compute_dtype, group_name=None) -> torch.Tensor:
    """The loss of validated 2-D hidden states through the operator, reduced: the one route of
    the single-device and the vocabulary-parallel (``group_name``) fused-linear loss."""
    # Under torch.func transforms the backward recomputes differentiably (see _custom_ops), so
    # the forward skips the fused gradient.
    functorch = functorch_active()
    grad_enabled = torch.is_grad_enabled() and not functorch
    compute = compute_dtype_of(ws.dtype, compute_dtype)
    args = (xs, ws, bs, xo, wo, bo, xg, wg, bg, keep, float(alpha), float(temperature),
            direction == "reverse", chunk_size or 0, accum_dtype or compute, backend,
            COMPILED_CODES[compiled], reduction == "none", grad_enabled and xs.requires_grad,
            grad_enabled and ws.requires_grad,
            grad_enabled and bs is not None and bs.requires_grad,
            drop_masked, compute_dtype_of(xs.dtype, compute_dtype), compute,
            group_name)
    loss = (_LinearRKLFunction.apply(*args) if functorch else linear_rkl_loss_op(*args))[0]
    if reduction == "none":
        return loss.reshape(leading_shape)
    if reduction == "sum":
        return loss
    return loss / mean_divisor(keep, xs.shape[0], loss.dtype, loss.device)


class LinearRKLLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_rkl_loss`, in the style of ``torch.nn`` losses.

    Options go to ``__init__``; ``forward(student_hidden, student_weight, original_hidden,
    original_weight, strengthened_hidden=None, strengthened_weight=None, labels=None, *,
    student_bias=None, original_bias=None, strengthened_bias=None)`` takes the tensors. The
    module holds no parameters: to run the loss where a sharded lm_head is gathered (FSDP2,
    ZeRO-3), see :class:`rkld_kernels.distributed.LMHeadRKLLoss`.
    """

    def __init__(self, alpha: float = 8.0, temperature: float = 1.0, direction: str = "reverse",
                 reduction: str = "mean", ignore_index: int = -100,
                 chunk_size: int | None = None, accum_dtype: torch.dtype | None = None,
                 backend: str = "auto", compiled: bool | None = None,
                 drop_masked: bool = True, vocab_size: int | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        _checks.check_options("LinearRKLLoss", alpha=alpha, temperature=temperature,
                              direction=direction, reduction=reduction, backend=backend)
        check_compiled_arg("LinearRKLLoss", compiled)
        _checks.check_module_options("LinearRKLLoss", ignore_index=ignore_index,
                                     vocab_size=vocab_size, chunk_size=chunk_size,
                                     accum_dtype=accum_dtype, drop_masked=drop_masked)
        check_compute_dtype("LinearRKLLoss", compute_dtype)
        self.compute_dtype = compute_dtype
        self.alpha, self.temperature, self.direction = alpha, temperature, direction
        self.reduction, self.ignore_index, self.chunk_size = reduction, ignore_index, chunk_size
        self.accum_dtype, self.backend, self.compiled = accum_dtype, backend, compiled
        self.drop_masked, self.vocab_size = drop_masked, vocab_size

    def forward(self, student_hidden, student_weight, original_hidden, original_weight,
                strengthened_hidden=None, strengthened_weight=None, labels=None, *,
                student_bias=None, original_bias=None, strengthened_bias=None):
        return fused_linear_rkl_loss(
            student_hidden, student_weight, original_hidden, original_weight,
            strengthened_hidden, strengthened_weight, student_bias=student_bias,
            original_bias=original_bias, strengthened_bias=strengthened_bias, alpha=self.alpha,
            labels=labels, ignore_index=self.ignore_index, temperature=self.temperature,
            direction=self.direction, reduction=self.reduction, chunk_size=self.chunk_size,
            accum_dtype=self.accum_dtype, backend=self.backend,
            compiled=self.compiled, drop_masked=self.drop_masked, vocab_size=self.vocab_size,
            compute_dtype=self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, temperature={self.temperature}, "
                f"direction={self.direction!r}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, chunk_size={self.chunk_size}, "
                f"accum_dtype={self.accum_dtype}, backend={self.backend!r}, "
                f"compiled={self.compiled}, drop_masked={self.drop_masked}, "
                f"vocab_size={self.vocab_size}, compute_dtype={self.compute_dtype}")
