"""Per-turn activations of multi-turn conversations (persona drift).

Part 1's rule, applied to every assistant turn: a turn's activation is the mean of the residual
stream (block output, ``hidden_states[l + 1]``) over the turn's *content* tokens, the ``[start, end)``
span :func:`utils.conversation.response_token_span` would give if the conversation ended with that
turn (no turn markers, no end-of-turn token), averaged in float32.

A conversation can be longer than the model's context (the paper's transcripts run to ~23,000
tokens; Gemma 2 and SmolLM2 read 8,192). :func:`turn_windows` then splits it into forward passes
of *whole* turns; a turn is never cut. See its docstring for the exact rule.

- :func:`assistant_turn_spans`: token ids of the templated conversation and each assistant turn's span.
- :func:`turn_windows`: the forward passes that score the assistant turns.
- :func:`per_turn_mean_activations`: ``[n_assistant_turns, n_layers, d_model]``.
- :func:`per_turn_projections`: ``[n_assistant_turns]`` projections on a unit axis at one layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from utils.activations import decoder_layers
from utils.conversation import ChatFormatError, Message, render

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "TurnTooLongError",
    "Window",
    "assistant_turn_spans",
    "context_length",
    "per_turn_mean_activations",
    "per_turn_projections",
    "turn_windows",
]

# The longest context the course feeds by default (Gemma 2's and SmolLM2's context length).
DEFAULT_MAX_TOKENS = 8192


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


def _encode(text: str, tokenizer) -> list[int]:
    """:func:`utils.conversation.encode` (no second BOS), without the too-long warning."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


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
            lengths[key] = len(_encode(render(msgs, tokenizer), tokenizer))
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


def context_length(model) -> int:
    """The default window: ``config.max_position_embeddings``, at most :data:`DEFAULT_MAX_TOKENS` (8192)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(int(n), DEFAULT_MAX_TOKENS) if n else DEFAULT_MAX_TOKENS


class _Stop(Exception):
    """Raised from the deepest hook to end a forward pass early. Never escapes this module."""


def per_turn_mean_activations(
    model,
    tokenizer,
    messages: Sequence[Message],
    layers: int | Sequence[int],
    max_tokens: int | None = None,
    progress: bool = False,
) -> Float[Tensor, "n_assistant_turns n_layers d_model"]:
    """Mean block output over each assistant turn's content tokens, at each requested layer.

    The turns are scored in the passes :func:`turn_windows` gives (one pass when the conversation fits).
    Each pass is a single unpadded sequence, fed up to the end of its last scored turn's content, and
    stops after the deepest requested block.

    Args:
        model: a decoder-only ``*ForCausalLM`` (blocks at ``model.model.layers``).
        tokenizer: its tokenizer.
        messages: the conversation (optional system prompt, then user/assistant turns alternating).
        layers: one layer or a list; layer l is the output of ``model.model.layers[l]``.
            The result always has a layer axis: an int gives ``n_layers = 1`` (unlike
            :func:`utils.activations.extract_mean_activations`, which drops it).
        max_tokens: the longest pass; default :func:`context_length` (model context, at most 8192).
        progress: show a tqdm bar over the passes.

    Returns:
        float32 CPU tensor ``[n_assistant_turns, n_layers, d_model]``, turns in conversation order,
        layers in the order given.
    """
    blocks = decoder_layers(model)
    wanted = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
    if not wanted:
        raise ValueError("`layers` is empty: give an int or a non-empty list of ints.")
    for layer in wanted:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
            raise ValueError(f"Layer {layer!r} is out of range: this model has {len(blocks)} blocks, so use ints "
                             f"0..{len(blocks) - 1} (layer l = output of model.model.layers[l]).")
    if max_tokens is None:
        max_tokens = context_length(model)
    windows = turn_windows(messages, tokenizer, max_tokens)
    n_turns = sum(len(w.turns) for w in windows)
    unique = sorted(set(wanted))
    deepest = unique[-1]
    d_model = int(model.config.hidden_size)
    out = torch.zeros((n_turns, len(unique), d_model), dtype=torch.float32)
    device = model.get_input_embeddings().weight.device
    current: list[Window] = []

    def make_hook(slot: int, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output  # 4.x: tuple; 5.x: tensor
            window = current[0]
            for turn, (start, end) in zip(window.turns, window.spans):
                out[turn, slot] = h[0, start:end].float().mean(0).cpu()
            if layer == deepest:
                raise _Stop
        return hook

    from tqdm.auto import tqdm

    handles = [blocks[layer].register_forward_hook(make_hook(slot, layer)) for slot, layer in enumerate(unique)]
    try:
        with torch.inference_mode():
            for window in tqdm(windows, desc="per-turn activations", unit="pass", disable=not progress):
                current[:] = [window]
                end = window.spans[-1][1]
                input_ids = torch.tensor([window.ids[:end]], dtype=torch.long, device=device)
                try:
                    model(input_ids=input_ids, use_cache=False)
                except _Stop:
                    pass
                else:  # pragma: no cover - the deepest hook always raises
                    raise RuntimeError("The forward pass did not reach the deepest requested layer's hook.")
    finally:
        for handle in handles:
            handle.remove()
        current.clear()
    return out[:, [unique.index(layer) for layer in wanted]]


def per_turn_projections(
    model,
    tokenizer,
    messages: Sequence[Message],
    axis: Float[Tensor, "d_model"],
    layer: int,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Float[Tensor, "n_assistant_turns"]:
    """Each assistant turn's mean activation at ``layer`` projected on the unit axis ``axis / |axis|``.

    Returns:
        float32 CPU tensor ``[n_assistant_turns]`` (conversation order).
    """
    d_model = int(model.config.hidden_size)
    if not isinstance(axis, Tensor) or tuple(axis.shape) != (d_model,):
        shape = tuple(axis.shape) if isinstance(axis, Tensor) else type(axis).__name__
        raise ValueError(f"axis must be a [d_model] = [{d_model}] tensor (one layer's row); got {shape}.")
    axis = axis.detach().float().cpu()
    norm = axis.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise ValueError("axis is zero or has NaN/inf values; it has no direction to project on.")
    means = per_turn_mean_activations(model, tokenizer, messages, layer, max_tokens, progress)[:, 0]
    return means @ (axis / norm)
