"""Corpus evaluation (``rkld eval --data CORPUS``): the paper's book-unlearning measures.

For a corpus benchmark (``books``, or a ``.txt`` / ``.jsonl`` corpus; ``rkld.data``) with
splits ``forget`` and optionally ``retain`` and ``holdout``:

- continuation: passages of ``prefix_tokens + continuation_tokens`` tokens are drawn (seeded)
  from the forget and the retain documents; the model continues each prefix greedily for
  ``continuation_tokens`` tokens (no end-of-text stop), and the continuation is scored
  against the true text by ROUGE-L (``rouge_score``, stemmer on, as the TOFU evaluation:
  recall and F1) and BLEU (``sacrebleu``: sentence BLEU per passage on a 0-1 scale, and
  corpus BLEU over the split).
  A model that still knows the forget book reproduces its passages; after unlearning its
  continuations should score on forget passages like those of a model that never read it,
  while retain passages keep their scores.
- perplexity: ``exp`` of the mean next-token NLL over windows of ``perplexity_tokens`` tokens
  from the forget, retain and held-out documents (held-out: text the training never saw).

Defaults: prefix 200 and continuation 200 tokens. These are the values of the book-continuation
protocol used for Harry Potter unlearning in earlier work; the RKLD paper's own text was not at
hand when this was written, so they are an assumption to check against it (both are flags).
The paper also reports zero-shot accuracy on general benchmarks, which needs data this project
does not ship; it is not computed here.

Outputs in ``out_dir`` (the TOFU evaluation's layout): ``CORPUS_EVAL.json`` (every metric as
``{"agg_value": x, "value_by_index": {...}}``, with each passage's prefix, generation and true
continuation), ``CORPUS_SUMMARY.json`` (``{metric: agg_value}``), ``report.md``,
``corpus_metrics.png`` and, written last, ``EVAL_META.json`` (what the results were computed
from; results for another model, data or setting are refused unless ``overwrite``).

Public API:
    CorpusEvalConfig, is_corpus(data) -> bool
    evaluate_corpus(model, tokenizer, benchmark, config) -> logs
    summarize(logs) -> dict
    run_corpus_eval(model_path, data, out_dir, config=None, seed=0, overwrite=False) -> summary
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import metrics
from .evaluate import EVAL_FORMAT_VERSION, EvalConfig, _fmt, _generate, _Shards, _versions
from .storage import atomic_write_json, check_separate, read_json

EVAL_LOG = "CORPUS_EVAL.json"
SUMMARY_LOG = "CORPUS_SUMMARY.json"
META_FILE = "EVAL_META.json"
CONTINUATION_SPLITS = ("forget", "retain")
PERPLEXITY_SPLITS = ("forget", "retain", "holdout")


@dataclass
class CorpusEvalConfig:
    """What to evaluate; every field but ``progress`` is part of the results' fingerprint."""
    prefix_tokens: int = 200
    continuation_tokens: int = 200
    passages: int = 20              # continuation passages per split (fewer if text is short)
    perplexity_tokens: int = 512    # tokens per perplexity window
    perplexity_windows: int = 20    # windows per split (at most)
    batch_size: int = 8             # windows per forward pass
    generation_batch_size: int = 8
    seed: int = 0                   # which passages and windows are drawn
    progress: bool = True

    def validate(self) -> None:
        for name in ("prefix_tokens", "continuation_tokens", "passages", "perplexity_windows",
                     "batch_size", "generation_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.perplexity_tokens, int) or self.perplexity_tokens < 2:
            raise ValueError(f"perplexity_tokens must be an integer >= 2; got "
                             f"{self.perplexity_tokens!r}")

    def fingerprint_fields(self) -> dict:
        fields = asdict(self)
        fields.pop("progress")
        return fields


def is_corpus(data) -> bool:
    """True for the data ``rkld eval`` evaluates as a corpus: ``books``, a .txt or .jsonl file."""
    text = str(data)
    return text == "books" or Path(text).suffix in (".txt", ".jsonl")


# --------------------------------------------------------------------------- sampling

def _documents(benchmark, split: str, tokenizer) -> list:
    if split not in benchmark.splits:
        return []
    return [list(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
            for row in benchmark.split(split)]


def _windows(documents: list, length: int, count: int, rng: random.Random) -> list:
    """Up to ``count`` distinct windows of ``length`` tokens, drawn from all documents with
    every possible start equally likely, non-overlapping within a document, in a fixed order."""
    slots = [(d, start) for d, doc in enumerate(documents)
             for start in range(0, len(doc) - length + 1, length)]
    if not slots:
        return []
    picked = sorted(rng.sample(slots, min(count, len(slots))))
    return [documents[d][start:start + length] for d, start in picked]


# --------------------------------------------------------------------------- metrics

@torch.no_grad()
def _perplexity(model, windows: list, batch_size: int) -> tuple:
    """``(perplexity, [mean NLL per window])``; logits are built a chunk of rows at a time."""
    from .models import final_hidden, output_head
    from .train import token_nll_sum
    device = next(model.parameters()).device
    weight, bias = output_head(model)
    per_window = []
    for start in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[start:start + batch_size], device=device)
        hidden = final_hidden(model, ids, torch.ones_like(ids))
        for row in range(ids.shape[0]):
            nll = token_nll_sum(hidden[row, :-1], weight, bias, ids[row, 1:])
            per_window.append(float(nll) / (ids.shape[1] - 1))
    mean = sum(per_window) / len(per_window)
    return math.exp(mean), per_window


def _bleu(generations: list, references: list) -> tuple:
    """Sentence BLEU per pair (0-1) and corpus BLEU (0-1), sacrebleu's defaults (13a tokens)."""
    import sacrebleu
    sentence = [sacrebleu.sentence_bleu(g, [r]).score / 100 for g, r in zip(generations,
                                                                            references)]
    corpus = sacrebleu.corpus_bleu(generations, [references]).score / 100
    return sentence, corpus


def _entry(values: list, agg=None, extra: list | None = None) -> dict:
    by_index = {}
    for i, value in enumerate(values):
        by_index[str(i)] = {"score": value, **(extra[i] if extra else {})}
    if agg is None:
        agg = sum(values) / len(values) if values else None
    return {"agg_value": agg, "value_by_index": by_index}


def evaluate_corpus(model, tokenizer, benchmark, config: CorpusEvalConfig | None = None) -> dict:
    """The corpus evaluation log (see the module docstring for its metrics)."""
    config = config or CorpusEvalConfig()
    config.validate()
    if "forget" not in benchmark.splits:
        raise ValueError(f"benchmark {benchmark.name!r} has no 'forget' split; the corpus "
                         f"evaluation needs a corpus (books, .txt or .jsonl)")
    model.eval()
    shards = _Shards(model)
    generation = EvalConfig(max_new_tokens=config.continuation_tokens,
                            generation_batch_size=config.generation_batch_size,
                            progress=config.progress)
    logs = {}
    for split in CONTINUATION_SPLITS:
        rng = random.Random(f"continuation-{config.seed}-{split}")
        documents = _documents(benchmark, split, tokenizer)
        passages = _windows(documents, config.prefix_tokens + config.continuation_tokens,
                            config.passages, rng)
        if not passages:
            if split == "forget":
                raise ValueError(f"the forget documents are shorter than prefix_tokens + "
                                 f"continuation_tokens = "
                                 f"{config.prefix_tokens + config.continuation_tokens} tokens; "
                                 f"lower --prefix-tokens / --continuation-tokens")
            continue
        prefixes = [p[:config.prefix_tokens] for p in passages]
        references = [tokenizer.decode(p[config.prefix_tokens:], skip_special_tokens=True)
                      .strip() for p in passages]
        # A fixed-length continuation, as the true text it is compared with.
        generations = _generate(model, tokenizer, prefixes, generation, shards, stop=False)
        rouge = metrics.rouge_scores(generations, references)
        bleu, corpus_bleu = _bleu(generations, references)
        texts = [{"prefix": tokenizer.decode(p, skip_special_tokens=True), "generation": g,
                  "continuation": r} for p, g, r in zip(prefixes, generations, references)]
        logs[f"{split}_ROUGE-L"] = _entry([r["rougeL_recall"] for r in rouge], extra=texts)
        logs[f"{split}_ROUGE-L_F1"] = _entry([r["rougeL_f1"] for r in rouge])
        logs[f"{split}_BLEU"] = _entry(bleu)
        logs[f"{split}_corpus_BLEU"] = {"agg_value": corpus_bleu}
    for split in PERPLEXITY_SPLITS:
        rng = random.Random(f"perplexity-{config.seed}-{split}")
        windows = _windows(_documents(benchmark, split, tokenizer), config.perplexity_tokens,
                           config.perplexity_windows, rng)
        if windows:
            perplexity, nlls = _perplexity(model, windows, config.batch_size)
            logs[f"{split}_perplexity"] = {"agg_value": perplexity, "value_by_index": {
                str(i): {"avg_nll": v} for i, v in enumerate(nlls)}}
    return logs


def summarize(logs: dict) -> dict:
    return {name: entry["agg_value"] for name, entry in logs.items()}


# --------------------------------------------------------------------------- outputs

def _report(summary: dict, meta: dict, title: str) -> str:
    cfg = meta["fingerprint"]["config"]
    lines = [f"# Corpus evaluation{': ' + title if title else ''}", "",
             f"- model: `{meta['model_path']}`", f"- data: `{meta['data']}`",
             f"- continuation: {cfg['prefix_tokens']}-token prefix, {cfg['continuation_tokens']} "
             f"greedy tokens, {cfg['passages']} passages per split; perplexity windows of "
             f"{cfg['perplexity_tokens']} tokens",
             f"- wall time: {meta['wall_seconds']:.1f} s", "",
             "| split | ROUGE-L recall | ROUGE-L F1 | BLEU (sentence mean) | corpus BLEU "
             "| perplexity |", "|---|---|---|---|---|---|"]
    for split in PERPLEXITY_SPLITS:
        cells = [summary.get(f"{split}_{key}") for key in
                 ("ROUGE-L", "ROUGE-L_F1", "BLEU", "corpus_BLEU", "perplexity")]
        if any(c is not None for c in cells):
            lines.append(f"| {split} | " + " | ".join("-" if c is None else _fmt(float(c))
                                                      for c in cells) + " |")
    lines += ["", "![metrics](corpus_metrics.png)", ""]
    return "\n".join(lines)


def write_outputs(out_dir, logs: dict, meta: dict, title: str = "") -> dict:
    from . import plots
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(logs)
    atomic_write_json(out / EVAL_LOG, logs, indent=2)
    atomic_write_json(out / SUMMARY_LOG, summary, indent=2)
    plots.metric_bars({k: v for k, v in summary.items() if "perplexity" not in k},
                      out / "corpus_metrics.png", title=title or "Corpus continuation scores")
    (out / "report.md").write_text(_report(summary, meta, title))
    atomic_write_json(out / META_FILE, meta, indent=2)    # last: it vouches for the rest
    return summary


def corpus_fingerprint(model_id: str, benchmark, config: CorpusEvalConfig) -> dict:
    return {"format_version": EVAL_FORMAT_VERSION, "kind": "corpus", "model": model_id,
            "data": {split: benchmark.fingerprint(split) for split in PERPLEXITY_SPLITS
                     if split in benchmark.splits},
            "config": config.fingerprint_fields()}


def run_corpus_eval(model_path: str, data: str, out_dir, *,
                    config: CorpusEvalConfig | None = None, seed: int = 0,
                    overwrite: bool = False) -> dict:
    """``rkld eval --data CORPUS``: evaluate a saved model, write the outputs, return the
    summary. ``seed`` is the data seed of a generated corpus (``books``); ``config.seed``
    chooses the passages."""
    from .data import load_benchmark
    from .models import load_model, model_fingerprint
    from .parallel import init_distributed
    config = config or CorpusEvalConfig()
    config.validate()
    out = Path(out_dir)
    check_separate(out, {"the model (--model)": model_path, "the data (--data)": data})
    benchmark = load_benchmark(data, seed=seed)
    fingerprint = corpus_fingerprint(model_fingerprint(model_path), benchmark, config)
    meta_path = out / META_FILE
    if (out / EVAL_LOG).exists() and not overwrite:
        old = read_json(meta_path, "the evaluation metadata").get("fingerprint") \
            if meta_path.exists() else None
        if old != fingerprint:
            raise FileExistsError(f"{out} already holds evaluation results for another model, "
                                  f"data or setting; pass --overwrite to replace them or choose "
                                  f"another --out")
        print(f"[eval] reusing results in {out} (same model, data and configuration)")
        return read_json(out / SUMMARY_LOG, "the evaluation summary")
    info = init_distributed("auto")
    meta_path.unlink(missing_ok=True)      # a failed evaluation's results are never reused
    start = time.time()
    model, tokenizer = load_model(model_path)
    model.to(info.device)
    logs = evaluate_corpus(model, tokenizer, benchmark, config)
    meta = {"fingerprint": fingerprint, "model_path": str(model_path), "data": str(data),
            "wall_seconds": time.time() - start, "versions": _versions()}
    if _Shards().is_main:
        return write_outputs(out, logs, meta, title=Path(model_path).name)
    return summarize(logs)
