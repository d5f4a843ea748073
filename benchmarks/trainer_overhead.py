"""What a bilevel trainer costs against PPO on the same steps: CLN ``eq17`` (and any other
``--meta-grad``) against ``metagrad-rl train --algo ppo``.

Runs alternate in this one process (PPO, CLN, PPO, CLN, ...; the order flips every repeat) with
one torch thread, no checkpoints and no progress bar, so that a busy machine slows both alike.
The ratio is of medians of CPU time (``time.process_time``, less sensitive to other jobs than
wall time) and, beside it, of wall time.

Usage::

    .venv/bin/python benchmarks/trainer_overhead.py --env Hopper-v5 --total-steps 30720 --repeats 3

Prints a table, then writes ``results.csv`` (one row per run) and ``results.json`` (the runs
as ``rows``, and the ratios) under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from termbench.common import write_rows

from metagrad_rl.trainers import bilevel, meta_grads, ppo

#: the target of issue "trainer rebuilt": a CLN eq17 run at most this many times a PPO run
TARGET = 1.25


def run_one(algo: str, meta_grad: str | None, env: str, steps: int, seed: int) -> dict[str, Any]:
    """One training run in a temporary directory; its wall and CPU seconds."""
    common = dict(env=env, total_steps=steps, seed=seed, torch_threads=1, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as d:
        c0, w0 = time.process_time(), time.perf_counter()
        if algo == "ppo":
            summary = ppo.train(ppo.PPOConfig(**common), d)  # type: ignore[arg-type]
        else:
            cfg = bilevel.CLNConfig(meta_grad=meta_grad, **common)  # type: ignore[arg-type]
            summary = bilevel.train(cfg, d)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    name = "ppo" if algo == "ppo" else f"cln {meta_grad}"
    return {
        "run": name,
        "steps": summary["global_step"],
        "cpu_s": cpu,
        "wall_s": wall,
        "load_avg_1min": os.getloadavg()[0],
    }


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each bilevel run's median CPU and wall time over PPO's."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["run"], []).append(r)
    ppo_cpu = statistics.median(r["cpu_s"] for r in by["ppo"])
    ppo_wall = statistics.median(r["wall_s"] for r in by["ppo"])
    out = []
    for name, rs in by.items():
        cpu = statistics.median(r["cpu_s"] for r in rs)
        wall = statistics.median(r["wall_s"] for r in rs)
        out.append(
            {
                "run": name,
                "repeats": len(rs),
                "median_cpu_s": cpu,
                "median_wall_s": wall,
                "cpu_ratio": cpu / ppo_cpu,
                "wall_ratio": wall / ppo_wall,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--total-steps", type=int, default=30720)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--meta-grads",
        nargs="+",
        default=["eq17"],
        choices=list(meta_grads.META_GRADS),
        metavar="NAME",
        help="bilevel estimators to time against PPO (default: eq17)",
    )
    p.add_argument("--out", default="bench_out/trainer_overhead")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.total_steps < 2048:
        p.error(f"--repeats {a.repeats} / --total-steps {a.total_steps}: need >= 1 / >= 2048")
    torch.set_num_threads(1)
    runs: list[tuple[str, str | None]] = [("ppo", None)] + [("cln", m) for m in a.meta_grads]
    rows = []
    for rep in range(a.repeats):
        for algo, mg in runs if rep % 2 == 0 else runs[::-1]:
            rows.append(run_one(algo, mg, a.env, a.total_steps, a.seed) | {"repeat": rep})
            r = rows[-1]
            print(
                f"  {r['run']:<22} cpu {r['cpu_s']:6.1f} s  wall {r['wall_s']:6.1f} s", flush=True
            )
    table = ratios(rows)
    print(f"\n{a.env}, {rows[0]['steps']} steps, {a.repeats} repeats, medians:")
    print(f"{'run':<22} {'cpu s':>7} {'wall s':>7} {'cpu/PPO':>8} {'wall/PPO':>9}")
    for t in table:
        print(
            f"{t['run']:<22} {t['median_cpu_s']:7.1f} {t['median_wall_s']:7.1f} "
            f"{t['cpu_ratio']:8.2f} {t['wall_ratio']:9.2f}"
        )
    eq17 = next((t for t in table if t["run"] == "cln eq17"), None)
    if eq17 is not None:
        ok = eq17["cpu_ratio"] <= TARGET
        why = "" if ok else f" (CPU time {eq17['cpu_ratio']:.2f}x PPO's, above {TARGET}x)"
        print(f"target: CLN eq17 at most {TARGET}x a PPO run: {'MET' if ok else 'MISS'}{why}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out, "results", rows, {"args": vars(a), "ratios": table})  # rows: the runs
    print(f"wrote {out / 'results.csv'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
