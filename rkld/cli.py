"""The ``rkld`` command line (also ``python -m rkld``; ``accelerate launch -m rkld ...`` or
``torchrun -m rkld ...`` for several processes).

Each subcommand has one ``register_<name>(subparsers)`` function that adds its parser and sets
``handler`` to a function of the parsed arguments returning an exit code; ``build_parser``
calls them all. Adding a subcommand is one register function and one line in ``build_parser``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .config import (
    DIRECTIONS,
    METHODS,
    PARALLEL,
    RETAIN_TERMS,
    FinetuneConfig,
    StrengthenConfig,
    UnlearnConfig,
)

# Errors a user can act on: printed as one line, without a traceback (exit code 2). A run
# stopped by a non-finite loss or gradient (rkld.train.TrainingDiverged) exits with 1.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError, OSError)


def _default(config_class, name):
    for field in dataclasses.fields(config_class):
        if field.name == name:
            return field.default
    raise KeyError(name)


def _add_common(parser: argparse.ArgumentParser, config_class) -> None:
    """Options every training stage shares (RunConfig's fields), defaults from the dataclass."""
    d = lambda name: _default(config_class, name)  # noqa: E731
    g = parser.add_argument_group("data and model")
    g.add_argument("--model", required=True,
                   help="Hugging Face model folder or hub name; 'tiny' builds a small Llama with "
                        "a tokenizer trained on the data (finetune/strengthen only)")
    g.add_argument("--data", default=d("data"),
                   help="'synthetic', 'tofu' (hub), a folder of TOFU JSON files, or a .txt/.jsonl "
                        "corpus (default: %(default)s)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--seed", type=int, default=d("seed"))
    g.add_argument("--max-authors", type=int, default=None,
                   help="keep this many authors (TOFU layout), e.g. to fit TOFU on a CPU")
    g.add_argument("--max-length", type=int, default=d("max_length"), help="tokens per example")
    g.add_argument("--template", default=d("template"),
                   help="prompt format: auto (chat template if any, else plain), chat, llama2, "
                        "phi, plain, or a string with {question}")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="load the model in this dtype (default: as saved)")
    g.add_argument("--tiny-vocab", type=int, default=None, help="--model tiny: vocabulary size")
    g.add_argument("--tiny-hidden", type=int, default=None, help="--model tiny: hidden size")
    g.add_argument("--tiny-layers", type=int, default=None, help="--model tiny: layers")
    t = parser.add_argument_group("optimisation")
    t.add_argument("--epochs", type=int, default=d("epochs"), help="(default: %(default)s)")
    t.add_argument("--lr", type=float, default=d("lr"), help="peak learning rate "
                   "(default: %(default)s; tiny models want ~1e-3)")
    t.add_argument("--weight-decay", type=float, default=d("weight_decay"))
    t.add_argument("--warmup-epochs", type=float, default=d("warmup_epochs"))
    t.add_argument("--max-grad-norm", type=float, default=d("max_grad_norm"),
                   help="gradient clipping (0: off)")
    t.add_argument("--batch-size", type=int, default=d("batch_size"),
                   help="effective batch: examples per optimizer step over all processes")
    t.add_argument("--micro-batch-size", type=int, default=d("micro_batch_size"),
                   help="examples per forward pass on one process (gradient accumulation "
                        "makes up the rest)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--pack", action="store_true",
                   help="pack whole examples into sequences of --max-length tokens; packed "
                        "documents restart their positions and never attend to each other")
    t.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of "
                   "all weights; the saved model has them merged")
    t.add_argument("--lora-rank", type=int, default=d("lora_rank"))
    t.add_argument("--lora-alpha", type=float, default=d("lora_alpha"))
    r = parser.add_argument_group("run control")
    r.add_argument("--save-every", type=int, default=d("save_every"),
                   help="checkpoint every N optimizer steps (always at epoch ends)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (refused if a "
                        "setting or input that shapes the result changed)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (the old run is kept in "
                        "OUT/.replaced until the new one has finished)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--parallel", default=d("parallel"), choices=PARALLEL,
                   help="several processes: ddp, fsdp (FSDP2) or zero3 (DeepSpeed ZeRO-3); auto "
                        "reads accelerate's environment (default: %(default)s)")


def _config(config_class, args, **extra):
    """Fill a config dataclass from parsed arguments (names with '-' become '_')."""
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {k: v for k, v in vars(args).items() if k in names}
    tiny = {"vocab_size": args.tiny_vocab, "hidden_size": args.tiny_hidden,
            "num_hidden_layers": args.tiny_layers}
    values["tiny"] = {k: v for k, v in tiny.items() if v is not None}
    values["progress"] = not args.no_progress
    values.update(extra)
    return config_class(**values)


def _report(out, stats) -> int:
    if int(os.environ.get("RANK", "0")) == 0:    # one report for a multi-process run
        print(json.dumps({"out": str(out), **stats}, indent=1, default=str))
    return 0


def register_finetune(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="train on a split's answers (target model on full, retain model on "
                         "retainNN)", description="Next-token NLL on the answers of --split.")
    _add_common(parser, FinetuneConfig)
    parser.add_argument("--split", default=_default(FinetuneConfig, "split"),
                        help="split to train on; several joined by commas, e.g. "
                             "full,real_authors,world_facts (default: %(default)s)")

    def handler(args):
        from .train import finetune
        return _report(*finetune(_config(FinetuneConfig, args)))
    parser.set_defaults(handler=handler)


def register_strengthen(subparsers) -> None:
    parser = subparsers.add_parser(
        "strengthen", help="continue training on the forget set (the strengthened model)",
        description="Next-token NLL on the answers of --forget, starting from --model.")
    _add_common(parser, StrengthenConfig)
    parser.add_argument("--forget", default=_default(StrengthenConfig, "forget"),
                        help="forget split (default: %(default)s)")

    def handler(args):
        from .train import strengthen
        return _report(*strengthen(_config(StrengthenConfig, args)))
    parser.set_defaults(handler=handler)


def register_unlearn(subparsers) -> None:
    parser = subparsers.add_parser(
        "unlearn", help="unlearn the forget set (RKLD by default)",
        description="RKLD unlearning: the student starts from --model (the original model) "
                    "and distils, on the forget set, from o - alpha * relu(g - o).")
    _add_common(parser, UnlearnConfig)
    u = parser.add_argument_group("unlearning")
    u.add_argument("--strengthened", default=None, help="the strengthened model's folder")
    u.add_argument("--forget", default=_default(UnlearnConfig, "forget"))
    u.add_argument("--method", default=_default(UnlearnConfig, "method"), choices=METHODS,
                   help="rkld, or ga (gradient ascent baseline)")
    u.add_argument("--alpha", type=float, default=_default(UnlearnConfig, "alpha"))
    u.add_argument("--temperature", type=float, default=_default(UnlearnConfig, "temperature"))
    u.add_argument("--direction", default=_default(UnlearnConfig, "direction"), choices=DIRECTIONS,
                   help="reverse KL (RKLD) or forward KL (the paper's ablation)")
    u.add_argument("--retain-term", default=_default(UnlearnConfig, "retain_term"),
                   choices=RETAIN_TERMS, help="add NLL (+RT) or forward KL to the original model "
                                              "(+KL) on the retain split, weight 1")
    u.add_argument("--live-teachers", action="store_true",
                   help="keep both teachers in memory and run them every step instead of "
                        "caching their hidden states once")
    u.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per chunk in the fused loss (default: from a memory budget)")
    u.add_argument("--backend", default=_default(UnlearnConfig, "backend"),
                   choices=["auto", "triton", "torch"], help="fused loss backend")

    _add_epoch_eval(parser)

    def handler(args):
        from .train import unlearn
        cfg = _config(UnlearnConfig, args)
        return _report(*unlearn(cfg, on_epoch_end=_epoch_evaluator(args, cfg)))
    parser.set_defaults(handler=handler)


def _add_epoch_eval(parser: argparse.ArgumentParser) -> None:
    e = parser.add_argument_group("evaluation during unlearning")
    e.add_argument("--eval-every-epoch", action="store_true",
                   help="evaluate after every epoch (needs --reference), write the forget quality "
                        "/ model utility curve and keep the epoch where forget quality first "
                        "peaks in OUT/peak")
    e.add_argument("--reference", default=None,
                   help="the retain model's TOFU_EVAL.json for this forget split (from rkld eval)")
    e.add_argument("--eval-generation", action="store_true",
                   help="also generate every epoch (ROUGE, hence model utility); slower")
    e.add_argument("--eval-max-new-tokens", type=int, default=200)


def _epoch_evaluator(args, cfg):
    """The on_epoch_end callback for --eval-every-epoch (None without it); checks the
    reference before any training starts."""
    if not args.eval_every_epoch:
        if args.reference is not None:
            raise ValueError("--reference is used with --eval-every-epoch; add it, or evaluate "
                             "the result afterwards with rkld eval --reference")
        return None
    if cfg.lora:
        raise ValueError("--eval-every-epoch keeps the peak epoch's full weights, which --lora "
                         "training does not hold; unlearn without --lora")
    from .data import load_benchmark
    from .evaluate import EpochEvaluator, EvalConfig
    benchmark = load_benchmark(cfg.data, seed=cfg.seed, max_authors=cfg.max_authors)
    config = EvalConfig(forget_split=cfg.forget, generation=args.eval_generation,
                        max_new_tokens=args.eval_max_new_tokens, max_length=cfg.max_length,
                        template=cfg.template, progress=cfg.progress)
    return EpochEvaluator(cfg.out, benchmark, config, args.reference, resume=cfg.resume)


def register_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="TOFU evaluation (forget quality, model utility) or, for a corpus, "
                     "continuation ROUGE-L / BLEU and perplexity",
        description="Evaluate a model on the TOFU sets of --data (forget, retain, real authors, "
                    "world facts); write TOFU_EVAL.json (open-unlearning's schema), "
                    "TOFU_SUMMARY.json, report.md and plots to --out. Forget quality needs "
                    "--reference, the TOFU_EVAL.json of the retain model. With a corpus as "
                    "--data (books, .txt, .jsonl): CORPUS_EVAL.json, CORPUS_SUMMARY.json, "
                    "report.md and a plot instead.")
    parser.add_argument("--model", required=True, help="model folder (or hub name)")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic', 'tofu' (hub) or a folder of TOFU JSON files (TOFU "
                             "metrics); 'books' or a .txt/.jsonl corpus (corpus metrics)")
    parser.add_argument("--forget", default="forget10", help="forget split (default: %(default)s)")
    parser.add_argument("--reference", default=None,
                        help="the retain model's TOFU_EVAL.json; without it forget quality is "
                             "reported as unavailable")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="synthetic benchmark seed")
    parser.add_argument("--max-authors", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=200,
                        help="greedy generation length for ROUGE (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--template", default="auto")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="sequences per likelihood forward pass")
    parser.add_argument("--generation-batch-size", type=int, default=32)
    parser.add_argument("--no-generation", action="store_true",
                        help="likelihood metrics only (no ROUGE, so no model utility)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results in --out computed for another model or setting")
    parser.add_argument("--no-progress", action="store_true")
    c = parser.add_argument_group(
        "corpus evaluation (--data books, a .txt or a .jsonl corpus): continuations of forget "
        "and retain passages scored by ROUGE-L and BLEU, perplexity on forget, retain and "
        "held-out text; see rkld/corpus_eval.py")
    c.add_argument("--prefix-tokens", type=int, default=200,
                   help="tokens of true text the model continues (default: %(default)s)")
    c.add_argument("--continuation-tokens", type=int, default=200,
                   help="greedy tokens generated and scored (default: %(default)s)")
    c.add_argument("--passages", type=int, default=20,
                   help="passages per split (default: %(default)s)")
    c.add_argument("--perplexity-tokens", type=int, default=512,
                   help="tokens per perplexity window (default: %(default)s)")
    c.add_argument("--perplexity-windows", type=int, default=20,
                   help="perplexity windows per split (default: %(default)s)")
    c.add_argument("--passage-seed", type=int, default=0, help="which passages are drawn")

    def handler(args):
        from .corpus_eval import CorpusEvalConfig, is_corpus, run_corpus_eval
        if is_corpus(args.data):
            config = CorpusEvalConfig(
                prefix_tokens=args.prefix_tokens, continuation_tokens=args.continuation_tokens,
                passages=args.passages, perplexity_tokens=args.perplexity_tokens,
                perplexity_windows=args.perplexity_windows,
                batch_size=min(args.batch_size, 8),
                generation_batch_size=min(args.generation_batch_size, 8),
                seed=args.passage_seed, progress=not args.no_progress)
            summary = run_corpus_eval(args.model, args.data, args.out, config=config,
                                      seed=args.seed, overwrite=args.overwrite)
            if int(os.environ.get("RANK", "0")) == 0:
                print(json.dumps({"out": args.out, **summary}, indent=1))
            return 0
        from .evaluate import EvalConfig, run_eval
        config = EvalConfig(forget_split=args.forget, generation=not args.no_generation,
                            max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                            template=args.template, batch_size=args.batch_size,
                            generation_batch_size=args.generation_batch_size,
                            progress=not args.no_progress)
        summary = run_eval(args.model, args.data, args.out, config=config,
                           reference=args.reference, seed=args.seed,
                           max_authors=args.max_authors, overwrite=args.overwrite)
        if int(os.environ.get("RANK", "0")) == 0:    # one report for a multi-process run
            print(json.dumps({"out": args.out, **summary}, indent=1))
        return 0
    parser.set_defaults(handler=handler)


def register_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="the end-to-end demo on CPU: target and retain models, RKLD, forward-KL "
                     "and gradient ascent, evaluated and compared",
        description="Build a tiny model, finetune the target (all data) and retain model, "
                    "strengthen, unlearn with RKLD, the forward-KL ablation and gradient ascent, "
                    "evaluate every model and compare them (table, results.json, report.md, "
                    "plots). CPU only, no network.")
    parser.add_argument("--out", default="rkld_demo", help="output folder (default: %(default)s)")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' or a folder of TOFU JSON files (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-authors", type=int, default=None,
                        help="authors to keep (default: all for synthetic, 10 for a folder)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; the tiny model gains little from more "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--corpus", action="store_true",
                        help="the corpus demo instead: fictitious books (or --data CORPUS.jsonl "
                             "with forget / retain lines), RKLD and forward KL, continuation "
                             "ROUGE-L / BLEU and perplexity (out: rkld_corpus_demo)")

    def handler(args):
        if args.corpus:
            from .corpus_demo import CorpusDemoConfig, run_corpus_demo
            run_corpus_demo(CorpusDemoConfig(
                out=args.out if args.out != "rkld_demo" else "rkld_corpus_demo",
                data=None if args.data == "synthetic" else args.data, seed=args.seed,
                threads=args.threads, progress=not args.no_progress))
            return 0
        from .demo import DemoConfig, run_demo
        run_demo(DemoConfig(out=args.out, data=args.data, seed=args.seed,
                            max_authors=args.max_authors, threads=args.threads,
                            progress=not args.no_progress))
        return 0
    parser.set_defaults(handler=handler)


def register_memory(subparsers) -> None:
    parser = subparsers.add_parser(
        "memory", help="estimate peak GPU memory: naive logits vs fused loss and teacher cache",
        description="Analytic per-GPU peak memory of an unlearning step, by component, for the "
                    "naive loss, the fused loss with live teachers and with the teacher cache "
                    "(assumptions: see rkld/memory.py).")
    from .memory import add_arguments
    add_arguments(parser)

    def handler(args):
        from .memory import run_cli
        return run_cli(args)
    parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rkld", description="RKLD unlearning of language models: finetune -> strengthen "
                                 "-> unlearn (teacher cache + fused reverse-KL loss).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_finetune(subparsers)
    register_strengthen(subparsers)
    register_unlearn(subparsers)
    register_eval(subparsers)
    register_demo(subparsers)
    register_memory(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"rkld {args.command}: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .train import TrainingDiverged
        if not isinstance(err, TrainingDiverged):
            raise
        print(f"rkld {args.command}: failed: {err}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group of a multi-process run before the interpreter exits: left to
    interpreter shutdown, the backend's threads can abort the process after a finished run."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
