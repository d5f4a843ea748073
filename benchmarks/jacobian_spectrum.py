"""Why the two-round meta-gradient explodes: ``||d theta_{k+1} / d theta_k||_2`` over training.

The Eq 14 path carries ``d theta_k / d eta`` through the next round's Jacobian
``J = d theta_{k+1} / d theta_k``; docs/results.md found Eq 14 growing to ~1e4 over 100k steps.
This benchmark trains CLN on Hopper-v5 with ``--meta-grad eq17`` (as ``compare_terms.py``'s
accuracy section does: the first ``--steps`` of a 5x longer lr schedule, the same checkpoint
picks) and, at each checkpoint, estimates ``||J||_2`` over the stored real policy round (320
inner steps; :func:`metagrad_rl.jacobian.round_spectral_norm`, power iteration on ``J^T J``)
for these inner optimizers, each run from the trainer's ``theta_k``, batch, minibatch order and
eta, with the clip 0.5 in front as in the trainer:

``adam-1e-8`` / ``adam-1e-6`` / ``adam-1e-4``
    The trainer's Adam (its annealed lr, its Adam state at the round start) with ``eps_root``
    1e-8 (the trainer's), 1e-6, 1e-4: how much ``d(1/sqrt(v))`` at small ``v`` matters.
``adam-frozen-v``
    The same Adam (eps_root 1e-8, identical steps) with its second moment held constant when
    differentiating (:func:`metagrad_rl.jacobian.adam_frozen_second_moment`): the preconditioned
    dynamics ``diag(1/(sqrt(v_hat)+eps))`` x curvature, without the normalisation's derivative.
``sgd-matched``
    Clip + plain SGD with the step size that gives the same mean per-step update norm as
    ``adam-1e-8`` on that round (found by rescaling; clipping fires on almost every step, so
    SGD's step is ``lr * 0.5``; the match is within 0.3% on Hopper): the PPO loss's own
    dynamics, ``prod_j (I - lr H_j)`` with the clip's projection, at Adam's distance per step.

Besides ``sigma``: the adjoint gain ``||J^T g|| / ||g||`` of the outer gradient
``g = dL_out / d theta_{k+1}`` on the validation batch (what Eq 14 hands on to
``d theta_k / d eta``), and per checkpoint Adam's preconditioner at the round end
(``lr * (1/(sqrt(v_hat + eps_root) + eps))``: its max and median, and the share of coordinates
with ``v_hat`` below 1e-8, 1e-6, 1e-4), the mean step and the round's displacement.

Usage::

    .venv/bin/python benchmarks/jacobian_spectrum.py                 # 2 checkpoints, ~20k steps
    .venv/bin/python benchmarks/jacobian_spectrum.py --full          # 8 checkpoints, ~100k steps

Writes ``jacobian_spectrum.csv``/``.json``, ``jacobian_spectrum.md`` (the tables) and
``jacobian_spectrum.png`` under ``--out`` (after every checkpoint, so a long run can be read
while it runs; ``--replot`` redraws them from the JSON). Results: docs/jacobian_spectrum_draft.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchopt
from compare_terms import (  # a sibling benchmark script
    checkpoint_indices,
    env_dims,
    fmt,
    markdown,
    nets_for,
    pyplot,
    save_png,
    write_rows,
)
from torch import Tensor

from metagrad_rl.checkpoint import atomic_write_bytes
from metagrad_rl.flat import FLAT_KEY, FlatLayout
from metagrad_rl.jacobian import (
    adam_frozen_second_moment,
    round_map,
    spectral_norm,
)
from metagrad_rl.optim import clip_counts, clip_grad_norm
from metagrad_rl.rundir import clear_run_dir
from metagrad_rl.trainers import bilevel
from metagrad_rl.trainers.bilevel import CLNConfig, build_problem, policy_optimizer
from metagrad_rl.trainers.common import (
    linear_schedule,
    optimizer_state_from_list,
)
from metagrad_rl.unroll import (
    InnerSurrogate,
    Round,
    inner_step,
    outer_loss_at,
    prepare_round,
)

Row = dict[str, Any]
VARIANTS = ("adam-1e-8", "adam-1e-6", "adam-1e-4", "adam-frozen-v", "sgd-matched")
THRESHOLDS = (1e-8, 1e-6, 1e-4)
SCHEDULE_FACTOR = 5  # as compare_terms' accuracy section: lr stays >= 0.8 x its start


@dataclass(frozen=True)
class SpectrumBudget:
    steps: int
    """Environment steps of the CLN run (the first ones of a 5x longer lr schedule)."""
    checkpoints: int
    """Meta-steps at which ||J|| is estimated (compare_terms' picks)."""
    iters: int
    """Power iterations per estimate (each: one JVP and one VJP through the round)."""
    tol: float = 0.01
    """Stop early when ||J^T J v - sigma^2 v|| / sigma^2 is below this."""


SMALL = SpectrumBudget(steps=20_480, checkpoints=2, iters=8)
FULL = SpectrumBudget(steps=100_352, checkpoints=8, iters=20)


# =================================================================================================
# The optimizers compared, all with the trainer's clip in front
# =================================================================================================
def optimizers(cfg: CLNConfig, sgd_lr: float) -> dict[str, torchopt.base.GradientTransformation]:
    clip = clip_grad_norm(cfg.max_grad_norm)
    schedule = linear_schedule(cfg.lr, cfg.steps_per_round, cfg.num_iterations, cfg.anneal_lr)
    frozen = adam_frozen_second_moment(schedule, eps=cfg.adam_eps, eps_root=cfg.adam_eps_root)
    out = {
        f"adam-{e:.0e}".replace("e-0", "e-"): policy_optimizer(
            dataclasses.replace(cfg, adam_eps_root=e)
        )
        for e in (1e-8, 1e-6, 1e-4)
    }
    out["adam-frozen-v"] = torchopt.chain(clip, frozen)
    out["sgd-matched"] = torchopt.chain(clip, torchopt.sgd(sgd_lr))
    return out


def plain_round(
    problem: Any, tx: Any, theta: Mapping[str, Tensor], eta: Mapping[str, Tensor], rnd: Round,
    state: Any,
) -> tuple[list[float], Tensor, Any, float]:  # fmt: skip
    """The round without a graph: per-step update norms, final flat theta and state, clip share."""
    layout = FlatLayout(theta)
    x = {FLAT_KEY: layout.flatten(theta).detach().clone().requires_grad_(True)}
    st = layout.flatten_state(state) if state is not None else tx.init(x)

    def view(p: dict[str, Tensor]) -> dict[str, Tensor]:
        return layout.unflatten(p[FLAT_KEY])

    data = prepare_round(problem, rnd.batch, view(x), eta, eta, InnerSurrogate.PAPER)
    data = {k: v.detach() for k, v in data.items()}
    fired0, steps0 = clip_counts(st)
    norms = []
    for idx in rnd.minibatches:
        before = x[FLAT_KEY].detach()
        x, st = inner_step(
            problem, tx, x, st, {k: v[idx] for k, v in data.items()}, eta, False, view
        )
        x = {FLAT_KEY: x[FLAT_KEY].detach().requires_grad_(True)}
        norms.append(float((x[FLAT_KEY].detach() - before).norm()))
    fired, steps = clip_counts(st)
    return norms, x[FLAT_KEY].detach(), st, (fired - fired0) / max(1, steps - steps0)


def matched_sgd_lr(
    problem: Any, cfg: CLNConfig, theta: Any, eta: Any, rnd: Round, target: float
) -> tuple[float, float]:
    """SGD step size whose mean per-step update norm on ``rnd`` is ``target``; and the ratio hit.

    Starts from ``target / max_grad_norm`` (exact when clipping fires on every step) and
    rescales twice by ``target / achieved``.
    """
    lr = target / cfg.max_grad_norm
    ratio = math.nan
    for _ in range(3):
        tx = torchopt.chain(clip_grad_norm(cfg.max_grad_norm), torchopt.sgd(lr))
        norms, *_ = plain_round(problem, tx, theta, eta, rnd, None)
        ratio = (sum(norms) / len(norms)) / target
        if abs(ratio - 1) < 0.01:
            break
        lr /= ratio
    return lr, ratio


def preconditioner_stats(cfg: CLNConfig, state: Any, eps_root: float) -> Row:
    """Adam's effective per-coordinate step ``lr / (sqrt(v_hat + eps_root) + eps)`` in ``state``."""
    adam_state, sched_state = state[1]
    nu, count = adam_state.nu[0], adam_state.count[0]
    nu_hat = nu / (1 - 0.999 ** int(count))
    schedule = linear_schedule(cfg.lr, cfg.steps_per_round, cfg.num_iterations, cfg.anneal_lr)
    lr = float(schedule(int(sched_state.count[0]) - 1))
    d = lr / ((nu_hat + eps_root).sqrt() + cfg.adam_eps)
    return {
        "lr": lr,
        "lr_D_max": float(d.max()),
        "lr_D_median": float(d.median()),
        **{
            f"share_v_below_{t:.0e}": float((nu_hat < t).double().mean())
            for t in (1e-8, 1e-6, 1e-4)
        },
    }


def adjoint_gain(
    problem: Any, F: Callable[[Tensor], Tensor], layout: FlatLayout, x0: Tensor,
    eta: Mapping[str, Tensor], outer: Mapping[str, Tensor], theta_k: Mapping[str, Tensor],
) -> tuple[float, float]:  # fmt: skip
    """``||J^T g|| / ||g||``, ``g = dL_out / d theta_{k+1}`` at the round's output; and ``||g||``.

    ``J^T g`` is what Eq 14 passes on to ``d theta_k / d eta``: the outer gradient carried back
    through one more round (the outer ratio's denominator is ``pi_{theta_k, eta}``, detached).
    """
    x = x0.detach().clone().requires_grad_(True)
    y = F(x)
    y_leaf = y.detach().requires_grad_(True)
    loss = outer_loss_at(problem, layout.unflatten(y_leaf), eta, outer, theta_k, eta)
    (g,) = torch.autograd.grad(loss, y_leaf)
    (jt_g,) = torch.autograd.grad(y, x, g)
    gn = float(g.norm())
    return float(jt_g.norm()) / gn if gn > 0 else math.nan, gn


# =================================================================================================
# One checkpoint
# =================================================================================================
def spectrum_at(
    problem: Any, cfg: CLNConfig, step: Any, budget: SpectrumBudget, seed: int,
    variants: Sequence[str] = VARIANTS,
) -> list[Row]:  # fmt: skip
    """``||J||_2`` of the stored round for every variant, with the round's diagnostics.

    ``step`` is the trainer's :class:`~metagrad_rl.trainers.bilevel.MetaStep`: ``round`` the
    stored policy round, ``outer`` its validation batch (for :func:`adjoint_gain`).
    """
    rec = step.round
    theta, eta = rec.theta, rec.eta
    rnd = Round(rec.batch, rec.minibatches)
    base = policy_optimizer(cfg)
    state = optimizer_state_from_list(base.init(theta), rec.opt_state)
    norms, theta_next, end_state, clip_share = plain_round(problem, base, theta, eta, rnd, state)
    x0 = FlatLayout(theta).flatten(theta)
    adam_step = sum(norms) / len(norms)
    sgd_lr, sgd_ratio = matched_sgd_lr(problem, cfg, theta, eta, rnd, adam_step)
    sgd_norms, sgd_next, *_ = plain_round(
        problem, torchopt.chain(clip_grad_norm(cfg.max_grad_norm), torchopt.sgd(sgd_lr)),
        theta, eta, rnd, None,
    )  # fmt: skip
    common = {
        "clip_share": clip_share,
        **preconditioner_stats(cfg, end_state, cfg.adam_eps_root),
    }
    txs = optimizers(cfg, sgd_lr)
    rows = []
    for name in variants:
        sgd = name.startswith("sgd")
        t0 = time.perf_counter()
        F, layout = round_map(problem, txs[name], theta, eta, rnd, None if sgd else state)
        res = spectral_norm(
            F, x0, iters=budget.iters, tol=budget.tol, generator=torch.Generator().manual_seed(seed)
        )
        gain, g_norm = adjoint_gain(problem, F, layout, x0, eta, step.outer, theta)
        rows.append(
            {
                "variant": name,
                "sigma": res.sigma,
                "adjoint_gain": gain,
                "outer_grad_norm": g_norm,
                "iterations": res.iterations,
                "residual": res.residual,
                "rel_change": res.rel_change,
                "time_s": time.perf_counter() - t0,
                "step_lr": sgd_lr if sgd else common["lr"],
                "mean_step": sum(sgd_norms) / len(sgd_norms) if sgd else adam_step,
                "displacement": float(((sgd_next if sgd else theta_next) - x0).norm()),
                "sgd_match_ratio": sgd_ratio if sgd else "",
                **common,
                "history": " ".join(f"{h:.4g}" for h in res.history),
            }
        )
    return rows


# =================================================================================================
# The run
# =================================================================================================
def run(
    out: Path,
    budget: SpectrumBudget,
    *,
    env: str = "Hopper-v5",
    seed: int = 1,
    variants: Sequence[str] = VARIANTS,
    on_rows: Callable[[list[Row]], None] | None = None,
    **cfg_kw: Any,
) -> list[Row]:
    """Trains CLN (eq17) for ``budget.steps`` and estimates ``||J||`` at the checkpoints."""
    cfg = CLNConfig(
        env=env,
        meta_grad="eq17",
        seed=seed,
        total_steps=budget.steps * SCHEDULE_FACTOR,
        checkpoint_every=0,
        **cfg_kw,
    )
    iterations = budget.steps // cfg.batch_size
    policy, reward = nets_for(cfg, *env_dims(env))
    problem = build_problem(cfg, policy, reward)
    picks = set(checkpoint_indices(iterations - 1, budget.checkpoints))
    rows: list[Row] = []
    count = {"i": 0}

    def on_meta_step(step: Any) -> None:
        i = count["i"]
        count["i"] = i + 1
        if i not in picks:
            return
        t0 = time.perf_counter()
        for r in spectrum_at(problem, cfg, step, budget, seed, variants):
            rows.append({"meta_step": i, "env_steps": (i + 2) * cfg.batch_size, **r})
        print(f"checkpoint {i}: {time.perf_counter() - t0:.0f} s", flush=True)
        if on_rows is not None:
            on_rows(rows)

    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_run_dir(run_dir)
    bilevel.train(cfg, run_dir, stop_at_step=iterations * cfg.batch_size, on_meta_step=on_meta_step)
    return rows


# =================================================================================================
# Table and plot
# =================================================================================================
def table(rows: Sequence[Row]) -> str:
    """``||J||`` per variant with the round's diagnostics; then the adjoint gains."""
    steps = sorted({(r["meta_step"], r["env_steps"]) for r in rows})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    gains = []
    for m, s in steps:
        at = {r["variant"]: r for r in rows if r["meta_step"] == m}
        gains.append(
            [m, f"{s:,}"] + [fmt(at[v].get("adjoint_gain")) if v in at else "–" for v in variants]
        )
    gain_table = markdown(gains, ["meta-step", "env steps"] + [f"‖Jᵀg‖/‖g‖ {v}" for v in variants])
    lines = []
    for m, s in steps:
        at = {r["variant"]: r for r in rows if r["meta_step"] == m}
        any_r = next(iter(at.values()))
        sgd = at.get("sgd-matched")
        lines.append(
            [m, f"{s:,}"]
            + [fmt(at[v]["sigma"]) if v in at else "–" for v in variants]
            + [
                fmt(sgd["step_lr"]) if sgd else "–",
                fmt(any_r["lr_D_max"]),
                fmt(any_r["lr_D_median"]),
                fmt(any_r["share_v_below_1e-08"]),
                fmt(max(r["residual"] for r in at.values()), ".2g"),
            ]
        )
    header = (
        ["meta-step", "env steps"]
        + [f"‖J‖ {v}" for v in variants]
        + ["SGD lr", "lr·D max", "lr·D median", "share v̂<1e-8", "max residual"]
    )
    return markdown(lines, header) + "\n\n" + gain_table


def plot(rows: Sequence[Row], path: Path) -> Path:
    """Left: ``||J||_2`` per variant over training; right: the adjoint gain ``||J^T g||/||g||``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    style = {"adam-frozen-v": dict(ls="--", marker="x", ms=9)}
    for ax, key, title in (
        (axes[0], "sigma", r"$\|\partial\theta_{k+1}/\partial\theta_k\|_2$ (power iteration)"),
        (
            axes[1],
            "adjoint_gain",
            r"$\|J^\top g\|/\|g\|$, $g = \partial L_{out}/\partial\theta_{k+1}$",
        ),
    ):
        for v in VARIANTS:
            pts = sorted((r["env_steps"], r[key]) for r in rows if r["variant"] == v and key in r)
            if pts:
                ax.plot(*zip(*pts), **(style.get(v) or dict(marker="o")), label=v)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("environment steps (CLN eq17, Hopper-v5)")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("gain over one policy round (320 inner steps)")
    axes[0].legend(fontsize=8)
    return save_png(fig, path)


def write(out: Path, rows: Sequence[Row], extra: Mapping[str, Any]) -> None:
    write_rows(out, "jacobian_spectrum", rows, extra)
    atomic_write_bytes(out / "jacobian_spectrum.md", (table(rows) + "\n").encode())
    if rows:
        plot(rows, out / "jacobian_spectrum.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/jacobian_spectrum", help="output directory")
    p.add_argument("--full", action="store_true", help="8 checkpoints over ~100k steps")
    p.add_argument("--seed", type=int, default=1, help="seed of the run and of v_0")
    p.add_argument("--steps", type=int, default=None, help="override the budget's env steps")
    p.add_argument("--checkpoints", type=int, default=None, help="override the checkpoints")
    p.add_argument("--iters", type=int, default=None, help="override the power iterations")
    p.add_argument(
        "--replot", action="store_true", help="only rewrite table and plot from --out's JSON"
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        saved = json.loads((out / "jacobian_spectrum.json").read_text())
        rows = saved.pop("rows")
        write(out, rows, saved)
        print(table(rows))
        return 0
    budget = FULL if args.full else SMALL
    over = {k: getattr(args, k) for k in ("steps", "checkpoints", "iters")}
    budget = dataclasses.replace(budget, **{k: v for k, v in over.items() if v is not None})
    t0 = time.perf_counter()
    extra = {"budget": dataclasses.asdict(budget), "seed": args.seed, "full": args.full}
    rows = run(out, budget, seed=args.seed, on_rows=lambda rs: write(out, rs, extra))
    extra["seconds"] = time.perf_counter() - t0
    write(out, rows, extra)
    print(table(rows))
    print(f"{extra['seconds']:.0f} s; wrote {out}/jacobian_spectrum.{{csv,json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
