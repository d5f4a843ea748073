"""Section ``cost``: time and memory of each computation on Hopper-v5-sized networks."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchopt
from torch import Tensor
from tqdm import tqdm

from metagrad_rl.explicit import explicit_sgd_terms, mixed_second_order_product
from metagrad_rl.metagrad import (
    eq17_gradient,
    meta_gradient,
)
from metagrad_rl.networks import (
    Critic,
    cln_condition,
    params_of,
)
from metagrad_rl.rollout import policy_outputs
from metagrad_rl.trainers.bilevel import (
    CLNConfig,
    build_problem,
    policy_optimizer,
)
from metagrad_rl.trainers.common import (
    FlatParams,
    Minibatch,
    PPOCoefs,
    make_optimizer,
    ppo_update,
)
from metagrad_rl.unroll import EtaPaths, InnerSurrogate, Round, minibatch_indices, unroll
from termbench.common import ENTRY_POINT, SMALL, Row, markdown, nets_for
from termbench.plots import legend_outside, pyplot, save_png

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
        str(ENTRY_POINT),
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
    rows = [estimator_row(name, times, mem.get(name, {})) for name in times]
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
    grow = [
        growth_row(steps, rounds, min(reps, 3), seed, memory, explicit_steps)
        for steps, rounds in tqdm(scaling, desc="cost: growth", disable=not progress)
    ]
    return {
        "estimators": rows,
        "eq12": eq12_rows,
        "growth": grow,
        "targets": cost_targets(rows, eq12_rows),
        "reps": reps,
        "torch_threads": 1,
        "torch": torch.__version__,
    }


def estimator_row(name: str, times: dict[str, list[float]], mem: dict[str, Any]) -> Row:
    """One estimator's median time, its ratios to the plain round and the exact total, and
    its memory (NaN when not probed)."""
    return {
        "name": name,
        "median_s": float(np.median(times[name])),
        "ratio_to_plain_round": ratio_median(times, name, "plain_round"),
        "ratio_to_exact_total": ratio_median(times, name, "exact_total"),
        "rss_peak_delta_mib": mem.get("rss_peak_delta_bytes", float("nan")) / 2**20,
        "graph_mib": mem.get("graph_bytes", float("nan")) / 2**20,
        "times_s": times[name],
    }


def growth_row(
    steps: int, rounds: int, reps: int, seed: int, memory: bool, explicit_steps: int
) -> Row:
    """The exact total against a plain round at ``steps`` inner steps per round, ``rounds``
    rounds (time, and memory from a subprocess probe)."""
    g = CostSetup(seed, steps, rounds)
    t = interleaved_times(
        {"plain": g.plain_round, "exact_total": g.exact_total},
        reps,
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
    return row


def cost_targets(rows: Sequence[Row], eq12_rows: Sequence[Row]) -> list[Row]:
    """The section's four targets, each named by what it measures."""
    by = {r["name"]: r for r in rows}
    p12 = {r["name"]: r for r in eq12_rows}
    strict_grad = min(p12["grad_autograd"]["median_s"], p12["grad_func"]["median_s"])
    return [
        target(
            "time of the Eq 11-14 split / time of the exact total",
            by["four_terms"]["ratio_to_exact_total"],
            1.2,
            "x",
        ),
        target(
            "time of the exact total / time of a plain policy round",
            by["exact_total"]["ratio_to_plain_round"],
            3.0,
            "x",
        ),
        target(
            "peak memory of the exact total over one round",
            by["exact_total"]["rss_peak_delta_mib"] / 1024,
            1.0,
            " GiB",
        ),
        target(
            "time of the Eq 12 product / time of one inner-loss gradient (the faster one)",
            p12["eq12_product"]["median_s"] / strict_grad,
            1.6,
            "x",
            cause=EQ12_MISS_CAUSE,
        ),
    ]


#: Why the Eq 12 product misses its target (docs/results.md, "The Eq 12 miss").
EQ12_MISS_CAUSE = (
    "the product is a double backward through the policy network, which costs more than 1.6 "
    "gradients on 64-sample minibatches of small tensors; the engine's meta-gradient does not "
    "call it (its Eq 12 comes from the one backward pass through the unroll, see "
    "docs/results.md)"
)


def target(name: str, value: float, limit: float, unit: str = "", cause: str = "") -> Row:
    """A measured value against its limit: PASS, or MISS with one line saying by how much
    and, where it is known, why (``cause``)."""
    ok = value <= limit
    margin = f"{(value / limit - 1) * 100:+.0f}% of the limit"
    reason = "" if ok else f"{name} is {value:.3g}{unit}, above the limit {limit:.3g}{unit}"
    if reason and cause:
        reason += f": {cause}"
    return {
        "target": name,
        "measured": value,
        "limit": limit,
        "verdict": "PASS" if ok else "MISS",
        "margin": margin,
        "why": reason,
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
    why = [f"- MISS: {t['why']}" for t in res["targets"] if t["verdict"] == "MISS"]
    parts.append(
        "Targets (each measured value against its limit; PASS when at or below it):\n"
        + markdown(tg, ["target", "measured", "limit", "verdict", "margin"])
        + ("\n" + "\n".join(why) if why else "")
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
        legend_outside(ax)
    return save_png(fig, path)
