"""The Triton backend of fused_rkl_loss against the float64 reference.

On a machine without a GPU the kernels run under Triton's interpreter (conftest switches it on),
which is slow, so shapes stay small; blocks are capped at 512 columns so that rows still span
several of them. V = 1271 and 4099 are not multiples of any block width. On a GPU the same
tests run the compiled kernels, plus one that needs a large GPU (int64 offsets).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from rkld_kernels import (
    fused_rkl_loss,  # noqa: E402
    triton_backend,  # noqa: E402
)
from rkld_kernels.triton_backend import triton_rkl_backward, triton_rkl_forward  # noqa: E402

# The interpreter evaluates both branches of every tl.where in NumPy, which warns about the
# discarded -inf - -inf, log(0) and 0/0 lanes (masked rows, -inf entries). They are not errors.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.fixture(autouse=True)
def _several_blocks_per_row(monkeypatch):
    """Cap blocks at 512 columns so that every row streams through several blocks (and the
    running maxima get rebased), as rows of a real vocabulary do."""
    monkeypatch.setattr(triton_backend, "MAX_BLOCK_V", 512)


def make_logits(rows, vocab, device, dtype=torch.float64, scale=3.0):
    """Student, original and strengthened logits; the strengthened model raised about half of
    the original logits, so alpha matters."""
    original = torch.randn(rows, vocab, dtype=torch.float64, device=device) * scale
    strengthened = original + torch.randn(rows, vocab, dtype=torch.float64, device=device)
    student = original + 0.5 * torch.randn(rows, vocab, dtype=torch.float64, device=device)
    return student.to(dtype), original.to(dtype), strengthened.to(dtype)


def random_labels(rows, device, masked_fraction=0.3):
    labels = torch.randint(0, 100, (rows,), device=device)
    labels[torch.rand(rows, device=device) < masked_fraction] = -100
    return labels


def loss_and_grad(backend, student, original, strengthened, grad_output=None, **options):
    """The loss and d(sum(loss * grad_output))/d student (grad_output defaults to ones)."""
    student = student.detach().clone().requires_grad_(True)
    loss = fused_rkl_loss(student, original, strengthened, backend=backend, **options)
    (loss if grad_output is None else loss * grad_output).sum().backward()
    return loss.detach(), student.grad


def assert_matches_reference(student, original, strengthened, rtol=1e-9, atol=1e-12, **options):
    loss, grad = loss_and_grad("triton", student, original, strengthened, **options)
    ref_loss, ref_grad = loss_and_grad("reference", student, original, strengthened, **options)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol)
    return loss, grad


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [0.0, 8.0])
def test_matches_reference_float64(device, direction, temperature, alpha):
    student, original, strengthened = make_logits(13, 1271, device)
    assert_matches_reference(student, original, strengthened, alpha=alpha,
                             labels=random_labels(13, device), temperature=temperature,
                             direction=direction, reduction="sum")


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_plain_distillation_without_strengthened(device, direction, monkeypatch):
    # The default configuration: V = 4099 takes two blocks of 4096, the second nearly empty.
    monkeypatch.setattr(triton_backend, "MAX_BLOCK_V", 4096)
    student, original, _ = make_logits(5, 4099, device)
    assert_matches_reference(student, original, None, temperature=2.5, direction=direction,
                             reduction="mean")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(device, reduction):
    student, original, strengthened = (t.reshape(4, 6, 1271)
                                       for t in make_logits(24, 1271, device))
    labels = random_labels(24, device).reshape(4, 6)
    # 'none' is differentiated against a non-uniform upstream gradient.
    grad_output = torch.rand(4, 6, dtype=torch.float64, device=device) if reduction == "none" else None
    loss, _ = assert_matches_reference(student, original, strengthened, grad_output=grad_output,
                                       labels=labels, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (4, 6)
        assert torch.all(loss[labels == -100] == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_masked_rows_give_zero_even_with_nan_logits(device, reduction):
    student, original, strengthened = make_logits(5, 1271, device)
    student[1, 7] = float("nan")
    original[2, 3] = float("nan")
    labels = torch.full((5,), -100, device=device)
    loss, grad = loss_and_grad("triton", student, original, strengthened, labels=labels,
                               reduction=reduction)
    assert torch.all(loss == 0)
    assert torch.all(grad == 0)


def test_masked_rows_with_nan_do_not_leak(device):
    student, original, strengthened = make_logits(6, 1271, device)
    labels = torch.tensor([1, -100, 2, 3, -100, 4], device=device)
    student[1] = float("nan")
    strengthened[4, :10] = float("nan")
    options = dict(labels=labels, reduction="none")
    loss, grad = loss_and_grad("triton", student, original, strengthened, **options)
    ref_loss, ref_grad = loss_and_grad("reference", student, original, strengthened, **options)
    kept = labels != -100
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    # Only kept rows are compared: autograd through the reference's masking turns the NaN
    # logits of a masked row into a NaN gradient there, while the spec asks for 0.
    torch.testing.assert_close(grad[kept], ref_grad[kept], rtol=1e-9, atol=1e-12)
    assert torch.all(grad[~kept] == 0)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_nan_propagates_to_unmasked_rows(device, direction):
    student, original, strengthened = make_logits(4, 1271, device, dtype=torch.float32)
    student[0, 100] = float("nan")
    original[1, 1270] = float("nan")
    strengthened[2, 0] = float("nan")
    loss, _ = loss_and_grad("triton", student, original, strengthened, reduction="none",
                            direction=direction)
    assert torch.isnan(loss[:3]).all(), loss
    assert torch.isfinite(loss[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_low_precision_no_worse_than_reference_in_that_dtype(device, dtype, direction):
    """Error against float64 (on the same rounded inputs) is at most the reference's own error
    when it computes in ``dtype``, plus a few roundings of the output."""
    student, original, strengthened = make_logits(9, 1271, device, dtype=dtype)
    options = dict(labels=random_labels(9, device), direction=direction, temperature=2.5,
                   reduction="none")
    grad_output = torch.rand(9, dtype=torch.float64, device=device)
    truth_loss, truth_grad = loss_and_grad("reference", student.double(), original.double(),
                                           strengthened.double(), grad_output, **options)
    loss, grad = loss_and_grad("triton", student, original, strengthened,
                               grad_output.float(), **options)
    ref_loss, ref_grad = loss_and_grad("reference", student, original, strengthened,
                                       grad_output.to(dtype), **options)
    assert loss.dtype == torch.float32 and grad.dtype == dtype

    def error(x, truth):
        return (x.double() - truth).abs().max().item()

    loss_slack = 4 * EPS[torch.float32] * (1 + truth_loss.abs().max().item())
    grad_slack = 0.5 * EPS[dtype] * truth_grad.abs().max().item()   # one rounding to dtype
    assert error(loss, truth_loss) <= error(ref_loss, truth_loss) + loss_slack
    assert error(grad, truth_grad) <= error(ref_grad, truth_grad) + grad_slack
    # Accumulation is float32 whatever the input dtype, so the loss is float32-accurate.
    assert error(loss, truth_loss) <= 1e-5 * (1 + truth_loss.abs().max().item())


def test_mixed_dtypes(device):
    """A float32 student with bfloat16 teachers: float32 accuracy on the rounded inputs."""
    student, original, strengthened = make_logits(7, 1271, device)
    student = student.float()
    original, strengthened = original.bfloat16(), strengthened.bfloat16()
    options = dict(labels=random_labels(7, device), reduction="sum")
    loss, grad = loss_and_grad("triton", student, original, strengthened, **options)
    truth_loss, truth_grad = loss_and_grad("reference", student.double(), original.double(),
                                           strengthened.double(), **options)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), truth_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-4, atol=1e-6)


def extreme_logits(rows, vocab, device):
    """Logits of +-1e4 in places and -inf at the same positions in all three tensors."""
    student, original, strengthened = make_logits(rows, vocab, device)
    for t, sign in ((student, 1), (original, -1), (strengthened, 1)):
        picks = torch.randint(0, vocab, (rows, 3), device=device)
        t.scatter_(1, picks, sign * 1e4 * torch.ones(rows, 3, dtype=t.dtype, device=device))
    banned = torch.rand(rows, vocab, device=device) < 0.2
    for t in (student, original, strengthened):
        t.masked_fill_(banned, float("-inf"))
    return student, original, strengthened


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_extreme_logits(device, direction):
    student, original, strengthened = extreme_logits(6, 1271, device)
    options = dict(direction=direction, reduction="none")
    loss, grad = assert_matches_reference(student, original, strengthened, **options)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # In float32 as well, no worse than the reference computing in float32.
    loss32, grad32 = loss_and_grad("triton", student.float(), original.float(),
                                   strengthened.float(), **options)
    ref32, ref_grad32 = loss_and_grad("reference", student.float(), original.float(),
                                      strengthened.float(), **options)
    slack = 4 * EPS[torch.float32] * (1 + loss.abs().max().item())
    assert (loss32.double() - loss).abs().max() <= (ref32.double() - loss).abs().max() + slack
    grad_slack = 4 * EPS[torch.float32] * grad.abs().max().item()
    assert ((grad32.double() - grad).abs().max()
            <= (ref_grad32.double() - grad).abs().max() + grad_slack)


def test_non_contiguous_inputs(device):
    student, original, strengthened = make_logits(8, 1271, device)
    # A transposed copy (unit stride along rows, not V) and a slice with a padded row stride.
    student_t = student.t().contiguous().t()
    original_padded = torch.cat([original, torch.randn_like(original[:, :5])], dim=1)[:, :1271]
    strengthened_3d = strengthened.reshape(2, 4, 1271)
    assert student_t.stride(-1) != 1 and original_padded.stride(0) == 1276
    labels = random_labels(8, device).reshape(2, 4)
    loss, grad = loss_and_grad("triton", student_t.reshape(2, 4, 1271), original_padded.reshape(2, 4, 1271),
                               strengthened_3d, labels=labels, reduction="sum")
    ref_loss, ref_grad = loss_and_grad("reference", student.reshape(2, 4, 1271),
                                       original.reshape(2, 4, 1271), strengthened_3d,
                                       labels=labels, reduction="sum")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reverse", [True, False])
def test_v_split_stats_path_and_small_blocks(device, reverse):
    """Forced V-splits (partial sums merged by the combine kernel) agree with one split and
    with the reference, including a split that sees only -inf, and a masked row; small blocks
    make every program loop over several of them."""
    rows, vocab, block_v = 4, 1271, 128
    student, original, strengthened = make_logits(rows, vocab, device)
    # Row 3: the first 500 columns are -inf everywhere, so with 4 splits of 384 columns the
    # first split of that row sees nothing else.
    for t in (student, original, strengthened):
        t[3, :500] = float("-inf")
    keep = torch.tensor([True, False, True, True], device=device)
    direction = "reverse" if reverse else "forward"
    ref_loss, ref_grad = loss_and_grad("reference", student, original, strengthened,
                                       labels=torch.where(keep, 1, -100), reduction="none",
                                       alpha=8.0, temperature=2.5, direction=direction)
    args = (student, original, strengthened, keep, 8.0, 2.5, reverse)
    loss_single, stats_single = triton_rkl_forward(*args, splits=1, block_v=block_v)
    loss_split, stats_split = triton_rkl_forward(*args, splits=4, block_v=block_v)
    for loss in (loss_single, loss_split):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
        assert loss[1] == 0
    torch.testing.assert_close(stats_split, stats_single, rtol=1e-9, atol=1e-12)
    grad = triton_rkl_backward(*args[:4], stats_split,
                               torch.ones(rows, dtype=torch.float64, device=device),
                               *args[4:], block_v=block_v)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_error_when_interpreter_is_off_on_cpu(tmp_path):
    """In a fresh process with TRITON_INTERPRET unset and CUDA hidden, CPU tensors give a clear
    error that says how to switch the interpreter on."""
    script = textwrap.dedent("""
        import torch
        from rkld_kernels import fused_rkl_loss
        x = torch.randn(2, 8)
        try:
            fused_rkl_loss(x, x.clone(), backend="triton")
        except RuntimeError as err:
            print(err)
        else:
            print("no error")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout, result.stdout
    assert "before triton is first imported" in result.stdout
    assert "backend='torch'" in result.stdout


def test_error_when_triton_is_missing(monkeypatch):
    monkeypatch.setattr(triton_backend, "triton", None)
    monkeypatch.setattr(triton_backend, "_TRITON_IMPORT_ERROR", ImportError("No module named 'triton'"))
    with pytest.raises(RuntimeError, match="pip install triton"):
        triton_backend.check_triton_usable(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30,
                    reason="needs a CUDA GPU with at least 40 GiB")
def test_int64_offsets_past_2_pow_31(device):
    """rows * V > 2^31: the last rows must still be read and written at the right place."""
    rows, vocab = 16400, 131072
    assert rows * vocab > 2 ** 31
    student, original, strengthened = (torch.randn(rows, vocab, device=device,
                                                   dtype=torch.bfloat16) for _ in range(3))
    grad_output = torch.zeros(rows, device=device)
    grad_output[-2:] = 1.0
    loss, grad = loss_and_grad("triton", student, original, strengthened, grad_output,
                               reduction="none")
    tail = [t[-2:].double() for t in (student, original, strengthened)]
    ref_loss, ref_grad = loss_and_grad("reference", *tail, reduction="none")
    torch.testing.assert_close(loss[-2:].double(), ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad[-2:].double(), ref_grad, rtol=2e-2, atol=1e-8)
