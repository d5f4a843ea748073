"""The chosen estimator's differentiable unroll of a recorded policy round (or its look-ahead)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metagrad_rl.metagrad import PendingMetaGradient, start_meta_gradient
from metagrad_rl.trainers.bilevel.config import BilevelConfig
from metagrad_rl.trainers.bilevel.state import Parts, RoundRecord
from metagrad_rl.trainers.common import make_optimizer, optimizer_state_from_list


def start_unroll(
    cfg: BilevelConfig,
    parts: Parts,
    rec: RoundRecord,
    history: Sequence[RoundRecord] = (),
) -> PendingMetaGradient:
    """The estimator's differentiable unroll of ``rec`` (its
    :class:`~metagrad_rl.trainers.meta_grads.Unroll`).

    An unroll that keeps ``R - 1`` past rounds unrolls those of ``history`` (fewer early in a
    run) and then ``rec``'s, from the oldest one's ``theta`` and optimizer state, every round
    at ``rec.eta``.
    """
    unroll = parts.meta_grad.unroll
    assert unroll is not None, "an estimator without an unroll starts none"
    past = list(history)[-unroll.keeps :] if unroll.keeps else []
    first = past[0] if past else rec
    tx = round_optimizer(cfg, parts, first)
    state = optimizer_state_from_list(tx.init(first.theta), first.opt_state)
    rounds = unroll.rounds(rec, past, cfg.lookahead_steps)
    return start_meta_gradient(
        parts.problem,
        tx,
        first.theta,
        rec.eta,
        rounds,
        opt_state=state,
        surrogate=cfg.surrogate,
        terms=unroll.terms,
        truncate=unroll.truncate,
        checkpoint_every=unroll.checkpoint_every,
    )


def round_optimizer(cfg: BilevelConfig, parts: Parts, rec: RoundRecord) -> Any:
    """The inner optimizer under the learning-rate schedule ``rec`` ran under (``--total-steps``
    may have changed since)."""
    if rec.schedule is None:
        return parts.theta_tx
    restart, n = rec.schedule
    return parts.par.averaged(
        make_optimizer(
            cfg.lr,
            cfg.steps_per_round,
            n,
            cfg.anneal_lr,
            cfg.max_grad_norm,
            cfg.adam_eps,
            cfg.adam_eps_root,
            restart,
            inner_opt=cfg.inner_opt,
        )
    )
