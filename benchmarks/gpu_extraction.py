"""Extraction speed on a GPU at the paper's scale, with no download: ``python -m benchmarks.gpu_extraction``.

Builds a model with Gemma 2 27B's shape (46 blocks, d_model 4608, 32 heads of 128, 16 KV heads,
MLP 36864, vocab 256000) from its config, with random bf16 weights, straight on the GPU. Random
weights cost the same FLOPs as the real ones, so the timing carries over. It then runs the course's
fast-extraction mechanism (forward hook at layer 22 that stops the pass; length-sorted batches) on synthetic
conversations of realistic length and reports:

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
    with torch.device(device):
        model = Gemma2ForCausalLM(cfg).to(dtype)
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
    p.add_argument("--tokens", type=int, default=400, help="mean conversation length in tokens")
    p.add_argument("--max-tokens-per-batch", type=int, default=32768)
    p.add_argument("--full-model", action="store_true", help="build all 46 blocks (needs ~54 GB)")
    a = p.parse_args(argv)
    shape = GEMMA2_27B_SHAPE if a.shape == "gemma2-27b" else TINY_SHAPE
    layer = a.layer if a.shape == "gemma2-27b" else min(a.layer, shape["num_hidden_layers"] - 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.shape == "gemma2-27b" and device == "cpu":
        raise SystemExit("The gemma2-27b shape needs a CUDA GPU (~30 GB for the first 23 blocks). "
                         "Use --shape tiny to check the script on a CPU.")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    blocks = shape["num_hidden_layers"] if a.full_model else layer + 1
    t0 = time.perf_counter()
    model = build_model(shape, blocks, device, dtype)
    build_s = time.perf_counter() - t0

    # No Gemma tokenizer is available offline, so feed random token ids of realistic lengths through the same
    # mechanism as utils.activations: a forward hook on the target block that captures it and stops the pass,
    # length-sorted batches under a token budget, left padding, a masked float32 mean.
    g = torch.Generator().manual_seed(0)
    lengths = torch.clamp(torch.normal(float(a.tokens), a.tokens / 4, (a.n,), generator=g), 32, 4 * a.tokens).long()
    total_tokens = int(lengths.sum())
    layer_module = model.model.layers[layer]

    class Stop(Exception):
        pass

    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise Stop

    handle = layer_module.register_forward_hook(hook)
    order = torch.argsort(lengths, descending=True).tolist()
    batches, current, width = [], [], 0
    for i in order:
        L = int(lengths[i])
        if current and max(width, L) * (len(current) + 1) > a.max_tokens_per_batch:
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, L)
    batches.append(current)

    def run_all() -> None:
        for batch in batches:
            w = int(lengths[batch].max())
            ids = torch.randint(3, shape["vocab_size"], (len(batch), w), generator=g).to(device)
            mask = torch.zeros(len(batch), w, dtype=torch.long)
            for row, i in enumerate(batch):
                mask[row, w - int(lengths[i]):] = 1  # left padding, as Gemma
            mask = mask.to(device)
            try:
                with torch.inference_mode():
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            except Stop:
                pass
            h = captured["h"].float()
            (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # the span mean (full span here)

    run_all()  # warm-up (kernels, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_all()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    handle.remove()
    tok_s = total_tokens / seconds
    fpt = flops_per_token(shape, layer + 1, a.tokens)
    achieved_tflops = tok_s * fpt / 1e12
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    projected_h = PAPER_RESPONSES * float(lengths.float().mean()) / tok_s / 3600
    result = {
        "device": gpu, "shape": a.shape, "layer": layer, "blocks_built": blocks, "build_seconds": round(build_s, 1),
        "conversations": a.n, "tokens": total_tokens, "batches": len(batches), "tokens_per_s": round(tok_s, 1),
        "achieved_tflops": round(achieved_tflops, 2),
        "fraction_of_peak_bf16": round(achieved_tflops / peak, 3) if peak else None,
        "projected_hours_for_paper_scale": round(projected_h, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if device == "cuda" else None,
    }
    print(f"{gpu}: {tok_s:,.0f} tokens/s at layer {layer}, {achieved_tflops:.1f} TFLOP/s"
          + (f" ({result['fraction_of_peak_bf16']:.0%} of peak bf16)" if peak else "")
          + f"; {PAPER_RESPONSES:,} responses of ~{a.tokens} tokens would take {projected_h:.1f} h")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
