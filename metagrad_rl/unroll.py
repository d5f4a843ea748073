"""The inner loop as differentiable TorchOpt updates (Eq 6-7 and Eq 23 of the paper).

A *round* is one PPO policy round: the batch ``tau_k`` sampled by ``pi_{theta_k, eta}`` and
the ordered minibatches (epochs x minibatches) that update ``theta_k -> theta_{k+1}``. The
unroll runs ``R >= 1`` consecutive rounds with any TorchOpt gradient transformation, each
step written as TorchOpt's three-line differentiable step::

    grads = torch.autograd.grad(loss, theta, create_graph=True)
    updates, state = tx.update(grads, state, params=theta, inplace=False)
    theta = torchopt.apply_updates(theta, updates, inplace=False)

``eta`` reaches the unroll through four *paths*, one per term of the meta-gradient
(Eq 11-14). :class:`EtaPaths` holds one ``eta`` dict per path; passing the same tensors for
every path gives the ordinary total derivative, passing separate leaves splits it into terms in
one backward pass (the total derivative is the sum of the partial derivatives along the paths).

A user's problem is a :class:`MetaProblem` of three pure functions (``prepare``,
``inner_loss``, ``outer_loss``); :mod:`metagrad_rl.problems` has the built-in PPO/CLN one.
"""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor

from metagrad_rl.errors import ConfigError, DivergenceError
from metagrad_rl.flat import FLAT_KEY, FlatLayout
from metagrad_rl.pytree import BatchDict, Params, detach, take


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

    def __post_init__(self) -> None:
        for role in SIGNATURES:
            fn = getattr(self, role)
            if fn is not None or role != "log_likelihood":
                check_signature(role, fn)


#: What the engine calls each of :class:`MetaProblem`'s functions with: positional arguments,
#: then keywords (a function may accept more, with defaults or ``**kwargs``).
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("batch",), ("eta_reward", "theta_old", "eta_policy_old")),
    "inner_loss": (("theta", "minibatch"), ("eta_policy",)),
    "outer_loss": (("theta", "batch"), ("eta_policy", "theta_den", "eta_den")),
    "log_likelihood": (("theta", "batch"), ("eta_policy",)),
}


def check_signature(role: str, fn: Any) -> None:
    """One :class:`ConfigError` unless ``fn`` can be called as :data:`SIGNATURES` ``[role]``.

    Names the function, the keyword it lacks (or the argument it requires that the engine
    never passes) and the expected signature. A callable whose signature Python cannot read
    (some builtins) is accepted as it is.
    """
    positional, keywords = SIGNATURES[role]
    expected = f"{role}({', '.join(positional)}, *, {', '.join(keywords)})"
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


class Anchor(NamedTuple):
    """The point ``eta_i`` at which the stop-gradient quantities are frozen.

    Detached denominators (Eq 24's ``pi_{theta_k, eta_i}``, and the inner ratio's for
    ``InnerSurrogate.DETACHED``) are *constants*: values at ``eta_i``, not functions of the
    ``eta`` being differentiated. Autograd gets this right by detaching; a finite-difference
    check must hold them fixed explicitly, which is what an anchor is for
    (:func:`anchor_at`).
    """

    eta: Params
    round_starts: list[Params]
    theta_next: Params
    #: ``(theta, opt_state)`` where a truncated unroll starts differentiating (else ``None``).
    cut: tuple[Params, Any] | None = None


class UnrollResult(NamedTuple):
    """Output of :func:`unroll`: final parameters, optimizer state, round starts, trace."""

    theta: Params
    opt_state: Any
    round_starts: list[Params]
    #: Did any inner gradient entry come out exactly 0 (where ``sqrt(v)`` of an Adam-family
    #: optimizer without ``eps_root`` has no derivative)? Used to explain a non-finite backward.
    saw_zero_gradient: bool = False


class StepTrace:
    """Per inner step, flags kept as tensors (one sync per round, not one per step).

    ``loss finite``, ``gradient finite``, ``theta finite after the step``, ``gradient has an
    exact zero``, and ``max |theta|`` before the step; :meth:`check` names the first step at
    which a value stopped being finite, and whether ``theta`` had run away before it.
    """

    #: ``max |theta|`` above which a non-finite value is blamed on a diverging optimizer.
    RUNAWAY = 1e15

    def __init__(self) -> None:
        self.flags: list[Tensor] = []
        self.sizes: list[Tensor] = []
        self.where: list[tuple[int, int]] = []
        self.losses: list[Tensor] = []

    def record(
        self, r: int, j: int, loss: Tensor, grads: Sequence[Tensor], before: Params, x: Params
    ) -> None:
        self.where.append((r, j))
        self.losses.append(loss.detach())
        self.sizes.append(torch.stack([v.detach().abs().max() for v in before.values()]).max())
        self.flags.append(
            torch.stack(
                [
                    torch.isfinite(loss.detach()),
                    torch.stack([torch.isfinite(g.detach()).all() for g in grads]).all(),
                    torch.stack([torch.isfinite(v.detach()).all() for v in x.values()]).all(),
                    torch.stack([(g.detach() == 0).any() for g in grads]).any(),
                ]
            )
        )

    def check(self) -> bool:
        """Raise at the first non-finite value (:class:`DivergenceError` when the updates ran away,
        :class:`ConfigError` when the loss or its derivative is itself not finite); return
        ``saw_zero``."""
        if not self.flags:
            return False
        flags = torch.stack(self.flags).cpu()
        ok = flags[:, :3].all(dim=1)
        if bool(ok.all()):
            return bool(flags[:, 3].any())
        i = int((~ok).nonzero()[0])
        (r, j), loss, size = self.where[i], float(self.losses[i]), float(self.sizes[i])
        at = f"round {r}, inner step {j}"
        if size > self.RUNAWAY or not bool(flags[i, 2]) and bool(flags[i, :2].all()):
            raise DivergenceError(
                f"theta became non-finite at {at}: the optimizer's updates diverged (max |theta| "
                f"was {size:.3g} before this step, its loss {loss:.6g}); lower the step size"
            )
        if not bool(flags[i, 0]):
            raise ConfigError(
                f"inner_loss returned {loss} at {at}: the inner loss itself is not finite "
                f"(max |theta| {size:.3g}; check the loss for log/sqrt/division of invalid values)"
            )
        raise ConfigError(
            f"the inner gradient at {at} is not finite although the loss is ({loss:.6g}): the "
            "inner loss has an infinite derivative there (e.g. sqrt or log at 0)"
        )


def check_prepared(data: Any, r: int, rnd: Round) -> None:
    """``prepare``'s output: a dict of finite tensors whose leading dimension the indices fit.

    A 0-d tensor is a per-round quantity shared by every minibatch; anything else must have
    the minibatch index as its leading dimension.
    """
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(f"prepare returned a {kind} for round {r}: expected a dict of tensors")
    need = 1 + max(int(idx.max()) for idx in rnd.minibatches)
    for k, v in data.items():
        if not isinstance(v, Tensor):
            raise ConfigError(
                f"prepare returned {type(v).__name__} for {k!r} (round {r}): expected a tensor"
            )
        if v.dim() > 0 and v.shape[0] < need:
            raise ConfigError(
                f"prepare returned {k!r} with shape {tuple(v.shape)} for round {r}, but the "
                f"minibatch indices reach {need - 1}: per-sample quantities need the sample "
                "index as their leading dimension (a 0-d tensor is shared by every minibatch)"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v.detach()).all()):
            raise ConfigError(
                f"prepare returned non-finite values in {k!r} for round {r} "
                f"({int((~torch.isfinite(v.detach())).sum())} of {v.numel()})"
            )


def inner_step(
    problem: MetaProblem,
    tx: torchopt.base.GradientTransformation,
    x: Params,
    opt_state: Any,
    minibatch: Mapping[str, Tensor],
    eta_policy: Params,
    create_graph: bool,
    view: Callable[[Params], Params] | None = None,
    trace: StepTrace | None = None,
    at: tuple[int, int] = (0, 0),
) -> tuple[Params, Any]:
    """One differentiable TorchOpt step ``theta_j -> theta_{j+1}`` on one minibatch.

    ``x`` is what the optimizer updates: ``theta`` itself, or ``{"theta": flat}`` with
    ``view`` giving the loss its dict of views (:mod:`metagrad_rl.flat`). ``trace`` records
    whether the step's values were finite (``at`` = (round, step) names it).
    """
    theta = x if view is None else view(x)
    loss = problem.inner_loss(theta, minibatch, eta_policy=eta_policy)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ConfigError(
            f"inner_loss returned {shape} at round {at[0]}, inner step {at[1]}: "
            "expected a scalar tensor (reduce the per-sample losses, e.g. with .mean())"
        )
    names = list(x)
    grads = torch.autograd.grad(loss, [x[n] for n in names], create_graph=create_graph)
    updates, opt_state = tx.update(dict(zip(names, grads)), opt_state, params=x, inplace=False)
    x_next = torchopt.apply_updates(x, updates, inplace=False)
    if trace is not None:
        trace.record(at[0], at[1], loss, grads, x, x_next)
    return x_next, opt_state


def prepare_round(
    problem: MetaProblem,
    batch: BatchDict,
    theta_k: Params,
    eta_policy: Params,
    eta_reward: Params,
    surrogate: InnerSurrogate,
    frozen: tuple[Params, Params] | None = None,
) -> dict[str, Tensor]:
    """Per-round data; the denominator follows ``theta_k, eta`` only for ``PAPER``.

    For ``DETACHED`` the denominator uses ``frozen = (theta_k, eta)`` at the anchor if given,
    else the detached current values (equal at the anchor).
    """
    if InnerSurrogate(surrogate) is InnerSurrogate.DETACHED:
        theta_old, eta_old = frozen or (detach(theta_k), detach(eta_policy))
    else:
        theta_old, eta_old = theta_k, eta_policy
    return problem.prepare(
        batch, eta_reward=eta_reward, theta_old=theta_old, eta_policy_old=eta_old
    )


def unroll(
    problem: MetaProblem,
    tx: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    paths: EtaPaths,
    rounds: Sequence[Round],
    opt_state: Any = None,
    surrogate: InnerSurrogate = InnerSurrogate.PAPER,
    create_graph: bool = True,
    anchor: Anchor | None = None,
    flat_params: bool = True,
    truncate: int | None = None,
) -> UnrollResult:
    """Run ``R = len(rounds)`` policy rounds as differentiable TorchOpt updates.

    ``theta`` is detached first (the meta-gradient is w.r.t. ``eta`` only); ``opt_state``
    defaults to ``tx.init(theta)``. Rounds before the last read ``paths.early``; the last
    reads ``paths.policy`` and ``paths.reward``. ``anchor`` freezes the detached
    denominators at another point (see :class:`Anchor`). With ``flat_params`` the optimizer
    updates one flat vector (:mod:`metagrad_rl.flat`; same result, fewer ops); ``opt_state``
    is given and returned per tensor either way.

    ``truncate=k`` differentiates through the last ``k`` inner steps only: ``theta`` and the
    optimizer state where they begin, and the round start of the round they begin in (its
    ``prepare`` denominator), are constants; ``eta`` still enters every step and ``prepare`` in
    the window. Values are unchanged; earlier steps run without a graph.
    """
    layout = FlatLayout(theta) if flat_params else None
    x: Params
    if layout is None:
        x = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
        view = None
        state = tx.init(x) if opt_state is None else opt_state
    else:
        x = {FLAT_KEY: layout.flatten(theta).detach().clone().requires_grad_(True)}
        view = _flat_view(layout)
        state = tx.init(x) if opt_state is None else layout.flatten_state(opt_state)
    n_steps = sum(len(rnd.minibatches) for rnd in rounds)
    cut = 0 if truncate is None else max(0, n_steps - truncate)
    starts: list[Params] = []
    trace = StepTrace()
    s = 0  # inner steps done, over all rounds
    for r, rnd in enumerate(rounds):
        if r > 0:
            trace.check()  # name a divergence before the next round's prepare meets it
        last = r == len(rounds) - 1
        eta_pol = paths.policy if last else paths.early
        eta_rew = paths.reward if last else paths.early
        if s == cut and cut > 0:  # the window starts with this round
            x, state = _restart(x, state, anchor, layout)
        theta_k = x if view is None else view(x)
        if s < cut:  # this round starts before the window: its start is a constant
            theta_k = anchor.round_starts[r] if anchor is not None else detach(theta_k)
            if s + len(rnd.minibatches) <= cut:  # and it ends there: no graph at all
                eta_pol, eta_rew = detach(eta_pol), detach(eta_rew)
        starts.append(theta_k)
        frozen = None if anchor is None else (anchor.round_starts[r], anchor.eta)
        data = prepare_round(problem, rnd.batch, theta_k, eta_pol, eta_rew, surrogate, frozen)
        check_prepared(data, r, rnd)
        # The inner gradient must not flow into the denominator computed from theta_k:
        # give the first step its own node, equal in value.
        x = {k: v.view_as(v) for k, v in x.items()}
        for j, idx in enumerate(rnd.minibatches):
            if j > 0 and s == cut:  # the window starts inside this round
                x, state = _restart(x, state, anchor, layout)
            graph = create_graph and s >= cut
            mb = take(data, idx)
            x, state = inner_step(problem, tx, x, state, mb, eta_pol, graph, view, trace, (r, j))
            s += 1
    saw_zero = trace.check()
    if layout is None:
        return UnrollResult(x, state, starts, saw_zero)
    theta_out = layout.unflatten(x[FLAT_KEY])
    return UnrollResult(theta_out, layout.unflatten_state(state), starts, saw_zero)


def _restart(
    x: Params, state: Any, anchor: Anchor | None, layout: FlatLayout | None
) -> tuple[Params, Any]:
    """Where a truncated unroll starts differentiating: ``theta`` and state as constants.

    They are the current values, or the anchor's (for finite differences of the truncated
    objective, whose constants must not move with ``eta``).
    """
    if anchor is not None and anchor.cut is not None:
        theta_c, state_c = anchor.cut
        if layout is None:
            x = dict(theta_c)
            state = state_c
        else:
            x = {FLAT_KEY: layout.flatten(theta_c)}
            state = layout.flatten_state(state_c)
    x = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
    return x, torchopt.pytree.tree_map(_detach_leaf, state)


def prefix_rounds(rounds: Sequence[Round], n_steps: int) -> list[Round]:
    """The rounds cut after their first ``n_steps`` inner steps in all (empty rounds dropped)."""
    out = []
    for rnd in rounds:
        take = list(rnd.minibatches)[: max(0, n_steps)]
        n_steps -= len(take)
        if take:
            out.append(Round(rnd.batch, take))
    return out


def _flat_view(layout: FlatLayout) -> Callable[[Params], Params]:
    def view(x: Params) -> Params:
        return layout.unflatten(x[FLAT_KEY])

    return view


def outer_loss_at(
    problem: MetaProblem,
    theta_next: Params,
    eta_outer: Params,
    outer_batch: BatchDict,
    theta_den: Mapping[str, Tensor],
    eta_den: Mapping[str, Tensor],
) -> Tensor:
    """The validation-round loss (Eq 24) with a detached denominator."""
    return problem.outer_loss(
        theta_next,
        outer_batch,
        eta_policy=eta_outer,
        theta_den=detach(theta_den),
        eta_den=detach(eta_den),
    )


def meta_objective(
    problem: MetaProblem,
    tx: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    paths: EtaPaths,
    rounds: Sequence[Round],
    outer_batch: BatchDict,
    opt_state: Any = None,
    surrogate: InnerSurrogate = InnerSurrogate.PAPER,
    denominator: str = "theta_k",
    anchor: Anchor | None = None,
    truncate: int | None = None,
) -> Tensor:
    """``L_out(theta_{k+1}(eta), eta)``: the outer loss after the unrolled rounds.

    ``denominator="theta_k"`` uses ``pi_{theta_k, eta_i}`` in the outer ratio, as the paper
    does (``theta_k`` = start of the last round); ``"theta_k+1"`` uses the "technically
    correct" ``pi_{theta_{k+1}, eta_i}``. Both are constants: taken at ``anchor`` if given,
    else at the current point (detached).
    """
    res = unroll(
        problem, tx, theta, paths, rounds, opt_state, surrogate, anchor=anchor, truncate=truncate
    )
    if anchor is None:
        starts, nxt, eta_den = res.round_starts, res.theta, paths.outer
    else:
        starts, nxt, eta_den = anchor.round_starts, anchor.theta_next, anchor.eta
    theta_den = starts[-1] if denominator == "theta_k" else nxt
    return outer_loss_at(problem, res.theta, paths.outer, outer_batch, theta_den, eta_den)


def anchor_at(
    problem: MetaProblem,
    tx: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Round],
    opt_state: Any = None,
    surrogate: InnerSurrogate = InnerSurrogate.PAPER,
    truncate: int | None = None,
) -> Anchor:
    """The :class:`Anchor` at ``eta``: round starts and ``theta_{k+1}`` of a plain unroll, and
    for ``truncate=k`` the ``theta`` and optimizer state where the last ``k`` steps begin."""
    eta_c = detach(eta)
    shared = EtaPaths.shared(eta_c)
    res = unroll(problem, tx, theta, shared, rounds, opt_state, surrogate, create_graph=False)
    cut = None
    n_steps = sum(len(rnd.minibatches) for rnd in rounds)
    if truncate is not None and truncate < n_steps:
        head = prefix_rounds(rounds, n_steps - truncate)
        pre = unroll(problem, tx, theta, shared, head, opt_state, surrogate, create_graph=False)
        cut = (detach(pre.theta), torchopt.pytree.tree_map(_detach_leaf, pre.opt_state))
    starts = [detach(s) for s in res.round_starts]
    return Anchor(eta_c, starts, detach(res.theta), cut)


def _detach_leaf(t: Any) -> Any:
    return t.detach() if isinstance(t, Tensor) else t


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
