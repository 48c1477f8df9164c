"""The ``transformers`` marker (tests/conftest.py): `make test` runs the tests it marks again under transformers
4.57, so every test that loads a model must carry it, and the selection must not be empty."""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests import conftest
from tests import part1_persona_space as checks1
from tests import part2_stabilizing as checks2
from tests.catalogue import judge_variant
from tests.catalogue.part1 import CATALOGUE as CATALOGUE1
from tests.catalogue.part2 import CATALOGUE as CATALOGUE2

ROOT = Path(__file__).resolve().parent.parent
SELECTION = "transformers and not classroom"  # what `make test-transformers4` runs


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> dict[str, dict]:
    """nodeid -> {"marks": [...], "fixtures": [...]} of the whole suite, from one `pytest --collect-only` run."""
    path = tmp_path_factory.mktemp("marks") / "marks.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, env={**os.environ, "COURSE_TEST_MARKS": str(path)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(path.read_text())


def _selected(info: dict) -> bool:
    return "transformers" in info["marks"] and "classroom" not in info["marks"]


def test_the_makefile_reruns_the_selection_under_transformers4():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\ntest-transformers4:"):]
    recipe = recipe[:recipe.index("\n\n")]
    assert f'-m "{SELECTION}"' in recipe, recipe
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert {m.split(":")[0] for m in markers} >= {"transformers", "classroom"}


def test_parallel_workers_keep_each_group_together(collected):
    """`make test`'s workers (``--dist loadgroup``) each take whole groups: a module, or one part's nbgrader round
    trip. The scheduler must read every name as a group (xdist ignores one that ends in "]"), and the tests that
    share an expensive fixture must share its group, or a second worker builds it again."""
    from xdist.scheduler.loadgroup import LoadGroupScheduling

    scope = {nodeid: LoadGroupScheduling._split_scope(None, f"{nodeid}@{info['group']}")
             for nodeid, info in collected.items()}
    assert all(scope[n] == info["group"] for n, info in collected.items()), \
        [n for n, info in collected.items() if scope[n] != info["group"]][:5]
    def groups(fixture: str, part: str = "") -> set[str]:
        return {info["group"] for n, info in collected.items() if fixture in info["fixtures"] and part in n}

    for part in ("part1_persona_space", "part2_stabilizing", "part3_trait_vectors"):
        assert len(groups("graded", part)) == 1, (part, groups("graded", part))
    for fixture in ("parallel_class", "exchanged", "part2_run"):
        assert len(groups(fixture)) == 1, (fixture, groups(fixture))
    assert groups("parallel_class") == groups("graded", "part1_persona_space")


def test_xdist_really_keeps_a_group_on_one_worker(tmp_path):
    """The same in a real two-worker run: a pytest (or pytest-xdist) that ignores the groups fails here."""
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n\ndef pytest_itemcollected(item):\n"
        "    item.add_marker(pytest.mark.xdist_group(item.module.__name__))\n")
    for name in ("a", "b"):
        (tmp_path / f"test_{name}.py").write_text(
            "import os\nimport pytest\n\n\n@pytest.mark.parametrize('i', range(6))\ndef test_where(i):\n"
            f"    open({str(tmp_path / name)!r} + os.environ['PYTEST_XDIST_WORKER'], 'w').close()\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
                           "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("a", "b"):
        workers = sorted(p.name for p in tmp_path.glob(f"{name}gw*"))
        assert len(workers) == 1, f"one group's tests ran on {workers}"


def test_the_selection_is_not_empty_and_not_the_whole_suite(collected):
    selected = {nodeid for nodeid, info in collected.items() if _selected(info)}
    assert selected, f"`-m {SELECTION!r}` selects nothing"
    assert len(selected) < len(collected)
    modules = {nodeid.split("::")[0] for nodeid in selected}
    # The notebooks, the grading round trip and the checks with a model are rerun; pure modules are not.
    assert {"tests/test_notebooks.py", "tests/test_nbgrader.py", "tests/test_catalogue.py", "tests/test_checks.py",
            "tests/test_turns.py"} <= modules
    assert not modules & {"tests/test_transcripts.py", "tests/test_packaging.py", "tests/test_markers.py"}


def test_every_test_that_uses_a_model_fixture_is_marked(collected):
    """Through pytest's own fixture closure: tiny-gemma2 (``tiny``), SmolLM2 (``smollm2``), the reference solutions
    (``reference``), and any fixture built on them."""
    unmarked = [nodeid for nodeid, info in collected.items()
                if set(info["fixtures"]) & {"tiny", "smollm2", "reference"} and "transformers" not in info["marks"]]
    assert unmarked == []
    users = {nodeid.split("::")[0] for nodeid, info in collected.items() if {"tiny", "smollm2"} & set(info["fixtures"])}
    assert {"tests/test_activations.py", "tests/test_turns.py", "tests/test_checks.py"} <= users


def test_modules_that_run_notebooks_or_nbgrader_are_marked_throughout(collected):
    for module in conftest.TRANSFORMERS_MODULES:
        items = {nodeid: info for nodeid, info in collected.items() if nodeid.startswith(f"tests/{module}.py::")}
        assert items, f"{module} has no tests: remove it from TRANSFORMERS_MODULES"
        assert all("transformers" in info["marks"] for info in items.values()), module


def test_tests_that_call_a_loader_themselves_are_marked(collected):
    """A few that load a model without a fixture: they call tiny_gemma2(), run a benchmark, or pass the whole
    catalogue through its checks."""
    for nodeid in ("tests/test_arena_text.py::test_the_batched_mask_bug_is_named_under_left_padding_too",
                   "tests/test_catalogue.py::test_verdicts_are_identical_run_after_run",
                   "tests/test_activations.py::test_benchmark_script_runs_and_reports_its_headline_numbers",
                   "tests/test_steering.py::test_gpu_part2_script_runs_at_tiny_size"):
        assert "transformers" in collected[nodeid]["marks"], nodeid


def test_catalogue_items_are_marked_by_their_check(collected):
    catalogue = [nodeid for nodeid in collected if re.match(r"tests/test_catalogue\.py::test_(correct_variant_is_"
                                                            r"accepted|mistake_is_rejected_with_its_message)\[", nodeid)]
    model = [nodeid for nodeid in catalogue if "transformers" in collected[nodeid]["marks"]]
    assert 0 < len(model) < len(catalogue)
    for nodeid in catalogue:
        check = "test_" + nodeid.split("[")[1].split("::")[0]
        assert ("transformers" in collected[nodeid]["marks"]) == (check in conftest.model_checks()), nodeid


class _ModelLoaded(Exception):
    pass


@pytest.mark.parametrize("entry", [e for e in CATALOGUE1 + CATALOGUE2 if e.check not in conftest.model_checks()],
                         ids=lambda e: e.check)
def test_an_unmarked_check_loads_no_model(entry, monkeypatch):
    """Run the check (and its hidden checks) on a correct variant with every model loader raising: a check that
    conftest leaves unmarked must never reach transformers."""
    import utils.models

    def loaded(*args, **kwargs):
        raise _ModelLoaded(f"{entry.check} loads a model: tests/conftest.py must mark it `transformers`")

    monkeypatch.setattr(utils.models, "load_model", loaded)
    for module in (checks1, checks2):
        for name in ("tiny_gemma2", "tiny_gemma2_bf16", "tiny_chatml_tokenizer", "tiny_untrimmed_tokenizer"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, loaded)
    verdict = judge_variant(entry, entry.variants[0])
    assert verdict.outcome == "accepted", verdict.message
