"""Corpus unlearning: the fictitious books, corpus splits, and the corpus evaluation."""
import json
import math

import pytest
import torch

from rkld import corpus_eval
from rkld.books import generate_books, write_books
from rkld.cli import main
from rkld.corpus_eval import CorpusEvalConfig, evaluate_corpus, run_corpus_eval
from rkld.data import load_benchmark
from rkld.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_forget=1, n_retain=2, n_holdout=1, min_words=300, max_words=500)


def test_books_are_deterministic_long_and_one_world_each():
    books = generate_books(seed=3, **SMALL)
    assert books == generate_books(seed=3, **SMALL)
    assert books != generate_books(seed=4, **SMALL)
    every = [b for split in ("forget", "retain", "holdout") for b in books[split]]
    assert [len(books[s]) for s in ("forget", "retain", "holdout")] == [1, 2, 1]
    assert all(300 <= len(b["text"].split()) <= 500 for b in every)
    # Each book is about its own world, which no other book mentions.
    for book in every:
        assert book["text"].count(book["world"]) >= 3
        assert all(book["world"] not in other["text"] for other in every if other is not book)
    long = generate_books(seed=0, n_forget=1, n_retain=1, n_holdout=1)
    assert all(6000 <= len(b["text"].split()) <= 96000 for s in long.values() for b in s)
    with pytest.raises(ValueError, match="n_forget must be a positive integer"):
        generate_books(n_forget=0)
    with pytest.raises(ValueError, match="min_words <= max_words"):
        generate_books(min_words=900, max_words=100)


def test_corpus_splits_from_books_and_from_a_users_jsonl(tmp_path):
    path = write_books(tmp_path / "books.jsonl", seed=1, **SMALL)
    bench = load_benchmark(str(path))
    books = generate_books(seed=1, **SMALL)
    assert [r["text"] for r in bench.split("forget")] == [b["text"] for b in books["forget"]]
    assert len(bench.split("retain")) == 2 and len(bench.split("holdout")) == 1
    assert bench.split("full") == bench.split("forget") + bench.split("retain")
    assert load_benchmark("books", seed=1).split("forget") != load_benchmark("books").split(
        "forget")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "one document"}) + "\n")
    assert load_benchmark(str(plain)).splits == ("forget", "full")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "split": "train"}) + "\n")
    with pytest.raises(ValueError, match="split 'train'; expected one of forget, retain"):
        load_benchmark(str(bad))
    only_retain = tmp_path / "retain_only.jsonl"
    only_retain.write_text(json.dumps({"text": "x", "split": "retain"}) + "\n")
    with pytest.raises(ValueError, match="no text to forget"):
        load_benchmark(str(only_retain))


CONFIG = CorpusEvalConfig(prefix_tokens=12, continuation_tokens=10, passages=3,
                          perplexity_tokens=24, perplexity_windows=4, batch_size=3,
                          progress=False)


def test_continuations_are_scored_against_their_own_true_text(pair, tmp_path, monkeypatch):
    model, tokenizer = load_model(pair / "original")
    bench = load_benchmark(str(write_books(tmp_path / "b.jsonl", seed=0, **SMALL)))
    seen = []

    def perfect(model, tokenizer, prefixes, config, shards, stop=True):
        """Return each prefix's true continuation: ROUGE-L and BLEU must then be 1."""
        out = []
        for prefix in prefixes:
            for row in bench.split("forget") + bench.split("retain"):
                ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
                for start in range(len(ids) - len(prefix)):
                    if ids[start:start + len(prefix)] == prefix:
                        cont = ids[start + len(prefix):start + len(prefix) + 10]
                        out.append(tokenizer.decode(cont, skip_special_tokens=True).strip())
                        break
                else:
                    continue
                break
        seen.append(len(prefixes))
        assert all(len(p) == 12 for p in prefixes)
        return out

    monkeypatch.setattr(corpus_eval, "_generate", perfect)
    logs = evaluate_corpus(model, tokenizer, bench, CONFIG)
    assert seen == [3, 3]
    for split in ("forget", "retain"):
        assert logs[f"{split}_ROUGE-L"]["agg_value"] == pytest.approx(1.0)
        assert logs[f"{split}_BLEU"]["agg_value"] == pytest.approx(1.0)
    monkeypatch.setattr(corpus_eval, "_generate",
                        lambda m, t, prefixes, c, s, stop=True: ["zzz qqq"] * len(prefixes))
    logs = evaluate_corpus(model, tokenizer, bench, CONFIG)
    assert logs["forget_ROUGE-L"]["agg_value"] < 0.2 and logs["forget_BLEU"]["agg_value"] < 0.1


def test_perplexity_is_exp_of_the_mean_token_nll(pair, tmp_path):
    model, tokenizer = load_model(pair / "original")
    bench = load_benchmark(str(write_books(tmp_path / "b.jsonl", seed=0, **SMALL)))
    logs = evaluate_corpus(model, tokenizer, bench, CONFIG)
    windows = corpus_eval._windows(corpus_eval._documents(bench, "holdout", tokenizer), 24, 4,
                                   __import__("random").Random("perplexity-0-holdout"))
    ids = torch.tensor(windows)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            ids[:, 1:].reshape(-1))
    assert logs["holdout_perplexity"]["agg_value"] == pytest.approx(math.exp(nll.item()),
                                                                     rel=1e-4)
    assert set(logs) >= {"forget_perplexity", "retain_perplexity", "forget_corpus_BLEU"}


def test_rkld_eval_on_a_corpus_writes_logs_report_and_plot(pair, tmp_path, capsys):
    data = write_books(tmp_path / "b.jsonl", seed=0, **SMALL)
    out = tmp_path / "eval"
    args = ["eval", "--model", str(pair / "original"), "--data", str(data), "--out", str(out),
            "--prefix-tokens", "12", "--continuation-tokens", "8", "--passages", "2",
            "--perplexity-tokens", "16", "--perplexity-windows", "2", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "CORPUS_SUMMARY.json").read_text())
    assert 0 <= summary["forget_ROUGE-L"] <= 1 and summary["holdout_perplexity"] > 1
    assert (out / "corpus_metrics.png").stat().st_size > 0
    assert "| forget |" in (out / "report.md").read_text()
    assert json.loads((out / "EVAL_META.json").read_text())["fingerprint"]["kind"] == "corpus"
    capsys.readouterr()
    # Another setting in the same folder is refused; the same one is reused.
    assert main(args[:-1] + ["--passages", "3", "--no-progress"]) == 2
    assert "already holds evaluation results" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shorter than prefix_tokens"):
        run_corpus_eval(str(pair / "original"), str(data), tmp_path / "e2", config=
                        CorpusEvalConfig(prefix_tokens=5000, progress=False))


@pytest.mark.slow
def test_corpus_demo_runs_end_to_end(tmp_path):
    from rkld.corpus_demo import CorpusDemoConfig, run_corpus_demo
    cfg = CorpusDemoConfig(
        out=str(tmp_path / "demo"), progress=False,
        books=dict(n_forget=1, n_retain=1, n_holdout=1, min_words=250, max_words=300),
        tiny={"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
              "vocab_size": 300},
        max_length=64, finetune_epochs=1, strengthen_epochs=1, unlearn_epochs=1,
        eval=dict(prefix_tokens=8, continuation_tokens=6, passages=2, perplexity_tokens=16,
                  perplexity_windows=2))
    results = run_corpus_demo(cfg)
    assert set(results) == {"target", "retain", "rkld", "fkld"}
    for r in results.values():
        assert 0 <= r["forget_ROUGE-L"] <= 1 and r["holdout_perplexity"] > 1
    assert "| **rkld** (reverse KL) |" in (tmp_path / "demo" / "report.md").read_text()
    assert (tmp_path / "demo" / "eval" / "rkld" / "CORPUS_EVAL.json").exists()
