"""benchmarks/accuracy_cost.py's rows on a tiny problem: each estimator against the engine."""

from __future__ import annotations

import math

import pytest
import torch
import torchopt
from bench_helpers import load_benchmark
from meta_helpers import make_setup

from metagrad_rl.optim import clip_grad_norm, graph_cuts
from metagrad_rl.trainers.bilevel import CLNConfig


def test_rows_compare_every_estimator_with_the_exact_total():
    ac = load_benchmark("accuracy_cost")
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=4)
    tx = torchopt.chain(clip_grad_norm(0.3), torchopt.adam(0.01, eps_root=1e-8))
    rows = ac.estimator_rows(
        problem, tx, None, theta, eta, rounds, outer, None, CLNConfig(), 1.0, memory=True
    )
    by = {r["estimator"]: r for r in rows}
    assert abs(by["exact"]["cos"] - 1.0) < 1e-12 and by["exact"]["relerr"] == 0.0
    # k >= the 8 unrolled steps is the exact total; fewer steps is not
    for k in (8, 32, 320, 640):
        assert by[f"truncated-k{k}"]["relerr"] == 0.0
    assert by["truncated-k1"]["relerr"] > 1e-3
    # Eq 11-14 together would be the total; every proper subset is listed and differs from it
    assert "eq11+eq12+eq13" in by and "eq11+eq12+eq13+eq14" not in by
    assert all(by[n]["relerr"] > 0 for n in ("eq11", "eq13", "eq12+eq14"))
    # the engine's old derivative (TorchOpt's clip, factor constant) is measurably off
    assert by["constant-clip-factor"]["relerr"] > 1e-3
    assert graph_cuts(ac.with_torchopt_clip(tx)) and ac.with_torchopt_clip(torchopt.sgd(1)) is None
    assert by["exact"]["graph_mib"] > 0 and math.isnan(by["eq17"]["graph_mib"])
    summ = ac.summary([{**r, "optimizer": "adam"} for r in rows])
    assert {s["estimator"] for s in summ} == set(by)
    assert "| adam | 2 | exact | 1.000" in ac.table(summ)


def test_the_look_ahead_rows_are_the_registry_entries_on_the_look_ahead():
    """``lirpg-lookahead`` and ``three-term-lookahead`` are the registry's ``lirpg`` and
    ``three-term`` applied to a look-ahead's result: Eq 13, and Eq 17 + Eq 12 + Eq 13 summed
    here by hand."""
    from metagrad_rl.metagrad import meta_gradient
    from metagrad_rl.pytree import flatten
    from metagrad_rl.unroll import Round

    ac = load_benchmark("accuracy_cost")
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=4)
    tx = torchopt.chain(clip_grad_norm(0.3), torchopt.adam(0.01, eps_root=1e-8))
    full = torch.arange(rounds[0].batch["r_ex"].numel())
    look = meta_gradient(problem, tx, theta, eta, [Round(rounds[0].batch, [full])], outer)
    cfg = CLNConfig()
    rows = ac.estimator_rows(
        problem, tx, None, theta, eta, rounds, outer, (look, 0.0), cfg, 1.0, memory=False
    )
    by = {r["estimator"]: r for r in rows}
    exact = meta_gradient(problem, tx, theta, eta, rounds, outer, denominator=cfg.denominator)
    total = flatten(exact.total)
    hand = flatten(exact.eq17) + flatten(look.eq12) + flatten(look.eq13)
    for name, g in (("three-term-lookahead", hand), ("lirpg-lookahead", flatten(look.eq13))):
        want = ac.compare_row(1, name, g, 0.0, total, 1.0, math.nan)
        assert by[name]["cos"] == pytest.approx(want["cos"], rel=1e-12)
        assert by[name]["relerr"] == pytest.approx(want["relerr"], rel=1e-12)
