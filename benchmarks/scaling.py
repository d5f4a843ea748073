"""Steps/s of the trainers with 1 and N workers on one machine, in both parallel modes (issue 18).

For each algorithm (``ppo``, ``cln --meta-grad eq17``, ``cln --meta-grad exact``), one run with
one process, then for each worker count ``N > 1`` one run per mode: ``--parallel rollout``
(``N`` processes sample, one learner updates on the union) and ``--parallel allreduce`` (``N``
trainers averaging every minibatch gradient over gloo). Each run is
``metagrad-rl train --nproc N`` in a fresh process with one torch thread per process, sampling
the same number of environment steps in total (``--total-steps``: each of ``N`` workers samples
``total/N``, ``--num-steps`` per worker and iteration). The runs are interleaved (config by
config, the order reversed on odd repetitions) so that a change in the machine's load hits every
mode alike; the 1-minute load average is recorded before and after every run.

Beside them, the all-reduce mode's floor: two gloo processes all-reducing the trainers' flat
policy-and-critic gradient (the payload of one minibatch step) back to back, with nothing else
between the calls. From it, the speed-up the all-reduce mode could reach if a step cost its
compute plus one such all-reduce (``bound``): ``N t1 / (t1 + s f)``, with ``t1`` the
one-process time per iteration, ``s`` the minibatch steps per iteration and ``f`` the floor.

Reported per run: total environment steps per second of training (``summary.json``'s wall
time, which excludes process start and env construction), the speed-up over one process, the
mean return of the last 20 episodes (equal in both modes: the same numbers), and the load.
Writes ``scaling.csv``, ``scaling.json`` and ``scaling.png`` under ``--out`` and prints a
markdown table::

    python benchmarks/scaling.py --reps 2 --out runs/scaling
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
MODES = ("rollout", "allreduce")
TARGET = 1.6  # issue 18: 2 workers >= 1.6x one process for ppo and cln-eq17, idle machine


def run_one(
    name: str, nproc: int, mode: str, args: argparse.Namespace, root: Path, rep: int
) -> dict[str, Any]:
    out = root / f"{name}-n{nproc}-{mode}-rep{rep}"
    total = args.total_steps_exact if name == "cln-exact" else args.total_steps
    cmd = [sys.executable, "-m", "metagrad_rl", "train", *CONFIGS[name]]
    cmd += ["--nproc", str(nproc), "--parallel", mode, "--out", str(out), "--env", args.env]
    cmd += ["--seed", str(args.seed), "--num-steps", str(args.num_steps)]
    cmd += ["--total-steps", str(total // nproc), "--torch-threads", "1"]
    cmd += ["--checkpoint-every", "0", "--no-progress"]
    load0 = os.getloadavg()[0]
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
        "mode": mode if nproc > 1 else "one process",
        "rep": rep,
        "env_steps": steps,
        "train_s": float(summary["wall_time_s"]),
        "process_s": wall,
        "steps_per_s": steps / float(summary["wall_time_s"]),
        "return_last20": summary["mean_return_last_20_episodes"],
        "load_before": load0,
        "load_after": os.getloadavg()[0],
    }


# ------------------------------------------------------------------ the collective's floor
def payload_size(env: str) -> int:
    """Entries of the PPO trainer's flat policy-and-critic vector on ``env`` (one step's
    all-reduce payload; the bilevel trainers' joint vector is the same policy plus two critics)."""
    from metagrad_rl.envs import make_env
    from metagrad_rl.networks import Critic, GaussianPolicy

    e = make_env(env)
    obs, act = e.observation_space.shape[0], e.action_space.shape[0]
    e.close()
    nets = [GaussianPolicy(obs, act, (64, 64), "none"), Critic(obs, (64, 64))]
    return sum(p.numel() for net in nets for p in net.parameters())


def _floor_worker(rank: int, port: int, size: int, calls: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.ones(size)
    for _ in range(20):  # warm-up
        dist.all_reduce(x)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(x)
    per_call = (time.perf_counter() - t0) / calls
    if rank == 0:
        Path(out).write_text(json.dumps({"floor_s": per_call}))
    dist.destroy_process_group()


def collective_floor(size: int, calls: int = 500) -> float:
    """Seconds per plain gloo all-reduce of ``size`` float32 between two processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "floor.json")
        mp.start_processes(
            _floor_worker, args=(port, size, calls, out), nprocs=2, start_method="spawn"
        )
        return float(json.loads(Path(out).read_text())["floor_s"])


def steps_per_iteration(args: argparse.Namespace) -> int:
    """Minibatch steps of one iteration with the trainers' defaults (one per all-reduce)."""
    from metagrad_rl.trainers.ppo import PPOConfig

    return PPOConfig(num_steps=args.num_steps, total_steps=args.num_steps).steps_per_round


# ------------------------------------------------------------------ report
def summarise(rows: list[dict[str, Any]], floor_s: float, args: argparse.Namespace) -> list[dict]:
    """One line per (config, workers, mode): mean steps/s, speed-up, the all-reduce bound."""
    out = []
    for name in CONFIGS:
        base_rows = [r for r in rows if r["config"] == name and r["workers"] == 1]
        if not base_rows:
            continue
        base = float(np.mean([r["steps_per_s"] for r in base_rows]))
        t1 = args.num_steps / base  # seconds per iteration of one process
        for key in sorted({(r["workers"], r["mode"]) for r in rows if r["config"] == name}):
            rs = [r for r in rows if r["config"] == name and (r["workers"], r["mode"]) == key]
            sps = float(np.mean([r["steps_per_s"] for r in rs]))
            n = key[0]
            bound = n * t1 / (t1 + steps_per_iteration(args) * floor_s) if n > 1 else 1.0
            rets = [r["return_last20"] for r in rs if r["return_last20"] is not None]
            out.append(
                {
                    "config": name,
                    "workers": n,
                    "mode": key[1],
                    "steps_per_s": sps,
                    "speed_up": sps / base,
                    "allreduce_bound": bound if key[1] == "allreduce" else None,
                    "return_last20": float(np.mean(rets)) if rets else None,
                    "load": float(np.mean([r["load_before"] for r in rs])),
                    "reps": len(rs),
                }
            )
    return out


def table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| config | workers | mode | steps/s | speed-up | all-reduce bound | "
        "return, last 20 episodes | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        bound = f"{s['allreduce_bound']:.2f}x" if s["allreduce_bound"] is not None else "-"
        ret = f"{s['return_last20']:.1f}" if s["return_last20"] is not None else "-"
        lines.append(
            f"| {s['config']} | {s['workers']} | {s['mode']} | {s['steps_per_s']:.0f} | "
            f"{s['speed_up']:.2f}x | {bound} | {ret} | {s['load']:.1f} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = [s for s in summary if s["workers"] > 1]
    names = [n for n in CONFIGS if any(s["config"] == n for s in multi)]
    groups = sorted({(s["workers"], s["mode"]) for s in multi})
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / max(1, len(groups))
    colors = plt.get_cmap("tab10").colors
    for i, key in enumerate(groups):
        xs, ys = [], []
        for j, n in enumerate(names):
            hit = [s for s in multi if s["config"] == n and (s["workers"], s["mode"]) == key]
            if hit:
                xs.append(j + (i - (len(groups) - 1) / 2) * width)
                ys.append(hit[0]["speed_up"])
        ax.bar(xs, ys, width, label=f"{key[0]} workers, {key[1]}", color=colors[i % 10])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(TARGET, color="gray", linestyle="--", linewidth=1, label=f"target {TARGET}x")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("speed-up over one process (steps/s)")
    ax.set_xlabel("trainer")
    ax.set_title("Workers on one machine: rollout workers vs all-reduce")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--total-steps", type=int, default=32768, help="per run, all workers")
    p.add_argument("--total-steps-exact", type=int, default=16384, help="for cln-exact (slower)")
    p.add_argument("--num-steps", type=int, default=2048, help="per worker and iteration")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="counts beside 1")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--floor-calls", type=int, default=500, help="all-reduces timed for the floor")
    p.add_argument("--out", default="runs/scaling")
    args = p.parse_args(argv)
    if any(n < 2 for n in args.workers):
        p.error(f"--workers {args.workers}: expected counts >= 2 (one process always runs)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    size = payload_size(args.env)
    floor_s = collective_floor(size, args.floor_calls)
    print(f"all-reduce floor: {floor_s * 1e3:.3f} ms for {size} float32 (2 gloo processes)")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        for rep in range(args.reps):
            for name in args.configs:
                plan = [(1, "rollout")] + [(n, m) for n in args.workers for m in args.modes]
                for n, mode in plan if rep % 2 == 0 else plan[::-1]:
                    r = run_one(name, n, mode, args, Path(d), rep)
                    rows.append(r)
                    print(
                        f"{name:10s} workers={n} {r['mode']:11s} steps/s={r['steps_per_s']:.0f} "
                        f"return={r['return_last20']} load={r['load_before']:.1f}",
                        flush=True,
                    )
    summary = summarise(rows, floor_s, args)
    meta = {
        "command": "python benchmarks/scaling.py " + " ".join(argv or sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_average_1min_at_start": load,
        "load_average_1min_at_end": os.getloadavg()[0],
        "allreduce_floor_s": floor_s,
        "allreduce_payload_floats": size,
        "minibatch_steps_per_iteration": steps_per_iteration(args),
    }
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "scaling.csv", buf.getvalue().encode())
    atomic_write_json(out / "scaling.json", {**meta, "rows": rows, "summary": summary})
    plot(summary, out / "scaling.png")
    print(table(summary))
    print(
        f"cpus: {meta['cpus']}, 1-min load average {load:.1f} at the start, "
        f"{meta['load_average_1min_at_end']:.1f} at the end; all-reduce floor "
        f"{floor_s * 1e3:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
