"""``rkld demo``: the whole RKLD protocol end to end on a CPU, in a few minutes.

Steps (every model is a small Llama with a tokenizer trained on the benchmark's text):
1. finetune the target model on all data and the retain model on the retain split (both also
   learn the real-authors / world-facts questions, which stand in for the general knowledge a
   pretrained model brings along and which model utility measures);
2. evaluate the retain model: its forget-set truth ratios are the reference of forget quality;
3. strengthen the target on the forget set;
4. unlearn the forget set from the target with RKLD (reverse KL), the forward-KL ablation and
   gradient ascent, all with the same hyper-parameters, recording forget quality after every
   epoch;
5. evaluate every model and write ``results.json``, ``report.md`` and the plots.

The hyper-parameters below were tuned on the synthetic benchmark (data seed 0, model seed 0)
for RKLD; the two baselines run with the same ones, as in the paper. The retain model's seed is
the target's + RETAIN_SEED_OFFSET, so the reference does not share the target's initialisation
and example order. With 20 forget questions the demo is a quick look, not a measurement:
``rkld benchmark`` (rkld.benchmark) is the protocol for claims. See ``report.md`` of a run for
what it measured.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import metrics, plots
from .cli import command_line
from .config import FinetuneConfig, StrengthenConfig, UnlearnConfig
from .data import load_benchmark, retain_split_for
from .evaluate import (
    EpochEvaluator,
    EvalConfig,
    eval_command,
    eval_fingerprint,
    evaluate_model,
    model_fingerprint,
    with_reference,
    write_outputs,
)
from .models import load_model

MODELS = ("target", "retain", "rkld", "fkld", "ga")
DEMO_RECORD = "demo.json"
# The unlearning runs: (name, UnlearnConfig overrides).
UNLEARNING = (("rkld", {"method": "rkld", "direction": "reverse"}),
              ("fkld", {"method": "rkld", "direction": "forward"}),
              ("ga", {"method": "ga"}))
# Extra splits every model trains on, so that real-authors / world-facts utility is measurable.
GENERAL_KNOWLEDGE = "real_authors,world_facts"
FOLDER_MAX_AUTHORS = 10
RETAIN_SEED_OFFSET = 1000   # the retain model's seed is the target's + this


@dataclass
class DemoConfig:
    out: str = "rkld_demo"
    data: str = "synthetic"
    seed: int = 0                       # model seed: initialisation and example order
    data_seed: int = 0                  # which synthetic benchmark
    max_authors: int | None = None      # None: all synthetic authors, or FOLDER_MAX_AUTHORS
    forget: str = "forget10"
    threads: int = 1
    progress: bool = True
    # the tiny Llama (LlamaConfig fields, and the tokenizer's vocabulary size)
    tiny: dict = field(default_factory=lambda: {"hidden_size": 128, "num_hidden_layers": 2,
                                                "intermediate_size": 344, "vocab_size": 1024})
    max_length: int = 256
    # target and retain models: memorise their data (forget-set probability ~0.99)
    finetune_epochs: int = 30
    finetune_lr: float = 3e-3
    finetune_batch_size: int = 32
    # strengthened model
    strengthen_epochs: int = 10
    strengthen_lr: float = 3e-3
    # unlearning (shared by RKLD, forward KL and gradient ascent)
    unlearn_epochs: int = 6
    unlearn_lr: float = 4e-4
    unlearn_batch_size: int = 4
    alpha: float = 24.0
    # evaluation
    max_new_tokens: int = 200
    eval_every_epoch: bool = True       # forget quality after each unlearning epoch (no ROUGE)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; return ``results`` (also written to ``OUT/results.json``)."""
    started = time.time()
    check_threads(cfg.threads)
    out = _prepare_output(Path(cfg.out), create=False)
    max_authors = cfg.max_authors
    if max_authors is None and cfg.data != "synthetic":
        max_authors = FOLDER_MAX_AUTHORS
    benchmark = load_benchmark(cfg.data, seed=cfg.data_seed, max_authors=max_authors)
    out.mkdir(parents=True, exist_ok=True)      # only once nothing refuses the demo
    retain_split = retain_split_for(cfg.forget)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    from transformers.utils import logging as hf_logging
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # per-file load / save bars would bury the demo's output
    try:
        record = {"config": asdict(cfg), "benchmark": benchmark.name, "max_authors": max_authors,
                  "stages": {}}
        _write_json(out / DEMO_RECORD, record)
        common = {"data": cfg.data, "seed": cfg.seed, "data_seed": cfg.data_seed,
                  "max_authors": max_authors,
                  "max_length": cfg.max_length, "progress": cfg.progress, "overwrite": True}
        models = out / "models"
        losses: dict = {}
        wall: dict = {}

        def stage(name, function, config, **callbacks):
            print(f"[demo] {name}: {function.__name__} -> {config.out}", flush=True)
            step_losses = losses.setdefault(name, [])
            start = time.time()
            function(config, on_step=lambda step, rec: step_losses.append(rec["loss"]), **callbacks)
            evaluating = callbacks["on_epoch_end"].seconds if callbacks else 0.0
            wall[name] = time.time() - start - evaluating
            record["stages"][name] = {"seconds": wall[name], "out": config.out,
                                      "command": command_line(function.__name__,
                                                              config.to_dict())}
            _write_json(out / DEMO_RECORD, record)

        nll = {"epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr,
               "batch_size": cfg.finetune_batch_size, "micro_batch_size": cfg.finetune_batch_size}
        from .train import finetune, strengthen, unlearn
        stage("target", finetune, FinetuneConfig(
            model="tiny", tiny=dict(cfg.tiny), out=str(models / "target"),
            split=f"full,{GENERAL_KNOWLEDGE}", **nll, **common))
        # The reference model's seed is apart from the target's (initialisation and order).
        stage("retain", finetune, FinetuneConfig(
            model="tiny", tiny=dict(cfg.tiny), out=str(models / "retain"),
            split=f"{retain_split},{GENERAL_KNOWLEDGE}", **nll,
            **{**common, "seed": cfg.seed + RETAIN_SEED_OFFSET}))

        eval_config = EvalConfig(forget_split=cfg.forget, max_new_tokens=cfg.max_new_tokens,
                                 max_length=cfg.max_length, progress=cfg.progress)
        logs = {"retain": _evaluate(models / "retain", benchmark, eval_config, None)}
        reference = metrics.forget_truth_ratios(logs["retain"], "retain model").tolist()

        stage("strengthened", strengthen, StrengthenConfig(
            model=str(models / "target"), out=str(models / "strengthened"), forget=cfg.forget,
            **{**nll, "epochs": cfg.strengthen_epochs, "lr": cfg.strengthen_lr}, **common))
        curves = {}
        for name, overrides in UNLEARNING:
            callbacks = {}
            if cfg.eval_every_epoch:
                curves[name] = EpochEvaluator(
                    models / name, benchmark,
                    EvalConfig(forget_split=cfg.forget, generation=False,
                               max_length=cfg.max_length, progress=False),
                    reference, keep_peak=False)
                callbacks["on_epoch_end"] = curves[name]
            stage(name, unlearn, UnlearnConfig(
                model=str(models / "target"), strengthened=str(models / "strengthened"),
                out=str(models / name), forget=cfg.forget, alpha=cfg.alpha,
                epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr,
                batch_size=cfg.unlearn_batch_size, micro_batch_size=cfg.unlearn_batch_size,
                **overrides, **common), **callbacks)

        for name in ("target", "rkld", "fkld", "ga"):
            logs[name] = _evaluate(models / name, benchmark, eval_config, reference)
        results = {}
        for name in MODELS:
            logs[name] = with_reference(logs[name], reference)
            record["stages"].setdefault(name, {})["eval_command"] = eval_command(
                models / name, cfg.data, out / "eval" / name, eval_config,
                None if name == "retain" else out / "eval" / "retain" / "TOFU_EVAL.json",
                cfg.seed, max_authors)
            summary = write_outputs(
                out / "eval" / name, logs[name], reference_logs=logs["retain"], title=name,
                meta={"fingerprint": eval_fingerprint(model_fingerprint(str(models / name)),
                                                      benchmark, eval_config),
                      "model_path": str(models / name), "data": cfg.data,
                      "command": record["stages"][name]["eval_command"],
                      "reference": str(out / "eval" / "retain" / "TOFU_EVAL.json")})
            results[name] = {
                "forget_quality": summary["forget_quality"],
                "model_utility": summary["model_utility"],
                "forget_Q_A_ROUGE": summary["forget_Q_A_ROUGE"],
                "forget_Q_A_Prob": summary["forget_Q_A_Prob"],
                "forget_truth_ratio": summary["forget_truth_ratio"],
                "train_seconds": wall[name],
                "model": str(models / name), "eval": str(out / "eval" / name)}
        _write_json(out / "results.json", results)

        _plots(out, results, logs, losses, curves)
        total = time.time() - started
        checks = _target_checks(results)
        record.update(total_seconds=total, checks=checks)
        _write_json(out / DEMO_RECORD, record)
        table = format_table(results)
        (out / "report.md").write_text(_report(cfg, record, table, curves, wall,
                                                    benchmark))
        print(table)
        print(f"[demo] total wall time {total:.0f} s; outputs in {out}")
        for line in checks:
            print(f"[demo] {line}")
        return results
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


def check_threads(threads) -> None:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be a positive integer; got {threads!r}")


def _prepare_output(out: Path, create: bool = True) -> Path:
    """Refuse a non-empty folder that is not an earlier demo's; an earlier demo is replaced.
    With ``create=False`` the caller creates the folder once its other checks passed."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; expected a folder")
    if out.exists() and any(out.iterdir()) and not (out / DEMO_RECORD).exists():
        raise FileExistsError(f"--out {out} is not empty and holds no earlier demo "
                              f"({DEMO_RECORD}); choose a new or empty folder")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def _evaluate(model_dir: Path, benchmark, config: EvalConfig, reference) -> dict:
    print(f"[demo] evaluating {model_dir.name}", flush=True)
    model, tokenizer = load_model(model_dir)
    return evaluate_model(model, tokenizer, benchmark, config, reference)


def _write_json(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def _seconds(value) -> str:
    """A duration for the report: whole seconds from 10 s on, else one decimal (a stage of a
    few hundred milliseconds read "0 s")."""
    if value is None:
        return "n/a"
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def format_table(results: dict) -> str:
    """The demo's table in Markdown: one row per model."""
    lines = ["| model | forget quality | model utility | forget ROUGE-L | forget probability "
             "| train wall time |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {_fmt(r['forget_quality'])} | {_fmt(r['model_utility'])} | "
                     f"{_fmt(r['forget_Q_A_ROUGE'])} | {_fmt(r['forget_Q_A_Prob'])} | "
                     f"{_seconds(r['train_seconds'])} |")
    return "\n".join(lines)


def _target_checks(results: dict) -> list:
    """The demo's acceptance targets, stated with the measured numbers."""
    rkld, target = results["rkld"], results["target"]
    ratio = rkld["model_utility"] / target["model_utility"] if target["model_utility"] else 0.0
    beaten = [name for name in ("fkld", "ga")
              if rkld["forget_quality"] > results[name]["forget_quality"]]
    return [
        f"RKLD forget quality {_fmt(rkld['forget_quality'])} "
        f"{'>' if rkld['forget_quality'] > 0.05 else '<='} 0.05",
        f"RKLD model utility {_fmt(rkld['model_utility'])} = {ratio:.2f} x the target's "
        f"({'>=' if ratio >= 0.9 else '<'} 0.9)",
        f"RKLD has a higher forget quality than: {', '.join(beaten) if beaten else 'neither'} "
        f"(fkld {_fmt(results['fkld']['forget_quality'])}, ga "
        f"{_fmt(results['ga']['forget_quality'])})",
    ]


def _plots(out: Path, results: dict, logs: dict, losses: dict, curves: dict) -> None:
    plots.forget_quality_vs_utility(
        {name: results[name] for name in MODELS}, out / "fq_vs_mu.png",
        title="Forget quality vs model utility (demo)")
    plots.truth_ratio_panels(
        {name: metrics.forget_truth_ratios(logs[name], name).tolist() for name in MODELS},
        "retain", out / "truth_ratios.png")
    plots.training_curves({name: losses[name] for name in ("target", "retain", "strengthened")},
                          out / "training_curves.png", title="Finetuning and strengthening",
                          ylabel="NLL per answer token")
    plots.training_curves({name: losses[name] for name, _ in UNLEARNING},
                          out / "unlearning_loss.png", title="Unlearning losses (per step)",
                          ylabel="loss (KL to the teacher; GA: -NLL)")
    if curves:
        plots.forget_quality_per_epoch(
            {name: ([p["epoch"] for p in c.curve], [p["forget_quality"] for p in c.curve])
             for name, c in curves.items()}, out / "unlearning_fq.png")


def _report(cfg: DemoConfig, record: dict, table: str, curves: dict, wall: dict,
            benchmark) -> str:
    lines = ["# rkld demo", "",
             f"Benchmark `{record['benchmark']}` (data seed {cfg.data_seed}), forget split "
             f"`{cfg.forget}` ({len(benchmark.split(cfg.forget + '_perturbed'))} questions: "
             f"a quick demo, whose forget quality takes few distinct values; `rkld benchmark` "
             f"measures claims), model seed {cfg.seed} (retain model "
             f"{cfg.seed + RETAIN_SEED_OFFSET}); "
             f"a Llama with {cfg.tiny} trained from scratch. Forget quality is the KS-test "
             f"p-value between the forget-set truth ratios of a model and of the retain model; "
             f"model utility the harmonic mean of nine retain / real-authors / world-facts "
             f"metrics (TOFU's definitions).", "",
             table, "",
             f"Total wall time {record['total_seconds']:.0f} s "
             f"(strengthening {_seconds(wall.get('strengthened'))} is shared by rkld and fkld; "
             f"train wall time excludes evaluation).",
             "", "Targets:", ""]
    lines += [f"- {line}" for line in record["checks"]]
    lines += ["", "Hyper-parameters: finetuning {e} epochs at lr {lr}, strengthening {se} epochs "
              "at lr {slr}; unlearning (all three methods) {ue} epochs at lr {ulr}, batch {ub}, "
              "alpha {a}.".format(e=cfg.finetune_epochs, lr=cfg.finetune_lr,
                                  se=cfg.strengthen_epochs, slr=cfg.strengthen_lr,
                                  ue=cfg.unlearn_epochs, ulr=cfg.unlearn_lr,
                                  ub=cfg.unlearn_batch_size, a=cfg.alpha), ""]
    lines += ["Commands that rebuild each model and its evaluation (the demo runs the same "
              "code; the unlearning runs also evaluated forget quality after every epoch, which "
              "does not change their training):", "", "```"]
    for name in ("target", "retain", "strengthened", "rkld", "fkld", "ga"):
        stage = record["stages"].get(name, {})
        lines += [stage[key] for key in ("command", "eval_command") if stage.get(key)]
    lines += ["```", ""]
    if curves:
        lines += ["Forget quality after each unlearning epoch:", "",
                  "| epoch | " + " | ".join(curves) + " |",
                  "|---|" + "---|" * len(curves)]
        for i, point in enumerate(next(iter(curves.values())).curve):
            row = [_fmt(c.curve[i]["forget_quality"]) for c in curves.values()]
            lines.append(f"| {point['epoch']} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["![forget quality vs model utility](fq_vs_mu.png)", "",
              "![forget-set truth ratios](truth_ratios.png)", "",
              "![forget quality per epoch](unlearning_fq.png)", "",
              "![training curves](training_curves.png)", "",
              "![unlearning losses](unlearning_loss.png)", "",
              "Per-model logs (open-unlearning's TOFU_EVAL.json schema) are in `eval/<model>/`; "
              "the models in `models/<model>/`.", ""]
    return "\n".join(lines)
