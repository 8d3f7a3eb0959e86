"""The naive reference: the specification of every backend, written for clarity, not speed.

It materialises the teacher logits and both log-probability tensors over the full vocabulary
and relies on autograd for the gradient. Run it in float64 to get the ground truth the other
backends are tested against.
"""
from __future__ import annotations

import torch


def unlearning_teacher_logits(original: torch.Tensor, strengthened: torch.Tensor | None,
                              alpha: float = 8.0) -> torch.Tensor:
    """Return the RKLD unlearning teacher ``o - alpha * relu(g - o)`` from raw logits.

    Only logits that rose under strengthening are pushed down. With ``strengthened=None`` the
    teacher is ``original`` itself (plain distillation). An entry that is ``-inf`` in the
    original logits stays ``-inf`` in the teacher (vocabulary masking survives), and NaN in
    either input propagates.
    """
    if strengthened is None:
        return original
    teacher = original - alpha * torch.relu(strengthened - original)
    # relu(g - o) is +inf or NaN where o == -inf; the teacher entry must stay -inf there.
    return torch.where(torch.isneginf(original), original, teacher)


def rkl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0, direction: str = "reverse") -> torch.Tensor:
    """Per-position KL divergence over the last dimension, in the input dtype.

    ``reverse``: KL(p || q) = sum_v p (log p - log q); ``forward``: KL(q || p), with
    p = softmax(student / T) and q = softmax(teacher / T). Entries whose weight (p for reverse,
    q for forward) is exactly zero contribute zero, so ``-inf`` logits never produce
    ``0 * inf = NaN``; NaN inputs still give NaN.
    """
    log_p = torch.log_softmax(student_logits / temperature, dim=-1)
    log_q = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if direction == "reverse":
        weight_log, other_log = log_p, log_q
    elif direction == "forward":
        weight_log, other_log = log_q, log_p
    else:
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    weight = weight_log.exp()
    zero = weight == 0
    # Replace the log terms where the weight is zero *before* multiplying, so that neither the
    # value nor the autograd gradient sees 0 * (-inf).
    safe_weight_log = torch.where(zero, torch.zeros_like(weight_log), weight_log)
    safe_other_log = torch.where(zero, torch.zeros_like(other_log), other_log)
    return (weight * (safe_weight_log - safe_other_log)).sum(dim=-1)


def reference_rkl_loss(student_logits: torch.Tensor, original_logits: torch.Tensor,
                       strengthened_logits: torch.Tensor | None = None, *, alpha: float = 8.0,
                       labels: torch.Tensor | None = None, ignore_index: int = -100,
                       temperature: float = 1.0, direction: str = "reverse",
                       reduction: str = "mean") -> torch.Tensor:
    """The full loss (teacher, masking, reduction) computed naively in the inputs' dtype.

    Masked positions (``labels == ignore_index``) contribute exactly 0 to the loss and get a
    zero gradient, whatever their logits hold. ``mean`` divides by the number of unmasked
    positions and is 0 when none is left.
    """
    teacher = unlearning_teacher_logits(original_logits, strengthened_logits, alpha)
    if labels is not None:
        # Compute on the kept positions only: masked ones hold whatever the caller left there
        # (even NaN) and must give loss 0 and gradient 0, not 0 * NaN.
        keep = labels != ignore_index
        kept = rkl_per_position(student_logits[keep], teacher[keep], temperature, direction)
        per_position = torch.zeros(keep.shape, dtype=kept.dtype, device=kept.device)
        per_position = per_position.masked_scatter(keep, kept)
        count = keep.sum()
    else:
        per_position = rkl_per_position(student_logits, teacher, temperature, direction)
        count = torch.tensor(per_position.numel(), device=per_position.device)
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count.clamp(min=1).to(total.dtype)
    raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
