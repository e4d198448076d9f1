"""Re-execute the tutorial notebooks in place, with their outputs stored, and fail on any error.

Usage::

    python docs/execute_notebooks.py                    # every notebook of docs/tutorials
    python docs/execute_notebooks.py docs/tutorials/annotate_cells.ipynb

Each notebook runs in its own folder against the installed ``scforge_scvi``, on one CPU
thread (``OMP_NUM_THREADS=1`` unless set), with a limit of ``--timeout`` seconds per cell.
The wall time of each notebook is written into the sentence "This notebook ran in about ..."
of its first cell and printed; paths of the machine (site-packages, the notebook's folder) are
cut from the stored outputs. Files the notebooks write go to ``docs/tutorials/runs/``
(ignored by git). The exit status is 1 if any notebook failed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import sysconfig
import time
from pathlib import Path

TUTORIALS = Path(__file__).resolve().parent / "tutorials"
_WALL = re.compile(
    r"(This\s+notebook\s+ran\s+in\s+about\s+)(.*?)(\s+on\s+one\s+CPU\s+thread)", re.DOTALL
)


def _wall(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} minutes"


def _scrub(text: str, folder: Path) -> str:
    """Paths of the machine that ran a notebook, cut from its stored output."""
    for prefix in sorted(
        {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"], str(folder.resolve())},
        key=len,
        reverse=True,
    ):
        text = text.replace(prefix + os.sep, "")
    return re.sub(r"\S*ipykernel_\d+[/\\]\d+\.py", "<cell>", text)


def execute(path: Path, timeout: int) -> float:
    """Execute ``path`` in place; returns its wall time in seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": path.parent}}
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                output["text"] = _scrub(output["text"], path.parent)
            elif "text/plain" in output.get("data", {}):
                output["data"]["text/plain"] = _scrub(output["data"]["text/plain"], path.parent)
    first = nb.cells[0]
    if first.cell_type == "markdown":
        first.source = _WALL.sub(lambda m: m[1] + _wall(seconds) + m[3], first.source)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: docs/tutorials/*.ipynb")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(TUTORIALS.glob("*.ipynb"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    # tqdm's notice that ipywidgets is missing (progress bars are off in the tutorials)
    warning = "ignore:IProgress not found"
    os.environ["PYTHONWARNINGS"] = ",".join(
        filter(None, [os.environ.get("PYTHONWARNINGS"), warning])
    )
    failed = []
    for path in notebooks:
        print(f"{path.name} ...", flush=True)
        try:
            seconds = execute(path, args.timeout)
        except Exception as error:  # report every notebook, then fail
            failed.append(path.name)
            print(f"{path.name} FAILED: {type(error).__name__}: {str(error)[-2000:]}", flush=True)
        else:
            print(f"{path.name} ran in {_wall(seconds)}", flush=True)
    if failed:
        print(f"Failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
