"""Shared pytest set-up: no network, the tiny model loaded once, and the ``transformers`` marker.

``transformers`` marks every test that loads a model or a tokenizer through transformers; `make test` runs those
again under transformers 4.57 (``-m "transformers and not classroom"``). A test is marked when

- it uses a model fixture (:data:`MODEL_FIXTURES`), directly or through another fixture;
- it, a fixture it uses or a helper of its own module calls a loader (:data:`LOADERS`), or imports (or runs with
  ``python -m``) transformers or a benchmark (:data:`MODEL_PACKAGES`);
- it runs a check of the notebooks (a catalogue entry or an ARENA-text item, by its ``check``) that loads a model;
- its module is in :data:`TRANSFORMERS_MODULES` (modules that load models in ways the rules above cannot see).

``tests/test_markers.py`` checks that the selection is not empty and that tests which load a model carry the mark.
"""

from __future__ import annotations

import ast
import json
import os
from functools import cache
from pathlib import Path

# `make test` runs the suite in parallel workers (pytest-xdist, one per core): each worker's torch keeps to one thread,
# so that the workers do not fight over the cores. Set before torch is first imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# Nothing in the suite may reach a model hub or an API.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for var in ("COURSE_API_KEY", "OPENROUTER_API_KEY", "OPENAI_API_KEY"):
    os.environ.pop(var, None)

import pytest  # noqa: E402

from utils import settings  # noqa: E402

TESTS = Path(__file__).resolve().parent
MODEL_FIXTURES = frozenset({"tiny", "smollm2", "reference"})
# Calls that load a model or a tokenizer (or run a notebook, or every catalogued check, which do).
LOADERS = frozenset({"tiny_gemma2", "tiny_gemma2_bf16", "tiny_chatml_tokenizer", "tiny_untrimmed_tokenizer",
                     "load_model", "load_reference", "from_pretrained", "execute", "run_catalogue"})
# Modules a test imports, or runs with `python -m`, that load models: transformers itself and the benchmarks.
MODEL_PACKAGES = frozenset({"transformers", "benchmarks"})
# Parameters through which a notebook check receives the learner's model or tokenizer.
MODEL_PARAMETERS = frozenset({"model", "tokenizer"})
TRANSFORMERS_MODULES = frozenset({
    "test_notebooks",  # runs the notebooks on tiny-gemma2
    "test_nbgrader",  # grades the notebooks (nbgrader's kernels load tiny-gemma2)
    "test_exchange",  # grades the notebooks handed in through nbgrader's exchange
    "test_formgrader",  # grades notebooks, then drives nbgrader's formgrader
    "test_fixtures",  # tools.make_fixtures recomputes the checks' fixtures on tiny-gemma2
    "test_models",  # the model loaders and their caches
    "test_pipeline",  # the resumable runner and the GPU measurement script build models
})
CHECK_MODULES = ("part1_persona_space.py", "part2_stabilizing.py", "part3_trait_vectors.py")


def _loading_functions(path: Path, fixtures: frozenset[str] = frozenset()) -> set[str]:
    """Module-level functions of ``path`` that load a model: they take a parameter in ``fixtures`` or
    :data:`MODEL_PARAMETERS` (checks modules only), or call a loader or such a function of the same module."""
    tree = ast.parse(path.read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def called(node) -> set[str]:
        names = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call):
                func = sub.func
                names.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
        return names

    def uses_a_model_package(node) -> bool:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import) and any(a.name.split(".")[0] in MODEL_PACKAGES for a in sub.names):
                return True
            if isinstance(sub, ast.ImportFrom) and (sub.module or "").split(".")[0] in MODEL_PACKAGES:
                return True
            if (isinstance(sub, ast.Constant) and isinstance(sub.value, str)
                    and sub.value.split(".")[0] in MODEL_PACKAGES - {"transformers"} and "." in sub.value):
                return True  # `python -m benchmarks.<name>`
        return False

    calls = {name: called(node) for name, node in functions.items()}
    loading = {name for name, node in functions.items()
               if {a.arg for a in node.args.args + node.args.kwonlyargs} & fixtures or calls[name] & LOADERS
               or uses_a_model_package(node)}
    while True:  # through helpers (and fixtures) of the same module
        more = {name for name in functions if name not in loading and calls[name] & loading}
        if not more:
            return loading
        loading |= more


@cache
def model_checks() -> frozenset[str]:
    """The notebook checks (``tests/part*_*.py``) that load a model or take the learner's model or tokenizer."""
    out = set()
    for module in CHECK_MODULES:
        out |= _loading_functions(TESTS / module, MODEL_PARAMETERS)
    return frozenset(name for name in out if name.startswith(("test_", "hidden_test_")))


@cache
def _module_loaders(path: Path) -> frozenset[str]:
    return frozenset(_loading_functions(path, MODEL_FIXTURES))


def _touches_transformers(item) -> bool:
    if item.path.stem in TRANSFORMERS_MODULES or MODEL_FIXTURES & set(item.fixturenames):
        return True
    loaders = _module_loaders(item.path)
    if getattr(item, "originalname", item.name) in loaders or loaders & set(item.fixturenames):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any({getattr(value, "check", None), *getattr(value, "hidden", ())} & model_checks()
               for value in params.values())


@pytest.hookimpl(tryfirst=True)  # before -m selects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _touches_transformers(item):
            item.add_marker(pytest.mark.transformers)


def pytest_itemcollected(item):
    # As each test is collected: before every pytest_collection_modifyitems hook, xdist's (which reads the groups)
    # among them.
    item.add_marker(pytest.mark.xdist_group(_worker_group(item)))


def _worker_group(item) -> str:
    """The tests that one parallel worker runs together (``--dist loadgroup``): a module's tests share its
    module-scoped fixtures and caches, so they stay on one worker; the nbgrader round trip is one group per part
    (each part's class is graded once, by its own fixture parameter)."""
    module = item.module.__name__
    callspec = getattr(item, "callspec", None)
    if module.endswith("test_nbgrader") and callspec is not None and "graded" in callspec.params:
        return _nbgrader_group(callspec.params["graded"])
    if "parallel_class" in item.fixturenames:  # a session fixture: graded once, on the worker that grades Part 1
        return _nbgrader_group("part1_persona_space")
    return module


def _nbgrader_group(part: str) -> str:
    return f"tests.test_nbgrader-{part}"  # no brackets: xdist reads a group name that ends in "]" as no group


def pytest_collection_finish(session):
    """With ``COURSE_TEST_MARKS=path``: write each collected test's markers and fixtures there (tests/test_markers.py)."""
    path = settings.get("COURSE_TEST_MARKS") if settings.is_set("COURSE_TEST_MARKS") else None
    if path:
        Path(path).write_text(json.dumps({item.nodeid: {"marks": sorted({m.name for m in item.iter_markers()}),
                                                        "fixtures": sorted(item.fixturenames),
                                                        "group": _worker_group(item)}
                                          for item in session.items}))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of tiny-gemma2."""
    from tests.part1_persona_space import tiny_gemma2

    return tiny_gemma2()


@pytest.fixture(scope="session")
def reference():
    """The reference solutions, executed from src/part1_persona_space.py."""
    from tools.reference import load_reference

    return load_reference()


PARALLEL_CLASS = ("solution", "mistakes", "blank")  # Part 1's sample students graded by `parallel_class`


@pytest.fixture(scope="session")
def parallel_class(tmp_path_factory):
    """Part 1 generated, and :data:`PARALLEL_CLASS` collected and autograded two at a time (``--jobs 2``), feedback
    and grades.csv written: (course root, grades.csv). tests/test_nbgrader.py compares it with the one-job round
    trip; tests/test_formgrader.py grades a copy of it by hand in nbgrader's formgrader."""
    from tools import grade_roundtrip as rt
    from tools import sample_submissions as samples

    part = "part1_persona_space"
    course = tmp_path_factory.mktemp("parallel-course")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("COURSE_MODEL", "COURSE_OUT_DIR", "COURSE_CHECK_TIMEOUT", "COURSE_CHECK_DEBUG"):
            mp.delenv(var, raising=False)
        mp.chdir(tmp_path_factory.mktemp("parallel-cwd"))
        release = rt.generate(course, echo=False, part=part)
        submissions = samples.build(part, release, tmp_path_factory.mktemp("parallel-submissions"),
                                    only=list(PARALLEL_CLASS))
        rt.collect(course, submissions, part=part)
        rt.autograde(course, echo=False, part=part, jobs=2)
        rt.feedback(course, echo=False, part=part)
        grades = rt.export(course, echo=False)
    return course, grades
