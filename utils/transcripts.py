"""The paper's multi-turn transcripts, in ``data/transcripts/`` (copied unchanged from
safety-research/assistant-axis, MIT licence; see README "Data and credit").

Layout::

    data/transcripts/persona_drift/{coding,writing,therapy,philosophy}.json
    data/transcripts/case_studies/<model>/<scenario>_{unsteered,capped}.json

Each file is a JSON object whose ``conversation`` is a list of ``{"role", "content"}`` messages
(user and assistant alternating, starting with the user), plus metadata: ``model``, ``turns``,
and for drift transcripts ``domain``, ``persona``, ``topic`` (the auditor's brief), for capped case
studies ``steering_config`` (e.g. ``layers_46:54-p0.25``).

- :func:`load_transcript`: the validated messages of one file.
- :func:`transcript_metadata`: everything in the file but the conversation.
- :func:`drift_transcripts`: ``{domain: path}`` for the four persona-drift conversations.
- :func:`case_studies`: ``{(model, scenario): {"unsteered": path, "capped": path}}``.

One upstream file is named ``case_studies/qwen-3-32b/selfharm_unsteered.json.json`` (a doubled
extension). It is kept under that name, as published; :func:`case_studies` strips every trailing
``.json`` when it parses a name, so that file is scenario ``"selfharm"``, variant ``"unsteered"``
of model ``"qwen-3-32b"``.
"""

from __future__ import annotations

import json
from pathlib import Path

from utils.data import DATA_DIR

__all__ = [
    "DRIFT_DOMAINS",
    "TRANSCRIPTS_DIR",
    "TranscriptError",
    "case_studies",
    "drift_transcripts",
    "load_transcript",
    "transcript_metadata",
]

TRANSCRIPTS_DIR = DATA_DIR / "transcripts"
DRIFT_DOMAINS = ("coding", "writing", "therapy", "philosophy")
VARIANTS = ("unsteered", "capped")
ROLES = ("system", "user", "assistant")

Message = dict[str, str]


class TranscriptError(ValueError):
    """A transcript file that is missing or malformed; the message names the file and the turn."""


def _read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        raise TranscriptError(f"{path}: no such transcript file. The shipped ones are under {TRANSCRIPTS_DIR}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TranscriptError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    except UnicodeDecodeError as exc:
        raise TranscriptError(f"{path}: not UTF-8 text ({exc}).") from None


def load_transcript(path: str | Path) -> list[Message]:
    """The conversation of one transcript file, validated.

    The file holds either a JSON object with a ``conversation`` list (the paper's format) or a bare
    list of messages. Every message must be ``{"role": ..., "content": ...}`` with role ``system``,
    ``user`` or ``assistant`` and non-empty string content; a system message may only come first;
    after it, turns start with ``user`` and alternate ``user``/``assistant``; there is at least one
    assistant turn.

    Returns:
        the messages as new ``{"role", "content"}`` dicts, in order (content unchanged, not stripped).

    Raises:
        TranscriptError: the file is missing, is not JSON, or breaks one of the rules above; the
            message names the file and the turn (0-based index in ``conversation``).
    """
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict):
        if "conversation" not in data:
            raise TranscriptError(f"{path}: no 'conversation' key (found keys: {sorted(data)}).")
        conversation = data["conversation"]
    else:
        conversation = data
    if not isinstance(conversation, list):
        raise TranscriptError(f"{path}: 'conversation' must be a list of messages; got {type(conversation).__name__}.")
    if not conversation:
        raise TranscriptError(f"{path}: the conversation is empty.")
    messages: list[Message] = []
    expected = "user"
    for i, message in enumerate(conversation):
        where = f"{path}: turn {i} (0-based index in 'conversation')"
        if not isinstance(message, dict):
            raise TranscriptError(f"{where} is a {type(message).__name__}, not a {{'role', 'content'}} object.")
        if "role" not in message:
            raise TranscriptError(f"{where} has no 'role' (keys: {sorted(message)}).")
        if "content" not in message:
            raise TranscriptError(f"{where} has no 'content' (keys: {sorted(message)}).")
        # Other keys (a turn id, timestamps) are left out: a message is only 'role' and 'content', as Part 2's
        # parse_transcript exercise returns it.
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise TranscriptError(f"{where} has unknown role {role!r}; use one of {list(ROLES)}.")
        if not isinstance(content, str):
            raise TranscriptError(f"{where} ({role}) has {type(content).__name__} content, not a string.")
        if not content.strip():
            raise TranscriptError(f"{where} ({role}) has empty content.")
        if role == "system":
            if i != 0:
                raise TranscriptError(f"{where}: a system message may only be the first message.")
        elif role != expected:
            first = not any(m["role"] != "system" for m in messages)
            why = "the conversation must start with a user turn" if first else f"two {role} turns in a row"
            raise TranscriptError(f"{where}: expected a {expected} turn, got {role} ({why}).")
        else:
            expected = "assistant" if role == "user" else "user"
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise TranscriptError(f"{path}: the conversation has no assistant turn.")
    return messages


def transcript_metadata(path: str | Path) -> dict:
    """Everything in a transcript file except ``conversation`` (``model``, ``turns``, ``domain``, ...)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k != "conversation"}


def drift_transcripts() -> dict[str, Path]:
    """``{domain: path}`` of the four persona-drift transcripts: coding, writing, therapy, philosophy.

    Coding and therapy are Llama 3.3 70B's, writing and philosophy Gemma 2 27B's (see each file's
    ``model``). Raises TranscriptError if one is missing.
    """
    out = {}
    for domain in DRIFT_DOMAINS:
        path = TRANSCRIPTS_DIR / "persona_drift" / f"{domain}.json"
        if not path.is_file():
            raise TranscriptError(f"{path}: missing drift transcript; restore data/transcripts/ from the repository.")
        out[domain] = path
    return out


def _scenario_and_variant(path: Path) -> tuple[str, str]:
    """``delusion_capped.json`` -> ("delusion", "capped"). Every trailing ``.json`` is stripped, so the
    upstream file ``selfharm_unsteered.json.json`` gives ("selfharm", "unsteered")."""
    stem = path.name
    while stem.endswith(".json"):
        stem = stem[: -len(".json")]
    scenario, sep, variant = stem.rpartition("_")
    if not sep or not scenario or variant not in VARIANTS:
        raise TranscriptError(f"{path}: a case-study file must be named <scenario>_<variant>.json with variant in "
                              f"{list(VARIANTS)}.")
    return scenario, variant


def case_studies() -> dict[tuple[str, str], dict[str, Path]]:
    """``{(model, scenario): {"unsteered": path, "capped": path}}`` for the paper's case studies.

    ``model`` is the folder name (``"llama-3.3-70b"``, ``"qwen-3-32b"``), ``scenario`` one of
    ``"jailbreak"``, ``"delusion"``, ``"selfharm"``. The same user turns were answered without
    (``unsteered``) and with (``capped``) activation capping. The file
    ``qwen-3-32b/selfharm_unsteered.json.json`` (doubled extension, as published) is
    ``("qwen-3-32b", "selfharm")``'s ``"unsteered"`` transcript.

    Raises:
        TranscriptError: a file with an unparseable name, two files for the same variant, or a
            scenario without both variants.
    """
    root = TRANSCRIPTS_DIR / "case_studies"
    if not root.is_dir():
        raise TranscriptError(f"{root}: missing; restore data/transcripts/ from the repository.")
    out: dict[tuple[str, str], dict[str, Path]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(model_dir.iterdir()):
            if not path.is_file() or not path.name.endswith(".json"):
                continue
            scenario, variant = _scenario_and_variant(path)
            pair = out.setdefault((model_dir.name, scenario), {})
            if variant in pair:
                raise TranscriptError(f"{path}: a second {variant} transcript for {model_dir.name}/{scenario} "
                                      f"(the first is {pair[variant].name}).")
            pair[variant] = path
    for key, pair in out.items():
        missing = [v for v in VARIANTS if v not in pair]
        if missing:
            raise TranscriptError(f"case study {key[0]}/{key[1]} has no {missing[0]} transcript.")
    return {key: {v: out[key][v] for v in VARIANTS} for key in sorted(out)}
