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
- :func:`check` also refuses an answer that hands its work to the course's own implementation of the
  exercise (``tests/implementations.py`` lists them): one that *is* it (under any name, or wrapped), or that
  *calls* it while the check runs. Calls the check itself makes (expected values, references) do not count.

- Every :class:`CheckFailure` carries a *mistake identifier* (:attr:`CheckFailure.mistake`), shown as the last
  line of what the learner sees, ``[mistake: test_extract_batched/the-mean-over-response-tokens-only]``: the check
  that was running and the stage of it (:class:`Promises`) that failed, so that a class report
  (``tools/class_report.py``) counts kinds of mistakes, not message strings. A hidden check's identifier is
  opaque (``hidden-<hash>``): it names neither the hidden check nor its stage.

Nothing here holds a reference solution: the references :func:`using_reference` swaps in are the course's
``utils`` machinery, which learners can read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import signal
import sys
import sysconfig
import threading
import time
import traceback
import types
from dataclasses import dataclass
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
# Which check, and which stage of it, is running: the mistake identifier of a failure
# --------------------------------------------------------------------------------------------------

_RUNNING: list = [None, None]
"""[check name, stage label] of the check running now ([None, None] outside every check). :func:`check` and
:class:`Promises` set it and put the previous one back when their check returns or raises."""

MISTAKE_LINE = re.compile(r"\[mistake: ([A-Za-z0-9_./-]+)\]")
"""How a failure's identifier is printed (its last line): the class report parses it from notebook outputs."""


def slug(label: str, n: int = 60) -> str:
    """A stage label as an identifier part: lower case, runs of anything but letters and digits as one ``-``; past
    ``n`` characters, cut and followed by 6 hex digits of the whole label's hash (so long labels stay distinct)."""
    text = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "stage"
    if len(text) <= n:
        return text
    return text[:n].rstrip("-") + "-" + hashlib.sha256(label.encode()).hexdigest()[:6]


def mistake_id(check_name: str | None, stage: str | None, kind: str | None = None) -> str | None:
    """``<check>/<stage slug>`` (``<check>/<kind>`` for a kind of failure that is not a stage's: ``time-limit``,
    ``delegates``; ``<check>/any`` when the check has no stage running). A hidden check's is
    ``hidden-<10 hex digits>``, a hash of the same text. None outside every check."""
    if check_name is None:
        return None
    text = f"{check_name}/{kind or (slug(stage) if stage else 'any')}"
    if check_name.startswith("hidden_"):
        return "hidden-" + hashlib.sha256(text.encode()).hexdigest()[:10]
    return text


def _current_mistake(kind: str | None = None) -> str | None:
    return mistake_id(_RUNNING[0], _RUNNING[1], kind)


@contextlib.contextmanager
def _running(check_name: str) -> Iterator[None]:
    previous = list(_RUNNING)
    _RUNNING[:] = [check_name, None]
    try:
        yield
    finally:
        _RUNNING[:] = previous


class Promises:
    """The promise each stage of each check tests (its exercise's docstring, or the notebook's text around it).

    ``@PROMISES("label", ...)`` under ``@check`` lists a check's stages in the order they run; inside the check,
    ``_stage("label")`` starts one. :meth:`last` says which stage of which check ran last, so that a failure can
    be traced to the promise it tests (``make check-catalogue`` prints the promises and the mistakes each stage
    rejects), and a failure's mistake identifier names it (:func:`mistake_id`). Nothing here changes what a
    check does or says. Every part's checks module makes its own ``PROMISES = Promises()``.
    """

    def __init__(self) -> None:
        self.labels: dict[str, tuple[str, ...]] = {}
        self._running: list = [None, None]  # [check name, stage label]

    def __call__(self, *labels: str):
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate promise labels: {labels}")
        slugs = [slug(label) for label in labels]
        if len(set(slugs)) != len(slugs):  # two stages would share one mistake identifier
            raise ValueError(f"promise labels that differ only in punctuation or case: {labels}")

        def decorate(test):
            self.labels[test.__name__] = labels

            @functools.wraps(test)
            def run(*args, **kwargs):
                with self.running(test.__name__):
                    return test(*args, **kwargs)

            return run

        return decorate

    @contextlib.contextmanager
    def running(self, check_name: str) -> Iterator[None]:
        """Run ``check_name`` (the decorator does it; so does a test that runs one stage on its own): its stages'
        failures carry its mistake identifiers, and whichever check was running before is put back at the end."""
        if _RUNNING[0] == check_name:  # under its @check, which puts the previous check back (and whose own
            self.begin(check_name)     # failures, made after this returns, still name the stage that ran)
            yield
            return
        with _running(check_name):
            self.begin(check_name)
            yield

    def begin(self, check_name: str) -> None:
        """Start ``check_name`` in this registry (:meth:`last`); the mistake identifiers follow :meth:`running`."""
        self._running[:] = [check_name, None]
        if _RUNNING[0] == check_name:
            _RUNNING[1] = None

    def stage(self, label: str) -> None:
        check_name = self._running[0]
        if label not in self.labels.get(check_name, ()):
            raise ValueError(f"{label!r} is not one of the promises listed for {check_name}")
        self._running[1] = label
        if _RUNNING[0] == check_name:  # under running(): a failure from here on names this stage
            _RUNNING[1] = label

    def last(self) -> tuple[str | None, str | None]:
        """(check, stage) of the stage that ran last."""
        return self._running[0], self._running[1]


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
    not as a traceback through the checks, and a last line with its mistake identifier (:func:`mistake_id`,
    taken from the check and stage running when it was made; ``kind`` names a failure that is not a stage's).
    """

    def __init__(self, *args: Any, kind: str | None = None) -> None:
        super().__init__(*args)
        self.mistake: str | None = _current_mistake(kind)

    def _mistake_lines(self) -> list[str]:
        return ["", f"[mistake: {self.mistake}]"] if self.mistake else []

    def _render_traceback_(self) -> list[str]:
        if _debugging():
            return _full_traceback(self) + self._mistake_lines()
        red, bold, reset = "\x1b[31m", "\x1b[1m", "\x1b[0m"
        lines = [f"{red}{bold}✗ Check failed{reset}"]
        lines += [f"{red}{line}{reset}" if i == 0 else line for i, line in enumerate(str(self).split("\n"))]
        cause = self.__cause__
        if cause is not None and not isinstance(cause, CheckFailure):
            learner = _learner_lines(cause)
            if learner:
                lines += ["", "Where your code raised it:", *learner]
        return lines + self._mistake_lines()


def _raised_mistake(exc: BaseException) -> str | None:
    """The mistake identifier of a learner's exception that a check lets through: the running stage's, with
    ``raised-<exception type>`` after it (``<check>/<stage>/raised-valueerror``); None outside every check."""
    check_name, stage = _RUNNING
    if check_name is None:
        return None
    return mistake_id(check_name, None, (slug(stage) + "/" if stage else "") + "raised-" + slug(type(exc).__name__))


def _render_learner_exception(exc: BaseException, header: str, mistake: str | None = None) -> None:
    """Make a learner's own exception, raised through a check, render as ``header`` plus the learner's
    frames only (IPython's ``_render_traceback_``, set on this exception object; its type is unchanged), and
    ``mistake``'s identifier as its last line."""
    tail = ["", f"[mistake: {mistake}]"] if mistake else []

    def render() -> list[str]:
        if _debugging():
            return _full_traceback(exc) + tail
        learner = _learner_lines(exc) or [line.rstrip("\n") for line in traceback.format_exception_only(type(exc), exc)]
        return [f"\x1b[31m\x1b[1m{header}\x1b[0m", "", *learner] + tail

    try:
        exc._render_traceback_ = render
        exc.mistake = mistake
    except (AttributeError, TypeError):  # an exception type without a __dict__: shown as usual
        pass


def _not_written_yet(exc: NotImplementedError, name: str) -> None:
    _render_learner_exception(exc, f"✗ {name} is not written yet: replace `raise NotImplementedError()` in its "
                                   "cell with your code, run that cell, then this one.")


def fail(message: str, section: str | None = None, cause: BaseException | None = None,
         kind: str | None = None) -> None:
    """Raise a :class:`CheckFailure` with ``message`` (and where in the notebook the idea is explained); ``kind``
    names a failure that is not the running stage's own (its mistake identifier ends in it)."""
    where = f"\n(See {section} in the notebook.)" if section else ""
    raise CheckFailure(message + where, kind=kind) from cause


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

TIME_LIMIT = "time-limit"  # the mistake kind of a learner's function that did not return in time


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
                           f"here. Fix it and re-run the cell that defines {name}.", kind=TIME_LIMIT)

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
             section, kind=TIME_LIMIT)


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
            _render_learner_exception(exc, f"✗ Check failed: {name} raised {type(exc).__name__}: {clip(str(exc))}",
                                      _raised_mistake(exc))
            raise

    return run


# --------------------------------------------------------------------------------------------------
# Answers that hand the work to the course's own implementation
# --------------------------------------------------------------------------------------------------

_CHECK_FILES = {str(CHECKS_DIR / name) for name in ("checking.py", "implementations.py", "part1_persona_space.py",
                                                     "part2_stabilizing.py", "part3_trait_vectors.py")}  # the checks' own code
_SITE = ("site-packages", "dist-packages")


@functools.lru_cache(maxsize=1)
def _course_dir() -> str:
    """The folder of the course's ``utils`` package, as imported (its frames are looked through)."""
    import importlib.util

    spec = importlib.util.find_spec("utils")
    origin = spec.origin if spec is not None and spec.origin else str(CHECKS_DIR.parent / "utils" / "__init__.py")
    return str(Path(origin).resolve().parent)


@functools.lru_cache(maxsize=4096)
def _frame_kind(filename: str) -> str:
    """Who wrote the code of a frame: "check", "course" (utils/), "library" (stdlib, installed packages), or
    "learner" (everything else: notebook cells, the learner's own files)."""
    if filename.startswith("<frozen"):
        return "library"
    if filename.startswith("<"):  # code compiled from a string (a notebook, exec): the learner's
        return "learner"
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return "learner"
    if path in _CHECK_FILES:
        return "check"
    if path.startswith(_course_dir() + os.sep):
        return "course"
    if any(s in path for s in _SITE) or path.startswith(_STDLIB):
        return "library"
    return "learner"


def _unwrap_chain(obj: Any) -> list[Any]:
    """``obj``, then what it stands for: ``functools.partial``'s ``func``, a bound method's ``__func__``,
    ``__wrapped__`` (``functools.wraps``, ``contextlib.contextmanager``), the function a library's wrapper
    closes over (a copy of ``contextmanager``'s wrapper has no ``__wrapped__``), ..."""
    chain, seen = [], set()
    while obj is not None and id(obj) not in seen and len(chain) < 64:
        seen.add(id(obj))
        chain.append(obj)
        try:
            obj = _stands_in_for(obj)
        except Exception:  # an object whose attribute lookup raises stands for nothing else
            obj = None
    return chain


def _stands_in_for(obj: Any) -> Any:
    """The next link of :func:`_unwrap_chain` (None at its end)."""
    if isinstance(obj, functools.partial):
        return obj.func
    if hasattr(obj, "__func__") and not isinstance(obj, type):
        return obj.__func__
    if (isinstance(obj, types.FunctionType) and not hasattr(obj, "__wrapped__") and obj.__closure__
            and _frame_kind(obj.__code__.co_filename) == "library"):
        return next((c.cell_contents for c in obj.__closure__ if _cell_callable(c)), None)
    return getattr(obj, "__wrapped__", None)


def _cell_callable(cell) -> bool:
    try:
        return callable(cell.cell_contents)
    except ValueError:  # an empty cell
        return False


def _codes(obj: Any) -> set:
    """The code objects of ``obj``'s chain, other than libraries' (``contextlib.contextmanager``'s wrapper has one
    code object for every function it decorates)."""
    return {code for x in _unwrap_chain(obj) if (code := getattr(x, "__code__", None)) is not None
            and _frame_kind(code.co_filename) != "library"}


def _stands_for(fn: Any, impl: Any) -> str | None:
    """How ``fn`` is the course's ``impl`` without calling it (a sentence), or None if it is not."""
    chain = _unwrap_chain(fn)
    impl_chain = _unwrap_chain(impl)
    if any(x is y for x in chain for y in impl_chain):
        if chain[0] is impl:
            return "The function you passed is that function itself, imported or assigned under your name."
        return "The function you passed stands for it (a functools.partial or functools.wraps wrapper of it)."
    if _codes(fn) & _codes(impl):
        return "The function you passed runs a copy of its code."
    return None


def _partial_around(value: Any, impl: Any, tripwire: Callable) -> Any:
    """``value`` with ``impl`` replaced by ``tripwire``: the tripwire for ``impl`` itself, a rebuilt partial for
    a partial of it; None for anything else."""
    if value is impl:
        return tripwire
    if isinstance(value, functools.partial):
        inner = _partial_around(value.func, impl, tripwire)
        if inner is not None:
            return functools.partial(inner, *value.args, **value.keywords)
    return None


def _learner_functions(fn: Any) -> list[Any]:
    """The learner's function, what it wraps, and the learner functions it reaches through its globals, closure
    and defaults (its helpers): the code the static scan reads and whose references are rewired."""
    out, seen, todo = [], set(), list(_unwrap_chain(fn))
    while todo and len(out) < 256:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if isinstance(f, type):  # a class the learner wrote (a context manager): its methods
            todo += [x for v in vars(f).values() for x in _unwrap_chain(v)]
            continue
        code = getattr(f, "__code__", None)
        if not isinstance(f, types.FunctionType) or _frame_kind(code.co_filename) != "learner":
            continue
        out.append(f)
        namespace = f.__globals__
        names = {n for c in _code_objects(code) for n in c.co_names}
        todo += [x for n in names if n in namespace and (callable(namespace[n]) or isinstance(namespace[n], type))
                 for x in _unwrap_chain(namespace[n])]
        for cell in getattr(f, "__closure__", None) or ():
            try:
                todo += _unwrap_chain(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        todo += [d for d in (getattr(f, "__defaults__", None) or ()) if callable(d)]
    return out


def _code_objects(code) -> list:
    """``code`` and every code object nested in it (inner functions, lambdas, comprehensions)."""
    out, todo = [], [code]
    while todo:
        c = todo.pop()
        out.append(c)
        todo += [k for k in c.co_consts if hasattr(k, "co_names")]
    return out


def _named_in(functions: list, dotted: str, impl: Any) -> bool:
    """The static signal: the learner's code names ``impl``: a global that stands for it, ``from <its module>
    import <it>``, or ``<its module>.<it>`` (also through a name bound to the module)."""
    module, name = dotted.rsplit(".", 1)
    for f in functions:
        namespace = f.__globals__
        for code in _code_objects(f.__code__):
            names = code.co_names
            if name in names and (module in names or any(getattr(namespace.get(n), "__name__", None) == module
                                                         for n in names)):
                return True
            if any(n in namespace and _stands_for(namespace[n], impl) for n in names):
                return True
    return False


@dataclass(frozen=True)
class _Call:
    """A call of a course implementation made by the learner's code while a check ran."""

    implementation: str  # its dotted name
    caller: str  # the learner's function that called it
    where: str  # "Cell In[12], line 4", or a file and line


class _Tripwires:
    """While a check runs, every reference to the course's implementations that the learner's code can reach
    (the home module, every module of the course and the learner, ``__main__``, the learner function's
    globals, closure and defaults, partials of them) points at a stand-in that records the call when the
    learner's code made it, then calls the real function. Everything is put back on exit."""

    def __init__(self, fn: Callable, implementations: list[tuple[str, Any]]):
        self.fn, self.implementations = fn, implementations
        self.calls: list[_Call] = []
        self._undo: list[Callable[[], None]] = []
        self._learner = _learner_functions(fn)
        self._named = {dotted for dotted, impl in implementations if _named_in(self._learner, dotted, impl)}

    def _tripwire(self, dotted: str, impl: Callable) -> Callable:
        calls, named = self.calls, self._named

        @functools.wraps(impl)
        def tripwire(*args, **kwargs):
            caller = _delegating_frame(sys._getframe(1))
            if caller is _UNDECIDED:  # a thread the learner's code started: counts if their code names it
                if dotted in named:
                    calls.append(_learner_call(dotted, caller))
            elif caller is not None:
                calls.append(_learner_call(dotted, caller))
            return impl(*args, **kwargs)

        tripwire.__course_tripwire_of__ = impl
        _TRIPWIRE_CODES.add(tripwire.__code__)  # one code object for every stand-in: looked through in stacks
        return tripwire

    def _rewire_dict(self, namespace: dict, wires: list[tuple[Any, Callable]]) -> None:
        for key, value in list(namespace.items()):
            for impl, wire in wires:
                new = _partial_around(value, impl, wire)
                if new is not None:
                    namespace[key] = new
                    self._undo.append(functools.partial(_put_back, namespace, key, new, value))
                    break

    def __enter__(self) -> _Tripwires:
        wires = [(impl, self._tripwire(dotted, impl)) for dotted, impl in self.implementations]
        try:
            dicts = {id(d): d for d in _namespaces()}
            for f in self._learner:
                namespace = getattr(f, "__globals__", None)
                if isinstance(namespace, dict):
                    dicts[id(namespace)] = namespace
            for namespace in dicts.values():
                self._rewire_dict(namespace, wires)
            for f in self._learner:
                self._rewire_function(f, wires)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _rewire_function(self, f: Any, wires: list[tuple[Any, Callable]]) -> None:
        for cell in getattr(f, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            for impl, wire in wires:
                new = _partial_around(value, impl, wire)
                if new is not None:
                    cell.cell_contents = new
                    self._undo.append(functools.partial(_put_back_cell, cell, new, value))
                    break
        defaults = getattr(f, "__defaults__", None)
        if defaults:
            new_defaults = tuple(next((n for impl, wire in wires if (n := _partial_around(d, impl, wire)) is not None),
                                      d) for d in defaults)
            if any(a is not b for a, b in zip(new_defaults, defaults)):
                f.__defaults__ = new_defaults
                self._undo.append(functools.partial(setattr, f, "__defaults__", defaults))

    def __exit__(self, *exc_info) -> None:
        while self._undo:
            self._undo.pop()()


_UNDECIDED = object()
_TRIPWIRE_CODES: set = set()


def _delegating_frame(frame):
    """The learner's frame that made this call; None when the checks made it; ``_UNDECIDED`` when no frame
    says (a thread the learner's code started). Library and course frames are looked through, so a call the
    learner makes through a course helper counts, and one the check makes through a course helper does not."""
    while frame is not None:
        code = frame.f_code
        if code not in _TRIPWIRE_CODES:
            kind = _frame_kind(code.co_filename)
            if kind == "learner":
                return frame
            if kind == "check":
                return None
        frame = frame.f_back
    return _UNDECIDED


def _learner_call(dotted: str, frame) -> _Call:
    if frame is _UNDECIDED:
        return _Call(dotted, "a thread your code started", "")
    return _Call(dotted, frame.f_code.co_name, f"{_where(frame.f_code.co_filename)}, line {frame.f_lineno}")


def _put_back(namespace: dict, key: str, new: Any, old: Any) -> None:
    if namespace.get(key) is new:
        namespace[key] = old


def _put_back_cell(cell, new: Any, old: Any) -> None:
    try:
        if cell.cell_contents is new:
            cell.cell_contents = old
    except ValueError:
        pass


def _namespaces() -> list[dict]:
    """The globals of every loaded module that is not a library's: the course's, the checks', the learner's
    (``__main__``, their own files)."""
    out = []
    for module in list(sys.modules.values()):
        filename = getattr(module, "__file__", None)
        if filename is not None and _frame_kind(filename) == "library":
            continue
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            out.append(namespace)
    return out


def _check_name(test: Callable) -> str:
    return f"{test.__module__}.{test.__name__}"


def _registered(check_name: str):
    """The registry's entry and implementations for a check (None, []) when it has none."""
    from tests import implementations

    entry = implementations.REGISTRY.get(check_name)
    return entry, (implementations.implementations_of(check_name) if entry is not None else [])


def _delegation_message(exercise: str, entry, dotted: str, how: str) -> str:
    allowed = ""
    if entry.allowed:
        allowed = f" (Other helpers stay allowed: the notebook lets you use {', '.join(entry.allowed)} here.)"
    return (f"{exercise}: this answer hands the work to the course's own {dotted}; write it yourself (you may read "
            f"utils/ for ideas). {how}{allowed}\n(See {entry.section} in the notebook.)")


def _refuse(exercise: str, entry, dotted: str, how: str, underlying: BaseException | None) -> None:
    failure = CheckFailure(_delegation_message(exercise, entry, dotted, how), kind="delegates")
    failure.underlying = underlying  # what the check itself concluded (None: it accepted the answer)
    raise failure from None


def _refuse_stand_ins(exercise: str, entry, fn: Any, implementations: list[tuple[str, Any]]) -> None:
    """Fail at once when the learner's function is a course implementation, under any name or wrapper."""
    for dotted, impl in implementations:
        how = _stands_for(fn, impl)
        if how is not None:
            _refuse(exercise, entry, dotted, how, None)


def _refuse_calls(exercise: str, entry, fn: Any, calls: list[_Call], underlying: BaseException | None) -> None:
    """Fail when the learner's code called a course implementation while the check ran."""
    if calls:
        first = calls[0]
        name = getattr(fn, "__name__", None) or "answer"
        where = f" (from your {first.caller}, {first.where})" if first.where else f" (from {first.caller})"
        _refuse(exercise, entry, first.implementation, f"Your {name} calls it while the check runs{where}.",
                underlying)


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
            with _running(test.__name__):  # failures made below name this check (and its stage)
                return checked(fn, *args, **kwargs)

        def checked(fn, *args, **kwargs):
            RESULTS[exercise] = False
            entry, implementations = _registered(_check_name(test))
            _refuse_stand_ins(exercise, entry, fn, implementations)
            tripwires = _Tripwires(fn, implementations) if implementations else None
            try:
                with contextlib.ExitStack() as stack:
                    if tripwires is not None:
                        stack.enter_context(tripwires)
                    for name, (earlier, reference) in (uses or {}).items():
                        stack.enter_context(using_reference(fn, name, reference(), earlier))
                    result = test(fn, *args, **kwargs)
            except (CheckFailure, NotImplementedError) as exc:
                if tripwires is not None:
                    _refuse_calls(exercise, entry, fn, tripwires.calls, exc)
                raise
            except Exception as exc:
                if tripwires is not None:
                    _refuse_calls(exercise, entry, fn, tripwires.calls, exc)
                if hasattr(exc, "_render_traceback_"):  # the learner's own exception, already readable
                    raise
                # The check itself stumbled on something the learner's answer returned (or a bug in the
                # check): still one readable message, the learner's frames only, never the check's.
                fail(f"{exercise}: the check could not finish on your answer: {type(exc).__name__}: "
                     f"{clip(str(exc))}. Compare what your function returns with its docstring (types, shapes, "
                     "keys).", None, exc)
            if tripwires is not None:
                _refuse_calls(exercise, entry, fn, tripwires.calls, None)
            RESULTS[exercise] = True
            return result

        run.__course_exercise__ = exercise
        run.__course_check__ = _check_name(test)
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
