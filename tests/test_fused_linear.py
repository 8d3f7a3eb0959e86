"""fused_linear_rkl_loss against fused_rkl_loss(backend="reference") on materialised logits.

Shapes are deliberately odd (V = 1271, H = 67, token counts that are not multiples of the
chunk) and small: the float64 reference materialises every logit. The triton backend runs
under Triton's interpreter on a machine without a GPU, so its shapes are smaller still.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rkld_kernels import (
    LinearRKLLoss,
    fused_linear_rkl_loss,
    fused_rkl_loss,
    torch_backend,
)
from rkld_kernels._custom_ops import IMPLEMENTATIONS
from rkld_kernels.fused_linear import default_chunk_size

V, H_S, H_T = 1271, 67, 45
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7}


def make_problem(tokens_shape=(37,), vocab=V, h_s=H_S, h_t=H_T, dtype=torch.float64,
                 device="cpu", *, biases=False, strengthened="separate", masked_fraction=0.3):
    """Inputs of the loss in float64 (cast with ``cast``): student hidden + lm_head (leaves that
    require grad), original and strengthened hidden + lm_head, labels.

    ``strengthened``: "separate" (own weight), "shared" (the original's lm_head) or None.
    The student's head is close to the original's, and strengthening raises about half of the
    original logits, so that alpha and both teachers matter.
    """
    gen = torch.Generator().manual_seed(1234)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    w_o = randn(vocab, h_t, scale=1 / math.sqrt(h_t) * 2)
    x_o = randn(*tokens_shape, h_t)
    p = {
        "student_hidden": randn(*tokens_shape, h_s),
        "student_weight": randn(vocab, h_s, scale=2 / math.sqrt(h_s)),
        "original_hidden": x_o,
        "original_weight": w_o,
        "labels": torch.randint(0, 100, tokens_shape, generator=gen).to(device),
    }
    p["labels"][torch.rand(tokens_shape, generator=gen).to(device) < masked_fraction] = -100
    if strengthened is not None:
        p["strengthened_hidden"] = x_o + randn(*tokens_shape, h_t, scale=0.3)
    if strengthened == "separate":
        p["strengthened_weight"] = w_o + randn(vocab, h_t, scale=0.05)
    if biases:
        p["student_bias"] = randn(vocab)
        p["original_bias"] = randn(vocab)
        if strengthened == "separate":
            p["strengthened_bias"] = p["original_bias"] + randn(vocab, scale=0.2)
    return cast(p, dtype)


def cast(problem, dtype):
    return {k: (v if k == "labels" else v.to(dtype)) for k, v in problem.items()}


STUDENT = ("student_hidden", "student_weight", "student_bias")


def loss_and_grads(backend, problem, grad_output=None, requires_grad=STUDENT, **options):
    """The loss and the gradients of sum(loss * grad_output) w.r.t. the student tensors that
    are in ``requires_grad`` (None for the others)."""
    p = {k: (v.detach().clone().requires_grad_(k in requires_grad)
             if v.dtype.is_floating_point else v) for k, v in problem.items()}
    args = [p.pop(k, None) for k in ("student_hidden", "student_weight", "original_hidden",
                                     "original_weight", "strengthened_hidden",
                                     "strengthened_weight")]
    loss = fused_linear_rkl_loss(*args, **p, backend=backend, **options)
    (loss if grad_output is None else loss * grad_output).sum().backward()
    grads = {"student_hidden": args[0].grad, "student_weight": args[1].grad,
             "student_bias": p["student_bias"].grad if "student_bias" in p else None}
    return loss.detach(), grads


def assert_matches_reference(problem, backend="torch", rtol=1e-10, atol=1e-12, grad_output=None,
                             **options):
    loss, grads = loss_and_grads(backend, problem, grad_output, **options)
    ref_loss, ref_grads = loss_and_grads("reference", problem, grad_output, **options)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], ref, rtol=rtol, atol=atol, msg=name)
    return loss, grads


# --- agreement with the reference ----------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, None])
def test_odd_shapes_every_chunking(chunk_size):
    # 37 tokens, ~26 of them kept: never a multiple of 5 or 16; 64 exceeds the token count.
    assert_matches_reference(make_problem(biases=True), chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_directions_reductions_temperatures(reduction, direction, temperature):
    problem = make_problem(biases=True)
    # 'none' is differentiated against a non-uniform upstream gradient.
    grad_output = (torch.rand(37, dtype=torch.float64) * 3 - 1) if reduction == "none" else None
    loss, _ = assert_matches_reference(problem, grad_output=grad_output, chunk_size=7,
                                       reduction=reduction, direction=direction,
                                       temperature=temperature, alpha=6.0)
    if reduction == "none":
        assert loss.shape == (37,)
        assert torch.all(loss[problem["labels"] == -100] == 0)


@pytest.mark.parametrize("strengthened", ["separate", "shared", None])
@pytest.mark.parametrize("biases", [False, True])
def test_teacher_heads(strengthened, biases):
    """Two teachers with their own lm_heads, two teachers sharing the original's lm_head (and
    bias), and the single-teacher (plain distillation) case."""
    assert_matches_reference(make_problem(strengthened=strengthened, biases=biases),
                             chunk_size=8, reduction="sum")


def test_shared_strengthened_head_uses_original_bias():
    problem = make_problem(strengthened="shared", biases=True)
    explicit = dict(problem, strengthened_weight=problem["original_weight"],
                    strengthened_bias=problem["original_bias"])
    loss, _ = loss_and_grads("torch", problem)
    loss_explicit, _ = loss_and_grads("torch", explicit)
    torch.testing.assert_close(loss, loss_explicit, rtol=0, atol=0)


def test_three_dimensional_inputs():
    problem = make_problem(tokens_shape=(3, 11), biases=True)
    grad_output = torch.rand(3, 11, dtype=torch.float64)
    loss, grads = assert_matches_reference(problem, grad_output=grad_output, chunk_size=4,
                                           reduction="none")
    assert loss.shape == (3, 11)
    assert grads["student_hidden"].shape == (3, 11, H_S)
    assert torch.all(grads["student_hidden"][problem["labels"] == -100] == 0)


def test_without_labels_every_position_counts():
    problem = make_problem()
    del problem["labels"]
    assert_matches_reference(problem, chunk_size=10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked(reduction):
    problem = make_problem(biases=True)
    problem["labels"] = torch.full_like(problem["labels"], -100)
    problem["student_hidden"][3, 5] = float("nan")     # masked rows never reach a matmul
    loss, grads = loss_and_grads("torch", problem, reduction=reduction)
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    for name, grad in grads.items():
        assert torch.all(grad == 0), name


def test_ignore_index_is_honoured():
    problem = make_problem()
    problem["labels"] = torch.where(problem["labels"] == -100, 7, problem["labels"] + 10)
    assert_matches_reference(problem, ignore_index=7, reduction="sum")


@pytest.mark.parametrize("requires_grad", [("student_hidden",),
                                           ("student_weight",),
                                           ("student_hidden", "student_bias")])
def test_only_requested_gradients(requires_grad):
    """A frozen lm_head (LoRA students) gets no gradient and skips its GEMM; the others are
    still right."""
    problem = make_problem(biases=True)
    _, grads = assert_matches_reference(problem, requires_grad=requires_grad, chunk_size=9)
    for name in STUDENT:
        assert (grads[name] is not None) == (name in requires_grad), name


def test_no_grad_mode_computes_the_loss_only(monkeypatch):
    problem = make_problem()
    calls = []
    original_mm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_",
                        lambda *a, **k: calls.append(1) or original_mm(*a, **k))
    p = {k: v.requires_grad_(k in STUDENT) if v.dtype.is_floating_point else v
         for k, v in problem.items()}
    with torch.no_grad():
        loss = fused_linear_rkl_loss(p.pop("student_hidden"), p.pop("student_weight"),
                                     p.pop("original_hidden"), p.pop("original_weight"),
                                     p.pop("strengthened_hidden"), p.pop("strengthened_weight"),
                                     **p, backend="torch")
    ref, _ = loss_and_grads("reference", problem)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    assert not loss.requires_grad and calls == []


def test_backward_twice():
    """'mean'/'sum' scale the gradient computed in forward, once; 'none' recomputes and may be
    differentiated again with retain_graph."""
    problem = make_problem()
    x = problem["student_hidden"].clone().requires_grad_()
    args = (x, problem["student_weight"], problem["original_hidden"], problem["original_weight"])
    loss = fused_linear_rkl_loss(*args, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        loss.backward()
    x.grad = None
    loss = fused_linear_rkl_loss(*args, reduction="none", backend="torch")
    loss.sum().backward(retain_graph=True)
    first = x.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_module_form():
    problem = make_problem(biases=True)
    module = LinearRKLLoss(alpha=5.0, temperature=2.0, direction="forward", reduction="sum",
                           chunk_size=6, backend="torch")
    assert "chunk_size=6" in repr(module)
    p = dict(problem)
    loss = module(p.pop("student_hidden"), p.pop("student_weight"), p.pop("original_hidden"),
                  p.pop("original_weight"), p.pop("strengthened_hidden"),
                  p.pop("strengthened_weight"), p.pop("labels"), **p)
    ref, _ = loss_and_grads("reference", problem, alpha=5.0, temperature=2.0,
                            direction="forward", reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


# --- precision --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_no_worse_than_reference_in_that_dtype(dtype):
    """Against float64 on the same rounded inputs: the loss is no worse than the reference
    computing in ``dtype`` (float32 accumulation makes it much better in bf16), the gradients
    no worse than it plus one rounding to ``dtype``."""
    problem = cast(make_problem(biases=True), dtype)
    grad_output = torch.rand(37, dtype=torch.float64) + 0.5
    options = dict(reduction="none", chunk_size=8, temperature=1.5)
    truth_loss, truth = loss_and_grads("reference", cast(problem, torch.float64), grad_output,
                                       **options)
    loss, grads = loss_and_grads("torch", problem, grad_output.float(), **options)
    ref_loss, ref = loss_and_grads("reference", problem, grad_output.to(dtype), **options)
    assert loss.dtype == torch.float32
    assert all(grads[k].dtype == dtype for k in STUDENT)

    def error(x, t):
        return (x.double() - t).abs().max().item()

    slack = 4 * EPS[torch.float32] * (1 + truth_loss.abs().max().item())
    assert error(loss, truth_loss) <= error(ref_loss, truth_loss) + slack
    for k in STUDENT:
        rounding = 0.5 * EPS[dtype] * truth[k].abs().max().item()
        assert error(grads[k], truth[k]) <= error(ref[k], truth[k]) + rounding, k


def test_float32_accumulation_of_a_bfloat16_weight_gradient():
    """float32 accumulation (accum_dtype=float32, also the default for a bfloat16 lm_head) sums
    the weight and bias gradients over chunks in float32 and rounds once, so 24 one-token
    chunks give the single-chunk result (one float32-accumulated GEMM, rounded once);
    accum_dtype=bfloat16 rounds after every chunk and drifts away from it."""
    tokens = 24
    problem = cast(make_problem(tokens_shape=(tokens,), masked_fraction=0.0, biases=True),
                   torch.bfloat16)
    grads = {}
    for accum in (None, torch.float32, torch.bfloat16):
        for chunk in (1, tokens):
            _, grads[accum, chunk] = loss_and_grads("torch", problem, reduction="sum",
                                                    chunk_size=chunk, accum_dtype=accum)
            assert grads[accum, chunk]["student_weight"].dtype == torch.bfloat16

    def beyond_one_rounding(accum, k):
        """Entries where one-token chunks and one chunk differ by more than one bf16 rounding
        (plus float32 summation-order noise, relative to the gradient's scale)."""
        many, one = grads[accum, 1][k].double(), grads[accum, tokens][k].double()
        bound = EPS[torch.bfloat16] * one.abs() + 2.0 ** -20 * one.abs().max()
        return ((many - one).abs() > bound).double().mean().item()

    for k in ("student_weight", "student_bias"):
        assert beyond_one_rounding(torch.float32, k) == 0, k
        assert beyond_one_rounding(None, k) == 0, k
        assert beyond_one_rounding(torch.bfloat16, k) > 0.1, k


def test_float64_student_keeps_float64():
    loss, grads = loss_and_grads("torch", make_problem())
    assert loss.dtype == torch.float64 and grads["student_weight"].dtype == torch.float64


def test_mixed_precision_teachers():
    """A float32 student with bfloat16 teachers (e.g. cached teacher hidden states): the
    teacher logits are float32-accumulated GEMMs that are never rounded to bfloat16, so the
    loss is float32-accurate against float64 on the same (bfloat16) teacher inputs."""
    problem = make_problem(biases=True)
    for k in ("original_hidden", "original_weight", "original_bias", "strengthened_hidden",
              "strengthened_weight", "strengthened_bias"):
        problem[k] = problem[k].bfloat16()
    for k in STUDENT:
        problem[k] = problem[k].float()
    loss, grads = loss_and_grads("torch", problem, reduction="sum")

    student = {k: problem[k].double().requires_grad_() for k in STUDENT}
    truth_loss = fused_rkl_loss(
        F.linear(*student.values()),
        *(F.linear(*(problem[f"{m}_{part}"].double() for part in ("hidden", "weight", "bias")))
          for m in ("original", "strengthened")),
        labels=problem["labels"], reduction="sum", backend="reference")
    truth_loss.backward()
    torch.testing.assert_close(loss.double(), truth_loss.detach(), rtol=1e-5, atol=1e-5)
    for k in STUDENT:
        torch.testing.assert_close(grads[k].double(), student[k].grad, rtol=1e-4, atol=1e-5)


# --- memory discipline ---------------------------------------------------------------------------

class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op produces and the operands of every matmul."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.matmul_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rkld":     # look inside the loss's operators
            with self:
                return IMPLEMENTATIONS[func._opname](*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                    torch.ops.aten.mm.out):
            a = args[0] if func is not torch.ops.aten.addmm.default else args[1]
            if a.shape[1] in (H_S, H_T):             # logits GEMMs: hidden rows @ weight.T
                self.matmul_rows += a.shape[0]
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_a_tokens_by_vocab_tensor_and_masked_rows_skip_the_matmuls(reduction):
    tokens, chunk = 120, 16
    problem = make_problem(tokens_shape=(tokens,), dtype=torch.float32, masked_fraction=0.5)
    kept = int((problem["labels"] != -100).sum())
    x = problem["student_hidden"].requires_grad_()
    w = problem["student_weight"].requires_grad_()
    recorder = _ShapeRecorder()
    with recorder:
        loss = fused_linear_rkl_loss(x, w, problem["original_hidden"], problem["original_weight"],
                                     problem["strengthened_hidden"],
                                     problem["strengthened_weight"], labels=problem["labels"],
                                     reduction=reduction, chunk_size=chunk, backend="torch")
        loss.sum().backward()
    # Nothing bigger than a few chunks of logits, or the [V, H] weight gradient.
    assert recorder.largest <= max(4 * chunk * V, V * H_S), recorder.largest
    # Three logits GEMMs per kept row, once more for 'none' (recomputed in backward).
    assert recorder.matmul_rows == 3 * kept * (2 if reduction == "none" else 1)


def test_default_chunk_size_follows_the_memory_budget():
    cpu = default_chunk_size(32000, "cpu")
    assert 64 <= cpu <= 1024
    assert default_chunk_size(128256, "cpu") == max(1, cpu * 32000 // 128256)
    assert default_chunk_size(10 ** 9, "cpu") == 1
    assert default_chunk_size(32000, "cuda") > cpu


# --- compiled vocabulary pass -------------------------------------------------------------

def test_compiled_vocabulary_pass_matches():
    """compiled=True (what large CPU calls use by default) gives the eager result."""
    problem = cast(make_problem(biases=True), torch.float32)
    options = dict(chunk_size=10, reduction="mean")
    loss, grads = loss_and_grads("torch", problem, compiled=True, **options)
    ref_loss, ref = loss_and_grads("torch", problem, compiled=False, **options)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k in STUDENT:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-4, atol=1e-6)


def test_automatic_compilation_falls_back_to_eager_on_compiler_failure(monkeypatch):
    import torch._dynamo.exc

    class NoCompiler(torch._dynamo.exc.BackendCompilerFailed):
        def __init__(self):    # the base class's signature differs between torch versions
            RuntimeError.__init__(self, "no C++ compiler")

    def broken_compile():
        def fail(*args, **kwargs):
            raise NoCompiler()
        return fail

    monkeypatch.setattr(torch_backend, "_compiled_rkl_rows", broken_compile)
    monkeypatch.setattr(torch_backend, "_compile_failed", [])
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_ELEMENTS", 1)     # make this call "large"
    problem = cast(make_problem(), torch.float32)
    with pytest.warns(RuntimeWarning, match="torch.compile of the vocabulary pass failed"):
        loss, _ = loss_and_grads("torch", problem)
    ref, _ = loss_and_grads("torch", problem, compiled=False)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    monkeypatch.setattr(torch_backend, "_compile_failed", [])
    with pytest.raises(NoCompiler):
        loss_and_grads("torch", problem, compiled=True)


# --- on the test device (CUDA when present), and the triton backend --------------------------

@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_torch_backend_on_device(device, reduction):
    problem = make_problem(tokens_shape=(4, 9), device=device, biases=True)
    grad_output = (torch.rand(4, 9, dtype=torch.float64, device=device)
                   if reduction == "none" else None)
    assert_matches_reference(problem, grad_output=grad_output, reduction=reduction, chunk_size=7)



triton_cases = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@triton_cases
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("strengthened", ["separate", None])
def test_triton_backend(reduction, strengthened, device):
    pytest.importorskip("triton")
    problem = make_problem(tokens_shape=(2, 5), vocab=300, h_s=16, h_t=12, device=device,
                           strengthened=strengthened, biases=True)
    grad_output = (torch.rand(2, 5, dtype=torch.float64, device=device)
                   if reduction == "none" else None)
    assert_matches_reference(problem, backend="triton", rtol=1e-9, atol=1e-12,
                             grad_output=grad_output, reduction=reduction, chunk_size=3,
                             direction="reverse" if strengthened else "forward", temperature=2.5)


@triton_cases
def test_triton_backend_bfloat16_with_float32_accumulation(device):
    pytest.importorskip("triton")
    problem = make_problem(tokens_shape=(6,), vocab=300, h_s=16, h_t=12, device=device)
    low = cast(problem, torch.bfloat16)
    loss, grads = loss_and_grads("triton", low, chunk_size=4, accum_dtype=torch.float32)
    ref_loss, ref = loss_and_grads("torch", low, chunk_size=4, accum_dtype=torch.float32)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for k in ("student_hidden", "student_weight"):
        assert grads[k].dtype == torch.bfloat16
        # Both round dL/dlogits to bf16 for the GEMMs; a rounding may flip between them.
        scale = ref[k].abs().max().item()
        torch.testing.assert_close(grads[k], ref[k], rtol=0, atol=2 * EPS[torch.bfloat16] * scale)


# --- bad input ------------------------------------------------------------------------------

def _bad(problem, **changes):
    p = dict(problem)
    p.update(changes)
    return p


BAD_INPUTS = [
    # (description, change to a float32 problem (function of it), error type, message fragment)
    ("token shapes differ", lambda p: _bad(p, original_hidden=p["original_hidden"][:-1]),
     ValueError, "token shape of student_hidden"),
    ("student H mismatch", lambda p: _bad(p, student_hidden=p["student_hidden"][:, :-1]),
     ValueError, "hidden size of student_weight"),
    ("teacher H mismatch", lambda p: _bad(p, strengthened_weight=p["strengthened_weight"][:, :-1]),
     ValueError, "hidden size of strengthened_weight"),
    ("V differs", lambda p: _bad(p, original_weight=p["original_weight"][:-1]),
     ValueError, "vocabulary size V = 1271"),
    ("bias size", lambda p: _bad(p, student_bias=torch.zeros(V + 1)), ValueError,
     r"student_bias must have shape \(V,\) = \(1271,\)"),
    ("2-D bias", lambda p: _bad(p, original_bias=torch.zeros(1, V)), ValueError,
     "original_bias must have shape"),
    ("1-D weight", lambda p: _bad(p, student_weight=torch.zeros(V)), ValueError,
     "2-D"),
    ("0-d hidden", lambda p: _bad(p, student_hidden=torch.tensor(1.0)), ValueError,
     "0-d"),
    ("empty vocabulary", lambda p: _bad(p, **{k: p[k][:0] for k in ("student_weight",
                                                                    "original_weight",
                                                                    "strengthened_weight")}),
     ValueError, "at least 1"),
    ("integer hidden", lambda p: _bad(p, student_hidden=p["student_hidden"].long()), TypeError,
     "floating dtype"),
    ("integer weight", lambda p: _bad(p, original_weight=p["original_weight"].int()), TypeError,
     "floating dtype"),
    ("not a tensor", lambda p: _bad(p, student_weight=[[1.0]]), TypeError, "torch.Tensor"),
    ("hidden/weight dtypes", lambda p: _bad(p, student_hidden=p["student_hidden"].double()),
     TypeError, "share one dtype"),
    ("bias dtype", lambda p: _bad(p, student_bias=torch.zeros(V, dtype=torch.float64)),
     TypeError, "share one dtype"),
    ("teacher hidden requires grad",
     lambda p: _bad(p, original_hidden=p["original_hidden"].clone().requires_grad_()),
     ValueError, "original_hidden requires grad"),
    ("teacher weight requires grad",
     lambda p: _bad(p, strengthened_weight=p["strengthened_weight"].clone().requires_grad_()),
     ValueError, "strengthened_weight requires grad"),
    ("teacher bias requires grad",
     lambda p: _bad(p, original_bias=torch.zeros(V, requires_grad=True)),
     ValueError, "original_bias requires grad"),
    ("strengthened head without hidden", lambda p: _bad(p, strengthened_hidden=None),
     ValueError, "without strengthened_hidden"),
    ("labels shape", lambda p: _bad(p, labels=p["labels"][:-1]), ValueError,
     "labels must have the leading shape"),
    ("float labels", lambda p: _bad(p, labels=p["labels"].float()), TypeError,
     "integer tensor"),
    ("devices", lambda p: _bad(p, labels=p["labels"].to("meta")), ValueError, "one device"),
]


def call(problem, **options):
    """The loss on exactly these tensors (nothing is cloned or made to require grad)."""
    p = dict(problem)
    args = [p.pop(k, None) for k in ("student_hidden", "student_weight", "original_hidden",
                                     "original_weight", "strengthened_hidden",
                                     "strengthened_weight")]
    return fused_linear_rkl_loss(*args, **p, **options)


@pytest.mark.parametrize("change, error, message", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_tensors(change, error, message):
    problem = change(cast(make_problem(biases=True), torch.float32))
    with pytest.raises(error, match=message):
        call(problem)


@pytest.mark.parametrize("options, error, message", [
    (dict(chunk_size=0), ValueError, "chunk_size must be None"),
    (dict(chunk_size=2.0), ValueError, "chunk_size must be None"),
    (dict(chunk_size=True), ValueError, "chunk_size must be None"),
    (dict(accum_dtype=torch.int32), TypeError, "accum_dtype must be None or a floating"),
    (dict(accum_dtype="float32"), TypeError, "accum_dtype must be None or a floating"),
    (dict(accum_dtype=torch.bfloat16), ValueError, "at least as precise"),
    (dict(compiled="yes"), TypeError, "compiled must be None"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(direction="both"), ValueError, "direction must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(alpha=-1.0), ValueError, "alpha must be >= 0"),
])
def test_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        call(cast(make_problem(), torch.float32), **options)
    if "reduction" in options or "backend" in options:
        with pytest.raises(error, match=message):
            LinearRKLLoss(**options)
