"""One unlearning step at 4k, 16k and 64k tokens: the naive path against rkld, in one run.

    python bench/long_sequence.py [--lengths 4096 16384 65536] [--budget-gib 6] [--threads 2]
                                  [--json long_sequence.json]

(also run by ``pytest bench/``, through ``test_bench_long_sequence.py``; ``RKLD_BENCH_LENGTHS``
and ``RKLD_BENCH_BUDGET_GIB`` change the lengths and the budget there).

A tiny Llama (V = 32000, random weights: memory and speed do not depend on what the weights
know), one sequence of N tokens, every token supervised, gradient checkpointing and SDPA
(no attention mask: the memory-efficient causal kernel) for every path. One optimizer step:
forward, backward, gradient clipping and AdamW (its states exist already, as after a first step).

- ``naive``: the model's logits ``[N, V]``, both teachers live returning their logits, the
  unlearning teacher ``o - alpha * relu(g - o)`` and a PyTorch reverse KL (``log_softmax`` +
  ``F.kl_div``), as a user without this project writes it;
- ``rkld``: the pipeline's own step (``rkld.train.step_gradients`` with its unlearning
  objective): ``fused_linear_rkl_loss`` on the final hidden states, the teachers' states read
  from a teacher cache built beforehand (``TeacherCache.build``) and memory-mapped;
- ``model only``: the same student step with a trivial loss on the final hidden states (no
  lm_head, no teachers): what the model's own activations, gradients and optimizer cost, so
  that ``rkld - model only`` is the memory the unlearning loss adds.

Every case runs in a fresh subprocess; its peak is the resident-set high-water mark during the
step above the process's size before the case built anything (weights, AdamW states and the
cached teacher heads included: what the planner's peak counts). Before a case runs, the memory
planner (``rkld.memory``, fp32 on CPU) predicts its peak; a case predicted above the budget is
not run and its row says "does not fit" with the prediction. Tokens/s are input tokens of the
second step over its wall time (the first is the one whose memory is measured; the
``model only`` rows are not timed) (the machine may be shared: the load average is printed;
ratios within one run are what count). The planner's figures for Llama-2-7B at 32k-128k
tokens (bf16, one GPU, checkpointing) are printed below the measured table.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 ** 2
GIB = 1024 ** 3
CONFIG = dict(vocab_size=32000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=172)
LENGTHS = (4096, 16384, 65536)
PATHS = ("naive", "rkld", "model only")
ALPHA = 8.0
WARM_UP_LENGTHS = (700, 1100, 1500)
_STATUS = Path("/proc/self/status")
_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the planner

def _llama_config():
    from transformers import LlamaConfig
    return LlamaConfig(**CONFIG, tie_word_embeddings=False, attn_implementation="sdpa",
                       use_cache=False)


def predicted_bytes(path: str, seq_len: int) -> dict:
    """The planner's peak for ``path`` (``naive`` / ``rkld``) and, for rkld, its loss buffers."""
    from rkld.memory import ModelShape, RunShape, estimate
    model = ModelShape.from_config(_llama_config(), name="tiny")
    result = estimate(model, RunShape(batch=1, seq_len=seq_len, precision="fp32", device="cpu"))
    if path == "naive":
        return {"peak": result["naive"].peak_checkpointed}
    cache = result["rkld cache"]
    loss = cache.components["loss buffers"]
    if path == "rkld":
        return {"peak": cache.peak_checkpointed, "loss_buffers": loss}
    return {"peak": None}


def planner_7b(lengths=(32768, 65536, 131072)) -> list:
    """Llama-2-7B, one sequence, bf16, one GPU, checkpointing: GiB per scenario."""
    from rkld.memory import ModelShape, RunShape, estimate
    model = ModelShape.from_preset("llama2-7b")
    rows = []
    for seq_len in lengths:
        for lora in (False, True):
            result = estimate(model, RunShape(batch=1, seq_len=seq_len, lora=lora))
            rows.append({"seq_len": seq_len, "tuning": "LoRA" if lora else "full",
                         **{name: result[name].peak_checkpointed / GIB for name in result},
                         "loss buffers, naive": result["naive"].components["loss buffers"] / GIB,
                         "loss buffers, rkld": result["rkld cache"].components["loss buffers"]
                         / GIB})
    return rows


# --------------------------------------------------------------------------- one case (child)

def _step_for(path: str, seq_len: int, workdir: Path):
    """Build the case (models, teacher cache, optimizer states); return its step function."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from rkld.config import UnlearnConfig
    from rkld.models import final_hidden
    from rkld.parallel import DistInfo
    from rkld.strategies import strategy_for
    from rkld.teacher_cache import TeacherCache
    from rkld.train import TrainData, _UnlearnObjective, step_gradients
    from rkld_kernels import unlearning_teacher_logits

    config = _llama_config()
    info = DistInfo()
    strategy = strategy_for(info)

    def model_with_seed(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LlamaForCausalLM(config)

    student = model_with_seed(0)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    tokens = torch.randint(0, config.vocab_size, (1, seq_len),
                           generator=torch.Generator().manual_seed(seq_len))
    mask = torch.ones_like(tokens)
    n = seq_len - 1
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = strategy.make_optimizer([{"params": trainable, "weight_decay": 0.01}], 1e-4)
    for p in trainable:               # AdamW's states exist, as after a first step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    if path == "rkld":
        example = {"input_ids": tokens[0].tolist(), "attention_mask": [1] * seq_len,
                   "labels": tokens[0].tolist()}
        # Each teacher is built when the cache asks for it and freed once its states are stored.
        cache = TeacherCache.build(workdir / "teacher_cache", [example],
                                   {"original": lambda: model_with_seed(0),
                                    "strengthened": lambda: model_with_seed(1)},
                                   key={"bench": seq_len}, micro_batch_size=1, pad_token_id=0,
                                   info=info)
        cfg = UnlearnConfig(model="original", strengthened="strengthened", out=str(workdir),
                            alpha=ALPHA)
        objective = _UnlearnObjective(cfg, cache, None)
        data = TrainData([example], None, pad_token_id=0)

        def loss_and_backward():
            return step_gradients(student, objective, data, [0], 1, info)[0]
    elif path == "naive":
        teachers = [model_with_seed(s).eval().requires_grad_(False) for s in (0, 1)]

        def loss_and_backward():
            logits = student(input_ids=tokens, attention_mask=mask).logits[0, :-1]
            with torch.no_grad():
                teacher = unlearning_teacher_logits(
                    teachers[0](input_ids=tokens, attention_mask=mask).logits[0, :-1],
                    teachers[1](input_ids=tokens, attention_mask=mask).logits[0, :-1], ALPHA)
            # KL(p || q): F.kl_div(input=log q, target=log p, log_target=True).
            loss = F.kl_div(F.log_softmax(teacher, dim=-1), F.log_softmax(logits, dim=-1),
                            log_target=True, reduction="sum") / n
            loss.backward()
            return loss.item()
    else:
        def loss_and_backward():
            rows = final_hidden(student, tokens, mask)[0, :-1]
            loss = rows.float().square().sum() / n
            loss.backward()
            return loss.item()

    def step():
        loss = loss_and_backward()
        strategy.step(student, optimizer, trainable, 1.0)
        return loss
    return step


def _rss_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from {_STATUS}")


def _release() -> None:
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)


def _child(path: str, seq_len: int, threads: int, time_first: bool = False) -> dict:
    import torch
    torch.set_num_threads(threads)
    # One-off costs before the measured step: imports, thread pools, and torch.compile of the
    # fused loss's chunk step (two lengths with different last chunks, so that the compiled code
    # is shape-generic and the measured length does not compile again).
    for warm_up in WARM_UP_LENGTHS:
        with tempfile.TemporaryDirectory() as tmp:
            _step_for(path, warm_up, Path(tmp))()
        _release()
    with tempfile.TemporaryDirectory() as tmp:
        before = _rss_kib("VmRSS")
        step = _step_for(path, seq_len, Path(tmp))
        _release()
        Path("/proc/self/clear_refs").write_text("5")     # the high-water mark restarts here
        started = time.perf_counter()
        loss = step()
        first = time.perf_counter() - started
        peak = (_rss_kib("VmHWM") - before) * 1024
        result = {"peak_bytes": peak, "loss": loss, "seconds": None, "tokens_per_s": None,
                  "timed_step": None}
        if path != "model only" and time_first:
            result.update(seconds=first, tokens_per_s=seq_len / first, timed_step="first")
        elif path != "model only":
            # Timed: the second step (the first still pays for first touches of new memory).
            started = time.perf_counter()
            step()
            seconds = time.perf_counter() - started
            result.update(seconds=seconds, tokens_per_s=seq_len / seconds, timed_step="second")
    return result


# --------------------------------------------------------------------------- the run (parent)

def measure(path: str, seq_len: int, threads: int, time_first: bool = False,
            timeout_s: float = 3600) -> dict:
    """Run one case in a fresh subprocess; returns its peak bytes, seconds, tokens/s, loss."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024),
               PYTHONPATH=os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", path, str(seq_len),
               str(threads), str(int(time_first))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{path} at {seq_len} tokens failed with exit code "
                           f"{done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(lengths=LENGTHS, budget_bytes: int = 6 * GIB, threads: int = 2, log=print,
        paths=PATHS, time_first_from: int | None = None) -> dict:
    """Every path at every length (those predicted to fit the budget); returns the results."""
    if not (_STATUS.exists() and Path("/proc/self/clear_refs").exists()):
        raise RuntimeError("measuring peak RSS needs Linux's /proc/self/status and clear_refs")
    rows = []
    for seq_len in lengths:
        for path in paths:
            prediction = predicted_bytes(path, seq_len)
            row = {"path": path, "seq_len": seq_len, "predicted_bytes": prediction["peak"],
                   "planner_loss_buffers_bytes": prediction.get("loss_buffers")}
            if prediction["peak"] is not None and prediction["peak"] > budget_bytes:
                row["fits"] = False
            else:
                time_first = time_first_from is not None and seq_len >= time_first_from
                row.update(measure(path, seq_len, threads, time_first), fits=True)
            rows.append(row)
            log(_row_line(row))
    results = {"config": CONFIG, "lengths": list(lengths), "budget_bytes": budget_bytes,
               "threads": threads, "load_average": os.getloadavg()[0], "rows": rows,
               "planner_7b": planner_7b()}
    results["targets"] = targets(results)
    return results


def _row(results: dict, path: str, seq_len: int) -> dict | None:
    return next((r for r in results["rows"] if r["path"] == path and r["seq_len"] == seq_len),
                None)


def targets(results: dict) -> dict:
    """The issue's targets, judged on the measured rows (None where a row is missing)."""
    lengths = results["lengths"]
    rkld = [_row(results, "rkld", n) for n in lengths]
    model = [_row(results, "model only", n) for n in lengths]
    out = {}
    measured = [(n, r["peak_bytes"]) for n, r in zip(lengths, rkld) if r and r["fits"]]
    if len(measured) >= 2:
        (n0, p0), (n1, p1) = measured[0], measured[-1]
        out["rkld peak growth / token growth"] = (p1 / p0) / (n1 / n0)
    extra = [r["peak_bytes"] - m["peak_bytes"] for r, m in zip(rkld, model)
             if r and m and r["fits"] and m["fits"]]
    if extra:
        out["rkld extra over model only, MiB"] = [e / MIB for e in extra]
    if 16384 in lengths:
        r, v = _row(results, "rkld", 16384), _row(results, "naive", 16384)
        if r and v and r["fits"]:
            naive_peak = v["peak_bytes"] if v["fits"] else v["predicted_bytes"]
            out["rkld / naive peak at 16k"] = r["peak_bytes"] / naive_peak
            out["naive at 16k"] = "measured" if v["fits"] else "predicted (does not fit)"
    if 4096 in lengths and 65536 in lengths:
        a, b = _row(results, "rkld", 4096), _row(results, "rkld", 65536)
        if a and b and a["fits"] and b["fits"]:
            out["rkld tokens/s 4k / 64k"] = a["tokens_per_s"] / b["tokens_per_s"]
    return out


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def _row_line(r: dict) -> str:
    predicted = _mib(r["predicted_bytes"])
    if not r["fits"]:
        return (f"| {r['seq_len']} | {r['path']} | does not fit | {predicted} | - | - | - |")
    error = "-" if r["predicted_bytes"] is None else \
        f"{100 * (r['predicted_bytes'] / r['peak_bytes'] - 1):+.0f} %"
    speed = "- | -" if r["seconds"] is None else \
        f"{r['tokens_per_s']:.0f} | {r['seconds']:.2f} ({r.get('timed_step')})"
    return (f"| {r['seq_len']} | {r['path']} | {_mib(r['peak_bytes'])} | {predicted} | {error} "
            f"| {speed} |")


def format_report(results: dict) -> str:
    lines = [f"tiny Llama {json.dumps(results['config'])}, one sequence, fp32, gradient "
             f"checkpointing, SDPA; {results['threads']} torch threads; budget "
             f"{results['budget_bytes'] / GIB:.1f} GiB; 1-minute load average "
             f"{results['load_average']:.1f}", "",
             "| tokens | path | peak MiB | planner MiB | planner error | tokens/s "
             "| step s (which step) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    lines += [_row_line(r) for r in results["rows"]]
    lines += ["", "targets (measured):"]
    lines += [f"- {k}: {json.dumps(v) if not isinstance(v, float) else f'{v:.3g}'}"
              for k, v in results["targets"].items()]
    lines += ["", "planner, Llama-2-7B, one sequence, bf16, one GPU, checkpointing (GiB):", "",
              "| tokens | tuning | naive | rkld, live teachers | rkld, teacher cache "
              "| naive loss buffers | rkld loss buffers |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results["planner_7b"]:
        lines.append(f"| {r['seq_len']} | {r['tuning']} | {r['naive']:.1f} | {r['rkld live']:.1f} "
                     f"| {r['rkld cache']:.1f} | {r['loss buffers, naive']:.1f} "
                     f"| {r['loss buffers, rkld']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--budget-gib", type=float, default=6.0,
                        help="cases the planner predicts above this are not run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--time-first-step-from", type=int, default=None,
                        help="at this many tokens and more, time the measured step itself "
                             "instead of a second one (halves the time of long cases; the "
                             "first step also pays first touches of new memory)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    results = run(args.lengths, int(args.budget_gib * GIB), args.threads,
                  log=lambda line: print(line, flush=True), paths=tuple(args.paths),
                  time_first_from=args.time_first_step_from)
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        sys.path.insert(0, str(_ROOT))
        print(json.dumps(_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                bool(int(sys.argv[5])))))
    else:
        sys.path.insert(0, str(_ROOT))
        sys.exit(main())
