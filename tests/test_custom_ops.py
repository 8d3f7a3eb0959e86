"""The losses as PyTorch operators: torch.compile(fullgraph=True) with the compiled backward,
torch.library.opcheck, torch.func (grad, vmap), second derivatives, no host reads off CPU,
and vocab_size= for vocabularies that differ by padding."""
import contextlib
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rkld_kernels.fused_rkl as fused_rkl_module
import rkld_kernels.torch_backend as torch_backend
from rkld_kernels import RKLLoss, fused_linear_rkl_loss, fused_rkl_loss, reference_rkl_loss
from rkld_kernels._custom_ops import IMPLEMENTATIONS
from rkld_kernels.fused_linear import linear_rkl_loss_backward_op, linear_rkl_loss_op
from rkld_kernels.fused_rkl import rkl_loss_op, rkl_loss_triton_backward_op

ROWS, V, H = (3, 5), 37, 8


def logits_problem(dtype=torch.float64, vocab=V, teacher_vocab=None):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(*ROWS, vocab, generator=gen, dtype=torch.float64).to(dtype)
    original = torch.randn(*ROWS, teacher_vocab or vocab, generator=gen,
                           dtype=torch.float64).to(dtype)
    strengthened = original + torch.randn(original.shape, generator=gen,
                                          dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, ROWS, generator=gen)
    labels[0, :2] = -100
    return student.requires_grad_(), original, strengthened, labels


def linear_problem(dtype=torch.float64, vocab=V, teacher_vocab=None):
    gen = torch.Generator().manual_seed(4)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    xs, ws, bs = randn(*ROWS, H), randn(vocab, H, scale=0.5), randn(vocab)
    xo, wo = randn(*ROWS, H), randn(teacher_vocab or vocab, H, scale=0.5)
    xg = xo + 0.3 * randn(*ROWS, H)
    labels = torch.randint(0, vocab, ROWS, generator=gen)
    labels[1, :3] = -100
    return [t.requires_grad_() for t in (xs, ws, bs)], xo, wo, xg, labels


def grads_of(loss, leaves):
    return torch.autograd.grad(loss, leaves)


# --- torch.compile --------------------------------------------------------------------------

class _CountingBackend:
    """An AOTAutograd backend that runs the graphs eagerly and counts forward/backward graphs."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        self.forward_graphs, self.backward_graphs = 0, 0

        def forward(graph, inputs):
            self.forward_graphs += 1
            return make_boxed_func(graph.forward)

        def backward(graph, inputs):
            self.backward_graphs += 1
            assert any("rkld" in str(node.target) or "mul" in str(node.target)
                       for node in graph.graph.nodes)
            return make_boxed_func(graph.forward)

        self.backend = aot_autograd(fw_compiler=forward, bw_compiler=backward)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_logits_step_has_one_graph_and_a_compiled_backward(reduction):
    torch._dynamo.reset()
    student, original, strengthened, labels = logits_problem(torch.float32)
    counting = _CountingBackend()

    def step(s, o, g, labels):
        loss = fused_rkl_loss(s, o, g, labels=labels, reduction=reduction, backend="torch")
        return loss if reduction == "mean" else (loss * torch.arange(loss.numel()).reshape(
            loss.shape)).sum()

    compiled = torch.compile(step, fullgraph=True, backend=counting.backend)
    leaf = student.detach().clone().requires_grad_()
    loss = compiled(leaf, original, strengthened, labels)
    loss.backward()
    assert counting.forward_graphs == 1 and counting.backward_graphs == 1
    expected = step(student, original, strengthened, labels)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(leaf.grad, grads_of(expected, [student])[0])


def test_inductor_compiles_a_module_forward_with_the_logits_loss():
    torch._dynamo.reset()
    student, original, strengthened, labels = logits_problem(torch.float32)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(V, V)
            self.loss = RKLLoss(backend="torch")

        def forward(self, x, o, g, labels):
            return self.loss(self.proj(x), o, g, labels)

    torch.manual_seed(0)
    model = Head()
    compiled = torch.compile(model, fullgraph=True)
    x = student.detach()
    loss = compiled(x, original, strengthened, labels)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x, original, strengthened, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction,drop_masked", [("mean", True), ("none", False)])
def test_compiled_linear_step_matches_eager(reduction, drop_masked):
    torch._dynamo.reset()
    (xs, ws, bs), xo, wo, xg, labels = linear_problem(torch.float32)
    counting = _CountingBackend()

    def step(xs, ws, bs, labels):
        loss = fused_linear_rkl_loss(xs, ws, xo, wo, xg, student_bias=bs, labels=labels,
                                     reduction=reduction, chunk_size=4, backend="torch",
                                     drop_masked=drop_masked)
        return loss.sum() * 1.5

    compiled = torch.compile(step, fullgraph=True, backend=counting.backend)
    leaves = [t.detach().clone().requires_grad_() for t in (xs, ws, bs)]
    loss = compiled(*leaves, labels)
    loss.backward()
    assert counting.forward_graphs == 1 and counting.backward_graphs == 1
    expected = step(xs, ws, bs, labels)
    torch.testing.assert_close(loss, expected)
    for leaf, want in zip(leaves, grads_of(expected, [xs, ws, bs])):
        torch.testing.assert_close(leaf.grad, want)


def test_inductor_compiles_the_linear_loss():
    torch._dynamo.reset()
    (xs, ws, bs), xo, wo, xg, labels = linear_problem(torch.float32)

    def step(xs, ws, labels):
        return fused_linear_rkl_loss(xs, ws, xo, wo, xg, labels=labels, backend="torch")

    leaves = [t.detach().clone().requires_grad_() for t in (xs, ws)]
    loss = torch.compile(step, fullgraph=True)(*leaves, labels)
    loss.backward()
    expected = step(xs, ws, labels)
    torch.testing.assert_close(loss, expected)
    for leaf, want in zip(leaves, grads_of(expected, [xs, ws])):
        torch.testing.assert_close(leaf.grad, want)


def test_compiled_graphs_name_the_dtypes_of_the_gradient_buffers():
    """The operators' gradient buffers (float32 for float32 inputs by default, float64 with
    compute_dtype=torch.float64) and the compute dtype have their dtypes as operator arguments
    in the traced graph. torch.compile's caches key a graph by its calls and their arguments,
    not by the fake implementations' outputs: a dtype rule that lived only in a fake once
    changed under a cached compiled backward, which then read float64 buffers as float32
    (wrong gradients, no error)."""
    torch._dynamo.reset()
    calls = []

    def backend(graph, example_inputs):
        calls.extend(node.args for node in graph.graph.nodes if "rkld" in str(node.target))
        return graph.forward

    (xs, ws, bs), xo, wo, xg, labels = linear_problem(torch.float32)
    student, original, strengthened, labels_logits = logits_problem(torch.float32)
    for compute in (None, torch.float64):
        torch.compile(lambda xs, ws: fused_linear_rkl_loss(xs, ws, xo, wo, xg, labels=labels,
                                                           backend="torch",
                                                           compute_dtype=compute),
                      fullgraph=True, backend=backend)(xs, ws)
        torch.compile(lambda s: fused_rkl_loss(s, original, strengthened, labels=labels_logits,
                                               reduction="none", backend="torch",
                                               compute_dtype=compute),
                      fullgraph=True, backend=backend)(student)
    names = ("accum_dtype", "dx_dtype", "compute_dtype")
    positions = [14, 22, 23]
    for (linear_args, logits_args), wide in zip((calls[0:2], calls[2:4]),
                                                (torch.float32, torch.float64)):
        assert [linear_args[i] for i in positions] == [wide] * 3, names     # dw, dx, math
        # The kept gradient of reduction="none" and the compute dtype.
        assert logits_args[11] == wide and logits_args[12] == wide


# --- opcheck ----------------------------------------------------------------------------------

def _flat_logits():
    student, original, strengthened, labels = logits_problem()
    flat = [t.reshape(-1, V) for t in (student.detach(), original, strengthened)]
    return flat[0].requires_grad_(), flat[1], flat[2], labels.reshape(-1) != -100


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck_rkl_loss(reduction):
    student, original, strengthened, keep = _flat_logits()
    for args in ((student, original, strengthened, keep, 8.0, 1.0, True),
                 (student, original, None, None, 2.0, 2.0, False)):
        torch.library.opcheck(rkl_loss_op, (*args, reduction, "torch", "never", True))
    torch.library.opcheck(rkl_loss_op, (student.detach(), original, strengthened, keep, 8.0, 1.0,
                                        True, reduction, "torch", "never", False))


def test_opcheck_triton_ops():
    pytest.importorskip("triton")
    student, original, strengthened, keep = _flat_logits()
    student = student.detach().float().requires_grad_()
    original, strengthened = original.float(), strengthened.float()
    torch.library.opcheck(rkl_loss_op, (student, original, strengthened, keep, 8.0, 1.0, True,
                                        "mean", "triton", "never", True))
    _, stats = rkl_loss_op(student.detach(), original, strengthened, keep, 8.0, 1.0, True,
                           "none", "triton", "never", True)
    torch.library.opcheck(rkl_loss_triton_backward_op,
                          (student.detach(), original, strengthened, keep, stats,
                           torch.rand(student.shape[0]), 8.0, 1.0, True))


@pytest.mark.parametrize("per_row,drop_masked", [(False, True), (False, False), (True, True)])
def test_opcheck_linear_rkl_loss(per_row, drop_masked):
    (xs, ws, bs), xo, wo, xg, labels = linear_problem()
    flat = [t.reshape(-1, H) for t in (xs.detach(), xo, xg)]
    keep = labels.reshape(-1) != -100
    args = (flat[0].requires_grad_(), ws, bs, flat[1], wo, None, flat[2], wo, None, keep)
    options = (8.0, 1.0, True, 4, None, "torch", "never")
    torch.library.opcheck(linear_rkl_loss_op, (*args, *options, per_row, True, True, True,
                                               drop_masked))
    if per_row:
        torch.library.opcheck(linear_rkl_loss_backward_op,
                              (*(t.detach() if t is not None else None for t in args),
                               torch.rand(keep.shape[0], dtype=torch.float64), *options, True,
                               True, True, drop_masked))


# --- torch.func -------------------------------------------------------------------------------

def _reference_linear(xs, ws, bs, xo, wo, xg, labels, **options):
    return fused_linear_rkl_loss(xs, ws, xo, wo, xg, student_bias=bs, labels=labels,
                                 backend="reference", **options)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_func_grad_and_vmap_of_the_logits_loss(direction):
    student, original, strengthened, labels = logits_problem()
    student = student.detach()

    def loss(backend):
        return lambda s, o, g, lab: fused_rkl_loss(s, o, g, labels=lab, direction=direction,
                                                   backend=backend)

    for backend in ("torch", "triton"):
        if backend == "triton":
            pytest.importorskip("triton")
        got = torch.func.grad(loss(backend))(student, original, strengthened, labels)
        want = torch.func.grad(loss("reference"))(student, original, strengthened, labels)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Per-sequence losses and gradients: vmap over the first dimension.
    batched = torch.func.vmap(torch.func.grad_and_value(loss("torch")))(
        student, original, strengthened, labels)
    for index in range(ROWS[0]):
        one = [t[index] for t in (student, original, strengthened, labels)]
        torch.testing.assert_close(batched[1][index], loss("reference")(*one),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batched[0][index],
                                   torch.func.grad(loss("reference"))(*one),
                                   rtol=1e-10, atol=1e-12)


def test_func_grad_and_vmap_of_the_linear_loss():
    (xs, ws, bs), xo, wo, xg, labels = linear_problem()
    xs, ws, bs = xs.detach(), ws.detach(), bs.detach()

    def loss(backend):
        return lambda xs, ws, bs, lab: fused_linear_rkl_loss(
            xs, ws, xo, wo, xg, student_bias=bs, labels=lab, backend=backend, chunk_size=4)

    got = torch.func.grad(loss("torch"), argnums=(0, 1, 2))(xs, ws, bs, labels)
    want = torch.func.grad(loss("reference"), argnums=(0, 1, 2))(xs, ws, bs, labels)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    def per_sequence(xs, xo, xg, lab):
        return fused_linear_rkl_loss(xs, ws, xo, wo, xg, student_bias=bs, labels=lab,
                                     backend="torch", chunk_size=4)

    per_example = torch.func.vmap(per_sequence)(xs, xo, xg, labels)
    for index in range(ROWS[0]):
        expected = fused_linear_rkl_loss(xs[index], ws, xo[index], wo, xg[index],
                                         student_bias=bs, labels=labels[index],
                                         backend="reference")
        torch.testing.assert_close(per_example[index], expected, rtol=1e-10, atol=1e-12)


# --- second derivatives -----------------------------------------------------------------------

def _second_derivative(loss_fn, student):
    """d/ds of |d/ds sum_i w_i(s) loss_i(s)|^2 with a row weight that depends on the student."""
    loss = loss_fn(student)
    weight = torch.softmax(student.sum(-1), dim=-1)
    grad, = torch.autograd.grad((loss * weight).sum(), student, create_graph=True)
    return torch.autograd.grad((grad ** 2).sum(), student)[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_double_backward_of_the_logits_loss_is_exact(backend, direction):
    if backend == "triton":
        pytest.importorskip("triton")
    student, original, strengthened, labels = logits_problem()
    options = dict(labels=labels, reduction="none", direction=direction)
    got = _second_derivative(
        lambda s: fused_rkl_loss(s, original, strengthened, backend=backend, **options), student)
    want = _second_derivative(
        lambda s: reference_rkl_loss(s, original, strengthened, **options), student)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_double_backward_of_the_linear_loss_is_exact():
    (xs, ws, bs), xo, wo, xg, labels = linear_problem()
    for reduction in ("none", "mean"):
        def hessian_term(backend):
            loss = fused_linear_rkl_loss(xs, ws, xo, wo, xg, student_bias=bs, labels=labels,
                                         reduction=reduction, backend=backend, chunk_size=4)
            weight = torch.softmax(xs.sum(-1), dim=-1) if reduction == "none" else 1.0
            first = torch.autograd.grad((loss * weight).sum(), (xs, ws, bs), create_graph=True)
            return torch.autograd.grad(sum((g ** 2).sum() for g in first), (xs, ws, bs))

        for got, want in zip(hessian_term("torch"), hessian_term("reference")):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# --- no host reads off CPU --------------------------------------------------------------------

_HOST_READS = {torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default,
               torch.ops.aten.item.default, torch.ops.aten.masked_select.default,
               torch.ops.aten.unique_consecutive.default, torch.ops.aten._unique2.default}


class _FailOnHostReads(TorchDispatchMode):
    """Raises on every op whose result needs a device value on the host (a sync on CUDA), and
    looks inside the rkld operators."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rkld":
            with self:
                return IMPLEMENTATIONS[func._opname](*args, **(kwargs or {}))
        if func in _HOST_READS:
            raise AssertionError(f"host read on the hot path: {func}")
        self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def device_rules(monkeypatch):
    """Run the torch backend as it runs on CUDA (no host reads), on CPU tensors."""
    for module in (torch_backend, fused_rkl_module):
        monkeypatch.setattr(module, "host_reads_allowed", lambda device: False)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_loss_reads_nothing_on_the_host(device_rules, reduction):
    student, original, strengthened, labels = logits_problem(torch.float32)
    original = original.clone()
    original[0, 0, 3] = float("-inf")
    student.data[0, 0] = float("nan")               # a masked row: must not leak
    with _FailOnHostReads() as mode:
        loss = fused_rkl_loss(student, original, strengthened, labels=labels,
                              reduction=reduction, backend="torch")
        loss.sum().backward()
    assert mode.ops > 0
    reference = fused_rkl_loss(student.detach().clone().requires_grad_(), original,
                               strengthened, labels=labels, reduction=reduction,
                               backend="reference")
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(student.grad).all() and (student.grad[0, :2] == 0).all()


def test_linear_loss_reads_nothing_on_the_host_with_drop_masked_false(device_rules):
    (xs, ws, bs), xo, wo, xg, labels = linear_problem(torch.float32)
    with _FailOnHostReads():
        loss = fused_linear_rkl_loss(xs, ws, xo, wo, xg, student_bias=bs, labels=labels,
                                     chunk_size=4, backend="torch", drop_masked=False)
        loss.backward()
    # The default (drop_masked=True) finds the kept tokens with nonzero: a host read.
    with pytest.raises(AssertionError, match="host read"), _FailOnHostReads():
        fused_linear_rkl_loss(xs, ws, xo, wo, xg, labels=labels, chunk_size=4,
                              backend="torch")
    torch.testing.assert_close(loss, _reference_linear(xs, ws, bs, xo, wo, xg, labels),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_nan_hidden_states_contribute_nothing_without_host_reads(device_rules, reduction):
    """Padding often holds garbage: with drop_masked=False (the sync-free path) NaN hidden
    states at masked positions must not reach any gradient (0 x NaN in the weight-gradient
    GEMM made the lm_head gradient NaN), and every gradient equals that of clean inputs."""
    (xs, ws, bs), xo, wo, xg, labels = linear_problem(torch.float32)
    masked = labels == -100
    dirty = [t.detach().clone() for t in (xs, xo, xg)]
    for t in dirty:
        t[masked] = float("nan")

    def run(student_hidden, original_hidden, strengthened_hidden, host_check):
        leaves = [student_hidden.detach().clone().requires_grad_(), ws, bs]
        with _FailOnHostReads() if host_check else contextlib.nullcontext():
            loss = fused_linear_rkl_loss(leaves[0], ws, original_hidden, wo, strengthened_hidden,
                                         student_bias=bs, labels=labels, chunk_size=4,
                                         reduction=reduction, backend="torch",
                                         drop_masked=False)
            grads = grads_of(loss.sum(), leaves)
        return loss, grads

    loss, grads = run(*dirty, host_check=True)
    clean_loss, clean_grads = run(xs, xo, xg, host_check=False)
    torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)
    for name, grad, clean in zip(("hidden", "weight", "bias"), grads, clean_grads):
        assert torch.isfinite(grad).all(), f"NaN in the {name} gradient"
        torch.testing.assert_close(grad, clean, rtol=0, atol=0, msg=name)


def test_cpu_shortcuts_are_host_reads():
    """On CPU the torch backend does read on the host (skipping masked rows): the dispatch mode
    above would see it, so the sync-free tests are not vacuous."""
    student, original, strengthened, labels = logits_problem(torch.float32)
    with pytest.raises(AssertionError, match="host read"), _FailOnHostReads():
        fused_rkl_loss(student, original, strengthened, labels=labels, backend="torch")


class _CountFills(TorchDispatchMode):
    """Records the shapes that ops fill with a constant (zeros, fill_), inside the rkld
    operators too."""

    _FILLS = {torch.ops.aten.zero_.default, torch.ops.aten.fill_.Scalar,
              torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default,
              torch.ops.aten.new_zeros.default, torch.ops.aten.full.default,
              torch.ops.aten.full_like.default}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rkld":
            with self:
                return IMPLEMENTATIONS[func._opname](*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if func in self._FILLS:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("masked", [False, True])
def test_logits_loss_fills_no_buffer_as_large_as_the_logits(masked):
    """Neither pass writes zeros over a [rows, V] buffer: the gradient buffer is written once
    (masked rows zeroed alone), and backward gets no zero-filled gradient for the operator's
    saved-gradient output (autograd materialises one unless told not to)."""
    student, original, strengthened, labels = logits_problem(torch.float32, vocab=64)
    with _CountFills() as forward:
        loss = fused_rkl_loss(student, original, strengthened, backend="torch",
                              labels=labels if masked else None)
    with _CountFills() as backward:
        loss.backward()
    full = tuple(student.shape[:-1]) + (64,)
    rows = (student.shape[0] * student.shape[1], 64)
    assert [s for s in forward.shapes + backward.shapes if s in (full, rows)] == []
    reference = student.detach().clone().requires_grad_()
    fused_rkl_loss(reference, original, strengthened, backend="reference",
                   labels=labels if masked else None).backward()
    torch.testing.assert_close(student.grad, reference.grad, rtol=1e-5, atol=1e-7)


def test_linear_loss_backward_fills_nothing():
    """mean/sum: the gradients are computed in forward; backward only scales them (no zero
    tensors materialised for the operator's gradient outputs)."""
    (xs, ws, bs), xo, wo, xg, labels = linear_problem(torch.float32)
    loss = fused_linear_rkl_loss(xs, ws, xo, wo, xg, student_bias=bs, labels=labels,
                                 chunk_size=4, backend="torch")
    with _CountFills() as backward:
        loss.backward()
    assert backward.shapes == []
    assert xs.grad is not None and ws.grad is not None and bs.grad is not None


# --- vocab_size -------------------------------------------------------------------------------

def test_vocab_size_uses_the_first_columns_of_each_logits_tensor():
    student, original, strengthened, labels = logits_problem(vocab=40, teacher_vocab=44)
    with pytest.raises(ValueError, match="pass vocab_size=N"):
        fused_rkl_loss(student, original, strengthened, labels=labels)
    for backend in ("torch", "reference"):
        loss = fused_rkl_loss(student, original, strengthened, labels=labels, vocab_size=37,
                              backend=backend)
        grad, = torch.autograd.grad(loss, student)
        expected = reference_rkl_loss(student[..., :37], original[..., :37],
                                      strengthened[..., :37], labels=labels)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad[..., :37],
                                   torch.autograd.grad(expected, student)[0][..., :37])
        assert (grad[..., 37:] == 0).all()
    for bad, match in ((41, "larger than the vocabulary of student_logits"),
                       (0, "int >= 1"), (True, "int >= 1")):
        with pytest.raises(ValueError, match=match):
            fused_rkl_loss(student, original, strengthened, labels=labels, vocab_size=bad)


def test_vocab_size_uses_the_first_rows_of_each_lm_head():
    (xs, ws, bs), xo, wo, xg, labels = linear_problem(vocab=40, teacher_vocab=44)
    with pytest.raises(ValueError, match="pass vocab_size=N"):
        fused_linear_rkl_loss(xs, ws, xo, wo, xg, labels=labels)
    loss = fused_linear_rkl_loss(xs, ws, xo, wo, xg, student_bias=bs, labels=labels,
                                 vocab_size=37, backend="torch")
    grads = torch.autograd.grad(loss, (xs, ws, bs))
    expected = _reference_linear(xs, ws[:37], bs[:37], xo, wo[:37], xg, labels)
    want = torch.autograd.grad(expected, (xs, ws, bs))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref)
    assert (grads[1][37:] == 0).all() and (grads[2][37:] == 0).all()
    with pytest.raises(ValueError, match="larger than the vocabulary of student_weight"):
        fused_linear_rkl_loss(xs, ws, xo, wo, xg, labels=labels, vocab_size=41)
