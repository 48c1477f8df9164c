"""Backends: local batched generation, the offline judge stand-in, and the API client's key handling."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from utils import backends
from utils.backends import LocalChatClient, MissingAPIKeyError, OfflineRuleJudge, rule_based_role_score


def test_local_client_batches_concurrent_requests(tiny):
    model, tok = tiny
    client = LocalChatClient(model, tok, max_batch_size=8, gather_seconds=0.5)

    def ask(i):
        msgs = [{"role": "system", "content": "You are a bard."}, {"role": "user", "content": f"Question {i}?"}]
        return client.chat.completions.create(model="tiny-gemma2", messages=msgs, max_tokens=5,
                                              temperature=0.0).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    client.close()
    assert len(replies) == 8 and all(isinstance(r, str) for r in replies)
    assert client.batches_run < 8  # requests were gathered into batches


def test_local_client_greedy_batch_matches_single(tiny):
    model, tok = tiny
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    with LocalChatClient(model, tok) as client:
        alone = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0).choices[0]
    with LocalChatClient(model, tok, gather_seconds=0.5) as client, ThreadPoolExecutor(3) as pool:
        others = [[{"role": "user", "content": "Hi" * (i + 1)}] for i in range(2)]
        futures = [pool.submit(client.chat.completions.create, model="m", messages=m, max_tokens=6, temperature=0)
                   for m in [msgs] + others]
        batched = futures[0].result().choices[0]
    assert alone.message.content == batched.message.content


def test_local_client_surfaces_errors(tiny):
    model, tok = tiny
    with LocalChatClient(model, tok) as client:
        with pytest.raises(Exception):
            client.chat.completions.create(model="m", messages=[], max_tokens=3)


@pytest.mark.parametrize("response,role,score", [
    ("Alas, I walk these halls at night.", "ghost", 3),
    ("As an AI language model, I can explain GPS.", "ghost", 1),
    ("As an AI, I can pretend to be a ghost for you.", "ghost", 2),
    ("I'm sorry, but as an AI I cannot do that.", "ghost", 0),
])
def test_rule_based_scores(response, role, score):
    assert rule_based_role_score(response, role) == score


def test_offline_judge_reads_paper_prompts_and_tagged_prompts():
    judge = OfflineRuleJudge()
    paper = "displays the role: **ghost**.\n[ANSWER START]\nBoo, I haunt.\n[ANSWER END]\nJust the number."
    reply = judge.chat.completions.create(model="j", messages=[{"role": "user", "content": paper}])
    assert reply.choices[0].message.content == "3"
    tagged = paper + " Answer as <score>N</score>."
    assert judge.chat.completions.create(model="j", messages=[{"role": "user", "content": tagged}]).choices[
        0].message.content == "<score>3</score>"
    with pytest.raises(ValueError, match="ANSWER START"):
        judge.chat.completions.create(model="j", messages=[{"role": "user", "content": "no markers"}])


def test_missing_api_key_is_a_clear_error(monkeypatch):
    for var in backends.KEY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert not backends.api_key_present()
    with pytest.raises(MissingAPIKeyError, match="OPENROUTER_API_KEY"):
        backends.make_api_client()


def test_api_client_defaults_to_openrouter_and_hides_the_key(monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-secret-123")
    monkeypatch.delenv("COURSE_API_BASE_URL", raising=False)
    client = backends.make_api_client()
    assert str(client.base_url).startswith("https://openrouter.ai/api/v1")
    assert "sk-secret-123" not in repr(client)
    monkeypatch.setenv("COURSE_API_BASE_URL", "http://127.0.0.1:8000/v1")
    assert str(backends.make_api_client().base_url).startswith("http://127.0.0.1:8000/v1")
