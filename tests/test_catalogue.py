"""The mutation catalogue (tests/catalogue/): every check accepts every alternative correct implementation,
rejects every catalogued mistake with the message that names it, and gives the same verdicts run after run."""

import ast
import re
import time
from pathlib import Path

import pytest

from tests import part1_persona_space as checks
from tests import part2_stabilizing as checks2
from tests import part3_trait_vectors as checks3
from tests.catalogue import call_check, judge_mistake, judge_variant, run_catalogue
from tests.catalogue.part1 import CATALOGUE as CATALOGUE1
from tests.catalogue.part2 import CATALOGUE as CATALOGUE2
from tests.catalogue.part3 import CATALOGUE as CATALOGUE3

CATALOGUE = CATALOGUE1 + CATALOGUE2 + CATALOGUE3


def _id(*parts: str) -> str:
    return "::".join(re.sub(r"[^A-Za-z0-9_.+-]+", "-", p).strip("-") for p in parts)


# The verdicts the two tests below got, (entry, kind, name) -> Verdict.key(), for the run-after-run test.
_FIRST_PASS: dict[tuple, tuple] = {}

MISTAKES = [pytest.param(e, m, id=_id(e.check.removeprefix("test_"), m.name)) for e in CATALOGUE for m in e.mistakes]
VARIANTS = [pytest.param(e, v, id=_id(e.check.removeprefix("test_"), v.name)) for e in CATALOGUE for v in e.variants]


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


def test_verdicts_are_identical_run_after_run():
    """Seeded, offline, no wall-clock races: another full pass over the catalogue gives the same verdicts and the
    same messages as the two tests above (or, where they did not all run, as one more full pass)."""
    def full_pass() -> dict[tuple, tuple]:
        return {(v.entry, v.kind, v.name): v.key() for v in run_catalogue(CATALOGUE)}

    again = full_pass()
    first = _FIRST_PASS if set(_FIRST_PASS) == set(again) else full_pass()
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
