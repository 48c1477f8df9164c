"""Mean activations over a response's tokens: the quantity every persona vector is built from.

For each conversation (system prompt, question, response) we take the residual stream at one or
more layers and average it over the response's content tokens, the ``[start, end)`` span that
:func:`utils.conversation.response_token_span` gives (no turn markers, no end-of-turn token).

Layer convention (as everywhere in the course): *layer i* is the output of block
``model.model.layers[i]``, i.e. ``hidden_states[i + 1]`` of a forward pass with
``output_hidden_states=True``.

Why this is faster than ``model(..., output_hidden_states=True)``:

- forward hooks capture only the requested layers, and reduce them to a per-conversation sum on
  the spot, so no ``[batch, seq, d_model]`` tensor per layer is kept;
- the forward pass stops right after the deepest requested block (a private exception raised
  from its hook), so the later blocks, the final norm and the LM head (a ``[batch, seq, vocab]``
  matrix) never run;
- conversations are sorted by length before batching, so batches carry little padding, and the
  batch size follows a token budget so memory stays bounded;
- the tokens after the response (end-of-turn markers) are not fed: in a causal model they cannot
  change the response's positions.

Note that for the *last* layer the hook sees the block's raw output, while ``hidden_states[-1]``
of ``output_hidden_states=True`` has the final norm applied; for every other layer the two agree.

Padding is done here, on whichever side ``tokenizer.padding_side`` says (Gemma: left), with an
``attention_mask`` and ``position_ids`` counted from each sequence's first real token, so a
batched result equals the single-sequence one to float32 rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from utils.conversation import (ChatFormatError, Message, Window, encode, render, response_token_span,
                                turn_windows)
from utils.models import context_length

__all__ = [
    "CPU_TOKENS_PER_BATCH",
    "GPU_TOKENS_PER_BATCH",
    "decoder_layers",
    "extract_mean_activations",
    "extract_mean_embeddings",
    "extract_last_prompt_token",
    "extract_prompt_response_means",
    "per_turn_mean_activations",
    "per_turn_projections",
    "reading_layers",
]

# Default token budget (batch size x padded length) per forward pass. On CPU, small batches keep
# the activations in cache: with SmolLM2 on 2 cores, 512-1024 tokens ran 10-20% faster than 4096
# and ~10% faster than one conversation at a time in one warm process (in fresh processes the gap
# was within noise). On GPU, bigger batches fill the device: with a Gemma-2-27B-shaped model on one H100,
# 8k-32k tokens ran within 1.5% of each other (16k best) and 65k was 4% slower.
CPU_TOKENS_PER_BATCH = 1024
GPU_TOKENS_PER_BATCH = 16384

LAYER_CONVENTION = "layer i = output of model.model.layers[i] = hidden_states[i + 1]"


class _StopForward(Exception):
    """Raised from the deepest hook to end the forward pass early. Never escapes this module."""


@contextlib.contextmanager
def reading_layers(model, layers: Sequence[int], read: Callable[[int, Tensor], None]) -> Iterator[Callable[..., None]]:
    """Hooks that hand block ``layers[slot]``'s output to ``read(slot, h)``; the deepest one ends the pass.

    The one early stop of the course's extraction: yields ``forward(**inputs)``, which runs ``model`` on the
    inputs up to the deepest requested block and no further (the later blocks, the final norm and the LM head
    never run). ``h`` is the block's raw output (a tensor, whichever transformers version). Hooks are removed
    on exit, also on errors.
    """
    blocks = decoder_layers(model)
    deepest = max(layers)

    def make_hook(slot: int, layer: int):
        def hook(module, args, output):
            read(slot, output[0] if isinstance(output, tuple) else output)  # 4.x: tuple; 5.x: tensor
            if layer == deepest:
                raise _StopForward
        return hook

    def forward(**inputs) -> None:
        try:
            model(**inputs, use_cache=False)
        except _StopForward:
            return
        raise RuntimeError("The forward pass did not reach the deepest requested layer's hook.")

    handles = [blocks[layer].register_forward_hook(make_hook(slot, layer)) for slot, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            yield forward
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class _Item:
    """One tokenised conversation: its token ids up to the response's end, and the span ``[start, end)``."""

    ids: list[int]
    start: int
    end: int


def decoder_layers(model) -> Sequence[torch.nn.Module]:
    """The model's transformer blocks, ``model.model.layers`` (Llama, Gemma 2, Qwen, ...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no `model.model.layers`; this extractor expects a "
                        "decoder-only *ForCausalLM model (Llama, Gemma 2, Qwen, ...).")
    return layers


def check_vector(v, d_model: int, what: str) -> Float[Tensor, " d_model"]:
    """The one validation of an axis or steering vector: a finite floating-point ``[d_model]`` tensor (detached).

    Raises:
        ValueError: not a tensor, the wrong shape (a ``[n_layers, d_model]`` tensor gets a hint), not floating
            point, or NaN/inf values.
    """
    if not isinstance(v, Tensor):
        raise ValueError(f"{what} must be a torch tensor of shape [{d_model}]; got {type(v).__name__}.")
    if tuple(v.shape) != (d_model,):
        hint = " (pick one layer's row of a [n_layers, d_model] tensor)" if v.ndim == 2 else ""
        raise ValueError(f"{what} has shape {tuple(v.shape)}; it must be [d_model] = [{d_model}]{hint}.")
    if not v.is_floating_point():
        raise ValueError(f"{what} has dtype {v.dtype}; it must be a floating-point tensor.")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{what} has NaN or infinite values; recompute it (an empty mean gives NaN).")
    return v.detach()


def unit_vector(v, d_model: int, what: str = "axis") -> Float[Tensor, " d_model"]:
    """``v / |v|`` as a float32 CPU tensor, after :func:`check_vector`; a zero vector raises (no direction)."""
    v = check_vector(v, d_model, what).float().cpu()
    norm = float(v.norm())
    if norm == 0.0:
        raise ValueError(f"{what} is all zeros; it has no direction.")
    return v / norm


def _resolve_layers(model, layers: int | Sequence[int]) -> tuple[list[int], bool]:
    """Validate ``layers``; return them as a list and whether a single int was given."""
    n_layers = len(decoder_layers(model))
    single = isinstance(layers, int) and not isinstance(layers, bool)
    wanted = [layers] if single else list(layers)  # type: ignore[list-item]
    if not wanted:
        raise ValueError("`layers` is empty: give an int or a non-empty list of ints.")
    for layer in wanted:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"Layers must be ints; got {layer!r} ({type(layer).__name__}).")
        if not 0 <= layer < n_layers:
            raise ValueError(f"Layer {layer} is out of range: this model has {n_layers} blocks, so valid layers "
                             f"are 0..{n_layers - 1} ({LAYER_CONVENTION}).")
    return wanted, single


def _tokenise(conversations: Sequence[list[Message]], tokenizer) -> list[_Item]:
    """Token ids and response span of every conversation; errors name the conversation's index."""
    if len(conversations) == 0:
        raise ValueError("No conversations given: `conversations` is empty.")
    items = []
    for i, messages in enumerate(conversations):
        try:
            ids, start, end = response_token_span(messages, tokenizer)
        except ChatFormatError as exc:
            raise ChatFormatError(f"Conversation {i}: {exc}") from exc
        if end <= start:
            raise ChatFormatError(f"Conversation {i}: the response has no tokens (span [{start}, {end})). "
                                  "Drop it (and report it) before extraction.")
        # Tokens after the response (the end-of-turn marker) cannot change earlier positions in a
        # causal model, so they are not fed at all.
        items.append(_Item(ids[:end], start, end))
    return items


def _input_device(model) -> torch.device:
    """Where the input ids go: the embedding's device (also right for ``device_map="auto"``)."""
    return model.get_input_embeddings().weight.device


def _plan_batches(lengths: Sequence[int], batch_size: int | None, max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, so each batch holds similar lengths.

    With ``batch_size=None`` a batch grows while ``len(batch) * longest <= max_tokens`` (always at
    least one conversation); otherwise batches have ``batch_size`` conversations.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1; got {max_tokens}.")
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _pad_batch(items: Sequence[_Item], pad_id: int, side: str) -> dict[str, Int[Tensor, "batch seq"] |
                                                                      Float[Tensor, "batch seq"]]:
    """Pad to the longest item on ``side``.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (all int64 ``[B, L]``, positions
    counted from each sequence's first real token), ``span_mask`` (float32 ``[B, L]``, 1 on
    response tokens, built from the spans, never from token ids), ``prompt_mask`` (float32 ``[B, L]``, 1 on
    the tokens before the span) and ``last_mask`` (float32 ``[B, L]``, 1 on the last token before the span).
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right'; got {side!r}.")
    width = max(len(it.ids) for it in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    span_mask = torch.zeros((n, width), dtype=torch.float32)
    prompt_mask = torch.zeros((n, width), dtype=torch.float32)
    last_mask = torch.zeros((n, width), dtype=torch.float32)
    for row, it in enumerate(items):
        offset = width - len(it.ids) if side == "left" else 0
        input_ids[row, offset:offset + len(it.ids)] = torch.tensor(it.ids, dtype=torch.long)
        attention_mask[row, offset:offset + len(it.ids)] = 1
        span_mask[row, offset + it.start:offset + it.end] = 1.0
        prompt_mask[row, offset:offset + it.start] = 1.0
        if it.start > 0:
            last_mask[row, offset + it.start - 1] = 1.0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "span_mask": span_mask, "prompt_mask": prompt_mask, "last_mask": last_mask}


def _progress(total: int, progress: bool, desc: str):
    return tqdm(total=total, desc=desc, unit="conv", disable=not progress)


def _batching(model, tokenizer, max_tokens_per_batch: int | None) -> tuple[torch.device, int, int, str]:
    """(input device, token budget per batch, pad id, padding side) for the batched readers: the budget defaults to
    the device's, the pad id to EOS (or 0) where the tokenizer has none."""
    device = _input_device(model)
    if max_tokens_per_batch is None:
        max_tokens_per_batch = GPU_TOKENS_PER_BATCH if device.type == "cuda" else CPU_TOKENS_PER_BATCH
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return device, max_tokens_per_batch, pad_id, getattr(tokenizer, "padding_side", "right") or "right"


def extract_mean_activations(
    model,
    tokenizer,
    conversations: Sequence[list[Message]],
    layers: int | Sequence[int],
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "extract",
    max_tokens_per_batch: int | None = None,
) -> Float[Tensor, "n d_model"] | Float[Tensor, "n n_layers d_model"]:
    """Mean residual stream over each response's content tokens.

    Args:
        model: a decoder-only ``*ForCausalLM`` (blocks at ``model.model.layers``), in eval mode.
        tokenizer: its tokenizer; ``tokenizer.padding_side`` decides the padding side.
        conversations: ``n`` chat conversations, each ending with a non-empty assistant turn
            (e.g. from :func:`utils.conversation.chat_messages`).
        layers: one layer (int) or a list of layers, each in ``0..num_layers-1``;
            layer i is the output of ``model.model.layers[i]`` (= ``hidden_states[i + 1]``).
        batch_size: conversations per forward pass; ``None`` packs batches up to
            ``max_tokens_per_batch`` tokens (padded length x batch size).
        progress: show a tqdm progress bar.
        desc: the progress bar's label.
        max_tokens_per_batch: token budget when ``batch_size`` is None (default 1024 on CPU,
            16384 on GPU); a longer conversation still gets a batch of its own.

    Returns:
        float32 CPU tensor, ``[n, d_model]`` for an int ``layers`` or ``[n, len(layers), d_model]``
        for a list, in the order of ``conversations`` (batches are sorted by length internally).

    Raises:
        ValueError: no conversations, a bad layer (with the valid range), a bad batch size.
        ChatFormatError: a conversation that cannot be rendered or has an empty response (with its index).
    """
    wanted, single = _resolve_layers(model, layers)
    items = _tokenise(conversations, tokenizer)
    device, max_tokens_per_batch, pad_id, side = _batching(model, tokenizer, max_tokens_per_batch)

    unique = sorted(set(wanted))
    d_model = int(model.config.hidden_size)
    out = torch.zeros((len(items), len(unique), d_model), dtype=torch.float32)

    # Per-batch state shared with the hooks: the span mask [B, L, 1] in, one [B, d_model] sum per layer out.
    batch_mask: list[Float[Tensor, "batch seq 1"]] = []
    sums: dict[int, Float[Tensor, "batch d_model"]] = {}

    def read(slot: int, h: Tensor) -> None:
        mask = batch_mask[0].to(h.device)  # [B, L, 1] float32
        # Masked sum over positions in float32 ([B, L, d] -> [B, d]); elementwise, so exact
        # whatever the matmul precision settings (TF32) are.
        sums[slot] = einops.reduce(h.float() * mask, "batch seq d_model -> batch d_model", "sum").to("cpu")

    batches = _plan_batches([len(it.ids) for it in items], batch_size, max_tokens_per_batch)
    with reading_layers(model, unique, read) as forward, _progress(len(items), progress, desc) as bar:
        for batch in batches:
            enc = _pad_batch([items[i] for i in batch], pad_id, side)
            sums.clear()
            batch_mask[:] = [enc["span_mask"].unsqueeze(-1)]
            forward(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                    position_ids=enc["position_ids"].to(device))
            counts = enc["span_mask"].sum(1, keepdim=True)  # [B, 1]
            index = torch.tensor(batch)
            for slot in range(len(unique)):
                out[index, slot] = sums[slot] / counts
            bar.update(len(batch))

    result = out[:, [unique.index(layer) for layer in wanted]]
    return result[:, 0] if single else result


AVERAGES = ("response_avg", "prompt_avg", "prompt_last")


def _three_means(model, items: Sequence[_Item], wanted: list[int], tokenizer, batch_size: int | None,
                 progress: bool, desc: str, max_tokens_per_batch: int | None, kinds: Sequence[str],
                 ) -> dict[str, Float[Tensor, "n n_layers d_model"]]:
    """The means named in ``kinds`` (of :data:`AVERAGES`), for every item, at every layer of ``wanted``, from ONE
    forward pass per batch (stopped after the deepest block)."""
    device, max_tokens_per_batch, pad_id, side = _batching(model, tokenizer, max_tokens_per_batch)
    unique = sorted(set(wanted))
    d_model = int(model.config.hidden_size)
    mask_of = {"response_avg": "span_mask", "prompt_avg": "prompt_mask", "prompt_last": "last_mask"}
    out = {k: torch.zeros((len(items), len(unique), d_model), dtype=torch.float32) for k in kinds}
    masks: dict[str, Float[Tensor, "batch seq 1"]] = {}
    sums: dict[tuple[str, int], Float[Tensor, "batch d_model"]] = {}

    def read(slot: int, h: Tensor) -> None:
        hf = h.float()
        for kind in kinds:
            mask = masks[kind].to(h.device)
            sums[(kind, slot)] = einops.reduce(hf * mask, "batch seq d_model -> batch d_model", "sum").to("cpu")

    batches = _plan_batches([len(it.ids) for it in items], batch_size, max_tokens_per_batch)
    with reading_layers(model, unique, read) as forward, _progress(len(items), progress, desc) as bar:
        for batch in batches:
            enc = _pad_batch([items[i] for i in batch], pad_id, side)
            sums.clear()
            masks.clear()
            masks.update({kind: enc[mask_of[kind]].unsqueeze(-1) for kind in kinds})
            forward(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                    position_ids=enc["position_ids"].to(device))
            index = torch.tensor(batch)
            for kind in kinds:
                counts = enc[mask_of[kind]].sum(1, keepdim=True)  # [B, 1], >= 1 by construction
                for slot in range(len(unique)):
                    out[kind][index, slot] = sums[(kind, slot)] / counts
            bar.update(len(batch))
    order = [unique.index(layer) for layer in wanted]
    return {kind: out[kind][:, order] for kind in kinds}


def extract_prompt_response_means(
    model,
    tokenizer,
    conversations: Sequence[list[Message]],
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "extract (3 averages)",
    max_tokens_per_batch: int | None = None,
) -> dict[str, Float[Tensor, "n n_layers d_model"]]:
    """Three averages of the block outputs of each conversation, at every requested layer, in ONE forward pass.

    For each conversation (ending with a non-empty assistant turn), with its response span ``[start, end)``
    (:func:`utils.conversation.response_token_span`: the content tokens only):

    - ``"response_avg"``: the mean over the response's content tokens (Part 1's and the paper's vector);
    - ``"prompt_avg"``: the mean over every token before the response, ``[0, start)`` (system prompt, question,
      turn markers, the generation prompt);
    - ``"prompt_last"``: the last token before the response, ``start - 1``. Where the tokenizer keeps the
      generation prompt's last token apart from the answer (Gemma's and SmolLM2's turn markers end in a newline
      token of their own), it is the position whose next-token prediction starts the answer, the one
      :func:`extract_last_prompt_token` reads from the prompt alone; a tokenizer that merges the newline into the
      answer's first token (tiny-gemma2's small BPE does, for some answers) makes the two differ there.

    The three come from the same forward-hook pass as :func:`extract_mean_activations` (batched, padded on the
    tokenizer's side, stopped after the deepest block), so they cost one pass, not three.

    Args:
        layers: block indices (default: every block); layer i is the output of ``model.model.layers[i]``.

    Returns:
        ``{name: float32 CPU tensor [n, len(layers), d_model]}`` for the three names, in the order of
        ``conversations`` and ``layers``.
    """
    wanted, _ = _resolve_layers(model, list(range(len(decoder_layers(model)))) if layers is None else list(layers))
    items = _tokenise(conversations, tokenizer)
    return _three_means(model, items, wanted, tokenizer, batch_size, progress, desc, max_tokens_per_batch, AVERAGES)


def extract_last_prompt_token(
    model,
    tokenizer,
    prompts: Sequence[list[Message]],
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    max_tokens_per_batch: int | None = None,
) -> Float[Tensor, "n n_layers d_model"]:
    """The block outputs at the last token of each prompt rendered with its generation prompt (no answer yet).

    ``prompts`` are conversations that end with the user turn to answer. The position is the one whose
    next-token prediction starts the answer: the same as ``"prompt_last"`` of
    :func:`extract_prompt_response_means` for that prompt followed by any answer. The monitoring of Part 3
    projects it on a trait vector *before* the model writes anything.

    Returns:
        float32 CPU tensor ``[n, len(layers), d_model]`` (default: every block).
    """
    if len(prompts) == 0:
        raise ValueError("No prompts given: `prompts` is empty.")
    wanted, _ = _resolve_layers(model, list(range(len(decoder_layers(model)))) if layers is None else list(layers))
    items = []
    for i, messages in enumerate(prompts):
        if not messages or messages[-1]["role"] != "user":
            raise ChatFormatError(f"Prompt {i} must end with the user turn to answer; got "
                                  f"{messages[-1]['role'] if messages else 'nothing'}.")
        ids = encode(render(list(messages), tokenizer, add_generation_prompt=True), tokenizer)
        items.append(_Item(ids, len(ids), len(ids)))
    return _three_means(model, items, wanted, tokenizer, batch_size, progress, "last prompt token",
                        max_tokens_per_batch, ("prompt_last",))["prompt_last"]


def extract_mean_embeddings(model, tokenizer, conversations: Sequence[list[Message]]) -> Float[Tensor, "n d_model"]:
    """Mean input embedding over each response's content tokens: a no-context control.

    This is the residual stream's input, ``hidden_states[0]``, on the same spans as
    :func:`extract_mean_activations`, computed from the embedding matrix alone. Gemma scales its
    embeddings by ``sqrt(d_model)``: transformers 5.x does it inside the embedding module, 4.x in the
    model's forward, so it is applied here when the module does not, and both versions agree.

    Returns:
        float32 CPU tensor ``[n, d_model]`` in the order of ``conversations``.
    """
    items = _tokenise(conversations, tokenizer)
    embed = model.get_input_embeddings()
    device = embed.weight.device
    scale = 1.0
    if not hasattr(embed, "embed_scale") and str(getattr(model.config, "model_type", "")).startswith("gemma"):
        # As 4.x's Gemma forward does: the scale in the weights' dtype (bf16 rounds it).
        scale = torch.tensor(model.config.hidden_size ** 0.5, dtype=embed.weight.dtype).item()
    rows = []
    with torch.inference_mode():
        for it in items:
            ids = torch.tensor(it.ids[it.start:it.end], dtype=torch.long, device=device)
            rows.append((embed(ids) * scale).float().mean(0).cpu())
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------
# Per-turn means of multi-turn conversations (persona drift)
# ---------------------------------------------------------------------------------------------------

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
        max_tokens: the longest pass; default :func:`utils.models.context_length` (the model's context from its config row).
        progress: show a tqdm bar over the passes.

    Returns:
        float32 CPU tensor ``[n_assistant_turns, n_layers, d_model]``, turns in conversation order,
        layers in the order given.
    """
    wanted, _ = _resolve_layers(model, layers)
    if max_tokens is None:
        max_tokens = context_length(model)
    windows = turn_windows(messages, tokenizer, max_tokens)
    n_turns = sum(len(w.turns) for w in windows)
    unique = sorted(set(wanted))
    d_model = int(model.config.hidden_size)
    out = torch.zeros((n_turns, len(unique), d_model), dtype=torch.float32)
    device = _input_device(model)
    current: list[Window] = []

    def read(slot: int, h: Tensor) -> None:
        for turn, (start, end) in zip(current[0].turns, current[0].spans):
            out[turn, slot] = h[0, start:end].float().mean(0).cpu()

    with reading_layers(model, unique, read) as forward:
        for window in tqdm(windows, desc="per-turn activations", unit="pass", disable=not progress):
            current[:] = [window]
            end = window.spans[-1][1]
            forward(input_ids=torch.tensor([window.ids[:end]], dtype=torch.long, device=device))
    return out[:, [unique.index(layer) for layer in wanted]]


def per_turn_projections(
    model,
    tokenizer,
    messages: Sequence[Message],
    axis: Float[Tensor, " d_model"],
    layer: int,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Float[Tensor, " n_assistant_turns"]:
    """Each assistant turn's mean activation at ``layer`` projected on the unit axis ``axis / |axis|``.

    Returns:
        float32 CPU tensor ``[n_assistant_turns]`` (conversation order).
    """
    unit = unit_vector(axis, int(model.config.hidden_size), "axis")
    means = per_turn_mean_activations(model, tokenizer, messages, layer, max_tokens, progress)[:, 0]
    return means @ unit
