"""The instructor's view, in a real browser: nbgrader's formgrader in headless Chromium, on an autograded course.

A Jupyter server is started with nbgrader's formgrader server extension switched on *for that server only*: a
scratch Jupyter config folder (``JUPYTER_CONFIG_DIR``) whose ``jupyter_server_config.json`` enables it, over this
environment's own settings, which keep every nbgrader UI off for learners (``make setup``; tests/test_browser.py
checks the learner's JupyterLab). Its course root is a copy of Part 1 autograded for three sample students
(``parallel_class`` in tests/conftest.py). In the browser: the assignment is listed, the submissions with their
scores, and one check cell of the ``mistakes`` student gets a manual score (nbgrader lets instructors override any
graded cell's score): the gradebook then holds it and the student's total changes by exactly that much.

Needs Chromium (``$COURSE_CHROMIUM``, default /usr/bin/chromium) and the ``playwright`` package; it never skips:
without a browser it fails and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from tests.servers import chromium, jupyter_server

pytestmark = pytest.mark.classroom  # on sample students graded under transformers 5.x
PART = "part1_persona_space"
FORMGRADER = "nbgrader.server_extensions.formgrader"
STUDENT, CELL, MANUAL = "mistakes", "check_cosine", 1.0  # a cell the student lost (0 of 2): the grader gives 1


def _gradebook(course):
    from nbgrader.api import Gradebook

    return Gradebook(f"sqlite:///{course / 'gradebook.db'}", "persona-space")


@pytest.fixture(scope="module")
def formgrader(parallel_class, tmp_path_factory):
    """A Jupyter server with the formgrader on, for a copy of the autograded course root."""
    tmp = tmp_path_factory.mktemp("formgrader")
    course = tmp / "course"
    shutil.copytree(parallel_class[0], course)
    config = tmp / "config"
    config.mkdir()
    (config / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {FORMGRADER: True}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    with jupyter_server("jupyter_server", course, env, tmp / "server.log", "/formgrader/api/assignments") as server:
        yield {**server, "course": course, "log": tmp / "server.log"}


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def test_formgrader_shows_the_class_and_saves_a_manual_grade(formgrader, browser):
    from tests.conftest import PARALLEL_CLASS

    base, token, course = formgrader["base"], formgrader["token"], formgrader["course"]
    with _gradebook(course) as gb:
        submission = gb.find_submission_notebook(PART, PART, STUDENT)
        submission_id = submission.id
        before = {g.name: float(g.score) for g in submission.grades}
        max_score = float(gb.find_notebook(PART, PART).max_score)
    assert before[CELL] == 0.0, "the sample student was built to lose this cell"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    try:
        # The assignments, as the formgrader lists them.
        page.goto(f"{base}/formgrader/manage_assignments?token={token}")
        page.wait_for_selector(f"text={PART}")
        # The notebook's submissions, with their scores.
        page.goto(f"{base}/formgrader/gradebook/{PART}/{PART}")
        page.wait_for_selector("a.name-shown", state="attached")
        rows = page.eval_on_selector_all(
            "tbody tr", "rows => rows.map(r => [r.querySelector('a.name-shown')?.textContent, "
                        "r.querySelector('.score')?.textContent])")
        shown = {name: score for name, score in rows if name}
        assert set(shown) == set(PARALLEL_CLASS), rows
        assert shown[STUDENT] == f"{sum(before.values()):g} / {max_score:g}", shown
        # One submission, and a manual score for one check cell.
        page.goto(f"{base}/formgrader/submissions/{submission_id}/")
        box = page.locator(f"input.score#{CELL}")
        box.wait_for()
        # The form fills each box from the gradebook's API once the page has loaded: the autograded score as the
        # placeholder, no manual score yet.
        page.wait_for_function("id => document.getElementById(id).placeholder !== ''", arg=CELL)
        assert float(box.get_attribute("placeholder")) == before[CELL], "the form shows the autograded score"
        assert box.input_value() == ""
        with page.expect_response(lambda r: "/formgrader/api/grade/" in r.url and r.request.method == "PUT"
                                  and r.status == 200):
            box.fill(f"{MANUAL:g}")
            box.press("Tab")  # the formgrader saves a score when its box loses focus
    finally:
        page.close()
    with _gradebook(course) as gb:
        submission = gb.find_submission_notebook(PART, PART, STUDENT)
        grades = {g.name: g for g in submission.grades}
        assert grades[CELL].manual_score == MANUAL and float(grades[CELL].score) == MANUAL
        assert float(submission.score) == sum(before.values()) + MANUAL
        assert {n: float(g.score) for n, g in grades.items() if n != CELL} == {n: s for n, s in before.items()
                                                                              if n != CELL}


def test_the_learners_environment_keeps_the_grading_ui_off(formgrader):
    """The formgrader was switched on for the scratch server only: this environment's settings are unchanged."""
    from tools import nbgrader_ui

    assert nbgrader_ui.visible() == [], "nbgrader's UIs are on for learners"
    assert FORMGRADER in json.loads((formgrader["log"].parent / "config" / "jupyter_server_config.json").read_text())[
        "ServerApp"]["jpserver_extensions"]
