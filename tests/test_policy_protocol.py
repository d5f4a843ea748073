"""A second, minimal policy through the Policy protocol: the trainers, the rollout and the
engine's problem run it without naming GaussianPolicy's parameters."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from metagrad_rl.metagrad import meta_gradient
from metagrad_rl.networks import POLICIES, IntrinsicReward, Policy
from metagrad_rl.pytree import flatten
from metagrad_rl.trainers import bilevel, ppo
from metagrad_rl.trainers.common import optimizer_state_from_list
from metagrad_rl.unroll import Round

SMALL = dict(env="InvertedPendulum-v5", num_steps=128, num_minibatches=4, update_epochs=2)


class LinearGaussian(nn.Module):
    """``a ~ N(W s + b + U c, exp(2 scale))``: linear in the state, shifted by ``c`` =
    ``cln_condition(eta)`` when conditioned; its log-std is called ``scale``."""

    def __init__(self, obs_dim, act_dim, hidden, conditioning, cond_dim):
        super().__init__()
        self.conditioning = conditioning
        self.w = nn.Linear(obs_dim, act_dim)
        if conditioning == "cln":
            self.u = nn.Linear(cond_dim, act_dim, bias=False)
        self.scale = nn.Parameter(torch.full((act_dim,), -0.5))

    def _mean(self, theta, obs, cond):
        m = obs @ theta["w.weight"].T + theta["w.bias"]
        return m + cond @ theta["u.weight"].T if self.conditioning == "cln" else m

    def log_prob(self, theta, obs, act, cond):
        z = (act - self._mean(theta, obs, cond)) * torch.exp(-theta["scale"])
        return (-0.5 * z**2 - theta["scale"] - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self, theta):
        return (theta["scale"] + 0.5 * (1 + math.log(2 * math.pi))).sum(-1)

    def sampler(self, theta, cond):
        with torch.no_grad():
            w, b = theta["w.weight"].T.numpy().copy(), theta["w.bias"].numpy().copy()
            if self.conditioning == "cln":
                b = b + (cond @ theta["u.weight"].T).numpy()
            std = np.exp(theta["scale"].numpy())
        return SimpleNamespace(mean=lambda obs: obs @ w + b, std=std)


@pytest.fixture
def linear_policy():
    POLICIES["linear"] = LinearGaussian
    yield
    del POLICIES["linear"]


def test_the_minimal_policy_satisfies_the_protocol(linear_policy):
    assert isinstance(LinearGaussian(3, 2, (), "cln", 5), Policy)
    assert "linear" in bilevel.CLNConfig.field_choices()["policy"]


def test_bilevel_trainer_runs_a_second_policy_and_applies_the_engines_total(
    tmp_path, linear_policy
):
    cfg = bilevel.CLNConfig(
        policy="linear", meta_grad="exact", total_steps=128 * 3, eta_lr=1e-2, **SMALL
    )
    steps = []
    summary = bilevel.train(cfg, tmp_path / "cln", on_meta_step=steps.append)
    assert summary["finished"] and len(steps) == 2
    assert (flatten(steps[0].round.eta) - flatten(steps[1].round.eta)).abs().max() > 0
    reward = IntrinsicReward(4, 1, cfg.reward_hidden, cfg.bottleneck)
    policy = LinearGaussian(4, 1, (), "cln", reward.condition_dim)
    problem, tx = bilevel.build_problem(cfg, policy, reward), bilevel.policy_optimizer(cfg)
    for s in steps:
        rec = s.round
        state = optimizer_state_from_list(tx.init(rec.theta), rec.opt_state)
        rounds = [Round(rec.batch, rec.minibatches)]
        ref = meta_gradient(problem, tx, rec.theta, rec.eta, rounds, s.outer, opt_state=state)
        torch.testing.assert_close(flatten(s.grad), flatten(ref.total), rtol=1e-4, atol=1e-7)
        assert flatten(ref.eq11).norm() > 0 and flatten(ref.eq12).norm() > 0  # eta conditions it
    assert set(steps[0].round.theta) == {"w.weight", "w.bias", "u.weight", "scale"}


def test_ppo_and_eq17_run_the_second_policy(tmp_path, linear_policy):
    ppo.train(ppo.PPOConfig(policy="linear", total_steps=256, **SMALL), tmp_path / "ppo")
    cfg = bilevel.CLNConfig(policy="linear", meta_grad="eq17", total_steps=256, **SMALL)
    assert bilevel.train(cfg, tmp_path / "eq17")["finished"]
    rows = (tmp_path / "eq17" / "progress.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert dict(zip(header, rows[-1].split(",")))["entropy"] != ""


def test_the_problem_takes_the_entropy_bonus_from_the_protocol(linear_policy):
    """``ent_coef > 0`` with a policy that has no ``log_std``: the inner loss moves by exactly
    ``-ent_coef * policy.entropy(theta)``."""
    reward = IntrinsicReward(4, 1, (8,), 2)
    policy = LinearGaussian(4, 1, (), "cln", reward.condition_dim)
    theta = {k: v.detach() for k, v in policy.named_parameters()}
    eta = {k: v.detach() for k, v in reward.named_parameters()}
    g = torch.Generator().manual_seed(0)
    batch = {
        "obs": torch.randn(6, 4, generator=g),
        "act": torch.randn(6, 1, generator=g),
        "r_ex": torch.randn(6, generator=g),
        "v_mix": torch.zeros(6),
        "v_mix_next": torch.zeros(6),
        "terminated": torch.zeros(6),
        "episode_end": torch.zeros(6),
    }
    losses = []
    for ent in (0.0, 0.1):
        cfg = bilevel.CLNConfig(policy="linear", ent_coef=ent, **SMALL)
        problem = bilevel.build_problem(cfg, policy, reward)
        mb = problem.prepare(batch, eta_reward=eta, theta_old=theta, eta_policy_old=eta)
        losses.append(problem.inner_loss(theta, mb, eta_policy=eta))
    want = -0.1 * policy.entropy(theta)
    torch.testing.assert_close(losses[1] - losses[0], want, rtol=1e-6, atol=1e-7)


def test_evaluate_rebuilds_a_registered_policy(tmp_path, linear_policy):
    from metagrad_rl.checkpoint import load_checkpoint
    from metagrad_rl.evaluate import evaluate_checkpoint, load_policy

    ppo.train(ppo.PPOConfig(policy="linear", total_steps=128, **SMALL), tmp_path / "ppo")
    ckpt = load_checkpoint(tmp_path / "ppo" / "checkpoint.pt")
    sampler, _ = load_policy(ckpt["policy"])
    theta = ckpt["policy"]["theta"]
    obs = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    want = LinearGaussian(4, 1, (), "none", None)._mean(theta, torch.from_numpy(obs), None)
    np.testing.assert_allclose(sampler.mean(obs), want.numpy(), rtol=1e-6, atol=1e-7)
    assert len(evaluate_checkpoint(tmp_path / "ppo" / "checkpoint.pt", episodes=2)) == 2
