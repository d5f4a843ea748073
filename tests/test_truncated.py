"""Truncated and partial meta-gradients: exact derivatives of defined functions (float64)."""

from __future__ import annotations

import pytest
import torch
import torchopt
from meta_helpers import make_setup

from metagrad_rl.errors import ConfigError
from metagrad_rl.metagrad import meta_gradient
from metagrad_rl.optim import clip_grad_norm
from metagrad_rl.pytree import TERMS, flatten
from metagrad_rl.unroll import EtaPaths, prefix_rounds, unroll
from metagrad_rl.verify import verify_meta_gradient


def _tx(opt):
    inner = torchopt.sgd(0.05) if opt == "sgd" else torchopt.adam(0.01, eps_root=1e-8)
    return torchopt.chain(clip_grad_norm(0.3), inner)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("n_rounds,k", [(1, 2), (2, 4), (2, 1)])
def test_truncated_meta_gradient_passes_gradcheck_of_its_own_function(opt, n_rounds, k):
    """k inside a round (R=1, k=2; R=2, k=1), at a round boundary (R=2, k=4: the last round)."""
    problem, theta, eta, rounds, outer = make_setup(
        n_rounds=n_rounds, steps=4 if n_rounds == 2 else 3
    )
    report = verify_meta_gradient(problem, _tx(opt), theta, eta, rounds, outer, truncate=k)
    assert report.passed, str(report)
    full = meta_gradient(problem, _tx(opt), theta, eta, rounds, outer)
    short = meta_gradient(problem, _tx(opt), theta, eta, rounds, outer, truncate=k)
    # the same forward; the prefix runs off the graph, where GAE is the NumPy scan rather than
    # the discount-matrix product: equal to float64 rounding, not bit for bit
    torch.testing.assert_close(
        flatten(short.theta_next), flatten(full.theta_next), rtol=1e-12, atol=1e-15
    )
    assert not torch.allclose(flatten(short.total), flatten(full.total))
    assert short.diagnostics["differentiated_steps"] == k


@pytest.mark.parametrize("surrogate", ["paper", "detached"])
def test_truncation_covering_the_unroll_is_the_total(surrogate):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=3)
    full = meta_gradient(problem, _tx("adam"), theta, eta, rounds, outer, surrogate=surrogate)
    for k in (6, 7, 100):
        res = meta_gradient(
            problem, _tx("adam"), theta, eta, rounds, outer, surrogate=surrogate, truncate=k
        )
        for t in (*TERMS, "total"):
            torch.testing.assert_close(
                flatten(getattr(res, t)), flatten(getattr(full, t)), rtol=0, atol=0
            )


def test_truncation_at_a_round_boundary_restarts_the_engine_there():
    """Through the last round only = the engine on that round alone, from where it began."""
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=3)
    tx = _tx("adam")
    short = meta_gradient(problem, tx, theta, eta, rounds, outer, truncate=3)
    head = unroll(
        problem, tx, theta, EtaPaths.shared(eta), prefix_rounds(rounds, 3), create_graph=False
    )
    alone = meta_gradient(problem, tx, head.theta, eta, rounds[1:], outer, opt_state=head.opt_state)
    for t in ("eq11", "eq12", "eq13", "total"):
        torch.testing.assert_close(
            flatten(getattr(short, t)), flatten(getattr(alone, t)), rtol=1e-12, atol=1e-15
        )
    assert float(flatten(short.eq14).norm()) == 0.0
    zero = meta_gradient(problem, tx, theta, eta, rounds, outer, truncate=0)
    torch.testing.assert_close(flatten(zero.total), flatten(zero.eq11), rtol=0, atol=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="truncate="):
            meta_gradient(problem, tx, theta, eta, rounds, outer, truncate=bad)


def test_term_subsets_sum_the_named_terms():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=2)
    res = meta_gradient(problem, _tx("sgd"), theta, eta, rounds, outer)
    torch.testing.assert_close(
        flatten(res.subset(TERMS)), flatten(res.total), rtol=1e-12, atol=1e-15
    )
    both = flatten(res.eq11) + flatten(res.eq13)
    torch.testing.assert_close(flatten(res.subset(["eq11", "eq13"])), both, rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"\['eq15'\] are invalid"):
        res.subset(["eq15"])
    with pytest.raises(ConfigError, match="were not computed"):
        meta_gradient(problem, _tx("sgd"), theta, eta, rounds, outer, terms=False).subset(["eq12"])
