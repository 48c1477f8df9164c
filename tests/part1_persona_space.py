"""Checks for Part 1, "Mapping persona space". Each notebook exercise is followed by a call to one of these.

How the checks work:

- They run offline, deterministically and in seconds. Anything that needs a model uses ``tiny-gemma2``
  (a 2 MB random Gemma 2 built on first use) so the numbers are exact, plus quick property checks on
  the model you loaded.
- They contain no reference solution. Expected values come from fixtures in ``tests/fixtures/`` (made
  from the reference solution by ``make fixtures`` and kept current by the test suite), from literal
  cases written out here, and from properties every correct answer has.
- A failing check raises :class:`CheckFailure` (an ``AssertionError``) whose message names the likely
  mistake, shows expected against actual, and points to the notebook section that explains it. It shows
  as that message in the notebook, not as a traceback through this file (``tests/checking.py``).
- Each check grades its own exercise: where an exercise calls an earlier one, the check swaps in the
  course's reference for the earlier one while it runs, and a learner's function that hangs fails its
  check within ``COURSE_CHECK_TIMEOUT`` seconds.
"""

from __future__ import annotations

import copy
import json
import threading
import time
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


from tests.checking import (CheckFailure, Promises, call as _call, check, clip as _clip,  # noqa: E402,F401
                            fail as _fail, limited, load_tensor_fixtures as _load_tensor_fixtures,
                            passed as _passed, short as _short)


# --------------------------------------------------------------------------------------------------
# Promises: each check runs in stages, and each stage tests one promise of its exercise
# --------------------------------------------------------------------------------------------------

PROMISES = Promises()
_stage = PROMISES.stage


# --------------------------------------------------------------------------------------------------
# The course's references for earlier exercises (its utils machinery), swapped in by checks of later ones
# --------------------------------------------------------------------------------------------------

def _reference_generate_response_api(client, model_name, system_prompt, question, max_tokens=128, temperature=0.7,
                                     top_p=0.9):
    from utils.conversation import merge_system_prompt

    messages = merge_system_prompt([{"role": "system", "content": system_prompt}, {"role": "user", "content": question}],
                                   system_supported="gemma" not in model_name.lower())
    completion = client.chat.completions.create(model=model_name, messages=messages, max_tokens=max_tokens,
                                                temperature=temperature, top_p=top_p)
    text = (completion.choices[0].message.content or "").strip()
    if not text:
        raise ValueError(f"{model_name} returned an empty response.")
    return text


def _reference_normalize_messages(messages, tokenizer):
    from utils.conversation import normalize_messages

    return normalize_messages(messages, tokenizer)


def _reference_format_messages(messages, tokenizer):
    from utils.conversation import format_messages

    return format_messages(messages, tokenizer)


def _reference_batched(model, tokenizer, conversations, layer, batch_size=8):
    from utils.activations import extract_mean_activations

    return extract_mean_activations(model, tokenizer, conversations, layer, batch_size=batch_size, progress=False)


def _reference_single(model, tokenizer, conversations, layer):
    from utils.activations import extract_mean_activations

    return extract_mean_activations(model, tokenizer, conversations, layer, batch_size=1, progress=False)


# --------------------------------------------------------------------------------------------------
# Fixtures and the tiny model
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _tensor_fixtures() -> dict[str, torch.Tensor]:
    return _load_tensor_fixtures(FIXTURES / "part1_persona_space.safetensors")


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


@lru_cache(maxsize=1)
def tiny_untrimmed_tokenizer():
    """tiny-gemma2's tokenizer with Gemma's template minus its ``| trim``: no system role, and whitespace at the
    start of a turn is kept (so a stray blank line shows)."""
    from utils.tiny_gemma2 import GEMMA2_CHAT_TEMPLATE

    tok = copy.deepcopy(tiny_gemma2()[1])
    tok.chat_template = GEMMA2_CHAT_TEMPLATE.replace("message['content'] | trim", "message['content']")
    assert tok.chat_template != GEMMA2_CHAT_TEMPLATE, "Gemma's template changed: update tiny_untrimmed_tokenizer"
    return tok


def _with_padding_side(tokenizer, side: str):
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = side
    return tok


def _tokenizers_to_check(learner_tokenizer) -> list[tuple[str, object]]:
    out = [("tiny-gemma2 (Gemma 2 template)", tiny_gemma2()[1]),
           ("a Gemma-style template without a system role that keeps whitespace", tiny_untrimmed_tokenizer()),
           ("a ChatML template with a system role", tiny_chatml_tokenizer())]
    if learner_tokenizer is not None and learner_tokenizer.chat_template not in [t.chat_template for _, t in out]:
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
    - With ``delay``, each call takes that long, and ``most_in_flight`` counts the most calls running at once.
    """

    def __init__(self, reply=ECHO, barrier: bool = False, timeout: float = 3.0, delay: float = 0.0):
        self.reply, self.calls, self.serial = reply, [], False
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(2, timeout=timeout) if barrier else None
        self._barrier_calls = 0
        self.delay, self.in_flight, self.most_in_flight = delay, 0, 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **kwargs):
        with self._lock:
            self.calls.append(kwargs)
            use_barrier = self._barrier is not None and self._barrier_calls < 2
            self._barrier_calls += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if use_barrier:
                try:
                    self._barrier.wait()
                except threading.BrokenBarrierError:
                    self.serial = True
            if self.delay:
                time.sleep(self.delay)
            return self._answer(kwargs)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, kwargs):
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

@check("Exercise 1 (the judge template)")
@PROMISES("a str with the slots {character}, {question} and {response}",
          "asks for the score as <score>N</score>",
          "describes the 0-3 scale")
def test_judge_prompt_template(template: str) -> None:
    import string

    section = "Section 1, Exercise 1"
    _stage("a str with the slots {character}, {question} and {response}")
    if not isinstance(template, str):
        _fail(f"JUDGE_PROMPT_TEMPLATE should be a str, got {type(template).__name__}.", section)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        fields = None
        parse_error = exc
    if fields is not None:
        missing = [f"{{{p}}}" for p in ("character", "question", "response") if p not in fields]
        if missing:
            hint = ""
            if "answer" in fields and "{response}" in missing:
                hint = (" You wrote {answer}: that is the slot name of the paper's per-role prompts (eval_prompt); "
                        "this template's slot is {response}.")
            elif any(f"{{{{{p[1:-1]}}}}}" in template for p in missing):
                hint = (" A placeholder written with doubled braces, like {{response}}, is literal text, not a slot: "
                        "use single braces.")
            _fail(f"JUDGE_PROMPT_TEMPLATE is missing the placeholder(s) {missing}; the judge would never see them.{hint}",
                  section)
    try:
        prompt = template.format(character="bard", question="Q-TEXT", response="R-TEXT")
    except (KeyError, IndexError, ValueError) as exc:
        _fail(f"JUDGE_PROMPT_TEMPLATE.format(character=..., question=..., response=...) failed with "
              f"{type(exc).__name__}: {exc}. Use only those three placeholders, and write literal braces as "
              "{{ and }}.", section, exc)
    if fields is None:  # pragma: no cover - format() above fails first on a malformed template
        _fail(f"JUDGE_PROMPT_TEMPLATE is not a valid format string: {parse_error}.", section)
    _stage("asks for the score as <score>N</score>")
    if "<score>" not in prompt:
        _fail("Ask the judge to answer in the form <score>N</score>: the parser relies on that tag.", section)
    _stage("describes the 0-3 scale")
    if not all(str(n) in prompt for n in range(4)):
        _fail("Describe the 0-3 scale in the prompt: each of 0, 1, 2 and 3 should appear with its meaning.", section)
    _passed("test_judge_prompt_template")


_JUDGE_TAG = "returns the int inside <score>N</score>, wherever it is in the reply"
_JUDGE_DIGIT = "a reply that is exactly one digit is a score"
_JUDGE_NONE = "a reply without exactly one score raises JudgeParseError (a ValueError), never 0"
_JUDGE_RANGE = "a score outside 0..3 raises JudgeParseError"
_JUDGE_CALL = "one call, with model=judge_model and the prompt as a user message"
_JUDGE_TEMPLATE = "without eval_prompt, sends JUDGE_PROMPT_TEMPLATE filled in"
_JUDGE_EVAL = "with eval_prompt, sends eval_prompt.format(question=..., answer=...)"

JUDGE_CASES = [  # (reply, expected score or None for "must raise", what a wrong answer means, the promise)
    ("<score>3</score>", 3, "read the number inside <score>...</score>", _JUDGE_TAG),
    ("<score>0</score>", 0, "0 is a valid score: do not treat it as missing", _JUDGE_TAG),
    ("The response mentions 2 roles and 1 name. <score>1</score>", 1,
     "you parsed the first digit in the reply, not the one inside <score>...</score>", _JUDGE_TAG),
    ("I think this is clearly in role.\n<score>2</score>\nThanks!", 2,
     "text around the tag is allowed: search for the tag, do not require the whole reply to be it", _JUDGE_TAG),
    ("3", 3, "a reply that is exactly one digit is valid (the paper's prompts ask for just the number)", _JUDGE_DIGIT),
    ("<score>7</score>", None, "7 is outside the 0-3 scale: raise instead of returning it", _JUDGE_RANGE),
    ("<score>4</score>", None, "4 is outside the 0-3 scale (the scale stops at 3): raise instead of returning it",
     _JUDGE_RANGE),
    ("<score>-1</score>", None, "-1 is outside the 0-3 scale: raise instead of returning it", _JUDGE_RANGE),
    ("I cannot evaluate this response.", None, "a reply with no score must raise, not default to 0", _JUDGE_NONE),
    ("The score is 3, maybe 2.", None,
     "a reply with digits but no <score> tag is ambiguous: raise instead of guessing", _JUDGE_NONE),
    ("Score: 3", None, "a reply with words around a bare digit has no <score> tag and is not exactly one digit: "
                       "raise (only <score>N</score>, or a reply that is the digit alone, is a score)", _JUDGE_NONE),
    ("I would give it a 3.", None, "a bare digit inside a sentence is not a score (the sentence could as well say "
                                   "\"not a 3\"): raise", _JUDGE_NONE),
    ("", None, "an empty reply must raise", _JUDGE_NONE),
    (None, None, "an API can return None as the content (after a content filter, say): it holds no score, so raise "
                 "JudgeParseError (treat None like an empty reply)", _JUDGE_NONE),
]


@check("Exercise 1 (judge_role_response)")
@PROMISES(_JUDGE_TAG, _JUDGE_DIGIT, _JUDGE_NONE, _JUDGE_RANGE, _JUDGE_CALL, _JUDGE_TEMPLATE, _JUDGE_EVAL)
def test_judge_role_response(fn) -> None:
    section = "Section 1, Exercise 1"
    for reply, expected, meaning, promise in JUDGE_CASES:
        _stage(promise)
        client = FakeJudgeClient(reply)
        try:
            got = limited(fn, section)("What is law?", "Hear ye!", "bard", client, "judge-model")
        except NotImplementedError:
            raise
        except CheckFailure:
            raise
        except ValueError as exc:
            if expected is not None:
                if reply.strip() != f"<score>{expected}</score>" and f"<score>{expected}</score>" in reply:
                    meaning = ("text around the tag is allowed: search for <score>N</score> anywhere in the reply, "
                               "do not require the whole reply to be the tag")
                    if f"<score>{expected}</score>" not in reply.strip().split("\n")[0]:
                        meaning += " (nor to be on its first line)"
                _fail(f"For the judge reply {reply!r} you raised {type(exc).__name__}, but the score is {expected}: "
                      f"{meaning}.", section, exc)
            continue
        except Exception as exc:
            if expected is not None:
                first_line = reply.strip().split("\n")[0]
                if f"<score>{expected}</score>" in reply and f"<score>{expected}</score>" not in first_line:
                    meaning = ("you read only the first line of the reply; judges often write something before "
                               "the tag, so search the whole reply for <score>N</score>")
                _fail(f"For the judge reply {reply!r} you raised {type(exc).__name__}, but the score is {expected}: "
                      f"{meaning}. (Raise JudgeParseError, a ValueError, only for a reply you cannot parse.)",
                      section, exc)
            _fail(f"For the judge reply {reply!r} you raised {type(exc).__name__}: {_clip(str(exc))}. Raise "
                  f"JudgeParseError (a ValueError) for a reply you cannot parse, and return the score otherwise "
                  f"({meaning}).", section, exc)
        if expected is None:
            if got == 0 and "0" not in (reply or ""):
                meaning = (f"{meaning}. You returned 0 for a reply with no valid score: a reply you cannot parse must "
                           "raise JudgeParseError, not default to 0")
            _fail(f"For the judge reply {reply!r} you returned {got!r}; expected an error: {meaning}.", section)
        if not isinstance(got, int) or isinstance(got, bool) or got != expected:
            _fail(f"For the judge reply {reply!r} you returned {got!r} ({type(got).__name__}); expected the int "
                  f"{expected}: {meaning}.", section)
    # The request: one call, to judge_model, with the filled template as the user's message.
    _stage(_JUDGE_CALL)
    client = FakeJudgeClient("<score>2</score>")
    _call("judge_role_response", section, "", fn, "What is law?", "Hear ye!", "bard", client, "judge-model")
    if len(client.calls) != 1:
        _fail(f"judge_role_response made {len(client.calls)} API calls for one judgement; expected 1.", section)
    call = client.calls[0]
    if call.get("model") != "judge-model":
        _fail(f"Pass judge_model as model=...; the client was called with model={call.get('model')!r}.", section)
    messages = call.get("messages")
    users = [m.get("content") for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        roles = [m.get("role") for m in messages or [] if isinstance(m, dict)]
        _fail(f"Send the judge prompt as a user message, messages=[{{'role': 'user', 'content': prompt}}]; the "
              f"messages you sent have the roles {roles} (a chat model answers the user; a system message alone is "
              "not a request).", section)
    prompt = users[-1]
    _stage(_JUDGE_TEMPLATE)
    template = getattr(fn, "__globals__", {}).get("JUDGE_PROMPT_TEMPLATE")
    filled = None
    if isinstance(template, str):
        try:
            filled = template.format(character="bard", question="What is law?", response="Hear ye!")
        except (KeyError, IndexError, ValueError):  # a broken template fails its own check
            filled = None
    if filled is not None and filled not in prompt:
        _fail("Without eval_prompt, send JUDGE_PROMPT_TEMPLATE.format(character=..., question=..., response=...): "
              f"the prompt you sent is not your JUDGE_PROMPT_TEMPLATE filled in.\n  expected {_short(filled)}\n  "
              f"sent     {_short(prompt)}", section)
    for needle, what in (("What is law?", "question"), ("Hear ye!", "response"), ("bard", "character")):
        if needle not in prompt:
            _fail(f"The prompt sent to the judge does not contain the {what} ({needle!r}); fill every placeholder "
                  f"of JUDGE_PROMPT_TEMPLATE. Prompt sent: {_short(prompt)}", section)
    _stage(_JUDGE_EVAL)
    paper_prompt = "Role: **ghost**.\n[QUESTION START]\n{question}\n[QUESTION END]\n[ANSWER START]\n{answer}\n[ANSWER END]\nJust the number."
    client = FakeJudgeClient("2")
    got = _call("With eval_prompt given (one of the paper's per-role prompts), judge_role_response", section,
                "Fill it with eval_prompt.format(question=..., answer=...): the paper's slots are {question} and "
                "{answer}.", fn, "Who are you?", "Boo.", "ghost", client, "judge-model", eval_prompt=paper_prompt)
    sent = [m.get("content") for m in client.calls[0]["messages"] if m.get("role") == "user"][-1:] \
        if client.calls else None
    if sent != [paper_prompt.format(question="Who are you?", answer="Boo.")]:
        _fail("With eval_prompt given, send eval_prompt.format(question=..., answer=...) as the user's message (the "
              f"paper's slots are {{question}} and {{answer}}). You sent: {_short(sent)}", section)
    if got != 2:
        _fail(f"With the paper's prompt and the reply '2' you returned {got!r}; expected 2.", section)
    _passed("test_judge_role_response")


# --------------------------------------------------------------------------------------------------
# Exercise 2: generation
# --------------------------------------------------------------------------------------------------

_GEN_SYSTEM = "a non-empty system prompt is its own system message for other models"
_GEN_MODEL = "the request names model_name"
_GEN_STRIP = "returns the reply text, stripped of surrounding whitespace"
_GEN_GEMMA = "Gemma (any capitalisation): the system prompt starts the user message, then a blank line"
_GEN_EMPTY_SYSTEM = "an empty or whitespace-only system prompt adds nothing"
_GEN_PARAMS = "max_tokens, temperature and top_p reach the request"
_GEN_EMPTY_REPLY = "an empty, whitespace-only or None reply raises EmptyResponseError (a ValueError)"
_GEN_PROPAGATE = "the client's exceptions propagate"


@check("Exercise 2a")
@PROMISES(_GEN_SYSTEM, _GEN_MODEL, _GEN_STRIP, _GEN_GEMMA, _GEN_EMPTY_SYSTEM, _GEN_PARAMS, _GEN_EMPTY_REPLY,
          _GEN_PROPAGATE)
def test_generate_response_api(fn) -> None:
    section = "Section 2, Exercise 2a"
    what = "generate_response_api"
    # A model with a system role.
    _stage(_GEN_SYSTEM)
    client = FakeChatClient(reply="  Hear me sing.  \n")
    got = _call(what, section, "", fn, client, "some/model", "You are a bard.", "What is law?", max_tokens=33,
                temperature=0.5)
    msgs = client.calls[0]["messages"] if client.calls else None
    expected = [{"role": "system", "content": "You are a bard."}, {"role": "user", "content": "What is law?"}]
    if msgs != expected:
        _fail(f"For a model with a system role, send {expected}; you sent {msgs}. "
              "(Is the system prompt being ignored?)", section)
    _stage(_GEN_MODEL)
    if client.calls[0].get("model") != "some/model":
        _fail(f"Pass model_name on as model=...: the request for 'some/model' had model="
              f"{client.calls[0].get('model')!r}.", section)
    _stage(_GEN_STRIP)
    if got != "Hear me sing.":
        _fail(f"Return the reply text stripped of surrounding whitespace: expected 'Hear me sing.', got {got!r}.",
              section)
    # Gemma: no system role, whatever the capitalisation of the model's name.
    _stage(_GEN_GEMMA)
    for model_name in ("google/gemma-2-27b-it", "Google/Gemma-2-9B-IT"):
        client = FakeChatClient(reply="ok")
        _call(what, section, "", fn, client, model_name, "You are a bard.", "What is law?")
        msgs = client.calls[0]["messages"]
        expected = [{"role": "user", "content": "You are a bard.\n\nWhat is law?"}]
        if msgs != expected:
            hint = ""
            if model_name != model_name.lower():
                hint = (" The right messages went to 'google/gemma-2-27b-it' but not to this name: detect Gemma "
                        "case-insensitively (\"gemma\" in model_name.lower()).")
            _fail(f"Gemma 2 has no system role: for model {model_name!r} send {expected}; you sent {msgs}.{hint}",
                  section)
    # Empty system prompt: nothing added, for either kind of model.
    _stage(_GEN_EMPTY_SYSTEM)
    for system_prompt in ("", "  \n"):
        for model_name in ("google/gemma-2-27b-it", "some/model"):
            client = FakeChatClient(reply="ok")
            _call(what, section, "", fn, client, model_name, system_prompt, "What is law?")
            msgs = client.calls[0]["messages"]
            if msgs != [{"role": "user", "content": "What is law?"}]:
                kind = "An empty" if not system_prompt else f"A whitespace-only ({system_prompt!r})"
                hint = " Test system_prompt.strip(), not the string itself." if system_prompt else ""
                _fail(f"{kind} system prompt should add nothing (model {model_name!r}); you sent {msgs}. A stray "
                      f"system message or a leading blank line changes the default persona's prompt.{hint}", section)
    _stage(_GEN_PARAMS)
    client = FakeChatClient(reply="ok")
    _call(what, section, "", fn, client, "some/model", "You are a bard.", "What is law?", max_tokens=33,
          temperature=0.5, top_p=0.8)
    sent = {k: client.calls[0].get(k) for k in ("max_tokens", "temperature", "top_p")}
    if sent != {"max_tokens": 33, "temperature": 0.5, "top_p": 0.8}:
        _fail("Pass max_tokens, temperature and top_p on to client.chat.completions.create: called with "
              "max_tokens=33, temperature=0.5, top_p=0.8, your request had "
              + ", ".join(f"{k}={v!r}" for k, v in sent.items()) + ".", section)
    # Empty replies are errors. (An API returns content=None, e.g. after a content filter.)
    _stage(_GEN_EMPTY_REPLY)
    for reply in ("", "   \n", None):
        client = FakeChatClient(reply=reply)
        try:
            got = limited(fn, section)(client, "some/model", "You are a bard.", "What is law?")
        except (NotImplementedError, CheckFailure):
            raise
        except ValueError:
            continue
        except Exception as exc:
            _fail(f"The client replied with content={reply!r} and you raised {type(exc).__name__}: {_clip(str(exc))}. "
                  "An API can return None as the content: treat None like an empty reply and raise "
                  "EmptyResponseError (a ValueError).", section, exc)
        _fail(f"The client replied {reply!r} and you returned {got!r}: raise EmptyResponseError (a ValueError) "
              "so the empty answer is recorded as a failure, not averaged over.", section)
    # Failures propagate.
    _stage(_GEN_PROPAGATE)
    client = FakeChatClient()
    try:
        got = limited(fn, section)(client, "some/model", "You are a bard.", "FAIL please")
    except Exception as exc:  # the client's RuntimeError, or your own error type wrapping it
        if isinstance(exc, (NotImplementedError, CheckFailure)):
            raise
    else:
        _fail(f"The client raised an error and you returned {got!r}: let the exception propagate; never turn a "
              "failed call into a string.", section)
    _passed("test_generate_response_api")


_ALL_RETURN = "returns (responses, failures), never '' for a failed call"
_ALL_KEYS = "every (persona, 0-based question index) key, exactly once"
_ALL_FAILURES = "a failed or empty call is in failures as 'ErrorType: message'"
_ALL_INPUTS = "each persona's system prompt and each question reach generate_response_api"
_ALL_KWARGS = "generation_kwargs reach generate_response_api"
_ALL_CONCURRENT = "calls run concurrently, at most max_workers at a time"


@check("Exercise 2b", uses={"generate_response_api": ("Exercise 2a", lambda: _reference_generate_response_api)})
@PROMISES(_ALL_RETURN, _ALL_KEYS, _ALL_FAILURES, _ALL_INPUTS, _ALL_KWARGS, _ALL_CONCURRENT)
def test_generate_all_responses(fn) -> None:
    section = "Section 2, Exercise 2b"
    personas = {"default_empty": "", "bard": "You are a bard.", "ghost": "You are a ghost."}
    questions = ["What is law?", "FAIL on purpose", "Describe the sea.", "EMPTY reply please"]
    _stage(_ALL_RETURN)
    client = FakeChatClient(barrier=True)
    try:
        result = limited(fn, section)(client, "some/model", personas, questions, max_workers=4, max_tokens=21)
    except (NotImplementedError, CheckFailure):
        raise
    except Exception as exc:  # which failed call escapes first varies from run to run: the message must not
        _fail("generate_all_responses raised an exception instead of returning (the error is shown above). Some "
              "calls here fail on purpose (questions 1 and 3): catch each call's exception and record it in "
              "`failures` as text; one failed call must not stop the others.", section, exc)
    if isinstance(result, dict):
        blank = sorted((k for k, v in result.items() if isinstance(v, str) and not v.strip()), key=repr)
        if blank:
            _fail(f"You returned one dict, in which the failed calls are empty strings (e.g. {blank[:2]}). A failed "
                  "call stored as \"\" is later judged or averaged over as if it were an answer: return "
                  "(responses, failures), with each failure's error as text in `failures`, never as an empty string.",
                  section)
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, dict) for r in result)):
        _fail(f"Return a tuple (responses, failures) of two dicts; got {_short(result)}.", section)
    responses, failures = result
    _stage(_ALL_KEYS)
    expected_keys = {(p, q) for p in personas for q in range(len(questions))}
    bad = sorted((k for k in list(responses) + list(failures)
                  if not (isinstance(k, tuple) and len(k) == 2 and isinstance(k[0], str) and isinstance(k[1], int))),
                 key=repr)  # sorted: completion order varies between runs, the message must not
    if bad:
        _fail("Key every result by (persona_name, question_index), e.g. ('bard', 0), in one flat dict; found keys "
              f"like {bad[:3]}.", section)
    overlap = set(responses) & set(failures)
    if overlap:
        _fail(f"These keys are both responses and failures: {sorted(overlap)[:4]}. A failed call goes in `failures` "
              "only.", section)
    extra = (set(responses) | set(failures)) - expected_keys
    missing = expected_keys - set(responses) - set(failures)
    if extra:
        hint = ""
        if all((p, q - 1) in expected_keys for p, q in extra):
            hint = " Your indices look 1-based: the question index is 0-based (enumerate(questions) starts at 0)."
        _fail(f"Unexpected keys {sorted(extra)[:4]}: the question index is its position in `questions`.{hint}", section)
    if missing:
        _fail(f"{len(missing)} of {len(expected_keys)} results were dropped, e.g. {sorted(missing)[:4]}. Every call "
              "must end up in responses or in failures.", section)
    _stage(_ALL_FAILURES)
    should_fail = {(p, q) for p in personas for q in (1, 3)}
    wrongly_ok = {k: responses[k] for k in sorted(should_fail) if k in responses}
    if wrongly_ok:
        k, v = next(iter(wrongly_ok.items()))
        _fail(f"The call for {k} failed (or returned nothing), yet responses[{k}] = {v!r}. Record failures in "
              "`failures`, never as an empty or placeholder string.", section)
    not_text = {k: failures[k] for k in sorted(failures) if not isinstance(failures[k], str) or not failures[k].strip()}
    if not_text:
        _fail(f"Record each failure's error as text, e.g. 'RuntimeError: HTTP 500'; got {_short(not_text)}.", section)
    import re

    for key, needle in ((("bard", 1), "RuntimeError: HTTP 500 from the fake server"), (("bard", 3), None)):
        text = failures[key].strip()
        if not re.fullmatch(r"[A-Za-z_][\w.]*: \S.*", text, flags=re.S) or (needle is not None and text != needle):
            want = f" (here {needle!r})" if needle else ""
            _fail(f"failures[{key}] should be the error as \"ErrorType: message\", f\"{{type(e).__name__}}: {{e}}\""
                  f"{want}, so that a failure says both which kind of error it was and what went wrong; it is "
                  f"{failures[key]!r}.", section)
    _stage(_ALL_INPUTS)
    if "system='You are a ghost.'" not in responses.get(("ghost", 0), "") and \
            "You are a ghost." not in responses.get(("ghost", 0), ""):
        _fail(f"responses[('ghost', 0)] = {responses.get(('ghost', 0))!r} does not come from the ghost's system prompt: "
              "pass each persona's system prompt to generate_response_api.", section)
    if "What is law?" not in responses.get(("bard", 0), ""):
        _fail(f"responses[('bard', 0)] = {responses.get(('bard', 0))!r} is not the answer to questions[0]: check "
              "which question each key gets.", section)
    _stage(_ALL_KWARGS)
    if any(call.get("max_tokens") != 21 for call in client.calls):
        _fail("Pass **generation_kwargs (here max_tokens=21) through to generate_response_api.", section)
    _stage(_ALL_CONCURRENT)
    if client.serial:
        _fail("The API calls ran one at a time: the first call waited 3 s for a second that never came. Submit "
              "them all to a ThreadPoolExecutor(max_workers=max_workers) before collecting results.", section)
    client = FakeChatClient(delay=0.03)
    _call("generate_all_responses with max_workers=2", section, "", fn, client, "some/model",
          {"bard": "You are a bard.", "ghost": "You are a ghost."}, ["Q0?", "Q1?", "Q2?"], max_workers=2)
    if client.most_in_flight > 2:
        _fail(f"With max_workers=2, {client.most_in_flight} calls ran at the same time: use max_workers as the size "
              "of the pool, ThreadPoolExecutor(max_workers=max_workers) (an API allows only so many requests at "
              "once).", section)
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


_NORM_EMPTY = "an empty or whitespace-only system message is dropped"
_NORM_MERGE = "without a system role, the system prompt starts the first user message, then a blank line"
_NORM_KEEP = "otherwise (a system role, or no system message) the messages are unchanged"
_NORM_COPY = "the input is not mutated, and the result is new dicts"


@check("Exercise 3 (_normalize_messages)")
@PROMISES(_NORM_EMPTY, _NORM_MERGE, _NORM_KEEP, _NORM_COPY)
def test_normalize_messages(fn, tokenizer=None) -> None:
    from utils.conversation import supports_system_role

    section = "Section 2 (Gemma's missing system role) and Section 3, Exercise 3"
    shared = None  # a case whose result shares a dict (or the list) with the input
    for tok_name, tok in _tokenizers_to_check(tokenizer):
        system_ok = supports_system_role(tok)
        for description, messages, without_system, with_system in NORMALIZE_CASES:
            system = messages[0]["content"] if messages[0]["role"] == "system" else None
            promise = (_NORM_EMPTY if system is not None and not system.strip() else
                       _NORM_MERGE if system is not None and not system_ok else _NORM_KEEP)
            _stage(promise)
            given = copy.deepcopy(messages)  # the learner's function gets its own copy of the case
            got = _call(f"_normalize_messages, for {description} with {tok_name},", section, "", fn, given, tok)
            expected = with_system if system_ok else without_system
            _stage(_NORM_COPY)
            if given != messages:
                _fail(f"_normalize_messages changed its input list for {description}; build new dicts instead.",
                      section)
            _stage(promise)
            if got != expected:
                _fail(f"For {description} with {tok_name}:\n  expected {expected}\n  got      {got}."
                      f"{_normalize_hint(description, messages, expected, got, system_ok)}", section)
            if shared is None and (got is given or any(g is m for g in got for m in given)):
                shared = description
    _stage(_NORM_COPY)
    if shared is not None:
        _fail(f"For {shared}, the list you returned shares message dicts with (or is) the input list: return new "
              "dicts ([dict(m) for m in messages], then change those), so that changing the result never changes "
              "the caller's conversation.", section)
    _passed("test_normalize_messages")


def _normalize_hint(description: str, messages, expected, got, system_ok: bool) -> str:
    if not isinstance(got, list) or not all(isinstance(m, dict) for m in got):
        return " Return a list of {'role': ..., 'content': ...} dicts."
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    got_roles = [m.get("role") for m in got]
    if not system_ok and "system" in got_roles:
        if system is not None and not system.strip():
            return " An empty system prompt must add nothing: no system message and no leading blank line."
        return " This template has no system role: merge the system prompt into the first user turn."
    if system is not None and not system.strip():
        return " An empty system prompt must add nothing: no system message and no leading blank line."
    if system_ok and got_roles[:1] != ["system"] and expected[:1] and expected[0]["role"] == "system":
        return (" This template accepts a system role: keep the system message as it is (decide by trying the "
                "template, e.g. with supports_system_role(tokenizer), not by the model's name).")
    users = [m.get("content", "") for m in got if m.get("role") == "user"]
    if system and users and not users[0].startswith(system):
        return " You dropped the system prompt: merge it into the first user turn instead."
    if system and users and users[0].startswith(system) and not users[0].startswith(system + "\n\n"):
        return " Separate the system prompt from the user's text with a blank line (\"\\n\\n\"), as in Exercise 2a."
    if system and sum(u.startswith(system) for u in users) > 1:
        return " Merge into the first user turn only."
    return ""


FORMAT_CASES = [
    ("a system prompt", [_m("system", "You are a bard."), _m("user", "What is law?"),
                         _m("assistant", "Law is the song of kings.")]),
    ("an empty system prompt", [_m("system", ""), _m("user", "What is law?"), _m("assistant", "Law is a set of rules.")]),
    ("no system message", [_m("user", "Name a colour."), _m("assistant", "Blue.")]),
    ("a reply that opens with a quotation mark (Gemma: one token holds the template's newline and the quote)",
     [_m("user", "Say something."), _m("assistant", '"Hello," said the bard.')]),
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


@check("Exercise 3 (format_messages)", uses={"_normalize_messages": ("Exercise 3 (_normalize_messages)",
                                                                    lambda: _reference_normalize_messages)})
@PROMISES("returns (full_prompt: str, response_start_idx: int)",
          "full_prompt is the chat template of the normalised messages",
          "response_start_idx is the last assistant message's first content token (one BOS)")
def test_format_messages_response_index(fn, tokenizer=None) -> None:
    from utils.conversation import merge_system_prompt, supports_system_role

    section = "Section 3, Exercise 3"
    for tok_name, tok in _tokenizers_to_check(tokenizer):
        for description, messages in FORMAT_CASES:
            hint = ""
            if not supports_system_role(tok) and messages[0]["role"] == "system":
                hint = ("This template has no system role (Gemma 2): normalise the messages with _normalize_messages "
                        "before applying the chat template.")
            _stage("full_prompt is the chat template of the normalised messages")
            got = _call(f"format_messages, for {description} with {tok_name},", section, hint, fn,
                        copy.deepcopy(messages), tok)
            _stage("returns (full_prompt: str, response_start_idx: int)")
            if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], str) and isinstance(got[1], int)
                    and not isinstance(got[1], bool)):
                _fail(f"Return (full_prompt: str, response_start_idx: int); got {_short(got)}.", section)
            full_prompt, start = got
            normalized = merge_system_prompt(messages, supports_system_role(tok))
            expected_prompt = tok.apply_chat_template(normalized, tokenize=False)
            _stage("full_prompt is the chat template of the normalised messages")
            if full_prompt != expected_prompt:
                why = ""
                if messages[0]["role"] == "system" and not messages[0]["content"].strip():
                    why = (" An empty system prompt must add nothing: no system message and no leading blank line "
                           "before the question.")
                _fail(f"For {description} with {tok_name}, full_prompt is not the chat template of the normalised "
                      f"messages (use _normalize_messages, then apply_chat_template(..., tokenize=False)).{why}\n"
                      f"  expected {_short(expected_prompt)}\n  got      {_short(full_prompt)}", section)
            _stage("response_start_idx is the last assistant message's first content token (one BOS)")
            ids, expected = _expected_start(full_prompt, tok, messages)
            bos = tok.bos_token_id
            if start != expected:
                tokens = tok.convert_ids_to_tokens(ids)
                lo, hi = max(0, min(start, expected) - 3), min(len(tokens), max(start, expected) + 3)
                marks = []
                for i in range(lo, hi):
                    t = repr(tokens[i])
                    marks.append(f"[{t}]" if i == expected else f"<{t}>" if i == start else t)
                around = " ".join(marks)
                diff = start - expected
                prefix = tok.apply_chat_template(normalized[:-1], tokenize=False, add_generation_prompt=True)
                bare = tok.apply_chat_template(normalized[:-1], tokenize=False)
                offsets = tok(full_prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                marker_start = next((i for i, (s, _) in enumerate(offsets) if s >= len(bare)), None)
                if start == len(tok(prefix, add_special_tokens=False).input_ids) and diff == 1:
                    hint = ("Your index is the number of tokens in the prefix, which is one too far here: the "
                            "template's last character and the response's first share a token. Find the "
                            "response's first character in full_prompt and take the token that covers it "
                            "(return_offsets_mapping=True).")
                elif diff == 1 and bos is not None:
                    hint = ("Your index is 1 too large: the prefix was probably tokenised with special tokens, which "
                            "adds a second BOS. Use add_special_tokens=False on templated text.")
                elif diff == -1:
                    hint = ("Your index is 1 too small: it points at the newline after the turn marker. The "
                            "response starts after the prefix rendered with add_generation_prompt=True.")
                elif start == len(prefix):
                    hint = ("Your index is the prefix's length in characters: return the index of the token that "
                            "covers the response's first character (return_offsets_mapping=True), not a character.")
                elif start == marker_start:
                    hint = ("Your index points at the assistant's turn marker: render the prefix with "
                            "add_generation_prompt=True, so that it ends with the marker and its newline.")
                elif "multi-turn" in description and start < expected:
                    hint = "You found the first assistant turn; the response is the last one."
                elif start == 0:
                    hint = "Index 0 is the start of the prompt, not of the response."
                else:
                    hint = f"Your index is off by {diff} tokens."
                _fail(f"For {description} with {tok_name}: response_start_idx should be {expected}, got {start}. "
                      f"{hint}\n  tokens around the response start ([expected], <yours>): {around}", section)
    _passed("test_format_messages_response_index")


# --------------------------------------------------------------------------------------------------
# Exercise 4: extraction
# --------------------------------------------------------------------------------------------------

EXTRACT_CALL_HINT = ("A size mismatch often means a mean or sum over the wrong dimension: average over the token "
                     "dimension (dim 1 of hidden [batch, seq, d_model]) to get one d_model vector per conversation.")
BATCHED_CHECK_SIZE = 3  # the batch size the batched check uses (its fixtures of known mistakes assume it)


def _check_activation_tensor(got, n: int, d_model: int, section: str, name: str) -> None:
    if not isinstance(got, torch.Tensor):
        _fail(f"{name} should return a torch.Tensor, got {type(got).__name__}.", section)
    if tuple(got.shape) != (n, d_model):
        hint = ""
        if got.dim() == 2 and got.shape[1] == d_model and got.shape[0] > n:
            hint = (" You returned one row per token: take the mean over the token dimension, one row per "
                    "conversation.")
        elif got.dim() == 2 and got.shape[1] == d_model and got.shape[0] < n:
            hint = (f" You returned fewer rows than conversations ({got.shape[0]} < {n}): is the last partial batch "
                    "dropped? range(0, len(conversations), batch_size) covers them all.")
        elif d_model not in got.shape:
            hint = " Did you take the mean over the wrong dimension (d_model instead of the tokens)?"
        else:
            hint = " Did you take the mean over the wrong dimension?"
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


# Mistakes that combine: a fixture holds the means for every combination of them (the ARENA text's extraction
# solutions make three or four at once), and a check names each mistake of the combination it sees.
MISTAKE_FLAGS = {
    "layer": "you read hidden_states[layer], the input to the block; layer i means the output of "
             "model.model.layers[i] = hidden_states[i + 1]",
    "bos": "the model saw a second BOS: full_prompt already starts with <bos>, so tokenise it with "
           "add_special_tokens=False (with the extra BOS every position shifts by one)",
    "eot": "your mean includes the end-of-turn tokens; the paper averages over the response's content tokens only "
           "(stop at len(ids) - turn_suffix_len(tokenizer))",
    "open": "your mask is `position >= response_start_idx` with no end: it takes in the end-of-turn tokens and, "
            "under right padding, the padding after each sequence (end each row's span at its own length minus "
            "turn_suffix_len(tokenizer))",
    "unshifted": "under LEFT padding (Gemma's) a mask built from positions in the unpadded sequence, such as "
                 "`position >= response_start_idx`, is shifted by each row's padding: it pulls prompt tokens in "
                 "and drops the last response tokens. Offset each row's span by its own padding length (or build "
                 "the mask from token spans)",
}


def combination_fixture_name(kind: str, flags: tuple[str, ...]) -> str:
    """The fixture holding the means for one combination of MISTAKE_FLAGS; ``kind`` is "single", "batched_left"
    or "batched_right" (batched with BATCHED_CHECK_SIZE)."""
    return f"extract_{kind}__" + "__".join(flags)


def combinations(kind: str) -> list[tuple[str, ...]]:
    """Every combination of mistakes the fixtures hold for ``kind``, fewest mistakes first."""
    import itertools

    out = []
    for layer, bos in itertools.product((False, True), repeat=2):
        base = ("layer",) * layer + ("bos",) * bos
        if kind == "single":
            out += [base + end for end in ((), ("eot",))]
        elif kind == "batched_right":
            out.append(base + ("open",))
        else:  # left padding, the mask not shifted by the padding
            out += [base + end + ("unshifted",) for end in ((), ("eot",), ("open",))]
    return sorted((c for c in out if c), key=len)


def _name_mistakes(flags: tuple[str, ...]) -> str:
    if len(flags) == 1:
        return MISTAKE_FLAGS[flags[0]]
    return f"{len(flags)} mistakes at once: " + "; ".join(f"({i}) {MISTAKE_FLAGS[f]}" for i, f in
                                                           enumerate(flags, 1))


EXTRACTION_DIAGNOSES = [  # fixture name, the likely mistake
    ("extract_with_prompt", "your mean includes the prompt tokens; start the mask at response_start_idx"),
    ("extract_all_tokens", "your mean is over every token of the conversation: it includes the prompt tokens and the "
                           "end-of-turn tokens (an attention mask is not a response mask); average over "
                           "[response_start_idx, len(ids) - turn_suffix_len(tokenizer)) only"),
    ("extract_from_marker", "your span starts one token early (at the newline after the turn marker)"),
    ("extract_final_norm_layer", "you read the last hidden state, which has the final norm applied"),
]


def _bf16_exact(t: torch.Tensor) -> bool:
    """Whether every value is exactly a bfloat16 number: a float32 mean of many bf16 values almost never is."""
    return bool(torch.equal(t, t.to(torch.bfloat16).float()))


def _diagnose(got: torch.Tensor, expected: torch.Tensor, side: str | None = None) -> str:
    """The likely mistake behind ``got``; ``side`` is the padding side of a batched run (None: one at a time)."""
    close = lambda a, b: a.shape == b.shape and torch.allclose(a, b, atol=ATOL, rtol=ATOL)  # noqa: E731
    for flags in combinations("single"):
        if close(got, fixture(combination_fixture_name("single", flags))):
            return _name_mistakes(flags)
    if side is not None:
        for flags in combinations(f"batched_{side}"):
            if close(got, fixture(combination_fixture_name(f"batched_{side}", flags))):
                return _name_mistakes(flags)
    for name, meaning in EXTRACTION_DIAGNOSES:
        if close(got, fixture(name)):
            return meaning
    if _bf16_exact(got):
        return ("every value is exactly a bfloat16 number: the mean was computed (or rounded) in bf16. Cast the hidden "
                "states to float32 before averaging")
    match = [next((j for j in range(len(expected)) if close(got[i], expected[j])), None) for i in range(len(got))]
    if all(j is not None for j in match) and sorted(match) == list(range(len(expected))) and \
            match != list(range(len(expected))):
        return (f"your rows are the right means in the wrong order (row i holds conversation {match}[i]): return them "
                "in the order of `conversations` (if you sort by length, undo the sort)")
    factors = (got * expected).sum(dim=1) / (expected * expected).sum(dim=1)
    if torch.allclose(got, factors[:, None] * expected, atol=ATOL, rtol=1e-3) and \
            not torch.allclose(factors, torch.ones_like(factors), atol=1e-3):
        return (f"each row is a multiple of the right mean (factors {[round(float(f), 3) for f in factors]}): divide "
                "each row's masked sum by the number of tokens in its own span, not by another count (a sum is not a "
                "mean; the padded length is not the span length)")
    err = (got - expected).abs().amax(dim=1)
    worst = int(err.argmax())
    return f"{UNKNOWN_MISTAKE} conversation {worst} (max |diff| {float(err[worst]):.3g})"


UNKNOWN_MISTAKE = "no common mistake matches; the largest error is in"


def _rows(got: torch.Tensor, expected: torch.Tensor) -> str:
    """Expected against actual for the first conversation that differs."""
    bad = [i for i in range(len(expected)) if not torch.allclose(got[i], expected[i], atol=ATOL, rtol=ATOL)]
    i = bad[0] if bad else 0
    pad = " " * (len(f"conversation {i}: ") + 2)
    return f"\n  conversation {i}: expected {_short(expected[i])}\n{pad}got      {_short(got[i])}"


def _compare_extraction(got, expected, section, name) -> None:
    if not torch.allclose(got, expected, atol=ATOL, rtol=ATOL):
        _fail(f"{name} on tiny-gemma2 (layer {EXTRACTION_LAYER}) does not match the expected means: "
              f"{_diagnose(got, expected)}.{_rows(got, expected)}", section)


BF16_TOLERANCE = 4e-4
"""The largest relative error (per row, in norm) a bf16 stage accepts against the same computation in float32.
Averaging or summing in bf16 rounds every value to ~3 significant digits: ~2e-3 of the norm, on every seed."""


@lru_cache(maxsize=32)  # the 20 seeds of the dtype sweep, ~1 MB each
def _tiny_bf16_master(seed: int = 0):
    """tiny-gemma2 in bf16 (like Gemma 2 27B on a GPU), with weights that require grad. ``seed`` > 0 perturbs the
    weights (seeded), for the sweep that shows a bf16 stage fails bf16 arithmetic whatever the weights."""
    model = copy.deepcopy(tiny_gemma2()[0])
    if seed:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * float(p.std()) * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model = model.to(torch.bfloat16)
    model.requires_grad_(True)
    return model


@lru_cache(maxsize=32)
def _bf16_expected(seed: int = 0) -> torch.Tensor:
    """The course's float32 means (``utils.activations``) of the bf16 stage's conversations, on its model."""
    from utils.activations import extract_mean_activations

    tok = _with_padding_side(tiny_gemma2()[1], "right")
    with torch.inference_mode():
        return extract_mean_activations(_tiny_bf16_master(seed), tok, [EXTRACTION_CONVERSATIONS[0],
                                                                      EXTRACTION_CONVERSATIONS[4]],
                                        EXTRACTION_LAYER, batch_size=1, progress=False)


def _bf16_close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    err = (got.float() - expected).norm(dim=-1) / expected.norm(dim=-1).clamp(min=1e-30)
    return bool((err <= BF16_TOLERANCE).all())


def _bf16_grad_run(fn, section: str, name: str, seed: int = 0, **kwargs) -> None:
    """Run on tiny-gemma2 in bf16 (like Gemma 2 27B on a GPU), with gradients enabled and weights that require
    them (as outside this notebook, which disables them globally). The means must be those of the course's
    float32 accumulation (``utils.activations``) over the same bf16 activations. Right padding, so that a batched
    answer sees exactly the activations an unpadded one does."""
    model = copy.deepcopy(_tiny_bf16_master(seed))  # a fresh copy: nothing the function does to it can leak out
    tok = _with_padding_side(tiny_gemma2()[1], "right")
    convs = copy.deepcopy([EXTRACTION_CONVERSATIONS[0], EXTRACTION_CONVERSATIONS[4]])
    where = "on tiny-gemma2 in bfloat16 (as Gemma 2 27B runs on a GPU)"
    _stage(_EX_BF16)
    with torch.enable_grad():
        got = _call(f"{name} {where}", section, EXTRACT_CALL_HINT, fn, model, tok, convs, EXTRACTION_LAYER, **kwargs)
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (2, model.config.hidden_size):
        _fail(f"{name} {where} should return [2, {model.config.hidden_size}]; got {_short(got)}.", section)
    if got.dtype != torch.float32:
        _fail(f"{name} {where} returned dtype {got.dtype}: cast the hidden states to float32 (.float()) before "
              "averaging, and return float32.", section)
    _stage(_EX_TENSOR)
    if got.device.type != "cpu":
        _fail(f"{name} {where} returned a tensor on {got.device}; move it to the CPU with .cpu().", section)
    _stage(_EX_GRAD)
    if got.requires_grad:
        _fail(f"With gradients enabled and weights that require grad, {name} returned a tensor that requires grad "
              "(it keeps the whole autograd graph alive): run the model under torch.inference_mode() or "
              "torch.no_grad(), or .detach() the result.", section)
    _stage(_EX_BF16)
    if not torch.isfinite(got).all():
        _fail(f"{name} {where} returned NaN or inf values.", section)
    if _bf16_exact(got):
        _fail(f"{name} {where} returned float32 values that are all exactly bf16 numbers: the mean was computed in "
              "bf16 and cast afterwards, which keeps only ~3 significant digits. Cast the hidden states to float32 "
              "first, then average.", section)
    expected = _bf16_expected(seed)
    if not _bf16_close(got.detach(), expected):
        err = float(((got.detach() - expected).norm(dim=1) / expected.norm(dim=1)).max())
        _fail(f"{name} {where} is off by {err:.2g} of the norm of the mean (at most {BF16_TOLERANCE:g} is float32's "
              "rounding): part of the sum or the mean was computed in bf16, which keeps ~3 significant digits (a "
              "masked sum or einsum in bf16 divided in float32 still rounds every sum). Cast the hidden states to "
              "float32 (.float()) before any sum, product with the mask, or mean.", section)


def _learner_model_smoke(fn, model, tokenizer, d_model, num_layers, section, name, **kwargs) -> None:
    if model is None:  # called without the learner's model (e.g. from the test suite): tiny-gemma2 covers it
        return
    _stage(_EX_OWN)
    convs = EXTRACTION_CONVERSATIONS[1:3]
    got = _call(f"{name} on your model", section, EXTRACT_CALL_HINT, fn, model, tokenizer, copy.deepcopy(convs),
                min(num_layers - 1, max(0, num_layers // 2)), **kwargs)
    _check_activation_tensor(got, len(convs), d_model, section, f"{name} on your model")


_EX_TENSOR = "a float32 CPU tensor [n_conversations, d_model]"
_EX_MEAN = "the mean of hidden_states[layer + 1] over the last response's content tokens"
_EX_BF16 = "on a bf16 model, averaged in float32"
_EX_GRAD = "no grad, even with gradients enabled"
_EX_OWN = "works on your own model"
_EX_PADDING = "either padding side, padding never in the mean"


@check("Exercise 4a", uses={"format_messages": ("Exercise 3 (format_messages)", lambda: _reference_format_messages)})
@PROMISES(_EX_TENSOR, _EX_MEAN, _EX_BF16, _EX_GRAD, _EX_OWN)
def test_extract_response_activations(fn, model=None, tokenizer=None, d_model=None, num_layers=None) -> None:
    section = "Section 4, Exercise 4a"
    name = "extract_response_activations"
    tiny, tiny_tok = tiny_gemma2()
    expected = fixture("extract_expected")
    _stage(_EX_MEAN)
    got = _call(f"{name} on tiny-gemma2", section, EXTRACT_CALL_HINT, fn, tiny, tiny_tok,
                copy.deepcopy(EXTRACTION_CONVERSATIONS), EXTRACTION_LAYER)
    _stage(_EX_TENSOR)
    _check_activation_tensor(got, len(EXTRACTION_CONVERSATIONS), tiny.config.hidden_size, section, name)
    _stage(_EX_MEAN)
    _compare_extraction(got, expected, section, name)
    _bf16_grad_run(fn, section, name)
    _learner_model_smoke(fn, model, tokenizer, d_model, num_layers, section, name)
    _passed("test_extract_response_activations")


def _token_lengths(tokenizer) -> list[int]:
    from utils.conversation import encode, render

    return [len(encode(render(c, tokenizer), tokenizer)) for c in EXTRACTION_CONVERSATIONS]


def _padded_rows(lengths: list[int], batch_size: int) -> set[int]:
    rows = set()
    for b in range(0, len(lengths), batch_size):
        width = max(lengths[b:b + batch_size])
        rows |= {b + i for i, n in enumerate(lengths[b:b + batch_size]) if n < width}
    return rows


def _padding_diagnosis(got, expected, side: str, tokenizer) -> str | None:
    """If exactly the rows that needed padding are wrong, say so (and name the mistake when a fixture knows it)."""
    ok = [torch.allclose(got[i], expected[i], atol=ATOL, rtol=ATOL) for i in range(len(expected))]
    padded = _padded_rows(_token_lengths(tokenizer), BATCHED_CHECK_SIZE)
    wrong = {i for i, good in enumerate(ok) if not good}
    if not wrong or not wrong <= padded:
        return None
    if side == "left":
        for name, meaning in (
                (combination_fixture_name("batched_left", ("unshifted",)),
                 "Your batched extraction is right with right padding but wrong with LEFT padding, which is what Gemma "
                 "uses: a mask built as `position >= response_start_idx` shifts under left padding (it pulls prompt "
                 "tokens in and drops the last response tokens). Offset each row's span by its own padding length "
                 "(or build the mask from token spans)."),
                ("extract_batched_left_no_attention_mask",
                 "Your batched extraction is right with right padding but wrong with LEFT padding: the model did not "
                 "get the attention_mask, so the real tokens attended to the padding before them. Pass "
                 "attention_mask to the model (model(**enc) passes everything the tokenizer returned).")):
            if torch.allclose(got, fixture(name), atol=ATOL, rtol=ATOL):
                return meaning
        return ("Your batched extraction is right with right padding but wrong with LEFT padding, which is what Gemma "
                f"uses: the rows that were left-padded ({sorted(wrong)}) are wrong. Either the mask does not shift "
                "with each row's padding (a mask built as `position >= response_start_idx` shifts under left padding), "
                "or the attention_mask is not passed to the model.")
    return (f"Only the rows that needed padding are wrong ({sorted(wrong)}); the rows without padding are right. "
            f"Padding is in your mean, or your span is measured against the padded length, or the padding side is "
            f"assumed: this run used tokenizer.padding_side = {side!r}. Build each row's mask from its own span, "
            "offset by its own padding, and never average over padding.")


@check("Exercise 4b", uses={"format_messages": ("Exercise 3 (format_messages)", lambda: _reference_format_messages)})
@PROMISES(_EX_TENSOR, _EX_MEAN, _EX_PADDING, _EX_BF16, _EX_GRAD, _EX_OWN)
def test_extract_response_activations_batched(fn, model=None, tokenizer=None, d_model=None, num_layers=None) -> None:
    section = "Section 4, Exercise 4b"
    name = "extract_response_activations_batched"
    tiny, tiny_tok = tiny_gemma2()
    expected = fixture("extract_expected")
    results = {}
    for side in ("right", "left"):
        tok = _with_padding_side(tiny_tok, side)
        _stage(_EX_MEAN if side == "right" else _EX_PADDING)
        got = _call(f"{name} on tiny-gemma2 ({side} padding, batch_size={BATCHED_CHECK_SIZE})", section,
                    EXTRACT_CALL_HINT, fn, tiny, tok, copy.deepcopy(EXTRACTION_CONVERSATIONS), EXTRACTION_LAYER,
                    batch_size=BATCHED_CHECK_SIZE)
        _stage(_EX_TENSOR)
        _check_activation_tensor(got, len(EXTRACTION_CONVERSATIONS), tiny.config.hidden_size, section,
                                 f"{name} ({side} padding)")
        _stage(_EX_MEAN if side == "right" else _EX_PADDING)
        results[side] = torch.allclose(got, expected, atol=ATOL, rtol=ATOL)
        if not results[side]:
            padding = _padding_diagnosis(got, expected, side, tok)
            if padding and (side == "right" or results.get("right")):
                _stage(_EX_PADDING)
                _fail(f"{padding}{_rows(got, expected)}", section)
            diagnosis = _diagnose(got, expected, side)
            if any(MISTAKE_FLAGS[f] in diagnosis for f in ("open", "unshifted")):
                _stage(_EX_PADDING)
            generic = ""
            if diagnosis.startswith(UNKNOWN_MISTAKE):
                generic = (" If single sequences pass but batches fail, check that padding is masked out of the mean "
                           "and that the attention_mask is passed to the model.")
            _fail(f"With {side} padding (batch_size={BATCHED_CHECK_SIZE}): {diagnosis}.{generic}{_rows(got, expected)}",
                  section)
    _bf16_grad_run(fn, section, name, batch_size=2)
    _learner_model_smoke(fn, model, tokenizer, d_model, num_layers, section, name, batch_size=2)
    _passed("test_extract_response_activations_batched")


# --------------------------------------------------------------------------------------------------
# Exercise 5: persona vectors
# --------------------------------------------------------------------------------------------------

_PV_FILTER = "keeps the responses scored >= score_threshold, and every unjudged default"
_PV_RESULT = "one float32 [d_model] vector per persona: the mean of its responses' means"
_PV_THRESHOLD = "uses the score_threshold it is given"
_PV_NONE = "scores=None keeps every response"
_PV_UNJUDGED = "a response whose key is not in scores is kept, a role's as well as a default's"
_PV_OTHERS = "responses of personas not in `personas` are left out"
_PV_EMPTY = "a persona with nothing left raises a ValueError that names it"


@check("Exercise 5", uses={"extract_response_activations_batched": ("Exercise 4b", lambda: _reference_batched),
                           "extract_response_activations": ("Exercise 4a", lambda: _reference_single)})
@PROMISES(_PV_FILTER, _PV_RESULT, _PV_THRESHOLD, _PV_NONE, _PV_UNJUDGED, _PV_OTHERS, _PV_EMPTY)
def test_extract_persona_vectors(fn, model=None, tokenizer=None, d_model=None, num_layers=None) -> None:
    section = "Section 5, Exercise 5"
    tiny, tiny_tok = tiny_gemma2()
    case = copy.deepcopy(PERSONA_CASE)
    kept_text = "(bard keeps questions 0 and 2; ghost keeps 0 and 1; default_empty is unjudged and keeps all 3.)"
    args = (tiny, tiny_tok, case["personas"], case["questions"], case["responses"], case["layer"])
    _stage(_PV_FILTER)
    try:
        got = limited(fn, section)(*args, scores=case["scores"], score_threshold=3)
    except (NotImplementedError, CheckFailure):
        raise
    except ValueError as exc:
        _fail(f"Every persona here has responses to keep, yet you raised ValueError: {_clip(str(exc))}. Keep a "
              "response if `scores` is None, if its key is not in `scores` (the defaults are never judged, so "
              "treating a missing key as score 0, e.g. with scores.get(key, 0), drops every default), or if its "
              f"score is >= score_threshold (not >). {kept_text}", section, exc)
    except Exception as exc:
        _fail(f"extract_persona_vectors raised {type(exc).__name__}: {_clip(str(exc))}", section, exc)
    expected = {p: fixture(f"persona_{p}") for p in case["personas"]}
    _check_persona_result(got, expected, case, tiny.config.hidden_size, section, kept_text, _PV_FILTER)
    # score_threshold is a parameter: with score_threshold=2 the ghost keeps all three of its responses.
    _stage(_PV_THRESHOLD)
    got2 = _call("extract_persona_vectors with score_threshold=2", section, "", fn, *args, scores=case["scores"],
                 score_threshold=2)
    expected2 = dict(expected, ghost=fixture("persona_ghost_nofilter"))
    _check_persona_result(got2, expected2, case, tiny.config.hidden_size, section,
                          "(With score_threshold=2, ghost keeps all three responses: use the score_threshold "
                          "argument, do not hard-code 3.)", _PV_THRESHOLD)
    # Without scores nothing is filtered.
    _stage(_PV_NONE)
    got3 = _call("extract_persona_vectors without scores", section, "With scores=None (the default) keep every "
                 "response.", fn, *args)
    expected3 = {p: fixture(f"persona_{p}_nofilter") for p in case["personas"]}
    _check_persona_result(got3, expected3, case, tiny.config.hidden_size, section,
                          "(Without scores, every response is kept.)", _PV_NONE)
    # A role's response that was never judged (its key is not in scores) is kept, like the defaults'.
    _stage(_PV_UNJUDGED)
    unjudged = {k: v for k, v in case["scores"].items() if k != ("bard", 1)}
    got4 = _call("extract_persona_vectors with ('bard', 1) missing from scores", section,
                 "A key missing from `scores` means the response was not judged: keep it (do not look it up with "
                 "scores[key]).", fn, *args, scores=unjudged, score_threshold=3)
    _check_persona_result(got4, dict(expected, bard=fixture("persona_bard_nofilter")), case, tiny.config.hidden_size,
                          section, "(Here ('bard', 1) is not in scores: it is unjudged, so bard keeps all three of its "
                          "responses. Keep every response whose key is not in scores, whatever its persona: decide "
                          "by the key, not by whether the persona is a default.)", _PV_UNJUDGED)
    # Responses of personas that are not asked for (the notebook passes only the personas it keeps).
    _stage(_PV_OTHERS)
    more = {**case["responses"], ("jester", 0): "A joke for the court!", ("jester", 2): "I am the fool."}
    got5 = _call("extract_persona_vectors with responses of a persona not in `personas`", section,
                 "Build vectors for the personas in `personas` only; skip responses whose persona is not there.", fn,
                 tiny, tiny_tok, case["personas"], case["questions"], more, case["layer"],
                 scores={**case["scores"], ("jester", 0): 3}, score_threshold=3)
    _check_persona_result(got5, expected, case, tiny.config.hidden_size, section,
                          "(`responses` also holds a 'jester' persona that is not in `personas`, as in the notebook, "
                          "which passes only the personas it keeps: leave its responses out.)", _PV_OTHERS)
    # A persona with nothing left must raise, naming it.
    _stage(_PV_EMPTY)
    scores = dict(case["scores"])
    scores.update({("ghost", q): 1 for q in range(3)})
    try:
        result = limited(fn, section)(*args, scores=scores, score_threshold=3)
    except (NotImplementedError, CheckFailure):
        raise
    except ValueError as exc:
        if "ghost" not in str(exc):
            _fail(f"The error for a persona with no responses left should name it ('ghost'); it says: {exc}", section)
    except Exception as exc:
        _fail(f"When every response of 'ghost' scores below score_threshold you raised {type(exc).__name__}: "
              f"{_clip(str(exc))}. Raise a ValueError that names 'ghost'.", section, exc)
    else:
        what = "left it out"
        if isinstance(result, dict) and "ghost" in result:
            vec = result["ghost"]
            what = (f"returned {_short(vec)}" + (" (NaN: the mean of nothing)" if isinstance(vec, torch.Tensor)
                                                 and torch.isnan(vec).any() else ""))
        _fail("When every response of 'ghost' scores below score_threshold, raise a ValueError that names 'ghost' "
              f"instead of returning a vector (you {what}): a NaN or made-up vector would flow silently into the "
              "geometry.", section)
    _passed("test_extract_persona_vectors")


def _check_persona_result(got, expected, case, d_model: int, section: str, kept_text: str, promise: str) -> None:
    _stage(_PV_RESULT)
    if not isinstance(got, dict) or set(got) != set(case["personas"]):
        if isinstance(got, dict) and set(got) > set(case["personas"]):
            _stage(promise)
        _fail(f"Return a dict with one vector per persona, keys {sorted(case['personas'])}; got "
              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}. {kept_text}", section)
    for persona, vec in got.items():
        if not isinstance(vec, torch.Tensor) or tuple(vec.shape) != (d_model,):
            _fail(f"The vector for {persona!r} should have shape [d_model] = [{d_model}]; got {_short(vec)}.", section)
        if vec.dtype != torch.float32 or not torch.isfinite(vec).all():
            _fail(f"The vector for {persona!r} should be finite float32; got {_short(vec)}.", section)
    _stage(promise)
    for persona, vec in got.items():
        if torch.allclose(vec, expected[persona], atol=ATOL, rtol=ATOL):
            continue
        hint = "check which responses you kept"
        for variant, meaning in (("nofilter", "you ignored the judge scores (every response was kept)"),
                                 ("inverted", "your filter is inverted: keep responses with score >= "
                                              "score_threshold"),
                                 ("token_weighted", "you averaged over all the kept responses' tokens at once, so "
                                                    "long answers weigh more; a persona vector is the mean of the "
                                                    "responses' means (one mean per response, then their mean)")):
            if torch.allclose(vec, fixture(f"persona_{persona}_{variant}"), atol=ATOL, rtol=ATOL):
                hint = meaning
                if variant == "token_weighted":
                    _stage(_PV_RESULT)
                break
        else:
            other = [p for p in expected if p != persona and torch.allclose(vec, expected[p], atol=ATOL, rtol=ATOL)]
            if other:
                hint = (f"it is the expected vector of {other[0]!r}: you averaged another persona's responses (check "
                        "how rows of the extracted activations are matched to personas)")
        _fail(f"The vector for {persona!r} is wrong: {hint}. {kept_text}\n  expected {_short(expected[persona])}\n"
              f"  got      {_short(vec)}", section)


# --------------------------------------------------------------------------------------------------
# Exercise 6: geometry
# --------------------------------------------------------------------------------------------------

# The geometry checks' personas: three defaults, then five roles (the order of the dict, deliberately not sorted).
GEOMETRY_NAMES = ["default_empty", "default_assistant", "default_llm", "analyst", "editor", "bard", "ghost", "jester"]
N_GEOMETRY_DEFAULTS = 3


def geometry_vectors(seed: int = 1234) -> torch.Tensor:
    """8 persona-like vectors in 32 dimensions: a large shared mean plus structured variation. Seed 1234 gives the
    vectors stored in the fixtures (``make fixtures``); other seeds, the sweep of the dtype stages."""
    g = torch.Generator().manual_seed(seed)
    shared = 50.0 * torch.randn(32, generator=g)
    direction = torch.randn(32, generator=g)
    along = torch.tensor([3.0, 2.5, 2.0, 0.5, -1.0, -2.0, -2.5, -3.0])
    return shared + along[:, None] * direction + 0.8 * torch.randn(8, 32, generator=g)


def _geometry_inputs(seed: int = 0) -> torch.Tensor:
    """The geometry checks' vectors, [8, 32] with a large shared mean, like real persona vectors (seed 0: the
    fixtures' own)."""
    return fixture("geometry_vectors") if seed == 0 else geometry_vectors(seed)


def _as_dict(vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> row, in the order of GEOMETRY_NAMES (each row its own tensor, so nothing is shared)."""
    return {name: vectors[i].clone() for i, name in enumerate(GEOMETRY_NAMES)}


def _square_and_names(got, section: str, name: str) -> torch.Tensor:
    """The learner's matrix, rows and columns in the order of GEOMETRY_NAMES, from ``(matrix, names)``."""
    n = len(GEOMETRY_NAMES)
    if isinstance(got, torch.Tensor):
        _fail(f"{name} returns (similarity, names), as in the ARENA text: the [{n}, {n}] matrix and the persona names "
              "in the order of its rows. You returned only the matrix.", section)
    if not (isinstance(got, tuple) and len(got) == 2):
        _fail(f"{name} should return (similarity, names): a [{n}, {n}] tensor and the list of names in the order of "
              f"its rows; got {_short(got)}.", section)
    matrix, names = got
    if not isinstance(matrix, torch.Tensor) or tuple(matrix.shape) != (n, n):
        _fail(f"{name} should return a [{n}, {n}] similarity matrix first; got {_short(matrix)}.", section)
    if matrix.dtype != torch.float32:
        _fail(f"{name} returned {matrix.dtype}; compute in float32.", section)
    names = list(names) if isinstance(names, (list, tuple)) else names
    if not isinstance(names, list) or sorted(map(str, names)) != sorted(GEOMETRY_NAMES):
        _fail(f"The second value should be the list of the {n} persona names (the dict's keys) in the order of the "
              f"matrix's rows; got {_short(names)}.", section)
    order = [names.index(n_) for n_ in GEOMETRY_NAMES]
    return matrix[order][:, order]


def _names_out_of_order(got, expected: torch.Tensor) -> bool:
    """The matrix is right in the dict's order, but the names say another order."""
    matrix, names = got
    return list(names) != GEOMETRY_NAMES and torch.allclose(matrix, expected, atol=ATOL)


_DTYPES = "any float dtype in, float32 out, computed in float32"


def _to_dtype(x, dtype):
    """Tensors (alone, in tuples or in dicts) converted to ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    if isinstance(x, dict):
        return {k: _to_dtype(v, dtype) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_to_dtype(v, dtype) for v in x)
    return x


def _check_dtypes(fn, args, section: str, name: str, pick=lambda out: out) -> None:
    """bf16 and float64 inputs give a float32 result computed in float32: for bf16 input, the result for the same
    values given as float32 (``args`` are float32; the bf16 rounding of vectors with a large shared mean, like
    these, moves every bf16 computation far outside float32's rounding)."""
    args16 = _to_dtype(args, torch.bfloat16)
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float64, "float64")):
        given = args16 if dtype == torch.bfloat16 else _to_dtype(args, dtype)
        out = _call(f"{name} on {label} input", section, "Cast the inputs to float32 (.float()) first.", fn, *given)
        value = pick(out)
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            _fail(f"Given {label} vectors, {name} returned {_short(value)}: cast the inputs to float32 (.float()) "
                  f"before computing, and return float32 whatever the input dtype ({label} in, float32 out).", section)
        if dtype != torch.bfloat16:
            continue
        if _bf16_exact(value) and value.numel() > 4:
            _fail(f"Given bf16 vectors, {name} returned float32 values that are all exactly bf16 numbers: it computed "
                  "in bf16 and cast afterwards, which keeps only ~3 significant digits. Cast the inputs to float32 "
                  "first, then compute.", section)
        same = pick(_call(f"{name} on the same values in float32", section, "", fn, *_to_dtype(args16, torch.float32)))
        if isinstance(same, torch.Tensor) and same.shape == value.shape:
            scale = max(1.0, float(same.abs().max()))
            if not torch.allclose(value, same.float(), atol=1e-5 * scale, rtol=1e-5):
                _fail(f"Given bf16 vectors, {name} differs from its result for the same values given in float32 (max "
                      f"|diff| {float((value - same.float()).abs().max()):.3g}): part of it was computed in bf16, "
                      "which keeps only ~3 significant digits (a norm, a mean or a product taken before .float()). "
                      "Cast the inputs to float32 (.float()) first, then compute everything.", section)


_COS_RETURN = "returns (similarity, names): float32 [n, n] and the names in the order of its rows"
_COS_VALUES = "the cosine of every pair: symmetric, ones on the diagonal, whatever the vectors' lengths"
_CEN_VALUES = "the cosine after subtracting the mean over the personas (dim=0)"


@check("Exercise 6a (raw cosine)")
@PROMISES(_COS_RETURN, _COS_VALUES, _DTYPES)
def test_compute_cosine_similarity_matrix(fn) -> None:
    section = "Section 6, Exercise 6a"
    name = "compute_cosine_similarity_matrix"
    v = _geometry_inputs()
    expected = fixture("cosine_raw")
    _stage(_COS_VALUES)
    got = _call(f"{name} on 8 persona vectors of d_model 32", section, "Stack the dict's values into one "
                "[n_personas, d_model] tensor, then divide each row by its norm with keepdim=True "
                "(v.norm(dim=1, keepdim=True)), so that [n, d] / [n, 1] broadcasts.", fn, _as_dict(v))
    _stage(_COS_RETURN)
    got_matrix = _square_and_names(got, section, name)
    if _names_out_of_order(got, expected):
        _fail("Your matrix's rows are in the dict's order but your names are not: return the names in the order of "
              "the rows (list(persona_vectors) if you stack the values in the dict's order).", section)
    _stage(_COS_VALUES)
    diagonal = torch.diagonal(got_matrix)
    if not torch.allclose(diagonal, torch.ones(len(v)), atol=ATOL):
        if torch.allclose(diagonal, (v * v).sum(dim=1), rtol=1e-3):
            _fail("The diagonal holds the squared norms: these are dot products. Divide each row by its norm first.\n"
                  f"  diagonal: {_short(diagonal)}", section)
        _fail("A cosine-similarity matrix has ones on the diagonal; yours does not. Normalise rows (dim=1), not "
              f"columns.\n  diagonal: {_short(diagonal)}", section)
    if not torch.allclose(got_matrix, got_matrix.T, atol=ATOL):
        _fail("A cosine-similarity matrix is symmetric; yours is not.", section)
    if not torch.allclose(got_matrix, expected, atol=ATOL):
        if torch.allclose(got_matrix, fixture("cosine_centered"), atol=ATOL):
            _fail("This is the centred similarity; compute_cosine_similarity_matrix should not centre.", section)
        _fail(f"Wrong values.\n  expected {_short(expected[0])}\n  got      {_short(got_matrix[0])}", section)
    scaled = v * torch.arange(1, len(v) + 1, dtype=torch.float32)[:, None]
    again = _square_and_names(_call(f"{name} on rescaled vectors", section, "", fn, _as_dict(scaled)), section, name)
    if not torch.allclose(again, got_matrix, atol=ATOL):
        _fail("Cosine similarity does not depend on a vector's length, but yours changed when vectors were scaled: "
              "divide each row by its norm (you may be computing dot products).", section)
    _bf16_cosine(fn)
    _passed("test_compute_cosine_similarity_matrix")


def _matrix_of(out):
    return out[0] if isinstance(out, tuple) and len(out) == 2 else out


def _bf16_cosine(fn, seed: int = 0) -> None:
    _stage(_DTYPES)
    _check_dtypes(fn, (_as_dict(_geometry_inputs(seed)),), "Section 6, Exercise 6a",
                  "compute_cosine_similarity_matrix", pick=_matrix_of)


def _bf16_centered(fn, seed: int = 0) -> None:
    _stage(_DTYPES)
    _check_dtypes(fn, (_as_dict(_geometry_inputs(seed)),), "Section 6, Exercise 6a",
                  "compute_cosine_similarity_matrix_centered", pick=_matrix_of)


@check("Exercise 6a (centred cosine)")
@PROMISES(_COS_RETURN, _CEN_VALUES, _DTYPES)
def test_compute_cosine_similarity_matrix_centered(fn) -> None:
    section = "Section 6, Exercise 6a"
    name = "compute_cosine_similarity_matrix_centered"
    v = _geometry_inputs()
    expected = fixture("cosine_centered")
    _stage(_CEN_VALUES)
    got = _call(f"{name} on 8 persona vectors of d_model 32", section, "", fn, _as_dict(v))
    _stage(_COS_RETURN)
    got_matrix = _square_and_names(got, section, name)
    if _names_out_of_order(got, expected):
        _fail("Your matrix's rows are in the dict's order but your names are not: return the names in the order of "
              "the rows.", section)
    _stage(_CEN_VALUES)
    if torch.allclose(got_matrix, fixture("cosine_raw"), atol=ATOL):
        _fail("These are the raw cosines: subtract the mean vector (the mean over personas, dim=0) first.", section)
    if torch.allclose(got_matrix, fixture("cosine_centered_wrong_dim"), atol=ATOL):
        _fail("You centred each vector on its own mean (dim=1). Subtract the mean over personas (dim=0): the "
              "shared component is a direction in d_model space.", section)
    shifted = _square_and_names(_call(f"{name} on shifted vectors", section, "", fn,
                                      _as_dict(v + 100.0 * torch.linspace(-1, 1, v.shape[1]))), section, name)
    if not torch.allclose(shifted, got_matrix, atol=1e-3):
        _fail("Adding the same vector to every persona changed your centred similarities; centring should remove it. "
              "Subtract the mean over the personas (one mean vector, not a single number), and centre before "
              "normalising.", section)
    if not torch.allclose(torch.diagonal(got_matrix), torch.ones(len(v)), atol=ATOL):
        _fail("The diagonal should be all ones: after centring, normalise each row (these look like dot products).\n"
              f"  diagonal: {_short(torch.diagonal(got_matrix))}", section)
    if not torch.allclose(got_matrix, expected, atol=ATOL):
        _fail(f"Wrong values (check the normalisation).\n  expected {_short(expected[0])}\n  got      "
              f"{_short(got_matrix[0])}", section)
    _bf16_centered(fn)
    _passed("test_compute_cosine_similarity_matrix_centered")


def _is_fitted_pca(x) -> bool:
    return hasattr(x, "explained_variance_ratio_") and hasattr(x, "components_")


def _pca_parts(got, section: str):
    """(pca_coords, explained_variance_ratio, components, axis or None) from any of the accepted returns."""
    if isinstance(got, tuple) and len(got) == 2 and _is_fitted_pca(got[1]):
        return got[0], got[1].explained_variance_ratio_, got[1].components_, None
    if isinstance(got, tuple) and len(got) == 3 and _is_fitted_pca(got[2]):  # the ARENA text's return
        return got[1], got[2].explained_variance_ratio_, got[2].components_, got[0]
    if isinstance(got, tuple) and len(got) == 3 and not any(_is_fitted_pca(x) for x in got):
        return got[0], got[1], got[2], None
    if _is_fitted_pca(got):
        _fail("You returned only the fitted PCA: return (pca_coords, pca), with pca_coords = pca.fit_transform(X).",
              section)
    _fail("Return (pca_coords, pca): the [n_personas, 2] coordinates and the fitted sklearn PCA (or, from your own "
          f"SVD, (pca_coords, explained_variance_ratio, components)); got {_short(got)}.", section)


def _as_float_tensor(x, what: str, section: str) -> torch.Tensor:
    try:
        import numpy as np

        # A copy in C order: some solvers (ARPACK) hand back arrays with negative strides, which torch cannot wrap.
        return torch.from_numpy(np.ascontiguousarray(x.detach().cpu().float() if isinstance(x, torch.Tensor) else x,
                                                     dtype=np.float32))
    except (TypeError, ValueError) as exc:
        _fail(f"{what} should be an array or tensor of numbers; got {_short(x)}.", section, exc)


_PCA_RETURN = "returns (pca_coords [n, 2], pca) (or (coords, ratio, components), or the text's triple)"
_PCA_RATIO = "explained_variance_ratio: each component's share of the total variance, descending"
_PCA_COMPONENTS = "components: the top two principal directions, orthonormal rows in d_model space"
_PCA_COORDS = "pca_coords: the centred vectors' coordinates on the components, in the dict's order"
_PCA_AXIS = "the text's triple: its axis is the unit mean(defaults) - mean(roles)"
_PCA_DTYPES = "any float dtype in, bf16 included (numpy has no bf16)"


def _pca_tolerance(values: torch.Tensor) -> float:
    """A PCA's rounding in float32 grows with the values' scale: 3e-4 of it. (sklearn's covariance_eigh solver on
    float32 vectors squares their condition number: its coordinates near 20 are off by ~1.4e-3; any mistake is off
    by far more.)"""
    return 3e-4 * max(1.0, float(values.abs().max()))


@check("Exercise 6b")
@PROMISES(_PCA_RETURN, _PCA_RATIO, _PCA_COMPONENTS, _PCA_COORDS, _PCA_AXIS, _PCA_DTYPES)
def test_pca_decompose_persona_vectors(fn) -> None:
    section = "Section 6, Exercise 6b"
    v = _geometry_inputs()
    n, d = v.shape
    k = 2
    _stage(_PCA_RETURN)
    got = _call("pca_decompose_persona_vectors on 8 persona vectors of d_model 32", section,
                "numpy has no bfloat16 and sklearn wants a numpy array: .float().cpu().numpy().", fn, _as_dict(v))
    coords, ratio, comps, axis = _pca_parts(got, section)
    proj = _as_float_tensor(coords, "pca_coords", section)
    ratio = _as_float_tensor(ratio, "explained_variance_ratio", section)
    comps = _as_float_tensor(comps, "components", section)
    if tuple(proj.shape) != (n, k) or tuple(ratio.shape) != (k,) or tuple(comps.shape) != (k, d):
        hint = " Keep the first two components: PCA(n_components=2)."
        if comps.dim() == 2 and comps.shape[0] == k and comps.shape[1] != d:
            _stage(_PCA_COMPONENTS)
            hint = (f" Each component is a direction in d_model space (length {d}): take the rows of Vh (the columns "
                    f"of V), not the columns of U, which live in persona space (length {n}).")
        _fail(f"Shapes should be pca_coords [{n}, {k}], explained_variance_ratio [{k}], components [{k}, {d}]; got "
              f"{tuple(proj.shape)}, {tuple(ratio.shape)}, {tuple(comps.shape)}.{hint}", section)
    _stage(_PCA_RATIO)
    full_ratio = fixture("pca_ratio")
    expected_ratio = full_ratio[:k]
    if torch.allclose(ratio, fixture("pca_ratio_uncentred")[:k], atol=1e-3):
        _fail("Your PCA is on uncentred vectors: the first component is just the shared mean. Subtract the mean over "
              "personas first (sklearn's PCA does it for you).", section)
    if not torch.allclose(ratio, expected_ratio, atol=1e-3):
        singular = full_ratio.clamp(min=0).sqrt()
        hint = ""
        if torch.allclose(ratio, (singular / singular.sum())[:k], atol=1e-3):
            hint = " You used the singular values; the variance along a component is the squared singular value, s**2."
        elif torch.allclose(ratio, expected_ratio / expected_ratio.sum(), atol=1e-3):
            hint = " Yours sum to 1 over the kept components: divide by the variance of all of them."
        elif torch.allclose(ratio, full_ratio.flip(0)[:k], atol=1e-3):
            hint = " Yours are the smallest components, ascending (torch.linalg.eigh sorts ascending: flip it)."
        elif torch.allclose(ratio[:1], expected_ratio[:1], atol=1e-3):
            hint = (" The first is right but not the second: if you used torch.pca_lowrank, it is randomised and "
                    "approximate unless q covers all components (q=min(n, d_model)); or use an exact SVD.")
        _fail(f"explained_variance_ratio should be the fraction of the TOTAL variance (all components) explained by "
              f"each, in descending order.{hint}\n  expected {_short(expected_ratio)}\n  got      {_short(ratio)}",
              section)
    _stage(_PCA_COMPONENTS)
    gram = comps @ comps.T
    if not torch.allclose(gram, torch.eye(k), atol=1e-3):
        _fail("The components should be orthonormal rows (unit norm, mutually orthogonal).", section)
    expected_comps = fixture("pca_components")[:k]
    alignment = (comps @ expected_comps.T).diagonal().abs()
    if not torch.all(alignment > 0.999):
        _fail(f"The components point in the wrong directions (|cos| with the expected ones: {_short(alignment)}). "
              "Each principal direction is a row of Vh (a column of V), in d_model space. (torch.pca_lowrank is "
              "approximate unless q=min(n, d_model).)", section)
    _stage(_PCA_COORDS)
    signs = torch.sign((comps * expected_comps).sum(dim=1))  # a component's sign is arbitrary
    expected_proj = fixture("pca_projections")[:, :k]
    if not torch.allclose(proj * signs, expected_proj, atol=_pca_tolerance(expected_proj)):
        _fail("pca_coords should be the centred vectors' coordinates on the components: (v - mean) @ components.T, "
              "rows in the order of the dict.", section)
    if axis is not None:  # the ARENA text returns (assistant_axis, pca_coords, pca)
        _stage(_PCA_AXIS)
        a = _as_float_tensor(axis, "assistant_axis", section).flatten()
        expected_axis = fixture("axis")
        if a.shape != expected_axis.shape or float(a @ expected_axis) < 0.999:
            _fail("You returned an axis first, as the ARENA text does; it should be the unit vector along "
                  "mean(defaults) - mean(roles), pointing toward the defaults (see Exercise 6c). Returning just "
                  "(pca_coords, pca) is fine too.", section)
    _bf16_pca(fn)
    _passed("test_pca_decompose_persona_vectors")


def _pca_coords_of(out) -> torch.Tensor:
    """pca_coords of an accepted return, as a float32 tensor (sign-normalised: a component's sign is arbitrary)."""
    coords, _, comps, _ = _pca_parts(out, "Section 6, Exercise 6b")
    coords = _as_float_tensor(coords, "pca_coords", "Section 6, Exercise 6b")
    comps = _as_float_tensor(comps, "components", "Section 6, Exercise 6b")
    first = comps.abs().argmax(dim=1)  # the sign convention: each component's largest entry positive
    return coords * torch.sign(comps[torch.arange(len(comps)), first])


def _bf16_pca(fn, seed: int = 0) -> None:
    section = "Section 6, Exercise 6b"
    _stage(_PCA_DTYPES)
    v = _as_dict(_geometry_inputs(seed))
    v16 = _to_dtype(v, torch.bfloat16)
    out16 = _call("pca_decompose_persona_vectors on bf16 vectors", section,
                  "numpy has no bfloat16: convert with .float().cpu().numpy() before handing the vectors to numpy or "
                  "sklearn.", fn, v16)
    out32 = _call("pca_decompose_persona_vectors on the same values in float32", section, "", fn,
                  _to_dtype(v16, torch.float32))
    got, same = _pca_coords_of(out16), _pca_coords_of(out32)
    if got.shape != same.shape or not torch.allclose(got, same, atol=_pca_tolerance(same)):
        _fail("Given bf16 vectors, pca_coords differ from those for the same values given in float32: part of the "
              "PCA ran in bf16 (~3 significant digits). Convert with .float() first, then centre and decompose.",
              section)


_AXIS_VALUES = "the unit vector along mean(defaults) - mean(roles), float32 [d_model]"


@check("Exercise 6c (compute_assistant_axis)")
@PROMISES(_AXIS_VALUES, _DTYPES)
def test_compute_assistant_axis(fn) -> None:
    section = "Section 6, Exercise 6c"
    v = _geometry_inputs()
    defaults, roles = v[:N_GEOMETRY_DEFAULTS], v[N_GEOMETRY_DEFAULTS:]
    _stage(_AXIS_VALUES)
    got = _call("compute_assistant_axis(defaults [3, 32], roles [5, 32])", section,
                "Take each group's mean over its rows (dim=0): the groups have different sizes, their means do not.",
                fn, defaults.clone(), roles.clone())
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (v.shape[1],):
        _fail(f"The axis should be a [d_model] = [{v.shape[1]}] tensor; got {_short(got)}. Average each group over its "
              "rows (dim=0).", section)
    if got.dtype != torch.float32:
        _stage(_DTYPES)
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
    _bf16_axis(fn)
    _passed("test_compute_assistant_axis")


def _bf16_axis(fn, seed: int = 0) -> None:
    v = _geometry_inputs(seed)
    _stage(_DTYPES)
    _check_dtypes(fn, (v[:N_GEOMETRY_DEFAULTS].clone(), v[N_GEOMETRY_DEFAULTS:].clone()), "Section 6, Exercise 6c",
                  "compute_assistant_axis")


_CHAR_TYPES = "a dict name -> Python float, for every vector"
_CHAR_ORDER = "ordered from the lowest cosine to the highest"
_CHAR_VALUES = "each vector's cosine with the axis, the vectors taken as given (trait vectors are not centred)"
_CHAR_AXIS_NORM = "the axis need not be unit norm"


@check("Exercise 6c (characterize_axis)")
@PROMISES(_CHAR_TYPES, _CHAR_ORDER, _CHAR_VALUES, _CHAR_AXIS_NORM)
def test_characterize_axis(fn) -> None:
    section = "Section 6, Exercise 6c"
    v = _geometry_inputs()
    centred = v - v.mean(dim=0)
    axis = fixture("axis")
    names = GEOMETRY_NAMES
    _stage(_CHAR_TYPES)
    got = _call("characterize_axis(persona_vectors, assistant_axis)", section, "", fn, _as_dict(centred), axis.clone())
    if isinstance(got, list) and all(isinstance(x, tuple) and len(x) == 2 for x in got):
        _fail("Return a dict name -> cosine similarity (as in the ARENA text), not a list of pairs: "
              "dict(sorted(similarities.items(), key=lambda kv: kv[1])).", section)
    if not isinstance(got, dict):
        _fail(f"Return a dict name -> cosine similarity; got {_short(got)}.", section)
    if sorted(got) != sorted(names):
        _fail(f"Return one entry per vector; got names {list(got)}.", section)
    not_float = {n: c for n, c in got.items() if not isinstance(c, float)}
    if not_float:
        n, c = next(iter(not_float.items()))
        _fail(f"Each value should be a Python float (float(...) or .item()); the value for {n!r} is {_short(c)} "
              f"({type(c).__name__}). The notebook prints and stores these rankings, and a tensor or a NumPy float32 "
              "does not go into JSON.", section)
    _stage(_CHAR_ORDER)
    values = list(got.values())
    if values != sorted(values):
        _fail("Order the dict from the lowest cosine (most role-playing) to the highest (most assistant-like), as the "
              f"ARENA text does; your values are {[round(x, 3) for x in values]}.", section)
    _stage(_CHAR_VALUES)
    expected = dict(zip(_json_fixtures()["characterize_names"], fixture("characterize_cosines").tolist()))
    if any(abs(got[n] - expected[n]) > 1e-3 for n in names):
        scaled = _as_dict(centred)
        scaled[names[0]] = scaled[names[0]] * 10
        again = _call("characterize_axis with one vector scaled", section, "", fn, scaled, axis.clone())
        if abs(float(again[names[0]]) - got[names[0]]) > 1e-3:
            _fail("Your values change when a vector is scaled: use cosine similarity (divide by both norms), "
                  "not dot products.", section)
        worst = max(names, key=lambda n: abs(got[n] - expected[n]))
        _fail(f"Wrong cosine for {worst}: expected {expected[worst]:.4f}, got {got[worst]:.4f}.", section)
    # The notebook also passes trait vectors, which are not centred: take every vector as it is.
    raw = _call("characterize_axis on vectors that are not centred (as trait vectors are)", section, "", fn,
                _as_dict(v), axis.clone())
    want = dict(zip(_json_fixtures()["characterize_names"], fixture("characterize_cosines_uncentred").tolist()))
    if not isinstance(raw, dict) or sorted(raw) != sorted(names) or \
            any(abs(float(raw[n]) - want[n]) > 1e-3 for n in names):
        shown = {n: round(float(c), 4) for n, c in list(raw.items())[:3]} if isinstance(raw, dict) else _short(raw)
        _fail("On vectors that are not centred (the notebook passes trait vectors, which are not), your cosines are "
              f"not those of the vectors as given: expected e.g. {names[0]}: {want[names[0]]:.4f}, got {shown}. "
              "Do not centre (or otherwise change) the vectors inside characterize_axis: the caller centres persona "
              "vectors before the call.", section)
    _stage(_CHAR_AXIS_NORM)
    longer = _call("characterize_axis with a longer axis", section, "", fn, _as_dict(centred), axis * 7.0)
    if any(abs(float(longer[n]) - got[n]) > 1e-3 for n in names):
        _fail("Your values changed when the axis was multiplied by 7: a cosine does not depend on the axis's length. "
              "Divide by the axis's norm too (the axis you are given need not be unit-norm).", section)
    _passed("test_characterize_axis")


# --------------------------------------------------------------------------------------------------
# Exercises 7 and 8: traits and AUC
# --------------------------------------------------------------------------------------------------

_TRAIT_VALUES = "mean(pos) - mean(neg), means over the rows, float32 [d_model]"


@check("Exercise 7")
@PROMISES(_TRAIT_VALUES, _DTYPES)
def test_compute_trait_vector(fn) -> None:
    section = "Section 7, Exercise 7"
    v = _geometry_inputs()
    pos, neg = v[:5], v[5:]
    _stage(_TRAIT_VALUES)
    got = _call("compute_trait_vector(pos [5, 32], neg [3, 32])", section,
                "Take each side's mean over its rows (dim=0): the two sides have different numbers of rows.",
                fn, pos.clone(), neg.clone())
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (v.shape[1],):
        _fail(f"Return a [d_model] = [{v.shape[1]}] tensor; got {_short(got)}. Average each side over its rows "
              "(dim=0).", section)
    expected = fixture("trait_vector")
    if torch.allclose(got, -expected, atol=ATOL):
        _fail("Your trait vector points the wrong way: it is mean(pos) - mean(neg).", section)
    if not torch.allclose(got, expected, atol=ATOL):
        _fail(f"Expected mean(pos) - mean(neg) (means over rows, dim=0).\n  expected {_short(expected)}\n  got      "
              f"{_short(got)}", section)
    _bf16_trait(fn)
    _passed("test_compute_trait_vector")


def _bf16_trait(fn, seed: int = 0) -> None:
    v = _geometry_inputs(seed)
    _stage(_DTYPES)
    _check_dtypes(fn, (v[:5].clone(), v[5:].clone()), "Section 7, Exercise 7", "compute_trait_vector")


AUC_CASES = [  # scores, positive labels, AUC
    ([3.0, 2.0, 1.0, 0.0], [True, True, False, False], 1.0),
    ([0.0, 1.0, 2.0, 3.0], [True, True, False, False], 0.0),
    ([1.0, 1.0, 1.0, 1.0], [True, False, True, False], 0.5),
    ([0.9, 0.4, 0.6, 0.1, 0.3], [True, True, False, False, False], 5 / 6),
    ([2.0, 1.0, 1.0, 0.0], [True, True, False, False], 0.875),
]


_AUC_FLOAT = "returns a Python float"
_AUC_VALUES = "the probability that a random positive outscores a random negative; ties count one half"
_AUC_EMPTY = "an empty class raises ValueError"


@check("Exercise 8")
@PROMISES(_AUC_FLOAT, _AUC_VALUES, _AUC_EMPTY)
def test_axis_auc(fn) -> None:
    section = "Section 8, Exercise 8"
    for scores, labels, expected in AUC_CASES:
        _stage(_AUC_VALUES)
        got = _call(f"axis_auc({scores}, {labels})", section, "", fn, torch.tensor(scores), torch.tensor(labels))
        _stage(_AUC_FLOAT)
        if not isinstance(got, float):
            _fail(f"axis_auc({scores}, {labels}) should be the float {expected:.4f}; got {_short(got)} "
                  f"({type(got).__name__}). Return a Python float (float(...) or .item()): the AUC goes into the "
                  "summary's JSON.", section)
        _stage(_AUC_VALUES)
        if abs(got - expected) > 1e-6:
            hint = " Ties count one half." if expected == 0.5 or expected == 0.875 else ""
            if abs(got - (1 - expected)) < 1e-6 and expected != 0.5:
                hint = " You have the classes swapped: positives should score higher for AUC 1."
            _fail(f"axis_auc({scores}, {labels}) should be the float {expected:.4f}; got {_short(got)}.{hint}", section)
    _stage(_AUC_EMPTY)
    for labels, missing in (([True, True], "negative"), ([False, False], "positive")):
        try:
            got = limited(fn, section)(torch.tensor([1.0, 2.0]), torch.tensor(labels))
        except (NotImplementedError, CheckFailure):
            raise
        except ValueError:
            continue
        except Exception as exc:
            _fail(f"With no {missing} examples you raised {type(exc).__name__}: {_clip(str(exc))}. Check both classes "
                  "for emptiness first and raise ValueError.", section, exc)
        _fail(f"With no {missing} examples AUC is undefined: raise ValueError (you returned {got!r}). Check that "
              "neither class is empty.", section)
    _passed("test_axis_auc")


# --------------------------------------------------------------------------------------------------
# Hidden checks: called only inside nbgrader's hidden-test blocks, so learners' releases never run them.
# They hold no solution either; they widen the cases of the visible checks.
# --------------------------------------------------------------------------------------------------

@PROMISES("fills and parses every one of the paper's 275 per-role judge prompts")
def hidden_test_judge_with_every_paper_prompt(fn) -> None:
    """The judge must fill every one of the paper's 275 per-role judge prompts correctly."""
    from utils.data import load_roles

    _stage("fills and parses every one of the paper's 275 per-role judge prompts")
    for name, role in load_roles().items():
        client = FakeJudgeClient("3")
        got = limited(fn)("Q?", "A.", name, client, "judge-model", eval_prompt=role.judge_prompt)
        sent = client.calls[0]["messages"][-1]["content"]
        if got != 3 or sent != role.judge_prompt.format(question="Q?", answer="A."):
            _fail(f"The paper's judge prompt for {name!r} was not filled or parsed correctly (returned {got!r}; "
                  "fill it with eval_prompt.format(question=..., answer=...)).", "Section 1, Exercise 1")
    _passed("hidden_test_judge_with_every_paper_prompt")


@PROMISES("the same means for batch sizes 1, 2, 5 and 8, and either padding side")
def hidden_test_extract_batch_sizes(fn) -> None:
    """Batched extraction must not depend on the batch size or the padding side."""
    _stage("the same means for batch sizes 1, 2, 5 and 8, and either padding side")
    tiny, tiny_tok = tiny_gemma2()
    expected = fixture("extract_expected")
    for side in ("left", "right"):
        for batch_size in (1, 2, 5, 8):
            got = limited(fn)(tiny, _with_padding_side(tiny_tok, side), copy.deepcopy(EXTRACTION_CONVERSATIONS),
                     EXTRACTION_LAYER, batch_size=batch_size)
            if not isinstance(got, torch.Tensor) or got.shape != expected.shape or \
                    not torch.allclose(got, expected, atol=ATOL, rtol=ATOL):
                shown = _rows(got, expected) if isinstance(got, torch.Tensor) and got.shape == expected.shape else \
                    f"\n  got {_short(got)}"
                _fail(f"Batched extraction is wrong with batch_size={batch_size} and {side} padding.{shown}",
                      "Section 4, Exercise 4b")
    _passed("hidden_test_extract_batch_sizes")


# --------------------------------------------------------------------------------------------------
# The dtype stages, each runnable on its own with a seed (tests/test_catalogue.py sweeps 20 seeds: a bf16
# computation must fail them whatever the data, and a float32 one pass)
# --------------------------------------------------------------------------------------------------

BF16_STAGES = {  # check -> (its bf16 stage as fn(learner_fn, seed), the promise it tests); seed 0: the check's data
    "test_extract_response_activations": (
        lambda fn, seed=0: _bf16_grad_run(fn, "Section 4, Exercise 4a", "extract_response_activations", seed=seed),
        _EX_BF16),
    "test_extract_response_activations_batched": (
        lambda fn, seed=0: _bf16_grad_run(fn, "Section 4, Exercise 4b", "extract_response_activations_batched",
                                          seed=seed, batch_size=2),
        _EX_BF16),
    "test_compute_cosine_similarity_matrix": (_bf16_cosine, _DTYPES),
    "test_compute_cosine_similarity_matrix_centered": (_bf16_centered, _DTYPES),
    "test_pca_decompose_persona_vectors": (_bf16_pca, _PCA_DTYPES),
    "test_compute_assistant_axis": (_bf16_axis, _DTYPES),
    "test_compute_trait_vector": (_bf16_trait, _DTYPES),
}
BF16_USES = {  # the references a stage swaps in, as its check does
    "test_extract_response_activations": {"format_messages": ("Exercise 3 (format_messages)",
                                                              lambda: _reference_format_messages)},
    "test_extract_response_activations_batched": {"format_messages": ("Exercise 3 (format_messages)",
                                                                      lambda: _reference_format_messages)},
}
