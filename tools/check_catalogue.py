"""Mutation-style summary of the checks: ``python -m tools.check_catalogue [--part 1|2|3] [--runs N] [-v]``.

Runs every catalogued mistake and every alternative correct implementation (``tests/catalogue/``) through
its notebook check, then prints, per exercise, the mistakes caught (rejected with the expected message)
out of those tried and the correct variants accepted out of those tried, and, per check, the promise each
of its stages tests with the number of catalogued mistakes that stage rejects (``-v``: their names). Exits
non-zero unless both are 100%. ``--part P`` runs one part's catalogue only. ``--runs N`` repeats the whole catalogue N times and also fails if any
verdict or message differs between runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for _var in ("COURSE_API_KEY", "OPENROUTER_API_KEY", "OPENAI_API_KEY"):
    os.environ.pop(_var, None)


def _table(verdicts, entries) -> tuple[list[str], bool]:
    exercises: dict[str, list[int]] = {}
    checks_of: dict[str, list[str]] = {}
    for entry in entries:
        exercises.setdefault(entry.exercise, [0, 0, 0, 0])
        checks_of.setdefault(entry.exercise, []).append(entry.check)
    exercise_of = {entry.check: entry.exercise for entry in entries}
    for v in verdicts:
        row = exercises[exercise_of[v.entry]]
        if v.kind == "mistake":
            row[0] += v.ok
            row[1] += 1
        else:
            row[2] += v.ok
            row[3] += 1
    width = max(len(e) for e in exercises) + 2
    lines = [f"{'exercise':{width}s}{'mistakes caught':>18s}{'variants accepted':>20s}   checks",
             "-" * (width + 38 + 9)]
    total = [0, 0, 0, 0]
    for exercise, (caught, tried, accepted, variants) in exercises.items():
        total = [a + b for a, b in zip(total, (caught, tried, accepted, variants))]
        lines.append(f"{exercise:{width}s}{f'{caught}/{tried}':>18s}{f'{accepted}/{variants}':>20s}   "
                     f"{', '.join(c.removeprefix('test_') for c in checks_of[exercise])}")
    lines.append("-" * (width + 38 + 9))
    caught, tried, accepted, variants = total
    lines.append(f"{'total':{width}s}{f'{caught}/{tried} ({100 * caught / max(tried, 1):.0f}%)':>18s}"
                 f"{f'{accepted}/{variants} ({100 * accepted / max(variants, 1):.0f}%)':>20s}")
    return lines, caught == tried and accepted == variants


def _promises(verdicts, entries, verbose: bool) -> list[str]:
    """Per exercise and check: each stage's promise, and the mistakes rejected at that stage."""
    from tests.catalogue import promises

    rejected: dict[tuple[str, str | None], list[str]] = {}
    for v in verdicts:
        if v.kind == "mistake" and v.outcome == "CheckFailure":
            rejected.setdefault((v.entry, v.stage), []).append(v.name)
    lines = ["Promises, one per stage of each check, and the catalogued mistakes each stage rejects:"]
    for entry in entries:
        lines.append(f"\n{entry.exercise} / {entry.check.removeprefix('test_')}")
        for label in promises(entry.check):
            names = rejected.get((entry.check, label), [])
            lines.append(f"  {len(names):3d}  {label}")
            if verbose:
                lines += [f"         - {name}" for name in names]
        unstaged = rejected.get((entry.check, None), [])
        if unstaged:
            lines.append(f"  {len(unstaged):3d}  (rejected before any stage began: {', '.join(unstaged)})")
        for hidden in entry.hidden:
            for label in promises(hidden):
                lines.append(f"    -  {label}  (hidden check {hidden}: run on the correct variants)")
    return lines


def main(argv: list[str] | None = None, entries=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="repeat the catalogue and compare the verdicts")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every mistake and variant")
    parser.add_argument("--part", type=int, choices=(1, 2, 3), help="one part's catalogue only (default: every part)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from tests.catalogue import run_catalogue

    if entries is None:
        from tests.catalogue.part1 import CATALOGUE as part1
        from tests.catalogue.part2 import CATALOGUE as part2
        from tests.catalogue.part3 import CATALOGUE as part3

        entries = {None: part1 + part2 + part3, 1: part1, 2: part2, 3: part3}[args.part]

    start = time.perf_counter()
    runs = [run_catalogue(entries) for _ in range(max(1, args.runs))]
    seconds = time.perf_counter() - start
    verdicts = runs[0]
    lines, complete = _table(verdicts, entries)
    print("Checks against the catalogue of mistakes and correct variants (tests/catalogue/part1.py, part2.py and part3.py)\n")
    print("\n".join(lines))
    print()
    print("\n".join(_promises(verdicts, entries, args.verbose)))

    problems = [v for v in verdicts if not v.ok]
    if args.verbose:
        print()
        for v in verdicts:
            mark = "ok  " if v.ok else "FAIL"
            print(f"{mark} {v.entry:48s} {v.kind:8s} {v.name}  ({v.seconds:.1f}s)")
    if problems:
        print("\nNot as catalogued:")
        for v in problems:
            want = "rejected with its message" if v.kind == "mistake" else "accepted"
            print(f"  {v.entry} / {v.kind} {v.name!r}: should be {want}; got {v.outcome}: {v.message[:300]!r}")

    deterministic = all([x.key() for x in run] == [x.key() for x in verdicts] for run in runs[1:])
    slowest = max(verdicts, key=lambda v: v.seconds)
    print(f"\n{len(verdicts)} check runs x {len(runs)} run(s) in {seconds:.1f}s; the slowest single item took "
          f"{slowest.seconds:.1f}s ({slowest.entry} / {slowest.name}).")
    if len(runs) > 1:
        print("Verdicts and messages identical across runs." if deterministic else
              "Verdicts or messages DIFFER between runs.")
    ok = complete and deterministic
    print("\n" + ("100% of mistakes caught and 100% of correct variants accepted." if ok else
                  "The catalogue is not at 100%: see above."))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
