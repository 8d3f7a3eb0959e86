"""Vocabulary parallelism (tensor parallelism) over DTensor: no rank gathers the vocabulary.

A tensor-parallel lm_head (``ColwiseParallel(use_local_output=False)``) leaves every rank with
its slice of the vocabulary for all positions: logits as a DTensor ``Shard(-1)`` on a 1-D
mesh, or the lm_head weight as a DTensor ``Shard(0)``. :func:`~rkld_kernels.fused_rkl_loss` and
:func:`~rkld_kernels.fused_linear_rkl_loss` route such inputs here.

Both run the same operators, chunk loops and per-row math as plain tensors
(``torch_backend.rkl_rows``), with the vocabulary-parallel all-reduce as an option of that loop
(the operators' ``group_name`` argument): each rank streams its slice of every row, and per
chunk of rows a few floats per row are all-reduced over the mesh's process group -- the
student's and the teacher's log-sum-exps over each slice (so that ``log_softmax`` of the slice
plus a per-row shift is the full vocabulary's log-probability), the row's loss (a sum over the
slices) and, in the gradient, the row sums that the one-hot fix-up takes the top entry from.
Everything else -- teacher, masking, the fast and exact non-finite paths, the reductions, the
fused-linear loss's GEMM precision scheme (float32 logits from the GEMM to the softmax for
float16/bfloat16 heads) -- is the plain path's, so on one rank the results are bit-identical
to it. With hidden states replicated, ``dX = dlogits @ W`` is a sum over the slices,
all-reduced once per call, and the weight gradient is local, sharded like the weight. The
student's logits gradient comes back with the student's placement.

The losses are returned as DTensors with ``Replicate()`` placement. The vocabulary part runs in
PyTorch on any device (``backend="auto"`` or ``"torch"``); one backward (no second
derivatives, no torch.func).
"""
from __future__ import annotations

import torch

from . import _checks
from .torch_backend import check_compute_dtype
from .torch_backend import compute_dtype as compute_dtype_of

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:          # a torch build without distributed support
    dist = DTensor = Replicate = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


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


# ---------------------------------------------------------------------------------------------
# Logits: vocab_parallel_rkl_loss
# ---------------------------------------------------------------------------------------------
def vocab_parallel_rkl_loss(student_logits, original_logits, strengthened_logits=None, *,
                            alpha: float = 8.0, labels=None, ignore_index: int = -100,
                            temperature: float = 1.0, direction: str = "reverse",
                            reduction: str = "mean", backend: str = "auto",
                            vocab_size: int | None = None,
                            compute_dtype: torch.dtype | None = None):
    """:func:`~rkld_kernels.fused_rkl_loss` of logits that are DTensors sharded on the vocabulary
    (``Shard(-1)`` on a 1-D mesh, all three on the same mesh); ``labels`` a plain tensor or a
    replicated DTensor. Returns the loss as a DTensor with ``Replicate()``; the student's
    gradient has the student's placement. ``vocab_size``: as in fused_rkl_loss, provided the
    inputs' shards cover the same global entries on every rank. ``compute_dtype``: as in
    fused_rkl_loss."""
    from .fused_rkl import rkl_loss_op, saved_dtype_of
    fn = "fused_rkl_loss"
    _checks.check_options(fn, alpha=alpha, temperature=temperature, direction=direction,
                          reduction=reduction, backend=backend)
    check_compute_dtype(fn, compute_dtype, student_logits.dtype)
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
    student = student.reshape(-1, vocab)
    compute = compute_dtype_of(student.dtype, compute_dtype)
    need_grad = torch.is_grad_enabled() and student.requires_grad
    loss, _ = rkl_loss_op(
        student, original.reshape(-1, vocab),
        strengthened.reshape(-1, vocab) if strengthened is not None else None, keep,
        float(alpha), float(temperature), direction == "reverse", reduction, "torch", "never",
        need_grad, saved_dtype_of(student.dtype, reduction, "torch", compute), compute,
        mesh.get_group().group_name)
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


# ---------------------------------------------------------------------------------------------
# Hidden states + sharded lm_head: vocab_parallel_linear_rkl_loss
# ---------------------------------------------------------------------------------------------
def vocab_parallel_linear_rkl_loss(student_hidden, student_weight, original_hidden,
                                   original_weight, strengthened_hidden=None,
                                   strengthened_weight=None, *, student_bias=None,
                                   original_bias=None, strengthened_bias=None,
                                   alpha: float = 8.0, labels=None, ignore_index: int = -100,
                                   temperature: float = 1.0, direction: str = "reverse",
                                   reduction: str = "mean", chunk_size: int | None = None,
                                   accum_dtype: torch.dtype | None = None,
                                   backend: str = "auto", vocab_size: int | None = None,
                                   compute_dtype: torch.dtype | None = None,
                                   drop_masked: bool = True):
    """:func:`~rkld_kernels.fused_linear_rkl_loss` with lm_head weights (and biases) that are
    DTensors sharded over the vocabulary (``Shard(0)`` on one 1-D mesh) and hidden states
    replicated (plain tensors or ``Replicate()`` DTensors). ``strengthened_weight=None`` shares
    the original's head. Returns the loss as a ``Replicate()`` DTensor; the weight and bias
    gradients are sharded like them, the hidden gradient is the full (all-reduced) one. The
    chunk loop is ``fused_linear``'s (its operator with ``group_name``); ``chunk_size``,
    ``accum_dtype``, ``compute_dtype`` and ``drop_masked`` as in fused_linear_rkl_loss."""
    from .fused_linear import run_linear_rkl_loss
    fn = "fused_linear_rkl_loss"
    _checks.check_options(fn, alpha=alpha, temperature=temperature, direction=direction,
                          reduction=reduction, backend=backend)
    check_compute_dtype(fn, compute_dtype, student_hidden.dtype)
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
    loss = run_linear_rkl_loss(
        xs, local_w["student"], local_b["student"], xo, local_w["original"],
        local_b["original"], xg, local_w.get("strengthened"), local_b.get("strengthened"), keep,
        leading_shape, alpha=alpha, temperature=temperature, direction=direction,
        reduction=reduction, chunk_size=chunk_size, accum_dtype=accum_dtype, backend="torch",
        compiled=False, drop_masked=drop_masked, compute_dtype=compute_dtype,
        group_name=mesh.get_group().group_name)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
