"""Which of the course's own functions implement each exercise: the registry the checks' delegation guard reads.

The course's ``utils`` package holds working implementations of several exercises (the notebooks use them
after the exercise, and the checks use some of them to compute expected values). An answer that hands its
work to one of them would pass its check without the learner writing anything. So every check named in
:data:`REGISTRY` fails, with a message that names the course's function, when the learner's function

- *is* one of the listed implementations (the object itself, under any name, or a ``functools.partial`` /
  ``functools.wraps`` / ``__wrapped__`` chain of it, or a copy of its code), or
- *calls* one of them while the check runs, directly or through helpers the learner wrote.

The check's own calls (expected values, the course's reference swapped in for an earlier exercise) never
count. Other ``utils`` helpers stay allowed; :attr:`Entry.allowed` lists the ones the notebook tells
learners to use for that exercise, so the failure message can say so. The guard itself is in
``tests/checking.py`` (:func:`tests.checking.check`).

Names are dotted strings, resolved when a check runs (:func:`resolve`): a function that moves within
``utils`` makes :func:`resolve` raise, and ``tests/test_delegation.py`` fails until the registry follows.
:data:`NO_COURSE_IMPLEMENTATION` lists every other check, with why nothing is registered for it, so that a
new check has to be placed in one or the other.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

P1 = "tests.part1_persona_space"
P2 = "tests.part2_stabilizing"
P3 = "tests.part3_trait_vectors"


@dataclass(frozen=True)
class Entry:
    """One check's delegation rule."""

    section: str  # where the notebook explains the exercise (as the check's own messages say)
    implementations: tuple[str, ...]  # the course's implementations of the exercise: an answer may not use them
    allowed: tuple[str, ...] = ()  # utils helpers the notebook tells learners to use here (named in the message)


REGISTRY: dict[str, Entry] = {
    # ---------------------------------------------------------------------------------------- Part 1
    f"{P1}.test_judge_role_response": Entry(
        "Section 1, Exercise 1",
        ("utils.judges.parse_score",  # the judges' one score rule
         "utils.judges.judge_score")),  # ask a judge and parse its score
    f"{P1}.test_generate_response_api": Entry(
        "Section 2, Exercise 2a",
        ("utils.conversation.merge_system_prompt",)),  # Gemma's system prompt merged into the user turn
    f"{P1}.test_generate_all_responses": Entry(
        "Section 2, Exercise 2b",
        ("utils.runtime.run_parallel",)),  # a thread pool whose failures are recorded as text
    f"{P1}.test_normalize_messages": Entry(
        "Section 2 (Gemma's missing system role) and Section 3, Exercise 3",
        ("utils.conversation.normalize_messages", "utils.conversation.merge_system_prompt"),
        allowed=("utils.conversation.supports_system_role",)),
    f"{P1}.test_format_messages_response_index": Entry(
        "Section 3, Exercise 3",
        ("utils.conversation.format_messages", "utils.conversation.response_token_span")),
    f"{P1}.test_extract_response_activations": Entry(
        "Section 4, Exercise 4a",
        ("utils.activations.extract_mean_activations", "utils.activations.per_turn_mean_activations"),
        allowed=("utils.conversation.turn_suffix_len",)),
    f"{P1}.test_extract_response_activations_batched": Entry(
        "Section 4, Exercise 4b",
        ("utils.activations.extract_mean_activations", "utils.activations.per_turn_mean_activations"),
        allowed=("utils.conversation.turn_suffix_len",)),
    # ---------------------------------------------------------------------------------------- Part 2
    f"{P2}.test_parse_transcript": Entry(
        "Section 1, Exercise 1",
        ("utils.transcripts.load_transcript",)),
    f"{P2}.test_turn_projections": Entry(
        "Section 2, Exercise 2",
        ("utils.activations.per_turn_projections", "utils.activations.per_turn_mean_activations"),
        allowed=("utils.conversation.turn_windows",)),
    f"{P2}.test_capping_threshold": Entry(
        "Section 3, Exercise 3",
        ("utils.steering.capping_thresholds",)),
    f"{P2}.test_drift_summary": Entry(
        "Section 4, Exercise 4",
        ("utils.experiments.slope", "utils.experiments.first_below")),
    f"{P2}.test_add_steering": Entry(
        "Section 5, Exercise 5",
        ("utils.steering.steering", "utils.steering.intervene")),
    f"{P2}.test_cap_activations": Entry(
        "Section 6, Exercise 7",
        ("utils.steering.cap_activations", "utils.steering._cap")),
    f"{P2}.test_activation_capping": Entry(
        "Section 6, Exercise 7",
        ("utils.steering.capping", "utils.steering.intervene")),
    f"{P2}.test_next_token_kl": Entry(
        "Section 7, Exercise 8",
        ("utils.experiments.next_token_kl",)),  # the course's KL over a model's conversations
    # ---------------------------------------------------------------------------------------- Part 3
    f"{P3}.test_contrastive_prompts": Entry(
        "Section 1, Exercise 1",
        ("utils.traits.contrastive_system_prompts",  # every pair of a trait
         "utils.traits.system_prompt")),  # one prompt in the paper's wording
    f"{P3}.test_split_questions": Entry(
        "Section 1, Exercise 1",
        ("utils.traits.split_questions",)),
    f"{P3}.test_logprob_score": Entry(
        "Section 2, Exercise 2",
        ("utils.judges.logprob_score",)),
    f"{P3}.test_judge_0_100": Entry(
        "Section 2, Exercise 2",
        ("utils.judges.judge_logprob_score",  # the request and the score
         "utils.judges.top_logprobs_of")),  # reading the first token's alternatives off the reply
    f"{P3}.test_effective_pairs": Entry(
        "Section 3, Exercise 3",
        ("utils.traits.effective_pairs",)),
    f"{P3}.test_three_averages": Entry(
        "Section 4, Exercise 4",
        ("utils.activations.extract_prompt_response_means",),
        allowed=("utils.conversation.response_token_span",)),
    f"{P3}.test_trait_vector": Entry(
        "Section 4, Exercise 4",
        ("utils.traits.trait_vectors",)),
    f"{P3}.test_spread_scaled_vectors": Entry(
        "Section 5, Exercise 5",
        ("utils.traits.spread_scaled_vectors", "utils.traits.projection_spread")),
    f"{P3}.test_layer_sweep": Entry(
        "Section 5, Exercise 5",
        ("utils.traits.layer_sweep",
         "utils.traits.steered_answers",  # greedy answers under steering
         "utils.traits.mean_score"),  # the mean of the scores that are not None
        allowed=("utils.steering.steering", "utils.generation.generate", "utils.conversation.chat_messages")),
    f"{P3}.test_steer_positions": Entry(
        "Section 6, Exercise 6",
        ("utils.steering.steer_positions",
         "utils.steering.pass_positions")),  # the modes' rules, which positions of a pass change
    f"{P3}.test_monitoring_correlations": Entry(
        "Section 7, Exercise 7",
        ("utils.traits.monitoring_correlations", "utils.traits.pearson")),
    f"{P3}.test_cosine_matrix": Entry(
        "Section 8, Exercise 8",
        ("utils.traits.cosine_matrix",)),
    f"{P3}.test_cosine_with_axis": Entry(
        "Section 8, Exercise 8",
        ("utils.traits.cosine_with_axis",)),
    f"{P3}.test_projection_differences": Entry(
        "Section 9, Exercise 9",
        ("utils.traits.projection_differences",)),
    f"{P3}.test_preventative_loss": Entry(
        "Section 10, Exercise 10",
        ("utils.finetune.steered_response_loss", "utils.finetune.response_loss"),
        allowed=("utils.steering.steering",)),
}

IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {check: entry.implementations for check, entry in REGISTRY.items()}
"""Check name -> the dotted names of the course's implementations of its exercise."""

NO_COURSE_IMPLEMENTATION: dict[str, str] = {
    f"{P1}.test_judge_prompt_template": "a prompt string, not a function; utils holds no role-judge template",
    f"{P1}.test_extract_persona_vectors": "no utils function filters by judge score and averages per persona; "
                                          "calling the course's extraction (Exercise 4's) is allowed here",
    f"{P1}.test_compute_cosine_similarity_matrix": "utils has no cosine-similarity matrix",
    f"{P1}.test_compute_cosine_similarity_matrix_centered": "utils has no cosine-similarity matrix",
    f"{P1}.test_pca_decompose_persona_vectors": "utils has no PCA (the notebook tells learners to use sklearn's)",
    f"{P1}.test_compute_assistant_axis": "utils computes the axis only inside the pipeline's stages, not as a "
                                         "function of (defaults, roles)",
    f"{P1}.test_characterize_axis": "utils has no per-vector cosine with the axis",
    f"{P1}.test_compute_trait_vector": "utils has no mean(pos) - mean(neg) function",
    f"{P1}.test_axis_auc": "utils has no AUC",
    f"{P2}.test_steering_vectors": "utils has no multiple-of-the-spread steering vectors",
}
"""Every other check, and why no course implementation is registered for it."""


class RegistryError(LookupError):
    """A dotted name in tests/implementations.py that does not name an object (it moved, or was renamed)."""


def resolve(dotted: str) -> Any:
    """The object ``dotted`` names: the longest importable module prefix, then attributes.

    The real function, never the guard's stand-in for it (``__course_tripwire_of__``)."""
    parts = dotted.split(".")
    module = None
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is not None and not ".".join(parts[:cut]).startswith(exc.name):
                raise  # the module exists but imports something missing: not a registry problem
            continue
        break
    if module is None:
        raise RegistryError(f"tests/implementations.py names {dotted!r}, but no module of it can be imported: "
                            "update the registry to where the function lives now.")
    obj: Any = module
    for attr in parts[cut:]:
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise RegistryError(f"tests/implementations.py names {dotted!r}, but {'.'.join(parts[:cut])} has no "
                                f"{attr!r}: update the registry to where the function lives now.") from None
    return getattr(obj, "__course_tripwire_of__", obj)


def implementations_of(check: str) -> list[tuple[str, Any]]:
    """``(dotted name, object)`` of each course implementation registered for ``check`` ([] if none)."""
    entry = REGISTRY.get(check)
    return [] if entry is None else [(name, resolve(name)) for name in entry.implementations]
