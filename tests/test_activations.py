"""The fast extractor (:mod:`utils.activations`) against a plain single-sequence reference, on tiny-gemma2."""

from __future__ import annotations

import pytest
import torch

from utils.activations import _plan_batches, extract_mean_activations, extract_mean_embeddings
from utils.conversation import ChatFormatError, chat_messages, response_token_span
from utils.models import load_model

ATOL = 1e-5
WORDS = ("the bread rises when the dough is warm and the yeast is alive so knead it well "
         "then rest it under a cloth for an hour before baking").split()


def _response(n_words: int, shift: int) -> str:
    return " ".join(WORDS[(shift + k) % len(WORDS)] for k in range(n_words))


# Lengths vary a lot (padding) and several exceed tiny-gemma2's 32-token sliding window.
CONVERSATIONS = [
    chat_messages("You are a chef.", "How do I make bread?", _response(40, 0)),
    chat_messages("", "Why?", _response(2, 3)),
    chat_messages("You are a pirate who speaks at great length about the sea.", "What now?", _response(25, 5)),
    chat_messages("", "Tell me about yeast, please, in detail.", _response(60, 7)),
    chat_messages("You are terse.", "Hi", "Ok."),
    chat_messages("You are a baker.", "Is rye different?", _response(12, 11)),
    chat_messages("", "And then?", _response(33, 13)),
]


@pytest.fixture(scope="module")
def tiny():
    # The model is tiny: one thread is fastest and avoids spin-waiting on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model("tiny-gemma2")
    finally:
        torch.set_num_threads(threads)


def _hidden_states(model, tokenizer, messages) -> tuple[tuple[torch.Tensor, ...], int, int]:
    ids, start, end = response_token_span(messages, tokenizer)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states, start, end


@pytest.fixture(scope="module")
def reference(tiny):
    """Single-sequence ``output_hidden_states`` means: ``[n, n_layers + 1, d]`` indexed by hidden_states index."""
    model, tokenizer = tiny
    rows = []
    for messages in CONVERSATIONS:
        hs, start, end = _hidden_states(model, tokenizer, messages)
        rows.append(torch.stack([h[0, start:end].mean(0) for h in hs]))
    return torch.stack(rows)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [None, 3, len(CONVERSATIONS)])
def test_int_layer_matches_single_sequence_reference(tiny, reference, monkeypatch, side, batch_size):
    model, tokenizer = tiny
    monkeypatch.setattr(tokenizer, "padding_side", side)
    got = extract_mean_activations(model, tokenizer, CONVERSATIONS, 2, batch_size=batch_size, progress=False)
    assert got.shape == (len(CONVERSATIONS), model.config.hidden_size)
    torch.testing.assert_close(got, reference[:, 3], atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_layer_list_matches_single_sequence_reference(tiny, reference, monkeypatch, side):
    model, tokenizer = tiny
    monkeypatch.setattr(tokenizer, "padding_side", side)
    layers = [4, 0, 2]  # any order; the output follows it
    got = extract_mean_activations(model, tokenizer, CONVERSATIONS, layers, batch_size=4, progress=False)
    assert got.shape == (len(CONVERSATIONS), len(layers), model.config.hidden_size)
    torch.testing.assert_close(got, reference[:, [layer + 1 for layer in layers]], atol=ATOL, rtol=0)


def test_token_budget_batches_match_reference(tiny, reference, monkeypatch):
    """batch_size=None with a small budget: several length-sorted batches of different sizes."""
    model, tokenizer = tiny
    monkeypatch.setattr(tokenizer, "padding_side", "left")
    got = extract_mean_activations(model, tokenizer, CONVERSATIONS, [1, 3], max_tokens_per_batch=200,
                                   progress=False)
    torch.testing.assert_close(got, reference[:, [2, 4]], atol=ATOL, rtol=0)


def test_convention_is_hidden_states_layer_plus_one(tiny, reference):
    model, tokenizer = tiny
    got = extract_mean_activations(model, tokenizer, CONVERSATIONS, 2, progress=False)
    torch.testing.assert_close(got, reference[:, 3], atol=ATOL, rtol=0)
    assert (got - reference[:, 2]).abs().max() > 1e-2  # not hidden_states[layer]


def test_last_layer_is_block_output_before_final_norm(tiny):
    """hidden_states[-1] has the final norm applied; layer num_layers-1 is the raw block output."""
    model, tokenizer = tiny
    last = model.config.num_hidden_layers - 1
    captured = []
    handle = model.model.layers[last].register_forward_hook(
        lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:
        rows = []
        for messages in CONVERSATIONS:
            captured.clear()
            _, start, end = _hidden_states(model, tokenizer, messages)
            rows.append(captured[0][0, start:end].mean(0))
    finally:
        handle.remove()
    got = extract_mean_activations(model, tokenizer, CONVERSATIONS, last, progress=False)
    torch.testing.assert_close(got, torch.stack(rows), atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [1, 5])
def test_later_blocks_norm_and_lm_head_never_run(tiny, layer):
    model, tokenizer = tiny
    calls: list[str] = []
    watched = {"lm_head": model.lm_head, "norm": model.model.norm}
    watched.update({f"block{i}": model.model.layers[i] for i in range(layer + 1, model.config.num_hidden_layers)})
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: calls.append(name))
               for name, m in watched.items()]
    try:
        extract_mean_activations(model, tokenizer, CONVERSATIONS, layer, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == []


def test_hooks_removed_and_model_unchanged(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([response_token_span(CONVERSATIONS[0], tokenizer)[0]])
    hooks_before = [dict(block._forward_hooks) for block in model.model.layers]  # transformers may own some
    with torch.no_grad():
        before = model(input_ids=ids).logits
    extract_mean_activations(model, tokenizer, CONVERSATIONS, [0, 3], progress=False)
    assert [dict(block._forward_hooks) for block in model.model.layers] == hooks_before
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_output_dtype_device_and_grad(tiny):
    model, tokenizer = tiny
    got = extract_mean_activations(model, tokenizer, CONVERSATIONS, [0, 1], progress=False)
    assert got.dtype == torch.float32
    assert got.device.type == "cpu"
    assert not got.requires_grad


def test_order_preserved_after_length_sorting(tiny, reference):
    model, tokenizer = tiny
    order = [3, 1, 6, 0, 4, 2, 5]
    shuffled = [CONVERSATIONS[i] for i in order]
    got = extract_mean_activations(model, tokenizer, shuffled, 2, batch_size=2, progress=False)
    torch.testing.assert_close(got, reference[order, 3], atol=ATOL, rtol=0)
    assert _plan_batches([5, 9, 7, 9], batch_size=2, max_tokens=0) == [[1, 3], [2, 0]]
    assert _plan_batches([5, 9, 7, 9], batch_size=None, max_tokens=18) == [[1, 3], [2, 0]]
    assert _plan_batches([50], batch_size=None, max_tokens=10) == [[0]]


def test_empty_response_raises_with_index(tiny):
    model, tokenizer = tiny
    convs = list(CONVERSATIONS[:3]) + [chat_messages("", "Hello?", "   ")]
    with pytest.raises(ChatFormatError, match=r"Conversation 3\b.*empty"):
        extract_mean_activations(model, tokenizer, convs, 0, progress=False)


def test_empty_conversation_list_raises(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="empty"):
        extract_mean_activations(model, tokenizer, [], 0, progress=False)


@pytest.mark.parametrize("layers", [6, -1, [0, 99], []])
def test_bad_layer_raises(tiny, layers):
    model, tokenizer = tiny
    match = "empty" if layers == [] else r"0\.\.5.*hidden_states\[i \+ 1\]"
    with pytest.raises(ValueError, match=match):
        extract_mean_activations(model, tokenizer, CONVERSATIONS, layers, progress=False)


def test_mean_embeddings_control(tiny):
    model, tokenizer = tiny
    got = extract_mean_embeddings(model, tokenizer, CONVERSATIONS)
    assert got.shape == (len(CONVERSATIONS), model.config.hidden_size) and got.dtype == torch.float32
    # hidden_states[0], the residual stream's input (with Gemma's sqrt(d_model) scale in 4.x and 5.x alike)
    for i, messages in enumerate(CONVERSATIONS):
        ids, start, end = response_token_span(messages, tokenizer)
        with torch.no_grad():
            h0 = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[0][0]
        torch.testing.assert_close(got[i], h0[start:end].float().mean(0), atol=ATOL, rtol=0)
    raw = model.get_input_embeddings().weight[torch.tensor(ids[start:end])].float().mean(0)
    assert (got[-1] - raw).abs().max() > 0.1  # the scale is really there (tiny-gemma2 is a Gemma)


def test_benchmark_script_runs_and_reports_its_headline_numbers():
    """A smoke test of ``benchmarks.extraction`` on tiny-gemma2 (not a timing test: no speed is asserted).
    Its last line is one JSON object with the headline keys, and the three variants agree."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.extraction", "--model", "tiny-gemma2", "--n", "4",
                           "--repeats", "1"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("speedup_vs_seed_batched", "speedup_vs_seed_single", "memory_added_ratio_vs_seed_batched",
                "max_abs_diff", "flops_limit_ratio"):
        assert isinstance(summary[key], float), key
    assert summary["layer"] == 3  # the course's default: half depth of tiny-gemma2's layers
    assert summary["max_abs_diff"] <= 1e-5 * max(1.0, summary["max_abs_value"])
    assert summary["flops_limit_ratio"] > 1.0
