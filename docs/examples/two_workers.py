"""Two data-parallel workers on one machine: ``metagrad-rl train --nproc 2``.

Each worker steps its own env copy with its own seed; minibatch gradients, the meta-gradient
of ``eta`` and the normalisers are averaged, so the two hold the same parameters and
``--meta-grad exact`` is the exact meta-gradient of the union of their minibatches
(``docs/distributed.md``). ``progress.csv``'s ``all_workers_step`` counts both workers' steps.

Run it: ``.venv/bin/python docs/examples/two_workers.py OUT_DIR``.
"""

from __future__ import annotations

import sys

from metagrad_rl.cli import main as metagrad_rl_cli
from metagrad_rl.rundir import read_csv


def main(out: str, total_steps: int = 8192, num_steps: int = 1024) -> list[dict[str, str]]:
    argv = ["train", "--nproc", "2", "--algo", "cln", "--meta-grad", "exact"]
    argv += ["--env", "InvertedPendulum-v5", "--total-steps", str(total_steps)]
    argv += ["--num-steps", str(num_steps), "--out", out, "--no-progress"]
    argv += ["--num-minibatches", "4", "--update-epochs", "2"]
    code = metagrad_rl_cli(argv)
    if code != 0:
        raise SystemExit(code)
    rows = read_csv(f"{out}/progress.csv")
    print(f"{rows[-1]['global_step']} steps per worker, {rows[-1]['all_workers_step']} in all")
    return rows


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/two-workers-example")
