"""Hand out, collect, autograde and give feedback on a course part with nbgrader, offline, on a CPU.

    python -m tools.grade_roundtrip [--assignment PART] [--course-root DIR] [--submission STUDENT=NOTEBOOK ...]
                                    [--submissions-dir DIR] [--jobs N]
                                    [--steps generate,collect,autograde,feedback,export,report]

``--assignment`` is one of ``tools.build_notebooks.PARTS`` (default: the first, ``part1_persona_space``);
below, ``<part>`` stands for it. The steps, each one nbgrader command run in the course root (default
``nbgrader/course/``, ignored by git):

1. ``generate``: write ``<root>/nbgrader_config.py`` (it loads the repository's ``nbgrader_config.py``)
   and ``<root>/source/<part>/``, made from ``src/<part>.py`` by the notebook builder, then
   ``nbgrader generate_assignment``: the student release in ``<root>/release/``.
2. ``collect``: copy each student's notebook to ``<root>/submitted/<student>/<part>/``. Give
   ``--submission alice=path/to/alice.ipynb`` (repeatable) or ``--submissions-dir DIR`` holding
   ``<student>.ipynb`` or ``<student>/<part>.ipynb`` files (e.g. downloaded from your LMS).
   With neither, the sample students of ``tools/sample_submissions.py`` are used, named ``demo-*``:
   the solution, a blank release and, for Part 1, answers written differently, three mistakes (with
   tampered check cells), and a syntax error plus an endless loop.
3. ``autograde``: ``nbgrader autograde`` (restores edited or deleted check cells, runs every notebook on
   tiny-gemma2 with the small sizes, see ``nbgrader_config.py``). With ``--jobs N`` (N > 1), N students are
   graded at a time: each by its own ``nbgrader autograde`` in a scratch course root of its own
   (``<root>/parallel/<part>/<student>/``: the config, the source, a copy of the gradebook, that student's
   submission, its own figures folder), so no two processes ever write one sqlite file; then, one student
   after the other, the autograded notebook is moved into the course root and its grades, comments and flags
   are written into the course's gradebook (:func:`merge_grades`). The scores are the same as with one job.
4. ``feedback``: ``nbgrader generate_feedback``: HTML per student in ``<root>/feedback/``, hidden tests removed.
5. ``export``: ``nbgrader export`` to ``<root>/grades.csv``.
6. ``report``: the class report (``tools/class_report.py``): ``<root>/reports/<part>/class_report.html`` (offline)
   and ``class_report.csv``: per exercise the fraction of the class with full marks and the points' distribution,
   each named mistake and how many students made it, who hit a time limit or a syntax error.

(On a JupyterHub with nbgrader's exchange, use ``nbgrader release_assignment`` and ``nbgrader collect``
for steps 1-2 instead; the other steps are the same.)

Nothing is written outside the course root, except each graded run's figures, in one scratch folder in
the system's temporary directory. After autograding, the seconds each notebook ran are printed
(docs/instructors.md has measured numbers).
Run it with this project's Python (``.venv/bin/python``): nbgrader runs in it, and so do the notebooks.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Iterable, Mapping

from tools.build_notebooks import PARTS

ROOT = Path(__file__).resolve().parent.parent
PART = PARTS[0]  # the default assignment; every function takes the assignment (a part's name) as a parameter
DEFAULT_COURSE_ROOT = ROOT / "nbgrader" / "course"
STEPS = ("generate", "collect", "autograde", "feedback", "export", "report")
STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")
CONFIG_HEADER = "# Written by tools/grade_roundtrip.py."
COURSE_CONFIG = f'''{CONFIG_HEADER} Settings belong in the repository's nbgrader_config.py, which this
# loads; this file only makes the folder it sits in the course root, so that nbgrader commands (and the
# formgrader) run from here use it.
import os

_repo_config = {str(ROOT / "nbgrader_config.py")!r}
if not os.path.exists(_repo_config):  # load_subconfig would skip it silently, and grading use nbgrader's defaults
    raise FileNotFoundError(f"{{_repo_config}} is gone: rerun `python -m tools.grade_roundtrip --steps generate`.")
load_subconfig(_repo_config)  # noqa: F821
_here = os.path.dirname(os.path.abspath(__file__))
c = get_config()  # noqa: F821
c.CourseDirectory.root = _here
c.Exchange.root = os.path.join(_here, "exchange")
'''


class RoundTripError(RuntimeError):
    pass


def nbgrader(course_root: Path, *args: str, echo: bool = True, env: Mapping[str, str] | None = None) -> str:
    """Run one nbgrader command in the course root (``env``: variables set for it); return its log, raise with it
    on failure."""
    cmd = [sys.executable, "-m", "nbgrader", *args]
    # nbgrader runs `alembic` (its database migrations) by name: put this environment's scripts first on
    # PATH, as an activated virtual environment would.
    env = dict(os.environ, **(env or {}),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    proc = subprocess.run(cmd, cwd=course_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if echo and proc.stdout.strip():
        print(proc.stdout.rstrip(), flush=True)
    # nbgrader only logs a broken config file and goes on with its defaults (no time limit to speak of,
    # the default model, an API if a key is set): never grade like that.
    if proc.returncode != 0 or "Exception while loading config file" in proc.stdout:
        raise RoundTripError(f"`nbgrader {' '.join(args)}` failed (exit {proc.returncode}) in {course_root}:\n"
                             f"{proc.stdout}")
    return proc.stdout


def _notebook(part: str) -> str:
    if part not in PARTS:
        raise RoundTripError(f"Unknown assignment {part!r}; choose from {', '.join(PARTS)}.")
    return f"{part}.ipynb"


def release_path(course_root: Path, part: str = PART) -> Path:
    return Path(course_root) / "release" / part / _notebook(part)


def setup_course(course_root: Path, part: str = PART) -> None:
    """The course root's config and the assignment source, generated from ``src/`` like the notebooks."""
    from tools import build_notebooks

    course_root.mkdir(parents=True, exist_ok=True)
    config = course_root / "nbgrader_config.py"
    if config.exists() and not config.read_text().startswith(CONFIG_HEADER):
        raise RoundTripError(f"{config} exists and was not written by this tool; move it away first.")
    config.write_text(COURSE_CONFIG)
    source = course_root / "source" / part
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    # Only the notebook: nbgrader copies every other file of source/<assignment>/ into the release.
    (source / _notebook(part)).write_text(build_notebooks.dumps(build_notebooks.nbgrader_source(part)))


def generate(course_root: Path, echo: bool = True, part: str = PART) -> Path:
    setup_course(course_root, part)
    nbgrader(course_root, "generate_assignment", part, "--force", echo=echo)
    return release_path(course_root, part)


def find_submissions(folder: Path, part: str = PART) -> dict[str, Path]:
    """``<student>.ipynb`` or ``<student>/<part>.ipynb`` files in ``folder``."""
    found = {p.stem: p for p in sorted(folder.glob("*.ipynb"))}
    found.update({p.parent.name: p for p in sorted(folder.glob(f"*/{_notebook(part)}"))})
    if not found:
        raise RoundTripError(f"No submissions in {folder} (expected <student>.ipynb or <student>/{_notebook(part)}).")
    return found


def demo_submissions(course_root: Path, part: str = PART) -> dict[str, Path]:
    """The sample students (``tools/sample_submissions.py``), written to ``<root>/demo-submissions/<part>/``."""
    from tools import sample_submissions

    return sample_submissions.build(part, release_path(course_root, part),
                                    Path(course_root) / "demo-submissions" / part, prefix="demo-")


def collect(course_root: Path, submissions: Mapping[str, Path], part: str = PART) -> list[Path]:
    """Copy each student's notebook where ``nbgrader autograde`` looks for it."""
    copied = []
    for student, notebook in submissions.items():
        if not STUDENT_ID.match(student):
            raise RoundTripError(f"Bad student id {student!r}: use letters, digits and _ . @ + - only.")
        notebook = Path(notebook)
        if not notebook.is_file():
            raise RoundTripError(f"{student}: no notebook at {notebook}")
        dest = Path(course_root) / "submitted" / student / part
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        shutil.copyfile(notebook, dest / _notebook(part))
        copied.append(dest / _notebook(part))
    return copied


def autograde(course_root: Path, echo: bool = True, part: str = PART, jobs: int = 1) -> None:
    """``nbgrader autograde`` of every submitted student; ``jobs`` > 1: that many at a time (:func:`autograde_parallel`)."""
    if jobs < 1:
        raise RoundTripError(f"--jobs must be 1 or more, got {jobs}.")
    if jobs == 1:
        nbgrader(course_root, "autograde", part, "--force", echo=echo)
    else:
        autograde_parallel(course_root, part, jobs, echo=echo)


def submitted_students(course_root: Path, part: str = PART) -> list[str]:
    return sorted(p.parent.parent.name for p in (Path(course_root) / "submitted").glob(f"*/{part}/{_notebook(part)}"))


def _scratch_root(course_root: Path, part: str, student: str) -> Path:
    """A course root for grading one student on its own: the config, the source, a copy of the gradebook (the
    assignment as generated), and that student's submission."""
    scratch = Path(course_root) / "parallel" / part / student
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "source").mkdir(parents=True)
    (scratch / "nbgrader_config.py").write_text(COURSE_CONFIG)
    shutil.copytree(Path(course_root) / "source" / part, scratch / "source" / part)
    shutil.copyfile(Path(course_root) / "gradebook.db", scratch / "gradebook.db")
    shutil.copytree(Path(course_root) / "submitted" / student / part, scratch / "submitted" / student / part)
    return scratch


def autograde_parallel(course_root: Path, part: str, jobs: int, echo: bool = True,
                       students: list[str] | None = None) -> None:
    """Autograde ``jobs`` students at a time, each in its own scratch course root (:func:`_scratch_root`) with its
    own figures folders; then merge them into the course root one by one (:func:`merge_grades`), so the course's
    sqlite gradebook has one writer only. Like nbgrader, a student whose grading failed does not stop the others;
    the failures are raised together at the end."""
    course_root = Path(course_root).resolve()
    students = submitted_students(course_root, part) if students is None else students
    if not (course_root / "gradebook.db").exists():
        raise RoundTripError(f"{course_root} has no gradebook: run the generate step first.")
    scratches = {student: _scratch_root(course_root, part, student) for student in students}

    def grade(student: str) -> str:
        scratch = scratches[student]
        # Each run's figures and results in a folder of its own (two kernels never write one file). Part 2's
        # starting point (COURSE_PART1_DIR) stays shared: it is computed once, before the others start.
        env = {"COURSE_OUT_DIR": str(scratch / "out"), "COURSE_PART2_OUT_DIR": str(scratch / "out-part2")}
        return nbgrader(scratch, "autograde", part, "--force", echo=False, env=env)

    failures: dict[str, RoundTripError] = {}
    logs: dict[str, str] = {}
    pending = list(students)
    if part != PARTS[0] and pending:
        # Part 2 onwards compute a starting point on their first submission and read it back on the others:
        # grade one student first, so that parallel kernels only ever read it.
        first = pending.pop(0)
        try:
            logs[first] = grade(first)
        except RoundTripError as exc:
            failures[first] = exc
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {student: pool.submit(grade, student) for student in pending}
        for student, future in futures.items():
            try:
                logs[student] = future.result()
            except RoundTripError as exc:
                failures[student] = exc
    for student in students:
        if echo and student in logs and logs[student].strip():
            print(logs[student].rstrip(), flush=True)
        graded = scratches[student] / "autograded" / student / part
        if graded.exists():
            merge_grades(course_root, scratches[student], part, student)
            dest = course_root / "autograded" / student / part
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(graded), dest)
        if student not in failures:
            shutil.rmtree(scratches[student], ignore_errors=True)
    if failures:
        raise RoundTripError("autograding failed for " + ", ".join(sorted(failures)) + " (their scratch course roots "
                             f"are kept in {course_root / 'parallel' / part}):\n"
                             + "\n".join(str(exc) for exc in failures.values()))


def merge_grades(course_root: Path, scratch: Path, part: str, student: str) -> None:
    """Write ``student``'s submission of ``part`` from the scratch course root's gradebook into the course root's
    (replacing any earlier one): the timestamp, each grade's automatic and manual scores and whether it needs a
    manual grade, each comment, and each notebook's flag and late penalty."""
    import warnings

    from nbgrader.api import Gradebook, MissingEntry
    from sqlalchemy.exc import SAWarning

    course_id = "persona-space"
    # nbgrader's add_submission reads the new submission's notebooks before adding it to the session, which
    # SQLAlchemy warns about (nbgrader's own autograde does the same); the rows are written all the same.
    with warnings.catch_warnings(), Gradebook(f"sqlite:///{scratch / 'gradebook.db'}", course_id) as source, \
            Gradebook(f"sqlite:///{Path(course_root) / 'gradebook.db'}", course_id) as gb:
        warnings.simplefilter("ignore", SAWarning)
        got = source.find_submission(part, student)
        who = source.find_student(student)
        gb.update_or_create_student(student, first_name=who.first_name, last_name=who.last_name, email=who.email,
                                    lms_user_id=who.lms_user_id)
        try:
            gb.remove_submission(part, student)
            gb.db.commit()
            gb.db.expire_all()
        except MissingEntry:
            pass
        gb.add_submission(part, student, timestamp=got.timestamp, extension=got.extension)
        for notebook in got.notebooks:
            target = gb.find_submission_notebook(notebook.name, part, student)
            target.flagged = notebook.flagged
            target.late_submission_penalty = notebook.late_submission_penalty
            for grade in notebook.grades:
                mine = gb.find_grade(grade.name, notebook.name, part, student)
                mine.auto_score, mine.manual_score = grade.auto_score, grade.manual_score
                mine.extra_credit, mine.needs_manual_grade = grade.extra_credit, grade.needs_manual_grade
            for comment in notebook.comments:
                mine = gb.find_comment(comment.name, notebook.name, part, student)
                mine.auto_comment, mine.manual_comment = comment.auto_comment, comment.manual_comment
        gb.db.commit()


def feedback(course_root: Path, echo: bool = True, part: str = PART) -> None:
    nbgrader(course_root, "generate_feedback", part, "--force", echo=echo)


def export(course_root: Path, echo: bool = True) -> Path:
    """Every assignment's grades, one row per student and assignment."""
    out = Path(course_root) / "grades.csv"
    nbgrader(course_root, "export", "--to", str(out), echo=echo)
    return out


def read_grades(csv_path: Path, part: str = PART) -> dict[str, dict[str, str]]:
    with open(csv_path, newline="") as f:
        return {row["student_id"]: row for row in csv.DictReader(f) if row["assignment"] == part}


def autograded_path(course_root: Path, student: str, part: str = PART) -> Path:
    return Path(course_root) / "autograded" / student / part / _notebook(part)


def feedback_path(course_root: Path, student: str, part: str = PART) -> Path:
    return Path(course_root) / "feedback" / student / part / f"{part}.html"


def notebook_seconds(course_root: Path, student: str, part: str = PART) -> float:
    """How long ``student``'s notebook ran when autograded: from the first cell's start to the last cell's
    reply, as the kernel recorded them (the same for every submission: kernel start-up not included)."""
    import nbformat

    nb = nbformat.read(autograded_path(course_root, student, part), as_version=4)
    stamps = [c.metadata.get("execution", {}) for c in nb.cells if c.cell_type == "code"]
    starts = [s["iopub.execute_input"] for s in stamps if "iopub.execute_input" in s]
    ends = [s["shell.execute_reply"] for s in stamps if "shell.execute_reply" in s]
    if not starts or not ends:
        raise RoundTripError(f"{student}'s autograded notebook has no execution times (was it executed?)")
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (max(map(parse, ends)) - min(map(parse, starts))).total_seconds()


def roundtrip(course_root: Path, submissions: Mapping[str, Path] | None = None,
              steps: Iterable[str] = STEPS, echo: bool = True, part: str = PART, jobs: int = 1) -> dict[str, float]:
    """Run ``steps`` in order on ``course_root`` for assignment ``part`` (``jobs`` students autograded at a time);
    return the seconds each took."""
    course_root = Path(course_root).resolve()
    _notebook(part)
    steps = list(steps)
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise RoundTripError(f"Unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}.")
    seconds: dict[str, float] = {}
    failed_autograde = None
    for step in STEPS:
        if step not in steps:
            continue
        t0 = time.perf_counter()
        if echo:
            print(f"== {step}", flush=True)
        if step == "generate":
            generate(course_root, echo, part)
        elif step == "collect":
            for path in collect(course_root, submissions or demo_submissions(course_root, part), part):
                if echo:
                    print(f"   {path.relative_to(course_root)}")
        elif step == "autograde":
            try:
                autograde(course_root, echo, part, jobs=jobs)
            except RoundTripError as exc:
                # nbgrader grades every submission it can and exits 1 if one failed (an unreadable
                # notebook, say): still give the others their feedback and grades, then report it.
                failed_autograde = exc
        elif step == "feedback":
            feedback(course_root, echo, part)
        elif step == "export":
            export(course_root, echo)
        elif step == "report":
            from tools import class_report

            try:
                page, table, _ = class_report.write(course_root, part)
            except class_report.ReportError as exc:
                raise RoundTripError(str(exc)) from exc
            if echo:
                print(f"   {page}\n   {table}")
        seconds[step] = time.perf_counter() - t0
    if failed_autograde is not None:
        raise failed_autograde
    return seconds


def _submission(text: str) -> tuple[str, Path]:
    student, sep, path = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected STUDENT=NOTEBOOK, got {text!r}")
    return student, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--assignment", default=PART, choices=PARTS, help="the part to grade (default: %(default)s)")
    parser.add_argument("--course-root", type=Path, default=DEFAULT_COURSE_ROOT,
                        help="the nbgrader course root (default: %(default)s)")
    parser.add_argument("--submission", type=_submission, action="append", default=[], metavar="STUDENT=NOTEBOOK")
    parser.add_argument("--submissions-dir", type=Path)
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of: " + ",".join(STEPS))
    parser.add_argument("--jobs", type=int, default=1,
                        help="autograde this many students at a time (default: %(default)s; one per CPU core at most)")
    args = parser.parse_args(argv)
    part = args.assignment
    try:
        submissions = dict(args.submission)
        if args.submissions_dir:
            submissions.update(find_submissions(args.submissions_dir, part))
        seconds = roundtrip(args.course_root, submissions or None, [s.strip() for s in args.steps.split(",") if s],
                            echo=True, part=part, jobs=args.jobs)
    except RoundTripError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    course_root = args.course_root.resolve()
    print("\n== seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
          + f"; total {sum(seconds.values()):.1f}")
    if "autograde" in seconds:
        graded = sorted(p.parent.parent.name for p in (course_root / "autograded").glob(f"*/{part}/{part}.ipynb"))
        print("== seconds each notebook ran when autograded (kernel start-up not included):")
        for student in graded:
            print(f"   {student:24s} {notebook_seconds(course_root, student, part):6.1f}")
    grades = course_root / "grades.csv"
    if "export" in seconds:
        print(f"== {grades} ({part})")
        for student, row in sorted(read_grades(grades, part).items()):
            print(f"   {student:24s} {float(row['score']):5.1f} / {float(row['max_score']):.1f}")
    if "feedback" in seconds:
        print(f"== feedback: {course_root / 'feedback'}/<student>/{part}/{part}.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
