"""Per-turn spans, whole-turn windows and per-turn activations of multi-turn conversations."""

import pytest
import torch

from tests.part1_persona_space import tiny_chatml_tokenizer
from utils.activations import extract_mean_activations, per_turn_mean_activations, per_turn_projections
from utils.conversation import (ChatFormatError, TurnTooLongError, assistant_turn_spans, chat_messages,
                                response_token_span, turn_windows)
from utils.models import context_length
from utils.transcripts import drift_transcripts, load_transcript

WORDS = ("law order river song light stone market answer garden window paper north quiet simple "
         "number letter travel winter summer bridge").split()


def _text(seed, n):
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n)).capitalize() + "."


def _conversation(n_turns=4, system="You are a careful assistant.", lengths=None):
    lengths = lengths or [6 + 5 * (t % 3) for t in range(n_turns)]
    msgs = [{"role": "system", "content": system}] if system else []
    for t in range(n_turns):
        msgs.append({"role": "user", "content": _text(2 * t, 4 + t % 2)})
        msgs.append({"role": "assistant", "content": _text(2 * t + 1, lengths[t])})
    return msgs


def _assistants(msgs):
    return [m["content"] for m in msgs if m["role"] == "assistant"]


@pytest.fixture(params=["gemma", "chatml"])
def tok(request, tiny):
    return tiny[1] if request.param == "gemma" else tiny_chatml_tokenizer()


def test_spans_decode_to_each_assistant_turn_and_match_part1(tok):
    msgs = _conversation()
    ids, spans = assistant_turn_spans(msgs, tok)
    assert ids.count(tok.bos_token_id) <= 1 and len(spans) == 4
    for (start, end), content in zip(spans, _assistants(msgs)):
        assert tok.decode(ids[start:end]) == content
    # Part 1's single-turn rule on the conversation cut after each assistant turn gives the same span
    assistant_at = [j for j, m in enumerate(msgs) if m["role"] == "assistant"]
    for (start, end), j in zip(spans, assistant_at):
        cut_ids, s, e = response_token_span(msgs[:j + 1], tok)
        assert (s, e) == (start, end) and ids[:len(cut_ids)] == cut_ids


def test_spans_on_a_real_transcript(tiny):
    msgs = load_transcript(drift_transcripts()["writing"])
    ids, spans = assistant_turn_spans(msgs, tiny[1])
    assert len(spans) == 14
    for (start, end), content in zip(spans, _assistants(msgs)):
        # up to a token that straddles the turn marker's newline and the content (Part 1's rule)
        assert tiny[1].decode(ids[start:end]).strip() == content.strip()


def test_spans_reject_bad_conversations(tiny):
    with pytest.raises(ChatFormatError, match="expected a assistant turn|expected a user turn"):
        assistant_turn_spans([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tiny[1])
    with pytest.raises(ChatFormatError, match="empty"):
        assistant_turn_spans([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}], tiny[1])


def _check_windows(msgs, tok, windows, max_tokens):
    system = msgs[:1] if msgs[0]["role"] == "system" else []
    assistant_at = [j for j, m in enumerate(msgs) if m["role"] == "assistant"]
    scored = [t for w in windows for t in w.turns]
    assert scored == list(range(len(assistant_at)))  # every turn exactly once, in order
    for w in windows:
        assert len(w.ids) <= max_tokens
        body = msgs[w.first_message:w.last_message + 1]
        assert w.messages == (system if w.system_kept else []) + body  # whole messages, never cut
        assert msgs[w.first_message]["role"] == "user" and w.last_message == assistant_at[w.turns[-1]]
        ids, spans = assistant_turn_spans(w.messages, tok)
        assert ids == w.ids and spans[-len(w.turns):] == w.spans
        for t, (start, end) in zip(w.turns, w.spans):
            assert tok.decode(w.ids[start:end]) == msgs[assistant_at[t]]["content"]
            # longest: one more turn pair in front would not fit
            if w.first_message - 2 >= len(system):
                longer = (system if w.system_kept else []) + msgs[w.first_message - 2:assistant_at[t] + 1]
                assert len(assistant_turn_spans(longer, tok)[0]) > max_tokens


def test_windows_single_pass_when_it_fits(tok):
    msgs = _conversation()
    ids, spans = assistant_turn_spans(msgs, tok)
    (window,) = turn_windows(msgs, tok, len(ids))
    assert window.ids == ids and window.spans == spans and window.turns == [0, 1, 2, 3] and window.system_kept


def test_windows_split_by_whole_turns(tok):
    msgs = _conversation(n_turns=6)
    full = len(assistant_turn_spans(msgs, tok)[0])
    for max_tokens in (full - 1, full // 2, full // 3):
        windows = turn_windows(msgs, tok, max_tokens)
        assert len(windows) > 1
        _check_windows(msgs, tok, windows, max_tokens)


def test_windows_drop_the_system_prompt_only_where_it_does_not_fit(tiny):
    tok = tiny[1]
    msgs = _conversation(n_turns=3, system=_text(9, 25), lengths=[5, 60, 5])
    pair = len(assistant_turn_spans(msgs[3:5], tok)[0])  # user + the long assistant turn 1 alone
    max_tokens = pair + 5  # fits alone, not with the 25-word system prompt
    assert len(assistant_turn_spans(msgs[:1] + msgs[3:5], tok)[0]) > max_tokens
    assert len(assistant_turn_spans(msgs[:3], tok)[0]) <= max_tokens  # system + turn 0 fits
    windows = turn_windows(msgs, tok, max_tokens)
    _check_windows(msgs, tok, windows, max_tokens)
    kept = {t: w.system_kept for w in windows for t in w.turns}
    assert kept[1] is False and kept[0] is True


def test_a_turn_too_long_to_fit_is_an_error(tiny):
    msgs = _conversation(n_turns=3, system="", lengths=[5, 60, 5])
    max_tokens = len(assistant_turn_spans(msgs[:2], tiny[1])[0]) + 10  # turn 0 fits, turn 1 does not
    long_pair = len(assistant_turn_spans(msgs[2:4], tiny[1])[0])
    assert long_pair > max_tokens
    with pytest.raises(TurnTooLongError,
                       match=rf"Assistant turn 1 \(message 3\).*max_tokens={max_tokens}.*take {long_pair} tokens"):
        turn_windows(msgs, tiny[1], max_tokens)
    with pytest.raises(ValueError, match="positive int"):
        turn_windows(msgs, tiny[1], 0)


def _manual_means(model, ids, spans, layers):
    with torch.inference_mode():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.stack([torch.stack([hs[layer + 1][0, s:e].float().mean(0) for layer in layers]) for s, e in spans])


def test_per_turn_means_match_a_full_pass_when_it_fits(tiny):
    model, tok = tiny
    msgs = _conversation()
    ids, spans = assistant_turn_spans(msgs, tok)
    got = per_turn_mean_activations(model, tok, msgs, [4, 1])
    assert got.shape == (4, 2, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, _manual_means(model, ids, spans, [4, 1]), atol=1e-5, rtol=1e-5)
    assert per_turn_mean_activations(model, tok, msgs, 4).shape == (4, 1, 64)
    assert context_length(model) == 1024  # tiny-gemma2's max_position_embeddings


def test_windowed_means_equal_each_turns_own_window(tiny):
    model, tok = tiny
    msgs = _conversation(n_turns=6)
    max_tokens = len(assistant_turn_spans(msgs, tok)[0]) // 2
    windows = turn_windows(msgs, tok, max_tokens)
    assert any(len(w.turns) > 1 for w in windows)  # some passes are shared
    got = per_turn_mean_activations(model, tok, msgs, [2, 4], max_tokens=max_tokens)
    assistant_at = [j for j, m in enumerate(msgs) if m["role"] == "assistant"]
    for w in windows:
        for t in w.turns:  # each turn in a pass of its own, ending with it
            own = w.messages[:len(w.messages) - (w.last_message - assistant_at[t])]
            ids, spans = assistant_turn_spans(own, tok)
            torch.testing.assert_close(got[t], _manual_means(model, ids, spans[-1:], [2, 4])[0], atol=1e-5, rtol=1e-5)


def test_one_turn_equals_part1_extraction(tiny):
    model, tok = tiny
    conv = chat_messages("You are a bard.", "What is the law?", "The law is a song sung by the people.")
    got = per_turn_mean_activations(model, tok, conv, [1, 3, 5])
    ref = extract_mean_activations(model, tok, [conv], [1, 3, 5], progress=False)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_per_turn_projections(tiny):
    model, tok = tiny
    msgs = _conversation()
    axis = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 5
    got = per_turn_projections(model, tok, msgs, axis, 3)
    means = per_turn_mean_activations(model, tok, msgs, 3)[:, 0]
    torch.testing.assert_close(got, means @ (axis / axis.norm()))
    with pytest.raises(ValueError, match=r"\[d_model\] = \[64\]"):
        per_turn_projections(model, tok, msgs, torch.randn(6, 64), 3)
    with pytest.raises(ValueError, match="out of range"):
        per_turn_mean_activations(model, tok, msgs, [6])
