"""Bilevel trainers: CLN (Stadie, Zhang, Ba 2020) and LIRPG (Zheng et al. 2018) on MuJoCo.

Per iteration, reading like the paper's algorithm (Section 3.3); :func:`train` is this loop
over named steps, each taking and updating one :class:`BilevelState`::

    collect            tau_k ~ pi_{theta_k, eta_i}
    validation_round   (Eq 24) finish the meta-gradient of the pending policy round on tau_k
                       and step eta_i -> eta_{i+1} with the chosen estimator
    policy_round       (Eq 23) PPO-clip on the intrinsic (mixed) advantages of tau_k with
                       eta_{i+1}: theta_k -> theta_{k+1}; recorded as the next pending
                       :class:`RoundRecord` (differentiable when the estimator needs it)
    critic_round       V_mix (mixed returns) and V_ex (extrinsic returns) regress on tau_k
    log, checkpoint    :class:`~metagrad_rl.trainers.run.Run`, shared with the PPO trainer

Estimators (``--meta-grad``, registered in :mod:`metagrad_rl.trainers.meta_grads`), all
gradients of ``L_out = -J_ex`` (see ``docs/equations.md``):

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

Every estimator is one registry entry; adding one does not touch this file.
- ``dice``: the same correction without a baseline, through DiCE's magic box (its first
  derivative; ``metagrad_rl.score_function.magic_box``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchopt
from torch import Tensor

from metagrad_rl import config as C
from metagrad_rl.advantages import gae, normalize
from metagrad_rl.errors import ConfigError, DivergenceError
from metagrad_rl.flat import FlatLayout
from metagrad_rl.metagrad import PendingMetaGradient, eq17_gradient, start_meta_gradient
from metagrad_rl.networks import (
    POLICIES,
    Critic,
    IntrinsicReward,
    Policy,
    cln_condition,
    intrinsic_reward,
    params_of,
    policy_log_prob,
)
from metagrad_rl.optim import clip_counts, join_states, permute_state, split_state
from metagrad_rl.ppo import clipped_surrogate_loss, surrogate_stats, value_loss
from metagrad_rl.problems import ppo_meta_problem
from metagrad_rl.pytree import Params, all_finite, detach_state, flatten, take
from metagrad_rl.rollout import (
    Batch,
    Collector,
    Rollout,
    collect_rollout,
    critic_values,
    stack_params,
    stacked_critic_values,
)
from metagrad_rl.trainers import meta_grads, parallel
from metagrad_rl.trainers.common import (
    FlatParams,
    collector_for,
    episode_row,
    explained_variance,
    flat_grads,
    lr_at,
    make_optimizer,
    optimizer_for,
    optimizer_state_from_list,
    optimizer_state_to_list,
    policy_snapshot,
    to_device,
)
from metagrad_rl.trainers.ppo import PPOConfig
from metagrad_rl.trainers.run import Progress, Run, begin, lr_restart_of
from metagrad_rl.unroll import (
    InnerSurrogate,
    MetaProblem,
    Round,
    minibatch_indices,
    prepare_round,
)


@dataclass
class BilevelConfig(PPOConfig):
    """PPO's hyperparameters plus the intrinsic reward and its meta-gradient."""

    meta_grad: str = "eq17"
    """Estimator of d J_ex / d eta, from the registry metagrad_rl.trainers.meta_grads:
    eq17, lirpg, three-term, exact, sampling-aware or dice (docs/estimators.md)."""
    baseline_decay: float = 0.9
    """Decay of the moving-average baseline of sampling-aware (0: the last J_hat)."""
    eta_lr: float = 1e-4
    """Adam step size of the intrinsic reward (LIRPG's lr_beta). 0 freezes eta at its seeded
    initialisation (the fixed-random-reward ablation: the meta-gradient is still computed and
    logged, its step is exactly zero)."""
    r_ex_coef: float = 1.0
    """Weight of the extrinsic reward in the policy's mixed reward."""
    r_in_coef: float = 0.1
    """Weight of the intrinsic reward in the policy's mixed reward (tanh-bounded, vs the
    scaled extrinsic reward; 1.0 swamps it early: Hopper return 16 vs 248 at 37k steps).
    0 turns the intrinsic reward off (with CLN: the conditioned architecture alone, eta
    still moving the CLN gain and bias through Eq 11)."""
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
        meta_grads.get(self.meta_grad)  # a registered estimator, or a one-line error
        C.nonnegative_float("eta_lr", self.eta_lr)
        C.nonnegative_float("r_ex_coef", self.r_ex_coef)
        C.nonnegative_float("r_in_coef", self.r_in_coef)
        if self.r_in_coef == 0.0 and self.r_ex_coef == 0.0:
            raise ConfigError(
                "r_ex_coef=0.0 with r_in_coef=0.0 is invalid: the policy must see some reward "
                "(at least one of them > 0)"
            )
        C.positive_int("lookahead_steps", self.lookahead_steps)
        C.one_of("surrogate", self.surrogate, tuple(s.value for s in InnerSurrogate))
        C.one_of("denominator", self.denominator, ("theta_k", "theta_k+1"))
        C.positive_float("adam_eps_root", self.adam_eps_root)
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ConfigError(f"baseline_decay={self.baseline_decay} is invalid: expected [0, 1)")

    @classmethod
    def field_choices(cls) -> dict[str, tuple[str, ...]]:
        """The accepted values of the fields that take a name (the CLI's ``choices``)."""
        names = tuple(m.name for m in meta_grads.META_GRADS.values() if cls.accepts(m))
        return {
            **super().field_choices(),
            "meta_grad": names,
            "surrogate": tuple(x.value for x in InnerSurrogate),
            "denominator": ("theta_k", "theta_k+1"),
        }

    @classmethod
    def accepts(cls, mg: meta_grads.MetaGrad) -> bool:
        """Whether this algorithm's policy can use estimator ``mg``."""
        return "cln" in cls.CONDITIONINGS or not mg.needs_cln


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
        if not self.accepts(meta_grads.get(self.meta_grad)):
            raise ConfigError(
                f"meta_grad={self.meta_grad!r} needs a CLN policy: lirpg accepts "
                f"{', '.join(self.field_choices()['meta_grad'])}"
            )


# ============================== STATE =============================================================
@dataclass
class Parts:
    """The fixed pieces of a bilevel run: networks (templates), optimizers, problem, envs."""

    policy: Policy
    reward_net: IntrinsicReward
    v_mix: Critic
    v_ex: Critic
    problem: MetaProblem
    theta_tx: Any
    critic_tx: Any
    eta_tx: Any
    collector: Collector
    update_gen: torch.Generator
    meta_grad: meta_grads.MetaGrad
    par: parallel.Parallel = field(default_factory=parallel.Parallel)
    """This worker (seeds, averaged optimizers and meta-gradient, union advantage statistics,
    combined normalisers; no-op in one process: :mod:`metagrad_rl.trainers.parallel`)."""
    joint_tx: Any = None
    """The plain round's one optimizer on ``[theta, critics]`` as one flat vector: the same
    clip-then-Adam chain, each part clipped by its own norm (``segments``), so one step
    gives the numbers of ``theta_tx`` and ``critic_tx`` stepping apart."""
    plain_problem: MetaProblem | None = None
    """``problem`` with plain collectives, for a policy round that is not differentiated
    (several workers; ``None``: ``problem``)."""
    critic_order: Tensor | None = None
    """Where each entry of the plain round's stacked critics sits in ``critics.flat``
    (:func:`critic_stack_order`)."""


@dataclass
class RoundRecord:
    """A policy round in flight: what its validation round needs to differentiate it.

    ``theta`` is ``theta_k``, ``opt_state`` the optimizer state there (checkpoint form),
    ``batch`` the round batch ``tau_k`` (:func:`round_batch`), ``minibatches`` the index
    schedule the round used, ``eta`` the ``eta_{i+1}`` it was run with, ``j_hat`` the mean raw
    return of the episodes finished in ``tau_k`` (the sampling-aware baseline's next input),
    ``schedule`` the learning-rate schedule the round ran under, ``(restart, num_iterations)``.
    ``graph`` is the engine's unroll with its graph kept (not checkpointed: a resumed run
    re-runs it).
    """

    theta: Params
    opt_state: list[Tensor]
    batch: dict[str, Tensor]
    minibatches: list[Tensor]
    eta: Params
    j_hat: float | None
    schedule: tuple[int, int] | None = None
    graph: PendingMetaGradient | None = None

    def to_checkpoint(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _RECORD_KEYS}

    @classmethod
    def from_checkpoint(cls, d: dict[str, Any] | None) -> RoundRecord | None:
        if d is None:
            return None
        kw: dict[str, Any] = {k: d.get(k) for k in _RECORD_KEYS}
        return cls(**kw)


_RECORD_KEYS = ("theta", "opt_state", "batch", "minibatches", "eta", "j_hat", "schedule")


@dataclass
class BilevelState:
    """Everything that changes during a bilevel run (and is checkpointed)."""

    theta: Params
    eta: Params
    critics: FlatParams
    theta_state: Any
    critic_state: Any
    eta_state: Any
    lr_restart: int = 0
    global_step: int = 0
    iteration: int = 0
    pending: RoundRecord | None = None
    #: The policy rounds before ``pending`` that a multi-round estimator re-simulates (the
    #: last ``rounds - 1``, oldest first; empty otherwise).
    history: list[RoundRecord] = field(default_factory=list)
    baseline: float | None = None
    recent: list[float] = field(default_factory=list)
    #: Validation rounds whose meta-gradient had a NaN/inf entry (eta was not stepped).
    meta_steps_skipped: int = 0

    def to_checkpoint(self, parts: Parts, cfg: BilevelConfig) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "iteration": self.iteration,
            "lr_restart": self.lr_restart,
            "theta": self.theta,
            "eta": self.eta,
            "critics": self.critics.state_dict(),
            "theta_state": optimizer_state_to_list(self.theta_state),
            "critic_state": optimizer_state_to_list(self.critic_state),
            "eta_state": optimizer_state_to_list(self.eta_state),
            "collector": parts.collector.state_dict(),
            "update_gen": parts.update_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "recent_returns": list(self.recent),
            "pending": None if self.pending is None else self.pending.to_checkpoint(),
            "history": [r.to_checkpoint() for r in self.history],
            "baseline": self.baseline,
            "meta_steps_skipped": self.meta_steps_skipped,
            "policy": policy_snapshot(
                cfg.env,
                parts.policy,
                self.theta,
                parts.collector.obs_norm,
                cfg.hidden,
                _condition(cfg, self.eta),
                act_dim=parts.collector.envs.act_dim,
                kind=cfg.policy,
            ),
        }

    def load(self, ckpt: dict[str, Any], parts: Parts, device: str = "cpu") -> None:
        self.theta, self.eta = to_device(ckpt["theta"], device), to_device(ckpt["eta"], device)
        self.critics.load_state_dict(ckpt["critics"])
        self.theta_state = optimizer_state_from_list(self.theta_state, ckpt["theta_state"])
        self.critic_state = optimizer_state_from_list(self.critic_state, ckpt["critic_state"])
        self.eta_state = optimizer_state_from_list(self.eta_state, ckpt["eta_state"])
        parts.collector.load_state_dict(ckpt["collector"])
        parts.update_gen.set_state(ckpt["update_gen"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.global_step, self.iteration = int(ckpt["global_step"]), int(ckpt["iteration"])
        self.pending = RoundRecord.from_checkpoint(to_device(ckpt["pending"], device))
        history = [
            RoundRecord.from_checkpoint(to_device(d, device)) for d in ckpt.get("history", [])
        ]
        self.history = [r for r in history if r is not None]
        self.baseline = ckpt.get("baseline")
        self.meta_steps_skipped = int(ckpt.get("meta_steps_skipped", 0))
        self.recent = list(ckpt["recent_returns"])
        parts.par.resumed_normalisers(parts.collector)


@dataclass
class Collected:
    """One rollout ``tau_k`` with its extrinsic values and advantages (for Eq 24 and V_ex)."""

    rollout: Rollout
    ex_v: Tensor
    adv_ex: Tensor

    @property
    def batch(self) -> Batch:
        return self.rollout.batch


@dataclass
class MetaStep:
    """What one validation round used and applied (for logs, tests and benchmarks).

    ``round`` is the policy round being differentiated, ``outer`` the validation batch
    ``tau_{k+1}``, ``theta_next`` the policy after the round, ``terms`` the named parts of
    ``grad`` (the estimator's :attr:`~metagrad_rl.trainers.meta_grads.MetaGrad.apply`).
    """

    grad: Params
    terms: dict[str, Params]
    diagnostics: dict[str, float]
    round: RoundRecord
    outer: dict[str, Tensor]
    theta_next: Params


# ============================== SETUP =============================================================
def build(cfg: BilevelConfig, lr_restart: int = 0) -> tuple[Parts, BilevelState]:
    """Networks, optimizers, problem and envs of ``cfg``, and the state at step 0."""
    par = parallel.current()
    collector = collector_for(cfg, par.seed(cfg.seed))
    obs_dim, act_dim = collector.envs.obs_dim, collector.envs.act_dim
    reward_net = IntrinsicReward(obs_dim, act_dim, cfg.reward_hidden, cfg.bottleneck)
    cond_dim = reward_net.condition_dim
    policy = POLICIES[cfg.policy](obs_dim, act_dim, cfg.hidden, cfg.conditioning, cond_dim)
    v_mix, v_ex = Critic(obs_dim, cfg.hidden), Critic(obs_dim, cfg.hidden)
    parts = Parts(
        policy=policy,
        reward_net=reward_net,
        v_mix=v_mix,
        v_ex=v_ex,
        problem=build_problem(cfg, policy, reward_net, par.sum_over_workers),
        theta_tx=par.averaged(policy_optimizer(cfg, lr_restart)),
        critic_tx=par.averaged(policy_optimizer(cfg, lr_restart), plain=True),
        eta_tx=torchopt.adam(cfg.eta_lr, eps=cfg.adam_eps),
        collector=collector,
        update_gen=torch.Generator().manual_seed(par.seed(cfg.seed) + 2_000_003),
        meta_grad=meta_grads.get(cfg.meta_grad),
        par=par,
    )
    if par.distributed:
        parts.plain_problem = build_problem(cfg, policy, reward_net, par.plain_sum_over_workers)
    theta = to_device(detach_state(params_of(policy)), cfg.device)
    eta = to_device(detach_state(params_of(reward_net)), cfg.device)
    critics = FlatParams({"v_mix": params_of(v_mix), "v_ex": params_of(v_ex)}, cfg.device)
    segments = (sum(t.numel() for t in theta.values()), critics.flat.numel())
    joint = optimizer_for(cfg, cfg.adam_eps_root, lr_restart, segments)
    parts.joint_tx = par.averaged(joint, plain=True)
    parts.critic_order = critic_stack_order(critics)
    par.sync_([*theta.values(), *eta.values(), critics.flat])
    state = BilevelState(
        theta=theta,
        eta=eta,
        critics=critics,
        theta_state=parts.theta_tx.init(theta),
        critic_state=parts.critic_tx.init((critics.flat,)),
        eta_state=parts.eta_tx.init(eta),
        lr_restart=lr_restart,
    )
    return parts, state


def build_problem(
    cfg: BilevelConfig,
    policy: Policy,
    reward_net: IntrinsicReward,
    sum_over_workers: Callable[[Tensor], Tensor] | None = None,
) -> Any:
    """The engine's problem for this config (:func:`metagrad_rl.problems.ppo_meta_problem`);
    ``sum_over_workers``: advantage statistics over the workers' union."""
    return ppo_meta_problem(
        policy,  # type: ignore[arg-type]  # the engine types it GaussianPolicy; any Policy works
        reward_net,
        gamma=cfg.gamma,
        lam=cfg.gae_lambda,
        clip=cfg.clip_coef,
        r_ex_coef=cfg.r_ex_coef,
        r_in_coef=cfg.r_in_coef,
        ent_coef=cfg.ent_coef,
        normalize_advantages=cfg.norm_adv,
        sum_over_workers=sum_over_workers,
    )


def policy_optimizer(cfg: BilevelConfig, lr_restart: int = 0) -> Any:
    """Clip-by-global-norm then Adam (annealed), on the policy alone; differentiable.

    The critics' optimizer is the same chain (their ``eps_root`` too), so that the plain
    round can step both as one vector (:attr:`Parts.joint_tx`).
    """
    return optimizer_for(cfg, eps_root=cfg.adam_eps_root, restart=lr_restart)


def _condition(cfg: BilevelConfig, eta: Params) -> Tensor | None:
    return cln_condition(eta).detach() if cfg.conditioning == "cln" else None


# ============================== ROLLOUT: tau_k ~ pi_{theta_k, eta_i} ==============================
def collect(cfg: BilevelConfig, parts: Parts, state: BilevelState) -> Collected:
    """Samples ``tau_k`` with the current policy; extrinsic advantages by ``V_ex``."""
    views = state.critics.views()
    rollout = collect_rollout(
        parts.collector,
        parts.policy,
        state.theta,
        parts.v_mix,
        views["v_mix"],
        cfg.num_steps,
        _condition(cfg, state.eta),
        device=cfg.device,
    )
    parts.par.combine_normalisers(parts.collector)
    rollout = rollout._replace(episodes=parts.par.union_episodes(rollout.episodes))
    state.global_step += cfg.batch_size
    b = rollout.batch
    with torch.no_grad():
        ex_v = critic_values(parts.v_ex, views["v_ex"], b.obs)
        ex_v_next = critic_values(parts.v_ex, views["v_ex"], b.next_obs)
        adv_ex = gae(
            b.r_ex, ex_v, ex_v_next, b.terminated, b.episode_end, cfg.gamma, cfg.gae_lambda
        )
    return Collected(rollout, ex_v, adv_ex)


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


def outer_batch(data: Collected) -> dict[str, Tensor]:
    """The validation batch of Eq 24: ``tau_{k+1}``'s states, actions and extrinsic advantages."""
    b = data.batch
    return {
        "obs": b.obs.reshape(-1, b.obs.shape[-1]),
        "act": b.act.reshape(-1, b.act.shape[-1]),
        "adv_ex": data.adv_ex.reshape(-1),
    }


# ============================== VALIDATION ROUND (Eq 24): eta_i -> eta_{i+1} =====================
def validation_round(
    cfg: BilevelConfig, parts: Parts, state: BilevelState, data: Collected
) -> MetaStep | None:
    """Finishes the pending round's meta-gradient on ``tau_{k+1}`` and steps ``eta``."""
    rec = state.pending
    if rec is None:
        return None
    step = meta_step(cfg, parts, state, rec, data)
    if not all_finite(step.grad):
        # one NaN/inf entry would turn eta (through Adam's moments: for good) into NaN; the step
        # is skipped, counted in the log and the summary, and the run goes on
        state.meta_steps_skipped += 1
        step.diagnostics["meta_steps_skipped"] = state.meta_steps_skipped
        print(
            f"warning: iteration {state.iteration + 1}: the meta-gradient is not finite; eta's "
            f"step is skipped ({state.meta_steps_skipped} so far)",
            file=sys.stderr,
        )
    elif cfg.eta_lr > 0:  # eta_lr = 0: eta stays exactly at its initialisation
        updates, state.eta_state = parts.eta_tx.update(
            step.grad, state.eta_state, params=state.eta, inplace=False
        )
        state.eta = detach_state(torchopt.apply_updates(state.eta, updates, inplace=False))
    step.diagnostics.setdefault("meta_steps_skipped", state.meta_steps_skipped)
    state.pending = None  # frees the unroll's graph
    if parts.meta_grad.rounds > 1:  # the rounds the next meta-steps re-simulate
        state.history = [*state.history, rec][-(parts.meta_grad.rounds - 1) :]
    if rec.j_hat is not None:  # the baseline takes in J_hat of tau_k only after its meta-step
        d, b = cfg.baseline_decay, state.baseline
        state.baseline = rec.j_hat if b is None else d * b + (1 - d) * rec.j_hat
    return step


def meta_step(
    cfg: BilevelConfig, parts: Parts, state: BilevelState, rec: RoundRecord, data: Collected
) -> MetaStep:
    """The chosen estimator's gradient of ``L_out`` w.r.t. ``eta`` (nothing is applied here)."""
    mg, outer = parts.meta_grad, outer_batch(data)
    theta_den = rec.theta if cfg.denominator == "theta_k" else state.theta
    weight = None
    result = None
    if mg.score is not None:
        b = 0.0 if mg.score == "magic_box" or state.baseline is None else state.baseline
        sigma = parts.par.union_std(data.adv_ex)  # the union's, as its score term needs
        weight = score_weight(
            data.rollout.episodes, b, reward_scale(parts.collector), data.adv_ex, sigma
        )
    if mg.unroll != "none":
        # a resumed run re-runs the unroll; a multi-round one starts here, from the history
        graph = rec.graph or start_unroll(cfg, parts, rec, state.history)
        result = graph.finish(
            outer,
            denominator=cfg.denominator,
            score_weight=weight,
            magic_box=mg.score == "magic_box",
        )
        result = parts.par.combine_meta(result)  # averaged over the workers (score: summed)

    def eq17() -> Params:
        g = eq17_gradient(parts.problem, state.theta, rec.eta, outer, theta_den, rec.eta)
        return dict(parts.par.average_(g))

    grad, named = mg.apply(meta_grads.MetaGradContext(result, eq17))
    diag = dict(result.diagnostics) if result is not None else {}
    diag.update({f"norm_{k}": float(flatten(g).norm()) for k, g in named.items()})
    diag["norm_applied"] = float(flatten(grad).norm())
    if mg.score is not None:
        diag["score_weight"] = 0.0 if weight is None else weight
    return MetaStep(grad, named, diag, rec, outer, state.theta)


def start_unroll(
    cfg: BilevelConfig,
    parts: Parts,
    rec: RoundRecord,
    history: Sequence[RoundRecord] = (),
) -> PendingMetaGradient:
    """The estimator's differentiable unroll of ``rec`` (the real round or the look-ahead).

    A multi-round estimator (``rounds = R > 1``) unrolls the stored rounds of ``history`` (the
    last ``R - 1`` before ``rec``, fewer early in a run) and then ``rec``'s, from the oldest
    one's ``theta`` and optimizer state, every round at ``rec.eta``.
    """
    mg = parts.meta_grad
    past = list(history)[-(mg.rounds - 1) :] if mg.rounds > 1 else []
    first = past[0] if past else rec
    tx = round_optimizer(cfg, parts, first)
    state = optimizer_state_from_list(tx.init(first.theta), first.opt_state)
    if mg.unroll == "round":
        rounds = [Round(r.batch, r.minibatches) for r in (*past, rec)]
    else:
        full = torch.arange(rec.batch["r_ex"].numel())
        rounds = [Round(rec.batch, [full] * cfg.lookahead_steps)]
    return start_meta_gradient(
        parts.problem,
        tx,
        first.theta,
        rec.eta,
        rounds,
        opt_state=state,
        surrogate=cfg.surrogate,
        terms=mg.terms,
        truncate=mg.truncate,
        checkpoint_every=mg.checkpoint_every,
    )


def round_optimizer(cfg: BilevelConfig, parts: Parts, rec: RoundRecord) -> Any:
    """The inner optimizer under the learning-rate schedule ``rec`` ran under (``--total-steps``
    may have changed since)."""
    if rec.schedule is None:
        return parts.theta_tx
    restart, n = rec.schedule
    return parts.par.averaged(
        make_optimizer(
            cfg.lr,
            cfg.steps_per_round,
            n,
            cfg.anneal_lr,
            cfg.max_grad_norm,
            cfg.adam_eps,
            cfg.adam_eps_root,
            restart,
        )
    )


def reward_scale(collector: Collector) -> float:
    """The factor the reward scaler multiplies raw rewards by (1 when disabled)."""
    rs = collector.rew_scaler
    return 1.0 / math.sqrt(float(rs.rms.var) + rs.eps) if rs.enabled else 1.0


def score_weight(
    episodes: Any,
    baseline: float,
    reward_scale: float,
    adv_ex: Tensor,
    adv_std: Tensor | float | None = None,
) -> float | None:
    r"""The sampling-aware term's weight ``w`` in ``grad_eta [w log p(tau_k)]`` (loss units).

    The plain term is the PPO surrogate's gradient with normalised advantages, about
    ``grad J / (sigma_A H)`` per episode (``sigma_A``: std of the extrinsic advantages, ``H``:
    mean episode length); the score term is put on that scale:

    .. math:: w = -\frac{s\,(\hat J - b)}{\sigma_A H}

    with ``s`` the reward scaler's factor (advantages are of scaled rewards) and the minus
    sign because gradients are of ``L_out = -J``. ``None`` when no episode ended in the batch.
    ``adv_std`` replaces ``adv_ex.std()`` (with several workers: the union's).
    """
    if not episodes.returns:
        return None
    j_hat = float(np.mean(episodes.returns))
    horizon = float(np.mean(episodes.lengths))
    sigma = float(adv_ex.std() if adv_std is None else adv_std) + 1e-8
    return -reward_scale * (j_hat - baseline) / (sigma * horizon)


# ============================== POLICY ROUND (Eq 23): theta_k -> theta_{k+1} =====================
def policy_round(
    cfg: BilevelConfig, parts: Parts, state: BilevelState, data: Collected, adv_mix: Tensor
) -> dict[str, float]:
    """PPO-clip on the mixed advantages of ``tau_k`` with ``eta_{i+1}`` (Eq 23), recorded as the
    pending round, then the critics' regression on the same minibatches.

    When the estimator unrolls the real round, ``theta_{k+1}`` is that differentiable unroll's
    output (graph kept in the record); otherwise the policy and the critics step together in
    one pass (:func:`plain_round`; a look-ahead estimator unrolls its look-ahead beside it).
    """
    mg, b, eps = parts.meta_grad, data.batch, data.rollout.episodes
    clip_before = clip_counts(state.theta_state)
    rec = RoundRecord(
        theta=state.theta,
        opt_state=optimizer_state_to_list(state.theta_state),
        batch=round_batch(b, b.values, b.next_values),
        minibatches=round_schedule(cfg, parts.update_gen),
        eta=state.eta,
        j_hat=float(np.mean(eps.returns)) if eps.returns else None,
        schedule=(state.lr_restart, cfg.num_iterations),
    )
    if mg.unroll != "none" and mg.rounds == 1:  # a multi-round one starts in the meta-step
        rec.graph = start_unroll(cfg, parts, rec)
    state.pending = rec
    if mg.unroll == "round" and mg.rounds == 1:
        assert rec.graph is not None
        state.theta, state.theta_state = rec.graph.theta_next, rec.graph.opt_state
        stats = critic_round(cfg, parts, state, data, adv_mix)
    else:
        stats = plain_round(cfg, parts, state, data, adv_mix)
    clip_after = clip_counts(state.theta_state)
    share = (clip_after[0] - clip_before[0]) / max(1, clip_after[1] - clip_before[1])
    return {**stats, "grad_clip_share": share}


def plain_round(
    cfg: BilevelConfig, parts: Parts, state: BilevelState, data: Collected, adv_mix: Tensor
) -> dict[str, float]:
    """The policy round and the critic round in one pass, nothing kept for differentiation.

    Per minibatch one backward pass of the engine's inner loss (``problem.inner_loss`` on
    ``prepare_round``'s data, the denominator a constant) plus both critics' value losses,
    then one optimizer step on ``[theta, critics]`` as one flat vector
    (:attr:`Parts.joint_tx`: each part clipped by its own norm, then Adam). Same numbers as
    :func:`metagrad_rl.unroll.unroll` with ``create_graph=False`` followed by
    :func:`critic_round` (``tests/test_bilevel.py``), in half the backward passes and
    optimizer steps.
    """
    rec, eta = state.pending, state.eta
    assert rec is not None
    # with several workers: a plain all-reduce of the gradient, union advantage statistics
    problem = parts.plain_problem or parts.problem
    with torch.no_grad():
        inner = prepare_round(
            problem, rec.batch, state.theta, eta, eta, InnerSurrogate(cfg.surrogate)
        )
    v = value_targets(cfg, data, adv_mix)
    layout = FlatLayout(state.theta)
    n_theta = sum(layout.sizes)
    # the critics as one stacked [V_mix, V_ex] network: entry order `order` of critics.flat
    order = parts.critic_order
    assert order is not None
    crit = state.critics.views()
    stacked = stack_params([crit["v_mix"], crit["v_ex"]])
    joint = FlatParams({"theta": state.theta, "critics": stacked}, cfg.device)
    critic_state = permute_state(state.critic_state, order)
    opt = join_states(layout.flatten_state(state.theta_state), critic_state)
    total = 0.0
    for idx in rec.minibatches:
        leaves = joint.leaves()
        loss_pi = problem.inner_loss(leaves["theta"], take(inner, idx), eta_policy=eta)
        loss_v = value_losses(parts, leaves["critics"], v, idx)
        (grad,) = flat_grads(loss_pi + loss_v, joint)
        opt = _step(parts.joint_tx, (grad,), opt, (joint.flat,))
        total += float(loss_v.detach())
    theta_state, critic_state = split_state(opt, n_theta)
    inverse = torch.argsort(order)
    state.critic_state = permute_state(critic_state, inverse)
    state.theta = {k: t.detach().clone() for k, t in joint.views()["theta"].items()}
    state.theta_state = detach_state(layout.unflatten_state(theta_state))
    with torch.no_grad():
        state.critics.flat.copy_(joint.flat[n_theta:][inverse])
    return critic_stats(v, total, len(rec.minibatches))


def critic_stack_order(critics: FlatParams) -> Tensor:
    """Where each entry of the stacked critics (``stack_params([v_mix, v_ex])`` flattened:
    per parameter ``V_mix``'s then ``V_ex``'s) sits in ``critics.flat``."""
    idx = torch.arange(critics.flat.numel(), device=critics.flat.device)
    views = critics.views(idx)
    mix, ex = views["v_mix"], views["v_ex"]
    return torch.cat([torch.stack([mix[k], ex[k]]).reshape(-1) for k in mix])


def _step(tx: Any, grads: Any, opt_state: Any, params: Any) -> Any:
    """One in-place optimizer step (TorchOpt's ``update`` then ``apply_updates``)."""
    updates, opt_state = tx.update(grads, opt_state, params=params, inplace=True)
    torchopt.apply_updates(params, updates, inplace=True)
    return opt_state


def round_schedule(cfg: Any, gen: torch.Generator) -> list[Tensor]:
    """The round's minibatch order (:func:`metagrad_rl.unroll.minibatch_indices`)."""
    return minibatch_indices(cfg.batch_size, cfg.update_epochs, cfg.num_minibatches, gen)


def policy_stats(
    cfg: BilevelConfig, parts: Parts, state: BilevelState, b: Batch, adv_mix: Tensor
) -> dict[str, float]:
    """PPO's columns for the round just done, on the whole batch at ``theta_{k+1}``.

    ``pg_loss`` is the clipped surrogate of the mixed advantages, ``approx_kl`` and
    ``clip_frac`` compare ``pi_{theta_{k+1}, eta_{i+1}}`` with the behaviour policy, ``lr`` is
    the step size of the round's last update.
    """
    obs, act = b.obs.reshape(-1, b.obs.shape[-1]), b.act.reshape(-1, b.act.shape[-1])
    with torch.no_grad():
        logp = policy_log_prob(parts.policy, state.theta, obs, act, state.eta)
        adv = adv_mix.reshape(-1)
        adv = normalize(adv) if cfg.norm_adv else adv
        old = b.logp.reshape(-1)
        pg = clipped_surrogate_loss(logp, old, adv, cfg.clip_coef)
        stats = surrogate_stats(logp, old, cfg.clip_coef)
        ent = parts.policy.entropy(state.theta)
    return {
        "pg_loss": float(pg),
        "entropy": float(ent),
        "approx_kl": float(stats.approx_kl),
        "clip_frac": float(stats.clip_fraction),
        "lr": lr_at(cfg, state.iteration, state.lr_restart),
    }


# ============================== CRITICS: V_mix, V_ex on tau_k ====================================
def critic_round(
    cfg: BilevelConfig, parts: Parts, state: BilevelState, data: Collected, adv_mix: Tensor
) -> dict[str, float]:
    """Value regression of both critics on the round's minibatches (clipped value loss)."""
    v = value_targets(cfg, data, adv_mix)
    mbs = state.pending.minibatches if state.pending is not None else []
    total = 0.0
    for idx in mbs:
        c = state.critics.leaves()
        loss = value_losses(parts, stack_params([c["v_mix"], c["v_ex"]]), v, idx)
        grad = state.critics.flat_grad(loss)
        flat = (state.critics.flat,)
        state.critic_state = _step(parts.critic_tx, (grad,), state.critic_state, flat)
        total += float(loss.detach())
    return critic_stats(v, total, len(mbs))


def critic_stats(v: dict[str, Any], total_loss: float, steps: int) -> dict[str, float]:
    """The critic columns: mean value loss over the round's steps and ``V_ex``'s explained
    variance (its old values against its returns, row 1 of ``v``)."""
    return {
        "v_loss": total_loss / max(steps, 1),
        "explained_variance": explained_variance(v["old"][1], v["ret"][1]),
    }


def value_targets(cfg: BilevelConfig, data: Collected, adv_mix: Tensor) -> dict[str, Any]:
    """Flat observations, returns and old values of ``V_mix`` (mixed) and ``V_ex`` (extrinsic);
    ``ret`` and ``old`` stack both critics' (``[2, T*N]``, ``V_mix`` first)."""
    b = data.batch
    ret_mix, ret_ex = (adv_mix + b.values).reshape(-1), (data.adv_ex + data.ex_v).reshape(-1)
    old_mix, old_ex = b.values.reshape(-1), data.ex_v.reshape(-1)
    return {
        "obs": b.obs.reshape(-1, b.obs.shape[-1]),
        "ret": torch.stack([ret_mix, ret_ex]),
        "old": torch.stack([old_mix, old_ex]),
        "clip": cfg.clip_coef if cfg.clip_vloss else None,
    }


def value_losses(parts: Parts, critics: Params, v: dict[str, Any], idx: Tensor) -> Tensor:
    """Both critics' (clipped) value losses on minibatch ``idx``, summed, in one batched pass
    (:func:`~metagrad_rl.rollout.stacked_critic_values`); ``critics`` is
    ``stack_params([V_mix's params, V_ex's])``."""
    values = stacked_critic_values(parts.v_mix, critics, v["obs"][idx])
    # value_loss averages over both rows: twice that is the sum of the two critics' losses
    return 2.0 * value_loss(values, v["ret"][:, idx], v["old"][:, idx], v["clip"])


def mixed_advantages(cfg: BilevelConfig, b: Batch, r_in: Tensor) -> Tensor:
    """GAE of the policy's reward ``r_ex_coef r_ex + r_in_coef r_in`` by ``V_mix``."""
    r_mix = cfg.r_ex_coef * b.r_ex + cfg.r_in_coef * r_in
    with torch.no_grad():
        return gae(
            r_mix, b.values, b.next_values, b.terminated, b.episode_end, cfg.gamma, cfg.gae_lambda
        )


# ============================== LOG ==============================================================
def intrinsic_episode_returns(r_in: Tensor, episode_end: Tensor) -> list[float]:
    """Sums of ``r_in`` over the episodes that end inside the batch (env copy by copy)."""
    out = []
    r = r_in.detach().reshape(r_in.shape[0], -1).cpu().double().numpy()
    ends = episode_end.reshape(r.shape).cpu().bool().numpy()
    for n in range(r.shape[1]):
        acc = 0.0
        for x, end in zip(r[:, n].tolist(), ends[:, n].tolist()):
            acc += x
            if end:
                out.append(acc)
                acc = 0.0
    return out


def intrinsic_stats(r_in: Tensor, episode_end: Tensor) -> dict[str, Any]:
    """The intrinsic reward's statistics on ``tau_k`` (per step, and summed per episode)."""
    r_in, episode_end = r_in.cpu(), episode_end.cpu()  # a loop of scalar reads
    ret = intrinsic_episode_returns(r_in, episode_end)
    return {
        "intrinsic_return": float(np.mean(ret)) if ret else "",
        "intrinsic_reward_mean": float(r_in.mean()),
        "intrinsic_reward_std": float(r_in.std()) if r_in.numel() > 1 else 0.0,
        "intrinsic_reward_min": float(r_in.min()),
        "intrinsic_reward_max": float(r_in.max()),
    }


def meta_columns(mg: meta_grads.MetaGrad, step: MetaStep | None) -> dict[str, Any]:
    """The estimator's log columns (empty in the first iteration, before any meta-step)."""
    diag = {} if step is None else step.diagnostics
    keys = ("norm_applied", *mg.log_keys, "meta_steps_skipped")
    return {k: diag.get(k, "") for k in dict.fromkeys(keys)}


# ============================== THE LOOP =========================================================
def train(
    config: BilevelConfig,
    out: str | Path,
    resume: bool = False,
    progress: Progress | None = None,
    stop_at_step: int | None = None,
    on_meta_step: Callable[[MetaStep], None] | None = None,
) -> dict[str, Any]:
    """Trains CLN or LIRPG (by the config's class); same contract as the PPO trainer.

    ``on_meta_step`` receives every applied meta-gradient with its terms (tests, benchmarks).
    """
    cfg = config
    algo = "cln" if isinstance(cfg, CLNConfig) else "lirpg"
    ckpt = begin(algo, cfg, out, resume)
    parts, s = build(cfg, lr_restart_of(ckpt, cfg))
    run = Run.open(algo, cfg, out, ckpt)
    if ckpt is not None:
        s.load(ckpt, parts, cfg.device)
    while run.keep_going(s.iteration, s.global_step, stop_at_step):
        data = collect(cfg, parts, s)  # tau_k ~ pi_{theta_k, eta_i}
        step = validation_round(cfg, parts, s, data)  # Eq 24: eta_i -> eta_{i+1}
        if step is not None and on_meta_step is not None:
            on_meta_step(step)
        with torch.no_grad():
            r_in = intrinsic_reward(parts.reward_net, s.eta, data.batch.obs, data.batch.act)
        adv_mix = mixed_advantages(cfg, data.batch, r_in)
        # Eq 23: theta_k -> theta_{k+1}; then V_mix, V_ex regress on tau_k
        round_stats = policy_round(cfg, parts, s, data, adv_mix)
        check_diverged(s, data)
        row = {
            **episode_row(s.iteration + 1, data.rollout.episodes),
            **policy_stats(cfg, parts, s, data.batch, adv_mix),
            **round_stats,
            **intrinsic_stats(r_in, data.batch.episode_end),
            **meta_columns(parts.meta_grad, step),
        }
        s.iteration += 1
        s.recent = (s.recent + data.rollout.episodes.returns)[-20:]
        run.log(s.global_step, row, progress)
        run.maybe_checkpoint(s.iteration, lambda: s.to_checkpoint(parts, cfg))
    tensors = [*s.theta.values(), *s.eta.values(), s.critics.flat]
    parts.par.check_same(tensors, "theta, eta and the critics")
    run.checkpoint(s.to_checkpoint(parts, cfg))
    extra = {"meta_grad": cfg.meta_grad, "meta_steps_skipped": s.meta_steps_skipped}
    return run.finish(parts.collector, extra, s.global_step, s.iteration, s.recent)


def check_diverged(state: BilevelState, data: Collected) -> None:
    """Raise :class:`DivergenceError` when the policy round left ``theta`` non-finite."""
    bad = [k for k, v in state.theta.items() if not bool(torch.isfinite(v).all())]
    if bad:
        eps = data.rollout.episodes.returns
        ret = f"{np.mean(eps):.1f}" if eps else "none finished"
        raise DivergenceError(
            f"training diverged at iteration {state.iteration + 1} (step {state.global_step}): "
            f"the policy round left theta{bad} non-finite (the batch's mean return was {ret}); "
            "--resume restarts from the last checkpoint, a lower --lr or --max-grad-norm "
            "may avoid it"
        )
