"""Section ``bias``: bias and variance on the tabular test bed, then on Hopper-v5."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from metagrad_rl.advantages import gae
from metagrad_rl.checkpoint import load_checkpoint
from metagrad_rl.metagrad import start_meta_gradient
from metagrad_rl.networks import (
    Critic,
    cln_condition,
)
from metagrad_rl.pytree import flatten
from metagrad_rl.rollout import collect_rollout, critic_values
from metagrad_rl.trainers import bilevel
from metagrad_rl.trainers.bilevel import (
    CLNConfig,
    build_problem,
    policy_optimizer,
    round_batch,
    round_schedule,
    score_weight,
)
from metagrad_rl.trainers.common import (
    collector_for,
    optimizer_state_from_list,
)
from metagrad_rl.unroll import Round
from termbench.common import Row, cos, env_dims, markdown, nets_for


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
        "variance tr Cov / |grad M|^2; stderr: the Monte Carlo standard error, 0 when exact).\n"
        "cond. = the policy is conditioned on eta (CLN); K = inner rounds unrolled; "
        "B = trajectories per batch; estimator: plain (autograd through the unroll, batches held "
        "fixed), sampling-aware or dice; baseline: what the score term subtracts from the "
        "return; mode: exact expectations over every batch, or a Monte Carlo mean of draws.\n"
        + (
            markdown(
                body,
                ["cond.", "K", "B", "estimator", "baseline", "mode", "bias", "variance", "stderr"],
            )
        )
    )


def load_state(ckpt_path: Path) -> dict[str, Any]:
    return load_checkpoint(ckpt_path)


class DrawSetup(NamedTuple):
    """What every draw of :func:`mujoco_draws` starts from (one training state)."""

    cfg: CLNConfig
    policy: Any
    problem: Any
    tx: Any
    theta: Any
    eta: Any
    critics: Any
    v_mix: Critic
    v_ex: Critic
    theta_state: Any
    cond: Tensor
    normalisers: dict[str, Any]
    baseline: float


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
    setup = draw_setup(ckpt)
    out = [
        one_draw(setup, 50_000 + 97 * m + seed, seed * 1000 + m)
        for m in tqdm(range(draws), desc="bias: Hopper draws", disable=not progress)
    ]
    P, L = torch.stack([d["total"] for d in out]), torch.stack([d["score"] for d in out])
    w_b, w_0 = [d["w_b"] for d in out], [d["w_0"] for d in out]
    ests = {
        "plain (exact total)": P,
        "sampling-aware, b = J(theta_k)": P + torch.tensor(w_b)[:, None] * L,
        "sampling-aware, b = 0": P + torch.tensor(w_0)[:, None] * L,
    }
    return {
        "rows": variance_rows(ests),
        "draws": draws,
        "baseline": setup.baseline,
        "env": setup.cfg.env,
        "checkpoint_step": int(ckpt["global_step"]),
        "j_hat": [d["j_hat"] for d in out],
        "w_b": w_b,
        "w_0": w_0,
        "norm_grad_log_p": [float(x.norm()) for x in L],
    }


def draw_setup(ckpt: dict[str, Any]) -> DrawSetup:
    """Networks, problem, optimizer and state of a CLN checkpoint, ready for draws."""
    from metagrad_rl import config as C

    cfg = C.from_dict(CLNConfig, ckpt["config"])
    obs_dim, act_dim = env_dims(cfg.env)
    policy, reward = nets_for(cfg, obs_dim, act_dim)
    tx = policy_optimizer(cfg)
    recent = ckpt["recent_returns"]
    return DrawSetup(
        cfg=cfg,
        policy=policy,
        problem=build_problem(cfg, policy, reward),
        tx=tx,
        theta=ckpt["theta"],
        eta=ckpt["eta"],
        critics=ckpt["critics"],
        v_mix=Critic(obs_dim, cfg.hidden),
        v_ex=Critic(obs_dim, cfg.hidden),
        theta_state=optimizer_state_from_list(tx.init(ckpt["theta"]), ckpt["theta_state"]),
        cond=cln_condition(ckpt["eta"]).detach(),
        normalisers=ckpt["collector"],
        baseline=float(np.mean(recent)) if recent else 0.0,
    )


def one_draw(s: DrawSetup, env_seed: int, order_seed: int) -> dict[str, Any]:
    """One (tau_k, tau_{k+1}) from the checkpoint: the exact total, the score term and the
    trainer's score weights (with the baseline and with 0)."""
    cfg, crit = s.cfg, s.critics
    col = collector_for(cfg, seed=env_seed)
    col.obs_norm.load_state_dict(s.normalisers["obs_norm"])
    col.rew_scaler.load_state_dict(s.normalisers["rew_scaler"])
    col.obs = col.obs_norm(col.envs.reset(), update=False)
    ro = collect_rollout(col, s.policy, s.theta, s.v_mix, crit["v_mix"], cfg.num_steps, s.cond)
    mbs = round_schedule(cfg, torch.Generator().manual_seed(order_seed))  # the trainer's
    rb = round_batch(ro.batch, ro.batch.values, ro.batch.next_values)
    pending = start_meta_gradient(
        s.problem,
        s.tx,
        s.theta,
        s.eta,
        [Round(rb, mbs)],
        opt_state=s.theta_state,
        surrogate=cfg.surrogate,
        terms=False,
    )
    val = collect_rollout(
        col, s.policy, pending.theta_next, s.v_mix, crit["v_mix"], cfg.num_steps, s.cond
    )
    b = val.batch
    with torch.no_grad():
        adv = gae(
            b.r_ex,
            critic_values(s.v_ex, crit["v_ex"], b.obs),
            critic_values(s.v_ex, crit["v_ex"], b.next_obs),
            b.terminated,
            b.episode_end,
            cfg.gamma,
            cfg.gae_lambda,
        )
    outer = {
        "obs": b.obs.reshape(-1, b.obs.shape[-1]),
        "act": b.act.reshape(-1, b.act.shape[-1]),
        "adv_ex": adv.reshape(-1),
    }
    res = pending.finish(outer, denominator=cfg.denominator, score_weight=1.0)
    scale = bilevel.reward_scale(col)
    w = score_weight(val.episodes, s.baseline, scale, adv)
    w0 = score_weight(val.episodes, 0.0, scale, adv)
    col.envs.close()
    returns = val.episodes.returns
    return {
        "total": flatten(res.total),
        "score": flatten(res.score),
        "w_b": 0.0 if w is None else w,
        "w_0": 0.0 if w0 is None else w0,
        "j_hat": float(np.mean(returns)) if returns else float("nan"),
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
