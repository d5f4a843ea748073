"""Shared plotting of the compare_terms benchmark: the figure writer, one colour per estimator."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from metagrad_rl.checkpoint import atomic_write_bytes
from metagrad_rl.trainers.meta_grads import META_GRADS


def save_png(fig: Any, path: Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """``fig`` as a PNG at ``path``, atomically (laid out within ``rect``, the whole figure by
    default), then closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout(rect=rect)
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Names drawn in the benchmark's figures besides the registered estimators.
OTHER_NAMES = ("eq11", "eq12", "eq13", "eq14", "total", "ppo", "lirpg-lookahead")
OTHER_NAMES += ("three-term-lookahead", "total-R1")


def colour(name: str) -> Any:
    """One fixed colour per estimator (the ``--meta-grad`` registry's order), term or algorithm.

    A label such as ``"cln (eq17)"`` or ``"cln-eq17-Hopper-v5"`` takes its estimator's colour.
    """
    plt = pyplot()
    names = list(META_GRADS) + [n for n in OTHER_NAMES if n not in META_GRADS]
    palette = list(plt.cm.tab10.colors) + list(plt.cm.Dark2.colors)
    key = next((n for n in sorted(names, key=len, reverse=True) if n == name), None)
    if key is None:  # the longest registered name inside the label
        key = next((n for n in sorted(names, key=len, reverse=True) if n in name), None)
    return None if key is None else palette[names.index(key) % len(palette)]


def legend_outside(ax: Any, fontsize: float = 8) -> None:
    """The legend to the right of the axes, off the lines (none when nothing is labelled)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
