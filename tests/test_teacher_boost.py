"""``--teacher-boost logprobs`` (an extension of the paper): the per-row shift folded into the
strengthened head gives relu(log_softmax(g) - log_softmax(o)) exactly, judged against the naive
float64 formula, through both fused-loss backends and through the unlearning objective with
cached and with live teachers."""
import json

import pytest
import torch
from safetensors.torch import load_file

from rkld.config import UnlearnConfig
from rkld.data import collate, load_benchmark
from rkld.models import load_model
from rkld.teacher_boost import (
    extend_hidden,
    fold_row_shift,
    row_logsumexp,
    teacher_logits,
)
from rkld.teacher_cache import LiveTeachers, TeacherCache
from rkld.train import _encode, _UnlearnObjective, unlearn
from rkld_kernels import fused_linear_rkl_loss
from rkld_kernels.reference import rkl_per_position, unlearning_teacher_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def _naive_loss(student, original, strengthened, alpha, boost):
    """Summed reverse KL to the teacher, float64, from logits."""
    teacher = teacher_logits(original.double(), strengthened.double(), alpha, boost)
    return rkl_per_position(student.double(), teacher).sum()


def test_teacher_formula():
    o = torch.tensor([[0.0, 1.0, float("-inf"), 2.0]], dtype=torch.float64)
    g = torch.tensor([[1.0, 2.0, 0.0, 2.5]], dtype=torch.float64)
    # logits: the paper's teacher, the kernels' reference
    torch.testing.assert_close(teacher_logits(o, g, 2.0), unlearning_teacher_logits(o, g, 2.0))
    # logprobs: only what rose in log-probability is pushed down; -inf stays -inf
    raised = torch.log_softmax(g, -1) - torch.log_softmax(o, -1)
    want = o - 2.0 * raised.clamp_min(0)
    want[0, 2] = float("-inf")
    got = teacher_logits(o, g, 2.0, "logprobs")
    torch.testing.assert_close(got, want)
    # g = o + a per-row constant raises every logit but no log-probability
    torch.testing.assert_close(teacher_logits(o[:, [0, 1, 3]], o[:, [0, 1, 3]] + 3.0, 5.0,
                                              "logprobs"), o[:, [0, 1, 3]])
    with pytest.raises(ValueError, match="teacher_boost must be one of"):
        teacher_logits(o, g, 1.0, "probs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_folded_shift_gives_the_shifted_logits(dtype):
    hidden = torch.randn(9, 16).to(dtype)
    weight = torch.randn(40, 16).to(dtype)
    shift = (torch.randn(9) * 7).to(torch.float64 if dtype == torch.float64 else torch.float32)
    folded_hidden, folded_weight = fold_row_shift(hidden, weight, shift)
    assert folded_hidden.dtype == folded_weight.dtype == dtype
    got = folded_hidden.double() @ folded_weight.double().T
    want = hidden.double() @ weight.double().T - shift.double()[:, None]
    # float32 precision of the shift even for 16-bit heads (one rounded term: ~0.03 at 7)
    atol = 1e-12 if dtype == torch.float64 else 7 * 2 ** -22
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    with pytest.raises(ValueError, match="one value per hidden row"):
        extend_hidden(hidden, shift[:4])


def test_row_logsumexp_chunks_match():
    rows, weight, bias = torch.randn(37, 8), torch.randn(30, 8), torch.randn(30)
    want = torch.logsumexp(rows.double() @ weight.double().T + bias.double(), -1)
    torch.testing.assert_close(row_logsumexp(rows, weight, bias, chunk=5).double(), want,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_with_logprob_teacher_matches_float64(backend, dtype):
    n, hidden_size, vocab, alpha = 11, 16, 70, 6.0
    xo = torch.randn(n, hidden_size).to(dtype)
    wo = torch.randn(vocab, hidden_size).to(dtype)
    # strengthened: nearby, with a different logsumexp per row (raw logits all shifted)
    xg = (xo.float() + 0.3 * torch.randn(n, hidden_size)).to(dtype)
    wg = (wo.float() + 0.2 * torch.randn(vocab, hidden_size)).to(dtype)
    bg = (torch.ones(vocab) * 0.7).to(dtype)
    xs = (xo.float() + 0.1 * torch.randn(n, hidden_size)).to(dtype).requires_grad_(True)
    ws = wo.clone()

    shift = row_logsumexp(xg, wg, bg) - row_logsumexp(xo, wo)
    xg_shifted, wg_shifted = fold_row_shift(xg, wg, shift)
    loss = fused_linear_rkl_loss(xs, ws, xo, wo, xg_shifted, wg_shifted, strengthened_bias=bg,
                                 alpha=alpha, reduction="sum", backend=backend)
    loss.backward()

    x64 = xs.detach().double().requires_grad_(True)
    g = xg.double() @ wg.double().T + bg.double()
    want = _naive_loss(x64 @ ws.double().T, xo.double() @ wo.double().T, g, alpha, "logprobs")
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)
    grad_tol = 1e-4 if dtype == torch.float32 else 2 ** -7      # bf16: the gradient's rounding
    scale = x64.grad.abs().max()
    torch.testing.assert_close(xs.grad.double() / scale, x64.grad / scale, rtol=grad_tol,
                               atol=grad_tol)
    # The test tells the two teachers apart: the paper's gives a clearly different loss.
    paper = _naive_loss(x64.detach() @ ws.double().T, xo.double() @ wo.double().T, g, alpha,
                        "logits")
    assert abs(paper - want) > 100 * 1e-4 * abs(want)


# --------------------------------------------------------------------------- the pipeline

def _cfg(pair, out, **overrides):
    settings = dict(model=str(pair / "original"), strengthened=str(pair / "strengthened"),
                    out=str(out), forget="forget10", epochs=1, batch_size=8, micro_batch_size=8,
                    max_length=48, progress=False, lr=2e-3, alpha=4.0, teacher_boost="logprobs")
    settings.update(overrides)
    return UnlearnConfig(**settings)


def _naive_objective(pair, cfg, batch, boost):
    """The forget loss of the untouched student (the original model), naively in float64 from
    the three models' full logits."""
    logits = {}
    for name in ("original", "strengthened"):
        model, _ = load_model(pair / name)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits[name] = out.logits[:, :-1][batch["labels"][:, 1:] != -100].double()
    return _naive_loss(logits["original"], logits["original"], logits["strengthened"],
                       cfg.alpha, boost)


def test_unlearning_with_logprob_boost_cached_and_live(pair, tmp_path):
    cfg = _cfg(pair, tmp_path / "cached")
    cached, cached_stats = unlearn(cfg)
    live, live_stats = unlearn(_cfg(pair, tmp_path / "live", live_teachers=True))
    assert json.loads((cached / "run.json").read_text())["config"]["teacher_boost"] == "logprobs"
    assert cached_stats["epoch_losses"] == pytest.approx(live_stats["epoch_losses"], rel=1e-4)
    weights_cached, weights_live = load_file(str(cached / "model.safetensors")), \
        load_file(str(live / "model.safetensors"))
    for name, value in weights_cached.items():
        torch.testing.assert_close(weights_live[name], value, rtol=0, atol=1e-5)
    paper, _ = unlearn(_cfg(pair, tmp_path / "paper", teacher_boost="logits"))
    assert any(not torch.allclose(value, load_file(str(paper / "model.safetensors"))[name])
               for name, value in weights_cached.items())

    # The objective at the start (student = original) against the float64 formula, with the
    # logsumexps the cache stored and with live teachers.
    student, tokenizer = load_model(pair / "original")
    examples = _encode(tokenizer, load_benchmark("synthetic").split("forget10"), cfg, "forget10")
    picked = [4, 0, 9]
    batch = collate([examples[i] for i in picked], tokenizer.pad_token_id)
    want = _naive_objective(pair, cfg, batch, "logprobs")
    cache = TeacherCache(cached / "teacher_cache" / "forget", torch.device("cpu"))
    assert "original" in cache._lse and "strengthened" in cache._lse
    live_teachers = LiveTeachers({name: load_model(pair / name)[0]
                                  for name in ("original", "strengthened")})
    for teachers in (cache, live_teachers):
        objective = _UnlearnObjective(cfg, teachers, None)
        with torch.no_grad():
            got, _ = objective(student, picked, batch, picked, None)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    paper_objective = _UnlearnObjective(_cfg(pair, "unused", teacher_boost="logits"),
                                        live_teachers, None)
    with torch.no_grad():
        got_paper, _ = paper_objective(student, picked, batch, picked, None)
    torch.testing.assert_close(got_paper.double(), _naive_objective(pair, cfg, batch, "logits"),
                               rtol=1e-4, atol=1e-6)
    assert abs(got_paper.double() - want) > 1e-2 * abs(want)

