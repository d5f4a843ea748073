"""Figures a reader can read: each saved figure's artists are checked -- distinct series look
distinct, every axis is labelled, legends are short -- and drawing them warns about nothing."""

from __future__ import annotations

import importlib
import json
import warnings

import matplotlib
import numpy as np
import pytest
from bench_helpers import load_benchmark

from metagrad_rl import config as C
from metagrad_rl.cli import main
from metagrad_rl.trainers.bilevel import CLNConfig, LIRPGConfig
from metagrad_rl.trainers.ppo import PPOConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ct = load_benchmark("compare_terms")
fig6 = load_benchmark("fig6")
accuracy_cost = load_benchmark("accuracy_cost")
horizon = importlib.import_module("termbench.horizon")  # benchmarks/ is on the path now
ENV = "InvertedPendulum-v5"


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the code under test saved, kept open (``plt.close`` does nothing)."""
    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)

    def figures():
        return [plt.figure(n) for n in plt.get_fignums()]

    yield figures
    monkeypatch.undo()
    plt.close("all")


def _style(h):
    if isinstance(h, matplotlib.lines.Line2D):
        colour = matplotlib.colors.to_hex(h.get_color())
        return colour, h.get_linestyle(), h.get_marker(), h.get_markersize()
    return matplotlib.colors.to_hex(h.get_facecolor()[0]), "-", "o", 0.0  # a scatter's points


def check_readable(fig, max_label=60):
    """Distinct legend entries look distinct (and differ in colour within one line style);
    every axes with data has both axis labels (or shares that axis with one that has); legend
    texts are at most ``max_label`` characters."""
    legends = [ax.get_legend() for ax in fig.axes] + list(fig.legends)
    entries = {}
    for leg in (g for g in legends if g is not None):
        for text, handle in zip(leg.get_texts(), leg.legend_handles):
            label = text.get_text()
            assert len(label) <= max_label, label
            entries.setdefault(label, _style(handle))
    styles = list(entries.values())
    assert len(set(styles)) == len(styles), entries
    by_linestyle = {}
    for colour, ls, marker, size in entries.values():
        by_linestyle.setdefault(ls, []).append((colour, marker, size))
    for ls, looks in by_linestyle.items():
        assert len(set(looks)) == len(looks), (ls, entries)
    for ax in fig.axes:
        if not ax.lines and not ax.collections:
            continue
        xs = ax.get_shared_x_axes().get_siblings(ax)
        ys = ax.get_shared_y_axes().get_siblings(ax)
        assert any(a.get_xlabel() for a in xs), f"no x label on {ax.get_title()!r}"
        assert any(a.get_ylabel() for a in ys), f"no y label on {ax.get_title()!r}"
    return entries


def _progress(d, offset=0.0, steps=6):
    d.mkdir(parents=True)
    rows = ["global_step,episodic_return,intrinsic_return,intrinsic_reward_mean"]
    rows += [f"{64 * (i + 1)},{offset + i},{offset - i},{0.1 * i}" for i in range(steps)]
    (d / "progress.csv").write_text("\n".join(rows) + "\n")
    return d


def _run(root, name, cfg, algo, seed):
    d = _progress(root / name, offset=seed)
    config = C.to_dict(cfg)
    config["seed"] = seed
    (d / "config.json").write_text(json.dumps({"algo": algo, "config": config}))
    return str(d)


def test_plot_of_ppo_and_cln_runs_has_short_legends_and_distinct_colours(tmp_path, saved_figures):
    ppo = PPOConfig(env=ENV)
    runs = [_run(tmp_path, f"ppo{s}", ppo, "ppo", s) for s in (1, 2)]
    for mg in ("eq17", "exact"):
        cln = CLNConfig(env=ENV, meta_grad=mg)
        runs += [_run(tmp_path, f"cln-{mg}{s}", cln, "cln", s) for s in (1, 2)]
    runs.append(_run(tmp_path, "lirpg1", LIRPGConfig(env=ENV), "lirpg", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["plot", *runs, "--out", str(tmp_path / "c.png")]) == 0
    (fig,) = saved_figures()
    entries = check_readable(fig, max_label=40)
    assert sorted(entries) == [
        "cln, meta_grad=eq17 (n=2)",
        "cln, meta_grad=exact (n=2)",
        "lirpg (n=1)",
        "ppo (n=2)",
    ]


def test_plot_label_overrides_the_legend_once_per_run(tmp_path, saved_figures, capsys):
    runs = [_run(tmp_path, f"r{s}", PPOConfig(env=ENV), "ppo", s) for s in (1, 2, 3)]
    labels = ["--label", "baseline", "--label", "baseline", "--label", "tuned"]
    assert main(["plot", *runs, *labels, "--out", str(tmp_path / "c.png")]) == 0
    (fig,) = saved_figures()
    assert sorted(check_readable(fig)) == ["baseline (n=2)", "tuned (n=1)"]
    assert main(["plot", *runs, "--label", "one", "--out", str(tmp_path / "d.png")]) == 2
    assert "--label was given 1 times for 3 run directories" in capsys.readouterr().err


def test_benchmark_learning_figure_gives_each_algorithm_its_own_colour(tmp_path, saved_figures):
    """Figure 4's PPO and CLN (eq17), and Figure 6's cln-lirpg and lirpg, once shared colours."""
    names = ("ppo", "cln-eq17", "lirpg", "cln-lirpg", "cln-three-term", "cln-exact")
    groups = {f"{n}-{ENV}": [_progress(tmp_path / n, offset=i)] for i, n in enumerate(names)}
    panel = [(f"{n}-{ENV}", n.replace("-", " (", 1) + ")" if "-" in n else n) for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ct.plot_groups(groups, {ENV: panel}, tmp_path / "f4.png", title="Figure 4")
        curve = (np.arange(1, 7) * 64.0, np.arange(6.0))
        runs = {n: dict.fromkeys(fig6.METRICS, curve) for n in names}
        fig6.plot(runs, 2, tmp_path / "f6.png")
    for fig in saved_figures():
        assert len(check_readable(fig)) == len(names)


def test_benchmark_accuracy_figures_are_distinct_and_labelled(tmp_path, saved_figures):
    rows = []
    for R in (1, 2):
        for step in (1000, 2000, 3000):
            row = dict(R=R, env_steps=step, meta_step=step // 1000, norm_total=1.0)
            row.update({f"norm_eq{n}": 0.5 for n in (11, 12, 13, 14)})
            for e in ("eq17", "three-term", "three-term-lookahead", "eq13", "truncated-k32"):
                row[f"cos_{e}"] = 0.9
            row["cos_lirpg"] = row["cos_three-term"]  # equal values: both must stay visible
            row["cos_total-R1"] = 0.8
            rows.append(row)
    summ = [
        dict(estimator=e, optimizer=o, x_plain=x, cos_mean=0.5, R=1)
        for o in ("adam", "sgd")
        for x, e in enumerate(accuracy_cost.PLOTTED, start=1)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ct.plot_accuracy(rows, tmp_path / "acc.png")
        horizon.plot_science(rows, tmp_path / "sci.png")
        accuracy_cost.plot(summ, tmp_path / "ac.png")
    acc, sci, ac = saved_figures()
    entries = check_readable(acc)
    assert entries["lirpg R=1"] != entries["three-term R=1"]
    assert entries["three-term R=1"][0] != entries["three-term-lookahead R=1"][0]
    check_readable(sci)
    assert len(check_readable(ac)) == len(accuracy_cost.PLOTTED)
