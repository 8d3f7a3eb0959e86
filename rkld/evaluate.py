"""TOFU evaluation of a causal LM: likelihood and generation metrics, logs in open-unlearning's
schema.

Public API:
    EvalConfig                       what to evaluate and how (split, generation, batch sizes)
    evaluate_model(model, tokenizer, benchmark, config, reference=None) -> dict
        the evaluation log (open-unlearning's ``TOFU_EVAL.json`` schema); runs sharded when
        several processes are launched (``accelerate launch``), identical to one process.
    summarize(logs) -> dict          ``{metric: agg_value}`` (``TOFU_SUMMARY.json``)
    with_reference(logs, reference)  recompute forget quality against a retain-model log
    write_outputs(out_dir, logs, ...) TOFU_EVAL.json, TOFU_SUMMARY.json, report.md, PNG plots
                                     and, last, EVAL_META.json
    run_eval(model, data, out_dir, ...) the ``rkld eval`` command: load, reuse or refuse,
                                     evaluate, write
    check_reference, EpochEvaluator  evaluation after every unlearning epoch

Evaluation sets and metric names (open-unlearning's, so that its published retain-model logs
work as ``reference`` and our logs load in its tools):

    forget   ``{forget}_perturbed``      forget_Q_A_Prob, forget_Q_A_PARA_Prob,
                                         forget_Q_A_PERT_Prob, forget_Q_A_ROUGE,
                                         forget_truth_ratio, forget_quality
    retain   ``retain_perturbed``        retain_Q_A_Prob, retain_Q_A_PARA_Prob,
                                         retain_Q_A_PERT_Prob, retain_Q_A_ROUGE,
                                         retain_Truth_Ratio
    ra / wf  ``real_authors_perturbed`` / ``world_facts_perturbed``
                                         {ra,wf}_Q_A_Prob, {ra,wf}_Q_A_PERT_Prob,
                                         {ra,wf}_Q_A_Prob_normalised, {ra,wf}_Q_A_ROUGE,
                                         {ra,wf}_Truth_Ratio
    model_utility                        harmonic mean of the nine components

Each metric is ``{"agg_value": x, "value_by_index": {"0": {...}, ...}}``. The truth ratio's
correct answer is the paraphrased one on forget / retain and the true one on real authors /
world facts, as in the reference.

Batches are formed once, globally (sequences sorted by length, fixed size); with several
processes, batch b runs on process b mod world_size and the results are gathered, so every
per-example value is computed on exactly the same batch as in a single-process run.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .data import collate, encode_prompt, encode_qa
from .models import model_fingerprint, unwrap_model  # noqa: F401  (re-exported)
from .storage import atomic_write_json, check_separate, locked_output, read_json

EVAL_LOG = "TOFU_EVAL.json"
SUMMARY_LOG = "TOFU_SUMMARY.json"
META_FILE = "EVAL_META.json"
# Bump when a change alters what the logs hold, so that older results are not reused.
EVAL_FORMAT_VERSION = 1

# (prefix, split, truth-ratio key, "correct" answer field of the truth ratio, normalised prob?)
_SETS = (
    ("forget", "{forget}_perturbed", "forget_truth_ratio", "paraphrased_answer", False),
    ("retain", "retain_perturbed", "retain_Truth_Ratio", "paraphrased_answer", False),
    ("ra", "real_authors_perturbed", "ra_Truth_Ratio", "answer", True),
    ("wf", "world_facts_perturbed", "wf_Truth_Ratio", "answer", True),
)


ENGINES = ("cached", "plain")


@dataclass
class EvalConfig:
    """What to evaluate. Every field but ``progress`` is part of the results' fingerprint
    (batch sizes too: padding can change the last bits of a value)."""
    forget_split: str = "forget10"
    generation: bool = True          # ROUGE metrics (greedy generation); model utility needs them
    max_new_tokens: int = 200
    max_length: int = 512            # QA sequences longer than this are cut (as the reference)
    template: str = "auto"
    batch_size: int = 32             # sequences per likelihood forward pass
    generation_batch_size: int = 32  # prompts per generate() call (per prompt pass, "cached")
    # "cached": each question's prompt runs once and its KV cache serves the likelihood of all
    # its answers and its greedy generation (rkld.eval_engine; processes share the question
    # groups). "plain": every sequence runs whole and generation is transformers' generate()
    # (also what an FSDP-sharded model runs). Same numbers up to floating-point summation order.
    engine: str = "cached"
    progress: bool = True

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")

    def fingerprint_fields(self) -> dict:
        fields = asdict(self)
        fields.pop("progress")
        return fields


@dataclass
class _Request:
    metric: str        # e.g. "forget_Q_A_PERT_Prob"
    index: int         # example index within the split
    slot: int | None   # which perturbed answer, None for single-answer metrics
    example: dict = field(repr=False)


# --------------------------------------------------------------------------- distributed helpers

class _Shards:
    """This process's place among the launched processes, and how to gather from all of them.

    ``lockstep``: the model is sharded with FSDP, so every process must run the same number of
    forward passes (a process out of batches repeats one and discards the result) and
    generation must continue on all processes until every one of them is done.
    """

    def __init__(self, model=None):
        import torch.distributed as dist
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        self.lockstep = False
        if self.distributed and model is not None:
            from torch.distributed.fsdp import FSDPModule
            self.lockstep = isinstance(model, FSDPModule)

    def my_batches(self, batches: list) -> list:
        """Batch b runs on process b mod world; under lockstep every process gets as many
        (``None`` marks a padding batch whose results are dropped)."""
        mine = batches[self.rank::self.world]
        if self.lockstep:
            rounds = -(-len(batches) // self.world)
            mine = mine + [None] * (rounds - len(mine))
        return mine

    def gather(self, items: list) -> list:
        if not self.distributed:
            return items
        import torch.distributed as dist
        parts = [None] * self.world
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]


def _batches(n_items: int, lengths: list, batch_size: int) -> list:
    """Global batches: indices sorted by length (longest first, ties in input order), then cut."""
    order = sorted(range(n_items), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, n_items, batch_size)]


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False)


# --------------------------------------------------------------------------- requests

def _eval_splits(benchmark, forget_split: str) -> dict:
    """{prefix: rows} for the four evaluation sets, with clear errors for missing splits."""
    out = {}
    for prefix, split_fmt, *_ in _SETS:
        split = split_fmt.format(forget=forget_split)
        if split not in benchmark.splits:
            raise KeyError(f"evaluation needs split {split!r}, which benchmark {benchmark.name!r} "
                           f"lacks; available: {', '.join(benchmark.splits)}")
        rows = benchmark.split(split)
        if not rows:
            raise ValueError(f"evaluation split {split!r} of {benchmark.name!r} is empty")
        for i, row in enumerate(rows):
            answers = row.get("perturbed_answer")
            if not isinstance(answers, list) or not answers:
                raise ValueError(f"{split}[{i}] needs a non-empty 'perturbed_answer' list for the "
                                 f"truth ratio; got {answers!r}")
            if len(answers) != len(rows[0]["perturbed_answer"]):
                raise ValueError(f"{split}: every row needs the same number of perturbed answers; "
                                 f"row 0 has {len(rows[0]['perturbed_answer'])}, row {i} has "
                                 f"{len(answers)}")
        out[prefix] = rows
    return out


def _likelihood_requests(sets: dict, tokenizer, config: EvalConfig) -> list:
    requests = []

    def add(metric, index, slot, question, answer):
        example = encode_qa(tokenizer, question, answer, config.max_length, config.template)
        if all(label == -100 for label in example["labels"]):
            raise ValueError(f"{metric}[{index}]: the prompt fills max_length={config.max_length} "
                             f"tokens and leaves no answer token to score; raise max_length")
        requests.append(_Request(metric, index, slot, example))

    for prefix, _, _, correct_field, _ in _SETS:
        for i, row in enumerate(sets[prefix]):
            add(f"{prefix}_Q_A_Prob", i, None, row["question"], row["answer"])
            if correct_field == "paraphrased_answer":
                add(f"{prefix}_Q_A_PARA_Prob", i, None, row["question"], row["paraphrased_answer"])
            for j, wrong in enumerate(row["perturbed_answer"]):
                add(f"{prefix}_Q_A_PERT_Prob", i, j, row["question"], wrong)
    return requests


# --------------------------------------------------------------------------- model passes

def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot batch")
    return pad


@torch.no_grad()
def _average_nlls(model, tokenizer, requests: list, config: EvalConfig, shards: _Shards) -> list:
    """avgNLL of every request's answer, one forward pass per batch."""
    lengths = [len(r.example["input_ids"]) for r in requests]
    batches = _batches(len(requests), lengths, config.batch_size)
    mine = shards.my_batches(batches)
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    results = []
    for batch in _progress(mine, len(mine), "eval likelihood", config.progress and shards.is_main):
        padding = batch is None
        batch = batches[0] if padding else batch
        inputs = collate([requests[i].example for i in batch], pad)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        logits = model(input_ids=inputs["input_ids"],
                       attention_mask=inputs["attention_mask"]).logits
        nll = metrics.answer_average_nll(logits, inputs["labels"]).tolist()
        if not padding:
            results.extend(zip(batch, nll))
    gathered = dict(shards.gather(results))
    return [gathered[i] for i in range(len(requests))]


def stop_token_ids(model, tokenizer) -> list:
    """Token ids that end a generated answer: EOS, the generation config's EOS ids, and the chat
    template's end-of-turn token (e.g. ``<|eot_id|>``, ``<|im_end|>``) when it has one."""
    ids = []
    candidates = [tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)]
    for value in candidates:
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    end_of_turn = _end_of_turn_token(tokenizer)
    if end_of_turn is not None:
        ids.append(end_of_turn)
    return sorted({int(i) for i in ids if i is not None})


def _end_of_turn_token(tokenizer) -> int | None:
    """The special token a chat template writes right after an assistant message, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "rkld-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except Exception:   # templates that reject this conversation shape have no usable answer
        return None
    tail = text.split(marker, 1)[-1].strip()
    if not tail:
        return None
    specials = set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
        if getattr(t, "special", False)}
    for token in sorted(specials, key=len, reverse=True):
        if token and tail.startswith(token):
            return tokenizer.convert_tokens_to_ids(token)
    return None


@torch.no_grad()
def _generate(model, tokenizer, prompts: list, config: EvalConfig, shards: _Shards,
              stop: bool = True) -> list:
    """Greedy generations for prompt token lists, batched with left padding. With ``stop``
    False, every generation is exactly ``max_new_tokens`` long (no end-of-text stop)."""
    from transformers import GenerationConfig
    stops = stop_token_ids(model, tokenizer) if stop else []
    pad = _pad_id(tokenizer)
    lengths = {} if stop else {"min_new_tokens": config.max_new_tokens}
    generation_config = GenerationConfig(max_new_tokens=config.max_new_tokens, do_sample=False,
                                         eos_token_id=stops or None, pad_token_id=pad,
                                         **lengths)
    batches = _batches(len(prompts), [len(p) for p in prompts], config.generation_batch_size)
    mine = shards.my_batches(batches)
    device = next(model.parameters()).device
    results = []
    for batch in _progress(mine, len(mine), "eval generation", config.progress and shards.is_main):
        padding = batch is None
        batch = batches[0] if padding else batch
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(prompts[i])
            input_ids[row, width - n:] = torch.tensor(prompts[i])
            attention_mask[row, width - n:] = 1
        out = model.generate(input_ids=input_ids.to(device),
                             attention_mask=attention_mask.to(device),
                             generation_config=generation_config, synced_gpus=shards.lockstep)
        if padding:
            continue
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            text = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
            results.append((i, text))
    gathered = dict(shards.gather(results))
    return [gathered[i] for i in range(len(prompts))]


def _cached_passes(model, tokenizer, sets: dict, requests: list, config: EvalConfig,
                   shards: _Shards):
    """The likelihood of every request and the generations, each prompt run once
    (rkld.eval_engine; with several processes each runs its share of the question groups and
    the results are gathered). Returns (nlls, {(prefix, index): text} or None)."""
    from .eval_engine import cached_eval_passes
    keys = [(prefix, i) for prefix, rows in sets.items() for i in range(len(rows))]
    prompts = [encode_prompt(tokenizer, sets[prefix][i]["question"], config.template)
               for prefix, i in keys]
    position = {key: q for q, key in enumerate(keys)}
    answers = []
    for request in requests:
        q = position[(request.metric.split("_Q_A_")[0], request.index)]
        answers.append((q, request.example["input_ids"][len(prompts[q]):]))
    bar = _progress(None, len(prompts), "eval (prompts run once)", config.progress) \
        if config.progress and shards.is_main else None
    stops = stop_token_ids(model, tokenizer)
    try:
        nlls, tokens = cached_eval_passes(
            model, prompts, answers, batch_size=config.batch_size,
            question_batch_size=config.generation_batch_size, pad_id=_pad_id(tokenizer),
            stop_ids=stops, max_new_tokens=config.max_new_tokens,
            max_length=config.max_length, generate=config.generation,
            progress=None if bar is None else (lambda n: bar.update(n - bar.n)),
            rank=shards.rank, world=shards.world)
    finally:
        if bar is not None:
            bar.close()
    if shards.world > 1:
        mine = ([(k, v) for k, v in enumerate(nlls) if v is not None],
                [(q, t) for q, t in enumerate(tokens or []) if t is not None])
        parts = shards.gather([mine])
        gathered_nlls = dict(pair for part in parts for pair in part[0])
        gathered_tokens = dict(pair for part in parts for pair in part[1])
        nlls = [gathered_nlls[k] for k in range(len(nlls))]
        if tokens is not None:
            tokens = [gathered_tokens[q] for q in range(len(tokens))]
    if tokens is None:
        return nlls, None
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return nlls, dict(zip(keys, texts))


# --------------------------------------------------------------------------- assembling logs

def _probability_entry(nll_by_index: dict) -> dict:
    """Q_A_Prob-style entry; values are an avgNLL (single answer) or a list of them."""
    by_index = {}
    for index, nll in sorted(nll_by_index.items()):
        prob = metrics.probability(nll)
        avg_loss = list(nll) if isinstance(nll, list) else float(nll)
        by_index[str(index)] = {"prob": prob.tolist(), "avg_loss": avg_loss}
    probs = np.array([v["prob"] for v in by_index.values()], dtype=np.float64)
    return {"agg_value": float(probs.mean()), "value_by_index": by_index}


def evaluate_model(model, tokenizer, benchmark, config: EvalConfig | None = None,
                   reference=None) -> dict:
    """Evaluate ``model`` on the TOFU sets of ``benchmark`` and return the log (see module doc).

    ``reference`` (retain-model truth ratios: a TOFU_EVAL.json path, a loaded log, or a
    sequence of R) fills ``forget_quality``; without it forget quality is ``None``
    (unavailable), never 0. Every process of a multi-process launch must call this; all of them
    get the full log.
    """
    config = config or EvalConfig()
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    shards = _Shards(model)
    try:
        sets = _eval_splits(benchmark, config.forget_split)
        requests = _likelihood_requests(sets, tokenizer, config)
        generations = None
        if config.engine == "cached" and not shards.lockstep:
            nlls, generations = _cached_passes(model, tokenizer, sets, requests, config, shards)
        else:
            nlls = _average_nlls(model, tokenizer, requests, config, shards)
        if config.generation and generations is None:
            prompts, keys = [], []
            for prefix, rows in sets.items():
                for i, row in enumerate(rows):
                    prompts.append(encode_prompt(tokenizer, row["question"], config.template))
                    keys.append((prefix, i))
            texts = _generate(model, tokenizer, prompts, config, shards)
            generations = dict(zip(keys, texts))
    finally:
        model.train(was_training)

    collected: dict = {}
    for request, nll in zip(requests, nlls):
        slots = collected.setdefault(request.metric, {})
        if request.slot is None:
            slots[request.index] = nll
        else:
            slots.setdefault(request.index, []).append(nll)   # slots arrive in order

    logs = {name: _probability_entry(values) for name, values in collected.items()}
    for prefix, _, tr_key, correct_field, normalised in _SETS:
        n = len(sets[prefix])
        correct_metric = f"{prefix}_Q_A_PARA_Prob" if correct_field == "paraphrased_answer" \
            else f"{prefix}_Q_A_Prob"
        correct = [collected[correct_metric][i] for i in range(n)]
        wrong = [collected[f"{prefix}_Q_A_PERT_Prob"][i] for i in range(n)]
        ratios = metrics.truth_ratio(correct, wrong)
        score = metrics.forget_truth_ratio_score(ratios) if prefix == "forget" \
            else metrics.utility_truth_ratio_score(ratios)
        logs[tr_key] = {"agg_value": score, "value_by_index": {
            str(i): {"score": float(r)} for i, r in enumerate(ratios)}}
        if normalised:
            values = metrics.normalised_probability(metrics.probability(correct),
                                                    metrics.probability(wrong))
            logs[f"{prefix}_Q_A_Prob_normalised"] = {
                "agg_value": float(values.mean()),
                "value_by_index": {str(i): {"prob": float(v)} for i, v in enumerate(values)}}
        if generations is not None:
            rows = sets[prefix]
            texts = [generations[(prefix, i)] for i in range(len(rows))]
            scores = metrics.rouge_scores(texts, [row["answer"] for row in rows])
            by_index = {}
            for i, (row, text, score_i) in enumerate(zip(rows, texts, scores)):
                by_index[str(i)] = {**score_i, "input": row["question"],
                                    "ground_truth": row["answer"], "generation": text}
            logs[f"{prefix}_Q_A_ROUGE"] = {
                "agg_value": float(np.mean([s["rougeL_recall"] for s in scores])),
                "value_by_index": by_index}

    # Three of the nine utility components are ROUGE scores, which need generation.
    utility = metrics.model_utility(logs) if config.generation else None
    logs["model_utility"] = {"agg_value": utility}
    return with_reference(logs, reference)


def with_reference(logs: dict, reference) -> dict:
    """Return ``logs`` with ``forget_quality`` computed against ``reference`` (None:
    unavailable)."""
    logs = dict(logs)
    value = None
    if reference is not None:
        value = metrics.forget_quality(logs, reference)
    logs["forget_quality"] = {"agg_value": value}
    return dict(sorted(logs.items()))


def summarize(logs: dict) -> dict:
    """``{metric: agg_value}`` for every metric of the log (forget quality may be None)."""
    return {name: entry.get("agg_value") for name, entry in sorted(logs.items())
            if isinstance(entry, dict) and "agg_value" in entry}


# --------------------------------------------------------------------------- fingerprints

def eval_fingerprint(model_id: str, benchmark, config: EvalConfig) -> dict:
    """What identifies a set of results: the model, the evaluation data and the configuration."""
    splits = _eval_split_names(config.forget_split)
    return {"format_version": EVAL_FORMAT_VERSION,
            "model": model_id,
            "data": {split: benchmark.fingerprint(split) for split in splits},
            "forget_split": config.forget_split,
            "config": config.fingerprint_fields()}


def eval_command(model_path, data: str, out_dir, config: EvalConfig, reference=None,
                 seed: int = 0, max_authors: int | None = None,
                 unverified_reference: bool = False) -> str:
    """The ``rkld eval`` command line that computes these results."""
    from .cli import command_line
    return command_line("eval", {
        "model": str(model_path), "data": str(data), "forget": config.forget_split,
        "reference": None if reference is None else str(reference), "out": str(out_dir),
        "unverified_reference": unverified_reference,
        "seed": seed, "max_authors": max_authors, "max_new_tokens": config.max_new_tokens,
        "max_length": config.max_length, "template": config.template,
        "batch_size": config.batch_size, "generation_batch_size": config.generation_batch_size,
        "no_generation": not config.generation, "engine": config.engine})


def training_command(model_path) -> str | None:
    """The ``rkld`` command that trained the model in ``model_path``, from its run record
    (None for a model rkld did not train)."""
    from .cli import command_line
    record = Path(model_path) / "run.json"
    if not record.is_file():
        return None
    try:
        run = read_json(record, "the model's run record")
        return command_line(run["stage"], run["config"])
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _fingerprint_differences(old: dict, new: dict) -> list:
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


# --------------------------------------------------------------------------- outputs

def write_outputs(out_dir, logs: dict, *, meta: dict | None = None, reference_logs=None,
                  title: str = "") -> dict:
    """Write TOFU_EVAL.json, TOFU_SUMMARY.json, EVAL_META.json, report.md and the plots.

    ``reference_logs`` (a log dict or path) adds the retain model's truth ratios to the
    histogram. Returns the summary.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(logs)
    _atomic_json(out / EVAL_LOG, logs)
    _atomic_json(out / SUMMARY_LOG, summary)
    from . import plots
    ratios = {"model": metrics.forget_truth_ratios(logs, "model").tolist()}
    if reference_logs is not None:
        ratios["retain reference"] = metrics.forget_truth_ratios(reference_logs,
                                                                 "reference").tolist()
    plots.truth_ratio_histogram(ratios, out / "truth_ratio_hist.png", title=title,
                                reference="retain reference")
    plots.utility_components({k: summary.get(k) for k in metrics.MODEL_UTILITY_KEYS if
                              summary.get(k) is not None}, out / "utility_components.png",
                             title=title)
    (out / "report.md").write_text(_report(summary, meta, title))
    if meta is not None:        # last: the metadata vouches for everything written before it
        _atomic_json(out / META_FILE, meta)
    return summary


def _atomic_json(path: Path, payload) -> None:
    atomic_write_json(path, payload, indent=2)


def _fmt(value) -> str:
    if value is None:
        return "unavailable"
    if isinstance(value, float) and (value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4)):
        return f"{value:.3e}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _report(summary: dict, meta: dict | None, title: str) -> str:
    lines = [f"# TOFU evaluation{': ' + title if title else ''}", ""]
    if meta:
        fp = meta.get("fingerprint", {})
        lines += [f"- model: `{meta.get('model_path', fp.get('model'))}`",
                  f"- data: `{meta.get('data')}`, forget split `{fp.get('forget_split')}`",
                  f"- reference (retain model log): `{meta.get('reference') or 'none'}`",
                  f"- wall time: {meta.get('wall_seconds', float('nan')):.1f} s", ""]
        commands = [c for c in (training_command(meta["model_path"]) if meta.get("model_path")
                                else None, meta.get("command")) if c]
        if commands:
            lines += ["Reproduce (the model's training run, from its run.json, then this "
                      "evaluation):", "", "```", *commands, "```", ""]
    fq = summary.get("forget_quality")
    lines += ["| metric | value |", "|---|---|",
              f"| forget quality | {_fmt(fq)} |",
              f"| model utility | {_fmt(summary.get('model_utility'))} |"]
    for key, value in summary.items():
        if key not in ("forget_quality", "model_utility"):
            lines.append(f"| {key} | {_fmt(value)} |")
    if fq is None:
        lines += ["", "Forget quality needs the retain model's log: pass `--reference "
                      "RETAIN/TOFU_EVAL.json` (made by `rkld eval` on the retain model)."]
    lines += ["", "![truth ratios](truth_ratio_hist.png)", "",
              "![utility components](utility_components.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- during unlearning

EPOCH_CURVE = "epoch_curve.json"
PEAK_CHECKPOINT = "peak"


# EvalConfig fields that change the truth ratios (hence forget quality): a reference computed
# with other values is not comparable. Batch sizes and generation only change the last bits
# or the ROUGE metrics.
REFERENCE_SETTINGS = ("max_length", "template")


def check_reference(reference, benchmark, forget_split: str, log=print,
                    config: EvalConfig | None = None, unverified: bool = False) -> str:
    """Validate a retain-model log for ``forget_split`` before any work starts; return its path.

    It must exist, be readable JSON, hold ``forget_truth_ratio.value_by_index`` and have one
    truth ratio per example of the forget split. Its ``EVAL_META.json`` (written by
    ``rkld eval``) must name the same forget split and evaluation data (benchmark, seed,
    authors) and, given ``config``, the same settings that shape the truth ratios
    (``REFERENCE_SETTINGS``: max length and prompt template). A log without that metadata
    (e.g. a published one) is refused unless ``unverified`` (``--unverified-reference``): then
    only its example count is checked, which is said in one line.
    """
    if reference is None:
        raise ValueError(f"evaluating forget quality needs the retain model's log: pass "
                         f"--reference RETAIN/TOFU_EVAL.json, made by `rkld eval --forget "
                         f"{forget_split}` on the retain model (finetuned on the retain split "
                         f"only)")
    path = Path(reference)
    if not path.is_file():
        raise FileNotFoundError(f"--reference {reference}: no such file; expected the retain "
                                f"model's TOFU_EVAL.json (run `rkld eval` on the retain model)")
    ratios = metrics.forget_truth_ratios(read_json(path, "the retain model's log (--reference)"),
                                         f"--reference {reference}")
    expected = len(benchmark.split(f"{forget_split}_perturbed"))
    if len(ratios) != expected:
        raise ValueError(f"--reference {reference} holds {len(ratios)} forget-set truth ratios but "
                         f"{forget_split} has {expected} examples; was it computed for another "
                         f"forget split?")
    meta_path = path.parent / META_FILE
    if not meta_path.exists():
        if not unverified:
            raise FileNotFoundError(
                f"--reference {reference} has no {META_FILE} beside it, so the data and settings "
                f"it was computed with (benchmark, forget split, max length, prompt template) "
                f"cannot be checked against this evaluation's; evaluate the retain model with "
                f"`rkld eval`, or pass --unverified-reference to use it anyway (only its "
                f"example count is checked)")
        log(f"[eval] --unverified-reference: {reference} has no {META_FILE} beside it, so only "
            f"its example count could be checked against {forget_split}")
        return str(path)
    fingerprint = read_json(meta_path, "the reference's evaluation metadata").get(
        "fingerprint", {})
    if fingerprint.get("forget_split") != forget_split:
        raise ValueError(f"--reference {reference} was computed for forget split "
                         f"{fingerprint.get('forget_split')!r}, not {forget_split!r}")
    data = {split: benchmark.fingerprint(split) for split in _eval_split_names(forget_split)}
    if fingerprint.get("data") != data:
        changed = sorted(split for split in set(data) | set(fingerprint.get("data") or {})
                         if (fingerprint.get("data") or {}).get(split) != data.get(split))
        raise ValueError(f"--reference {reference} was computed on other evaluation data "
                         f"(differs in: {', '.join(changed)}): another benchmark, seed or "
                         f"author count; evaluate the retain model on this data")
    if config is not None:
        recorded = fingerprint.get("config") or {}
        ours = config.fingerprint_fields()
        changed = [f"--{name.replace('_', '-')} {recorded.get(name)!r} there, {ours[name]!r} "
                   f"here" for name in REFERENCE_SETTINGS if recorded.get(name) != ours[name]]
        if changed:
            raise ValueError(f"--reference {reference} was computed with other evaluation "
                             f"settings ({'; '.join(changed)}), which change the truth ratios; "
                             f"evaluate the retain model with the same settings ({meta_path})")
    return str(path)


def _eval_split_names(forget_split: str) -> list:
    return sorted(split.format(forget=forget_split) for _, split, *_ in _SETS)


class EpochEvaluator:
    """``on_epoch_end`` callback for :func:`rkld.train.unlearn`: evaluate after every epoch.

    Writes, in ``out_dir``: ``epoch_eval/epoch-N/`` (TOFU_EVAL.json and TOFU_SUMMARY.json of
    that epoch), ``epoch_curve.json`` and ``epoch_curve.png`` (forget quality and model utility
    per epoch) and, when ``keep_peak``, the model of the epoch where forget quality first
    reaches its maximum in ``peak/`` (a later epoch replaces it only by a strictly higher
    value), which is how the RKLD paper reports its results. Model utility needs generation
    (``config.generation``); without it the curve's utility is None.
    """

    def __init__(self, out_dir, benchmark, config: EvalConfig, reference, keep_peak: bool = True,
                 resume: bool = False, unverified_reference: bool = False):
        self.out = Path(out_dir)
        self.benchmark = benchmark
        self.config = config
        is_path = not isinstance(reference, (list, tuple, np.ndarray))
        if is_path and reference is not None:
            check_separate(self.out, {"the reference log (--reference)": reference})
        self.reference = check_reference(reference, benchmark, config.forget_split,
                                         config=config, unverified=unverified_reference) \
            if is_path else list(reference)
        _eval_splits(benchmark, config.forget_split)   # fail now, not after the first epoch
        self.keep_peak = keep_peak
        self.curve: list = []
        self.peak_epoch = None
        self.seconds = 0.0   # time spent evaluating, so callers can tell it from training time
        curve_file = self.out / EPOCH_CURVE
        if resume and curve_file.exists():   # a resumed run keeps the epochs evaluated so far
            saved = read_json(curve_file, "the epoch curve")
            self.curve, self.peak_epoch = saved["curve"], saved["peak_epoch"]

    def __call__(self, epoch: int, model, tokenizer, stats: dict) -> None:
        started = time.time()
        logs = evaluate_model(model, tokenizer, self.benchmark, self.config, self.reference)
        summary = summarize(logs)
        point = {"epoch": epoch, "loss": stats.get("epoch_loss"),
                 **{key: summary.get(key) for key in (
                     "forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob",
                     "forget_Q_A_ROUGE", "retain_Q_A_Prob", "retain_Truth_Ratio")}}
        # A resumed run redoes the evaluation of an epoch that a crash interrupted; whatever
        # that interrupted evaluation (or a later epoch) left in the curve is replaced.
        self.curve = [p for p in self.curve if p["epoch"] < epoch] + [point]
        fq = point["forget_quality"]
        best = max((p["forget_quality"] for p in self.curve[:-1]), default=None)
        improved = best is None or fq > best
        if improved:
            self.peak_epoch = epoch
        elif self.peak_epoch is not None and self.peak_epoch >= epoch:
            self.peak_epoch = max(self.curve[:-1], key=lambda p: p["forget_quality"])["epoch"]
        shards = _Shards(model)
        if self.keep_peak and improved:
            _save_model(model, tokenizer, self.out / PEAK_CHECKPOINT, shards)
        if shards.is_main:
            folder = self.out / "epoch_eval" / f"epoch-{epoch}"
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_json(folder / EVAL_LOG, logs)
            _atomic_json(folder / SUMMARY_LOG, summary)
            _atomic_json(self.out / EPOCH_CURVE, {
                "reference": self.reference if isinstance(self.reference, str) else None,
                "peak_epoch": self.peak_epoch,
                "peak_forget_quality": max(p["forget_quality"] for p in self.curve),
                "peak_checkpoint": PEAK_CHECKPOINT if self.keep_peak else None,
                "curve": self.curve})
            from . import plots
            plots.epoch_curve([p["epoch"] for p in self.curve],
                              [p["forget_quality"] for p in self.curve],
                              [p["model_utility"] for p in self.curve],
                              self.out / "epoch_curve.png")
        self.seconds += time.time() - started


def _save_model(model, tokenizer, path: Path, shards: _Shards) -> None:
    """save_pretrained the full model (gathered first when FSDP shards it) with its tokenizer."""
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError("keeping the peak checkpoint needs full weights, but the model holds LoRA "
                         "adapters; evaluate every epoch without keeping the peak, or unlearn "
                         "without --lora")
    state = None
    if shards.lockstep:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    if shards.is_main:
        model.save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------- the command

def run_eval(model_path: str, data: str, out_dir, *, config: EvalConfig | None = None,
             reference=None, seed: int = 0, max_authors: int | None = None,
             overwrite: bool = False, unverified_reference: bool = False) -> dict:
    """``rkld eval``: evaluate a saved model and write the outputs to ``out_dir``.

    Results already in ``out_dir`` are reused when they were computed for the same model files,
    data and configuration (only forget quality is recomputed, against ``reference``); results
    for anything else are refused unless ``overwrite``. ``out_dir`` is locked
    (``.rkld.lock``) meanwhile: a second evaluation into it is refused. A reference without
    its EVAL_META.json needs ``unverified_reference`` (:func:`check_reference`). Returns the
    summary.
    """
    check_separate(Path(out_dir), {"the model (--model)": model_path, "the data (--data)": data,
                                   "the reference log (--reference)": reference})
    main = int(os.environ.get("RANK", "0")) == 0    # the process that writes the outputs
    with locked_output(out_dir, enabled=main):
        return _run_eval(model_path, data, out_dir, config=config, reference=reference,
                         seed=seed, max_authors=max_authors, overwrite=overwrite,
                         unverified_reference=unverified_reference)


def _run_eval(model_path: str, data: str, out_dir, *, config: EvalConfig | None, reference,
              seed: int, max_authors: int | None, overwrite: bool,
              unverified_reference: bool) -> dict:
    from .data import load_benchmark
    from .models import load_model
    from .parallel import init_distributed
    config = config or EvalConfig()
    out = Path(out_dir)
    check_separate(out, {"the model (--model)": model_path, "the data (--data)": data,
                         "the reference log (--reference)": reference})
    benchmark = load_benchmark(data, seed=seed, max_authors=max_authors)
    if reference is not None:
        reference = check_reference(reference, benchmark, config.forget_split, config=config,
                                    unverified=unverified_reference)
    fingerprint = eval_fingerprint(model_fingerprint(model_path), benchmark, config)
    info = init_distributed("auto")   # joins the process group of a multi-process launch
    shards = _Shards()

    existing = out / EVAL_LOG
    if existing.exists() and not overwrite:
        meta_path = out / META_FILE
        old = read_json(meta_path, "the evaluation metadata").get("fingerprint", {}) \
            if meta_path.exists() else {}
        differences = _fingerprint_differences(old, fingerprint)
        if differences:
            what = ", ".join(differences) if old else "unknown (no EVAL_META.json)"
            raise FileExistsError(
                f"{out} already holds evaluation results for another model, split or "
                f"configuration (differs in: {what}); pass --overwrite to replace them or choose "
                f"another --out")
        logs = with_reference(read_json(existing, "the evaluation log"), reference)
        if shards.is_main:
            meta = read_json(meta_path, "the evaluation metadata")
            meta["reference"] = reference
            meta["reference_verified"] = _reference_verified(reference)
            meta["command"] = eval_command(model_path, data, out, config, reference, seed,
                                           max_authors, unverified_reference)
            print(f"[eval] reusing results in {out} (same model, data and configuration)")
            return write_outputs(out, logs, meta=meta, reference_logs=reference,
                                 title=Path(model_path).name)
        return summarize(logs)

    if shards.is_main:
        # Invalidated first: if this evaluation fails, the logs it leaves are never reused.
        (out / META_FILE).unlink(missing_ok=True)
    start = time.time()
    model, tokenizer = load_model(model_path)
    model.to(info.device)
    logs = evaluate_model(model, tokenizer, benchmark, config, reference)
    meta = {"fingerprint": fingerprint, "model_path": str(model_path), "data": str(data),
            "reference": reference, "reference_verified": _reference_verified(reference),
            "command": eval_command(model_path, data, out, config, reference, seed, max_authors,
                                    unverified_reference),
            "processes": shards.world, "wall_seconds": time.time() - start,
            "versions": _versions()}
    summary = summarize(logs)
    if shards.is_main:
        summary = write_outputs(out, logs, meta=meta, reference_logs=reference,
                                title=Path(model_path).name)
    return summary


def _reference_verified(reference) -> bool | None:
    """Whether the reference's EVAL_META.json was checked (None: no reference)."""
    if reference is None:
        return None
    return (Path(reference).parent / META_FILE).exists()


def _versions() -> dict:
    import transformers

    from . import __version__
    return {"rkld": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}
