"""What the mutation catalogue (tests/catalogue/, tests/test_catalogue.py) does not run: Part 1's checks with the
reference on SmolLM2, the hidden checks with the reference and with a mistake only they catch, and where the
notebook calls the checks. The catalogue runs every visible check with the reference on tiny-gemma2, each
catalogued mistake and each correct variant."""

import re

import pytest

from tests import part1_persona_space as checks
from tests.part1_persona_space import CheckFailure


TOKENIZER_CHECKS = ("test_normalize_messages", "test_format_messages_response_index")  # called as check(fn, tokenizer)


def _takes_model(check_name) -> bool:
    """Extraction checks take (fn, model, tokenizer, d_model, num_layers)."""
    return check_name.startswith("test_extract")


def _run(check_name, fn, tiny):
    model, tok = tiny
    check = getattr(checks, check_name)
    if check_name in TOKENIZER_CHECKS:
        return check(fn, tok)
    if _takes_model(check_name):
        return check(fn, model, tok, model.config.hidden_size, model.config.num_hidden_layers)
    return check(fn)


CHECKS = {  # check -> the reference object it takes (tests/test_catalogue.py reads this table too)
    "test_judge_prompt_template": "JUDGE_PROMPT_TEMPLATE",
    "test_judge_role_response": "judge_role_response",
    "test_generate_response_api": "generate_response_api",
    "test_generate_all_responses": "generate_all_responses",
    "test_normalize_messages": "_normalize_messages",
    "test_format_messages_response_index": "format_messages",
    "test_extract_response_activations": "extract_response_activations",
    "test_extract_response_activations_batched": "extract_response_activations_batched",
    "test_extract_persona_vectors": "extract_persona_vectors",
    "test_compute_cosine_similarity_matrix": "compute_cosine_similarity_matrix",
    "test_compute_cosine_similarity_matrix_centered": "compute_cosine_similarity_matrix_centered",
    "test_pca_decompose_persona_vectors": "pca_decompose_persona_vectors",
    "test_compute_assistant_axis": "compute_assistant_axis",
    "test_characterize_axis": "characterize_axis",
    "test_compute_trait_vector": "compute_trait_vector",
    "test_axis_auc": "axis_auc",
}


HIDDEN_CHECKS = {
    "hidden_test_judge_with_every_paper_prompt": "judge_role_response",
    "hidden_test_extract_batch_sizes": "extract_response_activations_batched",
}


def test_every_check_in_the_module_is_covered():
    defined = {name for name in dir(checks) if name.startswith("test_") and callable(getattr(checks, name))}
    assert defined == set(CHECKS)
    hidden = {name for name in dir(checks) if name.startswith("hidden_test_")}
    assert hidden == set(HIDDEN_CHECKS)


@pytest.mark.parametrize("check_name", list(HIDDEN_CHECKS))
def test_hidden_check_passes_the_reference(check_name, reference, capsys):
    getattr(checks, check_name)(reference[HIDDEN_CHECKS[check_name]])
    assert "all checks passed" in capsys.readouterr().out


def test_hidden_batch_size_check_rejects_a_fixed_batch(reference):
    def extract(model, tokenizer, conversations, layer, batch_size=8):  # ignores padding: only right when unpadded
        single = reference["extract_response_activations"]
        if batch_size == 1:
            return single(model, tokenizer, conversations, layer)
        bad = single(model, tokenizer, conversations, layer)
        return bad + 1.0

    with pytest.raises(CheckFailure, match="batch_size=2"):
        checks.hidden_test_extract_batch_sizes(extract)


MODEL_CHECKS = [name for name in CHECKS if name in TOKENIZER_CHECKS or _takes_model(name)]


@pytest.fixture(scope="module")
def smollm2():
    """The real offline model learners load (dequantised once into .cache/models)."""
    from utils.models import SMOLLM2, load_model

    return load_model(SMOLLM2)


@pytest.mark.parametrize("check_name", MODEL_CHECKS)
def test_check_passes_the_reference_on_smollm2(check_name, reference, smollm2, capsys):
    """The demo and learners call these checks with SmolLM2 (ChatML, a BOS-like <|im_start|> on every turn,
    right padding): they must pass the reference there too, not only on tiny-gemma2."""
    _run(check_name, reference[CHECKS[check_name]], smollm2)
    assert "all checks passed" in capsys.readouterr().out


def test_notebook_calls_every_check_right_after_its_exercise():
    from tools.build_notebooks import read_source

    nb = read_source("part1_persona_space")
    called = set()
    for i, cell in enumerate(nb.cells):
        found = re.findall(r"checks\.(test_\w+)\(", cell.source)
        if found:
            assert nb.cells[i - 1].metadata["nbgrader"].get("solution"), f"{found} does not follow an exercise"
            assert cell.metadata["nbgrader"].get("grade"), f"{found} is not a graded cell"
            called |= set(found)
    assert called == set(CHECKS)
