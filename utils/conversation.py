"""Chat formatting and token spans, shared by the backends, the fast extractor and the checks.

Two facts drive everything here:

- Gemma 2's chat template rejects the ``system`` role. The course merges a system prompt into the
  first user turn as ``"{system}\\n\\n{user}"``, and an empty system prompt adds nothing. Every code
  path (local generation, API generation, activation extraction) uses :func:`merge_system_prompt`.
- A chat-templated string already starts with BOS, so it is tokenised with
  ``add_special_tokens=False``; tokenising it again with special tokens gives a double BOS.

A *response span* is ``[start, end)`` in token positions of the full conversation: the content
tokens of the last assistant turn, without the turn markers before it and without the
end-of-turn token(s) after it. This is what the paper averages over.
"""

from __future__ import annotations

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
    """The templated conversation and the token index where its last message's content starts (in
    ``encode(full_prompt)``): the course's reference for Part 1's ``format_messages``."""
    full_prompt = render(messages, tokenizer)
    prefix = render(messages[:-1], tokenizer, add_generation_prompt=True)
    return full_prompt, len(encode(prefix, tokenizer))


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
    """Tokenise an already-templated string: no second BOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
