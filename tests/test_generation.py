"""The fast generation backend: dtype choice, exact top-p sampling, greedy parity with HF, hooks, extraction dtype."""

import pytest
import torch

from utils import generation
from utils.backends import LocalChatClient, hf_generate_batch
from utils.generation import (choose_generation_dtype, generate, generate_tokens, generation_model, sample_next,
                              top_p_distribution)

CONVS = [
    [{"role": "system", "content": "You are a bard."}, {"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a ghost."}, {"role": "user", "content": "Where do you live, and why?" * 3}],
    [{"role": "user", "content": "What is a persona vector?"}],
]

# ----------------------------------------------------------------------------- dtype choice

@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.delenv(generation.DTYPE_ENV, raising=False)
    monkeypatch.setattr(generation, "cpu_has_native_bf16", lambda: native)
    choice = choose_generation_dtype("cpu")
    assert choice.dtype == expected
    assert ("native bf16" in choice.reason) and (("no native" in choice.reason) != native)

def test_dtype_on_cuda_and_override(monkeypatch):
    monkeypatch.delenv(generation.DTYPE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_generation_dtype("cuda").dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_generation_dtype("cuda").dtype == torch.float32
    monkeypatch.setattr(generation, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv(generation.DTYPE_ENV, "float32")
    choice = choose_generation_dtype("cpu")
    assert choice.dtype == torch.float32 and generation.DTYPE_ENV in choice.reason
    monkeypatch.setenv(generation.DTYPE_ENV, "bf16")
    assert choose_generation_dtype("cpu").dtype == torch.bfloat16
    monkeypatch.setenv(generation.DTYPE_ENV, "auto")
    assert choose_generation_dtype("cpu").dtype == torch.bfloat16
    monkeypatch.setenv(generation.DTYPE_ENV, "int8")
    with pytest.raises(ValueError, match="COURSE_GENERATION_DTYPE.*bfloat16"):
        choose_generation_dtype("cpu")

def test_client_says_which_dtype_and_why(tiny, monkeypatch, capsys):
    model, tok = tiny
    monkeypatch.setenv(generation.DTYPE_ENV, "bfloat16")
    with LocalChatClient(model, tok) as client:
        assert client.generation_model.dtype == torch.bfloat16 and client.generation_model is not model
    out = capsys.readouterr().out
    assert "bfloat16" in out and "COURSE_GENERATION_DTYPE" in out and "MiB" in out
    monkeypatch.setenv(generation.DTYPE_ENV, "float32")
    with LocalChatClient(model, tok) as client:
        assert client.generation_model is model
    assert "the model itself" in capsys.readouterr().out

# ----------------------------------------------------------------------------- the bf16 copy

def test_generation_model_is_a_cached_bf16_copy_and_hooks_fire_on_it(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = generation_model(model, torch.bfloat16)
    assert generation_model(model, torch.bfloat16) is twin and generation_model(model, torch.float32) is model
    assert all(p.dtype == torch.bfloat16 for p in twin.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert twin.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE frequencies keep their precision
    assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight  # still tied
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"generation_model changed the float32 model's {key}"
        torch.testing.assert_close(twin.state_dict()[key].float(), value, atol=0.02 * value.abs().max().item() + 1e-6,
                                   rtol=0.01)

    from utils.activations import decoder_layers

    seen, on_f32 = [], []
    handles = [decoder_layers(twin)[1].register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).dtype)),
        decoder_layers(model)[1].register_forward_hook(lambda m, i, o: on_f32.append(1))]
    try:
        generate(twin, tok, CONVS[:2], max_new_tokens=5, temperature=0)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) >= 5 and set(seen) == {torch.bfloat16}  # prefill + every decode step, in bf16
    assert on_f32 == []

def test_extraction_stays_float32_whatever_the_generation_dtype(tiny, monkeypatch):
    from utils.activations import extract_mean_activations

    model, tok = tiny
    convs = [c + [{"role": "assistant", "content": "The sea is wide and grey."}] for c in CONVS]
    expected = extract_mean_activations(model, tok, convs, [1, 3], progress=False)
    monkeypatch.setenv(generation.DTYPE_ENV, "bfloat16")
    with LocalChatClient(model, tok, verbose=False) as client:
        client.chat.completions.create(model="m", messages=CONVS[0], max_tokens=4)
    assert model.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    got = extract_mean_activations(model, tok, convs, [1, 3], progress=False)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)

# ----------------------------------------------------------------------------- sampling

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
        assert (expected > 0).sum() > generation.CANDIDATES  # the fallback is exercised
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
    gen = generation_model(model, dtype)
    ours = generate(gen, tok, CONVS, max_new_tokens=8, temperature=0)
    theirs = hf_generate_batch(gen, tok, CONVS, max_new_tokens=8, temperature=0)
    assert ours == theirs
    assert len(set(ours)) > 1 and all(ours)

def test_same_seed_same_text(tiny):
    model, tok = tiny
    gen = generation_model(model, torch.bfloat16)
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

    monkeypatch.delenv(generation.DTYPE_ENV, raising=False)
    base = dict(model="tiny-gemma2", roles=["bard"], n_questions=1, n_prompts=1, layers=[1], cache_dir=tmp_path)
    key = _generation_key(Config(**base))
    assert key == _generation_key(Config(**base))
    for change in [dict(temperature=0.0), dict(top_p=0.8), dict(max_tokens=32), dict(seed=1), dict(chunk_size=8)]:
        assert _generation_key(Config(**base, **change)) != key, f"{change} left the cache key unchanged"
    other = "float32" if choose_generation_dtype().dtype != torch.float32 else "bfloat16"
    monkeypatch.setenv(generation.DTYPE_ENV, other)
    assert _generation_key(Config(**base)) != key, "the generation dtype is not in the cache key"


def test_runner_never_mixes_records_from_other_generation_settings(tmp_path):
    from utils.pipeline import JsonlStore

    path = tmp_path / "responses.jsonl"
    JsonlStore(path, "settings-a").put({"key": "bard|0|0", "response": "from a"})
    assert not JsonlStore(path, "settings-b").ok("bard|0|0")
    JsonlStore(path, "settings-b").put({"key": "bard|0|0", "response": "from b"})
    assert JsonlStore(path, "settings-a").records["bard|0|0"]["response"] == "from a"
    assert JsonlStore(path, "settings-b").records["bard|0|0"]["response"] == "from b"
