"""Process groups, collectives and the DeepSpeed ZeRO-3 helpers of the parallel strategies.

Launch with ``torchrun`` or ``accelerate launch`` (both set RANK / WORLD_SIZE / MASTER_ADDR).
The strategy comes from ``--parallel`` or, with ``auto``, from accelerate's environment
(``ACCELERATE_USE_FSDP=true`` from an FSDP config selects FSDP2, ``ACCELERATE_USE_DEEPSPEED=true``
with ZeRO stage 3 selects ``zero3``, anything else DDP). What the training loop does
differently under each strategy lives in :mod:`rkld.strategies` (one class per strategy);
``wrap_model``, ``shard_frozen``, ``gradient_sync`` and ``backward`` here delegate to it.

Under FSDP2 the root module (embeddings, final norm, lm_head) stays unsharded from its forward
until its backward, so the student's lm_head weight read *after* the forward pass is the full
weight, and the fused-linear loss's gradient to it is reduce-scattered with the rest of the
root's gradients. The decoder layers (``model._no_split_modules``) are sharded one by one.

Under ZeRO-3 a parameter is whole only inside the forward (and backward) of a module that
declares it, so the loss runs inside one: :class:`HeadCall`, a parameter-less submodule that
declares the lm_head's parameters as its external parameters (see :func:`head_runner`). Models
are loaded partitioned (``zero3_loading``: each process materialises only its share), the
student is driven by a DeepSpeed engine (its ``backward`` and ``step``, with gradient clipping,
fp32 master weights under bf16, and partitioned AdamW states), and frozen teachers run as
ZeRO-3 inference engines.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"       # none | ddp | fsdp | zero3
    ds_config: dict = field(default_factory=dict)    # zero3: the DeepSpeed config (zero3_setup)

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
        if strategy in ("ddp", "fsdp", "zero3"):
            raise ValueError(f"--parallel {strategy} needs several processes; launch with "
                             f"torchrun or accelerate launch")
        return DistInfo(device=device)
    if strategy == "auto":
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            strategy = "zero3"
        elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            strategy = "fsdp"
        else:
            strategy = "ddp"
    if strategy == "zero3":
        _check_accelerate_deepspeed_env()
        _import_deepspeed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if strategy == "none":
        raise ValueError("--parallel none cannot run with several processes")
    return DistInfo(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank,
                    device=device, strategy=strategy)


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """Wrap the trainable model for the strategy (see :mod:`rkld.strategies`)."""
    from .strategies import strategy_for
    return strategy_for(info).wrap(model)


def shard_frozen(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """A frozen model (a teacher) for the strategy: sharded like the student under FSDP2, a
    ZeRO-3 inference engine under ZeRO-3, as it is otherwise (DDP replicates). Every process
    must then run the same number of forward passes."""
    from .strategies import strategy_for
    return strategy_for(info).frozen(model)


def full_tensor(tensor):
    """The whole tensor of a (possibly FSDP-sharded or ZeRO-3-partitioned) parameter; a
    collective operation for both, which every process must call."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor()
    if hasattr(tensor, "ds_id"):
        import deepspeed
        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()
    return tensor


def full_shape(tensor) -> torch.Size:
    """The shape of a parameter, also while ZeRO-3 holds only this process's partition."""
    return getattr(tensor, "ds_shape", tensor.shape)


def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def gradient_sync(model: torch.nn.Module, info: DistInfo, enabled: bool):
    """Context: skip the gradient all-reduce / reduce-scatter of micro-batches that are not the
    last of an optimizer step (the gradients accumulate locally until then)."""
    from .strategies import strategy_for
    return strategy_for(info).gradient_sync(model, enabled)


def backward(model, loss: torch.Tensor, info: DistInfo) -> None:
    """``loss.backward()``, through the DeepSpeed engine under ZeRO-3."""
    from .strategies import strategy_for
    strategy_for(info).backward(model, loss)


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


def gather_objects(value, info: DistInfo) -> list:
    """Every process's value, in rank order, on every process."""
    if not info.distributed:
        return [value]
    parts = [None] * info.world_size
    dist.all_gather_object(parts, value)
    return parts


def broadcast_object(value, info: DistInfo):
    """Rank 0's value on every process."""
    if not info.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# --------------------------------------------------------------------------- DeepSpeed ZeRO-3

def _import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ImportError("--parallel zero3 (DeepSpeed ZeRO-3) needs deepspeed: "
                          "pip install 'rkld[deepspeed]'") from None
    return deepspeed


def _check_accelerate_deepspeed_env() -> None:
    """Refuse accelerate DeepSpeed settings that rkld does not implement, before any work."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    if stage != "3":
        raise ValueError(f"the accelerate config asks for DeepSpeed ZeRO stage {stage}; rkld "
                         f"supports stage 3 (rkld/accelerate_configs/zero3.yaml). For stages "
                         f"1-2, whose parameters are not sharded, use DDP (ddp.yaml)")
    for what in ("OFFLOAD_OPTIMIZER_DEVICE", "OFFLOAD_PARAM_DEVICE"):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_{what}", "none").lower()
        if device not in ("none", ""):
            raise ValueError(f"the accelerate config sets {what.lower()}: {device}; offloading "
                             f"is not supported by rkld (set it to none, or shard over more GPUs)")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if config_file not in ("", "none", "None"):
        raise ValueError(f"the accelerate config names a DeepSpeed config file ({config_file}); "
                         f"rkld builds the DeepSpeed config from its own options (--micro-batch-"
                         f"size, --max-grad-norm, --dtype), so remove deepspeed_config_file and "
                         f"use zero_stage: 3 (rkld/accelerate_configs/zero3.yaml)")


def zero3_setup(info: DistInfo, dtype, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill ``info.ds_config`` for a ZeRO-3 run (a no-op for other strategies).

    ``dtype`` is the weights' dtype: bfloat16 turns on DeepSpeed's bf16 mode (bf16 weights and
    activations, fp32 master weights and AdamW states in the partitions); float32 trains in
    fp32; float16 is refused (it needs loss scaling, which the loop does not drive).
    Gradient accumulation is driven by the training loop (``gradient_sync``), so DeepSpeed is
    told 1 micro-batch per step; its ``backward`` then applies no scaling of its own.
    """
    if info.strategy != "zero3":
        return
    dtype = str(dtype).removeprefix("torch.")
    if dtype == "float16":
        raise ValueError("--dtype float16 is not supported under DeepSpeed ZeRO-3 (it needs "
                         "loss scaling); use bfloat16")
    info.ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == "bfloat16"},
        # The loop's own torch.optim.AdamW: DeepSpeed steps it on the fp32 partitions.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 62,
    }


@contextlib.contextmanager
def zero3_loading(info: DistInfo):
    """Within this context, ``from_pretrained`` under ZeRO-3 creates the model partitioned
    (``deepspeed.zero.Init``): no process ever holds the whole model. A no-op otherwise."""
    if info.strategy != "zero3":
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    keep_alive = HfDeepSpeedConfig(info.ds_config)
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


class HeadCall(torch.nn.Module):
    """Runs ``fn(weight, bias, *tensors)`` with the lm_head's parameters inside its own forward.

    A submodule of the student that owns no parameters; under ZeRO-3 the lm_head's weight and
    bias are registered as its external parameters, so DeepSpeed gathers them around this
    forward and again for its backward, and partitions their gradients like any other. Pass
    the tensors that carry the student's gradient (its hidden rows) as arguments, not through
    the closure: DeepSpeed's backward hooks follow the module's tensor inputs and outputs.
    """

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self._head = (head,)          # a tuple: not registered as a submodule

    def forward(self, fn, *tensors):
        head = self._head[0]
        return fn(head.weight, getattr(head, "bias", None), *tensors)


HEAD_CALL = "rkld_head_call"


def attach_head_call(model: torch.nn.Module) -> HeadCall:
    """Give the model a :class:`HeadCall` submodule for its lm_head (before ZeRO-3 wraps it)."""
    hf_model = _hf_model(model)
    head = hf_model.get_output_embeddings()
    call = HeadCall(head)
    hf_model.add_module(HEAD_CALL, call)
    return call


def _register_head_params(call: HeadCall, head) -> None:
    deepspeed = _import_deepspeed()
    for param in (head.weight, getattr(head, "bias", None)):
        if param is not None:
            deepspeed.zero.register_external_parameter(call, param)


def head_runner(model):
    """``run(fn, *tensors) -> fn(weight, bias, *tensors)`` with the student's lm_head parameters
    whole: directly, or under ZeRO-3 inside the forward of its :class:`HeadCall`."""
    from .models import unwrap_model
    hf_model = unwrap_model(model)
    call = getattr(hf_model, HEAD_CALL, None)
    if call is not None:
        return call
    head = hf_model.get_output_embeddings()
    return lambda fn, *tensors: fn(head.weight, getattr(head, "bias", None), *tensors)


def zero3_engine(model: torch.nn.Module, optimizer, info: DistInfo):
    """``(engine, optimizer)``: the student and its optimizer under a ZeRO-3 DeepSpeed engine.
    The model's parameters are partitioned here if they were not created partitioned."""
    deepspeed = _import_deepspeed()
    engine, optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                 config=info.ds_config)
    hf_model = _hf_model(engine.module)
    _register_head_params(getattr(hf_model, HEAD_CALL), hf_model.get_output_embeddings())
    return engine, optimizer
