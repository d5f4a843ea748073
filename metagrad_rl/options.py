"""How the engine computes a meta-gradient: :class:`MetaGradOptions`, checked once when built.

:func:`~metagrad_rl.metagrad.meta_gradient`, :func:`~metagrad_rl.metagrad.start_meta_gradient`
and :func:`~metagrad_rl.verify.verify_meta_gradient` take the same settings (which surrogate,
which denominator, truncation, checkpointing, ...). They are the fields of one frozen
dataclass: each function accepts them as keywords (``meta_gradient(..., truncate=3)``), as an
``options=`` object, or both (the keywords then replace the object's fields), and hands the one
object on to the unroll and the reverse pass. A bad value is one
:class:`~metagrad_rl.errors.ConfigError` line, raised when the options are built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

from metagrad_rl.errors import ConfigError
from metagrad_rl.meta_problem import InnerSurrogate

#: The outer ratio's denominator: ``pi_{theta_k, eta_i}`` (the paper's Eq 24) or
#: ``pi_{theta_{k+1}, eta_i}``.
DENOMINATORS = ("theta_k", "theta_k+1")

#: How a recomputed segment gets the inner loss's second-order products (``second_order``):
#: ``"reverse"`` re-runs it with ``create_graph=True`` and differentiates the gradients again
#: (reverse-over-reverse, the default: faster on the trainer's Hopper rounds, see
#: ``docs/results.md``); ``"forward"`` pulls each step back through the optimizer first order
#: and takes the Hessian products by ``torch.func.jvp`` of the inner gradient
#: (forward-over-reverse, :mod:`metagrad_rl.mixed_mode`). The same numbers.
SECOND_ORDER = ("reverse", "forward")


@dataclass(frozen=True)
class MetaGradOptions:
    """How a meta-gradient is computed: the settings the engine's entry points share.

    ``MetaGradOptions(truncate=3)`` passed as ``options=`` is the same as the keyword
    ``truncate=3``. Every field is checked when the object is built; ``surrogate`` is stored
    as an :class:`~metagrad_rl.meta_problem.InnerSurrogate`.
    """

    surrogate: InnerSurrogate | str = InnerSurrogate.PAPER
    """``"paper"`` or ``"detached"``: what the inner PPO ratio's denominator carries
    (:class:`~metagrad_rl.meta_problem.InnerSurrogate`)."""
    denominator: str = "theta_k"
    """``"theta_k"`` (the paper's Eq 24) or ``"theta_k+1"``: where the outer ratio's detached
    denominator is taken."""
    terms: bool = True
    """Split the result into Eq 11-14 (one backward pass) or compute only the total."""
    truncate: int | None = None
    """Differentiate through the last ``truncate`` inner steps only (truncated
    backpropagation): ``theta`` and the optimizer state where they begin are constants, so the
    result is the exact derivative of that function (see :func:`metagrad_rl.unroll.unroll`);
    ``None`` differentiates every step."""
    checkpoint_every: int | str | None = None
    """``None`` keeps every inner step's graph until the backward pass (memory linear in the
    steps); an int ``k`` keeps only a checkpoint (parameters and optimizer state) every ``k``
    inner steps and each round's prepared data, and re-runs one segment at a time in the
    backward pass (memory ``k`` steps' graph plus the checkpoints, one more forward pass of
    time); ``"auto"`` takes ``k ~ sqrt(steps)``. The same numbers
    (:mod:`metagrad_rl.recompute`)."""
    second_order: str = "reverse"
    """How the checkpointed pass takes the inner loss's second-order products in each
    recomputed segment: ``"reverse"`` (reverse-over-reverse, the segment re-run with
    ``create_graph=True``) or ``"forward"`` (forward-over-reverse, ``torch.func.jvp`` of the
    inner gradient, :mod:`metagrad_rl.mixed_mode`). The same numbers; reverse is the faster on
    the trainer's rounds (``docs/results.md``). ``"forward"`` needs ``checkpoint_every`` and
    one process."""
    flat_params: bool = True
    """Let the optimizer update ``theta`` as one flat vector (same numbers for element-wise
    optimizers and global-norm clipping, fewer ops; see :mod:`metagrad_rl.flat`). Use
    ``False`` for per-tensor transformations."""
    allow_graph_cuts: bool = False
    """Accept an optimizer with a part known to leave the autograd graph (TorchOpt's
    ``clip_grad_norm``, ``use_accelerated_op=True``); its factors are then constants in the
    derivative, which is not the derivative of the update that ran, and ``result.notes`` says
    so. By default such an optimizer is a ``ConfigError`` naming the differentiable
    replacement (:func:`metagrad_rl.optim.clip_grad_norm`)."""
    memory_budget_bytes: int | None = None
    """Stop with :class:`~metagrad_rl.memory.MemoryBudgetError` before an unroll estimated to
    need more (``None``: 80% of the available memory)."""
    measure_memory: bool = False
    """Record the bytes held by the autograd graph (``diagnostics["graph_bytes"]``); adds a
    Python hook per saved tensor."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "surrogate", check_surrogate(self.surrogate))
        check_denominator(self.denominator)
        check_truncate(self.truncate)
        check_checkpoint_every(self.checkpoint_every)
        check_second_order(self.second_order, self.checkpoint_every)
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ConfigError(
                f"memory_budget_bytes={self.memory_budget_bytes} is invalid: expected > 0"
            )

    @classmethod
    def of(cls, options: MetaGradOptions | None = None, **keywords: Any) -> MetaGradOptions:
        """``options`` (default: every field at its default) with ``keywords`` replacing
        fields; an unknown keyword is a ``TypeError``, as for any function."""
        base = cls() if options is None else options
        if not isinstance(base, MetaGradOptions):
            raise ConfigError(
                f"options is a {type(base).__name__}: expected a MetaGradOptions or None"
            )
        unknown = sorted(set(keywords) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(
                f"unexpected keyword argument {unknown[0]!r}: expected a field of "
                f"MetaGradOptions ({', '.join(f.name for f in dataclasses.fields(cls))})"
            )
        return dataclasses.replace(base, **keywords) if keywords else base


class MetaGradKeywords(TypedDict, total=False):
    """The fields of :class:`MetaGradOptions` as keywords (for the type of ``**keywords``)."""

    surrogate: InnerSurrogate | str
    denominator: str
    terms: bool
    truncate: int | None
    checkpoint_every: int | str | None
    second_order: str
    flat_params: bool
    allow_graph_cuts: bool
    memory_budget_bytes: int | None
    measure_memory: bool


def check_surrogate(surrogate: Any) -> InnerSurrogate:
    """An :class:`~metagrad_rl.meta_problem.InnerSurrogate` or its name."""
    try:
        return InnerSurrogate(surrogate)
    except ValueError:
        raise ConfigError(
            f"surrogate={surrogate!r} is invalid: expected one of "
            f"{[s.value for s in InnerSurrogate]}"
        ) from None


def check_denominator(denominator: Any) -> None:
    """One of :data:`DENOMINATORS`."""
    if denominator not in DENOMINATORS:
        raise ConfigError(f"denominator={denominator!r} is invalid: expected one of {DENOMINATORS}")


def check_truncate(truncate: Any) -> None:
    """``None`` (the whole unroll) or a number of last inner steps ``>= 0``."""
    if truncate is not None and (
        isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 0
    ):
        raise ConfigError(
            f"truncate={truncate!r} is invalid: expected None (every inner step) or an int >= 0 "
            "(differentiate through the last `truncate` inner steps only)"
        )


def check_checkpoint_every(checkpoint_every: Any) -> None:
    """``None`` (keep the whole graph), ``"auto"`` or an int ``>= 1``."""
    ok = checkpoint_every is None or checkpoint_every == "auto"
    ok = ok or (
        isinstance(checkpoint_every, int)
        and not isinstance(checkpoint_every, bool)
        and checkpoint_every >= 1
    )
    if not ok:
        raise ConfigError(
            f"checkpoint_every={checkpoint_every!r} is invalid: expected None (keep every "
            "step's graph), 'auto' (about sqrt(inner steps)) or an int >= 1 (inner steps per "
            "recomputed segment)"
        )


def check_second_order(second_order: Any, checkpoint_every: Any) -> None:
    """``"reverse"`` or ``"forward"``; ``"forward"`` needs the checkpointed pass, one process."""
    if second_order not in SECOND_ORDER:
        raise ConfigError(
            f"second_order={second_order!r} is invalid: expected 'reverse' (reverse-over-reverse "
            "Hessian products in each recomputed segment) or 'forward' (forward-over-reverse: "
            "torch.func.jvp of the inner gradient)"
        )
    if second_order == "reverse":
        return
    if checkpoint_every is None:
        raise ConfigError(
            "second_order='forward' needs checkpoint_every (the checkpointed reverse pass); "
            "the stored graph is differentiated reverse-over-reverse: pass "
            "checkpoint_every='auto' or leave second_order='reverse'"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            raise ConfigError(
                "second_order='forward' does not support data-parallel workers (a process "
                "group of more than one): the inner loss's collectives do not run under "
                "torch.func.jvp; use second_order='reverse'"
            )


def segment_length(checkpoint_every: int | str, n_steps: int) -> int:
    """The ``k`` of ``checkpoint_every`` for an unroll of ``n_steps`` inner steps."""
    if checkpoint_every == "auto":
        return max(1, math.ceil(math.sqrt(max(n_steps, 1))))
    return int(checkpoint_every)
