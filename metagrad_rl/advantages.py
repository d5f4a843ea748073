"""Returns and advantages as pure functions (GAE, Schulman et al. 2016).

All functions take time-major tensors ``[T]`` or ``[T, N]`` (``N`` parallel envs) and are
differentiable in ``rewards`` -- the meta-gradient's Eq 13 differentiates the intrinsic
advantages through them. Termination and truncation are kept apart:

- ``terminated_t``: ``s_{t+1}`` is terminal; its value is not bootstrapped.
- ``episode_end_t``: the episode ended at ``t`` (terminated *or* truncated); the GAE sum stops
  there. On truncation ``next_values_t = V(s_{t+1})`` of the real final observation is
  bootstrapped.
"""

from __future__ import annotations

import torch
from torch import Tensor


def td_errors(
    rewards: Tensor, values: Tensor, next_values: Tensor, terminated: Tensor, gamma: float
) -> Tensor:
    """``delta_t = r_t + gamma (1 - terminated_t) V(s_{t+1}) - V(s_t)``."""
    return rewards + gamma * (1.0 - terminated.to(rewards.dtype)) * next_values - values


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    episode_end: Tensor,
    gamma: float,
    lam: float,
) -> Tensor:
    r"""Generalized advantage estimation.

    .. math:: A_t = \delta_t + \gamma\lambda (1 - \mathrm{end}_t) A_{t+1}

    The recursion starts from ``A_T = 0`` (the last step of the batch is bootstrapped through
    ``next_values`` alone). Returns a tensor shaped like ``rewards``.
    """
    delta = td_errors(rewards, values, next_values, terminated, gamma)
    carry = (gamma * lam) * (1.0 - episode_end.to(rewards.dtype))
    out = []
    acc = torch.zeros_like(delta[0])
    for t in range(delta.shape[0] - 1, -1, -1):
        acc = delta[t] + carry[t] * acc
        out.append(acc)
    out.reverse()
    return torch.stack(out)


def normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / (std + eps)`` over all elements (differentiable)."""
    return (x - x.mean()) / (x.std() + eps)
