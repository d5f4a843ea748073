"""What a meta-gradient computation returns, and the gradients that fill it.

:class:`MetaGradResult` holds every term of ``dL_out/deta`` (Eq 11-14, dicts keyed like
``eta``), their total, Eq 17, the optional score term and diagnostics (:func:`diagnostics_of`).
:func:`eq17_gradient` is the paper's cheap CLN gradient (Eq 16-17): the Eq 11 path at a fixed
``theta``, with no unroll. All gradients are of the *loss* ``L_out``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metagrad_rl.errors import ConfigError
from metagrad_rl.inputs import check_outer_batch, check_params
from metagrad_rl.meta_problem import MetaProblem
from metagrad_rl.pytree import TERMS, BatchDict, Params, add, cosine, flatten
from metagrad_rl.unroll import outer_loss_at


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


def grads_of(loss: Tensor, params: Params, retain_graph: bool = False) -> Params:
    if not loss.requires_grad:  # e.g. Eq 17 of a policy that ignores eta
        return {n: torch.zeros_like(p) for n, p in params.items()}
    names = list(params)
    gs = torch.autograd.grad(
        loss, [params[n] for n in names], retain_graph=retain_graph, allow_unused=True
    )
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, gs)}


def grads_many(loss: Tensor, groups: Sequence[Params], retain_graph: bool = False) -> list[Params]:
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
    return grads_of(loss, eta_leaf)
