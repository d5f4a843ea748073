"""The exact meta-gradient engine, each number against an independent computation (float64).

References used here: ``torch.autograd.gradcheck`` (finite differences of the whole unroll),
central differences with one path's ``eta`` perturbed, the explicit ``torch.func`` formulas of
:mod:`metagrad_rl.explicit`, a hand-written LIRPG look-ahead, and per-sample score products.
"""

from __future__ import annotations

import pytest
import torch
import torchopt
from meta_helpers import OPTIMIZERS, make_setup
from torch.func import functional_call, grad, vmap

from metagrad_rl.errors import ConfigError
from metagrad_rl.explicit import explicit_sgd_terms, mixed_second_order_product
from metagrad_rl.memory import MemoryBudgetError, check_unroll_memory
from metagrad_rl.metagrad import eq17_gradient, meta_gradient
from metagrad_rl.networks import cln_condition, gaussian_log_prob
from metagrad_rl.optim import clip_grad_norm
from metagrad_rl.pytree import TERMS, flatten
from metagrad_rl.unroll import (
    EtaPaths,
    InnerSurrogate,
    Round,
    anchor_at,
    meta_objective,
)
from metagrad_rl.verify import verify_meta_gradient

SURROGATES = ["paper", "detached"]


def _vec(d):
    return flatten(d)


# ------------------------------------------------------------------ gradcheck of the whole unroll


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("n_rounds,steps", [(1, 1), (1, 3), (2, 1), (2, 2)])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_meta_objective_gradcheck_and_term_sum(opt, n_rounds, steps, surrogate):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=n_rounds, steps=steps)
    report = verify_meta_gradient(
        problem, OPTIMIZERS[opt](), theta, eta, rounds, outer, surrogate=surrogate
    )
    assert report.gradcheck_passed, report.gradcheck_message
    assert report.terms_sum_to_total, report.term_sum_max_abs_error
    assert report.term_sum_max_abs_error < 1e-12


def test_verification_fails_for_a_wrong_gradient():
    """The check can fail: hiding a path from autograd breaks gradcheck."""
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)
    broken_prepare = problem.prepare

    def prepare(batch, *, eta_reward, theta_old, eta_policy_old):
        # drop the Eq 13 path from the graph but keep the value
        return broken_prepare(
            batch,
            eta_reward={k: v.detach() for k, v in eta_reward.items()},
            theta_old=theta_old,
            eta_policy_old=eta_policy_old,
        )

    wrong = problem.__class__(prepare, problem.inner_loss, problem.outer_loss)
    report = verify_meta_gradient(wrong, torchopt.sgd(0.05), theta, eta, rounds, outer)
    assert not report.gradcheck_passed


# ------------------------------------------------------------------ each term vs finite differences


def _path_fd(problem, tx, theta, eta, rounds, outer, surrogate, path, direction, h=1e-5):
    """Central difference along ``direction`` with only ``path`` moved (Richardson, O(h^4))."""
    anchor = anchor_at(problem, tx, theta, eta, rounds, None, InnerSurrogate(surrogate))

    def at(step):
        moved = {k: (v + step * direction[k]).detach() for k, v in eta.items()}
        paths = EtaPaths.shared({k: v.detach() for k, v in eta.items()})._replace(**{path: moved})
        return float(
            meta_objective(
                problem, tx, theta, paths, rounds, outer, surrogate=surrogate, anchor=anchor
            ).detach()
        )

    def central(step):
        return (at(step) - at(-step)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_each_term_against_central_differences_of_its_path(opt, surrogate):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=2)
    tx = OPTIMIZERS[opt]()
    res = meta_gradient(problem, tx, theta, eta, rounds, outer, surrogate=surrogate)
    gen = torch.Generator().manual_seed(7)
    for term, path in zip(TERMS, EtaPaths._fields):
        for _ in range(2):
            u = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in eta.items()}
            fd = _path_fd(problem, tx, theta, eta, rounds, outer, surrogate, path, u)
            ad = float(_vec(getattr(res, term)) @ _vec(u))
            assert ad == pytest.approx(fd, rel=1e-6, abs=1e-9), (term, ad, fd)
    # every term carries signal in this problem (a test that could not see a zero term)
    for term in TERMS:
        assert _vec(getattr(res, term)).norm() > 1e-4, term


# ------------------------------------------------------------------ SGD: the paper's formulas


@pytest.mark.parametrize("n_rounds,steps", [(1, 1), (1, 3), (2, 2), (3, 1)])
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("denominator", ["theta_k", "theta_k+1"])
def test_sgd_terms_against_explicit_torch_func_formulas(n_rounds, steps, surrogate, denominator):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=n_rounds, steps=steps)
    res = meta_gradient(
        problem,
        torchopt.sgd(0.05),
        theta,
        eta,
        rounds,
        outer,
        surrogate=surrogate,
        denominator=denominator,
    )
    ref = explicit_sgd_terms(problem, 0.05, theta, eta, rounds, outer, surrogate, denominator)
    for term in (*TERMS, "total"):
        torch.testing.assert_close(
            _vec(getattr(res, term)), _vec(ref[term]), rtol=1e-10, atol=1e-13
        )


def _logp_fn(problem_parts, obs, act):
    policy = problem_parts

    def logp(theta, eta):
        mean, log_std = functional_call(policy, theta, (obs, cln_condition(eta)))
        return gaussian_log_prob(mean, log_std, act)

    return logp


def test_one_step_eq12_is_the_papers_mixed_second_derivative():
    """Paper surrogate, one SGD step: Eq 12 = -alpha D_eta(v^T E[d log pi/dtheta A])."""
    from meta_helpers import make_nets

    from metagrad_rl.advantages import normalize

    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=1)
    policy, _ = make_nets("cln", 0)
    lr = 0.05
    res = meta_gradient(problem, torchopt.sgd(lr), theta, eta, rounds, outer)
    data = problem.prepare(rounds[0].batch, eta_reward=eta, theta_old=theta, eta_policy_old=eta)
    idx = rounds[0].minibatches[0]
    obs, act, adv = data["obs"][idx], data["act"][idx], normalize(data["adv_in"][idx]).detach()
    logp = _logp_fn(policy, obs, act)
    # v = dL_out/dtheta_{k+1}
    theta1 = res.theta_next
    th1 = {k: v.clone().requires_grad_(True) for k, v in theta1.items()}
    loss = problem.outer_loss(th1, outer, eta_policy=eta, theta_den=theta, eta_den=eta)
    v = dict(zip(th1, torch.autograd.grad(loss, list(th1.values()))))

    # E[d^2 log pi / dtheta deta A]: the policy-gradient surrogate (no ratio) has it
    def pg_loss(th, et):
        return -(logp(th, et) * adv).mean()

    eq12 = mixed_second_order_product(pg_loss, theta, eta, v)
    torch.testing.assert_close(_vec(res.eq12), -lr * _vec(eq12), rtol=1e-10, atol=1e-14)
    eq12_jvp = mixed_second_order_product(pg_loss, theta, eta, v, method="jvp")
    torch.testing.assert_close(_vec(eq12_jvp), _vec(eq12), rtol=1e-10, atol=1e-14)

    # The detached surrogate adds the score-product term -alpha E[A (g_theta . v) g_eta].
    det = meta_gradient(problem, torchopt.sgd(lr), theta, eta, rounds, outer, surrogate="detached")

    def one(th, et, o, a):
        mean, log_std = functional_call(policy, th, (o[None], cln_condition(et)))
        return gaussian_log_prob(mean, log_std, a[None]).squeeze(0)

    g_th = vmap(grad(one, argnums=0), in_dims=(None, None, 0, 0))(theta, eta, obs, act)
    g_et = vmap(grad(one, argnums=1), in_dims=(None, None, 0, 0))(theta, eta, obs, act)
    gv = sum((g_th[k] * v[k]).flatten(1).sum(1) for k in theta)  # [B]
    score = {
        k: -(adv * gv).reshape(-1, *[1] * (g_et[k].dim() - 1)).mul(g_et[k]).mean(0) for k in eta
    }
    torch.testing.assert_close(
        _vec(det.eq12) - _vec(res.eq12), -lr * _vec(score), rtol=1e-9, atol=1e-13
    )
    assert _vec(score).norm() > 1e-4  # the two surrogates really differ here


# ------------------------------------------------------------------ special cases


def test_unconditioned_policy_gives_zero_eq11_eq12_and_lirpg_eq13():
    problem, theta, eta, rounds, outer = make_setup(conditioning="none", n_rounds=1, steps=1)
    lr = 0.05
    res = meta_gradient(problem, torchopt.sgd(lr), theta, eta, rounds, outer)
    assert _vec(res.eq11).abs().max() == 0 and _vec(res.eq12).abs().max() == 0
    assert _vec(res.eq14).abs().max() == 0
    # LIRPG's one-step look-ahead, written out by hand with plain autograd (no TorchOpt)
    eta_l = {k: v.clone().requires_grad_(True) for k, v in eta.items()}
    th0 = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    data = problem.prepare(rounds[0].batch, eta_reward=eta_l, theta_old=theta, eta_policy_old=eta)
    mb = {k: v[rounds[0].minibatches[0]] for k, v in data.items()}
    loss_in = problem.inner_loss(th0, mb, eta_policy=eta)
    g = torch.autograd.grad(loss_in, list(th0.values()), create_graph=True)
    th1 = {k: th0[k] - lr * gk for k, gk in zip(th0, g)}
    loss_out = problem.outer_loss(th1, outer, eta_policy=eta, theta_den=theta, eta_den=eta)
    lirpg = torch.autograd.grad(loss_out, list(eta_l.values()))
    torch.testing.assert_close(
        _vec(res.eq13), torch.cat([x.flatten() for x in lirpg]), rtol=1e-12, atol=1e-15
    )
    assert _vec(res.eq13).norm() > 1e-4


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_single_round_has_zero_eq14(opt):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=3)
    res = meta_gradient(problem, OPTIMIZERS[opt](), theta, eta, rounds, outer)
    assert _vec(res.eq14).abs().max() == 0
    assert _vec(res.eq12).norm() > 0 and _vec(res.eq13).norm() > 0


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_eq17_equals_eq11_at_the_same_theta(opt):
    """Eq 17 from a *plain* (non-differentiable) round's theta_{k+1} equals the engine's Eq 11."""
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=3)
    tx = OPTIMIZERS[opt]()
    res = meta_gradient(problem, tx, theta, eta, rounds, outer)
    # plain round: ordinary gradients, no graph kept
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    state = tx.init(th)
    data = problem.prepare(rounds[0].batch, eta_reward=eta, theta_old=theta, eta_policy_old=eta)
    for idx in rounds[0].minibatches:
        loss = problem.inner_loss(th, {k: v[idx] for k, v in data.items()}, eta_policy=eta)
        g = dict(zip(th, torch.autograd.grad(loss, list(th.values()))))
        upd, state = tx.update(g, state, params=th, inplace=False)
        th = {k: (th[k] + upd[k]).detach().requires_grad_(True) for k in th}
    g17 = eq17_gradient(problem, th, eta, outer, theta_den=theta, eta_den=eta)
    torch.testing.assert_close(_vec(g17), _vec(res.eq11), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(_vec(res.eq17), _vec(res.eq11), rtol=0, atol=0)


def test_diagnostics_report_norms_cosines_time():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=2)
    res = meta_gradient(
        problem, torchopt.adam(0.01, eps_root=1e-8), theta, eta, rounds, outer, measure_memory=True
    )
    d = res.diagnostics
    for t in (*TERMS, "eq17"):
        assert d[f"norm_{t}"] == pytest.approx(float(_vec(getattr(res, t)).norm()))
        assert -1.0 <= d[f"cos_{t}_total"] <= 1.0
    assert d["time_s"] > 0 and d["graph_bytes"] > 0 and d["inner_steps"] == 4
    only_total = meta_gradient(
        problem, torchopt.adam(0.01, eps_root=1e-8), theta, eta, rounds, outer, terms=False
    )
    assert only_total.eq12 is None
    torch.testing.assert_close(_vec(only_total.total), _vec(res.total), rtol=1e-12, atol=1e-15)


def test_flat_parameter_unroll_equals_per_tensor_unroll():
    """The flat-vector optimizer path gives the per-tensor numbers, state carried in and out."""
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=2)
    tx = torchopt.chain(clip_grad_norm(0.5), torchopt.adam(0.01, eps_root=1e-8))
    state = tx.init(theta)
    warm = meta_gradient(
        problem, tx, theta, eta, rounds[:1], outer, opt_state=state, flat_params=False
    )
    a = meta_gradient(
        problem, tx, warm.theta_next, eta, rounds, outer, opt_state=warm.opt_state, flat_params=True
    )
    b = meta_gradient(
        problem,
        tx,
        warm.theta_next,
        eta,
        rounds,
        outer,
        opt_state=warm.opt_state,
        flat_params=False,
    )
    for term in (*TERMS, "total"):
        torch.testing.assert_close(
            _vec(getattr(a, term)), _vec(getattr(b, term)), rtol=1e-10, atol=1e-14
        )
    torch.testing.assert_close(_vec(a.theta_next), _vec(b.theta_next), rtol=1e-12, atol=1e-14)
    mu_a, mu_b = a.opt_state[1][0].mu, b.opt_state[1][0].mu
    assert [t.shape for t in mu_a] == [t.shape for t in mu_b] and len(mu_a) == len(theta)
    torch.testing.assert_close(
        torch.cat([t.flatten() for t in mu_a]),
        torch.cat([t.flatten() for t in mu_b]),
        rtol=1e-12,
        atol=1e-15,
    )


# ------------------------------------------------------------------ memory guard


def test_memory_guard_stops_with_how_many_steps_fit():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=3)
    est = check_unroll_memory(
        problem, torchopt.sgd(0.1), theta, eta, rounds, None, InnerSurrogate.PAPER, 10**12
    )
    assert est > 0
    per_step = est // 3
    with pytest.raises(
        MemoryBudgetError, match=r"1 round \(3 inner steps\) need .*about 1 steps fit"
    ):
        meta_gradient(
            problem,
            torchopt.sgd(0.1),
            theta,
            eta,
            rounds,
            outer,
            memory_budget_bytes=int(per_step * 1.5),
        )
    # the estimate is of the right size: within 2x of the bytes the real unroll holds
    res = meta_gradient(problem, torchopt.sgd(0.1), theta, eta, rounds, outer, measure_memory=True)
    assert 0.5 < est / res.diagnostics["graph_bytes"] < 2.0


# ------------------------------------------------------------------ bad input


def test_bad_inputs_give_clear_errors():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=1)
    sgd = torchopt.sgd(0.1)
    with pytest.raises(ConfigError, match="not a TorchOpt GradientTransformation"):
        meta_gradient(
            problem, torch.optim.SGD([theta["log_std"]], lr=0.1), theta, eta, rounds, outer
        )
    bad = dict(theta)
    bad["extra.weight"] = bad.pop("mean.weight")
    with pytest.raises(ConfigError, match=r"missing \['mean.weight'\].*unexpected \['extra"):
        meta_gradient(problem, sgd, bad, eta, rounds, outer)
    bad = dict(eta)
    bad["head.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"eta\['head.weight'\] has shape \(3, 3\)"):
        meta_gradient(problem, sgd, theta, bad, rounds, outer)
    with pytest.raises(ConfigError, match="rounds is empty"):
        meta_gradient(problem, sgd, theta, eta, [], outer)
    empty = {k: v[:0] for k, v in rounds[0].batch.items()}
    with pytest.raises(ConfigError, match=r"rounds\[0\].batch\['obs'\] is empty"):
        meta_gradient(problem, sgd, theta, eta, [Round(empty, rounds[0].minibatches)], outer)
    nan = dict(outer)
    nan["adv_ex"] = outer["adv_ex"].clone()
    nan["adv_ex"][2] = float("nan")
    with pytest.raises(ConfigError, match=r"outer_batch\['adv_ex'\] has 1 NaN"):
        meta_gradient(problem, sgd, theta, eta, rounds, nan)
    with pytest.raises(ConfigError, match="surrogate='exact' is invalid"):
        meta_gradient(problem, sgd, theta, eta, rounds, outer, surrogate="exact")
    with pytest.raises(ConfigError, match="denominator='old' is invalid"):
        meta_gradient(problem, sgd, theta, eta, rounds, outer, denominator="old")
    # plain Adam: sqrt(v) at v = 0 (the reward net's zero biases give zero CLN-map gradients)
    with pytest.raises(ConfigError, match=r"backward pass.*sqrt\(v\) at v = 0.*eps_root"):
        meta_gradient(problem, torchopt.adam(0.01), theta, eta, rounds, outer)
    with pytest.raises(ConfigError, match="no minibatches"):
        meta_gradient(problem, sgd, theta, eta, [Round(rounds[0].batch, [])], outer)


# ------------------------------------------------------------------ two-phase API, score term


def test_start_then_finish_equals_meta_gradient_and_finishes_once():
    from metagrad_rl.metagrad import start_meta_gradient

    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=2)
    tx = torchopt.adam(0.01, eps_root=1e-8)
    pending = start_meta_gradient(problem, tx, theta, eta, rounds)
    ref = meta_gradient(problem, tx, theta, eta, rounds, outer)
    torch.testing.assert_close(_vec(pending.theta_next), _vec(ref.theta_next), rtol=0, atol=0)
    res = pending.finish(outer)
    for term in (*TERMS, "total", "eq17"):
        torch.testing.assert_close(
            _vec(getattr(res, term)), _vec(getattr(ref, term)), rtol=0, atol=0
        )
    with pytest.raises(ConfigError, match="finished already"):
        pending.finish(outer)


@pytest.mark.parametrize("n_rounds", [1, 2])
def test_score_term_against_finite_differences_of_the_batch_log_likelihood(n_rounds):
    """score = grad_eta [w sum_k log p(tau_k; theta_k(eta), eta)], theta_k through the unroll."""
    from metagrad_rl.metagrad import start_meta_gradient
    from metagrad_rl.unroll import unroll

    problem, theta, eta, rounds, outer = make_setup(n_rounds=n_rounds, steps=2)
    tx = torchopt.sgd(0.05)
    w = 0.7
    res = start_meta_gradient(problem, tx, theta, eta, rounds).finish(outer, score_weight=w)
    plain = meta_gradient(problem, tx, theta, eta, rounds, outer)
    torch.testing.assert_close(_vec(res.total), _vec(plain.total), rtol=0, atol=0)

    def loglik(e):
        starts = unroll(problem, tx, theta, EtaPaths.shared(e), rounds).round_starts
        return w * sum(
            problem.log_likelihood(s, r.batch, eta_policy=e) for s, r in zip(starts, rounds)
        )

    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        u = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in eta.items()}
        h = 1e-5
        fd = (
            loglik({k: v + h * u[k] for k, v in eta.items()})
            - loglik({k: v - h * u[k] for k, v in eta.items()})
        ) / (2 * h)
        assert float(_vec(res.score) @ _vec(u)) == pytest.approx(float(fd), rel=1e-6)
    assert res.diagnostics["norm_score"] > 0


# ------------------------------------------------------------------ a user's own problem


def test_user_problem_against_closed_form():
    """A quadratic bilevel problem written by a user, against its closed-form meta-gradient.

    inner: L_in = 0.5 |theta - A eta_r|^2 / n per sample (reward path) + 0.5 theta^T B(eta_p) theta
    with B = diag(eta_p^2) (policy path); one SGD step; outer: 0.5 |theta' - c|^2 + d^T eta_o.
    """
    from metagrad_rl.unroll import MetaProblem

    torch.manual_seed(0)
    n, dim = 4, 3
    A = torch.randn(dim, dim, dtype=torch.float64)
    c = torch.randn(dim, dtype=torch.float64)
    d = torch.randn(dim, dtype=torch.float64)
    w = torch.rand(n, dtype=torch.float64)

    def prepare(batch, *, eta_reward, theta_old, eta_policy_old):
        target = (A @ eta_reward["e"]).expand(n, dim)
        return {"target": target, "w": batch["w"]}

    def inner_loss(theta, mb, *, eta_policy):
        t = theta["t"]
        fit = 0.5 * (mb["w"][:, None] * (t - mb["target"]) ** 2).sum() / mb["w"].sum()
        return fit + 0.5 * (eta_policy["e"] ** 2 * t**2).sum()

    def outer_loss(theta, batch, *, eta_policy, theta_den, eta_den):
        return 0.5 * ((theta["t"] - c) ** 2).sum() + d @ eta_policy["e"]

    problem = MetaProblem(prepare, inner_loss, outer_loss)
    theta = {"t": torch.randn(dim, dtype=torch.float64)}
    eta = {"e": torch.randn(dim, dtype=torch.float64)}
    lr = 0.3
    res = meta_gradient(
        problem,
        torchopt.sgd(lr),
        theta,
        eta,
        [Round({"w": w}, [torch.arange(n)])],
        {"x": torch.zeros(1)},
    )
    t0, e = theta["t"], eta["e"]
    t1 = t0 - lr * ((t0 - A @ e) + e**2 * t0)
    v = t1 - c  # dL_out / dtheta'
    torch.testing.assert_close(res.eq11["e"], d)
    torch.testing.assert_close(res.eq13["e"], lr * A.T @ v)  # dtheta'/deta_r = lr A
    torch.testing.assert_close(res.eq12["e"], -lr * 2 * e * t0 * v)  # dtheta'/deta_p
    torch.testing.assert_close(res.eq14["e"], torch.zeros(dim, dtype=torch.float64))
    torch.testing.assert_close(res.total["e"], d + lr * A.T @ v - lr * 2 * e * t0 * v)


def test_conditioning_terms_never_reach_the_reward_networks_body():
    """Eq 11/12/17 reach eta only through cln_condition (bottleneck and head): 0 on the body;
    Eq 13 goes through the reward itself and moves every layer."""
    from metagrad_rl.networks import CONDITION_KEYS

    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=3)
    res = meta_gradient(problem, OPTIMIZERS["adam"](), theta, eta, rounds, outer)
    body = [k for k in eta if k not in CONDITION_KEYS]
    assert body and all(k in eta for k in CONDITION_KEYS)
    for term in (res.eq11, res.eq12, res.eq17):
        assert all(float(term[k].abs().max()) == 0.0 for k in body)
        assert any(float(term[k].abs().max()) > 0.0 for k in CONDITION_KEYS)
    assert all(float(res.eq13[k].abs().max()) > 0.0 for k in body if k.endswith("weight"))
