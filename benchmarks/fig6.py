"""Figure 6 at the paper's budget: the intrinsic and extrinsic returns of long CLN runs.

The paper reports the intrinsic reward of its Hopper agent flat, with occasional oscillations,
for about 3 million steps, then rising without end even after the policy has converged. This
reads the ``progress.csv`` of such runs (``metagrad-rl train --algo cln --meta-grad eq17
--env Hopper-v5 --total-steps 3000000 --seed S``) and draws, against environment steps, each
run's extrinsic episodic return, intrinsic return per episode (the sum of ``r_in`` over an
episode) and intrinsic reward per step, smoothed over a window of iterations. It prints and
writes (``fig6.csv``; ``fig6.json`` with the bins as ``rows``) each of them averaged over
bins of steps and over runs, with its slope in every bin, so that "flat", "rising" and
"converged" are numbers.

    .venv/bin/python benchmarks/fig6.py runs/fig6-s1 runs/fig6-s2 --out bench_out/fig6
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from termbench.common import write_rows
from termbench.plots import legend_outside, pyplot, save_png, styles

from metagrad_rl.errors import ConfigError
from metagrad_rl.plotting import load_curve

METRICS = {
    "episodic_return": "extrinsic return",
    "intrinsic_return": "intrinsic return",
    "intrinsic_reward_mean": "intrinsic reward\nper step",
}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (shorter at the start)."""
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def binned(runs: dict[str, dict[str, tuple]], bin_steps: int) -> list[dict[str, Any]]:
    """Per bin of ``bin_steps`` steps: each metric's mean over runs (of each run's bin mean)
    and its slope per million steps (least squares over the bin's points of all runs)."""
    end = min(float(c["episodic_return"][0][-1]) for c in runs.values())
    rows = []
    for lo in np.arange(0.0, end, bin_steps):
        hi = lo + bin_steps
        row: dict[str, Any] = {"from_step": int(lo), "to_step": int(min(hi, end))}
        for m in METRICS:
            means, xs, ys = [], [], []
            for curves in runs.values():
                s, v = curves[m]
                sel = (s >= lo) & (s < hi)
                if sel.any():
                    means.append(float(v[sel].mean()))
                    xs.append(s[sel])
                    ys.append(v[sel])
            row[f"{m}_mean"] = float(np.mean(means)) if means else float("nan")
            x, y = (np.concatenate(xs), np.concatenate(ys)) if xs else (np.zeros(0),) * 2
            slope = np.polyfit(x / 1e6, y, 1)[0] if len(x) > 2 else float("nan")
            row[f"{m}_slope_per_1M"] = float(slope)
        rows.append(row)
    return rows


def plot(runs: dict[str, dict[str, tuple]], window: int, path: Path) -> None:
    fig, axes = pyplot().subplots(len(METRICS), 1, figsize=(9, 8.5), sharex=True)
    style = styles()  # one colour per run, the same in both panels
    for ax, (m, label) in zip(axes, METRICS.items()):
        for name, curves in runs.items():
            s, v = curves[m]
            ax.plot(s / 1e6, smooth(v, window), lw=1.0, alpha=0.8, label=name, **style(name))
        ax.set_ylabel(f"{label}\n(trailing mean of {window} iterations)")
        ax.grid(alpha=0.3)
    legend_outside(axes[0])
    axes[-1].set_xlabel("environment steps (millions)")
    fig.suptitle("Figure 6: CLN (eq17) on Hopper-v5, extrinsic and intrinsic returns")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (each with progress.csv)")
    p.add_argument("--out", default="bench_out/fig6")
    p.add_argument("--bin-steps", type=int, default=250_000, help="width of a table row")
    p.add_argument("--window", type=int, default=20, help="iterations in the plot's smoothing")
    a = p.parse_args(argv)
    if a.bin_steps <= 0 or a.window <= 0:
        p.error(f"--bin-steps {a.bin_steps} / --window {a.window}: expected > 0")
    try:
        runs = {Path(r).name: {m: load_curve(r, m) for m in METRICS} for r in a.runs}
    except ConfigError as e:
        p.error(str(e))
    empty = [n for n, c in runs.items() if any(len(c[m][0]) == 0 for m in METRICS)]
    if empty:
        p.error(f"runs {empty} have no episodes logged yet")
    rows = binned(runs, a.bin_steps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, a.window, out / "fig6.png")
    print("steps: bin; each metric: mean over runs, then its slope per million steps")
    print(f"{'steps':>19}" + "".join(f" {m[:16]:>16} {'d/1M':>8}" for m in METRICS))
    for r in rows:
        cells = "".join(f" {r[f'{m}_mean']:16.3f} {r[f'{m}_slope_per_1M']:8.2f}" for m in METRICS)
        print(f"{r['from_step']:>9}-{r['to_step']:<9}" + cells)
    last = {n: int(c["episodic_return"][0][-1]) for n, c in runs.items()}
    write_rows(out, "fig6", rows, {"args": vars(a), "last_step": last})  # rows: the bins
    print(f"wrote {out / 'fig6.png'}, fig6.csv and fig6.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
