"""Mixed mode (``second_order="forward"``): forward-over-reverse Hessian products in the
checkpointed reverse pass give the stored-graph numbers, in float64.

Each recomputed step is pulled back through the optimizer first order and through the inner
gradient by ``torch.func.jvp`` (:mod:`metagrad_rl.mixed_mode`); every term (Eq 11-14), the
total, Eq 17, the score term and ``theta_{k+1}`` are compared with the stored graph (one
``torch.autograd`` backward through the whole unroll, independent of the recomputation) and
with the reverse-over-reverse checkpointed pass, to 1e-12 relative, on the trainer's
clip + Adam chain with clipping firing on some steps. A bad ``second_order`` is one error.
"""

from __future__ import annotations

import pytest
import torch
from meta_helpers import make_setup
from test_checkpointed import OPTIMIZERS, STEPS, _assert_same
from test_exactness import _clipped_setup

from metagrad_rl.errors import ConfigError
from metagrad_rl.metagrad import meta_gradient, start_meta_gradient
from metagrad_rl.optim import clip_counts
from metagrad_rl.pytree import TERMS, flatten


@pytest.mark.parametrize("surrogate", ["paper", "detached"])
@pytest.mark.parametrize("n_rounds", [1, 2, 3])
def test_forward_mode_equals_stored_graph_and_reverse_mode_on_the_trainer_chain(
    n_rounds, surrogate
):
    problem, tx, theta, eta, rounds, outer = _clipped_setup(n_rounds, "adam")
    kw = dict(surrogate=surrogate)
    stored = meta_gradient(problem, tx, theta, eta, rounds, outer, **kw)
    fired, steps = clip_counts(stored.opt_state)
    assert 0 < fired < steps  # the clip's Jacobian is not the identity on some steps
    if n_rounds > 1:  # every path carries signal, Eq 14 included
        assert all(flatten(getattr(stored, t)).norm() > 1e-3 for t in TERMS)
    for k in (1, 3, "auto"):
        reverse = meta_gradient(problem, tx, theta, eta, rounds, outer, checkpoint_every=k, **kw)
        forward = meta_gradient(
            problem, tx, theta, eta, rounds, outer, checkpoint_every=k, second_order="forward",
            **kw,
        )  # fmt: skip
        _assert_same(stored, forward)
        _assert_same(reverse, forward)
        assert clip_counts(forward.opt_state) == (fired, steps)


@pytest.mark.parametrize(
    "options",
    [
        dict(surrogate="detached", denominator="theta_k+1"),
        dict(flat_params=False),
        dict(terms=False),
        dict(truncate=4),  # the window starts inside the last round
        dict(truncate=7),  # ... inside the first one: its round start is a constant
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_forward_mode_options_work_unchanged(options):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=STEPS)
    tx = OPTIMIZERS["adam"]()
    stored = meta_gradient(problem, tx, theta, eta, rounds, outer, **options)
    names = ("total", "eq17") if options.get("terms") is False else (*TERMS, "total", "eq17")
    forward = meta_gradient(
        problem, tx, theta, eta, rounds, outer, checkpoint_every=2, second_order="forward",
        **options,
    )  # fmt: skip
    _assert_same(stored, forward, names)


def test_forward_mode_score_term_equals_the_stored_graph():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=STEPS)
    tx = OPTIMIZERS["momentum"]()

    def run(**kw):
        pending = start_meta_gradient(problem, tx, theta, eta, rounds, **kw)
        return pending.finish(outer, score_weight=0.7)

    stored, forward = run(), run(checkpoint_every=3, second_order="forward")
    assert flatten(stored.score).norm() > 1e-3
    _assert_same(stored, forward, ("score", "total", "eq17", *TERMS))


def test_forward_mode_misses_nothing_a_wrong_product_would_change():
    """Negative control: dropping the mixed products H_(eta,x) a_g (Eq 12's and Eq 13's source
    inside the round) must break the comparison, so the test above can fail."""
    import metagrad_rl.recompute as recompute

    problem, tx, theta, eta, rounds, outer = _clipped_setup(1, "adam")
    stored = meta_gradient(problem, tx, theta, eta, rounds, outer)
    real = recompute.gradient_products

    def without_mixed(*args, **kw):
        h_x, h_eta, h_d = real(*args, **kw)
        return h_x, {k: torch.zeros_like(v) for k, v in h_eta.items()}, h_d

    recompute.gradient_products = without_mixed
    try:
        bad = meta_gradient(
            problem, tx, theta, eta, rounds, outer, checkpoint_every=2, second_order="forward"
        )
    finally:
        recompute.gradient_products = real
    assert flatten(stored.eq12).norm() > 1e-3
    assert float((flatten(stored.eq12) - flatten(bad.eq12)).norm()) > 1e-3
    assert torch.equal(flatten(stored.eq11), flatten(bad.eq11))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(second_order="sideways", checkpoint_every=2),
         r"second_order='sideways' is invalid: expected 'reverse' .* or 'forward'"),
        (dict(second_order="jvp", checkpoint_every=2), r"second_order='jvp' is invalid"),
        (dict(second_order="forward"),
         r"second_order='forward' needs checkpoint_every .* pass checkpoint_every='auto'"),
    ],
)  # fmt: skip
def test_bad_second_order_is_one_clear_error(kw, match):
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)
    with pytest.raises(ConfigError, match=match):
        meta_gradient(problem, OPTIMIZERS["sgd"](), theta, eta, rounds, outer, **kw)
