"""Learning curves from run directories: ``metagrad-rl plot DIR... --out curves.png``.

Runs are grouped by every ``config.json`` field whose value differs between them (the seed and
bookkeeping fields aside: :data:`IGNORED_FIELDS`), so that runs of different estimators or
hyperparameters are never averaged as if they were seeds; the legend names the differing
fields (``algo=cln, meta_grad=exact``). Each group is drawn as the mean over its runs with a
shaded band of +-1 standard deviation (a group of one run has no band), interpolated onto a
common step grid up to the shortest run of the group. One subplot per env. What is left out is
reported: a run without values of the metric, and a curve cut to a shorter run of its group.
The ``--out`` extension picks the format (png, pdf or svg).
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from metagrad_rl.checkpoint import atomic_write_bytes
from metagrad_rl.errors import ConfigError
from metagrad_rl.rundir import PROGRESS_FILE, check_writable_dir, read_csv, read_run_config


def load_curve(
    run_dir: str | Path, metric: str = "episodic_return", missing_ok: bool = False
) -> tuple[np.ndarray, ...]:
    """``(steps, values)`` of one run, skipping iterations where ``metric`` is empty.

    A run that does not log ``metric`` at all is an error, or empty with ``missing_ok``.
    """
    p = Path(run_dir) / PROGRESS_FILE
    if not p.is_file():
        raise ConfigError(f"run directory {str(run_dir)!r} has no {PROGRESS_FILE}")
    rows = read_csv(p)
    if rows and metric not in rows[0] and missing_ok:
        return np.zeros(0), np.zeros(0)
    if rows and metric not in rows[0]:
        raise ConfigError(
            f"metric {metric!r} is not logged in {str(p)!r}: expected one of {sorted(rows[0])}"
        )
    pts = [(float(r["global_step"]), float(r[metric])) for r in rows if r.get(metric, "") != ""]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = (np.array(x) for x in zip(*pts))
    return steps, vals


#: Config fields that do not tell runs apart in a plot.
IGNORED_FIELDS = ("seed", "checkpoint_every", "torch_threads", "device", "tensorboard")
FORMATS = ("png", "pdf", "svg")

Curve = tuple[np.ndarray, np.ndarray]


def run_settings(run_dirs: list[str]) -> dict[str, dict[str, Any]]:
    """``{run: {field: value}}`` from each ``config.json`` (``algo`` included)."""
    out = {}
    for d in run_dirs:
        cfg = read_run_config(d)
        flat = {"algo": cfg.get("algo"), **cfg.get("config", {})}
        out[d] = {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}
    return out


def differing_fields(settings: dict[str, dict[str, Any]]) -> list[str]:
    """The fields (env and ignored ones aside) whose values are not the same in every run."""
    keys = sorted({k for s in settings.values() for k in s} - {"env", *IGNORED_FIELDS})
    return [k for k in keys if len({repr(s.get(k)) for s in settings.values()}) > 1]


def group_curves(
    run_dirs: list[str], metric: str = "episodic_return"
) -> tuple[dict[tuple[str, str], list[Curve]], list[str]]:
    """``{(env, label): [(steps, values), ...]}`` and notes on the runs that were left out.

    ``label`` names the fields that differ between the runs (``algo=cln, meta_grad=exact``);
    when none does it is the algorithm's name.
    """
    settings = run_settings(run_dirs)
    fields = differing_fields(settings)
    groups: dict[tuple[str, str], list[Curve]] = defaultdict(list)
    notes = []
    for d, s in settings.items():
        steps, vals = load_curve(d, metric, missing_ok=True)
        if not len(steps):
            notes.append(f"left out {d}: no logged {metric!r} values")
            continue
        parts = [f"{k}={s[k]}" for k in fields if s.get(k) is not None]
        label = ", ".join(parts) if parts else str(s.get("algo"))
        groups[(str(s.get("env", "?")), label)].append((steps, vals))
    return dict(groups), notes


def cut_notes(label: str, curves: list[Curve]) -> list[str]:
    """A note when a group's curves end at different steps (the band stops at the shortest)."""
    ends = [float(s[-1]) for s, _ in curves]
    if max(ends) == min(ends):
        return []
    return [
        f"cut {label!r} at step {min(ends):.0f}, the shortest of its {len(curves)} runs "
        f"(the longest reaches {max(ends):.0f})"
    ]


def check_format(out: str | Path) -> str:
    """The figure format from ``out``'s extension, or a one-line error."""
    ext = Path(out).suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise ConfigError(
            f"plot --out {str(out)!r} has the extension {ext or '(none)'!r}: expected one of "
            f"{', '.join('.' + f for f in FORMATS)}"
        )
    return ext


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
) -> tuple[Path, list[str]]:
    """Draws the grouped learning curves to ``out`` (written atomically); returns the path and
    notes on what was left out or cut."""
    out = Path(out)
    fmt = check_format(out)
    check_writable_dir(out.parent if str(out.parent) else ".")
    groups, notes = group_curves(run_dirs, metric)
    if not groups:
        raise ConfigError(f"no logged {metric!r} values in {run_dirs}: nothing to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({env for env, _ in groups})
    fig, axes = plt.subplots(1, len(envs), figsize=(7 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for (e, label), curves in sorted(groups.items()):
            if e == env:
                draw_mean_band(ax, curves, label)
                notes += cut_notes(label, curves)
        ax.set_title(env)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out, notes
