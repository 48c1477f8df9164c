"""Make the checks' fixtures from the reference solution: ``python -m tools.make_fixtures [--check]``.

Writes ``tests/fixtures/part1_persona_space.safetensors`` (expected outputs, plus the outputs of a few
known mistakes so that a check can name the mistake it sees) and ``part1_persona_space.json``.
``--check`` regenerates in memory and fails if the committed fixtures differ beyond float tolerance.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
from safetensors.torch import load_file, save_file

from tests import part1_persona_space as checks
from tools.reference import load_reference
from utils.conversation import turn_suffix_len

TENSORS = checks.FIXTURES / "part1_persona_space.safetensors"
JSON = checks.FIXTURES / "part1_persona_space.json"


def _span_means(model, tokenizer, conversations, layer: int, ref, *, hidden_index: int | None = None,
                start_shift: int = 0, from_zero: bool = False, include_suffix: bool = False,
                special_tokens: bool = False) -> torch.Tensor:
    """Means over variants of the response span, to recognise common mistakes."""
    suffix = turn_suffix_len(tokenizer)
    rows = []
    for messages in conversations:
        full_prompt, start = ref["format_messages"](messages, tokenizer)
        ids = tokenizer(full_prompt, add_special_tokens=special_tokens, return_tensors="pt").input_ids
        end = ids.shape[1] if include_suffix else ids.shape[1] - suffix
        start = 0 if from_zero else start + start_shift
        with torch.inference_mode():
            hs = model(ids, output_hidden_states=True).hidden_states
        rows.append(hs[layer + 1 if hidden_index is None else hidden_index][0, start:end].float().mean(0))
    return torch.stack(rows)


def _left_padded_mistake(model, tokenizer, conversations, layer: int, ref, batch_size: int, *,
                         shift_mask: bool = True, attention_mask: bool = True) -> torch.Tensor:
    """Batched means under LEFT padding with one of two known mistakes: the mask not shifted by each row's
    padding, or no attention_mask passed to the model."""
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    suffix = turn_suffix_len(tok)
    out = []
    for b in range(0, len(conversations), batch_size):
        prompts, spans = [], []
        for messages in conversations[b:b + batch_size]:
            full_prompt, start = ref["format_messages"](messages, tok)
            n = len(tok(full_prompt, add_special_tokens=False).input_ids)
            prompts.append(full_prompt)
            spans.append((start, n - suffix, n))
        enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        width = enc.input_ids.shape[1]
        mask = torch.zeros(len(prompts), width)
        for row, (start, end, n) in enumerate(spans):
            offset = width - n if shift_mask else 0
            mask[row, offset + start:offset + end] = 1.0
        inputs = dict(enc) if attention_mask else {"input_ids": enc.input_ids}
        with torch.inference_mode():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[layer + 1].float()
        out.append((hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


def geometry_vectors() -> torch.Tensor:
    """8 persona-like vectors in 32 dimensions: a large shared mean plus structured variation."""
    g = torch.Generator().manual_seed(1234)
    shared = 50.0 * torch.randn(32, generator=g)
    direction = torch.randn(32, generator=g)
    along = torch.tensor([3.0, 2.5, 2.0, 0.5, -1.0, -2.0, -2.5, -3.0])
    return shared + along[:, None] * direction + 0.8 * torch.randn(8, 32, generator=g)


def build() -> tuple[dict[str, torch.Tensor], dict]:
    ref = load_reference()
    model, tokenizer = checks.tiny_gemma2()
    convs = copy.deepcopy(checks.EXTRACTION_CONVERSATIONS)
    layer = checks.EXTRACTION_LAYER
    t: dict[str, torch.Tensor] = {}
    t["extract_expected"] = ref["extract_response_activations"](model, tokenizer, convs, layer)
    t["extract_wrong_layer"] = _span_means(model, tokenizer, convs, layer, ref, hidden_index=layer)
    t["extract_with_end_of_turn"] = _span_means(model, tokenizer, convs, layer, ref, include_suffix=True)
    t["extract_with_prompt"] = _span_means(model, tokenizer, convs, layer, ref, from_zero=True)
    t["extract_from_marker"] = _span_means(model, tokenizer, convs, layer, ref, start_shift=-1)
    t["extract_final_norm_layer"] = _span_means(model, tokenizer, convs, layer, ref,
                                                hidden_index=model.config.num_hidden_layers)
    t["extract_all_tokens"] = _span_means(model, tokenizer, convs, layer, ref, from_zero=True, include_suffix=True)
    t["extract_double_bos"] = _span_means(model, tokenizer, convs, layer, ref, special_tokens=True)
    size = checks.BATCHED_CHECK_SIZE
    t["extract_batched_left_unshifted_mask"] = _left_padded_mistake(model, tokenizer, convs, layer, ref, size,
                                                                    shift_mask=False)
    t["extract_batched_left_no_attention_mask"] = _left_padded_mistake(model, tokenizer, convs, layer, ref, size,
                                                                       attention_mask=False)

    case = copy.deepcopy(checks.PERSONA_CASE)
    fn = ref["extract_persona_vectors"]
    args = (model, tokenizer, case["personas"], case["questions"], case["responses"])
    for name, vec in fn(*args, case["scores"], case["layer"]).items():
        t[f"persona_{name}"] = vec
    everything = {k: 3 for k in case["responses"]}
    for name, vec in fn(*args, everything, case["layer"]).items():
        t[f"persona_{name}_nofilter"] = vec
    inverted = {k: 3 if s < 3 else 0 for k, s in case["scores"].items()}  # keeps exactly the low scores
    for name, vec in fn(*args, inverted, case["layer"]).items():
        t[f"persona_{name}_inverted"] = vec
    # A known mistake: one mean over all the kept responses' tokens (long answers weigh more), not a mean of means.
    from utils.conversation import response_token_span

    for name in case["personas"]:
        keys = [k for k in case["responses"] if k[0] == name and (k not in case["scores"] or case["scores"][k] >= 3)]
        convs = [[{"role": "system", "content": case["personas"][p]}, {"role": "user", "content": case["questions"][q]},
                  {"role": "assistant", "content": case["responses"][(p, q)]}] for p, q in keys]
        means = ref["extract_response_activations"](model, tokenizer, convs, case["layer"])
        lengths = torch.tensor([float(end - start) for _, start, end in (response_token_span(c, tokenizer)
                                                                         for c in convs)])
        t[f"persona_{name}_token_weighted"] = (means * lengths[:, None]).sum(0) / lengths.sum()
    v = geometry_vectors()
    t["geometry_vectors"] = v
    t["cosine_raw"] = ref["compute_cosine_similarity_matrix"](v)
    t["cosine_centered"] = ref["compute_cosine_similarity_matrix_centered"](v)
    t["cosine_centered_wrong_dim"] = ref["compute_cosine_similarity_matrix"](v - v.mean(dim=1, keepdim=True))
    proj, ratio, comps = ref["pca_decompose_persona_vectors"](v, n_components=len(v))
    t["pca_projections"], t["pca_ratio"], t["pca_components"] = proj, ratio, comps
    s = torch.linalg.svdvals(v.float())
    t["pca_ratio_uncentred"] = (s**2 / (s**2).sum())
    t["axis"] = ref["compute_assistant_axis"](v[:3], v[3:])
    centred = v - v.mean(dim=0)
    names = [f"p{i}" for i in range(len(v))]
    ranking = ref["characterize_axis"](t["axis"], {n: centred[i] for i, n in enumerate(names)})
    by_name = dict(ranking)
    t["characterize_cosines"] = torch.tensor([by_name[n] for n in names])
    t["trait_vector"] = ref["compute_trait_vector"](v[:5], v[5:])
    meta = {"characterize_names": names, "made_by": "python -m tools.make_fixtures (from src/part1_persona_space.py)"}
    return {k: x.detach().float().contiguous().cpu() for k, x in t.items()}, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    tensors, meta = build()
    if args.check:
        if not TENSORS.exists() or not JSON.exists():
            print("fixtures missing: run `make fixtures`", file=sys.stderr)
            return 1
        stored = load_file(str(TENSORS))
        bad = sorted(set(stored) ^ set(tensors))
        bad += [k for k in tensors if k in stored and not torch.allclose(stored[k], tensors[k], atol=1e-5,
                                                                          rtol=1e-5, equal_nan=True)]
        if json.loads(JSON.read_text()) != meta:
            bad.append("part1_persona_space.json")
        if bad:
            print(f"fixtures out of date ({bad[:8]}): run `make fixtures`", file=sys.stderr)
            return 1
        print("fixtures are current")
        return 0
    checks.FIXTURES.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(TENSORS), metadata={"generated_by": "python -m tools.make_fixtures"})
    JSON.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {TENSORS.name} ({len(tensors)} tensors) and {JSON.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
