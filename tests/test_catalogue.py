"""The mutation catalogue (tests/catalogue/): every check accepts every alternative correct implementation,
rejects every catalogued mistake with the message that names it, and gives the same verdicts run after run."""

import ast
import contextlib
import re
import time
from pathlib import Path

import pytest

from tests import part1_persona_space as checks
from tests import part2_stabilizing as checks2
from tests import part3_trait_vectors as checks3
from tests.catalogue import call_check, judge_mistake, judge_variant
from tests.catalogue.part1 import CATALOGUE as CATALOGUE1
from tests.catalogue.part2 import CATALOGUE as CATALOGUE2
from tests.catalogue.part3 import CATALOGUE as CATALOGUE3

CATALOGUE = CATALOGUE1 + CATALOGUE2 + CATALOGUE3
PART_OF = {id(e): part for part, catalogue in (("part1", CATALOGUE1), ("part2", CATALOGUE2), ("part3", CATALOGUE3))
           for e in catalogue}  # so that `-k part3` selects one part's catalogue


def _id(*parts: str) -> str:
    return "::".join(re.sub(r"[^A-Za-z0-9_.+-]+", "-", p).strip("-") for p in parts)


# The verdicts the two tests below got, (entry, kind, name) -> Verdict.key(), for the run-after-run test.
_FIRST_PASS: dict[tuple, tuple] = {}

MISTAKES = [pytest.param(e, m, id=_id(e.check.removeprefix("test_"), m.name, PART_OF[id(e)])) for e in CATALOGUE
            for m in e.mistakes]  # check::item::part (tests/test_markers.py reads the check from the first part)
VARIANTS = [pytest.param(e, v, id=_id(e.check.removeprefix("test_"), v.name, PART_OF[id(e)])) for e in CATALOGUE
            for v in e.variants]


@pytest.mark.parametrize("entry,variant", VARIANTS)
def test_correct_variant_is_accepted(entry, variant, monkeypatch):
    from tests.catalogue import part1

    def no_reference():
        raise AssertionError("a correct variant must be its own code path, not call the reference solution")

    monkeypatch.setattr(part1, "ref", no_reference)  # Part 2's catalogue has no reference access at all
    verdict = judge_variant(entry, variant)
    _FIRST_PASS[(verdict.entry, verdict.kind, verdict.name)] = verdict.key()
    assert verdict.ok, f"{entry.check} rejected a correct implementation ({variant.name}): {verdict.message}"


@pytest.mark.parametrize("entry,mistake", MISTAKES)
def test_mistake_is_rejected_with_its_message(entry, mistake):
    verdict = judge_mistake(entry, mistake)
    _FIRST_PASS[(verdict.entry, verdict.kind, verdict.name)] = verdict.key()
    assert verdict.outcome == "CheckFailure", (
        f"{entry.check} should reject {mistake.name!r} with a CheckFailure; got {verdict.outcome}: {verdict.message}")
    assert mistake.message.lower() in verdict.message.lower(), (
        f"{entry.check} rejected {mistake.name!r}, but its message does not say {mistake.message!r}:\n"
        f"{verdict.message}")
    assert "(See Section" in verdict.message, f"the message does not point to the notebook: {verdict.message}"


@pytest.mark.parametrize("module,catalogue", [(checks, CATALOGUE1), (checks2, CATALOGUE2), (checks3, CATALOGUE3)],
                         ids=["part1", "part2", "part3"])
def test_catalogue_covers_every_check(module, catalogue):
    defined = {name for name in dir(module) if name.startswith("test_") and callable(getattr(module, name))}
    covered = {e.check for e in catalogue}
    assert covered == defined
    hidden = {name for name in dir(module) if name.startswith("hidden_test_")}
    assert {h for e in catalogue for h in e.hidden} == hidden


def test_catalogue_is_large_enough():
    """At least five mistakes and three correct variants for every exercise (most checks have more)."""
    for entry in CATALOGUE:
        assert len(entry.mistakes) >= 5, entry.check
        assert len(entry.variants) >= 3, entry.check
        names = [m.name for m in entry.mistakes] + [v.name for v in entry.variants]
        assert len(names) == len(set(names)), f"duplicate names in {entry.check}"


RERUN_EVERY = 5  # the run-after-run test judges again each entry's first mistake and variant, then every 5th


@pytest.mark.transformers  # it runs checks that load models, through judge_mistake and judge_variant
def test_verdicts_are_identical_run_after_run():
    """Seeded, offline, no wall-clock races: judged again, in the reverse order, a sample of the catalogue (every
    check's first mistake and first variant, then every :data:`RERUN_EVERY`-th) gives the same verdicts and the
    same messages as the two tests above (or, where they did not run, as a first judging in catalogue order)."""
    sample = [(e, "mistake", m) for e in CATALOGUE for m in e.mistakes[::RERUN_EVERY]]
    sample += [(e, "variant", v) for e in CATALOGUE for v in e.variants[::RERUN_EVERY]]
    assert {e.check for e, _, _ in sample} == {e.check for e in CATALOGUE}
    judged = [(e, kind, item) for e, kind, item in sample if (e.check, kind, item.name) in _FIRST_PASS]
    if judged:  # a selection (`-m transformers` under 4.57) judged some: those are enough, and half the cost
        sample = judged

    def judge(entry, kind, item):
        return (judge_mistake if kind == "mistake" else judge_variant)(entry, item).key()

    first = {(e.check, kind, item.name): _FIRST_PASS.get((e.check, kind, item.name)) or judge(e, kind, item)
             for e, kind, item in sample}
    again = {(e.check, kind, item.name): judge(e, kind, item) for e, kind, item in reversed(sample)}
    assert first == again


def test_every_check_with_the_reference_takes_under_10_s_of_cpu(reference):
    """Both parts' checks. Measured in CPU time of this process, so that other jobs on the machine do not make it
    flaky."""
    from tests.catalogue import PART2_CHECKS, PART3_CHECKS
    from tests.test_checks import CHECKS
    from tools.reference import load_reference

    reference2 = load_reference("part2_stabilizing")
    runs = [(name, reference[ref]) for name, ref in CHECKS.items()]
    runs += [(name, reference2[name.removeprefix("test_")]) for name in PART2_CHECKS]
    reference3 = load_reference("part3_trait_vectors")
    runs += [(name, reference3[name.removeprefix("test_")]) for name in PART3_CHECKS]
    assert {name for name, _ in runs} == {e.check for e in CATALOGUE}, "a check is missing from this test"
    checks.tiny_gemma2()  # loading the models once is not part of a check
    checks2.tiny_gemma2()
    checks3.tiny_gemma2()
    for check_name, fn in runs:
        start = time.process_time()
        call_check(check_name, fn)
        assert time.process_time() - start < 10.0, check_name


@pytest.mark.parametrize("module", [checks, checks2, checks3], ids=["part1", "part2", "part3"])
def test_no_check_skips_itself_or_returns_early(module):
    tree = ast.parse(Path(module.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith(("test_", "hidden_test_")):
            for sub in ast.walk(node):
                assert not isinstance(sub, ast.Return), f"{node.name} returns early (line {sub.lineno})"
                if isinstance(sub, ast.Attribute):
                    assert sub.attr not in ("skip", "skipif", "xfail"), f"{node.name} can skip itself"


def test_a_missing_fixture_is_a_clear_failure(monkeypatch, tmp_path):
    monkeypatch.setattr(checks, "FIXTURES", tmp_path)
    checks._tensor_fixtures.cache_clear()
    try:
        with pytest.raises(checks.CheckFailure, match="fixture file .* is missing"):
            checks.test_compute_trait_vector(lambda pos, neg: pos.float().mean(0) - neg.float().mean(0))
    finally:
        monkeypatch.undo()
        checks._tensor_fixtures.cache_clear()


def test_the_summary_fails_unless_everything_is_as_catalogued(capsys):
    """`make check-catalogue` exits non-zero when a mistake slips through or a correct variant is rejected."""
    from tests.catalogue import Entry, Mistake, Variant
    from tools.check_catalogue import main

    def right(pos, neg):
        return pos.float().mean(0) - neg.float().mean(0)

    def wrong(pos, neg):
        return neg.float().mean(0) - pos.float().mean(0)

    good = Entry("traits", "test_compute_trait_vector", (Mistake("swapped", wrong, "wrong way"),),
                 (Variant("right", right),))
    assert main([], entries=[good]) == 0
    slipped = Entry("traits", "test_compute_trait_vector", (Mistake("not a mistake", right, "wrong way"),),
                    (Variant("right", right),))
    assert main([], entries=[slipped]) == 1
    rejected = Entry("traits", "test_compute_trait_vector", (Mistake("swapped", wrong, "wrong way"),),
                     (Variant("not correct", wrong),))
    assert main([], entries=[rejected]) == 1
    wrong_message = Entry("traits", "test_compute_trait_vector", (Mistake("swapped", wrong, "ties"),),
                          (Variant("right", right),))
    assert main([], entries=[wrong_message]) == 1
    assert "0/1" in capsys.readouterr().out


# ---- Promises: every stage of every check rejects a catalogued mistake ------------------------------------------

# Stages no catalogued mistake can reach, and why.
STAGES_WITHOUT_MISTAKES = {
    ("test_extract_response_activations", "works on your own model"):
        "the catalogue runs the check with tiny-gemma2 as 'your model', which the earlier stages already cover",
    ("test_extract_response_activations_batched", "works on your own model"):
        "the catalogue runs the check with tiny-gemma2 as 'your model', which the earlier stages already cover",
    ("test_preventative_loss", checks3._PL_GRAD):
        "a steered loss with the right value and an autograd graph took both from the steered forward pass: the "
        "earlier stages reject a loss without a graph and one computed outside the steering, and no realistic answer "
        "has the steered value with another pass's gradients",
}


@pytest.mark.parametrize("catalogue", [CATALOGUE1, CATALOGUE2, CATALOGUE3], ids=["part1", "part2", "part3"])
def test_every_stage_of_every_check_rejects_a_catalogued_mistake(catalogue):
    from tests.catalogue import promises

    rejected = {(e.check, s) for e, s in _rejections(catalogue)}
    missing = [(e.check, label) for e in catalogue for label in promises(e.check)
               if (e.check, label) not in rejected and (e.check, label) not in STAGES_WITHOUT_MISTAKES]
    assert not missing, f"stages that reject none of the catalogued mistakes: {missing}"


def _rejections(catalogue=CATALOGUE):
    """(entry, stage) for every catalogued mistake that its check rejects with its message, from the verdicts the
    tests above got (or a fresh pass where they did not all run)."""
    out = []
    for entry in catalogue:
        for mistake in entry.mistakes:
            key = _FIRST_PASS.get((entry.check, "mistake", mistake.name))
            if key is None:
                verdict = judge_mistake(entry, mistake)
                ok, stage = verdict.ok, verdict.stage
            else:
                ok, stage = key[3], key[6]
            if ok:
                out.append((entry, stage))
    return out


@pytest.mark.parametrize("module", [checks, checks2, checks3], ids=["part1", "part2", "part3"])
def test_every_check_lists_its_promises_and_starts_each_stage(module):
    """Each check (hidden ones too) declares its promises: distinct, short labels. (That each one is a stage the check
    reaches is the test above: each rejects a catalogued mistake. A stage a check starts without declaring it fails
    at run time.)"""
    names = {name for name in dir(module) if name.startswith(("test_", "hidden_test_"))
             and callable(getattr(module, name))}
    assert set(module.PROMISES.labels) == names
    for name, labels in module.PROMISES.labels.items():
        assert labels and len(labels) == len(set(labels)), name
        assert all(isinstance(label, str) and 10 <= len(label) <= 110 for label in labels), name


def test_a_mistake_pinned_to_a_stage_must_be_rejected_there():
    from tests.catalogue import Entry, Mistake

    def wrong(pos, neg):
        return neg.float().mean(0) - pos.float().mean(0)

    pinned = Mistake("swapped", wrong, "wrong way", stage="mean(pos) - mean(neg), means over the rows, float32 [d_model]")
    assert judge_mistake(Entry("traits", "test_compute_trait_vector", (pinned,), ()), pinned).ok
    elsewhere = Mistake("swapped", wrong, "wrong way", stage="any float dtype in, float32 out, computed in float32")
    verdict = judge_mistake(Entry("traits", "test_compute_trait_vector", (elsewhere,), ()), elsewhere)
    assert not verdict.ok and "not at its own" in verdict.message


# ---- The dtype stages fail bf16 arithmetic whatever the data ----------------------------------------------------

def _bf16_items():
    """(module, check, stage label, item, kind) for every mistake pinned to a bf16 stage and every correct variant."""
    items = []
    for part, module, catalogue in (("part1", checks, CATALOGUE1), ("part2", checks2, CATALOGUE2),
                                    ("part3", checks3, CATALOGUE3)):
        for entry in catalogue:
            if entry.check not in module.BF16_STAGES:
                continue
            _, label = module.BF16_STAGES[entry.check]
            pinned = [m for m in entry.mistakes if m.stage == label]
            assert pinned, f"{entry.check}: no catalogued mistake is pinned to its bf16 stage {label!r}"
            items += [pytest.param(module, entry.check, m, "mistake", id=_id(entry.check, "mistake", m.name, part))
                      for m in pinned]
            items += [pytest.param(module, entry.check, v, "variant", id=_id(entry.check, "variant", v.name, part))
                      for v in entry.variants]
    return items


SEEDS = range(20)
VARIANT_SEEDS = (0, 7, 19)  # the correct variants on three of them (the reference passes all twenty, below)


@pytest.mark.parametrize("module,check_name,item,kind", _bf16_items())
def test_the_bf16_stage_fails_bf16_arithmetic_and_passes_float32_on_every_seed(module, check_name, item, kind,
                                                                               capsys):
    """Each bf16 (dtype) stage on 20 seeds of its data: every mistake pinned to it fails it on every seed, with its
    message (and at that stage), and every correct variant passes it (on three of the seeds)."""
    from tests.checking import using_reference

    stage, label = module.BF16_STAGES[check_name]
    uses = getattr(module, "BF16_USES", {}).get(check_name, {})
    for seed in SEEDS if kind == "mistake" else VARIANT_SEEDS:
        with contextlib.ExitStack() as stack:
            stack.enter_context(module.PROMISES.running(check_name))
            for name, (earlier, reference) in uses.items():
                stack.enter_context(using_reference(item.fn, name, reference(), earlier))
            try:
                stage(item.fn, seed)
            except checks.CheckFailure as exc:
                assert kind == "mistake", f"{item.name} failed the bf16 stage on seed {seed}: {exc}"
                assert module.PROMISES.last() == (check_name, label), (seed, module.PROMISES.last())
                assert item.message.lower() in str(exc).lower(), (seed, str(exc))
            else:
                assert kind == "variant", f"{item.name} passed the bf16 stage of {check_name} on seed {seed}"
    capsys.readouterr()


def _reference_for(check_name, reference):
    from tests.catalogue import PART2_CHECKS, PART3_CHECKS
    from tests.test_checks import CHECKS
    from tools.reference import load_reference

    if check_name in PART2_CHECKS:
        return load_reference("part2_stabilizing")[check_name.removeprefix("test_")]
    if check_name in PART3_CHECKS:
        return load_reference("part3_trait_vectors")[check_name.removeprefix("test_")]
    return reference[CHECKS[check_name]]


@pytest.mark.parametrize("module,check_name", [(m, c) for m in (checks, checks2, checks3) for c in m.BF16_STAGES],
                         ids=lambda x: x if isinstance(x, str) else x.__name__.rsplit(".", 1)[-1])
def test_the_reference_passes_the_bf16_stage_on_every_seed(module, check_name, reference, capsys):
    from tests.checking import using_reference

    stage, _ = module.BF16_STAGES[check_name]
    fn = _reference_for(check_name, reference)
    for seed in SEEDS:
        with contextlib.ExitStack() as stack:
            stack.enter_context(module.PROMISES.running(check_name))
            for name, (earlier, ref) in getattr(module, "BF16_USES", {}).get(check_name, {}).items():
                stack.enter_context(using_reference(fn, name, ref(), earlier))
            stage(fn, seed)
    capsys.readouterr()


# ---- The shared check models keep their output-recording hooks ---------------------------------------------------

@pytest.mark.parametrize("module", [checks2, checks3], ids=["part2", "part3"])
def test_output_hidden_states_still_works_after_a_check_that_counts_hooks(module, capsys):
    """transformers 5.x installs its output-recording hooks on a model's first ``output_hidden_states=True`` pass. The
    checks' tiny model is warmed with one such pass when it loads, so a check that counts the hooks before the
    learner's code runs (and removes any added since) never removes those: hidden_states keeps every layer after the
    check, in the same process."""
    import torch

    fresh, _ = module.tiny_gemma2.__wrapped__()  # a new load, whatever ran before in this process
    before = module._hook_counts(fresh)
    with torch.inference_mode():
        fresh(input_ids=torch.tensor([[2, 5, 6]]), output_hidden_states=True)
    assert not module._left_behind(fresh, before), "the first output_hidden_states pass added hooks a check would remove"

    model, _ = module.tiny_gemma2()
    name = "test_add_steering" if module is checks2 else "test_three_averages"
    call_check(name, _reference_for(name, None))
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([[2, 5, 6]]), output_hidden_states=True).hidden_states
    assert hidden is not None and len(hidden) == model.config.num_hidden_layers + 1
    capsys.readouterr()
