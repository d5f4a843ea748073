"""Section ``accuracy``: every meta-gradient term on the trainer's stored batches."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from metagrad_rl.metagrad import eq17_gradient, meta_gradient
from metagrad_rl.pytree import TERMS, flatten
from metagrad_rl.rundir import clear_run_dir
from metagrad_rl.trainers import bilevel
from metagrad_rl.trainers.bilevel import (
    CLNConfig,
    build_problem,
    policy_optimizer,
)
from metagrad_rl.trainers.common import (
    optimizer_state_from_list,
)
from metagrad_rl.trainers.meta_grads import MetaGradContext, get
from metagrad_rl.unroll import Round
from termbench.common import Row, cos, env_dims, markdown, nets_for
from termbench.plots import legend_outside, pyplot, save_png, styles

# =================================================================================================
# 1. ACCURACY: every term on the trainer's stored batches
# =================================================================================================
#: Estimators compared with the exact total: each row is a ``--meta-grad`` entry of the
#: registry, its ``apply`` evaluated on one of the engine's results -- ``"round"``: the real
#: round(s) of the row (R = 1 or 2), ``"lookahead"``: the ``lookahead_steps``-step full-batch
#: look-ahead the trainer uses for it, ``"R1"``: the one-round unroll (Eq 17 is always at the
#: trainer's theta_{k+1}).
ROWS = {
    "eq17": ("eq17", "round"),
    "lirpg": ("lirpg", "round"),
    "three-term": ("three-term", "round"),
    "lirpg-lookahead": ("lirpg", "lookahead"),
    "three-term-lookahead": ("three-term", "lookahead"),
    "total-R1": ("exact", "R1"),
}
ESTIMATORS = tuple(ROWS)


def checkpoint_indices(n_meta: int, k: int) -> list[int]:
    """``k`` meta-step indices spread over ``1 .. n_meta - 1`` (index 0 has no previous round)."""
    if n_meta < 2:
        return [0] if n_meta == 1 else []
    picks = np.linspace(1, n_meta - 1, num=min(k, n_meta - 1))
    return sorted({int(round(x)) for x in picks})


def terms_at(
    problem: Any, tx: Any, cfg: bilevel.BilevelConfig, step: Any, prev: Any | None
) -> list[Row]:
    """Rows (R = 1, and R = 2 when ``prev`` is given) of norms, shares and cosines for one step.

    ``step.round`` is the stored policy round ``k`` (theta_k, its optimizer state, batch,
    minibatch order, eta), ``step.outer`` the validation batch and ``step.theta_next`` the
    trainer's theta_{k+1}. For R = 2 the stored round ``k-1`` is re-simulated at the *current*
    eta (the trainer ran it with the previous eta_{i-1}), then round ``k`` from its result.
    """
    inp, outer = step.round, step.outer
    eta = inp.eta
    state = optimizer_state_from_list(tx.init(inp.theta), inp.opt_state)
    rnd = Round(inp.batch, inp.minibatches)
    full = torch.arange(inp.batch["r_ex"].numel())
    look_rnd = Round(inp.batch, [full] * cfg.lookahead_steps)
    kw = dict(surrogate=cfg.surrogate, denominator=cfg.denominator, terms=True)
    theta_den = inp.theta if cfg.denominator == "theta_k" else step.theta_next
    g17_dict = eq17_gradient(problem, step.theta_next, eta, outer, theta_den, eta)
    g17 = flatten(g17_dict)
    look = meta_gradient(problem, tx, inp.theta, eta, [look_rnd], outer, opt_state=state, **kw)
    res1 = meta_gradient(problem, tx, inp.theta, eta, [rnd], outer, opt_state=state, **kw)
    runs = [(1, res1)]
    if prev is not None:
        p = prev.round
        st0 = optimizer_state_from_list(tx.init(p.theta), p.opt_state)
        r0 = Round(p.batch, p.minibatches)
        runs.append(
            (2, meta_gradient(problem, tx, p.theta, eta, [r0, rnd], outer, opt_state=st0, **kw))
        )
    rows = []
    for r, res in runs:
        t = {n: flatten(getattr(res, n)) for n in (*TERMS, "total")}
        total = t["total"]
        on = {"round": res, "lookahead": look, "R1": res1}
        est = {
            col: flatten(get(name).apply(MetaGradContext(on[which], lambda: g17_dict))[0])
            for col, (name, which) in ROWS.items()
        }
        tn = float(total.norm())
        row: Row = {"R": r, "norm_total": tn}
        for n in TERMS:
            row[f"norm_{n}"] = float(t[n].norm())
            row[f"share_{n}"] = float(t[n].norm()) / tn if tn else float("nan")
            row[f"cos_{n}"] = cos(t[n], total)
        for n, g in est.items():
            row[f"norm_{n}"] = float(g.norm())
            row[f"cos_{n}"] = cos(g, total)
            row[f"relerr_{n}"] = float((g - total).norm()) / tn if tn else float("nan")
        row["eq17_vs_eq11_relerr"] = float((g17 - t["eq11"]).norm()) / max(
            float(t["eq11"].norm()), 1e-30
        )
        rows.append(row)
    return rows


def run_accuracy(
    out: Path,
    *,
    env: str = "Hopper-v5",
    total_steps: int = 20_480,
    checkpoints: int = 3,
    seed: int = 1,
    meta_grad: str = "eq17",
    schedule_factor: int = 5,
    progress: bool = True,
    **cfg_kw: Any,
) -> list[Row]:
    """Trains CLN (``meta_grad`` drives eta) and recomputes every term at ``checkpoints`` steps.

    The run is the first ``total_steps`` of a run of ``schedule_factor * total_steps`` (so
    that the annealed policy step size is still ``>= 1 - 1/schedule_factor`` of its start, as
    early in a real run, instead of reaching 0 at the last round). It is kept in ``out/run``;
    its final checkpoint is the fixed state of the bias section's MuJoCo experiment.
    """
    cfg = CLNConfig(
        env=env,
        meta_grad=meta_grad,
        seed=seed,
        total_steps=total_steps * schedule_factor,
        checkpoint_every=0,
        **cfg_kw,
    )
    iterations = total_steps // cfg.batch_size
    obs_dim, act_dim = env_dims(env)
    policy, reward = nets_for(cfg, obs_dim, act_dim)
    problem, tx = build_problem(cfg, policy, reward), policy_optimizer(cfg)
    picks = set(checkpoint_indices(iterations - 1, checkpoints))
    rows: list[Row] = []
    state = {"i": 0, "prev": None}
    bar = tqdm(total=iterations, desc="accuracy: CLN run", disable=not progress)

    def on_meta_step(step: Any) -> None:
        i = state["i"]
        if i in picks:
            t0 = time.perf_counter()
            for row in terms_at(problem, tx, cfg, step, state["prev"]):
                rows.append(
                    {"meta_step": i, "env_steps": (i + 2) * cfg.batch_size, **row}
                    | {"time_s": time.perf_counter() - t0}
                )
        state["prev"] = step
        state["i"] = i + 1

    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_run_dir(run_dir)
    bilevel.train(
        cfg,
        run_dir,
        progress=lambda *_: bar.update(1),
        stop_at_step=iterations * cfg.batch_size,
        on_meta_step=on_meta_step,
    )
    bar.close()
    return rows


def accuracy_tables(rows: Sequence[Row]) -> str:
    """Markdown: the terms per checkpoint, then each estimator's cosine with the exact total."""
    parts = []
    header = ["meta-step", "env steps", "R", "|total|"]
    header += [f"|Eq {n}| (share)" for n in ("11", "12", "13", "14")] + ["|Eq 17|"]
    body = []
    for r in rows:
        shares = [
            f"{r[f'norm_eq{n}']:.3g} ({r[f'share_eq{n}']:.2f})" for n in ("11", "12", "13", "14")
        ]
        body.append(
            [r["meta_step"], r["env_steps"], r["R"], r["norm_total"], *shares, r["norm_eq17"]]
        )
    parts.append(
        "Terms: norms of dL_out/deta at meta-steps of the run. R = policy rounds unrolled (R = 1:"
        " the last round; R = 2: the last two, so Eq 14 is non-zero). share = |term| / |total|;"
        " it exceeds 1 when terms point against each other and partly cancel in the total.\n"
        + markdown(body, header)
    )
    header = [
        "estimator",
        "R",
        "cos with total: mean",
        "min",
        "max",
        "|est| / |total| (mean)",
        "|est - total| / |total| (mean)",
    ]
    body = []
    for r_ in (1, 2):
        sub = [r for r in rows if r["R"] == r_]
        if not sub:
            continue
        for e in ESTIMATORS:
            if e == "total-R1" and r_ == 1:
                continue
            c = [r[f"cos_{e}"] for r in sub]
            ratio = [r[f"norm_{e}"] / r["norm_total"] for r in sub]
            err = [r[f"relerr_{e}"] for r in sub]
            body.append([e, r_, np.mean(c), np.min(c), np.max(c), np.mean(ratio), np.mean(err)])
    parts.append(
        "Estimators against the exact total on the same batches:\n" + markdown(body, header)
    )
    return "\n\n".join(parts)


def plot_accuracy(rows: Sequence[Row], path: Path) -> Path:
    """Norm of each term and each estimator's cosine with the total (solid R = 1, dashed R = 2)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    style = styles()  # one distinct colour per term or estimator; the line style is R
    names = ("eq17", "lirpg", "three-term", "three-term-lookahead")
    markers = {e: (m, 11 - 2 * i) for i, (e, m) in enumerate(zip(names, "osD^"))}
    for r_, ls in ((1, "-"), (2, "--")):
        sub = [r for r in rows if r["R"] == r_]
        if not sub:
            continue
        x = [r["env_steps"] for r in sub]
        for n in (*TERMS, "total"):
            if n == "eq14" and r_ == 1:
                continue  # zero with one round
            y = [r[f"norm_{n}"] for r in sub]
            axes[0].plot(x, y, ls, marker="o", color=style.color(n), label=f"{n} R={r_}")
        for e in names:
            y = [r[f"cos_{e}"] for r in sub]
            m, size = markers[e]  # hollow markers of decreasing size: equal values stay visible
            axes[1].plot(
                x, y, ls, marker=m, mfc="none", ms=size, color=style.color(e), label=f"{e} R={r_}"
            )
    axes[0].set_yscale("log")
    axes[0].set_ylabel("|term| (norm of dL_out/deta)")
    axes[1].set_ylabel("cosine with the exact total")
    axes[0].set_title("norm of each term (solid R=1, dashed R=2)")
    axes[1].set_title("cosine with the exact total of the same R")
    axes[1].axhline(0, color="k", lw=0.5)
    for ax in axes:
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
        legend_outside(ax, fontsize=7)
    return save_png(fig, path)
