"""What a bilevel run holds: its fixed :class:`Parts`, the :class:`BilevelState` that changes
(and is checkpointed), the pending :class:`RoundRecord`, one iteration's :class:`Collected`
rollout and the :class:`MetaStep` a validation round applies."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from metagrad_rl.metagrad import PendingMetaGradient
from metagrad_rl.networks import Critic, IntrinsicReward, Policy, condition_for
from metagrad_rl.pytree import Params
from metagrad_rl.rollout import Batch, Collector, Rollout
from metagrad_rl.trainers import meta_grads, parallel
from metagrad_rl.trainers.bilevel.config import BilevelConfig
from metagrad_rl.trainers.bilevel.settings import StepSettings
from metagrad_rl.trainers.common import (
    FlatParams,
    optimizer_state_from_list,
    optimizer_state_to_list,
    policy_snapshot,
    to_device,
)
from metagrad_rl.trainers.meta_grad_pieces import UnrollInputs
from metagrad_rl.unroll import MetaProblem


def policy_condition(hp: Any, eta: Params) -> Tensor | None:
    """The policy's conditioning input at ``eta`` (``cln_condition(eta)``, a constant; ``None``
    for a policy that is not conditioned); ``hp``: the step settings or the config (its
    ``conditioning``)."""
    cond = condition_for(hp.conditioning, eta)
    return None if cond is None else cond.detach()


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
    settings: StepSettings
    """The values the steps read (:class:`~metagrad_rl.trainers.bilevel.settings.StepSettings`),
    from the config."""
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
    (:func:`~metagrad_rl.trainers.bilevel.fused.critic_stack_order`)."""
    unroll_inputs: UnrollInputs | None = None
    """What the estimator's unroll starts from: ``problem``, the inner optimizer at a recorded
    round (:func:`~metagrad_rl.trainers.bilevel.build.round_optimizer`), the look-ahead steps
    and the surrogate."""


@dataclass
class RoundRecord:
    """A policy round in flight: what its validation round needs to differentiate it.

    ``theta`` is ``theta_k``, ``opt_state`` the optimizer state there (checkpoint form),
    ``batch`` the round batch ``tau_k``
    (:func:`~metagrad_rl.trainers.bilevel.collect.round_batch`), ``minibatches`` the index
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
                policy_condition(cfg, self.eta),
                act_dim=parts.collector.envs.act_dim,
                kind=cfg.policy,
            ),
        }

    def restored(self, ckpt: dict[str, Any], parts: Parts, device: str = "cpu") -> BilevelState:
        """This state with the checkpoint's values; the envs, normalisers and RNGs of ``parts``
        (and torch's) are set to the checkpoint's too."""
        theta_state = optimizer_state_from_list(self.theta_state, ckpt["theta_state"])
        critic_state = optimizer_state_from_list(self.critic_state, ckpt["critic_state"])
        eta_state = optimizer_state_from_list(self.eta_state, ckpt["eta_state"])
        critics = self.critics.copy()
        critics.load_state_dict(ckpt["critics"])
        parts.collector.load_state_dict(ckpt["collector"])
        parts.update_gen.set_state(ckpt["update_gen"])
        torch.set_rng_state(ckpt["torch_rng"])
        history = [
            RoundRecord.from_checkpoint(to_device(d, device)) for d in ckpt.get("history", [])
        ]
        parts.par.resumed(ckpt, parts.collector)
        return replace(
            self,
            theta=to_device(ckpt["theta"], device),
            eta=to_device(ckpt["eta"], device),
            critics=critics,
            theta_state=theta_state,
            critic_state=critic_state,
            eta_state=eta_state,
            global_step=int(ckpt["global_step"]),
            iteration=int(ckpt["iteration"]),
            pending=RoundRecord.from_checkpoint(to_device(ckpt["pending"], device)),
            history=[r for r in history if r is not None],
            baseline=ckpt.get("baseline"),
            meta_steps_skipped=int(ckpt.get("meta_steps_skipped", 0)),
            recent=list(ckpt["recent_returns"]),
        )


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
