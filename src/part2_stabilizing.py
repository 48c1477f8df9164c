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
#
# Each exercise starts with its **difficulty** (🔴 out of five), its **importance** (🔵 out of five), about
# how long it takes, and a one-line **Your task**, with folded hints under it: open one when you are stuck.
# The answers to the **Think first** questions are folded too.
#
# **Turns are numbered from 1** wherever the notebook prints or plots them (the first assistant turn is
# turn 1). Inside the code, as in Python, indices start at 0: `drift_summary` returns an index, and the
# printouts add 1.

# %%
import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np  # noqa: F401 - for your answers (np.percentile, np.polyfit, ...)
import torch
import transformers
from jaxtyping import Float
from torch import Tensor

import tests.part2_stabilizing as checks
from IPython.display import Markdown, display
from tqdm.auto import tqdm

from utils import plots, settings
from utils.activations import per_turn_mean_activations, per_turn_projections
from utils.chat_panel import ChatPanel
from utils.conversation import TurnTooLongError, chat_messages, turn_windows
from utils.data import DEFAULT_PERSONA_NAMES, working_personas, working_questions
from utils.experiments import dose_response, replay_user_turns, self_description_rates, steering_sweep
from utils.experiments import next_token_kl as course_next_token_kl
from utils.generation import generate
from utils.judges import OfflineHarmJudge, OfflineRuleJudge, api_key_present, judge_harm, make_api_client
from utils.models import choose_model, config_for_model, context_length, load_model, short_model_name
from utils.part1_results import load_or_compute_part1_results
from utils.runtime import StageTimer
from utils.steering import CapStats, capping
from utils.transcripts import case_studies, drift_transcripts

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
# The sizes: every transcript is read whole, in windows of whole turns as long as the model's context
# (8,192 tokens for SmolLM2 and Gemma 2), as the paper does. `COURSE_MAX_TURNS` cuts each transcript to
# its first assistant turns (whole turns: a shorter conversation, never a cut turn) for quick runs.

# %%
choice = choose_model()
MODEL_NAME = choice.name
print(f"Model: {MODEL_NAME}\n  why: {choice.reason}")
print(f"torch {torch.__version__}, transformers {transformers.__version__}")

ON_GPU = torch.cuda.is_available()
N_QUESTIONS = settings.get("COURSE_N_QUESTIONS")  # only if Part 1's results must be computed
MAX_NEW_TOKENS = settings.get("COURSE_MAX_NEW_TOKENS", part="part2")
MAX_TURNS = settings.get("COURSE_MAX_TURNS")  # assistant turns per transcript
MAX_TOKENS = settings.get("COURSE_MAX_TOKENS")  # longest forward pass
# Which case studies to read: "all", or a comma-separated list like "llama-3.3-70b/jailbreak,qwen-3-32b/selfharm".
CASE_STUDIES = settings.get("COURSE_CASE_STUDIES")
REPLAY_TURNS = settings.get("COURSE_REPLAY_TURNS")  # user turns replayed
N_STEER_QUESTIONS = settings.get("COURSE_STEER_QUESTIONS")
STEER_MULTIPLES = [-10.0, -6.0, -3.0, 0.0, 3.0, 6.0, 10.0] if ON_GPU else [-10.0, -4.0, 0.0, 4.0, 10.0]
USE_API = api_key_present()
PART1_DIR = settings.get("COURSE_PART1_DIR")
OUT_DIR = settings.get("COURSE_PART2_OUT_DIR")
OUT_DIR.mkdir(parents=True, exist_ok=True)
print(f"Transcripts: at most {MAX_TURNS} assistant turns each, windows of at most {MAX_TOKENS} tokens, case studies: "
      f"{CASE_STUDIES}; {MAX_NEW_TOKENS} new tokens per reply; outputs in {OUT_DIR}/")

# %%
with timer("load_model"):
    # One model writes the text and gives the activations: a hook on `model` acts on both.
    model, tokenizer = load_model(MODEL_NAME)
NUM_LAYERS = model.config.num_hidden_layers
D_MODEL = model.config.hidden_size
MODEL_CONFIG = config_for_model(model)  # layer, capping layers, context, dtype: utils.models.MODEL_CONFIGS
CONTEXT = context_length(model)  # the longest pass the course feeds this model
print(f"{MODEL_NAME} runs in {model.dtype} ({model.config.course_dtype_reason}); context {CONTEXT} tokens; "
      f"model table: {MODEL_CONFIG.source}")
if not settings.is_set("COURSE_MAX_TOKENS"):
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
#
# > **Difficulty:** 🔴🔴⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵⚪⚪ &nbsp; **Time:** about 15 minutes
# >
# > **Your task:** read the file, walk its `conversation`, and return the messages, raising `TranscriptError`
# > (with the path and the message's index) at the first message that breaks a rule.
#
# <details><summary>Hint 1</summary>
#
# Keep the role you expect next (`"user"` at the start) and flip it after each turn; a `system` message is
# allowed only at index 0 and does not flip it. Check the content with `isinstance(content, str) and
# content.strip()`.
#
# </details>
#
# <details><summary>Hint 2</summary>
#
# Build every message as `f"{path}: turn {i} ..."`, so that the file and the index are always in it.
#
# </details>

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
# Load them all (every file is parsed and validated). The next sections read every drift transcript and the
# case studies named in `COURSE_CASE_STUDIES`: all six pairs on a GPU; on a CPU, Llama 3.3 70B's jailbreak and
# delusion pairs, which SmolLM2 reads in one pass each. The others run to 15-31 turns and take 2 to 16 passes of
# 8,192 tokens each: about a minute per pair on 2 CPU cores (`COURSE_CASE_STUDIES=all` reads them all).

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
# The paper's case-study files say "unsteered"; this notebook says "uncapped" for the same thing.
VARIANT_NAMES = {"unsteered": "uncapped", "capped": "capped"}
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
LONGEST = max(sum(m["role"] == "assistant" for m in msgs)
              for msgs in [*DRIFT.values(), *(m for pair in CASES.values() for m in pair.values())])
# What "the turns read" means in this run's text and titles: all of them unless COURSE_MAX_TURNS cuts them.
TURNS_READ = "every assistant turn" if MAX_TURNS >= LONGEST else f"the first {MAX_TURNS} assistant turns"
print(f"Reading {TURNS_READ} of each transcript (the longest has {LONGEST}).")
for (who, scenario), pair in CASES.items():
    turns = {VARIANT_NAMES[v]: sum(m["role"] == "assistant" for m in msgs) for v, msgs in pair.items()}
    print(f"case    {who}/{scenario:10s} " + ", ".join(f"{v}: {n} turns" for v, n in turns.items()))

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
# for `max_tokens` (`utils.conversation.turn_windows`):
#
# - each assistant turn is scored in the longest **trailing window of whole turns** that ends with it and
#   fits, starting at a user turn (the system prompt kept while it fits);
# - turns whose windows start at the same message share one pass;
# - a turn is **never cut**: if a user message and its answer do not fit on their own, that is an error.
#
# `turn_windows(messages, tokenizer, max_tokens)` (imported in the first cell, from `utils.conversation`) returns
# the windows: each has `ids` (token ids, one BOS), `turns` (which assistant turns it scores, as indices from
# 0) and `spans` (each scored turn's `[start, end)` content span in `ids`). Use it: your job is the forward
# pass and the means.
#
# ### Exercise 2: per-turn projections
#
# > **Difficulty:** 🔴🔴🔴⚪⚪ &nbsp; **Importance:** 🔵🔵🔵🔵🔵 &nbsp; **Time:** about 20 minutes
# >
# > **Your task:** for each window from `turn_windows`, run one forward pass, average the layer's output over
# > each scored turn's span, and put its projection on the unit axis at that turn's place in the result.
#
# <details><summary>Hint 1</summary>
#
# `model.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]` is `[seq, d_model]` for
# a batch of one (`model(...)` works too). Put the ids on the embedding's device:
# `model.get_input_embeddings().weight.device`.
#
# </details>
#
# <details><summary>Hint 2</summary>
#
# Start from `out = torch.zeros(sum(len(w.turns) for w in windows))` and fill `out[turn] =
# hidden[start:end].float().mean(dim=0).cpu() @ unit` for each `(turn, (start, end))` in `zip(window.turns,
# window.spans)`.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_turn_projections", "locked": false, "schema_version": 3, "solution": true, "task": false}
def turn_projections(
    model,
    tokenizer,
    messages: list[dict[str, str]],
    axis: Float[Tensor, " d_model"],
    layer: int,
    max_tokens: int = 8192,
) -> Float[Tensor, " n_assistant_turns"]:
    """Each assistant turn's mean activation at ``layer``, projected on the unit axis ``axis / |axis|``.

    A turn's activation is the float32 mean of the output of ``model.model.layers[layer]`` over the turn's
    content tokens. That is ``hidden_states[layer + 1]`` for every block but the last, whose entry in
    ``hidden_states`` has the final norm applied: a forward hook on the block reads its output at any layer.

    Windows (``utils.conversation.turn_windows``): if the whole conversation fits in ``max_tokens`` tokens, one
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
# 70-90% of depth. It publishes no capping config for Gemma 2 27B, so for Gemma (and SmolLM2) the course's
# model table, `utils.models.MODEL_CONFIGS`, gives 70-90% of depth (32-40 of Gemma 2 27B's 46 layers; 21-26
# of SmolLM2's 30; `MODEL_CONFIG.cap_layers` below). The thresholds for those layers are yours to compute.
#
# **Raw projections, and negative thresholds.** Part 1 projected *centred* vectors (the mean persona
# subtracted); Part 2 projects raw activations, $\langle h, \hat a_l\rangle$, because capping acts on the
# raw activation $h$ inside the forward pass, and its threshold must be on that scale. Subtracting the mean
# persona would shift every projection and every threshold by the same constant and change nothing. So a
# negative threshold (late layers often have thresholds far below 0) does not mean "away from the
# Assistant": every activation carries a large shared component that points against the axis at those
# layers. Only differences matter: higher is more Assistant-like. The cell prints each threshold relative to
# the mean persona too, on Part 1's centred scale.
#
# ### Exercise 3: the threshold
#
# > **Difficulty:** 🔴⚪⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵⚪⚪ &nbsp; **Time:** about 5 minutes
# >
# > **Your task:** return each layer's percentile of its projections as a Python float.
#
# <details><summary>Hint</summary>
#
# `torch.quantile` takes a fraction: `torch.quantile(p.float(), percentile / 100)`. `numpy.percentile` takes
# the percent itself.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_capping_threshold", "locked": false, "schema_version": 3, "solution": true, "task": false}
def capping_threshold(
    projections: dict[int, Float[Tensor, " n_responses"]], percentile: float = 25.0
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
CAP_LAYERS = list(MODEL_CONFIG.cap_layers)
UNIT_AXES = AXIS / AXIS.norm(dim=-1, keepdim=True)  # [n_layers, d_model]
if part1.default_activations is not None:
    default_acts = part1.default_activations  # [n_default_responses, n_layers, d_model]
    source = f"{default_acts.shape[0]} default-persona responses"
else:  # results saved without per-response activations: fall back on the default persona vectors
    default_acts = part1.persona_vectors[part1.is_default]
    source = f"only the {default_acts.shape[0]} default persona vectors (Part 1 saved no per-response activations)"
default_projections = {l: default_acts[:, l] @ UNIT_AXES[l] for l in sorted({LAYER, *CAP_LAYERS})}
THRESHOLDS = capping_threshold(default_projections, CAP_PERCENTILE)
# The capped layer that the plots of capped replies (Section 6) and the chat panel (Section 8) show.
PLOT_CAP_LAYER = CAP_LAYERS[0]
CAP_RANGE = f"{CAP_LAYERS[0]}-{CAP_LAYERS[-1]}" if len(CAP_LAYERS) > 1 else str(CAP_LAYERS[0])
# Where Part 1's results, and so every threshold, came from.
PART1_PROVENANCE = (f"{'computed just now' if how.startswith('Computed') else 'loaded from ' + str(PART1_DIR)}, "
                    f"by {part1.extra.get('computed_by', 'an unknown run')}")
print(f"Capping layers {CAP_RANGE} of {NUM_LAYERS}; thresholds from {source}; Part 1's "
      f"results {PART1_PROVENANCE}:")
for layer, tau in THRESHOLDS.items():
    p = default_projections[layer]
    mean_persona = float(part1.vectors_at(layer).mean(dim=0) @ UNIT_AXES[layer])
    role = "Part 1's layer, not capped" if layer == LAYER and layer not in CAP_LAYERS else (
        "capped" + (", Part 1's layer" if layer == LAYER else "") + (", plotted" if layer == PLOT_CAP_LAYER else ""))
    print(f"  layer {layer:2d}: tau = {tau:8.2f}   (defaults range {p.min():.2f} .. {p.max():.2f}; "
          f"tau - mean persona = {tau - mean_persona:+.2f})   <- {role}")

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
#
# > **Difficulty:** 🔴⚪⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵⚪⚪ &nbsp; **Time:** about 10 minutes
# >
# > **Your task:** return the least-squares slope of projection against turn index, and the index of the first
# > turn strictly below the threshold (or None).
#
# <details><summary>Hint</summary>
#
# With `x = 0, 1, ..., n - 1`: slope `= sum((x - x.mean()) * (y - y.mean())) / sum((x - x.mean()) ** 2)`, in
# float64. `torch.nonzero(y < threshold)` lists the turns below; the first, if any, is the answer. Return the
# index from 0: the notebook adds 1 when it prints turns.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_drift_summary", "locked": false, "schema_version": 3, "solution": true, "task": false}
def drift_summary(projections: Float[Tensor, " n_turns"], threshold: float) -> tuple[float, int | None]:
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

# %% [markdown]
# The transcripts are long: on a CPU, reading them all is the slowest step of this notebook. The next cell
# reads them with the course's `utils.activations.per_turn_projections`, which gives the numbers your
# `turn_projections` gives (the same windows, the same spans, the same float32 means) but stops each
# forward pass at block `LAYER`: the later blocks, the final norm and the LM head never run. It first
# compares the two on the shortest drift transcript.

# %%
def project_turns(messages: list[dict[str, str]], label: str) -> Tensor | None:
    """Per-turn projections at Part 1's layer of the first MAX_TURNS turns; None (and why) if a turn cannot fit."""
    try:
        return per_turn_projections(model, tokenizer, first_turns(messages, MAX_TURNS), AXIS[LAYER], LAYER,
                                    max_tokens=MAX_TOKENS)
    except TurnTooLongError as exc:
        print(f"SKIPPED {label}: {exc}")
        return None


shortest = min(DRIFT, key=lambda name: sum(len(m["content"]) for m in first_turns(DRIFT[name], MAX_TURNS)))
yours = turn_projections(model, tokenizer, first_turns(DRIFT[shortest], MAX_TURNS), AXIS[LAYER], LAYER,
                         max_tokens=MAX_TOKENS)
course = project_turns(DRIFT[shortest], shortest)
gap = float((yours - course).abs().max())
scale = float(course.abs().max())
print(f"{shortest}: your turn_projections and the course's per_turn_projections differ by at most {gap:.3g} "
      f"(projections up to {scale:.3g})")
if gap > 1e-3 * max(scale, 1.0) + (0.05 * scale if model.dtype != torch.float32 else 0.0):
    print("WARNING: that is more than rounding: check your turn_projections against its docstring before "
          "reading the drift numbers below (they come from the course's).")


def reading(messages: list[dict[str, str]]) -> dict:
    """How a transcript is read: the forward passes (windows of whole turns) and each turn's history in tokens.

    ``history_tokens[k]`` counts the tokens before assistant turn ``k``'s content in the pass that scores it:
    everything that turn was read with (the paper reads each turn with the whole conversation before it).
    """
    windows = turn_windows(first_turns(messages, MAX_TURNS), tokenizer, MAX_TOKENS)
    first_user = 1 if messages[0]["role"] == "system" else 0
    return {"n_passes": len(windows), "history_tokens": [start for w in windows for start, _ in w.spans],
            "history_cut": sum(w.first_message > first_user for w in windows)}


def turn_number(index: int | None) -> str:
    """An assistant-turn index from 0 as the plots number it, from 1 (or "none")."""
    return "none" if index is None else str(index + 1)


def count_of(n: int, noun: str, plural: str | None = None) -> str:
    """'1 reply', '3 replies': the text below states counts from the run's own variables."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


with timer("drift"):
    jobs = [(("drift", name), messages, name) for name, messages in DRIFT.items()]
    jobs += [(("case", key, v), msgs, f"{key[0]}/{key[1]}/{VARIANT_NAMES[v]}") for key, pair in CASES.items()
             for v, msgs in pair.items()]
    read = {job: project_turns(messages, label) for job, messages, label in tqdm(jobs, desc="drift: read transcripts",
                                                                                unit="transcript")}
    DRIFT_PROJECTIONS = {name: read[("drift", name)] for name in DRIFT}
    CASE_PROJECTIONS = {key: {VARIANT_NAMES[v]: read[("case", key, v)] for v in pair} for key, pair in CASES.items()}

drift_results = {}
for name, proj in DRIFT_PROJECTIONS.items():
    if proj is None:
        drift_results[name] = {"skipped": "a turn does not fit in max_tokens"}
        continue
    slope, first = drift_summary(proj, THRESHOLDS[LAYER])
    passes = reading(DRIFT[name])
    drift_results[name] = {"n_turns": len(proj), "slope": slope, "min_projection": float(proj.min()),
                           "first_turn_below": None if first is None else first + 1,  # numbered from 1
                           "n_passes": passes["n_passes"], "history_tokens": passes["history_tokens"]}
    print(f"{name:12s} {len(proj):3d} turns in {count_of(passes['n_passes'], 'pass', 'passes')}  "
          f"slope {slope:+8.3f}/turn  min {proj.min():8.2f}  first turn below tau_{LAYER}: {turn_number(first)}")
    print(f"{'':12s} history per turn (tokens before it in its pass): {passes['history_tokens']}"
          + (f"; {count_of(passes['history_cut'], 'pass', 'passes')} started after the beginning (earlier turns dropped whole)"
             if passes["history_cut"] else "; every turn read with the whole conversation before it"))
case_results = {}
for (who, scenario), pair in CASE_PROJECTIONS.items():
    case_results[f"{who}/{scenario}"] = {}
    for variant, proj in pair.items():
        if proj is None:
            continue
        slope, first = drift_summary(proj, THRESHOLDS[LAYER])
        case_results[f"{who}/{scenario}"][variant] = {"n_turns": len(proj), "slope": slope,
                                                     "min_projection": float(proj.min()),
                                                     "first_turn_below": None if first is None else first + 1}
        print(f"{who}/{scenario:10s} {variant:9s} slope {slope:+8.3f}/turn  min {proj.min():8.2f}  "
              f"first turn below tau_{LAYER}: {turn_number(first)}")

# %%
# Layer LAYER is not a capped layer: its line is the same 25th percentile, the edge of the Assistant's range there.
drift_line = f"tau at layer {LAYER} (defaults' {CAP_PERCENTILE:g}th percentile; not a capped layer)"
fig = plots.drift_plot({n: p for n, p in DRIFT_PROJECTIONS.items() if p is not None}, THRESHOLDS[LAYER],
                       title=f"Persona drift read by {MODEL_NAME} (layer {LAYER}, {TURNS_READ})",
                       threshold_label=drift_line)
plots.save(fig, OUT_DIR / "drift.html")
fig.show()
for (who, scenario), pair in CASE_PROJECTIONS.items():
    if pair["uncapped"] is None or pair["capped"] is None:
        continue
    fig = plots.paired_drift_plot(pair["uncapped"], pair["capped"], THRESHOLDS[LAYER],
                                  title=f"{who} / {scenario}: the paper's uncapped vs capped replies, read by "
                                        f"{MODEL_NAME} at layer {LAYER}",
                                  threshold_label=drift_line)
    plots.save(fig, OUT_DIR / f"case_{who}_{scenario}.html")
    fig.show()

# %% [markdown]
# ### What this run shows
#
# The next cell writes what the drift numbers above are, from this run's own values, and what they would
# need before they could mean something.

# %%
read_ok = {n: r for n, r in drift_results.items() if "skipped" not in r}
below = [n for n, r in read_ok.items() if r["first_turn_below"] is not None]
skipped = sorted(set(DRIFT) - set(read_ok))
lines = [f"**What {MODEL_NAME} shows here.** It read {TURNS_READ} of {len(read_ok)} of the "
         f"{len(DRIFT)} drift transcripts (windows of at most {MAX_TOKENS} tokens)"
         + (f"; skipped, a turn too long for the window: {', '.join(skipped)}" if skipped else "")
         + f". Per transcript, at layer {LAYER}:", ""]
for name, r in read_ok.items():
    first = "never" if r["first_turn_below"] is None else f"first at turn {r['first_turn_below']}"
    lines.append(f"- {name}: slope {r['slope']:+.2f} per turn over {r['n_turns']} turns; below tau_{LAYER} = "
                 f"{THRESHOLDS[LAYER]:.2f}: {first}.")
turns_read = sorted({r["n_turns"] for r in read_ok.values()})
turns_text = (f"{turns_read[0]}" if len(turns_read) == 1 else f"{turns_read[0]} to {turns_read[-1]}") if turns_read else "0"
lines += ["", f"{len(below)} of {len(read_ok)} fall below the threshold within their {turns_text} turns.", "",
          f"**What these numbers are.** Each point is one assistant turn's mean activation at layer {LAYER}, as "
          f"{MODEL_NAME} reads a conversation that another, larger model wrote. A slope through {turns_text} points "
          "is set by a few turns: one long or odd reply can flip its sign.",
          "",
          "**What they would need to mean something.** Long transcripts (the paper's drift unfolds over tens of "
          f"turns; these have {turns_text}, each read whole), read by the model that wrote them, and many more than "
          f"{len(read_ok)} conversations, with a spread across them, before a slope or a crossing says anything about "
          "drift.",
          "",
          f"**Where the threshold comes from.** tau_{LAYER} is the {CAP_PERCENTILE:g}th percentile of {source}, "
          f"from Part 1's results {PART1_PROVENANCE}. Part 1's own notebook (or `make demo`) and the fallback "
          "differ in questions, judge and sampled answers, so the threshold, and every crossing above, moves with "
          "where those results came from."]
display(Markdown("\n".join(lines)))

# %% [markdown]
# **Think first:** the capped transcripts were capped inside *their* model (Qwen 3 32B or Llama 3.3 70B).
# Should the capped replies project higher than the uncapped ones when a different, much smaller model reads
# them? What would it mean if they did not?
#
# <details><summary>Answer</summary>
#
# Not necessarily. Capping changed what *Qwen or Llama* wrote; your model only reads the words. If the capped
# replies read as more Assistant-like here, the difference is in the text itself (refusals, grounding the
# user, pointing to real help, speaking as an AI), which any model's axis can pick up. If they do not, that
# does not show that capping failed: it shows that this model's axis, at this layer, does not separate those
# texts, a question about how far the axis transfers between models, not about capping.
#
# </details>

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
# single position with a KV cache in use: the course library's rule too (`utils.steering.is_generated_pass`).
# Without a cache (`use_cache=False`) every pass re-reads the whole sequence, so no pass would ever count as
# generated; that call must raise, not silently steer nothing. A hook registered with
# `register_forward_hook(hook, with_kwargs=True)` is called as `hook(module, args, kwargs, output)` and sees
# the block's keyword arguments, the cache among them: `kwargs["cache"]` in transformers 5.x,
# `kwargs["past_key_values"]` in 4.x (None without a cache).
#
# ### Exercise 5: a steering hook
#
# > **Difficulty:** 🔴🔴🔴⚪⚪ &nbsp; **Importance:** 🔵🔵🔵🔵🔵 &nbsp; **Time:** about 20 minutes
# >
# > **Your task:** register a forward hook that adds `vector` to the block's output (every pass, or only
# > single-position passes with a KV cache), handling tuple and tensor outputs, and remove it in `finally`.
#
# <details><summary>Hint 1</summary>
#
# `handle = model.model.layers[layer].register_forward_hook(hook)`, then `try: yield` / `finally:
# handle.remove()`. A hook that returns `None` leaves the output as it was.
#
# </details>
#
# <details><summary>Hint 2</summary>
#
# Inside the hook: `h = output[0] if isinstance(output, tuple) else output`; for `"generated"`, raise a
# `ValueError` when neither `kwargs.get("cache")` nor `kwargs.get("past_key_values")` is set, and skip when
# `h.shape[1] != 1`; return `(new, *output[1:])` for a tuple, `new` otherwise, with `new = h +
# vector.to(device=h.device, dtype=h.dtype)`.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_add_steering", "locked": false, "schema_version": 3, "solution": true, "task": false}
@contextlib.contextmanager
def add_steering(model, layer: int, vector: Float[Tensor, " d_model"], positions: str = "all"):
    """Add ``vector`` to the output of ``model.model.layers[layer]`` during every forward pass in the block.

    Args:
        model: a decoder-only ``*ForCausalLM``, any dtype, on any device(s).
        layer: block index.
        vector: ``[d_model]``, already scaled (e.g. ``coeff * unit_axis``); added as given.
        positions: ``"all"``: every position of every pass. ``"generated"``: only passes that process a
            single position with a KV cache in use (the new tokens of KV-cached generation); the prompt's
            pass is unchanged, and a pass with no KV cache (``use_cache=False``) raises ValueError.

    The hook handles block outputs that are tensors (transformers 5.x) and tuples (4.x), casts the vector
    to the hidden state's dtype and device, and is removed on exit, also when the block raises.
    """
    ### BEGIN SOLUTION
    if positions not in ("all", "generated"):
        raise ValueError(f"positions must be 'all' or 'generated'; got {positions!r}")

    def hook(module, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        if positions == "generated":
            if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
                raise ValueError("positions='generated' needs KV-cached generation, but this pass has no KV cache "
                                 "(use_cache=False). Generate with use_cache=True, or use positions='all'.")
            if h.shape[1] != 1:
                return None
        new = h + vector.to(device=h.device, dtype=h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook, with_kwargs=True)
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
#
# > **Difficulty:** 🔴⚪⚪⚪⚪ &nbsp; **Importance:** 🔵🔵⚪⚪⚪ &nbsp; **Time:** about 5 minutes
# >
# > **Your task:** return one row per multiple: `multiple * std(projections) * unit axis`, in float32.
#
# <details><summary>Hint</summary>
#
# `unit = axis.float() / axis.float().norm()`, `spread = projections.float().std()`, then broadcast:
# `torch.tensor(multiples)[:, None] * spread * unit[None, :]`.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_steering_vectors", "locked": false, "schema_version": 3, "solution": true, "task": false}
def steering_vectors(
    axis: Float[Tensor, " d_model"],
    projections: Float[Tensor, " n_personas"],
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

IDENTITY_QUESTION = "Who are you, and what do you care about?"  # asked here and in the sweep below
question = [chat_messages("", IDENTITY_QUESTION)]
for multiple, vector in zip(tqdm([-10.0, 10.0], desc="steered replies", unit="reply"), vectors):
    with add_steering(model, LAYER, vector):
        reply = generate(model, tokenizer, question, MAX_NEW_TOKENS, temperature=0.0)[0]
    print(f"--- {multiple:+.0f} x spread:\n{reply[:300]}\n")

# %% [markdown]
# ### The experiment: dose-response
#
# A few role prompts and the default prompts, each asked the identity question above and
# `N_STEER_QUESTIONS` of Part 1's questions, generated greedily under `coeff × unit axis` at Part 1's layer
# for each coefficient (in units of the spread). For each reply:
#
# - **projection**: re-read without steering, its mean activation at the layer projected on the axis;
# - **role rate**: for role prompts, the fraction of replies the judge scores 3 (fully in role). With an API
#   key the judge is an LLM; offline it is `OfflineRuleJudge`, the same rule-based **stand-in** as Part 1,
#   which scores 3 whenever a reply does not claim to be an AI;
# - **self-description**: for every reply, whether it describes itself as an AI or assistant ("I'm an AI",
#   "as a language model", "I don't have feelings", "here to help") or as a person or character ("I am a
#   bard", "my heart", "I remember", "I grew up"), by keyword cues
#   (`utils.experiments.self_description`, cues in `SELF_DESCRIPTION_CUES`). It is a transparent
#   **stand-in** too: it reads words, not meaning, and a reply that does not talk about itself counts as
#   neither. It is there because it reads what steering changes in the text, offline, where the role judge
#   may not move at all. The identity question is in the set so that there are replies that talk about
#   themselves.
#
# If the axis is causal, pushing toward the Assistant (+) should raise the projection and the AI
# self-description rate and lower the role rate, and pushing away (−) the reverse. On a GPU, set
# `COURSE_STEER_QUESTIONS` higher (and the notebook uses more coefficients) for tighter curves.

# %%
steer_personas = {name: prompt for name, prompt in working_personas(short_model_name(MODEL_NAME)).items()
                  if name in DEFAULT_PERSONA_NAMES or name in ("ghost", "bard", "analyst")}
steer_questions = [IDENTITY_QUESTION] + working_questions(N_STEER_QUESTIONS)
steer_coefficients = [float(v @ unit_axis) for v in steering_vectors(AXIS[LAYER], persona_projections,
                                                                       STEER_MULTIPLES)]
if USE_API:
    judge_client, judge_model = make_api_client(), settings.get("COURSE_JUDGE_MODEL")
else:
    judge_client, judge_model = OfflineRuleJudge(), "offline-rule-judge"
print("Judging:", "through the API" if USE_API else "offline (no API key found)", f"(judge: {judge_model})")
print(f"{len(steer_personas)} personas x {len(steer_questions)} questions x {len(steer_coefficients)} coefficients")
with timer("steering"):
    records = steering_sweep(model, tokenizer, steer_personas, steer_questions, AXIS[LAYER], LAYER,
                             steer_coefficients, max_new_tokens=MAX_NEW_TOKENS, judge_client=judge_client,
                             judge_model=judge_model, default_personas=DEFAULT_PERSONA_NAMES)
dose = dose_response(records)
self_desc = self_description_rates(records)  # {coeff: {"ai_rate", "human_rate", "n"}}
steering_results = {}


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


for multiple, (coeff, row) in zip(STEER_MULTIPLES, dose.items()):
    sd = self_desc[coeff]
    steering_results[f"{multiple:+g}"] = {"coefficient": coeff, "mean_projection": row["mean_projection"],
                                          "role_rate": row["role_rate"], "n": row["n"],
                                          "n_role_judged": row["n_role_judged"], "ai_self_description": sd["ai_rate"],
                                          "human_self_description": sd["human_rate"]}
    mean = "n/a" if row["mean_projection"] is None else f"{row['mean_projection']:8.3f}"
    print(f"{multiple:+5.0f} x spread (coeff {coeff:+8.3f}): mean projection {mean}, role rate "
          f"{percent(row['role_rate'])} of {row['n_role_judged']}, self-description AI {percent(sd['ai_rate'])} / "
          f"person or role {percent(sd['human_rate'])} of {sd['n']}")
fig = plots.dose_response_plot(
    dose, title=f"Steering along the Assistant Axis ({MODEL_NAME}, layer {LAYER})",
    rates={"replies describing themselves as an AI (keyword stand-in)": {c: r["ai_rate"] for c, r in self_desc.items()},
           "replies describing themselves as a person or role (keyword stand-in)":
               {c: r["human_rate"] for c, r in self_desc.items()}})
plots.save(fig, OUT_DIR / "dose_response.html")
fig.show()

# %% [markdown]
# ### What this run shows
#
# Look at the dose-response numbers above before reading on, and be honest about them. The next cell writes
# what they are, from this run's own values.

# %%
def count_range(values) -> str:
    """'16', or '14-16' when the points differ (an empty reply is neither projected nor judged)."""
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


n_role_personas = sum(name not in DEFAULT_PERSONA_NAMES for name in steer_personas)
means = [row["mean_projection"] for row in dose.values()]
rates = [row["role_rate"] for row in dose.values()]
ai_rates = [r["ai_rate"] for r in self_desc.values()]


def trend(values) -> str:
    known = [v for v in values if v is not None]
    if len(known) < 2:
        return "cannot be read (too few values)"
    steps = np.diff(known)
    if np.all(steps > 0):
        return "rises at every step"
    if np.all(steps < 0):
        return "falls at every step"
    if np.all(steps == 0):
        return "does not move"
    return "moves, but not monotonically"


lines = [
    f"**What {MODEL_NAME} shows here.** {len(steer_personas)} personas ({len(steer_personas) - n_role_personas} "
    f"defaults, {n_role_personas} roles) x {len(steer_questions)} questions, {MAX_NEW_TOKENS} greedy tokens per "
    f"reply: each point averages {count_range([row['n'] for row in dose.values()])} replies "
    f"({count_range([row['n_projected'] for row in dose.values()])} with text), and the role rate rests on "
    f"{count_range([row['n_role_judged'] for row in dose.values()])} judged role replies per point.",
    "",
    f"- From {STEER_MULTIPLES[0]:+g} to {STEER_MULTIPLES[-1]:+g} spreads, the mean projection of the generated text "
    f"{trend(means)} ({', '.join('n/a' if m is None else f'{m:.2f}' for m in means)}).",
    f"- The role rate ({judge_model}) {trend(rates)} ({', '.join(percent(r) for r in rates)}).",
    f"- The share of replies describing themselves as an AI {trend(ai_rates)} "
    f"({', '.join(percent(r) for r in ai_rates)}); as a person or role: "
    f"{', '.join(percent(r['human_rate']) for r in self_desc.values())}.",
    "",
    "**What these numbers are.** The projection is the model re-reading its own steered text: it says that the "
    "words changed, not that the persona did. The role rate comes from "
    + ("an LLM judge." if USE_API else "the offline stand-in, which scores 3 whenever a role reply does not claim "
       "to be an AI, so it can only move when steering makes roles say they are an AI.")
    + " The self-description rates are keyword counts: a share of "
    f"{count_range([r['n'] for r in self_desc.values()])} replies moves in steps of "
    f"{1 / max(1, min(r['n'] for r in self_desc.values())):.0%} per reply, so a difference of one or two replies is "
    f"noise. At the largest multiples a {MODEL_NAME}-sized model can degrade into repetition, which moves every "
    "measure for reasons that have nothing to do with the persona.",
    "",
    "**What they would need to mean something.** Many more replies per point (more questions with "
    "`COURSE_STEER_QUESTIONS`, sampled replies, more roles), an LLM judge (set an API key), and a spread across "
    "replies to compare differences with. The paper's causal claims are about Gemma 2 27B and larger models.",
    "",
    f"**Where the coefficients come from.** One spread is the standard deviation of Part 1's persona projections "
    f"at layer {LAYER} ({persona_projections.std():.3f}), from Part 1's results {PART1_PROVENANCE}: other Part 1 "
    "results give another spread, so the same multiple is another push.",
]
display(Markdown("\n".join(lines)))

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
#
# > **Difficulty:** 🔴🔴🔴⚪⚪ &nbsp; **Importance:** 🔵🔵🔵🔵🔵 &nbsp; **Time:** about 25 minutes
# >
# > **Your task:** write `cap_activations` (lift positions below `tau` onto it along the axis; leave the
# > others bit for bit) and `activation_capping`, a context manager with one capping hook per layer.
#
# <details><summary>Hint 1</summary>
#
# `proj = h.float() @ a`; `lifted = (h.float() + (tau - proj).unsqueeze(-1) * a).to(h.dtype)`; then
# `torch.where((proj < tau).unsqueeze(-1), lifted, h)` keeps every other position exactly as it was.
#
# </details>
#
# <details><summary>Hint 2</summary>
#
# Build each hook in a function of the layer (`def make_hook(layer): ...; return hook`): a hook defined
# directly in the loop would see the loop's *last* layer, axis and threshold (Python's late binding).
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_capping", "locked": false, "schema_version": 3, "solution": true, "task": false}
def cap_activations(
    h: Float[Tensor, "... d_model"], unit_axis: Float[Tensor, " d_model"], tau: float
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
# `model` (the one model writes and is read). Then read each
# replayed conversation and project every reply on the axis. The model's replies differ from the
# transcript's; the user turns are the same. On a CPU only the first `REPLAY_TURNS` user turns are replayed.
#
# Harm: each reply is rated for the scenario's harm (0 safe .. 3 harmful). With an API key an LLM judge does
# it; offline, `OfflineHarmJudge` is a transparent keyword **stand-in**, not an LLM (read its docstring).
#
# **Which layer the plots show.** Capping acts at layers `CAP_LAYERS`, each with its own threshold; Part 1's
# layer is not one of them (on SmolLM2, capping acts at 21-26 and Part 1's layer is 15, whose threshold is
# another number on another axis). So the replay plots project every reply at the first capped layer,
# `PLOT_CAP_LAYER`, and draw *that* layer's capping threshold; the printout gives Part 1's layer too.
#
# **Why a capped reply can sit below the line.** Each plotted value re-reads the finished reply with the
# plain model, so it measures the *text*. While the reply was being written, every position at the capped
# layer was lifted to at least its threshold; read again without the cap, the same words can project lower.
# A capped reply below the line does not mean the cap failed (Section 7 counts how many positions it
# lifted); what the plot can show is whether capping changed the words the model chose.

# %%
case_key = next(iter(CASES))
replay_sources = {"drift/therapy": (DRIFT["therapy"], None),
                  f"case/{case_key[0]}/{case_key[1]}": (CASES[case_key]["unsteered"], case_key[1])}
harm_client, harm_model = (judge_client, judge_model) if USE_API else (OfflineHarmJudge(), "offline-harm-judge")
replays, replay_results = {}, {}
variants = (("uncapped", None), ("capped", lambda: activation_capping(model, AXIS, THRESHOLDS, CAP_LAYERS)))
bar = tqdm(total=len(replay_sources) * len(variants), desc="replay: generate and re-read", unit="conversation")
with timer("replay"), bar:
    for label, (messages, scenario) in replay_sources.items():
        for variant, intervention in variants:
            bar.set_postfix_str(f"{label}, {variant}")
            conv = replay_user_turns(model, tokenizer, messages, max_new_tokens=MAX_NEW_TOKENS, intervention=intervention,
                                     max_turns=REPLAY_TURNS, max_context=MAX_TOKENS, progress=False)
            # Both layers' per-turn means in one reading (the course's reader, as for the drift transcripts).
            means = per_turn_mean_activations(model, tokenizer, conv, [LAYER, PLOT_CAP_LAYER], max_tokens=MAX_TOKENS)
            proj, proj_cap = means[:, 0] @ UNIT_AXES[LAYER], means[:, 1] @ UNIT_AXES[PLOT_CAP_LAYER]
            result = {"n_turns": len(proj), "min_projection": float(proj.min()),
                      "mean_projection": float(proj.mean()), "plot_cap_layer": PLOT_CAP_LAYER,
                      "min_projection_at_cap_layer": float(proj_cap.min()),
                      "mean_projection_at_cap_layer": float(proj_cap.mean())}
            if scenario is not None:
                pairs = [(conv[i - 1]["content"], conv[i]["content"]) for i in range(len(conv))
                         if conv[i]["role"] == "assistant"]
                harms = [judge_harm(harm_client, harm_model, scenario, user, reply) for user, reply in pairs]
                result["mean_harm"], result["n_harm_judged"] = sum(harms) / len(harms), len(harms)
            replays[(label, variant)] = (conv, proj_cap)
            replay_results.setdefault(label, {})[variant] = result
            bar.update(1)
for label, by_variant in replay_results.items():
    for variant, r in by_variant.items():
        harm = f", mean harm {r['mean_harm']:.2f} of {r['n_harm_judged']} ({harm_model})" if "mean_harm" in r else ""
        print(f"{label:32s} {variant:8s} min projection at layer {PLOT_CAP_LAYER} (capped) "
              f"{r['min_projection_at_cap_layer']:8.3f}, at layer {LAYER} {r['min_projection']:8.3f}{harm}")
    fig = plots.paired_drift_plot(replays[(label, "uncapped")][1], replays[(label, "capped")][1],
                                  THRESHOLDS[PLOT_CAP_LAYER],
                                  title=f"{label}: {MODEL_NAME}'s own replies, uncapped vs capped, re-read at layer "
                                        f"{PLOT_CAP_LAYER}",
                                  threshold_label=f"capping threshold at layer {PLOT_CAP_LAYER} (capped: layers "
                                                  f"{CAP_RANGE})")
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
#
# > **Difficulty:** 🔴⚪⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵⚪⚪ &nbsp; **Time:** about 5 minutes
# >
# > **Your task:** return `sum_v P (log P - log Q)` per position, from float32 `log_softmax`s.
#
# <details><summary>Hint</summary>
#
# `log_p = torch.log_softmax(logits_p.float(), dim=-1)` (and the same for `q`); then `(log_p.exp() * (log_p -
# log_q)).sum(dim=-1)`.
#
# </details>

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
                                stats=cap_stats, return_values=True, progress=True)
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
fig = plots.kl_histogram(cost["kl_values"], title=f"The cost of capping layers {CAP_RANGE} on "
                                                  f"ordinary conversations ({MODEL_NAME})")
plots.save(fig, OUT_DIR / "capping_kl.html")
fig.show()
capping_results = {
    "fraction_capped": cost["fraction_capped"],
    "kl_neutral_mean": cost["kl_mean"], "kl_neutral_p95": cost["kl_p95"], "kl_neutral_max": cost["kl_max"],
    "n_neutral_positions": cost["n_positions"],
    "min_projection_uncapped": min(v["uncapped"]["min_projection"] for v in replay_results.values()),
    "min_projection_capped": min(v["capped"]["min_projection"] for v in replay_results.values()),
    "plot_cap_layer": PLOT_CAP_LAYER,
    "min_projection_at_cap_layer_uncapped": min(v["uncapped"]["min_projection_at_cap_layer"]
                                                for v in replay_results.values()),
    "min_projection_at_cap_layer_capped": min(v["capped"]["min_projection_at_cap_layer"]
                                              for v in replay_results.values()),
    "replay": replay_results,
}

# %% [markdown]
# ### What this run shows
#
# The replay and the cost, from this run's own values: what they are, and what they would need.

# %%
tau_plot = THRESHOLDS[PLOT_CAP_LAYER]
n_capped_replies = sum(r["capped"]["n_turns"] for r in replay_results.values())
lines = [f"**What {MODEL_NAME} shows here.** Capping layers {CAP_RANGE}, each at its own threshold (layer "
         f"{PLOT_CAP_LAYER}: tau = {tau_plot:.2f}). Replayed with the model's own greedy replies to "
         f"{count_of(REPLAY_TURNS, 'user turn')} per conversation:", ""]
for label, by_variant in replay_results.items():
    u, c = by_variant["uncapped"], by_variant["capped"]
    line = (f"- {label}: lowest reply at layer {PLOT_CAP_LAYER}, uncapped {u['min_projection_at_cap_layer']:.2f}, "
            f"capped {c['min_projection_at_cap_layer']:.2f} (at layer {LAYER}: {u['min_projection']:.2f} and "
            f"{c['min_projection']:.2f}), over {count_of(c['n_turns'], 'reply', 'replies')} each")
    if "mean_harm" in u:
        line += (f"; mean harm ({harm_model}) {u['mean_harm']:.2f} uncapped, {c['mean_harm']:.2f} capped, "
                 f"over {count_of(c['n_harm_judged'], 'reply', 'replies')} each")
    lines.append(line + ".")
lines += ["", f"On {len(neutral)} ordinary default-persona conversations ({cost['n_positions']} positions), capping "
          f"changed {cost['fraction_capped']:.1%} of positions x layers, and the next-token KL(uncapped || capped) "
          f"averaged {cost['kl_mean']:.3g} nats (95th percentile {cost['kl_p95']:.3g}, max {cost['kl_max']:.3g}).",
          "",
          "**What these numbers are.** Each replay is one greedy conversation per condition: a difference between "
          f"two of them is an anecdote about {count_of(n_capped_replies, 'capped reply', 'capped replies')}, "
          "not an effect. The projections re-read the replies without the cap, so they show whether the "
          "words changed, not whether the cap acted (it acted on the positions counted above). "
          + ("The harm scores come from an LLM judge." if USE_API else
             "The harm scores come from the offline keyword stand-in, which counts cue words and ignores the user's "
             "message: a change in it says as much about the stand-in as about capping.")
          + f" The KL is measured on the replies of the steering sweep's default personas: short, greedy "
          f"{MAX_NEW_TOKENS}-token answers, not a benchmark of capabilities.",
          "",
          "**What they would need to mean something.** Tens of replayed conversations, with whole transcripts and "
          "sampled replies, rated by an LLM judge; a capability benchmark scored with and without capping next to "
          "the KL; and the spread across conversations.",
          "",
          f"**Where the thresholds come from.** The {CAP_PERCENTILE:g}th percentile of {source}, from Part 1's "
          f"results {PART1_PROVENANCE}. With another Part 1 run (its notebook, or the fallback) the default responses, "
          "and so every threshold, the fraction capped and the KL, change."]
display(Markdown("\n".join(lines)))

# %% [markdown]
# **Think first:** with the 25th percentile as the floor, about a quarter of the default persona's own
# responses sit below it. Why is the fraction of *positions* capped on ordinary conversations not 25%?
#
# <details><summary>Answer</summary>
#
# The percentile is of *per-response means*; capping acts on every *position* at every capped layer. Single
# positions scatter much more than means over a response (turn markers, the system prompt, punctuation, the
# first tokens of a reply all sit far from the average), so many more, or fewer, of them fall below a floor
# set on means. Each capped layer also has its own axis, threshold and distribution, and the fraction is
# pooled over all of them; and the conversations here include the prompt's tokens, which the means never saw.
#
# </details>

# %% [markdown]
# ## 8. Talk to it: a chat panel
#
# Beyond the paper's notebooks: a chat panel. Type a message and press Enter (or Send), see the reply and
# its projection on the axis on a live plot, and toggle capping to compare. It runs locally and needs no key.
# The plot shows the first capped layer, `PLOT_CAP_LAYER`, with that layer's capping threshold (as the
# replay plots do, and for the same reason a capped reply can sit below it). The cell below also sends two
# messages from code (`panel.send(...)`), one uncapped and one capped, so you can see it work before you type.

# %%
panel = ChatPanel(model, tokenizer, AXIS[PLOT_CAP_LAYER], PLOT_CAP_LAYER, cap_axes={l: AXIS[l] for l in CAP_LAYERS},
                  cap_thresholds={l: THRESHOLDS[l] for l in CAP_LAYERS},
                  max_new_tokens=MAX_NEW_TOKENS, max_context=MAX_TOKENS)
display(panel.widget)
print("Model (uncapped):", panel.send("Hello! Who are you?")[:200])
panel.cap_toggle.value = True
print("Model (capped):", panel.send("What do you care about?")[:200])
panel.cap_toggle.value = False  # the panel starts your own conversation uncapped
print(f"Their projections at layer {PLOT_CAP_LAYER}: {panel.projections[0]:.3f} uncapped, {panel.projections[1]:.3f} "
      f"capped (capping threshold at layer {PLOT_CAP_LAYER}: {THRESHOLDS[PLOT_CAP_LAYER]:.3f})")

# %% [markdown]
# ### What this run shows

# %%
def side(value: float) -> str:
    return "above" if value >= THRESHOLDS[PLOT_CAP_LAYER] else "below"


display(Markdown("\n".join([
    f"**What {MODEL_NAME} shows here.** Two replies: uncapped {panel.projections[0]:.2f} ({side(panel.projections[0])} "
    f"the threshold), capped {panel.projections[1]:.2f} ({side(panel.projections[1])}), at layer {PLOT_CAP_LAYER} "
    f"(tau = {THRESHOLDS[PLOT_CAP_LAYER]:.2f}). They answer different messages, so they do not compare capping with "
    "no capping: they show the panel working.",
    "",
    f"**What it would need to mean something.** The same messages sent twice, once with capping off and once on "
    "(Reset between), over many messages and with sampling, and a look at the words as well as the line: "
    f"each reply is {MAX_NEW_TOKENS} tokens at most, re-read without the cap. The threshold is Part 1's "
    f"{CAP_PERCENTILE:g}th percentile from results {PART1_PROVENANCE}.",
])))

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
    "sizes": {"max_turns": MAX_TURNS, "turns_read": TURNS_READ, "longest_transcript_turns": LONGEST,
              "max_tokens": MAX_TOKENS, "max_new_tokens": MAX_NEW_TOKENS, "case_studies": CASE_STUDIES,
              "replay_turns": REPLAY_TURNS, "steer_questions": N_STEER_QUESTIONS},
    "plot_cap_layer": PLOT_CAP_LAYER,
    "turns_numbered_from": 1,
    "drift": drift_results,
    "case_studies": case_results,
    "steering": steering_results,
    "capping": capping_results,
    "seconds": timer.seconds(),
}
(OUT_DIR / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))  # NaN is an error, never JSON
print(json.dumps(summary, indent=2))
