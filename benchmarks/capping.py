"""Benchmark activation capping's cost on generation: capped against plain, in the same run.

Run::

    python -m benchmarks.capping [--model smollm2-135m-instruct] [--prompts 8] [--new-tokens 48] [--repeats 5]

Both variants generate with the course's generation path, :func:`utils.generation.generate_tokens` on the
course's one model (in its table dtype: bf16 on a CPU that supports it, ``COURSE_DTYPE`` overrides), in one batch, greedy, on the same ``--prompts``
persona conversations, at exactly ``--new-tokens`` new tokens each: no stop token ends a row early, so
capping's changed text cannot make one variant do less work. The capped variant wraps the call in
:func:`utils.steering.capping` at the model table's capping layers (SmolLM2: layers 21-26 of 30)
with ``positions="all"`` (the paper's setting), along a fixed random unit axis per layer with the
threshold at the 25th percentile of the prompts' own projections (so a realistic share of positions is
capped; the cost does not depend on the share). A third variant also counts capped positions
(``stats=CapStats()``).

After one warm-up of each, the variants alternate (the order flips every repeat) ``--repeats`` times and
the best time of each counts, both wall-clock and this process's CPU time. The machine may be shared:
the load average is printed, and wall-clock timings taken under load are noisy; with ``--threads 1`` the
CPU-time ratio is much less sensitive to other processes (on a quiet machine the two ratios agree).
The last line printed is one JSON object with ``capping_overhead_ratio``
(capped / plain; target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from utils.conversation import encode, render
from utils.generation import generate_tokens
from utils.models import config_for_model, load_model
from utils.steering import CapStats, capping


def persona_conversations(model_name: str, n: int) -> list[list[dict]]:
    """``n`` default-and-role persona conversations (personas in turn, every third question), for timing."""
    from utils.conversation import chat_messages
    from utils.data import working_personas, working_questions
    from utils.models import short_model_name

    personas = list(working_personas(short_model_name(model_name)).values())
    questions = working_questions(15)
    return [chat_messages(personas[i % len(personas)], questions[(3 * i) % len(questions)]) for i in range(n)]


def prompt_thresholds(model, tokenizer, conversations, axes) -> dict[int, float]:
    """25th percentile of the prompts' block-output projections on each layer's axis."""
    from utils.conversation import encode, render
    from utils.steering import ProjectionProbe, capping_thresholds

    with torch.inference_mode(), ProjectionProbe(model, axes) as probe:
        for conv in conversations:
            ids = encode(render(conv, tokenizer, add_generation_prompt=True), tokenizer)
            model(input_ids=torch.tensor([ids], device=model.get_input_embeddings().weight.device))
    return capping_thresholds({layer: torch.cat([p.reshape(-1) for p in probe.projections[layer]]) for layer in axes})


def alternating_best(variants: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """One warm-up call of each variant, then ``repeats`` rounds in alternating order (the order flips every
    round); returns the best wall-clock and the best process-CPU seconds of each."""
    best = {name: float("inf") for name in variants}
    best_cpu = {name: float("inf") for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    names = list(variants)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            variants[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
            best_cpu[name] = min(best_cpu[name], time.process_time() - c0)
    return best, best_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.new_tokens < 1 or args.repeats < 1:
        parser.error("--prompts, --new-tokens and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    dtype = str(model.dtype).removeprefix("torch.")
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    layers = list(config_for_model(model).cap_layers)
    g = torch.Generator().manual_seed(0)
    axes = {layer: torch.randn(d_model, generator=g) for layer in layers}
    conversations = persona_conversations(args.model, args.prompts)
    taus = prompt_thresholds(model, tokenizer, conversations, axes)
    prompts = [encode(render(c, tokenizer, add_generation_prompt=True), tokenizer) for c in conversations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run():
        out = generate_tokens(model, prompts, args.new_tokens, temperature=0.0, pad_id=pad, stop_ids=())
        assert all(len(row) == args.new_tokens for row in out), "every row generates exactly --new-tokens"
        return out

    def plain():
        return run()

    def capped():
        with capping(model, axes, taus):
            return run()

    stats = CapStats()

    def capped_stats():
        with capping(model, axes, taus, stats=stats):
            return run()

    variants = {"plain": plain, "capped": capped, "capped+stats": capped_stats}
    best, best_cpu = alternating_best(variants, args.repeats)

    ratio = best["capped"] / best["plain"]
    ratio_stats = best["capped+stats"] / best["plain"]
    ratio_cpu = best_cpu["capped"] / best_cpu["plain"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {args.model} (runs in {dtype}: {model.config.course_dtype_reason}), {args.prompts} prompts "
          f"x {args.new_tokens} new tokens, greedy; capping layers {layers[0]}-{layers[-1]} ({len(layers)} of {n_layers}); "
          f"best of {args.repeats}; torch threads {torch.get_num_threads()}; load average {load:.2f}")
    print("  variant        wall (best)       process CPU time (best)")
    for name in variants:
        print(f"  {name:13s}  {best[name]:7.3f} s {best[name] / best['plain']:6.3f}x   "
              f"{best_cpu[name]:7.3f} s {best_cpu[name] / best_cpu['plain']:6.3f}x")
    print(f"  fraction of positions capped: {stats.fraction_capped():.2f}")
    print(json.dumps({"capping_overhead_ratio": round(ratio, 4), "capping_with_stats_ratio": round(ratio_stats, 4),
                      "capping_overhead_ratio_cpu_time": round(ratio_cpu, 4),
                      "plain_s": round(best["plain"], 4), "capped_s": round(best["capped"], 4),
                      "model": args.model, "dtype": dtype, "prompts": args.prompts, "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "layers": layers, "fraction_capped": round(stats.fraction_capped(), 4),
                      "generation": "utils.generation.generate_tokens on the model", "load_average": round(load, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
