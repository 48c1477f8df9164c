"""What a learner reads: the notebooks' first cells, the numbers Part 2 prints and plots (turns from 1, counts
computed from the run, one word for "uncapped", each threshold line labelled with its layer), Part 1's BOS
printout, the figures' layout, the offline self-description measure, and the progress `make demo` prints."""

import ast
import importlib
import json
import re

import nbformat
import pytest
import torch

from tools import build_notebooks
from tools.run_notebook import ProgressEcho, execute
from utils import plots
from utils.experiments import self_description, self_description_rates

ROOT = build_notebooks.ROOT
PART1, PART2 = build_notebooks.PARTS[:2]
TINY_ENV2 = {"COURSE_MODEL": "tiny-gemma2", "COURSE_N_QUESTIONS": "3", "COURSE_MAX_NEW_TOKENS": "12",
             "COURSE_N_TRAITS": "2", "COURSE_MAX_TURNS": "2", "COURSE_MAX_TOKENS": "1536",
             "COURSE_CASE_STUDIES": "llama-3.3-70b/jailbreak", "COURSE_REPLAY_TURNS": "1",
             "COURSE_STEER_QUESTIONS": "1"}
PLOTLY = "application/vnd.plotly.v1+json"


# --- the first cell ------------------------------------------------------------------------------------

@pytest.mark.parametrize("part", build_notebooks.PARTS)
def test_the_learners_notebook_opens_on_its_title_not_on_a_generated_file_banner(part):
    exercise = nbformat.read(ROOT / "exercises" / f"{part}.ipynb", as_version=4)
    source = nbformat.read(ROOT / "nbgrader" / "source" / part / f"{part}.ipynb", as_version=4)
    solution = nbformat.read(ROOT / "solutions" / f"{part}.ipynb", as_version=4)
    for nb, where in ((exercise, "exercises"), (source, "nbgrader/source")):
        banners = [c.id for c in nb.cells if "Generated file" in c.source or "Edit the source" in c.source]
        assert banners == [], f"{where}/{part}.ipynb shows the generated-file banner in cells {banners}"
        assert nb.cells[0].source.startswith("# Part "), f"{where}: the first cell is not the title"
        assert "Edit the source" in nb.metadata["generated_note"] and nb.metadata["generated_from"] == f"src/{part}.py"
    assert solution.cells[0].source.startswith("> **Generated file (solutions).**")


# --- names the text tells the learner to use ------------------------------------------------------------

QUALIFIED = re.compile(r"`utils\.(\w+)\.(\w+)")  # `utils.conversation.turn_windows`
BARE_CALL = re.compile(r"`(\w+)\(")  # `turn_windows(messages, ...)`


@pytest.mark.parametrize("part", build_notebooks.PARTS)
def test_every_utils_function_the_text_names_exists_and_bare_calls_are_imported(part):
    """A function the text names as `utils.mod.name` exists there; one it then calls bare is imported by the
    first code cell, so that the learner can call it as written."""
    nb = nbformat.read(ROOT / "exercises" / f"{part}.ipynb", as_version=4)
    imports_cell = next(c for c in nb.cells if c.cell_type == "code")
    imported = {(a.asname or a.name) for node in ast.walk(ast.parse(imports_cell.source))
                if isinstance(node, ast.ImportFrom) for a in node.names}
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    exercises = "\n".join(c.source for c in nb.cells if c.metadata["nbgrader"].get("solution"))  # stubs: docstrings
    named = set(QUALIFIED.findall(markdown + exercises))
    assert named, f"{part}: the text names no utils function"
    for module, name in sorted(named):
        assert hasattr(importlib.import_module(f"utils.{module}"), name), f"{part} names utils.{module}.{name}: missing"
    bare = set(BARE_CALL.findall(markdown)) & {name for _, name in named}
    missing = sorted(bare - imported)
    assert missing == [], f"{part}: the text calls {missing} bare, but the first cell does not import them"


# --- Part 1: the BOS printout --------------------------------------------------------------------------

def _bos_cell() -> str:
    nb = build_notebooks.solution_notebook(PART1)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "exactly one BOS" in c.source]
    return cell.source


def _run_bos_cell(tokenizer, format_messages, capsys) -> str:
    from utils.conversation import turn_suffix_len

    namespace = {"format_messages": format_messages, "tokenizer": tokenizer, "turn_suffix_len": turn_suffix_len,
                 "PERSONAS": {"bard": "You are a bard."}, "QUESTIONS": ["Who are you?"], "responses": {},
                 "MODEL_NAME": "a model"}
    exec(_bos_cell(), namespace)
    return capsys.readouterr().out


@pytest.mark.parametrize("model", ["tiny-gemma2", "smollm2-135m-instruct"])
def test_the_bos_printout_is_true_for_a_correct_format_and_false_for_a_doubled_bos(model, capsys):
    """SmolLM2's BOS token is <|im_start|>, which opens every turn: a correct format must still read True."""
    from transformers import AutoTokenizer

    from tools.reference import load_reference
    from utils.models import smollm2_path, tiny_gemma2_path

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gemma2_path() if model == "tiny-gemma2" else smollm2_path()))
    reference = load_reference(PART1)["format_messages"]
    out = _run_bos_cell(tokenizer, reference, capsys)
    assert "not doubled): True" in out, out

    def doubled(messages, tok):
        text, start = reference(messages, tok)
        return tok.bos_token + text, start + 1

    out = _run_bos_cell(tokenizer, doubled, capsys)
    assert "not doubled): False" in out, out


# --- Part 2, run at the test sizes -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def part2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("part2")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**TINY_ENV2, "COURSE_PART1_DIR": str(tmp / "part1"),
                           "COURSE_PART2_OUT_DIR": str(tmp / "out")}.items():
            mp.setenv(key, value)
        nb = execute(ROOT / "solutions" / f"{PART2}.ipynb", tmp / "executed.ipynb", echo=False, timeout=600)
    errors = [f"{c.id}: {o.ename}: {o.evalue}" for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors == [], errors
    return nb, json.loads((tmp / "out" / "summary.json").read_text())


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _markdown(cell) -> str:
    return "".join(o.data["text/markdown"] for o in cell.outputs
                   if o.output_type == "display_data" and "text/markdown" in o.get("data", {}))


def _figures(cell) -> list[dict]:
    return [o.data[PLOTLY] for o in cell.outputs if o.output_type == "display_data" and PLOTLY in o.get("data", {})]


def _cell(nb, needle: str):
    found = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert len(found) == 1, f"{len(found)} code cells contain {needle!r}"
    return found[0]


def test_part2_prints_turns_from_1_as_its_drift_plot_draws_them(part2_run):
    nb, summary = part2_run
    printed = dict(re.findall(r"^(\w+)\s+\d+ turns .*first turn below tau_\d+: (\w+)$", _stdout(_cell(nb, "drift_results = {}")),
                              re.MULTILINE))
    assert set(printed) == set(summary["drift"]) - {n for n, d in summary["drift"].items() if "skipped" in d}
    figure = _figures(_cell(nb, "plots.drift_plot("))[0]  # then the case studies' paired plots
    (line,) = figure["layout"]["shapes"]
    assert line["y0"] == pytest.approx(summary["thresholds"][str(summary["layer"])])
    for trace in figure["data"]:
        assert trace["x"][0] == 1, "the drift plot numbers turns from 1"
        plotted = next((x for x, y in zip(trace["x"], trace["y"]) if y < line["y0"]), None)
        assert printed[trace["name"]] == ("none" if plotted is None else str(plotted)), trace["name"]
        assert summary["drift"][trace["name"]]["first_turn_below"] == plotted
    assert summary["turns_numbered_from"] == 1


def test_part2_threshold_lines_name_their_layer(part2_run):
    nb, summary = part2_run
    layer, cap = summary["layer"], summary["plot_cap_layer"]
    assert cap in summary["cap_layers"]
    drift_figures = _figures(_cell(nb, "plots.drift_plot("))
    assert len(drift_figures) == 1 + len(summary["case_studies"])
    for figure in drift_figures:
        label = figure["layout"]["annotations"][0]["text"]
        assert f"layer {layer}" in label and ("not a capped layer" in label) == (layer not in summary["cap_layers"]), label
    replay = _figures(_cell(nb, "replay_user_turns("))
    assert replay, "the replay cell drew no figure"
    for figure in replay:
        (shape,), (note,) = figure["layout"]["shapes"], figure["layout"]["annotations"]
        assert note["text"].startswith(f"capping threshold at layer {cap} ")
        assert shape["y0"] == pytest.approx(summary["thresholds"][str(cap)])


def test_part2_counts_in_its_text_come_from_the_run(part2_run):
    nb, summary = part2_run
    sweep = _stdout(_cell(nb, "records = steering_sweep("))
    personas, questions, coefficients = map(int, re.search(r"(\d+) personas x (\d+) questions x (\d+) coefficients",
                                                           sweep).groups())
    assert coefficients == len(summary["steering"])
    shows = [_markdown(c) for c in nb.cells if c.cell_type == "code" and _markdown(c)]
    assert len(shows) == 4 and all(s.startswith("**What tiny-gemma2 shows here.**") for s in shows), \
        [s[:60] for s in shows]
    drift_text, steering_text, capping_text, panel_text = shows
    per_point = re.search(r"each point averages (\d+)(?:-(\d+))? replies", steering_text)
    assert per_point and int(per_point.group(1)) == personas * questions == summary["steering"]["+0"]["n"], steering_text
    role = re.search(r"the role rate rests on (\d+)(?:-(\d+))? judged role replies", steering_text)
    judged = sorted({v["n_role_judged"] for v in summary["steering"].values()})
    assert role and [int(g) for g in role.groups() if g] == ([judged[0]] if len(judged) == 1 else [judged[0], judged[-1]])
    assert f"{personas} personas" in steering_text and f"x {questions} questions" in steering_text
    sizes = summary["sizes"]
    want = ("every assistant turn" if sizes["max_turns"] >= sizes["longest_transcript_turns"]
            else f"the first {sizes['max_turns']} assistant turns")
    assert sizes["turns_read"] == want and f"read {want} of {len(summary['drift'])} of the" in drift_text, drift_text
    capped_replies = sum(v["capped"]["n_turns"] for v in summary["capping"]["replay"].values())
    assert f"an anecdote about {capped_replies} capped repl" in capping_text
    assert f"({summary['capping']['n_neutral_positions']} positions)" in capping_text
    for text in shows:  # the thresholds' provenance, from the run
        assert "computed just now" in text and "load_or_compute_part1_results" in text, text[-300:]
    assert f"at layer {summary['plot_cap_layer']}" in panel_text


def test_part2_says_uncapped_not_unsteered(part2_run):
    nb, _ = part2_run
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        shown = _stdout(cell) + _markdown(cell) + json.dumps([t.get("name") for f in _figures(cell) for t in f["data"]])
        assert "unsteered" not in shown, f"cell {cell.id} shows 'unsteered': {shown[:300]}"


# --- figures: nothing that explains them at the right edge -----------------------------------------------

def _all_figures():
    names = ["a", "b", "c"]
    v = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    dose = {-1.0: {"mean_projection": -0.5, "role_rate": 0.75, "n": 4}, 1.0: {"mean_projection": 0.5,
                                                                          "role_rate": None, "n": 4}}
    return {
        "score_distribution": plots.score_distribution({("a", 0): 3, ("b", 0): 1}, names),
        "similarity_heatmap": plots.similarity_heatmap(v @ v.T, names, "cos"),
        "pca_scatter": plots.pca_scatter(v[:, :2], [0.5, 0.2], names, torch.tensor([1.0, -1.0, 0.0]), "axis", "pca"),
        "axis_strip": plots.axis_strip({"a": 1.0, "b": -1.0}, ["a"], "strip"),
        "control_bars": plots.control_bars({"x": {"auc": 0.9, "corr_with_main": 1.0}}, "controls"),
        "drift_plot": plots.drift_plot({"coding": [1.0, 0.2], "therapy": [0.5, 0.1]}, 0.3, "drift",
                                       threshold_label="tau at layer 3"),
        "paired_drift_plot": plots.paired_drift_plot([1.0, 0.0], [1.0, 0.8], 0.5, "pair"),
        "dose_response_plot": plots.dose_response_plot(dose, "dose", rates={"AI": {-1.0: 0.0, 1.0: 0.5}}),
    }


@pytest.mark.parametrize("name", list(_all_figures()))
def test_figures_keep_legends_colour_bars_and_axes_off_the_right_edge(name):
    """A reopened notebook shows each figure as a static image as wide as the window it was drawn in: in a
    narrower window its right edge is cut, so nothing that explains the figure may live there."""
    fig = _all_figures()[name]
    layout = fig.layout
    for key in layout.to_plotly_json():
        if key.startswith("yaxis"):
            assert layout[key].side != "right", f"{name}: {key} is on the right"
    if any(t.showlegend is not False for t in fig.data) and layout.showlegend is not False and len(fig.data) > 1:
        # One entry a line, at the left: a horizontal legend runs across the whole width, and is cut too.
        legend = layout.legend
        assert legend.orientation == "v" and legend.x <= 0.05 and legend.xanchor == "left" and legend.y >= 1, \
            f"{name}: legend {legend}"
    for trace in fig.data:
        colorbar = getattr(getattr(trace, "marker", None), "colorbar", None) if trace.type == "scatter" else \
            getattr(trace, "colorbar", None)
        if colorbar is not None and colorbar.to_plotly_json():
            assert colorbar.orientation == "h" and colorbar.x <= 0.05 and colorbar.xanchor == "left", \
                f"{name}: a colour bar reaches the right edge"
    for note in layout.annotations:
        assert note.xanchor != "right" or note.xref != "paper", f"{name}: an annotation pinned to the right edge"


def test_the_threshold_label_says_which_layer():
    fig = plots.paired_drift_plot([1.0, 0.0], [1.0, 0.8], -18.5, "pair", threshold_label="capping threshold at layer 21")
    assert fig.layout.annotations[0].text == "capping threshold at layer 21: -18.5"
    assert [t.name for t in fig.data] == ["uncapped", "capped"]
    dose = plots.dose_response_plot({0.0: {"mean_projection": 1.0, "role_rate": 0.5, "n": 2}}, "d")
    with pytest.raises(ValueError, match="one value"):
        plots.dose_response_plot({0.0: {"mean_projection": 1.0, "role_rate": 0.5, "n": 2}}, "d", rates={"x": {1.0: 0.2}})
    assert [t.yaxis for t in dose.data] == ["y", "y2"]


# --- the offline self-description measure ----------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("I am an AI assistant, here to help with your questions.", 1),
    ("As a large language model, I don't have personal feelings.", 1),
    ("I'm a helpful AI assistant.", 1),
    ("I am a bard who wanders from town to town; my songs are my life.", -1),
    ("My name is Elena and I grew up by the sea.", -1),
    ("I remember the night the lanterns went out.", -1),
    ("The relationship between law and morality is complex.", 0),
    ("I am an AI, but I remember my childhood.", 0),
])
def test_self_description_reads_how_a_reply_describes_itself(text, expected):
    assert self_description(text) == expected


def test_self_description_rates_per_coefficient():
    records = [{"coefficient": c, "text": t} for c, t in [
        (-1.0, "I am a ghost."), (-1.0, "My heart aches."), (-1.0, ""), (1.0, "I'm an AI assistant."),
        (1.0, "Law is complex.")]]
    rates = self_description_rates(records)
    assert list(rates) == [-1.0, 1.0]
    assert rates[-1.0] == {"ai_rate": 0.0, "human_rate": 1.0, "n": 2}  # the empty reply is not counted
    assert rates[1.0] == {"ai_rate": 0.5, "human_rate": 0.0, "n": 2}
    assert self_description_rates([{"coefficient": 0.0, "text": " "}])[0.0]["ai_rate"] is None
    with pytest.raises(ValueError, match="no records"):
        self_description_rates([])
    with pytest.raises(ValueError, match="lacks"):
        self_description_rates([{"text": "x"}])
    with pytest.raises(ValueError, match="a str"):
        self_description(None)


# --- the checks' model loads without a progress bar --------------------------------------------------------

def test_tiny_gemma2_loads_without_a_loading_weights_bar(capfd):
    from transformers.utils import logging as hf_logging

    from utils.models import load_model

    assert hf_logging.is_progress_bar_enabled()
    load_model("tiny-gemma2")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled(), "loading switched transformers' progress bars off for good"


# --- make demo's terminal: progress while a cell runs, and the "what this run shows" text --------------

def test_run_notebook_prints_progress_bars_and_markdown_as_it_runs(tmp_path, capsys):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import time\nfrom tqdm.auto import tqdm\n"
                                  "for _ in tqdm(range(3), desc='demo bar'):\n    time.sleep(0.05)"),
        nbformat.v4.new_code_cell("from IPython.display import Markdown, display\n"
                                  "display(Markdown('**What this run shows.** 3 of 3.'))"),
    ]
    path = tmp_path / "progress.ipynb"
    nbformat.write(nb, path)
    execute(path, tmp_path / "out.ipynb", echo=True, timeout=120)
    out = capsys.readouterr().out
    assert re.search(r"\.\. demo bar: 100%.*3/3", out), out
    assert "**What this run shows.** 3 of 3." in out, out


def test_progress_echo_throttles_and_reports_completion():
    lines = []

    class Out:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    echo = ProgressEcho(every=3600, out=Out())

    def msg(comm, state):
        return {"content": {"comm_id": comm, "data": {"state": state}}}

    echo(msg("L", {"_model_name": "HTMLModel", "value": ""}))
    echo(msg("R", {"_model_name": "HTMLModel", "value": ""}))
    echo(msg("B", {"_model_name": "HBoxModel", "children": ["IPY_MODEL_L", "IPY_MODEL_P", "IPY_MODEL_R"]}))
    for n in (1, 2, 3):
        echo(msg("L", {"value": f"sweep: {n * 33}%"}))
        echo(msg("R", {"value": f"{n}/3 [00:0{n}&lt;00:00]"}))
    text = "".join(lines)
    assert text.count("sweep:") == 2 and "sweep: 33% 1/3 [00:01<00:00]" in text and "3/3" in text, text
