"""Sampling-aware meta-gradient estimators, as surrogates to differentiate.

The meta-objective is the expected extrinsic return after ``K`` inner rounds,

.. math:: M(\\eta) = \\mathbb{E}_{\\tau_0 \\sim \\pi_{\\theta_0,\\eta}}
          \\cdots \\mathbb{E}_{\\tau_{K-1} \\sim \\pi_{\\theta_{K-1},\\eta}}
          \\big[ J^{EX}(\\theta_K(\\tau, \\eta), \\eta) \\big],

where each batch ``tau_k`` is drawn from the policy of round ``k``, which depends on ``eta``
through the conditioning (CLN) and through ``theta_k(eta)`` once ``k >= 1``. Differentiating
under the expectation (the score-function identity, Williams 1992) gives

.. math:: \\nabla_\\eta M = \\mathbb{E}\\Big[
          \\nabla_\\eta \\hat J^{EX}(\\theta_K(\\tau,\\eta),\\eta)
          + \\big(\\hat J^{EX} - b\\big)\\,
          \\nabla_\\eta \\sum_{k<K} \\log p(\\tau_k; \\theta_k(\\eta), \\eta) \\Big]

for any baseline ``b`` independent of the sampled batches. The first term is the *plain*
expansion of the paper's Eq 10-14 (LIRPG when only Eq 13 survives); the second is the
*score-function term* that the plain expansion omits. ``log p(tau_k)`` is the sum of
``log pi(a_t|s_t)`` over the batch: the dynamics do not depend on ``eta``.

Each function here returns a *surrogate*: a tensor whose first derivative (by autograd, with the
batches held fixed) is the estimator. They are sign-agnostic: pass ``J_ex`` to estimate
``grad M``, or the outer loss ``L_out = -J_ex`` to estimate ``grad (-M)``. The leading
dimensions of all arguments broadcast, so one call serves many independent draws.
See ``docs/estimators.md`` for the equations and the tests that prove each claim.

Notation: ``⊥`` is a stop-gradient, ``□(x) = exp(x - ⊥x)`` the DiCE magic box.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def magic_box(x: Tensor) -> Tensor:
    """DiCE's magic box (Foerster et al. 2018): ``□(x) = exp(x - ⊥x)``.

    Its value is exactly 1 and its derivative is ``□(x) ∇x = ∇x``, so ``f □(x)`` evaluates to
    ``f`` while its gradient picks up ``f ∇x``.
    """
    return torch.exp(x - x.detach())


def total_log_prob(logp_batches: Sequence[Tensor] | Tensor) -> Tensor:
    """``sum_k log p(tau_k)``: the log-probability of a sequence of sampled batches.

    ``logp_batches`` is either a sequence with one tensor per round (each already summed over the
    batch's trajectories and time steps) or one tensor whose *last* dimension is the round ``k``.
    """
    if isinstance(logp_batches, Tensor):
        return logp_batches.sum(-1)
    return torch.stack(list(logp_batches), dim=-1).sum(-1)


def score_function_term(
    objective_value: Tensor, logp_batches: Sequence[Tensor] | Tensor, baseline: Tensor | float = 0.0
) -> Tensor:
    """The score-function correction that makes the plain meta-gradient unbiased.

    .. math:: S = \\bot\\big(\\hat J - b\\big)
              \\sum_{k<K} \\log p(\\tau_k; \\theta_k(\\eta), \\eta),
              \\qquad \\nabla_\\eta S = (\\hat J - b) \\nabla_\\eta \\sum_k \\log p(\\tau_k)

    ``objective_value`` is ``J_ex_hat`` evaluated after the unroll; ``logp_batches`` must carry
    the graph of ``log pi_{theta_k(eta), eta}`` for every round ``k``; ``baseline`` must not
    depend on the batches whose log-probability it multiplies (a constant, a running mean, or a
    leave-one-out mean, :func:`leave_one_out_baseline`). It is detached here.
    """
    advantage = (objective_value - baseline).detach()
    return advantage * total_log_prob(logp_batches)


def sampling_aware_surrogate(
    objective_value: Tensor, logp_batches: Sequence[Tensor] | Tensor, baseline: Tensor | float = 0.0
) -> Tensor:
    """``J_hat + ⊥(J_hat - b) sum_k log p(tau_k)``: plain expansion plus the score term.

    Its gradient is the plain meta-gradient (Eq 10-14, batches fixed) plus
    :func:`score_function_term`'s; its expectation over the batches is ``grad M(eta)``.
    Its *value* is not ``J_hat`` (use :func:`dice_surrogate` for a value-preserving form).
    """
    return objective_value + score_function_term(objective_value, logp_batches, baseline)


def dice_surrogate(
    objective_value: Tensor, logp_batches: Sequence[Tensor] | Tensor, baseline: Tensor | float = 0.0
) -> Tensor:
    """DiCE-style surrogate ``J_hat □(L) + b (1 - □(L))`` with ``L = sum_k log p(tau_k)``.

    Evaluates to ``J_hat``; its first derivative is ``grad J_hat + (J_hat - b) grad L``, the
    sampling-aware estimator (``J_hat`` is not stopped here, but ``□ = 1`` in value). Higher
    derivatives differ from the sampling-aware surrogate's; only first ones are claimed.
    """
    box = magic_box(total_log_prob(logp_batches))
    return objective_value * box + baseline * (1.0 - box)


def leave_one_out_baseline(values: Tensor, dim: int = 0) -> Tensor:
    """``b_i = (sum_j v_j - v_i) / (N - 1)`` along ``dim``, detached.

    Sample ``i``'s baseline is built from the other, independent samples only, so it leaves the
    estimator's expectation unchanged.
    """
    n = values.shape[dim]
    if n < 2:
        raise ValueError(
            f"leave-one-out baseline needs at least 2 samples along dim {dim}, got {n}"
        )
    values = values.detach()
    return (values.sum(dim, keepdim=True) - values) / (n - 1)
