"""Print the size and the import structure of ``src/scforge_scvi``.

Code lines exclude blank lines, comments and docstrings. Imports are read from the source
(``import`` and ``from ... import`` at any depth, relative ones resolved), and the script
prints every import circle between files and every import from a lower layer to a higher one.

    python scripts/structure.py            # summary
    python scripts/structure.py --check    # exit 1 on a circle or a layer violation
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "scforge_scvi"
PACKAGE = "scforge_scvi"

# Lower numbers are lower layers: a file may import its own layer and the ones below it.
LAYERS = {
    "_settings": 0,
    "_errors": 0,
    "_logging": 0,
    "_atomic": 0,
    "_allocator": 0,
    "_version": 0,
    "nn": 1,
    "data": 1,
    "io": 2,
    "train": 3,
    "model": 4,
    "perturb": 4,
    "bench": 5,
    "pl": 5,
    "config": 6,
    "__init__": 7,
    "cli": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def code_lines(source: str) -> int:
    """Lines that hold code: not blank, not only a comment, not part of a docstring."""
    doc_lines: set[int] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
        else:
            continue
        for i, stmt in enumerate(body):
            # the docstring proper, and attribute docstrings (a string after an assignment)
            is_doc = (
                isinstance(stmt, ast.Expr)
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            )
            if is_doc and (i == 0 or isinstance(body[i - 1], ast.Assign | ast.AnnAssign)):
                doc_lines.update(range(stmt.lineno, stmt.end_lineno + 1))
    code: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in skip or tok.type == tokenize.ENDMARKER:
            continue
        code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - doc_lines)


def imports(path: Path, name: str) -> set[str]:
    """Modules of the package that the file imports."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(PACKAGE):
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
            found.add(target)
    return found


def resolve(target: str, modules: set[str]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return LAYERS["__init__"]
    return LAYERS.get(parts[1], LAYERS["__init__"])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a circle or violation")
    args = parser.parse_args()

    files = sorted(ROOT.rglob("*.py"))
    names = {module_name(p): p for p in files}
    total = sum(len(p.read_text().splitlines()) for p in files)
    code = {n: code_lines(p.read_text()) for n, p in names.items()}
    print(f"src: {len(files)} files, {total:,} lines in all, {sum(code.values()):,} code lines")
    longest = sorted(names, key=lambda n: -len(names[n].read_text().splitlines()))[:5]
    for n in longest:
        print(f"  {len(names[n].read_text().splitlines()):5d} lines  {code[n]:5d} code  {n}")

    graph: dict[str, set[str]] = {}
    for n, p in names.items():
        deps = {resolve(t, set(names)) for t in imports(p, n)}
        graph[n] = {d for d in deps if d and d != n}
    circles = cycles(graph)
    upward = [(n, d) for n, ds in graph.items() for d in ds if layer(d) > layer(n)]
    print(f"import circles: {len(circles)}")
    for c in circles:
        print("  " + " -> ".join(c))
    print(f"imports from a lower layer to a higher one: {len(upward)}")
    for n, d in sorted(upward):
        print(f"  {n} -> {d}")
    return 1 if args.check and (circles or upward) else 0


if __name__ == "__main__":
    raise SystemExit(main())
