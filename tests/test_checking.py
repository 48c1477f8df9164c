"""The shared check machinery (tests/checking.py): rendering, time limits, one grade per exercise."""

from __future__ import annotations

import linecache
import re
import time

import pytest

from tests import checking
from tests.checking import CheckFailure


def _learner_namespace(source: str) -> dict:
    """Run ``source`` as a notebook cell would (IPython also registers cell sources with linecache)."""
    filename = "/tmp/ipykernel_0/learner_cell.py"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def test_failure_renders_as_its_message_without_check_frames():
    with pytest.raises(CheckFailure) as info:
        checking.fail("Your mask includes padding.", "Section 4")
    lines = info.value._render_traceback_()
    text = "\n".join(lines)
    assert "Your mask includes padding." in text and "(See Section 4 in the notebook.)" in text
    assert "tests/checking.py" not in text and "Traceback" not in text and "_fail(" not in text


def test_learner_frames_stay_visible_when_their_code_raised():
    ns = _learner_namespace("def f(x):\n    return x['missing']\n")
    with pytest.raises(CheckFailure) as info:
        checking.call("f on a dict", "Section 1", "", ns["f"], {})
    text = "\n".join(info.value._render_traceback_())
    assert "f on a dict raised KeyError" in text
    assert "learner_cell.py" in text and "return x['missing']" in text  # the learner's frame
    assert "checking.py" not in text  # not the check's


def test_a_hang_fails_within_the_limit_and_later_calls_fail_at_once(monkeypatch):
    monkeypatch.setenv("COURSE_CHECK_TIMEOUT", "0.5")
    ns = _learner_namespace("def spin(n):\n    while True:\n        n += 1\n")
    start = time.monotonic()
    with pytest.raises(CheckFailure, match="did not return within 0.5 s"):
        checking.call("spin(1)", "Section 2", "", ns["spin"], 1)
    assert time.monotonic() - start < 5
    assert getattr(ns["spin"], "__course_hung__", False), "the notebook's name now points at the stand-in"
    start = time.monotonic()
    with pytest.raises(CheckFailure, match="re-run the cell that defines spin"):
        ns["spin"](1)  # a later cell calling it
    assert time.monotonic() - start < 0.5


def test_a_learner_except_exception_cannot_swallow_the_time_limit(monkeypatch):
    monkeypatch.setenv("COURSE_CHECK_TIMEOUT", "0.3")
    ns = _learner_namespace("def stubborn():\n    while True:\n        try:\n            time.sleep(0.01)\n"
                            "        except Exception:\n            pass\nimport time\n")
    with pytest.raises(CheckFailure, match="did not return"):
        checking.limited(ns["stubborn"], "Section 2")()


def test_bad_timeout_setting_is_named(monkeypatch):
    monkeypatch.setenv("COURSE_CHECK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="COURSE_CHECK_TIMEOUT"):
        checking.timeout_seconds()


def test_using_reference_swaps_in_and_restores_and_says_so(capsys):
    ns = _learner_namespace("def helper(x):\n    return -1\n\ndef outer(x):\n    return helper(x) + 1\n")
    learner_helper = ns["helper"]
    checking.RESULTS["Exercise 9 (helper)"] = False
    with checking.using_reference(ns["outer"], "helper", lambda x: x * 10, "Exercise 9 (helper)"):
        assert ns["outer"](2) == 21
    assert ns["helper"] is learner_helper
    assert "Exercise 9 (helper) is still wrong; this check used the course's reference" in capsys.readouterr().out
    # Restored on an exception too.
    with pytest.raises(RuntimeError):
        with checking.using_reference(ns["outer"], "helper", lambda x: x, "Exercise 9 (helper)"):
            raise RuntimeError
    assert ns["helper"] is learner_helper


def test_check_records_results_and_grades_on_its_own_merit():
    @checking.check("Exercise 99", uses={"helper": ("Exercise 98", lambda: (lambda x: x * 10))})
    def check_outer(fn):
        if fn(2) != 21:
            checking.fail("outer is wrong")
        checking.passed("check_outer")

    ns = _learner_namespace("def helper(x):\n    return -1\n\ndef outer(x):\n    return helper(x) + 1\n")
    check_outer(ns["outer"])  # the learner's helper is wrong, but outer is right
    assert checking.RESULTS["Exercise 99"] is True
    ns2 = _learner_namespace("def helper(x):\n    return x * 10\n\ndef outer(x):\n    return helper(x)\n")
    with pytest.raises(CheckFailure):
        check_outer(ns2["outer"])
    assert checking.RESULTS["Exercise 99"] is False


def test_an_unwritten_exercise_reads_as_one_sentence_and_keeps_its_type():
    """NotImplementedError stays NotImplementedError (the notebook tests count on it) but renders as a
    sentence plus the stub's own line, not as a traceback through the checks."""
    ns = _learner_namespace("def stub(x):\n    raise NotImplementedError()\n")
    with pytest.raises(NotImplementedError) as info:
        checking.call("stub(1)", "Section 1", "", ns["stub"], 1)
    text = "\n".join(info.value._render_traceback_())
    assert "stub is not written yet" in text and "raise NotImplementedError()" in text
    assert "checking.py" not in text and "Traceback" not in text


def test_a_learner_exception_through_limited_keeps_its_type_and_reads_cleanly():
    ns = _learner_namespace("def f():\n    return {}['k']\n")
    with pytest.raises(KeyError) as info:
        checking.limited(ns["f"], "Section 1")()
    text = "\n".join(info.value._render_traceback_())
    assert "f raised KeyError" in text and "return {}['k']" in text and "checking.py" not in text


def test_a_check_that_stumbles_on_an_answer_fails_with_a_message_not_a_crash():
    @checking.check("Exercise 97")
    def check_shape(fn):
        _ = fn().shape  # the learner returned something without a shape: the check's own code raises

    ns = _learner_namespace("def f():\n    return [1, 2]\n")
    with pytest.raises(CheckFailure) as info:
        check_shape(ns["f"])
    assert "Exercise 97: the check could not finish on your answer: AttributeError" in str(info.value)
    assert checking.RESULTS["Exercise 97"] is False
    assert "test_checking.py" not in "\n".join(info.value._render_traceback_())


def test_debug_mode_shows_the_full_traceback(monkeypatch):
    monkeypatch.setenv("COURSE_CHECK_DEBUG", "1")
    with pytest.raises(CheckFailure) as info:
        checking.fail("Your mask includes padding.")
    text = "\n".join(info.value._render_traceback_())
    assert "Traceback (most recent call last)" in text and "checking.py" in text


def test_a_failure_names_its_check_and_stage_as_a_stable_mistake_identifier():
    promises = checking.Promises()

    @checking.check("Exercise 9")
    @promises("returns a tensor", "the mean over the response tokens only (not the prompt)")
    def test_example(fn):
        promises.stage("returns a tensor")
        fn()
        promises.stage("the mean over the response tokens only (not the prompt)")
        checking.fail("Your mean includes the prompt.", "Section 4")

    @promises("every batch size")
    def hidden_test_example(fn):
        promises.stage("every batch size")
        checking.fail("A batch size changed the means.")

    before = list(checking._RUNNING)
    assert before == [None, None], "a check (or a stage run on its own) left itself running"
    with pytest.raises(CheckFailure) as info:
        test_example(lambda: None)
    want = "test_example/the-mean-over-the-response-tokens-only-not-the-prompt"
    assert info.value.mistake == want
    lines = info.value._render_traceback_()
    assert lines[-1] == f"[mistake: {want}]" and checking.MISTAKE_LINE.fullmatch(lines[-1]).group(1) == want
    assert checking._RUNNING == before, "the running check must be put back when it ends"
    with pytest.raises(CheckFailure) as info:
        hidden_test_example(lambda: None)
    hidden = info.value.mistake
    assert re.fullmatch(r"hidden-[0-9a-f]{10}", hidden) and "example" not in hidden and "batch" not in hidden
    assert hidden == checking.mistake_id("hidden_test_example", "every batch size")
    # A failure that is not a stage's own: a function that never returns.
    ns = _learner_namespace("def slow():\n    while True:\n        pass\n")

    @checking.check("Exercise 10")
    def test_slow(fn):
        checking.call("slow()", None, "", fn)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checking, "timeout_seconds", lambda: 0.2)
        with pytest.raises(CheckFailure) as info:
            test_slow(ns["slow"])
    assert info.value.mistake == "test_slow/time-limit"
    assert checking.mistake_id(None, None) is None
    with pytest.raises(CheckFailure) as info:
        checking.fail("outside")
    assert info.value.mistake is None and "[mistake:" not in "\n".join(info.value._render_traceback_())
    with pytest.raises(ValueError, match="punctuation"):
        promises("a, b", "A b")
    long = "x" * 70
    assert checking.slug(long + "1") != checking.slug(long + "2") and len(checking.slug(long + "1")) == 67


def test_a_stage_run_on_its_own_leaves_no_check_running():
    """The catalogue runs single stages outside their checks; the next failure anywhere must not carry their name."""
    promises = checking.Promises()

    @promises("first", "second")
    def test_alone(fn):
        promises.stage("first")

    promises.begin("test_alone")
    promises.stage("second")
    assert checking._RUNNING == [None, None] and promises.last() == ("test_alone", "second")
    with promises.running("test_alone"):
        promises.stage("first")
        with pytest.raises(CheckFailure) as info:
            checking.fail("inside")
    assert info.value.mistake == "test_alone/first"
    assert checking._RUNNING == [None, None]
    with pytest.raises(CheckFailure) as info:
        checking.fail("outside")
    assert info.value.mistake is None


def test_a_learner_exception_a_check_lets_through_carries_its_stage_and_type():
    """The class report groups failures by identifier: one a check does not turn into a CheckFailure (it inspects
    which exception the learner raised) still names its check, its stage and the exception's type."""
    promises = checking.Promises()

    def answer(x):
        raise KeyError(x)

    @checking.check("Exercise 11")
    @promises("rejects bad input with a ValueError")
    def test_lets_through(fn):
        promises.stage("rejects bad input with a ValueError")
        try:
            checking.limited(fn)("bad")
        except ValueError:
            pass

    with pytest.raises(KeyError) as info:
        test_lets_through(answer)
    want = "test_lets_through/rejects-bad-input-with-a-valueerror/raised-keyerror"
    assert info.value.mistake == want
    lines = info.value._render_traceback_()
    assert "answer raised KeyError" in lines[0] and lines[-1] == f"[mistake: {want}]"
    assert checking.MISTAKE_LINE.fullmatch(lines[-1]).group(1) == want
