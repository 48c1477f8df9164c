"""Shared pytest set-up: no network, and the tiny model loaded once."""

import os

# Nothing in the suite may reach a model hub or an API.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for var in ("COURSE_API_KEY", "OPENROUTER_API_KEY", "OPENAI_API_KEY"):
    os.environ.pop(var, None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of tiny-gemma2."""
    from tests.part1_persona_space import tiny_gemma2

    return tiny_gemma2()


@pytest.fixture(scope="session")
def reference():
    """The reference solutions, executed from src/part1_persona_space.py."""
    from tools.reference import load_reference

    return load_reference()
