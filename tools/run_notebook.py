"""Execute a course notebook headlessly: ``python -m tools.run_notebook NOTEBOOK OUT.ipynb [--allow-errors]``.

The kernel starts in the project root (so ``import utils`` and ``import tests`` work) and inherits the
environment (``COURSE_MODEL``, ``COURSE_OUT_DIR``, ...). As it runs, each cell's time, printed output and
"What this run shows" text go to the terminal when the cell finishes, and its progress bars while it runs
(a line per bar every ``PROGRESS_EVERY_S`` seconds, and when it completes).
"""

from __future__ import annotations

import argparse
import html
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
PROGRESS_EVERY_S = 15.0
_COUNT = re.compile(r"(\d+)/(\d+)")


class ProgressEcho:
    """Prints the notebook's tqdm bars as text, read from the kernel's widget messages.

    In a kernel, ``tqdm.auto`` draws a bar as ipywidgets: an HBox of an HTML (the description and
    percentage), a progress bar and an HTML (``n/total [elapsed<remaining, rate]``). Every update of the
    right-hand text is a widget message; this prints ``description n/total [...]`` for a bar the first time
    it moves, at most every ``every`` seconds after that, and once when it reaches its total.
    """

    def __init__(self, every: float = PROGRESS_EVERY_S, out=None):
        self.every, self.out = every, out or sys.stdout
        self.state: dict[str, dict] = {}
        self.last: dict[str, float] = {}
        self.done: set[str] = set()

    def _parent(self, comm_id: str) -> dict | None:
        ref = f"IPY_MODEL_{comm_id}"
        return next((s for s in self.state.values() if ref in (s.get("children") or [])), None)

    def line(self, comm_id: str) -> str | None:
        """The bar's text if ``comm_id`` is a bar's right-hand text, else None."""
        right = self.state.get(comm_id, {})
        if right.get("_model_name") != "HTMLModel" or not _COUNT.search(right.get("value") or ""):
            return None
        box = self._parent(comm_id)
        if box is None:
            return None
        left = self.state.get(box["children"][0].removeprefix("IPY_MODEL_"), {}).get("value", "")
        # tqdm pads with figure spaces (U+2007) in a notebook: plain spaces in a terminal.
        return re.sub(r"[\u2007\s]+", " ", html.unescape(f"{left} {right['value']}")).strip()

    def __call__(self, msg: dict) -> None:
        content = msg.get("content", {})
        state = (content.get("data") or {}).get("state")
        comm_id = content.get("comm_id")
        if not state or comm_id is None:
            return
        self.state.setdefault(comm_id, {}).update(state)
        if "value" not in state:
            return
        text = self.line(comm_id)
        if text is None or comm_id in self.done:
            return
        count = _COUNT.search(text)
        finished = count is not None and count.group(1) == count.group(2)
        now = time.monotonic()
        if finished or now - self.last.get(comm_id, -self.every) >= self.every:
            self.last[comm_id] = now
            if finished:
                self.done.add(comm_id)
            print(f"      .. {text}", file=self.out, flush=True)


def execute(path: Path, out: Path | None = None, allow_errors: bool = False, timeout: int = 1800,
            echo: bool = True) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(ROOT)}})
    if echo:
        original = client.async_execute_cell

        async def traced(cell, cell_index, *args, **kwargs):
            t0 = time.time()
            result = await original(cell, cell_index, *args, **kwargs)
            if cell.cell_type == "code":
                print(f"[{cell_index:3d}] {time.time() - t0:6.1f}s  {cell.source.splitlines()[0][:70] if cell.source else ''}",
                      flush=True)
                for output in cell.get("outputs", []):
                    if output.get("output_type") == "stream" and output.get("name") == "stdout":
                        text = output["text"].rstrip()
                    elif output.get("output_type") == "display_data" and "text/markdown" in output.get("data", {}):
                        text = output["data"]["text/markdown"].rstrip()  # "What this run shows"
                    else:
                        continue
                    if text:
                        print("      " + text.replace("\n", "\n      ")[-3000:], flush=True)
            return result

        client.async_execute_cell = traced
        progress = ProgressEcho()
        handle_comm_msg = client.handle_comm_msg

        def echoed_comm_msg(outs, msg, cell_index):
            handle_comm_msg(outs, msg, cell_index)
            progress(msg)

        client.handle_comm_msg = echoed_comm_msg
    try:
        client.execute()
    finally:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--allow-errors", action="store_true")
    args = parser.parse_args(argv)
    execute(args.notebook, args.out, allow_errors=args.allow_errors)
    print(f"executed notebook written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
