"""The README and docs/*.md: short front page, links that resolve, a layout table that matches utils/, no
development history in what users read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 150

# docs/settings.md is generated from utils/settings.py (``python -m utils.settings``): while that module does
# not exist, neither can its page, and the README's link to it may dangle.
GENERATED = {DOCS / "settings.md": ROOT / "utils" / "settings.py"}

# Phrases that tell the project's history rather than what the software is. Each is a regular expression,
# matched case-insensitively.
HISTORY = {
    r"\bissue\b|\bissue's\b": "talks about the issue it was written for",
    r"\bwas \d": "compares with a former measurement ('was 15%')",
    r"\b(last|earlier|previous|this) session": "talks about a work session",
    r"\bsessions? that": "talks about the sessions that wrote it",
    r"\bour (machine|box|gpu|hardware)": "says what hardware its authors had",
    r"\bwas lent\b|\bno gpu was\b": "says what hardware its authors had",
    r"\bused to (cost|be|take)\b": "compares with a former behaviour",
    r"\b(new|old|earlier|previous) backends?\b": "compares with a former backend",
    r"\btoday's\b": "compares with a former state",
}

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _links(page: Path) -> list[str]:
    text = CODE_FENCE.sub("", page.read_text())
    return LINK.findall(text)


def _is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) is not None  # https:, mailto:, ...


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = CODE_FENCE.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines, more than {README_MAX_LINES}: it is the one-minute front page. Move the "
        "detail into a page under docs/ and link it from the README's table of docs.")


def test_docs_exist_and_readme_links_every_page():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no .md pages: the README's detail belongs there."
    linked = {(README.parent / t.split("#")[0]).resolve() for t in _links(README) if not _is_external(t)}
    unlinked = [_rel(p) for p in pages if p.resolve() not in linked]
    assert not unlinked, (f"README.md does not link {unlinked}: a newcomer cannot find them. "
                          "Add them to the README's table of docs.")


@pytest.mark.parametrize("page", _pages(), ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        if _is_external(target):
            continue
        path_part, _, fragment = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page.resolve()
        if not dest.exists():
            source = GENERATED.get(dest)
            if source is not None and not source.exists():
                continue  # generated from a module that is not there either (see GENERATED)
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
            continue
        if fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {_rel(dest)})")
    assert not broken, f"{_rel(page)} has links that do not resolve: {broken}. Fix the path or the heading."


def test_generated_pages_exist_once_their_source_does():
    missing = [f"{_rel(page)} (from {_rel(source)})" for page, source in GENERATED.items()
               if source.exists() and not page.exists()]
    assert not missing, (f"Generated docs are missing: {missing}. "
                         "Run `python -m utils.settings` and commit the page.")


def _layout_modules(text: str) -> list[str]:
    """The modules the ``utils/`` table of docs/conventions.md lists, in order (one row per module)."""
    return re.findall(r"^\|\s*`utils/(\w+)\.py`\s*\|", text, re.M)


def test_layout_table_lists_exactly_the_utils_modules():
    listed = _layout_modules((DOCS / "conventions.md").read_text())
    actual = sorted(p.stem for p in (ROOT / "utils").glob("*.py") if p.stem != "__init__")
    duplicated = sorted({m for m in listed if listed.count(m) > 1})
    not_listed = sorted(set(actual) - set(listed))
    not_there = sorted(set(listed) - set(actual))
    assert not (duplicated or not_listed or not_there), (
        "docs/conventions.md's utils/ table must have one row per module in utils/*.py: "
        f"missing rows for {not_listed}, rows for modules that do not exist {not_there}, "
        f"rows listed twice {duplicated}. Edit the table's `utils/<name>.py` rows.")


def test_layout_parser_reads_the_table_rows():
    table = "| module | what |\n|---|---|\n| `utils/a.py` | x |\n| `utils/b_c.py` | y |\nsee `utils/d.py`\n"
    assert _layout_modules(table) == ["a", "b_c"]


def _history(text: str) -> list[str]:
    """Each history phrase in ``text`` (a phrase may run over a line break), with its context and why."""
    flat = " ".join(text.split())
    found = []
    for pattern, why in HISTORY.items():
        for m in re.finditer(pattern, flat, re.I):
            found.append(f"{flat[max(0, m.start() - 30):m.end() + 30]!r}: {why}")
    return found


@pytest.mark.parametrize("page", _pages(), ids=_rel)
def test_no_development_history(page):
    found = _history(page.read_text())
    assert not found, (f"{_rel(page)} tells the project's history, not what the software is: {found}. "
                       "Say what it does now, and state measurements with the machine they were taken on.")


def test_history_patterns_catch_the_phrases_they_name():
    samples = ["under the issue's 1.10 target", "sampling at 2% (was 15%)", "in the last session",
               "no GPU was lent to the sessions that wrote it", "it used to cost 4 minutes",
               "Earlier backends gave PC1 40-47%", "today's float32 generate"]
    for sample in samples:
        assert _history(sample), f"no history pattern matches {sample!r}"
    assert _history("the endless loop (it used\nto cost 4 minutes)"), "a phrase split over two lines is missed"
    assert not _history("65k tokens ran 4% slower on one H100 80GB; the sessions' kernels")
