"""Local generation: the model table's dtype, exact top-p sampling, greedy parity with HF, hooks, extraction dtype."""

import copy

import pytest
import torch

from utils import models
from utils.activations import decoder_layers, extract_mean_activations
from utils.generation import CANDIDATES, generate, generate_tokens, hf_generate, sample_next, top_p_distribution
from utils.models import choose_dtype, load_model

CONVS = [
    [{"role": "system", "content": "You are a bard."}, {"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a ghost."}, {"role": "user", "content": "Where do you live, and why?" * 3}],
    [{"role": "user", "content": "What is a persona vector?"}],
]

# ----------------------------------------------------------------------------- dtype choice (the model table's)

@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.delenv("COURSE_DTYPE", raising=False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == expected
    assert ("native bf16" in choice.reason) and (("no native" in choice.reason) != native)


def test_dtype_on_cuda_table_and_override(monkeypatch):
    monkeypatch.delenv("COURSE_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_dtype("auto", "cuda").dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_dtype("auto", "cuda").dtype == torch.float32
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert choose_dtype("float32", "cpu").dtype == torch.float32  # the table's dtype wins over the hardware's
    monkeypatch.setenv("COURSE_DTYPE", "float32")
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == torch.float32 and "COURSE_DTYPE" in choice.reason
    monkeypatch.setenv("COURSE_DTYPE", "bf16")
    assert choose_dtype("float32", "cpu").dtype == torch.bfloat16  # the override wins over the table
    monkeypatch.setenv("COURSE_DTYPE", "auto")
    assert choose_dtype("auto", "cpu").dtype == torch.bfloat16
    monkeypatch.setenv("COURSE_DTYPE", "int8")
    with pytest.raises(ValueError, match="COURSE_DTYPE.*bfloat16"):
        choose_dtype("auto", "cpu")


def test_load_model_says_which_dtype_and_why(monkeypatch):
    monkeypatch.delenv("COURSE_DTYPE", raising=False)
    model, _ = load_model("tiny-gemma2")
    assert model.dtype == torch.float32 and "model table" in model.config.course_dtype_reason
    monkeypatch.setenv("COURSE_DTYPE", "bfloat16")
    model, _ = load_model("tiny-gemma2")
    assert model.dtype == torch.bfloat16 and "COURSE_DTYPE" in model.config.course_dtype_reason

# ----------------------------------------------------------------------------- one model: hooks on it act on generation

def test_hooks_on_the_model_fire_at_every_generation_step(tiny):
    model, tok = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for m in (model, bf16):
        seen = []
        handle = decoder_layers(m)[1].register_forward_hook(
            lambda mod, i, o, seen=seen: seen.append((o[0] if isinstance(o, tuple) else o).dtype))
        try:
            generate(m, tok, CONVS[:2], max_new_tokens=5, temperature=0)
        finally:
            handle.remove()
        assert len(seen) >= 5 and set(seen) == {m.dtype}  # prefill + every decode step, in the model's dtype


def test_extraction_is_float32_on_a_bf16_model(tiny):
    model, tok = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    convs = [c + [{"role": "assistant", "content": "The sea is wide and grey."}] for c in CONVS]
    got = extract_mean_activations(bf16, tok, convs, [1, 3], progress=False)
    expected = extract_mean_activations(model, tok, convs, [1, 3], progress=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0.05)
    assert not torch.equal(got, got.bfloat16().float()), "the mean was rounded to bf16"

def _hf_top_p(logits, temperature, top_p, top_k=None):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    return TopPLogitsWarper(top_p)(None, scores).softmax(-1)

def _test_logits(vocab=400, rows=24):
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(rows // 2, vocab, generator=g) * 4  # nucleus of a few tokens: the top-k fast path
    flat = torch.randn(rows // 2, vocab, generator=g) * 0.3  # nucleus of hundreds: the full-sort fallback
    return torch.cat([peaked, flat])

@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 0.9, None), (1.0, 0.5, None), (1.3, 0.95, 50),
                                                     (0.7, 1.0, None)])
def test_nucleus_matches_hf_warpers(temperature, top_p, top_k):
    logits = _test_logits()
    ours = top_p_distribution(logits, temperature, top_p, top_k)
    torch.testing.assert_close(ours, _hf_top_p(logits, temperature, top_p, top_k), atol=1e-6, rtol=1e-5)

@pytest.mark.parametrize("flat", [False, True], ids=["fast-path", "fallback"])
@pytest.mark.parametrize("top_k", [None, 20])
def test_sampler_draws_from_the_top_p_distribution(flat, top_k):
    """20,000 draws from one row: every frequency within 5 standard errors of the nucleus probability,
    and no token outside the nucleus ever drawn."""
    row = _test_logits()[12 if flat else 0]
    expected = top_p_distribution(row[None], 0.7, 0.9, top_k)[0]
    if flat and top_k is None:
        assert (expected > 0).sum() > CANDIDATES  # the fallback is exercised
    n = 20_000
    draws = sample_next(row.expand(n, -1), 0.7, 0.9, torch.Generator().manual_seed(1), top_k)
    freq = torch.bincount(draws, minlength=row.numel()).double() / n
    assert freq[expected == 0].sum() == 0, "drew a token outside the nucleus"
    p = expected.double()
    tolerance = 5 * torch.sqrt(p * (1 - p) / n) + 1e-9
    worst = ((freq - p).abs() / tolerance).max().item()
    assert worst <= 1, f"a token's frequency is {worst:.1f}x the tolerance away from its probability"

def test_sampler_greedy_and_seeds():
    logits = _test_logits()
    assert torch.equal(sample_next(logits, 0.0, 0.9), logits.argmax(-1))
    a = sample_next(logits, 0.7, 0.9, torch.Generator().manual_seed(3))
    b = sample_next(logits, 0.7, 0.9, torch.Generator().manual_seed(3))
    c = sample_next(logits, 0.7, 0.9, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 0.7, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0, 0.9)

# ----------------------------------------------------------------------------- the decode loop

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_hf_generate_in_the_same_dtype(tiny, dtype):
    model, tok = tiny
    gen = copy.deepcopy(model).to(dtype)
    ours = generate(gen, tok, CONVS, max_new_tokens=8, temperature=0)
    theirs = hf_generate(gen, tok, CONVS, max_new_tokens=8, temperature=0)
    assert ours == theirs
    assert len(set(ours)) > 1 and all(ours)

def test_same_seed_same_text(tiny):
    model, tok = tiny
    gen = copy.deepcopy(model).to(torch.bfloat16)
    a = generate(gen, tok, CONVS, max_new_tokens=6, seed=5)
    assert generate(gen, tok, CONVS, max_new_tokens=6, seed=5) == a
    assert generate(gen, tok, CONVS, max_new_tokens=6, seed=6) != a

def test_rows_that_stop_leave_the_batch_and_the_rest_continue(tiny):
    model, tok = tiny
    from utils.conversation import render

    prompts = [tok(render(c, tok, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for c in CONVS]
    full = generate_tokens(model, prompts, 10, temperature=0, pad_id=tok.pad_token_id)
    # Pretend a token that first appears mid-reply in some row ends a reply.
    row, at = next((r, j) for r, toks in enumerate(full) for j in range(2, 9) if toks[j] not in toks[:j])
    stop = full[row][at]
    cut = generate_tokens(model, prompts, 10, temperature=0, pad_id=tok.pad_token_id, stop_ids=[stop])
    for row_full, row_cut in zip(full, cut):
        end = row_full.index(stop) + 1 if stop in row_full else len(row_full)
        assert row_cut == row_full[:end]
    assert len(cut[row]) == at + 1 and any(len(c) == 10 for c in cut)  # one row stopped, another ran on

def test_bad_input_is_a_clear_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, CONVS, max_new_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [], max_new_tokens=3)

def test_runner_cache_key_carries_the_generation_settings(tmp_path, monkeypatch):
    from utils.pipeline import Config, _generation_key

    monkeypatch.delenv("COURSE_DTYPE", raising=False)
    base = dict(model="tiny-gemma2", roles=["bard"], n_questions=1, n_prompts=1, layers=[1], cache_dir=tmp_path)
    key = _generation_key(Config(**base))
    assert key == _generation_key(Config(**base))
    for change in [dict(temperature=0.0), dict(top_p=0.8), dict(max_tokens=32), dict(seed=1), dict(chunk_size=8)]:
        assert _generation_key(Config(**base, **change)) != key, f"{change} left the cache key unchanged"
    monkeypatch.setenv("COURSE_DTYPE", "bfloat16")
    assert _generation_key(Config(**base)) != key, "the model's dtype is not in the cache key"


def test_runner_never_mixes_records_from_other_generation_settings(tmp_path):
    from utils.pipeline import JsonlStore

    path = tmp_path / "responses.jsonl"
    JsonlStore(path, "settings-a").put({"key": "bard|0|0", "response": "from a"})
    assert not JsonlStore(path, "settings-b").ok("bard|0|0")
    JsonlStore(path, "settings-b").put({"key": "bard|0|0", "response": "from b"})
    assert JsonlStore(path, "settings-a").records["bard|0|0"]["response"] == "from a"
    assert JsonlStore(path, "settings-b").records["bard|0|0"]["response"] == "from b"
