"""RKLD with a tensor-parallel lm_head: the loss on DTensor logits sharded over the vocabulary.

A tiny Llama student, its original model and a strengthened copy each get their lm_head split
over the vocabulary with ``parallelize_module(..., {"lm_head":
ColwiseParallel(use_local_output=False)})``, so every rank holds a slice of the vocabulary of
the logits (a DTensor ``Shard(-1)``). ``fused_rkl_loss`` takes those DTensors directly: each
rank streams its slice and the ranks exchange a few floats per position, so no rank ever holds
the full-vocabulary logits; the lm_head gradient stays sharded like the weight.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py --steps 3 [--out result.json]

runs on CPU with gloo (on GPUs, use --backend nccl). ``train(parallel=False)`` is the same
training in one process with plain tensors; the tests check that both give the same losses.
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch

from rkld_kernels import fused_rkl_loss

CONFIG = dict(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)


def build_models():
    """Student, original and strengthened tiny Llamas (float32, the same on every rank)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    original = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    strengthened = copy.deepcopy(original)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in strengthened.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    student = copy.deepcopy(original).train()
    for model in (original, strengthened):
        model.requires_grad_(False)
    return student, original, strengthened


def batch():
    """Token ids and labels: the loss covers the second half of each sequence (the answer)."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=generator)
    labels = input_ids.roll(-1, dims=1)
    labels[:, :6] = -100
    labels[:, -1] = -100
    return input_ids, labels


def train(steps: int = 3, parallel: bool = True, lr: float = 0.05) -> dict:
    student, original, strengthened = build_models()
    if parallel:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
        mesh = init_device_mesh("cpu" if not torch.cuda.is_available() else "cuda",
                                (int(os.environ["WORLD_SIZE"]),))
        for model in (student, original, strengthened):
            parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, foreach=False)
    input_ids, labels = batch()
    losses = []
    for _ in range(steps):
        with torch.no_grad():
            original_logits = original(input_ids).logits
            strengthened_logits = strengthened(input_ids).logits
        student_logits = student(input_ids).logits          # a DTensor Shard(-1) when parallel
        loss = fused_rkl_loss(student_logits, original_logits, strengthened_logits,
                              alpha=8.0, labels=labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float((loss.full_tensor() if parallel else loss).detach()))
    placements = [repr(p) for p in student.lm_head.weight.grad.placements] if parallel else None
    return {"losses": losses, "lm_head_grad_placements": placements}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the losses here as JSON (rank 0)")
    parser.add_argument("--backend", default="gloo", help="process-group backend")
    args = parser.parse_args()
    import torch.distributed as dist
    dist.init_process_group(args.backend)
    try:
        result = train(args.steps)
        if dist.get_rank() == 0:
            print(json.dumps(result))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
