"""The inner loop as differentiable TorchOpt updates (Eq 6-7 and Eq 23 of the paper).

A *round* is one PPO policy round: the batch ``tau_k`` sampled by ``pi_{theta_k, eta}`` and
the ordered minibatches (epochs x minibatches) that update ``theta_k -> theta_{k+1}``. The
unroll runs ``R >= 1`` consecutive rounds with any TorchOpt gradient transformation, each
step written as TorchOpt's three-line differentiable step::

    grads = torch.autograd.grad(loss, theta, create_graph=True)
    updates, state = tx.update(grads, state, params=theta, inplace=False)
    theta = torchopt.apply_updates(theta, updates, inplace=False)

``eta`` enters through the four paths of :class:`~metagrad_rl.meta_problem.EtaPaths`, one per
term of the meta-gradient (Eq 11-14). The problem's types (:class:`MetaProblem`,
:class:`Round`, :class:`EtaPaths`, :class:`InnerSurrogate`, :func:`minibatch_indices`) live in
:mod:`metagrad_rl.meta_problem` and are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor

from metagrad_rl.errors import ConfigError
from metagrad_rl.flat import FLAT_KEY, FlatLayout
from metagrad_rl.inputs import check_prepared
from metagrad_rl.meta_problem import (
    SIGNATURES,
    EtaPaths,
    InnerSurrogate,
    MetaProblem,
    Round,
    check_signature,
    minibatch_indices,
    minibatch_of,
    round_extras,
)
from metagrad_rl.pytree import BatchDict, Params, detach, detach_state
from metagrad_rl.step_trace import StepTrace

__all__ = [
    "SIGNATURES",
    "Anchor",
    "EtaPaths",
    "InnerSurrogate",
    "MetaProblem",
    "Round",
    "StepTrace",
    "UnrollResult",
    "anchor_at",
    "check_prepared",
    "check_signature",
    "inner_step",
    "meta_objective",
    "minibatch_indices",
    "outer_loss_at",
    "prefix_rounds",
    "prepare_round",
    "unroll",
]


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
    surrogate: InnerSurrogate | str,
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
    surrogate: InnerSurrogate | str = InnerSurrogate.PAPER,
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
    x, view, state = _optimizer_start(tx, theta, opt_state, layout)
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
        if s < cut:  # this round starts before the window
            theta_k, eta_pol, eta_rew = _before_window(
                r, theta_k, eta_pol, eta_rew, anchor, ends_before=s + len(rnd.minibatches) <= cut
            )
        starts.append(theta_k)
        frozen = None if anchor is None else (anchor.round_starts[r], anchor.eta)
        data = prepare_round(problem, rnd.batch, theta_k, eta_pol, eta_rew, surrogate, frozen)
        check_prepared(data, r, rnd)
        extras = round_extras(problem, data, rnd.minibatches)
        # The inner gradient must not flow into the denominator computed from theta_k:
        # give the first step its own node, equal in value.
        x = {k: v.view_as(v) for k, v in x.items()}
        for j in range(len(rnd.minibatches)):
            if j > 0 and s == cut:  # the window starts inside this round
                x, state = _restart(x, state, anchor, layout)
            graph = create_graph and s >= cut
            mb = minibatch_of(data, rnd.minibatches, j, extras)
            x, state = inner_step(problem, tx, x, state, mb, eta_pol, graph, view, trace, (r, j))
            s += 1
    return _result(x, state, starts, trace.check(), layout)


def _before_window(
    r: int,
    theta_k: Params,
    eta_pol: Params,
    eta_rew: Params,
    anchor: Anchor | None,
    ends_before: bool,
) -> tuple[Params, Params, Params]:
    """A round that starts before the truncation window: its start is a constant (the
    anchor's, or ``theta_k`` detached); one that also ends there reads ``eta`` as a constant
    too (no graph at all)."""
    theta_k = anchor.round_starts[r] if anchor is not None else detach(theta_k)
    if ends_before:
        eta_pol, eta_rew = detach(eta_pol), detach(eta_rew)
    return theta_k, eta_pol, eta_rew


def _result(
    x: Params, state: Any, starts: list[Params], saw_zero: bool, layout: FlatLayout | None
) -> UnrollResult:
    """The unroll's output, per tensor (unflattened when the optimizer ran on one vector)."""
    if layout is None:
        return UnrollResult(x, state, starts, saw_zero)
    theta_out = layout.unflatten(x[FLAT_KEY])
    return UnrollResult(theta_out, layout.unflatten_state(state), starts, saw_zero)


def _optimizer_start(
    tx: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    opt_state: Any,
    layout: FlatLayout | None,
) -> tuple[Params, Callable[[Params], Params] | None, Any]:
    """What the optimizer updates -- fresh leaves of ``theta``, or with ``layout`` one flat
    vector and the view that hands the losses their dict -- and its state."""
    if layout is None:
        x = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
        return x, None, tx.init(x) if opt_state is None else opt_state
    x = {FLAT_KEY: layout.flatten(theta).detach().clone().requires_grad_(True)}
    state = tx.init(x) if opt_state is None else layout.flatten_state(opt_state)
    return x, _flat_view(layout), state


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
    return x, detach_state(state)


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
    surrogate: InnerSurrogate | str = InnerSurrogate.PAPER,
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
    surrogate: InnerSurrogate | str = InnerSurrogate.PAPER,
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
        cut = (detach(pre.theta), detach_state(pre.opt_state))
    starts = [detach(s) for s in res.round_starts]
    return Anchor(eta_c, starts, detach(res.theta), cut)
