"""A catalogue of realistic mistakes and alternative correct answers, for every notebook check.

Each notebook check (``tests/part1_persona_space.py``, ``part2_stabilizing.py``, ``part3_trait_vectors.py``)
is exercised here by

- **mistakes**: small wrong implementations a learner could plausibly write, each with a piece of the
  message the check must show (the message names the mistake, so the learner knows what to fix);
- **variants**: correct implementations written differently from the reference solution (another
  parser, asyncio instead of threads, forward hooks instead of ``output_hidden_states``, numpy PCA,
  ...), which every check must accept.

``tests/test_catalogue.py`` turns the catalogue into pytest cases, and ``python -m tools.check_catalogue``
(``make check-catalogue``) prints the mutation-style summary per exercise.

This package is for maintainers: the learner-facing checks never import it.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Mistake:
    """A wrong answer, and a piece of the message the check must reject it with (case-insensitive)."""

    name: str
    fn: Any
    message: str
    note: str = ""  # how the mistake is simulated, where that is not obvious
    stage: str = ""  # the promise (a stage label of the check) that must reject it, where it is pinned


@dataclass(frozen=True)
class Variant:
    """A correct answer written differently from the reference; every check must accept it."""

    name: str
    fn: Any
    note: str = ""


@dataclass(frozen=True)
class Entry:
    """The catalogue of one check: the visible check, plus any hidden checks variants must also pass."""

    exercise: str  # the row of the summary table, e.g. "judge"
    check: str  # a function name in tests.part1_persona_space, part2_stabilizing or part3_trait_vectors
    mistakes: tuple[Mistake, ...]
    variants: tuple[Variant, ...]
    hidden: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Verdict:
    """What running one catalogue item through its check(s) gave."""

    entry: str
    kind: str  # "mistake" or "variant"
    name: str
    ok: bool  # mistake: rejected with the expected message (at its pinned stage); variant: accepted by every check
    outcome: str  # "accepted", "CheckFailure", or the type of an unexpected exception
    message: str
    seconds: float
    stage: str | None = None  # the promise whose stage rejected it (a mistake), or the last stage that ran

    def key(self) -> tuple:
        """Everything that must be identical between runs (not the timing)."""
        return (self.entry, self.kind, self.name, self.ok, self.outcome, self.message, self.stage)


PART2_CHECKS = ("test_parse_transcript", "test_turn_projections", "test_capping_threshold", "test_drift_summary",
                "test_add_steering", "test_steering_vectors", "test_cap_activations", "test_activation_capping",
                "test_next_token_kl")
PART3_CHECKS = ("test_contrastive_prompts", "test_split_questions", "test_logprob_score", "test_judge_0_100",
                "test_effective_pairs", "test_three_averages", "test_trait_vector", "test_spread_scaled_vectors",
                "test_layer_sweep", "test_steer_positions", "test_monitoring_correlations", "test_cosine_matrix",
                "test_cosine_with_axis", "test_projection_differences", "test_preventative_loss")


def call_check(check_name: str, fn: Callable) -> None:
    """Run one check the way the notebook does, with tiny-gemma2 standing in for the learner's model.

    Part 2's checks (:data:`PART2_CHECKS`, in ``tests.part2_stabilizing``) take only the learner's function."""
    if check_name in PART2_CHECKS:
        from tests import part2_stabilizing

        return getattr(part2_stabilizing, check_name)(fn)
    if check_name in PART3_CHECKS:  # Part 3's checks (tests.part3_trait_vectors) take only the learner's function
        from tests import part3_trait_vectors

        return getattr(part3_trait_vectors, check_name)(fn)
    from tests import part1_persona_space as checks

    check = getattr(checks, check_name)
    if check_name in ("test_normalize_messages", "test_format_messages_response_index"):
        return check(fn, checks.tiny_gemma2()[1])
    if check_name.startswith("test_extract"):
        model, tok = checks.tiny_gemma2()
        return check(fn, model, tok, model.config.hidden_size, model.config.num_hidden_layers)
    return check(fn)


def check_module(check_name: str):
    """The module that holds a check (Part 1's, Part 2's or Part 3's)."""
    if check_name in PART2_CHECKS:
        from tests import part2_stabilizing

        return part2_stabilizing
    if check_name in PART3_CHECKS:
        from tests import part3_trait_vectors

        return part3_trait_vectors
    from tests import part1_persona_space

    return part1_persona_space


def promises(check_name: str) -> tuple[str, ...]:
    """The promise labels of a check's stages, in the order they run."""
    return check_module(check_name).PROMISES.labels[check_name]


def _attempt(check_name: str, fn) -> tuple[str, str, str | None]:
    """(outcome, message, stage) of one check run; stdout (the checks' ticks, tqdm) is swallowed."""
    from tests.part1_persona_space import CheckFailure

    registry = check_module(check_name).PROMISES
    registry.begin(check_name)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            call_check(check_name, fn)
    except CheckFailure as exc:
        return "CheckFailure", str(exc), registry.last()[1]
    except Exception as exc:  # a check must never crash on a wrong answer: this counts against it
        return type(exc).__name__, f"{type(exc).__name__}: {exc}", registry.last()[1]
    return "accepted", "", registry.last()[1]


def judge_mistake(entry: Entry, mistake: Mistake) -> Verdict:
    start = time.perf_counter()
    outcome, message, stage = _attempt(entry.check, mistake.fn)
    ok = outcome == "CheckFailure" and mistake.message.lower() in message.lower()
    if mistake.stage and stage != mistake.stage:
        ok = False
        message = f"[rejected at the stage {stage!r}, not at its own, {mistake.stage!r}] {message}"
    return Verdict(entry.check, "mistake", mistake.name, ok, outcome, message, time.perf_counter() - start, stage)


def judge_variant(entry: Entry, variant: Variant) -> Verdict:
    start = time.perf_counter()
    outcome, message, stage = "accepted", "", None
    for check_name in (entry.check, *entry.hidden):
        outcome, message, stage = _attempt(check_name, variant.fn)
        if outcome != "accepted":
            message = f"[{check_name}, stage {stage!r}] {message}"
            break
    return Verdict(entry.check, "variant", variant.name, outcome == "accepted", outcome, message,
                   time.perf_counter() - start, stage)


def run_catalogue(entries=None) -> list[Verdict]:
    """Every mistake and every variant of every entry, in catalogue order."""
    if entries is None:
        from tests.catalogue.part1 import CATALOGUE as part1
        from tests.catalogue.part2 import CATALOGUE as part2
        from tests.catalogue.part3 import CATALOGUE as part3

        entries = part1 + part2 + part3
    verdicts = []
    for entry in entries:
        verdicts += [judge_mistake(entry, m) for m in entry.mistakes]
        verdicts += [judge_variant(entry, v) for v in entry.variants]
    return verdicts
