"""A meta-gradient in two halves: the unroll now, the reverse pass once the outer batch is in.

:class:`PendingMetaGradient` is what :func:`~metagrad_rl.metagrad.start_meta_gradient` returns:
the unrolled rounds (the stored graph, or the checkpoints of :mod:`metagrad_rl.recompute`) and
``theta_{k+1}``, with which a trainer collects the validation batch; its
:meth:`~PendingMetaGradient.finish` then takes the outer loss on that batch back through the
unroll, term by term.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchopt
from torch import Tensor

from metagrad_rl import score_function
from metagrad_rl.errors import ConfigError
from metagrad_rl.inputs import check_outer_batch, check_outer_loss
from metagrad_rl.memory import GraphMemoryMeter
from metagrad_rl.meta_problem import EtaPaths, MetaProblem, Round
from metagrad_rl.optim import sqrt_without_eps_root
from metagrad_rl.options import MetaGradOptions, check_denominator
from metagrad_rl.pytree import TERMS, BatchDict, Params, add, cosine, detach_state, flatten
from metagrad_rl.recompute import Checkpointed
from metagrad_rl.terms import MetaGradResult, diagnostics_of, eq17_gradient, grads_many, grads_of
from metagrad_rl.unroll import outer_loss_at


class PendingMetaGradient:
    """An unrolled policy round whose meta-gradient waits for the outer batch.

    A trainer needs ``theta_{k+1}`` to *collect* the validation batch ``tau_{k+1}`` that the
    outer loss (Eq 24) is evaluated on. :func:`~metagrad_rl.metagrad.start_meta_gradient` runs
    the differentiable unroll and keeps its graph; :attr:`theta_next` (detached) drives the
    rollout; then :meth:`finish` takes the outer batch and returns the :class:`MetaGradResult`.
    The graph is freed by :meth:`finish` (call it once). :attr:`options` are the
    :class:`~metagrad_rl.options.MetaGradOptions` it was started with.
    """

    def __init__(
        self,
        problem: MetaProblem,
        eta: Params,
        rounds: Sequence[Round],
        paths: EtaPaths,
        res: Any,
        options: MetaGradOptions,
        meter: GraphMemoryMeter,
        t_unroll: float,
        optimizer: torchopt.base.GradientTransformation | None = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        self.problem, self.eta, self.rounds, self.paths = problem, eta, rounds, paths
        self._res, self.options, self._meter, self._t_unroll = res, options, meter, t_unroll
        self.optimizer, self.notes = optimizer, notes
        self.terms, self.truncate = options.terms, options.truncate
        self._saw_zero_gradient = bool(getattr(res, "saw_zero_gradient", False))
        self.theta_next: Params = {k: v.detach() for k, v in res.theta.items()}
        self.opt_state: Any = detach_state(res.opt_state)

    def finish(
        self,
        outer_batch: BatchDict | None = None,
        *,
        denominator: str | None = None,
        score_weight: float | None = None,
        magic_box: bool = False,
    ) -> MetaGradResult:
        """Eq 11-14 (or the total), Eq 17 and diagnostics on ``outer_batch``.

        ``denominator``: ``"theta_k"`` (the paper's Eq 24) or ``"theta_k+1"``; ``None``: the
        one of the options the unroll was started with (by default ``"theta_k"``). With
        ``score_weight = w`` the result also holds ``score = grad_eta [w sum_k log p(tau_k;
        theta_k(eta), eta)]``, the sampling-aware correction (``w = stopgrad(J_hat - b)``; see
        ``docs/score_function.md``); it needs ``problem.log_likelihood``. With ``magic_box`` the
        term is taken through DiCE's ``w * magic_box(log p)`` instead (same first derivative).
        """
        if self._res is None:
            raise ConfigError("this PendingMetaGradient was finished already: start a new one")
        outer_batch = check_outer_batch(outer_batch)
        denominator = self.options.denominator if denominator is None else denominator
        check_denominator(denominator)
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
            score = add(*grads_many(objective, groups, retain_graph=True))
        if self.terms:
            split = dict(zip(TERMS, grads_many(loss, list(paths))))
            return loss, split, add(*split.values()), score
        return loss, {}, grads_of(loss, paths.outer), score

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
