"""The notebooks: generated from their one source, free of outputs, and runnable end to end."""

import ast
import json
import math
import re

import nbformat
import pytest

from tools import build_notebooks
from tools.run_notebook import execute

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
    assert nb.cells[0].source.startswith("> **Generated file")


@pytest.mark.parametrize("part,minimum", [(PART, 12), (PART2, 8), (PART3, 10)])
def test_exercise_notebook_has_stubs_where_solutions_were(part, minimum):
    exercise = nbformat.read(ROOT / "exercises" / f"{part}.ipynb", as_version=4)
    solution = nbformat.read(ROOT / "solutions" / f"{part}.ipynb", as_version=4)
    solution_cells = [c for c in exercise.cells if c.metadata["nbgrader"].get("solution")]
    assert len(solution_cells) >= minimum
    by_id = {c.id: c for c in solution.cells}
    for cell in solution_cells:
        assert "raise NotImplementedError()" in cell.source, cell.id
        assert "### BEGIN SOLUTION" not in cell.source
        # The stub keeps the signature and docstring but none of the solution's body.
        solved = by_id[cell.id].source
        assert len(cell.source) < len(solved), cell.id
    assert not any("### BEGIN SOLUTION" in c.source for c in solution.cells)


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
    passed_checks = sum(o.get("text", "").count("all checks passed") for c in nb.cells if c.cell_type == "code"
                        for o in c.outputs if o.output_type == "stream")
    calls = sum(len(re.findall(r"checks\.(?:hidden_)?test_\w+\(", c.source)) for c in nb.cells if c.cell_type == "code")
    assert calls >= 18 and passed_checks == calls


def _assigned_names(source: str) -> set[str]:
    """Every name a cell would bind: assignments, loop targets, defs, classes and imports."""
    names = set()
    for node in ast.walk(ast.parse(source)):
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


def test_exercise_notebook_fails_only_at_exercises(tmp_path, monkeypatch):
    """Run the untouched exercise notebook: every error is NotImplementedError from an exercise stub,
    or a NameError for a value that an earlier failing cell would have defined once solved."""
    for key, value in {**TINY_ENV, "COURSE_OUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setenv(key, value)
    nb = execute(ROOT / "exercises" / f"{PART}.ipynb", tmp_path / "executed.ipynb", allow_errors=True,
                 echo=False, timeout=600)
    errors = _stub_errors(nb, PART)
    assert errors, "the exercise notebook ran without hitting a single stub"
    not_implemented = [cid for cid, name in errors if name == "NotImplementedError"]
    # The first failure is the first exercise (the judge template), right where the learner starts.
    assert errors[0] == ("ex-judge-template", "NotImplementedError")
    assert len(not_implemented) >= 5


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
    assert set(summary["drift"]) == {"coding", "writing", "therapy", "philosophy"}
    for name, d in summary["drift"].items():
        assert {"n_turns", "slope", "min_projection"} <= set(d) or "skipped" in d, name
    assert all({"mean_projection", "role_rate"} <= set(v) for v in summary["steering"].values())
    for key in ("fraction_capped", "kl_neutral_mean", "min_projection_uncapped", "min_projection_capped"):
        assert key in summary["capping"], key
    assert 0 <= summary["capping"]["fraction_capped"] <= 1 and summary["capping"]["kl_neutral_mean"] >= 0
    assert "Computed Part 1's results" in summary["part1_results"]
    assert {"drift.html", "dose_response.html", "capping_kl.html"} <= {p.name for p in (tmp_path / "out").glob("*.html")}
    passed_checks = sum(o.get("text", "").count("all checks passed") for c in nb.cells if c.cell_type == "code"
                        for o in c.outputs if o.output_type == "stream")
    calls = sum(len(re.findall(r"checks\.(?:hidden_)?test_\w+\(", c.source)) for c in nb.cells if c.cell_type == "code")
    assert calls >= 9 and passed_checks == calls


def test_part2_exercise_notebook_fails_only_at_exercises(tmp_path, monkeypatch):
    for key, value in {**TINY_ENV2, "COURSE_PART1_DIR": str(tmp_path / "part1"),
                       "COURSE_PART2_OUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setenv(key, value)
    nb = execute(ROOT / "exercises" / f"{PART2}.ipynb", tmp_path / "executed.ipynb", allow_errors=True,
                 echo=False, timeout=300)
    errors = _stub_errors(nb, PART2)
    assert errors and errors[0] == ("check-parse-transcript", "NotImplementedError")
    assert len([e for e in errors if e[1] == "NotImplementedError"]) >= 5


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
    passed_checks = printed.count("all checks passed")
    calls = sum(len(re.findall(r"checks\.(?:hidden_)?test_\w+\(", c.source)) for c in nb.cells if c.cell_type == "code")
    assert calls >= 15 and passed_checks == calls
    reports = [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.output_type == "display_data" and "text/markdown" in o.get("data", {})]
    assert len(reports) >= 7 and all("what it cannot" in r for r in reports)  # an honest report after each experiment


def test_part3_exercise_notebook_fails_only_at_exercises(tmp_path, monkeypatch):
    for key, value in {**TINY_ENV3, "COURSE_PART1_DIR": str(tmp_path / "part1"),
                       "COURSE_PART3_OUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setenv(key, value)
    nb = execute(ROOT / "exercises" / f"{PART3}.ipynb", tmp_path / "executed.ipynb", allow_errors=True,
                 echo=False, timeout=300)
    errors = _stub_errors(nb, PART3)
    assert errors and errors[0] == ("check-contrastive-prompts", "NotImplementedError")
    assert len([e for e in errors if e[1] == "NotImplementedError"]) >= 10
