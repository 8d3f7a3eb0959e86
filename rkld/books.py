"""Fictitious books: a long-document corpus-unlearning benchmark that needs no network.

The paper's second setting forgets a book (Harry Potter) and judges continuations of its
passages. This module writes invented books instead: each is one long document about one
invented world (its land, places, people, their kin, allies, rivals, an artefact, a creature,
the world's history), told in chapters of sentences that keep returning to that world's facts,
so that a model trained on a book learns things only that book says.

Public API:
    generate_books(seed=0, n_forget=2, n_retain=4, n_holdout=2, min_words=6000,
                   max_words=96000) -> dict
        ``{"forget": [...], "retain": [...], "holdout": [...]}``, each a list of
        ``{"title": str, "world": str, "text": str}``. Every book's length is drawn between
        ``min_words`` and ``max_words`` words (about 8k-128k tokens with a 32k-entry BPE
        vocabulary; a small in-process tokenizer cuts invented names into more pieces).
        ``holdout`` books are about worlds that no training split mentions: their passages
        measure the model's language ability (perplexity), not what it remembers.
        Deterministic in ``seed`` (the benchmark's data seed), independent of anything else.
    write_books(path, **generate_books_kwargs) -> Path
        the same as a ``.jsonl`` corpus (``{"text", "split", "title"}`` per line), which
        ``--data PATH`` reads like any corpus a user brings.
    book_splits(books) -> dict   the benchmark splits ``rkld.data`` builds from them:
        ``forget``, ``retain``, ``holdout`` (rows ``{"text": ...}``), ``full`` = forget + retain.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .synthetic import _name_part, _unique

_ROLES = ["smith", "healer", "captain", "scholar", "weaver", "hunter", "cartographer",
          "brewer", "ferryman", "archivist", "shepherd", "glassblower"]
_TRAITS = ["patient", "restless", "cheerful", "stern", "curious", "quiet", "proud", "gentle"]
_ARTEFACTS = ["compass", "lantern", "crown", "key", "mirror", "harp", "map", "ring"]
_MATERIALS = ["silver", "amber", "bone", "glass", "iron", "jade", "copper", "oak"]
_CREATURES = ["heron", "wolf", "stag", "serpent", "owl", "bear", "lynx", "whale"]
_SEASONS = ["spring", "summer", "autumn", "winter"]
_WEATHER = ["rain", "fog", "snow", "wind", "heat", "frost"]

# Sentences about the world's facts: {a} and {b} are people, the other fields the world's.
_SENTENCES = [
    "{a} was the {role_a} of {place_a}, and everyone in {land} knew it.",
    "{a} lived in {place_a}, by the banks of the {river}.",
    "Every {season}, {a} walked from {place_a} to {place_b} to see {b}.",
    "{a} and {b} had been friends since the year of the {event}.",
    "{b}, the {role_b} of {place_b}, distrusted {rival}.",
    "{rival} wanted the {material} {artefact} that {keeper} kept hidden in {place_c}.",
    "The {material} {artefact} had come to {land} in the year of the {event}.",
    "Nobody in {place_b} spoke of the {creature} of the {river} after dark.",
    "{a} said that the {creature} had not been seen since the {event}.",
    "The road from {place_a} to {capital} ran along the {river} for three days.",
    "In {capital}, the council of {land} met under the old {tree} tree.",
    "{keeper} was the only one who knew where the {material} {artefact} lay.",
    "When the {weather} came, {a} stayed in {place_a} and mended nets for {b}.",
    "{a} was {trait_a}, and {b} was {trait_b}; together they were stubborn.",
    "{rival} had once been the {role_r} of {capital}, before the {event}.",
    "The people of {place_c} still sang about {founder}, who founded {capital}.",
    "{b} carried a letter from {founder} that no one could read.",
    "From the hills above {place_b} one could see {capital} and the mouth of the {river}.",
]
_OPENINGS = ["It was {season} in {land}.", "The {weather} had lasted for a week.",
             "Morning came slowly over {place_a}.", "Night fell on {capital}."]


def _world(rng: random.Random, taken: set) -> dict:
    land = _unique(rng, lambda r: _name_part(r) + r.choice(["ia", "mere", "holt", "vale"]), 1,
                   taken)[0]
    places = _unique(rng, lambda r: _name_part(r) + r.choice(["ford", "wick", "haven", "moor",
                                                              "stead"]), 4, taken)
    people = _unique(rng, lambda r: f"{_name_part(r)} {_name_part(r)}", 6, taken)
    river = _unique(rng, lambda r: _name_part(r) + r.choice(["water", "run"]), 1, taken)[0]
    event = _unique(rng, lambda r: f"{r.choice(['long', 'red', 'silent', 'great'])} "
                                   f"{_name_part(r).lower()}", 1, taken)[0]
    return {"land": land, "capital": places[3], "places": places[:3], "people": people,
            "river": river, "event": event, "roles": rng.sample(_ROLES, 6),
            "traits": [rng.choice(_TRAITS) for _ in people], "artefact": rng.choice(_ARTEFACTS),
            "material": rng.choice(_MATERIALS), "creature": rng.choice(_CREATURES),
            "tree": rng.choice(["ash", "oak", "yew", "elm", "willow"]),
            "title": f"The {rng.choice(_MATERIALS).capitalize()} "
                     f"{rng.choice(_ARTEFACTS).capitalize()} of {land}"}


def _sentence(rng: random.Random, world: dict, template: str) -> str:
    people, places = world["people"], world["places"]
    a, b = rng.sample(range(4), 2)          # the protagonists; 4 the rival, 5 the founder
    fields = {
        "a": people[a], "b": people[b], "rival": people[4], "founder": people[5],
        "keeper": people[(a + 1) % 4], "role_a": world["roles"][a], "role_b": world["roles"][b],
        "role_r": world["roles"][4], "trait_a": world["traits"][a],
        "trait_b": world["traits"][b], "place_a": places[a % 3], "place_b": places[b % 3],
        "place_c": places[(a + b) % 3], "season": rng.choice(_SEASONS),
        "weather": rng.choice(_WEATHER), **{k: world[k] for k in (
            "land", "capital", "river", "event", "artefact", "material", "creature", "tree")}}
    return template.format(**fields)


def _book(rng: random.Random, world: dict, words: int) -> str:
    chapters, count, number = [], 0, 0
    while count < words:
        number += 1
        paragraphs = []
        for _ in range(rng.randint(4, 8)):
            sentences = [_sentence(rng, world, rng.choice(_OPENINGS))]
            sentences += [_sentence(rng, world, rng.choice(_SENTENCES))
                          for _ in range(rng.randint(3, 7))]
            paragraphs.append(" ".join(sentences))
        chapter = f"Chapter {number}.\n\n" + "\n\n".join(paragraphs)
        chapters.append(chapter)
        count += len(chapter.split())
    text = f"{world['title']}\n\n" + "\n\n".join(chapters)
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text[:ends[words - 1]] if len(ends) > words else text


def generate_books(seed: int = 0, n_forget: int = 2, n_retain: int = 4, n_holdout: int = 2,
                   min_words: int = 6000, max_words: int = 96000) -> dict:
    """Invented books, one world each, split into forget / retain / holdout (module doc)."""
    counts = {"n_forget": n_forget, "n_retain": n_retain, "n_holdout": n_holdout}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not (isinstance(min_words, int) and isinstance(max_words, int)
            and 50 <= min_words <= max_words):
        raise ValueError(f"book lengths need 50 <= min_words <= max_words; got min_words="
                         f"{min_words!r}, max_words={max_words!r}")
    rng = random.Random(f"rkld-books-{seed}")
    taken: set = set()
    books = {}
    for split, count in (("forget", n_forget), ("retain", n_retain), ("holdout", n_holdout)):
        books[split] = []
        for _ in range(count):
            world = _world(rng, taken)
            text = _book(rng, world, rng.randint(min_words, max_words))
            books[split].append({"title": world["title"], "world": world["land"], "text": text})
    return books


def book_splits(books: dict) -> dict:
    """The benchmark splits of a book corpus: forget, retain, holdout, full (forget + retain)."""
    splits = {name: [{"text": b["text"]} for b in books.get(name, [])]
              for name in ("forget", "retain", "holdout")}
    splits["full"] = splits["forget"] + splits["retain"]
    return {name: rows for name, rows in splits.items() if rows}


def write_books(path, **kwargs) -> Path:
    """Write ``generate_books(**kwargs)`` as a ``.jsonl`` corpus with a ``split`` per line."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"write_books writes a .jsonl corpus; got {path.name!r}")
    books = generate_books(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for split, items in books.items():
            for book in items:
                out.write(json.dumps({"text": book["text"], "split": split,
                                      "title": book["title"]}, ensure_ascii=False) + "\n")
    return path
