"""Arguments the kernel library must refuse with one line naming the argument, what was
expected and what was received: at the public functions, at the loss modules' construction,
and at the raw operator ``torch.ops.rkld.rkl_loss`` (which the public function calls with
resolved arguments, and which a user can call directly)."""
import pytest
import torch

from rkld_kernels import LinearRKLLoss, RKLLoss, fused_linear_rkl_loss, fused_rkl_loss


def logits(rows=4, vocab=7):
    return torch.randn(rows, vocab), torch.randn(rows, vocab), torch.randn(rows, vocab)


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("options,error,pattern", [
    (dict(alpha=float("inf")), ValueError, r"alpha must be >= 0 and finite.*got inf"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be >= 0 and finite.*got nan"),
    (dict(alpha="8"), TypeError, r"alpha must be a real number \(int or float\); got str '8'"),
    (dict(alpha=True), TypeError, r"alpha must be a real number .*got bool True"),
    (dict(temperature=float("inf")), ValueError, r"temperature must be a finite number > 0.*"
                                                 r"got inf"),
    (dict(temperature=1e-320), ValueError, r"temperature must be a finite number > 0 whose "
                                           r"inverse is finite"),
    (dict(temperature=0), ValueError, r"temperature must be > 0; got 0"),
    (dict(temperature="1"), TypeError, r"temperature must be a real number .*got str '1'"),
])
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_fused_rkl_loss_refuses_bad_hyperparameters(options, error, pattern, backend):
    s, o, g = logits()
    with pytest.raises(error, match="fused_rkl_loss: " + pattern) as err:
        fused_rkl_loss(s, o, g, backend=backend, **options)
    one_line(err)


@pytest.mark.parametrize("options,pattern", [
    (dict(alpha=float("inf")), r"LinearRKLLoss: alpha must be >= 0 and finite"),
    (dict(temperature=float("inf")), r"LinearRKLLoss: temperature must be a finite number"),
    (dict(alpha="8"), r"LinearRKLLoss: alpha must be a real number"),
    (dict(ignore_index=None), r"LinearRKLLoss: ignore_index must be an int .*got NoneType None"),
    (dict(ignore_index=1.5), r"LinearRKLLoss: ignore_index must be an int"),
    (dict(compiled="yes"), r"LinearRKLLoss: compiled"),
    (dict(chunk_size=0), r"LinearRKLLoss: chunk_size must be None .* or an int >= 1.*got 0"),
    (dict(accum_dtype="float32"), r"LinearRKLLoss: accum_dtype must be None or a floating "
                                  r"torch.dtype"),
    (dict(accum_dtype=torch.int32), r"LinearRKLLoss: accum_dtype must be None or a floating"),
    (dict(drop_masked="no"), r"LinearRKLLoss: drop_masked must be True or False; got str"),
    (dict(vocab_size=0), r"LinearRKLLoss: vocab_size must be None or an int >= 1"),
    (dict(reduction="avg"), r"LinearRKLLoss: reduction must be one of"),
])
def test_linear_rkl_loss_checks_at_construction(options, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern) as err:
        LinearRKLLoss(**options)
    one_line(err)


@pytest.mark.parametrize("options,pattern", [
    (dict(alpha=float("inf")), r"RKLLoss: alpha must be >= 0 and finite"),
    (dict(temperature=float("inf")), r"RKLLoss: temperature must be a finite number"),
    (dict(alpha="8"), r"RKLLoss: alpha must be a real number"),
    (dict(ignore_index=None), r"RKLLoss: ignore_index must be an int"),
    (dict(ignore_index="-100"), r"RKLLoss: ignore_index must be an int .*got str '-100'"),
    (dict(vocab_size=-3), r"RKLLoss: vocab_size must be None or an int >= 1.*got -3"),
    (dict(backend="cuda"), r"RKLLoss: backend must be one of"),
])
def test_rkl_loss_module_checks_at_construction(options, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern) as err:
        RKLLoss(**options)
    one_line(err)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_ignore_index_none_with_labels_is_one_line(backend):
    s, o, g = logits()
    labels = torch.tensor([1, -100, 2, 3])
    with pytest.raises(TypeError, match=r"fused_rkl_loss: ignore_index must be an int \(the "
                                        r"label value .*pass labels=None.*got NoneType None"):
        fused_rkl_loss(s, o, g, labels=labels, ignore_index=None, backend=backend)
    # Without labels nothing is compared with it: accepted.
    fused_rkl_loss(s, o, g, ignore_index=None, backend=backend)


def test_ignore_index_none_with_labels_in_the_fused_linear_loss():
    h = torch.randn(4, 3)
    w = [torch.randn(7, 3) for _ in range(3)]
    with pytest.raises(TypeError, match=r"fused_linear_rkl_loss: ignore_index must be an int"):
        fused_linear_rkl_loss(h, w[0], h, w[1], h, w[2], labels=torch.tensor([1, -100, 2, 3]),
                              ignore_index=None, backend="torch")


def raw_args(**changes):
    s, o, g = logits()
    args = dict(student=s, original=o, strengthened=g, keep=None, alpha=8.0, temperature=1.0,
                reverse=True, reduction="mean", backend="torch", compiled="never",
                need_grad=False)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,pattern", [
    (dict(keep=torch.ones(3, dtype=torch.bool)), r"keep must be None or a bool mask of shape "
                                                 r"\(4,\).*got torch.bool \(3,\)"),
    (dict(keep=torch.ones(4, dtype=torch.int64)), r"keep must be None or a bool mask.*got "
                                                  r"torch.int64 \(4,\)"),
    (dict(reduction="avg"), r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'"),
    (dict(backend="cuda"), r"backend must be one of 'torch', 'triton'; got 'cuda'"),
    (dict(backend="auto"), r"backend must be one of 'torch', 'triton'; got 'auto'"),
    (dict(temperature=0.0), r"temperature must be > 0; got 0.0"),
    (dict(alpha=float("inf")), r"alpha must be >= 0 and finite"),
    (dict(compiled="sometimes"), r"compiled must be one of"),
])
def test_raw_operator_refuses_what_it_ran_silently(changes, pattern):
    with pytest.raises((TypeError, ValueError), match="torch.ops.rkld.rkl_loss: " + pattern) \
            as err:
        torch.ops.rkld.rkl_loss(**raw_args(**changes))
    one_line(err)


def test_raw_operator_still_runs_with_good_arguments():
    keep = torch.tensor([True, False, True, True])
    loss, _ = torch.ops.rkld.rkl_loss(**raw_args(keep=keep))
    assert loss.shape == () and torch.isfinite(loss)
