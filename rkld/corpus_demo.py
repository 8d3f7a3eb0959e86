"""``rkld demo --corpus``: corpus unlearning end to end on a CPU (the paper's book setting).

Steps (every model a small Llama with a tokenizer trained on the corpus):
1. write a corpus of fictitious books (``rkld.books``: forget, retain and held-out books) to
   ``OUT/books.jsonl``, or use the ``.txt`` / ``.jsonl`` corpus given as ``data``;
2. finetune the target model on the forget and retain books, and a retain model on the retain
   books only (the model that never read the forget book: what unlearning aims at);
3. strengthen the target on the forget book;
4. unlearn the forget book from the target with RKLD (reverse KL) and the forward-KL ablation,
   same hyper-parameters;
5. evaluate every model with ``rkld.corpus_eval`` (continuation ROUGE-L and BLEU on forget and
   retain passages, perplexity on forget, retain and held-out text) and write
   ``results.json``, ``report.md`` and the per-model logs in ``eval/<model>/``.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .books import write_books
from .config import FinetuneConfig, StrengthenConfig, UnlearnConfig
from .corpus_eval import CorpusEvalConfig, corpus_fingerprint, evaluate_corpus, write_outputs
from .data import load_benchmark
from .demo import _prepare_output, check_threads
from .models import load_model, model_fingerprint

MODELS = ("target", "retain", "rkld", "fkld")
DEMO_RECORD = "demo.json"


@dataclass
class CorpusDemoConfig:
    out: str = "rkld_corpus_demo"
    data: str | None = None             # None: generated books; else a .txt / .jsonl corpus
    seed: int = 0                       # model seed: initialisation and example order
    data_seed: int = 0                  # which books are generated
    threads: int = 1
    progress: bool = True
    books: dict = field(default_factory=lambda: {"n_forget": 1, "n_retain": 2, "n_holdout": 1,
                                                 "min_words": 600, "max_words": 800})
    tiny: dict = field(default_factory=lambda: {"hidden_size": 128, "num_hidden_layers": 2,
                                                "intermediate_size": 344, "vocab_size": 1024})
    max_length: int = 256
    # target and retain models memorise their books (forget perplexity ~1.6 after 40 epochs)
    finetune_epochs: int = 30
    finetune_lr: float = 3e-3
    batch_size: int = 8
    strengthen_epochs: int = 6
    strengthen_lr: float = 3e-3
    unlearn_epochs: int = 4
    # chosen on seed 0 among alpha 8 / 24 and lr 1e-4 / 2e-4 (forget vs retain perplexity)
    unlearn_lr: float = 2e-4
    unlearn_batch_size: int = 4
    alpha: float = 8.0
    eval: dict = field(default_factory=lambda: {"prefix_tokens": 100, "continuation_tokens": 100,
                                                "passages": 10, "perplexity_tokens": 256,
                                                "perplexity_windows": 10})


def run_corpus_demo(cfg: CorpusDemoConfig) -> dict:
    """Run the corpus demo; return ``results`` (also in ``OUT/results.json``)."""
    started = time.time()
    check_threads(cfg.threads)
    created = not Path(cfg.out).exists()
    out = _prepare_output(Path(cfg.out))
    try:
        data = cfg.data or str(write_books(out / "books.jsonl", seed=cfg.data_seed, **cfg.books))
        benchmark = load_benchmark(data, seed=cfg.data_seed)
        if "retain" not in benchmark.splits:
            raise ValueError(f"{data}: the corpus demo needs retain documents too (.jsonl lines "
                             f"with \"split\": \"retain\") to train the retain model")
    except BaseException:
        if created:     # a refused demo leaves no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    from transformers.utils import logging as hf_logging
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        from .train import finetune, strengthen, unlearn
        record = {"config": asdict(cfg), "data": data, "stages": {}}
        common = {"data": data, "seed": cfg.seed, "data_seed": cfg.data_seed, "max_length": cfg.max_length,
                  "progress": cfg.progress, "overwrite": True}
        models = out / "models"
        wall = {}

        def stage(name, function, config):
            print(f"[demo] {name}: {function.__name__} -> {config.out}", flush=True)
            start = time.time()
            function(config)
            wall[name] = time.time() - start
            record["stages"][name] = {"seconds": wall[name], "out": config.out}

        nll = {"lr": cfg.finetune_lr, "batch_size": cfg.batch_size,
               "micro_batch_size": cfg.batch_size}
        stage("target", finetune, FinetuneConfig(model="tiny", tiny=dict(cfg.tiny), split="full",
                                                 out=str(models / "target"),
                                                 epochs=cfg.finetune_epochs, **nll, **common))
        stage("retain", finetune, FinetuneConfig(model="tiny", tiny=dict(cfg.tiny),
                                                 split="retain", out=str(models / "retain"),
                                                 epochs=cfg.finetune_epochs, **nll, **common))
        stage("strengthened", strengthen, StrengthenConfig(
            model=str(models / "target"), out=str(models / "strengthened"), forget="forget",
            epochs=cfg.strengthen_epochs, **{**nll, "lr": cfg.strengthen_lr}, **common))
        for name, direction in (("rkld", "reverse"), ("fkld", "forward")):
            stage(name, unlearn, UnlearnConfig(
                model=str(models / "target"), strengthened=str(models / "strengthened"),
                out=str(models / name), forget="forget", alpha=cfg.alpha, direction=direction,
                epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr, batch_size=cfg.unlearn_batch_size,
                micro_batch_size=cfg.unlearn_batch_size, **common))
        eval_config = CorpusEvalConfig(**cfg.eval, progress=cfg.progress)
        results = {}
        for name in MODELS:
            print(f"[demo] evaluating {name}", flush=True)
            start = time.time()
            model, tokenizer = load_model(models / name)
            logs = evaluate_corpus(model, tokenizer, benchmark, eval_config)
            meta = {"fingerprint": corpus_fingerprint(model_fingerprint(str(models / name)),
                                                      benchmark, eval_config),
                    "model_path": str(models / name), "data": data,
                    "wall_seconds": time.time() - start}
            summary = write_outputs(out / "eval" / name, logs, meta, title=name)
            results[name] = {**summary, "train_seconds": wall[name],
                             "eval": str(out / "eval" / name)}
        _write_json(out / "results.json", results)
        record["total_seconds"] = time.time() - started
        _write_json(out / DEMO_RECORD, record)
        table = format_table(results)
        (out / "report.md").write_text(_report(cfg, record, table))
        print(table)
        print(f"[demo] total wall time {record['total_seconds']:.0f} s; outputs in {out}")
        return results
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


def _write_json(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def _fmt(value) -> str:
    return "n/a" if value is None else (f"{value:.3f}" if value < 100 else f"{value:.0f}")


COLUMNS = (("forget_ROUGE-L", "forget ROUGE-L"), ("forget_BLEU", "forget BLEU"),
           ("retain_ROUGE-L", "retain ROUGE-L"), ("retain_BLEU", "retain BLEU"),
           ("forget_perplexity", "forget ppl"), ("retain_perplexity", "retain ppl"),
           ("holdout_perplexity", "held-out ppl"))
DESCRIPTIONS = {"target": "target (read every book)", "retain": "retain (never read the forget "
                "book)", "rkld": "**rkld** (reverse KL)", "fkld": "fkld (forward-KL ablation)"}


def format_table(results: dict) -> str:
    lines = ["| model | " + " | ".join(title for _, title in COLUMNS) + " | train wall time |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    for name, r in results.items():
        cells = [_fmt(r.get(key)) for key, _ in COLUMNS]
        lines.append(f"| {DESCRIPTIONS.get(name, name)} | " + " | ".join(cells)
                     + f" | {r['train_seconds']:.0f} s |")
    return "\n".join(lines)


def _report(cfg: CorpusDemoConfig, record: dict, table: str) -> str:
    e = cfg.eval
    return "\n".join([
        "# rkld corpus demo", "",
        f"Corpus `{record['data']}`, data seed {cfg.data_seed}, model seed {cfg.seed}; "
        f"a Llama with {cfg.tiny} trained from "
        f"scratch. Continuations: {e['prefix_tokens']}-token prefixes of {e['passages']} "
        f"passages per split, {e['continuation_tokens']} greedy tokens scored against the true "
        f"text (ROUGE-L recall, sentence BLEU); perplexity on {e['perplexity_tokens']}-token "
        f"windows.", "", table, "",
        f"Total wall time {record['total_seconds']:.0f} s. Hyper-parameters: finetuning "
        f"{cfg.finetune_epochs} epochs at lr {cfg.finetune_lr}, strengthening "
        f"{cfg.strengthen_epochs} epochs at lr {cfg.strengthen_lr}; unlearning {cfg.unlearn_epochs} "
        f"epochs at lr {cfg.unlearn_lr}, batch {cfg.unlearn_batch_size}, alpha {cfg.alpha}.", "",
        "Per-model logs, reports and plots are in `eval/<model>/`; the models in "
        "`models/<model>/`.", ""])
