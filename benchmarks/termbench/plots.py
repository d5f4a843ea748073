"""Shared plotting of the benchmarks: the figure writer, a preferred colour per estimator and
distinct styles per figure (:class:`metagrad_rl.plotting.SeriesStyles`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metagrad_rl.checkpoint import atomic_write_bytes
from metagrad_rl.plotting import SeriesStyles, figure_bytes, legend_outside, pyplot
from metagrad_rl.pytree import TERMS
from metagrad_rl.trainers.meta_grads import META_GRADS

__all__ = ["SeriesStyles", "colour", "legend_outside", "pyplot", "save_png", "styles"]


def save_png(fig: Any, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, atomically (constrained layout: room for the legends
    beside the axes, no layout warning), then closed."""
    atomic_write_bytes(path, figure_bytes(fig, "png", dpi=100))
    return path


#: Names drawn in the benchmark's figures besides the registered estimators.
OTHER_NAMES = (*TERMS, "total", "ppo", "lirpg-lookahead")
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


def styles() -> SeriesStyles:
    """A figure's series styles: each estimator's :func:`colour` where no other series of the
    figure has it, else another, so that distinct series never share a colour and line style."""
    return SeriesStyles(colour)
