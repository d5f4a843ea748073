"""Every estimator of the meta-gradient on the tabular test bed, and its exact moments.

:func:`estimator_draws` evaluates an estimator (plain, sampling-aware, DiCE) on fixed draws;
weighted by the draws' probabilities they give its exact mean and covariance
(:func:`exact_moments`), sampled they give Monte Carlo ones (:func:`monte_carlo_moments`);
:func:`bias_variance_table` is the benchmark's table. Part of :mod:`metagrad_rl.testing.tabular`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metagrad_rl.score_function import (
    dice_surrogate,
    leave_one_out_baseline,
    sampling_aware_surrogate,
)
from metagrad_rl.testing.tabular.mdp import (
    TabularProblem,
    extrinsic_return,
    make_problem,
    policy_log_probs,
)
from metagrad_rl.testing.tabular.rounds import (
    Batches,
    enumerate_batches,
    sample_batches,
    true_meta_gradient,
    unroll,
)

ESTIMATORS = ("plain", "sampling_aware", "dice")
#: Baselines understood by :func:`estimator_draws` besides a number or a per-draw tensor.
NAMED_BASELINES = ("leave_one_out", "initial_return")
Baseline = float | Tensor | str | None


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
