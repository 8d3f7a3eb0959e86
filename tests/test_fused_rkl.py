"""fused_rkl_loss (torch backend and the public API) against the float64 reference.

Low-precision rule: the error of a backend against the float64 ground truth must be no worse
than the reference's own error when it computes in that dtype, plus a small tolerance.
The Triton backend has its own file (test_triton_backend.py); a few API-level cases here run it
too, on small shapes, since the interpreter is slow.
"""
import pytest
import torch

from rkld_kernels import RKLLoss, fused_rkl_loss, unlearning_teacher_logits
from rkld_kernels.fused_rkl import resolve_backend

LOW_PRECISION = [torch.bfloat16, torch.float16]


def make_logits(shape, dtype=torch.float64, scale=3.0):
    """Student, original and strengthened logits; strengthening raised about half the logits."""
    original = torch.randn(shape, dtype=torch.float64) * scale
    strengthened = original + torch.randn(shape, dtype=torch.float64)
    student = original + 0.5 * torch.randn(shape, dtype=torch.float64)
    return student.to(dtype), original.to(dtype), strengthened.to(dtype)


def random_labels(shape, masked_fraction=0.3):
    labels = torch.randint(0, 100, shape)
    labels[torch.rand(shape) < masked_fraction] = -100
    return labels


def loss_and_grad(backend, student, original, strengthened, grad_output=None, **options):
    """Loss and d(sum(loss * grad_output))/d student, both as float64 for comparison."""
    student = student.detach().clone().requires_grad_(True)
    loss = fused_rkl_loss(student, original, strengthened, backend=backend, **options)
    (loss if grad_output is None else loss * grad_output).sum().backward()
    assert student.grad.dtype == student.dtype
    return loss.detach().double(), student.grad.double()


def ground_truth(student, original, strengthened, grad_output=None, **options):
    as64 = (lambda t: None if t is None else t.double())
    return loss_and_grad("reference", as64(student), as64(original), as64(strengthened),
                         None if grad_output is None else grad_output.double(), **options)


def max_error(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


# --------------------------------------------------------------------------------------------
# correctness matrix, torch backend
# --------------------------------------------------------------------------------------------

def assert_no_worse_than_reference(dtype, student, original, strengthened, grad_output=None,
                                   backend="torch", **options):
    """The backend's error against float64 is within the reference's own error in ``dtype``
    (plus a small slack), for the loss and for the gradient."""
    low = (lambda t: None if t is None else t.to(dtype))
    # float64 ground truth of the rounded inputs: judge the computation, not input quantisation
    truth = ground_truth(low(student), low(original), low(strengthened), grad_output, **options)
    ref_low = loss_and_grad("reference", low(student), low(original), low(strengthened),
                            low(grad_output), **options)
    ours = loss_and_grad(backend, low(student), low(original), low(strengthened),
                         None if grad_output is None else grad_output.float(), **options)
    eps = torch.finfo(dtype).eps
    loss_scale = truth[0].abs().max().item() if truth[0].numel() else 0.0
    grad_scale = truth[1].abs().max().item() if truth[1].numel() else 0.0
    assert max_error(ours[0], truth[0]) <= max_error(ref_low[0], truth[0]) + 4 * eps * loss_scale
    # slack: a few ulp of the largest entry (sums over V round differently than the reference)
    assert max_error(ours[1], truth[1]) <= max_error(ref_low[1], truth[1]) + 8 * eps * grad_scale
    return ours, truth


@pytest.mark.parametrize("vocab", [1271, 4099])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [0.0, 8.0])
def test_torch_matches_reference_fp32(vocab, direction, temperature, alpha):
    student, original, strengthened = make_logits((37, vocab))
    ours, truth = assert_no_worse_than_reference(
        torch.float32, student, original, strengthened, alpha=alpha,
        labels=random_labels((37,)), temperature=temperature, direction=direction,
        reduction="sum")
    torch.testing.assert_close(ours[0], truth[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("with_strengthened", [True, False])
def test_torch_exact_in_float64(direction, with_strengthened):
    student, original, strengthened = make_logits((2, 5, 1271))
    strengthened = strengthened if with_strengthened else None
    options = dict(labels=random_labels((2, 5)), direction=direction, temperature=2.5)
    truth = ground_truth(student, original, strengthened, **options)
    loss, grad = loss_and_grad("torch", student, original, strengthened, **options)
    torch.testing.assert_close(loss, truth[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, truth[1], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_low_precision_no_worse_than_reference(dtype, direction):
    student, original, strengthened = make_logits((37, 1271))
    grad_output = torch.rand(37, dtype=torch.float64) + 0.5
    ours, truth = assert_no_worse_than_reference(
        dtype, student, original, strengthened, grad_output,
        labels=random_labels((37,)), direction=direction, reduction="none")
    # fp32 accumulation: the loss error is that of rounding the inputs, far below the
    # low-precision reference's
    assert max_error(ours[0], truth[0]) < 0.05 * truth[0].abs().max().item()


def test_mixed_dtypes_student_fp32_teachers_bf16():
    student, original, strengthened = make_logits((9, 1271))
    original, strengthened = original.bfloat16(), strengthened.bfloat16()
    truth = ground_truth(student.float(), original, strengthened)
    loss, grad = loss_and_grad("torch", student.float(), original, strengthened)
    assert grad.dtype == torch.float64  # returned as float64 by the helper for comparison
    torch.testing.assert_close(loss, truth[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, truth[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reductions_and_grad_output_3d(reduction, backend):
    pytest.importorskip("triton") if backend == "triton" else None
    student, original, strengthened = make_logits((3, 4, 301))
    labels = random_labels((3, 4), masked_fraction=0.4)
    labels[0, 0] = 5  # at least one kept
    grad_output = None
    if reduction == "none":
        grad_output = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64).reshape(3, 4)
    options = dict(labels=labels, reduction=reduction)
    truth = ground_truth(student, original, strengthened, grad_output, **options)
    loss, grad = loss_and_grad(backend, student, original, strengthened, grad_output, **options)
    assert loss.shape == ((3, 4) if reduction == "none" else ())
    torch.testing.assert_close(loss, truth[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, truth[1], rtol=1e-9, atol=1e-12)
    if reduction == "none":
        assert torch.all(loss[labels == -100] == 0)
    assert torch.all(grad[labels == -100] == 0)


def test_mean_divides_by_unmasked_count():
    student, original, strengthened = make_logits((10, 50))
    labels = torch.full((10,), -100)
    labels[[1, 4, 7]] = 3
    per_position = fused_rkl_loss(student, original, strengthened, labels=labels,
                                  reduction="none", backend="torch")
    mean = fused_rkl_loss(student, original, strengthened, labels=labels, backend="torch")
    torch.testing.assert_close(mean, per_position.sum() / 3)
    unmasked = fused_rkl_loss(student, original, strengthened, backend="torch")
    all_rows = fused_rkl_loss(student, original, strengthened, reduction="none", backend="torch")
    torch.testing.assert_close(unmasked, all_rows.mean())


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_gives_zero_loss_and_grad(backend, reduction):
    if backend == "triton":
        pytest.importorskip("triton")
    student, original, strengthened = make_logits((6, 97), dtype=torch.float32)
    labels = torch.full((6,), -100)
    loss, grad = loss_and_grad(backend, student, original, strengthened, labels=labels,
                               reduction=reduction)
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    assert torch.all(grad == 0)


def test_custom_ignore_index():
    student, original, strengthened = make_logits((8, 64))
    labels = torch.arange(8)
    loss = fused_rkl_loss(student, original, strengthened, labels=labels, ignore_index=3,
                          reduction="none", backend="torch")
    assert loss[3] == 0 and torch.all(loss[labels != 3] > 0)


def test_strengthened_none_is_plain_distillation():
    student, original, _ = make_logits((7, 211))
    truth = ground_truth(student, original, original)   # g == o: relu(0) = 0, teacher = o
    loss, grad = loss_and_grad("torch", student, original, None)
    torch.testing.assert_close(loss, truth[0])
    torch.testing.assert_close(grad, truth[1])


def test_teacher_formula():
    original = torch.tensor([1.0, 2.0, float("-inf"), float("-inf"), 0.0, float("nan")])
    strengthened = torch.tensor([3.0, 1.0, float("-inf"), 5.0, float("nan"), 0.0])
    teacher = unlearning_teacher_logits(original, strengthened, alpha=8.0)
    assert teacher[0] == 1.0 - 8.0 * 2.0     # rose by 2: pushed down by alpha * 2
    assert teacher[1] == 2.0                  # fell: untouched
    assert torch.isneginf(teacher[2]) and torch.isneginf(teacher[3])
    assert torch.isnan(teacher[4]) and torch.isnan(teacher[5])
    assert unlearning_teacher_logits(original, None) is original
    # alpha = 0 keeps -inf entries (0 * inf must not turn them into NaN)
    assert torch.isneginf(unlearning_teacher_logits(original, strengthened, 0.0)[2])


# --------------------------------------------------------------------------------------------
# extreme values, NaN, layout
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_extreme_and_neg_inf_logits(direction, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    student, original, strengthened = make_logits((5, 257), scale=1.0)
    student[:, ::7] *= 1e4
    original[:, 3::11] = 1e4
    strengthened[:, 1::5] = -1e4
    # vocabulary masking: the same entries are -inf in all three
    for t in (student, original, strengthened):
        t[:, 100:110] = float("-inf")
    # an entry only the strengthened model masked: the teacher entry keeps o's value
    strengthened[:, 200] = float("-inf")
    options = dict(direction=direction, reduction="none")
    truth = ground_truth(student, original, strengthened, **options)
    loss, grad = loss_and_grad(backend, student.float(), original.float(), strengthened.float(),
                               **options)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, truth[0], rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(grad, truth[1], rtol=1e-4, atol=1e-6)
    assert torch.all(grad[:, 100:110] == 0)


@pytest.mark.parametrize("which", ["student", "original", "strengthened"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_nan_input_gives_nan(which, backend):
    tensors = dict(zip(["student", "original", "strengthened"], make_logits((4, 33))))
    tensors[which][2, 5] = float("nan")
    labels = torch.tensor([0, 1, 2, -100])
    loss = fused_rkl_loss(tensors["student"], tensors["original"], tensors["strengthened"],
                          labels=labels, reduction="none", backend=backend)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1]]).all()
    assert torch.isnan(fused_rkl_loss(tensors["student"], tensors["original"],
                                      tensors["strengthened"], backend=backend))
    # a NaN at a masked position is ignored: masking means "not part of the loss"
    tensors[which][3, 0] = float("nan")
    labels[2] = -100
    assert torch.isfinite(fused_rkl_loss(tensors["student"], tensors["original"],
                                         tensors["strengthened"], labels=labels, backend=backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_inputs(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    student, original, strengthened = make_logits((301, 12))
    # transposed views: the vocabulary dimension is strided
    student_t, original_t, strengthened_t = student.t(), original.t(), strengthened.t()
    labels = random_labels((12,))
    assert not student_t.is_contiguous()
    truth = ground_truth(student_t.contiguous(), original_t.contiguous(),
                         strengthened_t.contiguous(), labels=labels)
    loss, grad = loss_and_grad(backend, student_t, original_t, strengthened_t, labels=labels)
    torch.testing.assert_close(loss, truth[0])
    torch.testing.assert_close(grad, truth[1])
    # row-strided slices (every other row of a bigger tensor)
    big = make_logits((24, 301))
    sl = [t[::2] for t in big]
    truth = ground_truth(*[t.contiguous() for t in sl])
    loss, grad = loss_and_grad(backend, *sl)
    torch.testing.assert_close(loss, truth[0])
    torch.testing.assert_close(grad, truth[1])


def test_empty_leading_dims_give_zero():
    student = torch.randn(0, 7, 50, requires_grad=True)
    for reduction in ("mean", "sum"):
        loss = fused_rkl_loss(student, torch.randn(0, 7, 50), reduction=reduction, backend="torch")
        assert loss.item() == 0.0
        loss.backward()
    assert fused_rkl_loss(student, torch.randn(0, 7, 50), reduction="none").shape == (0, 7)


def test_loss_dtype_is_float32_for_low_precision():
    student, original, strengthened = make_logits((4, 50), dtype=torch.bfloat16)
    for backend in ("torch", "reference"):
        assert fused_rkl_loss(student, original, strengthened, backend=backend).dtype == torch.float32


def test_chunking_is_invisible():
    from rkld_kernels.torch_backend import rkl_loss_and_grad
    student, original, strengthened = make_logits((37, 129), dtype=torch.float32)
    keep = random_labels((37,)) != -100
    results = [rkl_loss_and_grad(student, original, strengthened, keep, 8.0, 1.0, True, True,
                                 chunk_rows=c) for c in (1, 5, 37, 100)]
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=0)


def test_gradcheck_torch_backend():
    student, original, strengthened = make_logits((4, 3, 23))
    labels = torch.tensor([[0, -100, 2], [3, 4, 5], [-100, -100, 1], [1, 1, 1]])
    for direction in ("reverse", "forward"):
        for reduction in ("mean", "none"):
            def fn(s):
                return fused_rkl_loss(s, original, strengthened, labels=labels, temperature=2.5,
                                      direction=direction, reduction=reduction, backend="torch")
            assert torch.autograd.gradcheck(fn, (student.clone().requires_grad_(),))


def test_backward_twice_gives_the_same_gradient():
    student, original, strengthened = make_logits((4, 30))
    student.requires_grad_(True)
    loss = fused_rkl_loss(student, original, strengthened, reduction="none", backend="torch")
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    (first,) = torch.autograd.grad(loss, student, weights, retain_graph=True)
    (second,) = torch.autograd.grad(loss, student, weights)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_no_grad_forward_matches():
    student, original, strengthened = make_logits((8, 100))
    with torch.no_grad():
        loss = fused_rkl_loss(student.requires_grad_(), original, strengthened, backend="torch")
    torch.testing.assert_close(loss, ground_truth(student.detach(), original, strengthened)[0])


def test_module_wrapper():
    student, original, strengthened = make_logits((5, 6, 40))
    labels = random_labels((5, 6))
    module = RKLLoss(alpha=4.0, temperature=2.0, direction="forward", reduction="sum",
                     backend="torch")
    assert "alpha=4.0" in repr(module)
    expected = fused_rkl_loss(student, original, strengthened, alpha=4.0, temperature=2.0,
                              direction="forward", reduction="sum", labels=labels, backend="torch")
    torch.testing.assert_close(module(student, original, strengthened, labels), expected)
    with pytest.raises(ValueError, match="reduction"):
        RKLLoss(reduction="avg")


def test_auto_backend_is_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def _call(**overrides):
    student, original, strengthened = make_logits((4, 10), dtype=torch.float32)
    args = dict(student_logits=student, original_logits=original, strengthened_logits=strengthened)
    args.update({k: v for k, v in overrides.items() if k in args})
    options = {k: v for k, v in overrides.items() if k not in args}
    return fused_rkl_loss(args["student_logits"], args["original_logits"],
                          args["strengthened_logits"], **options)


@pytest.mark.parametrize("overrides, error, pattern", [
    (dict(original_logits=torch.randn(4, 11)), ValueError, r"original_logits.*\(4, 10\).*\(4, 11\)"),
    (dict(strengthened_logits=torch.randn(5, 10)), ValueError, r"strengthened_logits.*\(4, 10\).*\(5, 10\)"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels.*\(4,\).*\(5,\)"),
    (dict(labels=torch.zeros(4)), TypeError, r"labels must be an integer tensor.*float32"),
    (dict(student_logits=torch.zeros(4, 10, dtype=torch.long)), TypeError,
     r"student_logits must have a floating dtype.*int64"),
    (dict(original_logits=torch.randn(4, 10, requires_grad=True)), ValueError,
     r"original_logits requires grad.*torch.no_grad\(\)"),
    (dict(strengthened_logits=torch.randn(4, 10, requires_grad=True)), ValueError,
     r"strengthened_logits requires grad"),
    (dict(direction="backward"), ValueError,
     r"direction must be one of 'reverse', 'forward'; got 'backward'"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'"),
    (dict(backend="cuda"), ValueError, r"backend must be one of .*'torch'.*got 'cuda'"),
    (dict(temperature=0.0), ValueError, r"temperature must be > 0; got 0.0"),
    (dict(temperature=float("nan")), ValueError, r"temperature must be > 0"),
    (dict(alpha=-1.0), ValueError, r"alpha must be >= 0.*got -1.0"),
    (dict(student_logits=torch.randn(4, 0), original_logits=torch.randn(4, 0),
          strengthened_logits=torch.randn(4, 0)), ValueError, r"vocabulary.*at least 1.*\(4, 0\)"),
    (dict(student_logits=torch.tensor(1.0)), ValueError, r"at least one dimension"),
    (dict(original_logits=[[1.0]]), TypeError, r"original_logits must be a torch.Tensor; got list"),
])
def test_bad_input_is_refused_clearly(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**overrides)


def test_different_devices_refused():
    meta = torch.randn(4, 10, device="meta")
    with pytest.raises(ValueError, match=r"one device.*student_logits on cpu.*original_logits on meta"):
        fused_rkl_loss(torch.randn(4, 10), meta, backend="torch")


def test_compiled_torch_backend_matches_reference():
    """The torch.compile'd per-chunk math (used automatically on large CPU calls) is the same
    math: check it on masked rows (gather path), a non-finite chunk (exact path) and both
    directions, with one compilation (dynamic shapes)."""
    student, original, strengthened = make_logits((11, 301))
    for t in (student, original, strengthened):
        t[4, 7] = float("-inf")          # one row takes the exact (boolean fix-up) path
    labels = random_labels((11,))
    labels[4] = 1
    for direction in ("reverse", "forward"):
        options = dict(labels=labels, direction=direction, reduction="sum")
        truth = ground_truth(student, original, strengthened, **options)
        args = [t.float() for t in (student, original, strengthened)]
        s = args[0].clone().requires_grad_(True)
        loss = fused_rkl_loss(s, args[1], args[2], backend="torch", compiled=True, **options)
        loss.backward()
        torch.testing.assert_close(loss.double(), truth[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.grad.double(), truth[1], rtol=1e-4, atol=1e-6)


def test_compiled_argument_is_checked():
    with pytest.raises(TypeError, match=r"compiled must be None \(automatic\), True or False; got 'yes'"):
        _call(compiled="yes")


def test_compile_mode_policy():
    from rkld_kernels.torch_backend import COMPILE_MIN_ELEMENTS, compile_mode
    cpu = torch.device("cpu")
    assert compile_mode(None, cpu, COMPILE_MIN_ELEMENTS - 1) == "off"
    assert compile_mode(None, cpu, COMPILE_MIN_ELEMENTS) == "auto"
    assert compile_mode(False, cpu, COMPILE_MIN_ELEMENTS) == "off"
    assert compile_mode(True, cpu, 1) == "on"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scaled_upstream_gradient(reduction):
    """The torch backend pre-scales its gradient by the reduction's usual upstream (1/n, 1);
    any other upstream gradient (loss scaling, accumulation factors) must still be honoured."""
    student, original, strengthened = make_logits((9, 77))
    labels = random_labels((9,))
    truth = ground_truth(student, original, strengthened, labels=labels, reduction=reduction)
    s = student.clone().requires_grad_(True)
    loss = fused_rkl_loss(s, original, strengthened, labels=labels, reduction=reduction,
                          backend="torch")
    (loss * -3.5).backward()
    torch.testing.assert_close(s.grad, truth[1] * -3.5)


def test_compute_dtype_option_is_checked():
    """compute_dtype: None, torch.float32 or torch.float64, never below the inputs' precision;
    a bad value is one line naming the option, for both losses and their module forms."""
    from rkld_kernels import LinearRKLLoss, fused_linear_rkl_loss
    logits = torch.randn(3, 11)
    hidden, weight = torch.randn(3, 4), torch.randn(11, 4)
    for call in (lambda c: fused_rkl_loss(logits, logits, compute_dtype=c),
                 lambda c: fused_linear_rkl_loss(hidden, weight, hidden, weight,
                                                 compute_dtype=c),
                 lambda c: RKLLoss(compute_dtype=c), lambda c: LinearRKLLoss(compute_dtype=c)):
        for bad in (torch.float16, "float64", torch.int64):
            with pytest.raises(ValueError, match="compute_dtype must be None"):
                call(bad)
    with pytest.raises(ValueError, match="compute_dtype must be at least as precise"):
        fused_rkl_loss(logits.double(), logits.double(), compute_dtype=torch.float32)
    # The option changes the arithmetic, not the result's dtype: float32 losses either way.
    for compute in (None, torch.float32, torch.float64):
        assert fused_rkl_loss(logits, logits + 1e-3, compute_dtype=compute).dtype == torch.float32
        assert fused_linear_rkl_loss(hidden, weight, hidden + 1e-3, weight,
                                     compute_dtype=compute).dtype == torch.float32
