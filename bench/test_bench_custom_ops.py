"""What the torch.library operator layer costs: the public losses (custom operators with
registered autograd) against a bare ``autograd.Function`` over the same chunk code, which is
how both losses were wired before they became operators.

Both paths run the same kernels (the torch backend's chunked vocabulary pass, compiled on these
CPU sizes as by default), so any difference is the operator layer: dispatch and the
setup_context/backward plumbing. Rounds alternate between the two paths so that a
shared machine's load hits both alike; the table reports the best round of each, in wall time
and in process CPU time.

Run: ``pytest bench/test_bench_custom_ops.py -s``
"""
from __future__ import annotations

import time

import pytest
import torch

from rkld_kernels import fused_linear_rkl_loss, fused_rkl_loss
from rkld_kernels.fused_linear import _masked_run
from rkld_kernels.torch_backend import rkl_loss_and_grad

ROUNDS = 7
COMPILED = None


class _DirectRKL(torch.autograd.Function):
    """fused_rkl_loss's torch backend without the operator: loss and prescaled gradient in
    forward, handed over in backward."""

    @staticmethod
    def forward(ctx, student, original, strengthened, keep, scale):
        loss, grad = rkl_loss_and_grad(student, original, strengthened, keep, 8.0, 1.0, True,
                                       True, compiled=COMPILED, grad_scale=scale)
        ctx.grad = grad
        return loss.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None
        if not bool(grad_loss == 1):
            grad.mul_(grad_loss)
        return grad, None, None, None, None


class _DirectLinear(torch.autograd.Function):
    """fused_linear_rkl_loss's torch backend without the operator (mean/sum: gradient in
    forward, scaled in backward)."""

    @staticmethod
    def forward(ctx, xs, ws, xo, wo, xg, keep):
        options = (8.0, 1.0, True, 0, None, "torch", "auto", False, True, True, False)
        loss_rows, dx, dw, _ = _masked_run((xs, ws, None, xo, wo, None, xg, wo, None), keep,
                                           True, options, grads=True)
        ctx.grads = (dx, dw)
        return loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.grads
        return dx.mul_(grad_loss), dw.mul_(grad_loss), None, None, None, None


def _alternate(steps: dict, rounds: int = ROUNDS) -> tuple[dict, dict]:
    """Best wall time and best process CPU time (all threads) of each step. On a shared
    machine the CPU time is the steadier figure: it does not count time spent waiting."""
    wall = {name: float("inf") for name in steps}
    cpu = dict(wall)
    for step in steps.values():            # warm-up: compilation, allocator
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[name] = min(wall[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return wall, cpu


def _record(bench_table, group, timings):
    wall, cpu = timings
    names = list(wall)
    for name in names:
        bench_table.record(group, name, wall[name], baseline=name == names[0],
                           **{"CPU ms": round(1e3 * cpu[name])})
    bench_table.note(group, f"operator / direct: wall {wall[names[1]] / wall[names[0]]:.3f}, "
                            f"CPU time {cpu[names[1]] / cpu[names[0]]:.3f} (best of {ROUNDS} "
                            f"alternating rounds)")


@pytest.mark.parametrize("rows,vocab", [(2048, 32000)])
def test_logits_operator_overhead(bench_table, rows, vocab):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(rows, vocab, generator=gen).requires_grad_()
    original = torch.randn(rows, vocab, generator=gen)
    strengthened = original + torch.randn(rows, vocab, generator=gen)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[: rows // 4] = -100
    keep = labels != -100

    def direct():
        student.grad = None
        count = int(keep.sum())
        _DirectRKL.apply(student, original, strengthened, keep,
                         torch.tensor(1.0 / max(count, 1))).backward()

    def operator():
        student.grad = None
        fused_rkl_loss(student, original, strengthened, labels=labels, backend="torch").backward()

    timings = _alternate({"direct autograd.Function (before)": direct,
                          "custom operator (now)": operator})
    _record(bench_table, f"fused_rkl_loss fwd+bwd {rows}x{vocab} fp32, 1/4 masked", timings)


@pytest.mark.parametrize("tokens,hidden,vocab", [(2048, 256, 32000)])
def test_linear_operator_overhead(bench_table, tokens, hidden, vocab):
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(tokens, hidden, generator=gen).requires_grad_()
    ws = (torch.randn(vocab, hidden, generator=gen) / 16).requires_grad_()
    xo = torch.randn(tokens, hidden, generator=gen)
    wo = torch.randn(vocab, hidden, generator=gen) / 16
    xg = xo + 0.1 * torch.randn(tokens, hidden, generator=gen)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[: tokens // 4] = -100
    keep = labels != -100

    def direct():
        xs.grad = ws.grad = None
        (_DirectLinear.apply(xs, ws, xo, wo, xg, keep) / keep.sum().clamp(min=1)).backward()

    def operator():
        xs.grad = ws.grad = None
        fused_linear_rkl_loss(xs, ws, xo, wo, xg, wo, labels=labels, backend="torch").backward()

    timings = _alternate({"direct autograd.Function (before)": direct,
                          "custom operator (now)": operator})
    _record(bench_table, f"fused_linear_rkl_loss fwd+bwd {tokens} tokens H{hidden} V{vocab} "
                         f"fp32, 1/4 masked", timings)
