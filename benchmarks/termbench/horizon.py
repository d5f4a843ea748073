"""Sections ``horizon`` and ``horizon-science``: the exact meta-gradient through R rounds.

``horizon`` (cost): on the trainer's own stored Hopper-v5 CLN rounds (320 clipped-Adam steps
each, 73k policy parameters), the full Eq 11-14 split through the last R = 1, 2, 3, 5, 10
rounds by the stored graph and by the checkpointed reverse pass
(``checkpoint_every="auto"``), side by side in one run: peak memory above the process's
baseline (each computation in a fresh subprocess), wall time, the memory guard's estimates,
and the largest relative difference between the two results (the same number).

``horizon-science``: at three meta-steps of a 100k-step CLN run, R = 1..10 stored rounds
re-simulated at the current ``eta`` (the rounds before the last ran with older ``eta``): the
norm of the total and of each term, Eq 14's share, the cosine of the R-round total with the
(R-1)-round one, and the cosines of Eq 13, Eq 17, ``truncated-k32`` and the one-round total
with the R-round total; the per-round growth factor of ``|total|``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from metagrad_rl.checkpoint import save_checkpoint
from metagrad_rl.memory import estimate_unroll_bytes
from metagrad_rl.metagrad import eq17_gradient, meta_gradient
from metagrad_rl.pytree import TERMS, flatten
from metagrad_rl.rundir import clear_run_dir
from metagrad_rl.trainers import bilevel
from metagrad_rl.trainers.bilevel import CLNConfig, build_problem, policy_optimizer
from metagrad_rl.trainers.common import optimizer_state_from_list
from metagrad_rl.unroll import InnerSurrogate, Round
from termbench.common import ENTRY_POINT, Row, cos, env_dims, markdown, nets_for
from termbench.cost_memory import peak_rss_bytes
from termbench.plots import legend_outside, pyplot, save_png, styles

ROUNDS = (1, 2, 3, 5, 10)
MODES = ("stored", "checkpointed")
#: What each probe mode passes to ``meta_gradient`` ("forward": the checkpointed pass with
#: forward-over-reverse Hessian products, section ``mixed-mode``).
MODE_KW: dict[str, dict[str, Any]] = {
    "stored": dict(checkpoint_every=None),
    "checkpointed": dict(checkpoint_every="auto"),
    "forward": dict(checkpoint_every="auto", second_order="forward"),
}
GIB = 1024**3


def _config(seed: int, total_steps: int) -> CLNConfig:
    # the run is the first part of one 5x longer, so the annealed step size stays near --lr
    return CLNConfig(
        env="Hopper-v5", meta_grad="eq17", seed=seed, total_steps=5 * total_steps,
        checkpoint_every=0,
    )  # fmt: skip


def record_rounds(
    out: Path, *, seed: int = 1, total_steps: int = 24_576, picks: Sequence[int] = (),
    window: int = 10, progress: bool = True,
) -> list[Path]:  # fmt: skip
    """Trains CLN (eq17) on Hopper-v5 and saves, at each meta-step in ``picks`` (default: the
    last), the last ``window`` stored rounds with that step's validation batch and theta_{k+1}.

    Each file holds ``rounds`` (theta_k, optimizer state, batch, minibatches per round, oldest
    first), ``eta`` (the current one), ``outer`` and ``theta_next``: what the trainer had.
    """
    cfg = _config(seed, total_steps)
    iterations = total_steps // cfg.batch_size
    picks = list(picks) or [iterations - 2]
    keep: list[Any] = []
    paths: list[Path] = []
    bar = tqdm(total=iterations, desc="horizon: CLN run", disable=not progress)

    def on_meta_step(step: Any) -> None:
        keep.append(step)
        del keep[:-window]
        i = seen["steps"]
        seen["steps"] += 1
        if i in picks and len(keep) >= window:
            path = out / f"rounds_meta{i}.pt"
            r = [s.round for s in keep]
            blob = {
                "rounds": [
                    {
                        "theta": x.theta,
                        "opt_state": x.opt_state,
                        "batch": x.batch,
                        "minibatches": x.minibatches,
                        "schedule": x.schedule,
                    }
                    for x in r
                ],  # fmt: skip
                "eta": step.round.eta,
                "outer": step.outer,
                "theta_next": step.theta_next,
                "meta_step": i,
                "env_steps": (i + 2) * cfg.batch_size,
                "seed": seed,
                "total_steps": total_steps,
            }
            save_checkpoint(path, blob)
            paths.append(path)

    seen = {"steps": 0}
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
    return paths


class Stored:
    """A file of :func:`record_rounds` with the trainer's problem and inner optimizer."""

    def __init__(self, path: Path) -> None:
        blob = torch.load(path, weights_only=True)
        self.blob = blob
        self.cfg = _config(blob["seed"], blob["total_steps"])
        obs_dim, act_dim = env_dims(self.cfg.env)
        policy, reward = nets_for(self.cfg, obs_dim, act_dim)
        self.problem = build_problem(self.cfg, policy, reward)
        self.tx = policy_optimizer(self.cfg)
        self.eta, self.outer = blob["eta"], blob["outer"]

    def last(self, n_rounds: int) -> tuple[dict, Any, list[Round]]:
        recs = self.blob["rounds"][-n_rounds:]
        state = optimizer_state_from_list(self.tx.init(recs[0]["theta"]), recs[0]["opt_state"])
        rounds = [Round(r["batch"], r["minibatches"]) for r in recs]
        return recs[0]["theta"], state, rounds

    def meta_gradient(self, n_rounds: int, **kw: Any) -> Any:
        theta, state, rounds = self.last(n_rounds)
        return meta_gradient(
            self.problem, self.tx, theta, self.eta, rounds, self.outer, opt_state=state,
            surrogate=self.cfg.surrogate, denominator=self.cfg.denominator, **kw,
        )  # fmt: skip


# ---------------------------------------------------------------------------- cost (memory, time)
def probe_main(path: str, n_rounds: int, mode: str, out: str) -> Row:
    """In a fresh subprocess: one computation's wall time and peak RSS above the baseline."""
    torch.set_num_threads(1)
    s = Stored(Path(path))
    _warm_up(s)  # one-time costs (libraries, thread pools, allocator) outside the measurement
    base = peak_rss_bytes()
    t0 = time.perf_counter()
    res = s.meta_gradient(n_rounds, memory_budget_bytes=64 * GIB, **MODE_KW[mode])
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    torch.save({n: getattr(res, n) for n in (*TERMS, "total")}, out)
    return {"R": n_rounds, "mode": mode, "wall_s": wall, "rss_base_bytes": base,
            "rss_peak_delta_bytes": peak - base}  # fmt: skip


def _warm_up(s: Stored) -> None:
    theta, state, rounds = s.last(1)
    short = [Round(rounds[0].batch, list(rounds[0].minibatches)[:2])]
    for kw in MODE_KW.values():
        meta_gradient(s.problem, s.tx, theta, s.eta, short, s.outer, opt_state=state, **kw)


def run_probe(path: Path, n_rounds: int, mode: str, tmp: Path) -> Row:
    res_file = tmp / f"res_R{n_rounds}_{mode}.pt"
    cmd = [sys.executable, str(ENTRY_POINT), "--probe-horizon", str(path), "--probe-rounds",
           str(n_rounds), "--probe-mode", mode, "--probe-out", str(res_file)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"horizon probe R={n_rounds} {mode} failed:\n{p.stderr[-2000:]}")
    row = json.loads(p.stdout.strip().splitlines()[-1])
    row["result"] = torch.load(res_file, weights_only=True)
    res_file.unlink()
    return row


def run_horizon(
    out: Path, *, seed: int = 1, rounds: Sequence[int] = ROUNDS, progress: bool = True
) -> list[Row]:
    """Stored against checkpointed, side by side at each R (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    (path,) = record_rounds(out, seed=seed, window=max(rounds), progress=progress)
    s = Stored(path)
    rows = []
    for r in tqdm(rounds, desc="horizon: R", disable=not progress):
        got = {m: run_probe(path, r, m, out) for m in MODES}
        theta, state, rnds = s.last(r)
        est = estimate_unroll_bytes(
            s.problem, s.tx, theta, s.eta, rnds, state, InnerSurrogate(s.cfg.surrogate)
        )
        a, b = got["stored"]["result"], got["checkpointed"]["result"]
        rel = max(
            float((flatten(a[n]) - flatten(b[n])).norm()) / max(float(flatten(a[n]).norm()), 1e-30)
            for n in ("total", *TERMS) if float(flatten(a[n]).norm()) > 0
        )  # fmt: skip
        rows.append({
            "R": r,
            "inner_steps": sum(len(x.minibatches) for x in rnds),
            "k": est["k"],
            "stored_mib": got["stored"]["rss_peak_delta_bytes"] / 2**20,
            "checkpointed_mib": got["checkpointed"]["rss_peak_delta_bytes"] / 2**20,
            "stored_s": got["stored"]["wall_s"],
            "checkpointed_s": got["checkpointed"]["wall_s"],
            "time_ratio": got["checkpointed"]["wall_s"] / got["stored"]["wall_s"],
            "estimate_stored_mib": est["stored"] / 2**20,
            "estimate_checkpointed_mib": est["checkpointed"] / 2**20,
            "baseline_mib": got["checkpointed"]["rss_base_bytes"] / 2**20,
            "max_rel_diff": rel,
            "norm_total": float(flatten(a["total"]).norm()),
        })  # fmt: skip
    return rows


def horizon_targets(rows: Sequence[Row]) -> list[list[Any]]:
    by = {r["R"]: r for r in rows}
    out = []
    if 10 in by:
        out.append(["R = 10 checkpointed, MiB above baseline", by[10]["checkpointed_mib"], 512])
    if 1 in by:
        out.append(["R = 1 checkpointed, MiB above baseline", by[1]["checkpointed_mib"], 150])
    out += [[f"time checkpointed / stored at R = {r['R']}", r["time_ratio"], 1.6] for r in rows]
    return [[n, v, lim, "PASS" if v <= lim else "MISS"] for n, v, lim in out]


def horizon_tables(rows: Sequence[Row]) -> str:
    header = ["R", "inner steps", "k", "stored MiB", "checkpointed MiB", "stored s",
              "checkpointed s", "time ratio", "guard est. stored / ckpt MiB",
              "max rel diff"]  # fmt: skip
    body = [
        [r["R"], r["inner_steps"], r["k"], r["stored_mib"], r["checkpointed_mib"], r["stored_s"],
         r["checkpointed_s"], r["time_ratio"],
         f"{r['estimate_stored_mib']:.0f} / {r['estimate_checkpointed_mib']:.0f}",
         f"{r['max_rel_diff']:.1e}"]
        for r in rows
    ]  # fmt: skip
    text = (
        "Peak RSS above the process baseline (fresh subprocess each), wall time, the memory "
        "guard's estimates, and the largest relative difference of any term between the two "
        "modes:\n" + markdown(body, header)
    )
    return (
        text + "\n\nTargets:\n" + markdown(horizon_targets(rows), ["target", "value", "limit", ""])
    )


def plot_horizon(rows: Sequence[Row], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["R"] for r in rows]
    for mode, c in (("stored", "tab:red"), ("checkpointed", "tab:blue")):
        axes[0].plot(x, [r[f"{mode}_mib"] for r in rows], "o-", color=c, label=mode)
        axes[1].plot(x, [r[f"{mode}_s"] for r in rows], "o-", color=c, label=mode)
    axes[0].set_ylabel("peak memory above baseline (MiB)")
    axes[1].set_ylabel("wall time (s)")
    axes[0].set_title("exact Eq 11-14 through R Hopper-v5 rounds")
    axes[1].set_title("time (one thread)")
    for ax in axes:
        ax.set_xlabel("rounds R (320 inner steps each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, path)


# ---------------------------------------------------------------------------- science
def science_rows(path: Path, max_rounds: int = 10, progress: bool = True) -> list[Row]:
    """R = 1..max_rounds at one stored meta-step (checkpointed pass throughout)."""
    s = Stored(path)
    b = s.blob
    theta_k = b["rounds"][-1]["theta"]
    den = theta_k if s.cfg.denominator == "theta_k" else b["theta_next"]
    g17 = flatten(eq17_gradient(s.problem, b["theta_next"], s.eta, s.outer, den, s.eta))
    one = s.meta_gradient(1, checkpoint_every="auto")
    k32 = flatten(s.meta_gradient(1, checkpoint_every="auto", truncate=32).total)
    total1, eq13_1 = flatten(one.total), flatten(one.eq13)
    rows, prev = [], None
    for r in tqdm(range(1, max_rounds + 1), desc="science: R", disable=not progress):
        res = one if r == 1 else s.meta_gradient(r, checkpoint_every="auto")
        t = {n: flatten(getattr(res, n)) for n in (*TERMS, "total")}
        tn = float(t["total"].norm())
        row: Row = {"meta_step": b["meta_step"], "env_steps": b["env_steps"], "R": r,
                    "norm_total": tn}  # fmt: skip
        for n in TERMS:
            row[f"norm_{n}"] = float(t[n].norm())
        row["share_eq14"] = row["norm_eq14"] / tn if tn else math.nan
        row["cos_prev_total"] = cos(t["total"], prev) if prev is not None else math.nan
        for name, g in (("eq13", eq13_1), ("eq17", g17), ("truncated-k32", k32),
                        ("total-R1", total1)):  # fmt: skip
            row[f"cos_{name}"] = cos(g, t["total"])
        rows.append(row)
        prev = t["total"]
    return rows


def growth_factor(rows: Sequence[Row]) -> float:
    """``exp`` of the least-squares slope of ``log |total|`` against R (per-round factor)."""
    x = np.array([r["R"] for r in rows], dtype=float)
    y = np.log([r["norm_total"] for r in rows])
    return float(np.exp(np.polyfit(x, y, 1)[0]))


def run_science(
    out: Path, *, seed: int = 1, total_steps: int = 100_352, picks: Sequence[int] = (12, 30, 46),
    max_rounds: int = 10, progress: bool = True,
) -> list[Row]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    paths = record_rounds(
        out, seed=seed, total_steps=total_steps, picks=picks, window=max_rounds, progress=progress
    )
    rows: list[Row] = []
    for p in paths:
        sub = science_rows(p, max_rounds, progress)
        g = growth_factor(sub)
        rows += [{**r, "growth_factor": g} for r in sub]
    return rows


def science_tables(rows: Sequence[Row]) -> str:
    header = ["meta-step", "R", "|total|", "|Eq 11|", "|Eq 12|", "|Eq 13|", "|Eq 14|",
              "Eq 14 share", "cos(total_R, total_R-1)", "cos Eq 13", "cos Eq 17",
              "cos k32", "cos total R=1"]  # fmt: skip
    body = [
        [r["meta_step"], r["R"], r["norm_total"], r["norm_eq11"], r["norm_eq12"], r["norm_eq13"],
         r["norm_eq14"], r["share_eq14"], r["cos_prev_total"], r["cos_eq13"], r["cos_eq17"],
         r["cos_truncated-k32"], r["cos_total-R1"]]
        for r in rows
    ]  # fmt: skip
    growth = sorted({(r["meta_step"], r["growth_factor"]) for r in rows})
    g = ", ".join(f"meta-step {m}: {f:.3g}" for m, f in growth)
    return markdown(body, header) + f"\n\nPer-round growth factor of |total| (fit): {g}"


def plot_science(rows: Sequence[Row], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    style = styles()  # the line style is the meta-step
    for i, m in enumerate(sorted({r["meta_step"] for r in rows})):
        sub = [r for r in rows if r["meta_step"] == m]
        x = [r["R"] for r in sub]
        ls = ("-", "--", ":")[i % 3]
        axes[0].semilogy(x, [r["norm_total"] for r in sub], ls, marker="o", color="k",
                         label=f"total, meta-step {m}")  # fmt: skip
        axes[0].semilogy(x, [r["norm_eq14"] or math.nan for r in sub], ls, marker=".",
                         color=style.color("eq14"), label=f"Eq 14, meta-step {m}")  # fmt: skip
        for name in ("eq13", "eq17", "truncated-k32", "total-R1"):
            axes[1].plot(x, [r[f"cos_{name}"] for r in sub], ls, marker="o",
                         color=style.color(name), label=f"{name}, meta-step {m}")  # fmt: skip
    axes[0].set_ylabel("norm of dL_out/deta")
    axes[1].set_ylabel("cosine with the R-round total")
    axes[1].axhline(0, color="k", lw=0.5)
    for ax in axes:
        ax.set_xlabel("rounds R re-simulated at the current eta")
        ax.grid(alpha=0.3)
        legend_outside(ax, fontsize=7)
    return save_png(fig, path)
