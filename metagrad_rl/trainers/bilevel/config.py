"""The bilevel trainers' hyperparameters: PPO's plus the intrinsic reward and its meta-gradient.

:class:`CLNConfig` (``--algo cln``) and :class:`LIRPGConfig` (``--algo lirpg``) differ in the
policy's conditioning and in their defaults; ``ALGO`` names each in the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metagrad_rl import config as C
from metagrad_rl.errors import ConfigError
from metagrad_rl.trainers import meta_grads
from metagrad_rl.trainers.ppo import PPOConfig
from metagrad_rl.unroll import InnerSurrogate


@dataclass
class BilevelConfig(PPOConfig):
    """PPO's hyperparameters plus the intrinsic reward and its meta-gradient."""

    ALGO: ClassVar[str] = "bilevel"

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

    ALGO: ClassVar[str] = "cln"
    CONDITIONINGS: ClassVar[tuple[str, ...]] = ("cln",)
    conditioning: str = "cln"
    """Normalisation of the policy's last hidden layer: cln (conditioned on eta)."""


@dataclass
class LIRPGConfig(BilevelConfig):
    """LIRPG: an unconditioned policy, Eq 13 by a one-step look-ahead (published defaults)."""

    ALGO: ClassVar[str] = "lirpg"

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
