"""Trainers, one file per algorithm, and the registries the CLI reads.

To add an algorithm, write ``trainers/<name>.py`` with a config dataclass (a docstring under each
field; validated in ``__post_init__``) and ``train(config, out, resume, progress, stop_at_step)``,
then add one :class:`Algo` line to :data:`ALGOS`. ``metagrad-rl train --algo <name>`` then takes
one ``--flag`` per config field. The bilevel trainers' ``--meta-grad`` estimators are the
entries of :data:`metagrad_rl.trainers.meta_grads.META_GRADS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metagrad_rl.trainers import bilevel, ppo


@dataclass(frozen=True)
class Algo:
    """A trainable algorithm: its config dataclass, train function and a one-line description."""

    config_cls: type
    train: Callable[..., dict[str, Any]]
    help: str


def _meta_grads(cfg: type[bilevel.BilevelConfig]) -> str:
    return "|".join(cfg.field_choices()["meta_grad"])


ALGOS: dict[str, Algo] = {
    "ppo": Algo(ppo.PPOConfig, ppo.train, "PPO with CleanRL's MuJoCo details (the baseline)"),
    "cln": Algo(
        bilevel.CLNConfig,
        bilevel.train,
        f"CLN-conditioned policy, intrinsic reward by meta-gradient "
        f"(--meta-grad {_meta_grads(bilevel.CLNConfig)})",
    ),
    "lirpg": Algo(
        bilevel.LIRPGConfig,
        bilevel.train,
        f"LIRPG: unconditioned policy, intrinsic reward by Eq 13 "
        f"(--meta-grad {_meta_grads(bilevel.LIRPGConfig)})",
    ),
}
