"""The tabular test bed itself: the MDP, the CLN-like conditioned softmax policy, the rewards,
and ``J_ex`` exactly (by dynamic programming, or by enumerating every trajectory).

Part of :mod:`metagrad_rl.testing.tabular` (whose docstring describes the whole test bed).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor

from metagrad_rl.errors import ConfigError

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------
# MDP, policy, rewards
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TabularMDP:
    """A finite-horizon tabular MDP (float64)."""

    p0: Tensor
    """``[S]`` initial-state distribution."""
    transition: Tensor
    """``[S, A, S]`` ``P(s' | s, a)``."""
    r_ex: Tensor
    """``[S, A]`` extrinsic reward."""
    horizon: int
    """``H``: number of actions per trajectory."""

    @property
    def n_states(self) -> int:
        return self.p0.shape[0]

    @property
    def n_actions(self) -> int:
        return self.r_ex.shape[1]


def make_mdp(seed: int = 0, n_states: int = 2, n_actions: int = 2, horizon: int = 2) -> TabularMDP:
    """A random (but seeded) MDP with strictly positive ``p0`` and ``P``, rewards in ``[0, 1)``."""
    if min(n_states, n_actions, horizon) < 1:
        raise ConfigError(
            f"n_states, n_actions, horizon must be >= 1, got {n_states, n_actions, horizon}"
        )
    g = torch.Generator().manual_seed(seed)
    p0 = torch.softmax(torch.randn(n_states, generator=g, dtype=DTYPE), -1)
    transition = torch.softmax(
        1.5 * torch.randn(n_states, n_actions, n_states, generator=g, dtype=DTYPE), -1
    )
    r_ex = torch.rand(n_states, n_actions, generator=g, dtype=DTYPE)
    return TabularMDP(p0=p0, transition=transition, r_ex=r_ex, horizon=horizon)


@dataclass(frozen=True)
class TabularConfig:
    """Inner loop and conditioning of the test bed."""

    rounds: int = 1
    """``K``: inner rounds unrolled, each with a freshly sampled batch."""
    batch_size: int = 1
    """``B``: trajectories per batch. Exact enumeration costs ``N^(B K)`` draws."""
    inner_steps: int = 1
    """Gradient steps per round on the same batch (PPO epochs). 1 = plain policy gradient."""
    lr: float = 1.0
    """Inner SGD step size (ignored when the problem carries a torchopt optimizer)."""
    clip: float | None = None
    """PPO clip range of the ratio; ``None`` = unclipped surrogate."""
    conditioned: bool = True
    """Whether the policy's logits depend on ``eta`` (the CLN-like gain and bias)."""
    cond_scale: float = 1.0
    """``c``: strength of the conditioning."""
    r_ex_coef: float = 1.0
    """Weight of ``r_ex`` in the inner loop's mixed reward."""
    r_in_coef: float = 1.0
    """Weight of ``r_in = eta`` in the inner loop's mixed reward."""
    gamma: float = 1.0
    """Discount of the reward-to-go advantages and of ``J_ex``."""

    def __post_init__(self) -> None:
        for name in ("rounds", "batch_size", "inner_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: expected an int >= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} is invalid: expected > 0")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"clip={self.clip!r} is invalid: expected > 0 or None")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma={self.gamma!r} is invalid: expected in (0, 1]")


@dataclass(frozen=True)
class TabularProblem:
    """MDP, config, fixed conditioning maps, and the point ``(theta_0, eta)`` of evaluation."""

    mdp: TabularMDP
    config: TabularConfig
    gain_map: Tensor
    """``G``: ``[S, S*A]``."""
    bias_map: Tensor
    """``B``: ``[S*A, S*A]``."""
    theta0: Tensor
    """``[S, A]`` policy parameters before round 0 (constant: not differentiated)."""
    eta: Tensor
    """``[S, A]`` intrinsic-reward table at which meta-gradients are evaluated."""
    optimizer: torchopt.base.GradientTransformation | None = None
    """Inner optimizer (torchopt, differentiable); ``None`` = SGD with ``config.lr``."""


def make_problem(
    seed: int = 0,
    config: TabularConfig | None = None,
    *,
    n_states: int = 2,
    n_actions: int = 2,
    horizon: int = 2,
    optimizer: torchopt.base.GradientTransformation | None = None,
    **config_fields: Any,
) -> TabularProblem:
    """The test bed from a seed; ``config_fields`` override fields of ``config``."""
    config = replace(config or TabularConfig(), **config_fields)
    mdp = make_mdp(seed, n_states, n_actions, horizon)
    g = torch.Generator().manual_seed(seed + 10_000)
    n_sa = n_states * n_actions
    return TabularProblem(
        mdp=mdp,
        config=config,
        gain_map=0.5 * torch.randn(n_states, n_sa, generator=g, dtype=DTYPE),
        bias_map=0.5 * torch.randn(n_sa, n_sa, generator=g, dtype=DTYPE),
        theta0=0.5 * torch.randn(n_states, n_actions, generator=g, dtype=DTYPE),
        eta=0.5 * torch.randn(n_states, n_actions, generator=g, dtype=DTYPE),
        optimizer=optimizer,
    )


def policy_log_probs(problem: TabularProblem, theta: Tensor, eta: Tensor) -> Tensor:
    """``log pi_{theta, eta}(a | s)`` as a ``[..., S, A]`` table (CLN-like conditioning)."""
    cfg = problem.config
    if not cfg.conditioned:
        return torch.log_softmax(theta, -1)
    flat = eta.flatten(-2)
    gain = 1.0 + cfg.cond_scale * torch.tanh(flat @ problem.gain_map.T)
    bias = cfg.cond_scale * (flat @ problem.bias_map.T).unflatten(-1, eta.shape[-2:])
    return torch.log_softmax(gain.unsqueeze(-1) * theta + bias, -1)


def mixed_reward(problem: TabularProblem, eta: Tensor) -> Tensor:
    """``r_mix = r_ex_coef r_ex + r_in_coef r_in`` with ``r_in = eta`` (``[..., S, A]``)."""
    cfg = problem.config
    return cfg.r_ex_coef * problem.mdp.r_ex + cfg.r_in_coef * eta


# ----------------------------------------------------------------------------------------------
# Exact returns
# ----------------------------------------------------------------------------------------------
def extrinsic_return(mdp: TabularMDP, probs: Tensor, gamma: float = 1.0) -> Tensor:
    """``J_ex = E_{pi}[sum_t gamma^t r_ex(s_t, a_t)]`` by backward dynamic programming.

    .. math:: Q_t(s,a) = r(s,a) + \\gamma \\sum_{s'} P(s'|s,a) V_{t+1}(s'),\\quad
              V_t(s) = \\sum_a \\pi(a|s) Q_t(s,a),\\quad J = p_0^\\top V_0

    ``probs`` is a ``[..., S, A]`` policy table; returns ``[...]``.
    """
    value = torch.zeros(probs.shape[:-1], dtype=probs.dtype)
    for _ in range(mdp.horizon):
        q = mdp.r_ex + gamma * torch.einsum("sat,...t->...sa", mdp.transition, value)
        value = (probs * q).sum(-1)
    return value @ mdp.p0


class Trajectories(NamedTuple):
    """All ``N = (S A)^H`` state-action sequences of the MDP."""

    states: Tensor
    """``[N, H]`` long."""
    actions: Tensor
    """``[N, H]`` long."""
    log_p_dynamics: Tensor
    """``[N]``: ``log p0(s_0) + sum_t log P(s_{t+1} | s_t, a_t)`` (independent of the policy)."""


def enumerate_trajectories(mdp: TabularMDP) -> Trajectories:
    """Every trajectory of length ``H`` with its dynamics log-probability."""
    pairs = list(itertools.product(range(mdp.n_states), range(mdp.n_actions)))
    seqs = torch.tensor(list(itertools.product(pairs, repeat=mdp.horizon)), dtype=torch.long)
    states, actions = seqs[..., 0], seqs[..., 1]
    log_p = mdp.p0.log()[states[:, 0]]
    log_p = log_p + mdp.transition.log()[states[:, :-1], actions[:, :-1], states[:, 1:]].sum(-1)
    return Trajectories(states, actions, log_p)


def extrinsic_return_by_enumeration(mdp: TabularMDP, probs: Tensor, gamma: float = 1.0) -> Tensor:
    """``J_ex`` as ``sum_tau p(tau) R(tau)`` over every trajectory (reference for DP)."""
    traj = enumerate_trajectories(mdp)
    discount = gamma ** torch.arange(mdp.horizon, dtype=DTYPE)
    ret = (mdp.r_ex[traj.states, traj.actions] * discount).sum(-1)
    log_pi = probs.log()[..., traj.states, traj.actions].sum(-1)
    return ((log_pi + traj.log_p_dynamics).exp() * ret).sum(-1)
