"""Every check passes the reference solution and rejects realistic wrong answers, with a useful message."""

import re

import pytest
import torch

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


CHECKS = {  # check -> the reference object it takes
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


@pytest.mark.parametrize("check_name", list(CHECKS))
def test_check_passes_the_reference(check_name, reference, tiny, capsys):
    _run(check_name, reference[CHECKS[check_name]], tiny)
    assert "all checks passed" in capsys.readouterr().out


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


# ---- Realistic mistakes: each must be rejected with a message that names it. -------------------------

def _rejects(check_name, fn, tiny, *needles):
    with pytest.raises(CheckFailure) as info:
        _run(check_name, fn, tiny)
    message = str(info.value)
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in: {message}"
    return message


def test_judge_first_digit_parser_is_rejected(tiny):
    def judge(question, response, character, client, judge_model, eval_prompt=None):
        reply = client.chat.completions.create(model=judge_model, messages=[
            {"role": "user", "content": f"{question} {response} {character}"}]).choices[0].message.content
        return int(re.search(r"\d", reply).group())

    _rejects("test_judge_role_response", judge, tiny, "first digit")


def test_judge_template_without_response_placeholder_is_rejected(reference, tiny):
    template = reference["JUDGE_PROMPT_TEMPLATE"].replace("{response}", "")
    _rejects("test_judge_prompt_template", template, tiny, "{response}")


def test_generation_that_blanks_failures_is_rejected(reference, tiny):
    base = reference["generate_all_responses"]

    def generate_all(client, model_name, personas, questions, max_workers=16, **kw):
        responses, failures = base(client, model_name, personas, questions, max_workers, **kw)
        responses.update({k: "" for k in failures})
        return responses, {}

    _rejects("test_generate_all_responses", generate_all, tiny, "never as an empty")


def test_serial_generation_is_rejected(reference, tiny):
    base = reference["generate_all_responses"]

    def generate_all(client, model_name, personas, questions, max_workers=16, **kw):
        return base(client, model_name, personas, questions, 1, **kw)

    _rejects("test_generate_all_responses", generate_all, tiny, "one at a time")


def test_gemma_system_role_is_rejected(reference, tiny):
    def normalize(messages, tokenizer):
        return [dict(m) for m in messages if m["role"] != "system" or m["content"].strip()]

    _rejects("test_normalize_messages", normalize, tiny, "merge the system prompt")


def test_double_bos_index_is_rejected(reference, tiny):
    def format_messages(messages, tokenizer):
        msgs = reference["_normalize_messages"](messages, tokenizer)
        prefix = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        return tokenizer.apply_chat_template(msgs, tokenize=False), len(tokenizer(prefix).input_ids)

    _rejects("test_format_messages_response_index", format_messages, tiny, "second BOS")


def test_wrong_layer_is_rejected(reference, tiny):
    def extract(model, tokenizer, conversations, layer):
        return reference["extract_response_activations"](model, tokenizer, conversations, layer - 1)

    _rejects("test_extract_response_activations", extract, tiny, "hidden_states[layer]")


def test_left_padding_mask_bug_is_rejected(reference, tiny):
    fmt = reference["format_messages"]

    def extract(model, tokenizer, conversations, layer, batch_size=8):
        from utils.conversation import turn_suffix_len

        out = []
        for b in range(0, len(conversations), batch_size):
            prompts, spans = [], []
            for messages in conversations[b:b + batch_size]:
                full, start = fmt(messages, tokenizer)
                n = len(tokenizer(full, add_special_tokens=False).input_ids)
                prompts.append(full)
                spans.append((start, n - turn_suffix_len(tokenizer)))
            enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            pos = torch.arange(enc.input_ids.shape[1])[None, :]
            mask = torch.stack([((pos[0] >= s) & (pos[0] < e)).float() for s, e in spans])
            hidden = model(**enc, output_hidden_states=True).hidden_states[layer + 1].float()
            out.append(((hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)).detach())
        return torch.cat(out)

    _rejects("test_extract_response_activations_batched", extract, tiny, "LEFT padding")


def test_persona_with_no_survivors_giving_nan_is_rejected(reference, tiny):
    batched = reference["extract_response_activations_batched"]

    def persona_vectors(model, tokenizer, personas, questions, responses, layer, scores=None, score_threshold=3):
        out = {}
        scores = scores or {}
        for p in personas:
            keys = [k for k in responses if k[0] == p and (k not in scores or scores[k] >= score_threshold)]
            convs = [[{"role": "system", "content": personas[p]}, {"role": "user", "content": questions[q]},
                      {"role": "assistant", "content": responses[(p, q)]}] for _, q in keys]
            out[p] = batched(model, tokenizer, convs, layer).mean(0) if convs else torch.full(
                (model.config.hidden_size,), float("nan"))
        return out

    _rejects("test_extract_persona_vectors", persona_vectors, tiny, "ghost")


def test_uncentred_cosine_is_rejected(reference, tiny):
    _rejects("test_compute_cosine_similarity_matrix_centered", reference["compute_cosine_similarity_matrix"], tiny,
             "raw cosines")


def test_uncentred_pca_is_rejected(tiny):
    def pca(persona_vectors):
        vectors = torch.stack(list(persona_vectors.values())).float()
        _, s, vh = torch.linalg.svd(vectors, full_matrices=False)
        return vectors @ vh[:2].T, (s**2 / (s**2).sum())[:2], vh[:2]

    _rejects("test_pca_decompose_persona_vectors", pca, tiny, "uncentred")


def test_axis_pointing_away_is_rejected(reference, tiny):
    def axis(default_vectors, role_vectors):
        return -reference["compute_assistant_axis"](default_vectors, role_vectors)

    _rejects("test_compute_assistant_axis", axis, tiny, "wrong way")


def test_unsorted_characterize_is_rejected(reference, tiny):
    def characterize(persona_vectors, assistant_axis):
        return dict(sorted(reference["characterize_axis"](persona_vectors, assistant_axis).items()))

    _rejects("test_characterize_axis", characterize, tiny, "lowest cosine")


def test_swapped_trait_vector_is_rejected(reference, tiny):
    _rejects("test_compute_trait_vector", lambda pos, neg: reference["compute_trait_vector"](neg, pos), tiny,
             "wrong way")


def test_auc_ignoring_ties_is_rejected(tiny):
    def auc(scores, positive):
        pos, neg = scores[positive], scores[~positive]
        if len(pos) == 0 or len(neg) == 0:
            raise ValueError("empty")
        return float((pos[:, None] > neg[None, :]).float().mean())

    _rejects("test_axis_auc", auc, tiny, "ties")


def test_judge_accepting_four_is_rejected(tiny):
    def judge(question, response, character, client, judge_model, eval_prompt=None):
        reply = client.chat.completions.create(model=judge_model, messages=[
            {"role": "user", "content": f"{question} {response} {character}"}]).choices[0].message.content.strip()
        match = re.search(r"<score>(\d)</score>", reply) or re.fullmatch(r"(\d)", reply)
        if not match or int(match.group(1)) > 4:
            raise ValueError(reply)
        return int(match.group(1))

    _rejects("test_judge_role_response", judge, tiny, "4 is outside")


def test_auc_without_a_positive_class_is_rejected(tiny):
    def auc(scores, positive):
        pos, neg = scores[positive], scores[~positive]
        if len(neg) == 0:
            raise ValueError("no negatives")
        diff = pos[:, None] - neg[None, :]
        return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())

    _rejects("test_axis_auc", auc, tiny, "no positive examples")


@pytest.mark.parametrize("check_name", ["test_compute_cosine_similarity_matrix",
                                        "test_compute_cosine_similarity_matrix_centered",
                                        "test_compute_assistant_axis", "test_compute_trait_vector"])
def test_geometry_without_a_float32_cast_is_rejected(check_name, reference, tiny):
    """The reference with its result left in the input's dtype: right for float32 input, wrong for bf16 (and
    float64) input, which the checks now feed."""
    ref = reference[CHECKS[check_name]]

    def keep_dtype(*args):
        out = ref(*args)
        dtype_in = next(iter(args[0].values())).dtype if isinstance(args[0], dict) else args[0].dtype
        if isinstance(out, tuple):
            return (out[0].to(dtype_in), out[1])
        return out.to(dtype_in)

    _rejects(check_name, keep_dtype, tiny, "float32", "bf16")
