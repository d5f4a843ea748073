"""GAE against a plain Python loop, with termination and truncation."""

from __future__ import annotations

import pytest
import torch

from metagrad_rl.advantages import gae


def gae_plain_loop(rewards, values, next_values, terminated, episode_end, gamma, lam):
    """CleanRL-style reference written per env with Python floats."""
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for i in range(N):
        last = 0.0
        for t in reversed(range(T)):
            if episode_end[t][i]:
                last = 0.0  # nothing after the end of an episode belongs to it
            bootstrap = 0.0 if terminated[t][i] else next_values[t][i]
            delta = rewards[t][i] + gamma * bootstrap - values[t][i]
            last = delta + gamma * lam * last
            adv[t][i] = last
    return adv


def test_gae_against_plain_loop_with_termination_and_truncation():
    g = torch.Generator().manual_seed(0)
    T, N = 17, 3
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    next_values = torch.randn(T, N, generator=g, dtype=torch.float64)
    terminated = torch.zeros(T, N, dtype=torch.bool)
    truncated = torch.zeros(T, N, dtype=torch.bool)
    terminated[[3, 9], 0] = True
    truncated[[5, 12], 1] = True
    terminated[7, 2] = True
    truncated[15, 2] = True
    episode_end = terminated | truncated
    got = gae(rewards, values, next_values, terminated, episode_end, 0.99, 0.95)
    want = gae_plain_loop(
        rewards.tolist(),
        values.tolist(),
        next_values.tolist(),
        terminated.tolist(),
        episode_end.tolist(),
        0.99,
        0.95,
    )
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


def test_gae_truncation_bootstraps_and_termination_does_not():
    # one step each: A = r + gamma * V(s') - V(s) when truncated, r - V(s) when terminated
    r, v, nv = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 2.0])
    term = torch.tensor([False, True])
    end = torch.tensor([True, True])
    adv = gae(r, v, nv, term, end, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([1.0 + 0.9 * 2.0 - 0.5, 1.0 - 0.5]))


def test_gae_lambda_one_is_discounted_return_minus_value():
    r = torch.tensor([1.0, 2.0, 3.0])
    v = torch.tensor([0.1, 0.2, 0.3])
    nv = torch.tensor([0.2, 0.3, 4.0])
    no = torch.zeros(3, dtype=torch.bool)
    adv = gae(r, v, nv, no, no, gamma=0.5, lam=1.0)
    ret0 = 1.0 + 0.5 * 2.0 + 0.25 * 3.0 + 0.125 * 4.0
    torch.testing.assert_close(adv[0], torch.tensor(ret0 - 0.1))


def test_gae_off_the_graph_equals_the_differentiable_path():
    # no_grad takes gae_scan (NumPy recursion); with a graph it is the discount-matrix product
    g = torch.Generator().manual_seed(1)
    T, N = 300, 2
    r, v, nv = (torch.randn(T, N, generator=g, dtype=torch.float64) for _ in range(3))
    term = torch.rand(T, N, generator=g) < 0.02
    end = term | (torch.rand(T, N, generator=g) < 0.01)
    with torch.no_grad():
        off = gae(r, v, nv, term, end, 0.99, 0.95)
    on = gae(r.requires_grad_(), v, nv, term, end, 0.99, 0.95)
    assert on.requires_grad and not off.requires_grad
    torch.testing.assert_close(off, on.detach(), rtol=0, atol=1e-12)
    for n in range(N):  # one env at a time, [T] tensors
        with torch.no_grad():
            one = gae(r[:, n], v[:, n], nv[:, n], term[:, n], end[:, n], 0.99, 0.95)
        torch.testing.assert_close(one, off[:, n], rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's forward AD
def test_gae_keeps_its_derivative_under_torch_func_and_forward_mode():
    # torch.func.grad/jvp wrap tensors that read requires_grad=False: the fast scan must not
    # run there, or the derivative through the advantages would silently vanish
    from torch.autograd import forward_ad
    from torch.func import grad, jvp

    g = torch.Generator().manual_seed(2)
    T = 40
    r, v, nv = (torch.randn(T, generator=g, dtype=torch.float64) for _ in range(3))
    term = torch.rand(T, generator=g) < 0.05
    end = term | (torch.rand(T, generator=g) < 0.05)
    w = torch.randn(T, generator=g, dtype=torch.float64)

    def f(rew):
        return (gae(rew, v, nv, term, end, 0.99, 0.95) * w).sum()

    rr = r.clone().requires_grad_()
    (want,) = torch.autograd.grad(f(rr), rr)
    torch.testing.assert_close(grad(f)(r), want, rtol=0, atol=1e-12)
    tangent = torch.randn(T, generator=g, dtype=torch.float64)
    _, d = jvp(f, (r,), (tangent,))
    torch.testing.assert_close(d, (want * tangent).sum(), rtol=0, atol=1e-12)
    with forward_ad.dual_level():
        out = f(forward_ad.make_dual(r, tangent))
        torch.testing.assert_close(forward_ad.unpack_dual(out).tangent, d, rtol=0, atol=1e-12)
