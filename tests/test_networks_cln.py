"""CLN and the numpy rollout policy against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metagrad_rl.networks import (
    ConditionalLayerNorm,
    GaussianPolicy,
    IntrinsicReward,
    NumpyPolicy,
    cln_condition,
    params_of,
    policy_log_prob,
)


def _formula(x, g, b, eps):
    """Eq 20 written out: normalise with the biased variance, then gain and bias."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return g * (x - mu) / torch.sqrt(var + eps) + b


def test_cln_with_zero_maps_against_layer_norm():
    torch.manual_seed(0)
    cln = ConditionalLayerNorm(num_features=6, cond_dim=5)
    with torch.no_grad():
        cln.gain_map.weight.zero_()
        cln.bias_map.weight.zero_()
        cln.gain_map.bias.copy_(torch.randn(6))
        cln.bias_map.bias.copy_(torch.randn(6))
    x, cond = torch.randn(4, 6), torch.randn(5)
    expected = F.layer_norm(x, (6,), weight=cln.gain_map.bias, bias=cln.bias_map.bias, eps=cln.eps)
    torch.testing.assert_close(cln(x, cond), expected, rtol=1e-6, atol=1e-6)


def test_cln_gain_and_bias_are_affine_maps_of_the_condition():
    torch.manual_seed(1)
    cln = ConditionalLayerNorm(num_features=3, cond_dim=2)
    x, cond = torch.randn(2, 3), torch.randn(2)
    g = cln.gain_map.weight @ cond + cln.gain_map.bias
    b = cln.bias_map.weight @ cond + cln.bias_map.bias
    torch.testing.assert_close(cln(x, cond), _formula(x, g, b, cln.eps), rtol=1e-6, atol=1e-6)
    # one condition per row (the formula path) agrees with the shared condition (fused path)
    rows = cond.expand(2, 2)
    torch.testing.assert_close(cln(x, rows), cln(x, cond), rtol=1e-6, atol=1e-6)


def test_cln_gradcheck_wrt_input_and_condition_float64():
    torch.manual_seed(2)
    cln = ConditionalLayerNorm(num_features=4, cond_dim=3).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: cln(a, c), (x, cond), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(lambda a, c: cln(a, c), (x, cond), eps=1e-6, atol=1e-6)


def test_cln_policy_gradcheck_wrt_eta_float64():
    """d log pi_{theta, eta}(a|s) / d eta through cln_condition, on a ~100-parameter net."""
    torch.manual_seed(3)
    reward = IntrinsicReward(obs_dim=2, act_dim=1, hidden=(3,), bottleneck=2).double()
    policy = GaussianPolicy(
        obs_dim=2, act_dim=1, hidden=(4,), conditioning="cln", cond_dim=reward.condition_dim
    ).double()
    theta = {k: v.detach() for k, v in params_of(policy).items()}
    keys = list(params_of(reward))
    eta0 = [v.detach().clone().requires_grad_(True) for v in params_of(reward).values()]
    obs = torch.randn(3, 2, dtype=torch.float64)
    act = torch.randn(3, 1, dtype=torch.float64)

    def logp(*eta_list):
        return policy_log_prob(policy, theta, obs, act, dict(zip(keys, eta_list)))

    assert torch.autograd.gradcheck(logp, tuple(eta0), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("conditioning", ["none", "layernorm", "cln"])
def test_numpy_policy_against_torch_policy(conditioning):
    torch.manual_seed(4)
    reward = IntrinsicReward(obs_dim=5, act_dim=2, hidden=(8,), bottleneck=3)
    cond = cln_condition(params_of(reward)).detach() if conditioning == "cln" else None
    policy = GaussianPolicy(
        5,
        2,
        (16, 16),
        conditioning=conditioning,
        cond_dim=None if cond is None else cond.numel(),
    )
    with torch.no_grad():  # a non-trivial std and mean head
        policy.log_std.copy_(torch.tensor([-0.3, 0.4]))
        policy.mean.weight.mul_(50.0)
    theta = params_of(policy)
    obs = torch.randn(7, 5)
    with torch.no_grad():
        mean, log_std = policy(obs, cond)
    pnp = NumpyPolicy(policy, theta, cond)
    np.testing.assert_allclose(pnp.mean(obs.numpy()), mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pnp.std, log_std.detach().exp().numpy(), rtol=1e-6)


@pytest.mark.parametrize("conditioning", ["none", "layernorm", "cln"])
def test_log_prob_without_functional_call_is_functional_call_bit_for_bit(conditioning):
    """The policy's and the critic's direct forwards (no parameter swapping) compute what
    ``functional_call`` of the modules computes, op for op: values and first and second
    derivatives are equal bitwise (float64), also with one condition per row."""
    from torch.func import functional_call

    from metagrad_rl.networks import Critic, GaussianPolicy, IntrinsicReward, cln_condition

    torch.manual_seed(0)
    reward = IntrinsicReward(5, 2, (8,), 3).double()
    cond_dim = reward.condition_dim if conditioning == "cln" else None
    policy = GaussianPolicy(5, 2, (8, 8), conditioning, cond_dim).double()
    critic = Critic(5, (8, 8)).double()
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params_of(policy).items()}
    eta = {k: v.detach().clone() for k, v in params_of(reward).items()}
    obs, act = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    conds = [cln_condition(eta), cln_condition(eta).expand(7, -1) + 0.1 * torch.randn(7, 1)]
    for cond in conds if conditioning == "cln" else [None]:
        fast = policy.log_prob(theta, obs, act, cond)
        ref = gaussian_reference(policy, theta, obs, act, cond)
        assert torch.equal(fast, ref)
        g_fast = torch.autograd.grad(fast.sum(), list(theta.values()), create_graph=True)
        g_ref = torch.autograd.grad(ref.sum(), list(theta.values()), create_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(g_fast, g_ref, strict=True))
        h_fast = torch.autograd.grad(sum(g.square().sum() for g in g_fast), list(theta.values()))
        h_ref = torch.autograd.grad(sum(g.square().sum() for g in g_ref), list(theta.values()))
        assert all(torch.equal(a, b) for a, b in zip(h_fast, h_ref, strict=True))
    p = params_of(critic)
    assert torch.equal(critic.values(p, obs), functional_call(critic, dict(p), (obs,)))


def gaussian_reference(policy, theta, obs, act, cond):
    """The policy's log-probability through ``functional_call`` (the slow, general path)."""
    from torch.func import functional_call

    from metagrad_rl.networks import gaussian_log_prob

    mean, log_std = functional_call(policy, dict(theta), (obs, cond))
    return gaussian_log_prob(mean, log_std, act)


def test_a_policy_subclass_with_its_own_forward_keeps_it():
    from metagrad_rl.networks import GaussianPolicy

    class Shifted(GaussianPolicy):
        def forward(self, obs, cond=None):
            mean, log_std = super().forward(obs, cond)
            return mean + 1.0, log_std

    torch.manual_seed(0)
    plain, shifted = GaussianPolicy(4, 2, (8,), "none"), Shifted(4, 2, (8,), "none")
    shifted.load_state_dict(plain.state_dict())
    theta = params_of(plain)
    obs, act = torch.randn(3, 4), torch.randn(3, 2)
    with torch.no_grad():
        a = plain.log_prob(theta, obs, act, None)
        b = shifted.log_prob(theta, obs, act, None)
    assert not torch.allclose(a, b)  # the subclass's forward ran
