"""DistributedDataParallel: every process holds the whole model; gradients are all-reduced
after the backward of a step's last micro-batch (earlier ones run under ``no_sync``)."""
from __future__ import annotations

import contextlib

import torch

from .base import Strategy


class DDP(Strategy):
    name = "ddp"

    def wrap(self, model):
        device = self.info.device
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    @contextlib.contextmanager
    def gradient_sync(self, model, enabled: bool):
        if enabled:
            yield
        else:
            with model.no_sync():
                yield
