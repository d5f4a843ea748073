"""Let users check their own meta-objective: the total and every term against finite differences.

:func:`verify_meta_gradient` runs, on the user's own problem, optimizer and batches (float64):

1. ``torch.autograd.gradcheck`` of ``eta -> L_out(theta_{k+1}(eta), eta)`` through the whole
   TorchOpt unroll, with a tolerance *relative to the gradient's own scale* (so an objective
   scaled by 1e-6 is judged as strictly as one of order 1);
2. each of Eq 11-14 against a central difference along its own path: only the ``eta`` that
   reaches the outer loss (Eq 11), the policy conditioning of the last round (Eq 12), its
   intrinsic advantages (Eq 13) or the earlier rounds (Eq 14) is moved, along random unit
   directions, so the split is verified and not only its sum;
3. the four terms against the total computed independently with one shared ``eta`` leaf.

**What is held fixed, and why.** Stop-gradient quantities are constants of the function that
autograd differentiates: the outer ratio's denominator ``pi_{theta_k, eta_i}`` (Eq 24) and,
for ``surrogate="detached"``, the inner ratio's denominator. Finite differences must see the
same function, so both are frozen at the ``eta`` being verified (an
:class:`~metagrad_rl.unroll.Anchor`) while ``eta`` moves. Everything else -- the intrinsic
advantages, the CLN conditioning, every optimizer step including the clip factor and Adam's
moments -- moves with ``eta``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Unpack

import torch
import torchopt
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError

from metagrad_rl.errors import ConfigError
from metagrad_rl.flat import FlatLayout
from metagrad_rl.inputs import check_outer_batch
from metagrad_rl.meta_problem import EtaPaths, MetaProblem, Round
from metagrad_rl.metagrad import meta_gradient
from metagrad_rl.optim import check_differentiable
from metagrad_rl.options import MetaGradKeywords, MetaGradOptions
from metagrad_rl.pytree import TERMS, BatchDict, Params, flatten
from metagrad_rl.terms import MetaGradResult
from metagrad_rl.unroll import Anchor, anchor_at, meta_objective

#: The path each term moves (the others stay at ``eta``): the fields of :class:`EtaPaths`.
TERM_PATHS = {"eq11": "outer", "eq12": "policy", "eq13": "reward", "eq14": "early"}


class VerificationError(AssertionError):
    """A meta-gradient that did not match its finite differences (the report's text)."""


def path_objective(
    problem: MetaProblem,
    optimizer: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    anchor: Anchor,
    rounds: Sequence[Round],
    outer_batch: BatchDict,
    **kwargs: Any,
) -> Callable[[EtaPaths], Tensor]:
    """``paths -> L_out`` through the unroll with the stop-gradient denominators at ``anchor``."""

    def fn(paths: EtaPaths) -> Tensor:
        return meta_objective(
            problem, optimizer, theta, paths, rounds, outer_batch, anchor=anchor, **kwargs
        )

    return fn


def path_directional_derivative(
    objective: Callable[[EtaPaths], Tensor],
    eta: Mapping[str, Tensor],
    path: str | None,
    direction: Mapping[str, Tensor],
    h: float = 1e-5,
) -> tuple[float, float]:
    """Central difference of ``objective`` along ``direction`` on one path (``None``: all).

    Richardson-extrapolated from steps ``h`` and ``h/2`` (error ``O(h^4)``). Returns the
    estimate and ``|D(h) - D(h/2)|``, a bound on the finite-difference error's size.
    """

    def at(step: float) -> float:
        moved = {k: (v + step * direction[k]).detach() for k, v in eta.items()}
        base = {k: v.detach() for k, v in eta.items()}
        if path is None:
            paths = EtaPaths.shared(moved)
        else:
            paths = EtaPaths(**{f: moved if f == path else base for f in EtaPaths._fields})
        return float(objective(paths).detach())

    d1 = (at(h) - at(-h)) / (2 * h)
    d2 = (at(h / 2) - at(-h / 2)) / h
    return (4 * d2 - d1) / 3, abs(d1 - d2)


@dataclass(frozen=True)
class TermCheck:
    """One term of the split against central differences along its own path."""

    name: str
    norm: float
    share: float  # |term| / |total|
    autograd: tuple[float, ...]  # <term, v> for each direction v
    finite_difference: tuple[float, ...]
    max_error: float  # max |autograd - fd| / tolerance scale (<= 1 passes)
    passed: bool


@dataclass(frozen=True)
class VerificationReport:
    """Outcome of :func:`verify_meta_gradient`; ``str(report)`` is a readable table."""

    gradcheck_passed: bool
    gradcheck_message: str
    term_sum_max_abs_error: float
    terms_sum_to_total: bool
    terms: dict[str, TermCheck] = field(default_factory=dict)
    rtol: float = 0.0
    total_norm: float = 0.0
    notes: tuple[str, ...] = ()
    term_sum_tolerance: float = 0.0
    """What ``term_sum_max_abs_error`` was held to: ``sum_atol + sum_rtol * scale``."""

    @property
    def passed(self) -> bool:
        terms_ok = all(t.passed for t in self.terms.values())
        return self.gradcheck_passed and self.terms_sum_to_total and terms_ok

    def raise_if_failed(self) -> None:
        """Raise :class:`VerificationError` with this report's text unless it passed."""
        if not self.passed:
            raise VerificationError(str(self))

    def __str__(self) -> str:
        lines = [
            f"meta-gradient verification: {'PASSED' if self.passed else 'FAILED'} "
            f"(rtol {self.rtol:g}, |total| {self.total_norm:.6g})",
            f"  total vs gradcheck: {'ok' if self.gradcheck_passed else 'FAILED'}",
        ]
        if not self.gradcheck_passed:
            lines += ["    " + ln for ln in self.gradcheck_message.splitlines()]
        lines.append(
            f"  terms sum to the total: {'ok' if self.terms_sum_to_total else 'FAILED'} "
            f"(max abs error {self.term_sum_max_abs_error:.3g}, tolerance "
            f"{self.term_sum_tolerance:.3g})"
        )
        lines.append("  term   |term|        share   vs central differences on its path")
        for t in self.terms.values():
            pairs = ", ".join(
                f"{a:.6g} vs {f:.6g}" for a, f in zip(t.autograd, t.finite_difference)
            )
            verdict = "ok" if t.passed else f"FAILED (error {t.max_error:.3g} x tolerance)"
            lines.append(f"  {t.name:5}  {t.norm:<12.6g}  {t.share:<6.3f}  {verdict}: {pairs}")
        zero = [t.name for t in self.terms.values() if t.norm == 0.0]
        if zero:
            lines.append(
                f"  note: {', '.join(zero)} = 0: eta does not reach the outer loss by that path "
                "(docs/engine.md says which keyword feeds which term)"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _check_float64(theta: Mapping, eta: Mapping, outer_batch: Mapping) -> None:
    for name, d in (("theta", theta), ("eta", eta), ("outer_batch", outer_batch)):
        for k, v in d.items():
            if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != torch.float64:
                raise ConfigError(f"{name}[{k!r}] is {v.dtype}: verification needs float64")


def _gradcheck(fn: Callable[[Tensor], Tensor], x: Tensor, eps: float, atol: float, rtol: float):
    try:
        ok = torch.autograd.gradcheck(fn, (x,), eps=eps, atol=atol, rtol=rtol)
        return bool(ok), "gradcheck passed"
    except GradcheckError as e:
        return False, str(e).strip()


def _check_term(
    name: str,
    term: Params,
    objective: Callable[[EtaPaths], Tensor],
    eta: Mapping[str, Tensor],
    directions: Sequence[Params],
    total_norm: float,
    rtol: float,
    h: float,
) -> TermCheck:
    """``<term, v>`` against the central difference on the term's path, for each ``v``."""
    ad, fd, err = [], [], 0.0
    for v in directions:
        a = float(flatten(term) @ flatten(v))
        f, fd_err = path_directional_derivative(objective, eta, TERM_PATHS[name], v, h)
        tol = rtol * max(abs(a), abs(f)) + rtol * 1e-3 * total_norm + 10 * fd_err
        ad.append(a)
        fd.append(f)
        err = max(err, abs(a - f) / tol if tol > 0 else float(a != f))
    norm = float(flatten(term).norm())
    share = norm / total_norm if total_norm > 0 else float("nan")
    return TermCheck(name, norm, share, tuple(ad), tuple(fd), err, err <= 1.0)


def verify_meta_gradient(
    problem: MetaProblem,
    optimizer: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Round],
    outer_batch: BatchDict | None = None,
    *,
    opt_state: Any = None,
    rtol: float = 1e-5,
    eps: float = 1e-6,
    directions: int = 2,
    h: float = 1e-5,
    sum_atol: float = 1e-10,
    sum_rtol: float = 1e-10,
    seed: int = 0,
    raise_on_failure: bool = False,
    options: MetaGradOptions | None = None,
    **keywords: Unpack[MetaGradKeywords],
) -> VerificationReport:
    """Verify the total meta-gradient and each of Eq 11-14 against finite differences.

    Every tensor must be float64 (finite differences in float32 cannot verify anything).
    Tolerances are relative: gradcheck's ``atol`` is ``rtol * max|total|``; a term passes if
    ``|<term, v> - fd| <= rtol * max(|<term, v>|, |fd|) + rtol * 1e-3 * |total| + 10 * e_fd``
    for each of ``directions`` random unit directions ``v`` (``e_fd`` the finite difference's
    own error estimate). What is held fixed while ``eta`` moves is in the module docstring.

    Args:
        rtol: relative tolerance of every comparison.
        eps: gradcheck's finite-difference step; ``h``: the per-path step.
        directions: random directions per term (seeded by ``seed``).
        sum_atol: "the terms sum to the total" passes if the largest entry of
            ``eq11 + eq12 + eq13 + eq14 - total`` is at most ``sum_atol + sum_rtol * s``,
            ``s`` the largest entry of the total and of each term (so a loss scaled by
            ``1e8`` is judged as one of order 1, and terms that cancel are allowed their
            rounding error).
        sum_rtol: the relative part of that tolerance.
        raise_on_failure: raise :class:`VerificationError` (the report's text) on failure.
        options: how the meta-gradient under test is computed, as for
            :func:`metagrad_rl.metagrad.meta_gradient` (``terms`` is set by the verifier:
            the split and the total are both computed).
        **keywords: fields of :class:`~metagrad_rl.options.MetaGradOptions` replacing those
            of ``options``. With ``allow_graph_cuts`` an optimizer with parts that leave the
            graph is verified (it then fails, as it should); with ``truncate`` the truncated
            meta-gradient is verified (its constants -- ``theta`` and optimizer state where
            the last ``truncate`` steps begin -- are frozen at ``eta`` like the stop-gradient
            denominators); with ``checkpoint_every`` (and ``second_order``) the meta-gradient
            under test comes from the checkpointed reverse pass, the finite differences are
            the same.
    """
    outer_batch = check_outer_batch(outer_batch)
    _check_float64(theta, eta, outer_batch)
    opts = MetaGradOptions.of(options, **keywords)
    check_differentiable(optimizer, opts.allow_graph_cuts)
    args = (problem, optimizer, theta, eta, rounds, outer_batch)
    split = meta_gradient(*args, opt_state=opt_state, options=replace(opts, terms=True))
    whole = meta_gradient(*args, opt_state=opt_state, options=replace(opts, terms=False))
    sum_err, sum_tol = _term_sum_error(split, whole, sum_atol, sum_rtol)
    total = flatten(whole.total)
    total_norm = float(total.norm())

    objective = _objective(args, opt_state, opts)
    layout = FlatLayout(eta)
    ok, msg = _gradcheck(
        lambda vec: objective(EtaPaths.shared(layout.unflatten(vec))),
        flatten(eta).detach().clone().requires_grad_(True),
        eps,
        rtol * float(total.abs().max()),
        rtol,
    )
    dirs = random_directions(layout, directions, seed, total.dtype)
    checks = {
        name: _check_term(name, getattr(split, name), objective, eta, dirs, total_norm, rtol, h)
        for name in TERMS
    }
    report = VerificationReport(
        ok, msg, sum_err, sum_err <= sum_tol, checks, rtol, total_norm, split.notes, sum_tol
    )
    if raise_on_failure:
        report.raise_if_failed()
    return report


def _objective(args: tuple[Any, ...], opt_state: Any, opts: MetaGradOptions) -> Any:
    """The outer loss as a function of the ``eta`` paths, everything the module docstring
    holds fixed frozen at ``eta`` (:func:`~metagrad_rl.unroll.anchor_at`); ``args`` are
    ``(problem, optimizer, theta, eta, rounds, outer_batch)``."""
    problem, optimizer, theta, eta, rounds, outer_batch = args
    anchor = anchor_at(
        problem, optimizer, theta, eta, rounds, opt_state, opts.surrogate, opts.truncate
    )
    return path_objective(
        problem, optimizer, theta, anchor, rounds, outer_batch, opt_state=opt_state,
        surrogate=opts.surrogate, denominator=opts.denominator, truncate=opts.truncate,
    )  # fmt: skip


def _term_sum_error(
    split: MetaGradResult, whole: MetaGradResult, sum_atol: float, sum_rtol: float
) -> tuple[float, float]:
    """The largest entry of ``eq11 + .. + eq14 - total`` (the total from one shared ``eta``)
    and its tolerance ``sum_atol + sum_rtol * s``, ``s`` the largest entry of any of them."""
    total = flatten(whole.total)
    sum_err = float((flatten(split.total) - total).abs().max())
    parts = [whole.total, *(getattr(split, name) for name in TERMS)]
    sum_scale = max(float(flatten(t).abs().max()) for t in parts)
    return sum_err, sum_atol + sum_rtol * sum_scale


def random_directions(layout: FlatLayout, n: int, seed: int, dtype: torch.dtype) -> list[Params]:
    """``n`` random unit directions in ``eta``'s space (shaped like ``eta``), seeded."""
    gen = torch.Generator().manual_seed(seed)
    dirs = []
    for _ in range(n):
        v = torch.randn((sum(layout.sizes),), generator=gen, dtype=dtype)
        dirs.append(layout.unflatten(v / v.norm()))
    return dirs
