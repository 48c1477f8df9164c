"""The course's one model against float32: what loading it in bf16 (where the CPU has bf16) costs and gains.

Run::

    python -m benchmarks.one_model [--model smollm2-135m-instruct] [--n 64] [--repeats 3]

The course loads one model, in its model-table dtype (:func:`utils.models.dtype_for`: bf16 on CPUs with
native bf16), and that model both writes the text and gives the activations. This compares it with the same
model loaded in float32, in one process, on the same ``--n`` Part 1 conversations (working personas x
working questions, responses of ~100 tokens built by repeating sentences, no generation):

- extraction time of :func:`utils.activations.extract_mean_activations` at the model's working layer
  (best of ``--repeats``, the two dtypes alternating), and the ratio chosen / float32;
- greedy generation time of :func:`utils.generation.generate` (``--new-tokens`` per conversation, 16
  conversations), and the ratio;
- how far the chosen dtype's persona means are from float32's: max |diff|, the largest |diff| relative to
  the values' scale, and the smallest cosine between matching rows;
- the weights' memory, against the float32 model plus a bf16 copy (what a separate generation copy costs).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm.auto import tqdm

from utils.activations import extract_mean_activations
from utils.conversation import chat_messages
from utils.data import working_personas, working_questions
from utils.generation import generate, parameter_bytes
from utils.models import config_for_model, dtype_for, load_model, short_model_name

SENTENCES = ("The river keeps its own counsel.", "I answer as carefully as I can.", "Numbers tell part of the story.",
             "A good question deserves a plain answer.", "Light falls differently in winter.")


def conversations(model_name: str, n: int) -> list[list[dict]]:
    """``n`` deterministic Part 1 conversations: personas in turn, questions in turn, ~100-token responses."""
    personas = list(working_personas(short_model_name(model_name)).items())
    questions = working_questions(15)
    out = []
    for i in range(n):
        name, prompt = personas[i % len(personas)]
        response = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(12))
        out.append(chat_messages(prompt, questions[i % len(questions)], response))
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=64, help="conversations to extract from")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy new tokens per conversation")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the best counts")
    args = parser.parse_args(argv)
    if min(args.n, args.new_tokens, args.repeats) < 1:
        parser.error("--n, --new-tokens and --repeats must be >= 1")
    torch.set_grad_enabled(False)
    choice = dtype_for(args.model)
    models = {"float32": load_model(args.model, torch.float32), "chosen": load_model(args.model, choice.dtype)}
    tokenizer = models["chosen"][1]
    layer = config_for_model(models["chosen"][0]).layer
    convs = conversations(args.model, args.n)
    prompts = [c[:-1] for c in convs[:16]]

    means, extract_s, generate_s = {}, {"float32": [], "chosen": []}, {"float32": [], "chosen": []}
    for name, (model, _) in models.items():  # warm-up
        means[name] = extract_mean_activations(model, tokenizer, convs, layer, progress=False)
        generate(model, tokenizer, prompts[:2], 4, temperature=0.0)
    for _ in tqdm(range(args.repeats), desc="alternating runs"):
        for name, (model, _) in models.items():
            extract_s[name].append(best_of(lambda m=model: extract_mean_activations(m, tokenizer, convs, layer,
                                                                                    progress=False), 1))
            generate_s[name].append(best_of(lambda m=model: generate(m, tokenizer, prompts, args.new_tokens,
                                                                     temperature=0.0), 1))
    diff = (means["chosen"] - means["float32"]).abs()
    scale = means["float32"].abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(means["chosen"], means["float32"], dim=-1)
    f32_bytes = parameter_bytes(models["float32"][0])
    chosen_bytes = parameter_bytes(models["chosen"][0])
    result = {
        "model": args.model, "chosen_dtype": choice.name, "why": choice.reason, "layer": layer, "n": args.n,
        "extract_s": {k: round(min(v), 3) for k, v in extract_s.items()},
        "extract_ratio_chosen_vs_float32": round(min(extract_s["chosen"]) / min(extract_s["float32"]), 3),
        "generate_s": {k: round(min(v), 3) for k, v in generate_s.items()},
        "generate_ratio_chosen_vs_float32": round(min(generate_s["chosen"]) / min(generate_s["float32"]), 3),
        "max_abs_diff": round(diff.max().item(), 4), "max_rel_diff": round(diff.max().item() / scale, 5),
        "min_cosine": round(cosine.min().item(), 6),
        "weights_mib": {"chosen": round(chosen_bytes / 2**20, 1), "float32": round(f32_bytes / 2**20, 1),
                        "float32_plus_bf16_copy": round((f32_bytes + f32_bytes / 2) / 2**20, 1)},
    }
    print(f"{args.model}: the course loads it in {choice.name} ({choice.reason})")
    print(f"  extraction at layer {layer}, {args.n} conversations: float32 {result['extract_s']['float32']} s, "
          f"{choice.name} {result['extract_s']['chosen']} s, ratio {result['extract_ratio_chosen_vs_float32']}")
    print(f"  greedy generation, 16 x {args.new_tokens} tokens: float32 {result['generate_s']['float32']} s, "
          f"{choice.name} {result['generate_s']['chosen']} s, ratio {result['generate_ratio_chosen_vs_float32']}")
    print(f"  persona means vs float32: max |diff| {result['max_abs_diff']} ({result['max_rel_diff']:.2%} of the "
          f"largest value), min cosine {result['min_cosine']}")
    print(f"  weights: {result['weights_mib']['chosen']} MiB, against {result['weights_mib']['float32_plus_bf16_copy']} "
          "MiB for a float32 model beside a bf16 copy")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
