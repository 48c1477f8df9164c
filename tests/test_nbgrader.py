"""Classroom grading, end to end: the real nbgrader commands, offline, in a temporary course root.

For each course part (``tools.build_notebooks.PARTS``), one round trip (``tools.grade_roundtrip``:
generate, collect, autograde, feedback, export) grades the part's sample students
(``tools/sample_submissions.py``), and the tests below read what it left: the release, the gradebook, the
autograded notebooks, the feedback HTML and the grades CSV. Every part has ``solution`` (full marks) and
``blank`` (0). Part 1 adds a demo class of realistic submissions:

- ``rewritten``: seven exercises answered correctly but differently: full marks (21);
- ``mistakes``: three wrong exercises, one of them the batched extraction without the attention mask,
  which Exercise 5 calls: each costs only its own points (15 of 21). The student also edited a failing
  check cell to ``pass`` and deleted a passing one: both are restored, so neither changes a score;
- ``broken``: a syntax error, an endless loop, and an exercise deleted with its check (18 of 21), graded
  at most 60 s slower than the solution.

Part 2 adds ``rewritten`` (seven exercises answered differently: 11 of 11) and ``mistakes`` (three realistic
mistakes, one of them a steering hook left registered by its check: 6 of 11).

Both parts have ``delegating``: three exercises handed to the course's own implementations in ``utils``, one
in each way the checks refuse (the course's function itself, an alias of it, an answer that calls it): each
costs its own check (15 of 21, 6 of 11), and the message names the course's function.

The feedback must read like a tutor (no traceback through the checks' own code) and show every figure. Three of
Part 1's students are graded again two at a time (``--jobs 2``, the ``parallel_class`` fixture of tests/conftest.py)
and must get the same grades; each part's class report must count exactly the mistakes its sample students were
built with (``tools/sample_submissions.py``'s ``MISTAKES``).
This file ships with the ``tests`` package, so it holds no reference solution: the correct answers are read
from ``solutions/`` at run time (``tools/sample_submissions.py`` edits them).
"""

from __future__ import annotations

import ast
import html
import re
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from tools import grade_roundtrip as rt
from tools import sample_submissions as samples
from tools.build_notebooks import PARTS
from utils import settings

ROOT = rt.ROOT
MAX_SECONDS = 450  # one part's whole round trip, 5-6 students, on 2 busy CPU cores (measured: 484 s for Part 2 with 3 other test runs beside it)
LOOP_EXTRA_SECONDS = 60  # an endless loop may cost at most this much grading time over a correct submission
# What the demo class must score, in points (of 21 for Part 1).
TOTALS = {"part1_persona_space": {"solution": 21, "rewritten": 21, "mistakes": 15, "broken": 18, "delegating": 15,
                                  "blank": 0},
          "part2_stabilizing": {"solution": 11, "rewritten": 11, "mistakes": 6, "delegating": 6, "blank": 0},
          "part3_trait_vectors": {"solution": 15, "rewritten": 15, "mistakes": 10, "delegating": 12, "blank": 0}}
FIGURES = {"part1_persona_space": 7}  # plotly figures the solution notebook shows
API_KEY_VARIABLES = ("COURSE_API_KEY", "OPENROUTER_API_KEY", "OPENAI_API_KEY")
PLOTLY_MIME = "application/vnd.plotly.v1+json"
# The classroom graded: every sample student ("full", the default), or only ``solution``, ``rewritten``, ``mistakes``
# and ``blank`` ("minimal": `make test-transformers4` grades every part again under 4.57 that way, with
# `-m "not classroom"`, which leaves out the tests about the other students and the class report).
CLASSROOM = settings.get("COURSE_TEST_CLASSROOM")  # "full" or "minimal"
MINIMAL = ("solution", "rewritten", "mistakes", "blank")


def _students(part: str) -> list[str]:
    return samples.students(part) if CLASSROOM == "full" else [s for s in samples.students(part) if s in MINIMAL]


CASES = [(part, student) for part in PARTS for student in _students(part)]
classroom = pytest.mark.classroom  # needs the full classroom
PART1 = pytest.mark.parametrize("graded", ["part1_persona_space"], indirect=True)  # Part 1's classroom
PART2 = pytest.mark.parametrize("graded", ["part2_stabilizing"], indirect=True)  # Part 2's classroom


def _grade_id(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def _cell(nb, grade_id):
    return next(c for c in nb.cells if _grade_id(c) == grade_id)


_ROUND_TRIPS: dict[str, SimpleNamespace] = {}


@pytest.fixture(scope="module", params=PARTS)
def graded(request, tmp_path_factory):
    """One part's whole round trip, run once per part whatever order pytest runs the tests in (the tests
    parametrise ``graded`` in more than one way, and pytest may tear a module fixture down between them)."""
    part = request.param
    if part not in _ROUND_TRIPS:
        _ROUND_TRIPS[part] = _round_trip(part, tmp_path_factory)
    return _ROUND_TRIPS[part]


def _round_trip(part: str, tmp_path_factory) -> SimpleNamespace:
    """Run one part's whole round trip; return where everything is and how long it took."""
    course = tmp_path_factory.mktemp(f"course-{part}")
    work = tmp_path_factory.mktemp(f"submissions-{part}")
    with pytest.MonkeyPatch.context() as mp:
        # The grading kernel must pick its own settings (nbgrader_config.py) and never use an API:
        # plant a key and an unreachable API server; grading must ignore both.
        for var in ("COURSE_MODEL", "COURSE_N_QUESTIONS", "COURSE_MAX_NEW_TOKENS", "COURSE_N_TRAITS",
                    "COURSE_OUT_DIR", "COURSE_LAYER", "COURSE_MIN_SCORE", "COURSE_CHECK_TIMEOUT", "COURSE_CHECK_DEBUG"):
            mp.delenv(var, raising=False)
        mp.setenv("OPENROUTER_API_KEY", "sk-test-not-a-key")
        mp.setenv("COURSE_API_BASE_URL", "http://127.0.0.1:9/v1")
        cwd = tmp_path_factory.mktemp("cwd")  # nothing may land in the directory nbgrader is run from
        mp.chdir(cwd)

        t0 = time.perf_counter()
        release = rt.generate(course, echo=False, part=part)
        submissions = samples.build(part, release, work, only=_students(part))
        rt.collect(course, submissions, part=part)
        rt.autograde(course, echo=False, part=part)
        rt.feedback(course, echo=False, part=part)
        grades_csv = rt.export(course, echo=False)
        seconds = time.perf_counter() - t0

    source = nbformat.read(course / "source" / part / f"{part}.ipynb", as_version=4)
    points = {_grade_id(c): float(c.metadata["nbgrader"]["points"]) for c in source.cells
              if c.metadata["nbgrader"].get("grade")}
    ran = {student: rt.notebook_seconds(course, student, part) for student in submissions}
    print(f"\n{part}: round trip {seconds:.0f} s; seconds each notebook ran: "
          + ", ".join(f"{s} {t:.1f}" for s, t in ran.items()))
    return SimpleNamespace(part=part, course=course, release=release, source=source, points=points,
                           seconds=seconds, ran=ran, grades_csv=grades_csv, students=list(submissions),
                           cwd_left=sorted(p.name for p in cwd.iterdir()))


def _cell_scores(g, student: str) -> dict[str, float]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{g.course / 'gradebook.db'}", "persona-space") as gb:
        submission = gb.find_submission_notebook(g.part, g.part, student)
        return {grade.name: float(grade.score) for grade in submission.grades}


def _expected_scores(g, student: str) -> dict[str, float]:
    lost = samples.lost(g.part, student, list(g.points))
    return {gid: 0.0 if gid in lost else p for gid, p in g.points.items()}


def _need_classroom(g) -> None:
    if CLASSROOM != "full":
        pytest.fail("This test reads the full classroom of sample students: run it with COURSE_TEST_CLASSROOM=full "
                    "(the default), or leave it out with -m 'not classroom'.")


def _autograded(g, student: str):
    return nbformat.read(rt.autograded_path(g.course, student, g.part), as_version=4)


def _printed(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _error_text(cell) -> str:
    ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    return "\n".join(ansi.sub("", line) for o in cell.get("outputs", []) if o.output_type == "error"
                     for line in o.traceback)


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
    """The feedback page as a reader sees it: scripts and tags dropped (highlighting splits code into spans)."""
    page = re.sub(r"<script\b.*?</script>", "", path.read_text(), flags=re.S)
    page = re.sub(r"<style\b.*?</style>", "", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def _checks_module(part: str) -> Path:
    """The checks the part's notebook imports (``import tests.<module> as checks``)."""
    found = re.search(r"import tests\.(\w+) as checks", (ROOT / "src" / f"{part}.py").read_text())
    assert found, f"src/{part}.py does not import its checks as `import tests.<module> as checks`"
    return ROOT / "tests" / f"{found.group(1)}.py"


def _check_internal_names(part: str) -> set[str]:
    """Names only the checks' own code uses: the module-level helpers, fixtures, fakes and constants of the
    part's checks module (its public ``test_*`` functions are called from the visible check cells), and the
    private ones of ``tests/checking.py`` (its public names are English words: fail, call, check)."""
    names = set()
    for path, private_only in ((_checks_module(part), False), (ROOT / "tests" / "checking.py", True)):
        for node in ast.parse(path.read_text()).body:
            found = set()
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found = {node.name}
            elif isinstance(node, ast.Assign):
                found = {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.ImportFrom):
                found = {a.asname for a in node.names if a.asname}
            names |= {n for n in found if not n.startswith(("test_", "hidden_test_"))
                      and (not private_only or n.startswith("_") or n.isupper())}
    return names - {"CheckFailure"}  # the exception's name may be shown


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
    assert 30 <= config.Execute.timeout <= LOOP_EXTRA_SECONDS
    startup = "".join(config.Execute.extra_arguments)
    assert "--IPKernelApp.exec_lines=" in startup
    for setting in ("COURSE_MODEL", "tiny-gemma2", "COURSE_N_QUESTIONS", "HF_HUB_OFFLINE", "COURSE_CHECK_TIMEOUT",
                    *API_KEY_VARIABLES):
        assert setting in startup, setting
    assert Path(config.CourseDirectory.root) == ROOT / "nbgrader" / "course"
    assert Path(config.Exchange.root).is_relative_to(config.CourseDirectory.root)


def test_cli_takes_the_assignment_and_generates_a_release(tmp_path):
    for part in PARTS:
        assert rt.main(["--assignment", part, "--course-root", str(tmp_path / "course"), "--steps", "generate"]) == 0
        assert (tmp_path / "course" / "release" / part / f"{part}.ipynb").exists()
    assert rt.main(["--course-root", str(tmp_path / "course"), "--steps", "collect",
                    "--submission", "bad/id=" + str(ROOT / "solutions" / f"{PARTS[0]}.ipynb")]) == 1
    with pytest.raises(SystemExit):
        rt.main(["--assignment", "part9_nonexistent", "--steps", "generate"])
    assert rt.main(["--course-root", str(tmp_path / "course"), "--steps", "autograde", "--jobs", "0"]) == 1
    assert "report" in rt.STEPS and rt.STEPS.index("report") > rt.STEPS.index("export")


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
    exercises = nbformat.read(ROOT / "exercises" / f"{graded.part}.ipynb", as_version=4)
    assert [c.cell_type for c in release.cells] == [c.cell_type for c in exercises.cells]
    for got, want in zip(release.cells, exercises.cells):
        assert got.id == want.id
        assert got.source == want.source, f"cell {want.id}: the release differs from exercises/{graded.part}.ipynb"
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
    assert sorted(p.name for p in folder.iterdir()) == [f"{graded.part}.ipynb"], "only the notebook is handed out"
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
    assert len(secret) > 20, "the scan found too few solution lines to mean anything"
    leaked = sorted(secret & release_lines)
    assert leaked == [], f"reference solution lines in the release: {leaked[:5]}"
    for line in _hidden_lines(graded.source):
        assert line not in text, f"hidden test in the release: {line}"


@pytest.mark.parametrize("graded, student", CASES, indirect=["graded"])
def test_scores(graded, student):
    """Each check cell scores all its points or none, and exactly the expected ones are lost."""
    assert _cell_scores(graded, student) == _expected_scores(graded, student)


def test_totals_are_what_the_classroom_deserves(graded):
    """The demo class: solutions pasted 21, written differently 21, three mistakes 15 (each wrong
    exercise costs only its own points), a syntax error plus an endless loop 18, blank 0."""
    total = sum(graded.points.values())
    expected = TOTALS.get(graded.part, {"solution": total, "blank": 0})
    expected = {student: points for student, points in expected.items() if student in graded.students}
    assert expected["solution"] == total and expected["blank"] == 0
    got = {student: sum(_cell_scores(graded, student).values()) for student in expected}
    assert got == expected


@PART1
@classroom
def test_one_mistake_is_charged_once(graded):
    """A later exercise that calls a wrong earlier one is checked with the course's reference for it."""
    _need_classroom(graded)
    mistakes = _autograded(graded, "mistakes")
    batched = _error_text(_cell(mistakes, "check_extract_batched"))
    assert "attention_mask" in batched and "LEFT padding" in batched
    vectors = _printed(_cell(mistakes, "check_persona_vectors"))
    assert "Note: Exercise 4b is still wrong; this check used the course's reference" in vectors
    assert "all checks passed" in vectors
    broken = _autograded(graded, "broken")
    generate_all = _printed(_cell(broken, "check_generate_all"))
    assert "Exercise 2a is still wrong" in generate_all and "all checks passed" in generate_all


@PART2
@classroom
def test_part2_mistakes_are_named_and_a_left_hook_costs_nothing_later(graded):
    """Part 2's three mistakes fail with the message that names them; the steering hook the student never removed
    (no try/finally) is cleaned off the checks' model, so the capping check after it still passes; and every
    notebook cell outside the failing checks runs, for the student who made mistakes and for the one who wrote
    every answer differently."""
    _need_classroom(graded)
    mistakes = _autograded(graded, "mistakes")
    assert "hidden_states[l + 1]" in _error_text(_cell(mistakes, "check_turn_projections"))
    assert "finally" in _error_text(_cell(mistakes, "check_add_steering"))
    assert "KL(Q || P)" in _error_text(_cell(mistakes, "check_next_token_kl"))
    assert "all checks passed" in _printed(_cell(mistakes, "check_capping"))
    for student, failing in (("mistakes", samples.LOST[graded.part]["mistakes"]), ("rewritten", set())):
        nb = _autograded(graded, student)
        errors = [_grade_id(c) or c.source[:60] for c in nb.cells if c.cell_type == "code" and _error_text(c)
                  and _grade_id(c) not in failing]
        assert errors == [], f"{student}: cells that raised: {errors}"


@pytest.mark.parametrize("graded", PARTS, indirect=True)
@classroom
def test_a_delegated_exercise_costs_its_check_and_names_the_course_function(graded):
    """The ``delegating`` student's three answers that hand the work to ``utils`` (the course's function itself,
    an alias of it, a function that calls it) fail their checks with the message that names the course's function
    and says how; every other cell of the notebook runs, and a later exercise that uses a delegated one is graded
    on its own."""
    _need_classroom(graded)
    nb = _autograded(graded, "delegating")
    delegated = samples.DELEGATED[graded.part]
    assert set(delegated) == samples.LOST[graded.part]["delegating"]
    for check, (dotted, how) in delegated.items():
        error = _error_text(_cell(nb, check))
        assert f"this answer hands the work to the course's own {dotted}; write it yourself (you may read utils/ " \
               "for ideas)" in error, (check, error[:600])
        assert how in error, (check, error[:600])
    errors = [_grade_id(c) or c.source[:60] for c in nb.cells if c.cell_type == "code" and _error_text(c)
              and _grade_id(c) not in delegated]
    assert errors == [], f"cells that raised: {errors}"
    if graded.part == "part1_persona_space":
        vectors = _printed(_cell(nb, "check_persona_vectors"))
        assert "Note: Exercise 4b is still wrong" in vectors and "all checks passed" in vectors


@PART1
@classroom
def test_an_endless_loop_costs_one_check_and_little_time(graded):
    _need_classroom(graded)
    broken = _autograded(graded, "broken")
    assert "generate_response_api did not return within 20 s" in _error_text(_cell(broken, "check_generate_one"))
    # The later cell that generates every answer calls it again (through generate_all_responses): at once.
    later = [c for c in broken.cells if c.cell_type == "code" and "responses, failures = generate_all_responses(" in c.source]
    assert later and "re-run the cell that defines generate_response_api" in _printed(later[0])
    extra = graded.ran["broken"] - graded.ran["solution"]
    assert extra <= LOOP_EXTRA_SECONDS, f"the endless loop cost {extra:.0f} s of grading time"


@PART1
@classroom
def test_tampered_check_cells_are_restored(graded):
    _need_classroom(graded)
    nb = _autograded(graded, "mistakes")
    original = {_grade_id(c): c.source for c in graded.source.cells}
    assert _cell(nb, "check_cosine").source == original["check_cosine"]
    ids = [_grade_id(c) for c in nb.cells]
    assert ids.count("check_pca") == 1
    assert ids.index("check_pca") == ids.index("ex_pca") + 1, "restored in the wrong place"
    restored = _cell(nb, "check_pca")
    assert restored.source.endswith(original["check_pca"])
    assert "all checks passed" in _printed(restored), "the restored check did not run"


@PART1
@classroom
def test_check_deleted_with_its_exercise_is_restored(graded):
    """nbgrader 0.9.6 alone crashes on this one (KeyError): nbgrader_config.py's RestoreDeletedCells."""
    _need_classroom(graded)
    nb = _autograded(graded, "broken")
    ids = [_grade_id(c) for c in nb.cells]
    assert "ex_auc" not in ids and ids.count("check_auc") == 1
    original = {_grade_id(c): c.source for c in graded.source.cells}
    assert _cell(nb, "check_auc").source.endswith(original["check_auc"])
    source_ids = [_grade_id(c) for c in graded.source.cells]
    before = source_ids[source_ids.index("ex_auc") - 1]
    assert ids.index("check_auc") == ids.index(before) + 1


def test_grading_runs_offline_on_tiny_gemma2(graded):
    nb = _autograded(graded, "solution")
    printed = "".join(_printed(c) for c in nb.cells if c.cell_type == "code")
    assert "Model: tiny-gemma2" in printed
    import transformers

    # The grading kernel runs in the environment that runs nbgrader (under `make test-transformers4`, 4.57).
    assert f"transformers {transformers.__version__}\n" in printed
    assert "offline (no API key found)" in printed, "the grading kernel saw the planted API key"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []


def test_hidden_tests_ran(graded):
    nb = _autograded(graded, "solution")
    printed = "".join(_printed(c) for c in nb.cells if c.cell_type == "code")
    assert printed.count("hidden_test_") >= len([line for line in _hidden_lines(graded.source) if "hidden_test_" in line])


def test_grades_csv(graded):
    rows = rt.read_grades(graded.grades_csv, graded.part)
    assert sorted(rows) == sorted(graded.students)
    total = sum(graded.points.values())
    for student in graded.students:
        expected = sum(_expected_scores(graded, student).values())
        assert float(rows[student]["max_score"]) == total
        assert float(rows[student]["raw_score"]) == expected, student
        assert float(rows[student]["score"]) == expected, student


# ---------------------------------------------------------------------------------------------------
# What the students read: the feedback.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("graded, student", CASES, indirect=["graded"])
def test_feedback_shows_no_hidden_tests(graded, student):
    page = rt.feedback_path(graded.course, student, graded.part)
    assert page.exists()
    text = _visible_text(page)
    assert "Score" in text
    assert "HIDDEN TESTS" not in text
    hidden = _hidden_lines(graded.source)
    autograded = _autograded(graded, student)
    assert set(hidden) <= {line.strip() for c in autograded.cells for line in c.source.split("\n")}, \
        "the hidden tests were not put back for grading"
    for line in hidden:
        assert line not in text, f"hidden test in {student}'s feedback: {line}"
    assert "hidden_test_" not in text


@pytest.mark.parametrize("graded, student", CASES, indirect=["graded"])
def test_feedback_reads_like_a_tutor(graded, student):
    """No traceback through the checks' own code: no path of theirs, no helper or fixture name, only the
    message (and the student's own frames when their code raised)."""
    text = _visible_text(rt.feedback_path(graded.course, student, graded.part))
    for internal in (f"tests/{_checks_module(graded.part).name}", "tests/checking.py", "_fail(", "_call("):
        assert internal not in text, f"{student}'s feedback shows {internal!r}"
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
    leaked = sorted(_check_internal_names(graded.part) & words)
    assert leaked == [], f"{student}'s feedback names the checks' internals: {leaked}"
    nb = _autograded(graded, student)
    failed = set()
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.metadata.get("nbgrader", {}).get("grade"):
            continue
        error = _error_text(cell)
        if not error:
            continue
        failed.add(_grade_id(cell))
        where = (student, _grade_id(cell), error[:800])
        assert "site-packages" not in error, where
        if "Traceback (most recent call last)" in error:
            # Only IPython's one-frame traceback of the check cell itself, for a name the student's
            # notebook never defined: nothing from inside the checks.
            assert "NameError" in error and error.count("Cell In[") == 1, where
        else:
            assert "✗" in error, where  # the checks' own rendering: a message
    assert failed == samples.lost(graded.part, student, list(graded.points))


@pytest.mark.parametrize("graded, student", CASES, indirect=["graded"])
def test_feedback_shows_every_figure(graded, student):
    """Every plotly figure the notebook made is drawn in the feedback, by plotly.js embedded once."""
    nb = _autograded(graded, student)
    made = sum(PLOTLY_MIME in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    page = rt.feedback_path(graded.course, student, graded.part).read_text()
    assert page.count('class="plotly-graph-div"') == made
    assert page.count("* plotly.js v") == (1 if made else 0), "plotly.js must be embedded once per page"
    if student == "solution":
        assert made == FIGURES.get(graded.part, made) and made > 0
    external = re.findall(r"<script[^>]*\bsrc=[\"']?(https?://[^\"' >]+)", page)
    assert not any("plot" in url for url in external), f"the figures must not need the network: {external}"


def test_learners_environment_has_no_grading_ui():
    """`make setup` switched every part of nbgrader's Jupyter UI off (tools/nbgrader_ui.py), the menu included;
    tests/test_browser.py looks at the result in a real JupyterLab."""
    from tools import nbgrader_ui

    plugins = nbgrader_ui.lab_plugins()
    assert {"@jupyter/nbgrader:menu", "@jupyter/nbgrader:formgrader"} <= set(plugins), plugins
    assert nbgrader_ui.visible() == [], "run `make nbgrader-ui-off` (`make instructor-ui` switched them on)"


# ---------------------------------------------------------------------------------------------------
# Grading two students at a time, and the class report.
# ---------------------------------------------------------------------------------------------------

@PART1
@classroom
def test_two_jobs_grade_exactly_as_one(graded, parallel_class):
    """``--jobs 2`` (each student in a scratch course root, merged into the one gradebook) gives the same grades.csv
    rows, cell scores and autograded outputs' verdicts as the one-job round trip, for the same students."""
    _need_classroom(graded)
    from tests.conftest import PARALLEL_CLASS

    course, grades_csv = parallel_class
    assert set(PARALLEL_CLASS) <= set(graded.students)
    one = {s: row for s, row in rt.read_grades(graded.grades_csv, graded.part).items() if s in PARALLEL_CLASS}
    two = rt.read_grades(grades_csv, graded.part)
    assert two == one
    parallel = SimpleNamespace(course=course, part=graded.part)
    for student in PARALLEL_CLASS:
        assert _cell_scores(parallel, student) == _cell_scores(graded, student), student
        assert _cell_scores(parallel, student) == _expected_scores(graded, student), student
        assert rt.feedback_path(course, student, graded.part).exists()
    assert not (course / "parallel" / graded.part).exists() or not any((course / "parallel" / graded.part).iterdir()), \
        "the scratch course roots of graded students must be removed"


def _expected_mistakes(g) -> dict[str, list[str]]:
    """Mistake identifier -> the sample students built with it (tools/sample_submissions.py's MISTAKES)."""
    import importlib

    from tests import checking

    module = importlib.import_module(f"tests.{_checks_module(g.part).stem}")
    expected: dict[str, list[str]] = {}
    for student, cells in samples.MISTAKES.get(g.part, {}).items():
        assert set(cells) <= samples.LOST[g.part][student], f"{student}: a named mistake in a cell it does not lose"
        for grade_id, (check_name, stage) in cells.items():
            if stage.startswith("_"):
                label = getattr(module, stage)
                assert label in module.PROMISES.labels[check_name], (check_name, stage)
                identifier = checking.mistake_id(check_name, label)
            else:
                identifier = checking.mistake_id(check_name, None, stage)
            expected.setdefault(identifier, []).append(student)
            assert CELL_OF.setdefault((g.part, identifier), grade_id) == grade_id, identifier
    return {k: sorted(v) for k, v in expected.items()}


CELL_OF: dict[tuple[str, str], str] = {}  # (part, mistake identifier) -> the check cell it is made in


def _syntax_errors(g) -> set[str]:
    """The students whose handed-in notebook has an answer cell Python cannot parse."""
    import ast as python_ast

    out = set()
    for student in g.students:
        nb = nbformat.read(g.course / "submitted" / student / g.part / f"{g.part}.ipynb", as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
                try:
                    python_ast.parse("\n".join(line for line in cell.source.split("\n")
                                               if not line.lstrip().startswith(("%", "!"))))
                except SyntaxError:
                    out.add(student)
    return out


@pytest.mark.parametrize("graded", PARTS, indirect=True)
@classroom
def test_class_report_counts_the_mistakes_the_class_was_built_with(graded):
    """The class report (tools/class_report.py) lists exactly the named mistakes the sample students were built
    with, each with the students who made it; every other lost check is an unnamed failure (not written, a name
    never defined); the students with a syntax error or a time limit; per exercise, the fraction with full marks.
    It is one offline page (plotly.js inside, nothing from the network) and names no hidden check."""
    _need_classroom(graded)
    from tools import class_report

    page, table, report = class_report.write(graded.course, graded.part)
    expected = _expected_mistakes(graded)
    assert {m.identifier: sorted(m.students) for m in report.mistakes.values()} == expected
    assert report.counts() == {k: len(v) for k, v in expected.items()}
    assert {m.identifier: m.grade_id for m in report.mistakes.values()} == {
        k: CELL_OF[(graded.part, k)] for k in expected}
    named = {(m.grade_id, s) for m in report.mistakes.values() for s in m.students}
    unnamed = {(g, s) for (g, _), who in report.unnamed.items() for s in who}
    for student in graded.students:
        lost = samples.lost(graded.part, student, list(graded.points))
        got = {g for g, s in named | unnamed if s == student}
        assert got == lost, (student, sorted(got ^ lost))
    assert set(report.syntax_error) == _syntax_errors(graded)
    timed_out = {s for k, v in expected.items() if k.endswith("/time-limit") for s in v}
    assert set(report.time_limit) == timed_out
    for ex in report.exercises:
        assert set(ex.points) == set(graded.students)
        full = {s for s in graded.students if ex.grade_id not in samples.lost(graded.part, s, list(graded.points))}
        assert {s for s, p in ex.points.items() if p == ex.max_points} == full, ex.grade_id
    # Each named mistake's message, quoted once: the one the autograded notebook shows for it.
    for m in report.mistakes.values():
        assert m.message and m.message in _error_text(_cell(_autograded(graded, m.students[0]), m.grade_id))
    # The CSV has the same counts.
    import csv as csv_module

    with open(table, newline="") as f:
        rows = list(csv_module.DictReader(f))
    assert {r["item"]: int(r["students"]) for r in rows if r["kind"] == "mistake"} == report.counts()
    assert len([r for r in rows if r["kind"] == "exercise"]) == len(graded.points)
    text = page.read_text()
    assert text.count("* plotly.js v") == 1 and not re.findall(r"<script[^>]*\bsrc=", text), "plotly.js inline, once"
    for hidden in re.findall(r"(hidden_test_\w+)", (ROOT / "src" / f"{graded.part}.py").read_text()):
        assert hidden not in text and hidden not in table.read_text(), hidden
    for line in _hidden_lines(graded.source):
        assert line not in text
