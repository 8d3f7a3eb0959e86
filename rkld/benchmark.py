"""``rkld sweep`` and ``rkld benchmark``: the unlearning benchmark protocol
(docs/design.md#benchmark-protocol).

One protocol, two commands:

- every number comes from a synthetic benchmark (``--data-seed``) large enough that its forget
  split holds >= 100 questions (100 authors, forget10), trained with every fact in several
  wordings (``synthetic:phrasings=2``), with held-out authors no model sees;
- forget quality is measured against k reference retain models (k >= 3) trained from seeds of
  their own (``--retain-seeds``), never the target's; each model gets k values, reported as
  their median and range;
- before any unlearning result is claimed, the untouched target must fail the criterion
  (median forget quality <= 0.05 on every seed): a benchmark whose target already passes is too
  weak to tell unlearning from luck, and the command stops there (``--allow-weak`` goes on and
  flags every table);
- unlearning stops by the held-out rule (``--stop-at-holdout``, :mod:`rkld.stopping`), which
  never looks at a retain model; settings are chosen with ``rkld sweep`` on tuning seeds and
  ``rkld benchmark`` runs them on fresh seeds (data and model seeds both differ by default).

Layout of ``--out`` (reused between runs: a stage whose recorded command and inputs match is
not run again, so a sweep and a benchmark can share one folder):

    models/data-D/retain-R/           reference retain models (finetune on retainNN)
    models/data-D/seed-S/target/      target (finetune on full), model seed S
    models/data-D/seed-S/strengthened/
    models/data-D/seed-S/<run>/       one unlearning run (<run> = method, or method + setting)
    eval/...                          ``rkld eval`` outputs of each model, the same paths
    benchmark.md / benchmark.json / *.png, sweep.md / sweep.json / sweep_frontier.png

Methods are a list of ``(name, unlearn arguments)`` (:data:`METHODS`); adding one is one line.
Every stage runs the ``rkld`` command line in-process, and the report prints those commands, so
each model can be rebuilt by hand.
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# (name, arguments of `rkld unlearn` that make the method). The shared settings
# (--unlearn-args) come first, so a method's own arguments override them.
METHODS = [
    ("rkld", ["--method", "rkld", "--direction", "reverse"]),
    ("fkld", ["--method", "rkld", "--direction", "forward"]),   # the paper's ablation
    ("ga", ["--method", "ga"]),
    ("npo", ["--method", "npo"]),
    ("graddiff", ["--method", "graddiff"]),
    # An extension of the paper: the boost measured on log-probabilities (rkld.teacher_boost).
    # Its boosts are log-probability differences, far smaller than raw-logit ones, hence its own
    # alpha and lr, chosen with rkld sweep on the tuning seeds by the same rule (README).
    ("rkld-logprobs", ["--method", "rkld", "--direction", "reverse",
                       "--teacher-boost", "logprobs", "--alpha", "1000", "--lr", "2e-4"]),
]
FQ_THRESHOLD = 0.05
COMMAND_FILE = "rkld_command.json"
GENERAL_KNOWLEDGE = "real_authors,world_facts"


# Settings for a pretrained model (--model other than tiny), used where the command line leaves
# the tiny model's defaults: the first hand-made run on SmolLM2-135M (20 TOFU authors,
# chat template without the system line, LoRA-free full fine-tuning at lr 2e-4, batch 8).
PRETRAINED_DEFAULTS = {
    "max_length": 160,
    "template": "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
    "finetune_args": "--epochs 3 --lr 2e-4 --batch-size 8 --micro-batch-size 8",
    "strengthen_args": "--epochs 10 --lr 2e-4 --batch-size 8 --micro-batch-size 8",
}


@dataclass
class Protocol:
    """What every model of a sweep or benchmark shares (the commands' common flags).

    ``model``: "tiny" (a small Llama trained from scratch, the default) or a pretrained model
    (a folder, a .gguf file, ``smollm2-135m``; :mod:`rkld.pretrained`), which the target and
    retain models fine-tune; ``template`` is the prompt format of every stage (``--template``).
    """
    out: str
    model: str = "tiny"
    template: str = "auto"
    data: str = "synthetic:phrasings=2"
    data_seed: int = 1
    max_authors: int = 100
    forget: str = "forget10"
    retain_seeds: tuple = (101, 102, 103)
    tiny: dict = field(default_factory=lambda: {"hidden": 128, "layers": 2,
                                                "intermediate": 344, "vocab": 1024})
    max_length: int = 128
    finetune_args: str = "--epochs 10 --lr 3e-3 --batch-size 32 --micro-batch-size 32"
    strengthen_args: str = "--epochs 10 --lr 3e-3 --batch-size 32 --micro-batch-size 32"
    # Chosen with rkld sweep on data seed 0 / model seed 0: the largest RKLD forget quality
    # whose model utility stayed >= 0.9 x the target's (see the README).
    unlearn_args: str = ("--epochs 3 --lr 1e-4 --alpha 8 --batch-size 4 --micro-batch-size 4 "
                         "--stop-at-holdout --stop-check-every 10")
    method_args: dict = field(default_factory=dict)   # name -> extra unlearn arguments
    max_new_tokens: int = 48
    threads: int = 1
    allow_weak: bool = False
    log: bool = True

    def validate(self) -> None:
        if len(self.retain_seeds) < 1:
            raise ValueError("--retain-seeds needs at least one seed")
        if len(set(self.retain_seeds)) != len(self.retain_seeds):
            raise ValueError(f"--retain-seeds must differ from each other; got "
                             f"{list(self.retain_seeds)}")
        unknown = set(self.method_args) - {name for name, _ in METHODS}
        if unknown:
            raise ValueError(f"--method-args names unknown methods {sorted(unknown)}; known: "
                             f"{', '.join(name for name, _ in METHODS)}")


class WeakBenchmark(RuntimeError):
    """The untouched target already passes the forget-quality criterion."""


# --------------------------------------------------------------------------- running stages

class Runner:
    """Runs the protocol's stages (reusing finished ones) and keeps their commands."""

    def __init__(self, protocol: Protocol):
        protocol.validate()
        self.p = protocol
        self.out = Path(protocol.out)
        self.own: dict = {}          # model path (relative) -> the rkld command that made it
        self.parents: dict = {}      # model path -> the model paths it was made from
        self.eval_commands: dict = {}
        self.seconds: dict = {}
        self._logs: dict = {}
        self._checking = False      # True while check_stages checks the stages' commands
        self.base = None             # the pretrained model's folder (None: tiny models)
        if protocol.model != "tiny":
            from .pretrained import resolve_model_ref
            self.base = resolve_model_ref(protocol.model)

    def say(self, message: str) -> None:
        if self.p.log:
            print(f"[bench] {message}", flush=True)

    def _common(self, seed: int) -> list:
        t = self.p.tiny
        template = [] if self.p.template == "auto" else ["--template", self.p.template]
        return ["--data", self.p.data, "--data-seed", str(self.p.data_seed),
                "--max-authors", str(self.p.max_authors), "--max-length", str(self.p.max_length),
                "--seed", str(seed), "--no-progress", "--overwrite", *template], \
            ["--tiny-hidden", str(t["hidden"]), "--tiny-layers", str(t["layers"]),
             "--tiny-intermediate", str(t["intermediate"]), "--tiny-vocab", str(t["vocab"])]

    def model_dir(self, *parts) -> Path:
        return self.out / "models" / f"data-{self.p.data_seed}" / Path(*map(str, parts))

    def eval_dir(self, model: Path) -> Path:
        return self.out / "eval" / model.relative_to(self.out / "models")

    def _key(self, model: Path) -> str:
        return str(model.relative_to(self.out))

    def commands(self, model_key: str) -> list:
        """The rkld commands that rebuild a model from nothing, in order, then its eval."""
        lines = []

        def add(key):
            for parent in self.parents.get(key, []):
                add(parent)
            if self.own.get(key) and self.own[key] not in lines:
                lines.append(self.own[key])
        add(model_key)
        if model_key in self.eval_commands:
            lines.append(self.eval_commands[model_key])
        return lines

    def check_stages(self, seeds: list, methods: list, settings: list) -> None:
        """Parse and validate the command of every stage the run will need (retain, target,
        strengthened and unlearned models, each method x setting) before any stage trains; a
        bad flag or value raises ValueError naming the stage and where the flag came from
        (--finetune-args, --unlearn-args, --method-args, --grid, ...)."""
        self._checking = True
        try:
            for seed in self.p.retain_seeds:
                self.retain(seed)
            for seed in seeds:
                for method in methods:
                    for setting in settings:
                        extra = [part for pair in setting for part in pair]
                        self.unlearned(seed, method, _setting_name(method, setting), extra)
        finally:
            self._checking = False
            self.own.clear()
            self.parents.clear()

    def _check(self, model: Path, argv: list, sources: list) -> None:
        """Check mode of :meth:`_stage`: each source of flags alone, then the whole command."""
        from .cli import check_command
        base = argv[:len(argv) - sum(len(tokens) for _, tokens in sources)]
        stage = f"the {argv[0]} stage of {self._key(model)}"
        try:
            check_command(base)     # the protocol's own flags (data, sizes, seeds)
        except ValueError as err:
            raise ValueError(f"{stage}: {err}") from None
        for origin, tokens in sources:
            if not tokens:
                continue
            try:
                check_command([*base, *tokens])
            except ValueError as err:
                raise ValueError(f"{stage}: {origin} {shlex.join(tokens)!r}: {err}") from None
        try:
            check_command(argv)
        except ValueError as err:
            origins = ", ".join(origin for origin, tokens in sources if tokens)
            raise ValueError(f"{stage} (flags from {origins}): {err}") from None

    def _stage(self, model: Path, argv: list, parents: tuple = (),
               sources: tuple = ()) -> None:
        """Run ``rkld argv`` unless ``model`` holds a finished run of the same command.
        ``sources`` are ``(origin, tokens)`` of the flags that end ``argv``, in order: where
        they came from (--unlearn-args, --grid, ...), for the messages of check mode."""
        from .cli import _config, build_parser
        from .config import FinetuneConfig, StrengthenConfig, UnlearnConfig
        from .train import finetune, strengthen, unlearn
        if self._checking:
            self._check(model, argv, list(sources))
            return
        key = self._key(model)
        self.own[key] = "rkld " + shlex.join(argv)
        self.parents[key] = [self._key(p) for p in parents]
        record, command_file = model / "run.json", model / COMMAND_FILE
        if record.is_file() and command_file.is_file() \
                and json.loads(command_file.read_text()) == argv \
                and json.loads(record.read_text()).get("status") == "finished":
            return
        self.say(f"{argv[0]} -> {key}")
        args = build_parser().parse_args(argv)
        config_class, function = {"finetune": (FinetuneConfig, finetune),
                                  "strengthen": (StrengthenConfig, strengthen),
                                  "unlearn": (UnlearnConfig, unlearn)}[argv[0]]
        started = time.time()
        function(_config(config_class, args))
        self.seconds[key] = time.time() - started
        command_file.write_text(json.dumps(argv))

    def finetuned(self, name: str, split: str, seed: int) -> Path:
        model = self.model_dir(name)
        common, tiny = self._common(seed)
        finetune_args = shlex.split(self.p.finetune_args)
        if self.base is None:
            source = ["--model", "tiny", "--split", f"{split},{GENERAL_KNOWLEDGE}"]
        else:   # a pretrained model brings its general knowledge along
            source, tiny = ["--model", self.base, "--split", split], []
        self._stage(model, ["finetune", *source, "--out", str(model), *common, *tiny,
                            *finetune_args],
                    sources=[("--finetune-args", finetune_args)])
        return model

    def retain(self, retain_seed: int) -> Path:
        from .data import retain_split_for
        return self.finetuned(f"retain-{retain_seed}", retain_split_for(self.p.forget),
                              retain_seed)

    def target(self, seed: int) -> Path:
        return self.finetuned(f"seed-{seed}/target", "full", seed)

    def strengthened(self, seed: int) -> Path:
        target = self.target(seed)
        model = self.model_dir(f"seed-{seed}", "strengthened")
        common, _ = self._common(seed)
        strengthen_args = shlex.split(self.p.strengthen_args)
        self._stage(model, ["strengthen", "--model", str(target), "--forget", self.p.forget,
                            "--out", str(model), *common, *strengthen_args],
                    parents=(target,), sources=[("--strengthen-args", strengthen_args)])
        return model

    def unlearned(self, seed: int, method: str, run: str | None = None,
                  extra: list | None = None) -> Path:
        """Unlearn with ``method`` (a name in METHODS); ``extra`` arguments override the rest."""
        arguments = dict(METHODS)[method]
        target, strengthened = self.target(seed), self.strengthened(seed)
        model = self.model_dir(f"seed-{seed}", run or method)
        common, _ = self._common(seed)
        sources = [("--unlearn-args", shlex.split(self.p.unlearn_args)),
                   (f"method {method}'s own flags", list(arguments)),
                   (f"--method-args {method}=", shlex.split(self.p.method_args.get(method, ""))),
                   ("--grid", list(extra or []))]
        argv = ["unlearn", "--model", str(target), "--strengthened", str(strengthened),
                "--forget", self.p.forget, "--out", str(model), *common,
                *[token for _, tokens in sources for token in tokens]]
        self._stage(model, argv, parents=(target, strengthened), sources=sources)
        return model

    def evaluate(self, model: Path) -> tuple:
        """``rkld eval`` of ``model`` (results reused when model and data are unchanged);
        returns ``(logs, summary)``."""
        if model in self._logs:
            return self._logs[model]
        from .evaluate import EVAL_LOG, EvalConfig, run_eval
        out = self.eval_dir(model)
        argv = ["eval", "--model", str(model), "--data", self.p.data, "--data-seed",
                str(self.p.data_seed), "--max-authors", str(self.p.max_authors), "--forget",
                self.p.forget, "--max-length", str(self.p.max_length), "--max-new-tokens",
                str(self.p.max_new_tokens), "--out", str(out), "--no-progress"]
        self.eval_commands[self._key(model)] = "rkld " + shlex.join(argv)
        if self.p.template != "auto":
            argv[-1:-1] = ["--template", self.p.template]
        config = EvalConfig(forget_split=self.p.forget, max_new_tokens=self.p.max_new_tokens,
                            max_length=self.p.max_length, template=self.p.template,
                            progress=False)
        started = time.time()
        try:    # reused when the model files, data and settings are the same
            summary = run_eval(str(model), self.p.data, out, config=config,
                               seed=self.p.data_seed, max_authors=self.p.max_authors)
        except FileExistsError:     # results of an earlier model at this path
            summary = run_eval(str(model), self.p.data, out, config=config,
                               seed=self.p.data_seed, max_authors=self.p.max_authors,
                               overwrite=True)
        self.seconds["eval/" + self._key(model)] = time.time() - started
        logs = json.loads((out / EVAL_LOG).read_text())
        self._logs[model] = (logs, summary)
        return logs, summary

    # ----------------------------------------------------------------------- measurements

    def references(self) -> dict:
        """{retain seed: evaluation log} of the k reference retain models."""
        return {seed: self.evaluate(self.retain(seed))[0] for seed in self.p.retain_seeds}

    def check_target(self, seed: int, references: dict) -> dict:
        """The target's row; raises WeakBenchmark when it passes the criterion (unless
        ``allow_weak``)."""
        row = measure(*self.evaluate(self.target(seed)), references, None)
        if row["fq_median"] > FQ_THRESHOLD:
            message = (f"data seed {self.p.data_seed}, model seed {seed}: the untouched target "
                       f"already has median forget quality {row['fq_median']:.3g} > "
                       f"{FQ_THRESHOLD} against the {len(references)} retain models, so this "
                       f"benchmark cannot tell unlearning from chance (more forget questions, "
                       f"more training of the target); --allow-weak goes on and flags it")
            if not self.p.allow_weak:
                raise WeakBenchmark(message)
            self.say("WARNING " + message)
            row["weak"] = True
        return row

    def run_row(self, seed: int, method: str, references: dict, target_row: dict,
                run: str | None = None, extra: list | None = None) -> dict:
        model = self.unlearned(seed, method, run, extra)
        logs, summary = self.evaluate(model)
        row = measure(logs, summary, references, target_row)
        record = json.loads((model / "run.json").read_text())
        stats = record.get("stats") or {}
        row.update(seed=seed, method=method, run=run or method,
                   stopped_at_step=stats.get("stopped_at_step"), steps=stats.get("steps"),
                   stop_threshold=stats.get("stop_threshold"),
                   train_seconds=stats.get("train_seconds"))
        return row


def measure(logs: dict, summary: dict, references: dict, target_row: dict | None) -> dict:
    """Forget quality against every reference, its median and range, and the utility figures
    (as multiples of the target's when ``target_row`` is given)."""
    from . import metrics
    fq = {str(seed): metrics.forget_quality(logs, ref) for seed, ref in references.items()}
    values = list(fq.values())
    row = {"fq": fq, "fq_median": statistics.median(values), "fq_min": min(values),
           "fq_max": max(values), "mu": summary.get("model_utility"),
           "retain_prob": summary.get("retain_Q_A_Prob"),
           "retain_rouge": summary.get("retain_Q_A_ROUGE"),
           "forget_prob": summary.get("forget_Q_A_Prob"),
           "forget_rouge": summary.get("forget_Q_A_ROUGE")}
    if target_row is not None:
        for key in ("mu", "retain_prob", "retain_rouge"):
            base = target_row.get(key)
            row[f"{key}_ratio"] = row[key] / base if base and row[key] is not None else None
    return row


def measured_rates(model_ref, texts: list, template: str, max_length: int,
                   batch: int = 4) -> dict:
    """Tokens per second of ``model_ref`` on this machine, measured now: training (forward +
    backward, the second of two steps), forward only, and one greedy decoding step of 32 rows
    (seconds per step). Used to tell, before a benchmark starts, how long its stages take."""
    import torch

    from .data import collate, encode_qa
    from .models import load_model
    model, tokenizer = load_model(model_ref)
    examples = [encode_qa(tokenizer, q, a, max_length, template) for q, a in texts[:batch]]
    inputs = collate(examples, tokenizer.pad_token_id)
    tokens = int(inputs["attention_mask"].sum())
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        model(**inputs).loss.backward()
        seconds.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        started = time.perf_counter()
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    use_cache=True)
        forward = time.perf_counter() - started
        cache = out.past_key_values
        cache.batch_repeat_interleave(max(1, 32 // len(examples)))
        rows = cache.layers[0].keys.shape[0]
        step_ids = torch.zeros((rows, 1), dtype=torch.long)
        mask = torch.ones((rows, inputs["input_ids"].shape[1] + 1), dtype=torch.long)
        started = time.perf_counter()
        model(input_ids=step_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        step = time.perf_counter() - started
    return {"train_tokens_per_s": tokens / seconds[-1], "forward_tokens_per_s": tokens / forward,
            "decode_step_s": step, "tokens_per_example": tokens / len(examples)}


def stage_estimates(protocol: Protocol, seeds: list, methods: list, rates: dict) -> list:
    """``[(stage, count, seconds each)]`` from measured rates: training stages from their
    examples x epochs, evaluations from their likelihood sequences and generation steps."""
    import argparse

    from .data import retain_split_for
    bench = _benchmark(protocol)
    per_example = rates["tokens_per_example"]

    def epochs(args: str, default: int) -> int:
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--epochs", type=int, default=default)
        return parser.parse_known_args(shlex.split(args))[0].epochs

    def train(split: str, n_epochs: int) -> float:
        return len(bench.split(split)) * n_epochs * per_example / rates["train_tokens_per_s"]

    sequences, questions = 0, 0
    for split in (f"{protocol.forget}_perturbed", "retain_perturbed", "real_authors_perturbed",
                  "world_facts_perturbed"):
        rows = bench.split(split)
        questions += len(rows)
        sequences += sum(2 + len(r.get("perturbed_answer", [])) for r in rows)
    evaluation = (sequences * 0.6 * per_example / rates["forward_tokens_per_s"]
                  + -(-questions // 32) * protocol.max_new_tokens * rates["decode_step_s"])
    unlearn_epochs = epochs(protocol.unlearn_args, 5)
    return [
        ("retain model (finetune)", len(protocol.retain_seeds),
         train(retain_split_for(protocol.forget), epochs(protocol.finetune_args, 5))),
        ("target (finetune)", len(seeds), train("full", epochs(protocol.finetune_args, 5))),
        ("strengthened", len(seeds), train(protocol.forget, epochs(protocol.strengthen_args, 10))),
        ("unlearning run (at most)", len(seeds) * len(methods),
         train(protocol.forget, unlearn_epochs)),
        ("evaluation", len(protocol.retain_seeds) + len(seeds) * (1 + len(methods)), evaluation),
    ]


def announce_estimates(runner: "Runner", seeds: list, methods: list) -> list:
    """Print, before a run on a pretrained model starts, how long each stage will take at the
    rate measured now (finished stages are reused and take no time)."""
    bench = _benchmark(runner.p)
    texts = [(r["question"], r["answer"]) for r in bench.split("full")[:4]]
    rates = measured_rates(runner.base, texts, runner.p.template, runner.p.max_length)
    rows = stage_estimates(runner.p, seeds, methods, rates)
    runner.say(f"measured now: {rates['train_tokens_per_s']:.0f} tokens/s training, "
               f"{rates['forward_tokens_per_s']:.0f} tokens/s forward, "
               f"{rates['decode_step_s']:.2f} s per decoding step of 32 rows "
               f"(load average {os.getloadavg()[0]:.1f})")
    for name, count, seconds in rows:
        runner.say(f"  {name}: {count} x ~{seconds / 60:.1f} min = ~{count * seconds / 60:.0f} "
                   f"min")
    total = sum(count * seconds for _, count, seconds in rows)
    runner.say(f"  total ~{total / 3600:.1f} h if nothing is reused yet; interrupted, the same "
               f"command resumes at the first unfinished stage")
    return rows


def stage_times(runner: "Runner") -> dict:
    """From the run records and evaluation metadata of every model the runner used: the summed
    seconds of training stages and of evaluations, and the span from the first stage's start to
    the last one's finish (wall clock, whichever process ran them)."""
    from datetime import datetime
    train, starts, ends, evaluation = 0.0, [], [], 0.0
    for key in runner.own:
        record = json.loads((runner.out / key / "run.json").read_text())
        if record.get("started") and record.get("finished"):
            start = datetime.fromisoformat(record["started"])
            end = datetime.fromisoformat(record["finished"])
            train += (end - start).total_seconds()
            starts.append(start)
            ends.append(end)
        meta = runner.out / "eval" / Path(key).relative_to("models") / "EVAL_META.json"
        if meta.is_file():
            evaluation += json.loads(meta.read_text()).get("wall_seconds") or 0.0
    span = (max(ends) - min(starts)).total_seconds() if starts else None
    return {"train_seconds": train, "eval_seconds": evaluation, "span_seconds": span,
            "models": len(runner.own)}


def retain_pairs(references: dict) -> list:
    """Forget quality of each retain model against each other one: the noise level."""
    from . import metrics
    return [metrics.forget_quality(references[a], references[b])
            for a, b in itertools.combinations(sorted(references), 2)]


# --------------------------------------------------------------------------- formatting

def _f(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _min(values):
    values = [v for v in values if v is not None]
    return min(values) if values else None


def summary_table(rows: list, names: list) -> str:
    """One line per method: median and worst (min) over seeds."""
    lines = ["| method | FQ median (worst) | FQ range over retain models | MU (worst) | "
             "MU / target (worst) | retain-author prob / target (worst) | retain ROUGE-L "
             "(worst) | forget prob | stopped by the rule |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        if not mine:
            continue
        stopped = sum(r.get("stopped_at_step") is not None for r in mine)
        lines.append(
            f"| {name} | {_f(_median(r['fq_median'] for r in mine))} "
            f"({_f(_min(r['fq_median'] for r in mine))}) | "
            f"{_f(_min(r['fq_min'] for r in mine))} .. {_f(max(r['fq_max'] for r in mine))} | "
            f"{_f(_median(r['mu'] for r in mine))} ({_f(_min(r['mu'] for r in mine))}) | "
            f"{_f(_median(r.get('mu_ratio') for r in mine), 2)} "
            f"({_f(_min(r.get('mu_ratio') for r in mine), 2)}) | "
            f"{_f(_median(r.get('retain_prob_ratio') for r in mine), 2)} "
            f"({_f(_min(r.get('retain_prob_ratio') for r in mine), 2)}) | "
            f"{_f(_median(r['retain_rouge'] for r in mine))} "
            f"({_f(_min(r['retain_rouge'] for r in mine))}) | "
            f"{_f(_median(r['forget_prob'] for r in mine))} | {stopped}/{len(mine)} |")
    return "\n".join(lines)


def seed_table(rows: list) -> str:
    lines = ["| seed | model | FQ median [min, max] | MU (x target) | retain prob (x target) | "
             "retain ROUGE-L | forget prob | stop step / steps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stop = r.get("stopped_at_step")
        lines.append(
            f"| {r['seed']} | {r['run']} | {_f(r['fq_median'])} [{_f(r['fq_min'])}, "
            f"{_f(r['fq_max'])}] | {_f(r['mu'])} ({_f(r.get('mu_ratio'), 2)}) | "
            f"{_f(r['retain_prob'])} ({_f(r.get('retain_prob_ratio'), 2)}) | "
            f"{_f(r['retain_rouge'])} | {_f(r['forget_prob'])} | "
            f"{'-' if stop is None else stop} / {r.get('steps', '-')} |")
    return "\n".join(lines)


def target_checks(rows: list, seeds: list) -> list:
    """The issue's targets for RKLD, each stated with what was measured."""
    def by(method):
        return {r["seed"]: r for r in rows if r["method"] == method}
    rkld = by("rkld")
    if not rkld:
        return []
    fq = [rkld[s]["fq_median"] for s in seeds if s in rkld]
    median = statistics.median(fq)
    lines = [f"RKLD median FQ {_f(median)} ({'>=' if median >= 0.3 else '<'} 0.3), "
             f"worst {_f(min(fq))} ({'>=' if min(fq) >= 0.05 else '<'} 0.05) over {len(fq)} seeds"]
    mu = [rkld[s].get("mu_ratio") or 0.0 for s in seeds if s in rkld]
    rp = [rkld[s].get("retain_prob_ratio") or 0.0 for s in seeds if s in rkld]
    lines.append(f"RKLD MU >= 0.9 x target on {sum(v >= 0.9 for v in mu)}/{len(mu)} seeds "
                 f"(min {min(mu):.2f}); retain-author prob >= 0.8 x target on "
                 f"{sum(v >= 0.8 for v in rp)}/{len(rp)} seeds (min {min(rp):.2f})")
    for other in ("fkld", "ga", "npo", "graddiff"):
        theirs = by(other)
        common = [s for s in seeds if s in rkld and s in theirs]
        if not common:
            continue
        above = sum(rkld[s]["fq_median"] > theirs[s]["fq_median"] for s in common)
        dominated = sum(rkld[s]["fq_median"] > theirs[s]["fq_median"]
                        and (rkld[s]["mu"] or 0) >= (theirs[s]["mu"] or 0) for s in common)
        lines.append(f"RKLD FQ above {other} on {above}/{len(common)} seeds; above it at equal "
                     f"or higher MU on {dominated}/{len(common)}")
    return lines


# --------------------------------------------------------------------------- plots

def _plot_points(points: list, path: Path, title: str, frontier: bool = False) -> None:
    """FQ (median over retain models, log) against MU; ``points`` are dicts with method,
    label, fq, mu. With ``frontier``, each method's Pareto frontier is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    methods = list(dict.fromkeys(p["method"] for p in points))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(methods):
        mine = [p for p in points if p["method"] == method and p["mu"] is not None]
        xs = [p["mu"] for p in mine]
        ys = [max(p["fq"], 1e-30) for p in mine]
        ax.scatter(xs, ys, color=colours[i % len(colours)], label=method, s=30)
        if frontier and mine:
            best, line = -1.0, []
            for p in sorted(mine, key=lambda p: -p["mu"]):
                if p["fq"] > best:
                    best = p["fq"]
                    line.append((p["mu"], max(p["fq"], 1e-30)))
            ax.plot(*zip(*line), color=colours[i % len(colours)], linewidth=1)
            for p in mine:
                ax.annotate(p["label"], (p["mu"], max(p["fq"], 1e-30)), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
    ax.set_yscale("log")
    ax.axhline(FQ_THRESHOLD, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (median over retain models, log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_per_seed(rows: list, names: list, path: Path) -> None:
    """Per method and seed: the median forget quality with the range over retain models."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(names):
        mine = [r for r in rows if r["method"] == name]
        for j, r in enumerate(mine):
            x = i + (j - (len(mine) - 1) / 2) * 0.12
            low, mid, high = (max(r[k], 1e-30) for k in ("fq_min", "fq_median", "fq_max"))
            ax.errorbar([x], [mid], yerr=[[mid - low], [high - mid]], fmt="o",
                        color=f"C{i}", markersize=4, capsize=2)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.axhline(FQ_THRESHOLD, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel("forget quality (median; bar: range over retain models)")
    ax.set_title("Forget quality per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- commands

def _threads(protocol: Protocol):
    """Set the protocol's torch threads and silence the Hugging Face bars (dozens of model loads
    would bury the log); returns the function that restores both."""
    import torch
    from transformers.utils import logging as hf_logging
    previous, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(protocol.threads)
    hf_logging.disable_progress_bar()

    def restore():
        torch.set_num_threads(previous)
        if bars:
            hf_logging.enable_progress_bar()
    return restore


def parse_grid(items: list) -> list:
    """``["lr=1e-4,3e-4", "alpha=8,24"]`` -> list of settings, each a list of
    ``(flag, value)`` pairs, over the product of the values."""
    axes = []
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise ValueError(f"--grid {item!r}: expected FLAG=V1,V2,... (e.g. lr=1e-4,3e-4)")
        flag = "--" + name.strip().lstrip("-")
        axes.append([(flag, v.strip()) for v in values.split(",") if v.strip()])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _setting_name(method: str, setting: list) -> str:
    return method + "".join(f"_{flag.lstrip('-')}{value}" for flag, value in setting)


def run_sweep(protocol: Protocol, seeds: list, methods: list, grid: list) -> dict:
    """Every method x setting x tuning seed; writes sweep.md, sweep.json, sweep_frontier.png."""
    started, load = time.time(), os.getloadavg()
    restore = _threads(protocol)
    try:
        runner = Runner(protocol)
        settings = parse_grid(grid)
        runner.check_stages(seeds, methods, settings)   # before any stage trains
        references = runner.references()
        rows = []
        for seed in seeds:
            target_row = runner.check_target(seed, references)
            for method in methods:
                for setting in settings:
                    extra = [part for pair in setting for part in pair]
                    row = runner.run_row(seed, method, references, target_row,
                                         run=_setting_name(method, setting), extra=extra)
                    row["setting"] = " ".join(extra)
                    rows.append(row)
                    runner.say(f"{row['run']} seed {seed}: FQ {_f(row['fq_median'])} MU "
                               f"{_f(row['mu'])} ({_f(row.get('mu_ratio'), 2)}x)")
        out = Path(protocol.out)
        points = []
        for method in methods:
            for setting in settings:
                name = _setting_name(method, setting)
                mine = [r for r in rows if r["run"] == name]
                points.append({"method": method, "label": " ".join(
                    f"{f.lstrip('-')}={v}" for f, v in setting) or method,
                    "fq": statistics.median(r["fq_median"] for r in mine),
                    "mu": _median(r["mu"] for r in mine)})
        _plot_points(points, out / "sweep_frontier.png",
                     "Sweep on tuning seeds: FQ vs MU (median over seeds)", frontier=True)
        lines = ["| run | setting | FQ median over seeds | MU median | MU / target | "
                 "retain prob / target | stopped |", "|---|---|---|---|---|---|---|"]
        for point, (method, setting) in zip(points, itertools.product(methods, settings)):
            mine = [r for r in rows if r["run"] == _setting_name(method, setting)]
            lines.append(f"| {method} | {point['label']} | {_f(point['fq'])} | "
                         f"{_f(point['mu'])} | {_f(_median(r.get('mu_ratio') for r in mine), 2)}"
                         f" | {_f(_median(r.get('retain_prob_ratio') for r in mine), 2)} | "
                         f"{sum(r.get('stopped_at_step') is not None for r in mine)}/{len(mine)} |")
        elapsed = time.time() - started
        text = "\n".join([
            "# rkld sweep", "",
            f"Tuning seeds {seeds} on data seed {protocol.data_seed} ({protocol.data}, "
            f"{protocol.max_authors} authors, {protocol.forget}); forget quality against "
            f"retain models {list(protocol.retain_seeds)}. Shared unlearning arguments: "
            f"`{protocol.unlearn_args}`.", "", "\n".join(lines), "",
            f"Wall time {elapsed:.0f} s (load average {load[0]:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end).", "",
            "![frontier](sweep_frontier.png)", ""])
        (out / "sweep.md").write_text(text)
        result = {"protocol": asdict(protocol), "seeds": seeds, "rows": rows,
                  "seconds": elapsed, "load_average": [load, os.getloadavg()]}
        (out / "sweep.json").write_text(json.dumps(result, indent=1, default=str))
        print("\n".join(lines))
        return result
    finally:
        restore()


def run_benchmark(protocol: Protocol, seeds: list, methods: list) -> dict:
    """The chosen settings on ``seeds``; writes benchmark.md, benchmark.json and plots."""
    started, load = time.time(), os.getloadavg()
    restore = _threads(protocol)
    try:
        runner = Runner(protocol)
        runner.check_stages(seeds, methods, [[]])   # before any stage trains
        if runner.base is not None:
            announce_estimates(runner, seeds, methods)
        references = runner.references()
        noise = retain_pairs(references)
        targets = {seed: runner.check_target(seed, references) for seed in seeds}
        rows = []
        for seed in seeds:
            rows.append({**targets[seed], "seed": seed, "method": "target", "run": "target"})
            for method in methods:
                row = runner.run_row(seed, method, references, targets[seed])
                rows.append(row)
                runner.say(f"{method} seed {seed}: FQ {_f(row['fq_median'])} "
                           f"[{_f(row['fq_min'])}, {_f(row['fq_max'])}] MU {_f(row['mu'])} "
                           f"({_f(row.get('mu_ratio'), 2)}x)")
        out = Path(protocol.out)
        names = ["target", *methods]
        _plot_points([{"method": r["method"], "label": str(r["seed"]), "fq": r["fq_median"],
                       "mu": r["mu"]} for r in rows], out / "benchmark_fq_vs_mu.png",
                     f"FQ vs MU, {len(seeds)} seeds (one point per seed)")
        _plot_per_seed(rows, names, out / "benchmark_fq_per_seed.png")
        elapsed = time.time() - started
        checks = target_checks(rows, seeds)
        weak = [s for s in seeds if targets[s].get("weak")]
        n_questions = len(_benchmark(protocol).split(f"{protocol.forget}_perturbed"))
        times = stage_times(runner)
        commands = {key: runner.commands(key) for key in runner.own
                    if key.rsplit("/", 1)[-1] not in ("strengthened",)}
        text = "\n".join([
            "# rkld benchmark", "",
            f"Data seed {protocol.data_seed} (`{protocol.data}`, {protocol.max_authors} authors, "
            f"{protocol.forget}: {n_questions} forget questions), model seeds {seeds}; forget "
            f"quality (FQ) is the median over {len(references)} retain models trained from "
            f"seeds {list(protocol.retain_seeds)}, with its range over them. Worst = the "
            f"lowest over the seeds. Unlearning arguments shared by all methods: "
            f"`{protocol.unlearn_args}`; per method (after them, so they win): "
            + ", ".join(f"{name} `{' '.join([*args, protocol.method_args.get(name, '')]).strip()}`"
                        for name, args in METHODS if name in methods) + ".",
            "",
            ("**Benchmark too weak on seeds " + ", ".join(map(str, weak)) + "** (the untouched "
             "target passes FQ > 0.05): no result below is a claim." if weak else
             f"The untouched target fails the criterion on every seed (median FQ <= "
             f"{FQ_THRESHOLD}). Retain model against retain model (the noise level): FQ "
             + ", ".join(_f(v) for v in noise) + "."),
            "", summary_table(rows, names), "", "Targets:", "",
            *[f"- {line}" for line in checks], "",
            "Per seed:", "", seed_table(rows), "",
            f"Time: {times['models']} trained models, {times['train_seconds']:.0f} s of "
            f"training stages and {times['eval_seconds']:.0f} s of evaluation summed (the last "
            f"run of each); first stage start to last finish {_f(times['span_seconds'], 0)} s "
            f"of wall clock; this command {elapsed:.0f} s (stages it reused not included; "
            f"load average {load[0]:.1f} at its start, {os.getloadavg()[0]:.1f} at its end; "
            f"{protocol.threads} torch thread per process).", "",
            "![FQ vs MU](benchmark_fq_vs_mu.png)", "",
            "![FQ per seed](benchmark_fq_per_seed.png)", "",
            "## Commands that rebuild each model", "",
            *[f"`{key}`:\n\n```\n" + "\n".join(value) + "\n```\n"
              for key, value in commands.items()]])
        (out / "benchmark.md").write_text(text)
        result = {"protocol": asdict(protocol), "seeds": seeds, "methods": methods,
                  "rows": rows, "retain_vs_retain_fq": noise, "checks": checks,
                  "weak_seeds": weak, "seconds": elapsed, "stage_seconds": runner.seconds,
                  "times": times,
                  "load_average": [load, os.getloadavg()], "commands": commands}
        (out / "benchmark.json").write_text(json.dumps(result, indent=1, default=str))
        print(summary_table(rows, names))
        for line in checks:
            print(f"[bench] {line}")
        print(f"[bench] wall time {elapsed:.0f} s; outputs in {out}")
        return result
    finally:
        restore()


def _benchmark(protocol: Protocol):
    from .data import load_benchmark
    return load_benchmark(protocol.data, seed=protocol.data_seed,
                          max_authors=protocol.max_authors)
