"""Collecting experience: ``T`` steps of ``N`` envs into a time-major :class:`Batch`.

Per-step policy inference dominates PPO's wall time on MuJoCo (an env step costs ~100 us, a
small torch forward about as much again). The collector therefore samples actions from the
policy's ``sampler`` (for the Gaussian policy a float32 numpy copy,
:class:`~metagrad_rl.numpy_policy.NumpyPolicy`, refreshed once per rollout, exact up to float
rounding) and computes ``logp``, ``V(s_t)`` and ``V(s_{t+1})`` afterwards in one batched
torch call each. Gradients never flow into a rollout: every tensor of a :class:`Batch` is data.

Termination and truncation (see :mod:`metagrad_rl.advantages`): ``next_obs_t`` is the real
``s_{t+1}`` -- the final observation of the episode when it ended at ``t`` -- so
``next_values_t = V(s_{t+1})`` bootstraps a truncated episode correctly, while
``terminated_t`` zeroes it for a terminal one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metagrad_rl.envs import ObsNormalizer, RewardScaler, VecEnv
from metagrad_rl.errors import ConfigError
from metagrad_rl.networks import Critic, GaussianPolicy, Policy, Sampler


class Batch(NamedTuple):
    """One rollout, time-major: ``[T, N, ...]`` for ``T`` steps of ``N`` env copies.

    Observations are normalised (as the policy saw them); ``r_ex`` is the scaled extrinsic
    reward PPO trains on, ``r_raw`` the environment's own reward.
    """

    obs: Tensor  #: ``[T, N, obs_dim]`` float32, ``s_t``
    act: Tensor  #: ``[T, N, act_dim]`` float32, ``a_t`` as sampled (before action clipping)
    logp: Tensor  #: ``[T, N]`` ``log pi(a_t | s_t)`` of the policy that collected the batch
    r_ex: Tensor  #: ``[T, N]`` scaled extrinsic reward ``r_t``
    r_raw: Tensor  #: ``[T, N]`` unscaled environment reward
    next_obs: Tensor  #: ``[T, N, obs_dim]`` ``s_{t+1}``; the real final obs when the episode ended
    terminated: Tensor  #: ``[T, N]`` bool, ``s_{t+1}`` is terminal (no bootstrap)
    episode_end: Tensor  #: ``[T, N]`` bool, the episode ended at ``t`` (terminated or truncated)
    values: Tensor  #: ``[T, N]`` ``V(s_t)`` of the critic passed to :func:`collect_rollout`
    next_values: Tensor  #: ``[T, N]`` ``V(s_{t+1})`` of that critic (real final obs at an end)


class EpisodeStats(NamedTuple):
    """Episodes finished during a rollout: raw (unscaled) extrinsic returns and lengths."""

    returns: list[float]
    lengths: list[int]


class Rollout(NamedTuple):
    batch: Batch
    episodes: EpisodeStats


class Collector:
    """Owns the envs, the normalisers and everything a rollout carries over to the next one.

    That state -- current observations, partial episode returns, the action-noise RNG, the
    normalisers' statistics and the envs' own state -- is what :meth:`state_dict` saves, so a
    resumed run continues exactly (for MuJoCo envs; see :meth:`VecEnv.get_state`).
    """

    def __init__(
        self, envs: VecEnv, obs_norm: ObsNormalizer, rew_scaler: RewardScaler, seed: int
    ) -> None:
        self.envs = envs
        self.obs_norm = obs_norm
        self.rew_scaler = rew_scaler
        self.rng = np.random.default_rng(seed)
        n = envs.num_envs
        self.ep_return = np.zeros(n)
        self.ep_len = np.zeros(n, dtype=np.int64)
        self.obs = self.obs_norm(envs.reset())

    def collect(self, policy_np: Sampler, num_steps: int) -> tuple[dict, EpisodeStats]:
        """Steps ``num_steps`` times; returns numpy buffers and the finished episodes."""
        envs, n = self.envs, self.envs.num_envs
        obs_buf = np.empty((num_steps, n, envs.obs_dim), dtype=np.float32)
        next_buf = np.empty_like(obs_buf)
        act_buf = np.empty((num_steps, n, envs.act_dim), dtype=np.float32)
        r_buf = np.empty((num_steps, n), dtype=np.float32)
        raw_buf = np.empty((num_steps, n), dtype=np.float32)
        term_buf = np.empty((num_steps, n), dtype=bool)
        end_buf = np.empty((num_steps, n), dtype=bool)
        ep_returns: list[float] = []
        ep_lengths: list[int] = []
        std = policy_np.std
        obs = self.obs
        for t in range(num_steps):
            act = policy_np.mean(obs) + std * self.rng.standard_normal((n, envs.act_dim))
            obs_buf[t] = obs
            act_buf[t] = act
            raw_next, reward, term, trunc, final = envs.step(act)
            done = term | trunc
            raw_buf[t] = reward
            r_buf[t] = self.rew_scaler(reward, done)
            term_buf[t] = term
            end_buf[t] = done
            obs = self.obs_norm(raw_next)
            next_buf[t] = obs
            self.ep_return += reward
            self.ep_len += 1
            if done.any():
                next_buf[t, done] = self.obs_norm(final[done], update=False)
                for i in np.flatnonzero(done):
                    ep_returns.append(float(self.ep_return[i]))
                    ep_lengths.append(int(self.ep_len[i]))
                self.ep_return[done] = 0.0
                self.ep_len[done] = 0
        self.obs = obs
        bufs = dict(
            obs=obs_buf,
            act=act_buf,
            r_ex=r_buf,
            r_raw=raw_buf,
            next_obs=next_buf,
            terminated=term_buf,
            episode_end=end_buf,
        )
        return bufs, EpisodeStats(ep_returns, ep_lengths)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": json.dumps(self.rng.bit_generator.state),
            "obs": torch.from_numpy(self.obs.copy()),
            "ep_return": torch.from_numpy(self.ep_return.copy()),
            "ep_len": torch.from_numpy(self.ep_len.copy()),
            "obs_norm": self.obs_norm.state_dict(),
            "rew_scaler": self.rew_scaler.state_dict(),
            "envs": self.envs.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restores :meth:`state_dict`; returns whether the envs were restored exactly."""
        self.obs_norm.load_state_dict(state["obs_norm"])
        self.rew_scaler.load_state_dict(state["rew_scaler"])
        exact = self.envs.set_state(state["envs"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.ep_return = state["ep_return"].numpy().copy()
        self.ep_len = state["ep_len"].numpy().copy()
        if exact:
            self.obs = state["obs"].numpy().copy()
        else:  # episodes restart: the saved observation belongs to a lost env state
            self.obs = self.obs_norm(self.envs.reset(), update=False)
            self.ep_return[:] = 0.0
            self.ep_len[:] = 0
        return exact


def policy_outputs(
    policy: GaussianPolicy, theta: Mapping[str, Tensor], obs: Tensor, cond: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(mean, log_std)`` of ``pi_theta`` at ``obs`` (``cond`` only for a CLN policy)."""
    c = cond if policy.conditioning == "cln" else None
    return functional_call(policy, dict(theta), (obs, c))


def critic_values(critic: Critic, params: Mapping[str, Tensor], obs: Tensor) -> Tensor:
    """``V(obs)`` for any leading shape, as a pure function of the critic's ``params``."""
    return critic.values(params, obs)


def stack_params(params: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``K`` parameter dicts of one architecture -> one dict of ``[K, ...]`` tensors."""
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


def stacked_critic_values(critic: Critic, stacked: Mapping[str, Tensor], obs: Tensor) -> Tensor:
    """``[V_1(obs), ..., V_K(obs)]`` (shape ``[K, B]``) of ``K`` critics of ``critic``'s
    architecture on the same observations ``[B, obs_dim]``, as batched matrix products.

    ``stacked``: the critics' parameters as ``[K, ...]`` tensors (:func:`stack_params`). The
    same numbers as ``K`` calls of :func:`critic_values` (to float rounding) in one pass: the
    bilevel trainers' two critics, ``V_mix`` and ``V_ex``, cost about half as much this way.
    """
    k = next(iter(stacked.values())).shape[0]
    layers = [(f"body.{i}", m) for i, m in enumerate(critic.body)] + [("head", critic.head)]
    h = obs.unsqueeze(0).expand(k, *obs.shape)
    for name, m in layers:
        if isinstance(m, nn.Linear):
            w, b = stacked[f"{name}.weight"], stacked[f"{name}.bias"]
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        elif isinstance(m, nn.Tanh):
            h = torch.tanh(h)
        else:  # pragma: no cover - guards future layouts
            raise TypeError(f"stacked_critic_values cannot batch layer {m!r}")
    return h.squeeze(-1)


def collect_rollout(
    collector: Collector,
    policy: Policy,
    theta: Mapping[str, Tensor],
    critic: Critic,
    critic_params: Mapping[str, Tensor],
    num_steps: int,
    cond: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Rollout:
    """Samples ``num_steps`` steps from ``pi_{theta}`` (CLN-conditioned on ``cond`` if given).

    ``cond`` is ``cln_condition(eta)`` for a CLN policy (treated as data here) and ``None``
    otherwise. ``logp``, ``values`` and ``next_values`` are computed in batch afterwards,
    without gradient.
    """
    if num_steps <= 0:
        raise ConfigError(f"num_steps={num_steps!r} is invalid: expected a positive int")
    cond_d = cond.detach() if cond is not None else None
    bufs, episodes = collector.collect(policy.sampler(theta, cond_d), num_steps)
    t = {k: torch.from_numpy(v).to(device) for k, v in bufs.items()}  # envs stay on the CPU
    with torch.no_grad():
        logp = policy.log_prob(theta, t["obs"], t["act"], cond_d)
        values = critic_values(critic, critic_params, t["obs"])
        next_values = critic_values(critic, critic_params, t["next_obs"])
    batch = Batch(
        obs=t["obs"],
        act=t["act"],
        logp=logp,
        r_ex=t["r_ex"],
        r_raw=t["r_raw"],
        next_obs=t["next_obs"],
        terminated=t["terminated"],
        episode_end=t["episode_end"],
        values=values,
        next_values=next_values,
    )
    return Rollout(batch, episodes)
