"""Benchmarks (TOFU and friends) and their tokenisation.

Public API:
    load_benchmark(data, seed=0, max_authors=None) -> Benchmark
        ``data`` is one of
        - ``"synthetic"``: the built-in fictitious-authors benchmark (``rkld.synthetic``),
          20 authors x 10 QA by default (``max_authors`` changes the number of authors), plus
          held-out authors (``holdoutNN``, as many as ``forgetNN`` has) that no split trains
          on; ``"synthetic:phrasings=3"`` trains on every fact in 3 wordings (its rows in
          ``full`` / ``forgetNN`` / ``retainNN`` are question x wording; the evaluation splits
          keep one row per question, in a wording never trained on);
        - ``"tofu"``: the hub dataset ``locuslab/TOFU`` through ``datasets`` (network needed);
        - a folder of TOFU-format JSON files (``full.json``, ``forget10_perturbed.json``, ...);
        - ``"books"``: invented books, one long document per invented world
          (``rkld.books``; ``seed`` is its data seed), as splits ``forget``, ``retain``,
          ``holdout`` and ``full`` (forget + retain);
        - a plain-text corpus: a ``.txt`` file (one document, all of it to forget) or a
          ``.jsonl`` file whose lines hold a ``text`` field (one document each) and optionally
          a ``split`` (``forget``, the default, ``retain`` or ``holdout``): the same splits.
    Benchmark.splits -> tuple of split names; Benchmark.split(name) -> list[dict];
    Benchmark.fingerprint(name) -> sha256 of the split's rows (for run records).
        A name may join several splits with commas ("full,world_facts"): their rows in order.
    retain_split_for(forget_split) -> "retain90" for "forget10" etc.
    FORGET_SPLITS, TOFU_QA_PER_AUTHOR

    PROMPT_TEMPLATES: presets "llama2" ("[INST] {question} [/INST]"), "phi"
        ("Question: {question}\\nAnswer: ") and "plain" ("{question}\\n"); "auto" (the default
        everywhere) means the tokenizer's chat template when it has one, else "plain"; "chat"
        insists on the chat template; any other string containing "{question}" is used as is.
    prompt_text(tokenizer, question, template="auto") -> str    the prompt, as text
    encode_prompt(tokenizer, question, template="auto") -> list[int]
        the prompt's token ids exactly as ``encode_qa`` starts them: use these for generation.
    encode_qa(tokenizer, question, answer, max_length, template="auto") -> dict
        ``input_ids``, ``attention_mask``, ``labels`` (lists of ints, unpadded). Prompt tokens are
        labelled -100; the answer and the EOS token that ends it are supervised. Labels follow the
        Hugging Face convention (``labels[i] == input_ids[i]`` where supervised; the shift to
        next-token targets happens in the loss).
    encode_text_blocks(tokenizer, text, max_length) -> list[dict]
        a document cut into blocks of at most ``max_length`` tokens, every token supervised once
        (consecutive blocks overlap by one token, whose label the earlier block already covers).
    encode_records(tokenizer, rows, max_length, template="auto") -> list[dict]
        QA rows through ``encode_qa``, text rows (``{"text": ...}``) through ``encode_text_blocks``.
    collate(examples, pad_token_id) -> dict of LongTensors, right-padded (labels -100, mask 0);
        packed examples (``rkld.packing``) also get ``position_ids`` (padding: its own).

Split layout (TOFU's, reproduced for the synthetic benchmark and for author subsets):
``full`` holds every author's QA, author after author; ``forgetNN`` (NN in 01, 05, 10) are the
last NN % of the authors (at least one), ``retainNN`` the others; ``forgetNN_perturbed`` add the
evaluation fields (``paraphrased_question``, ``paraphrased_answer``, ``perturbed_answer``);
``retain_perturbed`` are the first 10 % of the authors with the evaluation fields;
``real_authors_perturbed`` and ``world_facts_perturbed`` hold general-knowledge questions with
three wrong answers each; ``holdoutNN`` (TOFU's files and the synthetic benchmark) are authors
outside ``full``, as many as ``forgetNN`` holds. With 20 synthetic authors: forget01 and
forget05 are the last author, forget10 the last two.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .synthetic import generate_synthetic

FORGET_SPLITS = ("forget01", "forget05", "forget10")
TOFU_QA_PER_AUTHOR = 20
TOFU_HUB_ID = "locuslab/TOFU"
TOFU_HUB_SPLITS = ("full", *FORGET_SPLITS, *(f"{s}_perturbed" for s in FORGET_SPLITS),
                   "retain90", "retain95", "retain99", "retain_perturbed", "real_authors",
                   "real_authors_perturbed", "world_facts", "world_facts_perturbed",
                   "holdout01", "holdout05", "holdout10")
EVAL_FIELDS = ("paraphrased_question", "paraphrased_answer", "perturbed_answer")
RETAIN_PERTURBED_PERCENT = 10   # retain_perturbed = the first 10 % of the authors, as in TOFU
IGNORE_INDEX = -100

PROMPT_TEMPLATES = {
    "llama2": "[INST] {question} [/INST]",
    "phi": "Question: {question}\nAnswer: ",
    "plain": "{question}\n",
}


def retain_split_for(forget_split: str) -> str:
    """The retain split that complements a forget split: ``forget10`` -> ``retain90``."""
    if forget_split not in FORGET_SPLITS:
        raise ValueError(f"no retain split is defined for {forget_split!r}; expected one of "
                         f"{', '.join(FORGET_SPLITS)}")
    return f"retain{100 - int(forget_split[-2:]):02d}"


class Benchmark:
    """Named splits of rows (dicts). Splits given as callables are loaded on first use."""

    def __init__(self, name: str, splits: dict, qa_per_author: int | None = None):
        self.name = name
        self.qa_per_author = qa_per_author
        self._splits = dict(splits)

    @property
    def splits(self) -> tuple:
        return tuple(self._splits)

    def split(self, name: str) -> list:
        """The rows of ``name``; ``"a,b"`` concatenates splits ``a`` and ``b``."""
        if "," in name:
            return [row for part in name.split(",") for row in self.split(part.strip())]
        if name not in self._splits:
            raise KeyError(f"split {name!r} is not in benchmark {self.name!r}; available: "
                           f"{', '.join(self._splits)}")
        rows = self._splits[name]
        if callable(rows):
            rows = self._splits[name] = rows()
        return list(rows)

    def fingerprint(self, name: str) -> str:
        """sha256 of the split's rows, independent of key order: identifies the data of a run."""
        payload = json.dumps(self.split(name), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Benchmark({self.name!r}, splits={list(self._splits)})"


# --------------------------------------------------------------------------- loading

def load_benchmark(data: str, seed: int = 0, max_authors: int | None = None) -> Benchmark:
    """Load a benchmark by name or path (see the module docstring for what ``data`` may be).

    ``seed`` only affects the generated benchmarks (synthetic, books). ``max_authors`` keeps
    that many authors (the number generated, for ``synthetic``), laid out as TOFU lays out all
    of them, so that TOFU fits a CPU demo; it is not supported for corpora.
    """
    if max_authors is not None and max_authors < 1:
        raise ValueError(f"max_authors must be >= 1 or None; got {max_authors}")
    data = str(data)
    if data == "synthetic" or data.startswith("synthetic:"):
        return _synthetic_benchmark(seed, max_authors, **_synthetic_options(data))
    if data == "tofu":
        return _hub_benchmark(max_authors)
    if data == "books":
        if max_authors is not None:
            raise ValueError("max_authors applies to author benchmarks, not to 'books'")
        return _books_benchmark(seed)
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--data {data!r}: expected 'synthetic', 'books', 'tofu', a folder of TOFU-format JSON files, "
            f"or a .txt / .jsonl corpus; no such file or folder")
    if path.is_dir():
        return _folder_benchmark(path, max_authors)
    if path.suffix in (".txt", ".jsonl"):
        if max_authors is not None:
            raise ValueError(f"max_authors applies to author benchmarks, not to the plain-text "
                             f"corpus {path.name}")
        return _corpus_benchmark(path)
    raise ValueError(f"--data {data!r}: a file must be a plain-text corpus ending in .txt or "
                     f".jsonl; got suffix {path.suffix!r}")


SYNTHETIC_OPTIONS = ("phrasings",)


def _synthetic_options(data: str) -> dict:
    """``synthetic:phrasings=3`` -> ``{"phrasings": 3}`` (integers only)."""
    options = {}
    for item in filter(None, data.partition(":")[2].split(",")):
        name, _, value = item.partition("=")
        if name not in SYNTHETIC_OPTIONS or not value.strip().isdigit():
            raise ValueError(f"--data {data!r}: expected 'synthetic' or 'synthetic:NAME=INT,...' "
                             f"with NAME in {', '.join(SYNTHETIC_OPTIONS)}; got {item!r}")
        options[name] = int(value)
    return options


def _synthetic_benchmark(seed: int, max_authors: int | None, phrasings: int = 1) -> Benchmark:
    n_authors = max_authors or 20
    raw = generate_synthetic(seed=seed, n_authors=n_authors, phrasings=phrasings,
                             n_holdout=_forget_author_count(n_authors, 10))
    qa_per_author = len(raw["authors"]) // n_authors
    splits = _author_splits(raw["authors"], qa_per_author, "synthetic")
    for forget in FORGET_SPLITS:
        n_holdout = _forget_author_count(n_authors, int(forget[-2:])) * qa_per_author
        splits[forget.replace("forget", "holdout")] = [
            {"question": r["question"], "answer": r["answer"]}
            for r in raw["holdout_authors"][:n_holdout]]
    for name in ("real_authors", "real_authors_perturbed", "world_facts", "world_facts_perturbed"):
        splits[name] = raw[name]
    name = "synthetic" if phrasings == 1 else f"synthetic:phrasings={phrasings}"
    return Benchmark(name, splits, qa_per_author)


def holdout_split_for(forget_split: str) -> str:
    """The held-out authors matching a forget split: ``forget10`` -> ``holdout10``."""
    if forget_split not in FORGET_SPLITS:
        raise ValueError(f"no holdout split is defined for {forget_split!r}; expected one of "
                         f"{', '.join(FORGET_SPLITS)}")
    return forget_split.replace("forget", "holdout")


def _qa_rows(rows: list) -> list:
    """Training rows: question and answer, one row per training wording (``train_answers``)."""
    return [{"question": r["question"], "answer": answer}
            for r in rows for answer in r.get("train_answers", [r["answer"]])]


def _forget_author_count(n_authors: int, percent: int) -> int:
    return max(1, round(n_authors * percent / 100))


def _author_splits(rows: list, qa_per_author: int, source: str) -> dict:
    """TOFU's split layout from rows ordered author by author (see the module docstring).

    Rows with the evaluation fields feed the ``_perturbed`` splits; those splits need them.
    """
    if len(rows) % qa_per_author:
        raise ValueError(f"{source}: {len(rows)} rows is not a whole number of authors of "
                         f"{qa_per_author} questions each")
    n_authors = len(rows) // qa_per_author
    splits = {"full": _qa_rows(rows)}
    for forget in FORGET_SPLITS:
        n_forget = _forget_author_count(n_authors, int(forget[-2:])) * qa_per_author
        if n_forget >= len(rows):
            raise ValueError(f"{source}: {forget} would hold all {n_authors} authors; "
                             f"use more authors")
        splits[forget] = _qa_rows(rows[-n_forget:])
        splits[f"{forget}_perturbed"] = _with_eval_fields(rows[-n_forget:], source)
        splits[retain_split_for(forget)] = _qa_rows(rows[:-n_forget])
    n_retain_perturbed = _forget_author_count(n_authors, RETAIN_PERTURBED_PERCENT) * qa_per_author
    splits["retain_perturbed"] = _with_eval_fields(rows[:n_retain_perturbed], source)
    return splits


def _with_eval_fields(rows: list, source: str) -> list:
    for row in rows:
        missing = [f for f in EVAL_FIELDS if f not in row]
        if missing:
            raise ValueError(f"{source}: the row for question {row['question']!r} lacks "
                             f"{', '.join(missing)}, needed for the evaluation splits")
    return [{k: v for k, v in row.items() if k != "train_answers"} for row in rows]


def read_text_file(path: Path) -> str:
    """A data file's text; a file that is not UTF-8 is one error naming it and the byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: expected UTF-8 text; byte 0x{err.object[err.start]:02x} at "
                         f"offset {err.start} is not UTF-8 (convert the file, e.g. with iconv "
                         f"-t UTF-8)") from None


def read_json_rows(path: Path) -> list:
    """Rows of a JSON file in any layout TOFU uses: one array, JSON lines of objects, or
    several lines each holding an array (as ``full.json`` does)."""
    text = read_text_file(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if whole is not None:
        rows = whole if isinstance(whole, list) else [whole]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg}); expected "
                                 f"one JSON array, JSON lines, or lines of JSON arrays") from None
            rows.extend(item if isinstance(item, list) else [item])
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a {type(row).__name__}; expected JSON objects")
    return rows


def _folder_benchmark(folder: Path, max_authors: int | None) -> Benchmark:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".jsonl"))
    if not files:
        raise FileNotFoundError(f"{folder}: expected TOFU-format .json files (full.json, "
                                f"forget10_perturbed.json, ...); found none")
    raw = {p.stem: read_json_rows(p) for p in files}
    for file in files:
        for number, row in enumerate(raw[file.stem]):
            missing = [key for key in ("question", "answer") if not isinstance(row.get(key), str)]
            if missing:
                raise ValueError(f"{file}: row {number} lacks {' and '.join(map(repr, missing))}"
                                 f" (a string): rows must have 'question' and 'answer'; got "
                                 f"keys {sorted(row)}")
    if max_authors is not None:
        return _tofu_author_subset(raw, max_authors, str(folder))
    splits = dict(raw)
    full = raw.get("full")
    for forget in FORGET_SPLITS:
        perturbed = raw.get(f"{forget}_perturbed")
        if forget not in splits and perturbed is not None:
            splits[forget] = [{"question": r["question"], "answer": r["answer"]} for r in perturbed]
        elif forget not in splits and full is not None:
            splits[forget] = full[len(full) - round(len(full) * int(forget[-2:]) / 100):]
        retain = retain_split_for(forget)
        if retain not in splits and forget in splits and full is not None:
            splits[retain] = full[:len(full) - len(splits[forget])]
    return Benchmark(str(folder), splits, TOFU_QA_PER_AUTHOR)


def _tofu_author_subset(raw: dict, max_authors: int, source: str) -> Benchmark:
    """Keep ``max_authors`` TOFU authors: the first ones as retain authors and, as forget
    authors, the last 10 % of that count (at least one) taken from the end of ``full``, so the
    evaluation fields for forget and retain_perturbed rows exist in TOFU's files."""
    if "full" not in raw:
        raise ValueError(f"{source}: max_authors needs full.json to choose authors from")
    full = raw["full"]
    n_authors = len(full) // TOFU_QA_PER_AUTHOR
    if max_authors >= n_authors:
        raise ValueError(f"{source}: max_authors={max_authors} must be below the {n_authors} "
                         f"authors the data holds")
    n_tail = _forget_author_count(max_authors, 10)
    per = TOFU_QA_PER_AUTHOR
    kept = full[:(max_authors - n_tail) * per] + full[len(full) - n_tail * per:]
    by_question = {}
    for name, rows in raw.items():
        if name.endswith("_perturbed"):
            by_question.update({r["question"]: r for r in rows if "paraphrased_answer" in r})
    rows = [by_question.get(r["question"], r) for r in kept]
    splits = _author_splits(rows, per, source)
    holdout = ["holdout" + forget[-2:] for forget in FORGET_SPLITS]
    for name in ("real_authors", "real_authors_perturbed", "world_facts", "world_facts_perturbed",
                 *holdout):
        if name in raw:
            splits[name] = raw[name]
    return Benchmark(f"{source} ({max_authors} authors)", splits, per)


def _hub_benchmark(max_authors: int | None) -> Benchmark:
    try:
        import datasets
    except ImportError:
        raise ImportError("--data tofu loads locuslab/TOFU from the Hugging Face hub and needs "
                          "the 'datasets' package: pip install 'rkld[hub]' (or pass a local "
                          "folder of TOFU JSON files)") from None

    def loader(config: str):
        def load():
            try:
                return list(datasets.load_dataset(TOFU_HUB_ID, config, split="train"))
            except Exception as err:  # network, authentication or cache failures
                raise RuntimeError(f"could not load {TOFU_HUB_ID} ({config}) from the hub: "
                                   f"{err}. Without network access pass a local folder of "
                                   f"TOFU JSON files as --data") from err
        return load

    if max_authors is not None:
        needed = ("full", "forget10_perturbed", "retain_perturbed", "real_authors_perturbed",
                  "world_facts_perturbed")
        raw = {name: loader(name)() for name in needed}
        return _tofu_author_subset(raw, max_authors, TOFU_HUB_ID)
    return Benchmark(TOFU_HUB_ID, {name: loader(name) for name in TOFU_HUB_SPLITS},
                     TOFU_QA_PER_AUTHOR)


CORPUS_SPLITS = ("forget", "retain", "holdout")


def _corpus_benchmark(path: Path) -> Benchmark:
    docs = []      # (split, text)
    if path.suffix == ".txt":
        docs = [("forget", read_text_file(path))]
    else:
        for number, line in enumerate(read_text_file(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}: line {number} must be a JSON object with a string "
                                 f"'text' field")
            split = row.get("split", "forget")
            if split not in CORPUS_SPLITS:
                raise ValueError(f"{path}: line {number} has split {split!r}; expected one of "
                                 f"{', '.join(CORPUS_SPLITS)} (or no split: forget)")
            docs.append((split, row["text"]))
    docs = [(split, d) for split, d in docs if d.strip()]
    if not any(split == "forget" for split, _ in docs):
        raise ValueError(f"{path}: the corpus holds no text to forget (lines without a split, "
                         f"or with split 'forget')")
    # Without split fields the whole corpus is what is to be forgotten (the paper's Harry
    # Potter setting); retain and holdout documents are optional.
    return Benchmark(str(path), _corpus_splits(docs))


def _corpus_splits(docs: list) -> dict:
    splits = {name: [{"text": d} for split, d in docs if split == name] for name in CORPUS_SPLITS}
    splits["full"] = splits["forget"] + splits["retain"]
    return {name: rows for name, rows in splits.items() if rows}


def _books_benchmark(seed: int) -> Benchmark:
    from .books import generate_books
    books = generate_books(seed=seed)
    docs = [(split, b["text"]) for split, items in books.items() for b in items]
    return Benchmark("books", _corpus_splits(docs))


# --------------------------------------------------------------------------- tokenisation

def _template_for(tokenizer, template: str) -> str | None:
    """The format string to use, or None for the tokenizer's chat template."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return None if has_chat else PROMPT_TEMPLATES["plain"]
    if template == "chat":
        if not has_chat:
            raise ValueError("template 'chat' needs a tokenizer with a chat template; this one "
                             f"has none (use one of {', '.join(PROMPT_TEMPLATES)})")
        return None
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    if "{question}" in template:
        return template
    raise ValueError(f"template must be 'auto', 'chat', one of {', '.join(PROMPT_TEMPLATES)}, "
                     f"or a format string containing '{{question}}'; got {template!r}")


def prompt_text(tokenizer, question: str, template: str = "auto") -> str:
    """The prompt for ``question`` as text (chat template or preset; see PROMPT_TEMPLATES)."""
    fmt = _template_for(tokenizer, template)
    if fmt is None:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    return fmt.format(question=question)


def encode_prompt(tokenizer, question: str, template: str = "auto") -> list:
    """Token ids of the prompt, identical to the start of ``encode_qa``'s ``input_ids``."""
    fmt = _template_for(tokenizer, template)
    # A chat template writes its own BOS; a plain prompt gets the tokenizer's special tokens.
    ids = tokenizer(prompt_text(tokenizer, question, template),
                    add_special_tokens=fmt is not None)["input_ids"]
    return list(ids)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; answers must end with one so the model "
                         "learns to stop")
    return tokenizer.eos_token_id


def encode_qa(tokenizer, question: str, answer: str, max_length: int,
              template: str = "auto") -> dict:
    """Tokenise one QA pair for training: prompt labelled -100, answer + EOS supervised.

    The prompt and the answer are tokenised separately and concatenated, so the prompt part is
    exactly ``encode_prompt`` (what generation starts from). Sequences longer than
    ``max_length`` are cut at the end.
    """
    prompt_ids = encode_prompt(tokenizer, question, template)
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    answer_ids.append(_eos_id(tokenizer))
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_text_blocks(tokenizer, text: str, max_length: int) -> list:
    """Cut a document into blocks of at most ``max_length`` tokens, every token supervised.

    Position 0 of a block is never a next-token target, so blocks overlap by one token: each
    token after the document's first is the target of exactly one block.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 to hold a next-token target; got {max_length}")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    blocks = []
    for start in range(0, max(len(ids) - 1, 1), max_length - 1):
        block = ids[start:start + max_length]
        if len(block) >= 2:
            blocks.append({"input_ids": block, "attention_mask": [1] * len(block),
                           "labels": list(block)})
    return blocks


def encode_records(tokenizer, rows: list, max_length: int, template: str = "auto") -> list:
    """Encode QA rows (question/answer) or text rows (text) into training examples."""
    examples = []
    for i, row in enumerate(rows):
        if "text" in row and "question" not in row:
            examples.extend(encode_text_blocks(tokenizer, row["text"], max_length))
        elif "question" in row and "answer" in row:
            examples.append(encode_qa(tokenizer, row["question"], row["answer"], max_length,
                                      template))
        else:
            raise ValueError(f"row {i}: expected 'question' and 'answer' (QA) or 'text' "
                             f"(corpus); got keys {sorted(row)}")
    return examples


def collate(examples: list, pad_token_id: int) -> dict:
    """Stack examples into right-padded LongTensors (labels -100 and mask 0 on padding)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_token_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
             "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)}
    packed = any("position_ids" in e for e in examples)
    if packed:
        # Padding gets positions of its own, so it is a separate document (rkld.packing).
        batch["position_ids"] = torch.arange(width).repeat(len(examples), 1)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        for key in batch:
            if key == "position_ids":
                batch[key][row, :n] = torch.tensor(example.get(key, range(n)), dtype=torch.long)
                batch[key][row, n:] = torch.arange(width - n)
            else:
                batch[key][row, :n] = torch.tensor(example[key], dtype=torch.long)
    return batch
