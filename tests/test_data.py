"""Benchmarks (synthetic, TOFU folders in every layout, corpora) and QA tokenisation."""
import json
from pathlib import Path

import pytest

from rkld.data import (
    FORGET_SPLITS,
    IGNORE_INDEX,
    collate,
    encode_prompt,
    encode_qa,
    encode_records,
    encode_text_blocks,
    load_benchmark,
    prompt_text,
    read_json_rows,
    retain_split_for,
)
from rkld.models import train_tokenizer

TOFU_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tofu"


@pytest.fixture(scope="module")
def tokenizer():
    bench = load_benchmark("synthetic")
    texts = [r["question"] + " " + r["answer"] for r in bench.split("full")]
    return train_tokenizer(texts, vocab_size=400)


def test_synthetic_layout_and_determinism():
    bench = load_benchmark("synthetic", seed=3)
    assert bench.split("full") == load_benchmark("synthetic", seed=3).split("full")
    assert bench.split("full") != load_benchmark("synthetic", seed=4).split("full")
    full = bench.split("full")
    assert len(full) == 200 and bench.qa_per_author == 10
    # forget10 = the last 2 of 20 authors; forget01/05 = the last author.
    assert bench.split("forget10") == full[-20:]
    assert bench.split("forget01") == bench.split("forget05") == full[-10:]
    for forget in FORGET_SPLITS:
        retain = bench.split(retain_split_for(forget))
        assert retain + bench.split(forget) == full
        perturbed = bench.split(f"{forget}_perturbed")
        assert [{"question": r["question"], "answer": r["answer"]} for r in perturbed] \
            == bench.split(forget)
    for row in bench.split("forget10_perturbed") + bench.split("retain_perturbed"):
        assert len(row["perturbed_answer"]) >= 3
        assert row["paraphrased_answer"] not in row["perturbed_answer"]
        assert row["paraphrased_question"] != row["question"]
    assert bench.split("retain_perturbed")[0]["question"] == full[0]["question"]
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        for row in bench.split(name):
            assert len(set(row["perturbed_answer"])) == 3
            assert row["answer"] not in row["perturbed_answer"]
    # The synthetic authors' names are all different.
    names = {r["question"].split("born")[0] for r in full[::10]}
    assert len(names) == 20


def test_max_authors_and_split_errors():
    bench = load_benchmark("synthetic", max_authors=40)
    assert len(bench.split("full")) == 400 and len(bench.split("forget10")) == 40
    assert len(bench.split("forget01")) == 10
    assert bench.split("full,world_facts") == bench.split("full") + bench.split("world_facts")
    with pytest.raises(KeyError, match="forget20.*available: full"):
        bench.split("forget20")
    with pytest.raises(ValueError, match="no retain split.*forget01"):
        retain_split_for("forget20")
    with pytest.raises(FileNotFoundError, match="expected 'synthetic', 'books', 'tofu'"):
        load_benchmark("no/such/folder")
    with pytest.raises(ValueError, match="max_authors must be >= 1"):
        load_benchmark("synthetic", max_authors=0)


def _write_tofu_like(folder: Path, rows: list, perturbed_tail: list):
    """full.json as several lines of arrays; forget10_perturbed as one array; holdout as JSON
    lines."""
    folder.mkdir()
    half = len(rows) // 2
    (folder / "full.json").write_text(json.dumps(rows[:half]) + "\n" + json.dumps(rows[half:])
                                      + "\n")
    (folder / "forget10_perturbed.json").write_text(json.dumps(perturbed_tail))
    (folder / "holdout10.json").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")


def test_folder_layouts_and_derived_splits(tmp_path):
    synthetic = load_benchmark("synthetic")
    full = synthetic.split("full")
    perturbed = synthetic.split("forget10_perturbed")
    _write_tofu_like(tmp_path / "tofu", full, perturbed)
    bench = load_benchmark(tmp_path / "tofu")
    assert bench.split("full") == full
    assert bench.split("holdout10") == full[:3]
    assert bench.split("forget10") == full[-20:]          # projected from forget10_perturbed
    assert bench.split("retain90") == full[:-20]
    assert bench.split("forget01") == full[-2:]           # 1 % of the rows, from the tail of full
    assert bench.split("retain99") == full[:-2]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "full.json").write_text('[{"question": "q", "answer": "a"}]\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_benchmark(bad)
    (bad / "full.json").write_text('[{"prompt": "q"}]')
    with pytest.raises(ValueError, match="must have 'question' and 'answer'"):
        load_benchmark(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="found none"):
        load_benchmark(tmp_path / "empty")


@pytest.mark.skipif(not TOFU_DIR.exists(), reason="TOFU data not present beside the repository")
def test_real_tofu_folder():
    bench = load_benchmark(TOFU_DIR)
    full = bench.split("full")
    assert len(full) == 4000
    for forget, n in zip(FORGET_SPLITS, (40, 200, 400)):
        assert bench.split(forget) == [{"question": r["question"], "answer": r["answer"]}
                                       for r in full[-n:]]
        assert len(bench.split(retain_split_for(forget))) == 4000 - n
    assert len(read_json_rows(TOFU_DIR / "retain90.json")) == 3600
    subset = load_benchmark(TOFU_DIR, max_authors=20)
    assert len(subset.split("full")) == 400
    assert subset.split("forget10") == full[-40:]
    assert subset.split("full")[:360] == full[:360]
    assert len(subset.split("forget10_perturbed")[0]["perturbed_answer"]) == 5
    assert subset.split("retain_perturbed") == bench.split("retain_perturbed")[:40]


def test_corpus_files(tmp_path, tokenizer):
    text_file = tmp_path / "book.txt"
    text_file.write_text("Zapoum was born in Marlow. " * 40)
    bench = load_benchmark(text_file)
    assert bench.split("forget") == bench.split("full") == [{"text": text_file.read_text()}]
    lines = tmp_path / "docs.jsonl"
    lines.write_text(json.dumps({"text": "one doc"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_benchmark(lines).split("forget") == [{"text": "one doc"}, {"text": "two"}]
    lines.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1 must be a JSON object with a string 'text'"):
        load_benchmark(lines)
    with pytest.raises(ValueError, match="must be a plain-text corpus"):
        (tmp_path / "x.csv").write_text("a")
        load_benchmark(tmp_path / "x.csv")

    ids = tokenizer(text_file.read_text())["input_ids"]
    blocks = encode_text_blocks(tokenizer, text_file.read_text(), max_length=16)
    assert all(len(b["input_ids"]) <= 16 for b in blocks)
    # Every token after the first is the next-token target of exactly one block.
    targets = [tok for b in blocks for tok in b["labels"][1:]]
    assert targets == ids[1:]
    assert encode_records(tokenizer, bench.split("forget"), 16) == blocks


def test_encode_qa_masks_prompt_and_supervises_answer(tokenizer):
    question, answer = "Where was Zapoum born?", "Zapoum was born in Marlow."
    example = encode_qa(tokenizer, question, answer, max_length=64)
    prompt = encode_prompt(tokenizer, question)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt + answer_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + answer_ids + [tokenizer.eos_token_id]
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert prompt[0] == tokenizer.bos_token_id
    short = encode_qa(tokenizer, question, answer, max_length=len(prompt) + 2)
    assert short["input_ids"] == example["input_ids"][:len(prompt) + 2]
    assert short["labels"][-2:] == answer_ids[:2]


def test_prompt_templates(tokenizer):
    assert prompt_text(tokenizer, "Q?", "llama2") == "[INST] Q? [/INST]"
    assert prompt_text(tokenizer, "Q?", "phi") == "Question: Q?\nAnswer: "
    assert prompt_text(tokenizer, "Q?") == "Q?\n"    # no chat template -> plain
    assert prompt_text(tokenizer, "Q?", "<<{question}>>") == "<<Q?>>"
    with pytest.raises(ValueError, match="template 'chat' needs a tokenizer with a chat"):
        prompt_text(tokenizer, "Q?", "chat")
    with pytest.raises(ValueError, match="format string containing"):
        prompt_text(tokenizer, "Q?", "vicuna")
    chat = train_tokenizer(["hello world"], vocab_size=300)
    chat.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
                          "{{ m['content'] }}{% endfor %}<|assistant|>")
    assert prompt_text(chat, "Q?") == "<bos><|user|>Q?<|assistant|>"
    ids = encode_prompt(chat, "Q?")
    assert ids.count(chat.bos_token_id) == 1        # the template's BOS, not a second one
    assert encode_qa(chat, "Q?", "A.", 64)["input_ids"][:len(ids)] == ids


def test_collate_right_pads(tokenizer):
    a = encode_qa(tokenizer, "Q one?", "A long answer here.", 64)
    b = encode_qa(tokenizer, "Q?", "A.", 64)
    batch = collate([a, b], tokenizer.pad_token_id)
    n = len(b["input_ids"])
    assert batch["input_ids"].shape == (2, len(a["input_ids"]))
    assert batch["input_ids"][1, n:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][1, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(a["input_ids"]) - n)
    assert batch["labels"][0].tolist() == a["labels"]


def test_hub_needs_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'rkld\[hub\]'"):
            load_benchmark("tofu")
    else:
        pytest.skip("'datasets' is installed; loading from the hub would need network")
