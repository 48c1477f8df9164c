"""The reference solutions, executed from the single source, for maintainers' tools and the pytest suite.

Nothing in ``tests/part1_persona_space.py`` (which ships to learners) imports this: the checks compare
against stored fixtures and properties instead. This module is what makes those fixtures
(``python -m tools.make_fixtures``) and what the pytest suite uses to prove that every check passes
the reference solution.
"""

from __future__ import annotations

from functools import lru_cache

from tools.build_notebooks import solution_notebook

SETUP_CELL_INDEX = 2  # the notebook's imports cell (after the generated note and the title)


@lru_cache(maxsize=None)
def exercise_sources(part: str = "part1_persona_space") -> tuple[tuple[str, str], ...]:
    """(grade_id, source) of the imports cell and every exercise cell of the solution notebook."""
    nb = solution_notebook(part)
    imports = nb.cells[SETUP_CELL_INDEX]
    assert imports.cell_type == "code" and "import" in imports.source, "the imports cell moved"
    cells = [("imports", imports.source)]
    cells += [(c.metadata["nbgrader"]["grade_id"], c.source) for c in nb.cells
              if c.cell_type == "code" and c.metadata["nbgrader"].get("solution")]
    return tuple(cells)


def load_reference(part: str = "part1_persona_space") -> dict:
    """A fresh namespace holding the reference implementation of every exercise."""
    namespace: dict = {"__name__": f"reference_{part}"}
    for grade_id, source in exercise_sources(part):
        exec(compile(source, f"<{part}:{grade_id}>", "exec"), namespace)
    return namespace
