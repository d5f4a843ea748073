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
