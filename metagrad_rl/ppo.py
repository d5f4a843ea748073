"""PPO loss pieces (Schulman et al. 2017) as pure functions.

``clipped_surrogate_loss`` is Eq 23/24's clipped objective, negated so that optimizers minimise
it. The ratio's denominator is passed in as ``old_logp``: *which* graph it carries (a
stop-gradient, or one that follows ``theta_k(eta), eta`` at the meta level) is decided by the
caller; see :mod:`metagrad_rl.metagrad` and ``docs/estimators.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SurrogateStats(NamedTuple):
    """Diagnostics of one surrogate evaluation (detached)."""

    approx_kl: Tensor
    clip_fraction: Tensor


def clipped_surrogate_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, clip: float) -> Tensor:
    """``-E[min(rho A, clip(rho, 1-eps, 1+eps) A)]`` with ``rho = exp(logp - old_logp)``."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    return -torch.minimum(unclipped, clipped).mean()


def surrogate_stats(logp: Tensor, old_logp: Tensor, clip: float) -> SurrogateStats:
    """Approximate KL (``E[(rho - 1) - log rho]``) and the fraction of clipped ratios."""
    with torch.no_grad():
        log_ratio = logp - old_logp
        ratio = log_ratio.exp()
        return SurrogateStats(
            approx_kl=((ratio - 1.0) - log_ratio).mean(),
            clip_fraction=((ratio - 1.0).abs() > clip).to(logp.dtype).mean(),
        )


def value_loss(
    values: Tensor, returns: Tensor, old_values: Tensor | None = None, clip: float | None = None
) -> Tensor:
    """``0.5 E[(V - R)^2]``, or PPO's clipped variant when ``clip`` and ``old_values`` are given."""
    unclipped = (values - returns).pow(2)
    if clip is None or old_values is None:
        return 0.5 * unclipped.mean()
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum(unclipped, (v_clipped - returns).pow(2)).mean()
