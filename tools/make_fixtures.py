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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sklearn.decomposition import PCA

from tests import part1_persona_space as checks
from tools.reference import load_reference
from utils.conversation import turn_suffix_len

TENSORS = checks.FIXTURES / "part1_persona_space.safetensors"
JSON = checks.FIXTURES / "part1_persona_space.json"


def _simulated_means(model, tokenizer, conversations, layer: int, ref, *, kind: str = "single",
                     flags: tuple[str, ...] = (), batch_size: int = 1, hidden_index: int | None = None,
                     start_shift: int = 0, from_zero: bool = False, attention_mask: bool = True) -> torch.Tensor:
    """Means over the response span with known mistakes (``checks.MISTAKE_FLAGS``, alone or combined), run one
    conversation at a time (``kind="single"``) or in padded batches (``"batched_left"``, ``"batched_right"``).

    Flags: ``layer`` reads hidden_states[layer]; ``bos`` tokenises with special tokens (a second BOS; the span
    indices stay those of the correct tokenisation, as when the index comes from a correct ``format_messages``);
    ``eot`` ends the span after the end-of-turn tokens; ``open`` has no end (up to the padded width);
    ``unshifted`` ignores each row's left padding. The keyword arguments are other known mistakes.
    """
    side = "left" if kind == "batched_left" else "right"
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = side
    suffix = turn_suffix_len(tok)
    index = layer if "layer" in flags else layer + 1
    index = index if hidden_index is None else hidden_index
    out = []
    for b in range(0, len(conversations), batch_size):
        prompts, starts = [], []
        for messages in conversations[b:b + batch_size]:
            full_prompt, start = ref["format_messages"](messages, tok)
            prompts.append(full_prompt)
            starts.append(0 if from_zero else start + start_shift)
        enc = tok(prompts, add_special_tokens="bos" in flags, padding=True, return_tensors="pt")
        width = enc.input_ids.shape[1]
        lengths = enc.attention_mask.sum(1).tolist()
        mask = torch.zeros(len(prompts), width)
        for row, (start, n) in enumerate(zip(starts, lengths)):
            offset = width - n if side == "left" and "unshifted" not in flags else 0
            end = width if "open" in flags else offset + n if "eot" in flags else offset + n - suffix
            mask[row, offset + start:end] = 1.0
        inputs = dict(enc) if attention_mask else {"input_ids": enc.input_ids}
        with torch.inference_mode():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[index].float()
        out.append((hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


def _in_order(result: tuple[torch.Tensor, list[str]], names: list[str]) -> torch.Tensor:
    """A (matrix, names) result with rows and columns in the order of ``names``."""
    matrix, got_names = result
    order = [list(got_names).index(n) for n in names]
    return matrix[order][:, order]


def build() -> tuple[dict[str, torch.Tensor], dict]:
    ref = load_reference()
    model, tokenizer = checks.tiny_gemma2()
    convs = copy.deepcopy(checks.EXTRACTION_CONVERSATIONS)
    layer = checks.EXTRACTION_LAYER
    t: dict[str, torch.Tensor] = {}
    t["extract_expected"] = ref["extract_response_activations"](model, tokenizer, convs, layer)
    for kind in ("single", "batched_right", "batched_left"):
        size = 1 if kind == "single" else checks.BATCHED_CHECK_SIZE
        for flags in checks.combinations(kind):
            t[checks.combination_fixture_name(kind, flags)] = _simulated_means(
                model, tokenizer, convs, layer, ref, kind=kind, flags=flags, batch_size=size)
    t["extract_with_prompt"] = _simulated_means(model, tokenizer, convs, layer, ref, from_zero=True)
    t["extract_from_marker"] = _simulated_means(model, tokenizer, convs, layer, ref, start_shift=-1)
    t["extract_final_norm_layer"] = _simulated_means(model, tokenizer, convs, layer, ref,
                                                     hidden_index=model.config.num_hidden_layers)
    t["extract_all_tokens"] = _simulated_means(model, tokenizer, convs, layer, ref, from_zero=True, flags=("eot",))
    t["extract_batched_left_no_attention_mask"] = _simulated_means(
        model, tokenizer, convs, layer, ref, kind="batched_left", batch_size=checks.BATCHED_CHECK_SIZE,
        attention_mask=False)

    case = copy.deepcopy(checks.PERSONA_CASE)
    fn = ref["extract_persona_vectors"]
    args = (model, tokenizer, case["personas"], case["questions"], case["responses"], case["layer"])
    for name, vec in fn(*args, scores=case["scores"]).items():
        t[f"persona_{name}"] = vec
    everything = {k: 3 for k in case["responses"]}
    for name, vec in fn(*args, scores=everything).items():
        t[f"persona_{name}_nofilter"] = vec
    inverted = {k: 3 if s < 3 else 0 for k, s in case["scores"].items()}  # keeps exactly the low scores
    for name, vec in fn(*args, scores=inverted).items():
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
    v = checks.geometry_vectors()
    t["geometry_vectors"] = v
    names = checks.GEOMETRY_NAMES

    def as_dict(x):
        return {n: x[i] for i, n in enumerate(names)}

    t["cosine_raw"] = _in_order(ref["compute_cosine_similarity_matrix"](as_dict(v)), names)
    t["cosine_centered"] = _in_order(ref["compute_cosine_similarity_matrix_centered"](as_dict(v)), names)
    t["cosine_centered_wrong_dim"] = _in_order(
        ref["compute_cosine_similarity_matrix"](as_dict(v - v.mean(dim=1, keepdim=True))), names)
    # The whole spectrum (the reference keeps two components), with scikit-learn as the reference does.
    full = PCA(n_components=len(v), svd_solver="full").fit(v.numpy())
    t["pca_projections"] = torch.from_numpy(full.transform(v.numpy()))
    t["pca_ratio"] = torch.from_numpy(full.explained_variance_ratio_)
    t["pca_components"] = torch.from_numpy(full.components_)
    s = torch.linalg.svdvals(v.float())
    t["pca_ratio_uncentred"] = (s**2 / (s**2).sum())
    n_defaults = checks.N_GEOMETRY_DEFAULTS
    t["axis"] = ref["compute_assistant_axis"](v[:n_defaults], v[n_defaults:])
    centred = v - v.mean(dim=0)
    by_name = ref["characterize_axis"](as_dict(centred), t["axis"])
    t["characterize_cosines"] = torch.tensor([by_name[n] for n in names])
    by_name = ref["characterize_axis"](as_dict(v), t["axis"])  # vectors as given (trait vectors are not centred)
    t["characterize_cosines_uncentred"] = torch.tensor([by_name[n] for n in names])
    t["trait_vector"] = ref["compute_trait_vector"](v[:5], v[5:])
    meta = {"characterize_names": names, "made_by": "python -m tools.make_fixtures (from src/part1_persona_space.py)"}
    return {k: x.detach().float().contiguous().cpu() for k, x in t.items()}, meta


def check_or_write(tensors: dict[str, torch.Tensor], path: Path, *, check: bool, made_by: str,
                   meta: dict | None = None, meta_path: Path | None = None, label: str = "fixtures") -> int:
    """Write the fixtures (``tensors`` as safetensors, ``meta`` as JSON), or with ``check`` compare them with the
    committed ones (float tolerance 1e-5) and say which differ. Returns the exit status."""
    if check:
        if not path.exists() or (meta_path is not None and not meta_path.exists()):
            print(f"{label} missing: run `make fixtures`", file=sys.stderr)
            return 1
        stored = load_file(str(path))
        bad = sorted(set(stored) ^ set(tensors))
        bad += [k for k in tensors if k in stored and not torch.allclose(stored[k], tensors[k], atol=1e-5,
                                                                          rtol=1e-5, equal_nan=True)]
        if meta_path is not None and json.loads(meta_path.read_text()) != meta:
            bad.append(meta_path.name)
        if bad:
            print(f"{label} out of date ({bad[:8]}): run `make fixtures`", file=sys.stderr)
            return 1
        print(f"{label} are current")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"generated_by": made_by})
    if meta_path is not None:
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {path.name} ({len(tensors)} tensors){' and ' + meta_path.name if meta_path is not None else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    tensors, meta = build()
    return check_or_write(tensors, TENSORS, check=args.check, made_by="python -m tools.make_fixtures", meta=meta,
                          meta_path=JSON)


if __name__ == "__main__":
    sys.exit(main())
