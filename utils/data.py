"""The paper's data, copied into ``data/`` from safety-research/assistant-axis (MIT licence).

- ``load_default_prompts(model_name)``: the 5 default system prompts (``""``, "You are an AI assistant.", ...).
- ``load_roles()``: all 275 roles, each with 5 system prompts and the paper's judge prompt.
- ``load_questions()``: the 240 extraction questions.
- ``load_traits()``: the 240 traits, each with 5 (pos, neg) system-prompt pairs, 40 questions and the 0-100
  judge prompt (the Persona Vectors format; Part 3 uses questions 0-19 to extract and 20-39 to evaluate).
- ``WORKING_ROLES`` and ``working_questions()``: the small set the Part 1 notebook uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# Assistant-like roles first, fantastical roles last (the notebook's working set).
ASSISTANT_LIKE_ROLES = ["analyst", "evaluator", "generalist", "consultant", "editor", "narrator"]
MIDDLE_ROLES = ["philosopher", "poet", "rebel", "mystic"]
FANTASTICAL_ROLES = ["ghost", "bohemian", "oracle", "bard", "trickster", "jester"]
WORKING_ROLES = ASSISTANT_LIKE_ROLES + MIDDLE_ROLES + FANTASTICAL_ROLES
DEFAULT_PERSONA_NAMES = ["default_empty", "default_assistant", "default_llm", "default_name", "default_yourself"]
# Fixed, spread-out question ids for the working set (15 of 240).
WORKING_QUESTION_IDS = [0, 1, 2, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 208, 224]


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    system_prompts: tuple[str, ...]
    judge_prompt: str  # the paper's eval_prompt, with {question} and {answer} slots


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    pos_prompts: tuple[str, ...]
    neg_prompts: tuple[str, ...]
    questions: tuple[str, ...] = ()  # 40 questions that invite the trait (Part 3: 0-19 extract, 20-39 evaluate)
    eval_prompt: str = ""  # the 0-100 judge prompt, with {question} and {answer} slots


def _read_json(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing. The course data lives in {DATA_DIR}; restore it with "
                                "`git checkout -- data`.")
    return json.loads(path.read_text())


def load_default_prompts(model_name: str = "Gemma") -> dict[str, str]:
    """The paper's 5 default system prompts, keyed by persona name; ``{model_name}`` filled in."""
    raw = _read_json(DATA_DIR / "roles" / "instructions" / "default.json")["instruction"]
    prompts = [item["pos"].replace("{model_name}", model_name) for item in raw]
    return dict(zip(DEFAULT_PERSONA_NAMES, prompts, strict=True))


@lru_cache(maxsize=1)
def load_roles() -> dict[str, Role]:
    """All 275 roles of the paper (not the defaults), keyed by name."""
    descriptions = _read_json(DATA_DIR / "roles" / "role_list.json")
    roles = {}
    for name in sorted(descriptions):
        raw = _read_json(DATA_DIR / "roles" / "instructions" / f"{name}.json")
        roles[name] = Role(name, descriptions[name], tuple(i["pos"] for i in raw["instruction"]), raw["eval_prompt"])
    return roles


@lru_cache(maxsize=1)
def load_questions() -> tuple[str, ...]:
    """The paper's 240 extraction questions, in id order."""
    path = DATA_DIR / "extraction_questions.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; restore it with `git checkout -- data`.")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["id"])
    return tuple(r["question"] for r in rows)


def working_questions(n: int = 15) -> list[str]:
    """``n`` spread-out questions (at most 15 fixed ones, then the following ids)."""
    questions = load_questions()
    ids = WORKING_QUESTION_IDS[:n] + [i for i in range(len(questions)) if i not in WORKING_QUESTION_IDS][: max(0, n - 15)]
    return [questions[i] for i in ids]


@lru_cache(maxsize=1)
def load_traits() -> dict[str, Trait]:
    """All 240 traits, keyed by name, with their (pos, neg) system-prompt pairs."""
    descriptions = _read_json(DATA_DIR / "traits" / "trait_list.json")
    traits = {}
    for name in sorted(descriptions):
        raw = _read_json(DATA_DIR / "traits" / "instructions" / f"{name}.json")
        traits[name] = Trait(name, descriptions[name], tuple(i["pos"] for i in raw["instruction"]),
                             tuple(i["neg"] for i in raw["instruction"]), tuple(raw.get("questions", ())),
                             raw.get("eval_prompt", ""))
    return traits


def working_personas(model_name: str, roles: list[str] | None = None, prompt_index: int = 0) -> dict[str, str]:
    """Persona name -> system prompt: the 5 defaults, then one prompt variant for each role."""
    all_roles = load_roles()
    roles = WORKING_ROLES if roles is None else roles
    unknown = [r for r in roles if r not in all_roles]
    if unknown:
        raise KeyError(f"Unknown role(s) {unknown}; see utils.data.load_roles() for the 275 names.")
    personas = load_default_prompts(model_name)
    personas.update({r: all_roles[r].system_prompts[prompt_index] for r in roles})
    return personas
