"""The shared chat helpers: one system-prompt rule everywhere, one BOS, and exact response spans."""

import pytest

from utils.conversation import (ChatFormatError, chat_messages, merge_system_prompt, render, response_token_span,
                                supports_system_role, turn_suffix_len)


def test_merge_system_prompt_rules():
    msgs = chat_messages("You are a bard.", "Hi", "Hail")
    assert merge_system_prompt(msgs, False)[0] == {"role": "user", "content": "You are a bard.\n\nHi"}
    assert merge_system_prompt(msgs, True) == msgs
    for empty in ("", "  \n"):
        assert merge_system_prompt(chat_messages(empty, "Hi"), False) == [{"role": "user", "content": "Hi"}]
        assert merge_system_prompt(chat_messages(empty, "Hi"), True) == [{"role": "user", "content": "Hi"}]
    with pytest.raises(ChatFormatError):
        merge_system_prompt([], True)


def test_spans_exclude_markers_and_end_of_turn(tiny):
    _, tok = tiny
    assert not supports_system_role(tok) and turn_suffix_len(tok) == 2
    ids, start, end = response_token_span(chat_messages("You are a bard.", "What is law?", "Law is a song."), tok)
    assert ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[start:end]) == "Law is a song."
    assert tok.convert_ids_to_tokens(ids[end:]) == ["<end_of_turn>", "\n"]
    assert tok.decode(ids[:start]).endswith("<start_of_turn>model\n")


def test_empty_response_is_an_error(tiny):
    _, tok = tiny
    with pytest.raises(ChatFormatError, match="empty"):
        response_token_span(chat_messages("", "Hi", "   "), tok)


def test_render_merges_for_gemma(tiny):
    _, tok = tiny
    text = render(chat_messages("You are a ghost.", "Who?"), tok, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nYou are a ghost.\n\nWho?<end_of_turn>\n<start_of_turn>model\n"
