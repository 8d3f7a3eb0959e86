"""rkld_kernels: fused reverse-KL distillation losses for RKLD unlearning.

Public API:
    fused_rkl_loss, RKLLoss                 -- from logits
    fused_linear_rkl_loss, LinearRKLLoss    -- from hidden states and lm_head weights
    unlearning_teacher_logits               -- o - alpha * relu(g - o)
    reference_rkl_loss                      -- the naive specification

Both losses are torch.library custom operators (``torch.ops.rkld.*``): torch.compile traces them
whole, torch.func transforms apply, and DTensor inputs sharded over the vocabulary run
vocabulary-parallel (``rkld_kernels.tensor_parallel``).
"""
from .fused_linear import LinearRKLLoss, fused_linear_rkl_loss
from .fused_rkl import RKLLoss, fused_rkl_loss
from .reference import reference_rkl_loss, unlearning_teacher_logits

__all__ = ["fused_rkl_loss", "RKLLoss", "fused_linear_rkl_loss", "LinearRKLLoss",
           "unlearning_teacher_logits", "reference_rkl_loss"]
