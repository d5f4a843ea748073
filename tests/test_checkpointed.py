"""The checkpointed (recomputing) reverse pass gives the stored-graph numbers, in float64.

Every term (Eq 11-14), the total, Eq 17, the score term and ``theta_{k+1}`` of
``meta_gradient(..., checkpoint_every=k)`` are compared with the default stored-graph pass to
1e-12 relative (in the norm of each gradient) for R = 1, 2, 3 rounds, ``k = 1``, a ``k`` that
divides no round (3 of 5 steps) and ``"auto"``; SGD, momentum, Adam and the trainer's
clip + Adam with clipping firing on some steps; both surrogates and denominators; flat and
per-tensor updates; truncation; the verifier with the mode on (and still catching a detach).
Two gloo workers are in ``test_distributed_exact.py``.
"""

from __future__ import annotations

import pytest
import torch
import torchopt
from meta_helpers import make_setup
from test_exactness import _clipped_setup, _scaled

from metagrad_rl.errors import ConfigError
from metagrad_rl.memory import MemoryBudgetError, estimate_unroll_bytes
from metagrad_rl.metagrad import meta_gradient, start_meta_gradient
from metagrad_rl.optim import clip_counts
from metagrad_rl.pytree import TERMS, flatten
from metagrad_rl.unroll import InnerSurrogate
from metagrad_rl.verify import verify_meta_gradient

RTOL = 1e-12
STEPS = 5  # inner steps per round: k = 3 divides no round
OPTIMIZERS = {
    "sgd": lambda: torchopt.sgd(0.05),
    "momentum": lambda: torchopt.sgd(0.05, momentum=0.9),
    "adam": lambda: torchopt.adam(0.01, eps_root=1e-10),
}


def _rel(a, b) -> float:
    a, b = flatten(a), flatten(b)
    scale = max(float(a.norm()), float(b.norm()))
    return 0.0 if scale == 0.0 else float((a - b).norm()) / scale


def _assert_same(stored, ckpt, names=(*TERMS, "total", "eq17")):
    for name in names:
        a, b = getattr(stored, name), getattr(ckpt, name)
        assert _rel(a, b) <= RTOL, (name, _rel(a, b))
    assert torch.equal(flatten(stored.theta_next), flatten(ckpt.theta_next))
    assert stored.outer_loss == ckpt.outer_loss


@pytest.mark.parametrize("k", [1, 3, "auto"])
@pytest.mark.parametrize("n_rounds", [1, 2, 3])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_every_term_equals_the_stored_graph(opt, n_rounds, k):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=n_rounds, steps=STEPS)
    tx = OPTIMIZERS[opt]()
    stored = meta_gradient(problem, tx, theta, eta, rounds, outer)
    ckpt = meta_gradient(problem, tx, theta, eta, rounds, outer, checkpoint_every=k)
    _assert_same(stored, ckpt)
    if n_rounds > 1:  # every path carries signal, Eq 14 included
        assert all(flatten(getattr(stored, t)).norm() > 1e-3 for t in TERMS)


@pytest.mark.parametrize("n_rounds", [1, 2])
@pytest.mark.parametrize("surrogate", ["paper", "detached"])
def test_trainer_chain_with_clipping_firing(n_rounds, surrogate):
    problem, tx, theta, eta, rounds, outer = _clipped_setup(n_rounds, "adam")
    stored = meta_gradient(problem, tx, theta, eta, rounds, outer, surrogate=surrogate)
    fired, steps = clip_counts(stored.opt_state)
    assert 0 < fired < steps
    for k in (1, 3, "auto"):
        ckpt = meta_gradient(
            problem, tx, theta, eta, rounds, outer, surrogate=surrogate, checkpoint_every=k
        )
        _assert_same(stored, ckpt)
        assert clip_counts(ckpt.opt_state) == (fired, steps)


@pytest.mark.parametrize(
    "options",
    [
        dict(surrogate="detached", denominator="theta_k+1"),
        dict(flat_params=False),
        dict(terms=False),
        dict(truncate=4),  # the window starts inside the last round
        dict(truncate=7),  # ... inside the first one: its round start is a constant
        dict(truncate=5),  # ... at a round start
        dict(truncate=0),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_options_work_unchanged(options):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=STEPS)
    tx = OPTIMIZERS["adam"]()
    stored = meta_gradient(problem, tx, theta, eta, rounds, outer, **options)
    names = ("total", "eq17") if options.get("terms") is False else (*TERMS, "total", "eq17")
    for k in (2, "auto"):
        ckpt = meta_gradient(problem, tx, theta, eta, rounds, outer, checkpoint_every=k, **options)
        _assert_same(stored, ckpt, names)
        assert (
            ckpt.diagnostics["differentiated_steps"] == stored.diagnostics["differentiated_steps"]
        )


@pytest.mark.parametrize("magic_box", [False, True])
@pytest.mark.parametrize("terms", [True, False])
def test_score_term_equals_the_stored_graph(magic_box, terms):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=STEPS)
    tx = OPTIMIZERS["adam"]()

    def run(**kw):
        pending = start_meta_gradient(problem, tx, theta, eta, rounds, terms=terms, **kw)
        return pending.finish(outer, score_weight=0.7, magic_box=magic_box)

    stored, ckpt = run(), run(checkpoint_every=3)
    assert flatten(stored.score).norm() > 1e-3
    _assert_same(stored, ckpt, ("score", "total", "eq17", *(TERMS if terms else ())))


def test_verify_passes_in_checkpointed_mode_and_still_catches_a_hidden_detach():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=3, r_ex_coef=0.0)
    tx = torchopt.adam(0.01, eps_root=1e-10)
    report = verify_meta_gradient(problem, tx, theta, eta, rounds, outer, checkpoint_every=2)
    assert report.passed and report.term_sum_max_abs_error < 1e-12
    wrong = _scaled(problem, 1.0, detach_reward=True)
    bad = verify_meta_gradient(wrong, tx, theta, eta, rounds, outer, checkpoint_every=2)
    assert not bad.passed and not bad.terms["eq13"].passed
    assert bad.terms["eq11"].passed


def test_graph_memory_is_one_segment_plus_checkpoints():
    """The measured graph of the checkpointed pass is far below the stored one's, and the guard
    estimates both modes within 2x of what they hold."""
    problem, theta, eta, rounds, outer = make_setup(n_rounds=3, steps=16)
    tx = OPTIMIZERS["adam"]()
    kw = dict(measure_memory=True)
    stored = meta_gradient(problem, tx, theta, eta, rounds, outer, **kw)
    ckpt = meta_gradient(problem, tx, theta, eta, rounds, outer, checkpoint_every="auto", **kw)
    _assert_same(stored, ckpt)
    g_stored, g_ckpt = stored.diagnostics["graph_bytes"], ckpt.diagnostics["graph_bytes"]
    assert g_ckpt < 0.35 * g_stored, (g_ckpt, g_stored)
    est = estimate_unroll_bytes(problem, tx, theta, eta, rounds, None, InnerSurrogate.PAPER)
    assert est["k"] == 7  # ceil(sqrt(48))
    assert 0.5 < est["stored"] / g_stored < 2.0
    assert 0.5 < est["checkpointed"] / g_ckpt < 2.0


def test_memory_guard_names_both_modes_and_which_fits():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=3, steps=16)
    tx = OPTIMIZERS["adam"]()
    est = estimate_unroll_bytes(problem, tx, theta, eta, rounds, None, InnerSurrogate.PAPER)
    budget = (est["stored"] + est["checkpointed"]) // 2
    with pytest.raises(
        MemoryBudgetError,
        match=r"3 rounds \(48 inner steps\) need about .* "
        r"stored .* with checkpoint_every='auto'.*pass checkpoint_every='auto'",
    ):
        meta_gradient(problem, tx, theta, eta, rounds, outer, memory_budget_bytes=budget)
    res = meta_gradient(
        problem, tx, theta, eta, rounds, outer, memory_budget_bytes=budget, checkpoint_every="auto"
    )
    assert torch.isfinite(flatten(res.total)).all()
    with pytest.raises(MemoryBudgetError, match="raise the budget"):
        meta_gradient(
            problem, tx, theta, eta, rounds, outer, memory_budget_bytes=8, checkpoint_every=1
        )


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "sqrt", [3]])
def test_bad_checkpoint_every_is_one_clear_error(bad):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)
    with pytest.raises(ConfigError, match=r"checkpoint_every=.* is invalid: expected None"):
        meta_gradient(problem, torchopt.sgd(0.1), theta, eta, rounds, outer, checkpoint_every=bad)


@pytest.mark.parametrize("n_rounds", [1, 2])
def test_checkpointed_trainer_chain_against_central_differences(n_rounds):
    """The recomputed segments differentiate what runs: the trainer's own clip + Adam chain,
    clipping firing on some steps, against float64 central differences (the verifier's
    gradcheck of the total and each term on its own path)."""
    problem, tx, theta, eta, rounds, outer = _clipped_setup(n_rounds, "adam")
    report = verify_meta_gradient(
        problem, tx, theta, eta, rounds, outer, checkpoint_every=3, raise_on_failure=True
    )
    assert report.passed and report.gradcheck_passed
    assert all(report.terms[t].passed for t in TERMS)
