"""DeepSpeed ZeRO-3: parameters, gradients and AdamW states partitioned over the processes.

Models are created partitioned (``zero3_loading``); the student is driven by a DeepSpeed
engine (its backward, gradient-accumulation boundary and step, which clips); frozen teachers
run as ZeRO-3 inference engines. The loss runs inside the student's head call (see
``rkld.parallel.HeadCall``), where the lm_head's parameters are gathered.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..models import check_logits_are_linear
from ..parallel import (
    _import_deepspeed,
    attach_head_call,
    barrier,
    zero3_engine,
    zero3_loading,
    zero3_setup,
)
from .base import SINGLE_PROCESS_STATE, ZERO3_TAG, Strategy


class ZeRO3(Strategy):
    name = "zero3"
    fused_adamw = False     # DeepSpeed steps the optimizer on its flat fp32 partitions
    supports_lora = False
    supports_epoch_callbacks = False
    inference_mode = False      # ZeRO-3 gathers parameters into buffers it reuses
    lora_refusal = ("--lora under DeepSpeed ZeRO-3 is not supported; LoRA's trainable state is "
                    "small, so use DDP (or a single process) for LoRA runs")
    epoch_callback_refusal = ("per-epoch callbacks (--eval-every-epoch) are not supported under "
                              "DeepSpeed ZeRO-3, where no process holds the whole model; use "
                              "FSDP2, or evaluate the saved model with rkld eval")

    def configure(self, dtype, micro_batch_size: int, max_grad_norm: float) -> None:
        zero3_setup(self.info, dtype, micro_batch_size, max_grad_norm)

    def loading(self):
        return zero3_loading(self.info)

    def load_teacher(self, path, dtype):
        with self.loading():
            from ..models import load_model
            model, _ = load_model(path, dtype=dtype)
        model = self.frozen(model)
        check_logits_are_linear(model)     # a forward through the engine: after wrapping
        return model

    def frozen(self, model):
        if type(model).__name__ == "DeepSpeedEngine":
            return model
        model.requires_grad_(False)
        deepspeed = _import_deepspeed()
        inference = {key: value for key, value in self.info.ds_config.items()
                     if key not in ("gradient_clipping", "zero_allow_untested_optimizer")}
        engine, *_ = deepspeed.initialize(model=model, config=inference)
        return engine

    def wrap(self, model):
        # The engine (attach) wraps the model together with its optimizer; here it only gets
        # the submodule the loss runs in.
        attach_head_call(model)
        return model

    def prepare_student(self, model):
        # The engine places and partitions the model; the logits check needs a forward, so it
        # runs once the engine exists (attach).
        return self.wrap(model)

    def attach(self, model, optimizer):
        model, optimizer = zero3_engine(model, optimizer, self.info)
        check_logits_are_linear(model)
        return model, optimizer

    @contextlib.contextmanager
    def gradient_sync(self, model, enabled: bool):
        model.set_gradient_accumulation_boundary(enabled)
        yield

    def backward(self, model, loss) -> None:
        model.backward(loss)       # partitions the gradients as they arrive

    def step(self, model, optimizer, params, max_grad_norm) -> float:
        model.step()               # clips (gradient_clipping), steps and zeroes
        norm = model.get_global_grad_norm()       # None when DeepSpeed did not compute one
        return None if norm is None else float(norm)

    def save_state(self, model, optimizer, folder: Path) -> None:
        model.save_checkpoint(str(folder), tag=ZERO3_TAG, save_latest=False)

    def check_checkpoint(self, folder: Path, pointer: dict) -> None:
        if not (folder / ZERO3_TAG).is_dir():
            written = "by a single process" if (folder / SINGLE_PROCESS_STATE).exists() \
                else "with DDP or FSDP2"
            raise ValueError(f"{folder} was written {written}, not under DeepSpeed ZeRO-3; "
                             f"resume it with DDP, FSDP2 or one process")
        if pointer.get("world_size") != self.info.world_size:
            raise ValueError(f"{folder} holds ZeRO-3 partitions of {pointer.get('world_size')} "
                             f"processes; resume it with that many (this run has "
                             f"{self.info.world_size})")

    def load_state(self, model, optimizer, folder: Path, pointer: dict) -> None:
        self.check_checkpoint(folder, pointer)
        try:
            loaded, _ = model.load_checkpoint(str(folder), tag=ZERO3_TAG)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ValueError(f"{folder / ZERO3_TAG}: the ZeRO-3 checkpoint could not be read "
                             f"({first[:200]}); start over with --overwrite") from None
        if loaded is None:
            raise FileNotFoundError(f"{folder / ZERO3_TAG}: DeepSpeed found no checkpoint there")

    def save_final(self, model, tokenizer, out: Path) -> None:
        hf_model = self.unwrap(model)
        state = _full_state(hf_model, self.info)
        if self.info.is_main:
            hf_model.save_pretrained(out, state_dict=state)
            tokenizer.save_pretrained(out)
        barrier(self.info)


def _full_state(hf_model, info) -> dict | None:
    """The whole state dict on the main process (None elsewhere), gathered one ZeRO-3
    parameter at a time so that no process holds more than one extra parameter on the
    accelerator."""
    import deepspeed
    state = {}
    for name, param in hf_model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if info.is_main:
                state[name] = param.detach().cpu().clone()
    if not info.is_main:
        return None
    for name, value in hf_model.state_dict(keep_vars=True).items():     # persistent buffers
        if not isinstance(value, torch.nn.Parameter):
            state[name] = value.detach().cpu().clone()
    return state
