"""The training loop's parallel strategies behind one interface.

One class per strategy, each in its own module; :func:`strategy_for` picks the class from
``DistInfo.strategy``:

    none    SingleProcess   (single.py)  one process, one device
    ddp     DDP             (ddp.py)     replicated model, gradients all-reduced
    fsdp    FSDP2           (fsdp.py)    parameters sharded per decoder layer (fully_shard)
    zero3   ZeRO3           (zero3.py)   DeepSpeed ZeRO-3 engine: parameters, gradients and
                                         optimizer states partitioned

Everything the loop does that differs between them is a method of :class:`Strategy`
(base.py): checks of the run's options, loading the student and the teachers, wrapping,
the optimizer, backward, gradient synchronisation, the optimizer step with clipping, saving
and restoring a checkpoint's state, and gathering the final weights.
"""
from __future__ import annotations

from .base import Strategy


def strategy_for(info) -> Strategy:
    """The strategy object for ``info`` (a :class:`rkld.parallel.DistInfo`)."""
    if info.strategy == "none":
        from .single import SingleProcess
        return SingleProcess(info)
    if info.strategy == "ddp":
        from .ddp import DDP
        return DDP(info)
    if info.strategy == "fsdp":
        from .fsdp import FSDP2
        return FSDP2(info)
    if info.strategy == "zero3":
        from .zero3 import ZeRO3
        return ZeRO3(info)
    raise ValueError(f"unknown parallel strategy {info.strategy!r}; expected none, ddp, fsdp "
                     f"or zero3")


__all__ = ["Strategy", "strategy_for"]
