"""The logits kernels against the float64 reference over many small random shapes.

Geometry bugs (tiles narrower than the row alignment, rows off the 16-byte grid, one-entry
vocabularies, blocks of a few columns) show up at shapes no hand-picked test lists, so a seeded
sample of cases draws V from 1 to 40 and 1 to 33 rows, every dtype, labels with masked rows
(holding NaN), -inf patterns (vocabulary masking in the teacher, -inf student entries), alpha 0
and 8, both directions, with and without strengthened logits, row strides off the vocabulary,
and, for the triton backend, blocks capped at 4, 8 or 16 columns, and checks every backend's
loss per row and gradient against ``rkld_kernels.reference`` in float64 of the same rounded
inputs. The triton backend runs under Triton's interpreter on CPU (conftest), so its sample is
smaller; the whole file takes well under a minute.

Also here: the reproducers of the tiny-vocabulary, alpha = 0 and huge-logit bugs.
"""
import random

import pytest
import torch

from rkld_kernels import fused_rkl_loss
from rkld_kernels.reference import reference_rkl_loss

triton = pytest.importorskip("triton")
from rkld_kernels import triton_backend  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# Loss: the precision contract (1e-3 relative or 1e-6 absolute; float64 to its own digits).
LOSS_TOL = {torch.bfloat16: (1e-3, 1e-6), torch.float16: (1e-3, 1e-6),
            torch.float32: (1e-3, 1e-6), torch.float64: (1e-9, 1e-12)}
# Gradient: a few roundings of the gradient's dtype, relative to the largest entry of the
# tensor. A geometry bug (a neighbour's columns, a stale top index) is off by O(1).
GRAD_TOL = {torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9, torch.float32: 1e-5,
            torch.float64: 1e-10}


def draw_case(rng: random.Random, backend: str) -> dict:
    dtype = rng.choice(DTYPES)
    # Tiny vocabularies are where the tile geometry breaks: draw them often.
    vocab = rng.choice([1, 2, 3, rng.randint(1, 8), rng.randint(1, 40), rng.randint(9, 40)])
    return dict(
        backend=backend, dtype=dtype, vocab=vocab, rows=rng.randint(1, 33),
        strengthened=rng.random() < 0.7, alpha=rng.choice([0.0, 8.0]),
        direction=rng.choice(["reverse", "forward"]), temperature=rng.choice([1.0, 0.7, 2.0]),
        labels=rng.random() < 0.5, neg_inf=rng.choice(["none", "teacher", "both", "student"]),
        row_pad=rng.choice([0, 0, 1, 3, 5]), max_block=rng.choice([4, 8, 16, 4096]),
        reduction=rng.choice(["none", "none", "mean", "sum"]), seed=rng.randrange(1 << 30))


def interpreted_programs(case: dict) -> int:
    """About how many programs the triton backend launches for ``case`` (stats, gradient tiles,
    top token per row): Triton's interpreter runs them one after the other, ~10 ms each."""
    vocab = case["vocab"]
    block = min(case["max_block"], max(8, triton.next_power_of_2(vocab)))
    return case["rows"] * (2 + triton.cdiv(vocab + 7, block))


def sample(backend: str, count: int, seed: int, max_programs: int | None = None) -> list[dict]:
    rng = random.Random(seed)
    cases = [draw_case(rng, backend) for _ in range(count)]
    if max_programs is not None:
        # Keep the interpreter's time bounded: fewer rows where a case has many small tiles.
        for case in cases:
            while case["rows"] > 1 and interpreted_programs(case) > max_programs:
                case["rows"] -= 1
    # Every dtype meets V = 1, 2 and 3 with several rows (the reported failures).
    for i, dtype in enumerate(DTYPES):
        cases[i].update(dtype=dtype, vocab=1 + i % 3, rows=rng.randint(5, 33))
    # And the rest of what the sample claims, whatever the draw.
    forced = [dict(alpha=0.0, strengthened=True, neg_inf="teacher"),
              dict(neg_inf="both", strengthened=True), dict(neg_inf="student"),
              dict(max_block=4, dtype=torch.bfloat16), dict(max_block=8), dict(max_block=16),
              dict(rows=1), dict(rows=33, vocab=40, max_block=4096), dict(direction="forward"),
              dict(direction="reverse")]
    for case, update in zip(cases[len(DTYPES):], forced):
        case.update(update)
    return cases


def case_id(case: dict) -> str:
    return (f"{case['backend']}-{str(case['dtype'])[6:]}-{case['rows']}x{case['vocab']}"
            f"-{case['direction'][:3]}-a{case['alpha']:g}-T{case['temperature']:g}"
            f"-{'g' if case['strengthened'] else 'nog'}-{'lab' if case['labels'] else 'nolab'}"
            f"-inf_{case['neg_inf']}-pad{case['row_pad']}-blk{case['max_block']}"
            f"-{case['reduction']}")


def make_inputs(case: dict):
    """Logits rounded to the case's dtype (float64 copies of the same values for the
    reference), possibly as row slices of a wider tensor (a row stride off V)."""
    gen = torch.Generator().manual_seed(case["seed"])
    rows, vocab, dtype = case["rows"], case["vocab"], case["dtype"]

    def logits(scale):
        wide = torch.randn(rows, vocab + case["row_pad"], generator=gen,
                           dtype=torch.float64) * scale
        return wide.to(dtype)[:, :vocab]

    original = logits(3.0)
    student = (original.double() + torch.randn(rows, vocab, generator=gen,
                                                dtype=torch.float64)).to(dtype)
    strengthened = None
    if case["strengthened"]:
        strengthened = (original.double() + torch.randn(rows, vocab, generator=gen,
                                                         dtype=torch.float64)).to(dtype)
    if case["row_pad"]:
        # Keep the row stride of a wider buffer for the student too.
        wide = torch.empty(rows, vocab + case["row_pad"], dtype=dtype)
        wide[:, :vocab] = student
        student = wide[:, :vocab]
    # -inf patterns, never a whole row (a row without any finite logit is its own case).
    hole = torch.rand(rows, vocab, generator=gen) < 0.3
    hole[:, 0] = False
    if case["neg_inf"] in ("teacher", "both"):
        original = original.clone()
        original[hole] = float("-inf")
        if case["neg_inf"] == "both" and strengthened is not None:
            strengthened[hole] = float("-inf")
    elif case["neg_inf"] == "student":
        student = student.clone()
        student[hole] = float("-inf")
    labels = None
    if case["labels"]:
        labels = torch.randint(0, 50, (rows,), generator=gen)
        labels[torch.rand(rows, generator=gen) < 0.3] = -100
        # Masked rows may hold anything: they must contribute exactly nothing.
        for t in (student, original):
            t[labels == -100, :] = float("nan")
    return student, original, strengthened, labels


def run(backend, student, original, strengthened, labels, case):
    student = student.detach().clone().requires_grad_(True)
    loss = fused_rkl_loss(student, original, strengthened, alpha=case["alpha"], labels=labels,
                          temperature=case["temperature"], direction=case["direction"],
                          reduction=case["reduction"], backend=backend)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * weights).sum().backward()
    return loss.detach(), student.grad


def check_case(case: dict, monkeypatch) -> None:
    monkeypatch.setattr(triton_backend, "MAX_BLOCK_V", case["max_block"])
    student, original, strengthened, labels = make_inputs(case)
    loss, grad = run(case["backend"], student, original, strengthened, labels, case)
    as64 = [t.double() if t is not None else None for t in (student, original, strengthened)]
    ref_loss, ref_grad = run("reference", *as64, labels, case)
    ref_rows = reference_rkl_loss(as64[0], as64[1], as64[2], alpha=case["alpha"],
                                  labels=labels, temperature=case["temperature"],
                                  direction=case["direction"], reduction="none")
    rtol, atol = LOSS_TOL[case["dtype"]]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol, equal_nan=True)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    finite_rows = torch.isfinite(ref_rows)
    if labels is not None:
        masked = labels == -100
        assert (grad[masked] == 0).all(), "masked rows must get a zero gradient"
        finite_rows &= ~masked
    got, want = grad[finite_rows].double(), ref_grad[finite_rows]
    scale = want.abs().max().item() if want.numel() else 0.0
    tol = GRAD_TOL[case["dtype"]]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale + 1e-30)


TORCH_CASES = sample("torch", 60, seed=20)
TRITON_CASES = sample("triton", 26, seed=22, max_programs=80)


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_torch_backend_matches_reference_on_random_small_shapes(case, monkeypatch):
    check_case(case, monkeypatch)


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_backend_matches_reference_on_random_small_shapes(case, monkeypatch):
    check_case(case, monkeypatch)


def test_the_sample_covers_what_it_claims():
    cases = TORCH_CASES + TRITON_CASES
    for backend_cases in (TORCH_CASES, TRITON_CASES):
        assert {c["dtype"] for c in backend_cases} == set(DTYPES)
        assert {c["vocab"] for c in backend_cases} >= {1, 2, 3}
        assert {c["direction"] for c in backend_cases} == {"reverse", "forward"}
    assert {c["neg_inf"] for c in TRITON_CASES} == {"none", "teacher", "both", "student"}
    assert any(c["alpha"] == 0 and c["strengthened"] and c["neg_inf"] == "teacher"
               for c in cases)
    assert {c["max_block"] for c in TRITON_CASES} >= {4, 8, 16}
    assert min(c["rows"] for c in cases) == 1
    assert max(c["vocab"] for c in cases) == 40 and max(c["rows"] for c in cases) == 33


# ------------------------------------------------------------------------------------------
# The reported reproducers
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,vocab", [(torch.bfloat16, 3), (torch.float16, 2),
                                         (torch.bfloat16, 1), (torch.float32, 1)])
def test_tiny_vocabularies_stay_in_their_rows(dtype, vocab):
    """bf16/fp16 with V <= 3 and fp32 with V = 1: a tile narrower than one 16-byte load made
    the "full" tiles read (and the gradient write) the previous row's columns."""
    torch.manual_seed(0)
    s, o, g = (torch.randn(9, vocab).to(dtype) for _ in range(3))
    loss = fused_rkl_loss(s, o, g, backend="triton", reduction="none")
    ref = reference_rkl_loss(s.double(), o.double(), g.double(), reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=1e-6)
    student = s.clone().requires_grad_(True)
    fused_rkl_loss(student, o, g, backend="triton", reduction="sum").backward()
    ref_student = s.double().requires_grad_(True)
    reference_rkl_loss(ref_student, o.double(), g.double(), reduction="sum").backward()
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=2 ** -6,
                               atol=2 ** -6 * ref_student.grad.abs().max().item() + 1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_entry_vocabulary_has_zero_loss_and_gradient(dtype):
    """The KL of a one-entry vocabulary is 0 (it was nonzero on 4 of 8 rows); its backward
    stored the top token's entry at an index read from an uninitialised buffer (a segfault in
    5 of 5 runs at 64 rows)."""
    loss = fused_rkl_loss(torch.randn(8, 1).to(dtype), torch.randn(8, 1).to(dtype),
                          backend="triton", reduction="none")
    assert (loss == 0).all(), loss
    s = torch.randn(24, 1).to(dtype).requires_grad_()
    fused_rkl_loss(s, torch.randn(24, 1).to(dtype), backend="triton").backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("vocab", [1, 2, 3, 5, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_v", [None, 1, 2, 4])
def test_plan_never_has_a_tile_narrower_than_its_alignment(vocab, dtype, block_v):
    rows = 7
    s = torch.empty(rows, vocab, dtype=dtype)
    _, stats, forward = triton_backend.plan_forward(s, s, s, None, 8.0, 1.0, True,
                                                    block_v=block_v)
    grad_rows = torch.empty(rows)
    _, backward = triton_backend.plan_backward(s, s, s, None, stats, grad_rows, 8.0, 1.0, True,
                                               block_v=block_v)
    for launch in forward + backward:
        c = launch.constexprs
        if "TILE_R" in c:
            assert c["VEC"] <= c["TILE_R"] * c["THREADS"] * c["TILE_K"], (launch.kernel, c)


def test_fused_linear_triton_with_16_bit_heads_and_one_entry_vocabulary():
    from rkld_kernels import fused_linear_rkl_loss
    torch.manual_seed(0)
    h = torch.randn(12, 4, dtype=torch.bfloat16)
    weights = [torch.randn(1, 4, dtype=torch.bfloat16) for _ in range(3)]
    student_w = weights[0].clone().requires_grad_(True)
    hidden = h.clone().requires_grad_(True)
    loss = fused_linear_rkl_loss(hidden, student_w, h, weights[1], h, weights[2],
                                 backend="triton")
    loss.backward()
    assert loss.item() == 0
    assert (hidden.grad == 0).all() and (student_w.grad == 0).all()


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_alpha_zero_with_minus_inf_in_the_original_only(backend, direction):
    """``o - 0 * relu(g - o)`` is NaN at o = -inf in the kernel's arithmetic; the reference
    keeps the teacher at -inf: a finite forward KL and +inf reverse KL for that row, and a
    finite gradient for the forward one."""
    torch.manual_seed(0)
    s, o, g = (torch.randn(3, 5, dtype=torch.float64) for _ in range(3))
    o[1, 2] = float("-inf")
    student = s.clone().requires_grad_(True)
    loss = fused_rkl_loss(student, o, g, alpha=0.0, backend=backend, reduction="none",
                          direction=direction)
    ref_student = s.clone().requires_grad_(True)
    ref = reference_rkl_loss(ref_student, o, g, alpha=0.0, reduction="none",
                             direction=direction)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    assert not loss[1].isnan()
    if direction == "forward":
        loss.sum().backward()
        ref.sum().backward()
        assert torch.isfinite(student.grad).all()
        torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-9, atol=1e-12)
    else:
        assert loss[1] == float("inf")


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_alpha_zero_keeps_nan_and_plus_inf_strengthened_as_nan_rows(direction):
    """At alpha = 0 the reference's ``0 * relu(inf)`` is NaN: the kernels' teacher skips the
    product, so their row rule has to say it (NaN in g makes the row NaN for any alpha)."""
    s, o, g = (torch.randn(3, 6, dtype=torch.float64) for _ in range(3))
    g[0, 1] = float("inf")
    g[2, 3] = float("nan")
    loss = fused_rkl_loss(s, o, g, alpha=0.0, backend="triton", reduction="none",
                          direction=direction)
    ref = reference_rkl_loss(s, o, g, alpha=0.0, reduction="none", direction=direction)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert loss[0].isnan() and loss[2].isnan() and not loss[1].isnan()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_logits_near_the_float32_maximum_give_zero_not_nan(backend):
    """The running maximum starts at the lowest finite value; a first maximum of 1e38 x
    log2(e) grew it by more than the float32 range, and ``0 * inf`` made the row NaN."""
    s = torch.full((4, 40), 1e38).bfloat16()
    s[:, 3] = 5e37
    student = s.clone().requires_grad_(True)
    loss = fused_rkl_loss(student, s.clone(), s.clone(), backend=backend, reduction="none")
    assert (loss == 0).all(), loss
    loss.sum().backward()
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()
