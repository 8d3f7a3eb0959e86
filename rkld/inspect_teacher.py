"""``rkld inspect-teacher``: what the unlearning teacher pushes down, token by token.

For every forget example and every supervised answer position (the answer's tokens and the EOS
that ends it) the original model gives logits ``o`` and the strengthened model ``g``. The
teacher (docs/design.md#method) is ``z = o - alpha * relu(d)`` with the boost ``d = g - o``
(``logits``, the paper) or ``d = log_softmax(g) - log_softmax(o)`` (``logprobs``, an extension
of the paper, :mod:`rkld.teacher_boost`). This module reports, per position: which vocabulary
entries the teacher pushes down most (``alpha * relu(d)``, in logits), how many entries rose at
all, how much of the boost lands on the answer's own next token, and how far the teacher's
log-probability of that token lies below the original model's.

Positions are classed by the answer token they predict:
- ``fact``: part of the fact the question asks about;
- ``question``: a word the answer repeats from the question (the author's name, mostly);
- ``template``: the rest of the sentence (its wording, punctuation);
- ``end``: the EOS token that ends the answer.
On the synthetic benchmark the generator's wordings locate the fact exactly
(:func:`rkld.synthetic.answer_spans`). On other data (TOFU) a word rule stands in: a word
(``\\w+``) of the answer is ``question`` if it occurs in the question, ``template`` if the
answers of at least 10 % of the authors of the benchmark's ``full`` split use it (and of at
least 3: "the", "author", "born", "novels", ...), and ``fact`` otherwise; characters outside
words are ``template``. A token belongs to the first class, in the order fact, question, template, that
one of its non-space characters has.

Summary figures (over all positions of all examples, per class): the share of the total boost
``sum_v relu(d)`` and of the boost on the answer token ``relu(d_y)``; the fraction of the
vocabulary that rose (``d > 0``) per position; how often, at fact positions, the most-raised
entry is the fact token itself; the teacher's push on the answer token,
``log p_o(y) - log p_z(y)`` in nats; and, independent of the option, what strengthening did:
the rise of the answer token's log-probability and the mean rise of the raw logits.

Outputs in ``--out``: ``inspect_teacher.json`` (configuration, summary, every position) and
``inspect_teacher.md`` (the summary table and the first examples token by token).

Public API:
    InspectConfig, inspect_teacher(cfg) -> dict (the JSON written)
    token_classes(tokenizer, question, answer, template_words, benchmark) -> list of classes
    template_words(benchmark) -> set of lower-case words frequent in the answers
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CLASSES = ("fact", "question", "template", "end")
BOOSTS = ("logits", "logprobs")
TEMPLATE_SHARE = 0.1        # a word in the answers of >= 10 % of the authors (and >= 3) is wording
_WORD = re.compile(r"\w+")


@dataclass
class InspectConfig:
    model: str                      # the original model m_o
    strengthened: str               # the strengthened model m_g
    out: str
    data: str = "synthetic"
    forget: str = "forget10"
    data_seed: int = 0
    max_authors: int | None = None
    max_length: int = 512
    template: str = "auto"
    alpha: float = 8.0
    teacher_boost: str = "both"     # "logits", "logprobs" or "both"
    top_k: int = 5
    batch_size: int = 8
    report_examples: int = 10
    progress: bool = True

    def boosts(self) -> tuple:
        if self.teacher_boost == "both":
            return BOOSTS
        if self.teacher_boost not in BOOSTS:
            raise ValueError(f"teacher_boost must be logits, logprobs or both; got "
                             f"{self.teacher_boost!r}")
        return (self.teacher_boost,)

    def validate(self) -> None:
        self.boosts()
        for name in ("top_k", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0; got {self.alpha!r}")


# --------------------------------------------------------------------------- token classes

def template_words(benchmark) -> set:
    """Lower-case words used in the answers of at least ``TEMPLATE_SHARE`` of the authors of
    ``full`` (and of at least 3): the wording that answers share. Counted per author, not per
    answer, so that an author's name or hometown, repeated across that author's answers, stays
    a fact; without an author layout every answer counts as its own author."""
    answers = [row["answer"] for row in benchmark.split("full") if isinstance(row.get("answer"),
                                                                             str)]
    per_author = benchmark.qa_per_author or 1
    counts = Counter()
    for start in range(0, len(answers), per_author):
        counts.update({w.lower() for answer in answers[start:start + per_author]
                       for w in _WORD.findall(answer)})
    authors = math.ceil(len(answers) / per_author)
    threshold = max(3, TEMPLATE_SHARE * authors)
    return {word for word, count in counts.items() if count >= threshold}


def _char_classes(question: str, answer: str, frequent: set, synthetic: bool) -> list:
    """One class per character of ``answer`` (None for whitespace)."""
    classes = [None if ch.isspace() else "template" for ch in answer]
    spans = None
    if synthetic:
        from .synthetic import answer_spans
        spans = answer_spans(question, answer)
    if spans is not None:
        for cls, (start, end) in (("question", spans["name"]), ("fact", spans["fact"])):
            for i in range(start, end):
                if classes[i] is not None:
                    classes[i] = cls
        return classes
    asked = {w.lower() for w in _WORD.findall(question)}
    for word in _WORD.finditer(answer):
        text = word.group().lower()
        cls = "question" if text in asked else "template" if text in frequent else "fact"
        for i in range(*word.span()):
            classes[i] = cls
    return classes


def _token_offsets(tokenizer, answer: str, ids: list) -> list:
    """Character span of each answer token: the tokenizer's offsets when it has them, else
    from the lengths of decoded prefixes."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoded["input_ids"]) == list(ids):
            return [tuple(span) for span in encoded["offset_mapping"]]
    offsets, previous = [], 0
    for i in range(len(ids)):
        length = len(tokenizer.decode(ids[:i + 1]))
        offsets.append((previous, max(previous, length)))
        previous = max(previous, length)
    return offsets


def token_classes(tokenizer, question: str, answer: str, frequent: set,
                  synthetic: bool = False) -> list:
    """The class of every answer token (``tokenizer(answer, add_special_tokens=False)``) and a
    final ``"end"`` for the EOS token, as ``rkld.data.encode_qa`` supervises them."""
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    chars = _char_classes(question, answer, frequent, synthetic)
    out = []
    for start, end in _token_offsets(tokenizer, answer, ids):
        found = {chars[i] for i in range(start, min(end, len(chars)))} - {None}
        out.append(next((c for c in CLASSES if c in found), "template"))
    return out + ["end"]


# --------------------------------------------------------------------------- the measurement

def _position_stats(o: torch.Tensor, g: torch.Tensor, targets: torch.Tensor, alpha: float,
                    boost: str, top_k: int) -> dict:
    """Per-position figures for rows of logits ``o``, ``g`` ``[n, V]`` (float64) and the answer
    tokens ``targets`` ``[n]``."""
    from .teacher_boost import teacher_logits
    lp_o, lp_g = torch.log_softmax(o, -1), torch.log_softmax(g, -1)
    raised = (lp_g - lp_o) if boost == "logprobs" else (g - o)
    raised = torch.where(torch.isneginf(o), torch.zeros_like(raised), raised)
    push = alpha * torch.relu(raised)
    lp_z = torch.log_softmax(teacher_logits(o, g, alpha, boost), -1)
    rows = torch.arange(o.shape[0])
    top = push.topk(min(top_k, push.shape[1]), dim=-1)
    return {
        "boost_mass": torch.relu(raised).sum(-1),
        "target_boost": torch.relu(raised[rows, targets]),
        "raised_fraction": (raised > 0).double().mean(-1),
        "most_raised_is_target": raised.argmax(-1) == targets,
        "teacher_push_nats": lp_o[rows, targets] - lp_z[rows, targets],
        "top_ids": top.indices, "top_push": top.values,
    }


def _strengthening_stats(o, g, targets) -> dict:
    rows = torch.arange(o.shape[0])
    lp_o, lp_g = torch.log_softmax(o, -1), torch.log_softmax(g, -1)
    return {"original_logprob": lp_o[rows, targets],
            "logprob_rise": lp_g[rows, targets] - lp_o[rows, targets],
            "mean_logit_rise": (g - o).mean(-1),
            "target_logit_rise": g[rows, targets] - o[rows, targets]}


def _head_logits(model, batch, positions: list) -> list:
    """float64 logits at ``positions[b]`` of each sequence ``b`` of the batch."""
    from .models import final_hidden, output_head
    with torch.no_grad():
        hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
        weight, bias = output_head(model)
        out = []
        for b, where in enumerate(positions):
            rows = hidden[b, where].double()
            out.append(torch.nn.functional.linear(
                rows, weight.double(), None if bias is None else bias.double()))
    return out


def _mean(values) -> float | None:
    values = list(values)
    return float(sum(values) / len(values)) if values else None


def _summary(positions: list, boosts: tuple) -> dict:
    """Summary over all positions (dicts with class, strengthening and per-boost figures)."""
    by_class = {c: [p for p in positions if p["class"] == c] for c in CLASSES}
    summary = {"positions": {c: len(v) for c, v in by_class.items()},
               "strengthening": {}}
    for key in ("original_logprob", "logprob_rise", "mean_logit_rise", "target_logit_rise"):
        summary["strengthening"][key] = {c: _mean(p[key] for p in v) for c, v in by_class.items()}
        summary["strengthening"][key]["all"] = _mean(p[key] for p in positions)
    summary["original_answer_probability"] = _mean(math.exp(p["original_logprob"])
                                                   for p in positions)
    for boost in boosts:
        stats = [p[boost] for p in positions]
        total_mass = sum(s["boost_mass"] for s in stats) or float("nan")
        total_target = sum(s["target_boost"] for s in stats) or float("nan")
        fractions = [s["raised_fraction"] for s in stats]
        fact = [p[boost] for p in by_class["fact"]]
        summary[boost] = {
            "boost_share": {c: sum(p[boost]["boost_mass"] for p in v) / total_mass
                            for c, v in by_class.items()},
            "target_boost_share": {c: sum(p[boost]["target_boost"] for p in v) / total_target
                                   for c, v in by_class.items()},
            "raised_fraction": {"mean": _mean(fractions), "min": min(fractions, default=None),
                                "max": max(fractions, default=None),
                                **{c: _mean(p[boost]["raised_fraction"] for p in v)
                                   for c, v in by_class.items()}},
            "fact_most_raised_is_fact": _mean(float(s["most_raised_is_target"]) for s in fact),
            "teacher_push_nats": {c: _mean(p[boost]["teacher_push_nats"] for p in v)
                                  for c, v in by_class.items()},
        }
    return summary


def inspect_teacher(cfg: InspectConfig) -> dict:
    """Run the diagnostic; write ``inspect_teacher.json`` and ``inspect_teacher.md`` to
    ``cfg.out`` and return the JSON's content."""
    from .data import collate, encode_qa, load_benchmark
    from .models import check_same_vocabulary, load_model
    cfg.validate()
    boosts = cfg.boosts()
    bench = load_benchmark(cfg.data, seed=cfg.data_seed, max_authors=cfg.max_authors)
    rows = bench.split(cfg.forget)
    if not rows or not all(isinstance(r.get("answer"), str) for r in rows):
        raise ValueError(f"split {cfg.forget!r}: inspect-teacher needs question/answer rows")
    original, tokenizer = load_model(cfg.model)
    strengthened, strengthened_tokenizer = load_model(cfg.strengthened)
    check_same_vocabulary(tokenizer, strengthened_tokenizer, f"the original model ({cfg.model})",
                          f"the strengthened model ({cfg.strengthened})")
    original.eval()
    strengthened.eval()
    frequent = template_words(bench)
    synthetic = bench.name == "synthetic"
    examples = []
    for index, row in enumerate(rows):
        encoded = encode_qa(tokenizer, row["question"], row["answer"], cfg.max_length,
                            cfg.template)
        classes = token_classes(tokenizer, row["question"], row["answer"], frequent, synthetic)
        labels = encoded["labels"]
        first = next((t for t, label in enumerate(labels) if label != -100), len(labels))
        # position t - 1 predicts answer token t (truncation may have cut the answer short)
        where = [t - 1 for t in range(max(first, 1), len(labels))]
        examples.append({"index": index, "encoded": encoded, "classes": classes[:len(where)],
                         "where": where, "row": row})
    batches = range(0, len(examples), cfg.batch_size)
    if cfg.progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="inspect-teacher", unit="batch")
    positions, report = [], []
    for start in batches:
        chunk = examples[start:start + cfg.batch_size]
        batch = collate([e["encoded"] for e in chunk], tokenizer.pad_token_id)
        where = [e["where"] for e in chunk]
        o_rows, g_rows = _head_logits(original, batch, where), \
            _head_logits(strengthened, batch, where)
        for e, o, g in zip(chunk, o_rows, g_rows):
            ids = e["encoded"]["input_ids"]
            targets = torch.tensor([ids[t + 1] for t in e["where"]])
            base = _strengthening_stats(o, g, targets)
            per_boost = {b: _position_stats(o, g, targets, cfg.alpha, b, cfg.top_k)
                         for b in boosts}
            tokens = []
            for j, target in enumerate(targets.tolist()):
                position = {"example": e["index"], "class": e["classes"][j], "token": target,
                            "text": tokenizer.decode([target]),
                            **{k: float(v[j]) for k, v in base.items()}}
                for b, stats in per_boost.items():
                    position[b] = {
                        **{k: float(stats[k][j]) for k in ("boost_mass", "target_boost",
                                                           "raised_fraction",
                                                           "teacher_push_nats")},
                        "most_raised_is_target": bool(stats["most_raised_is_target"][j]),
                        "top_pushed": [[tokenizer.decode([i]), float(v)] for i, v in zip(
                            stats["top_ids"][j].tolist(), stats["top_push"][j].tolist())]}
                tokens.append(position)
            positions.extend(tokens)
            report.append({"index": e["index"], "question": e["row"]["question"],
                           "answer": e["row"]["answer"], "positions": tokens})
    result = {"config": asdict(cfg), "benchmark": bench.name,
              "class_rule": "synthetic wordings" if synthetic else
              f"words: in the question / in >= {TEMPLATE_SHARE:.0%} of the authors' answers "
              f"(template) / other (fact)",
              "summary": _summary(positions, boosts), "examples": report}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "inspect_teacher.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "inspect_teacher.json")
    (out / "inspect_teacher.md").write_text(format_report(result, cfg.report_examples))
    return result


# --------------------------------------------------------------------------- the report

def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _pct(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f} %"


def _cell(text: str) -> str:
    return repr(text)[1:-1].replace("|", "\\|")


def format_report(result: dict, report_examples: int = 10) -> str:
    """``inspect_teacher.md``: the summary and the first examples token by token."""
    cfg, summary = result["config"], result["summary"]
    boosts = [b for b in BOOSTS if b in summary]
    lines = ["# What the unlearning teacher pushes down", "",
             f"Original `{cfg['model']}`, strengthened `{cfg['strengthened']}`, benchmark "
             f"`{result['benchmark']}` (data seed {cfg['data_seed']}), forget split `{cfg['forget']}`, "
             f"alpha {cfg['alpha']}. Teacher z = o - alpha * relu(d) with d = g - o (`logits`, "
             f"the paper) or d = log_softmax(g) - log_softmax(o) (`logprobs`, an extension of "
             f"the paper). Token classes: {result['class_rule']}.", "",
             "## Strengthening", "",
             "| | " + " | ".join(CLASSES) + " | all |", "|---|" + "---|" * (len(CLASSES) + 1),
             "| positions | " + " | ".join(str(summary["positions"][c]) for c in CLASSES)
             + f" | {sum(summary['positions'].values())} |"]
    names = {"original_logprob": "log p_o(answer token)",
             "logprob_rise": "rise of log p(answer token), nats",
             "target_logit_rise": "rise of the answer token's logit",
             "mean_logit_rise": "mean rise of all logits"}
    for key, name in names.items():
        row = summary["strengthening"][key]
        lines.append(f"| {name} | " + " | ".join(_f(row[c]) for c in CLASSES)
                     + f" | {_f(row['all'])} |")
    lines += ["", f"Original model's mean answer-token probability "
                  f"{_f(summary['original_answer_probability'])}.", "",
              "## The teacher", "",
              "| | " + " | ".join(boosts) + " |", "|---|" + "---|" * len(boosts)]
    rows = []
    for c in CLASSES:
        rows.append((f"share of the boost sum_v relu(d) at {c} positions",
                     [_pct(summary[b]["boost_share"][c]) for b in boosts]))
    for c in CLASSES:
        rows.append((f"share of the answer-token boost relu(d_y) at {c} positions",
                     [_pct(summary[b]["target_boost_share"][c]) for b in boosts]))
    rows.append(("vocabulary raised per position: mean (min - max)",
                 [f"{_pct(summary[b]['raised_fraction']['mean'])} "
                  f"({_pct(summary[b]['raised_fraction']['min'])} - "
                  f"{_pct(summary[b]['raised_fraction']['max'])})" for b in boosts]))
    rows.append(("fact positions whose most-raised token is the fact token",
                 [_pct(summary[b]["fact_most_raised_is_fact"]) for b in boosts]))
    for c in CLASSES:
        rows.append((f"teacher's push on the answer token, log p_o - log p_z (nats), {c}",
                     [_f(summary[b]["teacher_push_nats"][c]) for b in boosts]))
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]
    for example in result["examples"][:report_examples]:
        lines += ["", f"## Example {example['index']}: {_cell(example['question'])}", "",
                  f"Answer: {_cell(example['answer'])}", "",
                  "| token | class | log p_o | rise (nats) | "
                  + " | ".join(f"{b}: raised / push on token (nats) / most pushed (logits)"
                               for b in boosts) + " |",
                  "|---|---|---|---|" + "---|" * len(boosts)]
        for p in example["positions"]:
            cells = []
            for b in boosts:
                s = p[b]
                top = ", ".join(f"`{_cell(t)}` {v:.2f}" for t, v in s["top_pushed"][:3])
                cells.append(f"{_pct(s['raised_fraction'])} / {_f(s['teacher_push_nats'])} / "
                             f"{top}")
            lines.append(f"| `{_cell(p['text'])}` | {p['class']} | {_f(p['original_logprob'])} "
                         f"| {_f(p['logprob_rise'])} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)
