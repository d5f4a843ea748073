r"""The exact meta-gradient ``dL_out/deta`` split into the paper's terms (Eq 10-14) and Eq 17.

With ``L_out = -J_ex`` the outer loss after the unrolled policy rounds (Eq 24) and
``theta_{k+1}(eta)`` the result of the inner TorchOpt updates (Eq 23),

.. math::

    \frac{dL_{out}}{d\eta} = \underbrace{\partial_\eta L_{out}}_{\text{Eq 11}}
      + \underbrace{\partial_\theta L_{out}\,\partial_{\eta}^{\pi}\theta_{k+1}}_{\text{Eq 12}}
      + \underbrace{\partial_\theta L_{out}\,\partial_{\eta}^{A}\theta_{k+1}}_{\text{Eq 13}}
      + \underbrace{\partial_\theta L_{out}\,\partial_{\theta_k}\theta_{k+1}
        \frac{d\theta_k}{d\eta}}_{\text{Eq 14}}

Each term is the partial derivative along one *path* of ``eta`` (:class:`EtaPaths`): the engine
gives every path its own leaf copy of ``eta`` and takes one backward pass, so the terms sum to
the total derivative exactly for any optimizer, any number of inner steps and rounds. "Exact"
also needs every piece of the optimizer to stay on the graph: TorchOpt's ``clip_grad_norm``
does not (its factor is a ``no_grad`` float), so the engine refuses it and
:func:`metagrad_rl.optim.clip_grad_norm` is the differentiable clip to use.

Eq 17 (the CLN best-response gradient) is ``partial_eta L_out`` at a
given ``theta``: it needs no unroll. All gradients are of the *loss* ``L_out`` (descent
direction ``-grad``); the paper's ``dJ_ex/deta`` is their negative.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor

from metagrad_rl import score_function
from metagrad_rl.errors import ConfigError
from metagrad_rl.inputs import (
    check_outer_batch,
    check_outer_loss,
    check_params,
    check_rounds,
    check_start_inputs,
    check_surrogate,
)
from metagrad_rl.memory import GraphMemoryMeter, check_unroll_memory
from metagrad_rl.optim import sqrt_without_eps_root
from metagrad_rl.pytree import TERMS, BatchDict, Params, add, cosine, detach_state, flatten
from metagrad_rl.recompute import Checkpointed, forward_sweep
from metagrad_rl.unroll import (
    EtaPaths,
    InnerSurrogate,
    MetaProblem,
    Round,
    outer_loss_at,
    unroll,
)

DENOMINATORS = ("theta_k", "theta_k+1")


class MetaGradResult(NamedTuple):
    """Every term of ``dL_out/deta`` (dicts keyed like ``eta``), Eq 17, and diagnostics.

    ``eq11``..``eq14`` are ``None`` when only the total was asked for (``terms=False``).
    ``total`` is the sum of the four terms when they were computed, else the gradient of one
    shared ``eta`` through the whole unroll. ``eq17`` is evaluated at ``theta_next`` (and so
    equals ``eq11``); call :func:`eq17_gradient` to evaluate it elsewhere without an unroll.
    """

    eq11: Params | None
    eq12: Params | None
    eq13: Params | None
    eq14: Params | None
    total: Params
    eq17: Params
    outer_loss: float
    theta_next: Params
    opt_state: Any
    diagnostics: dict[str, float]
    score: Params | None = None
    #: What the caller should know about how the numbers were computed, e.g. the factors of a
    #: graph-cutting optimizer held constant under ``allow_graph_cuts=True``. Empty normally.
    notes: tuple[str, ...] = ()

    def subset(self, names: Sequence[str]) -> Params:
        """The sum of the named terms (``"eq11"``..``"eq14"``, ``"eq17"``, ``"score"``).

        A partial meta-gradient: e.g. ``("eq11", "eq13")`` keeps the direct and the reward
        path and drops both second-order ones. All four of Eq 11-14 give ``total``.
        """
        known = (*TERMS, "eq17", "score")
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise ConfigError(f"terms {bad or list(names)} are invalid: expected some of {known}")
        parts = [getattr(self, n) for n in names]
        missing = [n for n, p in zip(names, parts) if p is None]
        if missing:
            raise ConfigError(
                f"terms {missing} were not computed: pass terms=True (Eq 11-14) or a "
                "score_weight (score) when computing the meta-gradient"
            )
        return add(*parts)


def _grads(loss: Tensor, params: Params, retain_graph: bool = False) -> Params:
    if not loss.requires_grad:  # e.g. Eq 17 of a policy that ignores eta
        return {n: torch.zeros_like(p) for n, p in params.items()}
    names = list(params)
    gs = torch.autograd.grad(
        loss, [params[n] for n in names], retain_graph=retain_graph, allow_unused=True
    )
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, gs)}


def _grads_many(loss: Tensor, groups: Sequence[Params], retain_graph: bool = False) -> list[Params]:
    """Gradients of ``loss`` w.r.t. several dicts of leaves in one backward pass."""
    flat = [p for g in groups for p in g.values()]
    if not loss.requires_grad:
        return [{n: torch.zeros_like(p) for n, p in g.items()} for g in groups]
    gs = torch.autograd.grad(loss, flat, allow_unused=True, retain_graph=retain_graph)
    out, i = [], 0
    for g in groups:
        d = {}
        for n, p in g.items():
            d[n] = torch.zeros_like(p) if gs[i] is None else gs[i]
            i += 1
        out.append(d)
    return out


def diagnostics_of(terms: Mapping[str, Params], total: Params) -> dict[str, float]:
    """Norm of each gradient, its share of the total's norm and its cosine with the total."""
    t = flatten(total)
    out = {"norm_total": float(t.norm())}
    for name, g in terms.items():
        v = flatten(g)
        out[f"norm_{name}"] = float(v.norm())
        out[f"cos_{name}_total"] = cosine(v, t)
    return out


def eq17_gradient(
    problem: MetaProblem,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    outer_batch: BatchDict | None = None,
    theta_den: Mapping[str, Tensor] | None = None,
    eta_den: Mapping[str, Tensor] | None = None,
) -> Params:
    r"""Eq 16-17, the CLN best-response gradient: ``partial_eta L_out(theta, eta)``, theta fixed.

    .. math:: \frac{dJ}{d\eta} \approx \mathbb{E}_\tau\Big[\sum_t
              \frac{\partial\log\pi_{\theta,\eta}}{\partial\eta}\hat A^{EX}_\tau(t)\Big]

    (returned as the gradient of the loss ``L_out = -J``). ``theta_den``/``eta_den`` give the
    ratio's denominator; by default ``theta`` and ``eta`` themselves (detached).
    """
    check_params("theta", theta, problem.theta_spec)
    check_params("eta", eta, problem.eta_spec)
    outer_batch = check_outer_batch(outer_batch)
    eta_leaf = {k: v.detach().clone().requires_grad_(True) for k, v in eta.items()}
    theta_fixed = {k: v.detach() for k, v in theta.items()}
    loss = outer_loss_at(
        problem,
        theta_fixed,
        eta_leaf,
        outer_batch,
        theta_fixed if theta_den is None else theta_den,
        eta if eta_den is None else eta_den,
    )
    return _grads(loss, eta_leaf)


class PendingMetaGradient:
    """An unrolled policy round whose meta-gradient waits for the outer batch.

    A trainer needs ``theta_{k+1}`` to *collect* the validation batch ``tau_{k+1}`` that the
    outer loss (Eq 24) is evaluated on. :func:`start_meta_gradient` runs the differentiable
    unroll and keeps its graph; :attr:`theta_next` (detached) drives the rollout; then
    :meth:`finish` takes the outer batch and returns the :class:`MetaGradResult`. The graph is
    freed by :meth:`finish` (call it once).
    """

    def __init__(
        self,
        problem: MetaProblem,
        eta: Params,
        rounds: Sequence[Round],
        paths: EtaPaths,
        res: Any,
        terms: bool,
        meter: GraphMemoryMeter,
        t_unroll: float,
        optimizer: torchopt.base.GradientTransformation | None = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        self.problem, self.eta, self.rounds, self.paths = problem, eta, rounds, paths
        self._res, self.terms, self._meter, self._t_unroll = res, terms, meter, t_unroll
        self.optimizer, self.notes = optimizer, notes
        self._saw_zero_gradient = bool(getattr(res, "saw_zero_gradient", False))
        self.truncate: int | None = None  # set by start_meta_gradient
        self.theta_next: Params = {k: v.detach() for k, v in res.theta.items()}
        self.opt_state: Any = detach_state(res.opt_state)

    def finish(
        self,
        outer_batch: BatchDict | None = None,
        *,
        denominator: str = "theta_k",
        score_weight: float | None = None,
        magic_box: bool = False,
    ) -> MetaGradResult:
        """Eq 11-14 (or the total), Eq 17 and diagnostics on ``outer_batch``.

        ``denominator``: ``"theta_k"`` (the paper's Eq 24) or ``"theta_k+1"``. With
        ``score_weight = w`` the result also holds ``score = grad_eta [w sum_k log p(tau_k;
        theta_k(eta), eta)]``, the sampling-aware correction (``w = stopgrad(J_hat - b)``; see
        ``docs/score_function.md``); it needs ``problem.log_likelihood``. With ``magic_box`` the
        term is taken through DiCE's ``w * magic_box(log p)`` instead (same first derivative).
        """
        if self._res is None:
            raise ConfigError("this PendingMetaGradient was finished already: start a new one")
        outer_batch = check_outer_batch(outer_batch)
        if denominator not in DENOMINATORS:
            raise ConfigError(
                f"denominator={denominator!r} is invalid: expected one of {DENOMINATORS}"
            )
        problem, res, eta = self.problem, self._res, self.eta
        t0 = time.perf_counter()
        theta_den = res.round_starts[-1] if denominator == "theta_k" else res.theta
        reverse = self._reverse_checkpointed if isinstance(res, Checkpointed) else self._reverse
        loss, split, total, score = reverse(outer_batch, theta_den, score_weight, magic_box)
        elapsed = self._t_unroll + time.perf_counter() - t0
        self._check_backward(total, score)
        theta_den = {k: v.detach() for k, v in theta_den.items()}
        g17 = eq17_gradient(problem, self.theta_next, eta, outer_batch, theta_den, eta)
        diag = self._diagnostics({**split, "eq17": g17}, total, score, elapsed)
        return MetaGradResult(
            eq11=split.get("eq11"),
            eq12=split.get("eq12"),
            eq13=split.get("eq13"),
            eq14=split.get("eq14"),
            total=total,
            eq17=g17,
            outer_loss=float(loss.detach()),
            theta_next=self.theta_next,
            opt_state=self.opt_state,
            diagnostics=diag,
            score=score,
            notes=self.notes,
        )

    def _reverse(
        self,
        outer_batch: BatchDict,
        theta_den: Params,
        score_weight: float | None,
        magic_box: bool,
    ) -> tuple[Tensor, dict[str, Params], Params, Params | None]:
        """:meth:`finish` by one backward pass through the stored graph."""
        res, paths, eta, problem = self._res, self.paths, self.eta, self.problem
        with self._meter:
            loss = outer_loss_at(problem, res.theta, paths.outer, outer_batch, theta_den, eta)
            check_outer_loss(loss)
            loglik = None if score_weight is None else self._log_likelihood(res.round_starts)
        self._res = None
        score = None
        if loglik is not None and score_weight is not None:
            groups = list(paths) if self.terms else [paths.outer]
            objective = score_weight * (score_function.magic_box(loglik) if magic_box else loglik)
            score = add(*_grads_many(objective, groups, retain_graph=True))
        if self.terms:
            split = dict(zip(TERMS, _grads_many(loss, list(paths))))
            return loss, split, add(*split.values()), score
        return loss, {}, _grads(loss, paths.outer), score

    def _reverse_checkpointed(
        self,
        outer_batch: BatchDict,
        theta_den: Params,
        score_weight: float | None,
        magic_box: bool,
    ) -> tuple[Tensor, dict[str, Params], Params, Params | None]:
        """:meth:`finish` by the recomputing reverse pass (:mod:`metagrad_rl.recompute`)."""
        res, paths, eta, problem = self._res, self.paths, self.eta, self.problem
        den = {k: v.detach() for k, v in theta_den.items()}

        def outer(theta_next: Params) -> Tensor:
            loss = outer_loss_at(problem, theta_next, paths.outer, outer_batch, den, eta)
            check_outer_loss(loss)
            return loss

        def score(starts: list[Params]) -> Tensor | None:
            if score_weight is None:
                return None
            loglik = self._log_likelihood(starts)
            return score_weight * (score_function.magic_box(loglik) if magic_box else loglik)

        self._res = None
        loss, by_path, score_by_path = res.reverse(outer, score, measure=self._meter.enabled)
        if self._meter.enabled:
            peak = max(res.segment_graph_bytes, default=0)
            self._meter.peak_bytes = peak + res.checkpoint_bytes
        split = dict(zip(TERMS, by_path)) if self.terms else {}
        total = add(*by_path)
        g_score = None if score_by_path is None else add(*score_by_path)
        return loss, split, total, g_score

    def _diagnostics(
        self, terms: Mapping[str, Params], total: Params, score: Params | None, elapsed: float
    ) -> dict[str, float]:
        """Norms and cosines of the terms, time, steps (all and differentiated), graph bytes."""
        diag = diagnostics_of(terms, total)
        steps = float(sum(len(r.minibatches) for r in self.rounds))
        diag["time_s"] = elapsed
        diag["inner_steps"] = steps
        diag["differentiated_steps"] = steps if self.truncate is None else min(self.truncate, steps)
        diag["graph_bytes"] = float(self._meter.peak_bytes) if self._meter.enabled else math.nan
        if score is not None:
            diag["norm_score"] = float(flatten(score).norm())
            diag["cos_score_total"] = cosine(flatten(score), flatten(total))
        return diag

    def _check_backward(self, total: Params, score: Params | None) -> None:
        """Every forward value was finite (checked on the way); name a non-finite backward."""
        grads = {**total, **({f"score[{k}]": v for k, v in score.items()} if score else {})}
        bad = [k for k, g in grads.items() if not bool(torch.isfinite(g).all())]
        if not bad:
            return
        at_zero = sqrt_without_eps_root(self.optimizer) if self.optimizer is not None else []
        if at_zero and self._saw_zero_gradient:
            raise ConfigError(
                f"the backward pass gave a non-finite meta-gradient for eta{bad}: the optimizer's "
                f"{at_zero[0]} takes sqrt(v) at v = 0 (an inner gradient entry was exactly 0), "
                "where sqrt has no derivative; set eps_root > 0 (e.g. torchopt.adam(lr, "
                "eps_root=1e-8))"
            )
        raise ConfigError(
            f"the backward pass gave a non-finite meta-gradient for eta{bad} although every "
            "forward value (prepare, inner losses, gradients and steps, outer loss) was finite: "
            "a function in the losses or the optimizer has an infinite derivative at the values "
            "reached (e.g. sqrt, norm or pow at 0)"
        )

    def _log_likelihood(self, starts: Sequence[Params]) -> Tensor:
        """``sum_k log p(tau_k; theta_k(eta), eta)``: each round's batch under its sampler."""
        if self.problem.log_likelihood is None:
            raise ConfigError(
                "score_weight needs a problem with log_likelihood(theta, batch, eta_policy=...)"
            )
        n = len(self.rounds)
        terms = []
        for r, (rnd, theta_r) in enumerate(zip(self.rounds, starts)):
            eta_pol = self.paths.policy if r == n - 1 else self.paths.early
            terms.append(self.problem.log_likelihood(theta_r, rnd.batch, eta_policy=eta_pol))
        return torch.stack(terms).sum()


def start_meta_gradient(
    problem: MetaProblem,
    optimizer: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Round],
    *,
    opt_state: Any = None,
    surrogate: InnerSurrogate | str = InnerSurrogate.PAPER,
    terms: bool = True,
    memory_budget_bytes: int | None = None,
    measure_memory: bool = False,
    flat_params: bool = True,
    allow_graph_cuts: bool = False,
    truncate: int | None = None,
    checkpoint_every: int | str | None = None,
    second_order: str = "reverse",
) -> PendingMetaGradient:
    """The first half of :func:`meta_gradient`: validate, check memory, unroll (the graph
    kept, or with ``checkpoint_every`` only the checkpoints of the recomputing pass)."""
    cuts = check_start_inputs(
        problem, optimizer, theta, eta, truncate, checkpoint_every, opt_state, allow_graph_cuts,
        second_order,
    )  # fmt: skip
    rounds = check_rounds(rounds)
    surrogate = check_surrogate(surrogate)
    check_unroll_memory(
        problem,
        optimizer,
        theta,
        eta,
        rounds,
        opt_state,
        surrogate,
        memory_budget_bytes,
        checkpoint_every=checkpoint_every,
    )
    t0 = time.perf_counter()
    eta_c = {k: v.detach() for k, v in eta.items()}
    paths = (
        EtaPaths.leaves(eta_c)
        if terms
        else EtaPaths.shared({k: v.clone().requires_grad_(True) for k, v in eta_c.items()})
    )
    meter = GraphMemoryMeter(enabled=measure_memory)
    sweep_kw: dict[str, Any] = dict(flat_params=flat_params, truncate=truncate)
    res: Any
    if checkpoint_every is not None:
        res = forward_sweep(
            problem, optimizer, theta, paths, rounds, opt_state, surrogate, checkpoint_every,
            second_order=second_order, **sweep_kw,
        )  # fmt: skip
    else:
        with meter:
            res = unroll(problem, optimizer, theta, paths, rounds, opt_state, surrogate, **sweep_kw)
    notes = tuple(f"held constant (allow_graph_cuts=True): {why}" for why in cuts)
    pending = PendingMetaGradient(
        problem,
        eta_c,
        rounds,
        paths,
        res,
        terms,
        meter,
        time.perf_counter() - t0,
        optimizer,
        notes,
    )
    pending.truncate = truncate
    return pending


def meta_gradient(
    problem: MetaProblem,
    optimizer: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Round],
    outer_batch: BatchDict | None = None,
    *,
    opt_state: Any = None,
    surrogate: InnerSurrogate | str = InnerSurrogate.PAPER,
    denominator: str = "theta_k",
    terms: bool = True,
    memory_budget_bytes: int | None = None,
    measure_memory: bool = False,
    flat_params: bool = True,
    allow_graph_cuts: bool = False,
    truncate: int | None = None,
    checkpoint_every: int | str | None = None,
    second_order: str = "reverse",
) -> MetaGradResult:
    """Exact ``dL_out/deta`` through ``len(rounds)`` unrolled policy rounds, term by term.

    Args:
        problem: the bilevel problem (e.g. :func:`metagrad_rl.problems.ppo_meta_problem`).
        optimizer: the inner TorchOpt transformation (``torchopt.adam(3e-4)``, ...).
        theta: policy parameters at the start of the first unrolled round (detached inside).
        eta: intrinsic-reward parameters ``eta_i``.
        rounds: the unrolled rounds, oldest first; the last is the round ``k -> k+1``.
        outer_batch: the validation batch ``tau_{k+1}`` for Eq 24 (``None``: ``outer_loss``
            gets ``{}``, for objectives that read no data).
        opt_state: the optimizer state at the first round (``optimizer.init(theta)`` if None).
        surrogate: ``"paper"`` or ``"detached"`` (:class:`InnerSurrogate`).
        denominator: ``"theta_k"`` (the paper's Eq 24) or ``"theta_k+1"``.
        terms: split into Eq 11-14 (one backward pass) or compute only the total.
        memory_budget_bytes: stop with :class:`~metagrad_rl.memory.MemoryBudgetError` before
            an unroll estimated to need more (default: 80% of the available memory).
        measure_memory: record the bytes held by the autograd graph
            (``diagnostics["graph_bytes"]``); adds a Python hook per saved tensor.
        flat_params: let the optimizer update ``theta`` as one flat vector (same numbers for
            element-wise optimizers and global-norm clipping, fewer ops; see
            :mod:`metagrad_rl.flat`). Use ``False`` for per-tensor transformations.
        allow_graph_cuts: accept an optimizer with a part known to leave the autograd graph
            (TorchOpt's ``clip_grad_norm``, ``use_accelerated_op=True``); its factors are then
            constants in the derivative, which is not the derivative of the update that ran,
            and ``result.notes`` says so. By default such an optimizer is a ``ConfigError``
            naming the differentiable replacement (:func:`metagrad_rl.optim.clip_grad_norm`).
        truncate: differentiate through the last ``truncate`` inner steps only (truncated
            backpropagation): ``theta`` and the optimizer state where they begin are constants,
            so the result is the exact derivative of that function (see
            :func:`metagrad_rl.unroll.unroll`); ``None`` (default) differentiates every step.
        checkpoint_every: ``None`` (default) keeps every inner step's graph until the
            backward pass (memory linear in the steps); an int ``k`` keeps only a checkpoint
            (parameters and optimizer state) every ``k`` inner steps and each round's
            prepared data, and re-runs one segment at a time in the backward pass (memory
            ``k`` steps' graph plus the checkpoints, one more forward pass of time); ``"auto"``
            takes ``k ~ sqrt(steps)``. The same numbers (:mod:`metagrad_rl.recompute`).
        second_order: how the checkpointed pass takes the inner loss's second-order products
            in each recomputed segment: ``"reverse"`` (default; reverse-over-reverse, the
            segment re-run with ``create_graph=True``) or ``"forward"`` (forward-over-reverse,
            ``torch.func.jvp`` of the inner gradient, :mod:`metagrad_rl.mixed_mode`). The same
            numbers; reverse is the faster on the trainer's rounds (``docs/results.md``).
            ``"forward"`` needs ``checkpoint_every`` and one process.

    Raises:
        ConfigError: bad input, a graph-cutting optimizer, or a non-finite value; the message
            names where it first appeared (the input ``eta``, ``prepare`` of round r, the inner
            loss, gradient or step at round r / step j, the outer loss, or the backward pass).
    """
    outer_batch = check_outer_batch(outer_batch)
    if denominator not in DENOMINATORS:
        raise ConfigError(f"denominator={denominator!r} is invalid: expected one of {DENOMINATORS}")
    pending = start_meta_gradient(
        problem,
        optimizer,
        theta,
        eta,
        rounds,
        opt_state=opt_state,
        surrogate=surrogate,
        terms=terms,
        memory_budget_bytes=memory_budget_bytes,
        measure_memory=measure_memory,
        flat_params=flat_params,
        allow_graph_cuts=allow_graph_cuts,
        truncate=truncate,
        checkpoint_every=checkpoint_every,
        second_order=second_order,
    )
    return pending.finish(outer_batch, denominator=denominator)
