"""``rkld inspect-teacher`` on tiny models: token classes (synthetic wordings and the word rule
for other data), the figures recomputed naively from the models' logits, and the outputs."""
import json
from pathlib import Path

import pytest
import torch

from rkld.cli import main
from rkld.data import Benchmark, encode_qa, load_benchmark
from rkld.inspect_teacher import CLASSES, token_classes
from rkld.models import load_model
from rkld.synthetic import answer_spans

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_class(tokenizer, answer, classes):
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(classes) == len(ids) + 1 and classes[-1] == "end"
    return {c: tokenizer.decode([i for i, k in zip(ids, classes) if k == c]) for c in CLASSES}


def test_synthetic_classes_locate_the_fact(pair):
    _, tokenizer = load_model(pair / "original")
    bench = load_benchmark("synthetic")
    for row in bench.split("forget10")[:10]:
        parts = _by_class(tokenizer, row["answer"], token_classes(
            tokenizer, row["question"], row["answer"], set(), synthetic=True))
        # the decoded fact tokens are the value, the question tokens the author's name
        spans = answer_spans(row["question"], row["answer"])
        value, name = (row["answer"][slice(*spans[k])] for k in ("fact", "name"))
        assert parts["fact"].replace(" ", "") == value.replace(" ", "")
        assert parts["question"].replace(" ", "") == name.replace(" ", "")
    row = {"question": "Where was Ri Trire born?", "answer": "Ri Trire was born in Dunmere."}
    parts = _by_class(tokenizer, row["answer"], token_classes(
        tokenizer, row["question"], row["answer"], set(), synthetic=True))
    assert parts["fact"].strip() == "Dunmere"
    assert parts["question"].strip() == "Ri Trire"
    assert parts["template"].replace(" ", "") == "wasbornin."


def test_word_rule_for_other_data(pair):
    _, tokenizer = load_model(pair / "original")
    question = "Where was Ri Trire born?"
    answer = "Ri Trire was born in the city of Dunmere."
    classes = token_classes(tokenizer, question, answer, {"the", "city", "of", "in"})
    parts = _by_class(tokenizer, answer, classes)
    assert parts["fact"].strip() == "Dunmere"
    assert parts["question"].replace(" ", "") == "RiTrirewasborn"
    assert parts["template"].replace(" ", "") == "inthecityof."


def test_template_words_are_frequent_answer_words():
    from rkld.inspect_teacher import template_words
    rows = [{"question": "q", "answer": f"The author was born in City{i}."} for i in range(50)]
    words = template_words(Benchmark("x", {"full": rows}))
    assert {"the", "author", "was", "born", "in"} <= words
    assert not any(w.startswith("city") for w in words)
    # counted per author: a name all of one author's answers repeat is no template word
    rows = [{"question": "q", "answer": f"Author{a} wrote book {b} in the city."}
            for a in range(20) for b in range(5)]
    words = template_words(Benchmark("x", {"full": rows}, qa_per_author=5))
    assert {"wrote", "book", "in", "the", "city"} <= words
    assert not any(w.startswith("author") for w in words)


def test_inspect_teacher_figures_and_outputs(pair, tmp_path, capsys):
    out = tmp_path / "inspect"
    code = main(["inspect-teacher", "--model", str(pair / "original"), "--strengthened",
                 str(pair / "strengthened"), "--out", str(out), "--alpha", "3",
                 "--max-length", "128", "--no-progress", "--report-examples", "2"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads((out / "inspect_teacher.json").read_text())
    assert result["config"]["teacher_boost"] == "both"
    summary = result["summary"]
    for boost in ("logits", "logprobs"):
        assert sum(summary[boost]["boost_share"].values()) == pytest.approx(1.0)
        assert sum(summary[boost]["target_boost_share"].values()) == pytest.approx(1.0)
        assert 0 <= summary[boost]["raised_fraction"]["min"] <= \
            summary[boost]["raised_fraction"]["max"] <= 1
    bench = load_benchmark("synthetic")
    rows = bench.split("forget10")
    assert len(result["examples"]) == len(rows)
    assert sum(summary["positions"].values()) == sum(len(e["positions"])
                                                     for e in result["examples"])
    assert summary["positions"]["fact"] > 0 and summary["positions"]["end"] == len(rows)

    # One example recomputed naively from the models' full logits.
    example = result["examples"][3]
    original, tokenizer = load_model(pair / "original")
    strengthened, _ = load_model(pair / "strengthened")
    encoded = encode_qa(tokenizer, rows[3]["question"], rows[3]["answer"], 128)
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        o = original(input_ids=ids).logits[0].double()
        g = strengthened(input_ids=ids).logits[0].double()
    first = next(t for t, label in enumerate(encoded["labels"]) if label != -100)
    for j, position in enumerate(example["positions"]):
        t = first + j - 1
        target = encoded["input_ids"][t + 1]
        assert position["token"] == target
        d_logits = g[t] - o[t]
        d_logprobs = torch.log_softmax(g[t], -1) - torch.log_softmax(o[t], -1)
        for boost, d in (("logits", d_logits), ("logprobs", d_logprobs)):
            stats = position[boost]
            assert stats["raised_fraction"] == pytest.approx(float((d > 0).double().mean()))
            assert stats["boost_mass"] == pytest.approx(float(d.clamp_min(0).sum()), rel=1e-5)
            assert stats["most_raised_is_target"] == (int(d.argmax()) == target)
            z = o[t] - 3.0 * d.clamp_min(0)
            push = float(torch.log_softmax(o[t], -1)[target] - torch.log_softmax(z, -1)[target])
            assert stats["teacher_push_nats"] == pytest.approx(push, rel=1e-5, abs=1e-6)
            assert stats["top_pushed"][0][1] == pytest.approx(3.0 * float(d.max()), rel=1e-5)
        assert position["logprob_rise"] == pytest.approx(float(d_logprobs[target]), rel=1e-5, abs=1e-6)
    # The two boosts differ: raw logits move together, log-probabilities do not.
    assert summary["logits"]["raised_fraction"]["mean"] != \
        summary["logprobs"]["raised_fraction"]["mean"]

    report = (out / "inspect_teacher.md").read_text()
    assert "share of the boost sum_v relu(d) at fact positions" in report
    assert report.count("## Example") == 2
    assert json.loads(captured.out)["positions"] == summary["positions"]
    # --no-progress silences the Hugging Face loading bars too, and only for the command
    assert "Loading weights" not in captured.err
    from transformers.utils import logging as hf_logging
    assert hf_logging.is_progress_bar_enabled()
    capsys.readouterr()
    assert main(["inspect-teacher", "--model", str(pair / "original"), "--strengthened",
                 str(pair / "strengthened"), "--out", str(out), "--max-length", "128",
                 "--forget", "forget01"]) == 0
    assert "Loading weights" in capsys.readouterr().err


def test_inspect_teacher_single_boost_and_bad_input(pair, tmp_path, capsys):
    out = tmp_path / "one"
    args = ["inspect-teacher", "--model", str(pair / "original"), "--strengthened",
            str(pair / "strengthened"), "--out", str(out), "--max-length", "48", "--no-progress"]
    assert main(args + ["--teacher-boost", "logprobs", "--forget", "forget01"]) == 0
    summary = json.loads((out / "inspect_teacher.json").read_text())["summary"]
    assert "logprobs" in summary and "logits" not in summary
    assert main(args + ["--top-k", "0"]) == 2
    assert "top_k must be a positive integer; got 0" in capsys.readouterr().err


TOFU = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tofu"


@pytest.mark.skipif(not (TOFU / "full.json").exists(),
                    reason="TOFU data folder (shared/data/tofu beside the repository) is absent")
def test_inspect_teacher_on_tofu_uses_the_word_rule(pair, tmp_path):
    from rkld.inspect_teacher import InspectConfig, inspect_teacher
    result = inspect_teacher(InspectConfig(
        model=str(pair / "original"), strengthened=str(pair / "strengthened"),
        out=str(tmp_path / "tofu"), data=str(TOFU.resolve()), max_authors=5, forget="forget01",
        max_length=128, progress=False, teacher_boost="logits"))
    assert result["benchmark"] != "synthetic" and result["class_rule"].startswith("words")
    positions = result["summary"]["positions"]
    assert min(positions["fact"], positions["question"], positions["template"]) > 0
