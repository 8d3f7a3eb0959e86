"""Precision at the start of unlearning (student ~ original), bfloat16 inputs: relative error of
the loss and of the gradient against float64 computed from the same rounded inputs, for naive
PyTorch, ``torch.compile`` of it, Liger-Kernel and ours. Prints markdown tables (the README's)
and, with ``--json PATH``, the same figures as JSON.

Logits (``fused_rkl_loss``): 16 rows, V = 32000 and 50257; original logits ``o`` (N(0, 2^2)
plus 8 on one token per row), strengthened ``g = o`` plus bumps of 0.5..3 on 8 tokens per row
(4 among the row's 2nd..8th most likely, 4 anywhere), student ``o + 0.01 noise``. Two teacher
set-ups: RKLD (teacher ``o - 8 relu(g - o)``) and plain distillation (teacher ``o``), the only
one Liger's JSD computes (beta = 1 is KL(student || teacher)); it is fed log-probabilities
computed in float32 and rounded to bfloat16, as its inputs are in the model's dtype.

Hidden states (``fused_linear_rkl_loss``): hidden [32, 64], lm_head weights [4099, 64] with a
shared mean direction (as trained heads have), student hidden = original + 0.01 noise; RKLD with
a strengthened head W + 0.05 noise, and plain distillation (the case
``LigerFusedLinearJSDLoss(beta=1)`` computes; it runs on CPU).

"x floor" divides the gradient's relative error by that of rounding the exact gradient to
bfloat16 (the best a bfloat16 gradient can be; the precision contract allows 2x). Off CUDA the
Triton kernels (ours, Liger's JSD) run in Triton's interpreter, which converts float32 to
bfloat16 by truncation, so for them the floor is the truncation floor (about 2x larger).

A third table holds the cases beyond bfloat16 at T = 1, ours against the naive formula in the
inputs' dtype: a student that is one-hot in float32 at T = 0.05 (16 rows, V = 32000, each
row's top logit 1 above its second, i.e. 20 nats at T = 0.05; RKLD with the strengthened model
raising that token by 2.5 so that the teacher pushes it down), where the top token's gradient
is taken from the other entries; and float32 inputs (the logits above, and the heads above, in
float32), computed in float64 inside, against the float32 floor.

Run: ``python bench/precision_table.py [--json out.json]`` (CPU: a few minutes, most of it
compiling the naive loss).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

if __name__ == "__main__" and not os.environ.get("TRITON_INTERPRET"):
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"      # before triton is first imported

import torch
import torch.nn.functional as F

from rkld_kernels import fused_linear_rkl_loss, fused_rkl_loss, reference_rkl_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = torch.bfloat16
ALPHA = 8.0


def truncated(t: torch.Tensor) -> torch.Tensor:
    bits = t.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def relative(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value.double().cpu() - exact).norm() / exact.norm()).item()


def floors(exact: torch.Tensor) -> dict:
    return {"round": relative(exact.to(LOW), exact), "truncate": relative(truncated(exact), exact)}


# --- logits -----------------------------------------------------------------------------------

def make_logits(rows: int, vocab: int, seed: int = 0, dtype: torch.dtype = LOW):
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 2
    o[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=gen)] += 8
    g = o.clone()
    likely = o.topk(8, dim=1).indices[:, 1:]
    pick = torch.rand(rows, 7, generator=gen).argsort(dim=1)[:, :4]
    tokens = torch.cat([likely.gather(1, pick), torch.randint(0, vocab, (rows, 4), generator=gen)],
                       dim=1)
    g.scatter_add_(1, tokens, 0.5 + 2.5 * torch.rand(rows, 8, generator=gen, dtype=torch.float64))
    s = o + 0.01 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    return s.to(dtype), o.to(dtype), g.to(dtype)


def naive_logits_loss(student, original, strengthened):
    """What a user writes: the teacher, two log_softmax and sum p (log p - log q), in the inputs'
    dtype (the reference formula)."""
    return reference_rkl_loss(student, original, strengthened, alpha=ALPHA)


def ours_logits(backend):
    def loss(student, original, strengthened):
        return fused_rkl_loss(student, original, strengthened, alpha=ALPHA, backend=backend)
    return loss


def liger_jsd_loss():
    from liger_kernel.transformers import LigerJSD
    jsd = LigerJSD(beta=1.0)

    def loss(student, original, strengthened):
        assert strengthened is None
        log_p = torch.log_softmax(student.float(), dim=-1).to(student.dtype)
        log_q = torch.log_softmax(original.float(), dim=-1).to(original.dtype)
        return jsd(log_p, log_q)
    return loss


def run_logits(fn, inputs, device):
    student, original, strengthened = (t.to(device) if t is not None else None for t in inputs)
    leaf = student.clone().requires_grad_()
    loss = fn(leaf, original, strengthened)
    loss.backward()
    return loss.detach().double().cpu(), leaf.grad.cpu()


# --- hidden states ----------------------------------------------------------------------------

def make_heads(seed: int = 0, tokens: int = 32, hidden: int = 64, vocab: int = 4099,
               dtype: torch.dtype = LOW):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    weight = (randn(vocab, hidden) + 2 * randn(hidden)) * 3 / math.sqrt(hidden)
    x = randn(tokens, hidden) + randn(hidden)
    return {"student_hidden": (x + 0.01 * randn(tokens, hidden)).to(dtype),
            "student_weight": weight.to(dtype), "original_hidden": x.to(dtype),
            "original_weight": weight.to(dtype), "strengthened_hidden": x.to(dtype),
            "strengthened_weight": (weight + 0.05 * randn(vocab, hidden)).to(dtype)}


def naive_linear_loss(p):
    strengthened = (F.linear(p["strengthened_hidden"], p["strengthened_weight"])
                    if "strengthened_hidden" in p else None)
    return reference_rkl_loss(F.linear(p["student_hidden"], p["student_weight"]),
                              F.linear(p["original_hidden"], p["original_weight"]),
                              strengthened, alpha=ALPHA)


def ours_linear(backend):
    def loss(p):
        return fused_linear_rkl_loss(p["student_hidden"], p["student_weight"],
                                     p["original_hidden"], p["original_weight"],
                                     p.get("strengthened_hidden"), p.get("strengthened_weight"),
                                     alpha=ALPHA, backend=backend)
    return loss


def liger_fused_linear_loss():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    module = LigerFusedLinearJSDLoss(beta=1.0, weight_hard_loss=0.0, weight_soft_loss=1.0,
                                     compiled=False)

    def loss(p):
        assert "strengthened_hidden" not in p
        return module(p["student_hidden"], p["student_weight"], p["original_hidden"],
                      p["original_weight"], torch.zeros(p["student_hidden"].shape[0],
                                                        dtype=torch.long,
                                                        device=p["student_hidden"].device))
    return loss


def run_linear(fn, problem, device, dtype=None):
    p = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in problem.items()}
    for k in ("student_hidden", "student_weight"):
        p[k] = p[k].clone().requires_grad_()
    loss = fn(p)
    loss.backward()
    return (loss.detach().double().cpu(), p["student_hidden"].grad.cpu(),
            p["student_weight"].grad.cpu())


# --- tables -----------------------------------------------------------------------------------

def available(impl: str) -> str | None:
    """None if ``impl`` runs here, else why not."""
    if impl.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "not installed"
    if "triton" in impl and importlib.util.find_spec("triton") is None:
        return "needs triton"
    return None


def interpreted(impl: str) -> bool:
    return DEVICE != "cuda" and "triton" in impl


def logits_table() -> list[dict]:
    impls = {
        "naive bf16 PyTorch": naive_logits_loss,
        "torch.compile of naive": torch.compile(naive_logits_loss),
        "Liger `LigerJSD(beta=1)` (triton)": None,
        "ours, torch backend": ours_logits("torch"),
        "ours, triton backend": ours_logits("triton"),
    }
    rows = []
    for vocab in (32000, 50257):
        inputs = make_logits(16, vocab)
        for teacher in ("rkld", "distill"):
            case = inputs if teacher == "rkld" else (inputs[0], inputs[1], None)
            exact_loss, exact_grad = run_logits(
                naive_logits_loss, tuple(t.double() if t is not None else None for t in case),
                "cpu")
            floor = floors(exact_grad)
            for name, fn in impls.items():
                if name.startswith("Liger"):
                    if teacher == "rkld":
                        continue          # Liger has no strengthened teacher
                    why = available("liger triton")
                    fn = liger_jsd_loss() if why is None else None
                else:
                    why = available(name)
                row = {"table": "logits", "vocab": vocab, "teacher": teacher, "impl": name}
                if why is not None or fn is None:
                    rows.append({**row, "skipped": why})
                    continue
                loss, grad = run_logits(fn, case, DEVICE)
                kind = "truncate" if interpreted(name) else "round"
                rows.append({**row, "loss": loss.item(), "exact_loss": exact_loss.item(),
                             "loss_rel": abs(loss.item() - exact_loss.item()) / exact_loss.item(),
                             "grad_rel": relative(grad, exact_grad), "floor": floor[kind],
                             "floor_kind": kind})
    return rows


def linear_table() -> list[dict]:
    impls = {
        "naive bf16 PyTorch": naive_linear_loss,
        "torch.compile of naive": torch.compile(naive_linear_loss),
        "Liger `LigerFusedLinearJSDLoss(beta=1)` (chunked)": None,
        "ours, torch backend": ours_linear("torch"),
        "ours, triton backend": ours_linear("triton"),
    }
    problem = make_heads()
    rows = []
    for teacher in ("rkld", "distill"):
        case = dict(problem)
        if teacher == "distill":
            del case["strengthened_hidden"], case["strengthened_weight"]
        exact_loss, exact_dx, exact_dw = run_linear(naive_linear_loss, case, "cpu",
                                                    torch.float64)
        for name, fn in impls.items():
            if name.startswith("Liger"):
                if teacher == "rkld":
                    continue
                why = available("liger")
                fn = liger_fused_linear_loss() if why is None else None
            else:
                why = available(name)
            row = {"table": "linear", "teacher": teacher, "impl": name}
            if why is not None or fn is None:
                rows.append({**row, "skipped": why})
                continue
            loss, dx, dw = run_linear(fn, case, DEVICE)
            rows.append({**row, "loss": loss.item(), "exact_loss": exact_loss.item(),
                         "loss_rel": abs(loss.item() - exact_loss.item()) / exact_loss.item(),
                         "dx_rel": relative(dx, exact_dx), "dx_floor": floors(exact_dx)["round"],
                         "dw_rel": relative(dw, exact_dw), "dw_floor": floors(exact_dw)["round"]})
    return rows


def one_hot_logits(rows: int = 16, vocab: int = 32000):
    """bfloat16 logits of a student one-hot in float32 at T = 0.05 (see the module docstring)."""
    s, o, g = (t.double() for t in make_logits(rows, vocab))
    o = o.clone()
    top2 = o.topk(2, dim=1)
    index = torch.arange(rows)
    lift = top2.values[:, 1] + 1.0 - top2.values[:, 0]
    o[index, top2.indices[:, 0]] += lift
    g = o.clone()
    g[index, top2.indices[:, 0]] += 2.5
    return o.clone().to(LOW), o.to(LOW), g.to(LOW)


def beyond_table() -> list[dict]:
    """One-hot students (bfloat16, T = 0.05) and float32 inputs: ours against the naive
    formula in the inputs' dtype, errors as multiples of the floor of the gradient's dtype."""
    rows = []

    def floor_of(exact, dtype, kind):
        if dtype == LOW:
            return floors(exact)[kind]
        return relative(exact.to(dtype), exact)

    def logits_case(case, inputs, temperature, dtype):
        inputs = tuple(t.to(dtype) for t in inputs)
        exact_loss, exact_grad = run_logits(
            lambda s, o, g: reference_rkl_loss(s, o, g, alpha=ALPHA, temperature=temperature),
            tuple(t.double() for t in inputs), "cpu")
        impls = {"naive PyTorch (inputs' dtype)":
                 lambda s, o, g: reference_rkl_loss(s, o, g, alpha=ALPHA, temperature=temperature)}
        for backend in ("torch", "triton"):
            impls[f"ours, {backend} backend"] = (
                lambda s, o, g, b=backend: fused_rkl_loss(s, o, g, alpha=ALPHA,
                                                          temperature=temperature, backend=b))
        for name, fn in impls.items():
            row = {"table": "beyond", "case": case, "impl": name}
            why = available(name) if name.startswith("ours") else None
            if why is not None:
                rows.append({**row, "skipped": why})
                continue
            loss, grad = run_logits(fn, inputs, DEVICE)
            kind = "truncate" if interpreted(name) and dtype == LOW else "round"
            rows.append({**row, "loss_rel": abs(loss.item() - exact_loss.item())
                         / exact_loss.item(), "grad_rel": relative(grad, exact_grad),
                         "floor": floor_of(exact_grad, dtype, kind), "floor_kind": kind})

    logits_case("one-hot student, bf16, T = 0.05, RKLD: loss / grad (x floor)", one_hot_logits(),
                0.05, LOW)
    logits_case("float32 logits, RKLD V=32000: loss / grad (x float32 floor)",
                make_logits(16, 32000, dtype=torch.float32), 1.0, torch.float32)
    problem = make_heads(dtype=torch.float32)
    exact_loss, exact_dx, exact_dw = run_linear(naive_linear_loss, problem, "cpu", torch.float64)
    for name, fn in {"naive PyTorch (inputs' dtype)": naive_linear_loss,
                     "ours, torch backend": ours_linear("torch"),
                     "ours, triton backend": ours_linear("triton")}.items():
        row = {"table": "beyond", "case": "float32 heads, RKLD: loss / dX (x float32 floor)",
               "impl": name}
        why = available(name) if name.startswith("ours") else None
        if why is not None:
            rows.append({**row, "skipped": why})
            continue
        loss, dx, _ = run_linear(fn, problem, DEVICE, torch.float32)
        rows.append({**row, "loss_rel": abs(loss.item() - exact_loss.item()) / exact_loss.item(),
                     "grad_rel": relative(dx, exact_dx),
                     "floor": relative(exact_dx.float(), exact_dx), "floor_kind": "round"})
    return rows


def _err(rel: float, floor: float) -> str:
    return f"{rel:.2g} ({rel / floor:.3g}x)"


def markdown(logit_rows: list[dict], linear_rows: list[dict],
             beyond_rows: list[dict] | None = None) -> str:
    out = []
    names = list(dict.fromkeys(r["impl"] for r in logit_rows))
    cases = list(dict.fromkeys((r["vocab"], r["teacher"]) for r in logit_rows))
    head = " | ".join(f"{'RKLD' if t == 'rkld' else 'distill'} V={v}: loss / grad (x floor)"
                      for v, t in cases)
    out.append(f"| `fused_rkl_loss` inputs, bf16, 16 rows | {head} |")
    out.append("|---|" + "---:|" * len(cases))
    for name in names:
        cells = []
        for vocab, teacher in cases:
            r = next((r for r in logit_rows if r["impl"] == name and r["vocab"] == vocab
                      and r["teacher"] == teacher), None)
            if r is None:
                cells.append("n/a")
            elif "skipped" in r:
                cells.append(r["skipped"] or "n/a")
            else:
                cells.append(f"{r['loss_rel']:.2g} / {_err(r['grad_rel'], r['floor'])}"
                             + (" (trunc.)" if r["floor_kind"] == "truncate" else ""))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("| hidden [32, 64], lm_head [4099, 64], bf16 | RKLD: loss / dX (x floor) / dW "
               "(x floor) | distill: loss / dX (x floor) / dW (x floor) |")
    out.append("|---|---:|---:|")
    for name in list(dict.fromkeys(r["impl"] for r in linear_rows)):
        cells = []
        for teacher in ("rkld", "distill"):
            r = next((r for r in linear_rows if r["impl"] == name and r["teacher"] == teacher),
                     None)
            if r is None:
                cells.append("n/a")
            elif "skipped" in r:
                cells.append(r["skipped"] or "n/a")
            else:
                cells.append(f"{r['loss_rel']:.2g} / {_err(r['dx_rel'], r['dx_floor'])} / "
                             f"{_err(r['dw_rel'], r['dw_floor'])}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if beyond_rows:
        out += ["", beyond_markdown(beyond_rows)]
    return "\n".join(out)


def beyond_markdown(beyond_rows: list[dict]) -> str:
    out = []
    cases = list(dict.fromkeys(r["case"] for r in beyond_rows))
    out.append("| beyond bf16 at T = 1 | " + " | ".join(cases) + " |")
    out.append("|---|" + "---:|" * len(cases))
    for name in list(dict.fromkeys(r["impl"] for r in beyond_rows)):
        cells = []
        for case in cases:
            r = next((r for r in beyond_rows if r["impl"] == name and r["case"] == case),
                     None)
            if r is None or "skipped" in r:
                cells.append((r or {}).get("skipped") or "n/a")
            else:
                cells.append(f"{r['loss_rel']:.2g} / {_err(r['grad_rel'], r['floor'])}"
                             + (" (trunc.)" if r["floor_kind"] == "truncate" else ""))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--beyond-only", action="store_true",
                        help="only the third table (one-hot students, float32 inputs)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    logit_rows, linear_rows = ([], []) if args.beyond_only else (logits_table(), linear_table())
    beyond_rows = beyond_table()
    print(f"device: {DEVICE}, torch {torch.__version__}")
    print(markdown(logit_rows, linear_rows, beyond_rows) if logit_rows
          else beyond_markdown(beyond_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": DEVICE, "logits": logit_rows, "linear": linear_rows,
                       "beyond": beyond_rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
