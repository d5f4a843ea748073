"""The fused round: the policy round (Eq 23) and the critics' round in one pass, for every
estimator that does not differentiate the real round (nothing is kept for differentiation)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from metagrad_rl.flat import FlatLayout
from metagrad_rl.meta_problem import minibatch_of, round_extras
from metagrad_rl.optim import join_states, permute_state, split_state
from metagrad_rl.pytree import detach_state
from metagrad_rl.rollout import stack_params
from metagrad_rl.trainers.bilevel.critics import (
    critic_stats,
    optimizer_step,
    value_losses,
    value_targets,
)
from metagrad_rl.trainers.bilevel.policy import grad_clip_share
from metagrad_rl.trainers.bilevel.state import BilevelState, Collected, Parts
from metagrad_rl.trainers.common import FlatParams, flat_grads
from metagrad_rl.unroll import InnerSurrogate, prepare_round


def fused_round(
    parts: Parts, state: BilevelState, data: Collected, adv_mix: Tensor
) -> tuple[BilevelState, dict[str, float]]:
    """The policy round and the critic round in one pass, nothing kept for differentiation.

    Per minibatch one backward pass of the engine's inner loss (``problem.inner_loss`` on
    ``prepare_round``'s data, the denominator a constant) plus both critics' value losses,
    then one optimizer step on ``[theta, critics]`` as one flat vector
    (:attr:`Parts.joint_tx`: each part clipped by its own norm, then Adam). Same numbers as
    :func:`metagrad_rl.unroll.unroll` with ``create_graph=False`` followed by
    :func:`~metagrad_rl.trainers.bilevel.critics.critic_round` (``tests/test_bilevel.py``), in
    half the backward passes and optimizer steps. Returns the state with ``theta_{k+1}``, both
    optimizer states and the critics (new copies: ``state`` is left as it was), and the columns
    of both rounds.
    """
    rec, eta = state.pending, state.eta
    assert rec is not None
    # with several workers: a plain all-reduce of the gradient, union advantage statistics
    problem = parts.plain_problem or parts.problem
    with torch.no_grad():
        inner = prepare_round(
            problem, rec.batch, state.theta, eta, eta, InnerSurrogate(parts.settings.surrogate)
        )
        # with several workers: the union advantage statistics of every minibatch, in two
        # collectives for the round (the problem's minibatch_data)
        extras = round_extras(problem, inner, rec.minibatches)
    v = value_targets(parts.settings, data, adv_mix)
    joint, opt = _joined(parts, state)
    total = 0.0
    for j, idx in enumerate(rec.minibatches):
        leaves = joint.leaves()
        mb = minibatch_of(inner, rec.minibatches, j, extras)
        loss_pi = problem.inner_loss(leaves["theta"], mb, eta_policy=eta)
        loss_v = value_losses(parts, leaves["critics"], v, idx)
        (grad,) = flat_grads(loss_pi + loss_v, joint)
        opt = optimizer_step(parts.joint_tx, (grad,), opt, (joint.flat,))
        total += float(loss_v.detach())
    new = _split(parts, state, joint, opt)
    share = grad_clip_share(state.theta_state, new.theta_state)
    return new, {**critic_stats(v, total, len(rec.minibatches)), "grad_clip_share": share}


def _joined(parts: Parts, state: BilevelState) -> tuple[FlatParams, Any]:
    """``[theta, stacked critics]`` as one flat vector and its joined optimizer state (the
    critics as one stacked ``[V_mix, V_ex]`` network: entry order ``parts.critic_order`` of
    ``critics.flat``)."""
    order = parts.critic_order
    assert order is not None
    crit = state.critics.views()
    stacked = stack_params([crit["v_mix"], crit["v_ex"]])
    joint = FlatParams({"theta": state.theta, "critics": stacked}, parts.settings.device)
    critic_state = permute_state(state.critic_state, order)
    layout = FlatLayout(state.theta)
    return joint, join_states(layout.flatten_state(state.theta_state), critic_state)


def _split(parts: Parts, state: BilevelState, joint: FlatParams, opt: Any) -> BilevelState:
    """The state with :func:`_joined`'s vector and optimizer state taken apart again."""
    layout = FlatLayout(state.theta)
    n_theta = sum(layout.sizes)
    theta_state, critic_state = split_state(opt, n_theta)
    inverse = torch.argsort(parts.critic_order)  # type: ignore[arg-type]
    critics = state.critics.copy()
    with torch.no_grad():
        critics.flat.copy_(joint.flat[n_theta:][inverse])
    return replace(
        state,
        critics=critics,
        theta={k: t.detach().clone() for k, t in joint.views()["theta"].items()},
        theta_state=detach_state(layout.unflatten_state(theta_state)),
        critic_state=permute_state(critic_state, inverse),
    )


def critic_stack_order(critics: FlatParams) -> Tensor:
    """Where each entry of the stacked critics (``stack_params([v_mix, v_ex])`` flattened:
    per parameter ``V_mix``'s then ``V_ex``'s) sits in ``critics.flat``."""
    idx = torch.arange(critics.flat.numel(), device=critics.flat.device)
    views = critics.views(idx)
    mix, ex = views["v_mix"], views["v_ex"]
    return torch.cat([torch.stack([mix[k], ex[k]]).reshape(-1) for k in mix])
