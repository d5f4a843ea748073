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

This module holds the entry points, :func:`meta_gradient` and its first half
:func:`start_meta_gradient`; how they compute is a :class:`~metagrad_rl.options.MetaGradOptions`
(keywords or ``options=``). What they return is in :mod:`metagrad_rl.terms`
(:class:`MetaGradResult`, :func:`eq17_gradient`), the reverse half in
:mod:`metagrad_rl.pending` (:class:`PendingMetaGradient`); both are importable from here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

import torchopt
from torch import Tensor

from metagrad_rl.inputs import check_outer_batch, check_rounds, check_start_inputs
from metagrad_rl.memory import GraphMemoryMeter, check_unroll_memory
from metagrad_rl.meta_problem import EtaPaths, MetaProblem, Round
from metagrad_rl.options import DENOMINATORS, MetaGradKeywords, MetaGradOptions
from metagrad_rl.pending import PendingMetaGradient
from metagrad_rl.pytree import BatchDict
from metagrad_rl.recompute import forward_sweep
from metagrad_rl.terms import MetaGradResult, diagnostics_of, eq17_gradient
from metagrad_rl.unroll import unroll

__all__ = [
    "DENOMINATORS",
    "MetaGradOptions",
    "MetaGradResult",
    "PendingMetaGradient",
    "diagnostics_of",
    "eq17_gradient",
    "meta_gradient",
    "start_meta_gradient",
]


def start_meta_gradient(
    problem: MetaProblem,
    optimizer: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Round],
    *,
    opt_state: Any = None,
    options: MetaGradOptions | None = None,
    **keywords: Unpack[MetaGradKeywords],
) -> PendingMetaGradient:
    """The first half of :func:`meta_gradient`: validate, check memory, unroll (the graph
    kept, or with ``checkpoint_every`` only the checkpoints of the recomputing pass).

    The arguments are :func:`meta_gradient`'s; ``denominator`` becomes the default of
    :meth:`PendingMetaGradient.finish`.
    """
    opts = MetaGradOptions.of(options, **keywords)
    cuts = check_start_inputs(problem, optimizer, theta, eta, opt_state, opts)
    rounds = check_rounds(rounds)
    check_unroll_memory(
        problem,
        optimizer,
        theta,
        eta,
        rounds,
        opt_state,
        opts.surrogate,
        opts.memory_budget_bytes,
        checkpoint_every=opts.checkpoint_every,
    )
    t0 = time.perf_counter()
    eta_c = {k: v.detach() for k, v in eta.items()}
    paths = (
        EtaPaths.leaves(eta_c)
        if opts.terms
        else EtaPaths.shared({k: v.clone().requires_grad_(True) for k, v in eta_c.items()})
    )
    meter = GraphMemoryMeter(enabled=opts.measure_memory)
    res: Any
    if opts.checkpoint_every is not None:
        res = forward_sweep(problem, optimizer, theta, paths, rounds, opt_state, opts)
    else:
        with meter:
            res = unroll(
                problem, optimizer, theta, paths, rounds, opt_state, opts.surrogate,
                flat_params=opts.flat_params, truncate=opts.truncate,
            )  # fmt: skip
    notes = tuple(f"held constant (allow_graph_cuts=True): {why}" for why in cuts)
    elapsed = time.perf_counter() - t0
    return PendingMetaGradient(
        problem, eta_c, rounds, paths, res, opts, meter, elapsed, optimizer, notes
    )


def meta_gradient(
    problem: MetaProblem,
    optimizer: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Round],
    outer_batch: BatchDict | None = None,
    *,
    opt_state: Any = None,
    options: MetaGradOptions | None = None,
    **keywords: Unpack[MetaGradKeywords],
) -> MetaGradResult:
    """Exact ``dL_out/deta`` through ``len(rounds)`` unrolled policy rounds, term by term.

    How it is computed (the surrogate, the denominator, truncation, checkpointing, ...) is a
    :class:`~metagrad_rl.options.MetaGradOptions`, given as ``options=``, as keywords
    (``meta_gradient(..., truncate=3)``) or both (the keywords replace the object's fields).

    Args:
        problem: the bilevel problem (e.g. :func:`metagrad_rl.problems.ppo_meta_problem`).
        optimizer: the inner TorchOpt transformation (``torchopt.adam(3e-4)``, ...).
        theta: policy parameters at the start of the first unrolled round (detached inside).
        eta: intrinsic-reward parameters ``eta_i``.
        rounds: the unrolled rounds, oldest first; the last is the round ``k -> k+1``.
        outer_batch: the validation batch ``tau_{k+1}`` for Eq 24 (``None``: ``outer_loss``
            gets ``{}``, for objectives that read no data).
        opt_state: the optimizer state at the first round (``optimizer.init(theta)`` if None).
        options: the settings (default: every field of
            :class:`~metagrad_rl.options.MetaGradOptions` at its default).
        **keywords: fields of :class:`~metagrad_rl.options.MetaGradOptions` (``surrogate``,
            ``denominator``, ``terms``, ``truncate``, ``checkpoint_every``, ``second_order``,
            ``flat_params``, ``allow_graph_cuts``, ``memory_budget_bytes``,
            ``measure_memory``), each replacing that field of ``options``.

    Raises:
        ConfigError: bad input, a graph-cutting optimizer, or a non-finite value; the message
            names where it first appeared (the input ``eta``, ``prepare`` of round r, the inner
            loss, gradient or step at round r / step j, the outer loss, or the backward pass).
        DivergenceError: the inner updates ran away from finite input (non-finite
            parameters after a step); the message names the round and step.
    """
    outer_batch = check_outer_batch(outer_batch)
    opts = MetaGradOptions.of(options, **keywords)
    pending = start_meta_gradient(
        problem, optimizer, theta, eta, rounds, opt_state=opt_state, options=opts
    )
    return pending.finish(outer_batch)
