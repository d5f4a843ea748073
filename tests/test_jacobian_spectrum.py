"""benchmarks/jacobian_spectrum.py on a tiny Hopper run: its pieces against the engine."""

from __future__ import annotations

import json
import math

import pytest
import torch
from bench_helpers import load_benchmark

from metagrad_rl.flat import FlatLayout
from metagrad_rl.unroll import EtaPaths, unroll

js = load_benchmark("jacobian_spectrum")

TINY = dict(num_steps=128, num_minibatches=4, update_epochs=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("jacobian_spectrum")
    budget = js.SpectrumBudget(steps=256, checkpoints=1, iters=3)
    rows = js.run(out, budget, **TINY)
    js.write(out, rows, {"budget": "tiny"})
    return out, rows


def test_plain_round_is_the_engines_unroll():
    """The benchmark's graph-free round ends where the engine's unroll does."""
    from meta_helpers import make_setup

    problem, theta, eta, rounds, _ = make_setup(n_rounds=1, steps=3)
    cfg = js.CLNConfig(**TINY, total_steps=1280)
    tx = js.policy_optimizer(cfg)
    _, got, _, share = js.plain_round(problem, tx, theta, eta, rounds[0], None)
    ref = unroll(problem, tx, theta, EtaPaths.shared(eta), rounds, create_graph=False)
    torch.testing.assert_close(got, FlatLayout(theta).flatten(ref.theta), rtol=0, atol=1e-14)
    assert 0.0 <= share <= 1.0


def test_adjoint_gain_against_the_full_jacobian():
    """||J^T g|| / ||g|| with J from torch.autograd.functional.jacobian, g by hand."""
    from meta_helpers import OPTIMIZERS, make_setup

    from metagrad_rl.jacobian import round_map

    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)
    F, layout = round_map(problem, OPTIMIZERS["adam"](), theta, eta, rounds[0])
    x0 = layout.flatten(theta)
    gain, g_norm = js.adjoint_gain(problem, F, layout, x0, eta, outer, theta)
    J = torch.autograd.functional.jacobian(F, x0)
    y = F(x0).detach().requires_grad_(True)
    loss = problem.outer_loss(
        layout.unflatten(y), outer, eta_policy=eta, theta_den=theta, eta_den=eta
    )
    (g,) = torch.autograd.grad(loss, y)
    assert g_norm == pytest.approx(float(g.norm()), rel=1e-12)
    assert gain == pytest.approx(float((J.T @ g).norm() / g.norm()), rel=1e-10)
    assert gain <= float(torch.linalg.svdvals(J)[0]) * (1 + 1e-12)


def test_tiny_run_rows_and_files(tiny_run):
    out, rows = tiny_run
    assert [r["variant"] for r in rows] == list(js.VARIANTS)
    for r in rows:
        assert math.isfinite(r["sigma"]) and r["sigma"] > 0
        assert 1 <= r["iterations"] <= 3
        # Adam's effective step is bounded by lr / (sqrt(eps_root) + eps) (eps_root = 1e-8)
        assert r["lr_D_max"] <= r["lr"] / (1e-4 + 1e-5) * (1 + 1e-6)
        assert r["share_v_below_1e-08"] <= r["share_v_below_1e-06"] <= r["share_v_below_1e-04"]
    sgd = rows[-1]
    assert sgd["variant"] == "sgd-matched"
    assert sgd["sgd_match_ratio"] == pytest.approx(1.0, abs=0.02)
    assert sgd["mean_step"] == pytest.approx(rows[0]["mean_step"], rel=0.02)
    saved = json.loads((out / "jacobian_spectrum.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert (out / "jacobian_spectrum.png").stat().st_size > 0
    assert "adam-1e-8" in (out / "jacobian_spectrum.md").read_text()
