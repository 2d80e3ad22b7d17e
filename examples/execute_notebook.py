"""Execute examples/normlab.ipynb with parameters, as the tests do and as its stored outputs were made.

    python examples/execute_notebook.py --param DATA_DIR=/path/to/cifar10 --param EPOCHS=20 --param THREADS=1 --write

The values are set in a cell inserted after the cell tagged ``parameters`` (papermill's
convention); that cell is removed again before ``--write`` stores the outputs, so the notebook
keeps its own defaults for the next reader. Needs the ``dev`` extra (nbclient, nbformat, ipykernel).
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).with_name("normlab.ipynb")
INJECTED = "injected-parameters"


def execute(path: Path, parameters: dict[str, Any], cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """The notebook at ``path`` run top to bottom in a fresh kernel in ``cwd``, with ``parameters`` set after
    its ``parameters`` cell; the injected cell is taken out of the result. Raises ``CellExecutionError`` on failure."""
    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Parameters injected by examples/execute_notebook.py\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED]}))
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    nb.cells = [c for c in nb.cells if INJECTED not in c.metadata.get("tags", [])]
    return nb


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a parameter (a Python literal, or a string)")
    p.add_argument("--cwd", default=".", help="the kernel's working folder (default: .)")
    p.add_argument("--write", action="store_true", help=f"store the executed notebook over {NOTEBOOK.name}")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default: 3600)")
    args = p.parse_args(argv)
    params = dict((k, _value(v)) for k, v in (a.split("=", 1) for a in args.param))
    started = time.perf_counter()
    nb = execute(NOTEBOOK, params, Path(args.cwd), args.timeout)
    print(f"executed in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.write:
        nbformat.write(nb, NOTEBOOK)
        print(f"wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
