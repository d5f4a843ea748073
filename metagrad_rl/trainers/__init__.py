"""Trainers, one file per algorithm, and the registry the CLI reads.

To add an algorithm, write ``trainers/<name>.py`` with a config dataclass (a docstring under each
field; validated in ``__post_init__``) and ``train(config, out, resume, progress, stop_at_step)``,
then add one :class:`Algo` line to :data:`ALGOS`. ``metagrad-rl train --algo <name>`` then takes
one ``--flag`` per config field.
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


ALGOS: dict[str, Algo] = {
    "ppo": Algo(ppo.PPOConfig, ppo.train, "PPO with CleanRL's MuJoCo details (the baseline)"),
    "cln": Algo(
        bilevel.CLNConfig,
        bilevel.train,
        "CLN-conditioned policy, intrinsic reward by meta-gradient (--meta-grad eq17|lirpg|"
        "three-term|exact)",
    ),
    "lirpg": Algo(
        bilevel.LIRPGConfig,
        bilevel.train,
        "LIRPG: unconditioned policy, intrinsic reward by Eq 13 (--meta-grad lirpg|exact)",
    ),
}
