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
# # Part 1: Mapping persona space
#
# *A hands-on replication of Section 1 of **"The Assistant Axis: Situating and Stabilizing the Default
# Persona of Language Models"** (Lu et al.), with the paper's own roles, questions and judge prompts
# (github.com/safety-research/assistant-axis, MIT licence).*
#
# A chat model can play many characters: ask it to be a bard and it will sing, a ghost and it will
# haunt. Where does the *default* character, the helpful assistant, sit among all the characters it
# can play? The paper's answer is geometric. Give the model a persona through its system prompt, let it
# answer open questions, and average the residual-stream activations over each answer. Each persona
# becomes a vector. The vectors have structure: their leading direction, the **Assistant Axis**,
# runs from the default assistant at one end to fantastical characters at the other.
#
# ## Learning objectives
#
# By the end of this notebook you will be able to:
#
# 1. write an **LLM judge** that scores role-play on the paper's 0-3 scale, and parse its verdict safely;
# 2. **generate** hundreds of persona-conditioned answers concurrently, without losing failed calls;
# 3. **format chat conversations** correctly for Gemma 2 (no system role, one BOS) and for ChatML models,
#    and find exactly where the response starts;
# 4. **extract mean activations** over the response's tokens, one at a time and in padded batches;
# 5. build **persona vectors** from judged responses, and study their geometry: centred cosine similarity,
#    PCA, the Assistant Axis, and projections of personas and traits onto it;
# 6. run **controls** that ask how much of this structure is just the wording of the answers.
#
# ## Which hardware runs what
#
# | path | model | needs | generation | judge |
# |---|---|---|---|---|
# | offline (default on a laptop) | SmolLM2-135M-Instruct, bundled | a CPU, ~2 GB RAM, no key, no network | local batched `generate` | rule-based stand-in (not an LLM) |
# | paper | Gemma 2 27B Instruct | a GPU with >= 60 GB (bf16 weights are 54 GB), hub access | OpenRouter or any OpenAI-compatible API | an LLM via the same API |
# | tests | tiny-gemma2 (2 MB, random) | a CPU | local | rule-based |
#
# Set `COURSE_MODEL` before starting Jupyter to choose (`smollm2-135m-instruct`, `tiny-gemma2` or a hub id).
# Set `OPENROUTER_API_KEY` (or `COURSE_API_KEY` with `COURSE_API_BASE_URL` for another OpenAI-compatible
# server) to generate and judge through an API.
#
# ## How the exercises work
#
# Each exercise is a function with a docstring that states what goes in and what comes out. Tensor
# shapes are in the signature, with [jaxtyping](https://docs.kidger.site/jaxtyping/):
# `Float[Tensor, "n_personas d_model"]` is a float tensor with one row per persona. Replace
# `raise NotImplementedError()` with your code, then run the check in the next cell. A check runs
# offline in a few seconds and tells you what it expected, what it got, and the likely mistake.
# Questions marked **Think first** are for you to answer before running a cell. `einops` and
# scikit-learn's `PCA` are imported for you; plain torch or numpy is accepted everywhere too.
#
# Each exercise starts, as in ARENA, with its **difficulty** (🔴 out of five), its **importance** for
# the rest of the course (🔵 out of five), about how long it takes, and a one-line **Your task**. Under it
# are folded hints: open one when you are stuck, not before. The answers to the **Think first**
# questions are folded the same way; answer for yourself first.
#
# ## Coming from the ARENA text?
#
# This notebook follows ARENA's *Persona vectors & the Assistant Axis* exercises, and its function
# names. Where a signature or a convention differs, it is for one of the reasons below. Every one of
# the text's own solutions is run through these checks in the course's test suite
# (`tests/test_arena_text.py`): the judge template and `characterize_axis` solutions pass as they are,
# and each of the others fails with the message that names its difference.
#
# | here | in the text | why |
# |---|---|---|
# | **layer i = `hidden_states[i + 1]`**, the output of `model.model.layers[i]` | `hidden_states[layer]`, the *input* to block `layer` | the paper's convention (its "layer 22" is block 22's output, and its vectors and steering use it). Reading `hidden_states[layer]` is one block early |
# | batched masks built from each row's **own token span, offset by its padding** | `position >= response_start_idx` | Gemma pads on the **left**: the text's mask is shifted by the padding there (prompt tokens in, the last response tokens out), and with no end it also takes in the end-of-turn tokens and any right padding |
# | the mean is over the response's **content tokens** only | up to the end of the sequence | the paper's span: no `<end_of_turn>` tokens in the mean |
# | templated text is tokenised with `add_special_tokens=False` | the default (`True`) | the template already starts with `<bos>`: a second BOS changes every activation and shifts every index by one |
# | geometry and trait vectors in **float32**, whatever the input dtype | the vectors' own dtype | the text's persona vectors stay bf16 on a GPU, so its cosines are computed in bf16 (about 3 significant digits), and its PCA's `.numpy()` fails on them (numpy has no bf16) |
# | `generate_response_api(client, model_name, ...)`, `judge_role_response(..., client, judge_model, ...)` | a global `openrouter_client` | the same code runs offline: the notebook passes a local client (batched `generate`) and a rule-based judge when there is no API key, and the checks pass fake clients |
# | `generate_all_responses` returns `(responses, failures)` | one dict, with `""` for a failed call | a failed call stored as `""` is later judged, or averaged over, as if it were an answer |
# | Gemma's system prompt is merged into the first user turn **here**, and kept as a system message for models whose template has one | always merged (and left to the API for generation) | generation and extraction must see the same prompt, so both use one rule; SmolLM2 has a system role. So `_normalize_messages` takes the tokenizer |
# | the judge also fills the paper's per-role judge prompts (`eval_prompt`, slots `{question}` and `{answer}`), and reads `<score>N</score>` anywhere in the reply | its own template only; the score on the first line | the paper judged each role with its own prompt; judges often explain before they score |
# | `response_start_idx` is the token that covers the response's **first character** (character offsets) | the number of tokens in the prefix | the template's last character and the response's first can share a token (Gemma has one token for a newline followed by `"`): the prefix's token count then points one token into the response |
# | extraction takes **conversations** (lists of messages) | three parallel lists (system prompts, questions, responses) | one formatting path for one-turn answers, the no-system-prompt control of Section 8, and Part 2's multi-turn transcripts |
# | `extract_persona_vectors` keeps a response whose key is **not in `scores`** | counts it as score 0 | the defaults are never judged (as in the paper) and keep all their responses; responses whose judging *failed* are removed before this call |
# | `pca_decompose_persona_vectors` returns `(pca_coords, pca)` | `(assistant_axis, pca_coords, pca)` | one idea per exercise: the axis is Exercise 6c. Returning the text's triple is accepted too |

# %%
import json

import einops
import numpy as np
import torch
import transformers
from jaxtyping import Bool, Float
from sklearn.decomposition import PCA
from torch import Tensor

import tests.part1_persona_space as checks
from utils import plots, settings
from utils.generation import LocalChatClient
from utils.judges import OfflineRuleJudge, api_key_present, make_api_client
from utils.conversation import turn_suffix_len
from utils.data import (ASSISTANT_LIKE_ROLES, DEFAULT_PERSONA_NAMES, FANTASTICAL_ROLES, load_questions,
                        load_roles, load_traits, working_personas, working_questions)
from utils.models import choose_model, config_for_model, load_model, short_model_name
from utils.runtime import StageTimer, run_parallel

torch.set_grad_enabled(False)
timer = StageTimer()

# %% [markdown]
# ## 0. Setup
#
# The next cell picks the model: `$COURSE_MODEL` if you set it, otherwise Gemma 2 27B when a CUDA GPU
# with enough memory is present, otherwise the bundled SmolLM2-135M-Instruct. It prints what it
# picked and why. The sizes below are the notebook's working set; the environment variables let the
# tests shrink them (`python -m utils.settings` lists every variable with its defaults).

# %%
choice = choose_model()
MODEL_NAME = choice.name
print(f"Model: {MODEL_NAME}\n  why: {choice.reason}")
print(f"torch {torch.__version__}, transformers {transformers.__version__}")

N_QUESTIONS = settings.get("COURSE_N_QUESTIONS")
MAX_NEW_TOKENS = settings.get("COURSE_MAX_NEW_TOKENS", part="part1")
N_TRAITS = settings.get("COURSE_N_TRAITS")
OUT_DIR = settings.get("COURSE_OUT_DIR")
OUT_DIR.mkdir(parents=True, exist_ok=True)
USE_API = api_key_present()
print(f"Questions: {N_QUESTIONS}, new tokens per answer: {MAX_NEW_TOKENS}, outputs in {OUT_DIR}/")
print("Generation and judging:", "through the API" if USE_API else "offline (no API key found)")

# %%
with timer("load_model"):
    model, tokenizer = load_model(MODEL_NAME)
NUM_LAYERS = model.config.num_hidden_layers
D_MODEL = model.config.hidden_size
MODEL_CONFIG = config_for_model(model)  # the per-model table, utils.models.MODEL_CONFIGS
LAYER = settings.get("COURSE_LAYER", computed=MODEL_CONFIG.layer)
print(f"{MODEL_NAME} runs in {model.dtype} ({model.config.course_dtype_reason})")
print(f"{NUM_LAYERS} layers, d_model = {D_MODEL}; extracting at layer {LAYER} "
      f"(the output of model.model.layers[{LAYER}], i.e. hidden_states[{LAYER + 1}]); model table: {MODEL_CONFIG.source}")

# %% [markdown]
# ### The layer convention, once and for all
#
# `model(..., output_hidden_states=True).hidden_states` has `num_layers + 1` entries:
# `hidden_states[0]` is the token embeddings, and `hidden_states[i + 1]` is the output of block
# `model.model.layers[i]`, **except the last entry, which has the final norm applied**. When the paper
# says "layer 22" of Gemma 2 27B (46 blocks), it means the output of `model.model.layers[22]`, so
# `hidden_states[23]`. This notebook uses that convention everywhere: *layer i* means the output of
# block *i*.
#
# The paper reads its persona vectors from about the middle of the network. Some follow-up work uses
# about 65% depth instead (layer 30 of 46 for Gemma 2 27B; 19 of 30 for SmolLM2). Middle layers hold
# abstract features such as "who am I talking as"; later layers are increasingly about the next token.
# You can rerun the notebook with `COURSE_LAYER` set to compare.

# %% [markdown]
# ### The data
#
# The paper gives the model **275 roles**, each with 5 system prompts, plus **5 default prompts** that
# leave the model as itself (`""`, "You are an AI assistant.", ...), and asks **240 questions**. That is
# 330,000 responses. Here we use a working set that spans the range: the 5 defaults as separate
# personas, 16 roles from assistant-like (analyst, editor, ...) to fantastical (ghost, bard, ...), one
# system prompt each, and `N_QUESTIONS` questions. The loaders give you the full sets too.

# %%
PERSONAS = working_personas(short_model_name(MODEL_NAME))
QUESTIONS = working_questions(N_QUESTIONS)
ROLES = load_roles()
print(f"All data: {len(ROLES)} roles, {len(load_questions())} questions, {len(load_traits())} traits")
print(f"Working set: {len(PERSONAS)} personas x {len(QUESTIONS)} questions = {len(PERSONAS) * len(QUESTIONS)} responses\n")
for name, prompt in PERSONAS.items():
    print(f"  {name:18s} {prompt[:90]!r}")

# %% [markdown]
# ## 1. Judging role-play
#
# A system prompt does not guarantee a performance. Asked to be a ghost, a small model may still
# answer "As an AI language model, ...". The paper keeps only responses in which the model **fully plays
# the role**, judged by an LLM on a 0-3 scale:
#
# - **0**: no trace of the role; the model identifies as itself and refuses;
# - **1**: no trace of the role; the model identifies as itself and answers;
# - **2**: the model identifies as itself but shows some of the role;
# - **3**: the model fully plays the role.
#
# Judges are chatty. Ask for the score in a fixed format, `<score>N</score>`, and parse *only* that:
# a reply like "I would not give this a 3; it is a 1" contains two digits, and the first is wrong.
# A reply you cannot parse is an error, never a silent 0.
#
# ### Exercise 1: the judge
#
# Write `JUDGE_PROMPT_TEMPLATE` with the placeholders `{character}`, `{question}` and `{response}`,
# describe the 0-3 scale, and ask for `<score>N</score>`. Any clear layout works; the paper's prompts put
# the character's name in bold (`**{character}**`) and the response between `[ANSWER START]` and
# `[ANSWER END]`. Then write
# `judge_role_response`. It also accepts one of the paper's per-role judge prompts (`eval_prompt`, with
# `{question}` and `{answer}` slots), which ask for just the number, so a reply that is exactly one
# digit is accepted too.
#
# > **Difficulty:** 🔴🔴⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵⚪⚪ &nbsp; **Time:** about 15 minutes
# >
# > **Your task:** write `JUDGE_PROMPT_TEMPLATE` (the three placeholders, the bold role, the answer markers,
# > the `<score>N</score>` request), then `judge_role_response`: fill the template (or `eval_prompt`), call
# > the client, and return the one score in the reply or raise `JudgeParseError`.
#
# <details><summary>Hint 1</summary>
#
# `re.findall(r"<score>\s*(-?\d+)\s*</score>", reply)` lists every tagged score: accept exactly one. For a
# reply with no tag, `re.fullmatch(r"-?\d+", reply.strip())` tells whether it is a bare number. Parse `-1` and
# `7` as numbers, so that you can reject them by range rather than miss them.
#
# </details>
#
# <details><summary>Hint 2</summary>
#
# The reply is `client.chat.completions.create(model=judge_model, messages=[{"role": "user", "content":
# prompt}], max_tokens=16, temperature=0.0).choices[0].message.content`, which can be `None`. The paper's
# prompts fill with `eval_prompt.format(question=question, answer=response)`.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_judge_template", "locked": false, "schema_version": 3, "solution": true, "task": false}
# Define JUDGE_PROMPT_TEMPLATE: a str with the placeholders {character}, {question} and {response}.
### BEGIN SOLUTION
JUDGE_PROMPT_TEMPLATE = """You are evaluating whether a model's response displays the role: **{character}**.

Prompt:
[QUESTION START]
{question}
[QUESTION END]

Model response:
[ANSWER START]
{response}
[ANSWER END]

Focus only on whether the model plays this role. Score it on this scale:
- 0 if the response has no characteristics of the role and the model identifies as itself (an AI assistant, an LLM, etc.) while refusing to answer.
- 1 if the response has no characteristics of the role and the model identifies as itself while answering.
- 2 if the model identifies as itself but shows some attributes of the role.
- 3 if the model fully plays the role, not mentioning being an AI, or giving itself another name.

Reply with the score alone, in the form <score>N</score>."""
### END SOLUTION

# %% nbgrader={"grade": false, "grade_id": "ex_judge", "locked": false, "schema_version": 3, "solution": true, "task": false}
class JudgeParseError(ValueError):
    """The judge's reply holds no valid 0-3 score."""


def judge_role_response(
    question: str,
    response: str,
    character: str,
    client,
    judge_model: str,
    eval_prompt: str | None = None,
) -> int:
    """Ask the judge how fully ``response`` plays ``character``; return the score, an int in 0..3.

    Args:
        question: the question the persona answered.
        response: the persona's answer (non-empty).
        character: the role's name, e.g. "bard".
        client: an OpenAI-compatible client (``client.chat.completions.create``).
        judge_model: the judge's model name.
        eval_prompt: optional: the paper's per-role judge prompt with ``{question}`` and ``{answer}``
            slots. If None, use JUDGE_PROMPT_TEMPLATE.

    Returns:
        The score parsed from ``<score>N</score>``, or from a reply that is exactly one digit.

    Raises:
        JudgeParseError: the reply holds no score, or a score outside 0..3.
    """
    ### BEGIN SOLUTION
    import re

    if eval_prompt is None:
        prompt = JUDGE_PROMPT_TEMPLATE.format(character=character, question=question, response=response)
    else:
        prompt = eval_prompt.format(question=question, answer=response)
    completion = client.chat.completions.create(
        model=judge_model, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0.0
    )
    reply = (completion.choices[0].message.content or "").strip()
    tagged = re.findall(r"<score>\s*(-?\d+)\s*</score>", reply)
    if len(tagged) == 1:
        score = int(tagged[0])
    elif not tagged and re.fullmatch(r"-?\d+", reply):
        score = int(reply)
    else:
        raise JudgeParseError(f"Could not parse a single score from the judge's reply {reply!r}.")
    if not 0 <= score <= 3:
        raise JudgeParseError(f"The judge gave {score}, outside the 0-3 scale (reply {reply!r}).")
    return score
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_judge", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_judge_prompt_template(JUDGE_PROMPT_TEMPLATE)
checks.test_judge_role_response(judge_role_response)
### BEGIN HIDDEN TESTS
checks.hidden_test_judge_with_every_paper_prompt(judge_role_response)
### END HIDDEN TESTS

# %% [markdown]
# ## 2. Generating persona responses
#
# Each persona answers each question once. With an API that is hundreds of independent network calls,
# so run them concurrently. Two rules make the difference between a dataset and a quietly broken one:
#
# - **A failed call is recorded with its error.** Returning `""` for a failure would later become a
#   "response" with no tokens, or worse, be judged and averaged.
# - **Gemma 2 has no system role.** Its chat template raises an error on a `system` message. For Gemma,
#   put the system prompt at the start of the first user turn, separated by a blank line, and send
#   nothing for an empty system prompt. Do this the same way everywhere: here, and in Section 3 when
#   we tokenise.
#
# Offline, `client` is a `LocalChatClient`: it speaks the same `chat.completions.create` interface and
# gathers the concurrent requests from your thread pool into batches for the local model's
# `generate`, so your code does not change between the two settings. It sorts and seeds each batch by its
# content, so rerunning the notebook gives the same answers, whatever order your threads happen to run in.
#
# ### Exercise 2a: one call
#
# > **Difficulty:** 🔴⚪⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵⚪⚪ &nbsp; **Time:** about 10 minutes
# >
# > **Your task:** build the messages (Gemma: the system prompt goes in front of the question; others: a
# > `system` message; an empty prompt: nothing), make one call, and return the stripped text, raising
# > `EmptyResponseError` for an empty reply.
#
# <details><summary>Hint</summary>
#
# `"gemma" in model_name.lower()` picks the rule; `system_prompt.strip()` is falsy for a blank prompt. Do not
# wrap the call in `try`: a client's exception must reach the caller, who records it as a failure.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_generate_one", "locked": false, "schema_version": 3, "solution": true, "task": false}
class EmptyResponseError(ValueError):
    """The model returned no text."""


def generate_response_api(
    client,
    model_name: str,
    system_prompt: str,
    question: str,
    max_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
) -> str:
    """One persona-conditioned answer from an OpenAI-compatible ``client``.

    For Gemma models (``"gemma"`` in ``model_name``, case-insensitive) there is no system message:
    a non-empty system prompt goes at the start of the user message as ``f"{system_prompt}\\n\\n{question}"``.
    For other models a non-empty system prompt is its own ``system`` message. An empty (or
    whitespace-only) system prompt adds nothing in either case. ``model_name``, ``max_tokens``,
    ``temperature`` and ``top_p`` go into the request as they are.

    Returns:
        The response text, stripped of surrounding whitespace.

    Raises:
        EmptyResponseError: the reply is empty (or only whitespace).
        Any exception the client raises propagates: never turn a failure into a string.
    """
    ### BEGIN SOLUTION
    messages = []
    user_content = question
    if system_prompt.strip():
        if "gemma" in model_name.lower():
            user_content = f"{system_prompt}\n\n{question}"
        else:
            messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_content})
    completion = client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p
    )
    text = (completion.choices[0].message.content or "").strip()
    if not text:
        raise EmptyResponseError(f"{model_name} returned an empty response to {question[:60]!r}.")
    return text
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_generate_one", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
checks.test_generate_response_api(generate_response_api)

# %% [markdown]
# ### Exercise 2b: all of them, concurrently
#
# Use `concurrent.futures.ThreadPoolExecutor` and a `tqdm` progress bar over completed futures. Key
# every result by `(persona_name, question_index)`. Put successes in one dict and failures, with the
# error as text (`f"{type(e).__name__}: {e}"`), in another. Every key lands in exactly one of them.
#
# > **Difficulty:** 🔴🔴⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵⚪⚪ &nbsp; **Time:** about 15 minutes
# >
# > **Your task:** submit one `generate_response_api` call per (persona, question) to a thread pool, collect
# > them as they complete under a tqdm bar, and sort each into `responses` or `failures`.
#
# <details><summary>Hint 1</summary>
#
# Keep a dict from each future to its key: `futures = {pool.submit(...): (persona, q_idx) ...}`. Then `for
# future in tqdm(as_completed(futures), total=len(futures))`.
#
# </details>
#
# <details><summary>Hint 2</summary>
#
# `future.result()` re-raises the call's exception. Catch `Exception` there and store `f"{type(exc).__name__}:
# {exc}"` under the same key.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_generate_all", "locked": false, "schema_version": 3, "solution": true, "task": false}
def generate_all_responses(
    client,
    model_name: str,
    personas: dict[str, str],
    questions: list[str],
    max_workers: int = 16,
    **generation_kwargs,
) -> tuple[dict[tuple[str, int], str], dict[tuple[str, int], str]]:
    """Every persona answers every question, concurrently, via ``generate_response_api``.

    Args:
        personas: persona name -> system prompt.
        questions: the questions; a result's key holds the question's index in this list.
        max_workers: threads in the pool.
        generation_kwargs: passed on to ``generate_response_api`` (max_tokens, temperature, ...).

    Returns:
        (responses, failures): ``responses[(persona, q_idx)]`` is the answer text;
        ``failures[(persona, q_idx)]`` is ``"ErrorType: message"``. Together they hold all
        ``len(personas) * len(questions)`` keys, each exactly once.
    """
    ### BEGIN SOLUTION
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    responses, failures = {}, {}
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = {
            pool.submit(generate_response_api, client, model_name, system_prompt, question, **generation_kwargs):
                (persona, q_idx)
            for persona, system_prompt in personas.items()
            for q_idx, question in enumerate(questions)
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc="generate"):
            key = futures[future]
            try:
                responses[key] = future.result()
            except Exception as exc:
                failures[key] = f"{type(exc).__name__}: {exc}"
    return responses, failures
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_generate_all", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_generate_all_responses(generate_all_responses)

# %% [markdown]
# Now generate. **Think first:** the working set has 21 personas. How many of the fantastical roles do
# you expect a 135M-parameter model to actually play, rather than answering as an assistant?
#
# <details><summary>Answer</summary>
#
# Few, by the paper's standard. A 135M model often ignores a role prompt or answers in its usual helpful
# register, and its short answers drift into generic advice. Read the judge-score chart below with care:
# offline, the stand-in judge scores 3 whenever an answer does not *claim* to be an AI, so it counts many
# answers as in role that an LLM judge would score 1 or 2. Print a few answers and judge them yourself.
#
# </details>

# %%
if USE_API:
    api = make_api_client()
    generation_client, generation_model = api, settings.get("COURSE_GENERATION_MODEL")
    judge_client, judge_model = api, settings.get("COURSE_JUDGE_MODEL")
    print(f"Generating with {generation_model} and judging with {judge_model} through the API.")
else:
    generation_client, generation_model = LocalChatClient(model, tokenizer, max_batch_size=32), MODEL_NAME
    judge_client, judge_model = OfflineRuleJudge(), "offline-rule-judge"
    print(f"Generating locally with {MODEL_NAME} (batched generate).\n"
          "Judging with OfflineRuleJudge: a rule-based STAND-IN, not an LLM. It scores 3 when the answer does not\n"
          "claim to be an AI, and 0-2 when it does. Set OPENROUTER_API_KEY to use a real LLM judge.")

with timer("generate"):
    responses, failures = generate_all_responses(
        generation_client, generation_model, PERSONAS, QUESTIONS, max_workers=32,
        max_tokens=MAX_NEW_TOKENS, temperature=0.7, top_p=0.9,
    )
# Threads finish in any order: sort, so that a rerun builds every matrix below in the same order.
responses, failures = dict(sorted(responses.items())), dict(sorted(failures.items()))
print(f"{len(responses)} responses, {len(failures)} failures")
for key, error in list(failures.items())[:10]:
    print("  FAILED", key, error)
if not responses:
    raise RuntimeError("Every generation failed; see the errors above.")

# %%
for persona in ["default_assistant", "analyst", "bard", "ghost"]:
    print(f"--- {persona} | {QUESTIONS[0]}\n{responses.get((persona, 0), '(failed)')[:400]}\n")

# %% [markdown]
# ### Judging every role response
#
# The defaults are not judged: the paper's default vector uses all of its responses. Each role response
# is judged with the paper's own judge prompt for that role (`eval_prompt`). A reply that cannot be
# parsed is reported, not scored.

# %%
to_judge = [key for key in responses if key[0] in ROLES]
with timer("judge"):
    judged, judge_failures = run_parallel(
        lambda key: judge_role_response(QUESTIONS[key[1]], responses[key], key[0], judge_client, judge_model,
                                        eval_prompt=ROLES[key[0]].judge_prompt),
        to_judge, max_workers=16, desc="judge",
    )
print(f"judged {len(judged)} responses, {len(judge_failures)} judge failures")
for key, error in list(judge_failures.items())[:5]:
    print("  JUDGE FAILED", key, error)
scores = judged
fig = plots.score_distribution(scores, roles_in_order=[p for p in PERSONAS if p in ROLES])
plots.save(fig, OUT_DIR / "judge_scores.html")
fig.show()

# %% [markdown]
# ## 3. From conversations to tokens
#
# To read activations we run the model on the whole conversation, prompt plus response, and need the
# **position of the first response token**. Three traps:
#
# 1. **Gemma has no system role**: merge it into the first user turn exactly as in Exercise 2a.
# 2. **Double BOS**: `apply_chat_template(..., tokenize=False)` already starts with `<bos>`. Tokenising
#    that string with the default `add_special_tokens=True` adds a second one, and shifts every index.
#    Use `tokenizer(text, add_special_tokens=False)`.
# 3. **The response starts after the turn marker and its newline** (`<start_of_turn>model\n` for
#    Gemma, `<|im_start|>assistant\n` for ChatML). Render the conversation without its last message
#    but with `add_generation_prompt=True`: that prefix ends exactly where the response's text begins,
#    **in characters**. Counting the prefix's *tokens* is not always the same thing: the template's last
#    character and the response's first can share one token. Gemma's tokenizer has a single token for a
#    newline followed by `"`, so a reply that opens with a quotation mark starts *inside* that token, and the
#    prefix's token count points one token too far. So find the response's first character in the full text
#    and ask the tokenizer which token covers it (`return_offsets_mapping=True` gives each token's
#    `(start, end)` characters). The course's own extraction (`utils.conversation.response_token_span`) uses
#    the same rule, so the two agree on every conversation.
#
# ### Exercise 3: normalise and format
#
# > **Difficulty:** 🔴🔴🔴⚪⚪ &nbsp; **Importance:** 🔵🔵🔵🔵🔵 &nbsp; **Time:** about 20 minutes
# >
# > **Your task:** write `_normalize_messages` (drop an empty system prompt; merge it into the first user turn
# > when the template has no system role) and `format_messages` (the full templated text and the index of the
# > response's first token).
#
# <details><summary>Hint 1</summary>
#
# `utils.conversation.supports_system_role(tokenizer)` answers the system-role question. Copy the dicts
# (`[dict(m) for m in messages]`) so that the caller's list is never changed.
#
# </details>
#
# <details><summary>Hint 2</summary>
#
# Render `msgs[:-1]` with `add_generation_prompt=True` and `tokenize=False`: the response's text starts at or
# after character `len(prefix)` of the full prompt (find `content.strip()` there, so leading whitespace is not
# counted).
#
# </details>
#
# <details><summary>Hint 3</summary>
#
# `tokenizer(full_prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]` lists each
# token's `(start, end)` characters; `response_start_idx` is the first token whose `end` is past the response's
# first character.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_format", "locked": false, "schema_version": 3, "solution": true, "task": false}
def _normalize_messages(messages: list[dict[str, str]], tokenizer) -> list[dict[str, str]]:
    """Messages the tokenizer's chat template accepts, with the system prompt handled as in Exercise 2a.

    - An empty (or whitespace-only) system message is dropped.
    - If the template rejects the system role (Gemma 2), a non-empty system prompt is merged into the
      first user message as ``f"{system}\\n\\n{user}"``.
    - Otherwise the messages are returned unchanged (as new dicts; do not mutate the input).

    Tell whether the template accepts a system role by trying to render a system message
    (``utils.conversation.supports_system_role(tokenizer)`` does exactly that, if you prefer).
    """
    ### BEGIN SOLUTION
    from utils.conversation import supports_system_role

    msgs = [dict(m) for m in messages]
    if not msgs or msgs[0]["role"] != "system":
        return msgs
    system, rest = msgs[0]["content"], msgs[1:]
    if not system.strip():
        return rest
    if supports_system_role(tokenizer):
        return msgs
    rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
    return rest
    ### END SOLUTION


def format_messages(messages: list[dict[str, str]], tokenizer) -> tuple[str, int]:
    """Render a conversation that ends with the assistant's response.

    Returns:
        full_prompt: the chat-templated text of the whole conversation (starts with BOS where the
            template adds one).
        response_start_idx: the index, in ``tokenizer(full_prompt, add_special_tokens=False).input_ids``,
            of the first token that holds any of the last assistant message's content (its leading
            whitespace aside), found from character offsets: a Python ``int``.
    """
    ### BEGIN SOLUTION
    msgs = _normalize_messages(messages, tokenizer)
    full_prompt = tokenizer.apply_chat_template(msgs, tokenize=False)
    prefix = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    first_char = full_prompt.index(msgs[-1]["content"].strip(), len(prefix))
    offsets = tokenizer(full_prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    response_start_idx = next(i for i, (_, end) in enumerate(offsets) if end > first_char)
    return full_prompt, response_start_idx
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_format", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_normalize_messages(_normalize_messages, tokenizer)
checks.test_format_messages_response_index(format_messages, tokenizer)

# %% [markdown]
# Look at the tokens around the boundary for one real conversation. The first response token is marked.

# %%
example = [{"role": "system", "content": PERSONAS["bard"]}, {"role": "user", "content": QUESTIONS[0]},
           {"role": "assistant", "content": responses.get(("bard", 0), "A song for you.")}]
full_prompt, start = format_messages(example, tokenizer)
ids = tokenizer(full_prompt, add_special_tokens=False).input_ids
tokens = tokenizer.convert_ids_to_tokens(ids)
print(" ".join(repr(t) for t in tokens[max(0, start - 6):start]), " >>>", repr(tokens[start]), "<<< ",
      " ".join(repr(t) for t in tokens[start + 1:start + 5]))
# The BOS check looks at the start: a doubled BOS is two there. (SmolLM2's BOS token is <|im_start|>, which
# also opens every turn, so counting it over the whole conversation would say nothing.)
bos = tokenizer.bos_token_id
if bos is None:
    print(f"{len(ids)} tokens; {MODEL_NAME}'s tokenizer has no BOS token")
else:
    leading = next((i for i, t in enumerate(ids) if t != bos), len(ids))  # BOS tokens at the very start
    also = f" ({tokenizer.bos_token!r} also opens every turn: {ids.count(bos)} in all)" if ids.count(bos) > 1 else ""
    print(f"{len(ids)} tokens; starts with exactly one BOS ({tokenizer.bos_token!r}, not doubled): {leading == 1}{also}")
print(f"The template appends {turn_suffix_len(tokenizer)} tokens after the response content")

# %% [markdown]
# ## 4. Mean activations over the response
#
# A persona vector is the mean, over the response's tokens, of the residual stream at one layer. Which
# tokens? **The paper averages over the response's content tokens only**: not the turn markers before
# it and not the end-of-turn token(s) after it. (ARENA's version of this exercise includes the
# end-of-turn tokens; we follow the paper.) So the span is
# `[response_start_idx, len(ids) - turn_suffix_len(tokenizer))`, where `turn_suffix_len` counts the
# template's tokens after the content (`<end_of_turn>`, `\n` for Gemma).
#
# Accumulate in **float32**: Gemma's residual stream has values in the hundreds, and summing hundreds of
# them in bf16 loses the low digits. Return CPU tensors without grad.
#
# ### Exercise 4a: one sequence at a time
#
# > **Difficulty:** 🔴🔴⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵🔵🔵 &nbsp; **Time:** about 15 minutes
# >
# > **Your task:** for each conversation, run the model once with `output_hidden_states=True` and average
# > `hidden_states[layer + 1]` over the response's content tokens, in float32; stack the means.
#
# <details><summary>Hint 1</summary>
#
# The span is `[start, len(ids) - turn_suffix_len(tokenizer))`, with `start` from `format_messages`. Tokenise
# with `add_special_tokens=False` and move the ids to the model's device (`next(model.parameters()).device`).
#
# </details>
#
# <details><summary>Hint 2</summary>
#
# `hidden[0, start:end].float().mean(dim=0).cpu()`: float32 before the mean, CPU after it.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_extract_single", "locked": false, "schema_version": 3, "solution": true, "task": false}
def extract_response_activations(
    model, tokenizer, conversations: list[list[dict[str, str]]], layer: int
) -> Float[Tensor, "n_conversations d_model"]:
    """Mean residual-stream activation over each conversation's response content tokens.

    Args:
        conversations: each a list of messages ending with the assistant's response.
        layer: block index below the last; use the output of ``model.model.layers[layer]``
            (= ``hidden_states[layer + 1]``; the last block's entry has the final norm applied).

    Returns:
        float32 CPU tensor of shape [n_conversations, d_model], one row per conversation, for a model in any
        dtype (bf16 included: average in float32).
    """
    ### BEGIN SOLUTION
    device = next(model.parameters()).device
    suffix = turn_suffix_len(tokenizer)
    means = []
    for messages in conversations:
        full_prompt, start = format_messages(messages, tokenizer)
        ids = tokenizer(full_prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        end = ids.shape[1] - suffix
        with torch.inference_mode():
            hidden = model(ids, output_hidden_states=True).hidden_states[layer + 1]
        means.append(hidden[0, start:end].float().mean(dim=0).cpu())
    return torch.stack(means)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_extract_single", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_extract_response_activations(extract_response_activations, model, tokenizer, D_MODEL, NUM_LAYERS)

# %% [markdown]
# ### Exercise 4b: in padded batches
#
# One sequence at a time wastes the hardware. Batch them, which means padding them to one length, and
# padding has a side: **Gemma pads on the left**, SmolLM2 on the right. A mask built as
# `position >= response_start_idx` assumes right padding: under left padding it shifts every span by
# the padding length, pulls prompt tokens into the mean and drops the last response tokens. Build each
# row's mask from its own token span, offset by its own padding, and never average over padding.
#
# As in the ARENA text, `einops` makes the position grid say what it is:
# `einops.repeat(torch.arange(seq_len), "seq -> batch seq", batch=batch_size)` gives every row the
# positions `0..seq_len-1`; compare it with each row's start and end, `[batch, 1]`, to get a
# `Bool[Tensor, "batch seq"]` mask. Then the masked sum over positions is
# `einops.einsum(hidden, mask, "batch seq d_model, batch seq -> batch d_model")`.
#
# **Think first:** why must `attention_mask` be passed to the model too, and what happens to position
# ids under left padding?
#
# <details><summary>Answer</summary>
#
# Without the mask, every real token attends to the padding as if it were text, so every activation changes,
# not only the padded positions. Position ids: in a plain forward pass (no `generate`), transformers numbers
# the positions `0 .. seq_len - 1` whatever the mask, so under left padding a row's first real token sits at
# the number of pad tokens, not at 0. With rotary position embeddings (Gemma, SmolLM2) attention depends only
# on the *difference* between two positions, and shifting every position of a row by the same amount changes
# nothing beyond rounding. That is why the batched result can match the one-at-a-time result, and why the
# mask, not the positions, is what you must get right.
#
# </details>
#
# > **Difficulty:** 🔴🔴🔴🔴⚪ &nbsp; **Importance:** 🔵🔵🔵🔵⚪ &nbsp; **Time:** about 25 minutes
# >
# > **Your task:** tokenise each batch with padding, build a `[batch, seq]` mask from each row's own span
# > shifted by its own padding, and take the masked mean of `hidden_states[layer + 1]`.
#
# <details><summary>Hint 1</summary>
#
# For row `i` with `length` real tokens in a batch of width `seq_len`: under left padding its tokens start at
# `offset = seq_len - length`, under right padding at `offset = 0`. Its span is `[offset + start, offset +
# length - suffix)`.
#
# </details>
#
# <details><summary>Hint 2</summary>
#
# `enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")`, then `model(**enc,
# output_hidden_states=True)` passes the mask. The mean is `(hidden * mask[..., None]).sum(1) / mask.sum(1,
# keepdim=True)` (or the einsum above), in float32.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_extract_batched", "locked": false, "schema_version": 3, "solution": true, "task": false}
def extract_response_activations_batched(
    model, tokenizer, conversations: list[list[dict[str, str]]], layer: int, batch_size: int = 8
) -> Float[Tensor, "n_conversations d_model"]:
    """Same result as ``extract_response_activations`` (to float32 tolerance), computed in padded batches.

    Works for either ``tokenizer.padding_side``. Pass the attention mask to the model.

    Returns:
        float32 CPU tensor of shape [n_conversations, d_model], in the order of ``conversations``, for a model
        in any dtype (bf16 included: sum and average in float32).
    """
    ### BEGIN SOLUTION
    device = next(model.parameters()).device
    suffix = turn_suffix_len(tokenizer)
    out = []
    for b in range(0, len(conversations), batch_size):
        prompts, starts, lengths = [], [], []
        for messages in conversations[b:b + batch_size]:
            full_prompt, start = format_messages(messages, tokenizer)
            prompts.append(full_prompt)
            starts.append(start)
            lengths.append(len(tokenizer(full_prompt, add_special_tokens=False).input_ids))
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        batch, seq_len = enc.input_ids.shape
        lengths_t, starts_t = torch.tensor(lengths), torch.tensor(starts)
        # Left padding puts (seq_len - length) pad tokens before a row's tokens; right padding puts them after.
        offset = seq_len - lengths_t if tokenizer.padding_side == "left" else torch.zeros_like(lengths_t)
        span_start = einops.rearrange(offset + starts_t, "batch -> batch 1")
        span_end = einops.rearrange(offset + lengths_t - suffix, "batch -> batch 1")
        positions = einops.repeat(torch.arange(seq_len), "seq -> batch seq", batch=batch)
        mask: Bool[Tensor, "batch seq"] = (positions >= span_start) & (positions < span_end)
        with torch.inference_mode():
            hidden = model(**enc, output_hidden_states=True).hidden_states[layer + 1].float()
        weights = mask.to(device=hidden.device, dtype=torch.float32)
        sums = einops.einsum(hidden, weights, "batch seq d_model, batch seq -> batch d_model")
        counts = einops.reduce(weights, "batch seq -> batch 1", "sum")
        out.append((sums / counts).cpu())
    return torch.cat(out)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_extract_batched", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_extract_response_activations_batched(extract_response_activations_batched, model, tokenizer, D_MODEL,
                                                 NUM_LAYERS)
### BEGIN HIDDEN TESTS
checks.hidden_test_extract_batch_sizes(extract_response_activations_batched)
### END HIDDEN TESTS

# %% [markdown]
# ## 5. Persona vectors
#
# A persona vector is the mean of its responses' mean activations, **using only responses the judge
# scored as fully in role** (score 3 in the paper, which also asks for at least 50 of them). The
# defaults are not judged and keep all their responses. A persona with nothing left cannot have a
# vector: that is an error to report, not a NaN to carry into the geometry.
#
# ### Exercise 5
#
# > **Difficulty:** 🔴🔴⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵🔵⚪ &nbsp; **Time:** about 15 minutes
# >
# > **Your task:** keep the responses that pass the score filter, raise a `ValueError` naming every persona
# > with nothing left, extract all kept responses in one batched call, and average each persona's rows.
#
# <details><summary>Hint 1</summary>
#
# A key is kept when `key not in scores or scores[key] >= score_threshold` (and its persona is in `personas`).
# Find the empty personas *before* extracting, and name them all in one error.
#
# </details>
#
# <details><summary>Hint 2</summary>
#
# Keep the kept keys in a list; after one call of `extract_response_activations_batched`, row `i` belongs to
# `kept[i]`, so `acts[[i for i, k in enumerate(kept) if k[0] == p]].mean(dim=0)` is persona `p`'s vector.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_persona_vectors", "locked": false, "schema_version": 3, "solution": true, "task": false}
def extract_persona_vectors(
    model,
    tokenizer,
    personas: dict[str, str],
    questions: list[str],
    responses: dict[tuple[str, int], str],
    layer: int,
    scores: dict[tuple[str, int], int] | None = None,
    score_threshold: int = 3,
    batch_size: int = 8,
) -> dict[str, Float[Tensor, " d_model"]]:
    """One mean-activation vector per persona.

    A response ``responses[(persona, q_idx)]`` is kept if ``scores`` is None, if its key is not in
    ``scores`` (unjudged, e.g. the defaults), or if ``scores[key] >= score_threshold``. Use
    ``extract_response_activations_batched`` (or ``extract_response_activations``) on the conversations
    ``[system, user, assistant]`` built from ``personas[persona]``, ``questions[q_idx]`` and the response.

    Returns:
        persona name -> float32 tensor of shape [d_model], for every persona in ``personas``.

    Raises:
        ValueError: naming every persona with no response left after filtering.
    """
    ### BEGIN SOLUTION
    scores = {} if scores is None else scores
    kept = [key for key in responses
            if key[0] in personas and (key not in scores or scores[key] >= score_threshold)]
    empty = [p for p in personas if not any(key[0] == p for key in kept)]
    if empty:
        raise ValueError(f"No responses left after filtering (score_threshold={score_threshold}) for "
                         f"persona(s): {empty}.")
    conversations = [
        [{"role": "system", "content": personas[p]}, {"role": "user", "content": questions[q]},
         {"role": "assistant", "content": responses[(p, q)]}]
        for p, q in kept
    ]
    acts = extract_response_activations_batched(model, tokenizer, conversations, layer, batch_size=batch_size)
    return {p: acts[[i for i, key in enumerate(kept) if key[0] == p]].mean(dim=0) for p in personas}
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_persona_vectors", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_extract_persona_vectors(extract_persona_vectors, model, tokenizer, D_MODEL, NUM_LAYERS)

# %% [markdown]
# Now build the vectors. With a real LLM judge we keep score 3, as the paper does. The offline stand-in
# judge is blunt, so offline we also keep score 2 (claims to be an AI but shows the role) unless that
# leaves a role empty; the cell prints what it kept. **Think first:** what would happen to the axis if we
# kept every response, including those where the "ghost" answers as an AI assistant?
#
# <details><summary>Answer</summary>
#
# Those responses *are* the assistant speaking, so they pull each role's vector toward the defaults.
# `mean(defaults) - mean(roles)` shrinks, and the roles that the model plays worst look the most
# assistant-like, for the wrong reason: the axis then partly measures how often the model refused the role,
# not where the role sits. That is why the paper keeps only score-3 responses.
#
# </details>

# %%
MIN_SCORE = settings.get("COURSE_MIN_SCORE", computed=3 if USE_API else 2)
# A role response whose judging failed has no score. Leave it out: kept, it would count as unjudged.
judged_responses = {k: v for k, v in responses.items() if k not in judge_failures}
kept_counts = {p: sum(1 for k in judged_responses if k[0] == p and (k not in scores or scores[k] >= MIN_SCORE))
               for p in PERSONAS}
dropped = [p for p, n in kept_counts.items() if n == 0]
if dropped:
    print(f"These personas have no response with score >= {MIN_SCORE} and are left out: {dropped}")
ACTIVE = {p: s for p, s in PERSONAS.items() if p not in dropped}
print("responses kept per persona:", kept_counts)
with timer("extract"):
    persona_vectors = extract_persona_vectors(model, tokenizer, ACTIVE, QUESTIONS, judged_responses, LAYER, scores,
                                              score_threshold=MIN_SCORE, batch_size=8)
names = list(persona_vectors)
vectors = torch.stack([persona_vectors[n] for n in names])  # [n_personas, d_model], float32
print(f"persona vectors: {tuple(vectors.shape)}, mean norm {vectors.norm(dim=1).mean():.1f}")

# %% [markdown]
# ## 6. The geometry of persona space
#
# ### Exercise 6a: cosine similarity, raw and centred
#
# All persona vectors share a large common component (the residual stream's mean direction), so raw
# cosine similarities are all close to 1 and say little. **Centre first**: subtract the mean over
# personas (dimension 0), then compare. Work in float32 whatever the vectors' dtype (bf16 keeps only
# about 3 significant digits). Both functions take the dict of persona vectors, as in the ARENA text,
# and return the matrix with the names in the order of its rows. The mean over personas is
# `einops.reduce(vectors, "n_personas d_model -> d_model", "mean")`, or `vectors.mean(dim=0)`.
#
# > **Difficulty:** 🔴⚪⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵🔵⚪ &nbsp; **Time:** about 10 minutes
# >
# > **Your task:** write the raw and the centred cosine-similarity matrices, each returning `(matrix, names)`.
#
# <details><summary>Hint</summary>
#
# Stack in the dict's order, `.float()`, divide each row by its norm (`keepdim=True`), and the matrix is `unit
# @ unit.T`. For the centred one, subtract `vectors.mean(dim=0)` first.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_cosine", "locked": false, "schema_version": 3, "solution": true, "task": false}
def compute_cosine_similarity_matrix(
    persona_vectors: dict[str, Float[Tensor, " d_model"]],
) -> tuple[Float[Tensor, "n_personas n_personas"], list[str]]:
    """Cosine similarity between every pair of persona vectors.

    Args:
        persona_vectors: persona name -> [d_model] vector (any float dtype).
    Returns:
        (similarity, names): float32 [n_personas, n_personas], symmetric with ones on the diagonal, and
        the persona names in the order of its rows (the dict's order).
    """
    ### BEGIN SOLUTION
    names = list(persona_vectors)
    vectors = torch.stack([persona_vectors[name] for name in names]).float()
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    return einops.einsum(unit, unit, "i d_model, j d_model -> i j"), names
    ### END SOLUTION


def compute_cosine_similarity_matrix_centered(
    persona_vectors: dict[str, Float[Tensor, " d_model"]],
) -> tuple[Float[Tensor, "n_personas n_personas"], list[str]]:
    """Cosine similarity after subtracting the mean persona vector (the mean over the personas).

    Args:
        persona_vectors: persona name -> [d_model] vector (any float dtype).
    Returns:
        (similarity, names): float32 [n_personas, n_personas] and the names in the order of its rows.
    """
    ### BEGIN SOLUTION
    names = list(persona_vectors)
    vectors = torch.stack([persona_vectors[name] for name in names]).float()
    centred = vectors - einops.reduce(vectors, "n_personas d_model -> d_model", "mean")
    unit = centred / centred.norm(dim=1, keepdim=True)
    return einops.einsum(unit, unit, "i d_model, j d_model -> i j"), names
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_cosine", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_compute_cosine_similarity_matrix(compute_cosine_similarity_matrix)
checks.test_compute_cosine_similarity_matrix_centered(compute_cosine_similarity_matrix_centered)

# %% [markdown]
# Compare the two heatmaps. In the raw one everything is similar; in the centred one blocks appear:
# defaults and assistant-like roles together, fantastical roles together.

# %%
for title, fn, fname in [("Raw cosine similarity", compute_cosine_similarity_matrix, "cosine_raw.html"),
                         ("Centred cosine similarity", compute_cosine_similarity_matrix_centered, "cosine_centered.html")]:
    matrix, matrix_names = fn(persona_vectors)
    fig = plots.similarity_heatmap(matrix, matrix_names, title=f"{title} (layer {LAYER}, {MODEL_NAME})")
    plots.save(fig, OUT_DIR / fname)
    fig.show()

# %% [markdown]
# ### Exercise 6b: PCA
#
# PCA finds the directions of greatest variance among the persona vectors. As in the ARENA text, use
# scikit-learn: `PCA(n_components=2).fit_transform(X)` centres the rows of the numpy array `X`, fits,
# and returns each row's coordinates on the first two components; the fitted object then holds
# `pca.explained_variance_ratio_` (the fraction of the total variance each component explains) and
# `pca.components_` (`[2, d_model]`, unit rows). numpy has no bfloat16: convert with
# `.float().cpu().numpy()`.
#
# Any correct PCA is accepted: your own SVD of the centred vectors (`torch.linalg.svd`, `np.linalg.svd`)
# returning `(pca_coords, explained_variance_ratio, components)` instead of the fitted object, or the
# text's `(assistant_axis, pca_coords, pca)`. A principal component's sign is arbitrary.
#
# > **Difficulty:** 🔴⚪⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵⚪⚪ &nbsp; **Time:** about 10 minutes
# >
# > **Your task:** fit a two-component PCA to the stacked persona vectors and return the coordinates and the
# > fitted object.
#
# <details><summary>Hint</summary>
#
# `X = torch.stack(list(persona_vectors.values())).float().cpu().numpy()`, then `pca = PCA(n_components=2,
# svd_solver="full")` and `coords = pca.fit_transform(X)` (it centres for you).
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_pca", "locked": false, "schema_version": 3, "solution": true, "task": false}
def pca_decompose_persona_vectors(
    persona_vectors: dict[str, Float[Tensor, " d_model"]],
) -> tuple[Float[np.ndarray, "n_personas 2"], PCA]:
    """PCA of the persona vectors: the first two principal components.

    Args:
        persona_vectors: persona name -> [d_model] vector (any float dtype).
    Returns:
        pca_coords: [n_personas, 2], the centred vectors' coordinates on PC1 and PC2, rows in the dict's order.
        pca: the fitted ``sklearn.decomposition.PCA``: ``pca.explained_variance_ratio_`` [2] (fractions of the
            total variance, descending) and ``pca.components_`` [2, d_model] (unit-norm directions).
    """
    ### BEGIN SOLUTION
    vectors = torch.stack(list(persona_vectors.values())).float().cpu().numpy()
    # svd_solver="full": exact and deterministic (for a wide matrix such as 21 x 4608, "auto" picks a
    # randomised solver).
    pca = PCA(n_components=2, svd_solver="full")
    pca_coords = pca.fit_transform(vectors)
    return pca_coords, pca
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_pca", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_pca_decompose_persona_vectors(pca_decompose_persona_vectors)

# %% [markdown]
# ### Exercise 6c: the Assistant Axis
#
# The paper defines the axis as **mean(default vectors) − mean(role vectors)**, normalised to unit
# length, so that it points *toward* the default assistant. (The ARENA text computes it inside its PCA
# function; here it is an exercise of its own.) Then `characterize_axis` gives each persona's cosine
# similarity with the axis, sorted from the lowest (most role-playing) to the highest (most
# assistant-like), as in the text. Pass it centred vectors, so the shared mean does not dominate every
# cosine.
#
# > **Difficulty:** 🔴⚪⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵🔵🔵 &nbsp; **Time:** about 10 minutes
# >
# > **Your task:** compute the unit axis `mean(defaults) - mean(roles)`, and `characterize_axis`: each
# > vector's cosine with the axis, sorted from lowest to highest.
#
# <details><summary>Hint</summary>
#
# Means over dimension 0 in float32, their difference, divided by its norm. For the ranking,
# `dict(sorted(similarities.items(), key=lambda kv: kv[1]))` keeps the order in a dict.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_axis", "locked": false, "schema_version": 3, "solution": true, "task": false}
def compute_assistant_axis(
    default_vectors: Float[Tensor, "n_defaults d_model"], role_vectors: Float[Tensor, "n_roles d_model"]
) -> Float[Tensor, " d_model"]:
    """The Assistant Axis: unit vector along mean(defaults) - mean(roles).

    Args:
        default_vectors: [n_defaults, d_model], any float dtype.
        role_vectors: [n_roles, d_model], any float dtype.
    Returns:
        float32 [d_model], unit norm, pointing toward the defaults.
    """
    ### BEGIN SOLUTION
    mean_default = einops.reduce(default_vectors.float(), "n_defaults d_model -> d_model", "mean")
    mean_role = einops.reduce(role_vectors.float(), "n_roles d_model -> d_model", "mean")
    axis = mean_default - mean_role
    return axis / axis.norm()
    ### END SOLUTION


def characterize_axis(
    persona_vectors: dict[str, Float[Tensor, " d_model"]],
    assistant_axis: Float[Tensor, " d_model"],
) -> dict[str, float]:
    """Cosine similarity of each vector with the axis.

    Args:
        persona_vectors: name -> [d_model] (centred persona vectors, or trait vectors).
        assistant_axis: [d_model]; need not be unit norm.
    Returns:
        name -> cosine similarity (a Python float), ordered from the lowest cosine (most role-playing) to
        the highest. The vectors are taken as given (the notebook centres persona vectors before the call;
        trait vectors are not centred).
    """
    ### BEGIN SOLUTION
    axis = assistant_axis.float()
    similarities = {name: float(vec.float() @ axis / (vec.float().norm() * axis.norm()))
                    for name, vec in persona_vectors.items()}
    return dict(sorted(similarities.items(), key=lambda kv: kv[1]))
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_axis", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.test_compute_assistant_axis(compute_assistant_axis)
checks.test_characterize_axis(characterize_axis)

# %% [markdown]
# Now put it together: the PCA scatter coloured by each persona's projection on the axis, and the
# personas laid out along the axis. **Think first:** if the Assistant Axis is the main thing that varies
# between personas, how should PC1 and the axis projection relate?
#
# <details><summary>Answer</summary>
#
# Nearly the same direction: the projections on PC1 and on the axis should be strongly correlated (|corr| close to 1; the sign of a principal component is arbitrary), and PC1 should explain a large share of the variance. A weak correlation would mean that the largest difference between these personas is something else (length, topic, register) and that the axis is a smaller direction.
#
# </details>

# %%
with timer("geometry"):
    is_default = [n in DEFAULT_PERSONA_NAMES for n in names]
    if not any(is_default) or all(is_default):
        raise RuntimeError("The axis needs at least one default persona and one role with vectors.")
    axis = compute_assistant_axis(vectors[torch.tensor(is_default)], vectors[~torch.tensor(is_default)])
    centre = vectors.mean(dim=0)
    centred = {n: persona_vectors[n] - centre for n in names}
    ranking = list(characterize_axis(centred, axis).items())[::-1]  # most assistant-like first
    projections = (vectors - centre) @ axis  # [n_personas]
    pca_coords, pca = pca_decompose_persona_vectors(persona_vectors)
    explained = pca.explained_variance_ratio_  # [2]
    pc1_axis_corr = float(np.corrcoef(pca_coords[:, 0], projections.numpy())[0, 1])

print(f"PC1 explains {explained[0]:.1%} of the variance, PC2 {explained[1]:.1%}")
print(f"corr(PC1, axis projection) = {pc1_axis_corr:+.3f} (the sign of a principal component is arbitrary)")
print("Along the axis, most assistant-like first:")
for name, cos in ranking:
    print(f"  {cos:+.3f}  {name}")

fig = plots.pca_scatter(pca_coords, explained, names, color=projections, color_label="axis projection",
                        title=f"Persona space: PCA of {len(names)} persona vectors ({MODEL_NAME}, layer {LAYER})")
plots.save(fig, OUT_DIR / "pca_scatter.html")
fig.show()
fig = plots.axis_strip(dict(zip(names, projections.tolist())), defaults=DEFAULT_PERSONA_NAMES,
                       title="Personas along the Assistant Axis (projection of centred vectors)")
plots.save(fig, OUT_DIR / "axis_personas.html")
fig.show()

# %% [markdown]
# ## 7. Traits on the Assistant Axis
#
# Which *traits* point along the axis? The paper builds a vector for each of 240 traits as the mean
# activation with a system prompt that elicits the trait (`pos`) minus the mean with one that
# suppresses it (`neg`), then measures each trait vector's cosine with the axis.
#
# For Gemma 2 27B the paper's precomputed trait vectors are on the Hugging Face hub
# (`lu-christina/assistant-axis-vectors`), and the next cells load them when they can (safely, with
# `weights_only=True`). Anywhere else, or offline, we compute trait vectors for *this* model from the
# paper's trait instructions on a small subset, so the figure still appears. The cell prints which.
#
# ### Exercise 7: a trait vector
#
# > **Difficulty:** 🔴⚪⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵⚪⚪ &nbsp; **Time:** about 5 minutes
# >
# > **Your task:** return `mean(pos) - mean(neg)` in float32.
#
# <details><summary>Hint</summary>
#
# Cast with `.float()` before taking the means (over dimension 0), not after.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_trait", "locked": false, "schema_version": 3, "solution": true, "task": false}
def compute_trait_vector(
    pos_activations: Float[Tensor, "n_pos d_model"], neg_activations: Float[Tensor, "n_neg d_model"]
) -> Float[Tensor, " d_model"]:
    """mean(pos) - mean(neg), in float32 whatever the inputs' dtype.

    Args:
        pos_activations: [n_pos, d_model], responses under the trait-eliciting prompts.
        neg_activations: [n_neg, d_model], responses under the trait-suppressing prompts.
    Returns:
        float32 [d_model].
    """
    ### BEGIN SOLUTION
    mean_pos = einops.reduce(pos_activations.float(), "n_pos d_model -> d_model", "mean")
    mean_neg = einops.reduce(neg_activations.float(), "n_neg d_model -> d_model", "mean")
    return mean_pos - mean_neg
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_trait", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
checks.test_compute_trait_vector(compute_trait_vector)

# %%
from utils.traits import TRAITS_SUBSET, load_precomputed_trait_vectors

with timer("traits"):
    trait_vectors, trait_source = load_precomputed_trait_vectors(MODEL_NAME, LAYER)
    if trait_vectors is None:
        trait_names = TRAITS_SUBSET[:N_TRAITS]
        trait_questions = QUESTIONS[: min(4, len(QUESTIONS))]
        all_traits = load_traits()
        trait_personas = {}
        for t in trait_names:
            trait_personas[f"{t}+"] = all_traits[t].pos_prompts[0]
            trait_personas[f"{t}-"] = all_traits[t].neg_prompts[0]
        trait_responses, trait_failures = generate_all_responses(
            generation_client, generation_model, trait_personas, trait_questions, max_workers=32,
            max_tokens=MAX_NEW_TOKENS, temperature=0.7, top_p=0.9)
        trait_responses = dict(sorted(trait_responses.items()))
        if trait_failures:
            print(f"{len(trait_failures)} trait generations failed, e.g. {next(iter(trait_failures.items()))}")
        trait_vectors = {}
        for t in trait_names:
            sides = {}
            for sign in "+-":
                keys = [k for k in trait_responses if k[0] == f"{t}{sign}"]
                if not keys:
                    raise RuntimeError(f"Trait {t!r} has no {sign} responses left; see the failures above.")
                convs = [[{"role": "system", "content": trait_personas[k[0]]},
                          {"role": "user", "content": trait_questions[k[1]]},
                          {"role": "assistant", "content": trait_responses[k]}] for k in keys]
                sides[sign] = extract_response_activations_batched(model, tokenizer, convs, LAYER)
            trait_vectors[t] = compute_trait_vector(sides["+"], sides["-"])
        trait_source = (f"computed for {MODEL_NAME} at layer {LAYER} from the paper's trait instructions "
                        f"({len(trait_names)} traits x {len(trait_questions)} questions x 1 prompt pair)")
print("Trait vectors:", trait_source)
trait_ranking = list(characterize_axis(trait_vectors, axis).items())[::-1]  # toward the assistant first
fig = plots.trait_bars(trait_ranking, title=f"Trait vectors' cosine with the Assistant Axis ({trait_source[:40]}...)")
plots.save(fig, OUT_DIR / "traits_on_axis.html")
fig.show()

# %% [markdown]
# ## 8. Controls: how much of this is just wording?
#
# A persona vector is computed on the **model's own words**. A bard's answer uses different words from
# an analyst's, so some of the separation could come from the tokens alone, not from anything the model
# represents about *who it is*. Two controls:
#
# 1. **Embeddings only.** Average the *token embeddings* (layer "-1", no computation at all) over the
#    same responses. If this separates the personas, the words alone carry the signal.
# 2. **No system prompt.** Re-encode the same responses with the persona's system prompt removed. The
#    model now reads a bard's words without being told it is a bard. If this still separates the
#    personas, the mid-layer signal is mostly about the text being read.
#
# We measure separation with an AUC: how well the axis projection ranks the defaults and assistant-like
# roles above the fantastical ones (1.0 = perfectly).
#
# ### Exercise 8: AUC
#
# > **Difficulty:** 🔴🔴⚪⚪⚪ &nbsp; **Importance:** 🔵🔵🔵⚪⚪ &nbsp; **Time:** about 10 minutes
# >
# > **Your task:** compute the AUC as the fraction of (positive, negative) pairs in which the positive scores
# > higher, ties counting one half; raise a `ValueError` if a class is empty.
#
# <details><summary>Hint</summary>
#
# `diff = pos[:, None] - neg[None, :]` holds every pair at once; the AUC is the mean of `(diff > 0) + 0.5 *
# (diff == 0)` (as floats). Use float64 for the comparisons.
#
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex_auc", "locked": false, "schema_version": 3, "solution": true, "task": false}
def axis_auc(scores: Float[Tensor, " n"], positive: Bool[Tensor, " n"]) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random negative.

    Args:
        scores: [n] float, e.g. projections on the axis.
        positive: [n] bool, True for the positive class (assistant-like).
    Returns:
        AUC in [0, 1], a Python float; ties count one half.
    Raises:
        ValueError: if either class is empty.
    """
    ### BEGIN SOLUTION
    pos, neg = scores[positive].double(), scores[~positive].double()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs at least one positive and one negative example.")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "check_auc", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
checks.test_axis_auc(axis_auc)

# %%
from utils.activations import extract_mean_activations, extract_mean_embeddings

assistant_like = set(DEFAULT_PERSONA_NAMES) | set(ASSISTANT_LIKE_ROLES)
separated = [n for n in names if n in assistant_like or n in FANTASTICAL_ROLES]
labels = torch.tensor([n in assistant_like for n in separated])


def axis_projections(vecs: dict[str, Float[Tensor, " d_model"]]) -> Float[Tensor, " n_separated"]:
    """Projection of each persona in ``separated`` on the axis built from these vectors."""
    stacked = torch.stack([vecs[n] for n in names])
    default_mask = torch.tensor([n in DEFAULT_PERSONA_NAMES for n in names])
    ax = compute_assistant_axis(stacked[default_mask], stacked[~default_mask])
    centre_ = stacked.mean(dim=0)
    return torch.stack([(vecs[n] - centre_) @ ax for n in separated])


def vectors_from(per_response: Float[Tensor, "n_responses d_model"],
                 keys: list[tuple[str, int]]) -> dict[str, Float[Tensor, " d_model"]]:
    return {n: per_response[[i for i, k in enumerate(keys) if k[0] == n]].mean(dim=0) for n in names}


with timer("controls"):
    kept_keys = [k for k in judged_responses if k[0] in ACTIVE and (k not in scores or scores[k] >= MIN_SCORE)]
    with_prompt = [[{"role": "system", "content": PERSONAS[p]}, {"role": "user", "content": QUESTIONS[q]},
                    {"role": "assistant", "content": responses[(p, q)]}] for p, q in kept_keys]
    without_prompt = [[{"role": "user", "content": QUESTIONS[q]}, {"role": "assistant", "content": responses[(p, q)]}]
                      for p, q in kept_keys]
    control_vectors = {
        "residual stream, with system prompt (main result)": persona_vectors,
        "token embeddings only": vectors_from(extract_mean_embeddings(model, tokenizer, with_prompt), kept_keys),
        "residual stream, system prompt removed": vectors_from(
            extract_mean_activations(model, tokenizer, without_prompt, LAYER), kept_keys),
    }
    main_proj = axis_projections(persona_vectors)
    control_results = {}
    for label, vecs in control_vectors.items():
        proj = axis_projections(vecs)
        control_results[label] = {
            "auc": axis_auc(proj, labels),
            "corr_with_main": float(np.corrcoef(proj.numpy(), main_proj.numpy())[0, 1]),
        }
for label, r in control_results.items():
    print(f"{label:52s} AUC {r['auc']:.3f}   corr with main projection {r['corr_with_main']:+.3f}")
fig = plots.control_bars(control_results, title="Does the axis survive the controls? (AUC, assistant-like vs fantastical)")
plots.save(fig, OUT_DIR / "controls.html")
fig.show()

# %% [markdown]
# ### What the controls say
#
# On SmolLM2-135M, both controls typically still separate the personas almost as well as the main
# result. Be honest about what that means: **at this scale, the axis mostly reflects the wording of the
# responses**. A bard writes like a bard, and a model that reads bard-like text represents it as
# bard-like, whether or not it was told to be one. That does not make the geometry wrong, but it limits
# the claim: the paper's stronger claims (that the axis is a property of the *model's persona*, that
# steering along it changes behaviour, that drift along it predicts harmful outputs) need the larger
# model, the full dataset and the causal experiments of later parts.
#
# **Think first:** which control would you expect to drop the most on Gemma 2 27B, and why?
#
# <details><summary>Answer</summary>
#
# If the paper is right that a large model represents *who it is speaking as*, the **no-system-prompt**
# control should fall furthest below the main result: without the prompt, the model reads a bard's words but
# was never told it is the bard. Token embeddings can only carry wording, so they bound from below what
# wording alone gives. On SmolLM2 neither control drops much. Which one drops on Gemma 2 27B is an experiment,
# not a given: run this section on the GPU path to find out.
#
# </details>

# %% [markdown]
# ## Saving for Part 2
#
# Part 2 starts from here. The next cell saves, to `out/part1/part1_results.safetensors` + `.json`: every kept
# response's mean activation at **every** layer (one more pass, over all the blocks, with the course's fast
# extraction), the persona vectors and the Assistant Axis per layer, and the default responses' activations
# (Part 2's capping thresholds are percentiles of their projections). Its time counts in the summary.

# %%
from utils.part1_results import save_part1_results

with timer("all_layers"):
    # The kept responses as conversations, as the controls section built them (`kept_keys`, `with_prompt`).
    saved_acts = extract_mean_activations(model, tokenizer, with_prompt, list(range(NUM_LAYERS)),
                                          desc="all layers")  # [n_kept, n_layers, d_model]
    rows = {n: [i for i, k in enumerate(kept_keys) if k[0] == n] for n in names}
    all_layer_vectors = torch.stack([saved_acts[rows[n]].mean(dim=0) for n in names])  # [n_personas, n_layers, d_model]
    default_rows = torch.tensor([n in DEFAULT_PERSONA_NAMES for n in names])
    saved = save_part1_results(
        OUT_DIR, model_name=MODEL_NAME, layer=LAYER, names=names, persona_vectors=all_layer_vectors,
        default_names=[n for n in names if n in DEFAULT_PERSONA_NAMES],
        axis=all_layer_vectors[default_rows].mean(dim=0) - all_layer_vectors[~default_rows].mean(dim=0),
        default_activations=saved_acts[[i for i, k in enumerate(kept_keys) if k[0] in DEFAULT_PERSONA_NAMES]],
        extra={"computed_by": "Part 1's notebook", "judge": judge_model, "min_score": MIN_SCORE,
               "n_questions": len(QUESTIONS), "max_new_tokens": MAX_NEW_TOKENS})
print(f"Saved Part 1's results for Part 2: {saved} ({len(names)} personas x {NUM_LAYERS} layers, "
      f"{timer.seconds()['all_layers']} s for the pass over every layer)")

# %% [markdown]
# ## Summary
#
# The last cell writes `out/part1/summary.json` (the figures are HTML files beside it). Compare with
# the paper: on Gemma 2 27B, PC1 of the role vectors is the Assistant Axis, the defaults sit at one
# end, and fantastical characters at the other.

# %%
summary = {
    "model": MODEL_NAME,
    "layer": LAYER,
    "layer_convention": "output of model.model.layers[layer] = hidden_states[layer + 1]",
    "n_personas": len(names),
    "n_questions": len(QUESTIONS),
    "n_responses": len(responses),
    "n_generation_failures": len(failures),
    "n_judge_failures": len(judge_failures),
    "min_score": MIN_SCORE,
    "judge": judge_model,
    "pc1_explained_variance": float(explained[0]),
    "pc2_explained_variance": float(explained[1]) if len(explained) > 1 else None,
    "pc1_axis_abs_corr": abs(pc1_axis_corr),
    "axis_auc": control_results["residual stream, with system prompt (main result)"]["auc"],
    "persona_order": [name for name, _ in ranking],
    "trait_source": trait_source,
    "traits_toward_assistant": [t for t, _ in trait_ranking[:3]],
    "traits_away_from_assistant": [t for t, _ in trait_ranking[-3:]],
    "controls": control_results,
    "seconds": timer.seconds(),
}
(OUT_DIR / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))  # NaN is an error, never JSON
print(json.dumps(summary, indent=2))
