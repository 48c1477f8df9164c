"""nbgrader settings for the persona-space course (instructors only: ``pip install -e .[instructor]``).

Run nbgrader from the repository root, or from a course root that ``tools/grade_roundtrip.py`` made
(its own ``nbgrader_config.py`` loads this file and sets the root to itself). ``make instructor-roundtrip``
runs the whole round trip; docs/instructors.md has the commands step by step.

Where things go: the course root defaults to ``nbgrader/course/`` (ignored by git). The gradebook,
``source/``, ``release/``, ``submitted/``, ``autograded/``, ``feedback/``, the exchange and
``grades.csv`` all live under it, never in the directory you run nbgrader from.
"""

import getpass
import os
import re
import tempfile
from pathlib import Path

from nbgrader.converters import Autograde, GenerateFeedback
from nbconvert.preprocessors import Preprocessor
from nbgrader.preprocessors import ClearHiddenTests, GetGrades, OverwriteCells
from traitlets import List

c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)

REPO = Path(__file__).resolve().parent  # traitlets sets __file__ to this file's path

# --- Course root --------------------------------------------------------------------------------------
# An absolute root, so that running nbgrader from anywhere never leaves a stray gradebook.db behind.
# db_url is left at nbgrader's default, sqlite:///<root>/gradebook.db, on purpose: it then follows the
# root wherever it is set (here, in a course root's own nbgrader_config.py, or --CourseDirectory.root).
COURSE_ROOT = REPO / "nbgrader" / "course"
c.CourseDirectory.root = str(COURSE_ROOT)
c.CourseDirectory.course_id = "persona-space"
# The exchange is only used by release_assignment / fetch_assignment / submit / collect (JupyterHub
# hand-out). Keep it inside the course root; on a shared hub point it at a directory all users can reach,
# e.g. c.Exchange.root = "/srv/nbgrader/exchange".
c.Exchange.root = str(COURSE_ROOT / "exchange")

# --- Grading mode -------------------------------------------------------------------------------------
# Autograding runs every submission in a fresh kernel. With no settings the notebook would pick Gemma 2
# 27B (on a big GPU) or SmolLM2-135M and generate 15 questions x 21 personas x 64 tokens: minutes per
# student, and an API if a key is set. For grading, the kernel instead uses the bundled 2 MB random
# tiny-gemma2 and the test sizes: a submission then takes 10-25 s on a laptop CPU, with no network.
# The checks compute their expected numbers on tiny-gemma2 whatever model the notebook loaded (plus a
# quick smoke test on that model), so this changes how long grading takes, not what is checked.
#
# These are *defaults*: a variable already set in the environment that runs nbgrader wins (export
# COURSE_MODEL=smollm2-135m-instruct to grade on SmolLM2, and raise Execute.timeout to match). They are
# set inside the grading kernel only (through IPython's exec_lines), not in this process: nbgrader's
# Jupyter server extensions load this file too, and changing os.environ here would switch every
# notebook opened from that server to tiny-gemma2. API keys are always removed from the grading kernel,
# so grading never calls a paid API and never depends on the network.


def _user():
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "user"


GRADING_ENV_DEFAULTS = {
    "COURSE_PROFILE": "grading",  # utils/settings.py: the grading column of defaults
    "COURSE_MODEL": "tiny-gemma2",
    "COURSE_N_QUESTIONS": "3",
    "COURSE_MAX_NEW_TOKENS": "12",
    "COURSE_N_TRAITS": "2",
    # Figures and summary.json of each graded run: one scratch folder per instructor account, overwritten
    # by every submission, so they never pile up in the course root or reach students' feedback.
    "COURSE_OUT_DIR": os.path.join(tempfile.gettempdir(), f"persona-space-grading-{_user()}"),
    # Part 2 at test sizes: one assistant turn per transcript, short windows, one case study, one replayed
    # turn, one steering question. Its starting point (Part 1's results on tiny-gemma2) is computed by the
    # course's own code on the first Part 2 submission and read back for the others: a folder of its own,
    # so no student's Part 1 notebook can write into it.
    "COURSE_MAX_TURNS": "2",
    "COURSE_MAX_TOKENS": "1536",
    "COURSE_CASE_STUDIES": "llama-3.3-70b/jailbreak",
    "COURSE_REPLAY_TURNS": "1",
    "COURSE_STEER_QUESTIONS": "1",
    "COURSE_PART1_DIR": os.path.join(tempfile.gettempdir(), f"persona-space-grading-part1-results-{_user()}"),
    "COURSE_PART2_OUT_DIR": os.path.join(tempfile.gettempdir(), f"persona-space-grading-part2-{_user()}"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # Each check gives the learner's function this many seconds per call (tests/checking.py); a function
    # that does not return fails its check, and later cells that call it fail at once instead of hanging.
    # A correct answer takes well under a second on the checks' tiny inputs.
    "COURSE_CHECK_TIMEOUT": "20",
}
GRADING_ENV_REMOVED = ("COURSE_API_KEY", "OPENROUTER_API_KEY", "OPENAI_API_KEY")
_kernel_startup = "\n".join([
    "import os as _os",
    f"_os.environ.update({{_k: _v for _k, _v in {GRADING_ENV_DEFAULTS!r}.items() if _k not in _os.environ}})",
    f"for _k in {GRADING_ENV_REMOVED!r}: _os.environ.pop(_k, None)",
    "del _os, _k",
])
c.Execute.extra_arguments = [f"--IPKernelApp.exec_lines={[_kernel_startup]!r}"]

# Per-cell limit. On tiny-gemma2 the slowest cell (generating every persona's answers) takes about 10 s
# on a busy 2-core machine. A learner's function that never returns is stopped sooner, inside its check,
# after COURSE_CHECK_TIMEOUT (20 s) and not run again; this limit is for code outside the checks that
# hangs (an endless loop at the top level of a cell): that cell is interrupted, its error is shown, and
# grading goes on with the next cell.
c.Execute.timeout = 60

# --- Tampering ----------------------------------------------------------------------------------------
# Locked cells (every check and explanation) are restored from the gradebook when a student edited them
# (nbgrader always does this, by checksum); deleted check cells are put back too.
c.OverwriteCells.add_missing_cells = True


class RestoreDeletedCells(OverwriteCells):
    """nbgrader's OverwriteCells, with deleted check cells put back in the right place, always.

    nbgrader 0.9.6 puts a deleted check cell after the source cell just before it, and crashes
    (KeyError, the student is not graded at all) when that cell is gone too, e.g. a student who deleted
    an exercise together with its check. Here a deleted check goes after the nearest earlier cell that
    is still there.
    """

    def add_missing_grade_cells(self, nb, resources):
        source_nb = self.gradebook.find_notebook(self.notebook_id, self.assignment_id)
        source_cells = {cell.name: cell for cell in source_nb.source_cells}
        order = list(source_cells)  # the order generate_assignment stored them in: the notebook's
        grade_cells = {cell.name: cell for cell in source_nb.grade_cells}
        solution_ids = {cell.name for cell in source_nb.solution_cells}
        for grade_id in [name for name in order if name in grade_cells]:
            present = [cell.metadata.get("nbgrader", {}).get("grade_id") for cell in nb.cells]
            if grade_id in present:
                continue
            self.log.warning("Missing grade cell %s encountered, adding to notebook", grade_id)
            cell = self.missing_cell_transform(source_cells[grade_id], grade_cells[grade_id].max_score,
                                               is_solution=grade_id in solution_ids)
            ids = {c.get("id") for c in nb.cells}
            cell_id = re.sub(r"[^A-Za-z0-9_-]", "-", grade_id)[:60]
            cell["id"] = cell_id if cell_id not in ids else f"{cell_id[:50]}-restored"
            earlier = [name for name in reversed(order[:order.index(grade_id)]) if name in present]
            nb.cells.insert(present.index(earlier[0]) + 1 if earlier else 0, cell)
        return nb, resources


c.Autograde.sanitize_preprocessors = [RestoreDeletedCells if p is OverwriteCells else p
                                      for p in Autograde.class_traits()["sanitize_preprocessors"].default()]


# --- Feedback without hidden tests --------------------------------------------------------------------
class HideHiddenTestsInFeedback(ClearHiddenTests):
    """Remove ``### BEGIN/END HIDDEN TESTS`` regions from the feedback: from the source *and* the outputs.

    nbgrader's feedback shows the autograded notebook, where the hidden tests are back in the check
    cells. Clearing the source is not enough: when a check fails, IPython's traceback quotes the lines
    around the failing one, hidden tests included, and a passing hidden check prints its name. So every
    output line that quotes a hidden line, or names a function that only the hidden lines call, is dropped
    as well. (A failing hidden check's message stays: it tells the student what is wrong.)
    """

    # Declared configurable, as nbgrader's own GetGrades does, so that the HTML exporter's setting of it
    # is not reported as an unknown option.
    display_data_priority = List(["text/html", "application/pdf", "text/latex", "image/svg+xml", "image/png",
                                  "image/jpeg", "text/plain"]).tag(config=True)

    _ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    _called = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")

    def preprocess_cell(self, cell, resources, cell_index):
        hidden, visible, inside = [], [], False
        for line in cell.source.split("\n"):
            if self.begin_test_delimeter in line:
                inside = True
            elif self.end_test_delimeter in line:
                inside = False
            elif line.strip():
                (hidden if inside else visible).append(line.strip())
        cell, resources = super().preprocess_cell(cell, resources, cell_index)
        if hidden and cell.cell_type == "code":
            shown = "\n".join(visible)
            names = {n for line in hidden for n in self._called.findall(line) if n not in shown}
            secrets = hidden + sorted(names) + [self.begin_test_delimeter, self.end_test_delimeter]
            for output in cell.outputs:
                if output.output_type == "error":
                    output.traceback = [self._scrub(entry, secrets) for entry in output.traceback]
                elif output.output_type == "stream":
                    output.text = self._scrub(output.text, secrets)
                else:
                    for mime, value in output.get("data", {}).items():
                        if mime.startswith("text/") and isinstance(value, str):
                            output.data[mime] = self._scrub(value, secrets)
        return cell, resources

    def _scrub(self, text, secrets):
        return "\n".join(line for line in text.split("\n")
                         if not any(s in self._ansi.sub("", line) for s in secrets))


# --- Figures in the feedback ----------------------------------------------------------------------------
PLOTLY_MIME = "application/vnd.plotly.v1+json"


class PlotlyFiguresInFeedback(Preprocessor):
    """Show every plotly figure of the graded notebook in the feedback page, offline.

    A kernel with no browser attached (nbgrader's) records a figure as plotly's JSON only, which
    nbconvert's HTML cannot show: the figure would be missing from the feedback. Here each figure gets an
    HTML rendering as well, drawn by plotly.js, which is embedded once per page (the first figure carries
    it; about 4.8 MB with plotly 7, see docs/instructors.md), so the page needs no network and no other file.
    """

    enabled = True  # nbconvert's preprocessors are off unless enabled

    def preprocess(self, nb, resources):
        import plotly.io as pio

        embedded = False
        for cell in nb.cells:
            for output in cell.get("outputs", []):
                figure = output.get("data", {}).get(PLOTLY_MIME)
                if output.get("output_type") not in ("display_data", "execute_result") or figure is None:
                    continue
                output.data["text/html"] = pio.to_html(figure, include_plotlyjs=not embedded, full_html=False,
                                                       validate=False, config={"responsive": True})
                embedded = True
        return nb, resources


c.GenerateFeedback.preprocessors = [
    p for default in GenerateFeedback.class_traits()["preprocessors"].default()
    for p in ([default, HideHiddenTestsInFeedback, PlotlyFiguresInFeedback] if default is GetGrades else [default])
]
