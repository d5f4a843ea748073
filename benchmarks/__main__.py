"""``python -m benchmarks EXPERIMENT [ARGS...]``: one entry point over every benchmark.

Each experiment is a script beside this file (``benchmarks/<name>.py``); this runs it in a
fresh interpreter with the remaining arguments, exactly as ``python benchmarks/<name>.py ARGS``
would, and returns its exit code. ``python -m benchmarks --help`` lists them with the first
line of each script's docstring; ``python -m benchmarks NAME --help`` shows that one's flags.
``learning_runs.sh`` (a shell script of training runs) is listed and run with bash.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def experiments() -> dict[str, Path]:
    """Every runnable benchmark: ``name -> script`` (the Python scripts and the shell one)."""
    found = {p.stem: p for p in sorted(HERE.glob("*.py")) if not p.stem.startswith("_")}
    found.update({p.stem: p for p in sorted(HERE.glob("*.sh"))})
    return dict(sorted(found.items()))


def summary(script: Path) -> str:
    """The first line of the script's docstring (of its leading comment for a shell script)."""
    text = script.read_text()
    if script.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
        return " ".join(doc.strip().split("\n\n")[0].split())
    lines = [line.lstrip("# ").strip() for line in text.splitlines()[1:] if line.startswith("#")]
    return lines[0] if lines else ""


def usage() -> str:
    rows = [f"  {name:<18} {summary(path)}" for name, path in experiments().items()]
    return (
        "usage: python -m benchmarks EXPERIMENT [ARGS...]\n\n"
        "Runs benchmarks/EXPERIMENT with ARGS (`python -m benchmarks EXPERIMENT --help` lists "
        "its flags).\n\nexperiments:\n" + "\n".join(rows)
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    scripts = experiments()
    if name not in scripts:
        print(f"benchmarks: error: unknown experiment {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    script = scripts[name]
    cmd = ["bash", str(script)] if script.suffix == ".sh" else [sys.executable, str(script)]
    return subprocess.run([*cmd, *rest]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
