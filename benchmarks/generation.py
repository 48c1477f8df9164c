"""Benchmark local generation: float32 HF ``generate`` against :mod:`utils.generation`.

Run::

    python -m benchmarks.generation [--model smollm2-135m-instruct] [--n 32] [--new-tokens 64]

A demo-shaped batch: the first ``--n`` (persona, question) requests of the Part 1 notebook (its working
personas' system prompts x its working questions, left-padded together), ``--new-tokens`` sampled new
tokens at temperature 0.7, top-p 0.9. Variants, each in a fresh subprocess, on the same prompts and
token budget:

- ``f32_generate``: the baseline, :func:`utils.backends.hf_generate_batch`: HF ``generate``
  on the float32 model (which also applies HF's default top-k 50);
- ``bf16_generate``: the same HF ``generate`` on the bf16 copy (what the dtype alone gives);
- ``fast``: :func:`utils.generation.generate` on :func:`utils.generation.generation_model` (the dtype
  :func:`utils.generation.choose_generation_dtype` picks; ``$COURSE_GENERATION_DTYPE`` overrides it).

In its subprocess each variant loads the model (and, for the bf16 ones, makes the bf16 copy; the RSS
it adds is reported), warms up on 4 new tokens, then is timed ``--repeats`` times (best counts), with
peak RSS measured during the first timed run. Then it profiles a shorter run (``--profile-tokens``)
with ``torch.profiler`` and prints where the time goes, by op family, per decode step. It also
measures the matmul rate of its dtype on the model's own weight shapes at ``M = n`` rows, and turns
the run's matmul FLOPs (prefill over the padded prompt width, LM head on the last position only;
decode steps over the rows still running) into the *compute limit*: the time those FLOPs take at that
rate. ``fraction_of_compute_limit`` = limit / measured time, for the fast variant.

Tokens/s counts new tokens up to and including each row's stop token (what a reply needs); all
variants stop at the same budget. The machine may be shared: "other load" is how many cores *other*
processes kept busy during the timed runs (from ``/proc/stat``). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.extraction import ForeignLoad, PeakRSS, rss_bytes

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("f32_generate", "bf16_generate", "fast")
LABELS = {"f32_generate": "f32 HF generate", "bf16_generate": "bf16 HF generate", "fast": "fast backend"}
NUM_THREADS = 2
TEMPERATURE, TOP_P = 0.7, 0.9
FAMILIES = (  # op name fragments -> family, first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("attention", ("scaled_dot_product", "aten::_softmax_backward", "flash_attention")),
    ("sampling", ("exponential_", "aten::sort", "aten::topk", "aten::multinomial", "aten::cumsum", "aten::softmax",
                  "aten::_softmax", "aten::logsumexp", "aten::argmax", "aten::isin")),
    ("kv cache / copies", ("aten::cat", "aten::copy_", "aten::index", "aten::_to_copy", "aten::clone")),
    ("elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::rsqrt", "aten::mean", "aten::neg",
                     "aten::where", "aten::div", "aten::sub", "aten::masked_fill", "aten::exp")),
)


def demo_conversations(model_name: str, n: int) -> list[list[dict[str, str]]]:
    """The first ``n`` requests of the Part 1 notebook: its personas x its questions, persona-major."""
    from utils.conversation import chat_messages
    from utils.data import working_personas, working_questions
    from utils.models import short_model_name

    personas = list(working_personas(short_model_name(model_name)).values())
    questions = working_questions(15)
    pairs = [(p, q) for p in personas for q in questions]
    if n > len(pairs):
        raise SystemExit(f"--n {n} is more than the {len(pairs)} requests the notebook makes.")
    return [chat_messages(p, q) for p, q in pairs[:n]]


def run_variant(variant: str, model, tokenizer, conversations, new_tokens: int, seed: int = 0):
    """Token ids of each reply (up to the budget), as lists."""
    import torch

    from utils.conversation import render
    from utils.generation import _pad_id, generate_tokens, stop_token_ids

    prompts = [tokenizer(render(m, tokenizer, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for m in conversations]
    stops = stop_token_ids(model, tokenizer)
    if variant == "fast":
        return generate_tokens(model, prompts, new_tokens, TEMPERATURE, TOP_P, seed, pad_id=_pad_id(tokenizer),
                               stop_ids=stops)
    # HF generate, exactly as utils.backends.hf_generate_batch calls it.
    width = max(map(len, prompts))
    pad = _pad_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=pad,
                             do_sample=True, temperature=TEMPERATURE, top_p=TOP_P)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows


def matmul_rate(model, dtype, rows: int, repeats: int = 10) -> float:
    """FLOP/s of ``[rows, in] @ [in, out]`` over the model's distinct linear weight shapes, weighted as the
    model uses them (once per layer each, plus the LM head)."""
    import torch

    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            key = tuple(module.weight.shape)
            shapes[key] = shapes.get(key, 0) + 1
    flops = seconds = 0.0
    for (out_f, in_f), count in shapes.items():
        x = torch.randn(rows, in_f).to(dtype)
        w = torch.randn(out_f, in_f).to(dtype)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        per_call = float("inf")
        for _ in range(5):  # the best of 5 trials, so a moment of load elsewhere does not lower the rate
            t0 = time.perf_counter()
            for _ in range(repeats):
                torch.nn.functional.linear(x, w)
            per_call = min(per_call, (time.perf_counter() - t0) / repeats)
        flops += count * 2 * rows * in_f * out_f
        seconds += count * per_call
    return flops / seconds


def matmul_flops(model, prompt_lengths: list[int], reply_lengths: list[int]) -> float:
    """Matmul FLOPs of a run: weights (2 x params per token), attention scores and values
    (``4 x heads x head_dim x context`` per token and layer); prefill over the padded width with the
    LM head on the last position only; each decode step over the rows still running."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = cfg.num_hidden_layers
    block_params = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
    lm_head = cfg.vocab_size * cfg.hidden_size
    width, n = max(prompt_lengths), len(prompt_lengths)
    attn_per_ctx = 4 * cfg.num_attention_heads * head_dim * layers
    total = n * width * 2 * block_params + n * 2 * lm_head + n * attn_per_ctx * width * (width + 1) / 2
    for reply in reply_lengths:  # the token sampled last is not fed back
        for step in range(1, reply):
            total += 2 * (block_params + lm_head) + attn_per_ctx * (width + step)
    return total


def profile_table(variant, model, tokenizer, conversations, new_tokens: int) -> dict:
    """Seconds per op family (self CPU time) for a run of ``new_tokens``, and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_variant(variant, model, tokenizer, conversations, new_tokens)
    families: dict[str, float] = {}
    ops = []
    for evt in prof.key_averages():
        sec = evt.self_cpu_time_total / 1e6
        family = next((f for f, keys in FAMILIES if any(k in evt.key for k in keys)), "other")
        families[family] = families.get(family, 0.0) + sec
        ops.append((sec, evt.key, evt.count))
    ops.sort(reverse=True)
    return {"families": families, "top_ops": [[round(s, 3), k, c] for s, k, c in ops[:10]],
            "total": sum(families.values())}


def run_worker(variant: str, args, out_path: str) -> None:
    import torch

    from utils.generation import choose_generation_dtype, generation_model, parameter_bytes
    from utils.models import load_model

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(args.model)
    for param in model.parameters():  # page in the memory-mapped float32 weights, so RSS counts them
        param.sum()
    rss_f32 = rss_bytes()
    if variant == "f32_generate":
        dtype, reason, gen = torch.float32, "HF generate on the float32 model", model
    elif variant == "bf16_generate":
        dtype, reason = torch.bfloat16, "HF generate on the bf16 copy"
        gen = generation_model(model, dtype)
    else:
        choice = choose_generation_dtype("cpu")
        dtype, reason = choice.dtype, choice.reason
        gen = generation_model(model, dtype)
    conversations = demo_conversations(args.model, args.n)
    run_variant(variant, gen, tokenizer, conversations, 4)  # warm-up
    rss_loaded = rss_bytes()
    times, replies = [], None
    cpu0 = sum(os.times()[:2])
    with ForeignLoad() as load:
        for r in range(args.repeats):
            if r == 0:
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    replies = run_variant(variant, gen, tokenizer, conversations, args.new_tokens)
                    times.append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                run_variant(variant, gen, tokenizer, conversations, args.new_tokens)
                times.append(time.perf_counter() - t0)
    cpu_seconds = (sum(os.times()[:2]) - cpu0) / args.repeats
    prof = profile_table(variant, gen, tokenizer, conversations, args.profile_tokens)
    from utils.conversation import render

    prompt_lengths = [len(tokenizer(render(m, tokenizer, add_generation_prompt=True),
                                    add_special_tokens=False)["input_ids"]) for m in conversations]
    reply_lengths = [len(r) for r in replies]
    rate = matmul_rate(gen, dtype, args.n)
    flops = matmul_flops(gen, prompt_lengths, reply_lengths)
    Path(out_path).write_text(json.dumps({
        "variant": variant, "dtype": str(dtype).removeprefix("torch."), "reason": reason,
        "seconds": min(times), "times": times, "foreign_cores": load.cores, "cpu_seconds": cpu_seconds,
        "new_tokens": sum(reply_lengths), "rows_stopped_early": sum(n < args.new_tokens for n in reply_lengths),
        "prompt_width": max(prompt_lengths), "rss_f32_model": rss_f32, "rss_loaded": rss_loaded,
        "rss_peak": mem.peak, "generation_weights_bytes": parameter_bytes(gen),
        "matmul_flops": flops, "matmul_rate": rate, "compute_limit_s": flops / rate, "profile": prof,
        "profile_tokens": args.profile_tokens,
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=32, help="requests in the batch (the demo gathers 32)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--profile-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant; the best counts")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=NUM_THREADS, help="torch threads (the demo machine has 2)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args, args.out)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "f32_generate" not in variants or "fast" not in variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants must include f32_generate and fast, from {VARIANTS}")

    import torch

    print(f"model {args.model}: {args.n} demo requests, {args.new_tokens} new tokens, temperature {TEMPERATURE}, "
          f"top-p {TOP_P}; torch {torch.__version__}, {args.threads} threads", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            out = str(Path(tmp) / variant)
            cmd = [sys.executable, "-m", "benchmarks.generation", "--worker", variant, "--model", args.model,
                   "--n", str(args.n), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                   "--profile-tokens", str(args.profile_tokens), "--threads", str(args.threads), "--out", out]
            proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=dict(os.environ, TQDM_DISABLE="1"),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout + proc.stderr)
                raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
            results[variant] = json.loads(Path(out).read_text())
            print(f"  {LABELS[variant]}: {results[variant]['seconds']:.2f} s", flush=True)

    mib = 2 ** 20
    base = results["f32_generate"]
    print(f"\n{'variant':<18}{'dtype':>9}{'best s':>8}{'new tok':>9}{'tok/s':>8}{'ratio':>7}{'limit s':>9}"
          f"{'of limit':>9}{'weights':>10}{'RSS':>9}{'peak':>9}{'CPU s':>8}{'other load':>12}")
    for v in variants:
        r = results[v]
        r["tokens_per_s"] = r["new_tokens"] / r["seconds"]
        other = "n/a" if r["foreign_cores"] is None else f"{r['foreign_cores']:.2f} cores"
        print(f"{LABELS[v]:<18}{r['dtype']:>9}{r['seconds']:>8.2f}{r['new_tokens']:>9}{r['tokens_per_s']:>8.0f}"
              f"{base['seconds'] / r['seconds']:>6.2f}x{r['compute_limit_s']:>9.2f}"
              f"{r['compute_limit_s'] / r['seconds']:>9.0%}{r['generation_weights_bytes'] / mib:>7.0f}MiB"
              f"{r['rss_loaded'] / mib:>6.0f}MiB{r['rss_peak'] / mib:>6.0f}MiB{r['cpu_seconds']:>8.1f}{other:>12}")
    print("  CPU s = this process's CPU time per timed run (all threads); other load = cores other processes kept "
          "busy meanwhile: well above 0 means contended, unreliable timings (rerun on a quiet machine).")
    print("  RSS = after loading the float32 model, making the generation copy (if any) and a warm-up; "
          "peak = during the first timed run.")
    for v in variants:
        r = results[v]
        print(f"  {LABELS[v]}: matmul rate {r['matmul_rate'] / 1e9:.0f} GFLOP/s in {r['dtype']} at M={args.n}; "
              f"{r['matmul_flops'] / 1e9:.0f} GFLOP; {r['rows_stopped_early']} of {args.n} rows stopped early; "
              f"RSS with the float32 model {r['rss_f32_model'] / mib:.0f} MiB, {r['rss_loaded'] / mib:.0f} MiB "
              f"after the generation copy and warm-up")

    print(f"\nWhere the time goes (torch.profiler, self CPU time, {args.profile_tokens} new tokens; "
          "ms per decode step = family total / steps):")
    for v in variants:
        p = results[v]["profile"]
        steps = max(1, args.profile_tokens - 1)
        fams = sorted(p["families"].items(), key=lambda kv: -kv[1])
        print(f"  {LABELS[v]} ({p['total']:.2f} s): " + ", ".join(
            f"{f} {s:.2f} s ({100 * s / p['total']:.0f}%, {1000 * s / steps:.0f} ms/step)" for f, s in fams))
        print("    top ops: " + "; ".join(f"{k} {s:.2f} s x{c}" for s, k, c in p["top_ops"][:6]))

    fast = results["fast"]
    summary = {
        "model": args.model, "n": args.n, "new_tokens_budget": args.new_tokens, "fast_dtype": fast["dtype"],
        "fast_dtype_reason": fast["reason"],
        "seconds": {v: round(results[v]["seconds"], 3) for v in variants},
        "tokens_per_s": {v: round(results[v]["tokens_per_s"], 1) for v in variants},
        "speedup_vs_f32_generate": round(base["seconds"] / fast["seconds"], 3),
        "fraction_of_compute_limit": round(fast["compute_limit_s"] / fast["seconds"], 3),
        "compute_limit_s": {v: round(results[v]["compute_limit_s"], 3) for v in variants},
        "matmul_gflops": {v: round(results[v]["matmul_rate"] / 1e9, 1) for v in variants},
        "peak_rss_mib": {v: round(results[v]["rss_peak"] / mib, 1) for v in variants},
        "rss_after_load_mib": {v: round(results[v]["rss_loaded"] / mib, 1) for v in variants},
        "generation_weights_mib": {v: round(results[v]["generation_weights_bytes"] / mib, 1) for v in variants},
        "cpu_seconds": {v: round(results[v]["cpu_seconds"], 2) for v in variants},
        "other_load_cores": {v: results[v]["foreign_cores"] for v in variants},
        "repeats": args.repeats, "threads": args.threads,
    }
    if "bf16_generate" in results:
        summary["speedup_bf16_generate_vs_f32_generate"] = round(base["seconds"] / results["bf16_generate"]["seconds"], 3)
    print(f"\nspeed-up {summary['speedup_vs_f32_generate']:.2f}x vs float32 HF generate; the fast backend runs at "
          f"{100 * summary['fraction_of_compute_limit']:.0f}% of its compute limit")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
