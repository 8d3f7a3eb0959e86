"""Vocabulary parallelism over DTensor: 2 gloo processes on CPU against one process.

Each worker shards the same logits (``Shard(-1)``) or lm_head weights (``Shard(0)``) over a
1-D mesh of 2 ranks, runs the loss and its backward, and saves the loss and the gathered
gradients; the test compares them with the plain single-process loss on the full tensors
(float64 to 1e-10, float32 to 1e-5), with masks, both directions and every reduction. The
tensor-parallel example (a tiny Llama with a ColwiseParallel lm_head) runs under torchrun.
"""
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import torchrun

from rkld_kernels import fused_linear_rkl_loss, fused_rkl_loss

WORLD = 2
ROWS, V, H = (3, 4), 53, 6          # V odd: the shards differ in size (27 + 26)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tensor_parallel.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

LOGIT_CASES = [dict(dtype=torch.float64, direction=d, reduction=r, strengthened=True,
                    temperature=1.0)
               for d in ("reverse", "forward") for r in ("mean", "sum", "none")]
LOGIT_CASES += [dict(dtype=torch.float64, direction="reverse", reduction="mean", strengthened=False,
                     temperature=2.0),
                dict(dtype=torch.float32, direction="reverse", reduction="mean", strengthened=True,
                     temperature=1.0),
                dict(dtype=torch.float32, direction="forward", reduction="none", strengthened=True,
                     temperature=1.0)]
LINEAR_CASES = [dict(dtype=torch.float64, direction=d, reduction=r, bias=b, replicated=False)
                for d in ("reverse", "forward") for r in ("mean", "none") for b in (False, True)]
LINEAR_CASES += [dict(dtype=torch.float64, direction="reverse", reduction="sum", bias=True,
                      replicated=True),
                 dict(dtype=torch.float32, direction="reverse", reduction="mean", bias=True,
                      replicated=False)]


def logit_data(case, vocab=V, teacher_vocab=None):
    gen = torch.Generator().manual_seed(11)
    dtype = case["dtype"]
    student = torch.randn(*ROWS, vocab, generator=gen, dtype=torch.float64).to(dtype)
    original = torch.randn(*ROWS, teacher_vocab or vocab, generator=gen,
                           dtype=torch.float64).to(dtype)
    strengthened = (original + torch.randn(original.shape, generator=gen, dtype=torch.float64)
                    .to(dtype)) if case["strengthened"] else None
    original[0, 1, 5] = float("-inf")                     # vocabulary masking survives sharding
    labels = torch.randint(0, vocab, ROWS, generator=gen)
    labels[0, :2] = -100
    labels[2, 3] = -100
    student.data[2, 3] = float("nan")                     # a masked row may hold anything
    return student, original, strengthened, labels


def linear_data(case):
    gen = torch.Generator().manual_seed(12)
    dtype = case["dtype"]

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    xs, ws = randn(*ROWS, H), randn(V, H, scale=0.5)
    xo, wo = randn(*ROWS, H), randn(V, H, scale=0.5)
    xg, wg = xo + 0.3 * randn(*ROWS, H), wo + 0.1 * randn(V, H)
    bs = randn(V) if case["bias"] else None
    bo = randn(V) if case["bias"] else None
    labels = torch.randint(0, V, ROWS, generator=gen)
    labels[1, :3] = -100
    return xs, ws, bs, xo, wo, bo, xg, wg, labels


def linear_kwargs(case, bs, bo, labels):
    return dict(student_bias=bs, original_bias=bo, labels=labels, direction=case["direction"],
                reduction=case["reduction"], chunk_size=5)


def upstream(loss):
    """A fixed non-uniform upstream gradient for reduction='none'."""
    if loss.dim() == 0:
        return loss
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return (loss * weights).sum()


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}

        def shard(t, dim, grad=False):
            d = distribute_tensor(t, mesh, [Shard(dim)]) if t is not None else None
            return d.requires_grad_() if grad else d

        for index, case in enumerate(LOGIT_CASES):
            student, original, strengthened, labels = logit_data(case)
            s = shard(student, -1, grad=True)
            loss = fused_rkl_loss(s, shard(original, -1), shard(strengthened, -1),
                                  labels=labels, direction=case["direction"],
                                  reduction=case["reduction"],
                                  temperature=case["temperature"])
            upstream(loss.to_local()).backward()
            assert s.grad.placements == s.placements
            results[f"logits{index}"] = (loss.full_tensor(), s.grad.full_tensor())

        # vocab_size: student 60 columns, teacher 59 (30 + 29 on two ranks), first 55 used.
        case = dict(dtype=torch.float64, strengthened=True)
        student, original, strengthened, labels = logit_data(case, vocab=60, teacher_vocab=59)
        s = shard(student, -1, grad=True)
        loss = fused_rkl_loss(s, shard(original, -1), shard(strengthened, -1), labels=labels,
                              vocab_size=55)
        loss.to_local().backward()
        results["vocab_size"] = (loss.full_tensor(), s.grad.full_tensor())
        try:
            fused_rkl_loss(s, shard(original[..., :58], -1), labels=labels, vocab_size=55)
        except ValueError as err:
            results["misaligned"] = str(err)

        errors = []
        for bad in (lambda: fused_rkl_loss(distribute_tensor(student, mesh, [Replicate()]),
                                           shard(original, -1)),
                    lambda: fused_rkl_loss(s, original)):
            try:
                bad()
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        results["layout_errors"] = errors

        for index, case in enumerate(LINEAR_CASES):
            xs, ws, bs, xo, wo, bo, xg, wg, labels = linear_data(case)
            x = xs.clone().requires_grad_()
            hidden = DTensor.from_local(x, mesh, [Replicate()]) if case["replicated"] else x
            w = shard(ws, 0, grad=True)
            b = shard(bs, 0, grad=True) if bs is not None else None
            loss = fused_linear_rkl_loss(hidden, w, xo, shard(wo, 0), xg, shard(wg, 0),
                                         **linear_kwargs(case, b, shard(bo, 0), labels))
            upstream(loss.to_local()).backward()
            assert w.grad.placements == (Shard(0),)
            results[f"linear{index}"] = (loss.full_tensor(), x.grad, w.grad.full_tensor(),
                                         b.grad.full_tensor() if b is not None else None)
        try:       # hidden states that differ per rank are data-parallel, not replicated
            fused_linear_rkl_loss(xs + rank, shard(ws, 0), xo, shard(wo, 0), labels=labels)
        except ValueError as err:
            results["not_replicated"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", range(len(LOGIT_CASES)))
def test_sharded_logits_match_one_process(results, index):
    case = LOGIT_CASES[index]
    student, original, strengthened, labels = logit_data(case)
    student.requires_grad_()
    loss = fused_rkl_loss(student, original, strengthened, labels=labels,
                          direction=case["direction"], reduction=case["reduction"],
                          temperature=case["temperature"], backend="torch")
    upstream(loss).backward()
    assert torch.isfinite(loss).all() and loss.abs().sum() > 0
    for rank in range(WORLD):
        tp_loss, tp_grad = results[rank][f"logits{index}"]
        torch.testing.assert_close(tp_loss, loss.detach(), **tolerance(case["dtype"]))
        torch.testing.assert_close(tp_grad, student.grad, **tolerance(case["dtype"]))


def test_sharded_logits_with_padded_vocabularies(results):
    student, original, strengthened, labels = logit_data(
        dict(dtype=torch.float64, strengthened=True), vocab=60, teacher_vocab=59)
    student.requires_grad_()
    loss = fused_rkl_loss(student, original, strengthened, labels=labels, vocab_size=55,
                          backend="torch")
    loss.backward()
    for rank in range(WORLD):
        tp_loss, tp_grad = results[rank]["vocab_size"]
        torch.testing.assert_close(tp_loss, loss.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(tp_grad, student.grad, rtol=1e-10, atol=1e-10)
        assert (tp_grad[..., 55:] == 0).all()
        assert "do not cover the same entries" in results[rank]["misaligned"]


@pytest.mark.parametrize("index", range(len(LINEAR_CASES)))
def test_sharded_lm_head_matches_one_process(results, index):
    case = LINEAR_CASES[index]
    xs, ws, bs, xo, wo, bo, xg, wg, labels = linear_data(case)
    leaves = [t.requires_grad_() for t in (xs, ws, bs) if t is not None]
    loss = fused_linear_rkl_loss(xs, ws, xo, wo, xg, wg, backend="torch",
                                 **linear_kwargs(case, bs, bo, labels))
    upstream(loss).backward()
    for rank in range(WORLD):
        tp_loss, dx, dw, db = results[rank][f"linear{index}"]
        tol = tolerance(case["dtype"])
        torch.testing.assert_close(tp_loss, loss.detach(), **tol)
        for got, leaf in zip((dx, dw, db), leaves):
            torch.testing.assert_close(got, leaf.grad, **tol)


def test_bad_layouts_get_clear_errors(results):
    for rank in range(WORLD):
        replicated, mixed = results[rank]["layout_errors"]
        assert "must be sharded on its vocabulary dimension (Shard(2))" in replicated
        assert "must be a DTensor like the other vocabulary-sharded inputs" in mixed


def test_hidden_states_that_differ_between_ranks_are_refused(results):
    for rank in range(WORLD):
        assert "student_hidden differs between the ranks" in results[rank]["not_replicated"]


def test_tensor_parallel_llama_example_matches_one_process(tmp_path):
    torchrun(EXAMPLE, "--steps", "3", "--out", tmp_path / "tp.json")
    tp = json.loads((tmp_path / "tp.json").read_text())
    spec = importlib.util.spec_from_file_location("example_tensor_parallel", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    single = example.train(steps=3, parallel=False)
    assert len(tp["losses"]) == 3 and all(math.isfinite(x) for x in tp["losses"])
    assert tp["losses"][-1] < tp["losses"][0]              # the student moves to the teacher
    assert tp["lm_head_grad_placements"] == ["Shard(dim=0)"]
    for got, expected in zip(tp["losses"], single["losses"]):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
