"""The rollout ``tau_k ~ pi_{theta_k, eta_i}`` and the batches the rounds read from it."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from metagrad_rl.advantages import gae
from metagrad_rl.networks import intrinsic_reward
from metagrad_rl.rollout import Batch, collect_rollout, critic_values
from metagrad_rl.trainers.bilevel.settings import StepSettings
from metagrad_rl.trainers.bilevel.state import BilevelState, Collected, Parts, policy_condition


def collect(parts: Parts, state: BilevelState) -> tuple[BilevelState, Collected]:
    """Samples ``tau_k`` with the current policy; extrinsic advantages by ``V_ex``; the state
    with its step count advanced."""
    hp = parts.settings
    views = state.critics.views()
    rollout = collect_rollout(
        parts.collector,
        parts.policy,
        state.theta,
        parts.v_mix,
        views["v_mix"],
        hp.num_steps,
        policy_condition(hp, state.eta),
        device=hp.device,
    )
    parts.par.combine_normalisers(parts.collector)
    rollout = rollout._replace(episodes=parts.par.union_episodes(rollout.episodes))
    b = rollout.batch
    with torch.no_grad():
        ex_v = critic_values(parts.v_ex, views["v_ex"], b.obs)
        ex_v_next = critic_values(parts.v_ex, views["v_ex"], b.next_obs)
        adv_ex = gae(b.r_ex, ex_v, ex_v_next, b.terminated, b.episode_end, hp.gamma, hp.gae_lambda)
    state = replace(state, global_step=state.global_step + hp.batch_size)
    return state, Collected(rollout, ex_v, adv_ex)


def round_batch(batch: Batch, v_mix: Tensor, v_mix_next: Tensor) -> dict[str, Tensor]:
    """A rollout as the engine's round batch (:data:`metagrad_rl.problems.ROUND_KEYS`)."""
    return {
        "obs": batch.obs,
        "act": batch.act,
        "r_ex": batch.r_ex,
        "v_mix": v_mix,
        "v_mix_next": v_mix_next,
        "terminated": batch.terminated.to(batch.r_ex.dtype),
        "episode_end": batch.episode_end.to(batch.r_ex.dtype),
    }


def outer_batch(data: Collected) -> dict[str, Tensor]:
    """The validation batch of Eq 24: ``tau_{k+1}``'s states, actions and extrinsic advantages."""
    b = data.batch
    return {
        "obs": b.obs.reshape(-1, b.obs.shape[-1]),
        "act": b.act.reshape(-1, b.act.shape[-1]),
        "adv_ex": data.adv_ex.reshape(-1),
    }


def mixed_advantages(hp: StepSettings, b: Batch, r_in: Tensor) -> Tensor:
    """GAE of the policy's reward ``r_ex_coef r_ex + r_in_coef r_in`` by ``V_mix``."""
    r_mix = hp.r_ex_coef * b.r_ex + hp.r_in_coef * r_in
    with torch.no_grad():
        return gae(
            r_mix, b.values, b.next_values, b.terminated, b.episode_end, hp.gamma, hp.gae_lambda
        )


def intrinsic_rewards(parts: Parts, state: BilevelState, data: Collected) -> Tensor:
    """``r_in`` of ``tau_k``'s steps under the current ``eta`` (a constant)."""
    with torch.no_grad():
        return intrinsic_reward(parts.reward_net, state.eta, data.batch.obs, data.batch.act)
