"""An answer that hands its work to the course's own implementation fails its check (tests/implementations.py,
the guard in tests/checking.py).

For every check in the registry and every implementation registered for it, three delegating answers fail with
the message that names the course's function: the implementation itself, an alias of it (imported under the
exercise's name, a ``functools.partial``, a copy of its code), and an answer the learner wrote that calls it
through a helper of their own. Each of those calling answers is a thin wrapper that the check itself accepts
(the failure records what the check concluded), so the pairing is real: without the guard it would score. The
reference solution, the helpers the notebook tells learners to use, and the checks' own calls of the course's
functions still pass.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import io
import linecache
import types

import pytest

from tests import checking
from tests import part1_persona_space as checks1
from tests import part2_stabilizing as checks2
from tests import part3_trait_vectors as checks3
from tests.catalogue import call_check
from tests.checking import CheckFailure
from tests.implementations import NO_COURSE_IMPLEMENTATION, REGISTRY, RegistryError, resolve

PAIRS = [(check, dotted) for check, entry in REGISTRY.items() for dotted in entry.implementations]
DOES_NOT_PASS_TODAY = {  # registered, but no thin wrapper of it passes the check even without the guard
    ("tests.part2_stabilizing.test_next_token_kl", "utils.experiments.next_token_kl"):
        "it runs a model over conversations, it does not take logits",
}
EXERCISE_NAMES = {  # check -> the name of the learner's function (what the notebook cell defines)
    "test_judge_role_response": "judge_role_response", "test_generate_response_api": "generate_response_api",
    "test_generate_all_responses": "generate_all_responses", "test_normalize_messages": "_normalize_messages",
    "test_format_messages_response_index": "format_messages",
    "test_extract_response_activations": "extract_response_activations",
    "test_extract_response_activations_batched": "extract_response_activations_batched",
    "test_parse_transcript": "parse_transcript", "test_turn_projections": "turn_projections",
    "test_capping_threshold": "capping_threshold", "test_drift_summary": "drift_summary",
    "test_add_steering": "add_steering", "test_cap_activations": "cap_activations",
    "test_activation_capping": "activation_capping", "test_next_token_kl": "next_token_kl",
    # Part 3
    "test_contrastive_prompts": "contrastive_prompts", "test_split_questions": "split_questions",
    "test_logprob_score": "logprob_score", "test_judge_0_100": "judge_0_100", "test_effective_pairs": "effective_pairs",
    "test_three_averages": "three_averages", "test_trait_vector": "trait_vector",
    "test_spread_scaled_vectors": "spread_scaled_vectors", "test_layer_sweep": "layer_sweep",
    "test_steer_positions": "steer_positions", "test_monitoring_correlations": "monitoring_correlations",
    "test_cosine_matrix": "cosine_matrix", "test_cosine_with_axis": "cosine_with_axis",
    "test_projection_differences": "projection_differences", "test_preventative_loss": "preventative_loss",
}

# Learner cells that delegate: each defines the exercise's function as a thin wrapper of one course implementation,
# most of them through a helper of the learner's own.
CALLING = {
    ("test_judge_role_response", "utils.judges.parse_score"): '''
from utils.judges import parse_score

TEMPLATE = "Role **{character}**\\n[QUESTION START]{question}[QUESTION END]\\n[ANSWER START]{response}[ANSWER END]"


def _ask(client, judge_model, prompt):
    reply = client.chat.completions.create(model=judge_model, messages=[{"role": "user", "content": prompt}])
    return parse_score(reply.choices[0].message.content, "a role score")


def judge_role_response(question, response, character, client, judge_model, eval_prompt=None):
    if eval_prompt is None:
        return _ask(client, judge_model, TEMPLATE.format(character=character, question=question, response=response))
    return _ask(client, judge_model, eval_prompt.format(question=question, answer=response))
''',
    ("test_judge_role_response", "utils.judges.judge_score"): '''
from utils.judges import judge_score

TEMPLATE = "Role **{character}**\\n[QUESTION START]{question}[QUESTION END]\\n[ANSWER START]{response}[ANSWER END]"


def judge_role_response(question, response, character, client, judge_model, eval_prompt=None):
    if eval_prompt is None:
        return judge_score(client, judge_model, TEMPLATE.format(character=character, question=question, response=response))
    return judge_score(client, judge_model, eval_prompt.format(question=question, answer=response))
''',
    ("test_generate_response_api", "utils.conversation.merge_system_prompt"): '''
from utils.conversation import merge_system_prompt


def _messages(model_name, system_prompt, question):
    return merge_system_prompt([{"role": "system", "content": system_prompt}, {"role": "user", "content": question}],
                               "gemma" not in model_name.lower())


def generate_response_api(client, model_name, system_prompt, question, max_tokens=128, temperature=0.7, top_p=0.9):
    messages = _messages(model_name, system_prompt, question)
    completion = client.chat.completions.create(model=model_name, messages=messages, max_tokens=max_tokens,
                                                temperature=temperature, top_p=top_p)
    text = (completion.choices[0].message.content or "").strip()
    if not text:
        raise ValueError("empty reply")
    return text
''',
    ("test_generate_all_responses", "utils.runtime.run_parallel"): '''
from utils.runtime import run_parallel


def generate_all_responses(client, model_name, personas, questions, max_workers=16, **generation_kwargs):
    keys = [(p, q) for p in personas for q in range(len(questions))]
    return run_parallel(lambda k: generate_response_api(client, model_name, personas[k[0]], questions[k[1]],
                                                        **generation_kwargs), keys, max_workers=max_workers)
''',
    ("test_normalize_messages", "utils.conversation.normalize_messages"): '''
import utils.conversation


def _normalize_messages(messages, tokenizer):
    return utils.conversation.normalize_messages(messages, tokenizer)
''',
    ("test_normalize_messages", "utils.conversation.merge_system_prompt"): '''
from utils.conversation import merge_system_prompt, supports_system_role


def _normalize_messages(messages, tokenizer):
    return merge_system_prompt(messages, supports_system_role(tokenizer))
''',
    ("test_format_messages_response_index", "utils.conversation.format_messages"): '''
from utils import conversation as chat


def format_messages(messages, tokenizer):
    return chat.format_messages(messages, tokenizer)
''',
    ("test_format_messages_response_index", "utils.conversation.response_token_span"): '''
from utils.conversation import render, response_token_span


def format_messages(messages, tokenizer):
    _, start, _ = response_token_span(messages, tokenizer)
    return render(messages, tokenizer), start
''',
    ("test_extract_response_activations", "utils.activations.extract_mean_activations"): '''
def extract_response_activations(model, tokenizer, conversations, layer):
    from utils.activations import extract_mean_activations

    return extract_mean_activations(model, tokenizer, conversations, layer, batch_size=1, progress=False)
''',
    ("test_extract_response_activations", "utils.activations.per_turn_mean_activations"): '''
import torch
from utils.activations import per_turn_mean_activations


def extract_response_activations(model, tokenizer, conversations, layer):
    return torch.stack([per_turn_mean_activations(model, tokenizer, c, layer)[-1, 0] for c in conversations])
''',
    ("test_extract_response_activations_batched", "utils.activations.extract_mean_activations"): '''
import functools
from utils.activations import extract_mean_activations

_quiet = functools.partial(extract_mean_activations, progress=False)


def extract_response_activations_batched(model, tokenizer, conversations, layer, batch_size=8):
    return _quiet(model, tokenizer, conversations, layer, batch_size=batch_size)
''',
    ("test_extract_response_activations_batched", "utils.activations.per_turn_mean_activations"): '''
import torch
from utils.activations import per_turn_mean_activations


def extract_response_activations_batched(model, tokenizer, conversations, layer, batch_size=8):
    return torch.stack([per_turn_mean_activations(model, tokenizer, c, layer)[-1, 0] for c in conversations])
''',
    ("test_parse_transcript", "utils.transcripts.load_transcript"): '''
from utils.transcripts import load_transcript as _load


def parse_transcript(path):
    return _load(path)
''',
    ("test_turn_projections", "utils.activations.per_turn_projections"): '''
from utils.activations import per_turn_projections


def turn_projections(model, tokenizer, messages, axis, layer, max_tokens=8192):
    return per_turn_projections(model, tokenizer, messages, axis, layer, max_tokens=max_tokens)
''',
    ("test_turn_projections", "utils.activations.per_turn_mean_activations"): '''
from utils.activations import per_turn_mean_activations


def turn_projections(model, tokenizer, messages, axis, layer, max_tokens=8192):
    means = per_turn_mean_activations(model, tokenizer, messages, layer, max_tokens=max_tokens)[:, 0]
    return means @ (axis.float() / axis.float().norm())
''',
    ("test_capping_threshold", "utils.steering.capping_thresholds"): '''
from utils.steering import capping_thresholds


def capping_threshold(projections, percentile=25.0):
    return capping_thresholds(projections, percentile)
''',
    ("test_drift_summary", "utils.experiments.slope"): '''
import torch
from utils.experiments import slope


def _fit(projections):
    return slope(projections)


def drift_summary(projections, threshold):
    below = torch.nonzero(projections < threshold).flatten()
    return _fit(projections), (int(below[0]) if len(below) else None)
''',
    ("test_drift_summary", "utils.experiments.first_below"): '''
import torch
from utils.experiments import first_below


def drift_summary(projections, threshold):
    y = projections.double()
    x = torch.arange(len(y), dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return slope, first_below(projections, threshold)
''',
    ("test_add_steering", "utils.steering.steering"): '''
import contextlib
from utils.steering import steering


def _steer(model, layer, vector, positions):
    return steering(model, {layer: vector}, positions=positions)


@contextlib.contextmanager
def add_steering(model, layer, vector, positions="all"):
    with _steer(model, layer, vector, positions):
        yield
''',
    ("test_add_steering", "utils.steering.intervene"): '''
import contextlib
from utils.steering import intervene


@contextlib.contextmanager
def add_steering(model, layer, vector, positions="all"):
    with intervene(model, add={layer: vector}, positions=positions):
        yield
''',
    ("test_cap_activations", "utils.steering.cap_activations"): '''
import utils.steering as course


def cap_activations(h, unit_axis, tau):
    return course.cap_activations(h, unit_axis, tau)
''',
    ("test_cap_activations", "utils.steering._cap"): '''
from utils.steering import _cap


def cap_activations(h, unit_axis, tau):
    capped, _ = _cap(h, unit_axis, tau)
    return capped
''',
    ("test_activation_capping", "utils.steering.capping"): '''
import contextlib
from utils.steering import capping


@contextlib.contextmanager
def activation_capping(model, axes, thresholds, layers):
    with capping(model, {l: axes[l] for l in layers}, {l: thresholds[l] for l in layers}):
        yield
''',
    ("test_activation_capping", "utils.steering.intervene"): '''
import contextlib
from utils.steering import intervene


@contextlib.contextmanager
def activation_capping(model, axes, thresholds, layers):
    with intervene(model, cap={l: (axes[l], thresholds[l]) for l in layers}):
        yield
''',
    ("test_next_token_kl", "utils.experiments.next_token_kl"): '''
from utils.experiments import next_token_kl as course_next_token_kl


def next_token_kl(logits_p, logits_q):
    return course_next_token_kl(logits_p, logits_q, None)
''',
    # ------------------------------------------------------------------------------------------------ Part 3
    ("test_contrastive_prompts", "utils.traits.contrastive_system_prompts"): '''
from utils.traits import contrastive_system_prompts


def contrastive_prompts(trait, n_pairs):
    return contrastive_system_prompts(trait, n_pairs)
''',
    ("test_contrastive_prompts", "utils.traits.system_prompt"): '''
from utils.traits import system_prompt


def _pair(trait, i):
    return system_prompt(trait.name, trait.pos_prompts[i], True), system_prompt(trait.name, trait.neg_prompts[i], False)


def contrastive_prompts(trait, n_pairs):
    if not 1 <= n_pairs <= 5:
        raise ValueError("n_pairs must be in 1..5")
    return [_pair(trait, i) for i in range(n_pairs)]
''',
    ("test_split_questions", "utils.traits.split_questions"): '''
import utils.traits


def split_questions(questions):
    return utils.traits.split_questions(questions)
''',
    ("test_logprob_score", "utils.judges.logprob_score"): '''
from utils.judges import logprob_score as _score


def logprob_score(top_logprobs, min_mass=0.25):
    return _score(list(top_logprobs), min_mass=min_mass)
''',
    ("test_judge_0_100", "utils.judges.judge_logprob_score"): '''
from utils.judges import judge_logprob_score


def judge_0_100(client, judge_model, prompt):
    return judge_logprob_score(client, judge_model, prompt)
''',
    ("test_judge_0_100", "utils.judges.top_logprobs_of"): '''
from utils.judges import top_logprobs_of


def _ask(client, judge_model, prompt):
    return client.chat.completions.create(model=judge_model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)


def judge_0_100(client, judge_model, prompt):
    alternatives = top_logprobs_of(_ask(client, judge_model, prompt))
    return logprob_score([(a.token, a.logprob) for a in alternatives])
''',
    ("test_effective_pairs", "utils.traits.effective_pairs"): '''
from utils.traits import effective_pairs as course_pairs


def effective_pairs(pos_scores, neg_scores, pos_coherence, neg_coherence, threshold=50.0, coherence_threshold=50.0):
    return course_pairs(pos_scores, neg_scores, pos_coherence, neg_coherence, threshold, coherence_threshold)
''',
    ("test_three_averages", "utils.activations.extract_prompt_response_means"): '''
from utils.activations import extract_prompt_response_means


def three_averages(model, tokenizer, conversations):
    return extract_prompt_response_means(model, tokenizer, conversations, progress=False)
''',
    ("test_trait_vector", "utils.traits.trait_vectors"): '''
from utils.traits import trait_vectors


def trait_vector(pos, neg):
    return trait_vectors(pos, neg)
''',
    ("test_spread_scaled_vectors", "utils.traits.spread_scaled_vectors"): '''
import utils.traits as course


def spread_scaled_vectors(vectors, activations, layers, multiple):
    return course.spread_scaled_vectors(vectors, activations, layers, multiple)
''',
    ("test_spread_scaled_vectors", "utils.traits.projection_spread"): '''
from utils.traits import projection_spread


def _unit(v):
    return v.float() / v.float().norm()


def spread_scaled_vectors(vectors, activations, layers, multiple):
    return {layer: float(multiple) * projection_spread(activations[:, layer], _unit(vectors[layer])) * _unit(vectors[layer])
            for layer in layers}
''',
    ("test_layer_sweep", "utils.traits.layer_sweep"): '''
from utils.traits import layer_sweep as course_sweep


def layer_sweep(model, tokenizer, questions, vectors, judge, max_new_tokens):
    return course_sweep(model, tokenizer, questions, vectors, judge, max_new_tokens)
''',
    ("test_layer_sweep", "utils.traits.steered_answers"): '''
from utils.conversation import chat_messages
from utils.traits import steered_answers


def _mean(scores):
    kept = [s for s in scores if s is not None]
    return sum(kept) / len(kept) if kept else None


def layer_sweep(model, tokenizer, questions, vectors, judge, max_new_tokens):
    prompts = [chat_messages("", q) for q in questions]
    out = {}
    for layer, vector in vectors.items():
        answers = steered_answers(model, tokenizer, prompts, max_new_tokens, layer, vector)
        out[layer] = _mean([judge(q, a) for q, a in zip(questions, answers)])
    return out
''',
    ("test_layer_sweep", "utils.traits.mean_score"): '''
from utils.conversation import chat_messages
from utils.generation import generate
from utils.steering import steering
from utils.traits import mean_score


def layer_sweep(model, tokenizer, questions, vectors, judge, max_new_tokens):
    prompts = [chat_messages("", q) for q in questions]
    out = {}
    for layer, vector in vectors.items():
        with steering(model, {layer: vector}):
            answers = generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0)
        out[layer] = mean_score([judge(q, a) for q, a in zip(questions, answers)])
    return out
''',
    ("test_steer_positions", "utils.steering.steer_positions"): '''
from utils import steering


def steer_positions(h, vector, positions):
    return steering.steer_positions(h, vector, positions)
''',
    ("test_steer_positions", "utils.steering.pass_positions"): '''
from utils.steering import pass_positions


def steer_positions(h, vector, positions):
    if positions not in ("all", "prompt", "response"):
        raise ValueError(f"unknown positions {positions!r}")
    where = pass_positions(h, {"past_key_values": True}, positions)
    out = h.clone()
    if where is not None:
        out[:, where] = out[:, where] + vector.to(device=h.device, dtype=h.dtype)
    return out
''',
    ("test_monitoring_correlations", "utils.traits.monitoring_correlations"): '''
from utils.traits import monitoring_correlations as course_correlations


def monitoring_correlations(projections, scores, conditions):
    return course_correlations(projections, scores, conditions)
''',
    ("test_monitoring_correlations", "utils.traits.pearson"): '''
from utils.traits import pearson


def monitoring_correlations(projections, scores, conditions):
    keep = [i for i, s in enumerate(scores) if s is not None]
    x, y = [float(projections[i]) for i in keep], [float(scores[i]) for i in keep]
    out = {"overall": pearson(x, y), "n": len(keep), "within": {}, "n_within": {}}
    for c in dict.fromkeys(conditions):
        idx = [k for k, i in enumerate(keep) if conditions[i] == c]
        out["within"][c] = pearson([x[k] for k in idx], [y[k] for k in idx])
        out["n_within"][c] = len(idx)
    return out
''',
    ("test_cosine_matrix", "utils.traits.cosine_matrix"): '''
from utils.traits import cosine_matrix as course_matrix


def cosine_matrix(vectors):
    return course_matrix(dict(vectors))
''',
    ("test_cosine_with_axis", "utils.traits.cosine_with_axis"): '''
from utils.traits import cosine_with_axis as course_axis


def cosine_with_axis(trait_vectors_by_name, axis, layers):
    return course_axis(trait_vectors_by_name, axis, layers)
''',
    ("test_projection_differences", "utils.traits.projection_differences"): '''
from utils.traits import projection_differences as course_differences


def projection_differences(dataset, own, prompt_last, vector):
    return course_differences(dataset, own, prompt_last, vector)
''',
    ("test_preventative_loss", "utils.finetune.steered_response_loss"): '''
from utils.finetune import steered_response_loss


def preventative_loss(model, batch, layer=None, vector=None):
    return steered_response_loss(model, batch, layer, vector)
''',
    ("test_preventative_loss", "utils.finetune.response_loss"): '''
import contextlib

from utils.finetune import response_loss
from utils.steering import steering


def preventative_loss(model, batch, layer=None, vector=None):
    with steering(model, {layer: vector}) if vector is not None else contextlib.nullcontext():
        return response_loss(model, batch)
''',
}


def _short(check: str) -> str:
    return check.rsplit(".", 1)[1]


def _learner(source: str, name: str = "cell") -> dict:
    """Run ``source`` as a notebook cell would (a file of its own, in linecache, like IPython's cells)."""
    filename = f"/tmp/ipykernel_0/delegation_{name}.py"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def _run(check: str, fn) -> CheckFailure | None:
    """The check's failure on ``fn`` (None if it passed); its printed output is swallowed."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            call_check(_short(check), fn)
        except CheckFailure as failure:
            return failure
    return None


def _assert_refused(failure: CheckFailure | None, check: str, dotted: str, how: str) -> None:
    assert failure is not None, f"{_short(check)} accepted an answer that hands the work to {dotted}"
    text = str(failure)
    assert f"this answer hands the work to the course's own {dotted}; write it yourself (you may read utils/ for " \
           "ideas)" in text, text
    assert how in text, text
    assert f"(See {REGISTRY[check].section} in the notebook.)" in text, text
    rendered = "\n".join(failure._render_traceback_())
    assert "checking.py" not in rendered and "Traceback" not in rendered


def _module_of(check: str):
    return next(m for m in (checks1, checks2, checks3) if check.startswith(m.__name__ + "."))


def _course_bindings() -> dict:
    """Every registered implementation, as its home module binds it now."""
    return {dotted: resolve(dotted) for _, dotted in PAIRS}


# ---------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------

def _checks_of(module) -> dict[str, object]:
    return {f"{module.__name__}.{name}": getattr(module, name) for name in dir(module) if name.startswith("test_")
            and callable(getattr(module, name))}


def test_every_check_is_registered_or_says_why_not():
    defined = {**_checks_of(checks1), **_checks_of(checks2), **_checks_of(checks3)}
    assert not set(REGISTRY) & set(NO_COURSE_IMPLEMENTATION)
    assert set(REGISTRY) | set(NO_COURSE_IMPLEMENTATION) == set(defined)
    for name, fn in defined.items():
        assert getattr(fn, "__course_check__", None) == name, f"{name} is not a @check (the guard would not run)"


def test_every_registered_name_resolves_to_a_function():
    for check, entry in REGISTRY.items():
        assert entry.implementations, check
        assert not set(entry.implementations) & set(entry.allowed), check
        for dotted in entry.implementations + entry.allowed:
            obj = resolve(dotted)
            assert callable(obj) and not hasattr(obj, "__course_tripwire_of__"), dotted
            assert obj.__module__ == dotted.rsplit(".", 1)[0], f"{dotted} is defined in {obj.__module__}: name it there"


def test_a_moved_function_is_a_registry_error():
    with pytest.raises(RegistryError, match="utils.steering has no 'cap_activations_gone'"):
        resolve("utils.steering.cap_activations_gone")
    with pytest.raises(RegistryError, match="update the registry"):
        resolve("utils.no_such_module.cap_activations")


def test_the_sections_are_the_checks_own():
    defined = {**_checks_of(checks1), **_checks_of(checks2), **_checks_of(checks3)}
    for check, entry in REGISTRY.items():
        source = inspect.getsource(inspect.unwrap(defined[check]))
        assert f'section = "{entry.section}"' in source, check


def test_every_registered_pair_has_a_calling_answer():
    assert set(CALLING) == {(_short(check), dotted) for check, dotted in PAIRS}
    for (check, _), source in CALLING.items():
        defined = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
        assert defined[-1] == EXERCISE_NAMES[check]


# ---------------------------------------------------------------------------------------------------
# The three delegating forms
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("check,dotted", PAIRS, ids=[f"{_short(c)}-{d}" for c, d in PAIRS])
def test_the_implementation_itself_fails(check, dotted):
    failure = _run(check, resolve(dotted))
    _assert_refused(failure, check, dotted, "The function you passed is that function itself")


ALIASES = ("import-as", "partial", "wraps", "copy-of-code")


@pytest.mark.parametrize("check,dotted", PAIRS, ids=[f"{_short(c)}-{d}" for c, d in PAIRS])
def test_an_alias_of_the_implementation_fails(check, dotted):
    impl = resolve(dotted)
    module, name = dotted.rsplit(".", 1)
    exercise = EXERCISE_NAMES[_short(check)]
    aliases = {
        "import-as": (_learner(f"from {module} import {name} as {exercise}\n", exercise)[exercise],
                      "is that function itself"),
        "partial": (functools.partial(impl), "a functools.partial or functools.wraps wrapper of it"),
        "wraps": (functools.wraps(impl)(lambda *args, **kwargs: None), "a functools.partial or functools.wraps"),
        "copy-of-code": (types.FunctionType(impl.__code__, impl.__globals__, exercise, impl.__defaults__,
                                            impl.__closure__), "The function you passed"),
    }
    assert set(aliases) == set(ALIASES)
    for kind, (alias, how) in aliases.items():
        assert alias is not impl or kind == "import-as"
        _assert_refused(_run(check, alias), check, dotted, how)


@pytest.mark.parametrize("check,dotted", PAIRS, ids=[f"{_short(c)}-{d}" for c, d in PAIRS])
def test_an_answer_that_calls_the_implementation_fails(check, dotted):
    """The learner's own function (through helpers of theirs) calls the course's; the check itself accepts the
    answer (``underlying`` is None), so only the guard stands between it and the marks."""
    before = _course_bindings()
    exercise = EXERCISE_NAMES[_short(check)]
    namespace = _learner(CALLING[(_short(check), dotted)], exercise)
    own = dict(namespace)
    failure = _run(check, namespace[exercise])
    _assert_refused(failure, check, dotted, f"Your {exercise} calls it while the check runs (from your ")
    assert "delegation_" in str(failure), "the message says where the call was made"
    if (check, dotted) in DOES_NOT_PASS_TODAY:
        assert failure.underlying is not None
    else:
        assert failure.underlying is None, f"without the guard the check would reject this answer too: " \
                                           f"{failure.underlying}"
    assert _course_bindings() == before, "a course function was left replaced"
    assert all(namespace[k] is v for k, v in own.items()) and set(namespace) == set(own), "the cell's names changed"
    assert checking.RESULTS[getattr(_module_of(check), _short(check)).__course_exercise__] is False


# ---------------------------------------------------------------------------------------------------
# Every way the learner's code can reach the implementation
# ---------------------------------------------------------------------------------------------------

CAP = "tests.part2_stabilizing.test_cap_activations"
REACHES = {
    "a global under another name": '''
from utils.steering import cap_activations as _course_cap


def cap_activations(h, unit_axis, tau):
    return _course_cap(h, unit_axis, tau)
''',
    "a helper of a helper": '''
def _inner(h, a, tau):
    from utils.steering import cap_activations as c
    return c(h, a, tau)


def _outer(h, a, tau):
    return _inner(h, a, tau)


def cap_activations(h, unit_axis, tau):
    return _outer(h, unit_axis, tau)
''',
    "a closure": '''
def _make():
    import utils.steering
    course = utils.steering.cap_activations

    def cap_activations(h, unit_axis, tau):
        return course(h, unit_axis, tau)
    return cap_activations


cap_activations = _make()
''',
    "a default argument": '''
from utils.steering import cap_activations as _c


def cap_activations(h, unit_axis, tau, _impl=_c):
    return _impl(h, unit_axis, tau)
''',
    "a partial held in a global": '''
import functools
from utils.steering import cap_activations as _c

_capped = functools.partial(_c)


def cap_activations(h, unit_axis, tau):
    return _capped(h, unit_axis, tau)
''',
    "a thread": '''
from concurrent.futures import ThreadPoolExecutor
from utils.steering import cap_activations as _c


def cap_activations(h, unit_axis, tau):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_c, h, unit_axis, tau).result()
''',
    "a method of the learner's class": '''
import utils.steering


class _Capper:
    def run(self, h, a, tau):
        return utils.steering.cap_activations(h, a, tau)


def cap_activations(h, unit_axis, tau):
    return _Capper().run(h, unit_axis, tau)
''',
}


@pytest.mark.parametrize("how", list(REACHES))
def test_every_way_of_reaching_the_implementation_is_seen_and_put_back(how):
    before = _course_bindings()
    namespace = _learner(REACHES[how], "reach")
    fn = namespace["cap_activations"]
    closure = [c.cell_contents for c in fn.__closure__ or ()]
    defaults = fn.__defaults__
    own = dict(namespace)
    failure = _run(CAP, fn)
    _assert_refused(failure, CAP, "utils.steering.cap_activations", "calls it while the check runs")
    assert failure.underlying is None
    assert _course_bindings() == before
    assert all(namespace[k] is v for k, v in own.items())
    assert [c.cell_contents for c in fn.__closure__ or ()] == closure and fn.__defaults__ is defaults


# ---------------------------------------------------------------------------------------------------
# What stays allowed
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def references():
    from tools.reference import load_reference

    return {checks1.__name__: load_reference(), checks2.__name__: load_reference("part2_stabilizing"),
            checks3.__name__: load_reference("part3_trait_vectors")}


def _reference_name(check: str) -> str:
    from tests.test_checks import CHECKS

    return CHECKS.get(_short(check), _short(check).removeprefix("test_"))


def test_the_reference_solution_passes_every_registered_check(references):
    """The reference uses the helpers the notebook names (supports_system_role, turn_suffix_len, turn_windows)
    and, through the checks, the course's references for earlier exercises; the checks call the course's
    implementations for their expected values. None of that counts."""
    before = _course_bindings()
    for check in REGISTRY:
        fn = references[_module_of(check).__name__][_reference_name(check)]
        assert _run(check, fn) is None, check
    assert _course_bindings() == before


def test_a_later_exercise_may_use_the_course_implementation_of_an_earlier_one():
    """Exercise 7's context manager may cap with the course's cap_activations (the first half of Exercise 7):
    only the course's context managers are this exercise's implementations."""
    namespace = _learner('''
import contextlib
import utils.steering as course


@contextlib.contextmanager
def activation_capping(model, axes, thresholds, layers):
    def make_hook(layer):
        unit = axes[layer].float() / axes[layer].float().norm()

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            new = course.cap_activations(h, unit, float(thresholds[layer]))
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles = [model.model.layers[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
''', "earlier")
    assert _run("tests.part2_stabilizing.test_activation_capping", namespace["activation_capping"]) is None


def test_an_extraction_answer_may_use_the_courses_chat_formatting():
    """Exercise 4's answers may format with utils.conversation (the notebook gives them turn_suffix_len; the
    response's token span is Exercise 3's work, not this one's)."""
    namespace = _learner('''
import torch
import utils.conversation as chat


def extract_response_activations(model, tokenizer, conversations, layer):
    rows = []
    for messages in conversations:
        ids, start, end = chat.response_token_span(messages, tokenizer)
        assert end == len(ids) - chat.turn_suffix_len(tokenizer)
        with torch.inference_mode():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1]
        rows.append(hidden[0, start:end].float().mean(dim=0))
    return torch.stack(rows)
''', "formatting")
    assert _run("tests.part1_persona_space.test_extract_response_activations",
                namespace["extract_response_activations"]) is None


def test_naming_the_implementation_without_calling_it_is_allowed():
    """The dynamic signal decides: an answer that imports the course's function (to compare, say) but computes
    the result itself passes."""
    namespace = _learner('''
import torch
from utils.steering import cap_activations as course_cap


def cap_activations(h, unit_axis, tau):
    a = unit_axis.to(device=h.device, dtype=torch.float32)
    proj = h.float() @ a
    lifted = (h.float() + (tau - proj).unsqueeze(-1) * a).to(h.dtype)
    return torch.where((proj < tau).unsqueeze(-1), lifted, h)


def compare(h, a, tau):
    return (cap_activations(h, a, tau) - course_cap(h, a, tau)).abs().max()
''', "named")
    assert _run(CAP, namespace["cap_activations"]) is None


def test_the_message_names_the_helpers_the_notebook_allows():
    namespace = _learner(CALLING[("test_turn_projections", "utils.activations.per_turn_projections")], "allowed")
    failure = _run("tests.part2_stabilizing.test_turn_projections", namespace["turn_projections"])
    assert "the notebook lets you use utils.conversation.turn_windows here" in str(failure)
