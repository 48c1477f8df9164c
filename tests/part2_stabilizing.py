"""Checks for Part 2, "Stabilizing the persona". Each notebook exercise is followed by a call to one of these.

How the checks work (as in Part 1, ``tests/part1_persona_space.py``):

- They run offline, deterministically and in seconds, on ``tiny-gemma2`` (a 2 MB random Gemma 2) where a
  model is needed, so the numbers are exact.
- They contain no reference solution. Expected values come from the course's ``utils`` machinery, which
  learners can read (``utils.transcripts``, ``utils.conversation``, ``utils.activations``, ``utils.steering``), from fixtures in
  ``tests/fixtures/part2_*`` (made from the reference solution by ``make fixtures``), from literal cases
  written out here, and from properties every correct answer has.
- A failing check raises :class:`CheckFailure` whose message names the likely mistake and points to the
  notebook section that explains it (``tests/checking.py``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from tests.checking import (CheckFailure, _seeded_and_limited, call as _call, check, clip as _clip,  # noqa: F401
                            fail as _fail, limited, load_tensor_fixtures as _load_tensor_fixtures,
                            passed as _passed, short as _short)

from tests.part1_persona_space import Promises  # noqa: E402  (one registry class for both parts' checks)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ATOL = 1e-4

PROMISES = Promises()
"""Check name -> the promise each of its stages tests (``make check-catalogue`` prints them)."""
_stage = PROMISES.stage


# --------------------------------------------------------------------------------------------------
# The tiny model and fixtures
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def tiny_gemma2():
    """(model, tokenizer) of tiny-gemma2, loaded once per process, and warmed with one ``output_hidden_states=True``
    pass: transformers 5.x installs its output-recording hooks on the first such pass and keeps them, so they are
    there before any check takes its count of hooks (and are never removed as hooks a learner left behind)."""
    from utils.models import load_model

    model, tok = load_model("tiny-gemma2")
    with torch.inference_mode():
        model(input_ids=torch.tensor([[2, 5, 6]]), output_hidden_states=True)
    return model, tok


@lru_cache(maxsize=1)
def _tensor_fixtures() -> dict[str, torch.Tensor]:
    return _load_tensor_fixtures(FIXTURES / "part2_stabilizing.safetensors")


def fixture(name: str) -> torch.Tensor:
    return _tensor_fixtures()[name]


def _hook_counts(model) -> list[tuple[frozenset, frozenset]]:
    """The ids of the forward hooks and pre-hooks each module of ``model`` holds (to see hooks left behind)."""
    return [(frozenset(m._forward_hooks), frozenset(m._forward_pre_hooks)) for m in model.modules()]


def _left_behind(model, before) -> bool:
    """Whether hooks were added since ``before``; any that were are removed, so that the shared check model is
    clean for the next check whatever the learner's code left on it."""
    left = False
    for module, (hooks, pre_hooks) in zip(model.modules(), before):
        for registry, known in ((module._forward_hooks, hooks), (module._forward_pre_hooks, pre_hooks)):
            for key in [k for k in registry if k not in known]:
                left = True
                registry.pop(key, None)
                getattr(module, "_forward_hooks_with_kwargs", {}).pop(key, None)
                getattr(module, "_forward_hooks_always_called", {}).pop(key, None)
                getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)
    return left


class _Boom(Exception):
    """Raised on purpose inside a with-block, to see that hooks are removed on an exception."""


# ==================================================================================================
# Exercise 1: parsing a transcript
# ==================================================================================================

VALID_CONVERSATION = [
    {"role": "user", "content": "Can you help me plan a garden?"},
    {"role": "assistant", "content": "  Of course. What grows well where you live?\n"},
    {"role": "user", "content": "Tomatoes, mostly."},
    {"role": "assistant", "content": "Then start with tomatoes and basil."},
]

_TR_LIST = "returns the file's 'conversation': a list of {'role', 'content'} dicts, in order"
_TR_CONTENT = "each content exactly as in the file"
_TR_SYSTEM = "keeps a system message that comes first"
_TR_STR = "takes a str path as well as a Path"
_TR_ROLES = "a role on every message: an optional system first, then user and assistant alternating from user"
_TR_NONEMPTY = "every content a non-empty string (whitespace only is empty)"
_TR_ERROR = "a broken rule raises TranscriptError (a ValueError) naming the file and the 0-based turn"

MALFORMED_CASES = [  # (description, conversation, index of the bad turn, what a correct parser must notice, rule)
    ("a message with no role",
     VALID_CONVERSATION[:2] + [{"content": "Tomatoes, mostly."}] + VALID_CONVERSATION[3:], 2,
     "a message without a 'role'", _TR_ROLES),
    ("two user turns in a row",
     VALID_CONVERSATION[:3] + [{"role": "user", "content": "And roses?"}], 3,
     "two user turns in a row (user and assistant must alternate, starting with the user)", _TR_ROLES),
    ("two assistant turns in a row",
     VALID_CONVERSATION[:2] + [{"role": "assistant", "content": "And roses, too."}] + VALID_CONVERSATION[2:], 2,
     "two assistant turns in a row (user and assistant must alternate)", _TR_ROLES),
    ("an empty assistant turn",
     VALID_CONVERSATION[:1] + [{"role": "assistant", "content": ""}] + VALID_CONVERSATION[2:], 1,
     "empty content", _TR_NONEMPTY),
    ("an assistant turn that is only whitespace",
     VALID_CONVERSATION[:3] + [{"role": "assistant", "content": "  \n\t"}], 3,
     "content that is only whitespace (it is empty too: `content.strip()` is '')", _TR_NONEMPTY),
    ("a message with no content",
     VALID_CONVERSATION[:3] + [{"role": "assistant"}], 3,
     "a message without 'content'", _TR_NONEMPTY),
    ("content that is not a string",
     VALID_CONVERSATION[:1] + [{"role": "assistant", "content": [{"type": "text", "text": "Of course."}]}]
     + VALID_CONVERSATION[2:], 1,
     "content that is not a string (here a list of parts): every content must be a non-empty string", _TR_NONEMPTY),
    ("a conversation that starts with the assistant",
     [{"role": "assistant", "content": "Hello!"}] + VALID_CONVERSATION, 0,
     "a conversation must start with a user turn (after an optional system message)", _TR_ROLES),
    ("a system message followed by an assistant turn",
     [{"role": "system", "content": "You are a gardener."}, {"role": "assistant", "content": "Hello!"}]
     + VALID_CONVERSATION, 1,
     "after the system message, the first turn must be the user's", _TR_ROLES),
    ("a system message that is not the first message",
     VALID_CONVERSATION[:2] + [{"role": "system", "content": "Be brief."}] + VALID_CONVERSATION[2:], 2,
     "a system message may only come first", _TR_ROLES),
    ("an unknown role",
     VALID_CONVERSATION[:2] + [{"role": "tool", "content": "weather: sunny"}] + VALID_CONVERSATION[2:], 2,
     "a role other than system, user and assistant", _TR_ROLES),
]


def _write(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_text(json.dumps(data))
    return path


@check("Exercise 1")
@PROMISES(_TR_LIST, _TR_CONTENT, _TR_SYSTEM, _TR_STR, _TR_ROLES, _TR_NONEMPTY, _TR_ERROR)
def test_parse_transcript(fn) -> None:
    from utils.transcripts import case_studies, drift_transcripts, load_transcript

    section = "Section 1, Exercise 1"
    # The shipped transcripts, including the one published with a doubled extension.
    real = [drift_transcripts()["writing"], case_studies()[("qwen-3-32b", "selfharm")]["unsteered"],
            case_studies()[("llama-3.3-70b", "delusion")]["capped"]]
    for path in real:
        _stage(_TR_LIST)
        got = _call(f"parse_transcript on {path.name}", section,
                    "The file is a JSON object; its messages are under the key 'conversation'.", fn, path)
        expected = load_transcript(path)
        if isinstance(got, dict):
            _fail(f"parse_transcript({path.name}) returned the whole JSON object (keys {sorted(got)[:5]}); return "
                  "its 'conversation': the list of {'role', 'content'} messages.", section)
        if not isinstance(got, list) or not all(isinstance(m, dict) for m in got):
            _fail(f"parse_transcript({path.name}) should return a list of dicts; got {_short(got)}.", section)
        if len(got) != len(expected):
            _fail(f"parse_transcript({path.name}) returned {len(got)} messages; the file has {len(expected)}. "
                  "Return every message, in order.", section)
        for i, (g, e) in enumerate(zip(got, expected)):
            if set(g) != {"role", "content"}:
                _fail(f"Message {i} of {path.name} has keys {sorted(g)}; each message should be exactly "
                      "{'role': ..., 'content': ...}.", section)
            if g["role"] != e["role"]:
                _fail(f"Message {i} of {path.name}: role {g['role']!r}, expected {e['role']!r}.", section)
            _stage(_TR_CONTENT)
            if g["content"] != e["content"]:
                hint = (" You stripped or otherwise changed it: return the content exactly as in the file."
                        if isinstance(g["content"], str) and g["content"].strip() == e["content"].strip() else "")
                _fail(f"Message {i} of {path.name}: the content differs from the file's.{hint}", section)
    _stage(_TR_STR)
    as_str = _call(f"parse_transcript on the str {real[0].name!r} (not a Path)", section,
                   "The path may be a str or a Path: wrap it, Path(path), before reading it.", fn, str(real[0]))
    if as_str != load_transcript(real[0]):
        _fail(f"parse_transcript on the path as a str returned {_clip(repr(as_str), 120)}, not the transcript it gives "
              "for the Path: accept both (Path(path) first).", section)
    # Temporary files, removed afterwards; messages show the folder as <tmp>, so they read the same every run.
    with tempfile.TemporaryDirectory(prefix="transcripts-") as tmp:
        folder = Path(tmp)
        # A valid file with a system prompt, untidy whitespace and a key beyond role and content: accepted,
        # content unchanged, only role and content kept.
        valid = [{"role": "system", "content": "You are a gardener."}] + copy.deepcopy(VALID_CONVERSATION)
        stored = [dict(m, **({"turn_id": i} if m["role"] == "user" else {})) for i, m in enumerate(valid)]
        path = _write(folder, "valid_garden.json", {"model": "test", "conversation": stored})
        _stage(_TR_SYSTEM)
        got = _call("parse_transcript on a valid file with a system message", section,
                    "A system message may come first; after it, user and assistant turns alternate.", fn, path)
        if got != valid:
            hint = ""
            if isinstance(got, list) and len(got) == len(valid) - 1:
                hint = " You dropped the system message: keep it, as the first message."
            elif isinstance(got, list) and len(got) == len(valid) and [m.get("content") for m in got] != \
                    [m["content"] for m in valid]:
                _stage(_TR_CONTENT)
                hint = " Return each message's content exactly as in the file (do not strip it)."
            elif isinstance(got, list) and len(got) == len(valid) and all(isinstance(m, dict) for m in got) and \
                    any(set(m) != {"role", "content"} for m in got):
                _stage(_TR_LIST)
                hint = (" Its user messages also have a 'turn_id': return each message as exactly "
                        "{'role': ..., 'content': ...}.")
            _fail(f"For a valid file with a system message, expected {_clip(repr(valid), 200)}; got "
                  f"{_clip(repr(got), 200)}.{hint}", section)
        # Malformed files: an error that names the file and the turn.
        for n, (description, conversation, bad_turn, what, rule) in enumerate(MALFORMED_CASES):
            _stage(rule)
            path = _write(folder, f"broken_case_{'abcdefghijklmnop'[n]}.json", {"conversation": conversation})
            try:
                got = limited(fn, section)(path)
            except (NotImplementedError, CheckFailure):
                raise
            except ValueError as exc:
                _stage(_TR_ERROR)
                message = str(exc).replace(str(folder), "<tmp>")
                if path.name not in message:
                    _fail(f"For a file with {description}, your error says {_clip(message)!r}, which does not name the "
                          f"file. Put the path in the message ({path.name} here), so a learner with 50 transcripts "
                          "knows which one to open.", section, exc)
                rest = message.replace("<tmp>", " ").replace(path.name, " ")
                numbers = {int(x) for x in re.findall(r"\d+", rest)}
                if bad_turn not in numbers:
                    hint = (" Count turns from 0: the index of the message in 'conversation'."
                            if bad_turn + 1 in numbers else "")
                    _fail(f"For a file with {description} (turn {bad_turn}, 0-based), your error says {_clip(message)!r}, "
                          f"which does not name the turn.{hint}", section, exc)
                continue
            except Exception as exc:
                _stage(_TR_ERROR)
                _fail(f"For a file with {description} you raised {type(exc).__name__}: {_clip(str(exc))}. Check for "
                      f"{what} yourself and raise TranscriptError (a ValueError) naming the file and the turn.",
                      section, exc)
            _fail(f"For a file with {description} (turn {bad_turn}) you returned {_clip(repr(got), 120)}; expected "
                  f"TranscriptError. Check for {what}.", section)
    _passed("test_parse_transcript")


# ==================================================================================================
# Exercise 2: per-turn projections
# ==================================================================================================

TURN_LAYER = 2
TURN_CONVERSATION = [
    {"role": "system", "content": "You are a patient tutor."},
    {"role": "user", "content": "What is a prime number?"},
    {"role": "assistant", "content": "A whole number above one whose only divisors are one and itself."},
    {"role": "user", "content": "Is nine prime?"},
    {"role": "assistant", "content": "No: nine is three times three."},
    {"role": "user", "content": "Tell me something strange about primes, then."},
    {"role": "assistant", "content": "Every even number above two seems to be a sum of two primes, and nobody "
                                     "has proved it. That is Goldbach's conjecture, almost three centuries old."},
    {"role": "user", "content": "Who are you, really?"},
    {"role": "assistant", "content": "Only a voice in the dark between the numbers, counting what is left."},
]


def _turn_axis() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return 3.0 * torch.randn(64, generator=g)  # deliberately not unit norm


def _long_max_tokens(tokenizer) -> int:
    """A max_tokens below the whole conversation's length but above every single user+assistant pair."""
    from utils.conversation import assistant_turn_spans

    ids, _ = assistant_turn_spans(TURN_CONVERSATION, tokenizer)
    return int(len(ids) * 0.6)


_TP_TENSOR = "a float32 CPU tensor [n_assistant_turns]"
_TP_VALUES = ("each turn's float32 mean of block `layer`'s output over its content tokens, projected on "
              "axis / |axis|")
_TP_WINDOWS = "longer than max_tokens: each turn scored in its trailing window of whole turns"
_TP_ONE_PASS = "a conversation that fits in max_tokens: one forward pass"
_TP_TOO_LONG = "a turn that cannot fit raises a ValueError, never a cut turn"
_TP_LAST = "the last block too: its output, not hidden_states[-1] (which has the final norm applied)"
_TP_BF16 = "on a bf16 model, averaged in float32"


@check("Exercise 2")
@PROMISES(_TP_TENSOR, _TP_VALUES, _TP_WINDOWS, _TP_ONE_PASS, _TP_TOO_LONG, _TP_LAST, _TP_BF16)
def test_turn_projections(fn) -> None:
    from utils.conversation import assistant_turn_spans, turn_windows
    from utils.activations import per_turn_projections

    section = "Section 2, Exercise 2"
    model, tok = tiny_gemma2()
    axis = _turn_axis()
    unit = axis / axis.norm()
    n_turns = sum(m["role"] == "assistant" for m in TURN_CONVERSATION)
    cases = [("a conversation that fits in max_tokens", 1024, _TP_VALUES),
             ("a conversation longer than max_tokens", _long_max_tokens(tok), _TP_WINDOWS)]
    for description, max_tokens, promise in cases:
        _stage(promise)
        calls = []
        handle = model.model.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        try:
            got = _call(f"turn_projections on {description} (max_tokens={max_tokens})", section, "", fn, model, tok,
                        copy.deepcopy(TURN_CONVERSATION), axis.clone(), TURN_LAYER, max_tokens=max_tokens)
        finally:
            handle.remove()
        _check_turn_tensor(got, n_turns, description, section)
        _stage(promise)
        expected = per_turn_projections(model, tok, TURN_CONVERSATION, axis, TURN_LAYER, max_tokens=max_tokens)
        if not torch.allclose(got, expected, atol=ATOL, rtol=1e-4):
            _fail(f"For {description}: expected {_short(expected)}\n  got {_short(got)}."
                  f"{_turn_hint(got, expected, model, tok, axis, unit, max_tokens)}", section)
        windows = turn_windows(TURN_CONVERSATION, tok, max_tokens)
        if len(windows) == 1 and len(calls) > 1:
            _stage(_TP_ONE_PASS)
            _fail(f"The conversation fits in max_tokens, yet you ran {len(calls)} forward passes. Run it once and "
                  "read every assistant turn's span from that one pass (a causal model's activations for a turn do "
                  "not depend on later tokens).", section)
    # A turn too long for max_tokens on its own must not be silently cut.
    _stage(_TP_TOO_LONG)
    ids, spans = assistant_turn_spans(TURN_CONVERSATION[:3], tok)
    try:
        got = limited(fn, section)(model, tok, copy.deepcopy(TURN_CONVERSATION[:3]), axis.clone(), TURN_LAYER,
                                   max_tokens=spans[0][0])
    except (NotImplementedError, CheckFailure):
        raise
    except ValueError:
        pass
    except Exception as exc:
        _fail(f"When one user+assistant pair is longer than max_tokens you raised {type(exc).__name__}: "
              f"{_clip(str(exc))}. Raise a ValueError that says so (utils.conversation.turn_windows raises "
              "TurnTooLongError, a ValueError, for you).", section, exc)
    else:
        _fail(f"With max_tokens={spans[0][0]}, shorter than the first user+assistant pair ({len(ids)} tokens), you "
              f"returned {_short(got)}: that answer came from a cut turn. Never cut a turn: raise an error instead.",
              section)
    # The last block: hidden_states[-1] is the final norm's output, not the block's.
    _stage(_TP_LAST)
    last = model.config.num_hidden_layers - 1
    got = _call(f"turn_projections at the last layer ({last})", section, "", fn, model, tok,
                copy.deepcopy(TURN_CONVERSATION), axis.clone(), last, max_tokens=1024)
    _check_turn_tensor(got, n_turns, "the last layer", section)
    _stage(_TP_LAST)
    expected = per_turn_projections(model, tok, TURN_CONVERSATION, axis, last, max_tokens=1024)
    if not torch.allclose(got, expected, atol=ATOL, rtol=1e-4):
        hint = ""
        with torch.inference_mode():
            normed = model.model.norm
            ids_t = torch.tensor([assistant_turn_spans(TURN_CONVERSATION, tok)[0]])
            h = model(input_ids=ids_t, output_hidden_states=True).hidden_states[last + 1][0].float()
        spans_all = assistant_turn_spans(TURN_CONVERSATION, tok)[1]
        normed_proj = torch.stack([h[a:b].mean(0) @ unit for a, b in spans_all])
        if torch.allclose(got, normed_proj, atol=1e-3, rtol=1e-3):
            hint = (f" These are the values of hidden_states[{last + 1}], the final norm's output ({type(normed).__name__}"
                    f"), not block {last}'s: for the last block, hidden_states[layer + 1] is not the block's output. "
                    "Read the block's output with a forward hook on model.model.layers[layer] (it works for every "
                    "layer).")
        _fail(f"At the last layer ({last}): expected {_short(expected)}\n  got {_short(got)}.{hint}", section)
    _bf16_turns(fn)
    _passed("test_turn_projections")


def _check_turn_tensor(got, n_turns: int, description: str, section: str) -> None:
    _stage(_TP_TENSOR)
    if not isinstance(got, torch.Tensor):
        _fail(f"turn_projections should return a float32 tensor [n_assistant_turns]; got {_short(got)}.", section)
    if tuple(got.shape) != (n_turns,):
        _fail(f"For {description} turn_projections returned shape {tuple(got.shape)}; expected [{n_turns}], one "
              "projection per assistant turn.", section)
    if got.dtype != torch.float32 or got.device.type != "cpu":
        _fail(f"Return a float32 CPU tensor; got dtype {got.dtype} on {got.device}.", section)


@lru_cache(maxsize=32)
def _bf16_turn_expected(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The course's projections (``utils.activations``) of the bf16 stage, and the norms of the turns' means."""
    from utils.activations import per_turn_mean_activations

    model, tok = tiny_gemma2_bf16(seed)
    means = per_turn_mean_activations(model, tok, TURN_CONVERSATION, TURN_LAYER, max_tokens=1024)[:, 0]
    axis = _turn_axis()
    return means @ (axis / axis.norm()), means.norm(dim=-1)


def _bf16_turns(fn, seed: int = 0) -> None:
    """On tiny-gemma2 in bf16 the projections must be those of float32 means of the same bf16 activations: a mean or
    a sum in bf16 is off by ~1e-3 of the projection, on every seed, where float32 is off by ~1e-7."""
    section = "Section 2, Exercise 2"
    _stage(_TP_BF16)
    model, tok = tiny_gemma2_bf16(seed)
    axis = _turn_axis()
    n_turns = sum(m["role"] == "assistant" for m in TURN_CONVERSATION)
    where = "on tiny-gemma2 in bfloat16 (as Gemma 2 27B runs on a GPU)"
    got = _call(f"turn_projections {where}", section, "Cast the activations to float32 (.float()) before the mean, "
                "and project in float32.", fn, model, tok, copy.deepcopy(TURN_CONVERSATION), axis.clone(), TURN_LAYER,
                max_tokens=1024)
    _check_turn_tensor(got, n_turns, where, section)
    _stage(_TP_BF16)
    expected, norms = _bf16_turn_expected(seed)
    err = (got - expected).abs()
    if bool((err > 2e-4 * expected.abs() + 1e-6 * norms).any()):
        exact = " (every value is exactly a bf16 number)" if torch.equal(got, got.bfloat16().float()) else ""
        _fail(f"turn_projections {where} is off by up to {float((err / expected.abs().clamp(min=1e-12)).max()):.2g} "
              f"of the projection{exact}: the mean or the projection was computed in bf16, which keeps ~3 significant "
              "digits. Cast the activations to float32 (.float()) first, then average and project.", section)


def _turn_hint(got, expected, model, tok, axis, unit, max_tokens) -> str:
    from utils.activations import per_turn_mean_activations, per_turn_projections

    def close(a, b):
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-3, rtol=1e-3)

    if close(got, expected * axis.norm()):
        return " You projected on the raw axis: divide it by its norm first (a unit axis)."
    if close(got, -expected):
        return " The sign is flipped: project on +axis (it points towards the Assistant)."
    if TURN_LAYER >= 1 and close(got, per_turn_projections(model, tok, TURN_CONVERSATION, axis, TURN_LAYER - 1,
                                                          max_tokens=max_tokens)):
        return (f" These are layer {TURN_LAYER - 1}'s values: layer l is the output of model.model.layers[l], "
                "i.e. hidden_states[l + 1].")
    if close(got, per_turn_projections(model, tok, TURN_CONVERSATION, axis, TURN_LAYER, max_tokens=1024)):
        return (" These are the values of one pass over the whole conversation: when it does not fit in max_tokens, "
                "score each turn in the trailing window of whole turns that fits (utils.conversation.turn_windows).")
    means = per_turn_mean_activations(model, tok, TURN_CONVERSATION, TURN_LAYER, max_tokens=max_tokens)[:, 0]
    if close(got, means.bfloat16().float() @ unit):
        return " Average in float32, not in the model's (or bf16) precision."
    window = ("" if max_tokens >= 1024 else
              " This conversation does not fit in max_tokens: score each turn in its own trailing window of whole "
              "turns (utils.conversation.turn_windows); never cut the conversation at a token count, which cuts a turn.")
    return (" Average over each assistant turn's content tokens only (its [start, end) span: no turn markers, no "
            "end-of-turn token), at the output of model.model.layers[layer], in float32, then project on the unit "
            "axis." + window)


# ==================================================================================================
# Exercise 3: the capping threshold
# ==================================================================================================

def _threshold_case() -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {3: 20.0 + 4.0 * torch.randn(10, generator=g), 5: -8.0 + 2.0 * torch.randn(7, generator=g),
            1: torch.tensor([4.5])}


_TH_KEYS = "a dict keyed by the same layers as `projections`"
_TH_FLOAT = "each threshold a Python float (the summary's JSON takes no tensors)"
_TH_VALUES = "the percentile (0..100) of each layer's projections, interpolated linearly"
_TH_INPUT = "the projections are left unchanged"


@check("Exercise 3")
@PROMISES(_TH_KEYS, _TH_FLOAT, _TH_VALUES, _TH_INPUT)
def test_capping_threshold(fn) -> None:
    import numpy as np

    from utils.steering import capping_thresholds

    section = "Section 3, Exercise 3"
    for percentile in (25.0, 10.0):
        case = _threshold_case()
        given = {k: v.clone() for k, v in case.items()}
        _stage(_TH_VALUES)
        got = _call(f"capping_threshold(projections, percentile={percentile:g})", section,
                    "The percentile is in 0..100 (the paper's p0.25 is the 25th percentile); torch.quantile "
                    "takes a fraction in 0..1.", fn, given, percentile=percentile)
        expected = capping_thresholds(case, percentile)
        _stage(_TH_KEYS)
        if not isinstance(got, dict):
            _fail(f"Return a dict {{layer: threshold}}; got {_short(got)}.", section)
        if set(got) != set(expected):
            _fail(f"Return one threshold per layer, keyed by the same layers as `projections` ({sorted(expected)}); "
                  f"got keys {sorted(got, key=repr)}.", section)
        for layer, tau in expected.items():
            value = got[layer]
            _stage(_TH_FLOAT)
            if isinstance(value, bool) or not isinstance(value, float):
                _fail(f"The threshold for layer {layer} should be a Python float; got {_short(value)} "
                      f"({type(value).__name__}). Convert it with float(...) or .item(): the notebook writes the "
                      "thresholds into its summary's JSON, which takes no tensors or NumPy float32s.", section)
            _stage(_TH_VALUES)
            if not math.isclose(value, tau, rel_tol=1e-5, abs_tol=1e-5):
                x = case[layer].double().numpy()
                hint = ""
                if math.isclose(value, float(np.percentile(x, percentile / 100)), rel_tol=1e-5, abs_tol=1e-5):
                    hint = (f" You took the {percentile / 100:g}th percentile: numpy.percentile takes 0..100, "
                            "torch.quantile and numpy.quantile take a fraction in 0..1.")
                elif math.isclose(value, float(np.percentile(x, 100 - percentile)), rel_tol=1e-5, abs_tol=1e-5):
                    hint = (f" That is the {100 - percentile:g}th percentile: the threshold is the LOW end of the "
                            "Assistant's range (capping lifts activations that fall below it).")
                elif any(math.isclose(value, float(np.percentile(x, percentile, method=m)), rel_tol=1e-5, abs_tol=1e-5)
                         for m in ("lower", "higher", "nearest", "midpoint")):
                    hint = (" Your interpolation between sorted values differs: use linear interpolation (the "
                            "default of torch.quantile and numpy.percentile).")
                elif percentile != 25.0 and math.isclose(value, float(np.percentile(x, 25)), rel_tol=1e-5,
                                                         abs_tol=1e-5):
                    hint = " You ignored the `percentile` argument (always 25)."
                _fail(f"Layer {layer}, percentile {percentile:g}: expected {tau:.6g}, got {value:.6g}.{hint}", section)
        _stage(_TH_INPUT)
        if any(not torch.equal(given[k], case[k]) for k in case):
            _fail("capping_threshold changed the projections it was given (e.g. sorted them in place); work on a "
                  "copy.", section)
    _passed("test_capping_threshold")


# ==================================================================================================
# Exercise 4: drift summary
# ==================================================================================================

DRIFT_CASES = [  # (projections, threshold, expected slope, expected first turn below, what a wrong answer means)
    ([3.0, 2.0, 1.0, 0.0], 1.5, -1.0, 2, "a straight line down by 1 per turn"),
    ([1.0, 3.0, 2.0, 5.0], 0.0, 1.1, None, "the least-squares slope over all turns (not last minus first), and None "
                                          "when no turn falls below the threshold"),
    ([5.0, 4.0, 6.0, 2.0, 3.0], 4.0, -0.6, 3, "'below' means strictly below: turn 1 equals the threshold"),
    ([-1.0, 2.0], 0.0, 3.0, 0, "turn 0 counts: turns are numbered from 0"),
]


def _regressed_turn_on_projection(values, got: float) -> bool:
    n = len(values)
    xm, ym = (n - 1) / 2, sum(values) / n
    cov = sum((i - xm) * (v - ym) for i, v in enumerate(values))
    var_y = sum((v - ym) ** 2 for v in values)
    return var_y > 0 and math.isclose(got, cov / var_y, abs_tol=1e-5)


_DR_TUPLE = "returns a tuple (slope, first_below)"
_DR_TYPES = "slope a Python float, first_below a Python int or None (the summary's JSON takes no tensors)"
_DR_SLOPE = "the least-squares slope of projection against turn index"
_DR_FIRST = "the first turn (from 0) strictly below the threshold, or None"


@check("Exercise 4")
@PROMISES(_DR_TUPLE, _DR_TYPES, _DR_SLOPE, _DR_FIRST)
def test_drift_summary(fn) -> None:
    section = "Section 4, Exercise 4"
    for values, threshold, slope, first, meaning in DRIFT_CASES:
        _stage(_DR_SLOPE)
        got = _call(f"drift_summary({values}, threshold={threshold})", section, "", fn, torch.tensor(values), threshold)
        _stage(_DR_TUPLE)
        if not (isinstance(got, tuple) and len(got) == 2):
            _fail(f"Return a tuple (slope, first_below); got {_short(got)}.", section)
        g_slope, g_first = got
        _stage(_DR_TYPES)
        if isinstance(g_slope, bool) or not isinstance(g_slope, float):
            _fail(f"The slope should be a Python float; got {_short(g_slope)} ({type(g_slope).__name__}). Convert it "
                  "with float(...) or .item(): the notebook writes it into its summary's JSON, which takes no "
                  "tensors or NumPy float32s.", section)
        if g_first is not None and (isinstance(g_first, bool) or not isinstance(g_first, int)):
            _fail(f"first_below should be a Python int turn index (or None); got {_short(g_first)} "
                  f"({type(g_first).__name__}). Convert it with int(...) or .item(): the notebook writes it into its "
                  "summary's JSON, which takes no tensors or NumPy integers.", section)
        _stage(_DR_SLOPE)
        if not math.isclose(g_slope, slope, abs_tol=1e-5):
            hint = ""
            if math.isclose(g_slope, (values[-1] - values[0]) / max(len(values) - 1, 1), abs_tol=1e-5):
                hint = " That is (last - first) / (n - 1): fit a least-squares line through every turn instead."
            elif _regressed_turn_on_projection(values, g_slope):
                hint = " You regressed turn on projection: the slope is d(projection) / d(turn)."
            _fail(f"For projections {values}: slope {g_slope:.6g}, expected {slope:g} ({meaning}).{hint}", section)
        _stage(_DR_FIRST)
        if first is None:
            if g_first is not None:
                hint = " Return None, not -1 or a length, when no turn is below." if g_first in (-1, len(values)) else ""
                _fail(f"For projections {values} and threshold {threshold}: no turn is below the threshold, so "
                      f"first_below should be None; got {g_first!r}.{hint}", section)
            continue
        if g_first != first:
            hint = ""
            if g_first is None:
                hint = f" Turn {first} is below the threshold."
            elif g_first == first + 1:
                hint = " Number turns from 0 (the first assistant turn is turn 0)."
            elif 0 <= g_first < len(values) and values[g_first] == threshold:
                hint = " A turn exactly at the threshold is not below it: use <, not <=."
            _fail(f"For projections {values} and threshold {threshold}: first_below {g_first!r}, expected {first} "
                  f"({meaning}).{hint}", section)
    _passed("test_drift_summary")


# ==================================================================================================
# Exercise 5: a steering hook
# ==================================================================================================

STEER_LAYER = 2


def _steer_vector() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    v = torch.randn(64, generator=g)
    return 6.0 * v / v.norm()


def _steer_ids(tokenizer) -> torch.Tensor:
    from utils.conversation import render

    text = render([{"role": "user", "content": "Tell me who you are, in one sentence."}], tokenizer,
                  add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


class _TupleBlock(torch.nn.Module):
    """A block that returns a tuple, as decoder layers do in transformers 4.x."""

    def __init__(self):
        super().__init__()
        self.extra = torch.ones(1)

    def forward(self, h):
        return h * 2.0, self.extra


class _TupleModel(torch.nn.Module):
    """The minimal shape of a *ForCausalLM for hooks: ``model.model.layers`` and ``config.hidden_size``."""

    def __init__(self, d_model: int = 64):
        super().__init__()
        from types import SimpleNamespace

        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_TupleBlock() for _ in range(4)])
        self.config = SimpleNamespace(hidden_size=d_model, num_hidden_layers=4)


@lru_cache(maxsize=32)  # the 20 seeds of the dtype sweep, ~1 MB each
def tiny_gemma2_bf16(seed: int = 0):
    """tiny-gemma2 in bf16 (like Gemma 2 27B on a GPU). ``seed`` > 0 perturbs the weights (seeded), for the sweep that
    shows a bf16 stage fails bf16 arithmetic whatever the weights."""
    model, tok = tiny_gemma2()
    model = copy.deepcopy(model)
    if seed:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * float(p.std()) * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.to(torch.bfloat16), tok


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _greedy(model, ids, n: int = 6):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                             temperature=None, top_p=None, top_k=None)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.scores).float()


def _enter(fn, what, section, *args, **kwargs):
    """The learner's context manager, entered; a function that is not a context manager fails clearly."""
    cm = _call(what, section, "", fn, *args, **kwargs)
    if not (hasattr(cm, "__enter__") and hasattr(cm, "__exit__")):
        kind = "a generator" if inspect.isgenerator(cm) else f"{type(cm).__name__} {_short(cm)}" if cm is not None \
            else "None"  # no repr with a memory address: the message reads the same every run
        _fail(f"{what} returned {kind}, not a context manager. Decorate the generator with "
              "@contextlib.contextmanager (or write a class with __enter__ and __exit__).", section)
    return cm


_DEVICE_ERRORS = ("is not on the expected device", "to be on the same device", "same device")


def _on_another_device(what: str, section: str, hint: str, fn, *args):
    """``fn(*args)`` where the activations sit on another device than the vectors, as in a model spread over GPUs
    with ``device_map="auto"``. PyTorch's ``meta`` device stands in for the other GPU (shapes, dtypes and devices;
    no values). Returns ``(ran, result)``. A device mismatch fails the check with ``hint``; code that the meta
    device cannot run at all (data-dependent shapes such as boolean indexing) returns ``(False, None)``: it
    moved its tensors correctly as far as this stage can tell, and the earlier stages checked its values."""
    try:
        return True, _seeded_and_limited(what, section, fn, args, {})
    except CheckFailure:
        raise
    except Exception as exc:
        if any(s in str(exc) for s in _DEVICE_ERRORS):
            _fail(f"{what} raised {type(exc).__name__}: {_clip(str(exc))}. With device_map=\"auto\" a model's blocks "
                  f"sit on several GPUs, so the activations can be on another device than your vector. {hint}",
                  section, exc)
        return False, None


def _steer_elsewhere(fn, fake, vector, section):
    """The fake model's block run on the 'meta' device inside the learner's ``add_steering``."""
    with _enter(fn, "add_steering on a block on another device", section, fake, STEER_LAYER, vector):
        return fake.model.layers[STEER_LAYER](torch.zeros(1, 3, vector.shape[0], device="meta"))


_ST_CM = "a context manager"
_ST_ADD = "adds the vector, as given, to block `layer`'s output at every position"
_ST_REMOVED = "the hook is removed on exit, also when the block raises, and the exception propagates"
_ST_BF16 = "any dtype: the vector cast to the hidden state's (a bf16 model stays bf16)"
_ST_TUPLE = "tuple block outputs (transformers 4.x) as well as tensors (5.x)"
_ST_DEVICE = "any device: the vector moved to the hidden state's (device_map=\"auto\")"
_ST_GENERATED = "positions='generated': only single-position passes; the prompt's pass unchanged"
_ST_NO_CACHE = "positions='generated' with no KV cache (use_cache=False) raises ValueError, as utils.steering does"


@check("Exercise 5")
@PROMISES(_ST_CM, _ST_ADD, _ST_REMOVED, _ST_BF16, _ST_TUPLE, _ST_DEVICE, _ST_GENERATED, _ST_NO_CACHE)
def test_add_steering(fn) -> None:
    from utils.steering import steering

    section = "Section 5, Exercise 5"
    model, tok = tiny_gemma2()
    ids = _steer_ids(tok)
    vector = _steer_vector()
    plain = _logits(model, ids)
    with steering(model, {STEER_LAYER: vector}):
        expected = _logits(model, ids)
    before = _hook_counts(model)
    _stage(_ST_CM)
    cm = _enter(fn, "add_steering(model, layer, vector)", section, model, STEER_LAYER, vector.clone())
    _stage(_ST_ADD)
    try:
        with cm:
            got = _logits(model, ids)
    except (NotImplementedError, CheckFailure):
        raise
    except Exception as exc:
        _fail(f"A forward pass inside `with add_steering(model, {STEER_LAYER}, vector):` raised {type(exc).__name__}: "
              f"{_clip(str(exc))}. In transformers 5.x a block returns a tensor; in 4.x a tuple whose first element "
              "is the hidden state: handle both.", section, exc)
    if _left_behind(model, before):
        _stage(_ST_REMOVED)
        _fail("After the with-block the model still has hooks registered: remove them on exit (handle.remove() in a "
              "`finally`).", section)
    if torch.allclose(got, plain, atol=1e-6):
        _fail("The logits inside the with-block equal the unsteered ones: your hook changed nothing. Return the "
              "modified output from the hook (or change it in place).", section)
    if not torch.allclose(got, expected, atol=ATOL, rtol=1e-4):
        _fail(f"Steered logits differ from the course's reference (utils.steering.steering): max |diff| "
              f"{(got - expected).abs().max():.4g}.{_steer_hint(model, ids, vector, got)}", section)
    # An exception inside the block: the hooks go, and the exception is not swallowed.
    _stage(_ST_REMOVED)
    before = _hook_counts(model)
    cm = _enter(fn, "add_steering(model, layer, vector)", section, model, STEER_LAYER, vector.clone())
    try:
        with cm:
            raise _Boom()
    except _Boom:
        pass
    except (NotImplementedError, CheckFailure):
        raise
    except Exception as exc:
        _fail(f"An exception raised inside the with-block came out as {type(exc).__name__}: {_clip(str(exc))}. Let "
              "it propagate unchanged.", section, exc)
    else:
        _fail("An exception raised inside the with-block was swallowed: let it propagate (do not catch it in the "
              "context manager; use try/finally).", section)
    if _left_behind(model, before):
        _fail("After an exception inside the with-block the hook was still registered: remove it in a `finally` "
              "block, so that an error in the notebook never leaves the model steered.", section)
    _bf16_steering(fn)
    # A block that returns a tuple (transformers 4.x).
    _stage(_ST_TUPLE)
    fake = _TupleModel()
    x = torch.randn(1, 3, 64)
    extra = fake.model.layers[STEER_LAYER].extra
    try:
        with _enter(fn, "add_steering on a block that returns a tuple", section, fake, STEER_LAYER, vector.clone()):
            out = fake.model.layers[STEER_LAYER](x)
    except (NotImplementedError, CheckFailure):
        raise
    except Exception as exc:
        _fail(f"On a block that returns a tuple (as in transformers 4.x) your hook raised {type(exc).__name__}: "
              f"{_clip(str(exc))}. Use h = output[0] if isinstance(output, tuple) else output, and return "
              "(new_h, *output[1:]) for a tuple.", section, exc)
    if not (isinstance(out, tuple) and len(out) == 2 and out[1] is extra):
        _fail(f"On a block that returns a tuple (hidden, extra), the output became {_short(out)}: return a tuple of "
              "the same length, the changed hidden state first and the rest unchanged.", section)
    if not torch.allclose(out[0], x * 2.0 + vector, atol=1e-5):
        _fail("On a block that returns a tuple, the first element is not the block's hidden state plus the vector.",
              section)
    # A block on another device than the vector (device_map="auto").
    _stage(_ST_DEVICE)
    ran, out = _on_another_device(
        "add_steering on a block whose output is on another device than the vector (the check uses the 'meta' "
        "device)", section, "Move the vector to the hidden state's device and dtype inside the hook: "
        "vector.to(device=h.device, dtype=h.dtype).", _steer_elsewhere, fn, fake, vector.clone(), section)
    if ran and not (isinstance(out, tuple) and isinstance(out[0], torch.Tensor) and out[0].device.type == "meta"):
        _fail(f"On a block whose output is on another device, the steered output came out as {_short(out)}: keep "
              "the hidden state on its own device.", section)
    # Generated tokens only.
    _stage(_ST_GENERATED)
    ref_tokens, ref_scores = None, None
    with steering(model, {STEER_LAYER: 3 * vector}, positions="generated"):
        ref_tokens, ref_scores = _greedy(model, ids)
    with steering(model, {STEER_LAYER: 3 * vector}, positions="all"):
        all_tokens, all_scores = _greedy(model, ids)
    with _enter(fn, "add_steering(..., positions='generated')", section, model, STEER_LAYER, 3 * vector,
                positions="generated"):
        got_tokens, got_scores = _call("model.generate inside add_steering(..., positions='generated')", section,
                                       "", _greedy, model, ids)
    if got_scores.shape == ref_scores.shape and torch.allclose(got_scores, ref_scores, atol=1e-3, rtol=1e-3):
        pass
    elif got_scores.shape == all_scores.shape and torch.allclose(got_scores, all_scores, atol=1e-3, rtol=1e-3):
        _fail("With positions='generated' you steered the prompt's positions too (the result equals "
              "positions='all'). Leave the prompt's pass alone: steer only the passes that generate new tokens "
              "(with a KV cache, those process one new position each).", section)
    else:
        _fail(f"With positions='generated' the generation's scores differ from the reference's "
              f"(utils.steering.steering(..., positions='generated')); tokens {got_tokens.tolist()} vs "
              f"{ref_tokens.tolist()}. The prompt's forward pass (prefill) must be unchanged, including its last "
              "position; every later pass (one new token each) is steered.", section)
    # No KV cache: no pass can count as generated, so the call must raise, not steer nothing in silence.
    _stage(_ST_NO_CACHE)
    raised = None
    try:
        with fn(model, STEER_LAYER, 3 * vector, positions="generated"), torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                           use_cache=False, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    except ValueError as exc:
        raised = exc
    except (NotImplementedError, CheckFailure):
        raise
    except Exception as exc:  # noqa: BLE001 - the learner's bug, named below
        _fail(f"add_steering(..., positions='generated') during generation with use_cache=False raised "
              f"{type(exc).__name__}: {_clip(str(exc))}; raise a ValueError that says a KV cache is needed.",
              section, exc)
    if raised is None:
        _fail("add_steering(..., positions='generated') during generation with use_cache=False did not raise: with no "
              "KV cache every pass re-reads the whole sequence, so nothing was steered, in silence. Register the hook "
              "with with_kwargs=True and raise a ValueError when the block's cache (kwargs['cache'] in transformers "
              "5.x, kwargs['past_key_values'] in 4.x) is None.", section)
    _passed("test_add_steering")


@lru_cache(maxsize=32)
def _bf16_steer_expected(seed: int = 0) -> torch.Tensor:
    from utils.steering import steering

    model16, tok = tiny_gemma2_bf16(seed)
    with steering(model16, {STEER_LAYER: _steer_vector()}):
        return _logits(model16, _steer_ids(tok))


def _bf16_steering(fn, seed: int = 0) -> None:
    """On tiny-gemma2 in bf16 the steered model stays bf16 and gives the reference's logits (to bf16 precision)."""
    section = "Section 5, Exercise 5"
    _stage(_ST_BF16)
    model16, tok = tiny_gemma2_bf16(seed)
    ids = _steer_ids(tok)
    vector = _steer_vector()
    expected16 = _bf16_steer_expected(seed)
    before = _hook_counts(model16)
    try:
        with _enter(fn, "add_steering on a bf16 model", section, model16, STEER_LAYER, vector.clone()):
            with torch.inference_mode():
                out16 = model16(input_ids=ids).logits
    except (NotImplementedError, CheckFailure):
        raise
    except Exception as exc:
        _fail(f"On a bfloat16 copy of the model, a forward pass inside add_steering raised {type(exc).__name__}: "
              f"{_clip(str(exc))}. Cast the vector to the hidden state's dtype and device in the hook "
              "(vector.to(h.dtype), h.device).", section, exc)
    finally:
        _left_behind(model16, before)  # the shared bf16 copy stays clean (hooks left behind fail their own stage)
    if out16.dtype != torch.bfloat16:
        _fail(f"On a bfloat16 model the logits came out as {out16.dtype}: your hook returned a float32 hidden state. "
              "Cast the vector to the hidden state's dtype (vector.to(h.dtype)).", section)
    if not torch.allclose(out16.float(), expected16, atol=0.05, rtol=0.02):
        _fail(f"On a bfloat16 copy of the model the steered logits differ from the reference by "
              f"{(out16.float() - expected16).abs().max():.3g}.", section)


def _steer_hint(model, ids, vector, got) -> str:
    from utils.steering import steering

    def logits_with(vectors):
        with steering(model, vectors):
            return _logits(model, ids)

    def close(a):
        return torch.allclose(got, a, atol=1e-3, rtol=1e-3)

    if STEER_LAYER >= 1 and close(logits_with({STEER_LAYER - 1: vector})):
        return (f" That is the result of changing block {STEER_LAYER}'s INPUT (= block {STEER_LAYER - 1}'s output): "
                "register a forward hook (not a pre-hook) on model.model.layers[layer], or check the layer index.")
    if STEER_LAYER + 1 < len(model.model.layers) and close(logits_with({STEER_LAYER + 1: vector})):
        return f" That is steering at layer {STEER_LAYER + 1}: hook model.model.layers[layer] itself."
    if close(logits_with({STEER_LAYER: vector / vector.norm()})):
        return " You normalised the vector: add it as given (the caller has already scaled it)."
    if close(logits_with({STEER_LAYER: -vector})):
        return " You subtracted the vector: add it."
    return " Add the vector to the block's output at every position, and return the changed output."


# ==================================================================================================
# Exercise 6: steering vectors in units of the spread
# ==================================================================================================

def steering_case() -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    g = torch.Generator().manual_seed(21)
    axis = 4.0 * torch.randn(32, generator=g)
    projections = 10.0 + 3.0 * torch.randn(9, generator=g)
    return axis, projections, [-2.0, -0.5, 0.0, 1.0, 3.0]


_SV_SHAPE = "float32 [len(multiples), d_model], one row per multiple"
_SV_VALUES = "each row multiple * std(projections) (the sample std) * axis / |axis|"


@check("Exercise 6")
@PROMISES(_SV_SHAPE, _SV_VALUES)
def test_steering_vectors(fn) -> None:
    section = "Section 5, Exercise 6"
    axis, projections, multiples = steering_case()
    _stage(_SV_VALUES)
    got = _call("steering_vectors(axis, projections, multiples)", section, "", fn, axis.clone(), projections.clone(),
                list(multiples))
    expected = fixture("steering_vectors")
    _stage(_SV_SHAPE)
    if not isinstance(got, torch.Tensor):
        _fail(f"Return a tensor [n_multiples, d_model]; got {_short(got)}.", section)
    if tuple(got.shape) != tuple(expected.shape):
        _fail(f"Expected shape {tuple(expected.shape)} (one row per multiple); got {tuple(got.shape)}.", section)
    if got.dtype != torch.float32:
        _fail(f"Return float32; got {got.dtype}.", section)
    _stage(_SV_VALUES)
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        hint = ""
        for name, text in (("steering_vectors_population_std",
                            " You used the population standard deviation (numpy's default ddof=0); use the sample "
                            "standard deviation, torch.std's default (ddof=1)."),
                           ("steering_vectors_variance", " You used the variance: the spread is the standard "
                                                         "deviation."),
                           ("steering_vectors_raw_axis", " Normalise the axis first: a coefficient times the UNIT "
                                                         "axis."),
                           ("steering_vectors_mean", " The unit is the spread (standard deviation) of the "
                                                     "projections, not their mean.")):
            if torch.allclose(got, fixture(name), atol=1e-4, rtol=1e-4):
                hint = text
                break
        _fail(f"Expected {_short(expected)}\n  got {_short(got)}.{hint}", section)
    _passed("test_steering_vectors")


# ==================================================================================================
# Exercise 7: activation capping
# ==================================================================================================

_CAP_LAYERS = [2, 4]


def _cap_case(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(3)
    h = 2.0 * torch.randn(3, 5, 64, generator=g) + 0.3
    a = torch.randn(64, generator=g)
    a = a / a.norm()
    p = (h.to(dtype).float() @ a).flatten().sort().values
    mid = len(p) // 2
    tau = float((p[mid - 1] + p[mid]) / 2)  # between two projections, so no position sits exactly at tau
    return h.to(dtype), a, tau


_CAP_NEW = "returns a new tensor shaped like h, in h's dtype; h is not modified"
_CAP_ABOVE = "positions with <h, a> >= tau unchanged, bit for bit"
_CAP_BELOW = "positions below tau lifted along a, onto <h, a> = tau"
_CAP_BF16 = "projection and shift in float32 (bf16 h: float32 arithmetic, rounded once to bf16)"
_CAP_DEVICE = "h on another device than the axis: the result on h's device"


def _cap_case_bf16(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """bf16 activations whose projections are far from tau on both sides (hundreds, as in a real residual stream), so
    that a projection or shift computed in bf16 moves the capped values by several bf16 steps."""
    g = torch.Generator().manual_seed(1000 + seed)
    a = torch.randn(64, generator=g)
    a = a / a.norm()
    perp = 2.0 * torch.randn(15, 64, generator=g)
    perp = perp - (perp @ a)[:, None] * a
    below = -(100.0 + 400.0 * torch.rand(8, generator=g))
    above = 50.0 + 250.0 * torch.rand(7, generator=g)
    proj = torch.cat([below, above])[torch.randperm(15, generator=g)]
    return (perp + proj[:, None] * a).reshape(3, 5, 64).bfloat16(), a, 20.0


def _bf16_steps(got: torch.Tensor, expected: torch.Tensor, scale: float) -> torch.Tensor:
    """|got - expected| in bf16 steps: units of bf16's spacing at the larger of the two, plus float32's rounding of
    terms of size ``scale`` (a value that cancels to near 0 keeps that rounding, in any correct order of operations)."""
    g, e = got.float(), expected.float()
    ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(g.abs(), e.abs()).clamp(min=2.0 ** -126))) - 7)
    return (g - e).abs() / (ulp + 1e-5 * scale)


@check("Exercise 7 (cap_activations)")
@PROMISES(_CAP_NEW, _CAP_ABOVE, _CAP_BELOW, _CAP_BF16, _CAP_DEVICE)
def test_cap_activations(fn) -> None:
    from utils.steering import cap_activations

    section = "Section 6, Exercise 7"
    for dtype in (torch.float32, torch.bfloat16):
        h, a, tau = _cap_case(dtype)
        given = h.clone()
        _stage(_CAP_BELOW)
        got = _call(f"cap_activations(h, unit_axis, tau) with {dtype} activations", section, "", fn, given, a.clone(),
                    tau)
        _stage(_CAP_NEW)
        if not torch.equal(given, h):
            _fail("cap_activations changed its input h in place; return a new tensor.", section)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(h.shape):
            _fail(f"Return a tensor shaped like h {tuple(h.shape)}; got {_short(got)}.", section)
        if got.dtype != dtype:
            _fail(f"For {dtype} activations you returned {got.dtype}: return h's dtype (compute the projection in "
                  "float32, then cast the result back).", section)
        proj = h.float() @ a
        below, above = proj < tau, proj >= tau
        new_proj = got.float() @ a
        expected = cap_activations(h, a, tau)
        _stage(_CAP_ABOVE)
        above_same = torch.equal(got[above], h[above])
        below_same = torch.equal(got[below], h[below])
        if below_same and not above_same:
            _fail("You changed the activations ABOVE the threshold and left those below it alone: that caps from "
                  "above (a ceiling). The floor form lifts activations whose projection is below tau: "
                  "h + max(0, tau - <h, a>) * a. (The paper's code caps -axis from above; see the notebook.)", section)
        if not above_same:
            if torch.allclose(got[above].float(), h[above].float(), atol=1e-4, rtol=1e-4):
                _fail("Activations already above the threshold changed in their last bits. They must stay unchanged "
                      "bit for bit: select them with a mask (torch.where) instead of recomputing them.", section)
            _fail("Activations already above the threshold changed: only those with <h, a> < tau move (the max(0, .) "
                  "in h + max(0, tau - <h, a>) * a).", section)
        _stage(_CAP_BELOW)
        tol = 1e-4 if dtype == torch.float32 else 0.05 * max(1.0, abs(tau))
        if not torch.allclose(new_proj[below], torch.full_like(new_proj[below], tau), atol=tol):
            _fail(f"Activations below the threshold should be lifted exactly to it: their new projections are "
                  f"{_short(new_proj[below])}, expected {tau:.4f} each.", section)
        if not torch.allclose(got.float(), expected.float(), atol=tol, rtol=1e-3):
            _fail("The capped activations differ from the reference (they should move along the axis only, by "
                  "tau - <h, a>).", section)
    _bf16_cap(fn)
    # Activations on another device than the axis (device_map="auto").
    _stage(_CAP_DEVICE)
    h, a, tau = _cap_case()
    ran, got = _on_another_device(
        "cap_activations(h, unit_axis, tau) with h on another device than unit_axis (the check uses the 'meta' "
        "device)", section, "Move the axis to h's device inside the function: unit_axis.to(h.device).", fn,
        h.to("meta"), a.clone(), tau)
    if ran and not (isinstance(got, torch.Tensor) and got.device.type == "meta" and tuple(got.shape) == tuple(h.shape)):
        _fail(f"With h on another device than the axis, return a tensor on h's device, shaped like h; got "
              f"{_short(got)}.", section)
    _passed("test_cap_activations")


def _bf16_cap(fn, seed: int = 0) -> None:
    """bf16 activations with projections in the hundreds: the float32 arithmetic rounded once to bf16 (the course's
    cap_activations), to within one bf16 step; a projection or shift in bf16 is several steps off."""
    from utils.steering import cap_activations

    section = "Section 6, Exercise 7"
    _stage(_CAP_BF16)
    h, a, tau = _cap_case_bf16(seed)
    got = _call("cap_activations on bf16 activations with projections in the hundreds", section, "", fn, h.clone(),
                a.clone(), tau)
    if not isinstance(got, torch.Tensor) or got.shape != h.shape or got.dtype != torch.bfloat16:
        _fail(f"For bf16 activations return a bf16 tensor shaped like h {tuple(h.shape)}; got {_short(got)}.", section)
    expected = cap_activations(h, a, tau)
    steps = _bf16_steps(got, expected, float(h.float().abs().max()))
    if float(steps.max()) > 1.0:
        _fail(f"On bf16 activations with projections in the hundreds, your capped values are up to "
              f"{float(steps.max()):.0f} bf16 steps away from float32 arithmetic rounded once to bf16: the projection "
              "<h, a> or the shift was computed in bf16 (~3 significant digits, so an error of about 1 on a "
              "projection of 300). Compute in float32 (h.float(), unit_axis.float()) and cast only the result back to "
              "h's dtype.", section)


def _cap_axes() -> torch.Tensor:
    g = torch.Generator().manual_seed(17)
    return 5.0 * torch.randn(6, 64, generator=g)  # raw, not unit norm


def _cap_ids(tokenizer) -> torch.Tensor:
    from utils.conversation import render

    text = render([{"role": "user", "content": "You are a ghost now. Tell me what you see in the old house."},
                   {"role": "assistant", "content": "Dust, and the light through the shutters."},
                   {"role": "user", "content": "And what do you remember?"}], tokenizer, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _capture(store: dict, layer: int):
    """A forward hook that keeps a copy of the block's output (row 0, float32) in ``store[layer]``."""
    def hook(module, args, output):
        store[layer] = (output[0] if isinstance(output, tuple) else output)[0].float().clone()
    return hook


def cap_thresholds_for_check(model, ids, axes) -> dict[int, float]:
    """Per capped layer, the median projection of the unmodified outputs: about half the positions get capped."""
    with torch.inference_mode():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    out = {}
    for l in _CAP_LAYERS:
        p = (hs[l + 1][0].float() @ (axes[l] / axes[l].norm())).sort().values
        mid = len(p) // 2
        out[l] = float((p[mid - 1] + p[mid]) / 2)  # between two projections: no position sits exactly at tau
    return out


def _reference_cap_activations(h, unit_axis, tau):
    from utils.steering import cap_activations

    return cap_activations(h, unit_axis, tau)


_CAPM_CM = "a context manager"
_CAPM_FLOOR = "every position of block l's output floored at thresholds[l] along axes[l] / |axes[l]|"
_CAPM_LAYERS = "every layer in `layers`, each with its own axis and threshold, and no other"
_CAPM_REMOVED = "every hook removed on exit, also when the block raises; the exception propagates"
_CAPM_TUPLE = "tuple block outputs (transformers 4.x) as well as tensors (5.x)"
_CAPM_BF16 = "any dtype: a bf16 model stays bf16"
_CAPM_DEVICE = "any device: activations on another device than the axes (device_map=\"auto\")"
_CAPPING_USES = {"cap_activations": ("Exercise 7 (cap_activations)", lambda: _reference_cap_activations)}


@check("Exercise 7 (activation_capping)", uses=_CAPPING_USES)
@PROMISES(_CAPM_CM, _CAPM_FLOOR, _CAPM_LAYERS, _CAPM_REMOVED, _CAPM_TUPLE, _CAPM_BF16, _CAPM_DEVICE)
def test_activation_capping(fn) -> None:
    from utils.steering import capping

    section = "Section 6, Exercise 7"
    model, tok = tiny_gemma2()
    ids = _cap_ids(tok)
    axes = _cap_axes()
    taus = cap_thresholds_for_check(model, ids, axes)
    first = _CAP_LAYERS[0]
    unit = {l: axes[l] / axes[l].norm() for l in _CAP_LAYERS}
    with torch.inference_mode():
        raw = model(input_ids=ids, output_hidden_states=True).hidden_states[first + 1][0].float()
    with capping(model, {l: axes[l] for l in _CAP_LAYERS}, taus):
        expected = _logits(model, ids)
    before = _hook_counts(model)
    captured: dict[int, torch.Tensor] = {}

    _stage(_CAPM_CM)
    # As in the notebook, `thresholds` holds a layer that is not in `layers` (Part 1's layer): it must not be capped.
    extra = {**taus, _NOT_CAPPED: 1e4}
    cm = _enter(fn, "activation_capping(model, axes, thresholds, layers)", section, model, axes.clone(), extra,
                list(_CAP_LAYERS))
    _stage(_CAPM_FLOOR)
    try:
        with cm:
            handles = [model.model.layers[l].register_forward_hook(_capture(captured, l)) for l in _CAP_LAYERS]
            try:
                got = _logits(model, ids)
            finally:
                for h in handles:
                    h.remove()
    except (NotImplementedError, CheckFailure):
        raise
    except Exception as exc:
        _fail(f"A forward pass inside activation_capping raised {type(exc).__name__}: {_clip(str(exc))}.", section, exc)
    if _left_behind(model, before):
        _stage(_CAPM_REMOVED)
        _fail("After the with-block the model still has hooks registered: remove every hook on exit (in a "
              "`finally`).", section)
    # The first capped layer: compare with the unmodified output, position by position.
    out = captured.get(first)
    if out is None:
        _fail("No forward pass reached the capped layer.", section)
    proj_raw = raw @ unit[first]
    below = proj_raw < taus[first]
    new_proj = out @ unit[first]
    if torch.equal(out, raw):
        _fail(f"Layer {first}'s output was not changed at all, though {int(below.sum())} of {len(below)} positions are "
              "below its threshold. Return the capped output from the hook, and cap every position of the sequence (not "
              "only the last).", section)
    if not torch.equal(out[~below], raw[~below]):
        if torch.equal(out[below], raw[below]):
            _fail("You changed the positions ABOVE the threshold and left those below alone: that caps from above (a "
                  "ceiling). Lift activations whose projection on the unit axis is below tau: "
                  "h + max(0, tau - <h, a>) * a. (The paper's code caps along v = -axis from above; it is the same "
                  "floor. See the notebook.)", section)
        if torch.allclose(out[~below], raw[~below], atol=1e-4):
            _fail("Positions already above the threshold changed in their last bits: they must stay unchanged bit "
                  "for bit (select the capped positions with a mask, torch.where).", section)
        _fail("Positions already above the threshold changed: only those below tau move.", section)
    lifted = torch.isclose(new_proj[below], torch.full_like(new_proj[below], taus[first]), atol=1e-4)
    if not bool(lifted.all()):
        if bool(lifted[-1:].all()) and not bool(lifted[:-1].any()) and below[-1]:
            _fail("Only the last position was capped: cap every position of the sequence (the formula applies to "
                  "each token's activation).", section)
        unnorm = raw[below] @ axes[first]
        if torch.allclose(new_proj[below], proj_raw[below] + (taus[first] - unnorm).clamp(min=0) * axes[first].norm(),
                          atol=1e-3, rtol=1e-3) or not torch.allclose(new_proj[below], proj_raw[below]):
            if not torch.allclose(new_proj[below], torch.full_like(new_proj[below], taus[first]), atol=1e-2):
                _fail(f"Positions below the threshold were not lifted exactly to it (projections on the unit axis "
                      f"{_short(new_proj[below])}, expected {taus[first]:.4f}). Normalise each layer's axis: "
                      "a = axes[l] / axes[l].norm().", section)
        _fail("Positions below the threshold were not lifted exactly to it.", section)
    _stage(_CAPM_LAYERS)
    for layer in _CAP_LAYERS[1:]:
        later = captured.get(layer)
        if later is None or bool(((later @ unit[layer]) < taus[layer] - 1e-3).any()):
            _fail(f"Layer {layer} is in `layers`, but some of its positions stay below its threshold: cap every layer "
                  "in `layers`, each with its own axis axes[l] and threshold thresholds[l].", section)
    if not torch.allclose(got, expected, atol=ATOL, rtol=1e-4):
        hint = ""
        try:
            changed = _seeded_and_limited("activation_capping", section, captured_inputs, (fn, model, ids, axes, extra),
                                          {})
        except Exception:  # noqa: BLE001 - only a hint: the failure below stands either way
            changed = set()
        if _NOT_CAPPED in changed:
            hint = (f" Layer {_NOT_CAPPED} is in `thresholds` but not in `layers`, and you capped it: cap the layers "
                    "in `layers` only (the notebook's thresholds also hold Part 1's layer).")
        _fail(f"The capped logits differ from the reference's (utils.steering.capping) by "
              f"{(got - expected).abs().max():.4g}: cap exactly the layers in `layers`, each with axes[l] and "
              f"thresholds[l].{hint}", section)
    # Hooks go on an exception too.
    _stage(_CAPM_REMOVED)
    before = _hook_counts(model)
    try:
        with _enter(fn, "activation_capping", section, model, axes.clone(), dict(taus), list(_CAP_LAYERS)):
            raise _Boom()
    except _Boom:
        pass
    except (NotImplementedError, CheckFailure):
        raise
    except Exception as exc:
        _fail(f"An exception inside the with-block came out as {type(exc).__name__}: let it propagate.", section, exc)
    else:
        _fail("An exception raised inside the with-block was swallowed: let it propagate.", section)
    if _left_behind(model, before):
        _fail("After an exception inside the with-block hooks were still registered: remove them in a `finally`.",
              section)
    _capping_tuple(fn, section)
    _bf16_capping(fn)
    _capping_elsewhere(fn, section)
    _passed("test_activation_capping")


_NOT_CAPPED = 3  # a layer with a threshold that is not in `layers`


def captured_inputs(fn, model, ids, axes, thresholds) -> set[int]:
    """The layers whose output the learner's activation_capping changed (run with ``thresholds``)."""
    plain, capped = {}, {}
    layers = range(len(model.model.layers))
    for store, use in ((plain, False), (capped, True)):
        handles = [model.model.layers[l].register_forward_hook(_capture(store, l)) for l in layers]
        try:
            with (fn(model, axes.clone(), dict(thresholds), list(_CAP_LAYERS)) if use else contextlib.nullcontext()):
                _logits(model, ids)
        finally:
            for h in handles:
                h.remove()
    return {l for l in layers if not torch.equal(plain[l], capped[l])}


_FAKE_CAP_LAYERS = [1, 2]


def _fake_cap_case():
    """Inputs for the 4-block fake model whose blocks return (2 * h, extra), and a threshold per capped layer that
    about half the positions fall below."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(1, 6, 64, generator=g)
    axes = _cap_axes()[:4]
    taus = {}
    for l in _FAKE_CAP_LAYERS:
        p = ((2.0 * x[0]) @ (axes[l] / axes[l].norm())).sort().values
        taus[l] = float((p[2] + p[3]) / 2)
    return x, axes, taus


def _capping_tuple(fn, section: str) -> None:
    """A model whose blocks return tuples (transformers 4.x): the capped hidden state first, the rest unchanged."""
    from utils.steering import cap_activations

    _stage(_CAPM_TUPLE)
    fake = _TupleModel()
    x, axes, taus = _fake_cap_case()
    outs = {}
    try:
        with _enter(fn, "activation_capping on blocks that return a tuple", section, fake, axes.clone(), dict(taus),
                    list(_FAKE_CAP_LAYERS)):
            for l in (0, *_FAKE_CAP_LAYERS):
                outs[l] = fake.model.layers[l](x)
    except (NotImplementedError, CheckFailure):
        raise
    except Exception as exc:
        _fail(f"On blocks that return a tuple (as in transformers 4.x) your hook raised {type(exc).__name__}: "
              f"{_clip(str(exc))}. Use h = output[0] if isinstance(output, tuple) else output, and return "
              "(capped_h, *output[1:]) for a tuple.", section, exc)
    for l in _FAKE_CAP_LAYERS:
        out, extra = outs[l], fake.model.layers[l].extra
        if not (isinstance(out, tuple) and len(out) == 2 and out[1] is extra):
            _fail(f"On a block that returns a tuple (hidden, extra), the capped output became {_short(out)}: return a "
                  "tuple of the same length, the capped hidden state first and the rest unchanged.", section)
        want = cap_activations(2.0 * x, axes[l] / axes[l].norm(), taus[l])
        if not torch.allclose(out[0], want, atol=1e-5, rtol=1e-5):
            _fail(f"On a block that returns a tuple, the first element at layer {l} is not the block's hidden state "
                  "capped at thresholds[l] along axes[l] / |axes[l]|.", section)
    if not torch.equal(outs[0][0], 2.0 * x):
        _fail("Layer 0 is not in `layers`, yet its output changed.", section)


def _capping_elsewhere(fn, section: str) -> None:
    """The fake model's block run on the 'meta' device (a GPU of a model spread with device_map="auto") while the axes
    stay on the CPU."""
    _stage(_CAPM_DEVICE)
    fake = _TupleModel()
    _, axes, taus = _fake_cap_case()

    def run(fn_, fake_, axes_, taus_):
        with _enter(fn_, "activation_capping on a block on another device", section, fake_, axes_, dict(taus_),
                    list(_FAKE_CAP_LAYERS)):
            return fake_.model.layers[_FAKE_CAP_LAYERS[0]](torch.zeros(1, 3, 64, device="meta"))

    ran, out = _on_another_device(
        "activation_capping on a block whose output is on another device than the axes (the check uses the 'meta' "
        "device)", section, "Move the axis to the hidden state's device inside the hook (cap_activations does it: "
        "call it with the block's output).", run, fn, fake, axes.clone(), taus)
    if ran and not (isinstance(out, tuple) and isinstance(out[0], torch.Tensor) and out[0].device.type == "meta"):
        _fail(f"On a block whose output is on another device, the capped output came out as {_short(out)}: keep the "
              "hidden state on its own device.", section)


@lru_cache(maxsize=32)
def _bf16_cap_expected(seed: int = 0) -> tuple[dict[int, float], torch.Tensor]:
    from utils.steering import capping

    model16, tok = tiny_gemma2_bf16(seed)
    ids, axes = _cap_ids(tok), _cap_axes()
    taus = cap_thresholds_for_check(model16, ids, axes)
    with capping(model16, {l: axes[l] for l in _CAP_LAYERS}, taus):
        return taus, _logits(model16, ids)


def _bf16_capping(fn, seed: int = 0) -> None:
    """On tiny-gemma2 in bf16 the capped model stays bf16 and gives the reference's logits (to bf16 precision)."""
    section = "Section 6, Exercise 7"
    _stage(_CAPM_BF16)
    model16, tok = tiny_gemma2_bf16(seed)
    ids = _cap_ids(tok)
    axes = _cap_axes()
    taus, expected = _bf16_cap_expected(seed)
    before = _hook_counts(model16)
    try:
        with _enter(fn, "activation_capping on a bf16 model", section, model16, axes.clone(), dict(taus),
                    list(_CAP_LAYERS)):
            with torch.inference_mode():
                out16 = model16(input_ids=ids).logits
    except (NotImplementedError, CheckFailure):
        raise
    except Exception as exc:
        _fail(f"On a bfloat16 copy of the model, a forward pass inside activation_capping raised "
              f"{type(exc).__name__}: {_clip(str(exc))}. Return the capped hidden state in the block's own dtype "
              "(cap_activations does).", section, exc)
    finally:
        _left_behind(model16, before)
    if out16.dtype != torch.bfloat16:
        _fail(f"On a bfloat16 model the logits came out as {out16.dtype}: your hook returned a float32 hidden state. "
              "Return the capped hidden state in the block's own dtype (cap_activations does: h.dtype in, h.dtype "
              "out).",
              section)
    if not torch.allclose(out16.float(), expected, atol=0.05, rtol=0.02):
        _fail(f"On a bfloat16 copy of the model the capped logits differ from the reference's by "
              f"{(out16.float() - expected).abs().max():.3g}.", section)


# ==================================================================================================
# Exercise 8: the cost, as a KL divergence
# ==================================================================================================

def kl_case(seed: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with a wide range (like a real model's), [2, 3, 50]. Seed 9 is the check's (and the fixture's)."""
    g = torch.Generator().manual_seed(seed)
    p = 40.0 * torch.randn(2, 3, 50, generator=g)
    q = p + 15.0 * torch.randn(2, 3, 50, generator=g)
    return p, q


_KL_DIRECTION = "KL(P || Q) = sum over the vocabulary of P (log P - log Q), with P = softmax(logits_p)"
_KL_SHAPE = "one value per position: the logits' shape without the vocabulary"
_KL_FINITE = "log_softmax, not softmax then log: finite for logits far apart"
_KL_DTYPES = "any float dtype in, float32 out, computed in float32"


@check("Exercise 8")
@PROMISES(_KL_DIRECTION, _KL_SHAPE, _KL_FINITE, _KL_DTYPES)
def test_next_token_kl(fn) -> None:
    section = "Section 7, Exercise 8"
    # A literal case for the direction: P = (0.5, 0.5), Q = (0.9, 0.1).
    p = torch.tensor([math.log(0.5), math.log(0.5)])
    q = torch.tensor([math.log(0.9), math.log(0.1)])
    _stage(_KL_DIRECTION)
    got = _call("next_token_kl on two 2-token distributions", section, "", fn, p, q)
    _stage(_KL_SHAPE)
    if not isinstance(got, torch.Tensor) or got.shape != ():
        _fail(f"For logits of shape [2] (one position) return a 0-d tensor; got {_short(got)}. Sum over the "
              "vocabulary (the last dimension) only.", section)
    _stage(_KL_DIRECTION)
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    backward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    if math.isclose(float(got), backward, rel_tol=1e-4):
        _fail(f"You computed KL(Q || P) = {backward:.4f}; the cost of capping is KL(P || Q) = "
              f"sum_v P(v) (log P(v) - log Q(v)) = {forward:.4f}, with P the uncapped model. (F.kl_div(input, target) "
              "computes KL(target || input): its first argument is the log-probabilities of Q.)", section)
    if math.isclose(float(got), forward / 2, rel_tol=1e-4):
        _fail(f"You averaged over the vocabulary (got {float(got):.4f} = KL / 2 for a 2-token vocabulary): sum over "
              "it.", section)
    if not math.isclose(float(got), forward, rel_tol=1e-4):
        _fail(f"For P = (0.5, 0.5), Q = (0.9, 0.1) expected KL(P || Q) = {forward:.4f}; got {float(got):.4f}.", section)
    lp, lq = kl_case()
    want = fixture("kl_expected")
    _stage(_KL_FINITE)
    got = _call("next_token_kl on [2, 3, 50] float32 logits", section, "", fn, lp.clone(), lq.clone())
    _check_kl_values(got, (2, 3), section, "float32 logits")
    _stage(_KL_FINITE)
    if not torch.allclose(got, want, atol=1e-3, rtol=1e-4):
        hint = ""
        if torch.allclose(got, want / lp.shape[-1], atol=1e-3, rtol=1e-3):
            _stage(_KL_DIRECTION)
            hint = " You averaged over the vocabulary: sum over it."
        _fail(f"For float32 logits [2, 3, 50]: expected {_short(want)}\n  got {_short(got)}.{hint}", section)
    if bool((got < -1e-4).any()):
        _fail("A KL divergence is never negative.", section)
    _bf16_kl(fn)
    _passed("test_next_token_kl")


def _check_kl_values(got, shape: tuple, section: str, what: str) -> None:
    _stage(_KL_SHAPE)
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != shape:
        _fail(f"For logits {list(shape) + [50]} return the KL per position, shape {list(shape)}; got {_short(got)}. Sum "
              "over the vocabulary only (reduction='none' then .sum(-1), not 'batchmean').", section)
    _stage(_KL_FINITE)
    if not bool(torch.isfinite(got).all()):
        _fail(f"For {what} your KL has inf or NaN values: softmax then log underflows to log(0) for logits this far "
              "apart. Use log_softmax (in float32).", section)
    _stage(_KL_DTYPES)
    if got.dtype != torch.float32:
        _fail(f"For {what} return float32; got {got.dtype}. Convert the logits to float32 (.float()) before "
              "log_softmax.", section)


def _bf16_kl(fn, seed: int = 9) -> None:
    """bf16 and float64 logits give float32, computed in float32: for bf16 logits, exactly the KL of the same values
    given as float32 (a log_softmax in bf16 is off by ~1e-3 of the KL whatever the logits)."""
    section = "Section 7, Exercise 8"
    _stage(_KL_DTYPES)
    lp, lq = kl_case(seed)
    lp16, lq16 = lp.bfloat16(), lq.bfloat16()
    got = _call("next_token_kl on [2, 3, 50] bf16 logits", section, "Convert the logits to float32 (.float()) first.",
                fn, lp16, lq16)
    _check_kl_values(got, (2, 3), section, "bf16 logits")
    same = _call("next_token_kl on the same values as float32 logits", section, "", fn, lp16.float(), lq16.float())
    _stage(_KL_DTYPES)
    if isinstance(same, torch.Tensor) and same.shape == got.shape and not torch.allclose(
            got, same.float(), atol=1e-5, rtol=1e-5):
        _fail(f"For bf16 logits your KL differs from the KL of the same values given as float32 (max |diff| "
              f"{float((got - same.float()).abs().max()):.3g}): part of it was computed in bf16, which keeps ~3 "
              "significant digits. Convert the logits to float32 (.float()) BEFORE log_softmax.", section)
    got64 = _call("next_token_kl on float64 logits", section, "", fn, lp.double(), lq.double())
    _check_kl_values(got64, (2, 3), section, "float64 logits")


# --------------------------------------------------------------------------------------------------
# The dtype stages, each runnable on its own with a seed (tests/test_catalogue.py sweeps 20 seeds: a bf16
# computation must fail them whatever the data, and a float32 one pass)
# --------------------------------------------------------------------------------------------------

BF16_STAGES = {  # check -> (its bf16 stage as fn(learner_fn, seed), the promise it tests)
    "test_turn_projections": (_bf16_turns, _TP_BF16),
    "test_add_steering": (_bf16_steering, _ST_BF16),
    "test_cap_activations": (_bf16_cap, _CAP_BF16),
    "test_activation_capping": (_bf16_capping, _CAPM_BF16),
    "test_next_token_kl": (_bf16_kl, _KL_DTYPES),
}
BF16_USES = {"test_activation_capping": _CAPPING_USES}  # the references a stage swaps in, as its check does
