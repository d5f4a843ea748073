"""How much second order is needed? Accuracy against cost of every meta-gradient estimator.

Trains a CLN agent on Hopper-v5 (``--meta-grad eq17`` drives ``eta``) and, at several meta-steps,
recomputes on the round the trainer stored (``tau_k`` with its minibatch order, ``theta_k``,
optimizer state, ``eta``; validation batch ``tau_{k+1}``):

- the exact total through one round (R = 1, 320 inner steps) and two rounds (R = 2, 640);
- truncated backpropagation through the last ``k`` inner steps (``truncate=k``) for k = 1, 8,
  32, 320 and, with two rounds, 640;
- every non-empty subset of Eq 11-14 (``MetaGradResult.subset``);
- the trainer's cheap estimators: Eq 17, LIRPG's one-step look-ahead (its Eq 13) and the
  three-term Eq 17 + Eq 12 + Eq 13 of that look-ahead;
- ``constant-clip-factor``: the total as the engine computed it before its clip was
  differentiable (TorchOpt's ``clip_grad_norm``, factor held constant), on the same batches;

each with its cosine and relative error against the exact total of the same R, and its cost:
wall time against a plain (no-graph) round, and the bytes its autograd graph holds. Then the
same with plain SGD as the inner optimizer, at a step size matched to Adam's (the SGD round
moves ``theta`` as far as the Adam round did, two secant iterations), against SGD's exact total.

Writes ``accuracy_cost.csv``/``.json`` and ``accuracy_cost.png`` (cosine against time, one
marker per estimator) under ``--out`` and prints the tables.

    .venv/bin/python benchmarks/accuracy_cost.py                 # 20k steps, 2 checkpoints
    .venv/bin/python benchmarks/accuracy_cost.py --full          # 100k steps, 8 checkpoints
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchopt
from termbench.common import write_rows
from termbench.plots import pyplot, save_png
from torch import Tensor

from metagrad_rl.envs import make_env
from metagrad_rl.metagrad import eq17_gradient, meta_gradient
from metagrad_rl.networks import GaussianPolicy, IntrinsicReward
from metagrad_rl.optim import clip_grad_norm, closure_vars
from metagrad_rl.pytree import TERMS, flatten
from metagrad_rl.pytree import cosine as cos
from metagrad_rl.trainers import bilevel
from metagrad_rl.trainers.bilevel import CLNConfig, build_problem, policy_optimizer
from metagrad_rl.trainers.common import optimizer_state_from_list
from metagrad_rl.trainers.meta_grads import MetaGradContext, get
from metagrad_rl.unroll import EtaPaths, Round, unroll

Row = dict[str, Any]
KS_R1 = (1, 8, 32, 320)
KS_R2 = (1, 8, 32, 320, 640)


# ============================================================================ capture the rounds
def capture_steps(cfg: CLNConfig, steps: int, checkpoints: int, out: Path) -> list[tuple]:
    """Train and keep ``(index, step, previous step)`` at ``checkpoints`` spread meta-steps."""
    iterations = steps // cfg.batch_size
    n_meta = iterations - 1
    picks = {int(round(x)) for x in np.linspace(1, n_meta - 1, num=min(checkpoints, n_meta - 1))}
    kept: list[tuple] = []
    state: dict[str, Any] = {"i": 0, "prev": None}

    def on_meta_step(step: Any) -> None:
        if state["i"] in picks:
            kept.append((state["i"], step, state["prev"]))
        state["prev"], state["i"] = step, state["i"] + 1

    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    bilevel.train(cfg, run, resume=False, stop_at_step=steps, on_meta_step=on_meta_step)
    return kept


def problem_for(cfg: CLNConfig) -> Any:
    env = make_env(cfg.env)
    obs_dim, act_dim = (
        int(np.prod(env.observation_space.shape)),
        int(np.prod(env.action_space.shape)),
    )
    env.close()
    reward = IntrinsicReward(obs_dim, act_dim, cfg.reward_hidden, cfg.bottleneck)
    policy = GaussianPolicy(
        obs_dim, act_dim, cfg.hidden, conditioning=cfg.conditioning, cond_dim=reward.condition_dim
    )
    return build_problem(cfg, policy, reward)


# ============================================================================ one checkpoint
def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def matched_sgd(problem: Any, cfg: CLNConfig, theta: Any, state: Any, rnd: Round, eta: Any):
    """``chain(clip, sgd(lr))`` with ``lr`` such that the round moves theta as far as Adam's."""
    adam = policy_optimizer(cfg)
    paths = EtaPaths.shared(eta)

    def moved(tx: Any, st: Any) -> float:
        res = unroll(problem, tx, theta, paths, [rnd], st, create_graph=False)
        return float((flatten(res.theta) - flatten(theta)).detach().norm())

    target, lr = moved(adam, state), 1e-2
    for _ in range(2):
        lr *= target / moved(
            torchopt.chain(clip_grad_norm(cfg.max_grad_norm), torchopt.sgd(lr)), None
        )
    return torchopt.chain(clip_grad_norm(cfg.max_grad_norm), torchopt.sgd(lr)), lr


def with_torchopt_clip(tx: Any) -> Any:
    """``tx`` with its first transform (our clip) replaced by TorchOpt's, whose factor is a
    no_grad constant: the derivative the engine computed before the fix (None: no clip)."""
    parts = getattr(tx, "transformations", None)
    if not parts:
        return None
    clip = torchopt.clip_grad_norm(closure_vars(parts[0].update)["max_norm"])
    return torchopt.chain(clip, *parts[1:])


def graph_mib(
    problem: Any, tx: Any, theta: Any, eta: Any, rounds: list[Round], outer: Any, **kw: Any
) -> float:
    """MiB held by the autograd graph of one meta-gradient (``measure_memory=True``)."""
    res = meta_gradient(problem, tx, theta, eta, rounds, outer, measure_memory=True, **kw)
    return res.diagnostics["graph_bytes"] / 2**20


def _truncations(
    args: tuple,
    kw: dict[str, Any],
    exact: tuple[Tensor, float],
    memory: bool,
    ests: dict[str, tuple[Tensor, float]],
    same: set[str],
    mib: dict[str, float],
) -> None:
    """``truncated-k<k>`` for the ``k`` of these rounds into ``ests`` (the exact total itself,
    in ``same``, when ``k`` covers every inner step), with its graph's MiB when ``memory``."""
    rounds = args[4]
    for k in KS_R1 if len(rounds) == 1 else KS_R2:
        name = f"truncated-k{k}"
        if k >= sum(len(r.minibatches) for r in rounds):
            ests[name] = exact
            same.add(name)
            continue
        res, t = timed(lambda k=k: meta_gradient(*args, terms=False, truncate=k, **kw))
        ests[name] = (flatten(res.total), t)
        if memory:
            mib[name] = graph_mib(*args, terms=False, truncate=k, **kw)


def estimator_rows(
    problem: Any,
    tx: Any,
    state: Any,
    theta: Any,
    eta: Any,
    rounds: list[Round],
    outer: Any,
    look: Any,
    cfg: CLNConfig,
    plain_s: float,
    memory: bool,
) -> list[Row]:
    """Every estimator against the exact total of these ``rounds`` (R = len(rounds)).

    Eq 17 is taken at this unroll's own ``theta_{k+1}`` (``result.eq17``); with ``memory``
    the graph of the exact total and of each truncation is measured too (separate calls).
    """
    kw = dict(opt_state=state, surrogate=cfg.surrogate, denominator=cfg.denominator)
    args = (problem, tx, theta, eta, rounds, outer)
    exact, t_exact = timed(lambda: meta_gradient(*args, **kw))
    g17, total = flatten(exact.eq17), flatten(exact.total)
    mib: dict[str, float] = {}
    if memory:
        mib["exact"] = graph_mib(*args, terms=False, **kw)
    ests: dict[str, tuple[Tensor, float]] = {"exact": (total, t_exact)}
    same = {"exact"}  # estimators read off the exact total's own unroll and backward pass
    _truncations(args, kw, (total, t_exact), memory, ests, same, mib)
    live = [n for n in TERMS if len(rounds) > 1 or n != "eq14"]
    for size in range(1, len(live)):
        for names in itertools.combinations(live, size):
            ests["+".join(names)] = (flatten(exact.subset(names)), t_exact)
            same.add("+".join(names))
    ests["eq17"] = (g17, math.nan)  # timed by the caller: it needs no unroll
    old = with_torchopt_clip(tx)
    if old is not None:  # what the engine computed before the clip was differentiable
        res, t = timed(
            lambda: meta_gradient(
                problem, old, theta, eta, rounds, outer, terms=False, allow_graph_cuts=True, **kw
            )
        )
        ests["constant-clip-factor"] = (flatten(res.total), t)
    if look is not None:  # the registry's entries applied to the look-ahead's result
        for name, entry in (("lirpg-lookahead", "lirpg"), ("three-term-lookahead", "three-term")):
            ctx = MetaGradContext(look[0], lambda: exact.eq17)
            ests[name] = (flatten(get(entry).apply(ctx)[0]), look[1])
    for name in same:
        mib.setdefault(name, mib.get("exact", math.nan))
    return [
        compare_row(len(rounds), name, g, t, total, plain_s, mib.get(name, math.nan))
        for name, (g, t) in ests.items()
    ]


def compare_row(
    R: int, name: str, g: Tensor, t: float, total: Tensor, plain_s: float, graph: float
) -> Row:
    """One estimate ``g`` against the exact ``total``: cosine, relative error, time, memory."""
    tn = float(total.norm())
    return {
        "R": R,
        "estimator": name,
        "cos": cos(g, total),
        "relerr": float((g - total).norm()) / tn if tn else math.nan,
        "norm": float(g.norm()),
        "norm_exact": tn,
        "time_s": t,
        "x_plain": t / plain_s if math.isfinite(t) else math.nan,
        "graph_mib": graph,
    }


def checkpoint_rows(
    problem: Any, cfg: CLNConfig, i: int, step: Any, prev: Any, memory: bool
) -> list[Row]:
    """Every estimator at one stored meta-step: Adam (the trainer's) and matched SGD, R = 1, 2."""
    inp, outer = step.round, step.outer
    eta, theta = inp.eta, inp.theta
    adam = policy_optimizer(cfg)
    state = optimizer_state_from_list(adam.init(theta), inp.opt_state)
    rnd = Round(inp.batch, inp.minibatches)
    theta_den = theta if cfg.denominator == "theta_k" else step.theta_next
    _, t17 = timed(lambda: eq17_gradient(problem, step.theta_next, eta, outer, theta_den, eta))
    paths = EtaPaths.shared(eta)
    _, plain_s = timed(
        lambda: unroll(problem, adam, theta, paths, [rnd], state, create_graph=False)
    )
    full = torch.arange(inp.batch["r_ex"].numel())
    look_rnd = Round(inp.batch, [full] * cfg.lookahead_steps)
    look = timed(
        lambda: meta_gradient(problem, adam, theta, eta, [look_rnd], outer, opt_state=state)
    )
    sgd, lr = matched_sgd(problem, cfg, theta, state, rnd, eta)
    _, plain_sgd = timed(
        lambda: unroll(problem, sgd, theta, paths, [rnd], None, create_graph=False)
    )
    cases = [("adam", adam, state, theta, [rnd], look, plain_s)]
    cases.append(("sgd", sgd, None, theta, [rnd], None, plain_sgd))
    if prev is not None:
        p = prev.round
        st0 = optimizer_state_from_list(adam.init(p.theta), p.opt_state)
        both = [Round(p.batch, p.minibatches), rnd]
        cases.append(("adam", adam, st0, p.theta, both, look, plain_s))
        cases.append(("sgd", sgd, None, p.theta, both, None, plain_sgd))
    rows: list[Row] = []
    for opt, tx, st, th, rs, lk, plain in cases:
        for r in estimator_rows(problem, tx, st, th, eta, rs, outer, lk, cfg, plain, memory):
            rows.append({"optimizer": opt, "sgd_lr": lr if opt == "sgd" else math.nan, **r})
    for r in rows:
        r.update(meta_step=i, env_steps=(i + 2) * cfg.batch_size)
        if r["estimator"] == "eq17":
            r["time_s"], r["x_plain"] = t17, t17 / plain_s
    return rows


# ============================================================================ tables and plot
def summary(rows: Sequence[Row]) -> list[Row]:
    """Mean (min, max) cosine and mean relative error and cost per optimizer, R, estimator."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r["optimizer"], r["R"], r["estimator"])].append(r)
    out = []
    for (opt, R, est), g in groups.items():
        c = [x["cos"] for x in g]
        out.append(
            {
                "optimizer": opt,
                "R": R,
                "estimator": est,
                "cos_mean": float(np.nanmean(c)),
                "cos_min": float(np.nanmin(c)),
                "cos_max": float(np.nanmax(c)),
                "relerr_mean": float(np.nanmean([x["relerr"] for x in g])),
                "x_plain": _median([x["x_plain"] for x in g]),
                "graph_mib": float(np.nanmax([x["graph_mib"] for x in g] + [-1.0])),
                "checkpoints": len(g),
            }
        )
    return out


def _median(xs: Sequence[float]) -> float:
    """The median of the finite values (NaN, without NumPy's all-NaN warning, when none is)."""
    finite = [x for x in xs if math.isfinite(x)]
    return float(np.median(finite)) if finite else float("nan")


def table(summ: Sequence[Row]) -> str:
    lines = [
        "| optimizer | R | estimator | cos with exact: mean (min, max) | rel. error "
        "| time / plain round | graph MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summ:
        lines.append(
            f"| {s['optimizer']} | {s['R']} | {s['estimator']} | {s['cos_mean']:.3f} "
            f"({s['cos_min']:.3f}, {s['cos_max']:.3f}) | {s['relerr_mean']:.3g} "
            f"| {s['x_plain']:.3g} | {s['graph_mib']:.0f} |"
        )
    return "\n".join(lines)


#: The estimators on the plot (the table has every term subset too), one colour each.
PLOTTED = {
    "eq17": "tab:grey",
    "lirpg-lookahead": "tab:olive",
    "three-term-lookahead": "tab:cyan",
    "truncated-k1": "#c6dbef",
    "truncated-k8": "#6baed6",
    "truncated-k32": "#2171b5",
    "truncated-k320": "#08306b",
    "eq13": "tab:green",
    "exact": "tab:red",
    "constant-clip-factor": "tab:purple",
}


def plot(summ: Sequence[Row], path: Path) -> None:
    """Cosine with the exact total against time, one colour per estimator, one panel per
    inner optimizer; circles R = 1, squares R = 2 (truncated-k640 is R = 2's exact)."""

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, opt in zip(axes, ("adam", "sgd")):
        for s in summ:
            colour = PLOTTED.get(s["estimator"])
            if s["optimizer"] != opt or colour is None or not math.isfinite(s["x_plain"]):
                continue
            ax.scatter(
                s["x_plain"],
                s["cos_mean"],
                color=colour,
                marker="o" if s["R"] == 1 else "s",
                s=50,
                edgecolors="black",
                linewidths=0.4,
            )
        ax.set_xscale("log")
        ax.set_xlabel("time / one plain policy round")
        ax.set_title(f"inner optimizer: {opt} (circle R = 1, square R = 2)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine with the exact total (mean over checkpoints)")
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=c, label=n) for n, c in PLOTTED.items()
    ]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    save_png(fig, path)


# ============================================================================ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="100k steps, 8 checkpoints")
    ap.add_argument("--out", type=Path, default=Path("bench_out/accuracy_cost"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, help="environment steps of the CLN run (overrides)")
    ap.add_argument("--checkpoints", type=int, help="meta-steps recomputed (overrides)")
    args = ap.parse_args(argv)
    steps, checkpoints = (100_352, 8) if args.full else (20_480, 2)
    steps, checkpoints = args.steps or steps, args.checkpoints or checkpoints
    torch.set_num_threads(1)
    cfg = CLNConfig(
        env="Hopper-v5", meta_grad="eq17", seed=args.seed, total_steps=5 * steps, checkpoint_every=0
    )
    t0 = time.perf_counter()
    kept = capture_steps(cfg, steps, checkpoints, args.out)
    problem = problem_for(cfg)
    rows = [
        r
        for n, (i, step, prev) in enumerate(kept)
        for r in checkpoint_rows(problem, cfg, i, step, prev, memory=n == 0)
    ]
    summ = summary(rows)
    rows = [dict(sorted(r.items())) for r in rows]  # the CSV's columns in name order
    write_rows(args.out, "accuracy_cost", rows, {"summary": summ})
    plot(summ, args.out / "accuracy_cost.png")
    print(table(summ))
    print(
        f"\n{len(kept)} checkpoints over {steps} steps; {time.perf_counter() - t0:.0f} s; "
        f"written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
