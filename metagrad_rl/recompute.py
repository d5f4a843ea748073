"""The checkpointed (recomputing) reverse pass: the exact meta-gradient in bounded memory.

Reverse mode through ``n`` inner steps normally keeps every step's graph until the backward
pass, so memory grows linearly in ``n`` (:mod:`metagrad_rl.memory`). With
``checkpoint_every=k`` the engine instead

1. runs the unroll once **without** keeping a graph (:func:`forward_sweep`), storing only the
   optimizer's parameters and state at every ``k``-th inner step and at each round start
   (a *checkpoint*), plus each round's prepared data (``prepare``'s output) and round start;
2. in the backward pass (:meth:`Checkpointed.reverse`) re-runs one segment of at most ``k``
   steps at a time from its checkpoint, with its graph, and pulls the adjoints of the
   parameters, of the optimizer state and of the round's prepared data back to the segment
   start; at a round start the prepared data's adjoint is pulled back through ``prepare``
   (its intrinsic advantages, Eq 13's path, and its ratio denominator ``pi_{theta_k, eta}``)
   to ``theta_k`` and ``eta``.

``eta`` stays split into its four paths (:class:`~metagrad_rl.meta_problem.EtaPaths`) in every
segment, so Eq 11-14 come out as in the stored-graph pass; truncation, the score term, both
surrogates and denominators, flat and per-tensor updates and differentiable collectives work
unchanged. Memory: one segment's graph (``k`` steps) plus the checkpoints; time: one extra
forward pass without a graph. ``"auto"`` takes ``k = ceil(sqrt(n))``, which balances the two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torchopt
from torch import Tensor

from metagrad_rl.adjoint import EARLY, POLICY, REWARD, Adjoint, unique_leaves
from metagrad_rl.flat import FLAT_KEY, FlatLayout
from metagrad_rl.inputs import check_prepared
from metagrad_rl.memory import GraphMemoryMeter, tree_bytes
from metagrad_rl.meta_problem import (
    EtaPaths,
    InnerSurrogate,
    MetaProblem,
    Round,
    minibatch_of,
    round_extras,
)
from metagrad_rl.mixed_mode import (
    OptimizerPullback,
    _differentiable,
    _leaf,
    _vjp,
    gradient_products,
    inner_gradient,
    optimizer_step,
)
from metagrad_rl.options import (
    SECOND_ORDER,
    MetaGradOptions,
    check_checkpoint_every,
    check_second_order,
    segment_length,
)
from metagrad_rl.pytree import Params, detach, detach_state
from metagrad_rl.step_trace import StepTrace
from metagrad_rl.unroll import _flat_view, inner_step, prepare_round

__all__ = [
    "SECOND_ORDER",
    "Checkpointed",
    "Segment",
    "check_checkpoint_every",
    "check_second_order",
    "forward_sweep",
    "segment_length",
]


@dataclass
class Segment:
    """Inner steps ``j0 .. j0 + n - 1`` of round ``r`` and the checkpoint they start from."""

    r: int
    j0: int
    n: int
    x: Params
    state: Any


@dataclass
class Checkpointed:
    """The result of :func:`forward_sweep`: values, checkpoints and what the reverse pass needs.

    ``theta``, ``opt_state`` and ``round_starts`` are detached, per tensor, as in
    :class:`~metagrad_rl.unroll.UnrollResult`.
    """

    problem: MetaProblem
    tx: torchopt.base.GradientTransformation
    paths: EtaPaths
    rounds: Sequence[Round]
    surrogate: InnerSurrogate
    layout: FlatLayout | None
    segments: list[Segment]
    data: list[dict[str, Tensor]]
    starts_x: list[Params]
    #: Whether each round's start lies inside the differentiated window (else a constant).
    start_in_window: list[bool]
    x_final: Params
    theta: Params
    opt_state: Any
    round_starts: list[Params]
    #: Per round, the names of ``prepare``'s outputs that carry a derivative (to ``theta_k``
    #: or ``eta``); the forward-over-reverse pullback differentiates only with respect to them.
    graph_keys: list[list[str]] = field(default_factory=list)
    second_order: str = "reverse"
    saw_zero_gradient: bool = False
    checkpoint_bytes: int = 0
    segment_graph_bytes: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ helpers
    def view(self, x: Params) -> Params:
        return x if self.layout is None else _flat_view(self.layout)(x)

    def round_paths(self, r: int) -> tuple[int, int]:
        """The path indices of ``eta`` on the policy and the reward side of round ``r``."""
        last = r == len(self.rounds) - 1
        return (POLICY, REWARD) if last else (EARLY, EARLY)

    # ------------------------------------------------------------------ reverse pass
    def reverse(
        self,
        outer_objective: Callable[[Params], Tensor],
        score_objective: Callable[[list[Params]], Tensor | None] | None = None,
        measure: bool = False,
    ) -> tuple[Tensor, list[Params], list[Params] | None]:
        """The outer loss and its gradient along each path of ``eta`` (and the score's).

        ``outer_objective(theta_next)`` is the outer loss at the unroll's end (``eta``'s outer
        path inside it); ``score_objective(round_starts)`` the score term's objective, or
        ``None``. Returns ``(loss, grads per path, score grads per path or None)``.
        """
        x_n = _leaves(self.x_final)
        loss = outer_objective(self.view(x_n))
        cts = [Adjoint.of(loss, x_n, self.paths)]
        if score_objective is not None:
            xs = [_leaves(s) for s in self.starts_x]
            objective = score_objective([self.view(s) for s in xs])
            if objective is not None:
                cts.append(Adjoint.of_score(objective, xs, self.paths, self.x_final))
        for i in reversed(range(len(self.segments))):
            seg = self.segments[i]
            self._reverse_segment(seg, cts, measure)
            if i == 0 or self.segments[i - 1].r != seg.r:  # the round's first segment
                self._reverse_prepare(seg.r, cts)
        return loss, cts[0].eta, (cts[1].eta if len(cts) > 1 else None)

    def _reverse_segment(self, seg: Segment, cts: list[Adjoint], measure: bool) -> None:
        """Re-run ``seg`` with its graph; pull every adjoint back to the segment's start."""
        if self.second_order == "forward":
            self._reverse_segment_forward(seg, cts, measure)
            return
        x0 = _leaves(seg.x)
        s_leaves, spec = torchopt.pytree.tree_flatten(seg.state)
        s0 = [_leaf(t) for t in s_leaves]
        state = torchopt.pytree.tree_unflatten(spec, s0)
        d0 = _leaves(self.data[seg.r])
        pol, _ = self.round_paths(seg.r)
        eta_pol = self.paths[pol]
        rnd = self.rounds[seg.r]
        view = None if self.layout is None else _flat_view(self.layout)
        meter = GraphMemoryMeter(enabled=measure)
        with meter:
            x = x0
            extras = round_extras(self.problem, d0, rnd.minibatches)
            for j in range(seg.j0, seg.j0 + seg.n):
                mb = minibatch_of(d0, rnd.minibatches, j, extras)
                x, state = inner_step(self.problem, self.tx, x, state, mb, eta_pol, True, view)
        if measure:
            self.segment_graph_bytes.append(meter.peak_bytes)
        out_state, _ = torchopt.pytree.tree_flatten(state)
        names = list(x0)
        outs = [x[k] for k in names]
        out_idx = [i for i, t in enumerate(out_state) if _differentiable(t)]
        outs += [out_state[i] for i in out_idx]
        in_x = [x0[k] for k in names]
        in_s = [(i, t) for i, t in enumerate(s0) if _differentiable(t)]
        in_d = [(k, v) for k, v in d0.items() if _differentiable(v)]
        eta_in = unique_leaves([(pol, eta_pol)])
        inputs = in_x + [t for _, t in in_s] + [v for _, v in in_d] + [t for _, _, t in eta_in]
        keep = [o.requires_grad for o in outs]
        for c, ct in enumerate(cts):
            grad_out = [ct.gx[k] for k in names] + [ct.state_cotangent(i) for i in out_idx]
            pairs = [(o, g) for o, g, k in zip(outs, grad_out, keep) if k and g is not None]
            gs = _vjp(pairs, inputs, retain_graph=c < len(cts) - 1)
            i = 0
            ct.gx = {k: gs[i + n] for n, k in enumerate(names)}
            i += len(names)
            ct.gstate = {si: gs[i + n] for n, (si, _) in enumerate(in_s)}
            i += len(in_s)
            ct.add_data(seg.r, {k: gs[i + n] for n, (k, _) in enumerate(in_d)})
            i += len(in_d)
            ct.add_eta(eta_in, gs[i:])

    def _reverse_segment_forward(self, seg: Segment, cts: list[Adjoint], measure: bool) -> None:
        """``seg`` in mixed mode: re-run it without a graph keeping each step's parameters,
        state and gradient, then pull the adjoints back step by step, last to first: through
        the optimizer first order, through the gradient by ``jvp(grad)``
        (:mod:`metagrad_rl.mixed_mode`)."""
        d0 = self.data[seg.r]
        pol, _ = self.round_paths(seg.r)
        eta_pol = self.paths[pol]
        eta_c = detach(eta_pol)
        rnd = self.rounds[seg.r]
        view = None if self.layout is None else _flat_view(self.layout)
        steps = []
        x, state = seg.x, seg.state
        extras = round_extras(self.problem, d0, rnd.minibatches)
        for j in range(seg.j0, seg.j0 + seg.n):
            mb = minibatch_of(d0, rnd.minibatches, j, extras)
            g = inner_gradient(self.problem, x, mb, eta_c, view)
            steps.append((j, x, state, g))
            x, state = optimizer_step(self.tx, x, state, g)
            x, state = detach(x), detach_state(state)
        if measure:
            self.segment_graph_bytes.append(tree_bytes([s[1:] for s in steps]))
        eta_in = unique_leaves([(pol, eta_pol)])
        wrt = self.graph_keys[seg.r]
        for j, x, state, g in reversed(steps):
            opt = OptimizerPullback(self.tx, x, state, g)
            for c, ct in enumerate(cts):
                a_g, a_x, ct.gstate = opt.pull(ct.gx, ct.gstate, retain_graph=c < len(cts) - 1)
                h_x, h_eta, h_d = gradient_products(
                    self.problem, x, eta_c, d0, wrt, (rnd.minibatches, j), a_g, view
                )
                ct.gx = {k: a_x[k] + h_x[k] for k in a_x}
                ct.add_data(seg.r, h_d)
                ct.add_eta(eta_in, [h_eta[name] for _, name, _ in eta_in])

    def _reverse_prepare(self, r: int, cts: list[Adjoint]) -> None:
        """At round ``r``'s start: the prepared data's adjoint back to ``theta_k`` and ``eta``;
        the score's adjoint of ``theta_k`` joins here. A round start before the window of a
        truncated unroll is a constant: only ``eta``'s adjoint goes on."""
        pol, rew = self.round_paths(r)
        eta_pol, eta_rew = self.paths[pol], self.paths[rew]
        in_window = self.start_in_window[r]
        xk = _leaves(self.starts_x[r]) if in_window else detach(self.starts_x[r])
        theta_k = self.view(xk)
        data = prepare_round(
            self.problem, self.rounds[r].batch, theta_k, eta_pol, eta_rew, self.surrogate
        )
        keys = [k for k, v in data.items() if isinstance(v, Tensor) and v.requires_grad]
        names = list(xk)
        eta_in = unique_leaves([(pol, eta_pol), (rew, eta_rew)])
        inputs = ([xk[k] for k in names] if in_window else []) + [t for _, _, t in eta_in]
        for c, ct in enumerate(cts):
            gd = ct.gdata.pop(r, {})
            pairs = [(data[k], gd[k]) for k in keys if k in gd]
            gs = _vjp(pairs, inputs, retain_graph=c < len(cts) - 1)
            n = len(names) if in_window else 0
            if in_window:
                ct.gx = {k: ct.gx[k] + gs[i] for i, k in enumerate(names)}
                if ct.inject is not None:
                    ct.gx = {k: ct.gx[k] + ct.inject[r][k] for k in names}
            ct.add_eta(eta_in, gs[n:])


def _leaves(params: Mapping[str, Tensor]) -> Params:
    return {k: _leaf(v) for k, v in params.items()}


def forward_sweep(
    problem: MetaProblem,
    tx: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    paths: EtaPaths,
    rounds: Sequence[Round],
    opt_state: Any,
    options: MetaGradOptions,
) -> Checkpointed:
    """The unroll's values with a checkpoint every ``k`` inner steps and at each round start.

    Each step runs on detached inputs (its graph is freed at once); the values are those of
    :func:`~metagrad_rl.unroll.unroll` (the same operations; ``prepare`` runs on the graph and
    is detached, so it takes the same code path as in the stored-graph unroll). ``k`` is
    ``options.checkpoint_every``; ``options.second_order`` is how the reverse pass will take
    the Hessian products (:data:`~metagrad_rl.options.SECOND_ORDER`).
    """
    assert options.checkpoint_every is not None, "the forward sweep needs checkpoint_every"
    surrogate = InnerSurrogate(options.surrogate)
    layout = FlatLayout(theta) if options.flat_params else None
    sweep = _Sweep(
        problem, tx, paths, rounds, surrogate, layout, options.checkpoint_every, options.truncate
    )
    x, state = _start(theta, tx, opt_state, layout)
    for r in range(len(rounds)):
        x, state = sweep.round(r, x, state)
    saw_zero = sweep.trace.check()
    ck_bytes = sum(tree_bytes(seg.x) + tree_bytes(seg.state) for seg in sweep.segments)
    ck_bytes += tree_bytes(sweep.data) + tree_bytes(sweep.starts_x)
    unflat = (lambda p: p) if layout is None else (lambda p: layout.unflatten(p[FLAT_KEY]))
    return Checkpointed(
        problem=problem,
        tx=tx,
        paths=paths,
        rounds=rounds,
        surrogate=surrogate,
        layout=layout,
        segments=sweep.segments,
        data=sweep.data,
        starts_x=sweep.starts_x,
        start_in_window=sweep.in_window,
        x_final=x,
        theta=unflat(x),
        opt_state=state if layout is None else layout.unflatten_state(state),
        round_starts=[unflat(s_) for s_ in sweep.starts_x],
        graph_keys=sweep.graph_keys,
        second_order=options.second_order,
        saw_zero_gradient=saw_zero,
        checkpoint_bytes=ck_bytes,
    )


def _start(
    theta: Mapping[str, Tensor], tx: Any, opt_state: Any, layout: FlatLayout | None
) -> tuple[Params, Any]:
    """What the optimizer updates (``theta``, or its flat vector) and its state, detached."""
    if layout is None:
        x: Params = detach(theta)
        state = tx.init(x) if opt_state is None else opt_state
    else:
        x = {FLAT_KEY: layout.flatten(theta).detach()}
        state = tx.init(x) if opt_state is None else layout.flatten_state(opt_state)
    return x, detach_state(state)


class _Sweep:
    """The forward sweep's running record: checkpoints, prepared data, round starts."""

    def __init__(
        self,
        problem: MetaProblem,
        tx: Any,
        paths: EtaPaths,
        rounds: Sequence[Round],
        surrogate: InnerSurrogate,
        layout: FlatLayout | None,
        checkpoint_every: int | str,
        truncate: int | None,
    ) -> None:
        self.problem, self.tx, self.paths, self.rounds = problem, tx, paths, rounds
        self.surrogate = surrogate
        self.view = None if layout is None else _flat_view(layout)
        n_steps = sum(len(rnd.minibatches) for rnd in rounds)
        self.k = segment_length(checkpoint_every, n_steps)
        self.cut = 0 if truncate is None else max(0, n_steps - truncate)
        self.segments: list[Segment] = []
        self.data: list[dict[str, Tensor]] = []
        self.starts_x: list[Params] = []
        self.in_window: list[bool] = []
        self.graph_keys: list[list[str]] = []
        self.trace = StepTrace()
        self.s = 0  # inner steps done, over all rounds

    def round(self, r: int, x: Params, state: Any) -> tuple[Params, Any]:
        """Round ``r``: its prepared data, then its steps, a checkpoint where a segment starts."""
        if r > 0:
            self.trace.check()
        rnd, last = self.rounds[r], r == len(self.rounds) - 1
        eta_pol = self.paths.policy if last else self.paths.early
        eta_rew = self.paths.reward if last else self.paths.early
        self.starts_x.append(x)
        self.in_window.append(self.s >= self.cut)
        # prepare sees what it sees in the stored-graph unroll (which inputs carry a graph
        # can choose its code path, e.g. GAE's): a round start before the window is a
        # constant, and a round that ends before it has no graph at all
        xk = _leaves(x) if self.s >= self.cut else x
        if self.s + len(rnd.minibatches) <= self.cut:
            eta_pol, eta_rew = detach(eta_pol), detach(eta_rew)
        theta_k = xk if self.view is None else self.view(xk)
        data = prepare_round(self.problem, rnd.batch, theta_k, eta_pol, eta_rew, self.surrogate)
        check_prepared(data, r, rnd)
        self.graph_keys.append([k for k, v in data.items() if v.requires_grad])
        data = {k: v.detach() for k, v in data.items()}
        self.data.append(data)
        eta_values = detach(eta_pol)
        extras = round_extras(self.problem, data, rnd.minibatches)
        first = len(self.segments)
        for j in range(len(rnd.minibatches)):
            if self.s >= self.cut and (len(self.segments) == first or self._boundary()):
                self.segments.append(Segment(r, j, 0, x, state))
            x1, state = inner_step(
                self.problem, self.tx, _leaves(x), state,
                minibatch_of(data, rnd.minibatches, j, extras), eta_values, False,
                self.view, self.trace, (r, j),
            )  # fmt: skip
            x, state = detach(x1), detach_state(state)
            self.s += 1
        ends = [seg.j0 for seg in self.segments[first + 1 :]] + [len(rnd.minibatches)]
        for seg, end in zip(self.segments[first:], ends):
            seg.n = end - seg.j0
        return x, state

    def _boundary(self) -> bool:
        return (self.s - self.cut) % self.k == 0
