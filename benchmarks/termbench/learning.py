"""Section ``learning``: Figures 4, 5 and 6 and final returns from run directories."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from metagrad_rl.plotting import draw_mean_band, load_curve
from metagrad_rl.rundir import CHECKPOINT_FILE, PROGRESS_FILE, SUMMARY_FILE, clear_run_dir
from metagrad_rl.trainers import bilevel
from metagrad_rl.trainers.bilevel import (
    CLNConfig,
    LIRPGConfig,
)
from metagrad_rl.trainers.meta_grads import META_GRADS
from termbench.common import BENCHMARKS, Budget, Row, markdown
from termbench.plots import legend_outside, pyplot, save_png, styles

# =================================================================================================
# 3. LEARNING: Figures 4, 5 and 6 from run directories
# =================================================================================================
#: Figure 5 draws every registered estimator that has runs.
FIG5_ESTIMATORS = tuple(META_GRADS)
FIG4_ENVS = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")


def run_groups(roots: Iterable[Path]) -> dict[str, list[Path]]:
    """``{group: [run dirs]}`` where a run ``<group>-s<seed>`` has a ``progress.csv``."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for root in roots:
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            m = re.fullmatch(r"(.+)-s(\d+)", d.name)
            if m and (d / PROGRESS_FILE).is_file():
                groups[m.group(1)].append(d)
    return dict(groups)


def final_return(run: Path) -> tuple[float | None, int, bool]:
    """(mean return of the last 20 episodes, steps, finished) from summary.json or the log."""
    s = run / SUMMARY_FILE
    if s.is_file():
        d = json.loads(s.read_text())
        return d.get("mean_return_last_20_episodes"), int(d.get("global_step", 0)), True
    steps, vals = load_curve(run)
    if not len(steps):
        return None, 0, False
    return float(np.mean(vals[-5:])), int(steps[-1]), False


def curve_end(run: Path) -> float | None:
    """The last point of the run's plotted curve: progress.csv's last ``episodic_return`` (the
    mean return of the episodes that finished in the run's last iteration with one)."""
    _, vals = load_curve(run)
    return float(vals[-1]) if len(vals) else None


def learning_table(groups: Mapping[str, list[Path]]) -> list[Row]:
    rows = []
    for g, runs in sorted(groups.items()):
        finals = [final_return(r) for r in runs]
        vals = [f for f, _, _ in finals if f is not None]
        ends = [e for e in (curve_end(r) for r in runs) if e is not None]
        rows.append(
            {
                "group": g,
                "seeds": len(runs),
                "finished": sum(done for *_, done in finals),
                "steps": min(st for _, st, _ in finals),
                "final_mean": float(np.mean(vals)) if vals else None,
                "final_std": float(np.std(vals)) if len(vals) > 1 else None,
                "per_seed": vals,
                "curve_end_mean": float(np.mean(ends)) if ends else None,
            }
        )
    return rows


def bootstrap_differences(
    rows: Sequence[Row],
    prefix: str = "cln-",
    suffix: str = "-Hopper-v5",
    n: int = 10_000,
    seed: int = 0,
) -> list[Row]:
    """95% bootstrap intervals of the difference in final return of every pair of groups.

    For the groups named ``<prefix><estimator><suffix>`` (Figure 5): each group's seeds are
    resampled with replacement, independently, ``n`` times; the interval is the 2.5 and 97.5
    percentiles of the difference of the resampled means. A pair is *separated* when the
    interval excludes 0. With 3-5 seeds a bootstrap interval is optimistic (it cannot be
    wider than the seeds' range): read an unseparated pair as "undecided".
    """
    rng = np.random.default_rng(seed)
    finals = {
        r["group"][len(prefix) : -len(suffix)]: np.asarray(r["per_seed"], dtype=float)
        for r in rows
        if r["group"].startswith(prefix) and r["group"].endswith(suffix) and len(r["per_seed"]) > 1
    }
    boot = {k: v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1) for k, v in finals.items()}
    out = []
    names = sorted(finals, key=lambda k: -finals[k].mean())
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = boot[a] - boot[b]
            lo, hi = np.percentile(d, [2.5, 97.5])
            out.append(
                {
                    "a": a,
                    "b": b,
                    "diff": float(finals[a].mean() - finals[b].mean()),
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "separated": bool(lo > 0 or hi < 0),
                    "seeds": f"{len(finals[a])}/{len(finals[b])}",
                }
            )
    return out


def plot_groups(
    groups: Mapping[str, list[Path]],
    panels: Mapping[str, Sequence[tuple[str, str]]],
    path: Path,
    metric: str = "episodic_return",
    title: str = "",
) -> Path | None:
    """One panel per key; each panel draws ``(group, label)`` as mean +- std over seeds."""
    panels = {p: [(g, lab) for g, lab in v if g in groups] for p, v in panels.items()}
    panels = {p: v for p, v in panels.items() if v}
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.8 * len(panels), 3.8), squeeze=False)
    style = styles()  # by label: a series keeps its colour in every panel, no two share one
    for ax, (p, lines) in zip(axes[0], panels.items()):
        for g, lab in lines:
            curves = [c for c in (load_curve(r, metric) for r in groups[g]) if len(c[0])]
            if not curves:
                continue
            draw_mean_band(ax, curves, lab, **style(lab, key=g))
        ax.set_title(p)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        legend_outside(ax)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def tiny_runs(
    root: Path,
    steps: int,
    seeds: Sequence[int],
    meta_grads: Sequence[str],
    env: str = "Hopper-v5",
    num_steps: int = 1024,
    progress: bool = True,
) -> None:
    """Small runs of each estimator (and PPO/LIRPG for Figure 4) into ``root``; skips done ones."""
    from metagrad_rl.trainers import ppo as ppo_trainer

    jobs: list[tuple[str, Any, Any]] = []
    common = dict(env=env, total_steps=steps, num_steps=num_steps, checkpoint_every=0)
    for seed in seeds:
        for mg in meta_grads:
            cfg = CLNConfig(meta_grad=mg, seed=seed, **common)
            jobs.append((f"cln-{mg}-{env}-s{seed}", bilevel.train, cfg))
        jobs.append((f"lirpg-{env}-s{seed}", bilevel.train, LIRPGConfig(seed=seed, **common)))
        jobs.append(
            (f"ppo-{env}-s{seed}", ppo_trainer.train, ppo_trainer.PPOConfig(seed=seed, **common))
        )
    for name, train, cfg in tqdm(jobs, desc="learning: tiny runs", disable=not progress):
        d = root / name
        if (d / SUMMARY_FILE).is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        clear_run_dir(d)
        train(cfg, d)


def runs_in_progress(root: Path, within_s: float = 300.0) -> bool:
    now = time.time()
    return any(now - p.stat().st_mtime < within_s for p in root.glob(f"*/{CHECKPOINT_FILE}"))


def run_learning(
    out: Path,
    runs_root: Path,
    *,
    full: bool,
    budget: Budget,
    progress: bool = True,
) -> dict[str, Any]:
    """Plots and the final-return table from ``runs_root`` (or tiny runs in ``out``)."""
    note = ""
    if full:
        if runs_in_progress(runs_root):
            note = f"{runs_root} is being written by another job: plotting what exists"
        else:
            subprocess.run(["bash", str(BENCHMARKS / "learning_runs.sh")], check=False)
    groups = run_groups([runs_root])
    source = str(runs_root)
    if not groups:
        tiny = out / "learning_runs"
        tiny_runs(
            tiny, budget.learn_steps, budget.learn_seeds, budget.learn_meta_grads, progress=progress
        )
        groups = run_groups([tiny])
        source = str(tiny)
        note = (
            f"no runs in {runs_root}: tiny runs ({budget.learn_steps} steps, num_steps 1024, "
            f"seeds {list(budget.learn_seeds)}) in {tiny}"
        )
    figs = {}
    fig5 = {"Hopper-v5 (CLN policy)": [(f"cln-{m}-Hopper-v5", m) for m in FIG5_ESTIMATORS]}
    figs["fig5"] = plot_groups(
        groups, fig5, out / "fig5_estimators_hopper.png", title="Figure 5: meta-gradient estimators"
    )
    fig4 = {
        e: [(f"ppo-{e}", "ppo"), (f"lirpg-{e}", "lirpg"), (f"cln-eq17-{e}", "cln (eq17)")]
        for e in FIG4_ENVS
    }
    figs["fig4"] = plot_groups(
        groups, fig4, out / "fig4_ppo_lirpg_cln.png", title="Figure 4: PPO vs LIRPG vs CLN"
    )
    fig6 = {
        "intrinsic reward (CLN and LIRPG)": [
            (g, g) for g in sorted(groups) if g.startswith(("cln-", "lirpg-"))
        ]
    }
    figs["fig6"] = plot_groups(
        groups,
        fig6,
        out / "fig6_intrinsic_reward.png",
        metric="intrinsic_reward_mean",
        title="Figure 6",
    )
    rows = learning_table(groups)
    return {
        "rows": rows,
        "pairs": bootstrap_differences(rows),
        "source": source,
        "note": note,
        "plots": {k: str(v) for k, v in figs.items() if v},
    }


FINAL_RETURN_HEADER = "final return: last 20 training episodes (mean ± std over seeds)"
CURVE_END_HEADER = "curve end: last iteration's episodes (mean over seeds)"
FINAL_RETURN_NOTE = (
    "Final return: the mean raw return of each run's last 20 finished training episodes "
    "(summary.json; a run not yet finished: the mean of its last 5 logged iterations), which "
    "reach back over earlier iterations when fewer than 20 episodes finish per iteration. "
    "Curve end: the plotted curve's last point, progress.csv's episodic_return of the last "
    "iteration, the mean of only the episodes that finished in it. On a rising curve the "
    "final return is the lower of the two."
)


def learning_tables(res: Mapping[str, Any]) -> str:
    body = [
        [
            r["group"],
            f"{r['finished']}/{r['seeds']}",
            r["steps"],
            "–"
            if r["final_mean"] is None
            else f"{r['final_mean']:.0f} ± {0.0 if r['final_std'] is None else r['final_std']:.0f}",
            ", ".join(f"{v:.0f}" for v in r["per_seed"]),
            "–" if r.get("curve_end_mean") is None else f"{r['curve_end_mean']:.0f}",
        ]
        for r in res["rows"]
    ]
    head = f"Runs from {res['source']}" + (f" ({res['note']})" if res["note"] else "")
    pairs = [
        [
            p["a"],
            p["b"],
            p["seeds"],
            f"{p['diff']:.0f}",
            f"[{p['ci_low']:.0f}, {p['ci_high']:.0f}]",
            "yes" if p["separated"] else "no",
        ]
        for p in res.get("pairs", [])
    ]
    pair_table = (
        "\n\nFigure 5, every pair: difference of mean final returns with a 95% bootstrap "
        "interval (seeds resampled within each group; separated = the interval excludes 0):\n"
        + markdown(pairs, ["a", "b", "seeds", "a - b", "95% interval", "separated"])
        if pairs
        else ""
    )
    return (
        head
        + ":\n"
        + markdown(
            body,
            [
                "group",
                "finished/seeds",
                "steps (min)",
                FINAL_RETURN_HEADER,
                "per seed",
                CURVE_END_HEADER,
            ],
        )
        + "\n\n"
        + FINAL_RETURN_NOTE
        + pair_table
    )
