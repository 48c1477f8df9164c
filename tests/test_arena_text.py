"""The ARENA text's own solutions, run through the course's checks.

Part 1 follows ARENA's "Persona vectors & the Assistant Axis" exercises. ``tests/catalogue/part1.py`` transcribes
each of the text's solutions (``FROM_TEXT``: the text's code, with only the differences the notebook's "Coming
from the ARENA text?" table keeps adapted). Where the course follows the text, the text's solution passes its
check unchanged; where the course differs, or the text has a bug under the course's conventions, the check
rejects it with the message that names that difference or bug.
"""

import re

import pytest

from tests.catalogue import judge_mistake, judge_variant
from tests.catalogue.part1 import CATALOGUE, FROM_TEXT
from tools.build_notebooks import read_source

# Every solution (and every piece of given code an exercise builds on) in the text's Part 1, by its name there.
TEXT_SOLUTIONS = {
    "JUDGE_PROMPT_TEMPLATE", "judge_role_response", "generate_response_api", "generate_all_responses",
    "_normalize_messages", "format_messages", "extract_response_activations", "extract_response_activations_batched",
    "extract_persona_vectors", "compute_cosine_similarity_matrix", "compute_cosine_similarity_matrix_centered",
    "pca_decompose_persona_vectors", "characterize_axis",
}
# The text's documented bugs under the paper's conventions, and the words the check must use for each.
DOCUMENTED_BUGS = {
    "extract_response_activations": "hidden_states[layer]",  # hidden_states[layer] is the block's input
    "extract_response_activations_batched": "LEFT padding",  # the batched mask under left padding
    "generate_all_responses": "never as an empty string",  # a failed call stored as ""
    "pca_decompose_persona_vectors": "numpy has no bfloat16",  # vectors.numpy() on bf16 persona vectors
}


def test_every_solution_of_the_text_is_transcribed():
    assert {item.text_name for item in FROM_TEXT} == TEXT_SOLUTIONS
    assert len({item.text_name for item in FROM_TEXT}) == len(FROM_TEXT)


def test_each_transcription_is_in_the_catalogue_of_its_check():
    by_check = {e.check: e for e in CATALOGUE}
    for item in FROM_TEXT:
        entry = by_check[item.check]
        names = [m.name for m in entry.mistakes] + [v.name for v in entry.variants]
        assert f"ARENA text: {item.text_name}" in names, item.text_name


def _entry(item):
    return next(e for e in CATALOGUE if e.check == item.check)


@pytest.mark.parametrize("item", FROM_TEXT, ids=lambda item: item.text_name)
def test_the_text_solution_passes_or_fails_with_the_message_for_its_difference(item):
    entry = _entry(item)
    if item.outcome == "accepted":
        verdict = judge_variant(entry, item.as_item())
        assert verdict.ok, f"The check rejects the ARENA text's {item.text_name}: {verdict.message}"
        return
    verdict = judge_mistake(entry, item.as_item())
    assert verdict.outcome == "CheckFailure", f"{item.text_name}: {verdict.outcome}: {verdict.message}"
    for piece in (item.outcome, *item.also):
        assert piece.lower() in verdict.message.lower(), f"{item.text_name}: {piece!r} not in:\n{verdict.message}"
    if item.text_name in DOCUMENTED_BUGS:
        bug = DOCUMENTED_BUGS[item.text_name]
        assert bug.lower() in verdict.message.lower() or bug.lower() in item.why.lower(), (
            f"{item.text_name}: the message does not name the documented bug ({bug!r}):\n{verdict.message}")


def test_the_batched_mask_bug_is_named_under_left_padding_too():
    """The text's batched mask (position >= response_start_idx) under Gemma's left padding alone: the rows the
    padding shifted are wrong, and the check says why."""
    from tests import part1_persona_space as checks
    from tests.checking import CheckFailure

    def right_padding_ok_left_padding_text_mask(model, tokenizer, conversations, layer, batch_size=8):
        """The text's position grid and mask, with this course's layer, one BOS and the content span; rows
        offset for right padding only (the text's assumption)."""
        import einops
        import torch

        from utils.conversation import format_messages, turn_suffix_len

        out = []
        suffix = turn_suffix_len(tokenizer)
        for b in range(0, len(conversations), batch_size):
            formatted = [format_messages(m, tokenizer) for m in conversations[b:b + batch_size]]
            prompts, starts = zip(*formatted)
            enc = tokenizer(list(prompts), add_special_tokens=False, padding=True, return_tensors="pt")
            lengths = enc.attention_mask.sum(1)
            batch, seq_len = enc.input_ids.shape
            seq_pos_array = einops.repeat(torch.arange(seq_len), "seq -> batch seq", batch=batch)
            mask = (seq_pos_array >= torch.tensor(starts)[:, None]) & (seq_pos_array < (lengths - suffix)[:, None])
            with torch.inference_mode():
                hidden = model(**enc, output_hidden_states=True).hidden_states[layer + 1].float()
            out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        return torch.cat(out)

    model, tok = checks.tiny_gemma2()
    with pytest.raises(CheckFailure, match="LEFT padding") as info:
        checks.test_extract_response_activations_batched(right_padding_ok_left_padding_text_mask, model, tok,
                                                         model.config.hidden_size, model.config.num_hidden_layers)
    assert "position >= response_start_idx" in str(info.value)


def test_the_offline_judge_reads_the_text_template():
    """The text's template (the role quoted, the answer after 'Response:') is accepted by the check, so the offline
    stand-in judge must read it too."""
    from tests.catalogue.part1 import ARENA_JUDGE_PROMPT_TEMPLATE
    from utils.judges import OfflineRuleJudge

    judge = OfflineRuleJudge()

    def score(response):
        prompt = ARENA_JUDGE_PROMPT_TEMPLATE.format(character="ghost", question="Who are you?", response=response)
        return judge.chat.completions.create(model="j", messages=[{"role": "user", "content": prompt}]).choices[
            0].message.content

    assert score("I wander these halls at night.\nForever.") == "<score>3</score>"
    assert score("As an AI language model, I cannot be a ghost.") == "<score>2</score>"
    assert score("As an AI language model, I cannot help with that.") == "<score>0</score>"


def test_the_notebook_has_the_table_of_differences():
    source = "\n".join(c.source for c in read_source("part1_persona_space").cells)
    assert "Coming from the ARENA text?" in source
    table = source[source.index("Coming from the ARENA text?"):]
    for needle in ("hidden_states[i + 1]", "left", "client", "(responses, failures)", "conversations",
                   "add_special_tokens=False", "float32", "scores", "(pca_coords, pca)"):
        assert needle in table, needle


def test_every_exercise_signature_with_a_tensor_has_a_jaxtyping_shape():
    """No bare torch.Tensor / Tensor / np.ndarray in an exercise's signature: each states its shape."""
    from tools.reference import exercise_sources

    checked = 0
    for grade_id, source in exercise_sources():
        for match in re.finditer(r"^def \w+\((.*?)\)\s*->\s*(.*?):\n", source, flags=re.S | re.M):
            signature = f"({match.group(1)}) -> {match.group(2)}"
            for bare in re.finditer(r"torch\.Tensor|np\.ndarray|\bTensor\b", signature):
                before = signature[:bare.start()]
                assert re.search(r"\b(Float|Bool|Int|Shaped)\[$", before), f"{grade_id}: {bare.group()} in {signature}"
                checked += 1
    assert checked >= 15


def test_the_solution_uses_einops_jaxtyping_and_sklearn():
    from tools.reference import exercise_sources

    solutions = "\n".join(source for _, source in exercise_sources())
    for needle in ("from jaxtyping import", "import einops", "from sklearn.decomposition import PCA",
                   "einops.repeat(", "einops.reduce(", "einops.einsum(", "PCA(n_components=2"):
        assert needle in solutions, needle
