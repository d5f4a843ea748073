"""Normalisers against numpy, and rollouts against an independent replay of the same env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from metagrad_rl.envs import RewardScaler, RunningMeanStd, VecEnv
from metagrad_rl.errors import ConfigError
from metagrad_rl.networks import Critic, GaussianPolicy, params_of
from metagrad_rl.rollout import (
    collect_rollout,
    critic_values,
    stack_params,
    stacked_critic_values,
)
from metagrad_rl.trainers.common import make_collector


def test_running_mean_std_against_numpy():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (1, 5, 1, 17, 2)]
    rms = RunningMeanStd((4,), epsilon=0.0)
    rms.count = 0.0
    for c in chunks:
        rms.update(c)
    allx = np.concatenate(chunks)
    np.testing.assert_allclose(rms.mean, allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rms.var, allx.var(0), rtol=1e-10)
    assert rms.count == len(allx)


def test_reward_scaler_divides_by_std_of_discounted_return():
    sc = RewardScaler(num_envs=1, gamma=0.5, clip=100.0, eps=0.0)
    sc.rms.count, sc.rms.var = 0.0, np.float64(0.0)
    rets = []
    ret = 0.0
    for k, (r, done) in enumerate([(1.0, False), (2.0, True), (4.0, False), (-1.0, False)]):
        ret = 0.5 * ret + r  # R_t = gamma R_{t-1} + r_t, reset after an episode ends
        rets.append(ret)
        with np.errstate(divide="ignore"):
            out = sc(np.array([r]), np.array([done]))
        if k > 0:  # the std of a single return is 0
            assert out[0] == pytest.approx(r / np.std(rets), rel=1e-6)
        if done:
            ret = 0.0


def test_unknown_env_and_discrete_actions_are_config_errors():
    with pytest.raises(ConfigError, match="unknown env id 'Foo-v0'.*Hopper-v5"):
        VecEnv("Foo-v0", 1, 0)
    with pytest.raises(ConfigError, match="'CartPole-v1' has a Discrete action space"):
        VecEnv("CartPole-v1", 1, 0)


def _collect(env_id, max_steps, steps, seed, normalize):
    torch.manual_seed(seed)
    col = make_collector(
        env_id,
        2,
        seed,
        0.99,
        normalize_obs=normalize,
        normalize_reward=normalize,
        max_episode_steps=max_steps,
    )
    policy = GaussianPolicy(col.envs.obs_dim, col.envs.act_dim, (16,), conditioning="none")
    with torch.no_grad():
        policy.log_std.fill_(0.5)  # wide actions: Hopper falls (termination) within the budget
    critic = Critic(col.envs.obs_dim, (16,))
    ro = collect_rollout(col, policy, params_of(policy), critic, params_of(critic), steps)
    return col, critic, ro


def test_rollout_against_replay_termination_and_truncation():
    """Replaying the sampled actions on fresh envs gives every s_{t+1}, end flag and reward."""
    seed, T = 3, 60
    col, critic, ro = _collect("Hopper-v5", 15, T, seed, normalize=False)
    b = ro.batch
    assert b.terminated.any() and (b.episode_end & ~b.terminated).any(), "need both kinds"
    low, high = col.envs.act_low, col.envs.act_high
    for i in range(2):
        env = gym.make("Hopper-v5", max_episode_steps=15)
        obs, _ = env.reset(seed=seed + i)
        for t in range(T):
            np.testing.assert_allclose(b.obs[t, i].numpy(), obs, rtol=1e-6, atol=1e-6)
            a = np.clip(b.act[t, i].numpy().astype(np.float64), low, high)
            obs, r, term, trunc, _ = env.step(a)
            assert b.r_raw[t, i].item() == pytest.approx(r, rel=1e-6, abs=1e-6)
            assert bool(b.terminated[t, i]) == term
            assert bool(b.episode_end[t, i]) == (term or trunc)
            # s_{t+1} is the real final observation at an episode end, not the reset one
            np.testing.assert_allclose(b.next_obs[t, i].numpy(), obs, rtol=1e-6, atol=1e-6)
            if term or trunc:
                obs, _ = env.reset()
    # next_values bootstrap from the real s_{t+1}; values are V(s_t)
    with torch.no_grad():
        torch.testing.assert_close(
            b.next_values, critic_values(critic, params_of(critic), b.next_obs)
        )
        torch.testing.assert_close(b.values, critic_values(critic, params_of(critic), b.obs))
    # finished episodes are reported with their raw returns
    n_done = int(b.episode_end.sum())
    assert len(ro.episodes.returns) == n_done


def test_rollout_normalised_obs_are_clipped_and_consistent():
    col, _, ro = _collect("InvertedPendulum-v5", 7, 30, 0, normalize=True)
    b = ro.batch
    assert b.obs.abs().max() <= 10.0 and b.r_ex.abs().max() <= 10.0
    cont = ~b.episode_end[:-1]
    torch.testing.assert_close(b.next_obs[:-1][cont], b.obs[1:][cont])
    assert (b.episode_end & ~b.terminated).sum() >= 4  # truncations every 7 steps


def test_stacked_critic_values_equal_one_call_per_critic():
    torch.manual_seed(0)
    critics = [Critic(5, (16, 8)).double() for _ in range(3)]
    params = [dict(c.named_parameters()) for c in critics]
    obs = torch.randn(11, 5, dtype=torch.float64)
    got = stacked_critic_values(critics[0], stack_params(params), obs)
    want = torch.stack([critic_values(c, p, obs) for c, p in zip(critics, params)])
    assert got.shape == (3, 11)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    # and the gradients, which the trainers' critic regression takes
    (got.square().sum()).backward()
    grads = [p["body.0.weight"].grad.clone() for p in params]
    for p in params:
        for t in p.values():
            t.grad = None
    (want.square().sum()).backward()
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p["body.0.weight"].grad, rtol=0, atol=1e-12)
