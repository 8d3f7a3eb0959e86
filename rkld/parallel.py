"""Process groups and model wrapping for DDP and FSDP2, with plain torch.distributed.

Launch with ``torchrun`` or ``accelerate launch`` (both set RANK / WORLD_SIZE / MASTER_ADDR).
The strategy comes from ``--parallel`` or, with ``auto``, from accelerate's environment
(``ACCELERATE_USE_FSDP=true`` from an FSDP config selects FSDP2, anything else DDP).

Under FSDP2 the root module (embeddings, final norm, lm_head) stays unsharded from its forward
until its backward, so the student's lm_head weight read *after* the forward pass is the full
weight, and the fused-linear loss's gradient to it is reduce-scattered with the rest of the
root's gradients. The decoder layers (``model._no_split_modules``) are sharded one by one.
(``rkld_kernels.distributed.LMHeadRKLLoss`` is the other way: the loss inside the head's own
forward, as DeepSpeed ZeRO-3 would need; the tests check this one against a single process.)
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"       # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(strategy: str = "auto") -> DistInfo:
    """Join the process group the launcher describes (or run alone) and pick the strategy."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        if strategy in ("ddp", "fsdp"):
            raise ValueError(f"--parallel {strategy} needs several processes; launch with "
                             f"torchrun or accelerate launch")
        return DistInfo(device=device)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError("DeepSpeed is not supported by the rkld training loop; use an FSDP2 "
                         "config (rkld/accelerate_configs/fsdp2.yaml), which shards the same way "
                         "as ZeRO-3")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if strategy == "auto":
        use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        strategy = "fsdp" if use_fsdp else "ddp"
    if strategy == "none":
        raise ValueError("--parallel none cannot run with several processes")
    return DistInfo(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank,
                    device=device, strategy=strategy)


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """Wrap the trainable model for the strategy (DDP, or FSDP2 per decoder layer + root)."""
    if info.strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        layer_classes = set(getattr(_hf_model(model), "_no_split_modules", None) or ())
        if not layer_classes:
            raise ValueError(f"{type(model).__name__} does not declare its decoder layer class "
                             f"(_no_split_modules), so FSDP2 cannot shard it layer by layer")
        for module in model.modules():
            if type(module).__name__ in layer_classes:
                fully_shard(module)
        fully_shard(model)
    return model


def shard_frozen(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """A frozen model (a teacher) for the strategy: sharded like the student under FSDP2, so
    that a teacher too large for one device still runs; as it is otherwise (DDP replicates).
    Every process must then run the same number of forward passes."""
    model.requires_grad_(False)
    if info.strategy == "fsdp":
        return wrap_model(model, info)
    return model


def full_tensor(tensor):
    """The whole tensor of a (possibly FSDP-sharded) parameter."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, info: DistInfo, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter of micro-batches that are not the last
    of an optimizer step (the gradients accumulate locally until then)."""
    if enabled or info.strategy == "none":
        yield
    elif info.strategy == "ddp":
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def all_reduce_sum(values: list, info: DistInfo) -> list:
    """Sum a few numbers over all processes (identity when running alone)."""
    if not info.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(value, info: DistInfo):
    """Rank 0's value on every process."""
    if not info.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
