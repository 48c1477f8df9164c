"""The JupyterHub hand-out, end to end, through nbgrader's exchange: release, fetch, submit, collect, autograde,
feedback, release the feedback, fetch it back (docs/instructors.md, "On a JupyterHub").

The instructor's steps are the real ``nbgrader`` commands. One Unix user plays every student: each student runs
nbgrader's student actions (its exchange classes, as its command-line apps run them) in a home folder of its own
(``Exchange.assignment_dir``, its own ``Exchange.cache``) and names itself with nbgrader's
``CourseDirectory.student_id`` (``--student``), as a hub's separate accounts would, by their login names. The exchange is a temporary folder. Each part is released; two students hand it in: ``alice`` answered the
part's first exercises (those before its first check, from the solution notebook) and ``bob`` nothing, so their
notebooks run in seconds and their scores differ; at the end each holds their own feedback page with their own
score. (Whole sample students are graded by tests/test_nbgrader.py.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

from tools import grade_roundtrip as rt
from tools.build_notebooks import PARTS

pytestmark = pytest.mark.classroom  # grades sample students (transformers 5.x only)
COURSE = "persona-space"
STUDENTS = ("alice", "bob")  # alice answers the first exercises, bob hands the release back


def _first_exercises(part: str, release: Path) -> tuple[nbformat.NotebookNode, str]:
    """The release with the exercises before its first check answered from the solution notebook, and that
    check's grade id."""
    from tools.build_notebooks import solution_notebook

    nb = nbformat.read(release, as_version=4)
    solved = {c.metadata.get("nbgrader", {}).get("grade_id"): c.source for c in solution_notebook(part).cells}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade"):
            return nb, meta["grade_id"]
        if meta.get("solution"):
            cell.source = solved[meta["grade_id"]]
    raise AssertionError(f"{part} has no check")


def _student(home: Path, action: str, part: str, exchange: Path) -> None:
    """One of nbgrader's student actions (``fetch_assignment``, ``submit``, ``fetch_feedback``), as that student runs
    it on the hub: in their home, with their own cache and student id. nbgrader's own exchange classes, which its
    command-line apps construct the same way, run in this process: a Python start-up and nbgrader's import per
    command would cost seconds each."""
    from nbgrader.auth import Authenticator
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.exchange import ExchangeError
    from nbgrader.exchange.default import ExchangeFetchAssignment, ExchangeFetchFeedback, ExchangeSubmit
    from traitlets.config import Config

    home.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.CourseDirectory.course_id = COURSE
    config.CourseDirectory.assignment_id = part
    config.CourseDirectory.student_id = home.name  # what --student sets; a hub's account name otherwise
    config.CourseDirectory.root = str(home)
    config.Exchange.root = str(exchange)
    config.Exchange.assignment_dir = str(home)
    config.Exchange.cache = str(home / ".cache" / "nbgrader")
    kind = {"fetch_assignment": ExchangeFetchAssignment, "submit": ExchangeSubmit,
            "fetch_feedback": ExchangeFetchFeedback}[action]
    coursedir = CourseDirectory(config=config)
    try:
        kind(coursedir=coursedir, authenticator=Authenticator(config=config), config=config).start()
    except ExchangeError as exc:
        pytest.fail(f"{home.name}: nbgrader {action} {part} failed: {exc}")


@pytest.fixture(scope="module")
def exchanged(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    exchange, course, homes = base / "exchange", base / "course", base / "home"
    exchange.mkdir()
    os.chmod(exchange, 0o1777)  # as on a hub: every account may write, only the owner may delete (sticky bit)
    on_exchange = f"--Exchange.root={exchange}"
    first_checks: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        for part in PARTS:
            release = rt.generate(course, echo=False, part=part)
            rt.nbgrader(course, "release_assignment", part, on_exchange, "--force", echo=False)
            answered, first_checks[part] = _first_exercises(part, release)
            for login in STUDENTS:
                home = homes / login
                _student(home, "fetch_assignment", part, exchange)
                fetched = home / part / f"{part}.ipynb"
                assert fetched.read_text() == release.read_text(), f"{login} fetched something else than the release"
                if login == "alice":  # she works on it and saves; bob hands it back as it came
                    nbformat.write(answered, fetched)
                _student(home, "submit", part, exchange)
            rt.nbgrader(course, "collect", part, on_exchange, "--update", echo=False)
            rt.autograde(course, echo=False, part=part)
            rt.feedback(course, echo=False, part=part)
            rt.nbgrader(course, "release_feedback", part, on_exchange, echo=False)
            for login in STUDENTS:
                _student(homes / login, "fetch_feedback", part, exchange)
        grades = rt.export(course, echo=False)
    return base, course, homes, grades, first_checks


@pytest.mark.parametrize("part", PARTS)
def test_each_student_holds_their_own_feedback_with_their_score(exchanged, part):
    base, course, homes, grades, first_checks = exchanged
    rows = rt.read_grades(grades, part)
    assert set(rows) == set(STUDENTS), f"collected: {sorted(rows)}"
    source = nbformat.read(course / "source" / part / f"{part}.ipynb", as_version=4)
    points = {c.metadata["nbgrader"]["grade_id"]: float(c.metadata["nbgrader"].get("points", 0)) for c in source.cells
              if c.metadata.get("nbgrader", {}).get("grade")}
    total = sum(points.values())
    assert 0 < points[first_checks[part]] < total
    for login in STUDENTS:
        want = points[first_checks[part]] if login == "alice" else 0.0
        assert float(rows[login]["score"]) == want, (login, rows[login])
        pages = sorted((homes / login / part / "feedback").glob(f"*/{part}.html"))
        assert len(pages) == 1, f"{login} holds {pages}"
        page = pages[0].read_text()
        # nbgrader's feedback header: "<part> (Score: 2.0 / 21.0)"
        found = re.search(r"Score:\s*([0-9.]+)\s*/\s*([0-9.]+)", page)
        assert found, f"{login}'s feedback shows no score"
        assert (float(found.group(1)), float(found.group(2))) == (want, total), (login, found.group(0))
        assert page == rt.feedback_path(course, login, part).read_text(), f"{login} got someone else's feedback"


def test_nothing_is_left_in_the_exchange_but_what_nbgrader_keeps(exchanged):
    base, course, homes, grades, _ = exchanged
    exchange = base / "exchange" / COURSE
    assert sorted(p.name for p in exchange.iterdir()) == ["feedback", "inbound", "outbound"]
    assert sorted(p.name for p in (exchange / "outbound").iterdir()) == sorted(PARTS)
    submitted = sorted(p.name.split("+")[0] for p in (exchange / "inbound").iterdir())
    assert submitted == sorted(list(STUDENTS) * len(PARTS))
    assert len(list((exchange / "feedback").glob("*.html"))) == len(STUDENTS) * len(PARTS)
