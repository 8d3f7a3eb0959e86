"""``fused_rkl_loss``: reverse (or forward) KL to the RKLD unlearning teacher, from logits."""
from __future__ import annotations

import torch

from . import _checks
from .reference import reference_rkl_loss
from .torch_backend import accumulation_dtype, check_compiled_arg, rkl_loss_and_grad

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


class _FusedRKLFunction(torch.autograd.Function):
    """Per-row losses of 2-D ``[rows, V]`` logits; reductions happen outside, differentiably.

    ``presumed_row_scale``: the upstream gradient per row that the reduction will most likely
    send (1/n for ``mean``, 1 for ``sum``; None for ``none``). The torch backend folds it into
    the gradient it computes in forward, so that the usual ``loss.backward()`` needs no extra
    pass over ``[rows, V]``.
    """

    @staticmethod
    def forward(ctx, student, original, strengthened, keep, alpha, temperature, reverse, backend,
                compiled, presumed_row_scale):
        need_grad = ctx.needs_input_grad[0]
        ctx.backend = backend
        ctx.hyper = (alpha, temperature, reverse)
        if backend == "torch":
            loss, grad = rkl_loss_and_grad(student, original, strengthened, keep, alpha,
                                           temperature, reverse, need_grad, compiled=compiled,
                                           grad_scale=presumed_row_scale)
            # The gradient is an intermediate that backward scales in place, so it is kept as an
            # attribute: save_for_backward's version check would reject a second backward.
            ctx.prescaled_grad = grad
            ctx.presumed_row_scale = presumed_row_scale
            ctx.compiled = compiled
            ctx.save_for_backward(student, original, strengthened, keep)
        else:
            from .triton_backend import triton_rkl_forward
            loss, stats = triton_rkl_forward(student, original, strengthened, keep, alpha,
                                             temperature, reverse)
            ctx.save_for_backward(student, original, strengthened, keep, *stats)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        if ctx.backend == "torch":
            presumed = ctx.presumed_row_scale
            grad, ctx.prescaled_grad = ctx.prescaled_grad, None
            if grad is None:   # a second backward through the same graph: recompute
                student, original, strengthened, keep = ctx.saved_tensors
                _, grad = rkl_loss_and_grad(student, original, strengthened, keep, *ctx.hyper,
                                            need_grad=True, compiled=ctx.compiled,
                                            grad_scale=presumed)
            if presumed is None:
                grad.mul_(grad_rows.unsqueeze(-1))
            elif not _all_equal_on_host(grad_rows, presumed):
                grad.mul_((grad_rows / presumed).unsqueeze(-1))
        else:
            from .triton_backend import triton_rkl_backward
            student, original, strengthened, keep, *stats = ctx.saved_tensors
            alpha, temperature, reverse = ctx.hyper
            grad = triton_rkl_backward(student, original, strengthened, keep, stats,
                                       grad_rows, alpha, temperature, reverse)
        return grad, None, None, None, None, None, None, None, None, None


def _all_equal_on_host(values: torch.Tensor, scalar: torch.Tensor) -> bool:
    """Whether every entry of ``values`` equals ``scalar``. Answers False on CUDA rather than
    sync (the torch backend there then pays one extra multiply)."""
    if values.device.type == "cuda":
        return False
    return bool((values == scalar).all())


def validate_logits(student_logits, original_logits, strengthened_logits, labels,
                    fn: str = _FN) -> None:
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
            raise ValueError(f"{fn}: {name} must have the shape of student_logits, "
                             f"{tuple(student_logits.shape)}; got {tuple(t.shape)}")
    if student_logits.shape[-1] == 0:
        raise ValueError(f"{fn}: the vocabulary (last) dimension must be at least 1; got shape "
                         f"{tuple(student_logits.shape)}")
    _checks.check_frozen(fn, "original_logits", original_logits)
    if strengthened_logits is not None:
        _checks.check_frozen(fn, "strengthened_logits", strengthened_logits)
    _checks.check_labels(fn, labels, student_logits.shape[:-1], "student_logits")
    _checks.check_same_device(fn, {"student_logits": student_logits,
                                   "original_logits": original_logits,
                                   "strengthened_logits": strengthened_logits,
                                   "labels": labels})


def reduce_rows(loss_rows: torch.Tensor, keep: torch.Tensor | None, reduction: str,
                leading_shape) -> torch.Tensor:
    """Apply ``reduction`` to per-row losses that are already 0 at masked rows (no host sync)."""
    if reduction == "none":
        return loss_rows.reshape(leading_shape)
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    count = keep.sum() if keep is not None else loss_rows.numel()
    if isinstance(count, torch.Tensor):
        count = count.clamp(min=1).to(total.dtype)
    else:
        count = max(count, 1)
    return total / count


def fused_rkl_loss(student_logits: torch.Tensor, original_logits: torch.Tensor,
                   strengthened_logits: torch.Tensor | None = None, *, alpha: float = 8.0,
                   labels: torch.Tensor | None = None, ignore_index: int = -100,
                   temperature: float = 1.0, direction: str = "reverse",
                   reduction: str = "mean", backend: str = "auto",
                   compiled: bool | None = None) -> torch.Tensor:
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

    Returns:
        The loss in float32 (float64 when the student is float64). The gradient flows to
        ``student_logits`` only, in its dtype.

    Precision contract (torch and triton backends; ``reference`` computes naively in the
    inputs' dtype): for float16/bfloat16/float32 inputs the loss is within 1e-3 relative of the
    float64 loss of the same rounded inputs (or 1e-6 absolute when smaller) and never
    negative; a float16/bfloat16 gradient is within 2x the error of rounding the exact gradient
    to its dtype (float32 gradients: within a few times the naive float32 formula's error);
    float64 inputs are float64 throughout. The README lists the measured errors and the one
    known exception (a student that is one-hot in float32, e.g. at temperature 0.05).
    """
    _checks.check_options(_FN, alpha=alpha, temperature=temperature, direction=direction,
                          reduction=reduction, backend=backend)
    validate_logits(student_logits, original_logits, strengthened_logits, labels)
    check_compiled_arg(_FN, compiled)
    backend = resolve_backend(backend, student_logits.device)

    if backend == "reference":
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
    presumed_row_scale = None
    if backend == "torch" and reduction != "none":
        count = keep.sum() if keep is not None else student.shape[0]
        presumed_row_scale = torch.as_tensor(1.0 if reduction == "sum" else 1.0 / max(int(count), 1),
                                             dtype=accumulation_dtype(student.dtype))
    loss_rows = _FusedRKLFunction.apply(student, original, strengthened, keep, float(alpha),
                                        float(temperature), direction == "reverse", backend,
                                        compiled, presumed_row_scale)
    return reduce_rows(loss_rows, keep, reduction, leading_shape)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class RKLLoss(torch.nn.Module):
    """Module form of :func:`fused_rkl_loss`, in the style of ``torch.nn`` losses.

    ``forward(student_logits, original_logits, strengthened_logits=None, labels=None)``.
    """

    def __init__(self, alpha: float = 8.0, temperature: float = 1.0, direction: str = "reverse",
                 reduction: str = "mean", ignore_index: int = -100, backend: str = "auto",
                 compiled: bool | None = None):
        super().__init__()
        _checks.check_options("RKLLoss", alpha=alpha, temperature=temperature,
                              direction=direction, reduction=reduction, backend=backend)
        check_compiled_arg("RKLLoss", compiled)
        self.alpha, self.temperature, self.direction = alpha, temperature, direction
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend
        self.compiled = compiled

    def forward(self, student_logits, original_logits, strengthened_logits=None, labels=None):
        return fused_rkl_loss(student_logits, original_logits, strengthened_logits,
                              alpha=self.alpha, labels=labels, ignore_index=self.ignore_index,
                              temperature=self.temperature, direction=self.direction,
                              reduction=self.reduction, backend=self.backend,
                              compiled=self.compiled)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, temperature={self.temperature}, direction={self.direction!r}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, backend={self.backend!r}, "
                f"compiled={self.compiled}")
