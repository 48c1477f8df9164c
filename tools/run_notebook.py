"""Execute a course notebook headlessly: ``python -m tools.run_notebook NOTEBOOK OUT.ipynb [--allow-errors]``.

The kernel starts in the project root (so ``import utils`` and ``import tests`` work) and inherits the
environment (``COURSE_MODEL``, ``COURSE_OUT_DIR``, ...). Cell output streams to the terminal as it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


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
                        if text:
                            print("      " + text.replace("\n", "\n      ")[-3000:], flush=True)
            return result

        client.async_execute_cell = traced
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
