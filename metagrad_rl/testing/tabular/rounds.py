"""The inner rounds of the tabular test bed and its true meta-gradient.

``K`` rounds of ``inner_steps`` differentiable PPO steps each (:func:`inner_round`,
:func:`unroll`) on batch sequences that are either every one there is
(:func:`enumerate_batches`) or sampled (:func:`sample_batches`); :func:`meta_objective` is the
exact expectation over them and :func:`true_meta_gradient` its autograd. Part of
:mod:`metagrad_rl.testing.tabular`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor

from metagrad_rl.testing.tabular.mdp import (
    DTYPE,
    TabularMDP,
    TabularProblem,
    enumerate_trajectories,
    extrinsic_return,
    mixed_reward,
    policy_log_probs,
)


# ----------------------------------------------------------------------------------------------
# Batches and the inner loop
# ----------------------------------------------------------------------------------------------
class Batches(NamedTuple):
    """``D`` draws of a batch sequence ``tau_0 .. tau_{K-1}``."""

    states: Tensor
    """``[D, K, B, H]`` long."""
    actions: Tensor
    """``[D, K, B, H]`` long."""
    log_p_dynamics: Tensor
    """``[D]``: dynamics part of the draw's log-probability (summed over ``k`` and ``B``)."""


def _gather(table: Tensor, states: Tensor, actions: Tensor) -> Tensor:
    """``table[d, s_t, a_t]`` for ``table [S, A]`` or ``[D, S, A]`` and ``states [D, B, H]``."""
    d = states.shape[0]
    flat = table.expand(d, *table.shape[-2:]).flatten(-2)
    index = (states * table.shape[-1] + actions).flatten(-2)
    return flat.gather(-1, index).view(states.shape)


def reward_to_go(rewards: Tensor, gamma: float) -> Tensor:
    """``A_t = sum_{t' >= t} gamma^{t'-t} r_{t'}`` along the last (time) dimension."""
    out = [rewards[..., -1]]
    for t in range(rewards.shape[-1] - 2, -1, -1):
        out.append(rewards[..., t] + gamma * out[-1])
    return torch.stack(out[::-1], -1)


class RoundResult(NamedTuple):
    theta: Tensor
    """``[D, S, A]`` ``theta_{k+1}``."""
    opt_state: Any
    """torchopt state carried to the next round (``None`` for plain SGD)."""
    log_prob: Tensor
    """``[D]`` ``log p(tau_k; theta_k, eta)``: policy part of the batch's log-probability."""


def inner_round(
    problem: TabularProblem,
    theta_k: Tensor,
    eta: Tensor,
    states: Tensor,
    actions: Tensor,
    opt_state: Any = None,
) -> RoundResult:
    """Round ``k``: ``inner_steps`` differentiable steps on the batch ``tau_k`` (Eq 6-7).

    .. math:: \\theta \\leftarrow \\theta + \\alpha \\nabla_\\theta \\frac1B \\sum_{b,t}
              \\rho_t A^{mix}_t, \\qquad \\rho_t = \\frac{\\pi_{\\theta,\\eta}(a_t|s_t)}
              {\\pi_{\\theta_k,\\eta}(a_t|s_t)}

    (clipped as PPO when ``config.clip`` is set; at the first step ``rho = 1`` and the gradient
    is the policy gradient). ``grad_theta`` treats the sampling policy ``pi_{theta_k, eta}`` as a
    constant, but the graph of ``theta_{k+1}`` keeps the ratio's denominator as a function of
    ``theta_k(eta)`` and ``eta``: detaching it would add a spurious score term. ``theta_k`` is
    ``[S, A]`` or ``[D, S, A]``; ``states``, ``actions`` are ``[D, B, H]``.
    """
    cfg = problem.config
    adv = reward_to_go(_gather(mixed_reward(problem, eta), states, actions), cfg.gamma)
    old_logp = _gather(policy_log_probs(problem, theta_k, eta), states, actions)
    theta = theta_k.expand(states.shape[0], *theta_k.shape[-2:])
    # A separate node, so that grad_theta does not see the denominator's path through theta_k.
    theta = theta.clone() if theta.requires_grad else theta.detach().requires_grad_(True)
    if problem.optimizer is not None and opt_state is None:
        opt_state = problem.optimizer.init(theta)
    for _ in range(cfg.inner_steps):
        logp = _gather(policy_log_probs(problem, theta, eta), states, actions)
        ratio = torch.exp(logp - old_logp)
        surrogate = ratio * adv
        if cfg.clip is not None:
            clipped = torch.clamp(ratio, 1.0 - cfg.clip, 1.0 + cfg.clip) * adv
            surrogate = torch.minimum(surrogate, clipped)
        loss = -surrogate.sum(-1).mean(-1).sum()  # per-draw losses are independent
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        if problem.optimizer is None:
            theta = theta - cfg.lr * grad
        else:
            updates, opt_state = problem.optimizer.update(grad, opt_state, inplace=False)
            theta = torchopt.apply_updates(theta, updates, inplace=False)
    return RoundResult(theta, opt_state, old_logp.sum((-1, -2)))


class Unrolled(NamedTuple):
    theta: Tensor
    """``[D, S, A]`` ``theta_K(tau, eta)``."""
    log_probs: Tensor
    """``[D, K]`` ``log p(tau_k; theta_k(eta), eta)`` (policy part), differentiable."""


def unroll(problem: TabularProblem, eta: Tensor, batches: Batches) -> Unrolled:
    """``theta_K(tau, eta)`` through all ``K`` rounds for every draw of ``batches``."""
    theta, opt_state, log_probs = problem.theta0, None, []
    for k in range(problem.config.rounds):
        theta, opt_state, log_p = inner_round(
            problem, theta, eta, batches.states[:, k], batches.actions[:, k], opt_state
        )
        log_probs.append(log_p)
    return Unrolled(theta, torch.stack(log_probs, -1))


def enumerate_batches(problem: TabularProblem, max_draws: int = 2**16) -> Batches:
    """Every sequence of ``K`` ordered batches of ``B`` trajectories: ``N^(B K)`` draws."""
    traj = enumerate_trajectories(problem.mdp)
    cfg = problem.config
    n_slots = cfg.rounds * cfg.batch_size
    n_draws = traj.states.shape[0] ** n_slots
    if n_draws > max_draws:
        raise ValueError(
            f"{n_draws} batch sequences exceed max_draws={max_draws}: lower B*K or use Monte Carlo"
        )
    ranges = [torch.arange(traj.states.shape[0])] * n_slots
    index = torch.cartesian_prod(*ranges).reshape(n_draws, cfg.rounds, cfg.batch_size)
    return Batches(traj.states[index], traj.actions[index], traj.log_p_dynamics[index].sum((1, 2)))


def _sample_trajectories(
    mdp: TabularMDP, probs: Tensor, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``B`` trajectories per policy table ``probs [D, S, A]``: states, actions, dynamics log p."""
    n = probs.shape[0]
    draw = torch.arange(n).repeat_interleave(batch_size)
    s = torch.multinomial(mdp.p0.expand(n * batch_size, -1), 1, generator=generator).squeeze(-1)
    log_p = mdp.p0.log()[s]
    states, actions = [], []
    for t in range(mdp.horizon):
        a = torch.multinomial(probs[draw, s], 1, generator=generator).squeeze(-1)
        states.append(s)
        actions.append(a)
        if t + 1 < mdp.horizon:
            s_next = torch.multinomial(mdp.transition[s, a], 1, generator=generator).squeeze(-1)
            log_p = log_p + mdp.transition.log()[s, a, s_next]
            s = s_next
    shape = (n, batch_size, mdp.horizon)
    log_p = log_p.view(n, batch_size).sum(-1)
    return torch.stack(states, -1).view(shape), torch.stack(actions, -1).view(shape), log_p


def sample_batches(
    problem: TabularProblem, n_samples: int, generator: torch.Generator, eta: Tensor | None = None
) -> Batches:
    """``n_samples`` independent draws of ``tau_0 .. tau_{K-1}``, ``tau_k ~ pi_{theta_k, eta}``."""
    eta = (problem.eta if eta is None else eta).detach()
    cfg = problem.config
    theta, opt_state, states, actions = problem.theta0, None, [], []
    log_p = torch.zeros(n_samples, dtype=DTYPE)
    for _ in range(cfg.rounds):
        probs = policy_log_probs(problem, theta, eta).exp().detach()
        probs = probs.expand(n_samples, *probs.shape[-2:])
        s, a, log_p_k = _sample_trajectories(problem.mdp, probs, cfg.batch_size, generator)
        theta, opt_state, _ = inner_round(problem, theta, eta, s, a, opt_state)
        states.append(s)
        actions.append(a)
        log_p = log_p + log_p_k
    return Batches(torch.stack(states, 1), torch.stack(actions, 1), log_p)


# ----------------------------------------------------------------------------------------------
# The true meta-gradient
# ----------------------------------------------------------------------------------------------
def meta_objective(problem: TabularProblem, eta: Tensor | None = None) -> Tensor:
    """``M(eta) = sum_tau p(tau; eta) J_ex(theta_K(tau, eta), eta)`` over all batch sequences.

    ``p(tau; eta) = prod_k p(tau_k; theta_k(tau_{<k}, eta), eta)`` keeps its graph, so autograd
    of the result is the true meta-gradient.
    """
    eta = problem.eta if eta is None else eta
    batches = enumerate_batches(problem)
    out = unroll(problem, eta, batches)
    weight = (out.log_probs.sum(-1) + batches.log_p_dynamics).exp()
    probs = policy_log_probs(problem, out.theta, eta).exp()
    return (weight * extrinsic_return(problem.mdp, probs, problem.config.gamma)).sum()


def true_meta_gradient(problem: TabularProblem, eta: Tensor | None = None) -> Tensor:
    """``grad_eta M(eta)`` (``[S, A]``) by autograd through the exact expectation."""
    eta = (problem.eta if eta is None else eta).detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(meta_objective(problem, eta), eta)
    return grad
