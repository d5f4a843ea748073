"""Let users check their own meta-objective: ``gradcheck`` and "the terms sum to the total".

:func:`verify_meta_gradient` runs, on the user's own problem and batches (float64):

1. ``torch.autograd.gradcheck`` of ``eta -> L_out(theta_{k+1}(eta), eta)`` through the whole
   TorchOpt unroll (finite differences against autograd);
2. the four-term split of :func:`~metagrad_rl.metagrad.meta_gradient` against the total
   computed independently with one shared ``eta`` leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError

from metagrad_rl.errors import ConfigError
from metagrad_rl.metagrad import flatten, meta_gradient
from metagrad_rl.unroll import (
    Batch,
    EtaPaths,
    InnerSurrogate,
    MetaProblem,
    Params,
    Round,
    anchor_at,
    meta_objective,
)


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split a flat vector into a dict shaped like ``like`` (the inverse of ``flatten``)."""
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out


def meta_objective_fn(
    problem: MetaProblem,
    optimizer: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Round],
    outer_batch: Batch,
    **kwargs: Any,
) -> Callable[[Tensor], Tensor]:
    """``vec(eta) -> L_out`` through the unroll: a plain function of one tensor for gradcheck.

    Stop-gradient denominators are frozen at ``eta`` (an :class:`Anchor`), so finite
    differences see the same function that autograd differentiates.
    """
    anchor = anchor_at(
        problem,
        optimizer,
        theta,
        eta,
        rounds,
        kwargs.get("opt_state"),
        InnerSurrogate(kwargs.get("surrogate", "paper")),
    )

    def fn(eta_vec: Tensor) -> Tensor:
        e = unflatten(eta_vec, eta)
        return meta_objective(
            problem,
            optimizer,
            theta,
            EtaPaths.shared(e),
            rounds,
            outer_batch,
            anchor=anchor,
            **kwargs,
        )

    return fn


class VerificationReport(NamedTuple):
    """Outcome of :func:`verify_meta_gradient`."""

    gradcheck_passed: bool
    gradcheck_message: str
    term_sum_max_abs_error: float
    terms_sum_to_total: bool

    @property
    def passed(self) -> bool:
        return self.gradcheck_passed and self.terms_sum_to_total


def verify_meta_gradient(
    problem: MetaProblem,
    optimizer: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Round],
    outer_batch: Batch,
    *,
    opt_state: Any = None,
    surrogate: InnerSurrogate | str = InnerSurrogate.PAPER,
    denominator: str = "theta_k",
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    sum_atol: float = 1e-10,
) -> VerificationReport:
    """gradcheck the meta-objective and check that Eq 11-14 sum to the total.

    Every tensor must be float64 (finite differences in float32 cannot verify anything).
    """
    for name, d in (("theta", theta), ("eta", eta), ("outer_batch", outer_batch)):
        for k, v in d.items():
            if v.is_floating_point() and v.dtype != torch.float64:
                raise ConfigError(f"{name}[{k!r}] is {v.dtype}: verification needs float64")
    kw = dict(opt_state=opt_state, surrogate=InnerSurrogate(surrogate), denominator=denominator)
    fn = meta_objective_fn(problem, optimizer, theta, eta, rounds, outer_batch, **kw)
    x = flatten(eta).detach().clone().requires_grad_(True)
    try:
        ok = torch.autograd.gradcheck(fn, (x,), eps=eps, atol=atol, rtol=rtol)
        msg = "gradcheck passed"
    except GradcheckError as e:
        ok, msg = False, str(e).splitlines()[0]
    split = meta_gradient(problem, optimizer, theta, eta, rounds, outer_batch, terms=True, **kw)
    whole = meta_gradient(problem, optimizer, theta, eta, rounds, outer_batch, terms=False, **kw)
    err = float((flatten(split.total) - flatten(whole.total)).abs().max())
    return VerificationReport(ok, msg, err, err <= sum_atol)
