"""``fused_rkl_loss``: reverse (or forward) KL to the RKLD unlearning teacher, from logits."""
from __future__ import annotations

import functools

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
    upstream_per_row,
    vmap_by_loop,
)
from .reference import reference_rkl_loss
from .tensor_parallel import is_dtensor, vocab_parallel_rkl_loss
from .torch_backend import (
    accumulation_dtype,
    check_compiled_arg,
    check_compute_dtype,
    compute_dtype,
    differentiable_rows_grad,
    host_reads_allowed,
    rkl_loss_and_grad,
)

_FN = "fused_rkl_loss"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend and check that the chosen one can run here."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        from .triton_backend import check_triton_usable
        check_triton_usable(device)
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The operator: rkld::rkl_loss (reduced loss of 2-D logits, plus what the backward needs)
# ---------------------------------------------------------------------------------------------
def _rkl_loss_impl(student: torch.Tensor, original: torch.Tensor,
                   strengthened: torch.Tensor | None, keep: torch.Tensor | None, alpha: float,
                   temperature: float, reverse: bool, reduction: str, backend: str,
                   compiled: str, need_grad: bool, saved_dtype: torch.dtype | None = None,
                   compute_dtype: torch.dtype | None = None, group_name: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of ``[rows, V]`` logits after ``reduction`` (0-d, or ``[rows]`` for ``none``) and
    ``saved``: what the backward needs when ``need_grad``, else an empty tensor.

    torch backend: ``saved`` is the gradient itself, computed in the same pass as the loss and
    already scaled for the reduction (1/count for ``mean``), so the usual ``loss.backward()``
    costs no further pass over ``[rows, V]``. triton backend: ``saved`` is the kernels' per-row
    statistics; the gradient kernel runs in backward. ``compiled``: "auto", "always" or "never"
    (the losses' ``compiled=None/True/False``). ``saved_dtype``: the dtype of ``saved``
    (:func:`saved_dtype_of`, which None means); the public function passes it explicitly so
    that a compiled graph names it (see :func:`saved_dtype_of`). ``compute_dtype``: the dtype
    of the math (the losses' option; None: :func:`~rkld_kernels.torch_backend.compute_dtype`
    of the student's). ``group_name``: the rows are this rank's slice of the vocabulary and
    the chunk loop all-reduces over that process group (``tensor_parallel``; torch backend).
    """
    rows = student.shape[0]
    _checks.check_operator_args("torch.ops.rkld.rkl_loss", rows=rows, keep=keep, alpha=alpha,
                                temperature=temperature, reduction=reduction, backend=backend)
    _checks.check_choice("torch.ops.rkld.rkl_loss", "compiled", compiled,
                         tuple(COMPILED_FROM_CODE))
    compute = _compute_dtype(student.dtype, compute_dtype)
    if backend == "triton":
        from .triton_backend import triton_rkl_forward
        loss_rows, (stats,) = triton_rkl_forward(student, original, strengthened, keep, alpha,
                                                 temperature, reverse, compute=compute)
        saved = stats if need_grad else student.new_empty(0)
    else:
        # mean/sum: the gradient is pre-scaled by the presumed upstream gradient (a 0-d tensor:
        # no host read, one compiled graph for all counts) and rounded once to the student's
        # dtype; none: kept in the compute dtype until backward's scaling (one rounding).
        # The scale in the compute dtype: a float32 1/count would add its own rounding.
        scale = None
        if reduction == "mean":
            scale = 1.0 / mean_divisor(keep, rows, compute, student.device)
        elif reduction == "sum":
            scale = torch.ones((), dtype=compute, device=student.device)
        loss_rows, grad = rkl_loss_and_grad(student, original, strengthened, keep, alpha,
                                            temperature, reverse, need_grad,
                                            compiled=COMPILED_FROM_CODE[compiled],
                                            grad_scale=scale, compute=compute,
                                            group=process_group(group_name))
        saved = grad if grad is not None else student.new_empty(0)
    wanted = saved_dtype or saved_dtype_of(student.dtype, reduction, backend, compute)
    if need_grad and saved.dtype != wanted:
        saved = saved.to(wanted)
    return reduce_rows(loss_rows, keep, reduction, (rows,)), saved


def _compute_dtype(student_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return compute_dtype(student_dtype, requested)


def saved_dtype_of(student_dtype: torch.dtype, reduction: str, backend: str,
                   compute: torch.dtype | None = None) -> torch.dtype:
    """The dtype of ``rkld::rkl_loss``'s second output: the triton kernels' statistics are in
    the compute dtype; the torch backend's gradient is pre-scaled and rounded to the student's
    dtype (mean/sum) or kept in the compute dtype until backward (none). ``compute``: the
    compute dtype (None: the default of ``student_dtype``).

    The public function passes this as an operator argument: torch.compile's caches key a
    graph by its operator calls and their arguments, not by what the fake implementation
    returns, so a rule that lived only in the fake could change under a cached compiled
    backward, which would then read the buffer as another dtype."""
    compute = compute or compute_dtype(student_dtype)
    if backend == "triton":
        return compute
    return compute if reduction == "none" else student_dtype


rkl_loss_op = custom_op("rkl_loss", _rkl_loss_impl)


@rkl_loss_op.register_fake
def _rkl_loss_fake(student, original, strengthened, keep, alpha, temperature, reverse,
                   reduction, backend, compiled, need_grad, saved_dtype=None,
                   compute_dtype=None, group_name=None):
    rows = student.shape[0]
    acc_dtype = accumulation_dtype(student.dtype)
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=acc_dtype)
    dtype = saved_dtype or saved_dtype_of(student.dtype, reduction, backend,
                                          _compute_dtype(student.dtype, compute_dtype))
    if not need_grad:
        saved = student.new_empty(0)
    elif backend == "triton":
        from .triton_kernels import STAT_COUNT
        saved = student.new_empty((STAT_COUNT, rows), dtype=dtype)
    else:   # the torch backend's gradient
        saved = student.new_empty(student.shape, dtype=dtype)
    return loss, saved


def _rkl_loss_triton_backward_impl(student: torch.Tensor, original: torch.Tensor,
                                   strengthened: torch.Tensor | None,
                                   keep: torch.Tensor | None, stats: torch.Tensor,
                                   grad_rows: torch.Tensor, alpha: float, temperature: float,
                                   reverse: bool, compute_dtype: torch.dtype | None = None
                                   ) -> torch.Tensor:
    """``grad_rows[r] * dL_r / d student[r]`` from the triton forward's statistics."""
    from .triton_backend import triton_rkl_backward
    return triton_rkl_backward(student, original, strengthened, keep, (stats,), grad_rows,
                               alpha, temperature, reverse,
                               compute=_compute_dtype(student.dtype, compute_dtype))


rkl_loss_triton_backward_op = custom_op("rkl_loss_triton_backward",
                                        _rkl_loss_triton_backward_impl)


@rkl_loss_triton_backward_op.register_fake
def _rkl_loss_triton_backward_fake(student, original, strengthened, keep, stats, grad_rows,
                                   alpha, temperature, reverse, compute_dtype=None):
    return student.new_empty(student.shape)


def _rkl_setup_context(ctx, inputs, output):
    (student, original, strengthened, keep, alpha, temperature, reverse, reduction, backend,
     compiled, need_grad, *rest) = inputs
    saved_dtype, compute_dtype, group_name = (list(rest) + [None] * 3)[:3]
    _, saved = output
    ctx.mark_non_differentiable(saved)
    # No zero-filled incoming gradient for ``saved`` (as large as the logits, and never used).
    ctx.set_materialize_grads(False)
    ctx.options = (alpha, temperature, reverse, reduction, backend, compiled, saved_dtype,
                   compute_dtype, group_name)
    ctx.save_for_backward(student, original, strengthened, keep,
                          saved if backend == "triton" and need_grad else None)
    # The torch backend's gradient is handed over (and, eagerly, scaled in place) by the first
    # backward; an attribute rather than a saved tensor, so that no second reference stops
    # autograd from adopting it as .grad without a copy.
    ctx.prescaled_grad = saved if backend != "triton" and need_grad else None


def _rkl_backward(ctx, grad_loss, _grad_saved):
    none = (None,) * 13
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None, *none)
    student, original, strengthened, keep, stats = ctx.saved_tensors
    (alpha, temperature, reverse, reduction, backend, compiled, saved_dtype, compute_dtype,
     group_name) = ctx.options
    rows = student.shape[0]
    if torch.is_grad_enabled():
        # create_graph=True (double backward, torch.func.grad): differentiable recomputation,
        # the chunk math's own formulas (torch_backend.rkl_rows) on all rows at once.
        if group_name:
            raise RuntimeError(f"{_FN}: vocabulary-sharded (DTensor) inputs support one "
                               f"backward; second derivatives (create_graph=True) and "
                               f"torch.func transforms are not implemented for them")
        grad = differentiable_rows_grad(student, original, strengthened, keep, alpha,
                                        temperature, reverse,
                                        _compute_dtype(student.dtype, compute_dtype))
        row_grad = upstream_per_row(grad_loss, keep, reduction, rows).unsqueeze(-1)
        return ((grad * row_grad).to(student.dtype), *none)
    if backend == "triton":
        grad_rows = upstream_per_row(grad_loss, keep, reduction, rows)
        return (rkl_loss_triton_backward_op(student, original, strengthened, keep, stats,
                                            grad_rows, alpha, temperature, reverse,
                                            compute_dtype), *none)
    grad, ctx.prescaled_grad = ctx.prescaled_grad, None
    if grad is None:   # a second backward through the same graph (retain_graph): recompute
        _, grad = rkl_loss_op(student, original, strengthened, keep, alpha, temperature,
                              reverse, reduction, backend, compiled, True, saved_dtype,
                              compute_dtype, group_name)
    scale = grad_loss.unsqueeze(-1) if reduction == "none" else grad_loss
    if tracing(grad_loss):
        return (torch.mul(grad, scale).to(grad.dtype), *none)
    if reduction == "none" or not host_reads_allowed(grad.device) or not bool(grad_loss == 1):
        grad.mul_(scale)
    return (grad, *none)


rkl_loss_op.register_autograd(_rkl_backward, setup_context=_rkl_setup_context)
rkl_loss_op.register_vmap(functools.partial(vmap_by_loop, rkl_loss_op))
_RKLLossFunction = function_route(rkl_loss_op, _rkl_setup_context, _rkl_backward,
                                  "_RKLLossFunction")


def validate_logits(student_logits, original_logits, strengthened_logits, labels,
                    fn: str = _FN, ignore_index: int | None = None) -> None:
    _checks.check_float_tensor(fn, "student_logits", student_logits)
    _checks.check_float_tensor(fn, "original_logits", original_logits)
    if strengthened_logits is not None:
        _checks.check_float_tensor(fn, "strengthened_logits", strengthened_logits)
    if student_logits.dim() == 0:
        raise ValueError(f"{fn}: student_logits must have at least one dimension (..., V); "
                         f"got a 0-d tensor")
    for name, t in (("original_logits", original_logits),
                    ("strengthened_logits", strengthened_logits)):
        if t is not None and t.shape != student_logits.shape:
            hint = (_checks.PADDING_HINT if t.dim() == student_logits.dim()
                    and t.shape[:-1] == student_logits.shape[:-1] else "")
            raise ValueError(f"{fn}: {name} must have the shape of student_logits, "
                             f"{tuple(student_logits.shape)}; got {tuple(t.shape)}" + hint)
    if student_logits.shape[-1] == 0:
        raise ValueError(f"{fn}: the vocabulary (last) dimension must be at least 1; got shape "
                         f"{tuple(student_logits.shape)}")
    _checks.check_frozen(fn, "original_logits", original_logits)
    if strengthened_logits is not None:
        _checks.check_frozen(fn, "strengthened_logits", strengthened_logits)
    _checks.check_labels(fn, labels, student_logits.shape[:-1], "student_logits", ignore_index)
    _checks.check_same_device(fn, {"student_logits": student_logits,
                                   "original_logits": original_logits,
                                   "strengthened_logits": strengthened_logits,
                                   "labels": labels})


def first_columns(fn: str, vocab_size, **logits):
    """The first ``vocab_size`` columns of each logits tensor (views; None stays None)."""
    for name, t in logits.items():
        if t is not None:
            _checks.check_float_tensor(fn, name, t)
            if t.dim() == 0:
                raise ValueError(f"{fn}: {name} must have shape (..., V); got a 0-d tensor")
    _checks.check_vocab_size(fn, vocab_size, {name: t.shape[-1] for name, t in logits.items()
                                              if t is not None})
    return tuple(t[..., :vocab_size] if t is not None else None for t in logits.values())


def reduce_rows(loss_rows: torch.Tensor, keep: torch.Tensor | None, reduction: str,
                leading_shape) -> torch.Tensor:
    """Apply ``reduction`` to per-row losses that are already 0 at masked rows (no host sync)."""
    if reduction == "none":
        return loss_rows.reshape(leading_shape)
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / mean_divisor(keep, loss_rows.numel(), total.dtype, total.device)


def fused_rkl_loss(student_logits: torch.Tensor, original_logits: torch.Tensor,
                   strengthened_logits: torch.Tensor | None = None, *, alpha: float = 8.0,
                   labels: torch.Tensor | None = None, ignore_index: int = -100,
                   temperature: float = 1.0, direction: str = "reverse",
                   reduction: str = "mean", backend: str = "auto",
                   compiled: bool | None = None, vocab_size: int | None = None,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """KL divergence between the student and the RKLD unlearning teacher, fused over the vocabulary.

    The teacher is ``o - alpha * relu(g - o)`` built from the raw original (``o``) and
    strengthened (``g``) logits, or ``o`` itself when ``strengthened_logits`` is None. Student
    and teacher are divided by ``temperature`` after the teacher is formed (no T^2 factor).

    Args:
        student_logits: ``(..., V)`` float32 / bfloat16 / float16 / float64 logits of the model
            being trained.
        original_logits, strengthened_logits: ``(..., V)`` frozen teacher logits (any float
            dtype, need not match the student's); they never receive gradients.
        alpha: how far logits that rose under strengthening are pushed down (8 for TOFU).
        labels: ``(...)`` integer tensor aligned with the logits' positions; positions equal to
            ``ignore_index`` get loss 0 and gradient 0. None keeps every position.
        temperature: > 0, divides both logits.
        direction: ``"reverse"`` = KL(student || teacher) (RKLD), ``"forward"`` = KL(teacher || student).
        reduction: ``"mean"`` over unmasked positions (0 when none is left), ``"sum"``, or
            ``"none"`` (per position, shape ``(...)``, 0 at masked positions).
        backend: ``"auto"`` (triton on CUDA, torch elsewhere), ``"triton"``, ``"torch"``
            (chunked PyTorch) or ``"reference"`` (naive; the specification).
        compiled: torch backend only: run its per-chunk math through ``torch.compile``
            (True), eagerly (False), or decide (None: compile on CPU for calls of at least
            2**25 kept-row x V elements, where the one-off ~10-20 s compilation pays back;
            falls back to eager with a warning if compilation fails).
        vocab_size: use only the first ``vocab_size`` columns of every logits tensor, for models
            whose vocabularies differ only by padding (e.g. 152064 vs 151936); the student's
            gradient is 0 in the columns left out. None: all three must have one shape.
        compute_dtype: the dtype of the arithmetic inside, on every backend (torch, triton,
            vocabulary-parallel). None (default): float32 for float16/bfloat16/float32 inputs,
            float64 for float64 ones. ``torch.float64``: float64
            arithmetic for the last digits of float32 inputs (the float32 rounding floor); it
            costs, measured on this project's CPU, 2x the time of the float32 default
            (2048 x 32000) and 1.4x its peak extra memory (on GPUs, their float64 rate).
            ``torch.float32`` is the default for 16/32-bit inputs.

    Returns:
        The loss in float32 (float64 when the student is float64). The gradient flows to
        ``student_logits`` only, in its dtype.

    The loss is the custom operator ``torch.ops.rkld.rkl_loss``: ``torch.compile``
    (``fullgraph=True``) traces it without a graph break and runs its backward compiled, and no
    backend reads a device value on the host off CPU (CUDA-graph capturable). ``torch.func``
    transforms (``grad``, ``vmap``) work; a backward with ``create_graph=True`` (second
    derivatives) and ``torch.func.grad`` recompute the gradient with differentiable PyTorch ops
    over the full ``[rows, V]`` (exact, naive memory). Logits given as DTensors sharded on the
    vocabulary (``Shard(-1)``, tensor parallelism) are handled by
    :func:`rkld_kernels.tensor_parallel.vocab_parallel_rkl_loss`.

    Precision contract (torch and triton backends; ``reference`` computes naively in the
    inputs' dtype): for float16/bfloat16/float32 inputs the loss is within 1e-3 relative of the
    float64 loss of the same rounded inputs (or 1e-6 absolute when smaller) and never
    negative; the gradient of float16/bfloat16 inputs is within 2x the error of rounding the
    exact gradient to its dtype, that of float32 inputs within 2x the error of the naive
    float32 formula (float32 arithmetic; with ``compute_dtype=torch.float64``, 2x the float32
    rounding floor); float64 inputs are float64 throughout. The README lists the measured
    errors.
    """
    _checks.check_options(_FN, alpha=alpha, temperature=temperature, direction=direction,
                          reduction=reduction, backend=backend)
    check_compute_dtype(_FN, compute_dtype, getattr(student_logits, "dtype", None))
    if any(is_dtensor(t) for t in (student_logits, original_logits, strengthened_logits)):
        return vocab_parallel_rkl_loss(student_logits, original_logits, strengthened_logits,
                                       alpha=alpha, labels=labels, ignore_index=ignore_index,
                                       temperature=temperature, direction=direction,
                                       reduction=reduction, backend=backend,
                                       vocab_size=vocab_size, compute_dtype=compute_dtype)
    if vocab_size is not None:
        student_logits, original_logits, strengthened_logits = first_columns(
            _FN, vocab_size, student_logits=student_logits, original_logits=original_logits,
            strengthened_logits=strengthened_logits)
    validate_logits(student_logits, original_logits, strengthened_logits, labels,
                    ignore_index=ignore_index)
    check_compiled_arg(_FN, compiled)
    backend = resolve_backend(backend, student_logits.device)

    if backend == "reference":
        # The naive formula in the inputs' dtype (compute_dtype does not apply).
        out_dtype = torch.promote_types(student_logits.dtype, torch.float32)
        return reference_rkl_loss(student_logits, original_logits, strengthened_logits,
                                  alpha=alpha, labels=labels, ignore_index=ignore_index,
                                  temperature=temperature, direction=direction,
                                  reduction=reduction).to(out_dtype)

    leading_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    original = original_logits.reshape(-1, vocab)
    strengthened = strengthened_logits.reshape(-1, vocab) if strengthened_logits is not None else None
    keep = (labels.reshape(-1) != ignore_index) if labels is not None else None
    if backend == "triton":
        # The kernels address rows by a stride and expect unit stride along the vocabulary.
        student, original = _unit_last_stride(student), _unit_last_stride(original)
        strengthened = _unit_last_stride(strengthened) if strengthened is not None else None
    # Under torch.func transforms the backward recomputes differentiably (see _custom_ops), so
    # the forward skips the fused gradient.
    functorch = functorch_active()
    need_grad = torch.is_grad_enabled() and student.requires_grad and not functorch
    compute = _compute_dtype(student.dtype, compute_dtype)
    args = (student, original, strengthened, keep, float(alpha), float(temperature),
            direction == "reverse", reduction, backend, COMPILED_CODES[compiled], need_grad,
            saved_dtype_of(student.dtype, reduction, backend, compute), compute, None)
    loss, _ = _RKLLossFunction.apply(*args) if functorch else rkl_loss_op(*args)
    return loss.reshape(leading_shape) if reduction == "none" else loss


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class RKLLoss(torch.nn.Module):
    """Module form of :func:`fused_rkl_loss`, in the style of ``torch.nn`` losses.

    ``forward(student_logits, original_logits, strengthened_logits=None, labels=None)``.
    """

    def __init__(self, alpha: float = 8.0, temperature: float = 1.0, direction: str = "reverse",
                 reduction: str = "mean", ignore_index: int = -100, backend: str = "auto",
                 compiled: bool | None = None, vocab_size: int | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        _checks.check_options("RKLLoss", alpha=alpha, temperature=temperature,
                              direction=direction, reduction=reduction, backend=backend)
        check_compiled_arg("RKLLoss", compiled)
        _checks.check_module_options("RKLLoss", ignore_index=ignore_index, vocab_size=vocab_size)
        check_compute_dtype("RKLLoss", compute_dtype)
        self.compute_dtype = compute_dtype
        self.alpha, self.temperature, self.direction = alpha, temperature, direction
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend
        self.compiled, self.vocab_size = compiled, vocab_size

    def forward(self, student_logits, original_logits, strengthened_logits=None, labels=None):
        return fused_rkl_loss(student_logits, original_logits, strengthened_logits,
                              alpha=self.alpha, labels=labels, ignore_index=self.ignore_index,
                              temperature=self.temperature, direction=self.direction,
                              reduction=self.reduction, backend=self.backend,
                              compiled=self.compiled, vocab_size=self.vocab_size,
                              compute_dtype=self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, temperature={self.temperature}, direction={self.direction!r}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, backend={self.backend!r}, "
                f"compiled={self.compiled}, vocab_size={self.vocab_size}, "
                f"compute_dtype={self.compute_dtype}")
