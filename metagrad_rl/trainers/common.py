"""Pieces every trainer shares: flat parameters, PPO's loss and update, envs, run bookkeeping.

The CLN and LIRPG trainers reuse these around their own meta-level step:

- :class:`FlatParams` (:mod:`.flat_params`) -- several modules' parameters as views of one flat
  leaf tensor, so that gradient clipping and Adam run on a single tensor (fast on CPU).
- :func:`make_collector` -- seeded envs with the observation/reward normalisers.
- :func:`ppo_loss` / :func:`ppo_update` (:mod:`.ppo_update`) -- PPO-clip with a TorchOpt
  optimizer applied functionally (``tx.update`` then ``torchopt.apply_updates``).
- :func:`make_optimizer` -- ``clip_grad_norm`` then Adam with a linearly annealed step size
  (:func:`annealed_lr`), the one optimizer builder of every trainer.
- :func:`optimizer_state_to_list` / :func:`optimizer_state_from_list` -- checkpointing.
- :func:`policy_snapshot` -- what ``metagrad-rl evaluate`` needs to rebuild a policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchopt
from torch import Tensor

from metagrad_rl.envs import ObsNormalizer, RewardScaler, VecEnv
from metagrad_rl.errors import ConfigError
from metagrad_rl.networks import Policy
from metagrad_rl.optim import INNER_OPTS, clip_grad_norm
from metagrad_rl.rollout import Collector
from metagrad_rl.trainers.flat_params import FlatParams, flat_grads
from metagrad_rl.trainers.ppo_update import (
    Minibatch,
    PPOCoefs,
    explained_variance,
    flatten_batch,
    normalize_parts,
    ppo_loss,
    ppo_update,
)

__all__ = [  # the names other modules import from here (the last seven re-exported)
    "annealed_lr",
    "collector_for",
    "episode_row",
    "linear_schedule",
    "lr_at",
    "make_collector",
    "make_optimizer",
    "optimizer_for",
    "optimizer_state_from_list",
    "optimizer_state_to_list",
    "policy_snapshot",
    "to_device",
    "FlatParams",
    "flat_grads",
    "Minibatch",
    "PPOCoefs",
    "explained_variance",
    "flatten_batch",
    "normalize_parts",
    "ppo_loss",
    "ppo_update",
]


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------
def make_collector(
    env_id: str,
    num_envs: int,
    seed: int,
    gamma: float,
    normalize_obs: bool = True,
    normalize_reward: bool = True,
    clip_obs: float = 10.0,
    clip_reward: float = 10.0,
    max_episode_steps: int | None = None,
) -> Collector:
    """``num_envs`` copies of ``env_id`` (copy ``i`` seeded ``seed + i``) with PPO's normalisers.

    The action noise is seeded from ``seed`` too (a separate stream).
    """
    envs = VecEnv(env_id, num_envs, seed, max_episode_steps)
    obs_norm = ObsNormalizer(envs.obs_dim, clip=clip_obs, enabled=normalize_obs)
    rew_scaler = RewardScaler(num_envs, gamma, clip=clip_reward, enabled=normalize_reward)
    return Collector(envs, obs_norm, rew_scaler, seed=seed + 1_000_003)


def collector_for(cfg: Any, seed: int | None = None) -> Collector:
    """:func:`make_collector` from a trainer config's fields (``seed`` overrides ``cfg.seed``)."""
    return make_collector(
        cfg.env,
        cfg.num_envs,
        cfg.seed if seed is None else seed,
        cfg.gamma,
        cfg.normalize_obs,
        cfg.normalize_reward,
        cfg.clip_obs,
        cfg.clip_reward,
        cfg.max_episode_steps or None,
    )


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------
def annealed_lr(lr: float, iteration: Any, num_iterations: int, restart: int = 0) -> Any:
    """CleanRL's annealing, restarted at iteration ``restart`` (0: never restarted).

    During iteration ``i`` (0-based) ``lr_i = lr (1 - (i - restart) / (num_iter - restart))``:
    ``lr`` at the start and linearly towards 0 at the last iteration. A resume that extends
    ``--total-steps`` restarts the annealing where it resumes (``restart`` = the iterations
    done): the step size goes back to ``lr`` and anneals to 0 at the new total.
    """
    return lr * (1.0 - (iteration - restart) / (num_iterations - restart))


def linear_schedule(
    lr: float, updates_per_iteration: int, num_iterations: int, anneal: bool, restart: int = 0
) -> Callable[[Any], Any]:
    """:func:`annealed_lr` as a TorchOpt schedule of the optimizer's update count."""

    def schedule(count: Any) -> Any:
        if not anneal:
            return lr
        return annealed_lr(lr, count // updates_per_iteration, num_iterations, restart)

    return schedule


def lr_at(cfg: Any, iteration: int, restart: int = 0) -> float:
    """The step size of ``cfg``'s optimizer during ``iteration`` (the ``lr`` log column)."""
    if not cfg.anneal_lr:
        return float(cfg.lr)
    return float(annealed_lr(cfg.lr, iteration, cfg.num_iterations, restart))


def make_optimizer(
    lr: float,
    updates_per_iteration: int,
    num_iterations: int,
    anneal_lr: bool = True,
    max_grad_norm: float | None = 0.5,
    eps: float = 1e-5,
    eps_root: float = 0.0,
    restart: int = 0,
    segments: Sequence[int] | None = None,
    inner_opt: str = "adam",
) -> torchopt.base.GradientTransformation:
    """``chain(clip_grad_norm(max_grad_norm), adam(schedule, eps, eps_root))``, or another
    update of :data:`metagrad_rl.optim.INNER_OPTS` (``inner_opt``) after the clip.

    The one optimizer builder of every trainer (PPO's policy + critic, the bilevel policy and
    critics). The clip is :func:`metagrad_rl.optim.clip_grad_norm` (its factor stays on the
    graph, so the chain is differentiable), the Adam TorchOpt's pure-Python one; ``eps_root``
    > 0 makes the unrolled update differentiable at ``v = 0``. ``segments``: the parameters
    are one flat vector of consecutive parts, each clipped by its own norm (the
    ``segments`` of :func:`metagrad_rl.optim.clip_grad_norm`).
    """
    schedule = linear_schedule(lr, updates_per_iteration, num_iterations, anneal_lr, restart)
    if inner_opt not in INNER_OPTS:
        raise ConfigError(
            f"inner_opt={inner_opt!r} is invalid: expected one of {tuple(INNER_OPTS)}"
        )
    update = INNER_OPTS[inner_opt](schedule, eps, eps_root)
    if max_grad_norm is None or math.isinf(max_grad_norm):
        return update
    return torchopt.chain(clip_grad_norm(max_grad_norm, segments=segments), update)


def optimizer_for(
    cfg: Any,
    eps_root: float = 0.0,
    restart: int = 0,
    segments: Sequence[int] | None = None,
    num_iterations: int | None = None,
) -> Any:
    """:func:`make_optimizer` from a trainer config's fields; ``num_iterations`` replaces the
    config's (the schedule a recorded round ran under)."""
    return make_optimizer(
        cfg.lr,
        cfg.steps_per_round,
        cfg.num_iterations if num_iterations is None else num_iterations,
        cfg.anneal_lr,
        cfg.max_grad_norm,
        cfg.adam_eps,
        eps_root,
        restart,
        segments,
        inner_opt=cfg.inner_opt,
    )


def optimizer_state_to_list(state: Any) -> list[Tensor]:
    """The optimizer state's tensors in pytree order (plain data for a checkpoint)."""
    leaves, _ = torchopt.pytree.tree_flatten(state)
    return [x.detach().clone() if isinstance(x, Tensor) else torch.tensor(x) for x in leaves]


def optimizer_state_from_list(template: Any, leaves: list[Tensor]) -> Any:
    """Rebuilds a state shaped like ``template`` (a fresh ``tx.init``) from saved tensors."""
    tmpl_leaves, treedef = torchopt.pytree.tree_flatten(template)
    if len(tmpl_leaves) != len(leaves):
        raise ConfigError(
            f"checkpoint optimizer state has {len(leaves)} tensors: expected {len(tmpl_leaves)}"
        )
    moved = [
        t.to(ref.device, copy=True) if isinstance(ref, Tensor) else t.clone()
        for t, ref in zip(leaves, tmpl_leaves)
    ]
    return torchopt.pytree.tree_unflatten(treedef, moved)


def to_device(tree: Any, device: torch.device | str) -> Any:
    """Every tensor of a pytree (dicts, lists, tuples) moved to ``device``."""
    return torchopt.pytree.tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, tree)


# ---------------------------------------------------------------------------------------------
# Checkpoint pieces
# ---------------------------------------------------------------------------------------------
def policy_snapshot(
    env_id: str,
    policy: Policy,
    theta: Mapping[str, Tensor],
    obs_norm: ObsNormalizer,
    hidden: tuple[int, ...],
    cond: Tensor | None = None,
    act_dim: int = 0,
    kind: str = "gaussian",
) -> dict[str, Any]:
    """Everything ``metagrad-rl evaluate`` needs to rebuild and run the policy."""
    return {
        "env_id": env_id,
        "kind": kind,
        "obs_dim": int(obs_norm.rms.mean.shape[0]),
        "act_dim": int(act_dim),
        "hidden": list(hidden),
        "conditioning": policy.conditioning,
        "cond": None if cond is None else cond.detach().cpu().clone(),
        "theta": {k: v.detach().cpu().clone() for k, v in theta.items()},
        "obs_norm": obs_norm.state_dict(),
        "obs_norm_enabled": bool(obs_norm.enabled),
        "obs_clip": float(obs_norm.clip),
    }


# ---------------------------------------------------------------------------------------------
# Run bookkeeping
# ---------------------------------------------------------------------------------------------
def episode_row(iteration: int, episodes: Any) -> dict[str, Any]:
    """The per-iteration log columns every trainer writes about finished episodes."""
    return {
        "iteration": iteration,
        "episodic_return": float(np.mean(episodes.returns)) if episodes.returns else "",
        "episodic_length": float(np.mean(episodes.lengths)) if episodes.lengths else "",
        "episodes": len(episodes.returns),
    }
