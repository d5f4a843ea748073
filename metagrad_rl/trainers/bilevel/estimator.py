"""The chosen estimator's differentiable unroll of a recorded policy round (or its look-ahead)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from metagrad_rl.metagrad import PendingMetaGradient, start_meta_gradient
from metagrad_rl.trainers.bilevel.config import BilevelConfig
from metagrad_rl.trainers.bilevel.state import Parts, RoundRecord
from metagrad_rl.trainers.common import make_optimizer, optimizer_state_from_list
from metagrad_rl.unroll import Round


def start_unroll(
    cfg: BilevelConfig,
    parts: Parts,
    rec: RoundRecord,
    history: Sequence[RoundRecord] = (),
) -> PendingMetaGradient:
    """The estimator's differentiable unroll of ``rec`` (the real round or the look-ahead).

    A multi-round estimator (``rounds = R > 1``) unrolls the stored rounds of ``history`` (the
    last ``R - 1`` before ``rec``, fewer early in a run) and then ``rec``'s, from the oldest
    one's ``theta`` and optimizer state, every round at ``rec.eta``.
    """
    mg = parts.meta_grad
    past = list(history)[-(mg.rounds - 1) :] if mg.rounds > 1 else []
    first = past[0] if past else rec
    tx = round_optimizer(cfg, parts, first)
    state = optimizer_state_from_list(tx.init(first.theta), first.opt_state)
    if mg.unroll == "round":
        rounds = [Round(r.batch, r.minibatches) for r in (*past, rec)]
    else:
        full = torch.arange(rec.batch["r_ex"].numel())
        rounds = [Round(rec.batch, [full] * cfg.lookahead_steps)]
    return start_meta_gradient(
        parts.problem,
        tx,
        first.theta,
        rec.eta,
        rounds,
        opt_state=state,
        surrogate=cfg.surrogate,
        terms=mg.terms,
        truncate=mg.truncate,
        checkpoint_every=mg.checkpoint_every,
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
        )
    )
