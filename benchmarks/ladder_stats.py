"""Issue 15's statistics: the Hopper-v5 ablation ladder and Figure 4 on Walker2d-v5 at 1M steps.

Reads run directories named ``<rung>-<env>-s<seed>`` (as ``learning_runs.sh`` writes them with
``RUN_GROUPS="ladder walker"``), and for every task and rung reports, with ``rliable``
(Agarwal et al., NeurIPS 2021; the optional ``science`` extra):

- the final return, two ways: the mean of the last 20 training episodes (``summary.json``) and
  a deterministic evaluation of the final policy (mean action, 10 episodes on env seeds
  10000..10009, cached in each run directory as ``eval_deterministic.json``);
- per rung the mean and the interquartile mean (IQM) with 95% stratified-bootstrap intervals;
- the probability of improvement of each rung over PPO and over the rung below it, with its
  interval, and a verdict: ``better``/``worse`` when the interval excludes 0.5, else
  ``not separated`` with the seeds per arm a two-sided 5% test at 80% power would need for the
  measured difference of means and spread;
- learning curves: the IQM over seeds of the training return (binned every 50k steps) with
  95% bootstrap bands.

Also per run: how its training ended (episode length, whether it stopped on a NaN meta-gradient
before that was fixed, how many meta-steps were skipped as non-finite).

    .venv/bin/python benchmarks/ladder_stats.py --runs ../runs/issue15 --out docs

writes ``docs/data/ladder_runs.csv``, ``docs/data/ladder_stats.json`` (``ladder_stats.csv``: the
aggregates), ``docs/data/ladder_curves.csv`` and ``docs/img/ladder_final.png``,
``docs/img/ladder_curves.png``. Unfinished runs are listed but not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from termbench.common import write_rows
from termbench.plots import pyplot, save_png

from metagrad_rl.checkpoint import atomic_write_json
from metagrad_rl.errors import ConfigError
from metagrad_rl.rundir import read_csv

#: The rungs per task, in ladder order (each changes one thing from the one before it).
RUNGS: dict[str, tuple[str, ...]] = {
    "Hopper-v5": ("ppo", "cln-rin0", "cln-frozen", "cln-eq17", "lirpg"),
    "Walker2d-v5": ("ppo", "cln-frozen", "cln-eq17"),
    "HalfCheetah-v5": ("ppo", "cln-frozen", "cln-eq17"),
}
#: Issue 15's follow-up: the intrinsic reward's weight (0.1 is the default, the cln-eq17 rung;
#: 0 is cln-rin0), CLN eq17 on seeds 1-3; each compared with PPO and the larger weight before it.
SWEEP = ("ppo", "cln-eq17", "cln-eq17-rin0.03", "cln-eq17-rin0.01", "cln-rin0")
SWEEP_SEEDS = (1, 2, 3)
#: Where the architecture's cost comes from: PPO, PPO with a plain LayerNorm on its last hidden
#: layer (what CLN conditions; PPO's trainer), CLN with r_in off and eta frozen (the bilevel
#: trainer, a fixed condition), CLN with r_in off (the condition moved by eq17), seeds 1-3.
ARCH = ("ppo", "ppo-ln", "cln-rin0-frozen", "cln-rin0")
#: The reports: (title, env, rungs, seeds or None for all).
GROUPS: tuple[tuple[str, str, tuple[str, ...], tuple[int, ...] | None], ...] = (
    *((env, env, rungs, None) for env, rungs in RUNGS.items()),
    ("Hopper-v5, r_in_coef sweep (seeds 1-3)", "Hopper-v5", SWEEP, SWEEP_SEEDS),
    ("Hopper-v5, the architecture (seeds 1-3)", "Hopper-v5", ARCH, SWEEP_SEEDS),
)
LABELS = {
    "ppo": "PPO",
    "ppo-ln": "PPO + LayerNorm",
    "cln-rin0-frozen": "CLN, r_in off, eta frozen",
    "cln-rin0": "CLN, r_in off",
    "cln-frozen": "CLN, fixed random r_in",
    "cln-eq17": "CLN, learned r_in (eq17)",
    "lirpg": "LIRPG",
    "cln-eq17-rin0.03": "CLN eq17, r_in_coef 0.03",
    "cln-eq17-rin0.01": "CLN eq17, r_in_coef 0.01",
}
COLOURS = {"ppo": "C0", "cln-rin0": "C2", "cln-frozen": "C4", "cln-eq17": "C3", "lirpg": "C1"}
COLOURS.update({"cln-eq17-rin0.03": "C5", "cln-eq17-rin0.01": "C6"})
COLOURS.update({"ppo-ln": "C7", "cln-rin0-frozen": "C8"})
METRICS = {
    "train20": "mean of the last 20 training episodes",
    "eval10": "deterministic, 10 episodes",
}
EVAL_FILE = "eval_deterministic.json"
EVAL_SEED = 10_000
_NAME = re.compile(r"^(?P<rung>.+)-(?P<env>[A-Za-z0-9]+-v\d+)-s(?P<seed>\d+)$")


# ------------------------------------------------------------------ statistics (rliable)
def _rliable() -> tuple[Any, Any]:
    import warnings

    # rliable 1.2 hands arch a RandomState, which arch 7 warns about (the draws are the same)
    warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)
    try:
        from rliable import library as rly
        from rliable import metrics
    except ImportError as err:  # pragma: no cover - the science extra is installed by setup
        raise ConfigError(
            f"ladder_stats needs rliable ({err}): pip install -e '.[science]'"
        ) from err
    return rly, metrics


def aggregates(
    scores: Mapping[str, np.ndarray], reps: int = 50_000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Mean and IQM of each rung's scores (one task: shape ``[runs]``) with 95%
    stratified-bootstrap intervals (rliable's percentile method)."""
    rly, metrics = _rliable()
    score_dict = {k: np.asarray(v, dtype=np.float64).reshape(-1, 1) for k, v in scores.items()}

    def func(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_mean(x), metrics.aggregate_iqm(x)])

    point, ci = rly.get_interval_estimates(
        score_dict, func, reps=reps, random_state=np.random.RandomState(seed)
    )
    out = {}
    for k in score_dict:
        out[k] = {
            "n": int(score_dict[k].shape[0]),
            "mean": float(point[k][0]),
            "mean_ci": [float(ci[k][0, 0]), float(ci[k][1, 0])],
            "iqm": float(point[k][1]),
            "iqm_ci": [float(ci[k][0, 1]), float(ci[k][1, 1])],
            "std": float(np.std(score_dict[k], ddof=1)) if score_dict[k].shape[0] > 1 else math.nan,
        }
    return out


def improvement(x: np.ndarray, y: np.ndarray, reps: int = 50_000, seed: int = 0) -> dict[str, Any]:
    """``P(X > Y)`` (ties count one half) with its 95% bootstrap interval, a verdict, and the
    seeds per arm that would separate the measured difference of means (two-sided 5%, 80%)."""
    rly, metrics = _rliable()
    x, y = (np.asarray(a, dtype=np.float64).reshape(-1, 1) for a in (x, y))
    point, ci = rly.get_interval_estimates(
        {"p": (x, y)},
        metrics.probability_of_improvement,
        reps=reps,
        random_state=np.random.RandomState(seed),
    )
    lo, hi = float(np.ravel(ci["p"])[0]), float(np.ravel(ci["p"])[1])
    verdict = "better" if lo > 0.5 else "worse" if hi < 0.5 else "not separated"
    diff = float(x.mean() - y.mean())
    pooled = (
        math.sqrt((np.var(x, ddof=1) + np.var(y, ddof=1)) / 2)
        if min(len(x), len(y)) > 1
        else math.nan
    )
    # normal approximation: n = 2 (z_0.975 + z_0.8)^2 (sigma / delta)^2 per arm
    n_needed = (
        math.ceil(2 * (1.959964 + 0.841621) ** 2 * (pooled / diff) ** 2) if diff else math.inf
    )
    return {
        "p_improvement": float(np.ravel(point["p"])[0]),
        "ci": [lo, hi],
        "verdict": verdict,
        "mean_difference": diff,
        "pooled_std": pooled,
        "seeds_per_arm_to_separate": n_needed,
    }


def curve_bands(
    curves: Mapping[str, np.ndarray], reps: int = 2_000, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """IQM over runs at each point of ``[runs, points]`` curves with 95% bootstrap bands."""
    rly, metrics = _rliable()

    def func(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(x[:, [j]]) for j in range(x.shape[1])])

    point, ci = rly.get_interval_estimates(
        dict(curves), func, reps=reps, random_state=np.random.RandomState(seed)
    )
    return {k: (point[k], ci[k]) for k in curves}


# ------------------------------------------------------------------ runs
def find_runs(root: Path) -> list[dict[str, Any]]:
    """Every ``<rung>-<env>-s<seed>`` directory under ``root`` with how it stands."""
    if not root.is_dir():
        raise ConfigError(f"--runs {str(root)!r} is not a directory: expected issue 15's run root")
    runs = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _NAME.match(d.name)
        known = {
            g for _, env, rungs, _ in GROUPS if m is not None and env == m["env"] for g in rungs
        }
        if m is None or m["rung"] not in known:
            continue
        summary = d / "summary.json"
        info: dict[str, Any] = {
            "dir": d,
            "env": m["env"],
            "rung": m["rung"],
            "seed": int(m["seed"]),
        }
        info["finished"] = summary.is_file()
        info.update(_progress_facts(d))
        info["stopped_on_nan_before_fix"] = (root / f"{d.name}.diverged.log").is_file()
        info.update(_reward_mix(d))
        if info["finished"]:
            s = json.loads(summary.read_text())
            info["train20"] = float(s["mean_return_last_20_episodes"])
            info["wall_time_s"] = float(s.get("wall_time_s", math.nan))
            # the log's column misses it in runs resumed from before it existed
            info["meta_steps_skipped"] = int(
                s.get("meta_steps_skipped", info["meta_steps_skipped"])
            )
        runs.append(info)
    return runs


def _progress_facts(d: Path) -> dict[str, Any]:
    p = d / "progress.csv"
    if not p.is_file():
        return {"last_step": 0}
    rows = read_csv(p)
    if not rows:
        return {"last_step": 0}
    last = rows[-1]
    skipped = [r.get("meta_steps_skipped", "") for r in rows]
    skipped = [int(float(s)) for s in skipped if s not in ("", None)]
    lengths = [float(r["episodic_length"]) for r in rows[-20:] if r.get("episodic_length")]
    norms = [float(r["norm_applied"]) for r in rows if r.get("norm_applied") not in ("", None)]
    return {
        "last_step": int(float(last["global_step"])),
        "final_episode_length": float(np.mean(lengths)) if lengths else math.nan,
        "final_entropy": float(last["entropy"]) if last.get("entropy") else math.nan,
        "meta_steps_skipped": max(skipped) if skipped else 0,
        "max_meta_grad_norm": float(np.nanmax(norms)) if norms else math.nan,
    }


def _reward_mix(d: Path) -> dict[str, Any]:
    """How large the intrinsic reward is next to the extrinsic one *as the policy sees them*:
    ``r_ex`` is divided by the reward scaler's return std, ``r_in`` (tanh-bounded) is not.

    ``ex_per_step``: the scaled extrinsic reward per step (raw return / episode length over
    the last 20 iterations, times the final scale); ``in_std_per_step``: ``r_in_coef`` times
    the batch std of ``r_in`` over the same iterations (0 for PPO and ``r_in_coef = 0``).
    """
    import torch

    cfg = json.loads((d / "config.json").read_text())["config"]
    ckpt = d / "checkpoint.pt"
    if not ckpt.is_file() or not cfg.get("normalize_reward", True):
        return {}
    rs = torch.load(ckpt, map_location="cpu", weights_only=False)["collector"]["rew_scaler"]
    scale = 1.0 / math.sqrt(float(rs["rms"]["var"]) + 1e-8)
    rows = [r for r in read_csv(d / "progress.csv") if r.get("episodic_length")][-20:]
    if not rows:
        return {"reward_scale": scale}
    raw = np.mean([float(r["episodic_return"]) / float(r["episodic_length"]) for r in rows])
    coef = float(cfg.get("r_in_coef", 0.0)) if "r_in_coef" in cfg else 0.0
    stds = [float(r["intrinsic_reward_std"]) for r in rows if r.get("intrinsic_reward_std")]
    return {
        "reward_scale": scale,
        "ex_per_step": float(raw * scale),
        "in_std_per_step": coef * float(np.mean(stds)) if stds else 0.0,
    }


def deterministic_eval(run: dict[str, Any], episodes: int) -> list[float]:
    """The final policy's returns with its mean action, cached beside the checkpoint."""
    from metagrad_rl.evaluate import evaluate_checkpoint

    cache = run["dir"] / EVAL_FILE
    if cache.is_file():
        c = json.loads(cache.read_text())
        if c.get("global_step") == run["last_step"] and c.get("episodes") == episodes:
            return [float(r) for r in c["returns"]]
    returns = evaluate_checkpoint(run["dir"] / "checkpoint.pt", episodes, EVAL_SEED, True)
    atomic_write_json(
        cache,
        {
            "global_step": run["last_step"],
            "episodes": episodes,
            "seed": EVAL_SEED,
            "returns": returns,
        },
    )
    return returns


def binned_curve(d: Path, edges: np.ndarray) -> np.ndarray:
    """Mean training return of the iterations whose step falls in each ``(lo, hi]`` bin."""
    from metagrad_rl.plotting import load_curve

    steps, vals = load_curve(d)
    out = np.full(len(edges) - 1, np.nan)
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = (steps > lo) & (steps <= hi)
        if sel.any():
            out[i] = vals[sel].mean()
    return out


# ------------------------------------------------------------------ report
def finished_runs(
    runs: Sequence[dict[str, Any]],
    env: str,
    rungs: Sequence[str],
    seeds: Sequence[int] | None,
) -> list[dict[str, Any]]:
    """The finished runs of ``rungs`` on ``env`` (of ``seeds`` only, when given)."""
    return [
        r
        for r in runs
        if r["env"] == env
        and r["rung"] in rungs
        and r["finished"]
        and (seeds is None or r["seed"] in seeds)
    ]


def analyse(runs: Sequence[dict[str, Any]], reps: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for title, env, rungs, seeds in GROUPS:
        done = finished_runs(runs, env, rungs, seeds)
        if not any(r["rung"] not in ("ppo", "cln-eq17", "cln-rin0") for r in done) and seeds:
            continue  # a sweep with none of its own runs yet
        task: dict[str, Any] = {"metrics": {}, "comparisons": {}}
        for metric in METRICS:
            scores = {
                g: np.array([r[metric] for r in done if r["rung"] == g])
                for g in rungs
                if any(r["rung"] == g for r in done)
            }
            task["metrics"][metric] = aggregates(scores, reps)
            comps = {}
            present = [g for g in rungs if g in scores]
            for i, g in enumerate(present[1:], start=1):
                pairs = {"ppo"} if g != "ppo" else set()
                pairs.add(present[i - 1])
                for base in sorted(pairs):
                    if base in scores and len(scores[g]) > 1 and len(scores[base]) > 1:
                        comps[f"{g} > {base}"] = improvement(scores[g], scores[base], reps)
            task["comparisons"][metric] = comps
        if done:
            report[title] = task
    return report


def print_report(report: Mapping[str, Any]) -> None:
    for env, task in report.items():
        for metric, aggs in task["metrics"].items():
            print(f"\n{env}: final return, {METRICS[metric]}")
            print("| rung | n | mean [95% CI] | IQM [95% CI] |")
            print("|---|---|---|---|")
            for g, a in aggs.items():
                m, mc, q, qc = a["mean"], a["mean_ci"], a["iqm"], a["iqm_ci"]
                print(
                    f"| {LABELS[g]} | {a['n']} | {m:.0f} [{mc[0]:.0f}, {mc[1]:.0f}] "
                    f"| {q:.0f} [{qc[0]:.0f}, {qc[1]:.0f}] |"
                )
            print("| comparison | P(X > Y) [95% CI] | verdict | seeds per arm to separate |")
            print("|---|---|---|---|")
            for name, c in task["comparisons"][metric].items():
                n = c["seeds_per_arm_to_separate"]
                print(
                    f"| {name} | {c['p_improvement']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}] "
                    f"| {c['verdict']} | {n if c['verdict'] == 'not separated' else '–'} |"
                )


def plot_final(report: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    envs = list(report)
    fig, axes = plt.subplots(len(METRICS), len(envs), figsize=(5.5 * len(envs), 6), squeeze=False)
    for j, env in enumerate(envs):
        for i, metric in enumerate(METRICS):
            ax, aggs = axes[i, j], report[env]["metrics"][metric]
            for y, (g, a) in enumerate(aggs.items()):
                lo, hi = a["iqm_ci"]
                ax.plot([lo, hi], [y, y], color=COLOURS[g], lw=6, alpha=0.5, solid_capstyle="butt")
                ax.plot([a["iqm"]], [y], "|", color="k", ms=14)
                ax.plot([a["mean"]], [y], "o", color=COLOURS[g], mec="k", ms=6)
            ax.set_yticks(range(len(aggs)), [LABELS[g] for g in aggs])
            ax.set_xlabel("return")
            ax.set_title(f"{env}\n{METRICS[metric]}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle("final return at 1M steps: IQM (bar: 95% CI, |: IQM, o: mean)", fontsize=10)
    save_png(fig, path)


def plot_curves(bands: Mapping[str, Any], edges: np.ndarray, path: Path) -> None:
    plt = pyplot()
    x = edges[1:] / 1e6
    fig, axes = plt.subplots(1, len(bands), figsize=(6 * len(bands), 4), squeeze=False)
    for ax, (env, per) in zip(axes[0], bands.items()):
        for g, (point, ci, n) in per.items():
            ax.plot(x, point, color=COLOURS[g], label=f"{LABELS[g]} (n={n})")
            ax.fill_between(x, ci[0], ci[1], color=COLOURS[g], alpha=0.2)
        ax.set_xlabel("environment steps (millions)")
        ax.set_ylabel("training return (IQM over seeds)")
        ax.set_title(env)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    save_png(fig, path)


RUN_COLUMNS = (
    "env", "rung", "seed", "finished", "last_step", "train20", "eval10", "eval10_std",
    "final_episode_length", "final_entropy", "stopped_on_nan_before_fix",
    "meta_steps_skipped", "max_meta_grad_norm", "reward_scale", "ex_per_step",
    "in_std_per_step", "wall_time_s",
)  # fmt: skip


def load_runs(root: Path, episodes: int) -> list[dict[str, Any]]:
    """The runs under ``root``, the finished ones with their deterministic evaluation."""
    runs = find_runs(root)
    if not runs:
        raise ConfigError(f"no <rung>-<env>-s<seed> runs under {str(root)!r}")
    if not any(r["finished"] for r in runs):
        raise ConfigError(f"no run under {str(root)!r} has finished (no summary.json)")
    for r in runs:
        if r["finished"]:
            ev = deterministic_eval(r, episodes)
            r["eval10"], r["eval10_std"] = float(np.mean(ev)), float(np.std(ev))
    return runs


def learning_curves(
    runs: Sequence[dict[str, Any]], report: Mapping[str, Any], edges: np.ndarray, reps: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per report group and rung (two finished seeds or more): the IQM curve with its bands,
    and the same as CSV rows."""
    bands: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for title, env, rungs, seeds in GROUPS:
        if title not in report:
            continue
        per = {}
        for g in rungs:
            done = finished_runs(runs, env, (g,), seeds)
            if len(done) < 2:
                continue
            c = np.stack([binned_curve(r["dir"], edges) for r in done])
            c = np.where(np.isnan(c), np.nanmean(c, axis=0, keepdims=True), c)
            point, ci = curve_bands({g: c}, reps=reps)[g]
            per[g] = (point, ci, len(done))
            rows += [
                {"group": title, "rung": g, "step": int(edges[i + 1]), "iqm": point[i],
                 "ci_low": ci[0, i], "ci_high": ci[1, i], "n": len(done)}
                for i in range(len(point))
            ]  # fmt: skip
        if per:
            bands[title] = per
    return bands, rows


def write_outputs(
    runs: Sequence[dict[str, Any]], report: Mapping[str, Any], out: Path, bin_steps: int, reps: int
) -> None:
    data, img = out / "data", out / "img"
    write_rows(data, "ladder_runs", [{k: r.get(k, "") for k in RUN_COLUMNS} for r in runs])
    flat = [
        {"group": title, "metric": m, "rung": g, **a}
        for title, t in report.items()
        for m, aggs in t["metrics"].items()
        for g, a in aggs.items()
    ]
    write_rows(data, "ladder_stats", flat, {"report": report, "metrics": METRICS})
    end = max(r["last_step"] for r in runs if r["finished"])
    edges = np.append(np.arange(0, end, bin_steps, dtype=np.float64), float(end))
    bands, curve_rows = learning_curves(runs, report, edges, min(reps, 2_000))
    write_rows(data, "ladder_curves", curve_rows)
    img.mkdir(parents=True, exist_ok=True)
    plot_final(report, img / "ladder_final.png")
    plot_curves(bands, edges, img / "ladder_curves.png")
    print(
        f"\nwrote {data}/ladder_runs.csv, ladder_stats.csv/json, ladder_curves.csv; "
        f"{img}/ladder_final.png, ladder_curves.png"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, required=True, help="the run root (e.g. ../runs/issue15)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/ladder"), help="writes data/, img/")
    ap.add_argument("--eval-episodes", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50_000, help="bootstrap resamples")
    ap.add_argument("--bin", type=int, default=50_000, help="learning-curve bin (steps)")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.runs, args.eval_episodes)
        report = analyse(runs, args.reps)
    except ConfigError as err:
        print(f"ladder_stats: error: {err}", file=sys.stderr)
        return 2
    print_report(report)
    write_outputs(runs, report, args.out, args.bin, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
