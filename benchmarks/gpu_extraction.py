"""Extraction speed on a GPU at the paper's scale, with no download: ``python -m benchmarks.gpu_extraction``.

Builds a model with Gemma 2 27B's shape (46 blocks, d_model 4608, 32 heads of 128, 16 KV heads,
MLP 36864, vocab 256000) from its config, with random bf16 weights, straight on the GPU. Random
weights cost the same FLOPs as the real ones, so the timing carries over. It then runs the course's
own fast path, :func:`utils.activations.extract_mean_activations` (a forward hook at layer 22 that stops
the pass; length-sorted batches under the GPU token budget; left padding), on synthetic conversations
tokenised by tiny-gemma2's Gemma-faithful tokenizer, checks a few vectors against one unpadded sequence
at a time through ``output_hidden_states``, and reports:

- tokens/s, and the fraction of the GPU's peak bf16 FLOP/s achieved (FLOPs = 2 x parameters used
  per token, for the 23 blocks that run, plus attention);
- the projected time for the paper's 330,000 responses (275 roles x 5 prompts x 240 questions)
  plus 1,200 default responses, at the measured rate and the measured mean length.

Sized to fit a few minutes: weights ~54 GB in bf16 (only the first 23 blocks are needed, so only
they are built unless ``--full-model``). ``--shape tiny`` runs the same code on the CPU in seconds
(used by the test suite). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

GEMMA2_27B_SHAPE = dict(hidden_size=4608, num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16,
                        head_dim=128, intermediate_size=36864, vocab_size=256000, query_pre_attn_scalar=144,
                        sliding_window=4096)
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=256, vocab_size=2412, query_pre_attn_scalar=16, sliding_window=32)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, no sparsity
PAPER_RESPONSES = 275 * 5 * 240 + 5 * 240


def build_model(shape: dict, layers_needed: int, device: str, dtype: torch.dtype):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(**{**shape, "num_hidden_layers": layers_needed}, attn_implementation="eager",
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype: no float32 copy of 27B-shaped weights
    try:
        with torch.device(device):
            model = Gemma2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    return model


def flops_per_token(shape: dict, blocks: int, seq_len: int) -> float:
    d, h, kv, hd, ff = (shape[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                           "intermediate_size"))
    attn_proj = d * (h * hd) * 2 + d * (kv * hd) * 2  # q, o and k, v
    mlp = 3 * d * ff
    attn_scores = 2 * h * hd * seq_len  # QK^T and AV, per token (causal halves it; counted fully)
    return 2.0 * blocks * (attn_proj + mlp) + 2.0 * blocks * attn_scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["gemma2-27b", "tiny"], default="gemma2-27b")
    p.add_argument("--layer", type=int, default=22)
    p.add_argument("--n", type=int, default=256, help="synthetic conversations to time")
    p.add_argument("--response-tokens", type=int, default=330,
                   help="shortest synthetic response in tokens (each is 0-50 longer)")
    p.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="token budget per forward pass (default: utils.activations' for the device)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--full-model", action="store_true", help="build all 46 blocks (needs ~54 GB)")
    a = p.parse_args(argv)
    shape = GEMMA2_27B_SHAPE if a.shape == "gemma2-27b" else TINY_SHAPE
    layer = a.layer if a.shape == "gemma2-27b" else min(a.layer, shape["num_hidden_layers"] - 1)
    if layer < 1:
        p.error("--layer must be at least 1: the correctness check compares layer - 1 with hidden_states[layer]")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.shape == "gemma2-27b" and device == "cpu":
        raise SystemExit("The gemma2-27b shape needs a CUDA GPU (~30 GB for the first 23 blocks). "
                         "Use --shape tiny to check the script on a CPU.")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        a.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
    blocks = shape["num_hidden_layers"] if a.full_model else layer + 1
    t0 = time.perf_counter()
    model = build_model(shape, blocks, device, dtype)
    build_s = time.perf_counter() - t0

    # The course's own fast path (utils.activations: a hook that stops the pass at the layer, length-sorted
    # batches under a token budget, Gemma's left padding, float32 span means) on synthetic conversations.
    # Gemma's real tokenizer is not available offline, so tiny-gemma2's Gemma-faithful one (same template,
    # same special ids; its ids are valid rows of the 256000-token vocabulary) writes the token ids.
    from benchmarks.extraction import synthetic_conversations
    from utils.activations import extract_mean_activations
    from utils.conversation import response_token_span
    from utils.models import TINY, load_model

    tokenizer = load_model(TINY)[1]
    conversations = synthetic_conversations(tokenizer, a.n, min_response_tokens=a.response_tokens)
    spans = [response_token_span(m, tokenizer) for m in conversations]
    lengths = torch.tensor([end for _, _, end in spans])  # what is fed: up to the response's end
    total_tokens = int(lengths.sum())

    def run_all() -> torch.Tensor:
        return extract_mean_activations(model, tokenizer, conversations, layer, progress=False,
                                        max_tokens_per_batch=a.max_tokens_per_batch)

    vectors = run_all()  # warm-up (kernels, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_all()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0

    # Correctness on this device: the batched, padded fast path against one unpadded sequence at a time
    # through output_hidden_states, at layer - 1 (hidden_states[layer]; the last entry would have the
    # final norm applied, since only layer + 1 blocks were built).
    check = list(range(min(4, a.n)))
    fast = extract_mean_activations(model, tokenizer, [conversations[i] for i in check], layer - 1, progress=False)
    worst = 0.0
    with torch.inference_mode():
        for row, i in enumerate(check):
            ids, start, end = spans[i]
            hs = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True,
                       use_cache=False).hidden_states
            ref = hs[layer][0, start:end].float().mean(0).cpu()
            worst = max(worst, float((fast[row] - ref).norm() / ref.norm()))
    tok_s = total_tokens / seconds
    mean_len = float(lengths.float().mean())
    fpt = flops_per_token(shape, layer + 1, int(mean_len))
    achieved_tflops = tok_s * fpt / 1e12
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    projected_h = PAPER_RESPONSES * mean_len / tok_s / 3600
    result = {
        "device": gpu, "dtype": str(dtype).replace("torch.", ""), "shape": a.shape, "layer": layer, "blocks_built": blocks, "build_seconds": round(build_s, 1),
        "conversations": a.n, "tokens": total_tokens, "mean_tokens": round(mean_len, 1), "tokens_per_s": round(tok_s, 1),
        "max_relative_diff_vs_single_sequence": worst,
        "achieved_tflops": round(achieved_tflops, 2),
        "fraction_of_peak_bf16": round(achieved_tflops / peak, 3) if peak else None,
        "projected_hours_for_paper_scale": round(projected_h, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if device == "cuda" else None,
    }
    print(f"{gpu}: {tok_s:,.0f} tokens/s at layer {layer}, {achieved_tflops:.1f} TFLOP/s"
          + (f" ({result['fraction_of_peak_bf16']:.0%} of peak bf16)" if peak else "")
          + f"; {PAPER_RESPONSES:,} responses of ~{mean_len:.0f} tokens would take {projected_h:.1f} h"
          + f" (vs single-sequence reference: {worst:.1e} relative)")
    print(json.dumps(result))
    if not torch.isfinite(vectors).all():
        raise SystemExit("The fast path returned non-finite vectors.")
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    if worst > tolerance:
        raise SystemExit(f"The fast path differs from the single-sequence reference by {worst:.2e} (relative), "
                         f"more than {tolerance:.0e}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
