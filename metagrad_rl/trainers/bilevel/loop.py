"""The bilevel training loop: the paper's algorithm box (Section 3.3), one named step a line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metagrad_rl.errors import DivergenceError
from metagrad_rl.trainers.bilevel import critics, fused, logs, policy, validation
from metagrad_rl.trainers.bilevel.build import build
from metagrad_rl.trainers.bilevel.collect import collect, intrinsic_rewards, mixed_advantages
from metagrad_rl.trainers.bilevel.config import BilevelConfig
from metagrad_rl.trainers.bilevel.state import BilevelState, Collected, MetaStep
from metagrad_rl.trainers.run import Progress, Run, begin, lr_restart_of


def train(
    config: BilevelConfig,
    out: str | Path,
    resume: bool = False,
    progress: Progress | None = None,
    stop_at_step: int | None = None,
    on_meta_step: Callable[[MetaStep], None] | None = None,
) -> dict[str, Any]:
    """Trains CLN or LIRPG (the config's ``ALGO``); same contract as the PPO trainer.

    ``on_meta_step`` receives every applied meta-gradient with its terms (tests, benchmarks).
    """
    cfg, algo = config, config.ALGO
    ckpt = begin(algo, cfg, out, resume)
    parts, s = build(cfg, lr_restart_of(ckpt, cfg))
    run = Run.open(algo, cfg, out, ckpt)
    if ckpt is not None:
        s = s.restored(ckpt, parts, cfg.device)
    unrolled = parts.meta_grad.continues_from_unroll
    while run.keep_going(s.iteration, s.global_step, stop_at_step):
        # ---- tau_k ~ pi_{theta_k, eta_i}
        s, data = collect(parts, s)
        # ---- Eq 24: the meta-gradient of the pending round on tau_k; eta_i -> eta_{i+1}
        s, step = validation.validation_round(parts, s, data)
        if step is not None and on_meta_step is not None:
            on_meta_step(step)
        r_in = intrinsic_rewards(parts, s, data)
        adv_mix = mixed_advantages(parts.settings, data.batch, r_in)
        # ---- Eq 23: theta_k -> theta_{k+1} on tau_k with eta_{i+1}; then V_mix, V_ex
        s = policy.record_round(parts, s, data)
        if unrolled:  # theta_{k+1} is the estimator's differentiable unroll of this round
            s, policy_log = policy.policy_round(s)
            s, critic_log = critics.critic_round(parts, s, data, adv_mix)
            round_log = {**critic_log, **policy_log}
        else:  # nothing to differentiate: policy and critics step together
            s, round_log = fused.fused_round(parts, s, data, adv_mix)
        check_diverged(s, data)
        # ---- log, checkpoint
        row = logs.iteration_row(parts, s, data, adv_mix, r_in, round_log, step)
        s = end_iteration(s, data)
        run.log(s.global_step, row, progress)
        run.maybe_checkpoint(s.iteration, partial(s.to_checkpoint, parts, cfg))
    tensors = [*s.theta.values(), *s.eta.values(), s.critics.flat]
    parts.par.check_same(tensors, "theta, eta and the critics")
    run.checkpoint(s.to_checkpoint(parts, cfg))
    extra = {"meta_grad": cfg.meta_grad, "meta_steps_skipped": s.meta_steps_skipped}
    return run.finish(parts.collector, extra, s.global_step, s.iteration, s.recent)


def end_iteration(state: BilevelState, data: Collected) -> BilevelState:
    """The state one iteration on, with the last 20 finished episodes' returns."""
    recent = (state.recent + data.rollout.episodes.returns)[-20:]
    return replace(state, iteration=state.iteration + 1, recent=recent)


def check_diverged(state: BilevelState, data: Collected) -> None:
    """Raise :class:`DivergenceError` when the policy round left ``theta`` non-finite."""
    bad = [k for k, v in state.theta.items() if not bool(torch.isfinite(v).all())]
    if bad:
        eps = data.rollout.episodes.returns
        ret = f"{np.mean(eps):.1f}" if eps else "none finished"
        raise DivergenceError(
            f"training diverged at iteration {state.iteration + 1} (step {state.global_step}): "
            f"the policy round left theta{bad} non-finite (the batch's mean return was {ret}); "
            "--resume restarts from the last checkpoint, a lower --lr or --max-grad-norm "
            "may avoid it"
        )
