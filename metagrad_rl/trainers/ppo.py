"""PPO on continuous control (Schulman et al. 2017), with CleanRL's MuJoCo details.

Reads top to bottom like CleanRL's ``ppo_continuous_action.py``: set up, then per iteration
``ROLLOUT -> ADVANTAGES (GAE) -> PPO UPDATE -> LOG / CHECKPOINT``. The update is a TorchOpt
optimizer applied functionally (:func:`metagrad_rl.trainers.common.ppo_update`), the path the
meta-gradient trainers make differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from metagrad_rl import config as C
from metagrad_rl.advantages import gae
from metagrad_rl.envs import check_env_id
from metagrad_rl.errors import ConfigError
from metagrad_rl.networks import POLICIES, Critic, IntrinsicReward, Policy, params_of
from metagrad_rl.optim import INNER_OPTS
from metagrad_rl.rollout import Batch, Collector, Rollout, collect_rollout
from metagrad_rl.trainers import parallel
from metagrad_rl.trainers.common import (
    FlatParams,
    PPOCoefs,
    episode_row,
    explained_variance,
    flatten_batch,
    lr_at,
    optimizer_for,
    optimizer_state_from_list,
    optimizer_state_to_list,
    policy_snapshot,
    ppo_update,
)
from metagrad_rl.trainers.run import Progress, Run, begin, check_tensorboard, lr_restart_of

ALGO = "ppo"


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
    """Adam epsilon (also RMSProp's)."""
    inner_opt: str = "adam"
    """Update of the policy and the critics after the gradient-norm clip, from
    metagrad_rl.optim.INNER_OPTS: adam, sgd, momentum (0.9) or rmsprop; in the bilevel trainers
    the inner optimizer the meta-gradient differentiates through."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer sizes of policy and critic (tanh)."""
    policy: str = "gaussian"
    """Policy family, from metagrad_rl.networks.POLICIES (gaussian: CleanRL's MLP Gaussian)."""
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
    tensorboard: bool = False
    """Also write progress.csv's scalars as TensorBoard events under <out>/tensorboard (needs
    the optional tensorboard package: pip install 'metagrad_rl[tensorboard]')."""
    device: str = "cpu"
    """Torch device of the networks, updates and meta-gradient: cpu, cuda or cuda:N (the envs
    stay on the CPU; small MuJoCo networks are usually fastest on the CPU)."""

    def __post_init__(self) -> None:
        C.check_fields(self)  # types first: a 64 for hidden is one line, not a traceback
        check_env_id(self.env)
        for name in ("total_steps", "num_envs", "num_steps", "num_minibatches", "update_epochs"):
            C.positive_int(name, getattr(self, name))
        for name in ("checkpoint_every", "max_episode_steps"):
            C.nonnegative_int(name, getattr(self, name))
        C.positive_int("torch_threads", self.torch_threads)
        C.torch_device("device", self.device)
        if self.tensorboard:
            check_tensorboard()
        C.nonnegative_int("seed", self.seed)
        for name in ("lr", "clip_coef", "max_grad_norm", "adam_eps", "clip_obs", "clip_reward"):
            C.positive_float(name, getattr(self, name))
        for name in ("ent_coef", "vf_coef"):
            C.nonnegative_float(name, getattr(self, name))
        C.unit_interval("gamma", self.gamma)
        C.unit_interval("gae_lambda", self.gae_lambda)
        C.one_of("conditioning", self.conditioning, self.CONDITIONINGS)
        C.one_of("policy", self.policy, tuple(POLICIES))
        C.one_of("inner_opt", self.inner_opt, tuple(INNER_OPTS))
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

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps per iteration: the length of the minibatch schedule of one round."""
        size = math.ceil(self.batch_size / self.num_minibatches)
        return self.update_epochs * math.ceil(self.batch_size / size)

    @classmethod
    def field_choices(cls) -> dict[str, tuple[str, ...]]:
        """The accepted values of the fields that take a name (the CLI's ``choices``)."""
        return {
            "conditioning": cls.CONDITIONINGS,
            "policy": tuple(POLICIES),
            "inner_opt": tuple(INNER_OPTS),
        }

    def coefs(self) -> PPOCoefs:
        return PPOCoefs(self.clip_coef, self.clip_vloss, self.ent_coef, self.vf_coef, self.norm_adv)


@dataclass
class PPOParts:
    """The fixed pieces of a PPO run: networks (templates), optimizer, envs, minibatch RNG."""

    policy: Policy
    critic: Critic
    tx: Any
    collector: Collector
    update_gen: torch.Generator
    par: parallel.Parallel = field(default_factory=parallel.Parallel)
    """This worker (seeds, averaged optimizer, combined normalisers; no-op in one process)."""


@dataclass
class PPOState:
    """Everything that changes during a PPO run (and is checkpointed)."""

    params: FlatParams
    opt_state: Any
    lr_restart: int = 0
    global_step: int = 0
    iteration: int = 0
    recent: list[float] = field(default_factory=list)

    def to_checkpoint(self, parts: PPOParts, cfg: PPOConfig) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "iteration": self.iteration,
            "lr_restart": self.lr_restart,
            "params": self.params.state_dict(),
            "opt_state": optimizer_state_to_list(self.opt_state),
            "collector": parts.collector.state_dict(),
            "update_gen": parts.update_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "recent_returns": list(self.recent),
            "policy": policy_snapshot(
                cfg.env,
                parts.policy,
                self.params.views()["theta"],
                parts.collector.obs_norm,
                cfg.hidden,
                act_dim=parts.collector.envs.act_dim,
                kind=cfg.policy,
            ),
        }

    def load(self, ckpt: dict[str, Any], parts: PPOParts) -> None:
        if "update_gen" not in ckpt:
            raise ConfigError(
                "checkpoint was written by an older metagrad_rl (numpy minibatch RNG): resume "
                "it with that version, or start a new run"
            )
        self.params.load_state_dict(ckpt["params"])
        self.opt_state = optimizer_state_from_list(self.opt_state, ckpt["opt_state"])
        parts.collector.load_state_dict(ckpt["collector"])
        parts.update_gen.set_state(ckpt["update_gen"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.global_step, self.iteration = int(ckpt["global_step"]), int(ckpt["iteration"])
        self.recent = list(ckpt["recent_returns"])
        parts.par.resumed(ckpt, parts.collector)


def build(cfg: PPOConfig, lr_restart: int = 0) -> tuple[PPOParts, PPOState]:
    """Networks, optimizer and envs of ``cfg``, and the state at step 0.

    With several workers: envs, action noise and minibatch order seeded per rank, the
    gradient averaged first in the optimizer, the networks rank 0's (:mod:`.parallel`).
    """
    par = parallel.current()
    collector = par.make_collector(cfg)
    obs_dim, act_dim = collector.envs.obs_dim, collector.envs.act_dim
    IntrinsicReward(obs_dim, act_dim, cfg.reward_hidden, cfg.bottleneck)  # validates the shape
    policy = POLICIES[cfg.policy](obs_dim, act_dim, cfg.hidden, cfg.conditioning, None)
    critic = Critic(obs_dim, cfg.hidden)
    params = FlatParams({"theta": params_of(policy), "critic": params_of(critic)}, cfg.device)
    par.sync_([params.flat])
    tx = par.averaged(optimizer_for(cfg, restart=lr_restart), plain=True)
    gen = par.update_generator(cfg.seed)
    parts = PPOParts(policy, critic, tx, collector, gen, par)
    return parts, PPOState(params, tx.init((params.flat,)), lr_restart)


# ============================== ROLLOUT + ADVANTAGES (GAE) ========================================
def collect(cfg: PPOConfig, parts: PPOParts, state: PPOState) -> tuple[Rollout, Tensor, Tensor]:
    """A rollout of the current policy with its GAE advantages and returns."""
    views = state.params.views()
    rollout = collect_rollout(
        parts.collector,
        parts.policy,
        views["theta"],
        parts.critic,
        views["critic"],
        cfg.num_steps,
        device=cfg.device,
    )
    parts.par.combine_normalisers(parts.collector)
    rollout = rollout._replace(episodes=parts.par.union_episodes(rollout.episodes))
    state.global_step += cfg.batch_size
    b: Batch = rollout.batch
    with torch.no_grad():
        adv = gae(
            b.r_ex, b.values, b.next_values, b.terminated, b.episode_end, cfg.gamma, cfg.gae_lambda
        )
    return rollout, adv, adv + b.values


# ============================== PPO UPDATE =======================================================
def update(
    cfg: PPOConfig, parts: PPOParts, state: PPOState, b: Batch, adv: Tensor, returns: Tensor
) -> dict[str, float]:
    """``update_epochs`` passes of minibatch PPO (policy and critic share one flat Adam)."""
    data = flatten_batch(b, adv, returns)
    gen = parts.update_gen
    mbs = parts.par.schedule(cfg.batch_size, cfg.update_epochs, cfg.num_minibatches, gen)
    lr = lr_at(cfg, state.iteration, state.lr_restart)
    coefs = cfg.coefs()._replace(norm_groups=parts.par.norm_groups)
    state.opt_state, stats = ppo_update(
        parts.policy, parts.critic, state.params, parts.tx, state.opt_state, data, coefs, mbs
    )
    ev = explained_variance(data.old_values, data.returns)
    return {**stats, "explained_variance": ev, "lr": lr}


def train(
    config: PPOConfig,
    out: str | Path,
    resume: bool = False,
    progress: Progress | None = None,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Trains PPO, logging to ``out/progress.csv`` and checkpointing to ``out/checkpoint.pt``.

    ``progress(global_step, row)`` is called after each iteration. ``stop_at_step`` ends the run
    early (with a checkpoint) once that many steps are done -- an interruption that ``resume``
    continues exactly. Returns the summary also written to ``out/summary.json``.
    """
    cfg = config
    ckpt = begin(ALGO, cfg, out, resume)
    parts, s = build(cfg, lr_restart_of(ckpt, cfg))
    run = Run.open(ALGO, cfg, out, ckpt)
    if ckpt is not None:
        s.load(ckpt, parts)
    while run.keep_going(s.iteration, s.global_step, stop_at_step):
        rollout, adv, returns = collect(cfg, parts, s)
        stats = update(cfg, parts, s, rollout.batch, adv, returns)
        s.iteration += 1
        s.recent = (s.recent + rollout.episodes.returns)[-20:]
        run.log(s.global_step, {**episode_row(s.iteration, rollout.episodes), **stats}, progress)
        run.maybe_checkpoint(s.iteration, lambda: s.to_checkpoint(parts, cfg))
    parts.par.check_same([s.params.flat], "the policy and critic parameters")
    run.checkpoint(s.to_checkpoint(parts, cfg))
    return run.finish(parts.collector, {}, s.global_step, s.iteration, s.recent)
