"""The README's own commands, in order, at a tiny budget: they parse and run as written.

Each ``.venv/bin/metagrad-rl ...`` line of the README's ``bash`` blocks runs through the CLI
with its ``--total-steps`` scaled down (200,000 -> 64) and, on runs that start afresh, a
short rollout (``--num-steps 64``); resumes keep their own settings from ``config.json``.
"""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

from metagrad_rl.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1"]


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    cmds = []
    for block in blocks:
        for line in block.splitlines():
            if line.startswith(".venv/bin/metagrad-rl "):
                argv = shlex.split(line.split("#")[0])[1:]
                if "--help" not in argv:
                    cmds.append(argv)
    return cmds


def tiny(argv: list[str]) -> list[str]:
    out = list(argv)
    if "--total-steps" in out:
        i = out.index("--total-steps") + 1
        out[i] = str(max(64, int(out[i]) // 200_000 * 64))
    if out[0] == "train" and "--resume" not in out and "--config" not in out:
        out += FAST
    if out[0] == "evaluate":
        out[out.index("--episodes") + 1] = "1"
    if out[0] == "plot":
        out = ["plot", *(p for a in out[1:] for p in (sorted(glob.glob(a)) or [a]))]
    return [*out, "--no-progress"] if out[0] == "train" else out


def test_the_readme_has_the_documented_commands():
    cmds = [" ".join(c) for c in readme_commands()]
    assert any("--resume" in c and "--algo" not in c and "cln-1" in c for c in cmds)


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in readme_commands():
        assert main(tiny(argv)) == 0, (argv, capsys.readouterr().err)
