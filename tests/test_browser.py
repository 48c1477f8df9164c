"""The learner's view, in a real browser: JupyterLab in headless Chromium, driven by playwright.

For each course part (``tools.build_notebooks.PARTS``):

- the exercise notebook: run its set-up cells, then the first check whose exercise is still the stub, and
  (where :data:`WRONG` has one) a check on a wrong answer; each shows a short message, with the learner's
  own frames where their code raised, and no traceback through the checks;
- the solution notebook on tiny-gemma2 with the test sizes (those ``nbgrader_config.py`` grades with):
  Run All; every plotly figure and every progress bar is drawn, and no cell shows a traceback.

And the learner's JupyterLab shows no nbgrader menu, panel or command (``make setup`` switches them off;
``make instructor-ui`` on).

Needs Chromium at ``/usr/bin/chromium`` (or ``$COURSE_CHROMIUM``) and the ``playwright`` package: ``make
setup`` installs both (Debian's ``chromium``; playwright's own browser download is not used). The test
never skips: without a browser it fails and says why.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from tests.servers import chromium, jupyter_server
from tools.build_notebooks import PARTS

ROOT = Path(__file__).resolve().parent.parent
API_KEY_VARIABLES = ("COURSE_API_KEY", "OPENROUTER_API_KEY", "OPENAI_API_KEY")
RUN_ALL_SECONDS = 300  # Run All of a solution notebook on tiny-gemma2 (about 30 s on a quiet 2-core machine)
# A wrong answer per part: (exercise cell, its check cell, the wrong source, text the check's message shows).
# Deliberately wrong code only: this file ships with the tests package.
WRONG = {
    "part1_persona_space": (
        "ex_auc", "check_auc",
        "def axis_auc(scores, positive):\n    return float(scores[positive].mean() - scores[~positive].men())\n",
        "raised AttributeError: 'Tensor' object has no attribute 'men'",
    ),
}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
TQDM_TEXT = re.compile(r"\d+%\|.*\| *\d+/\d+")  # a tqdm bar's text: "desc:  40%|####      | 2/5 [..."
CHECK_INTERNALS = ("Traceback (most recent call last)", "tests/checking.py", "site-packages", "_fail(", "_call(")


def _grading_env() -> dict[str, str]:
    """The settings a grading kernel gets (tiny-gemma2, test sizes, offline), read from nbgrader_config.py."""
    from traitlets.config import Config

    namespace = runpy.run_path(str(ROOT / "nbgrader_config.py"), init_globals={"get_config": Config})
    return dict(namespace["GRADING_ENV_DEFAULTS"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the repository's notebooks, with its own settings, and the test sizes for
    kernels. Lab saves what it opens (metadata, outputs): on a copy, a test stopped halfway leaves the repository's
    notebooks as they were. The kernels import this checkout's ``utils`` and ``tests`` (``PYTHONPATH``)."""
    tmp = tmp_path_factory.mktemp("lab")
    site = tmp / "site"
    for folder in NOTEBOOK_FOLDERS:
        shutil.copytree(ROOT / folder, site / folder)
    before = _notebook_bytes(ROOT)
    env = {k: v for k, v in os.environ.items() if k not in API_KEY_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(_grading_env())
    env.update(COURSE_OUT_DIR=str(tmp / "out"), JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
    # Every cell in the DOM, so that the test can read each one's rendered output.
    tracker = tmp / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    with jupyter_server("jupyterlab", site, env, tmp / "lab.log", "/api/status",
                        ("--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
                         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate")) as server:
        yield {**server, "log": tmp / "lab.log", "out": tmp / "out", "root": site}
    assert _notebook_bytes(ROOT) == before, "the browser tests changed a notebook in the repository"


NOTEBOOK_FOLDERS = ("solutions", "exercises")  # what the lab serves, copied


def _notebook_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for folder in NOTEBOOK_FOLDERS
            for p in sorted((root / folder).glob("*.ipynb"))}


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def _open(browser, lab, path: str):
    """A page with ``path`` open in JupyterLab, its kernel started and idle."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(f"{lab['base']}/lab/tree/{path}?token={lab['token']}")
    page.wait_for_function(
        """path => {
            const app = window.jupyterapp;
            const w = app && app.shell.currentWidget;
            if (!w || !w.context || w.context.path !== path || !w.content || w.content.widgets.length === 0) return false;
            const k = w.sessionContext.session && w.sessionContext.session.kernel;
            return !!k && k.status === 'idle';
        }""", arg=path, timeout=120_000)
    return page


def _cells(page) -> list[dict]:
    """Each cell of the open notebook: its nbgrader grade id, type, outputs (as saved) and rendered text."""
    return page.evaluate(
        """() => window.jupyterapp.shell.currentWidget.content.widgets.map(cell => {
            const meta = cell.model.getMetadata('nbgrader') || {};
            const area = cell.node.querySelector('.jp-OutputArea');
            return {id: meta.grade_id || null, type: cell.model.type, exercise: !!meta.solution, check: !!meta.grade,
                    outputs: cell.model.type === 'code' ? cell.model.outputs.toJSON() : [],
                    executionCount: cell.model.type === 'code' ? cell.model.executionCount : null,
                    text: area ? area.innerText : ''};
        })""")


def _run_cell(page, index: int, timeout_s: float = 120) -> dict:
    page.evaluate(
        """async i => {
            const panel = window.jupyterapp.shell.currentWidget;
            panel.content.activeCellIndex = i;
            await window.jupyterapp.commands.execute('notebook:run-cell');
        }""", index)
    page.wait_for_function("""i => {
        const panel = window.jupyterapp.shell.currentWidget;
        const k = panel.sessionContext.session.kernel;
        return panel.content.widgets[i].model.executionCount !== null && k.status === 'idle';
    }""", arg=index, timeout=timeout_s * 1000)
    return _cells(page)[index]


def _set_source(page, index: int, source: str) -> None:
    page.evaluate("([i, s]) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.sharedModel.setSource(s)",
                  [index, source])


def _errors(cells: list[dict]) -> list[str]:
    return [f"cell {i} ({c['id']}): {o.get('ename')}: {o.get('evalue')}" for i, c in enumerate(cells)
            for o in c["outputs"] if o.get("output_type") == "error"]


def test_learners_lab_has_no_grading_ui(browser, lab):
    page = _open(browser, lab, f"exercises/{PARTS[0]}.ipynb")
    try:
        menus = page.eval_on_selector_all("#jp-menu-panel .lm-MenuBar-itemLabel", "els => els.map(e => e.textContent)")
        assert {"File", "Edit", "Run", "Kernel"} <= set(menus), f"the menu bar was not read: {menus}"
        assert not any("nbgrader" in m.lower() for m in menus), f"learners see an nbgrader menu: {menus}"
        commands = page.evaluate("() => window.jupyterapp.commands.listCommands().filter(c => /nbgrader/i.test(c))")
        assert commands == [], f"nbgrader's commands are registered for learners: {commands}"
        config = json.loads(page.eval_on_selector("#jupyter-config-data", "e => e.textContent"))
        installed = [e["name"] for e in config.get("federated_extensions", [])]
        assert "@jupyter/nbgrader" in installed, "nbgrader's extension is not installed: this test proves nothing"
        assert "@jupyter/nbgrader" in config.get("disabledExtensions", []), config.get("disabledExtensions")
        sidebar = page.eval_on_selector_all(".jp-SideBar .lm-TabBar-tab", "els => els.map(e => e.title || e.textContent)")
        assert not any(re.search(r"nbgrader|assignment|course|formgrader", s or "", re.I) for s in sidebar), sidebar
    finally:
        page.close()


@pytest.mark.parametrize("part", PARTS)
def test_exercise_notebook_failures_read_as_messages(browser, lab, part):
    page = _open(browser, lab, f"exercises/{part}.ipynb")
    try:
        cells = _cells(page)
        first_exercise = next(i for i, c in enumerate(cells) if c["exercise"])
        for i, cell in enumerate(cells[:first_exercise]):
            if cell["type"] == "code":
                ran = _run_cell(page, i)
                assert _errors([ran]) == [], f"set-up cell {i} failed: {_errors([ran])}"
        # The first check whose exercise cells still hold stubs that define functions (a stub at the top
        # level of a cell raises there, and its check then only reports the missing name).
        pending, text = [], None
        for i, cell in enumerate(cells[first_exercise:], start=first_exercise):
            if cell["exercise"]:
                pending.append(i)
            elif cell["check"] and cell["type"] == "code":
                ran = [_run_cell(page, j) for j in pending]
                pending = []
                if not _errors(ran):
                    text = _run_cell(page, i)["text"]
                    break
        assert text is not None, "no check of a function stub found"
        assert "is not written yet" in text and "raise NotImplementedError()" in text, text
        for internal in CHECK_INTERNALS:
            assert internal not in text, f"{internal!r} in what the learner sees:\n{text}"
        if part in WRONG:
            exercise_id, check_id, source, expected = WRONG[part]
            ids = [c["id"] for c in cells]
            _set_source(page, ids.index(exercise_id), source)
            _run_cell(page, ids.index(exercise_id))
            text = _run_cell(page, ids.index(check_id))["text"]
            assert "✗ Check failed" in text and expected in text, text
            assert "Where your code raised it:" in text and ".men()" in text, text  # the learner's own line
            for internal in CHECK_INTERNALS:
                assert internal not in text, f"{internal!r} in what the learner sees:\n{text}"
            assert len(text.splitlines()) <= 15, f"the message is long:\n{text}"
    finally:
        page.close()


@pytest.mark.parametrize("part", PARTS)
def test_solution_notebook_renders_figures_and_progress_bars(browser, lab, part, tmp_path):
    page = _open(browser, lab, f"solutions/{part}.ipynb")
    try:
        t0 = time.monotonic()
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        n_code = sum(c["type"] == "code" for c in _cells(page))
        page.wait_for_function("""n => {
            const panel = window.jupyterapp.shell.currentWidget;
            const code = panel.content.widgets.filter(c => c.model.type === 'code');
            return code.length === n && code.every(c => c.model.executionCount !== null)
                && panel.sessionContext.session.kernel.status === 'idle';
        }""", arg=n_code, timeout=RUN_ALL_SECONDS * 1000)
        seconds = time.monotonic() - t0
        cells = _cells(page)
        assert _errors(cells) == [], _errors(cells)
        figures = sum("application/vnd.plotly.v1+json" in o.get("data", {}) for c in cells for o in c["outputs"])
        shown = [o["data"] for c in cells for o in c["outputs"] if WIDGET_MIME in o.get("data", {})]
        # A tqdm bar's widget output carries the bar as its plain text; other widgets (Part 2's chat panel)
        # are not progress bars, and are checked to be drawn below.
        widgets = sum(bool(TQDM_TEXT.search(d.get("text/plain", ""))) for d in shown)
        assert figures > 0 and widgets > 0, (figures, widgets)
        # Drawn, not just stored: plotly's SVG and the widgets' progress bars are in the page.
        page.wait_for_function("n => document.querySelectorAll('.js-plotly-plot .main-svg').length >= n",
                               arg=figures, timeout=60_000)
        drawn = page.evaluate("() => document.querySelectorAll('.js-plotly-plot').length")
        bars = page.evaluate("() => document.querySelectorAll('.jp-OutputArea-output .widget-hprogress, "
                             ".jp-OutputArea-output .jupyter-widget-hprogress').length")
        assert drawn == figures, f"{figures} figures made, {drawn} drawn"
        assert bars == widgets, f"{widgets} progress bars made, {bars} drawn"
        # Every widget output, bar or not, is drawn as a widget view (not the "model not found" text).
        views = page.evaluate("() => Array.from(document.querySelectorAll('.jp-OutputArea-output'))"
                              ".filter(e => e.querySelector('[class*=\"widget-\"]')).length")
        assert views == len(shown), f"{len(shown)} widgets shown, {views} drawn"
        stderr = page.evaluate("() => Array.from(document.querySelectorAll("
                               "'.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.stderr\"]'))"
                               ".map(e => e.innerText).filter(t => /Traceback|Error/.test(t))")
        assert stderr == [], stderr
        print(f"\n{part}: Run All took {seconds:.0f} s in Chromium; {figures} figures, {bars} progress bars drawn")
        executed = page.evaluate("() => window.jupyterapp.shell.currentWidget.context.model.toJSON()")
        for cell in executed["cells"]:  # JupyterLab's model says null where nbformat wants no key
            if cell.get("attachments", {}) is None:
                del cell["attachments"]
    finally:
        page.close()
    # The same notebook as nbgrader's feedback shows it (nbgrader_config.py's PlotlyFiguresInFeedback),
    # opened from disk with every network request refused: each figure is still drawn.
    drawn_offline = _figures_drawn_offline(browser, nbformat.from_dict(executed), tmp_path / "feedback.html", figures)
    assert drawn_offline == figures, f"{figures} figures made, {drawn_offline} drawn offline in the feedback HTML"


def _figures_drawn_offline(browser, nb, path: Path, expected: int) -> int:
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    namespace = runpy.run_path(str(ROOT / "nbgrader_config.py"), init_globals={"get_config": Config})
    nb, _ = namespace["PlotlyFiguresInFeedback"]().preprocess(nb, {})
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    path.write_text(body)
    page = browser.new_page()
    try:
        page.route(re.compile(r"^https?://"), lambda route: route.abort())
        page.goto(path.as_uri())
        count = ("() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
                 ".filter(e => e.querySelector('.main-svg')).length")
        try:
            page.wait_for_function(f"({count})() >= {expected}", timeout=30_000)
        except Exception:
            pass  # the count below says how many were drawn
        return page.evaluate(count)
    finally:
        page.close()


def test_a_missing_browser_fails_with_the_reason(tmp_path):
    """The test above must never skip: with no browser, it fails and says how to get one."""
    test = tmp_path / "test_no_browser.py"
    test.write_text(
        "import os\nos.environ['COURSE_CHROMIUM'] = '/nonexistent/chromium'\n"
        "from tests.test_browser import browser  # noqa: F401\n\n"
        "def test_needs_browser(browser):\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COURSE_CHROMIUM": "/nonexistent/chromium"})
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "No Chromium at /nonexistent/chromium" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


CHAT_PANEL_NOTEBOOK = "browser-test/chat_panel.ipynb"  # in the lab's copy
CHAT_PANEL_CELLS = [
    # The kernel starts in the notebook's folder: put this checkout's utils first on the path.
    f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
    "import torch\nfrom IPython.display import display\nfrom utils.chat_panel import ChatPanel\n"
    "from utils.models import load_model\n"
    "model, tok = load_model('tiny-gemma2')\n"
    "axis = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))\n"
    "panel = ChatPanel(model, tok, axis, 3, cap_axes={3: axis, 4: axis}, cap_thresholds={3: 0.5, 4: 0.0},\n"
    "                  max_new_tokens=4)\n"
    "display(panel.widget)",
    "print(f'kernel: {len(panel.history)} messages, capping_on={panel.capping_on}, "
    "label={panel.cap_toggle.description!r}')",
]
TOGGLE = ".jp-OutputArea-output .widget-toggle-button"


def _toggle_view(page) -> dict:
    """What the page shows of the capping toggle: its label, pressed or not, and whether the label is cut."""
    page.wait_for_selector(TOGGLE, timeout=60_000)
    return page.eval_on_selector(TOGGLE, """b => ({text: b.innerText.trim(), active: b.classList.contains('mod-active'),
        cut: b.scrollWidth > b.clientWidth + 1})""")


def test_chat_panel_sends_on_enter_and_shows_its_capping_state_after_a_reload(browser, lab):
    """Enter in the text box sends; the toggle's label is whole and says the state; after a save and a page
    reload, the page shows the state the kernel has."""
    path = lab["root"] / CHAT_PANEL_NOTEBOOK
    path.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CHAT_PANEL_CELLS]
    nbformat.write(nb, path)
    page = _open(browser, lab, CHAT_PANEL_NOTEBOOK)
    page.on("dialog", lambda dialog: dialog.accept())
    try:
        assert _errors([_run_cell(page, 0)]) == []
        for width in (1400, 1000):  # the label is not cut off, in a wide or a narrow window
            page.set_viewport_size({"width": width, "height": 1000})
            view = _toggle_view(page)
            assert view == {"text": "capping: off", "active": False, "cut": False}, (width, view)

        box = page.locator(".jp-OutputArea-output .widget-text input")
        box.fill("Hello there!")
        box.press("Enter")
        page.wait_for_function("() => Array.from(document.querySelectorAll('.jp-OutputArea-output .widget-html'))"
                               ".some(e => /assistant/.test(e.innerText))", timeout=120_000)
        page.wait_for_function("() => document.querySelector('.jp-OutputArea-output .widget-text input').value === ''")
        assert "kernel: 2 messages, capping_on=False, label='capping: off'" in _run_cell(page, 1)["text"]

        page.click(TOGGLE)
        page.wait_for_function(f"() => document.querySelector('{TOGGLE}').innerText.trim() === 'capping: ON'")
        assert "kernel: 2 messages, capping_on=True, label='capping: ON'" in _run_cell(page, 1)["text"]
        assert _toggle_view(page) == {"text": "capping: ON", "active": True, "cut": False}

        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty")
        page.reload()
        page.wait_for_function(
            """path => {
                const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                return !!w && w.context && w.context.path === path && !!k && k.status === 'idle';
            }""", arg=CHAT_PANEL_NOTEBOOK, timeout=120_000)
        after = _toggle_view(page)
        kernel = _run_cell(page, 1)["text"]
        assert "kernel: 2 messages, capping_on=True, label='capping: ON'" in kernel, kernel
        assert after == {"text": "capping: ON", "active": True, "cut": False}, f"after a reload the page shows {after}"
        status = page.eval_on_selector(".jp-OutputArea-output .widget-html small", "e => e.innerText")
        assert "capping is ON" in status, status
    finally:
        page.close()
        path.unlink(missing_ok=True)
