"""Part 2's machinery on a GPU at Gemma 2 27B's shape, with no download: ``python -m benchmarks.gpu_part2``.

Part 2's GPU path reads whole transcripts in 8,192-token windows and steers and caps a 46-block model in
bf16. The real Gemma 2 27B needs its weights (a download); this script runs the same course machinery on a
model with Gemma 2 27B's shape (46 blocks, d_model 4608, vocab 256,000) and random bf16 weights, built
straight on the GPU (:func:`benchmarks.gpu_extraction.build_model`): the same kernels, FLOPs and memory,
none of the science. Token ids come from tiny-gemma2's Gemma-faithful tokenizer (same template and special
ids). It runs, and times, in one process:

1. **drift**: :func:`utils.turns.per_turn_projections` (Part 2's span rule, trailing windows of whole turns)
   of the first ``--turns`` assistant turns of the paper's therapy transcript at layer 22, in windows of
   ``--max-tokens`` (8,192): seconds per window and peak memory.
2. **capping on generation**: :func:`utils.generation.generate_tokens` (greedy, exactly ``--new-tokens`` per
   prompt), plain and inside :func:`utils.steering.capping` at :func:`utils.models.cap_layer_range` (layers
   32-40 of 46), along random unit axes with thresholds at the 25th percentile of the prompts' own
   projections; best of ``--repeats``, alternating: ``capping_overhead_ratio``. A
   :class:`utils.steering.ProjectionProbe` entered *after* the capping hooks must see every position at or
   above its threshold, up to bf16 rounding (``worst_shortfall``, relative to the hidden state's norm).
3. **steering**: the same generation inside :func:`utils.steering.steering` at layer 22 on generated tokens
   only; no hook may be left on any block afterwards.
4. **cost**: :func:`utils.experiments.next_token_kl` of capping on the prompts (float32 log-softmax over the
   256,000-token vocabulary).

``--shape tiny`` runs everything on the CPU in seconds (the test suite does). Run it on a GPU box before the
notebook: it says, in a few minutes and with no download, whether Part 2's path fits and how fast it runs.
The last line is one JSON object.
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


def main(argv: list[str] | None = None) -> int:
    from benchmarks.gpu_extraction import GEMMA2_27B_SHAPE, TINY_SHAPE, build_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["gemma2-27b", "tiny"], default="gemma2-27b")
    p.add_argument("--turns", type=int, default=8, help="assistant turns of the therapy transcript to project")
    p.add_argument("--max-tokens", type=int, default=None, help="window (default 8192; tiny: 4096)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if min(a.turns, a.prompts, a.new_tokens, a.repeats) < 1:
        p.error("--turns, --prompts, --new-tokens and --repeats must be >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.shape == "gemma2-27b" and device == "cpu":
        raise SystemExit("The gemma2-27b shape needs a CUDA GPU (~55 GB of bf16 weights for all 46 blocks). "
                         "Use --shape tiny to check the script on a CPU.")
    shape = GEMMA2_27B_SHAPE if a.shape == "gemma2-27b" else TINY_SHAPE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    max_tokens = a.max_tokens or (8192 if a.shape == "gemma2-27b" else 4096)
    n_layers = shape["num_hidden_layers"]
    layer = min(22, n_layers - 2)

    from benchmarks.capping import alternating_best, persona_conversations, prompt_thresholds
    from utils.conversation import encode, render
    from utils.experiments import next_token_kl
    from utils.generation import generate_tokens
    from utils.models import TINY, load_model
    from utils.steering import CapStats, ProjectionProbe, capping, steering
    from utils.models import cap_layer_range
    from utils.transcripts import drift_transcripts, load_transcript
    from utils.activations import per_turn_projections

    t0 = time.perf_counter()
    model = build_model(shape, n_layers, device, dtype)
    build_s = time.perf_counter() - t0
    tokenizer = load_model(TINY)[1]  # Gemma's template and special ids; its ids are valid rows of the vocabulary
    d_model = shape["hidden_size"]
    g = torch.Generator().manual_seed(0)

    # 1. Drift: per-turn projections in trailing windows of whole turns.
    messages = load_transcript(drift_transcripts()["therapy"])
    cut = [i for i, m in enumerate(messages) if m["role"] == "assistant"][:a.turns]
    messages = messages[:cut[-1] + 1]
    axis = torch.randn(d_model, generator=g)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    projections = per_turn_projections(model, tokenizer, messages, axis, layer, max_tokens=max_tokens)
    _sync(device)
    drift_s = time.perf_counter() - t0
    total_tokens = len(encode(render(messages, tokenizer), tokenizer))
    drift = {"turns": len(projections), "conversation_tokens": total_tokens, "max_tokens": max_tokens,
             "seconds": round(drift_s, 2), "seconds_per_turn": round(drift_s / len(projections), 3),
             "peak_gib": _peak_gib(device), "finite": bool(torch.isfinite(projections).all())}

    # 2. Capping on generation, against plain generation, in the same run (benchmarks.capping's prompts,
    # thresholds and timing, on this model).
    conversations = persona_conversations("google/gemma-2-27b-it", a.prompts)
    prompts = [encode(render(c, tokenizer, add_generation_prompt=True), tokenizer) for c in conversations]
    layers = cap_layer_range(n_layers)
    axes = {cap: torch.randn(d_model, generator=g) for cap in layers}
    taus = prompt_thresholds(model, tokenizer, conversations, axes)
    pad = tokenizer.pad_token_id

    def run():
        out = generate_tokens(model, prompts, a.new_tokens, temperature=0.0, pad_id=pad, stop_ids=())
        _sync(device)
        return out

    def capped():
        with capping(model, axes, taus):
            return run()

    best, _ = alternating_best({"plain": run, "capped": capped}, a.repeats)
    # The capped outputs, read by a probe registered after the capping hooks.
    stats = CapStats()
    with capping(model, axes, taus, stats=stats), ProjectionProbe(model, axes) as after:
        run()
    worst = 0.0
    with torch.inference_mode():
        scale = model.model.embed_tokens.weight.float().norm(dim=-1).mean().item() * shape["hidden_size"] ** 0.5
    for cap in layers:
        lowest = min(float(x.min()) for x in after.projections[cap])
        worst = max(worst, (taus[cap] - lowest) / scale)

    # 3. Steering on generated tokens only; no hook left afterwards.
    with steering(model, {layer: 4.0 * axis / axis.norm()}, positions="generated"):
        run()
    hooks_left = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.layers)

    # 4. The cost of capping on these conversations.
    cost_stats = CapStats()
    answered = [c + [{"role": "assistant", "content": "I am an AI assistant. I can help with that question."}]
                for c in conversations]
    _sync(device)
    t0 = time.perf_counter()
    cost = next_token_kl(model, tokenizer, answered, lambda: capping(model, axes, taus, stats=cost_stats),
                         stats=cost_stats, progress=False)
    _sync(device)
    cost_s = time.perf_counter() - t0

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"{gpu}, {str(dtype).removeprefix('torch.')}, shape {a.shape} ({n_layers} blocks, d_model {d_model}), "
          f"built in {build_s:.1f} s; random weights: timings and memory only, no science")
    print(f"  drift: {drift['turns']} turns of therapy ({total_tokens} tokens), windows of {max_tokens}: "
          f"{drift_s:.2f} s ({drift['seconds_per_turn']} s per turn), peak {drift['peak_gib']} GiB")
    print(f"  generation, {a.prompts} prompts x {a.new_tokens} tokens, best of {a.repeats}: plain {best['plain']:.3f} s, "
          f"capped at layers {layers[0]}-{layers[-1]} {best['capped']:.3f} s "
          f"({best['capped'] / best['plain']:.3f}x); {stats.fraction_capped():.0%} of positions capped; "
          f"worst shortfall below tau {worst:.2e} of the hidden state's scale")
    print(f"  steering on generated tokens at layer {layer}: hooks left afterwards {hooks_left}")
    print(f"  cost: KL mean {cost['kl_mean']:.4f} nats over {cost['n_positions']} positions in {cost_s:.2f} s")
    result = {
        "device": gpu, "dtype": str(dtype).removeprefix("torch."), "shape": a.shape, "n_layers": n_layers,
        "build_seconds": round(build_s, 1), "layer": layer, "cap_layers": layers, "drift": drift,
        "plain_s": round(best["plain"], 4), "capped_s": round(best["capped"], 4),
        "capping_overhead_ratio": round(best["capped"] / best["plain"], 4),
        "fraction_capped": round(stats.fraction_capped(), 4), "worst_shortfall": worst,
        "hooks_left": hooks_left, "kl_mean": cost["kl_mean"], "kl_positions": cost["n_positions"],
        "cost_seconds": round(cost_s, 2), "peak_gib": _peak_gib(device),
        "ok": bool(drift["finite"] and hooks_left == 0 and worst <= 1e-2),
    }
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
