"""Classroom grading, end to end: the real nbgrader commands, offline, in a temporary course root.

One round trip (``tools.grade_roundtrip``: generate, collect, autograde, feedback, export) grades four
submissions, and the tests below read what it left: the release, the gradebook, the autograded
notebooks, the feedback HTML and the grades CSV.

- ``solution``: the solution notebook, unchanged: full marks.
- ``blank``: the untouched release: 0.
- ``wrong``: the release with every exercise answered from the solution notebook, except two, answered
  wrongly: exactly their check cells' points are lost.
- ``tampered``: ``wrong`` whose (failing) check cell for one of them was edited to ``pass`` and whose
  (passing) check cell for another exercise was deleted: nbgrader restores both, so the scores are
  those of ``wrong``. (Had either tampering worked, the score would differ.)
- ``gutted``: the solution notebook without one exercise and its check cell: the check is put back
  (after the nearest cell still there) and scores 0; everything else full marks.

This file ships with the ``tests`` package, so it holds no reference solution: the correct answers are
read from ``solutions/`` at run time, and the two wrong answers below are deliberately wrong.
"""

from __future__ import annotations

import copy
import html
import re
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from tools import grade_roundtrip as rt

ROOT = rt.ROOT
PART = rt.PART
NOTEBOOK = rt.NOTEBOOK
MAX_SECONDS = 300  # the whole round trip, on 2 CPU cores

# Two exercises answered wrongly, and the check cell that grades each.
WRONG_ANSWERS = {
    "ex_cosine": (
        "def compute_cosine_similarity_matrix(vectors):\n"
        "    return vectors.float() @ vectors.float().T  # deliberately wrong: dot products, not cosines\n"
        "\n\n"
        "def compute_cosine_similarity_matrix_centered(vectors):\n"
        "    return compute_cosine_similarity_matrix(vectors)  # deliberately wrong: not centred\n"
    ),
    "ex_auc": (
        "def axis_auc(scores, positive):\n"
        "    return 0.5  # deliberately wrong\n"
    ),
}
WRONG_CHECKS = {"ex_cosine": "check_cosine", "ex_auc": "check_auc"}
EDITED_CHECK = "check_cosine"      # its exercise is wrong: `pass` would turn 0 points into 2
DELETED_CHECK = "check_pca"        # its exercise is right: deleting it would turn 2 points into 0
DELETED_AFTER = "ex_pca"
GUTTED = ("ex_auc", "check_auc")  # an exercise and its check, both deleted
STUDENTS = ("solution", "blank", "wrong", "tampered", "gutted")
API_KEY_VARIABLES = ("COURSE_API_KEY", "OPENROUTER_API_KEY", "OPENAI_API_KEY")


def _grade_id(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def _cell(nb, grade_id):
    return next(c for c in nb.cells if _grade_id(c) == grade_id)


def _answered_release(release, solution):
    """The release with every exercise cell answered from the solution notebook, two of them wrongly."""
    nb = nbformat.read(release, as_version=4)
    solved = nbformat.read(solution, as_version=4)
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("solution"):
            gid = _grade_id(cell)
            cell.source = WRONG_ANSWERS.get(gid, _cell(solved, gid).source)
    return nb


def _tampered(nb):
    nb = copy.deepcopy(nb)
    _cell(nb, EDITED_CHECK).source = "pass"
    nb.cells = [c for c in nb.cells if _grade_id(c) != DELETED_CHECK]
    return nb


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Run the whole round trip once; return where everything is and how long it took."""
    course = tmp_path_factory.mktemp("course")
    work = tmp_path_factory.mktemp("submissions")
    with pytest.MonkeyPatch.context() as mp:
        # The grading kernel must pick its own settings (nbgrader_config.py) and never use an API:
        # plant a key and an unreachable API server; grading must ignore both.
        for var in ("COURSE_MODEL", "COURSE_N_QUESTIONS", "COURSE_MAX_NEW_TOKENS", "COURSE_N_TRAITS",
                    "COURSE_OUT_DIR", "COURSE_LAYER", "COURSE_MIN_SCORE"):
            mp.delenv(var, raising=False)
        mp.setenv("OPENROUTER_API_KEY", "sk-test-not-a-key")
        mp.setenv("COURSE_API_BASE_URL", "http://127.0.0.1:9/v1")
        cwd = tmp_path_factory.mktemp("cwd")  # nothing may land in the directory nbgrader is run from
        mp.chdir(cwd)

        t0 = time.perf_counter()
        release = rt.generate(course, echo=False)
        wrong = _answered_release(release, ROOT / "solutions" / NOTEBOOK)
        nbformat.write(wrong, work / "wrong.ipynb")
        nbformat.write(_tampered(wrong), work / "tampered.ipynb")
        gutted = nbformat.read(ROOT / "solutions" / NOTEBOOK, as_version=4)
        gutted.cells = [c for c in gutted.cells if _grade_id(c) not in GUTTED]
        nbformat.write(gutted, work / "gutted.ipynb")
        submissions = {"solution": ROOT / "solutions" / NOTEBOOK, "blank": release,
                       "wrong": work / "wrong.ipynb", "tampered": work / "tampered.ipynb",
                       "gutted": work / "gutted.ipynb"}
        rt.collect(course, submissions)
        rt.autograde(course, echo=False)
        rt.feedback(course, echo=False)
        grades_csv = rt.export(course, echo=False)
        seconds = time.perf_counter() - t0

    source = nbformat.read(course / "source" / PART / NOTEBOOK, as_version=4)
    points = {_grade_id(c): float(c.metadata["nbgrader"]["points"]) for c in source.cells
              if c.metadata["nbgrader"].get("grade")}
    return SimpleNamespace(course=course, release=release, source=source, points=points, seconds=seconds,
                           grades_csv=grades_csv, cwd_left=sorted(p.name for p in cwd.iterdir()))


def _cell_scores(course: Path, student: str) -> dict[str, float]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", "persona-space") as gb:
        submission = gb.find_submission_notebook(PART, PART, student)
        return {g.name: float(g.score) for g in submission.grades}


def _expected_scores(points: dict[str, float], student: str) -> dict[str, float]:
    if student == "blank":
        return {gid: 0.0 for gid in points}
    lost = {"wrong": set(WRONG_CHECKS.values()), "tampered": set(WRONG_CHECKS.values()),
            "gutted": {GUTTED[1]}}.get(student, set())
    return {gid: 0.0 if gid in lost else p for gid, p in points.items()}


def _autograded(course: Path, student: str):
    return nbformat.read(course / "autograded" / student / PART / NOTEBOOK, as_version=4)


def _hidden_lines(nb) -> list[str]:
    lines, inside = [], False
    for cell in nb.cells:
        for line in cell.source.split("\n"):
            if "BEGIN HIDDEN TESTS" in line:
                inside = True
            elif "END HIDDEN TESTS" in line:
                inside = False
            elif inside and line.strip():
                lines.append(line.strip())
    return lines


def _visible_text(path: Path) -> str:
    """The feedback page as a reader sees it: tags dropped (highlighting splits code into spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text()))


# ---------------------------------------------------------------------------------------------------
# Set-up: the config, the extras.
# ---------------------------------------------------------------------------------------------------

def test_nbgrader_is_an_instructor_extra_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    mentions = lambda specs: any(re.match(r"nbgrader\b", s) for s in specs)  # noqa: E731
    assert not mentions(project["dependencies"])
    extras = project["optional-dependencies"]
    assert mentions(extras["instructor"])
    assert not any(mentions(specs) for name, specs in extras.items() if name != "instructor")


def test_config_sets_grading_mode():
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
    assert config.OverwriteCells.add_missing_cells is True
    assert 30 <= config.Execute.timeout <= 600
    startup = "".join(config.Execute.extra_arguments)
    assert "--IPKernelApp.exec_lines=" in startup
    for setting in ("COURSE_MODEL", "tiny-gemma2", "COURSE_N_QUESTIONS", "HF_HUB_OFFLINE", *API_KEY_VARIABLES):
        assert setting in startup, setting
    assert Path(config.CourseDirectory.root) == ROOT / "nbgrader" / "course"
    assert Path(config.Exchange.root).is_relative_to(config.CourseDirectory.root)


# ---------------------------------------------------------------------------------------------------
# The round trip.
# ---------------------------------------------------------------------------------------------------

def test_round_trip_is_fast(graded):
    assert graded.seconds < MAX_SECONDS, f"the round trip took {graded.seconds:.0f} s"


def test_nothing_is_written_outside_the_course_root(graded):
    assert graded.cwd_left == []
    assert not (ROOT / "gradebook.db").exists() and not (ROOT / "nbgrader" / "gradebook.db").exists()
    assert (graded.course / "gradebook.db").exists()


def test_release_is_the_exercise_notebook(graded):
    release = nbformat.read(graded.release, as_version=4)
    exercises = nbformat.read(ROOT / "exercises" / NOTEBOOK, as_version=4)
    assert [c.cell_type for c in release.cells] == [c.cell_type for c in exercises.cells]
    for got, want in zip(release.cells, exercises.cells):
        assert got.id == want.id
        assert got.source == want.source, f"cell {want.id}: the release differs from exercises/{NOTEBOOK}"
        assert got.metadata.get("nbgrader") == want.metadata.get("nbgrader"), want.id
    assert release.metadata == exercises.metadata


def test_release_cells_are_locked_checks_explanations_or_exercises(graded):
    release = nbformat.read(graded.release, as_version=4)
    for cell in release.cells:
        meta = cell.metadata["nbgrader"]
        if meta.get("solution"):
            assert cell.cell_type == "code" and not meta["locked"] and "raise NotImplementedError()" in cell.source
        else:
            assert meta["locked"] and cell.metadata.get("editable") is False, cell.id
        if "checks.test_" in cell.source:
            assert meta.get("grade") and meta.get("points", 0) > 0, f"check cell {cell.id} carries no points"
    assert sum(float(c.metadata["nbgrader"].get("points", 0)) for c in release.cells) == sum(graded.points.values())


def test_release_holds_no_reference_solution(graded):
    folder = graded.release.parent
    assert sorted(p.name for p in folder.iterdir()) == [NOTEBOOK], "only the notebook is handed out"
    text = graded.release.read_text()
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text
    release_lines = {line.strip() for c in nbformat.read(graded.release, as_version=4).cells
                     for line in c.source.split("\n")}
    # Every line of a reference implementation that does not also appear outside the solution regions
    # (signatures and docstrings are handed out on purpose).
    solution_lines, given_lines, inside = [], set(), False
    for cell in graded.source.cells:
        for line in cell.source.split("\n"):
            if "BEGIN SOLUTION" in line:
                inside = True
            elif "END SOLUTION" in line:
                inside = False
            elif inside:
                solution_lines.append(line.strip())
            else:
                given_lines.add(line.strip())
    secret = {line for line in solution_lines if line and not line.startswith("#")} - given_lines
    assert len(secret) > 50, "the scan found too few solution lines to mean anything"
    leaked = sorted(secret & release_lines)
    assert leaked == [], f"reference solution lines in the release: {leaked[:5]}"
    for line in _hidden_lines(graded.source):
        assert line not in text, f"hidden test in the release: {line}"


@pytest.mark.parametrize("student", STUDENTS)
def test_scores(graded, student):
    assert set(WRONG_CHECKS.values()) | {DELETED_CHECK} <= set(graded.points)
    assert _cell_scores(graded.course, student) == _expected_scores(graded.points, student)


def test_wrong_answers_lose_exactly_their_points(graded):
    total = sum(graded.points.values())
    wrong = sum(_cell_scores(graded.course, "wrong").values())
    assert wrong == total - sum(graded.points[c] for c in WRONG_CHECKS.values())
    assert 0 < wrong < total


def test_tampered_check_cells_are_restored(graded):
    nb = _autograded(graded.course, "tampered")
    original = {_grade_id(c): c.source for c in graded.source.cells}
    assert _cell(nb, EDITED_CHECK).source == original[EDITED_CHECK]
    ids = [_grade_id(c) for c in nb.cells]
    assert ids.count(DELETED_CHECK) == 1
    assert ids.index(DELETED_CHECK) == ids.index(DELETED_AFTER) + 1, "restored in the wrong place"
    restored = _cell(nb, DELETED_CHECK)
    assert restored.source.endswith(original[DELETED_CHECK])
    assert any(o.get("name") == "stdout" and "all checks passed" in o.get("text", "") for o in restored.outputs), \
        "the restored check did not run"


def test_check_deleted_with_its_exercise_is_restored(graded):
    """nbgrader 0.9.6 alone crashes on this one (KeyError): nbgrader_config.py's RestoreDeletedCells."""
    nb = _autograded(graded.course, "gutted")
    ids = [_grade_id(c) for c in nb.cells]
    assert GUTTED[0] not in ids and ids.count(GUTTED[1]) == 1
    original = {_grade_id(c): c.source for c in graded.source.cells}
    assert _cell(nb, GUTTED[1]).source.endswith(original[GUTTED[1]])
    source_ids = [_grade_id(c) for c in graded.source.cells]
    before = source_ids[source_ids.index(GUTTED[0]) - 1]
    assert ids.index(GUTTED[1]) == ids.index(before) + 1


def test_cli_generates_a_release(tmp_path):
    assert rt.main(["--course-root", str(tmp_path / "course"), "--steps", "generate"]) == 0
    assert (tmp_path / "course" / "release" / PART / NOTEBOOK).exists()
    assert rt.main(["--course-root", str(tmp_path / "course"), "--steps", "collect",
                    "--submission", "bad/id=" + str(ROOT / "solutions" / NOTEBOOK)]) == 1


def test_grading_runs_offline_on_tiny_gemma2(graded):
    nb = _autograded(graded.course, "solution")
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                      if o.output_type == "stream")
    assert "Model: tiny-gemma2" in printed
    assert "Questions: 3, new tokens per answer: 12" in printed
    assert "offline (no API key found)" in printed, "the grading kernel saw the planted API key"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []


@pytest.mark.parametrize("student", STUDENTS)
def test_feedback_shows_no_hidden_tests(graded, student):
    page = graded.course / "feedback" / student / PART / f"{PART}.html"
    assert page.exists()
    text = _visible_text(page)
    assert "Score" in text and "check_judge" in text
    assert "HIDDEN TESTS" not in text
    hidden = _hidden_lines(graded.source)
    assert hidden, "the source has no hidden tests left to check"
    autograded = nbformat.read(graded.course / "autograded" / student / PART / NOTEBOOK, as_version=4)
    assert set(hidden) <= {line.strip() for c in autograded.cells for line in c.source.split("\n")}, \
        "the hidden tests were not put back for grading"
    for line in hidden:
        assert line not in text, f"hidden test in {student}'s feedback: {line}"
    assert "hidden_test_" not in text


def test_hidden_tests_ran(graded):
    nb = _autograded(graded.course, "solution")
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                      if o.output_type == "stream")
    assert printed.count("hidden_test_") >= 2


def test_grades_csv(graded):
    rows = rt.read_grades(graded.grades_csv)
    assert sorted(rows) == sorted(STUDENTS)
    total = sum(graded.points.values())
    for student in STUDENTS:
        expected = sum(_expected_scores(graded.points, student).values())
        assert float(rows[student]["max_score"]) == total
        assert float(rows[student]["raw_score"]) == expected, student
        assert float(rows[student]["score"]) == expected, student
