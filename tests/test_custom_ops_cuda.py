"""The operators on a CUDA GPU: compiled steps (inductor, fullgraph) equal to eager with the
Triton and torch backends, and a whole training step (forward and backward) captured in a CUDA
graph and replayed on new inputs. Run by ``bench/gpu_check.sh``; skipped without a GPU (the CPU
side of the same properties is in ``tests/test_custom_ops.py``)."""
import pytest
import torch

from rkld_kernels import fused_linear_rkl_loss, fused_rkl_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS, V, H = 48, 1000, 64


def logits_inputs(seed: int, dtype=torch.float32):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    student = torch.randn(ROWS, V, device="cuda", generator=gen).to(dtype)
    original = torch.randn(ROWS, V, device="cuda", generator=gen).to(dtype)
    strengthened = original + torch.randn(ROWS, V, device="cuda", generator=gen).to(dtype)
    labels = torch.randint(0, V, (ROWS,), device="cuda", generator=gen)
    labels[: ROWS // 4] = -100
    return student, original, strengthened, labels


def linear_inputs(seed: int, dtype=torch.float32):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda", generator=gen)).to(dtype)

    xs, ws = randn(ROWS, H), randn(V, H, scale=0.2)
    xo, wo = randn(ROWS, H), randn(V, H, scale=0.2)
    xg = xo + 0.3 * randn(ROWS, H)
    labels = torch.randint(0, V, (ROWS,), device="cuda", generator=gen)
    labels[: ROWS // 4] = -100
    return xs, ws, xo, wo, xg, labels


def eager_logits_grad(backend, student, original, strengthened, labels, reduction="mean"):
    leaf = student.detach().clone().requires_grad_()
    loss = fused_rkl_loss(leaf, original, strengthened, labels=labels, backend=backend,
                          reduction=reduction)
    (loss if reduction == "mean" else loss.sum()).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_logits_step_equals_eager_on_cuda(backend, reduction):
    torch._dynamo.reset()
    student, original, strengthened, labels = logits_inputs(0)

    @torch.compile(fullgraph=True)
    def step(s, o, g, labels):
        loss = fused_rkl_loss(s, o, g, labels=labels, backend=backend, reduction=reduction)
        return loss if reduction == "mean" else loss.sum()

    leaf = student.detach().clone().requires_grad_()
    loss = step(leaf, original, strengthened, labels)
    loss.backward()
    expected_loss, expected_grad = eager_logits_grad(backend, student, original, strengthened,
                                                     labels, reduction)
    torch.testing.assert_close(loss, expected_loss.sum() if reduction == "none" else expected_loss,
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_compiled_linear_step_equals_eager_on_cuda():
    torch._dynamo.reset()
    xs, ws, xo, wo, xg, labels = linear_inputs(0, torch.bfloat16)

    def step(xs, ws, labels):
        return fused_linear_rkl_loss(xs, ws, xo, wo, xg, wo, labels=labels, drop_masked=False)

    leaves = [t.detach().clone().requires_grad_() for t in (xs, ws)]
    loss = torch.compile(step, fullgraph=True)(*leaves, labels)
    loss.backward()
    eager = [t.detach().clone().requires_grad_() for t in (xs, ws)]
    expected = step(*eager, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-2, atol=1e-4)


def capture_step(step, static_inputs, leaves):
    """Capture ``step(*static_inputs)`` and its backward into a CUDA graph (after a warm-up
    on a side stream, as CUDA graphs require); returns the graph and the static loss."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for leaf in leaves:
                leaf.grad = None
            step(*static_inputs).backward()
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(*static_inputs)
        static_loss.backward()
    return graph, static_loss


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_logits_step_is_captured_in_a_cuda_graph(backend):
    student, original, strengthened, labels = logits_inputs(1)
    leaf = student.detach().clone().requires_grad_()
    static = (leaf, original.clone(), strengthened.clone(), labels.clone())

    def step(s, o, g, labels):
        return fused_rkl_loss(s, o, g, labels=labels, backend=backend)

    graph, static_loss = capture_step(step, static, [leaf])
    for seed in (2, 3):                  # replay on new data copied into the static inputs
        new = logits_inputs(seed)
        with torch.no_grad():
            for buffer, value in zip(static, new):
                buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        expected_loss, expected_grad = eager_logits_grad(backend, *new)
        torch.testing.assert_close(static_loss, expected_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_linear_step_with_drop_masked_false_is_captured_in_a_cuda_graph():
    xs, ws, xo, wo, xg, labels = linear_inputs(1)
    leaves = [t.detach().clone().requires_grad_() for t in (xs, ws)]
    static = (*leaves, xo.clone(), wo.clone(), xg.clone(), labels.clone())

    def step(xs, ws, xo, wo, xg, labels):
        return fused_linear_rkl_loss(xs, ws, xo, wo, xg, wo, labels=labels, drop_masked=False)

    graph, static_loss = capture_step(step, static, leaves)
    new = linear_inputs(2)
    with torch.no_grad():
        for buffer, value in zip(static, new):
            buffer.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    eager = [t.detach().clone().requires_grad_() for t in new[:2]]
    expected = step(*eager, *new[2:])
    expected.backward()
    torch.testing.assert_close(static_loss, expected, rtol=1e-5, atol=1e-7)
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)
