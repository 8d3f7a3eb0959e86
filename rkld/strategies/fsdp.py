"""FSDP2 (``fully_shard``): every decoder layer and the root sharded over the processes.

The root module (embeddings, final norm, lm_head) stays unsharded from its forward until its
backward, so the lm_head weight read after the forward is whole; the fused loss's gradient to
it is reduce-scattered with the root's. Frozen teachers are sharded the same way, so a teacher
too large for one device still runs.
"""
from __future__ import annotations

import contextlib

from .base import Strategy


class FSDP2(Strategy):
    name = "fsdp"
    fused_adamw = False     # sharded DTensor parameters take the default implementation

    def check_student_options(self, cfg) -> None:
        if cfg.lora:
            raise ValueError("--lora with FSDP is not supported; LoRA's trainable state is "
                             "small, so use DDP (or a single process) for LoRA runs")

    def wrap(self, model):
        from torch.distributed.fsdp import fully_shard
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        layer_classes = set(getattr(hf_model, "_no_split_modules", None) or ())
        if not layer_classes:
            raise ValueError(f"{type(model).__name__} does not declare its decoder layer class "
                             f"(_no_split_modules), so FSDP2 cannot shard it layer by layer")
        for module in model.modules():
            if type(module).__name__ in layer_classes:
                fully_shard(module)
        fully_shard(model)
        return model

    def frozen(self, model):
        from torch.distributed.fsdp import FSDPModule
        if isinstance(model, FSDPModule):      # already sharded
            return model
        model.requires_grad_(False)
        return self.wrap(model.to(self.info.device))

    @contextlib.contextmanager
    def gradient_sync(self, model, enabled: bool):
        if enabled:
            yield
            return
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def save_final(self, model, tokenizer, out):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        if self.info.is_main:
            self.unwrap(model).save_pretrained(out, state_dict=state)
            tokenizer.save_pretrained(out)
