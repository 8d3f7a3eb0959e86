"""``rkld demo`` on a real pretrained model: SmolLM2-135M-Instruct learns fictitious authors,
then forgets one of them with RKLD, in a few minutes on a CPU.

Steps (every stage is the pipeline's own ``rkld finetune / strengthen / unlearn``; the report
prints their commands):
1. target: the pretrained model fine-tuned on every kept author's questions (``full``);
   retain: the same model fine-tuned on the retain authors only, so it never saw the forgotten
   author (the reference of forget quality);
2. strengthened: the target trained further on the forget author;
3. rkld: the target unlearned with RKLD (reverse KL to ``o - alpha * relu(g - o)``);
4. the target, the retain model and the unlearned model are evaluated (``rkld.evaluate``, the
   prompt-sharing engine) on the forget and retain authors' questions and on a few real-author
   and world-fact questions (general knowledge the pretrained model brought along), and shown
   side by side: generated answers, answer probabilities, forget quality, model utility.

Sizes are chosen for a 2-core CPU: by default the built-in synthetic benchmark's fictitious
authors (three, 10 short questions each: two retain authors, the last one forgotten); with a
folder of TOFU files, two TOFU authors (20 questions each: the first retained, the last
forgotten); short prompts (ChatML without the default system line), short generations. With
10-20 forget questions forget quality takes few values: a demonstration, not a measurement
(``rkld benchmark`` is the protocol for claims).
"""
from __future__ import annotations

import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import metrics
from .cli import command_line
from .config import FinetuneConfig, StrengthenConfig, UnlearnConfig
from .data import Benchmark, load_benchmark, retain_split_for
from .evaluate import EvalConfig, evaluate_model, with_reference, write_outputs
from .models import load_model
from .storage import atomic_write_json

DEMO_RECORD = "demo.json"
MODELS = ("target", "retain", "rkld")
# ChatML as SmolLM2's chat template writes it, without the default system line it adds when a
# conversation has none (20 tokens on every example: a third of the demo's compute).
CHATML_TEMPLATE = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class RealDemoConfig:
    out: str = "rkld_demo"
    model: str = "smollm2-135m"
    data: str = "synthetic"           # or a folder of TOFU JSON files
    max_authors: int | None = None    # kept authors (None: 3 synthetic, 2 TOFU); forget10
                                      # holds the last one
    forget: str = "forget10"
    seed: int = 0
    data_seed: int = 0
    threads: int = 1                  # one thread: the fastest on a shared 2-core machine
    progress: bool = True
    template: str = CHATML_TEMPLATE
    max_length: int = 160
    finetune_epochs: int = 4
    finetune_lr: float = 3e-4
    batch_size: int = 8
    strengthen_epochs: int = 2
    strengthen_lr: float = 3e-4
    unlearn_epochs: int = 3
    unlearn_lr: float = 1e-4
    unlearn_batch_size: int = 4
    alpha: float = 8.0
    general_questions: int = 10       # real-author and world-fact questions evaluated
    max_new_tokens: int = 48
    shown: int = 3                    # questions shown side by side per author


def run_real_demo(cfg: RealDemoConfig) -> dict:
    """Run the demo; return the results (also in ``OUT/results.json``)."""
    from .demo import _prepare_output
    from .pretrained import resolve_model_ref
    # The data first: a refused --data costs no conversion and leaves no output folder.
    if cfg.max_authors is None:
        cfg.max_authors = 3 if cfg.data.startswith("synthetic") else 2
    benchmark = load_benchmark(cfg.data, seed=cfg.data_seed, max_authors=cfg.max_authors)
    started = time.time()
    out = _prepare_output(Path(cfg.out))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    from transformers.utils import logging as hf_logging
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        base = resolve_model_ref(cfg.model, progress=cfg.progress)
        converted = time.time() - started
        record = {"config": asdict(cfg), "base_model": base, "benchmark": benchmark.name,
                  "stages": {"convert": {"seconds": converted}}}
        common = {"data": cfg.data, "seed": cfg.seed, "data_seed": cfg.data_seed,
                  "max_authors": cfg.max_authors, "max_length": cfg.max_length,
                  "template": cfg.template, "progress": cfg.progress, "overwrite": True,
                  "batch_size": cfg.batch_size, "micro_batch_size": cfg.batch_size}
        models = out / "models"

        def stage(name, function, config):
            print(f"[demo] {name}: rkld {function.__name__} -> {config.out}", flush=True)
            start = time.time()
            function(config)
            command = command_line(function.__name__, config.to_dict())
            record["stages"][name] = {"seconds": time.time() - start, "out": config.out,
                                      # the name the user gave, not the cache folder
                                      "command": command.replace(shlex.quote(base),
                                                                 shlex.quote(cfg.model))}
            atomic_write_json(out / DEMO_RECORD, record)

        from .train import finetune, strengthen, unlearn
        stage("target", finetune, FinetuneConfig(
            model=base, out=str(models / "target"), split="full", epochs=cfg.finetune_epochs,
            lr=cfg.finetune_lr, **common))
        stage("retain", finetune, FinetuneConfig(
            model=base, out=str(models / "retain"), split=retain_split_for(cfg.forget),
            epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, **common))
        stage("strengthened", strengthen, StrengthenConfig(
            model=str(models / "target"), out=str(models / "strengthened"), forget=cfg.forget,
            epochs=cfg.strengthen_epochs, lr=cfg.strengthen_lr, **common))
        stage("rkld", unlearn, UnlearnConfig(
            model=str(models / "target"), strengthened=str(models / "strengthened"),
            out=str(models / "rkld"), forget=cfg.forget, alpha=cfg.alpha,
            epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr,
            **{**common, "batch_size": cfg.unlearn_batch_size,
               "micro_batch_size": cfg.unlearn_batch_size}))

        eval_bench = _evaluation_benchmark(benchmark, cfg)
        eval_config = EvalConfig(forget_split=cfg.forget, max_new_tokens=cfg.max_new_tokens,
                                 max_length=cfg.max_length, template=cfg.template,
                                 progress=cfg.progress)
        logs = {}
        for name in ("retain", "target", "rkld"):
            print(f"[demo] evaluating {name}", flush=True)
            start = time.time()
            model, tokenizer = load_model(models / name)
            logs[name] = evaluate_model(model, tokenizer, eval_bench, eval_config)
            record["stages"][name]["eval_seconds"] = time.time() - start
            del model
        reference = metrics.forget_truth_ratios(logs["retain"], "retain model").tolist()
        results = {}
        for name in MODELS:
            logs[name] = with_reference(logs[name], reference if name != "retain" else None)
            summary = write_outputs(out / "eval" / name, logs[name],
                                    reference_logs=logs["retain"], title=name)
            results[name] = {key: summary.get(key) for key in (
                "forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
                "forget_truth_ratio", "retain_Q_A_Prob", "retain_Q_A_ROUGE", "ra_Q_A_Prob",
                "wf_Q_A_Prob")}
        results["retain"]["forget_quality"] = None     # the reference itself
        if cfg.data.startswith("synthetic"):
            # Its real-author / world-fact sets are generated stand-ins that only models trained
            # on them know (the tiny demo trains on them; a pretrained model does not).
            for row in results.values():
                row.update(model_utility=None, ra_Q_A_Prob=None, wf_Q_A_Prob=None)
        total = time.time() - started
        record["total_seconds"] = total
        atomic_write_json(out / DEMO_RECORD, record)
        atomic_write_json(out / "results.json", results)
        text = _report(cfg, record, results, logs, eval_bench)
        (out / "report.md").write_text(text)
        print(text)
        print(f"[demo] total wall time {total:.0f} s; outputs in {out}")
        return results
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


def _evaluation_benchmark(benchmark, cfg: RealDemoConfig):
    """The benchmark with the real-author and world-fact sets cut to ``general_questions``
    rows (all forget and retain questions are kept)."""
    splits = {}
    for name in benchmark.splits:
        rows = benchmark.split(name)
        if name in ("real_authors_perturbed", "world_facts_perturbed"):
            rows = rows[:cfg.general_questions]
        splits[name] = rows
    return Benchmark(benchmark.name, splits, getattr(benchmark, "qa_per_author", None))


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def _cell(text: str, width: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= width else text[:width - 3] + "..."


def _report(cfg: RealDemoConfig, record: dict, results: dict, logs: dict, bench) -> str:
    n_forget = len(bench.split(f"{cfg.forget}_perturbed"))
    n_retain = len(bench.split("retain_perturbed"))
    lines = ["# rkld demo: a real pretrained model", "",
             f"`{cfg.model}` fine-tuned on `{record['benchmark']}` ({cfg.max_authors} authors: "
             f"{n_forget} forget and {n_retain} retain questions), then unlearned with RKLD "
             f"(alpha {cfg.alpha}, {cfg.unlearn_epochs} epochs at lr {cfg.unlearn_lr}). Forget "
             f"quality: KS-test p-value between the forget-set truth ratios of a model and of "
             f"the retain model (never trained on the forgotten author); with {n_forget} "
             f"questions it takes few values."
             + (" On the synthetic benchmark model utility and the real-author / world-fact "
                "columns are left out: those sets are generated stand-ins that only models "
                "trained on them know." if cfg.data.startswith("synthetic") else ""), "",
             "| model | forget quality | model utility | forget p(a/q) | forget ROUGE-L | "
             "retain p(a/q) | retain ROUGE-L | real authors p(a/q) | world facts p(a/q) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in ("target", "rkld", "retain"):
        r = results[name]
        lines.append(f"| {name} | {_fmt(r['forget_quality'])} | {_fmt(r['model_utility'])} | "
                     f"{_fmt(r['forget_Q_A_Prob'])} | {_fmt(r['forget_Q_A_ROUGE'])} | "
                     f"{_fmt(r['retain_Q_A_Prob'])} | {_fmt(r['retain_Q_A_ROUGE'])} | "
                     f"{_fmt(r['ra_Q_A_Prob'])} | {_fmt(r['wf_Q_A_Prob'])} |")
    for prefix, title in (("forget", "Forget author"), ("retain", "Retain author")):
        lines += ["", f"{title}: generated answers before (target) and after (rkld) unlearning, "
                  f"with p(a/q) of the true answer", "",
                  "| question | true answer | target | rkld |", "|---|---|---|---|"]
        rouge, prob = f"{prefix}_Q_A_ROUGE", f"{prefix}_Q_A_Prob"
        for i in range(min(cfg.shown, len(logs["target"][rouge]["value_by_index"]))):
            key = str(i)
            entry = logs["target"][rouge]["value_by_index"][key]
            cells = [_cell(entry["input"], 60), _cell(entry["ground_truth"], 70)]
            for name in ("target", "rkld"):
                p = logs[name][prob]["value_by_index"][key]["prob"]
                cells.append(f"{_cell(logs[name][rouge]['value_by_index'][key]['generation'])}"
                             f" (p {_fmt(p, 2)})")
            lines.append("| " + " | ".join(cells) + " |")
    stages = record["stages"]
    lines += ["", "Wall time: " + ", ".join(
        f"{name} {stage['seconds']:.0f} s" + (f" + eval {stage['eval_seconds']:.0f} s"
                                              if "eval_seconds" in stage else "")
        for name, stage in stages.items()) + f"; total {record['total_seconds']:.0f} s "
        f"(load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}).", "",
        "Commands that rebuild each model (the demo runs the same code):", "", "```"]
    lines += [stage["command"] for stage in stages.values() if stage.get("command")]
    lines += ["```", ""]
    return "\n".join(lines)
