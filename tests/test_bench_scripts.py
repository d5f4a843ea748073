"""benchmarks/fig6.py and benchmarks/trainer_overhead.py on small inputs."""

from __future__ import annotations

import json

import pytest
from bench_helpers import load_benchmark


def _fake_run(path, slope_in, steps=200, every=2048):
    path.mkdir()
    lines = ["global_step,iteration,episodic_return,intrinsic_return,intrinsic_reward_mean"]
    for i in range(1, steps + 1):
        s = i * every
        lines.append(f"{s},{i},{100 + 0.0},{slope_in * s / 1e6},{0.5}")
    (path / "progress.csv").write_text("\n".join(lines) + "\n")


def test_fig6_bins_give_the_means_and_slopes_of_known_curves(tmp_path, capsys):
    fig6 = load_benchmark("fig6")
    _fake_run(tmp_path / "a", slope_in=100.0)
    _fake_run(tmp_path / "b", slope_in=300.0)
    out = tmp_path / "out"
    assert (
        fig6.main(
            [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--bin-steps", "100000"]
        )
        == 0
    )
    data = json.loads((out / "fig6.json").read_text())
    first = data["rows"][0]
    assert first["episodic_return_mean"] == pytest.approx(100.0)
    assert first["episodic_return_slope_per_1M"] == pytest.approx(0.0, abs=1e-6)
    # the intrinsic return rises by 100 and 300 per million steps: the pooled fit gives 200
    assert first["intrinsic_return_slope_per_1M"] == pytest.approx(200.0, rel=1e-6)
    assert (out / "fig6.png").stat().st_size > 0 and (out / "fig6.csv").is_file()
    assert "d/1M" in capsys.readouterr().out


def test_fig6_refuses_a_directory_without_a_log(tmp_path):
    fig6 = load_benchmark("fig6")
    with pytest.raises(SystemExit):
        fig6.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")])


def test_trainer_overhead_ratios_are_medians_over_ppo():
    to = load_benchmark("trainer_overhead")
    rows = [{"run": "ppo", "cpu_s": c, "wall_s": c + 1} for c in (10.0, 12.0, 11.0)] + [
        {"run": "cln eq17", "cpu_s": c, "wall_s": c + 1} for c in (13.0, 99.0, 13.2)
    ]
    table = {t["run"]: t for t in to.ratios(rows)}
    assert table["ppo"]["cpu_ratio"] == 1.0
    assert table["cln eq17"]["cpu_ratio"] == pytest.approx(13.2 / 11.0)  # the outlier drops
    assert table["cln eq17"]["wall_ratio"] == pytest.approx(14.2 / 12.0)


def test_trainer_overhead_runs_one_short_pair(tmp_path, capsys):
    to = load_benchmark("trainer_overhead")
    out = tmp_path / "o"
    assert (
        to.main(
            [
                "--env",
                "InvertedPendulum-v5",
                "--total-steps",
                "2048",
                "--repeats",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in data["rows"]] == ["ppo", "cln eq17"]
    assert "target: CLN eq17 at most 1.25x" in capsys.readouterr().out


def test_one_entry_point_lists_and_runs_every_benchmark():
    """``python -m benchmarks --help`` names every script of ``benchmarks/``; an experiment's
    ``--help`` is the script's own; an unknown one is exit code 2."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "benchmarks", *args]
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True)

    listed = run("--help")
    assert listed.returncode == 0
    scripts = [p.stem for p in (root / "benchmarks").glob("*.py") if not p.stem.startswith("_")]
    for name in [*scripts, "learning_runs"]:
        assert f"\n  {name} " in listed.stdout, name
    one = run("trainer_overhead", "--help")
    assert one.returncode == 0 and "--total-steps" in one.stdout
    assert run("no-such-experiment").returncode == 2


def test_scaling_summary_speed_ups_bound_and_plot(tmp_path):
    """benchmarks/scaling.py's arithmetic on given rows: mean steps/s per (config, N, mode),
    speed-up over one process, the all-reduce bound N t1 / (t1 + s f); one PNG bar a mode."""
    import argparse

    from matplotlib.image import imread

    scaling = load_benchmark("scaling")
    rows = []
    for sps, n, mode in [(1000, 1, "one process"), (1800, 2, "rollout"), (800, 2, "allreduce")]:
        for rep, jitter in enumerate((-100, 100)):
            rows.append(
                dict(
                    config="ppo",
                    workers=n,
                    mode=mode,
                    rep=rep,
                    steps_per_s=sps + jitter,
                    return_last20=5.0,
                    load_before=1.0,
                )
            )
    args = argparse.Namespace(num_steps=2048)
    floor = 1e-3
    summary = {(s["workers"], s["mode"]): s for s in scaling.summarise(rows, floor, args)}
    assert summary[2, "rollout"]["speed_up"] == pytest.approx(1.8)
    assert summary[2, "allreduce"]["speed_up"] == pytest.approx(0.8)
    t1, steps = 2048 / 1000, scaling.steps_per_iteration(args)
    assert steps == 320  # 10 epochs of 32 minibatches, one all-reduce each
    assert summary[2, "allreduce"]["allreduce_bound"] == pytest.approx(
        2 * t1 / (t1 + steps * floor)
    )
    assert summary[2, "rollout"]["allreduce_bound"] is None
    assert "| ppo | 2 | rollout | 1800 | 1.80x |" in scaling.table(list(summary.values()))
    scaling.plot(list(summary.values()), tmp_path / "s.png")
    assert imread(tmp_path / "s.png").shape[0] > 300
