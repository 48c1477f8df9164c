"""The class report of an autograded course part: one offline HTML page and a CSV, for the instructor.

    python -m tools.class_report [--assignment PART] [--course-root DIR]

(``tools/grade_roundtrip.py`` writes it as its ``report`` step.) It reads the gradebook (points per check cell)
and the autograded notebooks (what each check printed), and writes ``<root>/reports/<part>/class_report.html``
and ``class_report.csv``:

- per exercise (each graded check cell): the fraction of the class with full marks and how many students got
  each number of points;
- each named mistake (the identifier every check failure prints as its last line, ``[mistake: <check>/<stage>]``,
  see ``tests/checking.py``): how many students made it, who, and the check's message, quoted once. A hidden
  check's mistakes have an opaque identifier (``hidden-<hash>``) and no quoted message: the report names no
  hidden check and quotes none of its text;
- failures that are not a check's verdict, counted per exercise: an exercise not written
  (``NotImplementedError``), a name the notebook never defined (its cell failed or was deleted), anything else;
- the students whose notebook hit a time limit (a check's, or nbgrader's per-cell one) or a syntax error.

The page draws its figures with plotly.js embedded in it (no network, no other file).
"""

from __future__ import annotations

import argparse
import csv
import html
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from tools.build_notebooks import PARTS

ROOT = Path(__file__).resolve().parent.parent
GRADEBOOK_COURSE = "persona-space"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_HIDDEN = re.compile(r"### BEGIN HIDDEN TESTS.*?### END HIDDEN TESTS", re.S)
_CHECK_CALL = re.compile(r"\bchecks\.(test_\w+)\s*\(")
TIME_LIMIT = "time-limit"
HIDDEN_NOTE = "(a hidden check of this exercise: not quoted here; each student's feedback shows its message)"
TIMEOUT_ERRORS = ("CellTimeoutError", "TimeoutError", "DeadKernelError", "KeyboardInterrupt")  # nbgrader interrupts a cell at its limit
SYNTAX_ERRORS = ("SyntaxError", "IndentationError", "TabError")
# Failures that are not a check's verdict, by the exception's name.
UNNAMED = {"NotImplementedError": "not written", "NameError": "a name the notebook never defined"}


class ReportError(RuntimeError):
    pass


@dataclass
class Exercise:
    grade_id: str
    label: str
    max_points: float
    points: dict[str, float] = field(default_factory=dict)  # student -> points


@dataclass
class Mistake:
    identifier: str
    grade_id: str
    message: str | None  # None for a hidden check's
    students: list[str] = field(default_factory=list)


@dataclass
class Report:
    part: str
    students: list[str]
    exercises: list[Exercise]
    mistakes: dict[str, Mistake]
    unnamed: dict[tuple[str, str], list[str]]  # (grade id, kind) -> students
    time_limit: dict[str, list[str]]  # student -> where (grade ids or cell numbers)
    syntax_error: dict[str, list[str]]

    def counts(self) -> dict[str, int]:
        """Mistake identifier -> number of students who made it."""
        return {m.identifier: len(m.students) for m in self.mistakes.values()}


def _error_lines(cell) -> list[tuple[str, list[str]]]:
    """(exception name, traceback lines without colour) of each error output of ``cell``."""
    return [(o.get("ename", ""), [_ANSI.sub("", line) for line in "\n".join(o.get("traceback", [])).split("\n")])
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def _message(lines: list[str]) -> str:
    """The check's message, as the learner read it: the lines under "✗ Check failed", without the learner's
    frames and the identifier line."""
    start = next((i + 1 for i, line in enumerate(lines) if line.strip().startswith("✗ Check failed")), 0)
    out = []
    for line in lines[start:]:
        if line.startswith("Where your code raised it:") or line.startswith("[mistake: "):
            break
        out.append(line)
    return "\n".join(out).strip()


def _visible_checks(source: str) -> list[str]:
    return _CHECK_CALL.findall(_HIDDEN.sub("", source))


def _exercise_labels(source_nb) -> dict[str, str]:
    """Grade id -> the exercise label of the (visible) check its cell calls, e.g. "Exercise 4b"."""
    import importlib

    text = "\n".join(c.source for c in source_nb.cells if c.cell_type == "code")
    found = re.search(r"import (tests\.\w+) as checks", text)
    module = importlib.import_module(found.group(1)) if found else None
    labels = {}
    for cell in source_nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if not meta.get("grade"):
            continue
        exercises = [getattr(getattr(module, name, None), "__course_exercise__", None)
                     for name in _visible_checks(cell.source)]
        exercises = list(dict.fromkeys(e for e in exercises if e))  # a cell may check two functions
        labels[meta["grade_id"]] = " + ".join(exercises) or meta["grade_id"]
    return labels


def build(course_root: Path, part: str) -> Report:
    from nbgrader.api import Gradebook, MissingEntry

    course_root = Path(course_root).resolve()
    if part not in PARTS:
        raise ReportError(f"Unknown assignment {part!r}; choose from {', '.join(PARTS)}.")
    source_path = course_root / "source" / part / f"{part}.ipynb"
    db = course_root / "gradebook.db"
    if not source_path.exists() or not db.exists():
        raise ReportError(f"{course_root} has no autograded {part} (no {source_path.name} or gradebook.db): run "
                          "`python -m tools.grade_roundtrip` first.")
    source_nb = nbformat.read(source_path, as_version=4)
    labels = _exercise_labels(source_nb)
    exercises: dict[str, Exercise] = {}
    with Gradebook(f"sqlite:///{db}", GRADEBOOK_COURSE) as gb:
        try:
            notebook = gb.find_notebook(part, part)
        except MissingEntry as exc:
            raise ReportError(f"The gradebook has no {part}: run the round trip's generate step.") from exc
        for cell in notebook.grade_cells:
            exercises[cell.name] = Exercise(cell.name, labels.get(cell.name, cell.name), float(cell.max_score))
        students = sorted(s.student.id for s in gb.find_assignment(part).submissions)
        for student in students:
            try:
                submitted = gb.find_submission_notebook(part, part, student)
            except MissingEntry:
                continue
            for grade in submitted.grades:
                if grade.name in exercises:
                    exercises[grade.name].points[student] = float(grade.score)
    order = [c.metadata["nbgrader"]["grade_id"] for c in source_nb.cells
             if c.metadata.get("nbgrader", {}).get("grade_id") in exercises]
    mistakes: dict[str, Mistake] = {}
    unnamed: dict[tuple[str, str], list[str]] = defaultdict(list)
    time_limit: dict[str, list[str]] = defaultdict(list)
    syntax_error: dict[str, list[str]] = defaultdict(list)
    from tests.checking import MISTAKE_LINE

    for student in students:
        path = course_root / "autograded" / student / part / f"{part}.ipynb"
        if not path.exists():
            continue
        nb = nbformat.read(path, as_version=4)
        for number, cell in enumerate(nb.cells, 1):
            if cell.cell_type != "code":
                continue
            grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
            graded = grade_id in exercises
            where = grade_id or f"cell {number}"
            for ename, lines in _error_lines(cell):
                if ename in SYNTAX_ERRORS:
                    syntax_error[student].append(where)
                if ename in TIMEOUT_ERRORS:
                    time_limit[student].append(where)
                identifier = next((m.group(1) for line in lines for m in [MISTAKE_LINE.fullmatch(line.strip())] if m),
                                  None)
                if identifier is not None and identifier.endswith("/" + TIME_LIMIT):
                    time_limit[student].append(where)
                if not graded:
                    continue
                if identifier is not None:
                    hidden = identifier.startswith("hidden-")
                    mistake = mistakes.setdefault(identifier, Mistake(identifier, grade_id,
                                                                      None if hidden else _message(lines)))
                    if student not in mistake.students:
                        mistake.students.append(student)
                else:
                    kind = UNNAMED.get(ename, f"raised {ename or 'an error'}")
                    if student not in unnamed[(grade_id, kind)]:
                        unnamed[(grade_id, kind)].append(student)
    return Report(part, students, [exercises[g] for g in order], mistakes, dict(unnamed),
                  {s: sorted(set(w)) for s, w in time_limit.items()}, {s: sorted(set(w)) for s, w in syntax_error.items()})


def _distribution(exercise: Exercise) -> Counter:
    return Counter(exercise.points.values())


def _points(value: float) -> str:
    return f"{value:g}"


def write_csv(report: Report, path: Path) -> Path:
    """One row per exercise, per named mistake, per unnamed failure kind, and per student with a time limit or a
    syntax error; ``kind`` says which."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["kind", "grade_id", "exercise", "item", "students", "of_class", "detail"])
        n = len(report.students)
        for ex in report.exercises:
            full = sum(p >= ex.max_points for p in ex.points.values())
            dist = ";".join(f"{_points(p)}:{c}" for p, c in sorted(_distribution(ex).items()))
            out.writerow(["exercise", ex.grade_id, ex.label, f"full marks ({_points(ex.max_points)} points)", full,
                          f"{full / n:.3f}" if n else "", f"points:students {dist}"])
        labels = {ex.grade_id: ex.label for ex in report.exercises}
        for m in sorted(report.mistakes.values(), key=lambda m: (-len(m.students), m.identifier)):
            out.writerow(["mistake", m.grade_id, labels.get(m.grade_id, m.grade_id), m.identifier, len(m.students),
                          f"{len(m.students) / n:.3f}", " ".join(m.students)])
        for (grade_id, kind), who in sorted(report.unnamed.items()):
            out.writerow(["unnamed failure", grade_id, labels.get(grade_id, grade_id), kind, len(who),
                          f"{len(who) / n:.3f}", " ".join(who)])
        for kind, table in (("time limit", report.time_limit), ("syntax error", report.syntax_error)):
            for student, where in sorted(table.items()):
                out.writerow([kind, "", "", student, 1, "", " ".join(where)])
    return path


def _figures(report: Report) -> list:
    import plotly.graph_objects as go

    names = [ex.label if ex.label == ex.grade_id else f"{ex.label} ({ex.grade_id})" for ex in report.exercises]
    n = max(len(report.students), 1)
    full = [sum(p >= ex.max_points for p in ex.points.values()) / n for ex in report.exercises]
    height = 160 + 28 * len(names)
    fig1 = go.Figure(go.Bar(x=full, y=names, orientation="h"))
    fig1.update_layout(title="Fraction of the class with full marks, per exercise", xaxis=dict(range=[0, 1]),
                       yaxis=dict(autorange="reversed", automargin=True), height=height)
    # Points as a share of each exercise's own points (exercises carry 1 or 2 points, or more).
    shares = (("full marks", "#2ca02c", lambda p, m: p >= m), ("part of the points", "#ff7f0e", lambda p, m: 0 < p < m),
              ("no points", "#d62728", lambda p, m: p <= 0))
    fig2 = go.Figure()
    for name, colour, test in shares:
        fig2.add_bar(name=name, x=[sum(test(p, ex.max_points) for p in ex.points.values()) for ex in report.exercises],
                     y=names, orientation="h", marker_color=colour)
    fig2.update_layout(barmode="stack", title="Students per share of the points, per exercise (points: table below)",
                       yaxis=dict(autorange="reversed", automargin=True), height=height)
    figs = [fig1, fig2]
    if report.mistakes:
        ranked = sorted(report.mistakes.values(), key=lambda m: (-len(m.students), m.identifier))
        fig3 = go.Figure(go.Bar(x=[len(m.students) for m in ranked], y=[m.identifier for m in ranked],
                                orientation="h"))
        fig3.update_layout(title="Students per named mistake", yaxis=dict(autorange="reversed", automargin=True),
                           xaxis=dict(dtick=1), height=160 + 28 * len(ranked))
        figs.append(fig3)
    return figs


def write_html(report: Report, path: Path) -> Path:
    import plotly.io as pio

    esc = html.escape
    n = len(report.students)
    parts = [f"<h1>Class report: {esc(report.part)}</h1>",
             f"<p>{n} students autograded: {esc(', '.join(report.students))}.</p>"]
    for i, fig in enumerate(_figures(report)):
        parts.append(pio.to_html(fig, include_plotlyjs=(i == 0), full_html=False, validate=False))
    rows = "".join(
        f"<tr><td>{esc(ex.label)}</td><td><code>{esc(ex.grade_id)}</code></td><td>{_points(ex.max_points)}</td>"
        f"<td>{sum(p >= ex.max_points for p in ex.points.values())} / {n}</td>"
        f"<td>{esc(', '.join(f'{_points(p)}: {c}' for p, c in sorted(_distribution(ex).items())))}</td></tr>"
        for ex in report.exercises)
    parts.append("<h2>Exercises</h2><table><tr><th>Exercise</th><th>Cell</th><th>Points</th><th>Full marks</th>"
                 f"<th>Points: students</th></tr>{rows}</table>")
    labels = {ex.grade_id: ex.label for ex in report.exercises}
    parts.append("<h2>Named mistakes</h2>")
    if report.mistakes:
        rows = "".join(
            f"<tr><td><code>{esc(m.identifier)}</code></td><td>{esc(labels.get(m.grade_id, m.grade_id))}</td>"
            f"<td>{len(m.students)}</td><td>{esc(', '.join(m.students))}</td>"
            f"<td><pre>{esc(m.message) if m.message is not None else HIDDEN_NOTE}</pre></td></tr>"
            for m in sorted(report.mistakes.values(), key=lambda m: (-len(m.students), m.identifier)))
        parts.append("<table><tr><th>Mistake</th><th>Exercise</th><th>Students</th><th>Who</th>"
                     f"<th>The check's message (as one student read it)</th></tr>{rows}</table>")
    else:
        parts.append("<p>None.</p>")
    if report.unnamed:
        rows = "".join(f"<tr><td>{esc(labels.get(g, g))}</td><td>{esc(kind)}</td><td>{len(who)}</td>"
                       f"<td>{esc(', '.join(who))}</td></tr>" for (g, kind), who in sorted(report.unnamed.items()))
        parts.append("<h2>Other failed checks</h2><table><tr><th>Exercise</th><th>Why</th><th>Students</th>"
                     f"<th>Who</th></tr>{rows}</table>")
    for title, table in (("Hit a time limit", report.time_limit), ("Syntax errors", report.syntax_error)):
        items = "".join(f"<li>{esc(s)}: {esc(', '.join(w))}</li>" for s, w in sorted(table.items()))
        parts.append(f"<h2>{title}</h2>" + (f"<ul>{items}</ul>" if items else "<p>None.</p>"))
    style = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left} pre{margin:0;"
             "white-space:pre-wrap;max-width:60em}")
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Class report: {esc(report.part)}"
                    f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return path


def report_dir(course_root: Path, part: str) -> Path:
    return Path(course_root) / "reports" / part


def write(course_root: Path, part: str) -> tuple[Path, Path, Report]:
    """Build the report; write ``class_report.html`` and ``class_report.csv``; return both paths and the report."""
    report = build(course_root, part)
    out = report_dir(course_root, part)
    out.mkdir(parents=True, exist_ok=True)
    return write_html(report, out / "class_report.html"), write_csv(report, out / "class_report.csv"), report


def main(argv: list[str] | None = None) -> int:
    from tools.grade_roundtrip import DEFAULT_COURSE_ROOT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assignment", default=PARTS[0], choices=PARTS)
    parser.add_argument("--course-root", type=Path, default=DEFAULT_COURSE_ROOT)
    args = parser.parse_args(argv)
    try:
        page, table, report = write(args.course_root, args.assignment)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{page}\n{table}")
    for identifier, count in sorted(report.counts().items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"   {count:3d}  {identifier}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
