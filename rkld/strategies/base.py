"""The interface every parallel strategy implements, with the behaviour most of them share.

A strategy holds the run's :class:`rkld.parallel.DistInfo`. The training loop calls, in order:

    check(cfg, on_epoch_end)           refuse options the strategy does not support (no work yet)
    check_student_options(cfg)         the same for how the student is built (LoRA under FSDP2)
    configure(dtype, micro_batch_size, max_grad_norm)   settings the strategy needs before loading
    load_student(path, dtype) / load_teacher(path, dtype)
    prepare_student(model)             checks and wrapping (DDP, fully_shard, head call)
    make_optimizer(groups, lr)         AdamW over the parameter groups
    attach(model, optimizer)           the (model, optimizer) the loop drives (a ZeRO-3 engine)
    gradient_sync(model, enabled)      context: synchronise gradients on the last micro-batch only
    backward(model, loss)
    step(model, optimizer, params, max_grad_norm) -> gradient norm before clipping (or None)
    save_state(model, optimizer, folder) / load_state(model, optimizer, folder, pointer)
    save_final(model, tokenizer, out)  the trained model (adapters merged) for the next stage
    unwrap(model)                      the Hugging Face model inside the wrappers

The defaults here are those of one process; DDP and FSDP2 override what differs.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch

from ..models import check_logits_are_linear, load_model, unwrap_model
from ..storage import load_torch

SINGLE_PROCESS_STATE = "state.pt"
ZERO3_TAG = "zero3"      # the folder DeepSpeed's save_checkpoint writes its partitions into


class Strategy:
    name = "none"
    fused_adamw = True          # the fused AdamW is several times faster, also on CPU
    supports_lora = True
    supports_epoch_callbacks = True
    inference_mode = True       # teachers may run under torch.inference_mode

    def __init__(self, info):
        self.info = info

    # ------------------------------------------------------------------ before any work

    def check(self, cfg, on_epoch_end) -> None:
        """Raise ValueError for options this strategy does not support."""
        if cfg.lora and not self.supports_lora:
            raise ValueError(self.lora_refusal)
        if on_epoch_end is not None and not self.supports_epoch_callbacks:
            raise ValueError(self.epoch_callback_refusal)

    lora_refusal = ""
    epoch_callback_refusal = ""

    def check_student_options(self, cfg) -> None:
        """Raise ValueError for ways of building the student that this strategy cannot wrap
        (checked with :meth:`check`, before any work)."""

    def configure(self, dtype, micro_batch_size: int, max_grad_norm: float) -> None:
        """Settings the strategy needs before models are loaded (the DeepSpeed config)."""

    # ------------------------------------------------------------------ models

    def loading(self):
        """Context in which ``from_pretrained`` creates models (partitioned under ZeRO-3)."""
        return contextlib.nullcontext()

    def load_student(self, path, dtype):
        with self.loading():
            model, _ = load_model(path, dtype=dtype)
        return model

    def load_teacher(self, path, dtype):
        """A frozen teacher, checked to have linear logits, ready to run on this process."""
        with self.loading():
            model, _ = load_model(path, dtype=dtype)
        check_logits_are_linear(model)
        return self.frozen(model)

    def frozen(self, model):
        """A frozen model (a teacher) prepared for this strategy; every process must then run
        the same number of forward passes through it."""
        model.requires_grad_(False)
        return model.to(self.info.device)

    def prepare_student(self, model):
        """Check and wrap the trainable model (LoRA adapters already attached)."""
        check_logits_are_linear(model)
        return self.wrap(model.to(self.info.device))

    def wrap(self, model):
        return model

    def unwrap(self, model):
        return unwrap_model(model)

    # ------------------------------------------------------------------ optimisation

    def make_optimizer(self, groups: list, lr: float):
        return torch.optim.AdamW(groups, lr=lr, fused=self.fused_adamw or None)

    def attach(self, model, optimizer):
        """The ``(model, optimizer)`` the loop drives from now on."""
        return model, optimizer

    @contextlib.contextmanager
    def gradient_sync(self, model, enabled: bool):
        """Synchronise gradients only when ``enabled`` (the last micro-batch of a step)."""
        yield

    def backward(self, model, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, model, optimizer, params: list, max_grad_norm: float) -> float | None:
        """Clip (when ``max_grad_norm`` > 0), step and zero the gradients; return the gradient
        norm before clipping (non-finite when a gradient is; None when it is not known)."""
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):       # keep the weights; the loop stops the run
            optimizer.zero_grad(set_to_none=True)
            return norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ checkpoints

    def _state_dicts(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        options = StateDictOptions(ignore_frozen_params=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        return {"model": model_state, "optim": optim_state}, options

    def save_state(self, model, optimizer, folder: Path) -> None:
        """Write the trainable weights and optimizer state of this process into ``folder``."""
        import torch.distributed.checkpoint as dcp
        state, _ = self._state_dicts(model, optimizer)
        if self.info.distributed:
            dcp.save(state, checkpoint_id=str(folder))
        else:   # one file: much faster than the distributed format's coordination
            torch.save(state, folder / SINGLE_PROCESS_STATE)

    def check_checkpoint(self, folder: Path, pointer: dict) -> None:
        """Refuse a checkpoint written in a layout this strategy cannot read."""
        if (folder / ZERO3_TAG).is_dir():
            raise ValueError(f"{folder} was written under DeepSpeed ZeRO-3; resume it under "
                             f"ZeRO-3")
        if (folder / SINGLE_PROCESS_STATE).exists() and self.info.distributed:
            raise ValueError(f"{folder} was written by a single process; resume it with one "
                             f"process (checkpoints of multi-process runs reshard freely)")

    def load_state(self, model, optimizer, folder: Path, pointer: dict) -> None:
        """Restore what :meth:`save_state` wrote (any process count, for the distributed
        format)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        self.check_checkpoint(folder, pointer)
        state, options = self._state_dicts(model, optimizer)
        single = folder / SINGLE_PROCESS_STATE
        if single.exists():
            state = load_torch(single, "the checkpoint's weights and optimizer state",
                               advice=_CHECKPOINT_ADVICE)
        else:
            try:
                with warnings.catch_warnings():
                    # A single process reads a multi-process checkpoint without a process group.
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.load(state, checkpoint_id=str(folder))
            except Exception as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                raise ValueError(f"{folder}: the checkpoint could not be read ({first[:200]}); "
                                 f"{_CHECKPOINT_ADVICE}") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=options)

    # ------------------------------------------------------------------ the result

    def save_final(self, model, tokenizer, out: Path) -> None:
        """Save the trained model (LoRA adapters merged) with its tokenizer (main process)."""
        if self.info.is_main:
            hf_model = model.module if isinstance(
                model, torch.nn.parallel.DistributedDataParallel) else model
            if hasattr(hf_model, "merge_and_unload"):
                hf_model = hf_model.merge_and_unload()
            hf_model.save_pretrained(out)
            tokenizer.save_pretrained(out)


_CHECKPOINT_ADVICE = ("resume from another checkpoint (checkpoints/latest.json names the one "
                      "used) or start over with --overwrite")
