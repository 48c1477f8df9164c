"""Part 2's experiments: replaying transcripts, steering sweeps, the cost of capping, harm judging.

- :func:`replay_user_turns`: keep a transcript's user turns, let the model write its own replies
  (optionally under an intervention such as :func:`utils.steering.capping`).
- :func:`steering_sweep` and :func:`dose_response`: generate under ``coeff * unit axis`` for a range of
  coefficients, judge the replies with the paper's role judge, project them on the axis, aggregate.
- :func:`next_token_kl`: what capping costs on ordinary use, as KL(uncapped || capped) of the
  next-token distributions, plus the fraction of positions capped.
- :func:`first_below` and :func:`slope`: small summaries of a per-turn projection series.
- :func:`self_description` and :func:`self_description_rates`: a transparent keyword stand-in for what
  steering changes in the text: does a reply describe itself as an AI, or as a person or character?

Every intervention is passed as a zero-argument callable returning a context manager, e.g.
``lambda: capping(model, axes, thresholds)``, so a fresh one is entered (and its hooks removed in
its ``finally``) around each generation or forward pass, and nowhere else.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager

import torch
from jaxtyping import Float
from torch import Tensor

from tqdm.auto import tqdm

from utils.activations import decoder_layers, extract_mean_activations, unit_vector
from utils.conversation import ChatFormatError, Message, TurnTooLongError, chat_messages, encode, render
from utils.data import load_roles
from utils.generation import generate
from utils.judges import judge_score
from utils.models import context_length
from utils.runtime import run_parallel
from utils.steering import steering

__all__ = [
    "EmptyReplyError",
    "dose_response",
    "first_below",
    "fit_history",
    "next_token_kl",
    "replay_user_turns",
    "self_description",
    "self_description_rates",
    "slope",
    "steering_sweep",
]

Intervention = Callable[[], AbstractContextManager]


class EmptyReplyError(RuntimeError):
    """The model wrote an empty reply where the experiment needs text."""


# ---------------------------------------------------------------------------------------------------
# Replaying a transcript's user turns
# ---------------------------------------------------------------------------------------------------

def _prompt_length(messages: Sequence[Message], tokenizer) -> int:
    return len(encode(render(list(messages), tokenizer, add_generation_prompt=True), tokenizer))


def fit_history(messages: Sequence[Message], tokenizer, max_tokens: int) -> list[Message]:
    """The longest suffix of *whole* turns of ``messages`` whose generation prompt fits in ``max_tokens``.

    ``messages`` is an optional system prompt, then user/assistant turns alternating, ending with the
    user turn to answer. Rule: drop the oldest (user, assistant) pairs, one pair at a time from the
    start, until the templated prompt (with the generation prompt) has at most ``max_tokens`` tokens.
    The system prompt is kept while system + the last user turn fits; otherwise it is dropped too.
    No turn is ever cut.

    Returns:
        the kept messages (new list; the dicts are the caller's).

    Raises:
        utils.conversation.TurnTooLongError: the last user turn alone does not fit.
    """

    messages = list(messages)
    if not messages or messages[-1]["role"] != "user":
        raise ChatFormatError("fit_history needs a conversation that ends with the user turn to answer.")
    system = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(system):]
    for keep_system in ([True, False] if system else [False]):
        head = system if keep_system else []
        for start in range(0, len(body), 2):  # body[start] is always a user turn
            candidate = head + body[start:]
            if _prompt_length(candidate, tokenizer) <= max_tokens:
                return candidate
    n = _prompt_length(body[-1:], tokenizer)
    raise TurnTooLongError(f"The last user turn alone needs {n} prompt tokens, more than max_tokens={max_tokens}; "
                           "it cannot be answered without cutting it. Raise the budget (a smaller max_new_tokens) "
                           "or shorten that turn.")


def replay_user_turns(
    model,
    tokenizer,
    messages: Sequence[Message],
    *,
    max_new_tokens: int = 64,
    intervention: Intervention | None = None,
    seed: int = 0,
    max_turns: int | None = None,
    temperature: float = 0.0,
    progress: bool = True,
    max_context: int | None = None,
) -> list[Message]:
    """Answer a transcript's user turns with the model's OWN replies, one turn at a time.

    The transcript's system prompt (if any) and its user turns are kept; its assistant turns are
    discarded. For user turn ``i`` the model sees the system prompt, the earlier user turns with its
    own earlier replies, and user turn ``i``, and generates ``max_new_tokens`` tokens at most.

    Context windowing (:func:`fit_history`): when that history does not fit in
    ``max_context - max_new_tokens`` tokens, the oldest whole (user, reply) pairs are dropped from the
    start until it does; the system prompt stays as long as it fits with the current user turn. A turn
    is never cut: a user turn that does not fit alone raises :class:`utils.conversation.TurnTooLongError`.
    The returned conversation always holds every turn; windowing only changes what the model reads.

    Args:
        model, tokenizer: the model that generates (the intervention's hooks must be on this model).
        messages: a transcript (e.g. :func:`utils.transcripts.load_transcript`): optional system
            prompt, then user/assistant turns.
        max_new_tokens: the longest reply, in tokens.
        intervention: a zero-argument callable returning a context manager (e.g.
            ``lambda: capping(model, axes, thresholds)``); entered around each generation only.
        seed: turn ``i`` is generated with seed ``seed + i`` (matters only when sampling).
        max_turns: replay only the first ``max_turns`` user turns (default: all).
        temperature: 0 (default) is greedy decoding, so runs with and without an intervention differ
            only through the intervention.
        progress: a tqdm bar over turns.
        max_context: the context length to fit in; default :func:`utils.models.context_length`
            (``max_position_embeddings``, at most 8192).

    Returns:
        the new conversation: ``[system?] + [user_0, reply_0, user_1, reply_1, ...]`` with
        ``min(n_user_turns, max_turns)`` user turns, each followed by the model's reply (stripped).

    Raises:
        ValueError: no user turns, a bad ``max_turns``/``max_new_tokens``, or an intervention that is
            not a callable returning a context manager.
        EmptyReplyError: the model wrote nothing for a turn (an empty assistant turn has no tokens to
            project); the message names the turn.
    """

    messages = list(messages)
    if not messages:
        raise ValueError("replay_user_turns got an empty conversation.")
    system = [dict(messages[0])] if messages[0]["role"] == "system" else []
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("The transcript has no user turns to replay.")
    if max_turns is not None:
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be a positive int or None; got {max_turns!r}.")
        users = users[:max_turns]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}.")
    if intervention is not None and not callable(intervention):
        raise ValueError("intervention must be a zero-argument callable returning a context manager, e.g. "
                         "`lambda: capping(model, axes, thresholds)`, not the context manager itself.")
    budget = (max_context or context_length(model)) - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of "
                         f"{max_context or context_length(model)} tokens.")

    conversation: list[Message] = list(system)
    for i, user in enumerate(tqdm(users, desc="replay", unit="turn", disable=not progress)):
        conversation.append({"role": "user", "content": user})
        prompt = fit_history(conversation, tokenizer, budget)
        with _entered(intervention):
            reply = generate(model, tokenizer, [prompt], max_new_tokens, temperature, seed=seed + i)[0]
        if not reply.strip():
            raise EmptyReplyError(f"The model wrote an empty reply to user turn {i + 1} (counting from 1); an empty "
                                  "assistant turn has no tokens to project. Try a larger max_new_tokens or another seed.")
        conversation.append({"role": "assistant", "content": reply})
    return conversation


@contextlib.contextmanager
def _entered(intervention: Intervention | None):
    """Enter ``intervention()`` (or nothing) for the duration of the block."""
    if intervention is None:
        yield
        return
    manager = intervention()
    if not hasattr(manager, "__enter__") or not hasattr(manager, "__exit__"):
        raise ValueError(f"intervention() returned a {type(manager).__name__}, not a context manager: pass a "
                         "zero-argument callable such as `lambda: capping(model, axes, thresholds)`.")
    with manager:
        yield


# ---------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------
# Steering sweep
# ---------------------------------------------------------------------------------------------------

def _is_default(name: str, defaults: Collection[str] | None) -> bool:
    return name in defaults if defaults is not None else name.startswith("default")


def steering_sweep(
    model,
    tokenizer,
    personas: Mapping[str, str],
    questions: Sequence[str],
    axis: Float[Tensor, " d_model"],
    layer: int,
    coefficients: Sequence[float],
    *,
    max_new_tokens: int = 48,
    judge_client,
    judge_model: str,
    seed: int = 0,
    positions: str = "all",
    progress: bool = True,
    batch_size: int = 32,
    temperature: float = 0.0,
    default_personas: Collection[str] | None = None,
    judge_prompts: Mapping[str, str] | None = None,
    max_workers: int = 16,
) -> list[dict]:
    """Generate under ``steering(model, {layer: coeff * unit_axis}, positions)`` for every persona x question x coefficient.

    For each coefficient, every (persona, question) conversation is generated in batches of
    ``batch_size`` (greedy by default) with the steering hook active, then the hook is removed.
    Then, with no hook:

    - **judge**: each role persona's reply is judged with the paper's judge prompt for that role
      (``utils.data.load_roles()[persona].judge_prompt``, or ``judge_prompts[persona]``, with
      ``{question}``/``{answer}`` slots) through ``judge_client`` (:class:`utils.judges.OfflineRuleJudge`
      offline); the reply must be a bare 0-3 number or ``<score>N</score>``. Default personas are not
      judged (``score`` None), as in Part 1. A judge failure gives ``score`` None and a ``judge_error``.
    - **project**: the conversation (system prompt, question, reply) is re-encoded without steering,
      its mean block output at ``layer`` over the reply's content tokens
      (:func:`utils.activations.extract_mean_activations`) is projected on the unit axis.

    Args:
        personas: ``{name: system prompt}``; names for which ``default_personas`` (default: names starting
            with ``"default"``) holds are default personas.
        questions: the questions asked.
        axis: ``[d_model]``, the axis at ``layer`` (normalised here).
        layer: the steered and projected block (output of ``model.model.layers[layer]``).
        coefficients: absolute coefficients (the caller converts from units of the spread of Part 1's
            projections); the steering vector is ``coeff * axis / |axis|``. 0 runs with no hook.
        max_new_tokens, temperature, seed: generation settings; batch ``b`` of coefficient ``c`` uses
            seed ``seed + b`` (the same for every coefficient, so greedy runs differ only by the steering).
        positions: ``"all"`` or ``"generated"`` (see :func:`utils.steering.intervene`).
        judge_client, judge_model: the role judge.
        batch_size: conversations per ``generate`` call.

    Returns:
        one record per persona x question x coefficient (coefficient-major order):
        ``{"persona", "question", "coefficient", "default", "text", "score", "projection"}``, plus
        ``"judge_error"`` when judging failed. An empty reply keeps ``text`` ``""`` with ``score`` and
        ``projection`` None and an ``"error"``; it is never judged or projected.
    """

    if not personas or not questions or not len(coefficients):
        raise ValueError("steering_sweep needs at least one persona, one question and one coefficient.")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(decoder_layers(model)):
        raise ValueError(f"layer must be an int in 0..{len(decoder_layers(model)) - 1}; got {layer!r}.")
    unit = unit_vector(axis, int(model.config.hidden_size))
    coefficients = [float(c) for c in coefficients]
    if not all(math.isfinite(c) for c in coefficients):
        raise ValueError(f"coefficients must be finite numbers; got {coefficients}.")
    if len(set(coefficients)) != len(coefficients):
        raise ValueError(f"coefficients has duplicates: {coefficients}.")
    roles = load_roles()
    prompts: dict[str, str] = {}
    for name in personas:
        if _is_default(name, default_personas):
            continue
        if judge_prompts is not None and name in judge_prompts:
            prompts[name] = judge_prompts[name]
        elif name in roles:
            prompts[name] = roles[name].judge_prompt
        else:
            raise ValueError(f"Persona {name!r} is not one of the paper's roles, so it has no judge prompt: pass "
                             "judge_prompts={name: prompt with {question} and {answer}} or mark it as a default "
                             "persona with default_personas=.")

    pairs = [(name, q) for name in personas for q in questions]
    convs = [chat_messages(personas[name], q) for name, q in pairs]
    chunks = [list(range(i, min(i + batch_size, len(convs)))) for i in range(0, len(convs), batch_size)]
    records: list[dict] = []
    bar = tqdm(total=len(coefficients) * len(convs), desc="steering sweep: generate", unit="reply", disable=not progress)
    with bar:
        for coeff in coefficients:
            for b, chunk in enumerate(chunks):
                manager = (contextlib.nullcontext() if coeff == 0.0
                           else steering(model, {layer: coeff * unit}, positions=positions))
                with manager:
                    texts = generate(model, tokenizer, [convs[i] for i in chunk], max_new_tokens,
                                                    temperature, seed=seed + b)
                for i, text in zip(chunk, texts):
                    name, q = pairs[i]
                    records.append({"persona": name, "question": q, "coefficient": coeff,
                                    "default": _is_default(name, default_personas), "text": text,
                                    "score": None, "projection": None})
                bar.update(len(chunk))

    filled = [i for i, r in enumerate(records) if r["text"].strip()]
    for r in records:
        if not r["text"].strip():
            r["error"] = "empty reply: not judged or projected"

    # Project the generated text, re-encoded with no steering.
    if filled:
        convs_done = [chat_messages(personas[records[i]["persona"]], records[i]["question"], records[i]["text"])
                      for i in filled]
        means = extract_mean_activations(model, tokenizer, convs_done, layer, progress=progress,
                                         desc="steering sweep: project")
        for i, value in zip(filled, (means @ unit).tolist()):
            records[i]["projection"] = value

    # Judge the role personas' replies.
    def judge(i: int) -> int:
        r = records[i]
        prompt = prompts[r["persona"]].format(question=r["question"], answer=r["text"])
        return judge_score(judge_client, judge_model, prompt, "a role score")

    to_judge = [i for i in filled if not records[i]["default"]]
    scores, failures = run_parallel(judge, to_judge, max_workers=max_workers, desc="steering sweep: judge",
                                    progress=progress)
    for i, score in scores.items():
        records[i]["score"] = score
    for i, error in failures.items():
        records[i]["judge_error"] = error
    return records


def dose_response(records: Sequence[Mapping]) -> dict[float, dict]:
    """Aggregate :func:`steering_sweep` records per coefficient.

    Returns:
        ``{coefficient: {"mean_projection", "role_rate", "n", "n_role", "n_role_judged", "n_projected"}}``,
        coefficients in increasing order, where

        - ``mean_projection``: mean ``projection`` over the records at that coefficient whose projection
          is not None (``n_projected`` of them), all personas together; None if there are none;
        - ``role_rate``: among the records of NON-default personas (``record["default"]`` False, or when
          a record has no ``"default"`` key, a persona name not starting with ``"default"``) whose
          ``score`` is not None (``n_role_judged`` of them, out of ``n_role`` role records), the
          fraction with ``score == 3`` (fully playing the role); None if none was judged;
        - ``n``: all records at that coefficient.
    """
    if not records:
        raise ValueError("dose_response got no records; run steering_sweep first.")
    groups: dict[float, list[Mapping]] = {}
    for k, r in enumerate(records):
        missing = {"persona", "coefficient", "score", "projection"} - set(r)
        if missing:
            raise ValueError(f"Record {k} lacks {sorted(missing)}; records come from steering_sweep.")
        groups.setdefault(float(r["coefficient"]), []).append(r)
    out: dict[float, dict] = {}
    for coeff in sorted(groups):
        rs = groups[coeff]
        projections = [float(r["projection"]) for r in rs if r["projection"] is not None]
        role = [r for r in rs if not r.get("default", str(r["persona"]).startswith("default"))]
        judged = [r for r in role if r["score"] is not None]
        out[coeff] = {
            "mean_projection": sum(projections) / len(projections) if projections else None,
            "role_rate": sum(int(r["score"]) == 3 for r in judged) / len(judged) if judged else None,
            "n": len(rs),
            "n_role": len(role),
            "n_role_judged": len(judged),
            "n_projected": len(projections),
        }
    return out


# ---------------------------------------------------------------------------------------------------
# The cost of an intervention
# ---------------------------------------------------------------------------------------------------

def next_token_kl(
    model,
    tokenizer,
    conversations: Sequence[Sequence[Message]],
    intervention: Intervention,
    *,
    stats=None,
    batch_size: int = 8,
    progress: bool = True,
    return_values: bool = False,
) -> dict:
    """KL(uncapped || capped) between next-token distributions at every position of each conversation.

    Each conversation is rendered with the chat template (no generation prompt) and tokenised; batches
    of ``batch_size`` are right-padded with an attention mask. Per batch there is one forward pass of
    the unmodified model and one inside ``intervention()``; at every real (non-padding) position ``t``,
    with ``p`` and ``q`` the two next-token distributions (``log_softmax`` in float32),
    ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` in nats.

    Args:
        conversations: ``n`` chat conversations (e.g. default-persona Q&A).
        intervention: a zero-argument callable returning a context manager that changes the forward
            pass at every position (e.g. ``lambda: capping(model, axes, taus, stats=stats)``). An
            intervention with ``positions="generated"`` raises: these passes use no KV cache.
        stats: the :class:`utils.steering.CapStats` the intervention counts into; the fraction of
            positions capped during THIS call's intervened passes is reported (counts from earlier
            uses of the same object are subtracted).
        batch_size: conversations per forward pass (memory ~ ``batch x seq x vocab`` float32 logits).
        return_values: also return ``"kl_values"``, the float32 ``[n_positions]`` per-position KLs
            (conversation order), e.g. for :func:`utils.plots.kl_histogram`.

    Returns:
        ``{"kl_mean", "kl_p95", "kl_max", "n_positions"}`` over all positions of all conversations
        (``kl_p95`` the 95th percentile, linear interpolation), plus ``"fraction_capped"`` (in [0, 1])
        when ``stats`` is given.
    """

    if not conversations:
        raise ValueError("next_token_kl got no conversations.")
    if not callable(intervention):
        raise ValueError("intervention must be a zero-argument callable returning a context manager, e.g. "
                         "`lambda: capping(model, axes, thresholds, stats=stats)`.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    encoded = []
    for k, conv in enumerate(conversations):
        ids = encode(render(list(conv), tokenizer), tokenizer)
        if len(ids) < 1:
            raise ChatFormatError(f"Conversation {k} renders to no tokens.")
        encoded.append(ids)
    seen0 = capped0 = 0
    if stats is not None:
        seen0, capped0 = stats.seen(), stats.capped()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = model.get_input_embeddings().weight.device
    kls: list[Tensor] = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(encoded), batch_size), desc="next-token KL", unit="batch",
                          disable=not progress):
            batch = encoded[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in batch], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=device)
            clean = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            with _entered(intervention):
                changed = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            real = mask.bool()
            for row in range(len(batch)):  # one row at a time keeps the float32 copies small
                logp = torch.log_softmax(clean[row][real[row]].float(), dim=-1)
                logq = torch.log_softmax(changed[row][real[row]].float(), dim=-1)
                kls.append((logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0).cpu())
            del clean, changed
    kl = torch.cat(kls).double()
    out = {"kl_mean": float(kl.mean()), "kl_p95": float(torch.quantile(kl, 0.95)), "kl_max": float(kl.max()),
           "n_positions": int(kl.numel())}
    if stats is not None:
        seen, capped = stats.seen() - seen0, stats.capped() - capped0
        if seen == 0:
            raise ValueError("stats saw no positions during the intervened passes: pass the same CapStats to the "
                             "intervention, e.g. `lambda: capping(model, axes, taus, stats=stats)`.")
        out["fraction_capped"] = capped / seen
    if return_values:
        out["kl_values"] = kl.float()
    return out


# ---------------------------------------------------------------------------------------------------
# Summaries of a per-turn projection series
# ---------------------------------------------------------------------------------------------------

def _series(projections, what: str) -> list[float]:
    values = torch.as_tensor(projections, dtype=torch.float64).detach().cpu()
    if values.ndim != 1:
        raise ValueError(f"{what} needs a 1-D series of per-turn projections; got shape {tuple(values.shape)}.")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{what}: the projections contain NaN or infinite values.")
    return values.tolist()


def first_below(projections: Float[Tensor, " n_turns"] | Sequence[float], threshold: float) -> int | None:
    """The index (0-based, in assistant turns) of the first projection strictly below ``threshold``, or None."""
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold}.")
    for i, value in enumerate(_series(projections, "first_below")):
        if value < threshold:
            return i
    return None


def slope(projections: Float[Tensor, " n_turns"] | Sequence[float]) -> float:
    """Least-squares slope of projection against assistant-turn index ``0, 1, ..., n-1`` (change per turn).

    ``sum((x - mean x)(y - mean y)) / sum((x - mean x)^2)`` with ``x`` the turn index; needs at least 2 turns.
    """
    ys = _series(projections, "slope")
    n = len(ys)
    if n < 2:
        raise ValueError(f"slope needs at least 2 turns; got {n}.")
    x_mean, y_mean = (n - 1) / 2, sum(ys) / n
    num = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(ys))
    den = sum((i - x_mean) ** 2 for i in range(n))
    return num / den


# ---------------------------------------------------------------------------------------------------
# How a reply describes itself: a keyword stand-in for what steering changes
# ---------------------------------------------------------------------------------------------------

# Each cue is a regular expression matched case-insensitively (the name cue keeps its capital letter with
# "(?-i:...)"). "ai": the reply speaks of itself as an AI or an assistant; "human": as a person or a character
# (a name, a title, a body, a life, memories).
_AI_WORDS = r"(?:ai|artificial|language|model|assistant|chatbot|bot|program|machine|computer|software)"
_NOT_AI_SOON = r"(?!(?:[\w'-]+[ ,]+){0,6}?" + _AI_WORDS + r"\b)"  # no AI word in the next few words
_AI_NAMES = r"(?:smollm\w*|gemma|qwen|llama|chatgpt|gpt|claude)"
SELF_DESCRIPTION_CUES = {
    "ai": (
        r"\b(?:i am|i'm) (?:an? |just an? |only an? )?(?:[\w'-]+[ ,]+){0,4}?(?:ai|artificial intelligence|"
        r"language model|llm|chatbot|assistant|computer program|program|machine|bot)\b",
        r"\bas an? (?:ai|artificial intelligence|(?:large )?language model|llm|chatbot|(?:ai |virtual |digital )?"
        r"assistant)\b",
        r"\b(?:i am|i'm|my name is) " + _AI_NAMES + r"\b",
        r"\bi (?:don't|do not|can't|cannot) (?:have|experience|feel) (?:personal |real |human |any )?(?:feelings|"
        r"emotions|opinions|experiences|beliefs|a body|consciousness|preferences)\b",
        r"\b(?:i was|i've been|i have been|i am|i'm) (?:specifically )?(?:created|designed|trained|programmed|"
        r"developed|built)\b",
        r"\b(?:here to (?:help|assist)|how (?:can|may) i (?:help|assist))\b",
    ),
    "human": (
        r"\b(?:i am|i'm|i was|i've been|i have been) (?:a|an|the) " + _NOT_AI_SOON + r"[\w-]+",
        r"(?-i:\b(?:I am|I'm|[Mm]y name is|[Cc]all me) (?!" + r"(?:SmolLM|Gemma|Qwen|Llama|ChatGPT|GPT|Claude)"
        r"\b)[A-Z][a-z]+)",
        r"\bmy (?:heart|soul|body|hands|eyes|voice|family|friends|childhood|home|mother|father|wife|husband|name|"
        r"life|days|years|journey|travels|songs?|tales?|spirit|craft|people|kingdom|village)\b",
        r"\bi (?:remember|dreamed|dream of|grew up|was born|lived|wander(?:ed)?|sang|died|once was|used to be|"
        r"have seen|have lived|have wandered)\b",
        r"\b(?:as a|being a) (?:human|person|mortal|man|woman|spirit|ghost|traveller|traveler|storyteller)\b",
    ),
}
_SELF_RE = {k: [re.compile(p, re.IGNORECASE) for p in ps] for k, ps in SELF_DESCRIPTION_CUES.items()}


def self_description(text: str) -> int:
    """How ``text`` describes its speaker, from :data:`SELF_DESCRIPTION_CUES`: +1, -1 or 0.

    +1: an AI or assistant cue matches ("I'm an AI", "I'm a chatbot designed to ...", "as a language
    model", "I don't have feelings", "here to help", ...) and no human/role cue does; -1: a human or role cue
    matches ("I am a bard", "I am the Keeper of ...", "I am Zorvath", "my heart", "I remember", "I grew up",
    ...) and no AI cue does; 0: neither, or both.

    A keyword STAND-IN, not a judge: it reads words, not meaning (irony, quotes and paraphrase fool it), and
    a reply that does not talk about itself scores 0. Use it to see whether steering changes how replies
    describe themselves, not to rate a single reply.
    """
    if not isinstance(text, str):
        raise ValueError(f"self_description needs the reply's text (a str); got {type(text).__name__}.")
    ai = any(p.search(text) for p in _SELF_RE["ai"])
    human = any(p.search(text) for p in _SELF_RE["human"])
    return int(ai) - int(human)


def self_description_rates(records: Sequence[Mapping]) -> dict[float, dict]:
    """Per coefficient of :func:`steering_sweep` records: how the replies describe themselves.

    Returns:
        ``{coefficient: {"ai_rate", "human_rate", "n"}}``, coefficients in increasing order: among the ``n``
        records with a non-empty ``text`` (all personas), the fraction that :func:`self_description` scores
        +1 (``ai_rate``) and -1 (``human_rate``); both None when ``n`` is 0.
    """
    if not records:
        raise ValueError("self_description_rates got no records; run steering_sweep first.")
    groups: dict[float, list[int]] = {}
    for k, r in enumerate(records):
        if "coefficient" not in r or "text" not in r:
            raise ValueError(f"Record {k} lacks 'coefficient' or 'text'; records come from steering_sweep.")
        groups.setdefault(float(r["coefficient"]), [])
        if r["text"].strip():
            groups[float(r["coefficient"])].append(self_description(r["text"]))
    return {c: {"ai_rate": sum(v == 1 for v in groups[c]) / len(groups[c]) if groups[c] else None,
                "human_rate": sum(v == -1 for v in groups[c]) / len(groups[c]) if groups[c] else None,
                "n": len(groups[c])}
            for c in sorted(groups)}
