"""PPO on continuous control (Schulman et al. 2017), with CleanRL's MuJoCo details.

Reads top to bottom like CleanRL's ``ppo_continuous_action.py``: set up, then per iteration
``ROLLOUT -> ADVANTAGES (GAE) -> PPO UPDATE -> LOG / CHECKPOINT``. The update is a TorchOpt
optimizer applied functionally (:func:`metagrad_rl.trainers.common.ppo_update`), the path the
meta-gradient trainers make differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from metagrad_rl import config as C
from metagrad_rl.advantages import gae
from metagrad_rl.checkpoint import load_checkpoint, save_checkpoint
from metagrad_rl.envs import check_env_id
from metagrad_rl.errors import ConfigError
from metagrad_rl.logging import (
    CHECKPOINT_FILE,
    RunLogger,
    prepare_run_dir,
    write_run_config,
)
from metagrad_rl.networks import Critic, GaussianPolicy, IntrinsicReward, params_of
from metagrad_rl.rollout import collect_rollout
from metagrad_rl.trainers.common import (
    FlatParams,
    PPOCoefs,
    collector_for,
    episode_row,
    explained_variance,
    finish_run,
    flatten_batch,
    make_optimizer,
    optimizer_state_from_list,
    optimizer_state_to_list,
    policy_snapshot,
    ppo_update,
    rng_state,
    set_rng_state,
)

ALGO = "ppo"
#: Fields that may differ between a run and its ``--resume``.
RESUMABLE_CHANGES = ("total_steps", "checkpoint_every", "torch_threads")


@dataclass
class PPOConfig:
    """Hyperparameters of PPO (CleanRL's MuJoCo defaults)."""

    #: Accepted values of ``conditioning`` (a CLN policy needs an intrinsic reward).
    CONDITIONINGS: ClassVar[tuple[str, ...]] = ("none", "layernorm")

    env: str = "Hopper-v5"
    """Gymnasium environment id (continuous Box action space)."""
    total_steps: int = 1_000_000
    """Total environment steps (summed over env copies)."""
    seed: int = 1
    """Seed of network init, envs (copy i gets seed+i), action noise and minibatch order."""
    num_envs: int = 1
    """Number of env copies stepped in lockstep."""
    num_steps: int = 2048
    """Steps per env copy per rollout (the batch is num_steps * num_envs)."""
    lr: float = 3e-4
    """Adam step size of policy and critic."""
    anneal_lr: bool = True
    """Anneal the step size linearly to 0 over the run."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    num_minibatches: int = 32
    """Minibatches per epoch."""
    update_epochs: int = 10
    """Passes over each batch."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon (also the value clip)."""
    clip_vloss: bool = True
    """Use PPO's clipped value loss."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    adam_eps: float = 1e-5
    """Adam epsilon."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer sizes of policy and critic (tanh)."""
    conditioning: str = "none"
    """Normalisation of the policy's last hidden layer: none or layernorm (cln needs eta)."""
    reward_hidden: tuple[int, ...] = (64, 64)
    """Hidden sizes of the intrinsic-reward net (checked for every algo; used by lirpg/cln)."""
    bottleneck: int = 8
    """Width of the reward net's linear bottleneck (<= its last hidden layer)."""
    normalize_obs: bool = True
    """Running observation normalisation."""
    normalize_reward: bool = True
    """Reward scaling by the running std of the discounted return."""
    clip_obs: float = 10.0
    """Clip of normalised observations."""
    clip_reward: float = 10.0
    """Clip of scaled rewards."""
    max_episode_steps: int = 0
    """Episode time limit; 0 keeps the env's registered limit."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many iterations (0: only at the end)."""
    torch_threads: int = 1
    """torch.set_num_threads for this run (small nets are fastest on 1)."""

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        self.reward_hidden = tuple(self.reward_hidden)
        check_env_id(self.env)
        for name in ("total_steps", "num_envs", "num_steps", "num_minibatches", "update_epochs"):
            C.positive_int(name, getattr(self, name))
        for name in ("checkpoint_every", "max_episode_steps"):
            C.nonnegative_int(name, getattr(self, name))
        C.positive_int("torch_threads", self.torch_threads)
        C.nonnegative_int("seed", self.seed)
        for name in ("lr", "clip_coef", "max_grad_norm", "adam_eps", "clip_obs", "clip_reward"):
            C.positive_float(name, getattr(self, name))
        for name in ("ent_coef", "vf_coef"):
            C.nonnegative_float(name, getattr(self, name))
        C.unit_interval("gamma", self.gamma)
        C.unit_interval("gae_lambda", self.gae_lambda)
        C.one_of("conditioning", self.conditioning, self.CONDITIONINGS)
        for name in ("hidden", "reward_hidden"):
            sizes = getattr(self, name)
            if not sizes or any(
                isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in sizes
            ):
                raise ConfigError(f"{name}={list(sizes)} is invalid: expected positive ints")
        C.positive_int("bottleneck", self.bottleneck)
        if self.bottleneck > self.reward_hidden[-1]:
            raise ConfigError(
                f"bottleneck={self.bottleneck} is wider than its input layer "
                f"({self.reward_hidden[-1]} units): expected 1 <= bottleneck <= "
                f"{self.reward_hidden[-1]}"
            )
        if self.batch_size < self.num_minibatches:
            raise ConfigError(
                f"num_minibatches={self.num_minibatches} exceeds the batch of "
                f"{self.batch_size} steps: expected num_minibatches <= num_steps * num_envs"
            )
        if self.num_iterations == 0:
            raise ConfigError(
                f"total_steps={self.total_steps} is less than one rollout "
                f"(num_steps * num_envs = {self.batch_size}): expected total_steps >= "
                f"{self.batch_size}"
            )

    @property
    def batch_size(self) -> int:
        return self.num_steps * self.num_envs

    @property
    def num_iterations(self) -> int:
        return self.total_steps // self.batch_size

    def coefs(self) -> PPOCoefs:
        return PPOCoefs(self.clip_coef, self.clip_vloss, self.ent_coef, self.vf_coef, self.norm_adv)


def check_resume_config(saved: dict[str, Any], config: PPOConfig) -> None:
    """A resumed run keeps its hyperparameters; only :data:`RESUMABLE_CHANGES` may differ."""
    now = C.to_dict(config)
    for k, v in saved.items():
        if k not in RESUMABLE_CHANGES and now.get(k) != v:
            raise ConfigError(
                f"--{k.replace('_', '-')}={now.get(k)!r} differs from the resumed run's {v!r}: "
                f"a resumed run may change only {', '.join(RESUMABLE_CHANGES)}"
            )


def train(
    config: PPOConfig,
    out: str | Path,
    resume: bool = False,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Trains PPO, logging to ``out/progress.csv`` and checkpointing to ``out/checkpoint.pt``.

    ``progress(global_step, row)`` is called after each iteration. ``stop_at_step`` ends the run
    early (with a checkpoint) once that many steps are done -- an interruption that ``resume``
    continues exactly. Returns the summary also written to ``out/summary.json``.
    """
    cfg = config
    # ============================== SETUP =========================================================
    ckpt = load_checkpoint(Path(out) / CHECKPOINT_FILE) if resume else None
    if ckpt is not None:
        check_resume_config(ckpt["config"], cfg)
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    collector = collector_for(cfg)
    obs_dim, act_dim = collector.envs.obs_dim, collector.envs.act_dim
    IntrinsicReward(obs_dim, act_dim, cfg.reward_hidden, cfg.bottleneck)  # validates the shape
    policy = GaussianPolicy(obs_dim, act_dim, cfg.hidden, conditioning=cfg.conditioning)
    critic = Critic(obs_dim, cfg.hidden)
    params = FlatParams({"theta": params_of(policy), "critic": params_of(critic)})
    updates_per_iteration = cfg.update_epochs * math.ceil(
        cfg.batch_size / (cfg.batch_size // cfg.num_minibatches)
    )
    tx = make_optimizer(
        cfg.lr,
        updates_per_iteration,
        cfg.num_iterations,
        cfg.anneal_lr,
        cfg.max_grad_norm,
        cfg.adam_eps,
    )
    opt_state = tx.init((params.flat,))
    update_rng = np.random.default_rng(cfg.seed + 2_000_003)
    run_dir = prepare_run_dir(out, resume)
    global_step, iteration = 0, 0
    if ckpt is not None:
        params.load_state_dict(ckpt["params"])
        opt_state = optimizer_state_from_list(opt_state, ckpt["opt_state"])
        collector.load_state_dict(ckpt["collector"])
        set_rng_state(update_rng, ckpt["update_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        global_step, iteration = int(ckpt["global_step"]), int(ckpt["iteration"])
    write_run_config(run_dir, ALGO, C.to_dict(cfg))
    logger = RunLogger(run_dir, resume_step=global_step if resume else None)
    recent: list[float] = list(ckpt["recent_returns"]) if ckpt is not None else []

    def checkpoint() -> None:
        save_checkpoint(
            run_dir / CHECKPOINT_FILE,
            {
                "algo": ALGO,
                "config": C.to_dict(cfg),
                "global_step": global_step,
                "iteration": iteration,
                "params": params.state_dict(),
                "opt_state": optimizer_state_to_list(opt_state),
                "collector": collector.state_dict(),
                "update_rng": rng_state(update_rng),
                "torch_rng": torch.get_rng_state(),
                "recent_returns": list(recent),
                "policy": policy_snapshot(
                    cfg.env, policy, params.views()["theta"], collector.obs_norm, cfg.hidden
                ),
            },
        )

    while iteration < cfg.num_iterations:
        if stop_at_step is not None and global_step >= stop_at_step:
            break
        lr_now = cfg.lr * (1.0 - iteration / cfg.num_iterations) if cfg.anneal_lr else cfg.lr
        # ============================== ROLLOUT ===================================================
        views = params.views()
        rollout = collect_rollout(
            collector, policy, views["theta"], critic, views["critic"], cfg.num_steps
        )
        batch = rollout.batch
        global_step += cfg.batch_size
        # ============================== ADVANTAGES (GAE) ==========================================
        with torch.no_grad():
            adv = gae(
                batch.r_ex,
                batch.values,
                batch.next_values,
                batch.terminated,
                batch.episode_end,
                cfg.gamma,
                cfg.gae_lambda,
            )
            returns = adv + batch.values
        # ============================== PPO UPDATE ================================================
        data = flatten_batch(batch, adv, returns)
        opt_state, stats = ppo_update(
            policy,
            critic,
            params,
            tx,
            opt_state,
            data,
            cfg.coefs(),
            cfg.update_epochs,
            cfg.num_minibatches,
            update_rng,
        )
        iteration += 1
        # ============================== LOG / CHECKPOINT ==========================================
        recent = (recent + rollout.episodes.returns)[-20:]
        eps = rollout.episodes
        row = logger.log(
            global_step,
            cfg.batch_size,
            {
                **episode_row(iteration, eps),
                **stats,
                "explained_variance": explained_variance(data.old_values, data.returns),
                "lr": lr_now,
            },
        )
        if cfg.checkpoint_every and iteration % cfg.checkpoint_every == 0:
            checkpoint()
        if progress is not None:
            progress(global_step, row)
    checkpoint()
    fields = {"algo": ALGO, "env": cfg.env, "seed": cfg.seed}
    finished = iteration >= cfg.num_iterations
    return finish_run(run_dir, collector, logger, fields, global_step, finished, recent)
