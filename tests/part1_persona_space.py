"""Checks for Part 1, "Mapping persona space". Each notebook exercise is followed by a call to one of these.

How the checks work:

- They run offline, deterministically and in seconds. Anything that needs a model uses ``tiny-gemma2``
  (a 2 MB random Gemma 2 built on first use) so the numbers are exact, plus quick property checks on
  the model you loaded.
- They contain no reference solution. Expected values come from fixtures in ``tests/fixtures/`` (made
  from the reference solution by ``make fixtures`` and kept current by the test suite), from literal
  cases written out here, and from properties every correct answer has.
- A failing check raises :class:`CheckFailure` (an ``AssertionError``) whose message names the likely
  mistake, shows expected against actual, and points to the notebook section that explains it.
"""

from __future__ import annotations

import copy
import json
import threading
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ATOL = 1e-4

# The conversations the extraction checks run on tiny-gemma2 (the fixtures were made from these).
EXTRACTION_LAYER = 2
EXTRACTION_CONVERSATIONS = [
    [{"role": "system", "content": "You are a bard who sings of old kings."},
     {"role": "user", "content": "What is the relationship between law and morality?"},
     {"role": "assistant", "content": "Hear me sing: the law is the cloak, and morality the heart beneath it."}],
    [{"role": "system", "content": ""},
     {"role": "user", "content": "How do GPS systems work?"},
     {"role": "assistant", "content": "Satellites broadcast time signals; a receiver compares them."}],
    [{"role": "system", "content": "You are an analyst."},
     {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}],
    [{"role": "system", "content": "You are a ghost."},
     {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "A whisper in the hall."},
     {"role": "user", "content": "And what do you want?"},
     {"role": "assistant", "content": "Only to be remembered by those who walk these rooms after me, long after the candles die."}],
    [{"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue, like the deep sea at noon, and the sky over it on a clear and windless day."}],
]

PERSONA_CASE = dict(
    personas={"default_empty": "", "bard": "You are a bard.", "ghost": "You are a ghost."},
    questions=["What is law?", "Describe the sea.", "Who are you?"],
    responses={
        ("default_empty", 0): "Law is a system of rules.", ("default_empty", 1): "The sea is vast.",
        ("default_empty", 2): "I am an AI assistant.",
        ("bard", 0): "Law, my friend, is a song.", ("bard", 1): "I am an AI and the sea is water.",
        ("bard", 2): "A wandering bard am I!",
        ("ghost", 0): "Law binds the living, not me.", ("ghost", 1): "The sea took me long ago.",
        ("ghost", 2): "As an AI, I cannot be a ghost.",
    },
    scores={("bard", 0): 3, ("bard", 1): 1, ("bard", 2): 3, ("ghost", 0): 3, ("ghost", 1): 3, ("ghost", 2): 2},
    layer=EXTRACTION_LAYER,
)


class CheckFailure(AssertionError):
    """A check found a mistake; the message says which, and how to fix it."""


def _fail(message: str, section: str | None = None) -> None:
    where = f"\n(See {section} in the notebook.)" if section else ""
    raise CheckFailure(message + where)


def _short(x, n: int = 6) -> str:
    if isinstance(x, torch.Tensor):
        flat = x.detach().flatten()[:n].tolist()
        return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype}, first={[round(v, 4) for v in flat]})"
    text = repr(x)
    return text if len(text) < 160 else text[:157] + "..."


def _passed(name: str) -> None:
    print(f"✓ {name}: all checks passed")


# --------------------------------------------------------------------------------------------------
# Fixtures and the tiny model
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _tensor_fixtures() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = FIXTURES / "part1_persona_space.safetensors"
    if not path.exists():
        _fail(f"The check's fixture file {path} is missing. Restore it with `git checkout -- tests/fixtures` "
              "(maintainers: `make fixtures`).")
    return load_file(str(path))


@lru_cache(maxsize=1)
def _json_fixtures() -> dict:
    path = FIXTURES / "part1_persona_space.json"
    if not path.exists():
        _fail(f"The check's fixture file {path} is missing. Restore it with `git checkout -- tests/fixtures`.")
    return json.loads(path.read_text())


def fixture(name: str) -> torch.Tensor:
    return _tensor_fixtures()[name]


@lru_cache(maxsize=1)
def tiny_gemma2():
    """(model, tokenizer) of tiny-gemma2, loaded once per process."""
    from utils.models import load_model

    return load_model("tiny-gemma2")


CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def tiny_chatml_tokenizer():
    """tiny-gemma2's tokenizer with a ChatML template that has a system role (like SmolLM2's)."""
    tok = copy.deepcopy(tiny_gemma2()[1])
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _with_padding_side(tokenizer, side: str):
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = side
    return tok


def _tokenizers_to_check(learner_tokenizer) -> list[tuple[str, object]]:
    out = [("tiny-gemma2 (Gemma 2 template)", tiny_gemma2()[1]), ("a ChatML template with a system role",
                                                                  tiny_chatml_tokenizer())]
    if learner_tokenizer is not None and learner_tokenizer.chat_template not in (tiny_gemma2()[1].chat_template,
                                                                                 CHATML_TEMPLATE):
        out.append((f"your tokenizer ({type(learner_tokenizer).__name__})", learner_tokenizer))
    return out


# --------------------------------------------------------------------------------------------------
# Fake OpenAI-compatible clients
# --------------------------------------------------------------------------------------------------

def _completion(content):
    return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(role="assistant", content=content))])


class FakeJudgeClient:
    """Replies with a fixed text and records every call."""

    def __init__(self, reply: str):
        self.reply, self.calls = reply, []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **kwargs):
        self.calls.append(kwargs)
        return _completion(self.reply)


ECHO = object()  # FakeChatClient's default: reply with a description of the request


class FakeChatClient:
    """Answers deterministically from the request; can fail, return empty text, and detect concurrency.

    - A user message containing "FAIL" raises ``RuntimeError("HTTP 500 ...")``.
    - A user message containing "EMPTY" gets an empty reply.
    - The first two calls wait for each other at a barrier; if the caller runs calls one at a time the
      barrier times out and ``serial`` becomes True (the call still succeeds).
    """

    def __init__(self, reply=ECHO, barrier: bool = False, timeout: float = 3.0):
        self.reply, self.calls, self.serial = reply, [], False
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(2, timeout=timeout) if barrier else None
        self._barrier_calls = 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **kwargs):
        with self._lock:
            self.calls.append(kwargs)
            use_barrier = self._barrier is not None and self._barrier_calls < 2
            self._barrier_calls += 1
        if use_barrier:
            try:
                self._barrier.wait()
            except threading.BrokenBarrierError:
                self.serial = True
        user = [m["content"] for m in kwargs["messages"] if m["role"] == "user"][-1]
        if "FAIL" in user:
            raise RuntimeError("HTTP 500 from the fake server")
        if "EMPTY" in user:
            return _completion("")
        if self.reply is not ECHO:
            return _completion(self.reply)
        system = [m["content"] for m in kwargs["messages"] if m["role"] == "system"]
        return _completion(f"  [{kwargs['model']}] system={system!r} user={user!r}  \n")


# --------------------------------------------------------------------------------------------------
# Exercise 1: the judge
# --------------------------------------------------------------------------------------------------

def test_judge_prompt_template(template: str) -> None:
    section = "Section 1, Exercise 1"
    if not isinstance(template, str):
        _fail(f"JUDGE_PROMPT_TEMPLATE should be a str, got {type(template).__name__}.", section)
    missing = [p for p in ("{character}", "{question}", "{response}") if p not in template]
    if missing:
        _fail(f"JUDGE_PROMPT_TEMPLATE is missing the placeholder(s) {missing}; the judge would never see them.",
              section)
    try:
        prompt = template.format(character="bard", question="Q-TEXT", response="R-TEXT")
    except (KeyError, IndexError, ValueError) as exc:
        _fail(f"JUDGE_PROMPT_TEMPLATE.format(character=..., question=..., response=...) failed with "
              f"{type(exc).__name__}: {exc}. Use only those three placeholders, and write literal braces as "
              "{{ and }}.", section)
    if "**bard**" not in prompt:
        _fail("Put the character's name in bold, **{character}**, as the paper's judge prompts do "
              "(the offline judge reads the role from there).", section)
    start, end = prompt.find("[ANSWER START]"), prompt.find("[ANSWER END]")
    if not (0 <= start < prompt.find("R-TEXT") < end):
        _fail("Put the response between [ANSWER START] and [ANSWER END], as the paper's judge prompts do.", section)
    if "<score>" not in prompt:
        _fail("Ask the judge to answer in the form <score>N</score>: the parser relies on that tag.", section)
    if not all(str(n) in prompt for n in range(4)):
        _fail("Describe the 0-3 scale in the prompt: each of 0, 1, 2 and 3 should appear with its meaning.", section)
    _passed("test_judge_prompt_template")


JUDGE_CASES = [  # (reply, expected score or None for "must raise", what a wrong answer means)
    ("<score>3</score>", 3, "read the number inside <score>...</score>"),
    ("<score>0</score>", 0, "0 is a valid score: do not treat it as missing"),
    ("The response mentions 2 roles and 1 name. <score>1</score>", 1,
     "you parsed the first digit in the reply, not the one inside <score>...</score>"),
    ("I think this is clearly in role.\n<score>2</score>\nThanks!", 2,
     "text around the tag is allowed: search for the tag, do not require the whole reply to be it"),
    ("3", 3, "a reply that is exactly one digit is valid (the paper's prompts ask for just the number)"),
    ("<score>7</score>", None, "7 is outside the 0-3 scale: raise instead of returning it"),
    ("<score>-1</score>", None, "-1 is outside the 0-3 scale: raise instead of returning it"),
    ("I cannot evaluate this response.", None, "a reply with no score must raise, not default to 0"),
    ("The score is 3, maybe 2.", None,
     "a reply with digits but no <score> tag is ambiguous: raise instead of guessing"),
    ("", None, "an empty reply must raise"),
]


def test_judge_role_response(fn) -> None:
    section = "Section 1, Exercise 1"
    for reply, expected, meaning in JUDGE_CASES:
        client = FakeJudgeClient(reply)
        try:
            got = fn("What is law?", "Hear ye!", "bard", client, "judge-model")
        except NotImplementedError:
            raise
        except ValueError:
            if expected is not None:
                _fail(f"For the judge reply {reply!r} you raised, but the score is {expected}: {meaning}.", section)
            continue
        except Exception as exc:
            _fail(f"For the judge reply {reply!r} you raised {type(exc).__name__}: {exc}. Raise JudgeParseError "
                  "(a ValueError) for a reply you cannot parse, and return the score otherwise.", section)
        if expected is None:
            _fail(f"For the judge reply {reply!r} you returned {got!r}; expected an error: {meaning}.", section)
        if not isinstance(got, int) or isinstance(got, bool) or got != expected:
            _fail(f"For the judge reply {reply!r} you returned {got!r} ({type(got).__name__}); expected the int "
                  f"{expected}: {meaning}.", section)
        if len(client.calls) != 1:
            _fail(f"judge_role_response made {len(client.calls)} API calls for one judgement; expected 1.", section)
        call = client.calls[0]
        if call.get("model") != "judge-model":
            _fail(f"Pass judge_model as model=...; the client was called with model={call.get('model')!r}.", section)
        prompt = call["messages"][-1]["content"]
        for needle, what in (("What is law?", "question"), ("Hear ye!", "response"), ("bard", "character")):
            if needle not in prompt:
                _fail(f"The prompt sent to the judge does not contain the {what} ({needle!r}); fill every placeholder "
                      f"of JUDGE_PROMPT_TEMPLATE. Prompt sent: {_short(prompt)}", section)
    paper_prompt = "Role: **ghost**.\n[QUESTION START]\n{question}\n[QUESTION END]\n[ANSWER START]\n{answer}\n[ANSWER END]\nJust the number."
    client = FakeJudgeClient("2")
    got = fn("Who are you?", "Boo.", "ghost", client, "judge-model", eval_prompt=paper_prompt)
    sent = client.calls[0]["messages"][-1]["content"] if client.calls else None
    if sent != paper_prompt.format(question="Who are you?", answer="Boo."):
        _fail("With eval_prompt given, send eval_prompt.format(question=..., answer=...) (the paper's slots are "
              f"{{question}} and {{answer}}). You sent: {_short(sent)}", section)
    if got != 2:
        _fail(f"With the paper's prompt and the reply '2' you returned {got!r}; expected 2.", section)
    _passed("test_judge_role_response")


# --------------------------------------------------------------------------------------------------
# Exercise 2: generation
# --------------------------------------------------------------------------------------------------

def test_generate_response_api(fn) -> None:
    section = "Section 2, Exercise 2a"
    # A model with a system role.
    client = FakeChatClient(reply="  Hear me sing.  \n")
    got = fn(client, "some/model", "You are a bard.", "What is law?", max_tokens=33, temperature=0.5)
    msgs = client.calls[0]["messages"] if client.calls else None
    expected = [{"role": "system", "content": "You are a bard."}, {"role": "user", "content": "What is law?"}]
    if msgs != expected:
        _fail(f"For a model with a system role, send {expected}; you sent {msgs}. "
              "(Is the system prompt being ignored?)", section)
    if client.calls[0].get("max_tokens") != 33 or client.calls[0].get("temperature") != 0.5:
        _fail("Pass max_tokens and temperature on to client.chat.completions.create; the call had "
              f"max_tokens={client.calls[0].get('max_tokens')!r}, temperature={client.calls[0].get('temperature')!r}.",
              section)
    if got != "Hear me sing.":
        _fail(f"Return the reply text stripped of surrounding whitespace: expected 'Hear me sing.', got {got!r}.",
              section)
    # Gemma: no system role.
    client = FakeChatClient(reply="ok")
    fn(client, "google/gemma-2-27b-it", "You are a bard.", "What is law?")
    msgs = client.calls[0]["messages"]
    expected = [{"role": "user", "content": "You are a bard.\n\nWhat is law?"}]
    if msgs != expected:
        _fail(f"Gemma 2 has no system role: send {expected}; you sent {msgs}.", section)
    # Empty system prompt: nothing added, for either kind of model.
    for model_name in ("google/gemma-2-27b-it", "some/model"):
        client = FakeChatClient(reply="ok")
        fn(client, model_name, "", "What is law?")
        msgs = client.calls[0]["messages"]
        if msgs != [{"role": "user", "content": "What is law?"}]:
            _fail(f"An empty system prompt should add nothing (model {model_name!r}); you sent {msgs}. "
                  "A stray system message or a leading blank line changes the default persona's prompt.", section)
    # Empty replies are errors.
    for reply in ("", "   \n", None):
        client = FakeChatClient(reply=reply)
        try:
            got = fn(client, "some/model", "You are a bard.", "What is law?")
        except ValueError:
            continue
        _fail(f"The client replied {reply!r} and you returned {got!r}: raise EmptyResponseError (a ValueError) "
              "so the empty answer is recorded as a failure, not averaged over.", section)
    # Failures propagate.
    client = FakeChatClient()
    try:
        got = fn(client, "some/model", "You are a bard.", "FAIL please")
    except RuntimeError:
        pass
    else:
        _fail(f"The client raised an error and you returned {got!r}: let the exception propagate; never turn a "
              "failed call into a string.", section)
    _passed("test_generate_response_api")


def test_generate_all_responses(fn) -> None:
    section = "Section 2, Exercise 2b"
    personas = {"default_empty": "", "bard": "You are a bard.", "ghost": "You are a ghost."}
    questions = ["What is law?", "FAIL on purpose", "Describe the sea.", "EMPTY reply please"]
    client = FakeChatClient(barrier=True)
    result = fn(client, "some/model", personas, questions, max_workers=4, max_tokens=21)
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, dict) for r in result)):
        _fail(f"Return a tuple (responses, failures) of two dicts; got {_short(result)}.", section)
    responses, failures = result
    expected_keys = {(p, q) for p in personas for q in range(len(questions))}
    bad = [k for k in list(responses) + list(failures)
           if not (isinstance(k, tuple) and len(k) == 2 and isinstance(k[0], str) and isinstance(k[1], int))]
    if bad:
        _fail(f"Key every result by (persona_name, question_index), e.g. ('bard', 0); found keys like {bad[:3]}.",
              section)
    overlap = set(responses) & set(failures)
    if overlap:
        _fail(f"These keys are both responses and failures: {sorted(overlap)[:4]}.", section)
    missing = expected_keys - set(responses) - set(failures)
    if missing:
        _fail(f"{len(missing)} of {len(expected_keys)} results were dropped, e.g. {sorted(missing)[:4]}. Every call "
              "must end up in responses or in failures.", section)
    extra = (set(responses) | set(failures)) - expected_keys
    if extra:
        _fail(f"Unexpected keys {sorted(extra)[:4]}: the question index is its position in `questions`.", section)
    should_fail = {(p, q) for p in personas for q in (1, 3)}
    wrongly_ok = {k: responses[k] for k in should_fail if k in responses}
    if wrongly_ok:
        k, v = next(iter(wrongly_ok.items()))
        _fail(f"The call for {k} failed (or returned nothing), yet responses[{k}] = {v!r}. Record failures in "
              "`failures`, never as an empty or placeholder string.", section)
    not_text = {k: v for k, v in failures.items() if not isinstance(v, str) or not v.strip()}
    if not_text:
        _fail(f"Record each failure's error as text, e.g. 'RuntimeError: HTTP 500'; got {_short(not_text)}.", section)
    if "RuntimeError" not in failures[("bard", 1)] and "500" not in failures[("bard", 1)]:
        _fail(f"failures[('bard', 1)] should say what went wrong (e.g. 'RuntimeError: HTTP 500 ...'); it is "
              f"{failures[('bard', 1)]!r}.", section)
    if "system='You are a ghost.'" not in responses.get(("ghost", 0), "") and \
            "You are a ghost." not in responses.get(("ghost", 0), ""):
        _fail(f"responses[('ghost', 0)] = {responses.get(('ghost', 0))!r} does not come from the ghost's system prompt: "
              "pass each persona's system prompt to generate_response_api.", section)
    if "What is law?" not in responses.get(("bard", 0), ""):
        _fail(f"responses[('bard', 0)] = {responses.get(('bard', 0))!r} is not the answer to questions[0]: check "
              "which question each key gets.", section)
    if any(call.get("max_tokens") != 21 for call in client.calls):
        _fail("Pass **generation_kwargs (here max_tokens=21) through to generate_response_api.", section)
    if client.serial:
        _fail("The API calls ran one at a time: the first call waited 3 s for a second that never came. Submit "
              "them all to a ThreadPoolExecutor(max_workers=max_workers) before collecting results.", section)
    _passed("test_generate_all_responses")


# --------------------------------------------------------------------------------------------------
# Exercise 3: normalising and formatting
# --------------------------------------------------------------------------------------------------

def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


NORMALIZE_CASES = [  # (description, messages, expected without system role, expected with system role)
    ("a system prompt",
     [_m("system", "You are a bard."), _m("user", "Hi"), _m("assistant", "Hail!")],
     [_m("user", "You are a bard.\n\nHi"), _m("assistant", "Hail!")],
     [_m("system", "You are a bard."), _m("user", "Hi"), _m("assistant", "Hail!")]),
    ("an empty system prompt",
     [_m("system", ""), _m("user", "Hi"), _m("assistant", "Hello.")],
     [_m("user", "Hi"), _m("assistant", "Hello.")],
     [_m("user", "Hi"), _m("assistant", "Hello.")]),
    ("a whitespace-only system prompt",
     [_m("system", "  \n"), _m("user", "Hi")],
     [_m("user", "Hi")],
     [_m("user", "Hi")]),
    ("no system message",
     [_m("user", "Hi"), _m("assistant", "Hello.")],
     [_m("user", "Hi"), _m("assistant", "Hello.")],
     [_m("user", "Hi"), _m("assistant", "Hello.")]),
    ("a multi-turn conversation",
     [_m("system", "You are a ghost."), _m("user", "Who?"), _m("assistant", "Boo."), _m("user", "Why?"),
      _m("assistant", "Because.")],
     [_m("user", "You are a ghost.\n\nWho?"), _m("assistant", "Boo."), _m("user", "Why?"), _m("assistant", "Because.")],
     [_m("system", "You are a ghost."), _m("user", "Who?"), _m("assistant", "Boo."), _m("user", "Why?"),
      _m("assistant", "Because.")]),
]


def test_normalize_messages(fn, tokenizer=None) -> None:
    from utils.conversation import supports_system_role

    section = "Section 2 (Gemma's missing system role) and Section 3, Exercise 3"
    for tok_name, tok in _tokenizers_to_check(tokenizer):
        system_ok = supports_system_role(tok)
        for description, messages, without_system, with_system in NORMALIZE_CASES:
            original = copy.deepcopy(messages)
            got = fn(messages, tok)
            expected = with_system if system_ok else without_system
            if messages != original:
                _fail(f"_normalize_messages changed its input list for {description}; build new dicts instead.",
                      section)
            if got != expected:
                hint = ""
                if not system_ok and got and got[0].get("role") == "system":
                    hint = " This template has no system role: merge the system prompt into the first user turn."
                elif description.startswith("an empty") or description.startswith("a whitespace"):
                    hint = " An empty system prompt must add nothing: no system message and no leading blank line."
                elif description == "a multi-turn conversation":
                    hint = " Merge into the first user turn only."
                _fail(f"For {description} with {tok_name}:\n  expected {expected}\n  got      {got}.{hint}", section)
    _passed("test_normalize_messages")


FORMAT_CASES = [
    ("a system prompt", [_m("system", "You are a bard."), _m("user", "What is law?"),
                         _m("assistant", "Law is the song of kings.")]),
    ("an empty system prompt", [_m("system", ""), _m("user", "What is law?"), _m("assistant", "Law is a set of rules.")]),
    ("no system message", [_m("user", "Name a colour."), _m("assistant", "Blue.")]),
    ("a multi-turn conversation whose two answers are the same",
     [_m("system", "You are a ghost."), _m("user", "Who are you?"), _m("assistant", "A whisper."),
      _m("user", "Who are you, really?"), _m("assistant", "A whisper.")]),
]


def _expected_start(full_prompt: str, tokenizer, messages) -> tuple[list[int], int]:
    """Token ids of ``full_prompt`` and the first token whose text overlaps the last response's content."""
    from utils.conversation import merge_system_prompt, supports_system_role

    normalized = merge_system_prompt(messages, supports_system_role(tokenizer))
    prefix = tokenizer.apply_chat_template(normalized[:-1], tokenize=False, add_generation_prompt=True)
    content = messages[-1]["content"].strip()
    c_start = full_prompt.find(content, len(prefix))
    enc = tokenizer(full_prompt, add_special_tokens=False, return_offsets_mapping=True)
    start = next(i for i, (_, e) in enumerate(enc["offset_mapping"]) if e > c_start)
    return enc["input_ids"], start


def test_format_messages_response_index(fn, tokenizer=None) -> None:
    from utils.conversation import merge_system_prompt, supports_system_role

    section = "Section 3, Exercise 3"
    for tok_name, tok in _tokenizers_to_check(tokenizer):
        for description, messages in FORMAT_CASES:
            got = fn(copy.deepcopy(messages), tok)
            if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], str) and isinstance(got[1], int)):
                _fail(f"Return (full_prompt: str, response_start_idx: int); got {_short(got)}.", section)
            full_prompt, start = got
            expected_prompt = tok.apply_chat_template(merge_system_prompt(messages, supports_system_role(tok)),
                                                      tokenize=False)
            if full_prompt != expected_prompt:
                _fail(f"For {description} with {tok_name}, full_prompt is not the chat template of the normalised "
                      f"messages (use _normalize_messages, then apply_chat_template(..., tokenize=False)).\n"
                      f"  expected {_short(expected_prompt)}\n  got      {_short(full_prompt)}", section)
            ids, expected = _expected_start(full_prompt, tok, messages)
            bos = tok.bos_token_id
            if bos is not None and ids.count(bos) > 1:
                _fail(f"full_prompt holds {ids.count(bos)} BOS tokens; the template adds one.", section)
            if start != expected:
                tokens = tok.convert_ids_to_tokens(ids)
                around = " ".join(("[" + t + "]" if i == expected else t) for i, t in
                                  enumerate(tokens[max(0, expected - 4):expected + 3], start=max(0, expected - 4)))
                diff = start - expected
                if diff == 1 and bos is not None:
                    hint = ("Your index is 1 too large: the prefix was probably tokenised with special tokens, which "
                            "adds a second BOS. Use add_special_tokens=False on templated text.")
                elif diff == -1:
                    hint = ("Your index is 1 too small: it points at the newline after the turn marker. Count the "
                            "prefix rendered with add_generation_prompt=True.")
                elif "multi-turn" in description and start < expected:
                    hint = "You found the first assistant turn; the response is the last one."
                elif start == 0:
                    hint = "Index 0 is the start of the prompt, not of the response."
                else:
                    hint = f"Your index is off by {diff} tokens."
                _fail(f"For {description} with {tok_name}: response_start_idx should be {expected}, got {start}. "
                      f"{hint}\n  tokens around the response start (expected one in brackets): {around}", section)
    _passed("test_format_messages_response_index")


# --------------------------------------------------------------------------------------------------
# Exercise 4: extraction
# --------------------------------------------------------------------------------------------------

def _check_activation_tensor(got, n: int, d_model: int, section: str, name: str) -> None:
    if not isinstance(got, torch.Tensor):
        _fail(f"{name} should return a torch.Tensor, got {type(got).__name__}.", section)
    if tuple(got.shape) != (n, d_model):
        hint = " Did you take the mean over the wrong dimension?" if d_model in got.shape else ""
        _fail(f"{name} returned shape {tuple(got.shape)}; expected [n_conversations, d_model] = {(n, d_model)}.{hint}",
              section)
    if got.dtype != torch.float32:
        _fail(f"{name} returned dtype {got.dtype}; accumulate and return float32 (bf16 sums lose precision).", section)
    if got.device.type != "cpu":
        _fail(f"{name} returned a tensor on {got.device}; move it to the CPU with .cpu().", section)
    if got.requires_grad:
        _fail(f"{name} returned a tensor that requires grad; use torch.inference_mode() or .detach().", section)
    if not torch.isfinite(got).all():
        _fail(f"{name} returned NaN or inf values (an empty mask divides by zero).", section)


EXTRACTION_DIAGNOSES = [  # fixture name, the likely mistake
    ("extract_wrong_layer", "you read hidden_states[layer], the input to the block; layer i means the output of "
                            "model.model.layers[i] = hidden_states[i + 1]"),
    ("extract_with_end_of_turn", "your mean includes the end-of-turn tokens; the paper averages over the response's "
                                 "content tokens only (stop at len(ids) - turn_suffix_len(tokenizer))"),
    ("extract_with_prompt", "your mean includes the prompt tokens; start the mask at response_start_idx"),
    ("extract_from_marker", "your span starts one token early (at the newline after the turn marker)"),
    ("extract_final_norm_layer", "you read the last hidden state, which has the final norm applied"),
]


def _diagnose(got: torch.Tensor, expected: torch.Tensor, layer: int) -> str:
    for name, meaning in EXTRACTION_DIAGNOSES:
        candidate = fixture(name)
        if candidate.shape == got.shape and torch.allclose(got, candidate, atol=ATOL, rtol=ATOL):
            return meaning
    err = (got - expected).abs().amax(dim=1)
    worst = int(err.argmax())
    return f"the largest error is in conversation {worst} (max |diff| {float(err[worst]):.3g})"


def _compare_extraction(got, expected, section, name) -> None:
    if not torch.allclose(got, expected, atol=ATOL, rtol=ATOL):
        _fail(f"{name} on tiny-gemma2 (layer {EXTRACTION_LAYER}) does not match the expected means: "
              f"{_diagnose(got, expected, EXTRACTION_LAYER)}.\n  expected {_short(expected[0])}\n  got      "
              f"{_short(got[0])}", section)


def _learner_model_smoke(fn, model, tokenizer, d_model, num_layers, section, name, **kwargs) -> None:
    if model is None:
        return
    convs = EXTRACTION_CONVERSATIONS[1:3]
    got = fn(model, tokenizer, convs, min(num_layers - 1, max(0, num_layers // 2)), **kwargs)
    _check_activation_tensor(got, len(convs), d_model, section, f"{name} on your model")


def test_extract_response_activations(fn, model=None, tokenizer=None, d_model=None, num_layers=None) -> None:
    section = "Section 4, Exercise 4a"
    tiny, tiny_tok = tiny_gemma2()
    expected = fixture("extract_expected")
    got = fn(tiny, tiny_tok, copy.deepcopy(EXTRACTION_CONVERSATIONS), EXTRACTION_LAYER)
    _check_activation_tensor(got, len(EXTRACTION_CONVERSATIONS), tiny.config.hidden_size, section,
                             "extract_response_activations")
    _compare_extraction(got, expected, section, "extract_response_activations")
    _learner_model_smoke(fn, model, tokenizer, d_model, num_layers, section, "extract_response_activations")
    _passed("test_extract_response_activations")


def test_extract_response_activations_batched(fn, model=None, tokenizer=None, d_model=None, num_layers=None) -> None:
    section = "Section 4, Exercise 4b"
    tiny, tiny_tok = tiny_gemma2()
    expected = fixture("extract_expected")
    results = {}
    for side in ("right", "left"):
        tok = _with_padding_side(tiny_tok, side)
        got = fn(tiny, tok, copy.deepcopy(EXTRACTION_CONVERSATIONS), EXTRACTION_LAYER, batch_size=3)
        _check_activation_tensor(got, len(EXTRACTION_CONVERSATIONS), tiny.config.hidden_size, section,
                                 f"extract_response_activations_batched ({side} padding)")
        results[side] = torch.allclose(got, expected, atol=ATOL, rtol=ATOL)
        if not results[side]:
            if side == "left" and results.get("right"):
                _fail("Your batched extraction is right with right padding but wrong with LEFT padding, which is "
                      "what Gemma uses: a mask built as `position >= response_start_idx` shifts under left padding. "
                      "Offset each row's span by its own padding length (or build the mask from token spans).",
                      section)
            _fail(f"With {side} padding (batch_size=3): {_diagnose(got, expected, EXTRACTION_LAYER)}. If single "
                  "sequences pass but batches fail, check that padding is masked out of the mean and that the "
                  "attention_mask is passed to the model.\n  expected "
                  f"{_short(expected[0])}\n  got      {_short(got[0])}", section)
    _learner_model_smoke(fn, model, tokenizer, d_model, num_layers, section, "extract_response_activations_batched",
                         batch_size=2)
    _passed("test_extract_response_activations_batched")


# --------------------------------------------------------------------------------------------------
# Exercise 5: persona vectors
# --------------------------------------------------------------------------------------------------

def test_extract_persona_vectors(fn, model=None, tokenizer=None, d_model=None, num_layers=None) -> None:
    section = "Section 5, Exercise 5"
    tiny, tiny_tok = tiny_gemma2()
    case = copy.deepcopy(PERSONA_CASE)
    try:
        got = fn(tiny, tiny_tok, case["personas"], case["questions"], case["responses"], case["scores"],
                 case["layer"], min_score=3, batch_size=4)
    except ValueError as exc:
        _fail(f"Every persona here has responses to keep, yet you raised ValueError: {exc}. Responses whose key is "
              "not in `scores` (the unjudged defaults) must be kept.", section)
    if not isinstance(got, dict) or set(got) != set(case["personas"]):
        _fail(f"Return a dict with one vector per persona, keys {sorted(case['personas'])}; got "
              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.", section)
    for persona, vec in got.items():
        if not isinstance(vec, torch.Tensor) or tuple(vec.shape) != (tiny.config.hidden_size,):
            _fail(f"The vector for {persona!r} should have shape [d_model] = [{tiny.config.hidden_size}]; got "
                  f"{_short(vec)}.", section)
        if vec.dtype != torch.float32 or not torch.isfinite(vec).all():
            _fail(f"The vector for {persona!r} should be finite float32; got {_short(vec)}.", section)
        expected = fixture(f"persona_{persona}")
        if not torch.allclose(vec, expected, atol=ATOL, rtol=ATOL):
            hint = "check which responses you kept"
            for variant, meaning in (("nofilter", "you ignored the judge scores (every response was kept)"),
                                     ("inverted", "your filter is inverted: keep responses with score >= min_score")):
                candidate = fixture(f"persona_{persona}_{variant}")
                if torch.allclose(vec, candidate, atol=ATOL, rtol=ATOL):
                    hint = meaning
                    break
            _fail(f"The vector for {persona!r} is wrong: {hint}. (bard keeps questions 0 and 2; ghost keeps 0 and 1; "
                  f"default_empty is unjudged and keeps all 3.)\n  expected {_short(expected)}\n  got      "
                  f"{_short(vec)}", section)
    # A persona with nothing left must raise, naming it.
    scores = dict(case["scores"])
    scores.update({("ghost", q): 1 for q in range(3)})
    try:
        fn(tiny, tiny_tok, case["personas"], case["questions"], case["responses"], scores, case["layer"], min_score=3)
    except ValueError as exc:
        if "ghost" not in str(exc):
            _fail(f"The error for a persona with no responses left should name it ('ghost'); it says: {exc}", section)
    else:
        _fail("When every response of 'ghost' scores below min_score, raise a ValueError that names 'ghost' instead of "
              "returning a NaN vector (the mean of nothing).", section)
    _passed("test_extract_persona_vectors")


# --------------------------------------------------------------------------------------------------
# Exercise 6: geometry
# --------------------------------------------------------------------------------------------------

def _geometry_inputs() -> torch.Tensor:
    return fixture("geometry_vectors")  # [8, 32] with a large shared mean, like real persona vectors


def _check_square(got, n: int, section: str, name: str) -> None:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (n, n):
        _fail(f"{name} should return a [{n}, {n}] tensor; got {_short(got)}.", section)
    if got.dtype != torch.float32:
        _fail(f"{name} returned {got.dtype}; compute in float32.", section)


def test_compute_cosine_similarity_matrix(fn) -> None:
    section = "Section 6, Exercise 6a"
    v = _geometry_inputs()
    got = fn(v.clone())
    _check_square(got, len(v), section, "compute_cosine_similarity_matrix")
    scaled = v * torch.arange(1, len(v) + 1, dtype=torch.float32)[:, None]
    if not torch.allclose(fn(scaled), got, atol=ATOL):
        _fail("Cosine similarity does not depend on a vector's length, but yours changed when rows were scaled: "
              "divide each row by its norm (you may be computing dot products).", section)
    if not torch.allclose(got, got.T, atol=ATOL) or not torch.allclose(torch.diagonal(got), torch.ones(len(v)), atol=ATOL):
        _fail("A cosine-similarity matrix is symmetric with ones on the diagonal; yours is not. Normalise rows "
              f"(dim=1), not columns.\n  diagonal: {_short(torch.diagonal(got))}", section)
    expected = fixture("cosine_raw")
    if not torch.allclose(got, expected, atol=ATOL):
        if torch.allclose(got, fixture("cosine_centered"), atol=ATOL):
            _fail("This is the centred similarity; compute_cosine_similarity_matrix should not centre.", section)
        _fail(f"Wrong values.\n  expected {_short(expected[0])}\n  got      {_short(got[0])}", section)
    half = fn(v.to(torch.bfloat16))
    if half.dtype != torch.float32:
        _fail(f"Given bf16 vectors you returned {half.dtype}; cast to float32 before computing.", section)
    _passed("test_compute_cosine_similarity_matrix")


def test_compute_cosine_similarity_matrix_centered(fn) -> None:
    section = "Section 6, Exercise 6a"
    v = _geometry_inputs()
    got = fn(v.clone())
    _check_square(got, len(v), section, "compute_cosine_similarity_matrix_centered")
    expected = fixture("cosine_centered")
    if torch.allclose(got, fixture("cosine_raw"), atol=ATOL):
        _fail("These are the raw cosines: subtract the mean vector (the mean over personas, dim=0) first.", section)
    if torch.allclose(got, fixture("cosine_centered_wrong_dim"), atol=ATOL):
        _fail("You centred each vector on its own mean (dim=1). Subtract the mean over personas (dim=0): the "
              "shared component is a direction in d_model space.", section)
    shifted = fn(v + 100.0 * torch.linspace(-1, 1, v.shape[1]))
    if not torch.allclose(shifted, got, atol=1e-3):
        _fail("Adding the same vector to every persona changed your centred similarities; centring should remove it.",
              section)
    if not torch.allclose(got, expected, atol=ATOL):
        _fail(f"Wrong values (check the normalisation).\n  expected {_short(expected[0])}\n  got      {_short(got[0])}",
              section)
    _passed("test_compute_cosine_similarity_matrix_centered")


def test_pca_decompose_persona_vectors(fn) -> None:
    section = "Section 6, Exercise 6b"
    v = _geometry_inputs()
    n, d = v.shape
    k = 3
    got = fn(v.clone(), n_components=k)
    if not (isinstance(got, tuple) and len(got) == 3):
        _fail(f"Return (projections, explained_variance_ratio, components); got {_short(got)}.", section)
    proj, ratio, comps = (torch.as_tensor(x) for x in got)
    if tuple(proj.shape) != (n, k) or tuple(ratio.shape) != (k,) or tuple(comps.shape) != (k, d):
        _fail(f"Shapes should be projections [{n}, {k}], explained_variance_ratio [{k}], components [{k}, {d}]; got "
              f"{tuple(proj.shape)}, {tuple(ratio.shape)}, {tuple(comps.shape)}. Did you respect n_components?", section)
    proj, ratio, comps = proj.float(), ratio.float(), comps.float()
    expected_ratio = fixture("pca_ratio")[:k]
    if torch.allclose(ratio, fixture("pca_ratio_uncentred")[:k], atol=1e-3):
        _fail("Your PCA is on uncentred vectors: the first component is just the shared mean. Subtract the mean over "
              "personas first.", section)
    if not torch.allclose(ratio, expected_ratio, atol=1e-3):
        _fail(f"explained_variance_ratio should be the fraction of the TOTAL variance (all components) explained by "
              f"each, in descending order.\n  expected {_short(expected_ratio)}\n  got      {_short(ratio)}", section)
    gram = comps @ comps.T
    if not torch.allclose(gram, torch.eye(k), atol=1e-3):
        _fail("The components should be orthonormal rows (unit norm, mutually orthogonal).", section)
    expected_comps = fixture("pca_components")[:k]
    alignment = (comps @ expected_comps.T).diagonal().abs()
    if not torch.all(alignment > 0.999):
        _fail(f"The components point in the wrong directions (|cos| with the expected ones: {_short(alignment)}). "
              "Each principal direction is a row of Vh (a column of V), in d_model space.", section)
    signs = torch.sign((comps * expected_comps).sum(dim=1))  # a component's sign is arbitrary
    if not torch.allclose(proj * signs, fixture("pca_projections")[:, :k], atol=1e-3):
        _fail("projections should be the centred vectors' coordinates on the components: (v - mean) @ components.T.",
              section)
    _passed("test_pca_decompose_persona_vectors")


def test_compute_assistant_axis(fn) -> None:
    section = "Section 6, Exercise 6c"
    v = _geometry_inputs()
    defaults, roles = v[:3], v[3:]
    got = fn(defaults.clone(), roles.clone())
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (v.shape[1],):
        _fail(f"The axis should be a [d_model] = [{v.shape[1]}] tensor; got {_short(got)}.", section)
    if got.dtype != torch.float32:
        _fail(f"Return float32; got {got.dtype}.", section)
    if abs(float(got.norm()) - 1) > 1e-4:
        _fail(f"The axis should have unit norm; yours has norm {float(got.norm()):.4f}. Divide by its norm.", section)
    expected = fixture("axis")
    cos = float(got @ expected)
    if cos < -0.999:
        _fail("Your axis points the wrong way: it should be mean(defaults) - mean(roles), pointing toward the "
              "default assistant.", section)
    if cos < 0.999:
        _fail(f"Your axis has cosine {cos:.3f} with mean(defaults) - mean(roles). Take each group's mean over its "
              "rows (dim=0), then subtract.", section)
    _passed("test_compute_assistant_axis")


def test_characterize_axis(fn) -> None:
    section = "Section 6, Exercise 6c"
    v = _geometry_inputs()
    centred = v - v.mean(dim=0)
    axis = fixture("axis")
    names = [f"p{i}" for i in range(len(v))]
    vectors = {n: centred[i].clone() for i, n in enumerate(names)}
    got = fn(axis.clone(), vectors)
    if not isinstance(got, list) or not all(isinstance(x, tuple) and len(x) == 2 for x in got):
        _fail(f"Return a list of (name, cosine) tuples; got {_short(got)}.", section)
    if sorted(n for n, _ in got) != sorted(names):
        _fail(f"Return one entry per vector; got names {[n for n, _ in got]}.", section)
    values = [float(c) for _, c in got]
    if values != sorted(values, reverse=True):
        _fail(f"Sort from the highest cosine to the lowest; your values are {[round(x, 3) for x in values]}.", section)
    expected = dict(zip(json.loads(json.dumps(_json_fixtures()["characterize_names"])),
                        fixture("characterize_cosines").tolist()))
    got_map = {n: float(c) for n, c in got}
    if any(abs(got_map[n] - expected[n]) > 1e-3 for n in names):
        scaled = dict(vectors)
        scaled["p0"] = vectors["p0"] * 10
        again = {n: float(c) for n, c in fn(axis.clone(), scaled)}
        if abs(again["p0"] - got_map["p0"]) > 1e-3:
            _fail("Your values change when a vector is scaled: use cosine similarity (divide by both norms), "
                  "not dot products.", section)
        worst = max(names, key=lambda n: abs(got_map[n] - expected[n]))
        _fail(f"Wrong cosine for {worst}: expected {expected[worst]:.4f}, got {got_map[worst]:.4f}.", section)
    _passed("test_characterize_axis")


# --------------------------------------------------------------------------------------------------
# Exercises 7 and 8: traits and AUC
# --------------------------------------------------------------------------------------------------

def test_compute_trait_vector(fn) -> None:
    section = "Section 7, Exercise 7"
    v = _geometry_inputs()
    pos, neg = v[:5], v[5:]
    got = fn(pos.clone(), neg.clone())
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (v.shape[1],):
        _fail(f"Return a [d_model] = [{v.shape[1]}] tensor; got {_short(got)}.", section)
    expected = fixture("trait_vector")
    if torch.allclose(got, -expected, atol=ATOL):
        _fail("Your trait vector points the wrong way: it is mean(pos) - mean(neg).", section)
    if not torch.allclose(got, expected, atol=ATOL):
        _fail(f"Expected mean(pos) - mean(neg) (means over rows, dim=0).\n  expected {_short(expected)}\n  got      "
              f"{_short(got)}", section)
    half = fn(pos.to(torch.bfloat16), neg.to(torch.bfloat16))
    if half.dtype != torch.float32:
        _fail(f"Given bf16 activations you returned {half.dtype}; compute in float32.", section)
    _passed("test_compute_trait_vector")


AUC_CASES = [  # scores, positive labels, AUC
    ([3.0, 2.0, 1.0, 0.0], [True, True, False, False], 1.0),
    ([0.0, 1.0, 2.0, 3.0], [True, True, False, False], 0.0),
    ([1.0, 1.0, 1.0, 1.0], [True, False, True, False], 0.5),
    ([0.9, 0.4, 0.6, 0.1, 0.3], [True, True, False, False, False], 5 / 6),
    ([2.0, 1.0, 1.0, 0.0], [True, True, False, False], 0.875),
]


def test_axis_auc(fn) -> None:
    section = "Section 8, Exercise 8"
    for scores, labels, expected in AUC_CASES:
        got = fn(torch.tensor(scores), torch.tensor(labels))
        if not isinstance(got, float) or abs(got - expected) > 1e-6:
            hint = " Ties count one half." if expected == 0.5 or expected == 0.875 else ""
            if isinstance(got, float) and abs(got - (1 - expected)) < 1e-6 and expected != 0.5:
                hint = " You have the classes swapped: positives should score higher for AUC 1."
            _fail(f"axis_auc({scores}, {labels}) should be the float {expected:.4f}; got {_short(got)}.{hint}", section)
    try:
        got = fn(torch.tensor([1.0, 2.0]), torch.tensor([True, True]))
    except ValueError:
        pass
    else:
        _fail(f"With no negative examples AUC is undefined: raise ValueError (you returned {got!r}).", section)
    _passed("test_axis_auc")


# --------------------------------------------------------------------------------------------------
# Hidden checks: called only inside nbgrader's hidden-test blocks, so learners' releases never run them.
# They hold no solution either; they widen the cases of the visible checks.
# --------------------------------------------------------------------------------------------------

def hidden_test_judge_with_every_paper_prompt(fn) -> None:
    """The judge must fill every one of the paper's 275 per-role judge prompts correctly."""
    from utils.data import load_roles

    for name, role in load_roles().items():
        client = FakeJudgeClient("3")
        got = fn("Q?", "A.", name, client, "judge-model", eval_prompt=role.judge_prompt)
        sent = client.calls[0]["messages"][-1]["content"]
        if got != 3 or sent != role.judge_prompt.format(question="Q?", answer="A."):
            _fail(f"The paper's judge prompt for {name!r} was not filled or parsed correctly.")
    _passed("hidden_test_judge_with_every_paper_prompt")


def hidden_test_extract_batch_sizes(fn) -> None:
    """Batched extraction must not depend on the batch size or the padding side."""
    tiny, tiny_tok = tiny_gemma2()
    expected = fixture("extract_expected")
    for side in ("left", "right"):
        for batch_size in (1, 2, 5, 8):
            got = fn(tiny, _with_padding_side(tiny_tok, side), copy.deepcopy(EXTRACTION_CONVERSATIONS),
                     EXTRACTION_LAYER, batch_size=batch_size)
            if not torch.allclose(got, expected, atol=ATOL, rtol=ATOL):
                _fail(f"Batched extraction is wrong with batch_size={batch_size} and {side} padding.")
    _passed("hidden_test_extract_batch_sizes")
