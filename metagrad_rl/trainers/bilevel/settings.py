"""The values the bilevel steps read (:class:`StepSettings`), taken from the config once.

:func:`~metagrad_rl.trainers.bilevel.build.build` reads them off the
:class:`~metagrad_rl.trainers.bilevel.config.BilevelConfig` into ``parts.settings``; the steps
(collect, the validation, policy, critic and fused rounds, the log row) read only these. The
config itself goes no further than ``build``, the run directory and the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepSettings:
    """What the steps of one bilevel iteration read (each field is the config's of that name).

    Rollout: ``num_steps`` per env and ``batch_size`` in all, on ``device``; ``conditioning``
    of the policy. Returns: ``gamma``, ``gae_lambda``; the mixed reward ``r_ex_coef r_ex +
    r_in_coef r_in``. The policy round's schedule: ``update_epochs`` x ``num_minibatches``, of
    ``num_iterations`` in the run, its step size ``lr`` (annealed when ``anneal_lr``) and
    ``surrogate``. PPO's ``clip_coef`` (the value loss's too when ``clip_vloss``) and
    ``norm_adv``. The validation round: ``denominator``, ``eta_lr`` and the baseline's
    ``baseline_decay``.
    """

    num_steps: int
    batch_size: int
    device: str
    conditioning: str
    gamma: float
    gae_lambda: float
    r_ex_coef: float
    r_in_coef: float
    update_epochs: int
    num_minibatches: int
    num_iterations: int
    lr: float
    anneal_lr: bool
    surrogate: str
    clip_coef: float
    clip_vloss: bool
    norm_adv: bool
    denominator: str
    eta_lr: float
    baseline_decay: float

    @classmethod
    def of(cls, cfg: Any) -> StepSettings:
        """The settings of the config ``cfg`` (its fields of the same names)."""
        names = cls.__dataclass_fields__
        return cls(**{name: getattr(cfg, name) for name in names})
