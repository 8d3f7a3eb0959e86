"""Triton kernels of ``fused_rkl_loss``, one module per phase:

- ``logits``: loading a block of logits and forming the unlearning teacher in registers;
- ``rkl_stats``: forward, one streaming pass per row (or per V-split, then a combine);
- ``rkl_grad``: backward, the gradient recomputed from logits plus row statistics.

Launch configuration and the PyTorch-facing entry points live in ``rkld_kernels.triton_backend``.
Importing this package imports triton; whether the kernels run compiled or under the
interpreter is fixed at that moment by ``TRITON_INTERPRET``.
"""
from .rkl_grad import rkl_grad_kernel, rkl_grad_top_kernel
from .rkl_stats import PARTIAL_COUNT, STAT_COUNT, rkl_stats_combine_kernel, rkl_stats_kernel

__all__ = ["rkl_stats_kernel", "rkl_stats_combine_kernel", "rkl_grad_kernel",
           "rkl_grad_top_kernel", "STAT_COUNT", "PARTIAL_COUNT"]
