"""A brief finetune of a few blocks, with or without a steering vector added during training (Part 3).

Preventative steering (Persona Vectors, Section 5): while finetuning on data that would push the model along a
trait vector ``v``, add ``alpha * v`` to the residual stream at the trait's layer during every *training* forward
pass. The steering already supplies the push the data asks for, so the weights need to move less along ``v``;
once the steering is removed the model has shifted less. This module holds the pieces:

- :func:`response_batch`: a padded batch of conversations, with a mask of each response's content tokens;
- :func:`response_loss`: the next-token cross-entropy on those tokens only (the prompt is context, not a target);
- :func:`steered_response_loss`: the same loss with :func:`utils.steering.steering` active during the forward pass;
- :func:`finetuned`: a context manager that trains a few blocks for a few steps (AdamW on float32 master copies
  of their weights, so a bf16 model learns too), yields, and puts every weight back exactly on exit.

What it is, honestly: a LoRA-free finetune of ``len(layers)`` blocks for ``steps`` optimisation steps, every other
weight frozen. On a CPU that is seconds for SmolLM2; it is a demonstration of the mechanism, not the paper's
full finetune (all weights, thousands of examples, several epochs).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from utils.activations import _pad_batch, _tokenise, decoder_layers
from utils.conversation import Message
from utils.steering import steering

__all__ = ["finetuned", "response_batch", "response_loss", "steered_response_loss", "trained_blocks"]

Batch = dict[str, Tensor]
LossFn = Callable[[torch.nn.Module, Batch], Tensor]


def response_batch(tokenizer, conversations: Sequence[list[Message]], device: torch.device | str = "cpu") -> Batch:
    """A padded batch of conversations that each end with an assistant turn.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (int64 ``[B, L]``) and ``response_mask`` (float32
    ``[B, L]``, 1 on each response's content tokens, :func:`utils.conversation.response_token_span`'s span), padded on
    ``tokenizer.padding_side``, on ``device``. Tokens after a response (its end-of-turn marker) are not included.
    """
    items = _tokenise(conversations, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    enc = _pad_batch(items, pad_id, getattr(tokenizer, "padding_side", "right") or "right")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
            "position_ids": enc["position_ids"].to(device), "response_mask": enc["span_mask"].to(device)}


def response_loss(model, batch: Batch) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy over the response tokens of a :func:`response_batch`.

    Position ``t`` predicts token ``t + 1``; a prediction counts when token ``t + 1`` is a response content token
    (``response_mask[:, 1:]``). The mean is over every counted prediction of the batch (not per sequence first),
    from float32 logits.
    """
    input_ids: Int[Tensor, "batch seq"] = batch["input_ids"]
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   use_cache=False).logits
    targets = input_ids[:, 1:]
    weights = batch["response_mask"][:, 1:].to(logits.device).float()
    if float(weights.sum()) == 0:
        raise ValueError("The batch has no response tokens to train on.")
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                             reduction="none")
    return (losses * weights.reshape(-1)).sum() / weights.sum()


def steered_response_loss(model, batch: Batch, layer: int | None = None,
                          vector: Float[Tensor, " d_model"] | None = None) -> Float[Tensor, ""]:
    """:func:`response_loss` with ``vector`` added to block ``layer``'s output at every position during the forward
    pass (no steering when ``vector`` is None). The hook is gone when this returns; the loss keeps its graph."""
    if vector is None:
        return response_loss(model, batch)
    if layer is None:
        raise ValueError("A steering vector needs its layer.")
    with steering(model, {layer: vector}):
        return response_loss(model, batch)


@contextlib.contextmanager
def finetuned(
    model,
    tokenizer,
    conversations: Sequence[list[Message]],
    layers: Sequence[int],
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 8,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "finetune",
) -> Iterator[list[float]]:
    """Train blocks ``layers`` of ``model`` in place for ``steps`` steps, yield the losses, then restore every weight.

    Each step takes the next batch of ``batch_size`` conversations (shuffled once with ``seed``, cycled), computes
    ``loss_fn(model, batch)`` (default :func:`response_loss`; pass a steered loss for preventative steering) with
    gradients on, and takes one AdamW step (no weight decay) on float32 master copies of the trained blocks'
    weights, which are then copied back in the model's dtype. Every other weight is frozen. Inside the ``with``
    block the model is the finetuned one (generate or read it there); on exit, normally or not, every trained
    weight gets its original value back, bit for bit, and ``requires_grad`` is off again.

    Args:
        layers: block indices to train (``model.model.layers[l]``).
        steps: optimisation steps (>= 1).
        lr: AdamW's learning rate.
    """
    blocks = decoder_layers(model)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1; got {steps}, {batch_size}.")
    if not layers:
        raise ValueError("layers is empty: name the blocks to train.")
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise ValueError(f"Layer {layer} is out of range: the model has {len(blocks)} blocks.")
    loss_fn = loss_fn or response_loss
    params = [p for layer in sorted(set(layers)) for p in blocks[layer].parameters()]
    originals = [p.detach().clone() for p in params]
    masters = [p.detach().float().clone() for p in params]
    optimizer = torch.optim.AdamW(masters, lr=lr, weight_decay=0.0)
    device = model.get_input_embeddings().weight.device
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    batches = [[conversations[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
    if not batches:
        raise ValueError("No conversations to train on.")
    encoded = [response_batch(tokenizer, b, device) for b in batches]
    losses: list[float] = []
    try:
        for p in params:
            p.requires_grad_(True)
        for step in tqdm(range(steps), desc=desc, disable=not progress):
            for p in params:
                p.grad = None
            with torch.enable_grad():
                loss = loss_fn(model, encoded[step % len(encoded)])
                loss.backward()
            for master, p in zip(masters, params):
                master.grad = None if p.grad is None else p.grad.detach().float()
            optimizer.step()
            with torch.no_grad():
                for master, p in zip(masters, params):
                    p.copy_(master)
            losses.append(float(loss.detach()))
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        yield losses
    finally:
        with torch.no_grad():
            for original, p in zip(originals, params):
                p.requires_grad_(False)
                p.grad = None
                p.copy_(original)


def trained_blocks(layer: int, n_layers: int, count: int = 2) -> list[int]:
    """The ``count`` blocks up to and including ``layer`` (they can move the activations at ``layer``)."""
    return list(range(max(0, layer - count + 1), min(layer, n_layers - 1) + 1))
