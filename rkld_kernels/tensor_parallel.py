"""Vocabulary parallelism (tensor parallelism) over DTensor: no rank gathers the vocabulary.

A tensor-parallel lm_head (``ColwiseParallel(use_local_output=False)``) leaves every rank with
its slice of the vocabulary for all positions: logits as a DTensor ``Shard(-1)`` on a 1-D
mesh, or the lm_head weight as a DTensor ``Shard(0)``. :func:`~rkld_kernels.fused_rkl_loss` and
:func:`~rkld_kernels.fused_linear_rkl_loss` route such inputs here.

Each rank k streams its shard and keeps three floats per row: the log-sum-exps of the student
and teacher logits over the shard, ``lse_s_k`` and ``lse_z_k``, and the KL divergence of the
shard's own normalised distributions, ``KL_k``. With ``w_k = exp(lse_s_k - lse_s)`` and
``u_k = exp(lse_z_k - lse_z)`` the shard's probability mass under the student and the teacher,
the chain rule of the KL divergence gives the full-vocabulary loss

    reverse:  KL(p || q) = sum_k w_k KL_k + sum_k w_k log(w_k / u_k)
    forward:  KL(q || p) = sum_k u_k KL_k + sum_k u_k log(u_k / w_k)

(every term non-negative: no cancellation). One all-reduce of ``world x rows x 3`` floats
gives every rank every shard's statistics. The gradient of a shard needs only the full
log-sum-exps and the row's loss (``torch_backend``'s formulas with ``log p = s/T - lse_s``), so
the backward of :func:`vocab_parallel_rkl_loss` has no communication, and the student's gradient
comes back as a DTensor with the student's placement. :func:`vocab_parallel_linear_rkl_loss`
does the same chunk by chunk (one all-reduce of ``world x chunk x 3`` floats per token chunk);
with hidden states replicated, ``dX = dlogits @ W`` is a sum over the shards, all-reduced once
per call, and the weight gradient is local, sharded like the weight.

The losses are returned as DTensors with ``Replicate()`` placement. The vocabulary part runs in
PyTorch on any device (``backend="auto"`` or ``"torch"``); these paths are autograd Functions,
not custom operators, and support one backward (no second derivatives, no torch.func).
"""
from __future__ import annotations

import torch

from . import _checks
from .torch_backend import accumulation_dtype, default_chunk_rows, teacher_logits

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:          # a torch build without distributed support
    dist = DTensor = Replicate = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


# ---------------------------------------------------------------------------------------------
# Per-shard math
# ---------------------------------------------------------------------------------------------
def _scaled_logits(student, original, strengthened, alpha, temperature):
    acc_dtype = accumulation_dtype(student.dtype)
    s = student.to(acc_dtype)
    z = teacher_logits(original, strengthened, alpha, acc_dtype)
    if temperature != 1.0:
        s, z = s / temperature, z / temperature
    return s, z


def _shard_stats(student, original, strengthened, alpha, temperature, reverse):
    """``[rows, 3]``: lse_s_k, lse_z_k and KL_k of one shard ``[rows, V_k]`` (V_k may be 0)."""
    s, z = _scaled_logits(student, original, strengthened, alpha, temperature)
    lse_s = torch.logsumexp(s, dim=-1, keepdim=True)
    lse_z = torch.logsumexp(z, dim=-1, keepdim=True)
    log_p, log_q = s - lse_s, z - lse_z
    if reverse:
        weight, log_ratio = log_p.exp(), log_p - log_q
    else:
        weight, log_ratio = log_q.exp(), log_q - log_p
    # Entries of zero weight contribute 0 (their log ratio may be infinite); NaN propagates.
    kl = torch.where(weight == 0, 0.0, weight * log_ratio).sum(dim=-1, keepdim=True)
    return torch.cat([lse_s, lse_z, kl], dim=-1)


def _combine(stats, group, reverse):
    """Loss, lse_s and lse_z per row from every rank's shard statistics (one all-reduce)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    every = stats.new_zeros((world, *stats.shape))
    every[rank] = stats
    dist.all_reduce(every, group=group)
    lse_s_k, lse_z_k, kl_k = every.unbind(-1)                 # [world, rows] each
    lse_s, lse_z = torch.logsumexp(lse_s_k, dim=0), torch.logsumexp(lse_z_k, dim=0)
    log_w, log_u = lse_s_k - lse_s, lse_z_k - lse_z
    if reverse:
        mass, log_ratio = log_w.exp(), log_w - log_u
    else:
        mass, log_ratio = log_u.exp(), log_u - log_w
    loss = torch.where(mass == 0, 0.0, mass * (kl_k + log_ratio)).sum(dim=0)
    return loss, lse_s, lse_z


def _shard_grad(student, original, strengthened, lse_s, lse_z, loss, alpha, temperature,
                reverse):
    """dL_row/d student on one shard (compute dtype), from the full rows' statistics."""
    s, z = _scaled_logits(student, original, strengthened, alpha, temperature)
    log_p, log_q = s - lse_s.unsqueeze(-1), z - lse_z.unsqueeze(-1)
    p = log_p.exp()
    if reverse:
        log_ratio = torch.where(p == 0, 0.0, log_p - log_q)
        grad = p * (log_ratio - loss.unsqueeze(-1))
    else:
        grad = p - log_q.exp()
    return grad / temperature if temperature != 1.0 else grad


# ---------------------------------------------------------------------------------------------
# Input layout
# ---------------------------------------------------------------------------------------------
def _sharded_local(fn, name, t, dim, mesh=None):
    """The local shard of DTensor ``t``, which must be ``Shard(dim)`` on a 1-D mesh (``mesh``
    when given)."""
    if not is_dtensor(t):
        raise TypeError(f"{fn}: {name} must be a DTensor like the other vocabulary-sharded "
                        f"inputs; got a {type(t).__name__}")
    dim = dim % t.dim() if t.dim() else dim
    if t.device_mesh.ndim != 1 or len(t.placements) != 1 or t.placements[0] != Shard(dim):
        raise ValueError(f"{fn}: {name} must be sharded on its vocabulary dimension (Shard({dim}))"
                         f" over a 1-D device mesh; got placements {tuple(t.placements)} on a "
                         f"{t.device_mesh.ndim}-D mesh")
    if mesh is not None and t.device_mesh != mesh:
        raise ValueError(f"{fn}: {name} must be on the same device mesh as the other "
                         f"vocabulary-sharded inputs")
    return t.to_local()


def _replicated_local(fn, name, t, mesh):
    """A plain tensor, or the local tensor of a DTensor replicated over ``mesh``."""
    if t is None or not is_dtensor(t):
        return t
    if t.device_mesh != mesh or any(not p.is_replicate() for p in t.placements):
        raise ValueError(f"{fn}: {name} must be replicated over the vocabulary mesh (a plain "
                         f"tensor or a DTensor with Replicate()); got placements "
                         f"{tuple(t.placements)}")
    return t.to_local()


def _check_same_on_every_rank(fn, named: dict, group) -> None:
    """Plain tensors stand for replicated ones: check (one tiny all-reduce and a host read)
    that every rank holds the same, so that e.g. data-parallel shards of an FSDP-sharded
    lm_head, which are not vocabulary shards, are refused rather than mixed up."""
    named = {name: t for name, t in named.items() if t is not None and not is_dtensor(t)}
    if not named:
        return
    sums = torch.stack([t.detach().double().sum() for t in named.values()])
    both = torch.cat([sums, -sums])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[: len(named)], -both[len(named):]
    differs = ~torch.isclose(high, low, rtol=1e-9, atol=0.0) & ~torch.isnan(sums)
    for name, bad in zip(named, differs.tolist()):
        if bad:
            raise ValueError(f"{fn}: {name} differs between the ranks of the vocabulary mesh; "
                             f"with vocabulary-sharded inputs, plain tensors must be replicated "
                             f"(the same on every rank). Weights sharded by FSDP are not "
                             f"vocabulary shards: run the loss where they are gathered")


def _shard_range(size: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's part of ``size`` entries under ``Shard`` (torch.chunk layout)."""
    chunk = -(-size // world)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def _kept_local_columns(fn, vocab_size, named_sizes: dict, mesh, local_sizes: dict) -> int:
    """How many leading local vocabulary entries every input keeps on this rank when only the
    first ``vocab_size`` of the global vocabulary are used. The shards must line up: on every
    rank, every input's kept entries must be the same global ones."""
    world, rank = mesh.size(), mesh.get_local_rank()
    _checks.check_vocab_size(fn, vocab_size, named_sizes)
    for r in range(world):
        kept = set()
        for size in named_sizes.values():
            start, stop = _shard_range(size, world, r)
            kept.add((start, max(start, min(stop, vocab_size))))
        if len(kept) > 1:
            raise ValueError(
                f"{fn}: with vocab_size={vocab_size}, the vocabulary shards of the inputs (global "
                f"sizes {named_sizes}) do not cover the same entries on rank {r}; pad every "
                f"model's vocabulary to one size before sharding")
    for name, size in named_sizes.items():
        start, stop = _shard_range(size, world, rank)
        if stop - start != local_sizes[name]:
            raise RuntimeError(f"{fn}: {name}'s local shard has {local_sizes[name]} vocabulary "
                               f"entries; expected {stop - start} (torch.chunk layout)")
    start, stop = _shard_range(next(iter(named_sizes.values())), world, rank)
    return max(0, min(stop, vocab_size) - start)


def _check_backend(fn, backend):
    if backend not in ("auto", "torch"):
        raise ValueError(f"{fn}: vocabulary-sharded DTensor inputs run the vocabulary part in "
                         f"PyTorch; backend must be 'auto' or 'torch'; got {backend!r}")


def _reduce(loss_rows, keep, reduction, leading_shape):
    if reduction == "none":
        return loss_rows.reshape(leading_shape)
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    count = keep.sum().clamp(min=1).to(total.dtype) if keep is not None else max(
        loss_rows.numel(), 1)
    return total / count


# ---------------------------------------------------------------------------------------------
# Logits: vocab_parallel_rkl_loss
# ---------------------------------------------------------------------------------------------
class _VocabParallelRKL(torch.autograd.Function):
    """Per-row losses of local ``[rows, V_k]`` shards; gradient from the saved full statistics."""

    @staticmethod
    def forward(ctx, student, original, strengthened, keep, alpha, temperature, reverse, group):
        rows, vocab = student.shape
        stats = student.new_empty((rows, 3), dtype=accumulation_dtype(student.dtype))
        step = default_chunk_rows(max(vocab, 1))
        for start in range(0, rows, step):
            part = slice(start, start + step)
            stats[part] = _shard_stats(student[part], original[part],
                                       strengthened[part] if strengthened is not None else None,
                                       alpha, temperature, reverse)
        loss, lse_s, lse_z = _combine(stats, group, reverse)
        if keep is not None:
            loss = torch.where(keep, loss, 0.0)
        ctx.hyper = (alpha, temperature, reverse)
        ctx.save_for_backward(student, original, strengthened, keep, lse_s, lse_z, loss)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        student, original, strengthened, keep, lse_s, lse_z, loss = ctx.saved_tensors
        rows, vocab = student.shape
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        step = default_chunk_rows(max(vocab, 1))
        for start in range(0, rows, step):
            part = slice(start, start + step)
            chunk = _shard_grad(student[part], original[part],
                                strengthened[part] if strengthened is not None else None,
                                lse_s[part], lse_z[part], loss[part], *ctx.hyper)
            chunk = chunk * grad_rows[part].unsqueeze(-1)
            if keep is not None:
                chunk = chunk.masked_fill(~keep[part].unsqueeze(-1), 0.0)
            grad[part] = chunk
        return grad, None, None, None, None, None, None, None


def vocab_parallel_rkl_loss(student_logits, original_logits, strengthened_logits=None, *,
                            alpha: float = 8.0, labels=None, ignore_index: int = -100,
                            temperature: float = 1.0, direction: str = "reverse",
                            reduction: str = "mean", backend: str = "auto",
                            vocab_size: int | None = None):
    """:func:`~rkld_kernels.fused_rkl_loss` of logits that are DTensors sharded on the vocabulary
    (``Shard(-1)`` on a 1-D mesh, all three on the same mesh); ``labels`` a plain tensor or a
    replicated DTensor. Returns the loss as a DTensor with ``Replicate()``; the student's
    gradient has the student's placement. ``vocab_size``: as in fused_rkl_loss, provided the
    inputs' shards cover the same global entries on every rank."""
    fn = "fused_rkl_loss"
    _checks.check_options(fn, alpha=alpha, temperature=temperature, direction=direction,
                          reduction=reduction, backend=backend)
    _check_backend(fn, backend)
    mesh = student_logits.device_mesh if is_dtensor(student_logits) else None
    named = {"student_logits": student_logits, "original_logits": original_logits,
             "strengthened_logits": strengthened_logits}
    local = {name: _sharded_local(fn, name, t, -1, mesh) for name, t in named.items()
             if t is not None}
    mesh = mesh or original_logits.device_mesh
    labels = _replicated_local(fn, "labels", labels, mesh)
    if vocab_size is not None:
        columns = _kept_local_columns(fn, vocab_size,
                                      {name: named[name].shape[-1] for name in local}, mesh,
                                      {name: t.shape[-1] for name, t in local.items()})
        local = {name: t[..., :columns] for name, t in local.items()}
    student, original = local["student_logits"], local["original_logits"]
    strengthened = local.get("strengthened_logits")
    for name in ("original_logits", "strengthened_logits"):
        if name in local:
            if named[name].shape != named["student_logits"].shape and vocab_size is None:
                raise ValueError(f"{fn}: {name} must have the shape of student_logits, "
                                 f"{tuple(named['student_logits'].shape)}; got "
                                 f"{tuple(named[name].shape)}" + _checks.PADDING_HINT)
            _checks.check_float_tensor(fn, name, local[name])
            _checks.check_frozen(fn, name, named[name])
    _checks.check_float_tensor(fn, "student_logits", student)
    _checks.check_labels(fn, labels, student.shape[:-1], "student_logits", ignore_index)
    _check_same_on_every_rank(fn, {"labels": labels}, mesh.get_group())
    leading_shape = student.shape[:-1]
    vocab = student.shape[-1]
    keep = labels.reshape(-1) != ignore_index if labels is not None else None
    loss_rows = _VocabParallelRKL.apply(
        student.reshape(-1, vocab), original.reshape(-1, vocab),
        strengthened.reshape(-1, vocab) if strengthened is not None else None, keep,
        float(alpha), float(temperature), direction == "reverse", mesh.get_group())
    loss = _reduce(loss_rows, keep, reduction, leading_shape)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


# ---------------------------------------------------------------------------------------------
# Hidden states + sharded lm_head: vocab_parallel_linear_rkl_loss
# ---------------------------------------------------------------------------------------------
def _logits(x, weight, bias):
    return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())


def _linear_pass(inputs, keep, hyper, chunk_size, group, *, grads, row_scale=None,
                 saved_stats=None, accum_dtype=None, needs=(True, True, True)):
    """One pass over the token chunks. Without ``saved_stats`` every chunk's shard statistics
    are combined with one all-reduce; with them (a recomputing backward) no statistics are
    exchanged. Returns ``(loss, lse_s, lse_z)`` per row and ``(dx, dw, db)`` when ``grads``
    (``dx`` all-reduced over the vocabulary shards)."""
    xs, ws, bs, xo, wo, bo, xg, wg, bg = inputs
    alpha, temperature, reverse = hyper
    rows, vocab = xs.shape[0], ws.shape[0]
    acc_dtype = accumulation_dtype(ws.dtype)
    if saved_stats is None:
        loss = xs.new_empty(rows, dtype=acc_dtype)
        lse_s, lse_z = torch.empty_like(loss), torch.empty_like(loss)
    else:
        loss, lse_s, lse_z = saved_stats
    need_dx, need_dw, need_db = (grads and needs[0], grads and needs[1],
                                 grads and needs[2] and bs is not None)
    dx = torch.zeros(xs.shape, dtype=xs.dtype, device=xs.device) if need_dx else None
    dw = torch.zeros(ws.shape, dtype=accum_dtype or ws.dtype, device=ws.device) if need_dw else None
    db = torch.zeros(vocab, dtype=accum_dtype or bs.dtype, device=ws.device) if need_db else None
    for start in range(0, rows, chunk_size):
        part = slice(start, min(start + chunk_size, rows))
        x = xs[part]
        student = _logits(x, ws, bs)
        original = _logits(xo[part], wo, bo)
        strengthened = _logits(xg[part], wg, bg) if xg is not None else None
        if saved_stats is None:
            chunk_loss, lse_s[part], lse_z[part] = _combine(
                _shard_stats(student, original, strengthened, alpha, temperature, reverse),
                group, reverse)
            loss[part] = (torch.where(keep[part], chunk_loss, 0.0) if keep is not None
                          else chunk_loss)
        if not grads:
            continue
        dlogits = _shard_grad(student, original, strengthened, lse_s[part], lse_z[part],
                              loss[part], alpha, temperature, reverse)
        if row_scale is not None:
            dlogits = dlogits * row_scale[part].unsqueeze(-1)
        if keep is not None:
            dlogits = dlogits.masked_fill(~keep[part].unsqueeze(-1), 0.0)
        dlogits_w = dlogits.to(ws.dtype)
        if need_dx:
            dx[part] = torch.mm(dlogits_w, ws)          # this shard's share of dX
        if need_dw:
            grad_rows = dlogits_w if dw.dtype == ws.dtype else dlogits.to(dw.dtype)
            dw.addmm_(grad_rows.t(), x.to(dw.dtype))
        if need_db:
            db.add_(dlogits.sum(0))
    if dx is not None:
        dist.all_reduce(dx, group=group)
    return (loss, lse_s, lse_z), (dx, dw, db)


class _VocabParallelLinearRKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, xo, wo, bo, xg, wg, bg, keep, hyper, chunk_size, accum_dtype,
                per_row, group):
        inputs = (xs, ws, bs, xo, wo, bo, xg, wg, bg)
        needs = ctx.needs_input_grad[:3]
        ctx.hyper, ctx.chunk_size, ctx.accum_dtype = hyper, chunk_size, accum_dtype
        ctx.per_row, ctx.group, ctx.needs = per_row, group, needs
        ctx.weight_dtypes = (ws.dtype, bs.dtype if bs is not None else None)
        (loss, lse_s, lse_z), grads = _linear_pass(inputs, keep, hyper, chunk_size, group,
                                                   grads=not per_row and any(needs),
                                                   accum_dtype=accum_dtype, needs=needs)
        if per_row:
            ctx.save_for_backward(*inputs, keep, loss, lse_s, lse_z)
            return loss
        ctx.grads = grads
        return loss.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.per_row:
            *inputs, keep, loss, lse_s, lse_z = ctx.saved_tensors
            _, (dx, dw, db) = _linear_pass(inputs, keep, ctx.hyper, ctx.chunk_size, ctx.group,
                                           grads=True, row_scale=grad_loss,
                                           saved_stats=(loss, lse_s, lse_z),
                                           accum_dtype=ctx.accum_dtype, needs=ctx.needs)
        else:
            if ctx.grads is None:
                raise RuntimeError("fused_linear_rkl_loss computes the gradient during the "
                                   "forward pass for reduction='mean'/'sum' and supports one "
                                   "backward per forward; recompute the loss")
            (dx, dw, db), ctx.grads = ctx.grads, None
            for grad in (dx, dw, db):
                if grad is not None:
                    grad.mul_(grad_loss)
        weight_dtype, bias_dtype = ctx.weight_dtypes
        dw = dw.to(weight_dtype) if dw is not None else None
        db = db.to(bias_dtype) if db is not None else None
        return (dx, dw, db) + (None,) * 12


def vocab_parallel_linear_rkl_loss(student_hidden, student_weight, original_hidden,
                                   original_weight, strengthened_hidden=None,
                                   strengthened_weight=None, *, student_bias=None,
                                   original_bias=None, strengthened_bias=None,
                                   alpha: float = 8.0, labels=None, ignore_index: int = -100,
                                   temperature: float = 1.0, direction: str = "reverse",
                                   reduction: str = "mean", chunk_size: int | None = None,
                                   accum_dtype: torch.dtype | None = None,
                                   backend: str = "auto", vocab_size: int | None = None):
    """:func:`~rkld_kernels.fused_linear_rkl_loss` with lm_head weights (and biases) that are
    DTensors sharded over the vocabulary (``Shard(0)`` on one 1-D mesh) and hidden states
    replicated (plain tensors or ``Replicate()`` DTensors). ``strengthened_weight=None`` shares
    the original's head. Returns the loss as a ``Replicate()`` DTensor; the weight and bias
    gradients are sharded like them, the hidden gradient is the full (all-reduced) one."""
    fn = "fused_linear_rkl_loss"
    _checks.check_options(fn, alpha=alpha, temperature=temperature, direction=direction,
                          reduction=reduction, backend=backend)
    _check_backend(fn, backend)
    if strengthened_hidden is not None and strengthened_weight is None:
        strengthened_weight = original_weight
        if strengthened_bias is None:
            strengthened_bias = original_bias
    mesh = student_weight.device_mesh if is_dtensor(student_weight) else None
    weights = {"student": (student_weight, student_bias), "original": (original_weight,
                                                                       original_bias)}
    if strengthened_hidden is not None:
        weights["strengthened"] = (strengthened_weight, strengthened_bias)
    local_w, local_b = {}, {}
    for model, (weight, bias) in weights.items():
        local_w[model] = _sharded_local(fn, f"{model}_weight", weight, 0, mesh)
        mesh = mesh or weight.device_mesh
        local_b[model] = (_sharded_local(fn, f"{model}_bias", bias, 0, mesh)
                          if bias is not None else None)
    hidden = {"student": student_hidden, "original": original_hidden,
              "strengthened": strengthened_hidden}
    local_x = {model: _replicated_local(fn, f"{model}_hidden", hidden[model], mesh)
               for model in weights}
    labels = _replicated_local(fn, "labels", labels, mesh)
    global_vocab = {f"{m}_weight": w.shape[0] for m, (w, _) in weights.items()}
    if vocab_size is not None:
        rows = _kept_local_columns(fn, vocab_size, global_vocab, mesh,
                                   {f"{m}_weight": w.shape[0] for m, w in local_w.items()})
        local_w = {m: w[:rows] for m, w in local_w.items()}
        local_b = {m: b[:rows] if b is not None else None for m, b in local_b.items()}
    elif len(set(global_vocab.values())) > 1:
        raise ValueError(f"{fn}: every lm_head must have the student's vocabulary size; got "
                         f"{global_vocab}" + _checks.PADDING_HINT)
    for model in weights:
        x, w, b = local_x[model], local_w[model], local_b[model]
        _checks.check_float_tensor(fn, f"{model}_hidden", x)
        _checks.check_float_tensor(fn, f"{model}_weight", w)
        if x.dim() == 0 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"{fn}: {model}_hidden must have shape (..., H) with H = "
                             f"{w.shape[1]} (the hidden size of {model}_weight); got "
                             f"{tuple(x.shape)}")
        if x.shape[:-1] != local_x["student"].shape[:-1]:
            raise ValueError(f"{fn}: {model}_hidden must have the token shape of "
                             f"student_hidden, {tuple(local_x['student'].shape[:-1])}; got "
                             f"{tuple(x.shape)}")
        if x.dtype != w.dtype or (b is not None and b.dtype != w.dtype):
            raise TypeError(f"{fn}: the {model} model's hidden states, weight and bias must "
                            f"share one dtype; got hidden {x.dtype}, weight {w.dtype}")
        if model != "student":
            for part, t in (("hidden", hidden[model]), ("weight", weights[model][0]),
                            ("bias", weights[model][1])):
                if t is not None:
                    _checks.check_frozen(fn, f"{model}_{part}", t)
    _checks.check_labels(fn, labels, local_x["student"].shape[:-1], "student_hidden (without H)",
                         ignore_index)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be None or an int >= 1; got {chunk_size!r}")
    _check_same_on_every_rank(fn, {**{f"{m}_hidden": hidden[m] for m in weights},
                                   "labels": labels}, mesh.get_group())
    leading_shape = local_x["student"].shape[:-1]

    def flat(x):
        return x.reshape(-1, x.shape[-1]) if x is not None else None

    xs, xo, xg = flat(local_x["student"]), flat(local_x["original"]), flat(local_x.get(
        "strengthened"))
    keep = labels.reshape(-1) != ignore_index if labels is not None else None
    vocab = max(1, local_w["student"].shape[0])
    chunk_size = chunk_size or max(1, (160 << 20) // (5 * 4 * vocab))
    hyper = (float(alpha), float(temperature), direction == "reverse")
    loss = _VocabParallelLinearRKL.apply(
        xs, local_w["student"], local_b["student"], xo, local_w["original"],
        local_b["original"], xg, local_w.get("strengthened"), local_b.get("strengthened"), keep,
        hyper, chunk_size, accum_dtype, reduction == "none", mesh.get_group())
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    elif reduction == "mean":
        count = keep.sum().clamp(min=1).to(loss.dtype) if keep is not None else max(
            xs.shape[0], 1)
        loss = loss / count
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
