"""The ``compare_terms`` command line: runs the chosen sections, prints, writes files."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metagrad_rl.checkpoint import atomic_write_json
from metagrad_rl.rundir import CHECKPOINT_FILE
from termbench.accuracy import accuracy_tables, plot_accuracy, run_accuracy
from termbench.bias import mujoco_draws, mujoco_table, run_tabular, tabular_table
from termbench.common import FULL, OPT_IN_SECTIONS, SECTIONS, SMALL, Budget, write_rows
from termbench.cost import cost_tables, plot_cost, probe_main, run_cost
from termbench.horizon import (
    horizon_tables,
    plot_horizon,
    plot_science,
    run_horizon,
    run_science,
    science_tables,
)
from termbench.horizon import (
    probe_main as horizon_probe,
)
from termbench.learning import learning_tables, run_learning
from termbench.mixed_mode import mixed_mode_table, run_mixed_mode


# =================================================================================================
# Sections: each runs, writes its rows and plots under ``out`` and prints its tables
# =================================================================================================
def section_accuracy(args: argparse.Namespace, budget: Budget, out: Path, progress: bool) -> None:
    rows = run_accuracy(
        out / "accuracy",
        total_steps=budget.acc_steps,
        checkpoints=budget.acc_checkpoints,
        seed=args.seed,
        progress=progress,
    )
    meta = {"env": "Hopper-v5", "meta_grad": "eq17", "total_steps": budget.acc_steps}
    write_rows(out, "accuracy", rows, {**meta, "seed": args.seed})
    if rows:
        plot_accuracy(rows, out / "accuracy.png")
    print("\n## Accuracy (CLN on Hopper-v5, every term on the trainer's stored batches)\n")
    print(accuracy_tables(rows))


def section_accuracy_cost(
    args: argparse.Namespace, budget: Budget, out: Path, progress: bool
) -> None:
    import accuracy_cost  # benchmarks/accuracy_cost.py, beside compare_terms.py

    print("\n## Accuracy against cost (truncated and partial meta-gradients)\n")
    accuracy_cost.main(
        ["--out", str(out / "accuracy_cost"), "--seed", str(args.seed)]
        + (["--full"] if args.full else [])
    )


def section_cost(args: argparse.Namespace, budget: Budget, out: Path, progress: bool) -> None:
    res = run_cost(
        out,
        reps=budget.cost_reps,
        explicit_steps=budget.explicit_steps,
        scaling=budget.scaling,
        seed=args.seed,
        memory=not args.no_memory,
        progress=progress,
    )
    write_rows(out, "cost", res["estimators"], {k: v for k, v in res.items() if k != "estimators"})
    write_rows(out, "cost_growth", res["growth"])
    plot_cost(res, out / "cost_growth.png")
    print("\n## Cost (Hopper-v5-sized networks, batch 2048, 10 x 32 minibatches, 1 thread)\n")
    print(cost_tables(res))


def section_learning(args: argparse.Namespace, budget: Budget, out: Path, progress: bool) -> None:
    res = run_learning(out, Path(args.runs), full=args.full, budget=budget, progress=progress)
    write_rows(out, "learning", res["rows"], {k: v for k, v in res.items() if k != "rows"})
    print("\n## Learning curves\n")
    print(learning_tables(res))
    print("plots: " + ", ".join(res["plots"].values()))


def section_bias(args: argparse.Namespace, budget: Budget, out: Path, progress: bool) -> None:
    tab = run_tabular(budget.tabular_batch_sizes)
    write_rows(out, "bias_tabular", tab)
    print("\n## Bias and variance\n")
    print(tabular_table(tab))
    ckpt = out / "accuracy" / "run" / CHECKPOINT_FILE
    if not ckpt.is_file():  # the accuracy section did not run: train the state to sample from
        run_accuracy(
            out / "accuracy",
            total_steps=budget.acc_steps,
            checkpoints=0,
            seed=args.seed,
            progress=progress,
        )
    mj = mujoco_draws(ckpt, budget.mujoco_draws, args.seed, progress)
    write_rows(out, "bias_mujoco", mj["rows"], {k: v for k, v in mj.items() if k != "rows"})
    print()
    print(mujoco_table(mj))


def section_horizon(args: argparse.Namespace, budget: Budget, out: Path, progress: bool) -> None:
    rows = run_horizon(out / "horizon", seed=args.seed, progress=progress)
    write_rows(out, "horizon", rows, {"env": "Hopper-v5", "seed": args.seed})
    plot_horizon(rows, out / "horizon.png")
    print("\n## Horizon: the exact meta-gradient through R rounds, stored vs checkpointed\n")
    print(horizon_tables(rows))


def section_horizon_science(
    args: argparse.Namespace, budget: Budget, out: Path, progress: bool
) -> None:
    rows = run_science(out / "horizon_science", seed=args.seed, progress=progress)
    write_rows(out, "horizon_science", rows, {"env": "Hopper-v5", "seed": args.seed})
    plot_science(rows, out / "horizon_science.png")
    print("\n## Horizon science: R = 1..10 re-simulated rounds at the current eta\n")
    print(science_tables(rows))


def section_mixed_mode(args: argparse.Namespace, budget: Budget, out: Path, progress: bool) -> None:
    rows, meta = run_mixed_mode(out / "mixed_mode", seed=args.seed, progress=progress)
    write_rows(out, "mixed_mode", rows, meta)
    print("\n## Mixed mode: reverse-over-reverse against forward-over-reverse in the segments\n")
    print(mixed_mode_table(rows, meta))


#: Section name -> its runner, in the order they run.
RUNNERS: dict[str, Callable[[argparse.Namespace, Budget, Path, bool], None]] = {
    "accuracy": section_accuracy,
    "accuracy-cost": section_accuracy_cost,
    "cost": section_cost,
    "learning": section_learning,
    "bias": section_bias,
    "horizon": section_horizon,
    "horizon-science": section_horizon_science,
    "mixed-mode": section_mixed_mode,
}


# =================================================================================================
# Main
# =================================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Accuracy, cost, learning and bias/variance of the meta-gradient terms "
        "and estimators. Prints tables; writes CSV/JSON and PNGs under --out.",
    )
    p.add_argument("--out", default="bench_out/compare_terms", help="output directory")
    p.add_argument("--full", action="store_true", help="the long version (hours with learning)")
    p.add_argument("--seed", type=int, default=1, help="seed of the CLN run, data and draws")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS + OPT_IN_SECTIONS)} (default: "
        f"{','.join(SECTIONS)}; accuracy-cost is benchmarks/accuracy_cost.py: truncated and "
        "partial estimators, accuracy against cost; horizon: stored against checkpointed "
        "reverse pass through R = 1..10 Hopper rounds; horizon-science: the terms over R = "
        "1..10 rounds at three points of a 100k-step run; mixed-mode: reverse-over-reverse against "
        "forward-over-reverse Hessian products in the checkpointed pass, R = 1 and 3, reusing "
        "a rounds_meta*.pt file placed in OUT/mixed_mode)",
    )
    p.add_argument(
        "--runs",
        default="runs/learning",
        help="learning_runs.sh output read by the learning section",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory probes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-rounds", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--probe-explicit-steps", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--probe-horizon", help=argparse.SUPPRESS)
    p.add_argument("--probe-mode", default="stored", help=argparse.SUPPRESS)
    p.add_argument("--probe-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.probe_horizon:
        row = horizon_probe(args.probe_horizon, args.probe_rounds, args.probe_mode, args.probe_out)
        print(json.dumps(row))
        return 0
    if args.probe:
        row = probe_main(
            args.probe, args.probe_steps, args.probe_rounds, args.seed, args.probe_explicit_steps
        )
        print(json.dumps(row))
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS + OPT_IN_SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}: expected a subset of {list(SECTIONS + OPT_IN_SECTIONS)}")
    budget = FULL if args.full else SMALL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for name, runner in RUNNERS.items():
        if name in sections:
            t0 = time.perf_counter()
            runner(args, budget, out, not args.no_progress)
            timings[name] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    atomic_write_json(
        out / "timings.json", {"sections": sections, "full": args.full, "seconds": timings}
    )
    print("\nwall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"wrote {out}/")
    return 0
