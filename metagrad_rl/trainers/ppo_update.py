"""PPO's loss and its minibatch update (CleanRL's ``ppo_continuous_action``), for every trainer.

- :func:`ppo_loss` -- clipped surrogate, clipped value loss and entropy on one minibatch, with
  advantages normalised per minibatch (or per worker's part of it, :attr:`PPOCoefs.norm_groups`);
- :func:`ppo_update` -- minibatch PPO over a round's schedule with a TorchOpt optimizer applied
  functionally (``tx.update`` then ``torchopt.apply_updates``) on one flat parameter vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor

from metagrad_rl.advantages import normalize
from metagrad_rl.errors import ConfigError
from metagrad_rl.networks import Critic, Policy
from metagrad_rl.ppo import clipped_surrogate_loss, surrogate_stats, value_loss
from metagrad_rl.rollout import Batch, critic_values
from metagrad_rl.trainers.flat_params import FlatParams


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
