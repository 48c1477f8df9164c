"""Benchmark autograding a class: one student at a time against ``--jobs`` at a time, on the same submissions.

Run::

    python -m benchmarks.grading [--part part1_persona_space] [--students 20] [--jobs 2] [--out DIR]

Builds a class of ``--students`` submissions from the sample students of ``tools/sample_submissions.py`` (the
solution, the rewritten answers, the three mistakes, the syntax error plus endless loop, the delegating answers
and the blank release, in turn), each copy varied (a comment naming the student added to its first answer cell,
so no two notebooks are the same file). Then grades the class twice with ``tools.grade_roundtrip``, each time in a
fresh course root: ``nbgrader autograde`` of everyone (one job), and ``--jobs`` students at a time (each in its
own scratch course root, merged into the gradebook). It checks that both give the same grades.csv, and prints
the seconds per student of each, their ratio, and projections for 100 and 300 students on 2 and 8 cores.

The projection assumes each extra job adds what the measured ``--jobs`` run added per job (its parallel
efficiency: speed-up / jobs), one job per core, and enough memory for one grading kernel per job. The machine may be shared: the load average before and after is printed; numbers taken under
load are noisy. The last line printed is one JSON object with the measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from tools import grade_roundtrip as rt
from tools import sample_submissions as samples
from tools.build_notebooks import PARTS


def build_class(part: str, release: Path, out: Path, n: int) -> dict[str, Path]:
    """``n`` submissions named ``s<i>-<sample student>``, cycling through the part's sample students."""
    originals = samples.build(part, release, out / "samples")
    kinds = list(originals)
    class_dir = out / "class"
    class_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for i in range(n):
        kind = kinds[i % len(kinds)]
        student = f"s{i + 1:03d}-{kind}"
        nb = nbformat.read(originals[kind], as_version=4)
        answer = next((c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")), None)
        if answer is not None:
            answer.source = f"# {student}\n" + answer.source
        path = class_dir / f"{student}.ipynb"
        nbformat.write(nb, path)
        made[student] = path
    return made


def grade(course: Path, part: str, submissions: dict[str, Path], jobs: int) -> tuple[float, Path]:
    """Generate, collect and autograde in a fresh ``course``; return the autograde seconds and grades.csv."""
    shutil.rmtree(course, ignore_errors=True)
    rt.generate(course, echo=False, part=part)
    rt.collect(course, submissions, part=part)
    t0 = time.perf_counter()
    try:
        rt.autograde(course, echo=False, part=part, jobs=jobs)
    except rt.RoundTripError as exc:  # a notebook that could not be graded: reported, the others still count
        print(f"warning: {exc}".splitlines()[0], file=sys.stderr)
    seconds = time.perf_counter() - t0
    return seconds, rt.export(course, echo=False)


def project(per_student_1: float, per_student_n: float, jobs: int) -> dict[str, float]:
    """Minutes for 100 and 300 students on 2 and 8 cores (one job per core)."""
    efficiency = (per_student_1 / per_student_n) / jobs
    out = {}
    for cores in (2, 8):
        speedup = max(1.0, cores * efficiency)
        for students in (100, 300):
            out[f"{students}_students_{cores}_cores_min"] = round(students * per_student_1 / speedup / 60, 1)
    out["parallel_efficiency"] = round(efficiency, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default=PARTS[0], choices=PARTS)
    parser.add_argument("--students", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.students < 1 or args.jobs < 2:
        parser.error("--students must be 1 or more and --jobs 2 or more")
    out = args.out or Path(tempfile.mkdtemp(prefix="grading-benchmark-"))
    try:
        load_before = os.getloadavg()
        release = rt.generate(out / "release-course", echo=False, part=args.part)
        submissions = build_class(args.part, release, out, args.students)
        seq, seq_csv = grade(out / "course-1", args.part, submissions, jobs=1)
        par, par_csv = grade(out / f"course-{args.jobs}", args.part, submissions, jobs=args.jobs)
        same = rt.read_grades(seq_csv, args.part) == rt.read_grades(par_csv, args.part)
        load_after = os.getloadavg()
        n = args.students
        result = {
            "part": args.part, "students": n, "jobs": args.jobs, "cpus": os.cpu_count(),
            "sequential_s": round(seq, 1), "parallel_s": round(par, 1),
            "sequential_per_student_s": round(seq / n, 2), "parallel_per_student_s": round(par / n, 2),
            "ratio_sequential_over_parallel": round(seq / par, 2), "identical_grades": same,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
            **project(seq / n, par / n, args.jobs),
        }
        print(f"{n} students of {args.part}, {os.cpu_count()} CPUs, load {load_before[0]:.1f} -> {load_after[0]:.1f}")
        print(f"  one at a time      : {seq:7.1f} s  ({seq / n:5.2f} s per student)")
        print(f"  {args.jobs} at a time        : {par:7.1f} s  ({par / n:5.2f} s per student)")
        print(f"  ratio              : {seq / par:5.2f}x   identical grades.csv: {same}")
        for cores in (2, 8):
            print(f"  projected, {cores} cores : 100 students {result[f'100_students_{cores}_cores_min']:6.1f} min, "
                  f"300 students {result[f'300_students_{cores}_cores_min']:6.1f} min")
        print(json.dumps(result))
        return 0 if same else 1
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
