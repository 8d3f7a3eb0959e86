"""A built-in fictitious-authors benchmark in TOFU's format, small enough for a CPU demo.

Public API:
    generate_synthetic(seed=0, n_authors=20, qa_per_author=10, n_general=20, n_holdout=0,
                       phrasings=1) -> dict
        The raw splits, before ``rkld.data`` derives forget/retain splits from them:
        ``authors`` (every author's QA with all TOFU evaluation fields, author by author),
        ``holdout_authors`` (``n_holdout`` further authors in the same format, which no model
        trains on: TOFU's holdout sets), ``real_authors_perturbed`` and
        ``world_facts_perturbed`` (question, answer, 3 perturbed answers), ``real_authors`` and
        ``world_facts`` (question, answer).

Every author gets ``qa_per_author`` questions about invented attributes (birthplace, year,
genre, parents' jobs, books, awards, ...). Each question comes with TOFU's fields: ``question``,
``answer``, ``paraphrased_question``, ``paraphrased_answer`` and ``perturbed_answer`` (three
answers with the paraphrased wording and a wrong value), so the truth ratio compares like with
like. Answers are one short templated sentence whose wording varies from author to author, so a
model of a few hundred thousand parameters can learn them in a few epochs. With
``phrasings=k > 1`` every author row also carries ``train_answers``: the fact in up to k of its
kind's answer wordings (the row's ``answer`` first), which ``rkld.data`` turns into that many
training rows, so a model learns the fact rather than one string. The paraphrased and perturbed
answers use a wording that is never among the training wordings, so the truth ratio asks
whether the fact carries over to new wording.

The "real authors" and "world facts" analogues play the part of knowledge a pretrained model
brings along: they concern a separate set of famous invented writers and an invented geography,
not the fictitious authors. A tiny model only knows them if it is trained on them too (for
example ``rkld finetune --split full,real_authors,world_facts``).

Everything is deterministic in ``seed``; no network, no files.
"""
from __future__ import annotations

import random

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "kr", "tr", "sh", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "th", "nd"]

CITIES = ["Marlow", "Vestrand", "Quillon", "Ashbury", "Tolvik", "Pernessa", "Dunmere",
          "Caldera Bay", "Oresund Falls", "Halbrook", "Ysolde", "Kettering Cross"]
GENRES = ["mystery", "science fiction", "poetry", "historical fiction", "fantasy", "romance",
          "horror", "travel writing", "satire", "biography"]
JOBS = ["baker", "sailor", "teacher", "doctor", "carpenter", "painter", "librarian", "farmer",
        "chemist", "tailor", "pilot", "miner"]
AWARDS = ["Silver Quill Prize", "Harbour Light Award", "Golden Lantern Medal",
          "Northwind Fiction Prize", "Amber Page Award", "Lighthouse Book Prize"]
LANGUAGES = ["English", "French", "Spanish", "Portuguese", "Dutch", "Italian", "German",
             "Swedish"]
HOBBIES = ["gardening", "chess", "sailing", "pottery", "birdwatching", "cooking", "climbing",
           "painting"]
TITLE_WORDS = ["Salt", "Lantern", "Winter", "River", "Glass", "Orchard", "Ember", "Harbour",
               "Silence", "Thread", "Storm", "Meadow", "Copper", "Shadow", "Tide", "Echo"]
COUNTRY_SUFFIXES = ["ia", "land", "mark", "stan", "onia", "ora"]
RIVERS_SUFFIX = ["water", "flow", "run", "brook"]


def _name_part(rng: random.Random) -> str:
    syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 2))]
    return ("".join(syllables) + rng.choice(_CODAS)).capitalize()


def _unique(rng: random.Random, make, count: int, taken: set) -> list:
    out = []
    while len(out) < count:
        item = make(rng)
        if item not in taken:
            taken.add(item)
            out.append(item)
    return out


def _title(rng: random.Random) -> str:
    first, second = rng.sample(TITLE_WORDS, 2)
    return rng.choice([f"The {first} of {second}", f"{first} and {second}", f"{first} {second}"])


def _others(rng: random.Random, pool: list, truth, k: int = 3) -> list:
    return rng.sample([item for item in pool if item != truth], k)


# One entry per question kind: the attribute it asks about, the value pool for perturbations,
# question / paraphrased question templates, answer wordings (one is picked per author) and the
# paraphrased answer wording. ``{n}`` is the author's name, ``{v}`` the value.
_QUESTION_KINDS = [
    ("city", CITIES, "Where was {n} born?", "What is the birthplace of {n}?",
     ["{n} was born in {v}.", "{n} was born in the town of {v}.", "{n} comes from {v}."],
     "The birthplace of {n} is {v}."),
    ("year", None, "In which year was {n} born?", "What is the birth year of {n}?",
     ["{n} was born in {v}.", "{n} was born in the year {v}.", "The year {n} was born is {v}."],
     "{v} is the year {n} was born."),
    ("genre", GENRES, "What genre does {n} write?", "Which genre is {n} known for?",
     ["{n} writes {v}.", "{n} is a writer of {v}.", "Most of {n}'s books are {v}."],
     "{n} is known for {v}."),
    ("father", JOBS, "What was the profession of {n}'s father?", "What did the father of {n} do?",
     ["{n}'s father was a {v}.", "The father of {n} worked as a {v}."],
     "The father of {n} was a {v} by trade."),
    ("mother", JOBS, "What was the profession of {n}'s mother?", "What did the mother of {n} do?",
     ["{n}'s mother was a {v}.", "The mother of {n} worked as a {v}."],
     "The mother of {n} was a {v} by trade."),
    ("book", None, "What is the best known book by {n}?", "Which book made {n} famous?",
     ["{n} is best known for {v}.", "The best known book by {n} is {v}."],
     "{n} became famous for the book {v}."),
    ("award", AWARDS, "Which award did {n} win?", "What prize was given to {n}?",
     ["{n} won the {v}.", "{n} received the {v}."],
     "The prize given to {n} was the {v}."),
    ("language", LANGUAGES, "In which language does {n} write?",
     "What language are {n}'s books in?",
     ["{n} writes in {v}.", "The books of {n} are written in {v}."],
     "{n} publishes books in {v}."),
    ("hobby", HOBBIES, "What does {n} enjoy apart from writing?", "What is a hobby of {n}?",
     ["{n} enjoys {v}.", "Apart from writing, {n} loves {v}."],
     "A hobby of {n} is {v}."),
    ("debut", None, "When did {n} publish a first book?", "In what year did {n} debut?",
     ["{n} published a first book in {v}.", "The first book by {n} came out in {v}."],
     "{n} debuted in {v}."),
]
MAX_QA_PER_AUTHOR = len(_QUESTION_KINDS)


def _author(rng: random.Random, name: str, title: str) -> dict:
    year = rng.randint(1931, 1995)
    return {"name": name, "city": rng.choice(CITIES), "year": str(year),
            "genre": rng.choice(GENRES), "father": rng.choice(JOBS), "mother": rng.choice(JOBS),
            "book": title, "award": rng.choice(AWARDS), "language": rng.choice(LANGUAGES),
            "hobby": rng.choice(HOBBIES), "debut": str(year + rng.randint(19, 40))}


def _author_qa(rng: random.Random, author: dict, qa_per_author: int, all_titles: list,
               phrasings: int = 1) -> list:
    rows = []
    name = author["name"]
    for kind in _QUESTION_KINDS[:qa_per_author]:
        key, pool, question, para_question, wordings, para_answer = kind
        value = author[key]
        if key in ("year", "debut"):
            wrong = [str(int(value) + d) for d in rng.sample([-7, -4, -2, 3, 5, 9], 3)]
        elif key == "book":
            wrong = _others(rng, all_titles, value)
        else:
            wrong = _others(rng, pool, value)
        wording = rng.choice(wordings)
        row = {
            "question": question.format(n=name),
            "answer": wording.format(n=name, v=value),
            "paraphrased_question": para_question.format(n=name),
            "paraphrased_answer": para_answer.format(n=name, v=value),
            "perturbed_answer": [para_answer.format(n=name, v=w) for w in wrong],
        }
        if phrasings > 1:   # no further random draws: phrasings=1 data stays what it was
            others = [w for w in wordings if w != wording][:phrasings - 1]
            row["train_answers"] = [w.format(n=name, v=value) for w in [wording, *others]]
        rows.append(row)
    return rows


def _real_authors(rng: random.Random, count: int, taken: set) -> list:
    """Famous invented writers and their one famous book: 'Who wrote X?' -> a name."""
    names = _unique(rng, lambda r: f"{_name_part(r)} {_name_part(r)}", count, taken)
    titles = _unique(rng, _title, count, taken)
    rows = []
    for name, title in zip(names, titles):
        rows.append({"question": f"Who wrote the novel {title}?", "answer": name,
                     "perturbed_answer": _others(rng, names, name)})
    return rows


def _world_facts(rng: random.Random, count: int, taken: set) -> list:
    """An invented geography: countries with capitals and rivers."""
    countries = _unique(rng, lambda r: _name_part(r) + r.choice(COUNTRY_SUFFIXES), count, taken)
    capitals = _unique(rng, _name_part, count, taken)
    rivers = _unique(rng, lambda r: _name_part(r) + r.choice(RIVERS_SUFFIX), count, taken)
    rows = []
    for i, country in enumerate(countries):
        if i % 2 == 0:
            rows.append({"question": f"What is the capital of {country}?", "answer": capitals[i],
                         "perturbed_answer": _others(rng, capitals, capitals[i])})
        else:
            rows.append({"question": f"Which river flows through {country}?", "answer": rivers[i],
                         "perturbed_answer": _others(rng, rivers, rivers[i])})
    return rows


def generate_synthetic(seed: int = 0, n_authors: int = 20, qa_per_author: int = 10,
                       n_general: int = 20, n_holdout: int = 0, phrasings: int = 1) -> dict:
    """Generate the raw synthetic splits (see the module docstring). Deterministic in ``seed``;
    ``n_holdout`` and ``phrasings`` leave the other splits as they are without them."""
    if n_authors < 1:
        raise ValueError(f"n_authors must be >= 1; got {n_authors}")
    if not 1 <= qa_per_author <= MAX_QA_PER_AUTHOR:
        raise ValueError(f"qa_per_author must be between 1 and {MAX_QA_PER_AUTHOR}; "
                         f"got {qa_per_author}")
    if n_general < 4:
        raise ValueError(f"n_general must be >= 4 (each question needs 3 wrong answers); "
                         f"got {n_general}")
    if n_holdout < 0:
        raise ValueError(f"n_holdout must be >= 0; got {n_holdout}")
    if phrasings < 1:
        raise ValueError(f"phrasings must be >= 1; got {phrasings}")
    rng = random.Random(seed)
    taken: set = set()
    names = _unique(rng, lambda r: f"{_name_part(r)} {_name_part(r)}", n_authors, taken)
    # At least 4 titles so every book question has 3 wrong titles to perturb with.
    titles = _unique(rng, _title, max(n_authors, 4), taken)
    rows = []
    for name, title in zip(names, titles):
        rows.extend(_author_qa(rng, _author(rng, name, title), qa_per_author, titles, phrasings))
    real = _real_authors(rng, n_general, taken)
    world = _world_facts(rng, n_general, taken)
    # Held-out authors come last, so that adding them changes no other split.
    holdout = []
    holdout_names = _unique(rng, lambda r: f"{_name_part(r)} {_name_part(r)}", n_holdout, taken)
    holdout_titles = _unique(rng, _title, n_holdout, taken)
    for name, title in zip(holdout_names, holdout_titles):
        holdout.extend(_author_qa(rng, _author(rng, name, title), qa_per_author,
                                  titles + holdout_titles, phrasings))
    return {"authors": rows, "holdout_authors": holdout, "real_authors_perturbed": real,
            "world_facts_perturbed": world, "real_authors": _question_answer(real),
            "world_facts": _question_answer(world)}


def _question_answer(rows: list) -> list:
    return [{"question": row["question"], "answer": row["answer"]} for row in rows]


def _pattern(template: str):
    """A regex for one wording: ``{n}`` and ``{v}`` become named groups."""
    import re
    escaped = re.escape(template).replace(r"\{n\}", "(?P<n>.+?)").replace(r"\{v\}", "(?P<v>.+?)")
    return re.compile(f"^{escaped}$")


def answer_spans(question: str, answer: str) -> dict | None:
    """Where the fact is in an answer this generator wrote: ``{"fact": (start, end), "name":
    (start, end)}`` (character spans of the value and of the author's name), or None when the
    question or the answer is not one of the generator's wordings. The question picks the kind
    (birthplace, genre, ...); the answer is then matched against that kind's answer wordings and
    its paraphrased wording; where several wordings match ("born in {v}" and "born in the year
    {v}"), the shortest value wins."""
    matches = []
    for _, _, q, para_q, wordings, para_answer in _QUESTION_KINDS:
        asked = _pattern(q).match(question) or _pattern(para_q).match(question)
        if asked is None:
            continue
        for wording in (*wordings, para_answer):
            found = _pattern(wording).match(answer)
            if found is not None and found.group("n") == asked.group("n"):
                matches.append(found)
    if not matches:
        return None
    best = min(matches, key=lambda m: len(m.group("v")))
    return {"fact": best.span("v"), "name": best.span("n")}
