"""Shared plumbing of the ``torch.library`` operators (namespace ``rkld``) behind both losses.

Each loss is one operator whose real implementation is opaque to ``torch.compile`` (which
traces its fake implementation and its registered autograd instead), so a compiled function
that returns the loss has no graph break. The same setup_context/backward pair serves two
routes:

- the operator itself (``torch.library.register_autograd``): eager, ``torch.compile``,
  ``torch.library.opcheck``;
- an ``autograd.Function`` with ``setup_context`` and a ``vmap`` rule that calls the operator:
  ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``...), which do not accept the
  operator's own autograd.

Backward with grad mode on (``create_graph=True``, and every ``torch.func.grad``) recomputes the
gradient with differentiable PyTorch ops, so that second derivatives are exact (at the memory
cost of the naive formula); the usual backward runs the fused kernels.
"""
from __future__ import annotations

import torch

# The ``compiled=`` argument of the losses (None / True / False) as an operator argument.
COMPILED_CODES = {None: "auto", True: "always", False: "never"}
COMPILED_FROM_CODE = {code: value for value, code in COMPILED_CODES.items()}


# The Python implementation of every rkld operator by name, for tests whose dispatch modes look
# inside the operators (a dispatch mode sees an operator as one call, not the ops it runs).
IMPLEMENTATIONS: dict = {}


def custom_op(name: str, fn):
    """Register ``fn`` as the operator ``rkld::name`` (no input is mutated)."""
    IMPLEMENTATIONS[name] = fn
    return torch.library.custom_op(f"rkld::{name}", fn, mutates_args=())


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform is active (then the autograd.Function route is taken).
    Never true while torch.compile traces (dynamo sees the operator route only)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def tracing(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor that torch.compile / AOTAutograd is tracing (fake or functional),
    where reading its value on the host or mutating a saved buffer in place is not allowed."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return (torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))
            or torch._is_functional_tensor(t))


def vmap_by_loop(op, info, in_dims, *args):
    """A vmap rule: call ``op`` once per batch entry and stack the outputs along dim 0. The
    losses reduce over rows, so the batch cannot simply be folded into the rows."""
    outputs = []
    for index in range(info.batch_size):
        sliced = [arg.select(dim, index) if dim is not None else arg
                  for arg, dim in zip(args, in_dims)]
        outputs.append(op(*sliced))
    stacked = tuple(torch.stack(parts) for parts in zip(*outputs))
    return stacked, (0,) * len(stacked)


def function_route(op, setup_context, backward, name: str):
    """An ``autograd.Function`` that calls ``op`` with ``setup_context``, ``backward`` and a vmap
    rule, for torch.func transforms."""

    def forward(*args):
        return op(*args)

    def vmap(info, in_dims, *args):
        return vmap_by_loop(op, info, in_dims, *args)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "vmap": staticmethod(vmap)})


def process_group(group_name: str | None):
    """The process group an operator's ``group_name`` argument names (vocabulary parallelism;
    ``ProcessGroup.group_name``), or None. Operators take the name, not the group, so that
    torch.compile's caches key on it like on any other argument."""
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name)


def mean_divisor(keep: torch.Tensor | None, rows: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> torch.Tensor:
    """The divisor of ``reduction="mean"``: the number of kept rows (every row without a mask),
    at least 1 (a mean over nothing is 0, not NaN), as a 0-d tensor of ``dtype`` (no host
    sync). The one place of this rule for every path of both losses."""
    if keep is not None:
        return keep.sum().clamp(min=1).to(dtype)
    return torch.full((), max(rows, 1), dtype=dtype, device=device)


def upstream_per_row(grad_loss: torch.Tensor, keep: torch.Tensor | None, reduction: str,
                     rows: int) -> torch.Tensor:
    """The upstream gradient of each row's loss given that of the reduced loss (no host sync).
    ``mean`` divides by the kept count, as the forward did."""
    if reduction == "none":
        return grad_loss
    if reduction == "mean":
        grad_loss = grad_loss / mean_divisor(keep, rows, grad_loss.dtype, grad_loss.device)
    return grad_loss.expand(rows)
