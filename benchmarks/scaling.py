"""Steps/s of the trainers with 1 and 2 data-parallel workers on one machine (issue 10).

For each algorithm (``ppo``, ``cln --meta-grad eq17``, ``cln --meta-grad exact``) and each
worker count, one ``metagrad-rl train --nproc N`` run in a fresh process with one torch thread
per worker. The runs are interleaved (algo by algo, 1 then 2 workers, repeated ``--reps``
times) so that a change in the machine's load hits both worker counts alike. Every run samples
the same number of environment steps in total (``--total-steps``; each of ``N`` workers
samples ``total/N``), with the usual ``--num-steps`` per worker and iteration.

Reported per run: total environment steps per second of training (``summary.json``'s wall
time, which excludes process start and env construction), the speed-up of 2 workers over 1,
and the mean return of the last 20 episodes at that equal step count. Writes ``scaling.csv``
and ``scaling.json`` under ``--out`` and prints a markdown table::

    python benchmarks/scaling.py --total-steps 32768 --out runs/scaling

What limits the speed-up on a 2-core machine: the two workers share the cores with each other
(and with any other job), every minibatch step waits for one all-reduce of the gradient (and,
in the bilevel trainers, two more of the advantage statistics), and a worker that is slower
this iteration makes the other wait at the next collective.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from metagrad_rl.checkpoint import atomic_write_bytes, atomic_write_json

CONFIGS: dict[str, list[str]] = {
    "ppo": ["--algo", "ppo"],
    "cln-eq17": ["--algo", "cln", "--meta-grad", "eq17"],
    "cln-exact": ["--algo", "cln", "--meta-grad", "exact"],
}


def run_one(
    name: str, nproc: int, args: argparse.Namespace, root: Path, rep: int
) -> dict[str, Any]:
    out = root / f"{name}-n{nproc}-rep{rep}"
    total = args.total_steps_exact if name == "cln-exact" else args.total_steps
    cmd = [
        sys.executable,
        "-m",
        "metagrad_rl",
        "train",
        *CONFIGS[name],
        "--nproc",
        str(nproc),
        "--out",
        str(out),
        "--env",
        args.env,
        "--seed",
        str(args.seed),
        "--num-steps",
        str(args.num_steps),
        "--total-steps",
        str(total // nproc),
        "--torch-threads",
        "1",
        "--checkpoint-every",
        "0",
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"scaling: {name} with {nproc} workers failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    steps = int(summary["global_step"]) * nproc
    return {
        "config": name,
        "workers": nproc,
        "rep": rep,
        "env_steps": steps,
        "train_s": float(summary["wall_time_s"]),
        "process_s": wall,
        "steps_per_s": steps / float(summary["wall_time_s"]),
        "return_last20": summary["mean_return_last_20_episodes"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| config | workers | env steps | steps/s (mean over reps) | speed-up | "
        "return, last 20 episodes |",
        "|---|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        base = None
        for n in (1, 2):
            rs = [r for r in rows if r["config"] == name and r["workers"] == n]
            if not rs:
                continue
            sps = float(np.mean([r["steps_per_s"] for r in rs]))
            rets = [r["return_last20"] for r in rs if r["return_last20"] is not None]
            base = sps if n == 1 else base
            up = f"{sps / base:.2f}x" if base else "-"
            ret = f"{np.mean(rets):.1f}" if rets else "-"
            lines.append(f"| {name} | {n} | {rs[0]['env_steps']} | {sps:.0f} | {up} | {ret} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--total-steps", type=int, default=32768, help="per run, all workers")
    p.add_argument("--total-steps-exact", type=int, default=16384, help="for cln-exact (slower)")
    p.add_argument("--num-steps", type=int, default=2048, help="per worker and iteration")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", default="runs/scaling")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        for rep in range(args.reps):
            for name in args.configs:
                for n in (1, 2) if rep % 2 == 0 else (2, 1):
                    r = run_one(name, n, args, Path(d), rep)
                    rows.append(r)
                    print(
                        f"{name:10s} workers={n} steps/s={r['steps_per_s']:.0f} "
                        f"return={r['return_last20']}",
                        flush=True,
                    )
    meta = {
        "command": "python benchmarks/scaling.py " + " ".join(argv or sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_average_1min_at_start": load,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "scaling.csv", buf.getvalue().encode())
    atomic_write_json(out / "scaling.json", {**meta, "rows": rows})
    print(table(rows))
    print(
        f"cpus: {meta['cpus']}, 1-min load average {load:.1f} at the start, "
        f"{meta['load_average_1min_at_end']:.1f} at the end"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
