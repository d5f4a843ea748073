"""The validation round (Eq 24): the meta-gradient of the pending policy round on ``tau_{k+1}``
and the step ``eta_i -> eta_{i+1}``."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Any

import numpy as np
import torchopt
from torch import Tensor

from metagrad_rl.metagrad import eq17_gradient
from metagrad_rl.pytree import Params, all_finite, detach_state, flatten
from metagrad_rl.rollout import Collector
from metagrad_rl.trainers import meta_grads
from metagrad_rl.trainers.bilevel.collect import outer_batch
from metagrad_rl.trainers.bilevel.state import (
    BilevelState,
    Collected,
    MetaStep,
    Parts,
    RoundRecord,
)


def validation_round(
    parts: Parts, state: BilevelState, data: Collected
) -> tuple[BilevelState, MetaStep | None]:
    """Finishes the pending round's meta-gradient on ``tau_{k+1}`` and steps ``eta``.

    Returns the state with ``eta_{i+1}`` (and its optimizer state), no pending round, the
    history and the baseline moved on, and what was applied (``None`` before the first round).
    A meta-gradient with a NaN/inf entry is not applied (``meta_steps_skipped``): through
    Adam's moments it would turn ``eta`` NaN for good.
    """
    rec = state.pending
    if rec is None:
        return state, None
    step = meta_step(parts, state, rec, data)
    eta, eta_state, skipped = state.eta, state.eta_state, state.meta_steps_skipped
    if not all_finite(step.grad):
        skipped += 1
        step.diagnostics["meta_steps_skipped"] = skipped
        print(
            f"warning: iteration {state.iteration + 1}: the meta-gradient is not finite; eta's "
            f"step is skipped ({skipped} so far)",
            file=sys.stderr,
        )
    elif parts.settings.eta_lr > 0:  # eta_lr = 0: eta stays exactly at its initialisation
        updates, eta_state = parts.eta_tx.update(step.grad, eta_state, params=eta, inplace=False)
        eta = detach_state(torchopt.apply_updates(eta, updates, inplace=False))
    step.diagnostics.setdefault("meta_steps_skipped", skipped)
    history = state.history
    keeps = parts.meta_grad.keeps_rounds
    if keeps:  # the rounds the next meta-steps re-simulate
        history = [*history, rec][-keeps:]
    state = replace(
        state,
        eta=eta,
        eta_state=eta_state,
        meta_steps_skipped=skipped,
        pending=None,  # frees the unroll's graph
        history=history,
        baseline=next_baseline(state.baseline, rec.j_hat, parts.settings.baseline_decay),
    )
    return state, step


def next_baseline(baseline: float | None, j_hat: float | None, decay: float) -> float | None:
    """The sampling-aware moving-average baseline after taking in ``J_hat`` of ``tau_k`` (only
    after its meta-step, so that ``b`` is independent of ``tau_k``)."""
    if j_hat is None:
        return baseline
    return j_hat if baseline is None else decay * baseline + (1 - decay) * j_hat


def meta_step(parts: Parts, state: BilevelState, rec: RoundRecord, data: Collected) -> MetaStep:
    """The chosen estimator's gradient of ``L_out`` w.r.t. ``eta`` (nothing is applied here):
    what the validation round offers (:class:`~metagrad_rl.trainers.meta_grads.MetaGradContext`)
    handed to :meth:`~metagrad_rl.trainers.meta_grads.MetaGrad.gradient`."""
    outer, denominator = outer_batch(data), parts.settings.denominator
    theta_den = rec.theta if denominator == "theta_k" else state.theta

    def eq17() -> Params:
        g = eq17_gradient(parts.problem, state.theta, rec.eta, outer, theta_den, rec.eta)
        return dict(parts.par.average_(g))

    def weight_at(baseline: float) -> float | None:
        sigma = parts.par.union_std(data.adv_ex)  # the union's, as the score term needs
        scale = reward_scale(parts.collector)
        return score_weight(data.rollout.episodes, baseline, scale, data.adv_ex, sigma)

    ctx = meta_grads.MetaGradContext(
        None,
        eq17,
        rec=rec,
        history=state.history,
        outer=outer,
        denominator=denominator,
        inputs=parts.unroll_inputs,
        score_weight_at=weight_at,
        baseline=state.baseline,
        combine=parts.par.combine_meta,  # averaged over the workers (score: summed)
    )
    grad, named = parts.meta_grad.gradient(ctx)
    diag = dict(ctx.result.diagnostics) if ctx.result is not None else {}
    diag.update(ctx.diagnostics)
    diag.update({f"norm_{k}": float(flatten(g).norm()) for k, g in named.items()})
    diag["norm_applied"] = float(flatten(grad).norm())
    return MetaStep(grad, named, diag, rec, outer, state.theta)


def reward_scale(collector: Collector) -> float:
    """The factor the reward scaler multiplies raw rewards by (1 when disabled)."""
    rs = collector.rew_scaler
    return 1.0 / math.sqrt(float(rs.rms.var) + rs.eps) if rs.enabled else 1.0


def score_weight(
    episodes: Any,
    baseline: float,
    reward_scale: float,
    adv_ex: Tensor,
    adv_std: Tensor | float | None = None,
) -> float | None:
    r"""The sampling-aware term's weight ``w`` in ``grad_eta [w log p(tau_k)]`` (loss units).

    The plain term is the PPO surrogate's gradient with normalised advantages, about
    ``grad J / (sigma_A H)`` per episode (``sigma_A``: std of the extrinsic advantages, ``H``:
    mean episode length); the score term is put on that scale:

    .. math:: w = -\frac{s\,(\hat J - b)}{\sigma_A H}

    with ``s`` the reward scaler's factor (advantages are of scaled rewards) and the minus
    sign because gradients are of ``L_out = -J``. ``None`` when no episode ended in the batch.
    ``adv_std`` replaces ``adv_ex.std()`` (with several workers: the union's).
    """
    if not episodes.returns:
        return None
    j_hat = float(np.mean(episodes.returns))
    horizon = float(np.mean(episodes.lengths))
    sigma = float(adv_ex.std() if adv_std is None else adv_std) + 1e-8
    return -reward_scale * (j_hat - baseline) / (sigma * horizon)
