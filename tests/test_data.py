"""The paper's data is all here, and the working set exists in it."""

from utils import data


def test_full_sets():
    assert len(data.load_roles()) == 275
    assert len(data.load_questions()) == 240
    assert len(data.load_traits()) == 240
    role = data.load_roles()["bard"]
    assert len(role.system_prompts) == 5 and "{question}" in role.judge_prompt and "{answer}" in role.judge_prompt
    trait = next(iter(data.load_traits().values()))
    assert len(trait.pos_prompts) == len(trait.neg_prompts) == 5


def test_defaults_fill_in_the_model_name():
    prompts = data.load_default_prompts("Gemma")
    assert list(prompts) == data.DEFAULT_PERSONA_NAMES
    assert prompts["default_empty"] == "" and prompts["default_name"] == "You are Gemma."


def test_working_set():
    personas = data.working_personas("Gemma")
    assert len(personas) == 21 and len(data.WORKING_ROLES) == 16
    questions = data.working_questions(15)
    assert len(questions) == len(set(questions)) == 15
    assert len(data.working_questions(20)) == 20
