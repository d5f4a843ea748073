"""Section ``cost``: time and memory of each computation on Hopper-v5-sized networks.

What is measured is in :mod:`termbench.cost_setup` (the computations), :mod:`termbench.cost_time`
(interleaved timing, the Eq 12 product) and :mod:`termbench.cost_memory` (peak memory in a
fresh process); this module runs the section (:func:`run_cost`), holds it against its targets
and writes its tables and plot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from termbench.common import SMALL, Row, markdown
from termbench.cost_memory import peak_rss_bytes, probe, probe_main
from termbench.cost_setup import CostSetup, estimator_fns
from termbench.cost_time import eq12_product_times, interleaved_times, ratio_median
from termbench.plots import legend_outside, pyplot, save_png

__all__ = [
    "CostSetup",
    "cost_tables",
    "estimator_fns",
    "eq12_product_times",
    "interleaved_times",
    "peak_rss_bytes",
    "plot_cost",
    "probe",
    "probe_main",
    "ratio_median",
    "run_cost",
    "target",
]


def run_cost(
    out: Path,
    *,
    reps: int = 5,
    explicit_steps: int = 32,
    scaling: Sequence[tuple[int, int]] = SMALL.scaling,
    seed: int = 0,
    memory: bool = True,
    full_round_steps: int | None = None,
    eq12_reps: int = 15,
    progress: bool = True,
) -> dict[str, Any]:
    """Times (interleaved, medians) and peak memory (subprocesses) of every computation.

    ``full_round_steps`` cuts the "full round" to its first steps (tests only).
    """
    torch.set_num_threads(1)
    s = CostSetup(seed, full_round_steps)
    fns = estimator_fns(s, explicit_steps)
    times = interleaved_times(fns, reps, seed, "cost: estimators", progress)
    mem = {}
    if memory:
        for name in tqdm(fns, desc="cost: memory probes", disable=not progress):
            mem[name] = probe(name, full_round_steps, 1, seed, explicit_steps)
    rows = [estimator_row(name, times, mem.get(name, {})) for name in times]
    eq12 = eq12_product_times(s, eq12_reps, seed)
    eq12_rows = [
        {
            "name": k,
            "median_s": float(np.median(v)),
            "ratio_to_grad_autograd": ratio_median(eq12, k, "grad_autograd"),
            "ratio_to_grad_func": ratio_median(eq12, k, "grad_func"),
            "times_s": v,
        }
        for k, v in eq12.items()
    ]
    grow = [
        growth_row(steps, rounds, min(reps, 3), seed, memory, explicit_steps)
        for steps, rounds in tqdm(scaling, desc="cost: growth", disable=not progress)
    ]
    return {
        "estimators": rows,
        "eq12": eq12_rows,
        "growth": grow,
        "targets": cost_targets(rows, eq12_rows),
        "reps": reps,
        "torch_threads": 1,
        "torch": torch.__version__,
    }


def estimator_row(name: str, times: dict[str, list[float]], mem: dict[str, Any]) -> Row:
    """One estimator's median time, its ratios to the plain round and the exact total, and
    its memory (NaN when not probed)."""
    return {
        "name": name,
        "median_s": float(np.median(times[name])),
        "ratio_to_plain_round": ratio_median(times, name, "plain_round"),
        "ratio_to_exact_total": ratio_median(times, name, "exact_total"),
        "rss_peak_delta_mib": mem.get("rss_peak_delta_bytes", float("nan")) / 2**20,
        "graph_mib": mem.get("graph_bytes", float("nan")) / 2**20,
        "times_s": times[name],
    }


def growth_row(
    steps: int, rounds: int, reps: int, seed: int, memory: bool, explicit_steps: int
) -> Row:
    """The exact total against a plain round at ``steps`` inner steps per round, ``rounds``
    rounds (time, and memory from a subprocess probe)."""
    g = CostSetup(seed, steps, rounds)
    t = interleaved_times(
        {"plain": g.plain_round, "exact_total": g.exact_total},
        reps,
        seed,
        "",
        progress=False,
        warmup=False,
    )
    row = {
        "steps_per_round": steps,
        "rounds": rounds,
        "inner_steps": steps * rounds,
        "exact_median_s": float(np.median(t["exact_total"])),
        "plain_median_s": float(np.median(t["plain"])),
        "ratio_to_plain": ratio_median(t, "exact_total", "plain"),
    }
    if memory:
        m = probe("exact_total", steps, rounds, seed, explicit_steps)
        row["rss_peak_delta_mib"] = m["rss_peak_delta_bytes"] / 2**20
        row["graph_mib"] = m["graph_bytes"] / 2**20
    return row


def cost_targets(rows: Sequence[Row], eq12_rows: Sequence[Row]) -> list[Row]:
    """The section's four targets, each named by what it measures."""
    by = {r["name"]: r for r in rows}
    p12 = {r["name"]: r for r in eq12_rows}
    strict_grad = min(p12["grad_autograd"]["median_s"], p12["grad_func"]["median_s"])
    return [
        target(
            "time of the Eq 11-14 split / time of the exact total",
            by["four_terms"]["ratio_to_exact_total"],
            1.2,
            "x",
        ),
        target(
            "time of the exact total / time of a plain policy round",
            by["exact_total"]["ratio_to_plain_round"],
            3.0,
            "x",
        ),
        target(
            "peak memory of the exact total over one round",
            by["exact_total"]["rss_peak_delta_mib"] / 1024,
            1.0,
            " GiB",
        ),
        target(
            "time of the Eq 12 product / time of one inner-loss gradient (the faster one)",
            p12["eq12_product"]["median_s"] / strict_grad,
            1.6,
            "x",
            cause=EQ12_MISS_CAUSE,
        ),
    ]


#: Why the Eq 12 product misses its target (docs/results.md, "The Eq 12 miss").
EQ12_MISS_CAUSE = (
    "the product is a double backward through the policy network, which costs more than 1.6 "
    "gradients on 64-sample minibatches of small tensors; the engine's meta-gradient does not "
    "call it (its Eq 12 comes from the one backward pass through the unroll, see "
    "docs/results.md)"
)


def target(name: str, value: float, limit: float, unit: str = "", cause: str = "") -> Row:
    """A measured value against its limit: PASS, or MISS with one line saying by how much
    and, where it is known, why (``cause``)."""
    ok = value <= limit
    margin = f"{(value / limit - 1) * 100:+.0f}% of the limit"
    reason = "" if ok else f"{name} is {value:.3g}{unit}, above the limit {limit:.3g}{unit}"
    if reason and cause:
        reason += f": {cause}"
    return {
        "target": name,
        "measured": value,
        "limit": limit,
        "verdict": "PASS" if ok else "MISS",
        "margin": margin,
        "why": reason,
    }


def cost_tables(res: Mapping[str, Any]) -> str:
    """The section's four tables: the computations, the Eq 12 product, growth, targets."""
    return "\n\n".join(
        [_estimator_table(res), _eq12_table(res), _growth_table(res), _target_table(res)]
    )


def _estimator_table(res: Mapping[str, Any]) -> str:
    est = [
        [
            r["name"],
            r["median_s"] * 1e3,
            r["ratio_to_plain_round"],
            r["ratio_to_exact_total"],
            r["rss_peak_delta_mib"],
            r["graph_mib"],
        ]
        for r in res["estimators"]
    ]
    return (
        "Time (median ms; ratios are medians of per-repetition ratios) and peak memory (RSS above "
        "the post-setup baseline, fresh process; graph = bytes saved for backward):\n"
        + markdown(
            est, ["computation", "ms", "x plain round", "x exact total", "peak MiB", "graph MiB"]
        )
    )


def _eq12_table(res: Mapping[str, Any]) -> str:
    e12 = [
        [r["name"], r["median_s"] * 1e3, r["ratio_to_grad_autograd"], r["ratio_to_grad_func"]]
        for r in res["eq12"]
    ]
    return "Eq 12 mixed product on one minibatch of 64 (ms per call):\n" + markdown(
        e12, ["computation", "ms", "x autograd grad", "x torch.func grad"]
    )


def _growth_table(res: Mapping[str, Any]) -> str:
    gr = [
        [
            r["steps_per_round"],
            r["rounds"],
            r["inner_steps"],
            r["exact_median_s"],
            r["plain_median_s"],
            r["ratio_to_plain"],
            r.get("rss_peak_delta_mib"),
            r.get("graph_mib"),
        ]
        for r in res["growth"]
    ]
    header = ["steps/round", "rounds", "steps", "exact s", "plain s", "ratio", "peak MiB"]
    return "Exact total against unrolled steps and rounds:\n" + markdown(gr, [*header, "graph MiB"])


def _target_table(res: Mapping[str, Any]) -> str:
    tg = [
        [t["target"], t["measured"], t["limit"], t["verdict"], t["margin"]] for t in res["targets"]
    ]
    why = [f"- MISS: {t['why']}" for t in res["targets"] if t["verdict"] == "MISS"]
    return (
        "Targets (each measured value against its limit; PASS when at or below it):\n"
        + markdown(tg, ["target", "measured", "limit", "verdict", "margin"])
        + ("\n" + "\n".join(why) if why else "")
    )


def plot_cost(res: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    g = res["growth"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["inner_steps"] for r in g]
    axes[0].loglog(x, [r["exact_median_s"] for r in g], "o-", label="exact total")
    axes[0].loglog(x, [r["plain_median_s"] for r in g], "s-", label="plain round")
    axes[0].set_ylabel("seconds")
    if "graph_mib" in g[0]:
        axes[1].loglog(x, [max(r["rss_peak_delta_mib"], 1e-3) for r in g], "o-", label="peak RSS")
        axes[1].loglog(x, [r["graph_mib"] for r in g], "s-", label="graph (saved tensors)")
        axes[1].axhline(1024, color="r", lw=0.8, ls="--", label="1 GiB")
    axes[1].set_ylabel("MiB")
    for ax in axes:
        ax.set_xlabel("unrolled inner steps (320 = one PPO round)")
        ax.grid(alpha=0.3, which="both")
        legend_outside(ax)
    return save_png(fig, path)
