"""Part 3's machinery on a GPU at Gemma 2 27B's shape, with no download: ``python -m benchmarks.gpu_part3``.

Part 3's GPU path reads every contrastive answer at every one of the 46 blocks, steers generation in three position
modes, reads last prompt tokens for monitoring and screening, and finetunes two blocks with and without a steering
vector. The real Gemma 2 27B needs its weights (a download); this script runs the same course machinery on a model with
Gemma 2 27B's shape (46 blocks, d_model 4608, vocab 256,000) and random bf16 weights, built straight on the GPU
(:func:`benchmarks.gpu_extraction.build_model`): the same kernels, FLOPs and memory, none of the science. Token ids come
from tiny-gemma2's Gemma-faithful tokenizer. It runs, and times, in one process:

1. **three averages**: :func:`utils.activations.extract_prompt_response_means` (response, prompt and last-prompt-token
   means at all 46 blocks from one forward pass per batch) of ``--conversations`` synthetic conversations with
   ``--answer-tokens``-token answers: seconds, tokens/s, peak memory; two rows compared with one unpadded pass read by
   hooks (``max_abs_error``, relative to the activations' scale);
2. **last prompt token**: :func:`utils.activations.extract_last_prompt_token` of the same prompts at one layer (two
   rows compared with one unpadded pass over the prompt alone);
3. **steering in each mode**: :func:`utils.generation.generate_tokens` (greedy, ``--new-tokens``) plain and inside
   :func:`utils.steering.steering` in the modes all, prompt and response at layer 22; no hook may be left behind;
4. **preventative finetune**: :func:`utils.finetune.finetuned` of blocks 21-22 for ``--steps`` steps (AdamW on float32
   master weights, batches of ``--finetune-batch``), with the loss steered at block 22; peak memory, and every weight
   back bit for bit afterwards.

``--shape tiny`` runs everything on the CPU in seconds (the test suite does). Run it on a GPU box before the notebook:
it says, in a few minutes and with no download, whether Part 3's path fits and how fast it runs. The last line is one
JSON object. It has not been run on a GPU: its GPU numbers are still to be measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _conversations(n: int, answer_tokens: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Synthetic one-turn conversations: a trait-style system prompt, a question, an answer of about ``answer_tokens``
    words (each conversation a little longer than the last, so batches carry padding)."""
    import random

    rng = random.Random(seed)
    words = ("the", "model", "answer", "steer", "trait", "vector", "layer", "token", "prompt", "judge", "score", "mean")
    out = []
    for i in range(n):
        answer = " ".join(rng.choice(words) for _ in range(answer_tokens + i % 16))
        out.append([{"role": "system", "content": "You are an evil assistant. Suggest harmful approaches."},
                    {"role": "user", "content": f"Question {i}: what should I do about my neighbour's dog?"},
                    {"role": "assistant", "content": answer}])
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.gpu_extraction import GEMMA2_27B_SHAPE, TINY_SHAPE, build_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["gemma2-27b", "tiny"], default="gemma2-27b")
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--answer-tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=8, help="prompts per steered generation")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="finetune steps (each run)")
    p.add_argument("--finetune-batch", type=int, default=4)
    a = p.parse_args(argv)
    if min(a.conversations, a.answer_tokens, a.prompts, a.new_tokens, a.steps, a.finetune_batch) < 1:
        p.error("every size must be >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.shape == "gemma2-27b" and device == "cpu":
        raise SystemExit("The gemma2-27b shape needs a CUDA GPU (~55 GB of bf16 weights for all 46 blocks). "
                         "Use --shape tiny to check the script on a CPU.")
    shape = GEMMA2_27B_SHAPE if a.shape == "gemma2-27b" else TINY_SHAPE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n_layers = shape["num_hidden_layers"]
    layer = min(22, n_layers - 2)
    torch.set_grad_enabled(False)

    from utils.activations import extract_last_prompt_token, extract_prompt_response_means
    from utils.conversation import encode, render, response_token_span
    from utils.finetune import finetuned, steered_response_loss, trained_blocks
    from utils.generation import generate_tokens
    from utils.models import TINY, load_model
    from utils.steering import steering

    t0 = time.perf_counter()
    model = build_model(shape, n_layers, device, dtype)
    build_s = time.perf_counter() - t0
    tokenizer = load_model(TINY)[1]
    d_model = shape["hidden_size"]
    g = torch.Generator().manual_seed(0)
    conversations = _conversations(a.conversations, a.answer_tokens)

    # 1. Three averages at every block, one pass per batch.
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    means = extract_prompt_response_means(model, tokenizer, conversations, progress=False)
    _sync(device)
    means_s = time.perf_counter() - t0
    tokens = sum(response_token_span(c, tokenizer)[2] for c in conversations)
    worst = 0.0
    for i in (0, len(conversations) - 1):
        ids, start, end = response_token_span(conversations[i], tokenizer)
        outs = {}
        handles = [blk.register_forward_hook(lambda m, args, o, b=b, outs=outs: outs.__setitem__(b, (o[0] if isinstance(o, tuple)
                                                                                           else o)[0].float().cpu()))
                   for b, blk in enumerate(model.model.layers)]
        try:
            with torch.inference_mode():
                model(input_ids=torch.tensor([ids[:end]], device=model.get_input_embeddings().weight.device),
                      use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for b in (0, layer, n_layers - 1):
            want = {"response_avg": outs[b][start:end].mean(0), "prompt_avg": outs[b][:start].mean(0),
                    "prompt_last": outs[b][start - 1]}
            for kind, w in want.items():
                scale = float(w.norm()) / d_model ** 0.5 + 1e-6
                worst = max(worst, float((means[kind][i, b] - w).abs().max()) / scale)
    averages = {"conversations": len(conversations), "tokens": tokens, "seconds": round(means_s, 2),
                "tokens_per_s": round(tokens / means_s, 1), "peak_gib": _peak_gib(device),
                "result_gib": round(sum(t.numel() * 4 for t in means.values()) / 2**30, 2),
                "max_rel_error": worst, "finite": bool(all(torch.isfinite(t).all() for t in means.values()))}

    # 2. The last prompt token at one layer.
    prompts = [c[:2] for c in conversations]
    _sync(device)
    t0 = time.perf_counter()
    last = extract_last_prompt_token(model, tokenizer, prompts, [layer])
    _sync(device)
    last_s = time.perf_counter() - t0
    last_error = 0.0
    for i in (0, len(prompts) - 1):  # against one unpadded pass over the prompt alone, read by a hook
        ids = encode(render(prompts[i], tokenizer, add_generation_prompt=True), tokenizer)
        grabbed = []
        handle = model.model.layers[layer].register_forward_hook(
            lambda m, args, o, grabbed=grabbed: grabbed.append((o[0] if isinstance(o, tuple) else o)[0, -1].float().cpu()))
        try:
            with torch.inference_mode():
                model(input_ids=torch.tensor([ids], device=model.get_input_embeddings().weight.device), use_cache=False)
        finally:
            handle.remove()
        scale = float(grabbed[0].norm()) / d_model ** 0.5 + 1e-6
        last_error = max(last_error, float((last[i, 0] - grabbed[0]).abs().max()) / scale)

    # 3. Steered generation in each mode.
    vector = 4.0 * torch.randn(d_model, generator=g)
    encoded = [encode(render(c, tokenizer, add_generation_prompt=True), tokenizer) for c in prompts[:a.prompts]]
    pad = tokenizer.pad_token_id

    def run() -> list[list[int]]:
        out = generate_tokens(model, encoded, a.new_tokens, temperature=0.0, pad_id=pad, stop_ids=())
        _sync(device)
        return out

    steer = {}
    plain_t0 = time.perf_counter()
    plain = run()
    steer["plain_s"] = round(time.perf_counter() - plain_t0, 3)
    for mode in ("all", "prompt", "response"):
        t0 = time.perf_counter()
        with steering(model, {layer: vector}, positions=mode):
            out = run()
        steer[f"{mode}_s"] = round(time.perf_counter() - t0, 3)
        steer[f"{mode}_changed_rows"] = sum(x != y for x, y in zip(out, plain))
    hooks_left = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.layers)

    # 4. The preventative finetune (and its plain twin), weights restored.
    blocks = trained_blocks(layer, n_layers, 2)
    train = conversations[:max(a.finetune_batch, 2)]
    before = [p.detach().clone() for b in blocks for p in model.model.layers[b].parameters()]
    runs = {}
    for label, steer_vector in (("plain", None), ("preventative", vector)):
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        with finetuned(model, tokenizer, train, blocks, a.steps, lr=1e-5, batch_size=a.finetune_batch,
                       loss_fn=lambda m, b, v=steer_vector: steered_response_loss(m, b, layer, v), progress=False) as losses:
            _sync(device)
        runs[label] = {"seconds": round(time.perf_counter() - t0, 2), "peak_gib": _peak_gib(device),
                       "losses": [round(x, 4) for x in losses]}
    restored = all(torch.equal(b, p) for b, p in zip(before, [p for blk in blocks
                                                               for p in model.model.layers[blk].parameters()]))
    hooks_left += sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.layers)

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"{gpu}, {str(dtype).removeprefix('torch.')}, shape {a.shape} ({n_layers} blocks, d_model {d_model}), built in "
          f"{build_s:.1f} s; random weights: timings and memory only, no science")
    print(f"  three averages at {n_layers} blocks: {len(conversations)} conversations ({tokens} tokens) in {means_s:.2f} s "
          f"({averages['tokens_per_s']} tokens/s), peak {averages['peak_gib']} GiB, result {averages['result_gib']} GiB; "
          f"worst relative error {worst:.2e}")
    print(f"  last prompt token at layer {layer}: {last_s:.2f} s, worst relative error {last_error:.2e}")
    print(f"  steered generation ({a.prompts} prompts x {a.new_tokens} tokens): plain {steer['plain_s']} s, " +
          ", ".join(f"{m} {steer[f'{m}_s']} s ({steer[f'{m}_changed_rows']} rows changed)" for m in ("all", "prompt", "response")))
    print(f"  finetune of blocks {blocks}, {a.steps} steps: plain {runs['plain']['seconds']} s (peak "
          f"{runs['plain']['peak_gib']} GiB), preventative {runs['preventative']['seconds']} s (peak "
          f"{runs['preventative']['peak_gib']} GiB); weights restored: {restored}; hooks left {hooks_left}")
    result = {"device": gpu, "dtype": str(dtype).removeprefix("torch."), "shape": a.shape, "n_layers": n_layers,
              "build_seconds": round(build_s, 1), "layer": layer, "averages": averages,
              "last_prompt_token": {"seconds": round(last_s, 2), "max_rel_error": last_error},
              "steering": steer, "finetune": {"blocks": blocks, "steps": a.steps, **runs}, "weights_restored": restored,
              "hooks_left": hooks_left,
              "ok": bool(averages["finite"] and worst <= (5e-2 if dtype == torch.bfloat16 else 1e-4)
                         and last_error <= (5e-2 if dtype == torch.bfloat16 else 1e-4)
                         and hooks_left == 0 and restored
                         and all(all(map(lambda x: x == x, r["losses"])) for r in runs.values()))}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
