"""Timing and concurrency helpers for the notebooks.

- ``StageTimer``: ``with timer("generate"): ...`` then ``timer.seconds()`` for the summary.
- ``run_parallel(fn, items)``: ``fn(item)`` for every item in a thread pool, with a progress bar;
  returns ``(results, failures)`` so that no item is ever silently dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import TypeVar

from tqdm.auto import tqdm

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class StageTimer:
    """Wall-clock seconds per named stage; a repeated stage name accumulates."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time the ``with`` block and add it to ``stage`` (also when the block raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        """Stage -> seconds (0.1 s resolution), in first-use order, plus ``"total"`` over all stages."""
        out = {stage: round(s, 1) for stage, s in self._seconds.items()}
        out["total"] = round(sum(self._seconds.values()), 1)
        return out

    def __repr__(self) -> str:
        return f"StageTimer({self.seconds()})"


def run_parallel(
    fn: Callable[[K], V],
    items: Iterable[K],
    max_workers: int = 16,
    desc: str = "work",
    progress: bool = True,
) -> tuple[dict[K, V], dict[K, str]]:
    """Run ``fn(item)`` for each item in a thread pool, with a ``tqdm`` bar over completed calls.

    Args:
        fn: called once per item, from worker threads.
        items: hashable, distinct items (they become the keys of the returned dicts).
        max_workers: threads in the pool.
        desc: the progress bar's label.
        progress: show the progress bar.

    Returns:
        ``(results, failures)``: ``results[item] = fn(item)`` for the calls that returned;
        ``failures[item] = "ErrorType: message"`` for those that raised. Every item is in exactly one.
        Both dicts follow the order of ``items``, whatever order the calls finished in.

    Raises:
        ValueError: if ``items`` holds duplicates, or ``max_workers < 1``.
    """
    items = list(items)
    if len(set(items)) != len(items):
        seen: set = set()
        dupes = [x for x in items if x in seen or seen.add(x)]
        raise ValueError(f"run_parallel needs distinct items; duplicated: {dupes[:5]}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    results: dict[K, V] = {}
    failures: dict[K, str] = {}
    if not items:
        return results, failures
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        futures = {pool.submit(fn, item): item for item in items}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not progress):
            item = futures[future]
            try:
                results[item] = future.result()
            except Exception as exc:  # recorded with its type, never dropped
                failures[item] = f"{type(exc).__name__}: {exc}"
    assert len(results) + len(failures) == len(items)
    # Threads finish in any order; return the dicts in the order of ``items`` so that a rerun builds
    # everything downstream in the same order.
    return ({item: results[item] for item in items if item in results},
            {item: failures[item] for item in items if item in failures})
