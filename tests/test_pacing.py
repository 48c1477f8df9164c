"""ARENA's pacing in both parts: every exercise says how hard, how important and how long it is, what to
do, and has a folded hint; every "Think first" question has a folded answer. Hints and answers reach the
learner's notebook; reference solutions and hidden tests do not."""

import re

import nbformat
import pytest

from tools import build_notebooks

ROOT = build_notebooks.ROOT
PARTS = build_notebooks.PARTS
DIFFICULTY = re.compile(r"\*\*Difficulty:\*\* (?=[🔴⚪]{5}(?![🔴⚪]))🔴+⚪*(?![🔴⚪])")  # five symbols, 🔴 first
IMPORTANCE = re.compile(r"\*\*Importance:\*\* (?=[🔵⚪]{5}(?![🔵⚪]))🔵+⚪*(?![🔵⚪])")
MINUTES = re.compile(r"\*\*Time:\*\* about (\d+)(?:-(\d+))? minutes")
TASK = re.compile(r"\*\*Your task:\*\* \S")
HINT = re.compile(r"<details><summary>Hint(?: \d+)?</summary>\s*\n\s*\S.*?</details>", re.DOTALL)
ANSWER = re.compile(r"<details><summary>Answer</summary>\s*\n\s*\S.*?</details>", re.DOTALL)
THINK_FIRST = re.compile(r"\*\*Think first:\*\*")  # a question (the introductions name them without the colon)


def _exercise_blocks(nb) -> list[tuple[list[str], str]]:
    """(the grade ids of a run of consecutive exercise cells, the markdown cell just before the run)."""
    blocks, markdown, run = [], None, []
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.metadata["nbgrader"].get("solution"):
            run.append(cell.metadata["nbgrader"]["grade_id"])
            continue
        if run:
            blocks.append((run, markdown))
            run = []
        if cell.cell_type == "markdown":
            markdown = cell.source
    if run:
        blocks.append((run, markdown))
    return blocks


@pytest.mark.parametrize("part,minimum", [("part1_persona_space", 12), ("part2_stabilizing", 8), ("part3_trait_vectors", 10)])
def test_every_exercise_has_its_pacing_and_a_hint(part, minimum):
    nb = build_notebooks.solution_notebook(part)
    blocks = _exercise_blocks(nb)
    assert sum(len(ids) for ids, _ in blocks) >= minimum, f"{part}: found only {blocks}"
    for ids, markdown in blocks:
        assert markdown is not None, f"{part}: exercise {ids} has no markdown cell before it"
        where = f"{part}, the markdown before exercise {ids}"
        assert DIFFICULTY.search(markdown), f"{where}: no '**Difficulty:** 🔴🔴⚪⚪⚪' (five symbols)"
        assert IMPORTANCE.search(markdown), f"{where}: no '**Importance:** 🔵🔵🔵⚪⚪' (five symbols)"
        minutes = MINUTES.search(markdown)
        assert minutes and 0 < int(minutes.group(1)) <= 60, f"{where}: no '**Time:** about N minutes'"
        assert TASK.search(markdown), f"{where}: no '**Your task:** ...' line"
        assert HINT.search(markdown), f"{where}: no folded hint '<details><summary>Hint</summary> ... </details>'"
        # The pacing comes after the section's prose, right before the code: the last thing read.
        assert markdown.rfind("**Difficulty:**") > markdown.rfind("### "), f"{where}: the pacing is not at the end"


@pytest.mark.parametrize("part", PARTS)
def test_every_think_first_has_a_folded_answer(part):
    nb = build_notebooks.solution_notebook(part)
    asked = 0
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        questions = [m.end() for m in THINK_FIRST.finditer(cell.source)]
        asked += len(questions)
        answers = [m.start() for m in ANSWER.finditer(cell.source)]
        assert len(answers) >= len(questions), f"{part}: {len(questions)} Think first, {len(answers)} answers in:\n" \
                                               f"{cell.source[:300]}"
        for q, a in zip(questions, answers):
            assert a > q, f"{part}: an answer comes before its Think first question:\n{cell.source[:300]}"
    assert asked >= 2, f"{part}: only {asked} Think first questions found"


def test_the_pacing_test_fails_on_a_bare_exercise():
    """The checks above can fail: an exercise without pacing, and a question without an answer."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("### Exercise 1\n\n**Difficulty:** 🔴⚪⚪⚪⚪\n\n**Think first:** why?"),
                nbformat.v4.new_code_cell("def f(): ...")]
    nb.cells[0].metadata["nbgrader"] = {"solution": False}
    nb.cells[1].metadata["nbgrader"] = {"solution": True, "grade_id": "ex_f"}
    (ids, markdown), = _exercise_blocks(nb)
    assert ids == ["ex_f"] and DIFFICULTY.search(markdown)
    assert not IMPORTANCE.search(markdown) and not HINT.search(markdown) and not TASK.search(markdown)
    assert len(THINK_FIRST.findall(markdown)) == 1 and not ANSWER.search(markdown)
    assert not DIFFICULTY.search("**Difficulty:** 🔴🔴🔴⚪⚪⚪")  # six symbols
    assert not DIFFICULTY.search("**Difficulty:** 🔴🔴⚪⚪") and not DIFFICULTY.search("**Difficulty:** ⚪🔴⚪⚪⚪")


@pytest.mark.parametrize("part", PARTS)
def test_hints_and_answers_reach_the_exercise_notebook_but_no_solution_does(part):
    exercise = nbformat.read(ROOT / "exercises" / f"{part}.ipynb", as_version=4)
    solution = build_notebooks.solution_notebook(part)
    for kind in (HINT, ANSWER):
        in_solution = sum(len(kind.findall(c.source)) for c in solution.cells if c.cell_type == "markdown")
        in_exercise = sum(len(kind.findall(c.source)) for c in exercise.cells if c.cell_type == "markdown")
        assert in_exercise == in_solution > 0, (kind.pattern, in_exercise, in_solution)
    text = "\n".join(c.source for c in exercise.cells)
    assert "### BEGIN SOLUTION" not in text and "### BEGIN HIDDEN TESTS" not in text
    assert not any("hidden_test_" in c.source for c in exercise.cells)
