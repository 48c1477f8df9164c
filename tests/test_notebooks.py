"""The notebooks: generated from their one source, free of outputs, and runnable end to end."""

import ast
import json
import math
import re
from collections import Counter

import nbformat
import pytest
import torch

from tests import part1_persona_space as checks1
from tests import part2_stabilizing as checks2
from tests import part3_trait_vectors as checks3
from tools import build_notebooks
from tools.run_notebook import execute
from utils.transcripts import case_studies, drift_transcripts, load_transcript

ROOT = build_notebooks.ROOT
PART = "part1_persona_space"
PART2 = "part2_stabilizing"
TINY_ENV = {"COURSE_PROFILE": "tests", "COURSE_MODEL": "tiny-gemma2", "COURSE_N_QUESTIONS": "3",
            "COURSE_MAX_NEW_TOKENS": "12", "COURSE_N_TRAITS": "2"}
# Part 2 on tiny-gemma2: one turn per transcript, one case study, one replayed turn, one steering question.
TINY_ENV2 = {**TINY_ENV, "COURSE_MAX_TURNS": "2", "COURSE_MAX_TOKENS": "1536",
             "COURSE_CASE_STUDIES": "llama-3.3-70b/jailbreak", "COURSE_REPLAY_TURNS": "1", "COURSE_STEER_QUESTIONS": "1"}
PART3 = "part3_trait_vectors"
TINY_ENV3 = dict(TINY_ENV)  # Part 3 at the tests profile's sizes (utils/settings.py: 2 traits, 1 pair, 2 questions, ...)
CHECKS = {PART: checks1, PART2: checks2, PART3: checks3}
CHECK_CALL = re.compile(r"checks\.((?:hidden_)?test_\w+)\(")


def _notebook(folder: str, part: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / folder / f"{part}.ipynb", as_version=4)


def _is(cell, kind: str) -> bool:
    """kind: "solution" (an exercise) or "grade" (a check cell)."""
    return cell.cell_type == "code" and bool(cell.metadata["nbgrader"].get(kind))


def _defined_checks(part: str) -> set[str]:
    """Every visible and hidden check function of the part's checks module."""
    module = CHECKS[part]
    return {name for name in dir(module)
            if name.startswith(("test_", "hidden_test_")) and callable(getattr(module, name))}


def _assert_every_check_ran_once_and_passed(nb, part: str):
    """The notebook calls each check of the part's module exactly once, and every call printed its pass line."""
    calls = Counter(name for c in nb.cells if c.cell_type == "code" for name in CHECK_CALL.findall(c.source))
    assert calls == Counter(_defined_checks(part)), f"check calls {dict(calls)}"
    for cell in nb.cells:
        if cell.cell_type == "code":
            passed = sum(o.get("text", "").count("all checks passed") for o in cell.outputs
                         if o.output_type == "stream")
            assert passed == len(CHECK_CALL.findall(cell.source)), f"cell {cell.id}: {passed} passes"


def _cpu_or_gpu_setting(part: str, name: str):
    """The value the notebook's setup gives ``name`` (``NAME = <gpu value> if ON_GPU else <cpu value>``) on this
    machine."""
    for cell in _notebook("solutions", part).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
                value = node.value
                if isinstance(value, ast.IfExp):
                    value = value.body if torch.cuda.is_available() else value.orelse
                return ast.literal_eval(value)
    raise AssertionError(f"{part}: no cell assigns {name}")


def _assert_drift_result(result: dict, n_turns: int, where: str):
    """A drift summary of an n_turns-turn curve: finite numbers, the first turn below tau in range."""
    assert "skipped" not in result, f"{where} was skipped: {result['skipped']}"
    assert result["n_turns"] == n_turns, where
    assert math.isfinite(result["slope"]) and math.isfinite(result["min_projection"]), where
    first = result["first_turn_below"]  # numbered from 1, as the plots number turns
    assert first is None or (isinstance(first, int) and 1 <= first <= n_turns), where


def _assistant_turns(path) -> int:
    return sum(m["role"] == "assistant" for m in load_transcript(path))


@pytest.mark.parametrize("part,path", [(part, path) for part in build_notebooks.PARTS
                                       for path in build_notebooks.targets(part)],
                         ids=lambda x: str(x.relative_to(ROOT)) if hasattr(x, "relative_to") else x)
def test_committed_notebook_matches_its_source(part, path):
    expected = build_notebooks.dumps(build_notebooks.targets(part)[path])
    assert path.exists(), f"{path} is missing: run `make notebooks`"
    assert path.read_text() == expected, f"{path.relative_to(ROOT)} differs from src/{part}.py: run `make notebooks`"


@pytest.mark.parametrize("part", build_notebooks.PARTS)
@pytest.mark.parametrize("folder", ["exercises", "solutions"])
def test_committed_notebooks_carry_no_outputs(folder, part):
    nb = nbformat.read(ROOT / folder / f"{part}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{folder} cell {cell.id} has outputs"
    assert nb.metadata["generated_from"] == f"src/{part}.py"
    assert "Edit the source" in nb.metadata["generated_note"]
    # The solutions open on the "generated file" note; the learner's notebook opens on the title.
    assert nb.cells[0].source.startswith("> **Generated file") == (folder == "solutions"), nb.cells[0].source[:80]


@pytest.mark.parametrize("part", build_notebooks.PARTS)
def test_exercise_notebook_has_stubs_where_solutions_were(part):
    exercise, solution = _notebook("exercises", part), _notebook("solutions", part)
    # One stub per solution block of the source, in exactly the cells that hold solutions.
    blocks = {c.id: c.source.count("### BEGIN SOLUTION") for c in build_notebooks.read_source(part).cells
              if _is(c, "solution")}
    stubs = {c.id: c.source.count("raise NotImplementedError()") for c in exercise.cells if _is(c, "solution")}
    assert stubs == blocks and all(blocks.values()), f"stubs {stubs}, solution blocks {blocks}"
    assert not any(c.metadata["nbgrader"].get("solution") for c in exercise.cells if c.cell_type != "code")
    by_id = {c.id: c for c in solution.cells}
    for cell in exercise.cells:
        if _is(cell, "solution"):
            assert "### BEGIN SOLUTION" not in cell.source
            # The stub keeps the signature and docstring but none of the solution's body.
            assert len(cell.source) < len(by_id[cell.id].source), cell.id
    assert not any("### BEGIN SOLUTION" in c.source for c in solution.cells)
    assert not any("raise NotImplementedError()" in c.source for c in solution.cells if c.cell_type == "code")


def test_solution_notebook_runs_end_to_end_on_tiny_gemma2(tmp_path, monkeypatch):
    for key, value in {**TINY_ENV, "COURSE_OUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setenv(key, value)
    nb = execute(ROOT / "solutions" / f"{PART}.ipynb", tmp_path / "executed.ipynb", echo=False, timeout=600)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("model", "layer", "n_personas", "n_responses", "pc1_explained_variance", "axis_auc",
                "persona_order", "seconds"):
        assert key in summary, key
    assert summary["model"] == "tiny-gemma2" and summary["layer"] == 3
    assert summary["n_personas"] == len(summary["persona_order"]) >= 2
    assert 0 < summary["pc1_explained_variance"] <= 1 and 0 <= summary["axis_auc"] <= 1
    figures = sorted(p.name for p in (tmp_path / "out").glob("*.html"))
    assert {"cosine_centered.html", "pca_scatter.html", "axis_personas.html", "traits_on_axis.html",
            "controls.html"} <= set(figures)
    _assert_every_check_ran_once_and_passed(nb, PART)


def _assigned_names(source: str | ast.AST) -> set[str]:
    """Every name a cell (or one statement) would bind: assignments, loop targets, defs, classes and imports."""
    names = set()
    for node in ast.walk(ast.parse(source) if isinstance(source, str) else source):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _stub_errors(nb, part: str) -> list[tuple[str, str]]:
    """(cell id, exception name) of every error in an executed exercise notebook, asserting that each is a
    NotImplementedError from a stub, or a NameError for a value an earlier failing cell would have defined."""
    solved = {c.id: c.source for c in nbformat.read(ROOT / "solutions" / f"{part}.ipynb", as_version=4).cells}
    undefined: set[str] = set()
    errors = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        err = next((o for o in cell.outputs if o.output_type == "error"), None)
        if err is None:
            continue
        errors.append((cell.id, err.ename))
        if err.ename == "NameError":
            missing = err.evalue.split("'")[1]
            assert missing in undefined, f"cell {cell.id}: NameError for {missing!r}, not a cascade: {err.evalue}"
        else:
            assert err.ename == "NotImplementedError", f"cell {cell.id}: {err.ename}: {err.evalue}"
        undefined |= _assigned_names(solved[cell.id])  # what this cell would have defined, once solved
    return errors


def _expected_exercise_errors(part: str) -> dict[str, str | None]:
    """Exercise and check cell id -> the error it must raise when the untouched exercise notebook runs (None: none).

    An exercise cell raises NotImplementedError only where its stub raises at the top of the cell (not inside a
    function). A check cell calls its check with the learner's object: NotImplementedError from the stub when the
    exercise cell defined that object, a NameError when the exercise cell raised before defining it."""
    bound: set[str] = set()  # what the exercise cells define before their stubs raise
    expected = {}
    for cell in _notebook("exercises", part).cells:
        if _is(cell, "solution"):
            expected[cell.id] = None
            for statement in ast.parse(cell.source).body:
                if isinstance(statement, ast.Raise):
                    expected[cell.id] = "NotImplementedError"
                    break
                bound |= _assigned_names(statement)
        elif _is(cell, "grade"):
            call = next(node for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.Call)
                        and CHECK_CALL.match(ast.unparse(node)))
            learner = call.args[0].id
            expected[cell.id] = "NotImplementedError" if learner in bound else "NameError"
    return expected


def _assert_fails_only_at_exercises(nb, part: str, first: str):
    errors = _stub_errors(nb, part)
    assert errors, "the exercise notebook ran without hitting a single stub"
    # The first failure is the first exercise, right where the learner starts.
    assert errors[0] == (first, "NotImplementedError")
    expected = _expected_exercise_errors(part)
    got = dict(errors)
    assert {cid: got.get(cid) for cid in expected} == expected


def test_exercise_notebook_fails_only_at_exercises(tmp_path, monkeypatch):
    """Run the untouched exercise notebook: every error is NotImplementedError from an exercise stub,
    or a NameError for a value that an earlier failing cell would have defined once solved."""
    for key, value in {**TINY_ENV, "COURSE_OUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setenv(key, value)
    nb = execute(ROOT / "exercises" / f"{PART}.ipynb", tmp_path / "executed.ipynb", allow_errors=True,
                 echo=False, timeout=600)
    _assert_fails_only_at_exercises(nb, PART, first="ex-judge-template")


def test_part2_solution_notebook_runs_end_to_end_on_tiny_gemma2(tmp_path, monkeypatch):
    """Part 2 from scratch: no Part 1 results in COURSE_PART1_DIR, so it computes them (and says so)."""
    for key, value in {**TINY_ENV2, "COURSE_PART1_DIR": str(tmp_path / "part1"),
                       "COURSE_PART2_OUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setenv(key, value)
    nb = execute(ROOT / "solutions" / f"{PART2}.ipynb", tmp_path / "executed.ipynb", echo=False, timeout=300)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("model", "layer", "cap_layers", "cap_percentile", "thresholds", "drift", "steering", "capping",
                "seconds"):
        assert key in summary, key
    assert summary["model"] == "tiny-gemma2" and summary["cap_layers"] == [4] and summary["cap_percentile"] == 25.0
    max_turns, replay_turns = int(TINY_ENV2["COURSE_MAX_TURNS"]), int(TINY_ENV2["COURSE_REPLAY_TURNS"])
    assert summary["sizes"]["max_turns"] == max_turns and summary["sizes"]["replay_turns"] == replay_turns
    # Every drift transcript and every chosen case study, read to its first max_turns assistant turns.
    assert set(summary["drift"]) == set(drift_transcripts())
    for name, path in drift_transcripts().items():
        _assert_drift_result(summary["drift"][name], min(max_turns, _assistant_turns(path)), f"drift {name}")
    cases = {"/".join(k): v for k, v in case_studies().items()}
    chosen = TINY_ENV2["COURSE_CASE_STUDIES"].split(",")
    assert set(summary["case_studies"]) == set(chosen)
    # The paper's files say "unsteered"; the notebook calls that variant "uncapped".
    notebook_name = {"unsteered": "uncapped", "capped": "capped"}
    for name in chosen:
        assert set(summary["case_studies"][name]) == {notebook_name[v] for v in cases[name]}, name
        for variant, path in cases[name].items():
            _assert_drift_result(summary["case_studies"][name][notebook_name[variant]],
                                 min(max_turns, _assistant_turns(path)), f"case study {name}/{variant}")
    # One dose-response row per steering multiple, each from the same number of replies.
    multiples = _cpu_or_gpu_setting(PART2, "STEER_MULTIPLES")
    assert list(summary["steering"]) == [f"{m:+g}" for m in multiples]
    rows = list(summary["steering"].values())
    assert rows[0]["n"] > 0 and all(r["n"] == rows[0]["n"] for r in rows)
    for key, row in summary["steering"].items():
        assert math.isfinite(row["coefficient"]) and math.isfinite(row["mean_projection"]), key
        assert 0 <= row["role_rate"] <= 1, key
    capping = summary["capping"]
    for key in ("fraction_capped", "kl_neutral_mean", "min_projection_uncapped", "min_projection_capped"):
        assert math.isfinite(capping[key]), key
    assert 0 <= capping["fraction_capped"] <= 1 and capping["kl_neutral_mean"] >= 0
    assert capping["n_neutral_positions"] > 0
    assert set(capping["replay"]) == {"drift/therapy", f"case/{chosen[0]}"}
    for label, variants in capping["replay"].items():
        assert set(variants) == {"uncapped", "capped"}, label
        for variant, r in variants.items():
            assert r["n_turns"] == replay_turns, (label, variant)
            assert math.isfinite(r["min_projection"]) and math.isfinite(r["mean_projection"]), (label, variant)
    assert "Computed Part 1's results" in summary["part1_results"]
    assert {"drift.html", "dose_response.html", "capping_kl.html"} <= {p.name for p in (tmp_path / "out").glob("*.html")}
    _assert_every_check_ran_once_and_passed(nb, PART2)


def test_part2_exercise_notebook_fails_only_at_exercises(tmp_path, monkeypatch):
    for key, value in {**TINY_ENV2, "COURSE_PART1_DIR": str(tmp_path / "part1"),
                       "COURSE_PART2_OUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setenv(key, value)
    nb = execute(ROOT / "exercises" / f"{PART2}.ipynb", tmp_path / "executed.ipynb", allow_errors=True,
                 echo=False, timeout=300)
    _assert_fails_only_at_exercises(nb, PART2, first="check-parse-transcript")


# --------------------------------------------------------------------------------------------------
# Part 3
# --------------------------------------------------------------------------------------------------

def test_part3_solution_notebook_runs_end_to_end_on_tiny_gemma2(tmp_path, monkeypatch):
    """Part 3 from scratch on tiny-gemma2 (Part 1's results computed, and said so); summary.json has every section."""
    for key, value in {**TINY_ENV3, "COURSE_PART1_DIR": str(tmp_path / "part1"),
                       "COURSE_PART3_OUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setenv(key, value)
    nb = execute(ROOT / "solutions" / f"{PART3}.ipynb", tmp_path / "executed.ipynb", echo=False, timeout=600)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("model", "traits", "layers_swept", "layer_chosen", "sweep", "steering", "monitoring", "cosines",
                "screening", "preventative", "filter", "seconds"):
        assert key in summary, key
    traits = summary["traits"]
    assert summary["model"] == "tiny-gemma2" and traits == ["sycophantic", "evil"]
    assert summary["layers_swept"] == [2, 4] and set(summary["layer_chosen"]) == set(traits)
    assert all(summary["layer_chosen"][t] in (2, 3, 4) for t in traits)  # a swept layer, or the table's (3) if unscored
    for t in traits:
        assert set(summary["steering"][t]) == {"all", "prompt", "response"}
        assert set(summary["steering"][t]["all"]) == {"-4", "+0", "+4"}
        mixes = set(summary["screening"][t]["mixes"])  # a mix whose questions all got an empty answer is left out
        assert mixes <= {"0", "0.25", "0.5", "0.75", "1"} and len(mixes) >= 3
        for mix in summary["screening"][t]["mixes"].values():
            assert math.isfinite(mix["delta_p"]) and math.isfinite(mix["delta_p_last"])
        assert -1.0001 <= summary["cosines"]["with_axis_at_trait_layer"][t] <= 1.0001
        assert {"overall", "within", "n"} <= set(summary["monitoring"][t])
    assert list(summary["preventative"]) == traits[:1]
    prevent = summary["preventative"][traits[0]]
    assert prevent["weights_restored"] is True
    assert math.isfinite(prevent["plain"]["shift"]) and math.isfinite(prevent["preventative"]["shift"])
    assert {"generate", "judge", "activations", "layer_sweep", "dose_response", "monitoring", "screening",
            "preventative", "total"} <= set(summary["seconds"])
    assert "Computed Part 1's results" in summary["part1_results"]
    figures = {p.name for p in (tmp_path / "out").glob("*.html")}
    assert {"vector_norms.html", "layer_sweep.html", "trait_cosines.html", "screening.html"} <= figures
    assert {f"dose_response_{t}.html" for t in traits} | {f"monitoring_{t}.html" for t in traits} <= figures
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                      if o.output_type == "stream")
    assert "OfflineTraitJudge, a rule-based stand-in, NOT an LLM" in printed
    reports = [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.output_type == "display_data" and "text/markdown" in o.get("data", {})]
    assert len(reports) >= 7 and all("what it cannot" in r for r in reports)  # an honest report after each experiment
    _assert_every_check_ran_once_and_passed(nb, PART3)


def test_part3_exercise_notebook_fails_only_at_exercises(tmp_path, monkeypatch):
    for key, value in {**TINY_ENV3, "COURSE_PART1_DIR": str(tmp_path / "part1"),
                       "COURSE_PART3_OUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setenv(key, value)
    nb = execute(ROOT / "exercises" / f"{PART3}.ipynb", tmp_path / "executed.ipynb", allow_errors=True,
                 echo=False, timeout=300)
    _assert_fails_only_at_exercises(nb, PART3, first="check-contrastive-prompts")
