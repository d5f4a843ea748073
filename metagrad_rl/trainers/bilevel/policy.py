"""The policy round (Eq 23): PPO-clip on the mixed advantages of ``tau_k`` with ``eta_{i+1}``,
``theta_k -> theta_{k+1}``, recorded as the pending round its validation round differentiates.

:func:`record_round` records ``tau_k`` (and starts the estimator's unroll when it needs one
now); :func:`policy_round` takes ``theta_{k+1}`` from an estimator that unrolls the real round
(the critics then regress apart, :func:`~metagrad_rl.trainers.bilevel.critics.critic_round`);
every other estimator's round is :func:`~metagrad_rl.trainers.bilevel.fused.fused_round`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metagrad_rl.optim import clip_counts
from metagrad_rl.trainers.bilevel.collect import round_batch
from metagrad_rl.trainers.bilevel.state import BilevelState, Collected, Parts, RoundRecord
from metagrad_rl.trainers.common import optimizer_state_to_list
from metagrad_rl.unroll import minibatch_indices


def record_round(parts: Parts, state: BilevelState, data: Collected) -> BilevelState:
    """The state with ``tau_k`` as its pending :class:`RoundRecord`: ``theta_k``, its optimizer
    state, the round batch, this round's minibatch order and ``eta_{i+1}``. An estimator that
    unrolls this round alone (the real round or its look-ahead) starts its unroll here; a
    multi-round one starts in its meta-step, from the history."""
    mg, b, eps = parts.meta_grad, data.batch, data.rollout.episodes
    rec = RoundRecord(
        theta=state.theta,
        opt_state=optimizer_state_to_list(state.theta_state),
        batch=round_batch(b, b.values, b.next_values),
        minibatches=round_schedule(parts.settings, parts.update_gen, parts.par),
        eta=state.eta,
        j_hat=float(np.mean(eps.returns)) if eps.returns else None,
        schedule=(state.lr_restart, parts.settings.num_iterations),
    )
    rec.graph = mg.start_at_record(rec, parts.unroll_inputs)
    return replace(state, pending=rec)


def policy_round(state: BilevelState) -> tuple[BilevelState, dict[str, float]]:
    """Eq 23 as the pending round's differentiable unroll: the state with its output
    ``theta_{k+1}`` and optimizer state (the graph stays in the record for Eq 24)."""
    graph = state.pending.graph if state.pending is not None else None
    assert graph is not None, "record_round starts the unroll of an estimator that needs it"
    new = replace(state, theta=graph.theta_next, theta_state=graph.opt_state)
    return new, {"grad_clip_share": grad_clip_share(state.theta_state, new.theta_state)}


def grad_clip_share(before: Any, after: Any) -> float:
    """The share of the round's optimizer steps whose gradient norm was clipped."""
    (fired0, steps0), (fired1, steps1) = clip_counts(before), clip_counts(after)
    return (fired1 - fired0) / max(1, steps1 - steps0)


def round_schedule(hp: Any, gen: torch.Generator, par: Any = None) -> list[Tensor]:
    """The round's minibatch order (:func:`metagrad_rl.unroll.minibatch_indices`) for the
    ``batch_size``, ``update_epochs`` and ``num_minibatches`` of ``hp`` (the
    :class:`~metagrad_rl.trainers.bilevel.settings.StepSettings` or a config); with the
    learner of ``N`` rollout workers (``par``), the union of the workers' orders."""
    if par is not None:
        return list(par.schedule(hp.batch_size, hp.update_epochs, hp.num_minibatches, gen))
    return minibatch_indices(hp.batch_size, hp.update_epochs, hp.num_minibatches, gen)
