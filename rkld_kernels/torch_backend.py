"""Chunked PyTorch backend: the same math as the Triton kernels, for CPUs and as a fallback.

Rows are processed a chunk at a time in float32, so no full-vocabulary float32 tensor larger
than ``chunk_rows x V`` exists besides the gradient itself. The loss and the per-row gradient
(before the upstream ``grad_output`` scale) come out of one pass over the chunk.

Math per row, with s~ = s/T, z~ = z/T, p = softmax(s~), q = softmax(z~):

    reverse:  L = sum_v p (log p - log q)      dL/ds_v = p_v ((log p_v - log q_v) - L) / T
    forward:  L = sum_v q (log q - log p)      dL/ds_v = (p_v - q_v) / T

(the reverse gradient is DESIGN.md's p_j (d_j - E_p[d]) / T, since log p - log q = d - lse_s +
lse_z and L = E_p[d] - lse_s + lse_z). Entries whose weight is exactly 0 contribute 0.
"""
from __future__ import annotations

import torch

# Rows of float32 work per chunk are sized to this many elements: small enough to stay in the
# CPU's caches, large enough that the per-op Python overhead is amortised.
_CHUNK_ELEMENTS = 1 << 18


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every input dtype except float64, which is kept (gradcheck, ground truths)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


def _log_softmax_and_exp_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: turn ``x`` into log_softmax(x) and return (log_softmax, softmax)."""
    x.sub_(x.amax(dim=-1, keepdim=True))
    prob = x.exp()
    total = prob.sum(dim=-1, keepdim=True)
    prob.div_(total)
    x.sub_(total.log_())
    return x, prob


def rkl_rows(student: torch.Tensor, original: torch.Tensor, strengthened: torch.Tensor | None,
             alpha: float, temperature: float, reverse: bool, need_grad: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss per row and, if asked, dL_row/d student ([rows, V]), both in the compute dtype:
    float32, or float64 when the student is float64.

    Inputs are 2-D ``[rows, V]`` of any float dtype and strides; they are never modified.
    """
    compute_dtype = accumulation_dtype(student.dtype)
    # Private copies in the compute dtype: every later op may then work in place.
    s = student.to(compute_dtype, copy=True)
    z = original.to(compute_dtype, copy=True)
    if strengthened is not None:
        boost = strengthened.to(compute_dtype, copy=True).sub_(z).relu_()
        # relu(g - o) is inf/NaN where o == -inf; the teacher must stay -inf there.
        boost.masked_fill_(torch.isneginf(z), 0.0)
        z.sub_(boost.mul_(alpha))
        del boost
    if temperature != 1.0:
        s.div_(temperature)
        z.div_(temperature)
    log_p, p = _log_softmax_and_exp_(s)
    log_q, q = _log_softmax_and_exp_(z)
    if reverse:
        weight = p
        log_ratio = log_p.sub_(log_q)          # log p - log q (reuses the student buffer)
    else:
        weight = q
        log_ratio = log_q.sub_(log_p)          # log q - log p (reuses the teacher buffer)
    zero_weight = weight == 0
    terms = (weight * log_ratio).masked_fill_(zero_weight, 0.0)
    loss = terms.sum(dim=-1)
    if not need_grad:
        return loss, None
    if reverse:
        grad = log_ratio.sub_(loss.unsqueeze(-1)).mul_(p).masked_fill_(zero_weight, 0.0)
    else:
        grad = p.sub_(q)
    if temperature != 1.0:
        grad.div_(temperature)
    return loss, grad


def rkl_loss_and_grad(student: torch.Tensor, original: torch.Tensor,
                      strengthened: torch.Tensor | None, keep: torch.Tensor | None,
                      alpha: float, temperature: float, reverse: bool, need_grad: bool,
                      chunk_rows: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row losses (accumulation dtype, [rows], 0 at masked rows) and the unscaled gradient in the student's
    dtype ([rows, V], zero at masked rows), processing ``chunk_rows`` rows at a time.

    Masked rows are skipped entirely: they cost nothing and cannot leak NaN.
    """
    rows, vocab = student.shape
    chunk_rows = chunk_rows or default_chunk_rows(vocab)
    loss = torch.zeros(rows, dtype=accumulation_dtype(student.dtype), device=student.device)
    grad = None
    if need_grad:
        grad = (torch.zeros_like(student, memory_format=torch.contiguous_format)
                if keep is not None else torch.empty_like(student, memory_format=torch.contiguous_format))
    if keep is not None:
        kept_rows = keep.nonzero().squeeze(1)   # host sync: acceptable on the CPU/fallback path
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        if keep is None:
            index = None
            s, o = student[start:stop], original[start:stop]
            g = strengthened[start:stop] if strengthened is not None else None
        else:
            lo, hi = torch.searchsorted(kept_rows, torch.tensor([start, stop], device=kept_rows.device)).tolist()
            if lo == hi:
                continue
            index = kept_rows[lo:hi]
            if hi - lo == stop - start:
                index = None          # the whole chunk is kept: use views, no gather
                s, o = student[start:stop], original[start:stop]
                g = strengthened[start:stop] if strengthened is not None else None
            else:
                s, o = student.index_select(0, index), original.index_select(0, index)
                g = strengthened.index_select(0, index) if strengthened is not None else None
        chunk_loss, chunk_grad = rkl_rows(s, o, g, alpha, temperature, reverse, need_grad)
        if index is None:
            loss[start:stop] = chunk_loss
            if grad is not None:
                grad[start:stop] = chunk_grad
        else:
            loss.index_copy_(0, index, chunk_loss)
            if grad is not None:
                grad.index_copy_(0, index, chunk_grad.to(grad.dtype))
    return loss, grad
