"""The tabular test bed against independent references, and each estimator's exact bias.

References: dynamic programming vs trajectory enumeration, a hand-written policy-gradient step vs
the autograd inner round, a nested (tree) expectation vs the flat enumeration, finite differences
(gradcheck) vs autograd of ``M``, and Monte Carlo sampling vs exact expectations.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torchopt

from metagrad_rl.testing import (
    ESTIMATORS,
    TabularMDP,
    bias_variance_table,
    estimator_draws,
    exact_moments,
    extrinsic_return,
    extrinsic_return_by_enumeration,
    inner_round,
    make_mdp,
    make_problem,
    meta_objective,
    monte_carlo_moments,
    policy_log_probs,
    relative_bias,
    sample_batches,
    true_meta_gradient,
)
from metagrad_rl.testing.tabular import enumerate_trajectories

EXACT_RTOL = 1e-10
CASES = [(k, cond) for k in (1, 2) for cond in (False, True)]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = EXACT_RTOL) -> bool:
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


# ---------------------------------------------------------------------------------------------
# The test bed itself
# ---------------------------------------------------------------------------------------------
def test_extrinsic_return_by_hand_one_state():
    r = torch.tensor([[0.2, 1.0]], dtype=torch.float64)
    mdp = TabularMDP(
        p0=torch.ones(1, dtype=torch.float64),
        transition=torch.ones(1, 2, 1, dtype=torch.float64),
        r_ex=r,
        horizon=3,
    )
    probs = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    expected = 3 * (0.25 * 0.2 + 0.75 * 1.0)
    assert extrinsic_return(mdp, probs).item() == pytest.approx(expected, abs=1e-15)
    assert extrinsic_return(mdp, probs, gamma=0.5).item() == pytest.approx(
        (1 + 0.5 + 0.25) * expected / 3, abs=1e-15
    )


@pytest.mark.parametrize("horizon, gamma", [(2, 1.0), (3, 0.9)])
def test_extrinsic_return_dp_against_enumeration(horizon, gamma):
    mdp = make_mdp(seed=3, n_states=3, n_actions=2, horizon=horizon)
    logits = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    dp = extrinsic_return(mdp, probs, gamma)
    enum = extrinsic_return_by_enumeration(mdp, probs, gamma)
    assert dp.shape == (5,)
    torch.testing.assert_close(dp, enum, rtol=0, atol=1e-14)


def test_trajectory_probabilities_sum_to_one():
    mdp = make_mdp(seed=1, n_states=3, horizon=3)
    traj = enumerate_trajectories(mdp)
    probs = torch.softmax(torch.randn(3, 2, dtype=torch.float64), -1)
    log_pi = probs.log()[traj.states, traj.actions].sum(-1)
    assert (log_pi + traj.log_p_dynamics).exp().sum().item() == pytest.approx(1.0, abs=1e-14)


def test_unconditioned_policy_ignores_eta():
    problem = make_problem(0, conditioned=False)
    a = policy_log_probs(problem, problem.theta0, problem.eta)
    b = policy_log_probs(problem, problem.theta0, problem.eta + 3.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("conditioned", [False, True])
def test_inner_round_against_hand_written_policy_gradient(conditioned):
    """One SGD step of the policy gradient with the softmax score written out by hand."""
    problem = make_problem(2, conditioned=conditioned, batch_size=2, lr=0.7, gamma=0.9)
    cfg, mdp, eta = problem.config, problem.mdp, problem.eta
    traj = enumerate_trajectories(mdp)
    flat = eta.flatten()
    if conditioned:
        gain = 1 + torch.tanh(problem.gain_map @ flat)
        bias = (problem.bias_map @ flat).view_as(eta)
    else:
        gain, bias = torch.ones(mdp.n_states, dtype=torch.float64), torch.zeros_like(eta)
    pi = torch.softmax(gain[:, None] * problem.theta0 + bias, -1)
    r_mix = mdp.r_ex + eta
    for batch in [(0, 5), (7, 7), (15, 2)]:
        expected = problem.theta0.clone()
        for n in batch:
            states, actions = traj.states[n].tolist(), traj.actions[n].tolist()
            for t, (s, a) in enumerate(zip(states, actions)):
                adv = sum(
                    cfg.gamma ** (u - t) * r_mix[states[u], actions[u]]
                    for u in range(t, mdp.horizon)
                )
                score = -pi[s].clone()
                score[a] += 1.0
                expected[s] += cfg.lr / len(batch) * gain[s] * score * adv
        idx = torch.tensor(batch)
        out = inner_round(
            problem, problem.theta0, eta, traj.states[idx][None], traj.actions[idx][None]
        )
        torch.testing.assert_close(out.theta[0], expected, rtol=0, atol=1e-14)
        log_p = torch.log(pi[traj.states[idx], traj.actions[idx]]).sum()
        assert out.log_prob.item() == pytest.approx(log_p.item(), abs=1e-13)


def test_torchopt_sgd_matches_built_in_sgd():
    plain = make_problem(0, rounds=2, lr=0.5)
    with_opt = make_problem(0, rounds=2, lr=123.0, optimizer=torchopt.sgd(0.5))
    torch.testing.assert_close(
        true_meta_gradient(plain), true_meta_gradient(with_opt), rtol=0, atol=1e-15
    )


# ---------------------------------------------------------------------------------------------
# The true meta-gradient
# ---------------------------------------------------------------------------------------------
def _meta_objective_by_recursion(problem, eta):
    """``M`` as a nested expectation: round ``k+1``'s batch law given ``theta_{k+1}(tau_k)``."""
    mdp, cfg = problem.mdp, problem.config
    traj = enumerate_trajectories(mdp)
    n = traj.states.shape[0]

    def expect(theta, k):
        if k == cfg.rounds:
            return extrinsic_return(mdp, policy_log_probs(problem, theta, eta).exp(), cfg.gamma)
        log_pi = policy_log_probs(problem, theta, eta)
        total = 0.0
        for batch in itertools.product(range(n), repeat=cfg.batch_size):
            idx = torch.tensor(batch)
            s, a = traj.states[idx], traj.actions[idx]
            p = (log_pi[s, a].sum() + traj.log_p_dynamics[idx].sum()).exp()
            nxt = inner_round(problem, theta, eta, s[None], a[None]).theta[0]
            total = total + p * expect(nxt, k + 1)
        return total

    return expect(problem.theta0, 0)


@pytest.mark.parametrize("rounds, batch_size", [(2, 1), (1, 2)])
def test_meta_objective_against_nested_expectation(rounds, batch_size):
    problem = make_problem(1, conditioned=True, rounds=rounds, batch_size=batch_size)
    eta = problem.eta.clone().requires_grad_(True)
    flat = meta_objective(problem, eta)
    nested = _meta_objective_by_recursion(problem, eta)
    assert flat.item() == pytest.approx(nested.item(), abs=1e-14)
    (g_flat,) = torch.autograd.grad(flat, eta)
    (g_nested,) = torch.autograd.grad(nested, eta)
    torch.testing.assert_close(g_flat, g_nested, rtol=0, atol=1e-14)


@pytest.mark.parametrize("rounds, conditioned", CASES)
def test_meta_gradient_gradcheck(rounds, conditioned):
    problem = make_problem(0, conditioned=conditioned, rounds=rounds)
    eta = problem.eta.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: meta_objective(problem, e), (eta,))


def test_meta_objective_against_monte_carlo():
    problem = make_problem(0, conditioned=True, rounds=2)
    batches = sample_batches(problem, 100_000, torch.Generator().manual_seed(5))
    returns = estimator_draws(problem, batches, "plain").objective
    stderr = returns.std() / returns.numel() ** 0.5
    assert abs(returns.mean() - meta_objective(problem).detach()) <= 5 * stderr


# ---------------------------------------------------------------------------------------------
# Exact bias of each estimator
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["sampling_aware", "dice"])
@pytest.mark.parametrize("rounds, conditioned", CASES)
def test_unbiased_estimators_exact_expectation_equals_true_gradient(estimator, rounds, conditioned):
    problem = make_problem(0, conditioned=conditioned, rounds=rounds)
    assert _close(exact_moments(problem, estimator).mean, true_meta_gradient(problem))


@pytest.mark.parametrize(
    "fields",
    [
        {"batch_size": 2},
        {"inner_steps": 2, "clip": 0.2},
        {"inner_steps": 3, "lr": 2.0, "r_ex_coef": 0.0},
        {"optimizer": torchopt.sgd(1.0, momentum=0.9)},
        {"optimizer": torchopt.adam(0.3, eps_root=1e-12)},
    ],
    ids=["B2", "ppo-clip", "3-steps", "momentum", "adam"],
)
def test_sampling_aware_exact_for_other_inner_loops(fields):
    problem = make_problem(
        4, conditioned=True, rounds=2 if "batch_size" not in fields else 1, **fields
    )
    truth = true_meta_gradient(problem)
    assert _close(exact_moments(problem, "sampling_aware").mean, truth)
    assert _close(exact_moments(problem, "dice").mean, truth)


@pytest.mark.parametrize("rounds, conditioned", CASES)
def test_plain_expansion_unbiased_only_for_one_round_unconditioned(rounds, conditioned, capsys):
    problem = make_problem(0, conditioned=conditioned, rounds=rounds)
    truth = true_meta_gradient(problem)
    bias = relative_bias(exact_moments(problem, "plain").mean, truth)
    with capsys.disabled():
        print(f"\nplain expansion, K={rounds}, conditioned={conditioned}: relative bias {bias:.3f}")
    if rounds == 1 and not conditioned:
        assert bias <= EXACT_RTOL
    else:
        assert bias > 0.1  # measured: 0.446 (K=1 cond), 0.153 (K=2), 0.241 (K=2 cond)


def test_dice_and_sampling_aware_agree_draw_by_draw():
    """First derivatives coincide on every draw, with or without a baseline."""
    problem = make_problem(0, conditioned=True, rounds=2)
    batches = sample_batches(problem, 64, torch.Generator().manual_seed(0))
    for baseline in (None, 0.7, "initial_return"):
        sa = estimator_draws(problem, batches, "sampling_aware", baseline).grads
        dice = estimator_draws(problem, batches, "dice", baseline).grads
        torch.testing.assert_close(sa, dice, rtol=0, atol=1e-14)


@pytest.mark.parametrize("rounds, conditioned", [(1, True), (2, False), (2, True)])
def test_baseline_keeps_expectation_and_cuts_variance(rounds, conditioned):
    problem = make_problem(0, conditioned=conditioned, rounds=rounds)
    plain_b = exact_moments(problem, "sampling_aware")
    m_value = meta_objective(problem).item()
    for baseline in ("initial_return", m_value):
        with_b = exact_moments(problem, "sampling_aware", baseline)
        assert _close(with_b.mean, plain_b.mean)
        assert with_b.variance < 0.2 * plain_b.variance  # measured 8x-13x smaller


# ---------------------------------------------------------------------------------------------
# Monte Carlo against the exact moments
# ---------------------------------------------------------------------------------------------
MC_SAMPLES = 200_000
MC_Z = 5.0


def test_monte_carlo_converges_to_exact_expectation():
    """Per coordinate ``|MC mean - exact mean| <= 5 SE``, and 5 SE is far below plain's bias.

    The bound is meaningful: the plain estimator's exact expectation sits many standard errors
    from the true gradient, so the same test applied to the truth would reject it.
    """
    problem = make_problem(0, conditioned=True, rounds=2)
    truth = true_meta_gradient(problem)
    plain_bias = exact_moments(problem, "plain").mean - truth
    cases = [(e, None) for e in ESTIMATORS] + [
        ("sampling_aware", "initial_return"),
        ("dice", "initial_return"),
    ]
    for estimator, baseline in cases:
        mc = monte_carlo_moments(problem, estimator, MC_SAMPLES, seed=11, baseline=baseline)
        exact = exact_moments(problem, estimator, baseline)
        z = ((mc.mean - exact.mean) / mc.stderr).abs()
        assert z.max() <= MC_Z, (estimator, baseline, z)
        # The bound could have caught the plain estimator's bias on some coordinate.
        assert (plain_bias.abs() / mc.stderr).max() > 2 * MC_Z, (estimator, baseline)
    mc_plain = monte_carlo_moments(problem, "plain", MC_SAMPLES, seed=11)
    assert ((mc_plain.mean - truth) / mc_plain.stderr).abs().max() > 10 * MC_Z  # measured 99 SE


def test_leave_one_out_baseline_is_unbiased_and_cuts_variance():
    problem = make_problem(0, conditioned=True, rounds=2)
    exact = exact_moments(problem, "sampling_aware")
    mc = monte_carlo_moments(
        problem, "sampling_aware", MC_SAMPLES, seed=3, baseline="leave_one_out"
    )
    assert ((mc.mean - exact.mean) / mc.stderr).abs().max() <= MC_Z
    assert mc.variance < 0.2 * exact.variance


# ---------------------------------------------------------------------------------------------
# Benchmark table
# ---------------------------------------------------------------------------------------------
def test_bias_variance_table_rows():
    table = bias_variance_table(
        batch_sizes=(1, 3), rounds=(1,), conditioned=(True,), max_exact_draws=16**2, mc_samples=2000
    )
    assert len(table) == 2 * 4
    exact_rows = [r for r in table if r["mode"] == "exact"]
    assert {r["batch_size"] for r in exact_rows} == {1}
    by_name = {(r["estimator"], r["baseline"]): r for r in exact_rows}
    assert by_name[("plain", None)]["bias_rel"] > 0.1
    assert by_name[("sampling_aware", None)]["bias_rel"] < EXACT_RTOL
    assert (
        by_name[("sampling_aware", "initial_return")]["variance"]
        < by_name[("sampling_aware", None)]["variance"]
    )
    assert all(r["mode"] == "mc" and r["stderr_rel"] > 0 for r in table if r["batch_size"] == 3)
