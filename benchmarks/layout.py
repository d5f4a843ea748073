"""The code's layout in numbers: module sizes, function lengths and where the config goes.

Reads the source (nothing is run) and prints three tables: the longest modules of
``metagrad_rl/``, the longest functions of ``metagrad_rl/`` and ``benchmarks/`` (lines from
``def`` to the end, the docstring not counted), and every function that receives a whole
trainer configuration (a parameter named ``cfg`` or ``config``, or annotated with a
``...Config`` class), module by module. ``--json PATH`` also writes the numbers.
``tests/test_layout.py`` holds the targets: modules of at most 400 lines, functions of at
most 60, and the bilevel trainer's steps not taking the configuration.

    python -m benchmarks layout [--top 10] [--json layout.json]
"""

from __future__ import annotations

import argparse
import ast
import json
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAMES = ("cfg", "config")


def sources(*folders: str) -> Iterator[Path]:
    """The Python files under the repository's ``folders``, sorted."""
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def function_length(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` (decorators aside) to the function's end, its docstring not counted."""
    n = (fn.end_lineno or fn.lineno) - fn.lineno + 1
    first = fn.body[0]
    is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if is_doc and isinstance(first.value.value, str):
        n -= (first.end_lineno or first.lineno) - first.lineno + 1
    return n


def takes_config(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether a parameter is a whole configuration (by name or by its annotation)."""
    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    for a in args:
        note = ast.unparse(a.annotation) if a.annotation is not None else ""
        if a.arg in CONFIG_NAMES or note.strip("'\"").endswith("Config"):
            return True
    return False


def measure() -> dict[str, list[dict[str, object]]]:
    """``modules`` (lines), ``functions`` (length) and ``config`` (who receives one)."""
    modules, functions, config = [], [], []
    for path in sources("metagrad_rl", "benchmarks"):
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        tree = ast.parse(text)
        if rel.startswith("metagrad_rl/"):
            modules.append({"module": rel, "lines": len(text.splitlines())})
        for fn in _functions(tree):
            functions.append({"module": rel, "function": fn.name, "lines": function_length(fn)})
            if rel.startswith("metagrad_rl/") and takes_config(fn):
                config.append({"module": rel, "function": fn.name, "line": fn.lineno})
    modules.sort(key=lambda r: -int(r["lines"]))  # type: ignore[call-overload]
    functions.sort(key=lambda r: -int(r["lines"]))  # type: ignore[call-overload]
    return {"modules": modules, "functions": functions, "config": config}


def report(m: dict[str, list[dict[str, object]]], top: int) -> str:
    out = ["| module | lines |", "|---|---|"]
    out += [f"| {r['module']} | {r['lines']} |" for r in m["modules"][:top]]
    out += ["", "| function | module | lines (docstring aside) |", "|---|---|---|"]
    out += [f"| {r['function']} | {r['module']} | {r['lines']} |" for r in m["functions"][:top]]
    by_module: dict[str, list[str]] = {}
    for r in m["config"]:
        by_module.setdefault(str(r["module"]), []).append(str(r["function"]))
    out += ["", "| module | functions that receive a whole config |", "|---|---|"]
    out += [f"| {k} | {', '.join(v)} |" for k, v in by_module.items()]
    n = len(m["config"])
    out += ["", f"{n} functions in {len(by_module)} modules receive a whole config."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=10, help="rows of the first two tables")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.top < 1:
        ap.error(f"--top {args.top} is invalid: expected >= 1")
    m = measure()
    print(report(m, args.top))
    if args.json is not None:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(m, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
