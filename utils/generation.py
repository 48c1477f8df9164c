"""Fast local generation: the real Hugging Face model, in the hardware's dtype, with a lean decode loop.

Use::

    from utils.generation import generate, generation_model

    gen_model = generation_model(model)       # bf16 twin of a float32 model (cached), or ``model`` itself
    texts = generate(gen_model, tokenizer, conversations, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)

**Hooks (Part 2's steering and capping).** :func:`generate` runs exactly the model object it is given,
through its own ``forward``: every ``model.model.layers[i]`` (``utils.activations.decoder_layers``) is
called as a module, so forward hooks registered on it fire at every step (prefill and each new token),
whatever the dtype. Register them on the model that generates, i.e. on ``generation_model(model)``::

    gen_model = generation_model(model)
    with capping(gen_model, ...):            # hooks on decoder_layers(gen_model)
        texts = generate(gen_model, tokenizer, conversations, max_new_tokens=...)

Hooks registered on the float32 ``model`` do *not* fire on its bf16 twin (a separate set of modules).
In the twin a layer's output is bf16: a hook that adds or projects out a float32 vector should do the
arithmetic in float32 and cast back, ``(h.float() + c * v).to(h.dtype)``; returning a float32 tensor
would feed float32 into the next bf16 layer. In transformers 4.x a layer's output is a tuple, in 5.x a tensor.

**Dtype.** :func:`choose_generation_dtype` picks bf16 on CUDA (where supported) and on CPUs with native
bf16 (``avx512_bf16`` or AMX: bf16 matmuls run 2-2.6x faster than float32 there), float32 otherwise.
``$COURSE_GENERATION_DTYPE`` (``bfloat16``, ``float32``, ``float16``, or ``auto``) overrides it. The
choice comes with a reason, to print. Extraction keeps the float32 model: :func:`generation_model`
returns a *separate* bf16 copy (cached per model, built parameter by parameter, so peak memory is
float32 + bf16 = 1.5x the float32 weights, not 2x), or the model itself when it already has the chosen dtype.
The twin is a snapshot: if you change the float32 weights, call :func:`release_generation_model`.

**Sampling** is exactly top-p (nucleus) sampling at a temperature, as the paper's vLLM and the
OpenAI-compatible APIs do it, with no hidden top-k (HF ``generate`` silently adds top-k 50 unless told
otherwise). It is computed cheaply: the nucleus almost always lies inside the 64 most likely tokens,
so the sampler takes ``topk(64)`` and the full log-normaliser, and falls back to a full sort only for
rows whose 64 best tokens hold less than ``top_p`` of the mass. The draw is ``argmax(p / E)`` with
``E ~ Exp(1)`` noise over the kept tokens only (what ``torch.multinomial`` does over the whole vocabulary).
Temperature 0 is greedy (argmax, the first index on ties, as HF ``generate``).

**Decode loop.** Prompts are sorted by length into batches and left-padded; one prefill computes the
last position's logits only, then one token per step with the KV cache. Rows that emit a stop token
(the generation config's EOS ids and the tokenizer's) leave the batch, cache included.
The same inputs, seed and thread count give identical text.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from utils import settings
from utils.conversation import Message, render

__all__ = [
    "DTYPE_ENV",
    "DtypeChoice",
    "SAMPLER_VERSION",
    "choose_generation_dtype",
    "generate",
    "generate_tokens",
    "generation_model",
    "release_generation_model",
    "sample_next",
    "top_p_distribution",
]

DTYPE_ENV = "COURSE_GENERATION_DTYPE"
# Bump when the sampler or decode loop changes what text a seed gives: the runner's cache key carries it.
SAMPLER_VERSION = "topp-exact-1"
# The sampler's fast path looks at this many most likely tokens first (see the module docstring).
CANDIDATES = 64
# Rows per forward pass. CPU: the demo batch size (its client gathers 32 requests); GPU: a size that fills it.
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (``avx512_bf16`` or AMX), so bf16 matmuls beat float32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [c for c in checks if c is not None]
    if checks:
        return any(c() for c in checks)
    try:  # older torch: read the flags
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def choose_generation_dtype(device: str | torch.device | None = None) -> DtypeChoice:
    """The dtype to generate in on ``device`` (default: CUDA if available, else CPU), and why.

    ``$COURSE_GENERATION_DTYPE`` overrides it (``bfloat16``/``bf16``, ``float32``/``fp32``,
    ``float16``/``fp16``; ``auto`` or empty means choose). The reason is meant to be printed.
    """
    requested = settings.get(DTYPE_ENV)  # one of _DTYPES or "auto" (utils/settings.py declares the choices)
    if requested != "auto":
        return DtypeChoice(_DTYPES[requested], f"${DTYPE_ENV} is set to {requested!r}.")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "CUDA GPU with bf16 support (the paper also generates in bf16).")
        return DtypeChoice(torch.float32, "this CUDA GPU does not support bf16.")
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return DtypeChoice(torch.bfloat16, "this CPU has native bf16 (avx512_bf16/AMX), where bf16 matmuls run "
                                               "about 2x faster than float32.")
        return DtypeChoice(torch.float32, "this CPU has no native bf16 (no avx512_bf16/AMX), where bf16 would be "
                                          "emulated and slower than float32.")
    return DtypeChoice(torch.float32, f"no bf16 rule for device type {device.type!r}; float32 is the safe choice.")


# ---------------------------------------------------------------------------------------------------
# The generation-dtype twin of a model
# ---------------------------------------------------------------------------------------------------

_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def generation_model(model, dtype: torch.dtype | None = None):
    """The model to generate with (and to register generation-time hooks on).

    ``dtype`` defaults to :func:`choose_generation_dtype` for the model's device. When the model
    already has that dtype it is returned itself. Otherwise a copy in ``dtype`` is made once and cached
    for as long as ``model`` lives: its parameters are converted one at a time (tied weights stay tied),
    buffers such as RoPE's float32 ``inv_freq`` keep their dtype, and hooks on the original are not copied.
    """
    dtype = dtype or choose_generation_dtype(_model_device(model)).dtype
    if _model_dtype(model) == dtype:
        return model
    twins = _TWINS.setdefault(model, {})
    if dtype not in twins:
        twins[dtype] = _convert_copy(model, dtype)
    return twins[dtype]


def release_generation_model(model) -> None:
    """Forget the cached generation copies of ``model`` (frees their memory once unreferenced)."""
    _TWINS.pop(model, None)


def _convert_copy(model, dtype: torch.dtype):
    # deepcopy with a pre-filled memo: each float parameter is replaced by its converted copy as the
    # copy is made, so the float32 weights are never duplicated (peak = float32 + the new dtype).
    memo: dict[int, object] = {}
    for param in model.parameters():
        if param.is_floating_point():
            memo[id(param)] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)
    twin = copy.deepcopy(model, memo)
    for module in twin.modules():  # hooks belong to the original's experiments, not to the copy
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            if isinstance(getattr(module, name, None), dict):
                getattr(module, name).clear()
    twin.config.dtype = dtype
    twin.eval()
    return twin


def parameter_bytes(model) -> int:
    """Bytes held by the model's parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------

def _check_sampling(temperature: float, top_p: float, top_k: int | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None (no top-k) or an int >= 1, got {top_k!r}.")


def top_p_distribution(logits: Float[Tensor, "batch vocab"], temperature: float, top_p: float,
                       top_k: int | None = None) -> Float[Tensor, "batch vocab"]:
    """The dense distribution the sampler draws from: softmax(logits / T), cut to the nucleus, renormalised.

    The reference definition (a full sort), for tests: HF's ``TemperatureLogitsWarper``, then
    ``TopKLogitsWarper`` if ``top_k``, then ``TopPLogitsWarper``, then softmax, give the same. The
    nucleus is the most likely tokens whose exclusive cumulative probability is below ``top_p``.
    """
    _check_sampling(temperature, top_p, top_k)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def _draw(weights: Float[Tensor, "rows k"], generator: torch.Generator | None) -> Int[Tensor, " rows"]:
    """One index per row with probability proportional to ``weights`` (>= 0): ``argmax(w / E)``, ``E ~ Exp(1)``."""
    noise = torch.empty_like(weights).exponential_(1.0, generator=generator)
    return (weights / noise).argmax(-1)


def sample_next(logits: Float[Tensor, "batch vocab"], temperature: float, top_p: float,
                generator: torch.Generator | None = None, top_k: int | None = None,
                candidates: int = CANDIDATES) -> Int[Tensor, " batch"]:
    """The next token of each row: greedy when ``temperature == 0``, else top-p (after top-k if given).

    Draws from exactly :func:`top_p_distribution`: the nucleus is read from the ``candidates`` most
    likely tokens when they hold at least ``top_p`` of the mass (then it cannot extend past them), and
    from a full sort of the row otherwise.
    """
    _check_sampling(temperature, top_p, top_k)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    vocab = scaled.shape[-1]
    if top_p >= 1 and top_k is None:
        return _draw(scaled.softmax(-1), generator)
    k = min(vocab, top_k if top_k is not None else candidates)
    values, index = scaled.topk(k, dim=-1)  # sorted, most likely first
    if top_k is not None:
        log_z = values.logsumexp(-1, keepdim=True)  # top-k renormalises over its own set
    else:
        log_z = scaled.logsumexp(-1, keepdim=True)
    probs = (values - log_z).exp()
    covered = (probs.sum(-1) >= top_p) | (k == vocab) | (top_k is not None)
    keep = (probs.cumsum(-1) - probs) < top_p
    out = index.gather(-1, _draw(probs * keep, generator)[:, None])[:, 0]
    if not bool(covered.all()):  # rare: a flat distribution whose nucleus extends past the candidates
        rows = (~covered).nonzero()[:, 0]
        full = (scaled[rows] - log_z[rows]).exp()
        sorted_probs, order = full.sort(-1, descending=True)
        keep_full = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        out[rows] = order.gather(-1, _draw(sorted_probs * keep_full, generator)[:, None])[:, 0]
    return out


# ---------------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------------

def _cache_kwarg(model) -> str:
    """transformers 5.x names the KV cache argument ``cache``; 4.x ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the generation config's EOS id(s) and the tokenizer's EOS."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return sorted(ids)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before generating.")
    return int(pad)


def _add(timings: dict[str, float] | None, key: str, start: float) -> float:
    now = time.perf_counter()
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + now - start
    return now


@torch.inference_mode()
def generate_tokens(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.7,
                    top_p: float = 0.9, seed: int = 0, *, pad_id: int, stop_ids: Sequence[int] = (),
                    top_k: int | None = None, timings: dict[str, float] | None = None) -> list[list[int]]:
    """New token ids for one batch of prompts (token id lists), stop token included when one was emitted.

    ``timings``, if given, accumulates seconds under ``prefill``, ``forward`` (decode steps), ``sample``
    and ``bookkeeping`` (masks, cache pruning), and counts ``steps`` and ``tokens``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("Every prompt needs at least one token (got an empty prompt or no prompts).")
    device = _model_device(model)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    width = max(len(p) for p in prompts)
    n = len(prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    cache_arg = _cache_kwarg(model)
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    active = torch.arange(n, device=device)

    t = time.perf_counter()
    # The last position's logits only. As an index tensor, not ``1``: the slice ``h[:, -1:]`` is a strided view,
    # and for a strided 3-D input a bf16 ``linear`` on CPU expands the LM head's weight per row (a 1.7 GB copy
    # for SmolLM2 at 32 rows, 4x the time of the whole prefill); indexing gives a contiguous copy.
    last = torch.tensor([width - 1], device=device)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=last)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    logits = out.logits[:, -1, :]
    positions = positions[:, -1:]
    t = _add(timings, "prefill", t)
    for step in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_p, generator, top_k)
        t = _add(timings, "sample", t)
        for row, token in zip(active.tolist(), tokens.tolist()):
            out_tokens[row].append(token)
        if timings is not None:
            timings["tokens"] = timings.get("tokens", 0) + len(tokens)
        if step == max_new_tokens - 1:
            break
        if stops.numel():
            done = torch.isin(tokens, stops)
            if bool(done.any()):
                keep = (~done).nonzero()[:, 0]
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                active, tokens, mask, positions = active[keep], tokens[keep], mask[keep], positions[keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
        positions = positions + 1
        t = _add(timings, "bookkeeping", t)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_arg: cache})
        logits = out.logits[:, -1, :]
        t = _add(timings, "forward", t)
        if timings is not None:
            timings["steps"] = timings.get("steps", 0) + 1
    return out_tokens


def generate(model, tokenizer, conversations: Sequence[list[Message]], max_new_tokens: int,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, *, top_k: int | None = None,
             batch_size: int | None = None, timings: dict[str, float] | None = None) -> list[str]:
    """One reply per conversation, generated by ``model`` itself (hooks on its layers fire).

    Args:
        model: the model that generates, usually ``generation_model(float32_model)``.
        tokenizer: its tokenizer; the system prompt is handled by :func:`utils.conversation.render`.
        conversations: message lists ending with the turn to answer.
        max_new_tokens: the most new tokens per reply.
        temperature: 0 means greedy.
        top_p: nucleus mass; 1 means no cut.
        seed: the whole call is deterministic for a given seed, inputs, batch size and thread count.
        top_k: optional top-k before top-p (None: plain top-p, as the paper's vLLM and the APIs).
        batch_size: rows per forward pass (default 32 on CPU, 256 on GPU); prompts are sorted by length.
        timings: accumulates per-phase seconds (see :func:`generate_tokens`).

    Returns:
        The decoded replies (special tokens skipped, stripped), in the order of ``conversations``. An
        empty reply is ``""``, for the caller to treat as a failure.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    _check_sampling(temperature, top_p, top_k)
    if len(conversations) == 0:
        raise ValueError("No conversations given: `conversations` is empty.")
    encoded = [tokenizer(render(list(m), tokenizer, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for m in conversations]
    if batch_size is None:
        batch_size = GPU_BATCH_SIZE if _model_device(model).type == "cuda" else CPU_BATCH_SIZE
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    pad_id, stops = _pad_id(tokenizer), stop_token_ids(model, tokenizer)
    texts: list[str] = [""] * len(encoded)
    for b, start in enumerate(range(0, len(order), batch_size)):
        rows = order[start:start + batch_size]
        new = generate_tokens(model, [encoded[i] for i in rows], max_new_tokens, temperature, top_p, seed + b,
                              pad_id=pad_id, stop_ids=stops, top_k=top_k, timings=timings)
        for i, tokens in zip(rows, new):
            texts[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return texts


def settings_key(settings: dict) -> str:
    """A short, stable tag for a dict of generation settings (for cache keys)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
