"""How accurate, how expensive and how useful is each meta-gradient term? (issues 4 and 5)

Four sections, each printing a table and writing ``<section>.csv``/``<section>.json`` (raw
numbers) and PNG plots under ``--out``:

``accuracy``
    Trains a CLN agent on Hopper-v5 and, at several meta-steps, recomputes every term of the
    meta-gradient exactly on the batches the trainer stored (the policy round ``tau_k`` with its
    minibatch order and optimizer state, the validation batch ``tau_{k+1}``): Eq 11-14, the
    total, Eq 17, and how well the cheap estimators (Eq 17 alone, LIRPG = Eq 13 alone, the
    three-term Eq 17 + 12 + 13; each also through the trainer's one-step look-ahead) point
    along the exact total. With ``R = 2`` rounds (the two last stored rounds) Eq 14 is non-zero.
``cost``
    Hopper-v5-sized networks (obs 11, act 3, 64-64 CLN policy, 64-64 reward net with an
    8-wide bottleneck, float32, batch 2048, 10 epochs x 32 minibatches), one torch thread:
    wall time (repetitions interleaved, medians) and peak memory (each estimator in a fresh
    subprocess) of a plain PPO round, Eq 17, the exact total, the four-term split, the explicit
    ``torch.func`` SGD recursion and the Eq 12 product, against the issue's targets; and how the
    exact total grows with the unrolled steps and rounds.
``learning``
    Learning curves (Figures 4, 5 and 6 of the paper) and final returns from run directories of
    ``benchmarks/learning_runs.sh``; without them, a tiny set of runs of its own.
``bias``
    Bias and variance of the plain, sampling-aware and DiCE estimators on the exact tabular
    test bed, and, on Hopper-v5, the variance of the sampling-aware estimator against the plain
    one over independent rollouts from one fixed training state.

Usage::

    .venv/bin/python benchmarks/compare_terms.py                       # small default (minutes)
    .venv/bin/python benchmarks/compare_terms.py --full                # the long version
    .venv/bin/python benchmarks/compare_terms.py --sections cost --out bench_out/cost
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchopt
from torch import Tensor
from tqdm import tqdm

from metagrad_rl.advantages import gae
from metagrad_rl.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from metagrad_rl.envs import make_env
from metagrad_rl.explicit import explicit_sgd_terms, mixed_second_order_product
from metagrad_rl.logging import CHECKPOINT_FILE, PROGRESS_FILE, SUMMARY_FILE, clear_run_dir
from metagrad_rl.metagrad import (
    eq17_gradient,
    flatten,
    meta_gradient,
    start_meta_gradient,
)
from metagrad_rl.networks import (
    Critic,
    GaussianPolicy,
    IntrinsicReward,
    cln_condition,
    params_of,
)
from metagrad_rl.plotting import load_curve, mean_and_spread
from metagrad_rl.rollout import collect_rollout, critic_values, policy_outputs
from metagrad_rl.trainers import bilevel
from metagrad_rl.trainers.bilevel import (
    CLNConfig,
    LIRPGConfig,
    build_problem,
    policy_optimizer,
    round_batch,
    score_weight,
)
from metagrad_rl.trainers.common import (
    FlatParams,
    Minibatch,
    PPOCoefs,
    collector_for,
    make_optimizer,
    optimizer_state_from_list,
    ppo_update,
)
from metagrad_rl.unroll import EtaPaths, InnerSurrogate, Round, minibatch_indices, unroll

SECTIONS = ("accuracy", "cost", "learning", "bias")
GIB = 1024**3
Row = dict[str, Any]


# =================================================================================================
# Budgets: the small default and --full
# =================================================================================================
@dataclass(frozen=True)
class Budget:
    """How much of each section to run."""

    acc_steps: int
    """Environment steps of the CLN run whose stored batches the accuracy section re-uses."""
    acc_checkpoints: int
    """Meta-steps at which every term is recomputed (spread evenly over the run)."""
    cost_reps: int
    """Interleaved repetitions of each timed computation (medians are reported)."""
    explicit_steps: int
    """Inner steps of the explicit torch.func SGD recursion (and the engine on SGD beside it)."""
    scaling: tuple[tuple[int, int], ...]
    """(inner steps per round, rounds) of the exact total's growth curve."""
    learn_steps: int
    """Steps of each tiny learning run (used when no learning_runs.sh runs exist)."""
    learn_seeds: tuple[int, ...]
    learn_meta_grads: tuple[str, ...]
    mujoco_draws: int
    """Independent (tau_k, tau_k+1) draws of the MuJoCo variance experiment."""
    tabular_batch_sizes: tuple[int, ...]


SMALL = Budget(
    acc_steps=20_480,
    acc_checkpoints=3,
    cost_reps=5,
    explicit_steps=8,
    scaling=((1, 1), (10, 1), (40, 1), (160, 1), (320, 1), (320, 2), (320, 3)),
    learn_steps=6_144,
    learn_seeds=(1, 2),
    learn_meta_grads=("eq17", "lirpg", "three-term", "exact"),
    mujoco_draws=8,
    tabular_batch_sizes=(1, 2, 4),
)
FULL = Budget(
    acc_steps=100_352,
    acc_checkpoints=8,
    cost_reps=11,
    explicit_steps=32,
    scaling=((1, 1), (10, 1), (40, 1), (160, 1), (320, 1), (320, 2), (320, 3)),
    learn_steps=6_144,
    learn_seeds=(1, 2, 3),
    learn_meta_grads=("eq17", "lirpg", "three-term", "exact", "sampling-aware"),
    mujoco_draws=32,
    tabular_batch_sizes=(1, 2, 4, 8),
)


# =================================================================================================
# Output helpers
# =================================================================================================
def write_rows(out: Path, name: str, rows: Sequence[Row], extra: Mapping[str, Any] | None = None):
    """``name.csv`` (a line per row) and ``name.json`` (``{"rows": ..., **extra}``), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / f"{name}.csv", buf.getvalue().encode())
    atomic_write_json(out / f"{name}.json", {"rows": list(rows), **(extra or {})})
    return out / f"{name}.csv", out / f"{name}.json"


def fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def markdown(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def save_png(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float("nan") if na == 0.0 or nb == 0.0 else float(a @ b) / (na * nb)


def env_dims(env_id: str) -> tuple[int, int]:
    env = make_env(env_id)
    try:
        return int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
    finally:
        env.close()


def nets_for(cfg: bilevel.BilevelConfig, obs_dim: int, act_dim: int):
    """Fresh modules with the trainer's architecture (the engine only needs their layout)."""
    reward = IntrinsicReward(obs_dim, act_dim, cfg.reward_hidden, cfg.bottleneck)
    policy = GaussianPolicy(
        obs_dim, act_dim, cfg.hidden, conditioning=cfg.conditioning, cond_dim=reward.condition_dim
    )
    return policy, reward


# =================================================================================================
# 1. ACCURACY: every term on the trainer's stored batches
# =================================================================================================
#: Estimators compared with the exact total (``g17`` is Eq 17 at the trainer's theta_{k+1}).
ESTIMATORS = ("eq17", "lirpg", "three-term", "lirpg-lookahead", "three-term-lookahead", "total-R1")


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
    g17 = flatten(eq17_gradient(problem, step.theta_next, eta, outer, theta_den, eta))
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
        t = {n: flatten(getattr(res, n)) for n in ("eq11", "eq12", "eq13", "eq14", "total")}
        total = t["total"]
        est = {
            "eq17": g17,
            "lirpg": t["eq13"],
            "three-term": g17 + t["eq12"] + t["eq13"],
            "lirpg-lookahead": flatten(look.eq13),
            "three-term-lookahead": g17 + flatten(look.eq12) + flatten(look.eq13),
            "total-R1": flatten(res1.total),
        }
        tn = float(total.norm())
        row: Row = {"R": r, "norm_total": tn}
        for n in ("eq11", "eq12", "eq13", "eq14"):
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
        "Terms (norms of dL_out/deta; share = |term| / |total|):\n" + markdown(body, header)
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
    colors = dict(zip(("eq11", "eq12", "eq13", "eq14", "total"), plt.cm.tab10.colors))
    colors.update(zip(("eq17", "lirpg", "three-term", "three-term-lookahead"), plt.cm.Dark2.colors))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r_, ls in ((1, "-"), (2, "--")):
        sub = [r for r in rows if r["R"] == r_]
        if not sub:
            continue
        x = [r["env_steps"] for r in sub]
        for n in ("eq11", "eq12", "eq13", "eq14", "total"):
            if n == "eq14" and r_ == 1:
                continue  # zero with one round
            y = [r[f"norm_{n}"] for r in sub]
            axes[0].plot(x, y, ls, marker="o", color=colors[n], label=f"{n} R={r_}")
        for e in ("eq17", "lirpg", "three-term", "three-term-lookahead"):
            y = [r[f"cos_{e}"] for r in sub]
            axes[1].plot(x, y, ls, marker="o", color=colors[e], label=f"{e} R={r_}")
    axes[0].set_yscale("log")
    axes[0].set_title("norm of each term (solid R=1, dashed R=2)")
    axes[1].set_title("cosine with the exact total of the same R")
    axes[1].axhline(0, color="k", lw=0.5)
    for ax in axes:
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return save_png(fig, path)


# =================================================================================================
# 2. COST: time and memory on Hopper-v5-sized networks
# =================================================================================================
OBS_DIM, ACT_DIM, BATCH, EPOCHS, MINIBATCHES = 11, 3, 2048, 10, 32


class CostSetup:
    """A Hopper-sized CLN problem on random data (fixed seed): what every estimator works on."""

    def __init__(self, seed: int = 0, steps: int | None = None, rounds: int = 1) -> None:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self.cfg = CLNConfig(
            env="Hopper-v5",
            num_steps=BATCH,
            update_epochs=EPOCHS,
            num_minibatches=MINIBATCHES,
            total_steps=BATCH * 100,
        )
        self.policy, self.reward = nets_for(self.cfg, OBS_DIM, ACT_DIM)
        self.critic = Critic(OBS_DIM, self.cfg.hidden)
        self.theta = {k: v.detach().clone() for k, v in params_of(self.policy).items()}
        self.eta = {k: v.detach().clone() for k, v in params_of(self.reward).items()}
        self.problem = build_problem(self.cfg, self.policy, self.reward)
        self.tx = policy_optimizer(self.cfg)
        self.state = self.tx.init(self.theta)
        self.cond = cln_condition(self.eta).detach()
        self.rounds = [self._round(gen, steps) for _ in range(rounds)]
        self.outer = self._outer(gen)

    def _act(self, obs: Tensor, gen: torch.Generator) -> Tensor:
        with torch.no_grad():
            mean, log_std = policy_outputs(self.policy, self.theta, obs, self.cond)
            return mean + log_std.exp() * torch.randn(mean.shape, generator=gen)

    def _round(self, gen: torch.Generator, steps: int | None) -> Round:
        obs = torch.randn(BATCH, 1, OBS_DIM, generator=gen)
        ends = torch.zeros(BATCH, 1)
        ends[torch.randint(0, BATCH, (8,), generator=gen)] = 1.0
        batch = {
            "obs": obs,
            "act": self._act(obs, gen),
            "r_ex": torch.randn(BATCH, 1, generator=gen) * 0.1,
            "v_mix": torch.randn(BATCH, 1, generator=gen),
            "v_mix_next": torch.randn(BATCH, 1, generator=gen),
            "terminated": ends.clone(),
            "episode_end": ends,
        }
        mbs = minibatch_indices(BATCH, EPOCHS, MINIBATCHES, gen)
        return Round(batch, mbs if steps is None else mbs[:steps])

    def _outer(self, gen: torch.Generator) -> dict[str, Tensor]:
        obs = torch.randn(BATCH, OBS_DIM, generator=gen)
        return {"obs": obs, "act": self._act(obs, gen), "adv_ex": torch.randn(BATCH, generator=gen)}

    # ---- the timed computations ----------------------------------------------------------------
    def plain_round(self) -> Any:
        """The CLN trainer's own plain policy round (``unroll(..., create_graph=False)``)."""
        return unroll(
            self.problem,
            self.tx,
            self.theta,
            EtaPaths.shared(self.eta),
            self.rounds,
            self.state,
            InnerSurrogate(self.cfg.surrogate),
            create_graph=False,
        )

    def eq17(self) -> Any:
        return eq17_gradient(self.problem, self.theta, self.eta, self.outer)

    def _meta(self, terms: bool, measure_memory: bool) -> Any:
        return meta_gradient(
            self.problem,
            self.tx,
            self.theta,
            self.eta,
            self.rounds,
            self.outer,
            opt_state=self.state,
            terms=terms,
            measure_memory=measure_memory,
        )

    def exact_total(self, measure_memory: bool = False) -> Any:
        return self._meta(False, measure_memory)

    def four_terms(self, measure_memory: bool = False) -> Any:
        return self._meta(True, measure_memory)

    def sgd_rounds(self, steps: int) -> list[Round]:
        return [Round(self.rounds[0].batch, list(self.rounds[0].minibatches)[:steps])]

    def engine_sgd(self, steps: int) -> Any:
        return meta_gradient(
            self.problem,
            torchopt.sgd(1e-3),
            self.theta,
            self.eta,
            self.sgd_rounds(steps),
            self.outer,
            terms=True,
        )

    def explicit_sgd(self, steps: int) -> Any:
        return explicit_sgd_terms(
            self.problem, 1e-3, self.theta, self.eta, self.sgd_rounds(steps), self.outer
        )

    def ppo_trainer_update(self) -> Callable[[], Any]:
        """The PPO trainer's ``ppo_update`` (policy *and* critic, one flat Adam) on a round."""
        params = FlatParams({"theta": self.theta, "critic": params_of(self.critic)})
        flat0 = params.flat.clone()
        n = BATCH
        b = self.rounds[0].batch
        with torch.no_grad():
            mean, log_std = policy_outputs(self.policy, self.theta, b["obs"], self.cond)
            from metagrad_rl.networks import gaussian_log_prob

            logp = gaussian_log_prob(mean, log_std, b["act"]).reshape(n)
        data = Minibatch(
            obs=b["obs"].reshape(n, -1),
            act=b["act"].reshape(n, -1),
            old_logp=logp,
            adv=torch.randn(n),
            returns=torch.randn(n),
            old_values=b["v_mix"].reshape(n),
        )
        tx = make_optimizer(3e-4, EPOCHS * MINIBATCHES, 100)

        def run() -> Any:
            with torch.no_grad():
                params.flat.copy_(flat0)
            return ppo_update(
                self.policy,
                self.critic,
                params,
                tx,
                tx.init((params.flat,)),
                data,
                PPOCoefs(),
                minibatch_indices(n, EPOCHS, MINIBATCHES, torch.Generator().manual_seed(0)),
                self.cond,
            )

        return run

    def inner_loss_fn(self) -> tuple[Callable[..., Tensor], dict[str, Tensor]]:
        """``f(theta, eta)``: the inner loss of the first minibatch (``eta``: the conditioning)."""
        rnd = self.rounds[0]
        with torch.no_grad():
            data = self.problem.prepare(
                rnd.batch, eta_reward=self.eta, theta_old=self.theta, eta_policy_old=self.eta
            )
        mb = {k: v[rnd.minibatches[0]] for k, v in data.items()}

        def f(theta: Mapping[str, Tensor], eta: Mapping[str, Tensor]) -> Tensor:
            return self.problem.inner_loss(theta, mb, eta_policy=eta)

        return f, mb


def estimator_fns(s: CostSetup, explicit_steps: int) -> dict[str, Callable[[], Any]]:
    """The timed computations of the cost table, by name."""
    return {
        "plain_round": s.plain_round,
        "ppo_update": s.ppo_trainer_update(),
        "eq17": s.eq17,
        "exact_total": s.exact_total,
        "four_terms": s.four_terms,
        f"engine_sgd_{explicit_steps}": lambda: s.engine_sgd(explicit_steps),
        f"explicit_sgd_{explicit_steps}": lambda: s.explicit_sgd(explicit_steps),
    }


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]],
    reps: int,
    seed: int,
    desc: str,
    progress: bool = True,
    warmup: bool = True,
) -> dict[str, list[float]]:
    """Each function once per repetition, in a fresh random order (after one warm-up call)."""
    for fn in fns.values() if warmup else ():
        fn()
    rng = np.random.default_rng(seed)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in tqdm(range(reps), desc=desc, disable=not progress):
        for i in rng.permutation(len(names)):
            t0 = time.perf_counter()
            fns[names[i]]()
            times[names[i]].append(time.perf_counter() - t0)
    return times


def ratio_median(times: Mapping[str, list[float]], a: str, b: str) -> float:
    """Median over repetitions of ``t_a / t_b`` measured in the same repetition."""
    return float(np.median(np.array(times[a]) / np.array(times[b])))


def eq12_product_times(
    s: CostSetup, reps: int, seed: int, calls: int = 50
) -> dict[str, list[float]]:
    """Eq 12's ``D_eta(v^T grad_theta L_in)`` against one inner-loss gradient (one minibatch)."""
    from torch.func import grad

    f, _ = s.inner_loss_fn()
    theta, eta = s.theta, s.eta
    v = {k: torch.randn_like(t) for k, t in theta.items()}
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in theta.items()}

    def autograd_grad() -> Any:
        return torch.autograd.grad(f(leaves, eta), list(leaves.values()))

    def func_grad() -> Any:
        return grad(f)(theta, eta)

    def product() -> Any:  # the default: reverse-over-reverse with torch.autograd
        return mixed_second_order_product(f, theta, eta, v)

    def product_jvp() -> Any:  # forward-over-reverse with torch.func
        return mixed_second_order_product(f, theta, eta, v, method="jvp")

    def many(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            for _ in range(calls):
                fn()

        return run

    fns = {
        "grad_autograd": many(autograd_grad),
        "grad_func": many(func_grad),
        "eq12_product": many(product),
        "eq12_product_jvp": many(product_jvp),
    }
    t = interleaved_times(fns, reps, seed, "cost: Eq 12 product", progress=False)
    return {k: [x / calls for x in v_] for k, v_ in t.items()}


# ---- peak memory, each computation in a fresh process -------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` (Linux), else ``ru_maxrss``.

    ``ru_maxrss`` of a process started by a large parent starts at the parent's RSS (Linux keeps
    it across fork and exec), which hides the child's own peak; ``VmHWM`` belongs to the
    process's own address space.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe_main(name: str, steps: int | None, rounds: int, seed: int, explicit_steps: int) -> Row:
    """Runs in a subprocess: peak RSS of one computation above the post-setup baseline."""
    torch.set_num_threads(1)
    s = CostSetup(seed, steps, rounds)
    fns = estimator_fns(s, explicit_steps)
    base = peak_rss_bytes()
    base_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    fns[name]()
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    peak_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row: Row = {
        "name": name,
        "steps": steps,
        "rounds": rounds,
        "rss_base_bytes": base,
        "rss_peak_delta_bytes": peak - base,
        "ru_maxrss_delta_bytes": peak_ru - base_ru,
        "wall_s_probe": wall,
    }
    if name in ("exact_total", "four_terms"):
        res = getattr(s, name)(measure_memory=True)
        row["graph_bytes"] = res.diagnostics["graph_bytes"]
    return row


def probe(name: str, steps: int | None, rounds: int, seed: int, explicit_steps: int) -> Row:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--probe",
        name,
        "--seed",
        str(seed),
        "--probe-rounds",
        str(rounds),
        "--probe-explicit-steps",
        str(explicit_steps),
    ]
    if steps is not None:
        cmd += ["--probe-steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"memory probe {name} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_cost(
    out: Path,
    *,
    reps: int = 5,
    explicit_steps: int = 32,
    scaling: Sequence[tuple[int, int]] = SMALL.scaling,
    seed: int = 0,
    memory: bool = True,
    full_round_steps: int | None = None,
    eq12_reps: int = 15,
    progress: bool = True,
) -> dict[str, Any]:
    """Times (interleaved, medians) and peak memory (subprocesses) of every computation.

    ``full_round_steps`` cuts the "full round" to its first steps (tests only).
    """
    torch.set_num_threads(1)
    s = CostSetup(seed, full_round_steps)
    fns = estimator_fns(s, explicit_steps)
    times = interleaved_times(fns, reps, seed, "cost: estimators", progress)
    mem = {}
    if memory:
        for name in tqdm(fns, desc="cost: memory probes", disable=not progress):
            mem[name] = probe(name, full_round_steps, 1, seed, explicit_steps)
    rows = []
    for name, ts in times.items():
        m = mem.get(name, {})
        rows.append(
            {
                "name": name,
                "median_s": float(np.median(ts)),
                "ratio_to_plain_round": ratio_median(times, name, "plain_round"),
                "ratio_to_exact_total": ratio_median(times, name, "exact_total"),
                "rss_peak_delta_mib": m.get("rss_peak_delta_bytes", float("nan")) / 2**20,
                "graph_mib": m.get("graph_bytes", float("nan")) / 2**20,
                "times_s": ts,
            }
        )
    eq12 = eq12_product_times(s, eq12_reps, seed)
    eq12_rows = [
        {
            "name": k,
            "median_s": float(np.median(v)),
            "ratio_to_grad_autograd": ratio_median(eq12, k, "grad_autograd"),
            "ratio_to_grad_func": ratio_median(eq12, k, "grad_func"),
            "times_s": v,
        }
        for k, v in eq12.items()
    ]
    # ---- growth with the unrolled steps and rounds
    grow = []
    growth_reps = min(reps, 3)
    for steps, rounds in tqdm(scaling, desc="cost: growth", disable=not progress):
        g = CostSetup(seed, steps, rounds)
        t = interleaved_times(
            {"plain": g.plain_round, "exact_total": g.exact_total},
            growth_reps,
            seed,
            "",
            progress=False,
            warmup=False,
        )
        row = {
            "steps_per_round": steps,
            "rounds": rounds,
            "inner_steps": steps * rounds,
            "exact_median_s": float(np.median(t["exact_total"])),
            "plain_median_s": float(np.median(t["plain"])),
            "ratio_to_plain": ratio_median(t, "exact_total", "plain"),
        }
        if memory:
            m = probe("exact_total", steps, rounds, seed, explicit_steps)
            row["rss_peak_delta_mib"] = m["rss_peak_delta_bytes"] / 2**20
            row["graph_mib"] = m["graph_bytes"] / 2**20
        grow.append(row)
    by = {r["name"]: r for r in rows}
    p12 = {r["name"]: r for r in eq12_rows}
    strict_grad = min(p12["grad_autograd"]["median_s"], p12["grad_func"]["median_s"])
    targets = [
        target("four-term / exact total (time)", by["four_terms"]["ratio_to_exact_total"], 1.2),
        target("exact total / plain round (time)", by["exact_total"]["ratio_to_plain_round"], 3.0),
        target("exact total peak RSS (GiB)", by["exact_total"]["rss_peak_delta_mib"] / 1024, 1.0),
        target(
            "Eq 12 product / one inner-loss gradient (time, faster gradient)",
            p12["eq12_product"]["median_s"] / strict_grad,
            1.6,
        ),
    ]
    return {
        "estimators": rows,
        "eq12": eq12_rows,
        "growth": grow,
        "targets": targets,
        "reps": reps,
        "torch_threads": 1,
        "torch": torch.__version__,
    }


def target(name: str, value: float, limit: float) -> Row:
    ok = value <= limit
    return {
        "target": name,
        "measured": value,
        "limit": limit,
        "verdict": "PASS" if ok else "MISS",
        "margin": f"{(value / limit - 1) * 100:+.0f}% of the limit",
    }


def cost_tables(res: Mapping[str, Any]) -> str:
    est = [
        [
            r["name"],
            r["median_s"] * 1e3,
            r["ratio_to_plain_round"],
            r["ratio_to_exact_total"],
            r["rss_peak_delta_mib"],
            r["graph_mib"],
        ]
        for r in res["estimators"]
    ]
    parts = [
        "Time (median ms; ratios are medians of per-repetition ratios) and peak memory (RSS above "
        "the post-setup baseline, fresh process; graph = bytes saved for backward):\n"
        + markdown(
            est, ["computation", "ms", "x plain round", "x exact total", "peak MiB", "graph MiB"]
        )
    ]
    e12 = [
        [r["name"], r["median_s"] * 1e3, r["ratio_to_grad_autograd"], r["ratio_to_grad_func"]]
        for r in res["eq12"]
    ]
    parts.append(
        "Eq 12 mixed product on one minibatch of 64 (ms per call):\n"
        + markdown(e12, ["computation", "ms", "x autograd grad", "x torch.func grad"])
    )
    gr = [
        [
            r["steps_per_round"],
            r["rounds"],
            r["inner_steps"],
            r["exact_median_s"],
            r["plain_median_s"],
            r["ratio_to_plain"],
            r.get("rss_peak_delta_mib"),
            r.get("graph_mib"),
        ]
        for r in res["growth"]
    ]
    parts.append(
        "Exact total against unrolled steps and rounds:\n"
        + markdown(
            gr,
            [
                "steps/round",
                "rounds",
                "steps",
                "exact s",
                "plain s",
                "ratio",
                "peak MiB",
                "graph MiB",
            ],
        )
    )
    tg = [
        [t["target"], t["measured"], t["limit"], t["verdict"], t["margin"]] for t in res["targets"]
    ]
    parts.append(
        "Targets (issue 4):\n" + markdown(tg, ["target", "measured", "limit", "verdict", "margin"])
    )
    return "\n\n".join(parts)


def plot_cost(res: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    g = res["growth"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["inner_steps"] for r in g]
    axes[0].loglog(x, [r["exact_median_s"] for r in g], "o-", label="exact total")
    axes[0].loglog(x, [r["plain_median_s"] for r in g], "s-", label="plain round")
    axes[0].set_ylabel("seconds")
    if "graph_mib" in g[0]:
        axes[1].loglog(x, [max(r["rss_peak_delta_mib"], 1e-3) for r in g], "o-", label="peak RSS")
        axes[1].loglog(x, [r["graph_mib"] for r in g], "s-", label="graph (saved tensors)")
        axes[1].axhline(1024, color="r", lw=0.8, ls="--", label="1 GiB")
    axes[1].set_ylabel("MiB")
    for ax in axes:
        ax.set_xlabel("unrolled inner steps (320 = one PPO round)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return save_png(fig, path)


# =================================================================================================
# 3. LEARNING: Figures 4, 5 and 6 from run directories
# =================================================================================================
FIG5_ESTIMATORS = ("eq17", "lirpg", "three-term", "exact", "sampling-aware")
FIG4_ENVS = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")


def run_groups(roots: Iterable[Path]) -> dict[str, list[Path]]:
    """``{group: [run dirs]}`` where a run ``<group>-s<seed>`` has a ``progress.csv``."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for root in roots:
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            m = re.fullmatch(r"(.+)-s(\d+)", d.name)
            if m and (d / PROGRESS_FILE).is_file():
                groups[m.group(1)].append(d)
    return dict(groups)


def final_return(run: Path) -> tuple[float | None, int, bool]:
    """(mean return of the last 20 episodes, steps, finished) from summary.json or the log."""
    s = run / SUMMARY_FILE
    if s.is_file():
        d = json.loads(s.read_text())
        return d.get("mean_return_last_20_episodes"), int(d.get("global_step", 0)), True
    steps, vals = load_curve(run)
    if not len(steps):
        return None, 0, False
    return float(np.mean(vals[-5:])), int(steps[-1]), False


def learning_table(groups: Mapping[str, list[Path]]) -> list[Row]:
    rows = []
    for g, runs in sorted(groups.items()):
        finals = [final_return(r) for r in runs]
        vals = [f for f, _, _ in finals if f is not None]
        rows.append(
            {
                "group": g,
                "seeds": len(runs),
                "finished": sum(done for *_, done in finals),
                "steps": min(st for _, st, _ in finals),
                "final_mean": float(np.mean(vals)) if vals else None,
                "final_std": float(np.std(vals)) if len(vals) > 1 else None,
                "per_seed": vals,
            }
        )
    return rows


def plot_groups(
    groups: Mapping[str, list[Path]],
    panels: Mapping[str, Sequence[tuple[str, str]]],
    path: Path,
    metric: str = "episodic_return",
    title: str = "",
) -> Path | None:
    """One panel per key; each panel draws ``(group, label)`` as mean +- std over seeds."""
    panels = {p: [(g, lab) for g, lab in v if g in groups] for p, v in panels.items()}
    panels = {p: v for p, v in panels.items() if v}
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (p, lines) in zip(axes[0], panels.items()):
        for g, lab in lines:
            curves = [c for c in (load_curve(r, metric) for r in groups[g]) if len(c[0])]
            if not curves:
                continue
            grid, mean, std = mean_and_spread(curves)
            (ln,) = ax.plot(grid, mean, label=f"{lab} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(grid, mean - std, mean + std, alpha=0.2, color=ln.get_color())
        ax.set_title(p)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def tiny_runs(
    root: Path,
    steps: int,
    seeds: Sequence[int],
    meta_grads: Sequence[str],
    env: str = "Hopper-v5",
    num_steps: int = 1024,
    progress: bool = True,
) -> None:
    """Small runs of each estimator (and PPO/LIRPG for Figure 4) into ``root``; skips done ones."""
    from metagrad_rl.trainers import ppo as ppo_trainer

    jobs: list[tuple[str, Any, Any]] = []
    common = dict(env=env, total_steps=steps, num_steps=num_steps, checkpoint_every=0)
    for seed in seeds:
        for mg in meta_grads:
            cfg = CLNConfig(meta_grad=mg, seed=seed, **common)
            jobs.append((f"cln-{mg}-{env}-s{seed}", bilevel.train, cfg))
        jobs.append((f"lirpg-{env}-s{seed}", bilevel.train, LIRPGConfig(seed=seed, **common)))
        jobs.append(
            (f"ppo-{env}-s{seed}", ppo_trainer.train, ppo_trainer.PPOConfig(seed=seed, **common))
        )
    for name, train, cfg in tqdm(jobs, desc="learning: tiny runs", disable=not progress):
        d = root / name
        if (d / SUMMARY_FILE).is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        clear_run_dir(d)
        train(cfg, d)


def runs_in_progress(root: Path, within_s: float = 300.0) -> bool:
    now = time.time()
    return any(now - p.stat().st_mtime < within_s for p in root.glob(f"*/{CHECKPOINT_FILE}"))


def run_learning(
    out: Path,
    runs_root: Path,
    *,
    full: bool,
    budget: Budget,
    progress: bool = True,
) -> dict[str, Any]:
    """Plots and the final-return table from ``runs_root`` (or tiny runs in ``out``)."""
    note = ""
    if full:
        if runs_in_progress(runs_root):
            note = f"{runs_root} is being written by another job: plotting what exists"
        else:
            subprocess.run(["bash", str(Path(__file__).parent / "learning_runs.sh")], check=False)
    groups = run_groups([runs_root])
    source = str(runs_root)
    if not groups:
        tiny = out / "learning_runs"
        tiny_runs(
            tiny, budget.learn_steps, budget.learn_seeds, budget.learn_meta_grads, progress=progress
        )
        groups = run_groups([tiny])
        source = str(tiny)
        note = (
            f"no runs in {runs_root}: tiny runs ({budget.learn_steps} steps, num_steps 1024, "
            f"seeds {list(budget.learn_seeds)}) in {tiny}"
        )
    figs = {}
    fig5 = {"Hopper-v5 (CLN policy)": [(f"cln-{m}-Hopper-v5", m) for m in FIG5_ESTIMATORS]}
    figs["fig5"] = plot_groups(
        groups, fig5, out / "fig5_estimators_hopper.png", title="Figure 5: meta-gradient estimators"
    )
    fig4 = {
        e: [(f"ppo-{e}", "ppo"), (f"lirpg-{e}", "lirpg"), (f"cln-eq17-{e}", "cln (eq17)")]
        for e in FIG4_ENVS
    }
    figs["fig4"] = plot_groups(
        groups, fig4, out / "fig4_ppo_lirpg_cln.png", title="Figure 4: PPO vs LIRPG vs CLN"
    )
    fig6 = {
        "intrinsic reward (CLN and LIRPG)": [
            (g, g) for g in sorted(groups) if g.startswith(("cln-", "lirpg-"))
        ]
    }
    figs["fig6"] = plot_groups(
        groups,
        fig6,
        out / "fig6_intrinsic_reward.png",
        metric="intrinsic_reward_mean",
        title="Figure 6",
    )
    rows = learning_table(groups)
    return {
        "rows": rows,
        "source": source,
        "note": note,
        "plots": {k: str(v) for k, v in figs.items() if v},
    }


def learning_tables(res: Mapping[str, Any]) -> str:
    body = [
        [
            r["group"],
            f"{r['finished']}/{r['seeds']}",
            r["steps"],
            "–"
            if r["final_mean"] is None
            else f"{r['final_mean']:.0f} ± {0.0 if r['final_std'] is None else r['final_std']:.0f}",
            ", ".join(f"{v:.0f}" for v in r["per_seed"]),
        ]
        for r in res["rows"]
    ]
    head = f"Runs from {res['source']}" + (f" ({res['note']})" if res["note"] else "")
    return (
        head
        + ":\n"
        + markdown(
            body,
            [
                "group",
                "finished/seeds",
                "steps (min)",
                "final return (mean ± std over seeds)",
                "per seed",
            ],
        )
    )


# =================================================================================================
# 4. BIAS AND VARIANCE: the tabular test bed, then Hopper-v5
# =================================================================================================
def run_tabular(batch_sizes: Sequence[int]) -> list[Row]:
    from metagrad_rl.testing.tabular import bias_variance_table

    return bias_variance_table(batch_sizes=tuple(batch_sizes))


def tabular_table(rows: Sequence[Row]) -> str:
    body = [
        [
            r["conditioned"],
            r["rounds"],
            r["batch_size"],
            r["estimator"],
            r["baseline"],
            r["mode"],
            r["bias_rel"],
            r["variance_rel"],
            r["stderr_rel"],
        ]
        for r in rows
    ]
    return (
        "Tabular test bed (relative bias |E g - grad M| / |grad M|; "
        "variance tr Cov / |grad M|^2):\n"
        + (
            markdown(
                body,
                ["cond.", "K", "B", "estimator", "baseline", "mode", "bias", "variance", "stderr"],
            )
        )
    )


def load_state(ckpt_path: Path) -> dict[str, Any]:
    return load_checkpoint(ckpt_path)


def mujoco_draws(ckpt_path: Path, draws: int, seed: int, progress: bool = True) -> dict[str, Any]:
    """From one training state: ``draws`` independent (tau_k, tau_{k+1}) and both estimates.

    Every draw starts from the checkpoint's theta_k, eta, critics, optimizer state and
    normalisers, with its own env and action-noise seed; it runs the real policy round with
    the exact total's unroll (:func:`start_meta_gradient`), collects the validation batch with
    theta_{k+1}, and finishes with the score term ``grad_eta log p(tau_k)`` (weight 1), from
    which the sampling-aware estimate ``total + w grad log p`` is formed for the trainer's
    :func:`score_weight` ``w`` with the baseline ``b`` = the checkpoint's mean return of the last
    20 episodes (fixed before sampling) and with ``b = 0``.
    """
    ckpt = load_state(ckpt_path)
    from metagrad_rl import config as C

    cfg = C.from_dict(CLNConfig, ckpt["config"])
    obs_dim, act_dim = env_dims(cfg.env)
    policy, reward = nets_for(cfg, obs_dim, act_dim)
    problem, tx = build_problem(cfg, policy, reward), policy_optimizer(cfg)
    theta, eta = ckpt["theta"], ckpt["eta"]
    v_mix, v_ex = Critic(obs_dim, cfg.hidden), Critic(obs_dim, cfg.hidden)
    crit = ckpt["critics"]
    theta_state = optimizer_state_from_list(tx.init(theta), ckpt["theta_state"])
    cond = cln_condition(eta).detach()
    baseline = float(np.mean(ckpt["recent_returns"])) if ckpt["recent_returns"] else 0.0
    plain, glp, w_b, w_0, j_hat = [], [], [], [], []
    mb_size = cfg.batch_size // cfg.num_minibatches
    for m in tqdm(range(draws), desc="bias: Hopper draws", disable=not progress):
        col = collector_for(cfg, seed=50_000 + 97 * m + seed)
        col.obs_norm.load_state_dict(ckpt["collector"]["obs_norm"])
        col.rew_scaler.load_state_dict(ckpt["collector"]["rew_scaler"])
        col.obs = col.obs_norm(col.envs.reset(), update=False)
        ro = collect_rollout(col, policy, theta, v_mix, crit["v_mix"], cfg.num_steps, cond)
        gen = torch.Generator().manual_seed(seed * 1000 + m)
        mbs = [
            idx
            for _ in range(cfg.update_epochs)
            for idx in torch.randperm(cfg.batch_size, generator=gen).split(mb_size)
        ]
        rb = round_batch(ro.batch, ro.batch.values, ro.batch.next_values)
        pending = start_meta_gradient(
            problem,
            tx,
            theta,
            eta,
            [Round(rb, mbs)],
            opt_state=theta_state,
            surrogate=cfg.surrogate,
            terms=False,
        )
        val = collect_rollout(
            col, policy, pending.theta_next, v_mix, crit["v_mix"], cfg.num_steps, cond
        )
        b = val.batch
        with torch.no_grad():
            adv = gae(
                b.r_ex,
                critic_values(v_ex, crit["v_ex"], b.obs),
                critic_values(v_ex, crit["v_ex"], b.next_obs),
                b.terminated,
                b.episode_end,
                cfg.gamma,
                cfg.gae_lambda,
            )
        outer = {
            "obs": b.obs.reshape(-1, obs_dim),
            "act": b.act.reshape(-1, act_dim),
            "adv_ex": adv.reshape(-1),
        }
        res = pending.finish(outer, denominator=cfg.denominator, score_weight=1.0)
        scale = bilevel.reward_scale(col)
        w = score_weight(val.episodes, baseline, scale, adv)
        w0 = score_weight(val.episodes, 0.0, scale, adv)
        col.envs.close()
        plain.append(flatten(res.total))
        glp.append(flatten(res.score))
        w_b.append(0.0 if w is None else w)
        w_0.append(0.0 if w0 is None else w0)
        j_hat.append(float(np.mean(val.episodes.returns)) if val.episodes.returns else float("nan"))
    P, L = torch.stack(plain), torch.stack(glp)
    ests = {
        "plain (exact total)": P,
        "sampling-aware, b = J(theta_k)": P + torch.tensor(w_b)[:, None] * L,
        "sampling-aware, b = 0": P + torch.tensor(w_0)[:, None] * L,
    }
    rows = variance_rows(ests)
    return {
        "rows": rows,
        "draws": draws,
        "baseline": baseline,
        "env": cfg.env,
        "checkpoint_step": int(ckpt["global_step"]),
        "j_hat": j_hat,
        "w_b": w_b,
        "w_0": w_0,
        "norm_grad_log_p": [float(x.norm()) for x in L],
    }


def variance_rows(ests: Mapping[str, Tensor]) -> list[Row]:
    """Total variance, norms and the cosine of each mean with the plain mean."""
    ref = next(iter(ests.values())).mean(0)
    rows = []
    for name, g in ests.items():
        mean = g.mean(0)
        var = float(g.var(0, unbiased=True).sum())
        rows.append(
            {
                "estimator": name,
                "total_variance": var,
                "norm_of_mean": float(mean.norm()),
                "mean_norm": float(g.norm(dim=1).mean()),
                "variance_rel": var / float(mean.norm()) ** 2,
                "stderr_of_mean_rel": math.sqrt(var / g.shape[0]) / float(mean.norm()),
                "cos_mean_with_plain_mean": cos(mean, ref),
            }
        )
    return rows


def mujoco_table(res: Mapping[str, Any]) -> str:
    body = [
        [
            r["estimator"],
            r["total_variance"],
            r["norm_of_mean"],
            r["mean_norm"],
            r["variance_rel"],
            r["stderr_of_mean_rel"],
            r["cos_mean_with_plain_mean"],
        ]
        for r in res["rows"]
    ]
    head = (
        f"{res['env']}, {res['draws']} independent draws from the state at step "
        f"{res['checkpoint_step']} (baseline b = {res['baseline']:.1f}):\n"
    )
    return head + markdown(
        body,
        [
            "estimator",
            "tr Cov",
            "|mean|",
            "mean |g|",
            "tr Cov / |mean|^2",
            "stderr of mean / |mean|",
            "cos(mean, plain mean)",
        ],
    )


# =================================================================================================
# Main
# =================================================================================================
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Accuracy, cost, learning and bias/variance of the meta-gradient terms "
        "(issues 4 and 5). Prints tables; writes CSV/JSON and PNGs under --out.",
    )
    p.add_argument("--out", default="bench_out/compare_terms", help="output directory")
    p.add_argument("--full", action="store_true", help="the long version (hours with learning)")
    p.add_argument("--seed", type=int, default=1, help="seed of the CLN run, data and draws")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    p.add_argument(
        "--runs",
        default="runs/learning",
        help="learning_runs.sh output read by the learning section",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory probes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-rounds", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--probe-explicit-steps", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        row = probe_main(
            args.probe, args.probe_steps, args.probe_rounds, args.seed, args.probe_explicit_steps
        )
        print(json.dumps(row))
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}: expected a subset of {list(SECTIONS)}")
    budget = FULL if args.full else SMALL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    if "accuracy" in sections:
        t0 = time.perf_counter()
        rows = run_accuracy(
            out / "accuracy",
            total_steps=budget.acc_steps,
            checkpoints=budget.acc_checkpoints,
            seed=args.seed,
            progress=progress,
        )
        write_rows(
            out,
            "accuracy",
            rows,
            {
                "env": "Hopper-v5",
                "meta_grad": "eq17",
                "total_steps": budget.acc_steps,
                "seed": args.seed,
            },
        )
        if rows:
            plot_accuracy(rows, out / "accuracy.png")
        print("\n## Accuracy (CLN on Hopper-v5, every term on the trainer's stored batches)\n")
        print(accuracy_tables(rows))
        timings["accuracy"] = time.perf_counter() - t0

    if "cost" in sections:
        t0 = time.perf_counter()
        res = run_cost(
            out,
            reps=budget.cost_reps,
            explicit_steps=budget.explicit_steps,
            scaling=budget.scaling,
            seed=args.seed,
            memory=not args.no_memory,
            progress=progress,
        )
        write_rows(
            out, "cost", res["estimators"], {k: v for k, v in res.items() if k != "estimators"}
        )
        write_rows(out, "cost_growth", res["growth"])
        plot_cost(res, out / "cost_growth.png")
        print("\n## Cost (Hopper-v5-sized networks, batch 2048, 10 x 32 minibatches, 1 thread)\n")
        print(cost_tables(res))
        timings["cost"] = time.perf_counter() - t0

    if "learning" in sections:
        t0 = time.perf_counter()
        res = run_learning(out, Path(args.runs), full=args.full, budget=budget, progress=progress)
        write_rows(out, "learning", res["rows"], {k: v for k, v in res.items() if k != "rows"})
        print("\n## Learning curves\n")
        print(learning_tables(res))
        print("plots: " + ", ".join(res["plots"].values()))
        timings["learning"] = time.perf_counter() - t0

    if "bias" in sections:
        t0 = time.perf_counter()
        tab = run_tabular(budget.tabular_batch_sizes)
        write_rows(out, "bias_tabular", tab)
        print("\n## Bias and variance\n")
        print(tabular_table(tab))
        ckpt = out / "accuracy" / "run" / CHECKPOINT_FILE
        if not ckpt.is_file():  # the accuracy section did not run: train the state to sample from
            run_accuracy(
                out / "accuracy",
                total_steps=budget.acc_steps,
                checkpoints=0,
                seed=args.seed,
                progress=progress,
            )
        mj = mujoco_draws(ckpt, budget.mujoco_draws, args.seed, progress)
        write_rows(out, "bias_mujoco", mj["rows"], {k: v for k, v in mj.items() if k != "rows"})
        print()
        print(mujoco_table(mj))
        timings["bias"] = time.perf_counter() - t0

    timings["total"] = time.perf_counter() - t_all
    atomic_write_json(
        out / "timings.json", {"sections": sections, "full": args.full, "seconds": timings}
    )
    print("\nwall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
