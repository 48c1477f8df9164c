"""Backends: local batched generation, the offline judge stand-in, and the API client's key handling."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from utils import judges
from utils.generation import LocalChatClient
from utils.judges import MissingAPIKeyError, OfflineRuleJudge, rule_based_role_score
from utils.conversation import ChatFormatError


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
        with pytest.raises(ChatFormatError, match="The conversation is empty"):
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
    for var in judges.KEY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert not judges.api_key_present()
    with pytest.raises(MissingAPIKeyError, match="OPENROUTER_API_KEY"):
        judges.make_api_client()


def test_api_client_defaults_to_openrouter_and_hides_the_key(monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-secret-123")
    monkeypatch.delenv("COURSE_API_BASE_URL", raising=False)
    client = judges.make_api_client()
    assert str(client.base_url).startswith("https://openrouter.ai/api/v1")
    assert "sk-secret-123" not in repr(client)
    monkeypatch.setenv("COURSE_API_BASE_URL", "http://127.0.0.1:8000/v1")
    assert str(judges.make_api_client().base_url).startswith("http://127.0.0.1:8000/v1")


def _ask_all(client, questions, jitter_seed, workers=4, shuffle=False):
    """Part 1's pattern: a thread pool over the requests, each thread submitting its next as soon as it is answered,
    here with random delays (well inside the client's gather window) so that arrival order changes between runs."""
    import random
    import time

    rng = random.Random(jitter_seed)
    delays = [rng.uniform(0, 0.05) for _ in questions]
    order = list(range(len(questions)))
    if shuffle:  # only meaningful when every request fits in one wave (workers >= len(questions))
        rng.shuffle(order)

    def ask(i):
        time.sleep(delays[i])
        msgs = [{"role": "system", "content": "You are a bard."}, {"role": "user", "content": questions[i]}]
        return i, client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0.9,
                                                 top_p=0.95).choices[0].message.content

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(ask, order))


def test_local_client_rerun_with_same_seed_gives_identical_text_whatever_the_arrival_order(tiny):
    model, tok = tiny
    questions = [f"Question number {i}{'?' * (i % 3 + 1)}" for i in range(10)]
    runs = []
    for jitter in (0, 1, 2):
        with LocalChatClient(model, tok, max_batch_size=4, gather_seconds=0.3, seed=7) as client:
            runs.append(_ask_all(client, questions, jitter))
            assert client.waves_cut == 0
    assert runs[0] == runs[1] == runs[2], "same seed, same requests: the replies must not depend on arrival order"
    assert len(set(runs[0].values())) > 5  # sampled replies that differ between requests
    with LocalChatClient(model, tok, max_batch_size=4, gather_seconds=0.3, seed=8) as client:
        other = _ask_all(client, questions, 0)
    assert other != runs[0], "another seed must give other samples"
    # One wave (as many threads as requests): even the order in which they are submitted does not matter.
    with LocalChatClient(model, tok, max_batch_size=4, gather_seconds=0.3, seed=7) as client:
        one = _ask_all(client, questions, 0, workers=10)
    with LocalChatClient(model, tok, max_batch_size=4, gather_seconds=0.3, seed=7) as client:
        assert _ask_all(client, questions, 1, workers=10, shuffle=True) == one


def test_local_client_wave_is_sorted_and_split_into_batches(tiny):
    model, tok = tiny
    with LocalChatClient(model, tok, max_batch_size=3, gather_seconds=0.3) as client:
        replies = _ask_all(client, [f"Q{i}" for i in range(7)], 0, workers=7)
        assert (client.waves_run, client.batches_run) == (1, 3)  # 7 requests together: batches of 3, 3 and 1
    assert sorted(replies) == list(range(7))


def test_local_client_request_seed_separates_identical_requests(tiny):
    model, tok = tiny
    msgs = [{"role": "user", "content": "Tell me a story."}]

    def sample(seeds):
        with LocalChatClient(model, tok, gather_seconds=0.3) as client, ThreadPoolExecutor(3) as pool:
            futures = {s: pool.submit(client.chat.completions.create, model="m", messages=msgs, max_tokens=8,
                                      temperature=1.0, seed=s) for s in seeds}
            return {s: f.result().choices[0].message.content for s, f in futures.items()}

    assert sample([1, 2, 3]) == sample([3, 1, 2])


def test_local_client_malformed_request_fails_alone(tiny):
    model, tok = tiny
    with LocalChatClient(model, tok, gather_seconds=0.3) as client, ThreadPoolExecutor(2) as pool:
        bad = pool.submit(client.chat.completions.create, model="m", messages=[{"content": "no role"}], max_tokens=3)
        good = pool.submit(client.chat.completions.create, model="m", messages=[{"role": "user", "content": "Hi"}],
                           max_tokens=3)
        assert isinstance(good.result().choices[0].message.content, str)
        with pytest.raises(ChatFormatError, match="exactly a 'role'"):
            bad.result()
