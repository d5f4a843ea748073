"""Bilevel trainers: CLN (Stadie, Zhang, Ba 2020) and LIRPG (Zheng et al. 2018) on MuJoCo.

Per iteration, reading like the paper's algorithm (Section 3.3); :func:`train` (``loop.py``) is
this loop over named steps, each taking the :class:`BilevelState` and returning the changed one::

    collect            tau_k ~ pi_{theta_k, eta_i}                                collect.py
    validation_round   (Eq 24) finish the meta-gradient of the pending policy     validation.py
                       round on tau_k and step eta_i -> eta_{i+1} with the chosen
                       estimator
    record_round,      (Eq 23) PPO-clip on the intrinsic (mixed) advantages of    policy.py
    policy_round       tau_k with eta_{i+1}: theta_k -> theta_{k+1}; recorded as
                       the next pending :class:`RoundRecord` (differentiable when
                       the estimator needs it)
    critic_round       V_mix (mixed returns) and V_ex (extrinsic returns)         critics.py
                       regress on tau_k
    fused_round        policy and critic round in one pass, when the estimator    fused.py
                       does not differentiate the real round
    log, checkpoint    :func:`~logs.iteration_row`, :class:`~metagrad_rl.trainers.run.Run`

Config in ``config.py``, the values the steps read in ``settings.py`` (the config stops at
``build``), state and records in ``state.py``, the networks, optimizers and envs
in ``build.py``; how an estimator starts and finishes is its own
(:mod:`metagrad_rl.trainers.meta_grad_pieces`).

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
- ``dice``: the same correction without a baseline, through DiCE's magic box (its first
  derivative; ``metagrad_rl.score_function.magic_box``).

Every estimator is one registry entry; adding one does not touch this package.
"""

from metagrad_rl.trainers.bilevel.build import (
    build,
    build_problem,
    policy_optimizer,
    round_optimizer,
)
from metagrad_rl.trainers.bilevel.collect import (
    collect,
    intrinsic_rewards,
    mixed_advantages,
    outer_batch,
    round_batch,
)
from metagrad_rl.trainers.bilevel.config import BilevelConfig, CLNConfig, LIRPGConfig
from metagrad_rl.trainers.bilevel.critics import critic_round, value_losses, value_targets
from metagrad_rl.trainers.bilevel.fused import critic_stack_order, fused_round
from metagrad_rl.trainers.bilevel.logs import intrinsic_episode_returns, iteration_row
from metagrad_rl.trainers.bilevel.loop import check_diverged, train
from metagrad_rl.trainers.bilevel.policy import (
    policy_round,
    record_round,
    round_schedule,
)
from metagrad_rl.trainers.bilevel.settings import StepSettings
from metagrad_rl.trainers.bilevel.state import (
    BilevelState,
    Collected,
    MetaStep,
    Parts,
    RoundRecord,
    policy_condition,
)
from metagrad_rl.trainers.bilevel.validation import (
    meta_step,
    reward_scale,
    score_weight,
    validation_round,
)

__all__ = [
    "BilevelConfig",
    "BilevelState",
    "CLNConfig",
    "Collected",
    "LIRPGConfig",
    "MetaStep",
    "Parts",
    "RoundRecord",
    "StepSettings",
    "build",
    "build_problem",
    "check_diverged",
    "collect",
    "critic_round",
    "critic_stack_order",
    "fused_round",
    "intrinsic_episode_returns",
    "intrinsic_rewards",
    "iteration_row",
    "meta_step",
    "mixed_advantages",
    "outer_batch",
    "policy_condition",
    "policy_optimizer",
    "policy_round",
    "record_round",
    "reward_scale",
    "round_batch",
    "round_optimizer",
    "round_schedule",
    "score_weight",
    "train",
    "validation_round",
    "value_losses",
    "value_targets",
]
