"""Local generation: the real Hugging Face model, with exact top-p sampling and a lean decode loop.

Use::

    texts = generate(model, tokenizer, conversations, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)
    client = LocalChatClient(model, tokenizer)   # the same thing behind the OpenAI-style chat interface

**Hooks (Part 2's steering and capping).** :func:`generate` runs exactly the model object it is given,
through its own ``forward``: every ``model.model.layers[i]`` (``utils.activations.decoder_layers``) is
called as a module, so forward hooks registered on it fire at every step (prefill and each new token).
The course loads one model (:func:`utils.models.load_model`, in the dtype of its row in
:data:`utils.models.MODEL_CONFIGS`: bf16 where the hardware computes it natively), and that one model
writes the text and gives the activations, so a hook on the notebook's ``model`` acts on both. In a bf16
model a layer's output is bf16: a hook that adds or projects out a float32 vector should do the arithmetic
in float32 and cast back, ``(h.float() + c * v).to(h.dtype)``. In transformers 4.x a layer's output is a
tuple, in 5.x a tensor.

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

**LocalChatClient** gathers requests that arrive from many threads at once into batches for
:func:`generate`, so the same thread-pool code that calls an API runs fast offline. Batches are formed by
content, not by arrival order, so a rerun with the same seed gives identical text.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from jaxtyping import Float, Int
from torch import Tensor

from utils.conversation import Message, render
from utils.judges import Completions, completion

__all__ = [
    "SAMPLER_VERSION",
    "LocalChatClient",
    "generate",
    "generate_tokens",
    "hf_generate",
    "parameter_bytes",
    "sample_next",
    "top_p_distribution",
]

# Bump when the sampler or decode loop changes what text a seed gives: the runner's cache key carries it.
SAMPLER_VERSION = "topp-exact-1"
# The sampler's fast path looks at this many most likely tokens first (see the module docstring).
CANDIDATES = 64
# Rows per forward pass. CPU: the demo batch size (its client gathers 32 requests); GPU: a size that fills it.
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256


def _model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


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
        model: the model that generates (hooks registered on its layers act on every step).
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


# ---------------------------------------------------------------------------------------------------
# The OpenAI-style local client
# ---------------------------------------------------------------------------------------------------

@dataclass
class _Request:
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    future: Future = field(default_factory=Future)

    def sampling(self) -> tuple:
        return (self.max_tokens, self.temperature, self.top_p)


class LocalChatClient:
    """OpenAI-style chat client backed by a local model; batches concurrent requests, reproducibly.

    Requests that arrive together form a *wave*: the client gathers requests until none has arrived for
    ``gather_seconds``. It then sorts the wave by content (sampling settings, the request's own ``seed``
    if it passed one, then the rendered prompt), splits it into batches of at most ``max_batch_size``, and
    seeds each batch from the client's ``seed`` and the batch's content. A reply therefore depends on the
    seed and on which requests came together, never on the order in which threads happened to deliver
    them or on how many batches ran before. A thread pool whose threads submit their next request as soon
    as they get a reply (the course's ``generate_all_responses``) forms the same waves on every run, so a
    rerun with the same seed gives identical text. Identical requests in one wave are interchangeable:
    which caller gets which of their replies is arbitrary unless each passes its own ``seed``.

    Args:
        model, tokenizer: from :func:`utils.models.load_model` (the model itself generates: hooks on it act).
        max_batch_size: the most requests generated together.
        gather_seconds: the quiet time that closes a wave.
        max_wave_seconds: a wave closes after this long even if requests keep arriving (the client then
            says so: replies may then depend on timing).
        seed: the seed every batch's seed is derived from.

    ``client.batches_run`` and ``client.waves_run`` count what it did.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 32, gather_seconds: float = 0.1, seed: int = 0,
                 max_wave_seconds: float = 10.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.gather_seconds, self.seed = max_batch_size, gather_seconds, seed
        self.max_wave_seconds = max_wave_seconds
        self.chat = SimpleNamespace(completions=Completions(self._create))
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self.batches_run = 0
        self.waves_run = 0
        self.waves_cut = 0
        self._worker = threading.Thread(target=self._run, name="LocalChatClient", daemon=True)
        self._worker.start()

    # The OpenAI-compatible entry point.
    def _create(self, *, model: str, messages: list[dict], max_tokens: int = 128, temperature: float = 0.7,
                top_p: float = 0.9, seed: int | None = None, **_ignored):
        request = _Request(messages, int(max_tokens), float(temperature), float(top_p),
                           None if seed is None else int(seed))
        self._queue.put(request)
        return completion(request.future.result(), model)

    def close(self) -> None:
        self._queue.put(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            wave, closing = [first], False
            deadline = time.monotonic() + self.max_wave_seconds
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.waves_cut += 1
                    print(f"LocalChatClient: requests kept arriving for {self.max_wave_seconds} s, so this wave "
                          f"was cut by time; replies may now depend on timing.", flush=True)
                    break
                try:
                    item = self._queue.get(timeout=min(self.gather_seconds, left))
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                wave.append(item)
            self._serve(wave)
            self.waves_run += 1
            if closing:
                return

    def _serve(self, wave: list[_Request]) -> None:
        """Sort a wave by content, generate it in batches, and answer every request (or hand it its error)."""
        keyed = []
        for req in wave:
            try:
                prompt = render(list(req.messages), self.tokenizer, add_generation_prompt=True)
            except BaseException as exc:  # a malformed request fails alone
                req.future.set_exception(exc)
                continue
            keyed.append(((req.sampling(), -1 if req.seed is None else req.seed, len(prompt), prompt), req))
        keyed.sort(key=lambda pair: pair[0])
        for _, same_sampling in itertools.groupby(keyed, key=lambda pair: pair[0][0]):
            group = list(same_sampling)
            for start in range(0, len(group), self.max_batch_size):
                self._answer(group[start:start + self.max_batch_size])

    def _answer(self, batch: list[tuple[tuple, _Request]]) -> None:
        """Generate one batch of (key, request) pairs, seeded by its keys; every caller gets its reply or the error."""
        try:
            texts = self._generate([req for _, req in batch], _batch_seed(self.seed, [key for key, _ in batch]))
            for (_, req), text in zip(batch, texts):
                req.future.set_result(text)
        except BaseException as exc:  # every waiting caller in the batch sees the error
            for _, req in batch:
                if not req.future.done():
                    req.future.set_exception(exc)

    def _generate(self, batch: list[_Request], seed: int) -> list[str]:
        first = batch[0]
        texts = generate(self.model, self.tokenizer, [r.messages for r in batch], first.max_tokens,
                         first.temperature, first.top_p, seed=seed)
        self.batches_run += 1
        return texts


def _batch_seed(seed: int, keys: list[tuple]) -> int:
    """A batch's sampling seed: a stable hash of the client's seed and the batch's sorted contents."""
    digest = hashlib.sha256(repr((seed, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def hf_generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, temperature: float = 0.7,
                top_p: float = 0.9, seed: int = 0) -> list[str]:
    """Hugging Face's own ``model.generate``, the benchmark's baseline and the tests' reference: one left-padded
    call in the model's own dtype (HF adds its default top-k 50 before top-p).

    The system prompt is handled by :func:`utils.conversation.render` (merged into the first user turn
    for Gemma). Deterministic for a given batch, seed and thread count. Replies are stripped; an empty
    reply is returned as ``""`` for the caller to treat as a failure.
    """
    prompts = [render(messages, tokenizer, add_generation_prompt=True) for messages in conversations]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Generation always pads on the left, so every prompt ends where its new tokens begin.
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, width:].cpu()]
