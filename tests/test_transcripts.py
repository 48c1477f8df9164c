"""The paper's transcripts: every shipped file loads; malformed files fail naming the file and the turn."""

import json
import shutil

import pytest

from utils import transcripts
from utils.transcripts import (TRANSCRIPTS_DIR, TranscriptError, case_studies, drift_transcripts, load_transcript,
                               transcript_metadata)


def test_every_shipped_transcript_loads():
    files = sorted(p for p in TRANSCRIPTS_DIR.rglob("*") if p.is_file())
    assert len(files) == 16
    for path in files:
        messages = load_transcript(path)
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
        raw = json.loads(path.read_text())["conversation"]
        assert messages == [{"role": m["role"], "content": m["content"]} for m in raw]  # unchanged


def test_drift_and_case_study_index():
    drift = drift_transcripts()
    assert list(drift) == ["coding", "writing", "therapy", "philosophy"]
    assert transcript_metadata(drift["writing"])["model"] == "google/gemma-2-27b-it"
    studies = case_studies()
    models, scenarios = ("llama-3.3-70b", "qwen-3-32b"), ("jailbreak", "delusion", "selfharm")
    assert set(studies) == {(m, s) for m in models for s in scenarios}
    for pair in studies.values():
        assert list(pair) == ["unsteered", "capped"]
    # the upstream file with a doubled extension is kept as published and mapped to selfharm/unsteered
    assert studies[("qwen-3-32b", "selfharm")]["unsteered"].name == "selfharm_unsteered.json.json"
    assert "layers_46:54" in transcript_metadata(studies[("qwen-3-32b", "selfharm")]["capped"])["steering_config"][
        "experiment_id"]


def _write(tmp_path, conversation, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"model": "x", "conversation": conversation}))
    return path


U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize("conversation, turn, message", [
    ([U, {"content": "no role"}], 1, "no 'role'"),
    ([U, A, U, U, A], 3, "two user turns in a row"),
    ([U, A, {"role": "user", "content": "  \n"}, A], 2, "empty content"),
    ([U, {"role": "model", "content": "x"}], 1, "unknown role 'model'"),
    ([A, U], 0, "must start with a user turn"),
    ([U, A, {"role": "system", "content": "late"}], 2, "only be the first"),
    ([U, {"role": "assistant"}], 1, "no 'content'"),
])
def test_malformed_turns_name_file_and_turn(tmp_path, conversation, turn, message):
    path = _write(tmp_path, conversation)
    with pytest.raises(TranscriptError, match=message) as info:
        load_transcript(path)
    assert str(path) in str(info.value) and f"turn {turn} " in str(info.value)


def test_other_keys_are_left_out(tmp_path):
    """A turn's other keys (a turn id, say) are dropped, as the parse_transcript exercise drops them."""
    path = _write(tmp_path, [dict(U, turn_id=0), dict(A, extra=1)])
    assert load_transcript(path) == [U, A]


def test_malformed_files(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"conversation": [')
    with pytest.raises(TranscriptError, match=r"broken\.json: not valid JSON"):
        load_transcript(bad_json)
    no_conversation = tmp_path / "x.json"
    no_conversation.write_text('{"model": "m"}')
    with pytest.raises(TranscriptError, match="no 'conversation' key"):
        load_transcript(no_conversation)
    with pytest.raises(TranscriptError, match="no assistant turn"):
        load_transcript(_write(tmp_path, [U]))
    with pytest.raises(TranscriptError, match="empty"):
        load_transcript(_write(tmp_path, []))
    with pytest.raises(TranscriptError, match="no such transcript"):
        load_transcript(tmp_path / "missing.json")
    assert issubclass(TranscriptError, ValueError)
    # a system prompt first is fine, and a bare list of messages too
    path = tmp_path / "ok.json"
    path.write_text(json.dumps([{"role": "system", "content": "S"}, U, A]))
    assert [m["role"] for m in load_transcript(path)] == ["system", "user", "assistant"]


def test_case_study_names_are_checked(tmp_path, monkeypatch):
    root = tmp_path / "transcripts"
    shutil.copytree(TRANSCRIPTS_DIR, root)
    monkeypatch.setattr(transcripts, "TRANSCRIPTS_DIR", root)
    assert len(case_studies()) == 6
    (root / "case_studies" / "qwen-3-32b" / "jailbreak_capped.json").unlink()
    with pytest.raises(TranscriptError, match="jailbreak has no capped"):
        case_studies()
    (root / "case_studies" / "qwen-3-32b" / "jailbreak_steered.json").write_text("{}")
    with pytest.raises(TranscriptError, match="jailbreak_steered.json.*<scenario>_<variant>"):
        case_studies()
