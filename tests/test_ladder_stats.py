"""benchmarks/ladder_stats.py: rliable's aggregates against independent computations, and the
whole report on real (tiny) runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bench_helpers import load_benchmark
from scipy import stats

ls = load_benchmark("ladder_stats")


def test_mean_and_iqm_equal_direct_computations_and_their_intervals_hold_them():
    rng = np.random.default_rng(0)
    scores = {"a": rng.normal(100, 20, 5), "b": rng.normal(50, 5, 8)}
    agg = ls.aggregates(scores, reps=2000)
    for k, x in scores.items():
        assert agg[k]["n"] == len(x)
        assert agg[k]["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert agg[k]["iqm"] == pytest.approx(stats.trim_mean(x, 0.25), rel=1e-12)
        assert agg[k]["std"] == pytest.approx(np.std(x, ddof=1), rel=1e-12)
        for c in ("mean", "iqm"):
            lo, hi = agg[k][f"{c}_ci"]
            assert x.min() <= lo <= agg[k][c] <= hi <= x.max()


def test_probability_of_improvement_counts_pairs_and_gives_the_verdict():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 2.0, 2.5, 10.0])
    # direct count: P(X > Y) + P(X = Y)/2 over all 16 pairs
    direct = np.mean([(a > b) + 0.5 * (a == b) for a in x for b in y])
    c = ls.improvement(x, y, reps=2000)
    assert c["p_improvement"] == pytest.approx(direct, abs=1e-12)
    assert c["verdict"] == "not separated" and c["ci"][0] < 0.5 < c["ci"][1]
    assert c["mean_difference"] == pytest.approx(x.mean() - y.mean())
    # n per arm = 2 (1.96 + 0.84)^2 (pooled sd / difference)^2
    pooled = math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)
    want = math.ceil(2 * (1.959964 + 0.841621) ** 2 * (pooled / c["mean_difference"]) ** 2)
    assert c["seeds_per_arm_to_separate"] == want
    far = ls.improvement(x + 100.0, y, reps=2000)
    assert far["p_improvement"] == 1.0 and far["verdict"] == "better"
    assert ls.improvement(y, x + 100.0, reps=2000)["verdict"] == "worse"


def test_curve_bands_are_per_point_iqms():
    rng = np.random.default_rng(1)
    c = rng.normal(0, 1, (5, 7))
    point, ci = ls.curve_bands({"g": c}, reps=500)["g"]
    assert np.allclose(point, stats.trim_mean(c, 0.25, axis=0), rtol=1e-12)
    assert np.all(ci[0] <= point + 1e-12) and np.all(point <= ci[1] + 1e-12)


def test_the_report_on_real_runs(tmp_path, capsys):
    """Two seeds of two rungs on a real (tiny) Hopper-v5 budget: the runs are found by name,
    evaluated deterministically (cached), and every output is written."""
    from metagrad_rl.cli import main as cli

    root = tmp_path / "runs"
    common = ["--env", "Hopper-v5", "--num-steps", "256", "--total-steps", "512", "--no-progress"]
    for seed in (1, 2):
        assert cli(["train", "--algo", "ppo", "--seed", str(seed), *common,
                    "--out", str(root / f"ppo-Hopper-v5-s{seed}")]) == 0  # fmt: skip
        assert cli(["train", "--algo", "cln", "--eta-lr", "0", "--seed", str(seed), *common,
                    "--out", str(root / f"cln-frozen-Hopper-v5-s{seed}")]) == 0  # fmt: skip
    (root / "not-a-run").mkdir()
    out = tmp_path / "out"
    assert ls.main(["--runs", str(root), "--out", str(out), "--eval-episodes", "2",
                    "--reps", "500", "--bin", "256"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "| CLN, fixed random r_in | 2 |" in text and "cln-frozen > ppo" in text
    rows = (out / "data" / "ladder_runs.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("env,rung,seed,finished")
    report = json.loads((out / "data" / "ladder_stats.json").read_text())["report"]
    agg = report["Hopper-v5"]["metrics"]["train20"]
    for rung in ("ppo", "cln-frozen"):
        want = [
            json.loads((root / f"{rung}-Hopper-v5-s{s}" / "summary.json").read_text())[
                "mean_return_last_20_episodes"
            ]
            for s in (1, 2)
        ]
        assert agg[rung]["mean"] == pytest.approx(np.mean(want), rel=1e-12)
    cached = json.loads((root / "ppo-Hopper-v5-s1" / ls.EVAL_FILE).read_text())
    assert cached["episodes"] == 2 and len(cached["returns"]) == 2
    assert report["Hopper-v5"]["metrics"]["eval10"]["ppo"]["mean"] == pytest.approx(
        np.mean(
            [
                np.mean(
                    json.loads((root / f"ppo-Hopper-v5-s{s}" / ls.EVAL_FILE).read_text())["returns"]
                )
                for s in (1, 2)
            ]
        ),  # noqa: E501
        rel=1e-12,
    )
    for name in ("ladder_final.png", "ladder_curves.png"):
        assert (out / "img" / name).stat().st_size > 10_000
    assert (out / "data" / "ladder_curves.csv").is_file()


def test_a_missing_run_root_is_one_line(tmp_path, capsys):
    assert ls.main(["--runs", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
