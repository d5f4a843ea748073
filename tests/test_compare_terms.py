"""benchmarks/compare_terms.py on tiny settings: its functions run and their numbers add up."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bench_helpers import load_benchmark

from metagrad_rl.rundir import read_csv

ct = load_benchmark("compare_terms")

TINY = dict(num_steps=128, num_minibatches=4, update_epochs=2, eta_lr=1e-2)


def test_accuracy_terms_sum_to_the_exact_total(tmp_path):
    """On a tiny InvertedPendulum CLN run: Eq 11-14 add up to the engine's total (terms=False),
    R=2 rows have a non-zero Eq 14, and Eq 17 at the trainer's theta_{k+1} equals Eq 11 (R=1)."""
    rows = ct.run_accuracy(
        tmp_path,
        env="InvertedPendulum-v5",
        total_steps=128 * 4,
        checkpoints=2,
        progress=False,
        **TINY,
    )
    assert {r["R"] for r in rows} == {1, 2}
    for r in rows:
        assert r["norm_total"] > 0
        # total = the sum of the four terms, so <total, total> = sum_n <term_n, total>:
        # the norms and cosines the table prints must satisfy sum_n |t_n| cos_n = |total|
        names = [n for n in ("eq11", "eq12", "eq13", "eq14") if r[f"norm_{n}"] > 0]  # cos nan at 0
        parts = sum(r[f"norm_{n}"] * r[f"cos_{n}"] for n in names)
        assert parts == pytest.approx(r["norm_total"], rel=1e-3)
        assert r["share_eq11"] == pytest.approx(r["norm_eq11"] / r["norm_total"])
    r1 = [r for r in rows if r["R"] == 1]
    assert all(r["norm_eq14"] == 0.0 for r in r1)
    assert all(r["eq17_vs_eq11_relerr"] < 1e-5 for r in r1)
    assert all(abs(r["cos_three-term"] - 1.0) < 1e-5 for r in r1)  # R = 1: three-term is exact
    assert any(r["norm_eq14"] > 0 for r in rows if r["R"] == 2)


def test_terms_add_up_to_the_total_on_a_stored_round(tmp_path):
    """terms_at's split against an independent terms=False total on the same stored batches."""
    from metagrad_rl.metagrad import meta_gradient
    from metagrad_rl.pytree import flatten
    from metagrad_rl.trainers.bilevel import CLNConfig, build_problem, policy_optimizer, train
    from metagrad_rl.trainers.common import optimizer_state_from_list
    from metagrad_rl.unroll import Round

    cfg = CLNConfig(env="InvertedPendulum-v5", total_steps=128 * 3, checkpoint_every=0, **TINY)
    steps = []
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    policy, reward = ct.nets_for(cfg, 4, 1)
    problem, tx = build_problem(cfg, policy, reward), policy_optimizer(cfg)
    s = steps[-1]
    inp = s.round
    state = optimizer_state_from_list(tx.init(inp.theta), inp.opt_state)
    rnd = Round(inp.batch, inp.minibatches)
    split = meta_gradient(problem, tx, inp.theta, inp.eta, [rnd], s.outer, opt_state=state)
    whole = meta_gradient(
        problem, tx, inp.theta, inp.eta, [rnd], s.outer, opt_state=state, terms=False
    )
    terms = sum(flatten(getattr(split, n)) for n in ("eq11", "eq12", "eq13", "eq14"))
    torch.testing.assert_close(terms, flatten(whole.total), rtol=1e-4, atol=1e-7)
    rows = ct.terms_at(problem, tx, cfg, s, steps[-2])
    assert rows[0]["norm_total"] == pytest.approx(float(flatten(whole.total).norm()), rel=1e-4)


def test_table_writer_writes_csv_and_json(tmp_path):
    rows = [{"a": 1, "b": 2.5}, {"a": 2, "c": "x"}]
    csv_path, json_path = ct.write_rows(tmp_path, "t", rows, {"note": "n"})
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "a,b,c" and len(lines) == 3
    data = json.loads(json_path.read_text())
    assert data["rows"] == rows and data["note"] == "n"
    assert "| a |" in ct.markdown([[1, 2]], ["a", "b"])


def test_targets_say_pass_or_miss_and_by_how_much():
    ok = ct.target("time of x / time of y", 1.1, 1.2, "x")
    assert ok["verdict"] == "PASS" and ok["why"] == ""
    miss = ct.target("time of x / time of y", 3.3, 3.0, "x")
    assert miss["verdict"] == "MISS" and miss["margin"] == "+10% of the limit"
    assert miss["why"] == "time of x / time of y is 3.3x, above the limit 3x"
    text = ct.cost_tables({"estimators": [], "eq12": [], "growth": [], "targets": [ok, miss]})
    assert "- MISS: time of x / time of y is 3.3x, above the limit 3x" in text
    assert "issue" not in text


def test_the_eq12_miss_says_why_in_its_line():
    rows = [
        {"name": "four_terms", "ratio_to_exact_total": 1.0},
        {"name": "exact_total", "ratio_to_plain_round": 2.5, "rss_peak_delta_mib": 600.0},
    ]
    eq12 = [
        {"name": "grad_autograd", "median_s": 1.0},
        {"name": "grad_func", "median_s": 1.9},
        {"name": "eq12_product", "median_s": 2.7},
    ]
    targets = ct.cost_targets(rows, eq12)
    assert [t["verdict"] for t in targets] == ["PASS", "PASS", "PASS", "MISS"]
    text = ct.cost_tables({"estimators": [], "eq12": [], "growth": [], "targets": targets})
    (miss,) = [line for line in text.splitlines() if line.startswith("- MISS:")]
    assert "is 2.7x, above the limit 1.6x: the product is a double backward" in miss
    assert "does not call it" in miss and "issue" not in miss


def test_tables_define_their_columns_and_plots_keep_one_colour_per_estimator():
    from termbench.plots import colour

    from metagrad_rl.trainers.meta_grads import META_GRADS

    row = dict(conditioned=True, rounds=2, batch_size=1, estimator="plain", baseline=None)
    text = ct.tabular_table([dict(row, mode="exact", bias_rel=0.1, variance_rel=1, stderr_rel=0)])
    for definition in ("cond. =", "K =", "B =", "mode:", "baseline:"):
        assert definition in text
    acc = dict(meta_step=1, env_steps=2, R=1, norm_total=1.0, norm_eq17=0.5)
    for n in ("11", "12", "13", "14"):
        acc.update({f"norm_eq{n}": 0.7, f"share_eq{n}": 0.7})
    for e in ct.ESTIMATORS:
        acc.update({f"cos_{e}": 0.5, f"norm_{e}": 1.0, f"relerr_{e}": 0.1})
    text = ct.accuracy_tables([acc])
    assert "R = policy rounds unrolled" in text and "exceeds 1" in text
    colours = [colour(m) for m in META_GRADS]
    assert len(set(colours)) == len(colours)
    assert colour("cln (eq17)") == colour("eq17") == colour("cln-eq17-Hopper-v5")
    assert colour("cln-three-term-Hopper-v5") == colour("three-term") != colour("eq17")


def test_cost_section_runs_with_two_steps(tmp_path):
    res = ct.run_cost(
        tmp_path,
        reps=1,
        explicit_steps=2,
        scaling=((1, 1), (2, 2)),
        seed=0,
        memory=False,
        full_round_steps=2,
        eq12_reps=1,
        progress=False,
    )
    names = {r["name"] for r in res["estimators"]}
    assert {"plain_round", "exact_total", "four_terms", "eq17", "explicit_sgd_2"} <= names
    assert [r["inner_steps"] for r in res["growth"]] == [1, 4]
    assert {t["verdict"] for t in res["targets"]} <= {"PASS", "MISS"}
    ct.plot_cost(res, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 0
    assert "Targets" in ct.cost_tables(res)


def test_memory_probe_in_a_subprocess():
    """The probe's graph grows with the unroll: 8 inner steps hold more than 2 steps do."""
    small, large = ct.probe("exact_total", 2, 1, 0, 2), ct.probe("exact_total", 8, 1, 0, 2)
    assert isinstance(small["rss_peak_delta_bytes"], int)
    assert large["graph_bytes"] > 1.3 * small["graph_bytes"] > 0


def test_explicit_sgd_reference_matches_the_engine_on_the_cost_problem():
    """The cost table's explicit SGD recursion computes the same terms as the engine on SGD."""
    s = ct.CostSetup(0, steps=3)
    eng, exp = s.engine_sgd(3), s.explicit_sgd(3)
    for n in ("eq11", "eq12", "eq13", "total"):
        a = torch.cat([v.reshape(-1) for v in getattr(eng, n).values()])
        b = torch.cat([v.reshape(-1) for v in exp[n].values()])
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_learning_table_and_plots_from_run_directories(tmp_path):
    root = tmp_path / "runs"
    ct.tiny_runs(
        root,
        steps=128 * 2,
        seeds=(1,),
        meta_grads=("eq17",),
        env="InvertedPendulum-v5",
        num_steps=128,
        progress=False,
    )
    groups = ct.run_groups([root])
    assert set(groups) == {
        "cln-eq17-InvertedPendulum-v5",
        "lirpg-InvertedPendulum-v5",
        "ppo-InvertedPendulum-v5",
    }
    rows = ct.learning_table(groups)
    assert all(r["finished"] == 1 and r["final_mean"] is not None for r in rows)
    for r, g in zip(rows, sorted(groups)):  # the curve end is the last logged episodic_return
        logged = [x["episodic_return"] for x in read_csv(groups[g][0] / "progress.csv")]
        assert r["curve_end_mean"] == pytest.approx(float([x for x in logged if x][-1]))
        assert r["curve_end_mean"] == ct.curve_end(groups[g][0])
    text = ct.learning_tables({"rows": rows, "source": str(root), "note": ""})
    header = next(line for line in text.splitlines() if line.startswith("| group"))
    assert "final return: last 20 training episodes" in header and "curve end" in header
    assert "Curve end: the plotted curve's last point" in text
    png = ct.plot_groups(
        groups,
        {"p": [("cln-eq17-InvertedPendulum-v5", "cln")]},
        tmp_path / "f.png",
        metric="intrinsic_reward_mean",
    )
    assert png is not None and png.stat().st_size > 0


def test_variance_rows_on_known_draws():
    g = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])
    row = ct.variance_rows({"a": g, "b": -g})
    assert row[0]["total_variance"] == pytest.approx(2 / 3 + 8 / 3)
    assert row[0]["norm_of_mean"] == pytest.approx(2.0)
    assert row[1]["cos_mean_with_plain_mean"] == pytest.approx(-1.0)


@pytest.mark.slow
def test_mujoco_draws_from_a_tiny_run(tmp_path):
    ct.run_accuracy(
        tmp_path,
        env="InvertedPendulum-v5",
        total_steps=128 * 3,
        checkpoints=0,
        progress=False,
        **TINY,
    )
    res = ct.mujoco_draws(tmp_path / "run" / "checkpoint.pt", 3, 0, progress=False)
    assert len(res["rows"]) == 3
    # independent draws give different gradients, and the CLN policy's score term is not 0
    assert res["rows"][0]["total_variance"] > 0
    assert min(res["norm_grad_log_p"]) > 0


def test_bootstrap_pairs_separate_distinct_groups_and_not_overlapping_ones():
    from termbench.learning import bootstrap_differences

    rows = [
        {"group": "cln-high-Hopper-v5", "per_seed": [1400.0, 1500.0, 1450.0]},
        {"group": "cln-mid-Hopper-v5", "per_seed": [980.0, 258.0, 677.0]},
        {"group": "cln-low-Hopper-v5", "per_seed": [491.0, 293.0, 316.0]},
        {"group": "ppo-Hopper-v5", "per_seed": [1.0, 2.0]},  # not a Figure 5 group
        {"group": "cln-one-Hopper-v5", "per_seed": [5.0]},  # one seed: no interval
    ]
    pairs = {(p["a"], p["b"]): p for p in bootstrap_differences(rows)}
    assert set(pairs) == {("high", "mid"), ("high", "low"), ("mid", "low")}
    assert pairs[("high", "low")]["separated"] and pairs[("high", "mid")]["separated"]
    mid_low = pairs[("mid", "low")]
    assert not mid_low["separated"] and mid_low["ci_low"] < 0 < mid_low["ci_high"]
    assert mid_low["diff"] == pytest.approx(np.mean([980, 258, 677]) - np.mean([491, 293, 316]))
