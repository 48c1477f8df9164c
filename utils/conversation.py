"""Chat formatting, token spans and turn windows, shared by generation, extraction and the checks.

Two facts drive everything here:

- Gemma 2's chat template rejects the ``system`` role. The course merges a system prompt into the
  first user turn as ``"{system}\\n\\n{user}"``, and an empty system prompt adds nothing. Every code
  path (local generation, API generation, activation extraction) uses :func:`merge_system_prompt`.
- A chat-templated string already starts with BOS, so it is tokenised with
  ``add_special_tokens=False``; tokenising it again with special tokens gives a double BOS.

A *response span* is ``[start, end)`` in token positions of the full conversation: the content
tokens of the last assistant turn, without the turn markers before it and without the
end-of-turn token(s) after it. This is what the paper averages over.

A conversation can be longer than the model's context (the paper's transcripts run to ~23,000 tokens;
Gemma 2 and SmolLM2 read 8,192). :func:`turn_windows` then splits it into forward passes of *whole*
turns; a turn is never cut. :func:`assistant_turn_spans` gives every assistant turn's content span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

Message = dict[str, str]


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered; the message says how to fix it."""


@lru_cache(maxsize=64)
def _supports_system_role_cached(template: str, tokenizer_id: int, tokenizer) -> bool:
    try:
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tokenize=False
        )
        return True
    except Exception:  # jinja2 TemplateError: "System role not supported"
        return False


def supports_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template accepts a ``system`` message (Gemma 2's does not)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("This tokenizer has no chat template; use an instruct model's tokenizer.")
    return _supports_system_role_cached(tokenizer.chat_template, id(tokenizer), tokenizer)


def merge_system_prompt(messages: list[Message], system_supported: bool) -> list[Message]:
    """Return messages the template accepts.

    - An empty (or whitespace) system prompt is dropped, whatever the template.
    - With ``system_supported=False`` a non-empty system prompt is prepended to the first user
      turn as ``"{system}\\n\\n{user}"``.
    """
    if not messages:
        raise ChatFormatError("The conversation is empty.")
    msgs = [dict(m) for m in messages]
    for m in msgs:
        if set(m) != {"role", "content"} or not isinstance(m["content"], str):
            raise ChatFormatError(f"Each message needs exactly a 'role' and a string 'content'; got {m!r}.")
    if msgs[0]["role"] != "system":
        return msgs
    system, rest = msgs[0]["content"], msgs[1:]
    if any(m["role"] == "system" for m in rest):
        raise ChatFormatError("Only the first message may be a system message.")
    if not system.strip():
        return rest
    if system_supported:
        return msgs
    if not rest or rest[0]["role"] != "user":
        raise ChatFormatError("A system prompt on a model without a system role needs a user turn to merge into.")
    rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
    return rest


def normalize_messages(messages: list[Message], tokenizer) -> list[Message]:
    """Messages this tokenizer's template accepts: :func:`merge_system_prompt`, deciding the system role
    from the template (the course's reference for Part 1's ``_normalize_messages``)."""
    return merge_system_prompt(messages, supports_system_role(tokenizer))


def format_messages(messages: list[Message], tokenizer) -> tuple[str, int]:
    """The templated conversation and the index, in ``encode(full_prompt)``, of the token that covers the first
    character of its last message's content (:func:`response_token_span`'s rule): the course's reference for
    Part 1's ``format_messages``."""
    _, start, _ = response_token_span(messages, tokenizer)
    return render(messages, tokenizer), start


def chat_messages(system_prompt: str, question: str, response: str | None = None) -> list[Message]:
    """The course's one-turn conversation: optional system prompt, a question, optional response."""
    msgs = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def render(messages: list[Message], tokenizer, add_generation_prompt: bool = False) -> str:
    """Apply the chat template (after :func:`merge_system_prompt`) and return the string."""
    msgs = merge_system_prompt(messages, supports_system_role(tokenizer))
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(text: str, tokenizer) -> list[int]:
    """Tokenise an already-templated string: no second BOS (and no warning for a text longer than the model's context)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def response_token_span(messages: list[Message], tokenizer) -> tuple[list[int], int, int]:
    """Token ids of the whole conversation and the ``[start, end)`` span of the last assistant turn's content.

    The span is found from character offsets, so it does not depend on how the template's
    markers tokenise. Raises :class:`ChatFormatError` for an empty response.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ChatFormatError("The conversation must end with the assistant's response.")
    if not messages[-1]["content"].strip():
        raise ChatFormatError("The response is empty: there are no tokens to average over. "
                              "Drop it (and report it) before extraction.")
    full = render(messages, tokenizer)
    prefix = render(messages[:-1], tokenizer, add_generation_prompt=True)
    if not full.startswith(prefix):
        raise ChatFormatError("The template renders the prompt differently with and without the response; "
                              "cannot locate the response.")
    content = messages[-1]["content"].strip()
    c_start = full.find(content, len(prefix))
    if c_start < 0:
        raise ChatFormatError("Could not find the response text in the rendered conversation.")
    c_end = c_start + len(content)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    start = next(i for i, (s, e) in enumerate(offsets) if e > c_start)
    end = next((i for i, (s, e) in enumerate(offsets) if s >= c_end), len(ids))
    return ids, start, end


@lru_cache(maxsize=64)
def _turn_suffix_len_cached(template: str, tokenizer_id: int, tokenizer) -> int:
    ids, _, end = response_token_span(chat_messages("", "Hi", "Fine thanks"), tokenizer)
    return len(ids) - end


def turn_suffix_len(tokenizer) -> int:
    """How many tokens the template appends after a response's content (Gemma: ``<end_of_turn>``, ``\\n``)."""
    return _turn_suffix_len_cached(tokenizer.chat_template, id(tokenizer), tokenizer)


# ---------------------------------------------------------------------------------------------------
# Multi-turn conversations: every assistant turn's span, and windows of whole turns
# ---------------------------------------------------------------------------------------------------

class TurnTooLongError(ChatFormatError):
    """One user turn plus the assistant's answer does not fit in ``max_tokens``: it cannot be scored whole."""


def _check_messages(messages: Sequence[Message]) -> None:
    """System (optional, first), then user/assistant alternating from a user turn; non-empty assistant turns."""
    if not messages:
        raise ChatFormatError("The conversation is empty.")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"} or not isinstance(m.get("content"), str):
            raise ChatFormatError(f"Message {i} must be {{'role': ..., 'content': str}}; got {m!r}.")
        role = m["role"]
        if role == "system":
            if i != 0:
                raise ChatFormatError(f"Message {i}: only the first message may be a system message.")
            continue
        if role not in ("user", "assistant"):
            raise ChatFormatError(f"Message {i} has unknown role {role!r}; use system, user or assistant.")
        if role != expected:
            raise ChatFormatError(f"Message {i}: expected a {expected} turn, got {role}; turns must alternate "
                                  "user/assistant, starting with the user.")
        if role == "assistant" and not m["content"].strip():
            raise ChatFormatError(f"Message {i} (an assistant turn) is empty: it has no tokens to average over.")
        expected = "assistant" if role == "user" else "user"
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("The conversation has no assistant turn.")


def assistant_turn_spans(messages: Sequence[Message], tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the templated conversation and the ``[start, end)`` span of every assistant turn's content.

    The conversation is rendered once with the chat template (a system prompt merged into the first
    user turn when the template has no system role, as everywhere in the course) and tokenised with
    ``add_special_tokens=False`` (one BOS, the template's). For the assistant message at index ``j``,
    its content (stripped) is looked up in the rendered text after the prompt
    ``render(messages[:j], add_generation_prompt=True)``, and the span covers the tokens whose
    characters overlap it: the same rule as :func:`utils.conversation.response_token_span`, so the
    last turn's span equals Part 1's span of the conversation that ends there. As there, a token that
    straddles the boundary between a turn marker and the content (e.g. a BPE token ``'\\n"'`` when the
    content starts with a quote) is included, so a span decodes to the content up to surrounding whitespace.

    Returns:
        ``(ids, spans)``: ``len(spans)`` is the number of assistant turns, in order.

    Raises:
        ChatFormatError: bad roles or order, an empty assistant turn, or a template that renders a
            prefix of the conversation differently from the whole.
    """
    messages = list(messages)
    _check_messages(messages)
    full = render(messages, tokenizer)
    char_spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:j], tokenizer, add_generation_prompt=True)
        if not full.startswith(prefix):
            raise ChatFormatError(f"Message {j}: the template renders the conversation up to this turn differently "
                                  "from the whole conversation; cannot locate the turn.")
        content = m["content"].strip()
        c_start = full.find(content, len(prefix))
        if c_start < 0:
            raise ChatFormatError(f"Message {j}: could not find the assistant's text in the rendered conversation.")
        char_spans.append((c_start, c_start + len(content)))
    # verbose=False: no "longer than the maximum sequence length" warning; windows handle the length.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    spans = []
    for c_start, c_end in char_spans:
        start = next(i for i, (s, e) in enumerate(offsets) if e > c_start)
        end = next((i for i, (s, e) in enumerate(offsets) if s >= c_end), len(ids))
        spans.append((start, end))
    return ids, spans


@dataclass(frozen=True)
class Window:
    """One forward pass that scores some assistant turns.

    Attributes:
        messages: the messages fed (the system prompt if kept, then whole turns
            ``first_message .. last_message`` of the original conversation).
        ids: their token ids (one BOS, no truncation).
        turns: indices of the assistant turns scored by this pass (0-based, counting assistant turns only).
        spans: each scored turn's ``[start, end)`` content span in ``ids``.
        first_message: index (in the original messages) of the window's first turn, a user turn.
        last_message: index of its last message, the last scored assistant turn.
        system_kept: whether the conversation's system prompt is in this window (False also when there is none).
    """

    messages: list[Message]
    ids: list[int]
    turns: list[int]
    spans: list[tuple[int, int]]
    first_message: int
    last_message: int
    system_kept: bool


def turn_windows(messages: Sequence[Message], tokenizer, max_tokens: int) -> list[Window]:
    """The forward passes that score every assistant turn, none longer than ``max_tokens`` tokens.

    Rule:

    - If the whole templated conversation fits in ``max_tokens`` tokens, one pass scores every turn.
    - Otherwise each assistant turn ``t`` is scored in the longest trailing window of *whole* turns
      that ends with turn ``t`` and fits: the window starts at a user turn, as early as possible.
      The conversation's system prompt, if any, is kept in every window as long as
      system + the turn's user message + turn ``t`` fits; for a turn where it does not, the window is
      searched again without it (``system_kept=False``; a ChatML template then inserts its own
      default system prompt, as it does for any conversation without one).
    - Turns are never cut. If a user message plus the assistant turn that answers it does not fit
      alone, :class:`TurnTooLongError` names the turn and its length.
    - Turns whose windows start at the same message (with the same system-prompt choice) are scored
      in one pass, the window of the last of them: in a causal model a turn's activations depend only
      on the tokens before it, so this gives exactly what separate passes would, in as few passes as
      the rule allows. The fitting case is the special case where every window starts at the first turn.

    The length counted is the whole window's token count, end-of-turn markers included.

    Returns:
        windows in conversation order; together they score every assistant turn exactly once.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int; got {max_tokens!r}.")
    messages = list(messages)
    ids, spans = assistant_turn_spans(messages, tokenizer)
    system = messages[:1] if messages[0]["role"] == "system" else []
    body_offset = len(system)
    assistant_at = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if len(ids) <= max_tokens:
        return [Window(messages, ids, list(range(len(spans))), spans, body_offset, assistant_at[-1], bool(system))]

    lengths: dict[tuple[int, int, bool], int] = {}

    def length(u: int, j: int, keep_system: bool) -> int:
        key = (u, j, keep_system)
        if key not in lengths:
            msgs = (system if keep_system else []) + messages[u:j + 1]
            lengths[key] = len(encode(render(msgs, tokenizer), tokenizer))
        return lengths[key]

    starts: list[tuple[int, bool]] = []  # per assistant turn: (first message, system kept)
    u_sys = u_plain = body_offset
    for t, j in enumerate(assistant_at):
        user = j - 1  # the user turn this assistant turn answers (alternation is checked above)
        keep = bool(system) and length(user, j, True) <= max_tokens
        if not keep and length(user, j, False) > max_tokens:
            raise TurnTooLongError(
                f"Assistant turn {t} (message {j}) does not fit in max_tokens={max_tokens} even with only the user "
                f"message before it: the two take {length(user, j, False)} tokens. Turns are never cut; raise "
                "max_tokens (up to the model's context) or drop this turn from the conversation.")
        # Windows only move forward as t grows, so the search starts where the last one ended.
        u = max(u_sys if keep else u_plain, body_offset)
        while length(u, j, keep) > max_tokens:
            u += 2  # the next user turn
        if keep:
            u_sys = u
        else:
            u_plain = u
        starts.append((u, keep))

    windows: list[Window] = []
    t = 0
    while t < len(assistant_at):
        last = t
        while last + 1 < len(assistant_at) and starts[last + 1] == starts[t]:
            last += 1
        u, keep = starts[t]
        msgs = (system if keep else []) + messages[u:assistant_at[last] + 1]
        w_ids, w_spans = assistant_turn_spans(msgs, tokenizer)
        n = last - t + 1
        windows.append(Window(msgs, w_ids, list(range(t, last + 1)), w_spans[-n:], u, assistant_at[last], keep))
        t = last + 1
    return windows
