"""Bilevel trainers: CLN (Stadie, Zhang, Ba 2020) and LIRPG (Zheng et al. 2018) on MuJoCo.

Per iteration, reading like the paper's algorithm (Section 3.3)::

    ROLLOUT        tau_k ~ pi_{theta_k, eta_i}
    VALIDATION     (Eq 24) finish the meta-gradient of the previous policy round on tau_k
                   and step eta_i -> eta_{i+1} with the chosen estimator
    POLICY ROUND   (Eq 23) PPO-clip on the intrinsic (mixed) advantages of tau_k with eta_{i+1}:
                   theta_k -> theta_{k+1}; differentiable when the estimator needs it
    CRITICS        V_mix (mixed returns) and V_ex (extrinsic returns) regress on tau_k

Estimators (``--meta-grad``), all gradients of ``L_out = -J_ex`` (see ``docs/equations.md``):

- ``eq17``: the CLN best-response gradient at ``theta_{k+1}``, no unroll (the paper's
  "1-term", its default);
- ``lirpg``: Eq 13 alone, through a ``lookahead_steps``-step look-ahead on the whole batch
  (LIRPG's one-step look-ahead);
- ``three-term``: Eq 17 + Eq 12 + Eq 13 (Eq 12/13 through the same look-ahead; the paper's
  "3-term");
- ``exact``: the total derivative through the real policy round (every epoch and minibatch)
  by :func:`~metagrad_rl.metagrad.start_meta_gradient`; ``theta_{k+1}`` *is* that unroll's
  output, so the applied gradient is exactly the derivative of what the trainer did.
- ``sampling-aware``: ``exact`` plus the score-function term
  ``stopgrad(J_hat - b) grad_eta log p(tau_k; theta_k, eta)`` that accounts for ``tau_k``
  being sampled from ``pi_{theta_k, eta}`` (``docs/estimators.md``); ``J_hat`` is the mean raw
  return of the episodes finished in ``tau_{k+1}``, ``b`` a moving average of earlier
  ``J_hat`` (independent of ``tau_k``), both put on the plain term's scale
  (:func:`score_weight`).
- ``dice``: the same correction without a baseline, through DiCE's magic box (its first
  derivative; ``metagrad_rl.estimators.magic_box``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchopt
from torch import Tensor

from metagrad_rl import config as C
from metagrad_rl.advantages import gae
from metagrad_rl.checkpoint import load_checkpoint, save_checkpoint
from metagrad_rl.errors import ConfigError
from metagrad_rl.logging import (
    CHECKPOINT_FILE,
    RunLogger,
    prepare_run_dir,
    write_run_config,
)
from metagrad_rl.metagrad import (
    PendingMetaGradient,
    eq17_gradient,
    flatten,
    start_meta_gradient,
)
from metagrad_rl.networks import (
    Critic,
    GaussianPolicy,
    IntrinsicReward,
    cln_condition,
    intrinsic_reward,
    params_of,
)
from metagrad_rl.optim import clip_counts, clip_grad_norm
from metagrad_rl.ppo import value_loss
from metagrad_rl.problems import ppo_meta_problem
from metagrad_rl.rollout import Batch, collect_rollout, critic_values
from metagrad_rl.trainers.common import (
    FlatParams,
    collector_for,
    episode_row,
    finish_run,
    linear_schedule,
    make_optimizer,
    optimizer_state_from_list,
    optimizer_state_to_list,
    policy_snapshot,
)
from metagrad_rl.trainers.ppo import PPOConfig, check_resume_config
from metagrad_rl.unroll import EtaPaths, InnerSurrogate, Round, unroll

META_GRADS = ("eq17", "lirpg", "three-term", "exact", "sampling-aware", "dice")
#: Estimators that differentiate the whole real policy round.
FULL_ROUND = ("exact", "sampling-aware", "dice")
LOOKAHEAD = ("lirpg", "three-term")


@dataclass
class BilevelConfig(PPOConfig):
    """PPO's hyperparameters plus the intrinsic reward and its meta-gradient."""

    meta_grad: str = "eq17"
    """Estimator of d J_ex / d eta: eq17, lirpg, three-term, exact, sampling-aware or dice."""
    baseline_decay: float = 0.9
    """Decay of the moving-average baseline of sampling-aware (0: the last J_hat)."""
    eta_lr: float = 1e-4
    """Adam step size of the intrinsic reward (LIRPG's lr_beta)."""
    r_ex_coef: float = 1.0
    """Weight of the extrinsic reward in the policy's mixed reward."""
    r_in_coef: float = 0.1
    """Weight of the intrinsic reward in the policy's mixed reward (tanh-bounded, vs the
    scaled extrinsic reward; 1.0 swamps it early: Hopper return 16 vs 248 at 37k steps)."""
    lookahead_steps: int = 1
    """Full-batch inner steps of the look-ahead of lirpg and three-term."""
    surrogate: str = "paper"
    """Inner ratio denominator at the meta level: paper (follows theta_k, eta) or detached."""
    denominator: str = "theta_k"
    """Outer ratio denominator (Eq 24): theta_k (the paper) or theta_k+1."""
    adam_eps_root: float = 1e-8
    """Adam eps inside the sqrt, so that the unrolled update is differentiable at v = 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        C.one_of("meta_grad", self.meta_grad, META_GRADS)
        C.positive_float("eta_lr", self.eta_lr)
        C.nonnegative_float("r_ex_coef", self.r_ex_coef)
        C.nonnegative_float("r_in_coef", self.r_in_coef)
        if self.r_in_coef == 0.0:
            raise ConfigError("r_in_coef=0.0 is invalid: the policy must see the intrinsic reward")
        C.positive_int("lookahead_steps", self.lookahead_steps)
        C.one_of("surrogate", self.surrogate, tuple(s.value for s in InnerSurrogate))
        C.one_of("denominator", self.denominator, ("theta_k", "theta_k+1"))
        C.positive_float("adam_eps_root", self.adam_eps_root)
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ConfigError(f"baseline_decay={self.baseline_decay} is invalid: expected [0, 1)")

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def steps_per_round(self) -> int:
        """Inner steps of one policy round (epochs x minibatches)."""
        return self.update_epochs * math.ceil(self.batch_size / self.minibatch_size)


@dataclass
class CLNConfig(BilevelConfig):
    """CLN: a policy conditioned on the intrinsic reward's last two layers (Eq 20-22)."""

    CONDITIONINGS: ClassVar[tuple[str, ...]] = ("cln",)
    conditioning: str = "cln"
    """Normalisation of the policy's last hidden layer: cln (conditioned on eta)."""


@dataclass
class LIRPGConfig(BilevelConfig):
    """LIRPG: an unconditioned policy, Eq 13 by a one-step look-ahead (published defaults)."""

    meta_grad: str = "lirpg"
    """Estimator of d J_ex / d eta (an unconditioned policy has Eq 11 = Eq 12 = 0)."""
    r_ex_coef: float = 0.0
    """Weight of the extrinsic reward in the policy's mixed reward (LIRPG MuJoCo: 0)."""
    r_in_coef: float = 1.0
    """Weight of the intrinsic reward in the policy's mixed reward (LIRPG MuJoCo: 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.meta_grad in ("eq17", "three-term"):
            raise ConfigError(
                f"meta_grad={self.meta_grad!r} needs a CLN policy: lirpg accepts lirpg, exact, "
                "sampling-aware or dice"
            )


@dataclass
class MetaStep:
    """What one validation round used and applied (for logs, tests and benchmarks).

    ``inputs`` is the policy round being differentiated (``theta`` = theta_k, ``opt_state``,
    round ``batch``, ``minibatches``, ``eta``); ``outer`` the validation batch ``tau_{k+1}``;
    ``theta_next`` the policy after the round.
    """

    grad: dict[str, Tensor]
    terms: dict[str, dict[str, Tensor]]
    diagnostics: dict[str, float]
    inputs: dict[str, Any] | None = None
    outer: dict[str, Tensor] | None = None
    theta_next: dict[str, Tensor] | None = None


def round_batch(batch: Batch, v_mix: Tensor, v_mix_next: Tensor) -> dict[str, Tensor]:
    """A rollout as the engine's round batch (:data:`metagrad_rl.problems.ROUND_KEYS`)."""
    return {
        "obs": batch.obs,
        "act": batch.act,
        "r_ex": batch.r_ex,
        "v_mix": v_mix,
        "v_mix_next": v_mix_next,
        "terminated": batch.terminated.to(batch.r_ex.dtype),
        "episode_end": batch.episode_end.to(batch.r_ex.dtype),
    }


def intrinsic_episode_returns(r_in: Tensor, episode_end: Tensor) -> list[float]:
    """Sums of ``r_in`` over the episodes that end inside the batch (env copy by copy)."""
    out = []
    r = r_in.reshape(r_in.shape[0], -1)
    ends = episode_end.reshape(r.shape)
    for n in range(r.shape[1]):
        acc = 0.0
        for t in range(r.shape[0]):
            acc += float(r[t, n])
            if bool(ends[t, n]):
                out.append(acc)
                acc = 0.0
    return out


def train(
    config: BilevelConfig,
    out: str | Path,
    resume: bool = False,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    stop_at_step: int | None = None,
    on_meta_step: Callable[[MetaStep], None] | None = None,
) -> dict[str, Any]:
    """Trains CLN or LIRPG (by the config's class); same contract as the PPO trainer.

    ``on_meta_step`` receives every applied meta-gradient with its terms (tests, benchmarks).
    """
    cfg = config
    algo = "cln" if isinstance(cfg, CLNConfig) else "lirpg"
    # ============================== SETUP =========================================================
    ckpt = load_checkpoint(Path(out) / CHECKPOINT_FILE) if resume else None
    if ckpt is not None:
        check_resume_config(ckpt["config"], cfg)
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    collector = collector_for(cfg)
    obs_dim, act_dim = collector.envs.obs_dim, collector.envs.act_dim
    reward_net = IntrinsicReward(obs_dim, act_dim, cfg.reward_hidden, cfg.bottleneck)
    policy = GaussianPolicy(
        obs_dim,
        act_dim,
        cfg.hidden,
        conditioning=cfg.conditioning,
        cond_dim=reward_net.condition_dim,
    )
    v_mix, v_ex = Critic(obs_dim, cfg.hidden), Critic(obs_dim, cfg.hidden)
    theta = {k: v.detach().clone() for k, v in params_of(policy).items()}
    eta = {k: v.detach().clone() for k, v in params_of(reward_net).items()}
    critics = FlatParams({"v_mix": params_of(v_mix), "v_ex": params_of(v_ex)})
    mb_size = cfg.minibatch_size
    theta_tx = policy_optimizer(cfg)
    critic_tx = make_optimizer(
        cfg.lr,
        cfg.steps_per_round,
        cfg.num_iterations,
        cfg.anneal_lr,
        cfg.max_grad_norm,
        cfg.adam_eps,
    )
    eta_tx = torchopt.adam(cfg.eta_lr, eps=cfg.adam_eps)
    theta_state = theta_tx.init(theta)
    critic_state = critic_tx.init((critics.flat,))
    eta_state = eta_tx.init(eta)
    problem = build_problem(cfg, policy, reward_net)
    update_gen = torch.Generator().manual_seed(cfg.seed + 2_000_003)
    run_dir = prepare_run_dir(out, resume)
    global_step, iteration = 0, 0
    pending_inputs: dict[str, Any] | None = None  # the previous policy round, to finish
    baseline: float | None = None  # moving average of J_hat, for sampling-aware
    if ckpt is not None:
        theta = ckpt["theta"]
        eta = ckpt["eta"]
        critics.load_state_dict(ckpt["critics"])
        theta_state = optimizer_state_from_list(theta_state, ckpt["theta_state"])
        critic_state = optimizer_state_from_list(critic_state, ckpt["critic_state"])
        eta_state = optimizer_state_from_list(eta_state, ckpt["eta_state"])
        collector.load_state_dict(ckpt["collector"])
        update_gen.set_state(ckpt["update_gen"])
        torch.set_rng_state(ckpt["torch_rng"])
        global_step, iteration = int(ckpt["global_step"]), int(ckpt["iteration"])
        pending_inputs = ckpt["pending"]
        baseline = ckpt.get("baseline")
    write_run_config(run_dir, algo, C.to_dict(cfg))
    logger = RunLogger(run_dir, resume_step=global_step if resume else None)
    recent: list[float] = list(ckpt["recent_returns"]) if ckpt is not None else []
    pending: PendingMetaGradient | None = None
    if pending_inputs is not None and cfg.meta_grad != "eq17":
        # a resumed run re-runs the unroll it had in flight
        pending = _start(problem, theta_tx, pending_inputs, cfg)

    def cond_of(e: dict[str, Tensor]) -> Tensor | None:
        return cln_condition(e).detach() if cfg.conditioning == "cln" else None

    def checkpoint() -> None:
        save_checkpoint(
            run_dir / CHECKPOINT_FILE,
            {
                "algo": algo,
                "config": C.to_dict(cfg),
                "global_step": global_step,
                "iteration": iteration,
                "theta": theta,
                "eta": eta,
                "critics": critics.state_dict(),
                "theta_state": optimizer_state_to_list(theta_state),
                "critic_state": optimizer_state_to_list(critic_state),
                "eta_state": optimizer_state_to_list(eta_state),
                "collector": collector.state_dict(),
                "update_gen": update_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "recent_returns": list(recent),
                "pending": pending_inputs,
                "baseline": baseline,
                "policy": policy_snapshot(
                    cfg.env, policy, theta, collector.obs_norm, cfg.hidden, cond_of(eta)
                ),
            },
        )

    while iteration < cfg.num_iterations:
        if stop_at_step is not None and global_step >= stop_at_step:
            break
        # ============================== ROLLOUT: tau_k ~ pi_{theta_k, eta_i} ======================
        views = critics.views()
        rollout = collect_rollout(
            collector, policy, theta, v_mix, views["v_mix"], cfg.num_steps, cond_of(eta)
        )
        batch = rollout.batch
        global_step += cfg.batch_size
        with torch.no_grad():
            ex_v = critic_values(v_ex, views["v_ex"], batch.obs)
            ex_v_next = critic_values(v_ex, views["v_ex"], batch.next_obs)
            adv_ex = gae(
                batch.r_ex,
                ex_v,
                ex_v_next,
                batch.terminated,
                batch.episode_end,
                cfg.gamma,
                cfg.gae_lambda,
            )
        # ============================== VALIDATION ROUND (Eq 24): eta_i -> eta_{i+1} ==============
        meta_row: dict[str, Any] = {}
        if pending_inputs is not None:
            outer = {
                "obs": batch.obs.reshape(-1, obs_dim),
                "act": batch.act.reshape(-1, act_dim),
                "adv_ex": adv_ex.reshape(-1),
            }
            score_w = None
            if cfg.meta_grad in ("sampling-aware", "dice"):
                b = 0.0 if cfg.meta_grad == "dice" or baseline is None else baseline
                score_w = score_weight(rollout.episodes, b, _reward_scale(collector), adv_ex)
            step = _meta_gradient(cfg, problem, pending, pending_inputs, theta, eta, outer, score_w)
            step.inputs, step.outer, step.theta_next = pending_inputs, outer, theta
            updates, eta_state = eta_tx.update(step.grad, eta_state, params=eta, inplace=False)
            eta = {
                k: v.detach()
                for k, v in torchopt.apply_updates(eta, updates, inplace=False).items()
            }
            meta_row = {k: v for k, v in step.diagnostics.items() if k.startswith("norm_")}
            meta_row["norm_applied"] = float(flatten(step.grad).norm())
            if on_meta_step is not None:
                on_meta_step(step)
        pending = None
        # the baseline takes in J_hat of tau_k only now that tau_k's meta-step is done
        j_round = None if pending_inputs is None else pending_inputs.get("j_hat")
        if j_round is not None:
            d = cfg.baseline_decay
            baseline = j_round if baseline is None else d * baseline + (1 - d) * j_round
        # ============================== POLICY ROUND (Eq 23): theta_k -> theta_{k+1} ==============
        clip_before = clip_counts(theta_state)
        with torch.no_grad():
            r_in = intrinsic_reward(reward_net, eta, batch.obs, batch.act)
        rb = round_batch(batch, batch.values, batch.next_values)
        mbs = [
            idx
            for _ in range(cfg.update_epochs)
            for idx in torch.randperm(cfg.batch_size, generator=update_gen).split(mb_size)
        ]
        pending_inputs = {
            "j_hat": float(np.mean(rollout.episodes.returns)) if rollout.episodes.returns else None,
            "theta": theta,
            "opt_state": optimizer_state_to_list(theta_state),
            "batch": rb,
            "minibatches": mbs,
            "eta": eta,
        }
        if cfg.meta_grad in FULL_ROUND:
            pending = _start(problem, theta_tx, pending_inputs, cfg)
            theta, theta_state = pending.theta_next, pending.opt_state
        else:
            if cfg.meta_grad in LOOKAHEAD:
                pending = _start(problem, theta_tx, pending_inputs, cfg)
            res = unroll(
                problem,
                theta_tx,
                theta,
                EtaPaths.shared(eta),
                [Round(rb, mbs)],
                theta_state,
                InnerSurrogate(cfg.surrogate),
                create_graph=False,
            )
            theta = {k: v.detach() for k, v in res.theta.items()}
            theta_state = _detach_tree(res.opt_state)
        clip_after = clip_counts(theta_state)
        clip_share = (clip_after[0] - clip_before[0]) / max(1, clip_after[1] - clip_before[1])
        # ============================== CRITICS: V_mix, V_ex on tau_k ============================
        with torch.no_grad():
            r_mix = cfg.r_ex_coef * batch.r_ex + cfg.r_in_coef * r_in
            ret_mix = (
                gae(
                    r_mix,
                    batch.values,
                    batch.next_values,
                    batch.terminated,
                    batch.episode_end,
                    cfg.gamma,
                    cfg.gae_lambda,
                )
                + batch.values
            )
            ret_ex = adv_ex + ex_v
        critic_state, v_stats = _critic_round(
            cfg, v_mix, v_ex, critics, critic_tx, critic_state, batch, ret_mix, ret_ex, mbs
        )
        iteration += 1
        # ============================== LOG / CHECKPOINT ==========================================
        recent = (recent + rollout.episodes.returns)[-20:]
        eps = rollout.episodes
        in_returns = intrinsic_episode_returns(r_in, batch.episode_end)
        row = logger.log(
            global_step,
            cfg.batch_size,
            {
                **episode_row(iteration, eps),
                "intrinsic_return": float(np.mean(in_returns)) if in_returns else "",
                "intrinsic_reward_mean": float(r_in.mean()),
                **{k: meta_row.get(k, "") for k in _META_LOG_KEYS},
                "grad_clip_share": clip_share,
                **v_stats,
            },
        )
        if cfg.checkpoint_every and iteration % cfg.checkpoint_every == 0:
            checkpoint()
        if progress is not None:
            progress(global_step, row)
    checkpoint()
    fields = {"algo": algo, "env": cfg.env, "seed": cfg.seed, "meta_grad": cfg.meta_grad}
    finished = iteration >= cfg.num_iterations
    return finish_run(run_dir, collector, logger, fields, global_step, finished, recent)


_META_LOG_KEYS = (
    "norm_eq11",
    "norm_eq12",
    "norm_eq13",
    "norm_eq14",
    "norm_eq17",
    "norm_total",
    "norm_applied",
)


def build_problem(cfg: BilevelConfig, policy: GaussianPolicy, reward_net: IntrinsicReward) -> Any:
    """The engine's problem for this config (:func:`metagrad_rl.problems.ppo_meta_problem`)."""
    return ppo_meta_problem(
        policy,
        reward_net,
        gamma=cfg.gamma,
        lam=cfg.gae_lambda,
        clip=cfg.clip_coef,
        r_ex_coef=cfg.r_ex_coef,
        r_in_coef=cfg.r_in_coef,
        ent_coef=cfg.ent_coef,
        normalize_advantages=cfg.norm_adv,
    )


def policy_optimizer(cfg: BilevelConfig) -> Any:
    """Clip-by-global-norm then Adam (annealed), on the policy alone; differentiable."""
    schedule = linear_schedule(cfg.lr, cfg.steps_per_round, cfg.num_iterations, cfg.anneal_lr)
    adam = torchopt.adam(schedule, eps=cfg.adam_eps, eps_root=cfg.adam_eps_root)
    return torchopt.chain(clip_grad_norm(cfg.max_grad_norm), adam)


def _detach_tree(state: Any) -> Any:
    return torchopt.pytree.tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, state)


def _start(
    problem: Any, tx: Any, inputs: dict[str, Any], cfg: BilevelConfig
) -> PendingMetaGradient:
    """Unroll the stored policy round (all of it, or the look-ahead) with its graph kept."""
    state = optimizer_state_from_list(tx.init(inputs["theta"]), inputs["opt_state"])
    if cfg.meta_grad in FULL_ROUND:
        rnd = Round(inputs["batch"], inputs["minibatches"])
    else:
        full = torch.arange(inputs["batch"]["r_ex"].numel())
        rnd = Round(inputs["batch"], [full] * cfg.lookahead_steps)
    return start_meta_gradient(
        problem,
        tx,
        inputs["theta"],
        inputs["eta"],
        [rnd],
        opt_state=state,
        surrogate=cfg.surrogate,
        terms=cfg.meta_grad not in FULL_ROUND,
    )


def _meta_gradient(
    cfg: BilevelConfig,
    problem: Any,
    pending: PendingMetaGradient | None,
    inputs: dict[str, Any],
    theta_next: dict[str, Tensor],
    eta: dict[str, Tensor],
    outer: dict[str, Tensor],
    score_w: float | None = None,
) -> MetaStep:
    """The validation round's gradient of ``L_out`` w.r.t. ``eta`` by the chosen estimator."""
    theta_den = inputs["theta"] if cfg.denominator == "theta_k" else theta_next
    if cfg.meta_grad == "eq17":
        g = eq17_gradient(problem, theta_next, eta, outer, theta_den, eta)
        diag = {"norm_eq17": float(flatten(g).norm())}
        return MetaStep(g, {"eq17": g}, diag)
    assert pending is not None
    res = pending.finish(
        outer, denominator=cfg.denominator, score_weight=score_w, magic_box=cfg.meta_grad == "dice"
    )
    if cfg.meta_grad == "exact":
        return MetaStep(res.total, {"total": res.total}, res.diagnostics)
    if cfg.meta_grad in ("sampling-aware", "dice"):
        score = (
            res.score
            if res.score is not None
            else {k: torch.zeros_like(v) for k, v in res.total.items()}
        )
        g = {k: res.total[k] + score[k] for k in res.total}
        diag = dict(res.diagnostics, score_weight=0.0 if score_w is None else score_w)
        return MetaStep(g, {"total": res.total, "score": score}, diag)
    assert res.eq12 is not None and res.eq13 is not None
    if cfg.meta_grad == "lirpg":
        return MetaStep(res.eq13, {"eq13": res.eq13}, res.diagnostics)
    g17 = eq17_gradient(problem, theta_next, eta, outer, theta_den, eta)
    g = {k: g17[k] + res.eq12[k] + res.eq13[k] for k in g17}
    diag = dict(res.diagnostics, norm_eq17=float(flatten(g17).norm()))
    return MetaStep(g, {"eq17": g17, "eq12": res.eq12, "eq13": res.eq13}, diag)


def _reward_scale(collector: Any) -> float:
    """The factor the reward scaler multiplies raw rewards by (1 when disabled)."""
    rs = collector.rew_scaler
    return 1.0 / math.sqrt(float(rs.rms.var) + rs.eps) if rs.enabled else 1.0


def score_weight(
    episodes: Any, baseline: float, reward_scale: float, adv_ex: Tensor
) -> float | None:
    r"""The sampling-aware term's weight ``w`` in ``grad_eta [w log p(tau_k)]`` (loss units).

    The plain term is the PPO surrogate's gradient with normalised advantages, about
    ``grad J / (sigma_A H)`` per episode (``sigma_A``: std of the extrinsic advantages, ``H``:
    mean episode length); the score term is put on that scale:

    .. math:: w = -rac{s\,(\hat J - b)}{\sigma_A H}

    with ``s`` the reward scaler's factor (advantages are of scaled rewards) and the minus
    sign because gradients are of ``L_out = -J``. ``None`` when no episode ended in the batch.
    """
    if not episodes.returns:
        return None
    j_hat = float(np.mean(episodes.returns))
    horizon = float(np.mean(episodes.lengths))
    sigma = float(adv_ex.std()) + 1e-8
    return -reward_scale * (j_hat - baseline) / (sigma * horizon)


def _critic_round(
    cfg: BilevelConfig,
    v_mix: Critic,
    v_ex: Critic,
    critics: FlatParams,
    tx: Any,
    state: Any,
    batch: Batch,
    ret_mix: Tensor,
    ret_ex: Tensor,
    mbs: list[Tensor],
) -> tuple[Any, dict[str, float]]:
    """Value regression of both critics on the round's minibatches (clipped value loss)."""
    obs = batch.obs.reshape(-1, batch.obs.shape[-1])
    old_mix, old_ex = batch.values.reshape(-1), None
    with torch.no_grad():
        old_ex = critic_values(v_ex, critics.views()["v_ex"], obs)
    ret_mix, ret_ex = ret_mix.reshape(-1), ret_ex.reshape(-1)
    clip = cfg.clip_coef if cfg.clip_vloss else None
    total = 0.0
    for idx in mbs:
        leaves = critics.leaves()
        lm = value_loss(
            critic_values(v_mix, leaves["v_mix"], obs[idx]), ret_mix[idx], old_mix[idx], clip
        )
        le = value_loss(
            critic_values(v_ex, leaves["v_ex"], obs[idx]), ret_ex[idx], old_ex[idx], clip
        )
        grad = critics.flat_grad(lm + le)
        updates, state = tx.update((grad,), state, params=(critics.flat,), inplace=True)
        torchopt.apply_updates((critics.flat,), updates, inplace=True)
        total += float(lm + le)
    return state, {"v_loss": total / max(len(mbs), 1)}
