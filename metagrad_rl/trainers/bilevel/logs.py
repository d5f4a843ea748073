"""One ``progress.csv`` row of a bilevel iteration: PPO's columns, the critics', the intrinsic
reward's statistics and the estimator's (:func:`iteration_row`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from metagrad_rl.advantages import normalize
from metagrad_rl.networks import policy_log_prob
from metagrad_rl.ppo import clipped_surrogate_loss, surrogate_stats
from metagrad_rl.rollout import Batch
from metagrad_rl.trainers import meta_grads
from metagrad_rl.trainers.bilevel.state import BilevelState, Collected, MetaStep, Parts
from metagrad_rl.trainers.common import episode_row, lr_at


def policy_stats(parts: Parts, state: BilevelState, b: Batch, adv_mix: Tensor) -> dict[str, float]:
    """PPO's columns for the round just done, on the whole batch at ``theta_{k+1}``.

    ``pg_loss`` is the clipped surrogate of the mixed advantages, ``approx_kl`` and
    ``clip_frac`` compare ``pi_{theta_{k+1}, eta_{i+1}}`` with the behaviour policy, ``lr`` is
    the step size of the round's last update.
    """
    hp = parts.settings
    obs, act = b.obs.reshape(-1, b.obs.shape[-1]), b.act.reshape(-1, b.act.shape[-1])
    with torch.no_grad():
        logp = policy_log_prob(parts.policy, state.theta, obs, act, state.eta)
        adv = adv_mix.reshape(-1)
        adv = normalize(adv) if hp.norm_adv else adv
        old = b.logp.reshape(-1)
        pg = clipped_surrogate_loss(logp, old, adv, hp.clip_coef)
        stats = surrogate_stats(logp, old, hp.clip_coef)
        ent = parts.policy.entropy(state.theta)
    return {
        "pg_loss": float(pg),
        "entropy": float(ent),
        "approx_kl": float(stats.approx_kl),
        "clip_frac": float(stats.clip_fraction),
        "lr": lr_at(hp, state.iteration, state.lr_restart),
    }


def intrinsic_episode_returns(r_in: Tensor, episode_end: Tensor) -> list[float]:
    """Sums of ``r_in`` over the episodes that end inside the batch (env copy by copy)."""
    out = []
    r = r_in.detach().reshape(r_in.shape[0], -1).cpu().double().numpy()
    ends = episode_end.reshape(r.shape).cpu().bool().numpy()
    for n in range(r.shape[1]):
        acc = 0.0
        for x, end in zip(r[:, n].tolist(), ends[:, n].tolist()):
            acc += x
            if end:
                out.append(acc)
                acc = 0.0
    return out


def intrinsic_stats(r_in: Tensor, episode_end: Tensor) -> dict[str, Any]:
    """The intrinsic reward's statistics on ``tau_k`` (per step, and summed per episode)."""
    r_in, episode_end = r_in.cpu(), episode_end.cpu()  # a loop of scalar reads
    ret = intrinsic_episode_returns(r_in, episode_end)
    return {
        "intrinsic_return": float(np.mean(ret)) if ret else "",
        "intrinsic_reward_mean": float(r_in.mean()),
        "intrinsic_reward_std": float(r_in.std()) if r_in.numel() > 1 else 0.0,
        "intrinsic_reward_min": float(r_in.min()),
        "intrinsic_reward_max": float(r_in.max()),
    }


def meta_columns(mg: meta_grads.MetaGrad, step: MetaStep | None) -> dict[str, Any]:
    """The estimator's log columns (empty in the first iteration, before any meta-step)."""
    diag = {} if step is None else step.diagnostics
    keys = ("norm_applied", *mg.log_keys, "meta_steps_skipped")
    return {k: diag.get(k, "") for k in dict.fromkeys(keys)}


def iteration_row(
    parts: Parts,
    state: BilevelState,
    data: Collected,
    adv_mix: Tensor,
    r_in: Tensor,
    round_log: dict[str, float],
    step: MetaStep | None,
) -> dict[str, Any]:
    """The iteration's ``progress.csv`` row, after its rounds (``state.iteration`` not yet
    advanced); ``round_log`` holds the rounds' columns."""
    return {
        **episode_row(state.iteration + 1, data.rollout.episodes),
        **policy_stats(parts, state, data.batch, adv_mix),
        **round_log,
        **intrinsic_stats(r_in, data.batch.episode_end),
        **meta_columns(parts.meta_grad, step),
    }
