"""LMHeadRKLLoss under DDP, FSDP2 (fully_shard) and DeepSpeed ZeRO-3: 2 CPU processes with
gloo, checked against one process computing the same average of per-rank losses.

Each rank holds its own tokens; all three average gradients over ranks, so the reference is
the gradient of (loss on rank 0's tokens + loss on rank 1's tokens) / 2 with one copy of the
model. Each wrapper must give every rank its own loss and the reference gradients for the body
and for the lm_head (weight and bias), whose weight FSDP2 and ZeRO-3 gather around the head's
forward. DDP and FSDP2 run in float64 and must match to 1e-10. DeepSpeed accepts only
float32/bfloat16/float16 parameters, so the ZeRO-3 model runs in float32 on the same inputs
rounded to float32; it is held to float32's accuracy against the float64 reference.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn

from rkld_kernels.distributed import LMHeadRKLLoss

WORLD = 2
TOKENS, H_IN, H, H_T, V = (3, 9), 12, 16, 10, 211     # per rank: 3 sequences of 9 tokens
OPTIONS = dict(alpha=8.0, chunk_size=5, backend="torch", reduction="mean")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


class Student(nn.Module):
    """A stand-in for a causal LM: a body that makes hidden states, then lm_head + loss."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(H_IN, H), nn.Tanh())
        self.head = LMHeadRKLLoss(nn.Linear(H, V), **OPTIONS)

    def forward(self, inputs, original_hidden, original_weight, strengthened_hidden, labels):
        return self.head(self.body(inputs), original_hidden, original_weight,
                         strengthened_hidden, labels=labels)


def make_student(dtype=torch.float64):
    """The same initial weights whatever the dtype (made in float64, then cast)."""
    torch.manual_seed(0)
    return Student().double().to(dtype)


def rank_data(rank, dtype=torch.float64):
    """Inputs, teacher tensors and labels of one rank (the teachers' lm_head is shared)."""
    gen = torch.Generator().manual_seed(100 + rank)
    inputs = torch.randn(*TOKENS, H_IN, generator=gen, dtype=torch.float64)
    original_hidden = torch.randn(*TOKENS, H_T, generator=gen, dtype=torch.float64)
    strengthened_hidden = original_hidden + 0.3 * torch.randn(*TOKENS, H_T, generator=gen,
                                                              dtype=torch.float64)
    labels = torch.randint(0, V, TOKENS, generator=gen)
    labels[:, : 3 + rank] = -100                      # the ranks keep different numbers of tokens
    return inputs.to(dtype), original_hidden.to(dtype), strengthened_hidden.to(dtype), labels


def teacher_weight(dtype=torch.float64):
    weight = torch.randn(V, H_T, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return (weight / 3).to(dtype)


def step(model, rank, dtype=torch.float64):
    inputs, original_hidden, strengthened_hidden, labels = rank_data(rank, dtype)
    return model(inputs, original_hidden, teacher_weight(dtype), strengthened_hidden, labels)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        results = {}
        ddp = DistributedDataParallel(make_student())
        loss = step(ddp, rank)
        loss.backward()
        results["ddp"] = (loss.detach(), {n: p.grad.clone() for n, p in
                                          ddp.module.named_parameters()})

        model = make_student()
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.body, mesh=mesh)
        fully_shard(model.head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        loss = step(model, rank)
        loss.backward()
        results["fsdp2"] = (loss.detach(), {n: p.grad.full_tensor() for n, p in
                                            model.named_parameters()})

        import deepspeed
        import deepspeed.ops
        from deepspeed.utils import safe_get_full_grad
        # The CPU accelerator would compile a shared-memory op it does not need here (gloo).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        model = make_student(torch.float32)
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 2 ** 62}
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
        loss = step(engine, rank, torch.float32)
        engine.backward(loss)
        results["zero3"] = (loss.detach(), {n: safe_get_full_grad(p).clone() for n, p in
                                            engine.module.named_parameters()})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_fsdp2_and_zero3_match_a_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    model = make_student()
    losses = [step(model, rank) for rank in range(WORLD)]
    (sum(losses) / WORLD).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    assert set(expected) == {"body.0.weight", "body.0.bias", "head.lm_head.weight",
                             "head.lm_head.bias"}

    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for wrapper in ("ddp", "fsdp2", "zero3"):
            loss, grads = results[wrapper]
            assert set(grads) == set(expected), wrapper
            if wrapper == "zero3":
                # float32 against float64: the loss to a few float32 ulps, each gradient to
                # 1e-5 of its largest entry (float32 eps is 1.2e-7; the sums run over <= 27
                # tokens and 211 vocabulary entries).
                assert loss.dtype == torch.float32
                torch.testing.assert_close(loss.double(), losses[rank].detach(), rtol=1e-6,
                                           atol=0.0, msg=f"zero3 loss on rank {rank}")
            else:
                torch.testing.assert_close(loss, losses[rank].detach(), rtol=1e-12, atol=1e-12,
                                           msg=f"{wrapper} loss on rank {rank}")
            for name, grad in grads.items():
                want = expected[name]
                if wrapper == "zero3":
                    assert grad.dtype == torch.float32, name
                    rtol, atol = 1e-5, 1e-5 * want.abs().max().item()
                else:
                    rtol, atol = 1e-10, 1e-12
                torch.testing.assert_close(grad.double(), want, rtol=rtol, atol=atol,
                                           msg=f"{wrapper} {name} on rank {rank}")


def test_lm_head_must_be_linear():
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        LMHeadRKLLoss(nn.Embedding(V, H))
