"""Learning curves from run directories: ``metagrad-rl plot DIR... --out curves.png``.

Runs are grouped by ``(algo, env)`` from their ``config.json``; each group is drawn as the mean
over its runs (seeds) with a shaded band of +-1 standard deviation (a group of one run has no
band). Curves are interpolated onto a common step grid and cut at the shortest run of the
group. One subplot per env.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from metagrad_rl.checkpoint import atomic_write_bytes, read_csv
from metagrad_rl.errors import ConfigError
from metagrad_rl.logging import PROGRESS_FILE, check_writable_dir, read_run_config


def load_curve(run_dir: str | Path, metric: str = "episodic_return") -> tuple[np.ndarray, ...]:
    """``(steps, values)`` of one run, skipping iterations where ``metric`` is empty."""
    p = Path(run_dir) / PROGRESS_FILE
    if not p.is_file():
        raise ConfigError(f"run directory {str(run_dir)!r} has no {PROGRESS_FILE}")
    rows = read_csv(p)
    if rows and metric not in rows[0]:
        raise ConfigError(
            f"metric {metric!r} is not logged in {str(p)!r}: expected one of {sorted(rows[0])}"
        )
    pts = [(float(r["global_step"]), float(r[metric])) for r in rows if r.get(metric, "") != ""]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = (np.array(x) for x in zip(*pts))
    return steps, vals


def group_curves(
    run_dirs: list[str], metric: str = "episodic_return"
) -> dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]]:
    """``{(algo, env): [(steps, values), ...]}`` over the given run directories."""
    groups: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for d in run_dirs:
        cfg = read_run_config(d)
        steps, vals = load_curve(d, metric)
        if len(steps):
            groups[(cfg["algo"], cfg["config"].get("env", "?"))].append((steps, vals))
    return dict(groups)


def mean_and_spread(
    curves: list[tuple[np.ndarray, np.ndarray]], points: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard deviation on a common grid up to the shortest curve's last step."""
    end = min(s[-1] for s, _ in curves)
    start = max(s[0] for s, _ in curves)
    grid = np.linspace(start, end, points) if end > start else np.array([end])
    ys = np.stack([np.interp(grid, s, v) for s, v in curves])
    return grid, ys.mean(axis=0), ys.std(axis=0)


def draw_mean_band(
    ax: Any, curves: list[tuple[np.ndarray, np.ndarray]], label: str, color: Any = None
) -> None:
    """One line: the mean over ``curves`` with a +-1 std band (no band for a single curve).

    The one mean +- std drawing of the project (``metagrad-rl plot`` and the benchmarks).
    """
    grid, mean, std = mean_and_spread(curves)
    (line,) = ax.plot(grid, mean, label=f"{label} (n={len(curves)})", color=color)
    if len(curves) > 1:
        ax.fill_between(grid, mean - std, mean + std, alpha=0.2, color=line.get_color())


def plot_runs(
    run_dirs: list[str], out: str | Path, metric: str = "episodic_return", title: str = ""
) -> Path:
    """Draws the grouped learning curves to ``out`` (PNG, written atomically)."""
    out = Path(out)
    check_writable_dir(out.parent if str(out.parent) else ".")
    groups = group_curves(run_dirs, metric)
    if not groups:
        raise ConfigError(f"no logged {metric!r} values in {run_dirs}: nothing to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({env for _, env in groups})
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for (algo, e), curves in sorted(groups.items()):
            if e != env:
                continue
            draw_mean_band(ax, curves, algo)
        ax.set_title(env)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
