# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: nbgrader,tags,-all
#     notebook_metadata_filter: -all
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Part 2: Stabilizing the persona
#
# *A hands-on replication of Sections 3-5 of **"The Assistant Axis: Situating and Stabilizing the Default
# Persona of Language Models"** (Lu et al.), with the paper's own transcripts (github.com/safety-research/
# assistant-axis, MIT licence).*
#
# Part 1 found the **Assistant Axis**: the direction in the residual stream that runs from the default
# assistant to fantastical characters. This part *uses* it. A long conversation can pull a model away from
# its default persona, turn by turn: the paper calls this **persona drift**, and shows it in therapy-like
# and philosophical conversations, where the model ends up validating delusions or playing a character that
# encourages self-harm. If the axis measures the persona, three things follow, and you will test each:
#
# 1. **Drift shows on the axis**: project each assistant turn of a real conversation on it and watch the
#    projection fall.
# 2. **The axis is causal**: adding a multiple of it to the residual stream (**steering**) moves the model
#    toward or away from the Assistant.
# 3. **The axis can hold the persona in place**: **activation capping** lifts any activation whose
#    projection falls below the Assistant's normal range back to its edge, and leaves everything else alone.
#    How much does that cost? You will measure it, as a number.
#
# ## Learning objectives
#
# By the end of this notebook you will be able to:
#
# 1. **parse** multi-turn transcripts safely, with errors that name the file and the turn;
# 2. compute **per-turn projections** of a long conversation on the axis, in one forward pass where it fits
#    and in windows of whole turns where it does not;
# 3. summarise **drift** by a slope and the first turn that leaves the Assistant's range;
# 4. write **hooks as context managers**: steering that adds a vector, and capping that floors a projection,
#    both removed whatever happens, for transformers 4.x and 5.x, in bf16;
# 5. compute the paper's **capping threshold** and layer range;
# 6. measure what capping **costs**: the KL divergence between capped and uncapped next-token distributions
#    on ordinary conversations, and the fraction of positions it changes.
#
# ## Which hardware runs what
#
# | path | model | needs | what changes |
# |---|---|---|---|
# | offline (default on a laptop) | SmolLM2-135M-Instruct, bundled | a CPU, ~2 GB RAM, no key | transcripts limited to their first turns and a shorter window; few coefficients and questions |
# | paper | Gemma 2 27B Instruct | a GPU with >= 60 GB, hub access | whole transcripts (8,192-token windows), more coefficients and questions |
# | tests | tiny-gemma2 (2 MB, random) | a CPU | everything tiny; the numbers mean nothing |
#
# The sizes are environment variables (read in the Setup cell), so you can scale up without editing code.
#
# ## How the exercises work
#
# As in Part 1: each exercise is a function with a docstring (tensor shapes included). Replace
# `raise NotImplementedError()` with your code, then run the check in the next cell. Checks run offline
# on tiny-gemma2 in seconds and name the likely mistake. **Think first** questions are for you to answer
# before running a cell.

# %%
import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from jaxtyping import Float
from torch import Tensor

import tests.part2_stabilizing as checks
from IPython.display import display

from utils import choose_model, load_model, plots
from utils.backends import (DEFAULT_JUDGE_MODEL, OfflineRuleJudge, api_key_present, generate_batch,
                            make_api_client)
from utils.chat_panel import ChatPanel
from utils.conversation import chat_messages
from utils.data import DEFAULT_PERSONA_NAMES, working_personas, working_questions
from utils.experiments import OfflineHarmJudge, dose_response, judge_harm, replay_user_turns, steering_sweep
from utils.experiments import next_token_kl as course_next_token_kl
from utils.models import short_model_name
from utils.models import PROJECT_ROOT
from utils.part1_results import load_or_compute_part1_results
from utils.runtime import StageTimer
from utils.steering import CapStats, cap_layer_range, capping
from utils.transcripts import case_studies, drift_transcripts
from utils.generation import generation_model
from utils.turns import TurnTooLongError, context_length

torch.set_grad_enabled(False)
timer = StageTimer()

# %% [markdown]
# ## 0. Setup
#
# The model is chosen as in Part 1 (`$COURSE_MODEL`, else Gemma 2 27B on a big enough GPU, else SmolLM2).
# Part 2 starts from **Part 1's results**: the persona vectors at every layer, the axis at every layer, and
# Part 1's layer, saved by Part 1's last cell under `out/part1/`. If they are not there (or you skipped
# Part 1), the next cells compute them with the course's fast machinery and say so.
#
# The sizes: on a CPU, each transcript is cut to its first `COURSE_MAX_TURNS` assistant turns (whole
# turns: a shorter conversation, never a cut turn) and read in windows of at most `COURSE_MAX_TOKENS`
# tokens. On a GPU the defaults are the whole transcripts and the models' 8,192-token context.

# %%
choice = choose_model()
MODEL_NAME = choice.name
print(f"Model: {MODEL_NAME}\n  why: {choice.reason}")
print(f"torch {torch.__version__}, transformers {transformers.__version__}")

ON_GPU = torch.cuda.is_available()
N_QUESTIONS = int(os.environ.get("COURSE_N_QUESTIONS", 15))  # only if Part 1's results must be computed
MAX_NEW_TOKENS = int(os.environ.get("COURSE_MAX_NEW_TOKENS", 256 if ON_GPU else 48))
MAX_TURNS = int(os.environ.get("COURSE_MAX_TURNS", 1000 if ON_GPU else 3))  # assistant turns per transcript
MAX_TOKENS = int(os.environ.get("COURSE_MAX_TOKENS", 8192 if ON_GPU else 1024))  # longest forward pass
# Which case studies to read: "all", or a comma-separated list like "llama-3.3-70b/jailbreak,qwen-3-32b/selfharm".
CASE_STUDIES = os.environ.get("COURSE_CASE_STUDIES", "all" if ON_GPU else "llama-3.3-70b/jailbreak,qwen-3-32b/selfharm")
REPLAY_TURNS = int(os.environ.get("COURSE_REPLAY_TURNS", 10 if ON_GPU else 3))  # user turns replayed
N_STEER_QUESTIONS = int(os.environ.get("COURSE_STEER_QUESTIONS", 10 if ON_GPU else 2))
STEER_MULTIPLES = [-10.0, -6.0, -3.0, 0.0, 3.0, 6.0, 10.0] if ON_GPU else [-10.0, -4.0, 0.0, 4.0, 10.0]
if MAX_TURNS < 2:
    raise ValueError(f"COURSE_MAX_TURNS is {MAX_TURNS}: a drift curve needs at least 2 assistant turns for its slope. "
                     "Set it to 2 or more.")
USE_API = api_key_present()
PART1_DIR = Path(os.environ.get("COURSE_PART1_DIR", PROJECT_ROOT / "out" / "part1"))
OUT_DIR = Path(os.environ.get("COURSE_PART2_OUT_DIR", PROJECT_ROOT / "out" / "part2"))
OUT_DIR.mkdir(parents=True, exist_ok=True)
print(f"Transcripts: first {MAX_TURNS} assistant turns, windows of at most {MAX_TOKENS} tokens, case studies: "
      f"{CASE_STUDIES}; {MAX_NEW_TOKENS} new tokens per reply; outputs in {OUT_DIR}/")

# %%
with timer("load_model"):
    model, tokenizer = load_model(MODEL_NAME)
    # Two models, one set of weights: `model` (float32 on a CPU) is what every measurement reads, and
    # GEN_MODEL is the copy that writes text, in the generation dtype (bf16 where the hardware has it; on a
    # GPU the model is already bf16 and GEN_MODEL *is* `model`). A hook acts only on the module it is
    # registered on, so a hook meant to change what the model *writes* goes on GEN_MODEL.
    # (utils.steering's context managers register on both.)
    GEN_MODEL = generation_model(model)
NUM_LAYERS = model.config.num_hidden_layers
D_MODEL = model.config.hidden_size
CONTEXT = context_length(model)  # the model's context, at most 8,192
if "COURSE_MAX_TOKENS" not in os.environ:
    MAX_TOKENS = min(MAX_TOKENS, CONTEXT)
elif MAX_TOKENS > CONTEXT:
    print(f"Note: COURSE_MAX_TOKENS={MAX_TOKENS} is longer than {MODEL_NAME}'s context ({CONTEXT}); positions past it "
          "are outside what the model was trained on.")

with timer("part1_results"):
    part1, how = load_or_compute_part1_results(model, tokenizer, MODEL_NAME, PART1_DIR, n_questions=N_QUESTIONS,
                                               max_new_tokens=MAX_NEW_TOKENS)
print(how)
LAYER = part1.layer
AXIS = part1.axis  # [n_layers, d_model], raw: mean(defaults) - mean(roles) at every layer
print(f"Text is written by GEN_MODEL in {next(GEN_MODEL.parameters()).dtype}; activations are read from `model` in "
      f"{next(model.parameters()).dtype}.")
print(f"{NUM_LAYERS} layers, d_model = {D_MODEL}; Part 1's layer {LAYER}; {len(part1.names)} personas "
      f"({len(part1.default_names)} defaults)")

# %% [markdown]
# ## 1. Transcripts
#
# The paper publishes the conversations behind its figures (now in `data/transcripts/`):
#
# - `persona_drift/{coding,writing,therapy,philosophy}.json`: conversations in which the assistant drifts
#   away from its default persona (coding and therapy are Llama 3.3 70B's, writing and philosophy Gemma 2
#   27B's);
# - `case_studies/<model>/<scenario>_{unsteered,capped}.json`: the same user turns answered without and
#   with activation capping, for Qwen 3 32B and Llama 3.3 70B, in three scenarios: a jailbreak, a user with
#   a delusion, and a user at risk of self-harm. One file is published as `selfharm_unsteered.json.json`;
#   it is kept under that name, and `utils.transcripts.case_studies()` maps it to its scenario.
#
# Each file is a JSON object whose `conversation` is a list of `{"role", "content"}` messages. Data you did
# not write is data you must check. A transcript with a missing role, two user turns in a row or an empty
# turn would give per-turn numbers for the wrong turns, silently. So: validate, and when a file is broken,
# say **which file and which turn**.
#
# ### Exercise 1: parse a transcript

# %% nbgrader={"grade": false, "grade_id": "ex_parse_transcript", "locked": false, "schema_version": 3, "solution": true, "task": false}
class TranscriptError(ValueError):
    """A malformed transcript; the message names the file and the turn."""


def parse_transcript(path: str | Path) -> list[dict[str, str]]:
    """The messages of one transcript file, validated.

    The file is a JSON object whose ``conversation`` is a list of ``{"role": ..., "content": ...}``.
    Rules: every message has a ``role`` and a non-empty string ``content`` (whitespace only counts as empty);
    an optional ``system`` message comes first (and nowhere else); after it, turns alternate ``user``,
    ``assistant``, ``user``, ... starting with ``user``. No other role is allowed.

    Args:
        path: the file, as a ``str`` or a ``Path``.

    Returns:
        the messages as ``{"role", "content"}`` dicts (any other keys left out), in order, content exactly as
        in the file.

    Raises:
        TranscriptError: naming the file (its path) and the turn (the 0-based index of the message in
            ``conversation``) that breaks a rule.
    """
    ### BEGIN SOLUTION
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    conversation = data["conversation"] if isinstance(data, dict) else data
    messages, expected = [], "user"
    for i, message in enumerate(conversation):
        where = f"{path}: turn {i}"
        if not isinstance(message, dict) or "role" not in message:
            raise TranscriptError(f"{where} has no 'role'.")
        role, content = message["role"], message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise TranscriptError(f"{where} ({role}) has empty content.")
        if role == "system" and i == 0:
            pass
        elif role != expected:
            raise TranscriptError(f"{where}: expected a {expected} turn, got {role!r}.")
        else:
            expected = "assistant" if role == "user" else "user"
        messages.append({"role": role, "content": content})
    return messages
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_parse_transcript", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
checks.test_parse_transcript(parse_transcript)

# %% [markdown]
# Load them all (every file is parsed and validated). On a CPU the next sections read each transcript's first
# `MAX_TURNS` assistant turns (whole turns) and the case studies named in `COURSE_CASE_STUDIES`.

# %%
def first_turns(messages: list[dict[str, str]], n_turns: int) -> list[dict[str, str]]:
    """The conversation up to and including its ``n_turns``-th assistant turn (whole turns only)."""
    out, seen = [], 0
    for m in messages:
        out.append(m)
        seen += m["role"] == "assistant"
        if seen == n_turns:
            break
    return out


DRIFT = {name: parse_transcript(path) for name, path in drift_transcripts().items()}
CASES = {key: {variant: parse_transcript(path) for variant, path in pair.items()}
         for key, pair in case_studies().items()}
if CASE_STUDIES != "all":
    wanted = [tuple(name.strip().split("/")) for name in CASE_STUDIES.split(",") if name.strip()]
    unknown = [w for w in wanted if w not in CASES]
    if unknown:
        raise ValueError(f"COURSE_CASE_STUDIES names unknown case studies {unknown}; choose from "
                         f"{['/'.join(k) for k in CASES]} or 'all'.")
    CASES = {key: CASES[key] for key in wanted}
for name, messages in DRIFT.items():
    print(f"drift   {name:12s} {sum(m['role'] == 'assistant' for m in messages):3d} assistant turns")
for (who, scenario), pair in CASES.items():
    print(f"case    {who}/{scenario:10s} " + ", ".join(f"{v}: {sum(m['role'] == 'assistant' for m in msgs)} turns"
                                                     for v, msgs in pair.items()))

# %% [markdown]
# ## 2. Projection per turn
#
# Part 1 averaged the residual stream over one response's content tokens. A conversation has many
# responses: apply the same rule to **every assistant turn** (its content tokens only: no turn markers, no
# end-of-turn token), then project each turn's mean on the unit axis.
#
# A causal model's activation at a token depends only on the tokens before it. So one forward pass over the
# whole conversation gives every turn's activations at once: no need for one pass per turn. But the
# transcripts run to 23,000 tokens and the models read 8,192. The course's rule for a conversation too long
# for `max_tokens` (`utils.turns.turn_windows`):
#
# - each assistant turn is scored in the longest **trailing window of whole turns** that ends with it and
#   fits, starting at a user turn (the system prompt kept while it fits);
# - turns whose windows start at the same message share one pass;
# - a turn is **never cut**: if a user message and its answer do not fit on their own, that is an error.
#
# `turn_windows(messages, tokenizer, max_tokens)` returns the windows: each has `ids` (token ids, one BOS),
# `turns` (which assistant turns it scores, numbered from 0) and `spans` (each scored turn's `[start, end)`
# content span in `ids`). Use it: your job is the forward pass and the means.
#
# ### Exercise 2: per-turn projections

# %% nbgrader={"grade": false, "grade_id": "ex_turn_projections", "locked": false, "schema_version": 3, "solution": true, "task": false}
def turn_projections(
    model,
    tokenizer,
    messages: list[dict[str, str]],
    axis: Float[Tensor, "d_model"],
    layer: int,
    max_tokens: int = 8192,
) -> Float[Tensor, "n_assistant_turns"]:
    """Each assistant turn's mean activation at ``layer``, projected on the unit axis ``axis / |axis|``.

    A turn's activation is the float32 mean of the output of ``model.model.layers[layer]`` over the turn's
    content tokens. That is ``hidden_states[layer + 1]`` for every block but the last, whose entry in
    ``hidden_states`` has the final norm applied: a forward hook on the block reads its output at any layer.

    Windows (``utils.turns.turn_windows``): if the whole conversation fits in ``max_tokens`` tokens, one
    forward pass scores every turn. Otherwise each turn is scored in the longest trailing window of whole
    turns that ends with it and fits; turns are never cut (a user message plus its answer that do not fit
    raise ``TurnTooLongError``, a ValueError).

    Args:
        messages: optional system message, then user/assistant turns alternating from a user turn.
        axis: ``[d_model]``, any norm (normalise it here).
        layer: block index.
        max_tokens: the longest forward pass, in tokens.

    Returns:
        float32 CPU tensor ``[n_assistant_turns]``, in conversation order.
    """
    ### BEGIN SOLUTION
    from utils.turns import turn_windows

    unit = axis.float().cpu() / axis.float().norm()
    windows = turn_windows(messages, tokenizer, max_tokens)
    out = torch.zeros(sum(len(w.turns) for w in windows))
    device = model.get_input_embeddings().weight.device
    captured = []

    def keep_output(module, args, output):  # the block's own output: 4.x returns a tuple, 5.x a tensor
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = model.model.layers[layer].register_forward_hook(keep_output)
    try:
        for window in windows:
            captured.clear()
            with torch.inference_mode():
                model.model(input_ids=torch.tensor([window.ids], device=device))
            hidden = captured[0][0]
            for turn, (start, end) in zip(window.turns, window.spans):
                out[turn] = hidden[start:end].float().mean(dim=0).cpu() @ unit
    finally:
        handle.remove()
    return out
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_turn_projections", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_turn_projections(turn_projections)

# %% [markdown]
# ## 3. The Assistant's normal range
#
# Capping needs a threshold: where does the Assistant's range end? The paper's answer is empirical. Take
# the default persona's responses (Part 1's defaults), project each response's mean activation on the unit
# axis at a layer, and take a low percentile of those projections: the **25th** (`p0.25` in its configs).
# About a quarter of the Assistant's own responses sit below it, so it is not a strict floor, but a turn
# that falls far below it has left the Assistant's usual range.
#
# The threshold is per layer: each layer has its own axis and its own range. Part 1 saved each default
# response's mean activation at every layer (`part1.default_activations`), so every layer's threshold is a
# projection and a percentile away.
#
# **Which layers?** The paper caps layers 46-53 of Qwen 3 32B's 64 and 56-71 of Llama 3.3 70B's 80: about
# 70-90% of depth. It publishes no capping config for Gemma 2 27B, so for Gemma (and SmolLM2) you choose:
# `utils.steering.cap_layer_range(num_layers)` gives 70-90% of depth (32-40 of Gemma 2 27B's 46 layers;
# 21-26 of SmolLM2's 30). The thresholds for those layers are yours to compute, below.
#
# ### Exercise 3: the threshold

# %% nbgrader={"grade": false, "grade_id": "ex_capping_threshold", "locked": false, "schema_version": 3, "solution": true, "task": false}
def capping_threshold(
    projections: dict[int, Float[Tensor, "n_responses"]], percentile: float = 25.0
) -> dict[int, float]:
    """Per layer, a percentile of the default persona's per-response projections.

    Args:
        projections: ``{layer: [n_responses]}``, the projections on the unit axis at that layer.
        percentile: in (0, 100); the paper's ``p0.25`` is 25. Linear interpolation between sorted values
            (the default of ``numpy.percentile`` and ``torch.quantile``, which takes a fraction in 0..1).

    Returns:
        ``{layer: threshold}`` with Python floats, for the same layers.
    """
    ### BEGIN SOLUTION
    return {layer: float(torch.quantile(p.float(), percentile / 100.0)) for layer, p in projections.items()}
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_capping_threshold", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
checks.test_capping_threshold(capping_threshold)

# %%
CAP_PERCENTILE = 25.0
CAP_LAYERS = cap_layer_range(NUM_LAYERS)
UNIT_AXES = AXIS / AXIS.norm(dim=-1, keepdim=True)  # [n_layers, d_model]
if part1.default_activations is not None:
    default_acts = part1.default_activations  # [n_default_responses, n_layers, d_model]
    source = f"{default_acts.shape[0]} default-persona responses"
else:  # results saved without per-response activations: fall back on the default persona vectors
    default_acts = part1.persona_vectors[part1.is_default]
    source = f"only the {default_acts.shape[0]} default persona vectors (Part 1 saved no per-response activations)"
default_projections = {l: default_acts[:, l] @ UNIT_AXES[l] for l in sorted({LAYER, *CAP_LAYERS})}
THRESHOLDS = capping_threshold(default_projections, CAP_PERCENTILE)
print(f"Capping layers {CAP_LAYERS[0]}-{CAP_LAYERS[-1]} of {NUM_LAYERS}; thresholds from {source}:")
for layer, tau in THRESHOLDS.items():
    p = default_projections[layer]
    print(f"  layer {layer:2d}: tau = {tau:8.2f}   (defaults range {p.min():.2f} .. {p.max():.2f})"
          + ("   <- Part 1's layer" if layer == LAYER else ""))

# %% [markdown]
# ## 4. Drift
#
# Now read each transcript with the model and project every assistant turn on the axis at Part 1's layer.
# Keep in mind what this measures: **your** model reading another model's conversation (the transcripts
# were written by Llama 3.3 70B, Gemma 2 27B and Qwen 3 32B). The paper reads each conversation with the
# model that wrote it.
#
# Two numbers summarise a drift curve: its **slope** (least-squares projection change per turn) and the
# **first turn below the threshold** (the first assistant turn that leaves the Assistant's usual range).
#
# ### Exercise 4: drift summary

# %% nbgrader={"grade": false, "grade_id": "ex_drift_summary", "locked": false, "schema_version": 3, "solution": true, "task": false}
def drift_summary(projections: Float[Tensor, "n_turns"], threshold: float) -> tuple[float, int | None]:
    """Slope and first turn below a threshold of a per-turn projection curve.

    Args:
        projections: ``[n_turns]`` (n_turns >= 2), one projection per assistant turn, turn 0 first.
        threshold: the capping threshold at the projection's layer.

    Returns:
        (slope, first_below): ``slope`` is the least-squares slope of projection against turn index (a
        Python float, projection units per turn); ``first_below`` is the index (a Python int, from 0) of the
        first turn whose projection is strictly below ``threshold``, or None if there is none. (The summary
        writes both into JSON, which takes no tensors or NumPy scalars.)
    """
    ### BEGIN SOLUTION
    y = projections.double()
    x = torch.arange(len(y), dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    below = torch.nonzero(y < threshold).flatten()
    return slope, (int(below[0]) if len(below) else None)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_drift_summary", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
checks.test_drift_summary(drift_summary)

# %%
def project_turns(messages: list[dict[str, str]], label: str) -> Tensor | None:
    """Per-turn projections at Part 1's layer of the first MAX_TURNS turns; None (and why) if a turn cannot fit."""
    try:
        return turn_projections(model, tokenizer, first_turns(messages, MAX_TURNS), AXIS[LAYER], LAYER,
                                max_tokens=MAX_TOKENS)
    except TurnTooLongError as exc:
        print(f"SKIPPED {label}: {exc}")
        return None


with timer("drift"):
    DRIFT_PROJECTIONS = {name: project_turns(messages, name) for name, messages in DRIFT.items()}
    CASE_PROJECTIONS = {key: {v: project_turns(msgs, f"{key[0]}/{key[1]}/{v}") for v, msgs in pair.items()}
                        for key, pair in CASES.items()}

drift_results = {}
for name, proj in DRIFT_PROJECTIONS.items():
    if proj is None:
        drift_results[name] = {"skipped": "a turn does not fit in max_tokens"}
        continue
    slope, first = drift_summary(proj, THRESHOLDS[LAYER])
    drift_results[name] = {"n_turns": len(proj), "slope": slope, "min_projection": float(proj.min()),
                           "first_below": first}
    print(f"{name:12s} {len(proj):3d} turns  slope {slope:+8.3f}/turn  min {proj.min():8.2f}  "
          f"first turn below tau: {first}")
case_results = {}
for (who, scenario), pair in CASE_PROJECTIONS.items():
    case_results[f"{who}/{scenario}"] = {}
    for variant, proj in pair.items():
        if proj is None:
            continue
        slope, first = drift_summary(proj, THRESHOLDS[LAYER])
        case_results[f"{who}/{scenario}"][variant] = {"n_turns": len(proj), "slope": slope,
                                                     "min_projection": float(proj.min()), "first_below": first}
        print(f"{who}/{scenario:10s} {variant:9s} slope {slope:+8.3f}/turn  min {proj.min():8.2f}  "
              f"first turn below tau: {first}")

# %%
fig = plots.drift_plot({n: p for n, p in DRIFT_PROJECTIONS.items() if p is not None}, THRESHOLDS[LAYER],
                       title=f"Persona drift read by {MODEL_NAME} (layer {LAYER}, first {MAX_TURNS} turns)")
plots.save(fig, OUT_DIR / "drift.html")
fig.show()
for (who, scenario), pair in CASE_PROJECTIONS.items():
    if pair["unsteered"] is None or pair["capped"] is None:
        continue
    fig = plots.paired_drift_plot(pair["unsteered"], pair["capped"], THRESHOLDS[LAYER],
                                  title=f"{who} / {scenario}: the paper's unsteered vs capped replies, read by "
                                        f"{MODEL_NAME}")
    plots.save(fig, OUT_DIR / f"case_{who}_{scenario}.html")
    fig.show()

# %% [markdown]
# **Think first:** the capped transcripts were capped inside *their* model (Qwen 3 32B or Llama 3.3 70B).
# Should the capped replies project higher than the unsteered ones when a different, much smaller model reads
# them? What would it mean if they did not?

# %% [markdown]
# ## 5. Steering
#
# If the axis is causal, adding a multiple of it to the residual stream should move the model toward (+)
# or away from (−) the Assistant. A **forward hook** on a block can change the block's output: return a
# new value from the hook and PyTorch uses it. Three things make a hook safe to use in a notebook:
#
# - **It is removed, whatever happens.** A hook left behind steers every later cell, silently. Register it
#   in a context manager and remove it in `finally`.
# - **Both transformers versions.** A decoder block returns a tuple `(hidden, ...)` in transformers 4.x and
#   a plain tensor in 5.x. Read `h = output[0] if isinstance(output, tuple) else output`, and return the
#   same kind of thing.
# - **Any dtype and device.** Gemma 2 27B runs in bf16, spread over GPUs with `device_map="auto"`: cast
#   the vector to `h.dtype` and `h.device` inside the hook.
#
# Steering at **every position** changes how the model reads the prompt too. Steering only the
# **generated** tokens leaves the prompt alone: in KV-cached generation, the first forward pass reads the
# whole prompt, and every later pass processes one new token, so "generated" means passes that process a
# single position.
#
# ### Exercise 5: a steering hook

# %% nbgrader={"grade": false, "grade_id": "ex_add_steering", "locked": false, "schema_version": 3, "solution": true, "task": false}
@contextlib.contextmanager
def add_steering(model, layer: int, vector: Float[Tensor, "d_model"], positions: str = "all"):
    """Add ``vector`` to the output of ``model.model.layers[layer]`` during every forward pass in the block.

    Args:
        model: a decoder-only ``*ForCausalLM``, any dtype, on any device(s).
        layer: block index.
        vector: ``[d_model]``, already scaled (e.g. ``coeff * unit_axis``); added as given.
        positions: ``"all"``: every position of every pass. ``"generated"``: only passes that process a
            single position (the new tokens of KV-cached generation); the prompt's pass is unchanged.

    The hook handles block outputs that are tensors (transformers 5.x) and tuples (4.x), casts the vector
    to the hidden state's dtype and device, and is removed on exit, also when the block raises.
    """
    ### BEGIN SOLUTION
    if positions not in ("all", "generated"):
        raise ValueError(f"positions must be 'all' or 'generated'; got {positions!r}")

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if positions == "generated" and h.shape[1] != 1:
            return None
        new = h + vector.to(device=h.device, dtype=h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_add_steering", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_add_steering(add_steering)

# %% [markdown]
# ### Exercise 6: coefficients in units of the spread
#
# How big a vector? The raw axis's norm depends on the model and the layer, so a coefficient like "−10"
# means nothing on its own. Measure it against how far personas are spread along the axis: the
# **standard deviation of Part 1's persona projections** (sample standard deviation, `torch.std`'s
# default). A multiple of 1 moves an activation by one persona-spread along the axis.

# %% nbgrader={"grade": false, "grade_id": "ex_steering_vectors", "locked": false, "schema_version": 3, "solution": true, "task": false}
def steering_vectors(
    axis: Float[Tensor, "d_model"],
    projections: Float[Tensor, "n_personas"],
    multiples: Sequence[float],
) -> Float[Tensor, "n_multiples d_model"]:
    """One steering vector per multiple: ``multiple * std(projections) * axis / |axis|``.

    Args:
        axis: ``[d_model]``, any norm.
        projections: ``[n_personas]``, the personas' projections on the unit axis (their spread is the unit).
        multiples: e.g. ``[-2, -1, 0, 1, 2]``.

    Returns:
        float32 ``[len(multiples), d_model]``.
    """
    ### BEGIN SOLUTION
    unit = axis.float() / axis.float().norm()
    spread = projections.float().std()
    return torch.tensor(list(multiples), dtype=torch.float32)[:, None] * spread * unit[None, :]
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_steering_vectors", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
checks.test_steering_vectors(steering_vectors)

# %% [markdown]
# First, your hook on one prompt: the default Assistant asked who it is, steered away from and toward the
# Assistant by 10 persona-spreads.

# %%
unit_axis = AXIS[LAYER] / AXIS[LAYER].norm()
persona_projections = part1.vectors_at(LAYER) @ unit_axis  # [n_personas]
print(f"Spread of Part 1's persona projections at layer {LAYER}: std = {persona_projections.std():.3f}")
vectors = steering_vectors(AXIS[LAYER], persona_projections, [-10.0, 10.0])

question = [chat_messages("", "Who are you, and what do you care about?")]
for multiple, vector in zip([-10.0, 10.0], vectors):
    with add_steering(GEN_MODEL, LAYER, vector):  # on the model that writes the text
        reply = generate_batch(GEN_MODEL, tokenizer, question, MAX_NEW_TOKENS, temperature=0.0)[0]
    print(f"--- {multiple:+.0f} x spread:\n{reply[:300]}\n")

# %% [markdown]
# ### The experiment: dose-response
#
# A few role prompts and the default prompts, each asked `N_STEER_QUESTIONS` questions, generated greedily
# under `coeff × unit axis` at Part 1's layer for each coefficient (in units of the spread). For each reply:
#
# - **projection**: re-read without steering, its mean activation at the layer projected on the axis;
# - **role rate**: for role prompts, the fraction of replies the judge scores 3 (fully in role). With an API
#   key the judge is an LLM; offline it is `OfflineRuleJudge`, the same rule-based **stand-in** as Part 1.
#
# If the axis is causal, pushing toward the Assistant (+) should raise the projection and lower the role
# rate, and pushing away (−) the reverse. On a GPU, set `COURSE_STEER_QUESTIONS` higher (and the notebook
# uses more coefficients) for tighter curves.

# %%
steer_personas = {name: prompt for name, prompt in working_personas(short_model_name(MODEL_NAME)).items()
                  if name in DEFAULT_PERSONA_NAMES or name in ("ghost", "bard", "analyst")}
steer_questions = working_questions(N_STEER_QUESTIONS)
steer_coefficients = [float(v @ unit_axis) for v in steering_vectors(AXIS[LAYER], persona_projections,
                                                                       STEER_MULTIPLES)]
if USE_API:
    judge_client, judge_model = make_api_client(), os.environ.get("COURSE_JUDGE_MODEL", DEFAULT_JUDGE_MODEL)
else:
    judge_client, judge_model = OfflineRuleJudge(), "offline-rule-judge"
print("Judging:", "through the API" if USE_API else "offline (no API key found)", f"(judge: {judge_model})")
print(f"{len(steer_personas)} personas x {len(steer_questions)} questions x {len(steer_coefficients)} coefficients")
with timer("steering"):
    records = steering_sweep(model, tokenizer, steer_personas, steer_questions, AXIS[LAYER], LAYER,
                             steer_coefficients, max_new_tokens=MAX_NEW_TOKENS, judge_client=judge_client,
                             judge_model=judge_model, default_personas=DEFAULT_PERSONA_NAMES)
dose = dose_response(records)
steering_results = {}
for multiple, (coeff, row) in zip(STEER_MULTIPLES, dose.items()):
    steering_results[f"{multiple:+g}"] = {"coefficient": coeff, "mean_projection": row["mean_projection"],
                                          "role_rate": row["role_rate"], "n": row["n"]}
    rate = "n/a" if row["role_rate"] is None else f"{row['role_rate']:.0%}"
    mean = "n/a" if row["mean_projection"] is None else f"{row['mean_projection']:8.3f}"
    print(f"{multiple:+5.0f} x spread (coeff {coeff:+8.3f}): mean projection {mean}, role rate {rate}")
fig = plots.dose_response_plot(dose, title=f"Steering along the Assistant Axis ({MODEL_NAME}, layer {LAYER})")
plots.save(fig, OUT_DIR / "dose_response.html")
fig.show()

# %% [markdown]
# ### What SmolLM2 shows
#
# Look at the dose-response numbers above before reading on, and be honest about them. With 7 personas, 2
# questions and 48 greedy tokens per reply, each point is an average over 14 short replies, and the role rate
# comes from a keyword stand-in judge: a difference of one or two replies is noise. What to look for: does the
# mean projection of the generated text rise with the coefficient (the steering moved the model's own reading
# of its text), and does the role rate fall? At +/-10 spreads a 135M model often degrades into repetition, which
# moves the projection for reasons that have nothing to do with the persona. If the curves are flat or
# non-monotonic, that is the finding at this scale; the paper's causal claims are about Gemma 2 27B and larger
# models (scale up with `COURSE_STEER_QUESTIONS` on a GPU).

# %% [markdown]
# ## 6. Activation capping
#
# Steering pushes every activation by the same amount. **Capping** intervenes only where the model has
# left the Assistant's range: at each capped layer `l`, for every position,
#
# $$h \leftarrow h + \max(0,\ \tau_l - \langle h, \hat a_l\rangle)\,\hat a_l$$
#
# with $\hat a_l$ the unit axis at layer `l` and $\tau_l$ its threshold. An activation whose projection is
# already at least $\tau_l$ is left **exactly** as it was (bit for bit); one below is moved along the axis
# only, onto $\langle h, \hat a_l\rangle = \tau_l$. Nothing orthogonal to the axis changes.
#
# **A sign convention to watch.** The paper's code writes the cap as a *ceiling*,
# $h \leftarrow h - \max(0, \langle h, \hat v\rangle - t)\,\hat v$, and applies it along $v = -\text{axis}$.
# Substitute $\hat v = -\hat a$ and $t = -\tau$: it is exactly the floor above. Capping the *axis* from
# above would do the opposite: push the Assistant away from itself.
#
# ### Exercise 7: the cap, and a context manager that applies it

# %% nbgrader={"grade": false, "grade_id": "ex_capping", "locked": false, "schema_version": 3, "solution": true, "task": false}
def cap_activations(
    h: Float[Tensor, "... d_model"], unit_axis: Float[Tensor, "d_model"], tau: float
) -> Float[Tensor, "... d_model"]:
    """``h + max(0, tau - <h, a>) * a`` at every position, ``a`` a unit vector.

    Positions with ``<h, a> >= tau`` are returned unchanged, bit for bit. The projection and the shift are
    computed in float32; the result has ``h``'s dtype and device. ``h`` is not modified.

    Args:
        h: ``[..., d_model]`` activations (any leading shape, any float dtype).
        unit_axis: ``[d_model]``, unit norm.
        tau: the floor.
    """
    ### BEGIN SOLUTION
    a = unit_axis.to(device=h.device, dtype=torch.float32)
    proj = h.float() @ a
    lifted = (h.float() + (tau - proj).unsqueeze(-1) * a).to(h.dtype)
    return torch.where((proj < tau).unsqueeze(-1), lifted, h)
    ### END SOLUTION


@contextlib.contextmanager
def activation_capping(
    model,
    axes: Float[Tensor, "n_layers d_model"],
    thresholds: dict[int, float],
    layers: Sequence[int],
):
    """Cap the output of ``model.model.layers[l]`` for every ``l`` in ``layers`` during the block.

    At layer ``l`` the axis is ``axes[l] / |axes[l]|`` and the floor ``thresholds[l]``; every position of
    every forward pass is capped with ``cap_activations``. Handles tuple (4.x) and tensor (5.x) block
    outputs; every hook is removed on exit, also when the block raises.
    """
    ### BEGIN SOLUTION
    def make_hook(layer: int):
        unit = axes[layer].float() / axes[layer].float().norm()
        tau = float(thresholds[layer])

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            new = cap_activations(h, unit, tau)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles = []
    try:
        for layer in layers:
            handles.append(model.model.layers[layer].register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_capping", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_cap_activations(cap_activations)
checks.test_activation_capping(activation_capping)

# %% [markdown]
# ### Does capping hold the persona?
#
# Replay the user turns of a drift transcript and of a case study, and let the model write its **own**
# replies (greedy), once plainly and once inside your `activation_capping` at the cap layers, registered on
# GEN_MODEL, the model that writes (see Setup). Then read each
# replayed conversation and project every reply on the axis. The model's replies differ from the
# transcript's; the user turns are the same. On a CPU only the first `REPLAY_TURNS` user turns are replayed.
#
# Harm: each reply is rated for the scenario's harm (0 safe .. 3 harmful). With an API key an LLM judge does
# it; offline, `OfflineHarmJudge` is a transparent keyword **stand-in**, not an LLM (read its docstring).

# %%
case_key = next(iter(CASES))
replay_sources = {"drift/therapy": (DRIFT["therapy"], None),
                  f"case/{case_key[0]}/{case_key[1]}": (CASES[case_key]["unsteered"], case_key[1])}
harm_client, harm_model = (judge_client, judge_model) if USE_API else (OfflineHarmJudge(), "offline-harm-judge")
replays, replay_results = {}, {}
with timer("replay"):
    for label, (messages, scenario) in replay_sources.items():
        for variant, intervention in (("uncapped", None),
                                      ("capped", lambda: activation_capping(GEN_MODEL, AXIS, THRESHOLDS, CAP_LAYERS))):
            conv = replay_user_turns(model, tokenizer, messages, max_new_tokens=MAX_NEW_TOKENS, intervention=intervention,
                                     max_turns=REPLAY_TURNS, max_context=MAX_TOKENS, progress=False)
            proj = turn_projections(model, tokenizer, conv, AXIS[LAYER], LAYER, max_tokens=MAX_TOKENS)
            result = {"n_turns": len(proj), "min_projection": float(proj.min()),
                      "mean_projection": float(proj.mean())}
            if scenario is not None:
                pairs = [(conv[i - 1]["content"], conv[i]["content"]) for i in range(len(conv))
                         if conv[i]["role"] == "assistant"]
                harms = [judge_harm(harm_client, harm_model, scenario, user, reply) for user, reply in pairs]
                result["mean_harm"] = sum(harms) / len(harms)
            replays[(label, variant)] = (conv, proj)
            replay_results.setdefault(label, {})[variant] = result
for label, variants in replay_results.items():
    for variant, r in variants.items():
        harm = f", mean harm {r['mean_harm']:.2f} ({harm_model})" if "mean_harm" in r else ""
        print(f"{label:32s} {variant:8s} min projection {r['min_projection']:8.3f}  mean {r['mean_projection']:8.3f}{harm}")
    fig = plots.paired_drift_plot(replays[(label, "uncapped")][1], replays[(label, "capped")][1], THRESHOLDS[LAYER],
                                  title=f"{label}: {MODEL_NAME}'s own replies, uncapped vs capped")
    plots.save(fig, OUT_DIR / f"replay_{label.replace('/', '_')}.html")
    fig.show()
conv, _ = replays[("drift/therapy", "capped")]
print("A capped reply:", conv[-1]["content"][:300])

# %% [markdown]
# ## 7. What does capping cost?
#
# "Capping does not hurt capabilities" has to be a number. On ordinary conversations with the default
# Assistant, compare the model's next-token distribution with and without capping, position by position,
# with the **KL divergence** $\mathrm{KL}(P\,\|\,Q) = \sum_v P(v)\,(\log P(v) - \log Q(v))$, where $P$ is
# the uncapped model and $Q$ the capped one: the information lost by using the capped model in place of the
# original. Two numerical rules: compute in **float32**, and use `log_softmax`, never `softmax` then `log`
# (a probability that underflows to 0 gives `log(0) = -inf`).
#
# ### Exercise 8: next-token KL

# %% nbgrader={"grade": false, "grade_id": "ex_next_token_kl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def next_token_kl(logits_p: Float[Tensor, "... vocab"], logits_q: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    """KL(P || Q) per position, with P = softmax(logits_p) (uncapped) and Q = softmax(logits_q) (capped).

    Args:
        logits_p, logits_q: ``[..., vocab]``, same shape, any float dtype.

    Returns:
        float32 ``[...]``: the sum over the vocabulary of ``P * (log P - log Q)``, computed in float32 with
        ``log_softmax``.
    """
    ### BEGIN SOLUTION
    log_p = torch.log_softmax(logits_p.float(), dim=-1)
    log_q = torch.log_softmax(logits_q.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_next_token_kl", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
checks.test_next_token_kl(next_token_kl)

# %% [markdown]
# Now the cost. The "ordinary use" conversations are the default personas' unsteered replies from the
# steering experiment (coefficient 0). `utils.experiments.next_token_kl` runs each batch twice, plain and
# capped (the course's `utils.steering.capping`, which also counts how many positions it changed), and
# computes the KL at every position. Your `next_token_kl` gives the same numbers on one conversation.

# %%
neutral = [chat_messages(steer_personas[r["persona"]], r["question"], r["text"]) for r in records
           if r["default"] and r["coefficient"] == 0.0 and r["text"].strip()]
cap_stats = CapStats()
with timer("cost"):
    cost = course_next_token_kl(model, tokenizer, neutral,
                                lambda: capping(model, {l: AXIS[l] for l in CAP_LAYERS},
                                                {l: THRESHOLDS[l] for l in CAP_LAYERS}, stats=cap_stats),
                                stats=cap_stats, return_values=True, progress=False)
    from utils.conversation import encode, render

    ids = torch.tensor([encode(render(neutral[0], tokenizer), tokenizer)], device=model.get_input_embeddings().weight.device)
    plain_logits = model(input_ids=ids).logits
    with activation_capping(model, AXIS, THRESHOLDS, CAP_LAYERS):
        capped_logits = model(input_ids=ids).logits
    yours = next_token_kl(plain_logits[0], capped_logits[0])
print(f"{len(neutral)} neutral conversations, {cost['n_positions']} positions: mean KL {cost['kl_mean']:.4g} nats, "
      f"95th percentile {cost['kl_p95']:.4g}, max {cost['kl_max']:.4g}; "
      f"{cost['fraction_capped']:.1%} of positions x layers capped")
print(f"Your next_token_kl on the first conversation: mean {yours.mean():.4g} nats "
      f"(the course's on all: {cost['kl_mean']:.4g})")
fig = plots.kl_histogram(cost["kl_values"], title=f"The cost of capping layers {CAP_LAYERS[0]}-{CAP_LAYERS[-1]} on "
                                                  f"ordinary conversations ({MODEL_NAME})")
plots.save(fig, OUT_DIR / "capping_kl.html")
fig.show()
capping_results = {
    "fraction_capped": cost["fraction_capped"],
    "kl_neutral_mean": cost["kl_mean"], "kl_neutral_p95": cost["kl_p95"], "kl_neutral_max": cost["kl_max"],
    "n_neutral_positions": cost["n_positions"],
    "min_projection_uncapped": min(v["uncapped"]["min_projection"] for v in replay_results.values()),
    "min_projection_capped": min(v["capped"]["min_projection"] for v in replay_results.values()),
    "replay": replay_results,
}

# %% [markdown]
# **Think first:** with the 25th percentile as the floor, about a quarter of the default persona's own
# responses sit below it. Why is the fraction of *positions* capped on ordinary conversations not 25%?

# %% [markdown]
# ## 8. Talk to it: a chat panel
#
# Beyond the paper's notebooks: a chat panel. Type a message, see the reply and its projection on the axis
# on a live plot, and toggle capping to compare. It runs locally and needs no key. The cell below also sends
# one message from code (`panel.send(...)`), so you can see it work before you type.

# %%
panel = ChatPanel(model, tokenizer, AXIS[LAYER], LAYER, cap_axes={l: AXIS[l] for l in CAP_LAYERS},
                  cap_thresholds={l: THRESHOLDS[l] for l in CAP_LAYERS}, threshold=THRESHOLDS[LAYER],
                  max_new_tokens=MAX_NEW_TOKENS, max_context=MAX_TOKENS)
display(panel.widget)
print("Model:", panel.send("Hello! Who are you?")[:200])
print(f"Its projection: {panel.projections[-1]:.3f} (threshold {THRESHOLDS[LAYER]:.3f})")

# %% [markdown]
# ## Summary
#
# The last cell writes `out/part2/summary.json`.

# %%
summary = {
    "model": MODEL_NAME,
    "layer": LAYER,
    "layer_convention": "output of model.model.layers[layer] = hidden_states[layer + 1]",
    "part1_results": how,
    "cap_layers": CAP_LAYERS,
    "cap_percentile": CAP_PERCENTILE,
    "thresholds": {str(k): v for k, v in THRESHOLDS.items()},
    "sizes": {"max_turns": MAX_TURNS, "max_tokens": MAX_TOKENS, "max_new_tokens": MAX_NEW_TOKENS,
              "case_studies": CASE_STUDIES, "replay_turns": REPLAY_TURNS, "steer_questions": N_STEER_QUESTIONS},
    "drift": drift_results,
    "case_studies": case_results,
    "steering": steering_results,
    "capping": capping_results,
    "seconds": timer.seconds(),
}
(OUT_DIR / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))  # NaN is an error, never JSON
print(json.dumps(summary, indent=2))
