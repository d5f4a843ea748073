"""The round Jacobian d theta_{k+1} / d theta_k and its spectral norm, against references (float64).

References: the full Jacobian by ``torch.autograd.functional.jacobian`` and its largest singular
value by ``torch.linalg.svdvals``; ``torch.autograd.gradcheck`` (finite differences of the
round); the engine's own unroll (values); closed forms for one SGD or Adam step, and ``K`` SGD
steps, on a quadratic inner loss.
"""

from __future__ import annotations

import pytest
import torch
import torchopt
from meta_helpers import OPTIMIZERS, make_setup

from metagrad_rl.errors import ConfigError
from metagrad_rl.jacobian import (
    adam_frozen_second_moment,
    round_map,
    round_spectral_norm,
    spectral_norm,
)
from metagrad_rl.optim import clip_grad_norm
from metagrad_rl.unroll import EtaPaths, MetaProblem, Round, unroll


def _tiny(steps: int = 3):
    problem, theta, eta, rounds, _ = make_setup(n_rounds=1, steps=steps)
    return problem, theta, eta, rounds[0]


def _full_jacobian(F, x0):
    return torch.autograd.functional.jacobian(F, x0)


def _trainer_like(eps_root: float = 1e-8):
    """The trainers' policy optimizer shape (clip, then Adam on a decaying schedule)."""
    sched = lambda c: 0.01 * (1.0 - c / 20.0)  # noqa: E731
    return torchopt.chain(clip_grad_norm(0.5), torchopt.adam(sched, eps=1e-5, eps_root=eps_root))


# ------------------------------------------------------------------ the differentiated function


@pytest.mark.parametrize("surrogate", ["paper", "detached"])
def test_round_map_equals_the_engines_unroll(surrogate):
    problem, theta, eta, rnd = _tiny()
    tx = _trainer_like()
    F, layout = round_map(problem, tx, theta, eta, rnd, surrogate=surrogate)
    got = F(layout.flatten(theta))
    ref = unroll(problem, tx, theta, EtaPaths.shared(eta), [rnd], surrogate=surrogate)
    torch.testing.assert_close(got, layout.flatten(ref.theta), rtol=0, atol=1e-14)


@pytest.mark.parametrize("surrogate", ["paper", "detached"])
def test_round_jacobian_gradcheck(surrogate):
    """Autograd's J of the round (the trainer's clip + Adam) against finite differences."""
    problem, theta, eta, rnd = _tiny(steps=2)
    F, layout = round_map(problem, _trainer_like(), theta, eta, rnd, surrogate=surrogate)
    x0 = layout.flatten(theta).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(F, (x0,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_paper_denominator_moves_with_theta_k():
    """PAPER and DETACHED give the same theta_{k+1} but different Jacobians."""
    problem, theta, eta, rnd = _tiny()
    tx = OPTIMIZERS["sgd"]()
    maps = {s: round_map(problem, tx, theta, eta, rnd, surrogate=s) for s in ("paper", "detached")}
    x0 = maps["paper"][1].flatten(theta)
    torch.testing.assert_close(maps["paper"][0](x0), maps["detached"][0](x0), rtol=0, atol=1e-15)
    jp = _full_jacobian(maps["paper"][0], x0)
    jd = _full_jacobian(maps["detached"][0], x0)
    assert float((jp - jd).norm()) > 1e-3 * float(jd.norm())


# ------------------------------------------------------------------ power iteration against the SVD


@pytest.mark.parametrize("opt", ["sgd", "adam", "trainer"])
@pytest.mark.parametrize("surrogate", ["paper", "detached"])
def test_spectral_norm_against_svd_of_full_jacobian(opt, surrogate):
    problem, theta, eta, rnd = _tiny()
    tx = _trainer_like() if opt == "trainer" else OPTIMIZERS[opt]()
    F, layout = round_map(problem, tx, theta, eta, rnd, surrogate=surrogate)
    x0 = layout.flatten(theta)
    sigma_ref = float(torch.linalg.svdvals(_full_jacobian(F, x0))[0])
    res = round_spectral_norm(
        problem, tx, theta, eta, rnd, surrogate=surrogate, iters=600, tol=1e-9,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert res.converged and res.residual < 1e-9
    assert res.sigma == pytest.approx(sigma_ref, rel=1e-8)
    assert res.history[-1] == res.sigma and len(res.history) == res.iterations
    # a power-iteration estimate is a lower bound that rises
    assert all(a <= b * (1 + 1e-12) for a, b in zip(res.history[1:], res.history[2:]))


def test_spectral_norm_reports_when_it_has_not_converged():
    problem, theta, eta, rnd = _tiny()
    F, layout = round_map(problem, OPTIMIZERS["sgd"](), theta, eta, rnd)
    res = spectral_norm(F, layout.flatten(theta), iters=2, tol=1e-12,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert res.iterations == 2 and not res.converged and res.residual > 1e-6


def test_spectral_norm_refuses_a_non_square_map():
    with pytest.raises(ConfigError, match="square"):
        spectral_norm(lambda x: x[:2] * 2.0, torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------ closed forms on a quadratic


N = 6


def _quadratic(seed: int = 0):
    """Inner loss ``0.5 (w - c)^T A (w - c)`` with ``c`` the minibatch mean; A indefinite."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))
    lam = torch.tensor([3.0, 1.5, 0.5, 0.1, -0.2, -1.0], dtype=torch.float64)
    A = q @ torch.diag(lam) @ q.T
    c = torch.randn(4, N, generator=gen, dtype=torch.float64)

    def prepare(batch, *, eta_reward, theta_old, eta_policy_old):
        return {"c": batch["c"]}

    def inner_loss(theta, mb, *, eta_policy):
        d = theta["w"] - mb["c"].mean(0)
        return 0.5 * d @ A @ d

    problem = MetaProblem(prepare, inner_loss, outer_loss=lambda *a, **k: None)
    theta = {"w": torch.randn(N, generator=gen, dtype=torch.float64)}
    eta = {"unused": torch.zeros(1, dtype=torch.float64)}
    return problem, A, lam, c, theta, eta


@pytest.mark.parametrize("steps", [1, 5])
def test_sgd_on_a_quadratic_is_a_matrix_power(steps):
    """SGD: theta_{j+1} = theta_j - lr A (theta_j - c), so J = (I - lr A)^K exactly."""
    problem, A, lam, c, theta, eta = _quadratic()
    lr = 0.3
    rnd = Round({"c": c}, [torch.arange(4)] * steps)
    F, layout = round_map(problem, torchopt.sgd(lr), theta, eta, rnd)
    J = _full_jacobian(F, layout.flatten(theta))
    closed = torch.linalg.matrix_power(torch.eye(N, dtype=torch.float64) - lr * A, steps)
    torch.testing.assert_close(J, closed, rtol=0, atol=1e-13)
    res = round_spectral_norm(problem, torchopt.sgd(lr), theta, eta, rnd, iters=500, tol=1e-10,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    expect = float((1 - lr * lam).abs().max()) ** steps  # the -1.0 eigenvalue: 1.3^K
    assert res.sigma == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("frozen", [False, True])
def test_one_adam_step_on_a_quadratic_closed_form(frozen):
    r"""One Adam step from a zero state: ``m_hat = a g``, ``v_hat = b g^2``, so

    the update is ``-lr f(g)``, ``f(g) = a g / (S + e)`` with ``S = sqrt(b g^2 + r)``, and
    ``J = I - lr diag(f'(g)) A`` with ``f'(g) = a (r / S + e) / (S + e)^2``; with the second
    moment frozen, ``J = I - lr diag(a / (S + e)) A``. ``a = b = 1`` up to TorchOpt computing
    the bias corrections ``1 - beta^t`` in float32 (a float to the power of an int64 count).
    """
    problem, A, lam, c, theta, eta = _quadratic()
    lr, r, e = 0.1, 1e-3, 1e-4
    make = adam_frozen_second_moment if frozen else torchopt.adam
    tx = make(lr, eps=e, eps_root=r)
    rnd = Round({"c": c}, [torch.arange(4)])
    F, layout = round_map(problem, tx, theta, eta, rnd)
    J = _full_jacobian(F, layout.flatten(theta))
    g = A @ (theta["w"] - c.mean(0))
    one = torch.ones((), dtype=torch.long)
    a = (1 - 0.9) / float(1 - 0.9**one)
    b = (1 - 0.999) / float(1 - 0.999**one)
    s = (b * g.square() + r).sqrt()
    d = a / (s + e) if frozen else a * (r / s + e) / (s + e) ** 2
    closed = torch.eye(N, dtype=torch.float64) - lr * torch.diag(d) @ A
    torch.testing.assert_close(J, closed, rtol=0, atol=1e-12)


def test_frozen_second_moment_adam_equals_adam_in_value():
    """Same updates and state as torchopt.adam over several steps (lr schedule included)."""
    gen = torch.Generator().manual_seed(3)
    sched = lambda cnt: 0.05 * (1.0 - cnt / 10.0)  # noqa: E731
    kw = dict(eps=1e-5, eps_root=1e-8)
    ref, fro = torchopt.adam(sched, **kw), adam_frozen_second_moment(sched, **kw)
    params = {"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}
    s_ref, s_fro = ref.init(params), fro.init(params)
    for _ in range(4):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        u_ref, s_ref = ref.update(grads, s_ref, inplace=False)
        u_fro, s_fro = fro.update(grads, s_fro, inplace=False)
        for k in params:
            torch.testing.assert_close(u_fro[k], u_ref[k], rtol=1e-6, atol=1e-9)
    for a, b in zip(torchopt.pytree.tree_leaves(s_fro), torchopt.pytree.tree_leaves(s_ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
