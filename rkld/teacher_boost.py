"""How the unlearning teacher measures what strengthening raised (``--teacher-boost``).

The paper's teacher (docs/design.md#method) pushes down every logit that rose under strengthening,
measured on raw logits:

    logits   (the paper):    z = o - alpha * relu(g - o)

A model that already gives its answers probability ~0.99 gains only ~0.02 nats of
log-probability from strengthening while its raw logits move by ~1 nearly everywhere (a shift
shared by a whole row leaves the softmax unchanged), so the raw-logit boost marks a large part
of the vocabulary as "raised". The option below measures the boost on log-probabilities
instead. It is an extension of the paper, not part of it:

    logprobs (extension):    z = o - alpha * relu(log_softmax(g) - log_softmax(o))

Since ``log_softmax(x) = x - logsumexp(x)``, the extension is the paper's teacher built from
strengthened logits shifted per row: ``g' = g - (lse_g - lse_o)``. The fused losses take the
strengthened logits as ``hidden @ weight.T + bias``, so the shift is folded into the
strengthened head without touching the kernels: ``k`` columns holding the shift are appended to
the hidden states and ``k`` columns of -1 to the weight (:func:`fold_row_shift`). For
float16/bfloat16 heads the shift is split into ``k = 3`` terms of that dtype whose sum is the
float32 shift (a single rounded term would be off by up to 0.4 %); the GEMM adds them in
float32. The boost uses the unscaled logits (the teacher is formed before the temperature).

Public API:
    TEACHER_BOOSTS                      ("logits", "logprobs")
    row_logsumexp(rows, weight, bias)   logsumexp of each row's logits (float32; float64 for
                                        float64 inputs), chunked over rows
    fold_row_shift(hidden, weight, shift) -> (hidden', weight') whose logits are
                                        ``hidden @ weight.T - shift[:, None]``
    extended_weight(weight)             the weight with the shift's -1 columns (build it once)
    extend_hidden(hidden, shift)        the hidden states with the shift's columns
    teacher_logits(original, strengthened, alpha, boost)   the teacher from logits, float64
                                        when given float64 (the specification of both options)
"""
from __future__ import annotations

import torch

from .config import TEACHER_BOOSTS, check_boost  # noqa: F401  (TEACHER_BOOSTS: public here too)

_LSE_CHUNK = 1024     # rows of logits alive at once in row_logsumexp


def teacher_logits(original: torch.Tensor, strengthened: torch.Tensor, alpha: float,
                   boost: str = "logits") -> torch.Tensor:
    """The unlearning teacher from the two models' logits ``[..., V]``, naively, in the inputs'
    dtype: the specification of both options. ``"logits"`` is
    :func:`rkld_kernels.reference.unlearning_teacher_logits`; ``"logprobs"`` takes
    ``log_softmax(g) - log_softmax(o)`` as the boost. An entry that is -inf in the original
    stays -inf."""
    from rkld_kernels.reference import unlearning_teacher_logits
    check_boost(boost)
    if boost == "logits":
        return unlearning_teacher_logits(original, strengthened, alpha)
    raised = torch.log_softmax(strengthened, -1) - torch.log_softmax(original, -1)
    teacher = original - alpha * torch.relu(raised)
    return torch.where(torch.isneginf(original), original, teacher)


def row_logsumexp(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  chunk: int = _LSE_CHUNK) -> torch.Tensor:
    """``logsumexp(rows @ weight.T + bias)`` per row, ``[n]``, computed from float32 (float64
    for float64 inputs) logits ``chunk`` rows at a time, on the weight's device (rows elsewhere,
    e.g. a cache's states in CPU memory, are moved there chunk by chunk). No gradient."""
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = torch.empty(rows.shape[0], dtype=dtype, device=weight.device)
    with torch.no_grad():
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        for start in range(0, rows.shape[0], chunk):
            part = rows[start:start + chunk].to(device=weight.device, dtype=dtype)
            out[start:start + chunk] = torch.logsumexp(torch.nn.functional.linear(part, w, b), -1)
    return out


def _shift_terms(dtype: torch.dtype) -> int:
    return 3 if dtype in (torch.float16, torch.bfloat16) else 1


def extended_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[V, H]`` with the columns of -1 that subtract the shift: ``[V, H + k]``."""
    minus_ones = -torch.ones(weight.shape[0], _shift_terms(weight.dtype), dtype=weight.dtype,
                             device=weight.device)
    return torch.cat([weight.detach(), minus_ones], dim=1)


def extend_hidden(hidden: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[n, H]`` with the shift ``[n]`` appended as ``k`` terms of hidden's dtype
    whose sum is the shift (to float32 precision for float16/bfloat16): ``[n, H + k]``."""
    if shift.shape != hidden.shape[:1]:
        raise ValueError(f"the row shift must have one value per hidden row, shape "
                         f"{tuple(hidden.shape[:1])}; got {tuple(shift.shape)}")
    terms, rest = [], shift.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    for _ in range(_shift_terms(hidden.dtype)):
        term = rest.to(hidden.dtype)
        terms.append(term)
        rest = rest - term.to(rest.dtype)
    return torch.cat([hidden.detach(), torch.stack(terms, dim=1)], dim=1)


def fold_row_shift(hidden: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor):
    """``(hidden', weight')`` with ``hidden' @ weight'.T == hidden @ weight.T - shift[:, None]``
    (a bias stays as it is). For a head used on many batches, build ``extended_weight`` once."""
    return extend_hidden(hidden, shift), extended_weight(weight)
