"""The machinery every notebook check shares: what a learner sees when a check fails, time limits, and
grading each exercise on its own.

- :class:`CheckFailure` renders as its message (IPython's ``_render_traceback_`` protocol), in JupyterLab
  and in nbgrader's feedback: no frames, paths or fixture names from the checks themselves. When the
  learner's own code raised, the frames from the learner's code are shown under the message.
- :func:`call` runs a learner's function seeded and under a time limit (``COURSE_CHECK_TIMEOUT`` seconds,
  default 60). A function that does not return in time fails its check with that message, and the name
  it is bound to in the notebook is replaced by a stand-in that fails at once, so later cells that use it
  do not hang again. Re-running the function's own cell brings it back.
- :func:`check` records whether each exercise's check passed; :func:`using_reference` runs a check with
  the course's reference for an *earlier* exercise swapped in (so one mistake costs one exercise), and
  says so when the learner's own earlier function has not passed its check.

Nothing here holds a reference solution: the references :func:`using_reference` swaps in are the course's
``utils`` machinery, which learners can read.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sysconfig
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from utils import settings

CHECKS_DIR = Path(__file__).resolve().parent
_STDLIB = str(Path(sysconfig.get_paths()["stdlib"]).resolve())


def timeout_seconds() -> float:
    """The time limit for one call of a learner's function inside a check (``COURSE_CHECK_TIMEOUT``)."""
    return settings.get("COURSE_CHECK_TIMEOUT")


# --------------------------------------------------------------------------------------------------
# What a failure looks like
# --------------------------------------------------------------------------------------------------

def _is_learner_frame(filename: str) -> bool:
    """Frames of the learner's code: not the checks, not installed libraries (torch, transformers, ...)."""
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return True
    if path.startswith(str(CHECKS_DIR)):
        return False
    return "site-packages" not in path and "dist-packages" not in path and not path.startswith(_STDLIB)


def _learner_lines(exc: BaseException) -> list[str]:
    """The frames of ``exc``'s traceback that are the learner's code, and its last line, formatted."""
    if exc.__traceback__ is None:
        return []
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_learner_frame(f.filename)]
    if not frames:
        return []
    lines = []
    for frame in frames:
        lines.append(f"  {_where(frame.filename)}, line {frame.lineno}, in {frame.name}")
        if frame.line:
            lines.append(f"    {frame.line.strip()}")
    return lines + [line.rstrip("\n") for line in traceback.format_exception_only(type(exc), exc)]


def _where(filename: str) -> str:
    """``Cell In[12]`` for a notebook cell (as IPython names it in its own tracebacks), else the file."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        count = shell.compile._filename_map.get(filename) if shell is not None else None
    except Exception:  # no IPython, or one without the map: the file name is still right
        count = None
    return f"Cell In[{count}]" if count is not None else f'File "{filename}"'


def _debugging() -> bool:
    """``COURSE_CHECK_DEBUG=1`` shows failures with their full traceback, checks' frames included (for
    whoever maintains the checks)."""
    return settings.get("COURSE_CHECK_DEBUG")


def _full_traceback(exc: BaseException) -> list[str]:
    return [line.rstrip("\n") for line in traceback.format_exception(type(exc), exc, exc.__traceback__)]


class CheckFailure(AssertionError):
    """A check found a mistake; the message says which, and how to fix it.

    In Jupyter it renders as the message alone (plus the learner's own frames when their code raised),
    not as a traceback through the checks.
    """

    def _render_traceback_(self) -> list[str]:
        if _debugging():
            return _full_traceback(self)
        red, bold, reset = "\x1b[31m", "\x1b[1m", "\x1b[0m"
        lines = [f"{red}{bold}✗ Check failed{reset}"]
        lines += [f"{red}{line}{reset}" if i == 0 else line for i, line in enumerate(str(self).split("\n"))]
        cause = self.__cause__
        if cause is not None and not isinstance(cause, CheckFailure):
            learner = _learner_lines(cause)
            if learner:
                lines += ["", "Where your code raised it:", *learner]
        return lines


def _render_learner_exception(exc: BaseException, header: str) -> None:
    """Make a learner's own exception, raised through a check, render as ``header`` plus the learner's
    frames only (IPython's ``_render_traceback_``, set on this exception object; its type is unchanged)."""

    def render() -> list[str]:
        if _debugging():
            return _full_traceback(exc)
        learner = _learner_lines(exc) or [line.rstrip("\n") for line in traceback.format_exception_only(type(exc), exc)]
        return [f"\x1b[31m\x1b[1m{header}\x1b[0m", "", *learner]

    try:
        exc._render_traceback_ = render
    except (AttributeError, TypeError):  # an exception type without a __dict__: shown as usual
        pass


def _not_written_yet(exc: NotImplementedError, name: str) -> None:
    _render_learner_exception(exc, f"✗ {name} is not written yet: replace `raise NotImplementedError()` in its "
                                   "cell with your code, run that cell, then this one.")


def fail(message: str, section: str | None = None, cause: BaseException | None = None) -> None:
    """Raise a :class:`CheckFailure` with ``message`` (and where in the notebook the idea is explained)."""
    where = f"\n(See {section} in the notebook.)" if section else ""
    raise CheckFailure(message + where) from cause


def clip(text: str, n: int = 240) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def short(x: Any, n: int = 6) -> str:
    """A short description of a value for messages: shape, dtype and first entries of a tensor."""
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta":
            return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device=meta)"
        flat = x.detach().cpu().flatten()[:n].float().tolist()
        where = "" if x.device.type == "cpu" else f", device={x.device}"
        return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype}{where}, first={[round(v, 4) for v in flat]})"
    text = repr(x)
    return text if len(text) < 160 else text[:157] + "..."


# --------------------------------------------------------------------------------------------------
# Calling the learner's code: seeded, and under a time limit
# --------------------------------------------------------------------------------------------------

class _TimeLimit(BaseException):
    """Raised inside the learner's function when its time is up (a BaseException, so that a learner's
    ``except Exception`` cannot swallow it)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """SIGALRM-based limit in the main thread (where notebook cells and pytest run). Elsewhere, or where an
    outer timer is already due sooner, the outer limit is the one that applies."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")):
        yield
        return
    outer_delay, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer_delay and outer_delay <= seconds:
        yield
        return

    def _alarm(signum, frame):
        raise _TimeLimit()

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            signal.setitimer(signal.ITIMER_REAL, max(outer_delay - (time.monotonic() - start), 1e-3))


def _hung_stand_in(fn: Callable, seconds: float) -> Callable:
    name = getattr(fn, "__name__", "your function")

    @functools.wraps(fn)
    def hung(*args, **kwargs):
        raise CheckFailure(f"{name} did not return within {seconds:g} s in its check, so it is not run again "
                           f"here. Fix it and re-run the cell that defines {name}.")

    hung.__course_hung__ = True
    return hung


def _replace_everywhere(fn: Callable, replacement: Callable) -> None:
    """Rebind every name of the learner's namespace that points at ``fn``."""
    namespace = getattr(fn, "__globals__", None)
    if not isinstance(namespace, dict):
        return
    for key, value in list(namespace.items()):
        if value is fn:
            namespace[key] = replacement


def _seeded_and_limited(what: str, section: str | None, fn: Callable, args, kwargs):
    """Run ``fn`` seeded (without touching the learner's own random state) and under :func:`timeout_seconds`.
    A function that does not return fails the check, and its names in the notebook are rebound to a stand-in
    that fails at once; a function that already hung raises its own CheckFailure straight away."""
    if getattr(fn, "__course_hung__", False):
        return fn(*args, **kwargs)
    seconds = timeout_seconds()
    try:
        with torch.random.fork_rng(devices=[]), _time_limit(seconds):
            torch.manual_seed(0)
            return fn(*args, **kwargs)
    except _TimeLimit:
        _replace_everywhere(fn, _hung_stand_in(fn, seconds))
        fail(f"{what} did not return within {seconds:g} s (the check's limit; the check's inputs are tiny, so a "
             "correct answer takes well under a second or two). Look for a loop that never ends: a `while` whose "
             "condition never changes, a retry without a limit, or waiting on something that never comes.",
             section)


def load_tensor_fixtures(path: Path) -> dict[str, torch.Tensor]:
    """A check module's stored tensors (safetensors, no pickle); a missing file fails with how to restore it."""
    from safetensors.torch import load_file

    if not path.exists():
        fail(f"The check's fixture file {path} is missing. Restore it with `git checkout -- tests/fixtures` "
             "(maintainers: `make fixtures`).")
    return load_file(str(path))


def call(what: str, section: str | None, hint: str, fn: Callable, *args, **kwargs):
    """Call the learner's ``fn`` the way a check does.

    Seeded (so randomised answers are reproducible) without touching the learner's own random state, and
    under :func:`timeout_seconds`. An unexpected exception becomes a :class:`CheckFailure` that says what
    was being checked, with the learner's exception attached as its cause (their frames are shown).
    """
    try:
        return _seeded_and_limited(what, section, fn, args, kwargs)
    except CheckFailure:
        raise
    except NotImplementedError as exc:
        _not_written_yet(exc, getattr(fn, "__name__", what))
        raise
    except Exception as exc:
        fail(f"{what} raised {type(exc).__name__}: {clip(str(exc))}{' ' + hint if hint else ''}", section, exc)


def limited(fn: Callable, section: str | None = None) -> Callable:
    """``fn`` under the check's time limit, seeded like :func:`call`, but with the learner's own exceptions
    passed through unchanged (for checks that inspect which exception was raised)."""
    name = getattr(fn, "__name__", "your function")

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return _seeded_and_limited(name, section, fn, args, kwargs)
        except CheckFailure:
            raise
        except NotImplementedError as exc:
            _not_written_yet(exc, name)
            raise
        except Exception as exc:  # the check decides what it means; if it lets it through, it reads cleanly
            _render_learner_exception(exc, f"✗ Check failed: {name} raised {type(exc).__name__}: {clip(str(exc))}")
            raise

    return run


# --------------------------------------------------------------------------------------------------
# One exercise, one grade
# --------------------------------------------------------------------------------------------------

RESULTS: dict[str, bool] = {}
"""Exercise label -> whether its check passed the last time it ran, in this kernel."""


def passed(name: str) -> None:
    print(f"✓ {name}: all checks passed")


def check(exercise: str, uses: dict[str, tuple[str, Callable[[], Callable]]] | None = None
          ) -> Callable[[Callable], Callable]:
    """Decorate a notebook check (its first argument is the learner's function).

    Records in :data:`RESULTS` whether ``exercise`` passed. ``uses`` maps the name of each earlier exercise's
    function that the learner's function calls to ``(that exercise's label, a function returning the course's
    reference for it)``: the check then runs with those references swapped in (:func:`using_reference`).
    """

    def decorate(test: Callable) -> Callable:
        @functools.wraps(test)
        def run(fn, *args, **kwargs):
            RESULTS[exercise] = False
            try:
                with contextlib.ExitStack() as stack:
                    for name, (earlier, reference) in (uses or {}).items():
                        stack.enter_context(using_reference(fn, name, reference(), earlier))
                    result = test(fn, *args, **kwargs)
            except (CheckFailure, NotImplementedError):
                raise
            except Exception as exc:
                if hasattr(exc, "_render_traceback_"):  # the learner's own exception, already readable
                    raise
                # The check itself stumbled on something the learner's answer returned (or a bug in the
                # check): still one readable message, the learner's frames only, never the check's.
                fail(f"{exercise}: the check could not finish on your answer: {type(exc).__name__}: "
                     f"{clip(str(exc))}. Compare what your function returns with its docstring (types, shapes, "
                     "keys).", None, exc)
            RESULTS[exercise] = True
            return result

        run.__course_exercise__ = exercise
        return run

    return decorate


@contextlib.contextmanager
def using_reference(fn: Callable, name: str, reference: Callable, exercise: str) -> Iterator[None]:
    """For the duration of a check of ``fn``, bind ``name`` in the learner's namespace to the course's
    ``reference`` for an earlier exercise; restore the learner's own binding afterwards, whatever happens.

    So a check grades its own exercise only. When the learner's earlier exercise has not passed its check
    in this kernel, a note says that the reference was used for it.
    """
    namespace = getattr(fn, "__globals__", None)
    if not isinstance(namespace, dict):
        yield
        return
    missing = object()
    own = namespace.get(name, missing)
    if own is not missing and own is not reference and not RESULTS.get(exercise, False):
        state = "is still wrong" if exercise in RESULTS else "has not passed its check yet"
        print(f"Note: {exercise} {state}; this check used the course's reference for {name}, so this "
              "exercise is marked on its own.")
    namespace[name] = reference
    try:
        yield
    finally:
        if own is missing:
            namespace.pop(name, None)
        else:
            namespace[name] = own
