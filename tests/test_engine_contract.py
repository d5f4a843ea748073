"""The engine's contract with a user's problem: MetaProblem's keywords checked when it is built,
minibatch indices that cannot wrap or repeat, and a verifier that judges any scale alike."""

from __future__ import annotations

import pytest
import torch
import torchopt
from meta_helpers import make_setup

from metagrad_rl import ConfigError, MetaProblem, Round, meta_gradient, verify_meta_gradient


def prepare(batch, *, eta_reward, theta_old, eta_policy_old):
    return {"x": batch["x"]}


def inner_loss(theta, mb, *, eta_policy):
    return (mb["x"] @ theta["w"] - eta_policy["t"]).square().mean()


def outer_loss(theta, batch, *, eta_policy, theta_den, eta_den):
    return theta["w"].square().sum()


# ------------------------------------------------------------------ MetaProblem's keywords


def test_a_correct_problem_and_kwargs_catch_alls_are_accepted():
    MetaProblem(prepare, inner_loss, outer_loss)
    MetaProblem(lambda batch, **kw: {}, lambda theta, mb, **kw: 0, lambda *a, **kw: 0)
    MetaProblem(prepare, inner_loss, outer_loss, log_likelihood=lambda theta, b, *, eta_policy: 0)


def test_a_missing_keyword_names_function_keyword_and_signature():
    def my_prepare(batch, *, eta_reward, eta_policy_old):
        return {}

    with pytest.raises(ConfigError) as e:
        MetaProblem(my_prepare, inner_loss, outer_loss)
    msg = str(e.value)
    assert "\n" not in msg
    assert "my_prepare(batch, *, eta_reward, eta_policy_old)" in msg
    assert "does not take the keyword 'theta_old'" in msg
    assert msg.endswith("expected prepare(batch, *, eta_reward, theta_old, eta_policy_old)")


def test_a_misspelt_keyword_is_named_as_the_argument_never_passed():
    def outer(theta, batch, *, eta_policy, theta_den, eta_den, eta_dem):
        return 0

    with pytest.raises(ConfigError, match=r"missing a required argument: 'eta_dem'") as e:
        MetaProblem(prepare, inner_loss, outer)
    assert "expected outer_loss(theta, batch, *, eta_policy, theta_den, eta_den)" in str(e.value)


def test_wrong_positional_arity_and_non_callables_are_refused():
    with pytest.raises(ConfigError, match=r"inner_loss\(theta, minibatch, \*, eta_policy\)"):
        MetaProblem(prepare, lambda theta, *, eta_policy: 0, outer_loss)
    with pytest.raises(ConfigError, match=r"outer_loss is not callable \(int\)"):
        MetaProblem(prepare, inner_loss, 3)
    with pytest.raises(ConfigError, match=r"log_likelihood .* 'eta_policy'"):
        MetaProblem(prepare, inner_loss, outer_loss, log_likelihood=lambda theta, batch: 0)


# ------------------------------------------------------------------ minibatch indices


def _ridge():
    batch = {"x": torch.randn(6, 3, dtype=torch.float64)}
    theta = {"w": torch.zeros(3, dtype=torch.float64)}
    eta = {"t": torch.ones(1, dtype=torch.float64)}
    return MetaProblem(prepare, inner_loss, outer_loss), batch, theta, eta


@pytest.mark.parametrize(
    ("index", "needle"),
    [
        ([0, -1], r"minibatches\[0\] holds the negative index -1: expected indices 0 \.\. n-1"),
        ([2, 4, 2], r"minibatches\[0\] holds the index 2 more than once"),
    ],
)
def test_negative_and_duplicate_indices_are_refused(index, needle):
    problem, batch, theta, eta = _ridge()
    rounds = [Round(batch, [torch.tensor(index)])]
    with pytest.raises(ConfigError, match=needle):
        meta_gradient(problem, torchopt.sgd(0.1), theta, eta, rounds, batch)
    ok = [Round(batch, [torch.tensor([0, 5])])]  # the same call with valid indices runs
    assert meta_gradient(problem, torchopt.sgd(0.1), theta, eta, ok, batch).total is not None


# ------------------------------------------------------------------ the terms' sum at any scale


def test_the_sum_check_is_relative_to_the_gradients_scale():
    """A correct problem whose outer loss is scaled by 1e10 passes; at that scale the terms'
    sum misses the total by more than the old absolute 1e-10 (rounding), so an absolute
    tolerance would have failed it."""
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)

    def scaled_outer(theta, batch, **kw):
        return 1e10 * problem.outer_loss(theta, batch, **kw)

    scaled = MetaProblem(problem.prepare, problem.inner_loss, scaled_outer)
    report = verify_meta_gradient(scaled, torchopt.sgd(0.05), theta, eta, rounds, outer)
    assert report.passed, str(report)
    assert report.term_sum_max_abs_error > 1e-10  # what the absolute check refused
    assert report.term_sum_max_abs_error <= report.term_sum_tolerance
    assert report.term_sum_tolerance < 1e-9 * report.total_norm  # still tight relative to it
