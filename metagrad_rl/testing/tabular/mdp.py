"""A tabular MDP in which the meta-gradient and every estimator's moments are exact.

The bilevel problem of the paper (Section 3.2, Eq 6-14) in miniature, in float64:

- a tabular MDP (``S`` states, ``A`` actions, horizon ``H``), fixed initial distribution ``p0``,
  transitions ``P[s, a, s']`` and extrinsic reward ``r_ex[s, a]``, all drawn from a seed;
- ``eta`` is the intrinsic-reward table, ``r_in[s, a] = eta[s, a]``; the inner loop learns from
  ``r_mix = r_ex_coef r_ex + r_in_coef r_in``;
- a softmax policy with a CLN-like conditioning on ``eta`` (Eq 20-22 in spirit),

  .. math:: \\mathrm{logits}_{\\theta,\\eta}(s) = g_s(\\eta)\\,\\theta[s] + b_s(\\eta), \\quad
            g(\\eta) = 1 + c \\tanh(G\\,\\mathrm{vec}\\,\\eta), \\quad
            b(\\eta) = c\\, B\\,\\mathrm{vec}\\,\\eta

  with fixed random maps ``G``, ``B``; ``conditioned=False`` gives ``logits = theta`` exactly;
- ``K`` inner rounds (:func:`inner_round`): round ``k`` learns from a batch ``tau_k`` of ``B``
  trajectories drawn from ``pi_{theta_k, eta}`` with ``inner_steps`` gradient steps of the
  (unclipped or clipped) PPO surrogate with reward-to-go advantages of ``r_mix`` (Eq 7; one step
  is exactly the policy gradient). The sampling distribution is a stop-gradient *for theta*,
  but ``theta_{k+1}(tau, eta)`` follows ``eta`` through the conditioning, the advantages, the
  ratio's denominator ``pi_{theta_k(eta), eta}`` and ``theta_k(eta)``.

With ``N = (S A)^H`` trajectories there are ``N^(B K)`` batch sequences; :func:`enumerate_batches`
lists them all, so ``M(eta) = E[J_ex(theta_K(tau, eta), eta)]`` (:func:`meta_objective`) is a
finite sum whose weights are differentiable in ``eta``, and its autograd is the *true*
meta-gradient (:func:`true_meta_gradient`). Every estimator of :mod:`metagrad_rl.score_function` is
evaluated per draw (:func:`estimator_draws`); weighting the draws by their (detached)
probabilities gives its exact mean and covariance (:func:`exact_moments`), and
:func:`monte_carlo_moments` samples instead. Tensors carry one leading *draw* dimension ``D``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor

from metagrad_rl.errors import ConfigError
from metagrad_rl.score_function import (
    dice_surrogate,
    leave_one_out_baseline,
    sampling_aware_surrogate,
)

DTYPE = torch.float64
ESTIMATORS = ("plain", "sampling_aware", "dice")
#: Baselines understood by :func:`estimator_draws` besides a number or a per-draw tensor.
NAMED_BASELINES = ("leave_one_out", "initial_return")
Baseline = float | Tensor | str | None


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
# True meta-gradient and estimators
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


class EstimatorDraws(NamedTuple):
    """One estimator evaluated on ``D`` fixed draws of batch sequences."""

    grads: Tensor
    """``[D, S, A]`` the estimate of ``grad_eta M`` from each draw."""
    objective: Tensor
    """``[D]`` ``J_ex(theta_K(tau, eta), eta)`` (detached)."""
    log_prob: Tensor
    """``[D]`` full log-probability of the draw (policy and dynamics, detached)."""


def _resolve_baseline(problem: TabularProblem, baseline: Baseline, objective: Tensor, eta: Tensor):
    if baseline is None:
        return 0.0
    if isinstance(baseline, str):
        if baseline == "leave_one_out":
            return leave_one_out_baseline(objective)
        if baseline == "initial_return":
            probs = policy_log_probs(problem, problem.theta0, eta).exp()
            return extrinsic_return(problem.mdp, probs, problem.config.gamma).detach()
        raise ValueError(f"baseline={baseline!r}: expected a number, a tensor or {NAMED_BASELINES}")
    return baseline


def estimator_draws(
    problem: TabularProblem,
    batches: Batches,
    estimator: str,
    baseline: Baseline = None,
    eta: Tensor | None = None,
) -> EstimatorDraws:
    """Evaluate ``estimator`` on each draw (batches held fixed).

    - ``"plain"``: ``grad_eta J_ex(theta_K(tau, eta), eta)``, the expansion of Eq 10-14 (LIRPG).
    - ``"sampling_aware"``: plain ``+ (J_ex - b) grad_eta sum_k log p(tau_k; theta_k(eta), eta)``.
    - ``"dice"``: first derivative of ``J_ex □(sum_k log p(tau_k)) + b (1 - □(...))``.

    ``baseline`` (``b``): ``None`` (0), a number, a ``[D]`` tensor, ``"initial_return"``
    (``J_ex(theta_0, eta)``: a constant) or ``"leave_one_out"`` (Monte Carlo draws only: the
    mean objective of the other draws). ``"plain"`` takes no baseline. Each draw gets its own
    copy of ``eta``, so one backward pass yields every per-draw gradient.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: expected one of {ESTIMATORS}")
    if estimator == "plain" and baseline is not None:
        raise ValueError("the plain estimator has no score-function term: pass baseline=None")
    eta = (problem.eta if eta is None else eta).detach()
    n_draws = batches.states.shape[0]
    eta_per_draw = eta.expand(n_draws, *eta.shape).clone().requires_grad_(True)
    out = unroll(problem, eta_per_draw, batches)
    probs = policy_log_probs(problem, out.theta, eta_per_draw).exp()
    objective = extrinsic_return(problem.mdp, probs, problem.config.gamma)
    b = _resolve_baseline(problem, baseline, objective, eta)
    if estimator == "plain":
        surrogate = objective
    elif estimator == "sampling_aware":
        surrogate = sampling_aware_surrogate(objective, out.log_probs, b)
    else:
        surrogate = dice_surrogate(objective, out.log_probs, b)
    (grads,) = torch.autograd.grad(surrogate.sum(), eta_per_draw)
    log_prob = (out.log_probs.sum(-1) + batches.log_p_dynamics).detach()
    return EstimatorDraws(grads, objective.detach(), log_prob)


class Moments(NamedTuple):
    """Mean and covariance of an estimator of ``grad_eta M`` (flattened ``eta`` coordinates)."""

    mean: Tensor
    """``[S, A]``."""
    cov: Tensor
    """``[S*A, S*A]`` covariance of a single draw's estimate."""
    n: int
    """Draws enumerated (exact) or samples drawn (Monte Carlo)."""
    exact: bool

    @property
    def variance(self) -> Tensor:
        """Total variance ``tr Cov`` of one draw's estimate."""
        return self.cov.diagonal().sum()

    @property
    def stderr(self) -> Tensor:
        """``[S, A]`` standard error of ``mean`` (0 when exact)."""
        if self.exact:
            return torch.zeros_like(self.mean)
        return (self.cov.diagonal() / self.n).sqrt().view_as(self.mean)


def exact_moments(
    problem: TabularProblem, estimator: str, baseline: Baseline = None, eta: Tensor | None = None
) -> Moments:
    """Exact mean and covariance of ``estimator`` by enumerating every batch sequence."""
    draws = estimator_draws(problem, enumerate_batches(problem), estimator, baseline, eta)
    weight = draws.log_prob.exp()
    if not math.isclose(weight.sum().item(), 1.0, abs_tol=1e-9):
        raise RuntimeError(f"draw probabilities sum to {weight.sum().item()}, not 1")
    g = draws.grads.flatten(1)
    mean = weight @ g
    centred = g - mean
    cov = (weight[:, None] * centred).T @ centred
    return Moments(mean.view_as(draws.grads[0]), cov, g.shape[0], True)


def monte_carlo_moments(
    problem: TabularProblem,
    estimator: str,
    n_samples: int,
    seed: int = 0,
    baseline: Baseline = None,
    eta: Tensor | None = None,
) -> Moments:
    """Sample mean and (unbiased) sample covariance of ``n_samples`` independent estimates."""
    generator = torch.Generator().manual_seed(seed)
    batches = sample_batches(problem, n_samples, generator, eta)
    g = estimator_draws(problem, batches, estimator, baseline, eta).grads.flatten(1)
    mean = g.mean(0)
    cov = torch.cov(g.T, correction=1).reshape(g.shape[1], g.shape[1])
    return Moments(mean.view(problem.eta.shape), cov, n_samples, False)


def relative_bias(mean: Tensor, reference: Tensor) -> float:
    """``|mean - reference| / |reference|`` (Euclidean norms)."""
    return ((mean - reference).norm() / reference.norm()).item()


# ----------------------------------------------------------------------------------------------
# Benchmark table
# ----------------------------------------------------------------------------------------------
#: (estimator, baseline) rows of :func:`bias_variance_table`.
DEFAULT_ROWS = (
    ("plain", None),
    ("sampling_aware", None),
    ("sampling_aware", "initial_return"),
    ("dice", None),
)


def bias_variance_table(
    batch_sizes: tuple[int, ...] = (1, 2, 4),
    rounds: tuple[int, ...] = (1, 2),
    conditioned: tuple[bool, ...] = (False, True),
    rows: tuple[tuple[str, Baseline], ...] = DEFAULT_ROWS,
    seed: int = 0,
    max_exact_draws: int = 2**16,
    mc_samples: int = 20_000,
    mc_seed: int = 0,
    **config_fields: Any,
) -> list[dict[str, Any]]:
    """Bias and variance of each estimator against batch size, on the test bed.

    One dict per (conditioned, K, B, estimator, baseline) with ``mode`` ``"exact"`` when the
    ``N^(B K)`` draws fit in ``max_exact_draws``, else ``"mc"`` (``mc_samples`` draws; the
    reference gradient is then the Monte Carlo mean of the sampling-aware estimator with the
    ``"initial_return"`` baseline, on independent draws, ``reference="mc"``):
    ``bias_rel`` = ``|E[g] - grad M| / |grad M|``, ``variance`` = ``tr Cov[g]`` of one draw,
    ``variance_rel`` = ``variance / |grad M|^2``, ``stderr_rel`` = ``sqrt(variance / n) /
    |grad M|`` (0 when exact), ``grad_norm`` = ``|grad M|``.
    """
    table = []
    for cond, k, b in itertools.product(conditioned, rounds, batch_sizes):
        problem = make_problem(seed, conditioned=cond, rounds=k, batch_size=b, **config_fields)
        n_traj = (problem.mdp.n_states * problem.mdp.n_actions) ** problem.mdp.horizon
        exact = n_traj ** (b * k) <= max_exact_draws
        if exact:
            reference = true_meta_gradient(problem)
        else:
            reference = monte_carlo_moments(
                problem, "sampling_aware", mc_samples, mc_seed + 1, "initial_return"
            ).mean
        for estimator, baseline in rows:
            if exact:
                m = exact_moments(problem, estimator, baseline)
            else:
                m = monte_carlo_moments(problem, estimator, mc_samples, mc_seed, baseline)
            norm = reference.norm().item()
            table.append(
                {
                    "conditioned": cond,
                    "rounds": k,
                    "batch_size": b,
                    "estimator": estimator,
                    "baseline": baseline,
                    "mode": "exact" if exact else "mc",
                    "reference": "exact" if exact else "mc",
                    "n": m.n,
                    "bias_rel": relative_bias(m.mean, reference),
                    "variance": m.variance.item(),
                    "variance_rel": m.variance.item() / norm**2,
                    "stderr_rel": math.sqrt(m.variance.item() / m.n) / norm if not exact else 0.0,
                    "grad_norm": norm,
                }
            )
    return table
