"""A problem's ``minibatch_data``: per-minibatch quantities taken once per round.

``ppo_meta_problem(..., sum_over_workers=f)`` takes every minibatch's advantage statistics for
a round at once (two collectives instead of two per inner step). In one process with
``f`` the identity, the union is the process's own data, so every result must equal the plain
problem's (``sum_over_workers=None``, per-step ``x.std()``) to round-off. That holds in the
stored graph, the checkpointed pass (reverse and forward second order) and the explicit SGD
expansion, in float64 with the trainer's clip + Adam chain, clipping firing: proof that every
engine path merges entry ``j`` into minibatch ``j`` and differentiates through it. Two gloo
workers on this path are tested in ``tests/test_distributed_exact.py``.
"""

from __future__ import annotations

import pytest
import torch
import torchopt
from meta_helpers import make_nets, outer_batch, round_batch

from metagrad_rl.errors import ConfigError
from metagrad_rl.explicit import explicit_sgd_terms
from metagrad_rl.meta_problem import MetaProblem
from metagrad_rl.metagrad import meta_gradient
from metagrad_rl.networks import params_of
from metagrad_rl.optim import clip_grad_norm
from metagrad_rl.problems import ppo_meta_problem
from metagrad_rl.pytree import TERMS, flatten
from metagrad_rl.unroll import Round, minibatch_indices


def _problem(sum_over_workers):
    policy, reward = make_nets("cln", seed=0)
    problem = ppo_meta_problem(
        policy, reward, r_ex_coef=0.5, r_in_coef=1.0, ent_coef=0.01,
        sum_over_workers=sum_over_workers,
    )  # fmt: skip
    theta = {k: v.detach() for k, v in params_of(policy).items()}
    eta = {k: v.detach() for k, v in params_of(reward).items()}
    return problem, theta, eta


def _rounds(n_rounds=2, t=16, minibatches=4):
    gen = torch.Generator().manual_seed(7)
    return [
        Round(round_batch(gen, t), minibatch_indices(t, 2, minibatches, gen))
        for _ in range(n_rounds)
    ], outer_batch(gen, 12)


def _tx():
    return torchopt.chain(clip_grad_norm(1.0), torchopt.adam(0.01, eps_root=1e-8))


def _grads(problem, theta, eta, rounds, outer, **options):
    res = meta_gradient(problem, _tx(), theta, eta, rounds, outer, **options)
    return {"total": flatten(res.total), **{t: flatten(getattr(res, t)) for t in TERMS}}


@pytest.mark.parametrize(
    "options",
    [{}, {"checkpoint_every": 3}, {"checkpoint_every": 3, "second_order": "forward"}],
    ids=["stored", "checkpointed", "mixed-mode"],
)
def test_round_statistics_equal_the_per_step_ones_on_every_engine_path(options):
    rounds, outer = _rounds()
    calls: list[int] = []

    def counted_identity(x):
        calls.append(1)
        return x

    plain = _problem(None)
    hooked = _problem(counted_identity)
    assert plain[0].minibatch_data is None and hooked[0].minibatch_data is not None
    a = _grads(*plain, rounds, outer, memory_budget_bytes=2**40, **options)
    b = _grads(*hooked, rounds, outer, memory_budget_bytes=2**40, **options)
    steps = sum(len(r.minibatches) for r in rounds)  # 16
    per_step = 2 * steps + 2  # what two sums in every inner step (and the outer loss) take
    if not options:  # two per round, two for the memory guard's probe, two per outer loss
        assert len(calls) == 2 * len(rounds) + 2 + 2 * 2, calls
    elif "second_order" not in options:  # recomputed segments take them again, per segment
        assert len(calls) < per_step, calls
    for k in a:
        scale = float(a[k].abs().max())
        assert scale > 0, k
        torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-12 * scale, msg=k)


def test_round_statistics_in_the_explicit_sgd_expansion():
    rounds, outer = _rounds(n_rounds=1, t=8, minibatches=2)
    (p0, th0, et0), (p1, th1, et1) = _problem(None), _problem(lambda x: x)
    a = explicit_sgd_terms(p0, 0.05, th0, et0, rounds, outer)
    b = explicit_sgd_terms(p1, 0.05, th1, et1, rounds, outer)
    for k in ("total", *TERMS):
        x, y = flatten(a[k]), flatten(b[k])
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12 * float(x.abs().max()))


def test_a_minibatch_data_of_the_wrong_length_is_one_line():
    problem, theta, eta = _problem(None)
    broken = MetaProblem(
        problem.prepare, problem.inner_loss, problem.outer_loss,
        minibatch_data=lambda data, minibatches: [{}],
    )  # fmt: skip
    rounds, outer = _rounds(n_rounds=1)
    with pytest.raises(ConfigError, match="minibatch_data returned 1 entries for a round of 8"):
        meta_gradient(broken, _tx(), theta, eta, rounds, outer)
    with pytest.raises(ConfigError, match="minibatch_data"):
        MetaProblem(problem.prepare, problem.inner_loss, problem.outer_loss,
                    minibatch_data=lambda data: [])  # fmt: skip


@pytest.mark.parametrize("checkpoint_every", [None, 3], ids=["stored", "checkpointed"])
def test_the_round_statistics_path_passes_central_differences_with_clipping_firing(
    checkpoint_every,
):
    """The problem with ``minibatch_data`` (round statistics through ``sum_over_workers``)
    against central differences in float64, with the trainer's own chain (clip, then Adam)
    and a clip threshold that fires on some inner steps and not on others: every term and
    the total pass the verifier, and the terms sum to the total to 1e-12."""
    import statistics

    from meta_helpers import inner_gradient_norms

    from metagrad_rl.optim import clip_counts
    from metagrad_rl.trainers.bilevel import CLNConfig, policy_optimizer
    from metagrad_rl.verify import verify_meta_gradient

    problem, theta, eta = _problem(lambda x: x)
    assert problem.minibatch_data is not None
    rounds, outer = _rounds()
    adam = torchopt.adam(0.01, eps_root=1e-8)
    norms = sorted(inner_gradient_norms(problem, adam, theta, eta, rounds))
    for c in [statistics.median(norms)] + [(a + b) / 2 for a, b in zip(norms, norms[1:])]:
        cfg = CLNConfig(max_grad_norm=c, lr=0.01, anneal_lr=False, adam_eps_root=1e-8)
        tx = policy_optimizer(cfg)  # the trainer's chain
        res = meta_gradient(problem, tx, theta, eta, rounds, outer)
        fired, steps = clip_counts(res.opt_state)
        if 0 < fired < steps:
            break
    assert 0 < fired < steps, (fired, steps)
    report = verify_meta_gradient(
        problem, tx, theta, eta, rounds, outer, checkpoint_every=checkpoint_every,
        raise_on_failure=True,
    )  # fmt: skip
    assert report.passed and report.term_sum_max_abs_error < 1e-12


def test_the_verifier_catches_round_statistics_taken_off_the_graph():
    """The negative control of the test above: statistics whose sums leave the graph
    (``sum_over_workers`` detaching, as a plain collective would) fail the check."""
    from metagrad_rl.verify import verify_meta_gradient

    problem, theta, eta = _problem(lambda x: x.detach())
    rounds, outer = _rounds()
    report = verify_meta_gradient(problem, _tx(), theta, eta, rounds, outer, allow_graph_cuts=True)
    assert not report.passed
