"""Exact means the derivative of what runs: the differentiable clip, the engine's refusal of
graph-cutting optimizers, and the verifier, each against central differences in float64.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torchopt
from meta_helpers import inner_gradient_norms, make_setup

from metagrad_rl.errors import ConfigError
from metagrad_rl.metagrad import meta_gradient, start_meta_gradient
from metagrad_rl.optim import clip_counts, clip_grad_norm, graph_cuts
from metagrad_rl.pytree import TERMS, flatten
from metagrad_rl.trainers.bilevel import CLNConfig, policy_optimizer
from metagrad_rl.unroll import EtaPaths, MetaProblem, anchor_at, unroll
from metagrad_rl.verify import (
    VerificationError,
    path_directional_derivative,
    path_objective,
    verify_meta_gradient,
)

# ------------------------------------------------------------------ the clip itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.05, 1.0, 100.0])
@pytest.mark.parametrize("inplace", [False, True])
def test_clip_equals_torchopt_clip_in_value(dtype, max_norm, inplace):
    gen = torch.Generator().manual_seed(0)
    g = {"a": torch.randn(4, 3, generator=gen, dtype=dtype), "b": torch.randn(7, dtype=dtype)}
    ours, ref = clip_grad_norm(max_norm), torchopt.clip_grad_norm(max_norm)
    a, _ = ours.update({k: v.clone() for k, v in g.items()}, ours.init(g), inplace=inplace)
    b, _ = ref.update({k: v.clone() for k, v in g.items()}, ref.init(g), inplace=inplace)
    for k in g:
        torch.testing.assert_close(
            a[k], b[k], rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0
        )
    flat = torch.cat([v.flatten() for v in g.values()])
    (fa,), _ = ours.update((flat,), ours.init((flat,)), inplace=False)
    torch.testing.assert_close(fa, torch.cat([a[k].flatten() for k in g]), rtol=1e-6, atol=0)


def test_clip_jacobian_is_the_projected_scaling_when_it_fires():
    """d(clip(g))/dg = c/(|g|+e) (I - g g^T / (|g| (|g|+e))) when clipping fires, I when not."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(6, generator=gen, dtype=torch.float64)
    n, eps = float(g.norm()), 1e-6
    for c, fires in ((0.3 * n, True), (3.0 * n, False)):
        tx = clip_grad_norm(c, eps=eps)

        def f(x, tx=tx):
            return tx.update((x,), tx.init((x,)), inplace=False)[0][0]

        jac = torch.autograd.functional.jacobian(f, g)
        if fires:
            ref = (
                c / (n + eps) * (torch.eye(6, dtype=g.dtype) - torch.outer(g, g) / (n * (n + eps)))
            )
        else:
            ref = torch.eye(6, dtype=g.dtype)
        torch.testing.assert_close(jac, ref, rtol=1e-12, atol=1e-14)
        x = g.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(f, (x,)) and torch.autograd.gradgradcheck(f, (x,))
    # TorchOpt's clip: the factor is a float, its Jacobian misses the projection
    ref_tx = torchopt.clip_grad_norm(0.3 * n)
    jac_ref = torch.autograd.functional.jacobian(
        lambda x: ref_tx.update((x,), ref_tx.init((x,)), inplace=False)[0][0], g
    )
    assert not torch.allclose(jac_ref, jac)


def test_clip_counts_how_often_it_fires_and_is_finite_at_a_zero_gradient():
    tx = clip_grad_norm(1.0)
    state = tx.init((torch.zeros(3),))
    for scale in (0.1, 10.0, 5.0, 0.2):
        _, state = tx.update((torch.full((3,), scale),), state, inplace=False)
    assert clip_counts(state) == (2, 4)
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (out,), _ = tx.update((x * 2,), tx.init((x,)), inplace=False)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x, allow_unused=True, materialize_grads=True)
    assert torch.isfinite(g).all() and torch.isfinite(gg).all()
    with pytest.raises(ConfigError, match="max_norm=0 is invalid"):
        clip_grad_norm(0)


# ------------------------------------------------------------------ the engine refuses graph cuts


def test_engine_refuses_torchopt_clip_and_names_the_replacement():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)
    bad = torchopt.chain(torchopt.clip_grad_norm(0.5), torchopt.adam(0.01, eps_root=1e-8))
    for call in (
        lambda: meta_gradient(problem, bad, theta, eta, rounds, outer),
        lambda: start_meta_gradient(problem, bad, theta, eta, rounds),
        lambda: verify_meta_gradient(problem, bad, theta, eta, rounds, outer),
    ):
        with pytest.raises(ConfigError, match=r"metagrad_rl\.clip_grad_norm") as e:
            call()
        assert "\n" not in str(e.value)
    accelerated = torchopt.adam(0.01, use_accelerated_op=True)
    assert graph_cuts(accelerated) and not graph_cuts(torchopt.adam(0.01))
    with pytest.raises(ConfigError, match="use_accelerated_op"):
        meta_gradient(problem, accelerated, theta, eta, rounds, outer)
    assert graph_cuts(policy_optimizer(CLNConfig())) == []
    # the explicit opt-out: computed, and the result says what was held constant
    res = meta_gradient(problem, bad, theta, eta, rounds, outer, allow_graph_cuts=True)
    assert len(res.notes) == 1 and "held constant" in res.notes[0]
    assert meta_gradient(problem, torchopt.sgd(0.1), theta, eta, rounds, outer).notes == ()


# ------------------------------------------------------------------ clipping firing, exactly


def _clipped_setup(n_rounds, opt, seed=0):
    """A CLN problem and the trainer-style optimizer (clip, then SGD or the trainer's Adam),
    with a threshold at which clipping fires on some inner steps and not on others."""
    problem, theta, eta, rounds, outer = make_setup(n_rounds=n_rounds, steps=4, seed=seed)

    def chain(c):
        if opt == "sgd":
            return torchopt.chain(clip_grad_norm(c), torchopt.sgd(0.05))
        cfg = CLNConfig(max_grad_norm=c, lr=0.01, anneal_lr=False, adam_eps_root=1e-8)
        return policy_optimizer(cfg)  # the trainer's own chain: clip, then Adam

    base = {"sgd": torchopt.sgd(0.05), "adam": torchopt.adam(0.01, eps_root=1e-8)}[opt]
    norms = sorted(inner_gradient_norms(problem, base, theta, eta, rounds))
    for c in [statistics.median(norms)] + [(a + b) / 2 for a, b in zip(norms, norms[1:])]:
        tx = chain(c)
        res = unroll(problem, tx, theta, EtaPaths.shared(eta), rounds, create_graph=False)
        fired, steps = clip_counts(res.opt_state)
        if 0 < fired < steps:
            return problem, tx, theta, eta, rounds, outer
    raise AssertionError(f"no threshold fires on some steps only: norms {norms}")


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("n_rounds", [1, 2])
@pytest.mark.parametrize("surrogate", ["paper", "detached"])
def test_verify_passes_with_clipping_firing_on_some_steps(opt, n_rounds, surrogate):
    problem, tx, theta, eta, rounds, outer = _clipped_setup(n_rounds, opt)
    res = meta_gradient(problem, tx, theta, eta, rounds, outer, surrogate=surrogate)
    fired, steps = clip_counts(res.opt_state)
    assert 0 < fired < steps == 4 * n_rounds, (fired, steps)
    report = verify_meta_gradient(
        problem, tx, theta, eta, rounds, outer, surrogate=surrogate, raise_on_failure=True
    )
    assert report.passed and report.term_sum_max_abs_error < 1e-12
    # and the total against a central difference of the whole objective (all paths moved)
    anchor = anchor_at(problem, tx, theta, eta, rounds, None, surrogate)
    objective = path_objective(problem, tx, theta, anchor, rounds, outer, surrogate=surrogate)
    v = {k: torch.randn_like(x) for k, x in eta.items()}
    fd, _ = path_directional_derivative(objective, eta, None, v)
    ad = float(flatten(res.total) @ flatten(v))
    assert ad == pytest.approx(fd, rel=1e-6, abs=1e-9 * float(flatten(res.total).norm()))


def test_torchopt_clip_is_measurably_wrong_where_ours_is_exact():
    """The negative control: the same chain with TorchOpt's clip (opt-out) fails the check."""
    problem, _, theta, eta, rounds, outer = _clipped_setup(2, "adam")
    c = 0.5 * statistics.median(
        inner_gradient_norms(problem, torchopt.adam(0.01, eps_root=1e-8), theta, eta, rounds)
    )
    bad = torchopt.chain(torchopt.clip_grad_norm(c), torchopt.adam(0.01, eps_root=1e-8))
    report = verify_meta_gradient(problem, bad, theta, eta, rounds, outer, allow_graph_cuts=True)
    assert not report.passed and not report.gradcheck_passed
    assert "held constant" in str(report)
    good = torchopt.chain(clip_grad_norm(c), torchopt.adam(0.01, eps_root=1e-8))
    assert verify_meta_gradient(problem, good, theta, eta, rounds, outer).passed


# ------------------------------------------------------------------ the verifier cannot be fooled


def _scaled(problem, scale, detach_reward=False, detach_policy=False):
    def prepare(batch, *, eta_reward, theta_old, eta_policy_old):
        if detach_reward:  # the Eq 13 path silently cut, values unchanged
            eta_reward = {k: v.detach() for k, v in eta_reward.items()}
        return problem.prepare(
            batch, eta_reward=eta_reward, theta_old=theta_old, eta_policy_old=eta_policy_old
        )

    def inner_loss(theta, mb, *, eta_policy):
        if detach_policy:
            eta_policy = {k: v.detach() for k, v in eta_policy.items()}
        return problem.inner_loss(theta, mb, eta_policy=eta_policy)

    def outer_loss(theta, batch, **kw):
        return scale * problem.outer_loss(theta, batch, **kw)

    return MetaProblem(prepare, inner_loss, outer_loss)


def test_verifier_is_scale_free_and_catches_a_hidden_detach():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=3, r_ex_coef=0.0)
    tx = torchopt.sgd(0.5)
    honest = verify_meta_gradient(problem, tx, theta, eta, rounds, outer)
    small = verify_meta_gradient(_scaled(problem, 1e-6), tx, theta, eta, rounds, outer)
    assert honest.passed and small.passed
    wrong = _scaled(problem, 1e-6, detach_reward=True)
    true_total = meta_gradient(_scaled(problem, 1e-6), tx, theta, eta, rounds, outer).total
    cut_total = meta_gradient(wrong, tx, theta, eta, rounds, outer).total
    rel = float((flatten(cut_total) - flatten(true_total)).norm() / flatten(true_total).norm())
    assert rel > 0.5  # the cut makes the total badly wrong...
    report = verify_meta_gradient(wrong, tx, theta, eta, rounds, outer)
    assert not report.passed and not report.gradcheck_passed  # ...and the verifier says so
    assert not report.terms["eq13"].passed and report.terms["eq13"].norm == 0.0
    assert report.terms["eq11"].passed
    text = str(report)
    assert "numerical" in text and "analytical" in text  # gradcheck's numbers, not cut off
    assert "eq13, eq14 = 0" in text  # R = 1: Eq 14 is 0 by construction, Eq 13 by the cut
    with pytest.raises(VerificationError, match="FAILED"):
        report.raise_if_failed()
    with pytest.raises(VerificationError):
        verify_meta_gradient(wrong, tx, theta, eta, rounds, outer, raise_on_failure=True)


def test_verifier_checks_each_term_on_its_own_path():
    """A cut Eq 12 path: the Eq 12 row fails while Eq 11 and Eq 13 rows pass."""
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=3)
    wrong = _scaled(problem, 1.0, detach_policy=True)
    report = verify_meta_gradient(wrong, torchopt.sgd(0.5), theta, eta, rounds, outer)
    assert not report.terms["eq12"].passed
    assert report.terms["eq11"].passed and report.terms["eq13"].passed
    shares = sum(report.terms[t].share for t in TERMS)
    assert shares >= 1.0 - 1e-9  # |a + b| <= |a| + |b|
    assert math.isclose(
        report.total_norm,
        float(
            flatten(meta_gradient(wrong, torchopt.sgd(0.5), theta, eta, rounds, outer).total).norm()
        ),
    )
