"""A bilevel run's networks, optimizers, engine problem and envs (:func:`build`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torchopt
from torch import Tensor

from metagrad_rl.networks import POLICIES, Critic, IntrinsicReward, Policy, params_of
from metagrad_rl.problems import ppo_meta_problem
from metagrad_rl.pytree import detach_state
from metagrad_rl.trainers import meta_grads, parallel
from metagrad_rl.trainers.bilevel.config import BilevelConfig
from metagrad_rl.trainers.bilevel.fused import critic_stack_order
from metagrad_rl.trainers.bilevel.settings import StepSettings
from metagrad_rl.trainers.bilevel.state import BilevelState, Parts, RoundRecord
from metagrad_rl.trainers.common import (
    FlatParams,
    optimizer_for,
    optimizer_state_from_list,
    to_device,
)
from metagrad_rl.trainers.meta_grad_pieces import UnrollInputs


def build(cfg: BilevelConfig, lr_restart: int = 0) -> tuple[Parts, BilevelState]:
    """Networks, optimizers, problem and envs of ``cfg``, and the state at step 0."""
    par = parallel.current()
    collector = par.make_collector(cfg)
    obs_dim, act_dim = collector.envs.obs_dim, collector.envs.act_dim
    reward_net = IntrinsicReward(obs_dim, act_dim, cfg.reward_hidden, cfg.bottleneck)
    cond_dim = reward_net.condition_dim
    policy = POLICIES[cfg.policy](obs_dim, act_dim, cfg.hidden, cfg.conditioning, cond_dim)
    v_mix, v_ex = Critic(obs_dim, cfg.hidden), Critic(obs_dim, cfg.hidden)
    parts = Parts(
        policy=policy,
        reward_net=reward_net,
        v_mix=v_mix,
        v_ex=v_ex,
        problem=build_problem(cfg, policy, reward_net, par.sum_over_workers),
        theta_tx=par.averaged(policy_optimizer(cfg, lr_restart)),
        critic_tx=par.averaged(policy_optimizer(cfg, lr_restart), plain=True),
        eta_tx=torchopt.adam(cfg.eta_lr, eps=cfg.adam_eps),
        collector=collector,
        update_gen=par.update_generator(cfg.seed),
        meta_grad=meta_grads.get(cfg.meta_grad),
        settings=StepSettings.of(cfg),
        par=par,
    )
    if par.distributed:
        parts.plain_problem = build_problem(cfg, policy, reward_net, par.plain_sum_over_workers)
    theta = to_device(detach_state(params_of(policy)), cfg.device)
    eta = to_device(detach_state(params_of(reward_net)), cfg.device)
    critics = FlatParams({"v_mix": params_of(v_mix), "v_ex": params_of(v_ex)}, cfg.device)
    segments = (sum(t.numel() for t in theta.values()), critics.flat.numel())
    joint = optimizer_for(cfg, cfg.adam_eps_root, lr_restart, segments)
    parts.joint_tx = par.averaged(joint, plain=True)
    parts.critic_order = critic_stack_order(critics)
    parts.unroll_inputs = UnrollInputs(
        parts.problem, partial(round_optimizer, cfg, parts), cfg.lookahead_steps, cfg.surrogate
    )
    par.sync_([*theta.values(), *eta.values(), critics.flat])
    state = BilevelState(
        theta=theta,
        eta=eta,
        critics=critics,
        theta_state=parts.theta_tx.init(theta),
        critic_state=parts.critic_tx.init((critics.flat,)),
        eta_state=parts.eta_tx.init(eta),
        lr_restart=lr_restart,
    )
    return parts, state


def build_problem(
    cfg: BilevelConfig,
    policy: Policy,
    reward_net: IntrinsicReward,
    sum_over_workers: Callable[[Tensor], Tensor] | None = None,
) -> Any:
    """The engine's problem for this config (:func:`metagrad_rl.problems.ppo_meta_problem`);
    ``sum_over_workers``: advantage statistics over the workers' union."""
    return ppo_meta_problem(
        policy,
        reward_net,
        gamma=cfg.gamma,
        lam=cfg.gae_lambda,
        clip=cfg.clip_coef,
        r_ex_coef=cfg.r_ex_coef,
        r_in_coef=cfg.r_in_coef,
        ent_coef=cfg.ent_coef,
        normalize_advantages=cfg.norm_adv,
        sum_over_workers=sum_over_workers,
    )


def policy_optimizer(cfg: BilevelConfig, lr_restart: int = 0) -> Any:
    """Clip-by-global-norm then Adam (annealed), on the policy alone; differentiable.

    The critics' optimizer is the same chain (their ``eps_root`` too), so that the plain
    round can step both as one vector (:attr:`Parts.joint_tx`).
    """
    return optimizer_for(cfg, eps_root=cfg.adam_eps_root, restart=lr_restart)


def round_optimizer(cfg: BilevelConfig, parts: Parts, rec: RoundRecord) -> tuple[Any, Any]:
    """The inner optimizer under the learning-rate schedule ``rec`` ran under (``--total-steps``
    may have changed since), and its state at ``rec`` (an estimator's
    :attr:`~metagrad_rl.trainers.meta_grad_pieces.UnrollInputs.optimizer_at`)."""
    tx = parts.theta_tx
    if rec.schedule is not None:
        restart, n = rec.schedule
        tx = parts.par.averaged(optimizer_for(cfg, cfg.adam_eps_root, restart, num_iterations=n))
    return tx, optimizer_state_from_list(tx.init(rec.theta), rec.opt_state)
