"""A user's bilevel problem as the engine sees it, and the paths by which ``eta`` reaches it.

A problem is a :class:`MetaProblem` of three pure functions (``prepare``, ``inner_loss``,
``outer_loss``; :mod:`metagrad_rl.problems` has the built-in PPO/CLN one), unrolled over
:class:`Round` s (a round's batch and its ordered minibatches, e.g. PPO's schedule
:func:`minibatch_indices`). :class:`InnerSurrogate` says what the inner PPO ratio's denominator
carries.

``eta`` reaches the unroll through four *paths*, one per term of the meta-gradient
(Eq 11-14). :class:`EtaPaths` holds one ``eta`` dict per path; passing the same tensors for
every path gives the ordinary total derivative, passing separate leaves splits it into terms in
one backward pass (the total derivative is the sum of the partial derivatives along the paths).
"""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metagrad_rl.errors import ConfigError
from metagrad_rl.pytree import BatchDict, Params, take


class InnerSurrogate(enum.StrEnum):
    """What the PPO ratio's denominator ``pi_{theta_k, eta}`` carries in the inner step.

    - ``PAPER`` (``"paper"``): the denominator is a stop-gradient for the *inner* step (the
      inner gradient is taken w.r.t. the current ``theta`` only) but is still a function of
      ``theta_k(eta)`` and ``eta`` at the meta level. At the first inner step the ratio is
      identically 1 in ``eta``, and the update's derivatives are exactly the paper's
      ``E[d^2 log pi / dtheta deta A]`` (Eq 12) and ``E[d^2 log pi / dtheta^2 A]`` (Eq 14):
      the sampling expectation is treated as fixed.
    - ``DETACHED`` (``"detached"``): the usual ``old_logp.detach()``: the denominator is a
      constant everywhere, so the ratio ``exp(log pi_{theta, eta} - c)`` varies with ``eta``
      and the meta-gradient gains score-product terms
      ``E[grad_eta log pi grad_theta log pi^T A]`` absent from the paper's expansion.
    """

    PAPER = "paper"
    DETACHED = "detached"


@dataclass(frozen=True)
class MetaProblem:
    """A bilevel problem: three pure functions in which ``eta`` enters by keyword.

    ``prepare(batch, *, eta_reward, theta_old, eta_policy_old) -> dict``
        Per-round data computed once per round from the round's batch: the intrinsic
        advantages (``eta_reward``, the Eq 13 path) and the ratio's denominator
        ``log pi_{theta_old, eta_policy_old}`` (its graph is set by :class:`InnerSurrogate`).
        Every returned tensor has the minibatch index as its leading dimension.
    ``inner_loss(theta, minibatch, *, eta_policy) -> Tensor``
        The inner (policy-round) loss on one minibatch of ``prepare``'s output; ``eta_policy``
        is the policy's conditioning (the Eq 12 path).
    ``outer_loss(theta, batch, *, eta_policy, theta_den, eta_den) -> Tensor``
        The outer (validation-round) loss ``L_out = -J_ex`` on the outer batch;
        ``eta_policy`` is the Eq 11 path; ``theta_den``/``eta_den`` are detached parameters
        of the ratio's denominator (Eq 24).
    """

    prepare: Callable[..., dict[str, Tensor]]
    inner_loss: Callable[..., Tensor]
    outer_loss: Callable[..., Tensor]
    #: Optional ``{name: shape}`` of the expected ``theta`` and ``eta``: when given, the engine
    #: checks the dicts it is handed against them and names any mismatch.
    theta_spec: Mapping[str, tuple[int, ...]] | None = None
    eta_spec: Mapping[str, tuple[int, ...]] | None = None
    #: Optional ``log_likelihood(theta, batch, *, eta_policy) -> Tensor``: ``log p(batch)``
    #: under ``pi_{theta, eta}`` (the sum of the actions' log-probabilities), for the
    #: sampling-aware score-function term (``docs/estimators.md``).
    log_likelihood: Callable[..., Tensor] | None = None
    #: Optional ``minibatch_data(data, minibatches) -> list[dict]``: quantities of each of a
    #: round's minibatches computed once from ``prepare``'s output ``data`` and the round's
    #: order; the engine merges entry ``j`` into minibatch ``j`` before ``inner_loss`` sees it.
    #: Differentiated like ``data``. For instance the advantage statistics of every minibatch
    #: over several workers' union, in two collectives for the round instead of two per step
    #: (:func:`metagrad_rl.problems.ppo_meta_problem` with ``sum_over_workers``).
    minibatch_data: Callable[..., list[dict[str, Tensor]]] | None = None

    def __post_init__(self) -> None:
        for role in SIGNATURES:
            fn = getattr(self, role)
            if fn is not None or role not in OPTIONAL:
                check_signature(role, fn)


#: What the engine calls each of :class:`MetaProblem`'s functions with: positional arguments,
#: then keywords (a function may accept more, with defaults or ``**kwargs``).
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("batch",), ("eta_reward", "theta_old", "eta_policy_old")),
    "inner_loss": (("theta", "minibatch"), ("eta_policy",)),
    "outer_loss": (("theta", "batch"), ("eta_policy", "theta_den", "eta_den")),
    "log_likelihood": (("theta", "batch"), ("eta_policy",)),
    "minibatch_data": (("data", "minibatches"), ()),
}
#: The functions a :class:`MetaProblem` may leave out (``None``).
OPTIONAL = ("log_likelihood", "minibatch_data")


def round_extras(
    problem: MetaProblem, data: Mapping[str, Tensor], minibatches: Sequence[Tensor]
) -> list[dict[str, Tensor]] | None:
    """``problem.minibatch_data(data, minibatches)``, checked (``None`` without one)."""
    if problem.minibatch_data is None:
        return None
    extras = list(problem.minibatch_data(data, list(minibatches)))
    if len(extras) != len(minibatches):
        raise ConfigError(
            f"minibatch_data returned {len(extras)} entries for a round of "
            f"{len(minibatches)} minibatches: expected one dict per minibatch"
        )
    return extras


def minibatch_of(
    data: Mapping[str, Tensor],
    minibatches: Sequence[Tensor],
    j: int,
    extras: Sequence[Mapping[str, Tensor]] | None,
) -> Params:
    """Minibatch ``j`` of a round: rows ``minibatches[j]`` of ``data`` (0-d tensors as they
    are), with :func:`round_extras`' entry ``j`` merged in."""
    mb = take(data, minibatches[j])
    return mb if extras is None else {**mb, **extras[j]}


def check_signature(role: str, fn: Any) -> None:
    """One :class:`ConfigError` unless ``fn`` can be called as :data:`SIGNATURES` ``[role]``.

    Names the function, the keyword it lacks (or the argument it requires that the engine
    never passes) and the expected signature. A callable whose signature Python cannot read
    (some builtins) is accepted as it is.
    """
    positional, keywords = SIGNATURES[role]
    kw = f", *, {', '.join(keywords)}" if keywords else ""
    expected = f"{role}({', '.join(positional)}{kw})"
    if not callable(fn):
        raise ConfigError(
            f"MetaProblem's {role} is not callable ({type(fn).__name__}): expected {expected}"
        )
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    name = getattr(fn, "__name__", None) or type(fn).__name__
    params = sig.parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    missing = [k for k in keywords if k not in named and not takes_any]
    if missing:
        raise ConfigError(
            f"MetaProblem's {role} {name}{sig} does not take the keyword {missing[0]!r}: "
            f"expected {expected}"
        )
    try:
        sig.bind(*positional, **dict.fromkeys(keywords))
    except TypeError as err:
        raise ConfigError(
            f"MetaProblem's {role} {name}{sig} cannot be called the way the engine calls it "
            f"({err}): expected {expected}"
        ) from None


class Round(NamedTuple):
    """One policy round: its batch and the ordered minibatch index tensors of its steps."""

    batch: BatchDict
    minibatches: Sequence[Tensor]


class EtaPaths(NamedTuple):
    """One ``eta`` dict per path through which ``eta`` reaches the outer loss.

    - ``outer``: the policy conditioning in the outer loss (Eq 11);
    - ``policy``: the policy conditioning inside the last round (numerator and, for
      ``InnerSurrogate.PAPER``, denominator of the ratio) (Eq 12);
    - ``reward``: the intrinsic advantages of the last round (Eq 13);
    - ``early``: everything in the rounds before the last one, i.e. ``theta_k(eta)`` (Eq 14).
    """

    outer: Params
    policy: Params
    reward: Params
    early: Params

    @classmethod
    def shared(cls, eta: Params) -> EtaPaths:
        """The same ``eta`` on every path: gradients of it are total derivatives."""
        return cls(eta, eta, eta, eta)

    @classmethod
    def leaves(cls, eta: Mapping[str, Tensor]) -> EtaPaths:
        """Four independent leaf copies of ``eta``, one per path (for the term split)."""

        def leaf() -> Params:
            return {k: v.detach().clone().requires_grad_(True) for k, v in eta.items()}

        return cls(leaf(), leaf(), leaf(), leaf())


def minibatch_indices(
    n: int, epochs: int, num_minibatches: int, generator: torch.Generator | None = None
) -> list[Tensor]:
    """PPO's schedule: ``epochs`` shuffles of ``range(n)`` cut into ``num_minibatches``."""
    if n <= 0 or epochs <= 0 or num_minibatches <= 0 or num_minibatches > n:
        raise ConfigError(
            f"cannot cut {n} samples into {num_minibatches} minibatches for {epochs} epochs: "
            "expected n >= num_minibatches >= 1 and epochs >= 1"
        )
    size = math.ceil(n / num_minibatches)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        out += [perm[s : s + size] for s in range(0, n, size)]
    return out
