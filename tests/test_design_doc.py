"""The design lives in the repository: code and docs cite ``docs/design.md`` sections that exist,
and nothing cites a design file a user of the repository cannot open."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
_TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".txt", ".cfg"}
# Spelled in two parts so that this file does not match itself.
_OUTSIDE_DESIGN = re.compile("DESIGN" + r"\.md")
_CITATION = re.compile(r"docs/design\.md#([A-Za-z0-9_-]+)")


def _text_files():
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if any(part.startswith(".") or part in ("build", "dist", "__pycache__") or
               part.endswith(".egg-info") for part in parts):
            continue
        if path.is_file() and path.suffix in _TEXT_SUFFIXES:
            yield path


def _anchors() -> set:
    return set(re.findall(r'<a id="([^"]+)"></a>', DESIGN.read_text(encoding="utf-8")))


def test_every_cited_design_section_exists():
    anchors = _anchors()
    assert anchors, f"{DESIGN} declares no section anchors"
    missing = []
    for path in _text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for anchor in _CITATION.findall(line):
                if anchor not in anchors:
                    missing.append(f"{path.relative_to(ROOT)}:{number}: #{anchor}")
    assert not missing, ("citations of docs/design.md sections that do not exist (anchors: "
                         f"{sorted(anchors)}):\n" + "\n".join(missing))


def test_no_citation_of_a_design_file_outside_the_repository():
    found = []
    for path in _text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _OUTSIDE_DESIGN.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, ("cite docs/design.md#<anchor> instead of a design file users cannot "
                       "open:\n" + "\n".join(found))


def test_the_contents_link_every_section():
    text = DESIGN.read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(#([A-Za-z0-9_-]+)\)", text))
    assert linked == _anchors(), (f"contents and anchors differ: only linked {linked - _anchors()}, "
                                  f"only declared {_anchors() - linked}")
