"""Pieces every trainer shares: flat parameters, PPO's loss and update, envs, run bookkeeping.

The CLN and LIRPG trainers reuse these around their own meta-level step:

- :class:`FlatParams` -- several modules' parameters as views of one flat leaf tensor, so that
  gradient clipping and Adam run on a single tensor (fast on CPU) while networks still receive
  the ``{name: tensor}`` dicts that :func:`torch.func.functional_call` expects.
- :func:`make_collector` -- seeded envs with the observation/reward normalisers.
- :func:`ppo_loss` / :func:`ppo_update` -- PPO-clip with a TorchOpt optimizer applied
  functionally (``tx.update`` then ``torchopt.apply_updates``).
- :func:`make_optimizer` -- ``clip_grad_norm`` then Adam with a linearly annealed step size
  (:func:`annealed_lr`), the one optimizer builder of every trainer.
- :func:`optimizer_state_to_list` / :func:`optimizer_state_from_list` -- checkpointing.
- :func:`policy_snapshot` -- what ``metagrad-rl evaluate`` needs to rebuild a policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torchopt
from torch import Tensor

from metagrad_rl.advantages import normalize
from metagrad_rl.envs import ObsNormalizer, RewardScaler, VecEnv
from metagrad_rl.errors import ConfigError
from metagrad_rl.flat import FlatLayout
from metagrad_rl.networks import Critic, Policy
from metagrad_rl.optim import INNER_OPTS, clip_grad_norm
from metagrad_rl.ppo import clipped_surrogate_loss, surrogate_stats, value_loss
from metagrad_rl.pytree import Params
from metagrad_rl.rollout import Batch, Collector, critic_values


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
class FlatParams:
    """Named parameter groups stored in one flat tensor, for a fast single-tensor optimizer.

    ``FlatParams({"theta": params_of(policy), "critic": params_of(critic)})`` copies the
    tensors into :attr:`flat` (no grad). Two ways to read them:

    - :meth:`leaves` -- ``{group: {name: leaf}}``: leaf tensors (``requires_grad``) that share
      :attr:`flat`'s memory, so an in-place update of ``flat`` updates them. With
      :meth:`flat_grad` this is the fast path of the plain PPO update.
    - :meth:`views` -- differentiable views of any flat tensor (e.g. a ``theta'`` produced by a
      differentiable optimizer step).
    """

    def __init__(
        self, groups: Mapping[str, Mapping[str, Tensor]], device: torch.device | str = "cpu"
    ) -> None:
        self.groups = {g: list(params) for g, params in groups.items()}
        named = {f"{g}/{n}": p.detach() for g, params in groups.items() for n, p in params.items()}
        self.layout = FlatLayout(named)  # the one flatten of the project (metagrad_rl.flat)
        self.flat = self.layout.flatten(named).to(device, copy=True)
        self._leaves = self.views(self.flat.detach())
        for group in self._leaves.values():
            for t in group.values():
                t.requires_grad_(True)
        self._leaf_list = [t for group in self._leaves.values() for t in group.values()]

    def leaves(self) -> dict[str, Params]:
        """``{group: {name: leaf}}`` sharing :attr:`flat`'s memory (see the class docstring)."""
        return self._leaves

    def flat_grad(self, loss: Tensor) -> Tensor:
        """``d loss / d flat`` through :meth:`leaves` (one flat tensor, in :attr:`flat`'s order)."""
        return flat_grads(loss, self)[0]

    def views(self, flat: Tensor | None = None) -> dict[str, Params]:
        """``{group: {name: view}}`` of ``flat`` (default: :attr:`flat`), differentiable."""
        parts = self.layout.unflatten(self.flat if flat is None else flat)
        return {g: {n: parts[f"{g}/{n}"] for n in names} for g, names in self.groups.items()}

    def state_dict(self) -> dict[str, Params]:
        """Detached copies of every group, keyed as the modules key them."""
        return {g: {k: v.detach().clone() for k, v in p.items()} for g, p in self.views().items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        named = {}
        for key, shape in zip(self.layout.names, self.layout.shapes):
            g, name = key.split("/", 1)
            t = state.get(g, {}).get(name)
            if t is None or tuple(t.shape) != tuple(shape):
                got = None if t is None else tuple(t.shape)
                raise ConfigError(
                    f"checkpoint parameter {g}.{name} has shape {got}: expected {tuple(shape)}"
                )
            named[key] = t
        with torch.no_grad():
            self.flat.copy_(self.layout.flatten(named))


def flat_grads(loss: Tensor, *params: FlatParams) -> list[Tensor]:
    """``d loss / d flat`` of several :class:`FlatParams` in one backward pass."""
    leaves = [t for p in params for t in p._leaf_list]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    out, i = [], 0
    for p in params:
        n = len(p._leaf_list)
        parts = [
            torch.zeros(t.numel(), device=t.device) if g is None else g.reshape(-1)
            for g, t in zip(grads[i : i + n], p._leaf_list)
        ]
        out.append(torch.cat(parts))
        i += n
    return out


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
# PPO loss and update
# ---------------------------------------------------------------------------------------------
class Minibatch(NamedTuple):
    """Flat (``[B, ...]``) PPO training data; everything is a constant of the loss."""

    obs: Tensor
    act: Tensor
    old_logp: Tensor
    adv: Tensor
    returns: Tensor
    old_values: Tensor


class PPOCoefs(NamedTuple):
    """Loss coefficients (CleanRL names): clip, clipped value loss, entropy, value, adv norm;
    ``norm_groups``: the advantages of a minibatch are normalised in this many equal,
    contiguous parts (a rollout learner's minibatch holds one part per worker, each of which
    the all-reduce mode's worker would normalise on its own)."""

    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    norm_adv: bool = True
    norm_groups: int = 1


def ppo_loss(
    policy: Policy,
    critic: Critic,
    theta: Mapping[str, Tensor],
    critic_params: Mapping[str, Tensor],
    mb: Minibatch,
    coefs: PPOCoefs,
    cond: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``L = L_clip + vf_coef L_V - ent_coef H`` on one minibatch; returns ``(L, aux)``.

    Advantages are normalised per minibatch when ``coefs.norm_adv``. ``aux`` holds detached
    diagnostics (``pg_loss``, ``v_loss``, ``entropy``, ``approx_kl``, ``clip_frac``).
    """
    logp = policy.log_prob(theta, mb.obs, mb.act, cond)
    adv = mb.adv
    if coefs.norm_adv:
        adv = normalize(adv) if coefs.norm_groups == 1 else normalize_parts(adv, coefs.norm_groups)
    pg_loss = clipped_surrogate_loss(logp, mb.old_logp, adv, coefs.clip_coef)
    values = critic_values(critic, critic_params, mb.obs)
    v_clip = coefs.clip_coef if coefs.clip_vloss else None
    v_loss = value_loss(values, mb.returns, mb.old_values, v_clip)
    entropy = policy.entropy(theta)
    loss = pg_loss + coefs.vf_coef * v_loss - coefs.ent_coef * entropy
    stats = surrogate_stats(logp, mb.old_logp, coefs.clip_coef)
    aux = {
        "pg_loss": pg_loss.detach(),
        "v_loss": v_loss.detach(),
        "entropy": entropy.detach(),
        "approx_kl": stats.approx_kl,
        "clip_frac": stats.clip_fraction,
    }
    return loss, aux


def normalize_parts(x: Tensor, parts: int) -> Tensor:
    """:func:`~metagrad_rl.advantages.normalize` of each of ``parts`` equal slices of ``x``."""
    if x.numel() % parts:
        raise ConfigError(f"{x.numel()} advantages do not split into {parts} equal parts")
    return torch.cat([normalize(c) for c in x.chunk(parts)])


def flatten_batch(batch: Batch, adv: Tensor, returns: Tensor) -> Minibatch:
    """Merges the time and env axes of a rollout into PPO's ``[T*N, ...]`` training data."""
    n = batch.logp.numel()
    return Minibatch(
        obs=batch.obs.reshape(n, -1),
        act=batch.act.reshape(n, -1),
        old_logp=batch.logp.reshape(n),
        adv=adv.reshape(n).detach(),
        returns=returns.reshape(n).detach(),
        old_values=batch.values.reshape(n),
    )


def ppo_update(
    policy: Policy,
    critic: Critic,
    params: FlatParams,
    tx: torchopt.base.GradientTransformation,
    opt_state: Any,
    data: Minibatch,
    coefs: PPOCoefs,
    minibatches: Sequence[Tensor],
    cond: Tensor | None = None,
    theta_key: str = "theta",
    critic_key: str = "critic",
) -> tuple[Any, dict[str, float]]:
    """Minibatch PPO over ``data`` in the order ``minibatches``; updates ``params.flat`` in place.

    ``minibatches`` is the round's schedule (:func:`metagrad_rl.unroll.minibatch_indices`:
    epochs x shuffled minibatches), the same schedule the bilevel trainers use.

    Each step: ``g = d L / d flat`` (through :meth:`FlatParams.leaves`);
    ``updates, state = tx.update(g, state, inplace=True)``;
    ``torchopt.apply_updates(flat, updates, inplace=True)``. Returns the new optimizer state and
    the mean of each diagnostic over all steps.
    """
    sums: dict[str, float] = {}
    count = 0
    for idx in minibatches:
        mb = Minibatch(*(x[idx] for x in data))
        leaves = params.leaves()
        loss, aux = ppo_loss(policy, critic, leaves[theta_key], leaves[critic_key], mb, coefs, cond)
        grad = params.flat_grad(loss)
        updates, opt_state = tx.update((grad,), opt_state, params=(params.flat,), inplace=True)
        torchopt.apply_updates((params.flat,), updates, inplace=True)
        for k, v in aux.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
    return opt_state, {k: v / max(count, 1) for k, v in sums.items()}


def explained_variance(pred: Tensor, target: Tensor) -> float:
    """``1 - Var[target - pred] / Var[target]`` (nan when the target is constant)."""
    var = float(target.var())
    return float("nan") if var == 0.0 else 1.0 - float((target - pred).var()) / var


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
    cfg: Any, eps_root: float = 0.0, restart: int = 0, segments: Sequence[int] | None = None
) -> Any:
    """:func:`make_optimizer` from a trainer config's fields."""
    return make_optimizer(
        cfg.lr,
        cfg.steps_per_round,
        cfg.num_iterations,
        cfg.anneal_lr,
        cfg.max_grad_norm,
        cfg.adam_eps,
        eps_root,
        restart,
        segments,
        inner_opt=getattr(cfg, "inner_opt", "adam"),
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
