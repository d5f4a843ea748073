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

import dataclasses
import io
from collections import defaultdict
from collections.abc import Callable, Sequence
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


def _default_of(algo: Any, key: str) -> Any:
    """``key``'s default in ``algo``'s config (a sentinel when either is unknown)."""
    from metagrad_rl.trainers import ALGOS

    fields = {f.name: f.default for f in dataclasses.fields(ALGOS[algo].config_cls)}
    default = fields.get(key, _UNKNOWN) if algo in ALGOS else _UNKNOWN
    return tuple(default) if isinstance(default, list) else default


_UNKNOWN = object()


def _short(value: Any) -> str:
    return "(" + ",".join(map(str, value)) + ")" if isinstance(value, tuple) else str(value)


def run_labels(settings: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{run: label}``: the algorithm, then each setting that tells its runs apart.

    A field is named when its value differs between runs that have it (the seed and
    bookkeeping fields aside) -- and, for a field that only differs between algorithms
    (PPO's ``conditioning=none`` against CLN's ``cln``), only where it is not the
    algorithm's default, since the algorithm's name already says it. So PPO against two CLN
    estimators reads ``ppo``, ``cln, meta_grad=eq17``, ``cln, meta_grad=exact``.
    """
    keys = sorted({k for s in settings.values() for k in s} - {"env", "algo", *IGNORED_FIELDS})
    varies: dict[str, set[Any]] = {}  # field -> the algorithms among whose runs it varies
    for k in keys:
        have = [s for s in settings.values() if k in s]
        if len({repr(s[k]) for s in have}) > 1:
            algos = {s.get("algo") for s in have}
            varies[k] = {
                a for a in algos if len({repr(s[k]) for s in have if s.get("algo") == a}) > 1
            }
    out = {}
    for d, s in settings.items():
        algo = s.get("algo")
        parts = [str(algo)]
        for k, within in varies.items():
            if k in s and (algo in within or s[k] != _default_of(algo, k)):
                parts.append(f"{k}={_short(s[k])}")
        out[d] = ", ".join(parts)
    return out


def group_curves(
    run_dirs: list[str], metric: str = "episodic_return", labels: Sequence[str] | None = None
) -> tuple[dict[tuple[str, str], list[Curve]], list[str]]:
    """``{(env, label): [(steps, values), ...]}`` and notes on the runs that were left out.

    ``label`` is :func:`run_labels`' (``cln, meta_grad=exact``), or ``labels[i]`` for the
    ``i``-th run when given: runs with the same label are then averaged as seeds of one curve.
    """
    settings = run_settings(run_dirs)
    if labels:
        if len(labels) != len(run_dirs):
            raise ConfigError(
                f"--label was given {len(labels)} times for {len(run_dirs)} run directories: "
                "expected one --label per directory, in the same order"
            )
        names = dict(zip(run_dirs, labels))
    else:
        names = run_labels(settings)
    groups: dict[tuple[str, str], list[Curve]] = defaultdict(list)
    notes = []
    for d, s in settings.items():
        steps, vals = load_curve(d, metric, missing_ok=True)
        if not len(steps):
            notes.append(f"left out {d}: no logged {metric!r} values")
            continue
        groups[(str(s.get("env", "?")), names[d])].append((steps, vals))
    return dict(groups), notes


class SeriesStyles:
    """Distinct colours for the distinct series of one figure, and line styles past ten.

    ``styles(name)`` gives ``{"color", "linestyle"}`` for a series, the same every time it is
    asked for (in every panel). A series takes its preferred colour (``preferred(key)``,
    e.g. a fixed colour per estimator) unless another series of the figure already has it;
    otherwise the first colour of the palette no series has. Past the palette's ten colours
    the colours repeat with the next line style, so no two series look alike.
    """

    LINESTYLES = ("-", "--", ":", "-.")

    def __init__(self, preferred: Callable[[str], Any] | None = None) -> None:
        import matplotlib.colors as mcolors

        plt = pyplot()
        self._hex = mcolors.to_hex
        self.palette = [mcolors.to_hex(c) for c in plt.cm.tab10.colors]
        self.preferred = preferred
        self.styles: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, key: str | None = None) -> dict[str, Any]:
        if name not in self.styles:
            self.styles[name] = self._new(key if key is not None else name)
        return dict(self.styles[name])

    def color(self, name: str, key: str | None = None) -> Any:
        return self(name, key)["color"]

    def _new(self, key: str) -> dict[str, Any]:
        taken = {(s["color"], s["linestyle"]) for s in self.styles.values()}
        want = self.preferred(key) if self.preferred is not None else None
        if want is not None and (self._hex(want), "-") not in taken:
            return {"color": self._hex(want), "linestyle": "-"}
        for ls in self.LINESTYLES * 8:
            for c in self.palette:
                if (c, ls) not in taken:
                    return {"color": c, "linestyle": ls}
        return {"color": self.palette[0], "linestyle": "-"}  # pragma: no cover - 320 series


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
    ax: Any,
    curves: list[tuple[np.ndarray, np.ndarray]],
    label: str,
    color: Any = None,
    linestyle: str = "-",
) -> None:
    """One line: the mean over ``curves`` with a +-1 std band (no band for a single curve).

    The one mean +- std drawing of the project (``metagrad-rl plot`` and the benchmarks).
    """
    grid, mean, std = mean_and_spread(curves)
    (line,) = ax.plot(
        grid, mean, label=f"{label} (n={len(curves)})", color=color, linestyle=linestyle
    )
    if len(curves) > 1:
        ax.fill_between(grid, mean - std, mean + std, alpha=0.2, color=line.get_color())


def plot_runs(
    run_dirs: list[str],
    out: str | Path,
    metric: str = "episodic_return",
    title: str = "",
    labels: Sequence[str] | None = None,
) -> tuple[Path, list[str]]:
    """Draws the grouped learning curves to ``out`` (written atomically); returns the path and
    notes on what was left out or cut. ``labels``: one legend label per run (see
    :func:`group_curves`)."""
    out = Path(out)
    fmt = check_format(out)
    check_writable_dir(out.parent if str(out.parent) else ".")
    groups, notes = group_curves(run_dirs, metric, labels)
    if not groups:
        raise ConfigError(f"no logged {metric!r} values in {run_dirs}: nothing to plot")
    plt = pyplot()
    envs = sorted({env for env, _ in groups})
    fig, axes = plt.subplots(1, len(envs), figsize=(7 * len(envs), 4), squeeze=False)
    styles = SeriesStyles()
    for ax, env in zip(axes[0], envs):
        for (e, label), curves in sorted(groups.items()):
            if e == env:
                draw_mean_band(ax, curves, label, **styles(label))
                notes += cut_notes(label, curves)
        ax.set_title(env)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        legend_outside(ax)
    if title:
        fig.suptitle(title)
    atomic_write_bytes(out, figure_bytes(fig, fmt, dpi=110))
    return out, notes


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend_outside(ax: Any, fontsize: float = 8) -> None:
    """The legend to the right of the axes, off the lines (none when nothing is labelled)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def figure_bytes(fig: Any, fmt: str = "png", dpi: int = 100) -> bytes:
    """``fig`` saved as ``fmt``, laid out by matplotlib's constrained layout (which makes room
    for legends beside the axes and a suptitle, and never warns as ``tight_layout`` does);
    the figure is closed."""
    import matplotlib.pyplot as plt

    fig.set_layout_engine("constrained")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
