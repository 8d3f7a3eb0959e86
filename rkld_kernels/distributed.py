"""Running the fused-linear loss where a sharded lm_head weight is gathered (FSDP2, DDP, ZeRO-3).

:func:`~rkld_kernels.fused_linear_rkl_loss` takes the student's lm_head weight as a plain tensor.
Under sharded data parallelism that weight only exists in full inside the forward of the module
that owns it: FSDP2 (``torch.distributed.fsdp.fully_shard``) all-gathers a module's parameters in
a pre-forward hook and frees them again after it, and DeepSpeed ZeRO-3 does the same with its own
hooks. Reading ``model.lm_head.weight`` outside such a forward gives a shard (or an empty
placeholder), and a gradient computed from it would not be reduced across ranks.

The supported way is :class:`LMHeadRKLLoss`: a module that owns the student's lm_head and whose
forward takes hidden states and runs the loss. Make it part of the student and call it instead
of the lm_head:

- FSDP2: ``fully_shard(head_loss)`` (its own unit, like a decoder layer) before sharding the root.
  Its forward then sees the gathered weight, the gradient (computed during the forward for
  ``reduction="mean"/"sum"``) reaches the unsharded parameter, and FSDP2's post-backward hook
  reduce-scatters it. ``fully_shard(head_loss, reshard_after_forward=False)`` skips the second
  all-gather that FSDP2 otherwise performs before the backward (the backward needs no weight for
  mean/sum), at the price of keeping the full weight until then.
- DDP: wrap the whole student, head included, so that the loss is computed inside
  ``DistributedDataParallel.forward``; DDP then all-reduces the lm_head gradient like any other.
- DeepSpeed ZeRO-3: make the module a submodule of the model given to ``deepspeed.initialize``
  and call it from the model's forward: ZeRO-3's module hooks gather ``lm_head.weight`` around
  its forward and partition its gradient in the backward. A weight used from the forward of a
  module that does not own it (an lm_head tied to the input embedding) must be declared there
  with ``deepspeed.zero.register_external_parameter(module, weight)``. Outside any forward,
  ``deepspeed.zero.GatheredParameters([weight])`` gives the full weight for inspection or
  evaluation; for training, use the module route. (Tested: tests/test_fused_linear_distributed.py
  runs this module under DDP, FSDP2 and ZeRO-3 with 2 processes; the project's training
  pipeline takes the external-parameter route instead.)

Tied embeddings under FSDP2: the tied parameter must belong to one FSDP unit that is gathered
whenever either user runs (e.g. shard the embedding and the head together in the root unit).

Teachers need no gathering: their hidden states and lm_head weights are plain frozen tensors
(a cached teacher, or a frozen replica), passed to the forward.
"""
from __future__ import annotations

import torch
from torch import nn

from .fused_linear import LinearRKLLoss


class LMHeadRKLLoss(nn.Module):
    """The student's ``lm_head`` and the fused-linear RKLD loss as one module.

    Args:
        lm_head: the student's ``nn.Linear(H_s, V)`` output layer (bias optional). It stays a
            submodule, so sharding wrappers and optimisers see its parameters.
        **loss_options: options of :class:`~rkld_kernels.LinearRKLLoss` (alpha, temperature,
            direction, reduction, ignore_index, chunk_size, accum_dtype, backend, compiled).

    ``forward(hidden, original_hidden, original_weight, strengthened_hidden=None,
    strengthened_weight=None, labels=None, *, original_bias=None, strengthened_bias=None)``
    returns the loss of the student's logits ``lm_head(hidden)`` against the teacher built from
    the original and strengthened models' logits (see :func:`~rkld_kernels.fused_linear_rkl_loss`).
    """

    def __init__(self, lm_head: nn.Linear, **loss_options):
        super().__init__()
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"LMHeadRKLLoss: lm_head must be an nn.Linear(H, V) output layer; "
                            f"got {type(lm_head).__name__}")
        self.lm_head = lm_head
        self.loss = LinearRKLLoss(**loss_options)

    def forward(self, hidden: torch.Tensor, original_hidden: torch.Tensor,
                original_weight: torch.Tensor, strengthened_hidden: torch.Tensor | None = None,
                strengthened_weight: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, original_bias: torch.Tensor | None = None,
                strengthened_bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss(hidden, self.lm_head.weight, original_hidden, original_weight,
                         strengthened_hidden, strengthened_weight, labels,
                         student_bias=self.lm_head.bias, original_bias=original_bias,
                         strengthened_bias=strengthened_bias)
