"""Train a CLN agent on Hopper-v5 from Python: the exact meta-gradient drives the intrinsic reward.

The same run as ``metagrad-rl train --algo cln --meta-grad exact --env Hopper-v5 ...``, through
the algorithm registry :data:`metagrad_rl.trainers.ALGOS` (each entry: its config dataclass and
its ``train``). The run directory holds ``config.json``, ``progress.csv``, ``checkpoint.pt``
and ``summary.json``; ``resume=True`` continues it exactly.

Run it: ``.venv/bin/python docs/examples/cln_hopper.py OUT_DIR`` (a few minutes at the
defaults below; the test runs it with ``total_steps=128``).
"""

from __future__ import annotations

import sys

from metagrad_rl.rundir import read_csv
from metagrad_rl.trainers import ALGOS


def main(out: str, total_steps: int = 20480, num_steps: int = 2048, **overrides) -> dict:
    cln = ALGOS["cln"]
    config = cln.config_cls(
        env="Hopper-v5",
        meta_grad="exact",
        total_steps=total_steps,
        num_steps=num_steps,
        seed=1,
        **overrides,
    )
    summary = cln.train(config, out)
    rows = read_csv(f"{out}/progress.csv")
    print(f"{summary['global_step']} steps; last row's norm of the applied meta-gradient: "
          f"{rows[-1].get('meta_grad_norm', 'n/a')}")  # fmt: skip
    return {"summary": summary, "rows": rows}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cln-hopper-example")
