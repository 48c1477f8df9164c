"""Generate the course notebooks from their single hand-edited source.

For each ``src/<part>.py`` (jupytext percent format, nbgrader cell metadata inline) this writes:

- ``solutions/<part>.ipynb``: the worked version (solution markers removed);
- ``exercises/<part>.ipynb``: the learner's version, made by nbgrader's own preprocessors, the same
  ones ``nbgrader generate_assignment`` runs (solutions become ``raise NotImplementedError()``, hidden
  tests are removed, cells are locked, checksums computed);
- ``nbgrader/source/<part>/<part>.ipynb``: the instructor's nbgrader source (markers kept).

Every generated notebook has no outputs, stable cell ids, and ``generated_from`` and ``generated_note``
in its metadata (which source made it; edit that, not the notebook). The solutions and the maintainers'
notebooks also start with a cell that says so; the learner's notebook (``exercises/``, and the nbgrader
source, whose release is that notebook) starts with the course's title instead.
``python -m tools.build_notebooks --check`` exits 1 when a committed notebook differs from what its source
generates.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "src"
PARTS = ["part1_persona_space", "part2_stabilizing", "part3_trait_vectors"]
SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION", "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def _generated_note(part: str, kind: str) -> str:
    return (f"> **Generated file ({kind}).** Made from `src/{part}.py` by `make notebooks`. "
            "Edit the source, not this notebook.")


def _metadata_note(part: str) -> str:
    return f"Generated from src/{part}.py by `make notebooks`. Edit the source, not this notebook."


def read_source(part: str) -> nbformat.NotebookNode:
    """The source as a notebook: locked metadata on every non-exercise cell, stable ids."""
    nb = jupytext.read(SOURCES / f"{part}.py", fmt="py:percent")
    nb.metadata = nbformat.from_dict({
        "kernelspec": KERNELSPEC,
        "language_info": {"name": "python"},
        "generated_from": f"src/{part}.py",
        "generated_note": _metadata_note(part),
    })
    for i, cell in enumerate(nb.cells):
        meta = cell.metadata.get("nbgrader")
        if meta is None:
            meta = {"grade": False, "grade_id": f"{part}-cell-{i:03d}", "locked": True,
                    "schema_version": 3, "solution": False, "task": False}
            cell.metadata["nbgrader"] = meta
        cell.metadata = nbformat.from_dict({"nbgrader": dict(meta), **{k: v for k, v in cell.metadata.items()
                                                                       if k == "tags"}})
        cell.id = meta["grade_id"].replace("_", "-")
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def _with_note(nb: nbformat.NotebookNode, part: str, kind: str) -> nbformat.NotebookNode:
    nb = copy.deepcopy(nb)
    note = nbformat.v4.new_markdown_cell(_generated_note(part, kind))
    note.id = "generated-note"  # not an nbgrader cell: the nbgrader source has no note cell, so its gradebook
    # would not know this one (a submission made from the solutions then fails autograde)
    nb.cells.insert(0, note)
    return nb


def nbgrader_source(part: str) -> nbformat.NotebookNode:
    # nbgrader hands every cell out unchanged, so this has no note cell either: the release then equals
    # exercises/<part>.ipynb (the note is in the metadata, which the release keeps).
    return read_source(part)


def solution_notebook(part: str) -> nbformat.NotebookNode:
    nb = _with_note(read_source(part), part, "solutions")
    for cell in nb.cells:
        lines = cell.source.split("\n")
        cell.source = "\n".join(line for line in lines if line.strip() not in SOLUTION_MARKERS)
    return nb


def exercise_notebook(part: str) -> nbformat.NotebookNode:
    """What ``nbgrader generate_assignment`` releases, made with its own preprocessors."""
    from nbgrader.preprocessors import (ClearHiddenTests, ClearMarkScheme, ClearOutput, ClearSolutions,
                                        ComputeChecksums, LockCells)

    nb = read_source(part)  # no note cell: the learner's notebook opens on the title (the note is in the metadata)
    resources: dict = {}
    for step in (LockCells, ClearSolutions, ClearOutput, ComputeChecksums, ClearHiddenTests, ClearMarkScheme,
                 ComputeChecksums):
        nb, resources = step().preprocess(nb, resources)
    return nb


def targets(part: str) -> dict[Path, nbformat.NotebookNode]:
    return {
        ROOT / "solutions" / f"{part}.ipynb": solution_notebook(part),
        ROOT / "exercises" / f"{part}.ipynb": exercise_notebook(part),
        ROOT / "nbgrader" / "source" / part / f"{part}.ipynb": nbgrader_source(part),
    }


def dumps(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb, version=4) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed notebook is out of date")
    args = parser.parse_args(argv)
    stale = []
    for part in PARTS:
        for path, nb in targets(part).items():
            text = dumps(nb)
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(path.relative_to(ROOT))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("Out of date (run `make notebooks` and commit): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
