"""Running moments (mean, population variance, count) of data streams, and their exact merge.

What the observation and reward normalisers of ``N`` workers are combined with
(:func:`metagrad_rl.distributed.combine_running_stats`, and the rollout learner's merge in
:mod:`metagrad_rl.trainers.rollout_workers`): plain numpy, no communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from metagrad_rl.errors import ConfigError


class Moments(NamedTuple):
    """Mean, population variance and count of a stream (``RunningMeanStd``'s state)."""

    mean: np.ndarray
    var: np.ndarray
    n: float


def moments_of(rms: Any) -> Moments:
    """A copy of a :class:`~metagrad_rl.envs.RunningMeanStd`'s statistics."""
    return Moments(
        np.array(rms.mean, dtype=np.float64), np.array(rms.var, dtype=np.float64), float(rms.count)
    )


def merge_moments(parts: Sequence[Moments]) -> Moments:
    r"""The moments of the union of disjoint streams (Chan, Golub and LeVeque's parallel merge).

    .. math:: n = \sum_i n_i,\quad \mu = \frac{1}{n}\sum_i n_i \mu_i,\quad
              \sigma^2 = \frac{1}{n}\sum_i n_i\big(\sigma_i^2 + (\mu_i - \mu)^2\big)

    Parts with count 0 contribute nothing.
    """
    n = float(sum(p.n for p in parts))
    if n <= 0:
        raise ConfigError("merge_moments needs a positive total count")
    mean = sum(p.n * np.asarray(p.mean) for p in parts) / n
    m2 = sum(p.n * (np.asarray(p.var) + (np.asarray(p.mean) - mean) ** 2) for p in parts)
    return Moments(np.asarray(mean, dtype=np.float64), np.asarray(m2 / n, dtype=np.float64), n)


def new_since(now: Moments, since: Moments) -> Moments:
    """The moments of what was added to ``since`` to give ``now`` (the merge, undone)."""
    n_new = now.n - since.n
    if n_new <= 0:
        return Moments(np.zeros_like(now.mean), np.zeros_like(now.var), 0.0)
    mean = (now.n * now.mean - since.n * since.mean) / n_new
    m2 = (
        now.n * now.var - since.n * since.var - (mean - since.mean) ** 2 * (since.n * n_new / now.n)
    )
    return Moments(mean, np.maximum(m2 / n_new, 0.0), n_new)
