"""The pieces a ``--meta-grad`` entry is built from, and how each starts and finishes.

An entry (:class:`MetaGrad`) chains small pieces, the way Optax chains transformations:

- an :class:`Unroll` -- what the estimator differentiates, when it starts (:meth:`Unroll.start`
  runs the engine's differentiable unroll) and how it finishes (:meth:`Unroll.finish` takes
  the validation batch back through it): :func:`lookahead`, :func:`real_round`,
  :func:`last_steps` ``(k)`` or :func:`through_rounds` ``(R)``; ``None``: no unroll (Eq 17);
- a :class:`Score` -- :func:`with_score` ``("baseline")`` or ``("magic_box")``: the
  sampling-aware weight its finish passes to the engine;
- ``apply(ctx)`` -- the gradient to step ``eta`` with, and its named parts.

The trainer hands an entry what it offers (:class:`UnrollInputs` when a round is recorded, a
:class:`MetaGradContext` in the validation round) and calls :meth:`MetaGrad.start_at_record`
and :meth:`MetaGrad.gradient`; it never asks which pieces an entry has. The registry and the
built-in entries are in :mod:`metagrad_rl.trainers.meta_grads`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from metagrad_rl.errors import ConfigError
from metagrad_rl.meta_problem import MetaProblem, Round
from metagrad_rl.metagrad import PendingMetaGradient, start_meta_gradient
from metagrad_rl.pytree import BatchDict, Params


@dataclass(frozen=True)
class UnrollInputs:
    """What the trainer gives an unroll to start: the engine's ``problem``, the inner
    optimizer and its state at a recorded round (``optimizer_at(rec) -> (tx, opt_state)``: the
    clip-then-optimizer chain under the learning-rate schedule that round ran under), the
    look-ahead's step count and the inner surrogate."""

    problem: MetaProblem
    optimizer_at: Callable[[Any], tuple[Any, Any]]
    lookahead_steps: int = 1
    surrogate: str = "paper"


@dataclass(frozen=True)
class Unroll:
    """What an estimator differentiates, when it starts and how it finishes.

    ``rounds(rec, past, lookahead_steps)`` gives the engine's rounds from the pending round
    ``rec`` (a :class:`~metagrad_rl.trainers.bilevel.RoundRecord`) and the ``past`` rounds kept
    for it (the last ``keeps``, oldest first); the unroll starts from the oldest one's
    ``theta`` and optimizer state, at ``rec.eta``. ``at_record``: started when the round is
    recorded (the graph kept until the validation round), else in the validation round.
    ``continues``: ``theta_{k+1}`` is this unroll's output (the trainer's policy round *is*
    the unroll). ``terms``: split ``eta`` into the Eq 11-14 paths. ``truncate`` and
    ``checkpoint_every`` go to :func:`~metagrad_rl.metagrad.start_meta_gradient`. ``kind``
    names it in the docs table.
    """

    kind: str
    rounds: Callable[[Any, Sequence[Any], int], list[Round]]
    at_record: bool = True
    continues: bool = False
    keeps: int = 0
    terms: bool = True
    truncate: int | None = None
    checkpoint_every: int | str | None = None

    def start(self, rec: Any, history: Sequence[Any], inputs: UnrollInputs) -> PendingMetaGradient:
        """The differentiable unroll of ``rec`` (and of the last ``keeps`` rounds of
        ``history`` before it, fewer early in a run), every round at ``rec.eta``."""
        past = list(history)[-self.keeps :] if self.keeps else []
        first = past[0] if past else rec
        tx, opt_state = inputs.optimizer_at(first)
        return start_meta_gradient(
            inputs.problem,
            tx,
            first.theta,
            rec.eta,
            self.rounds(rec, past, inputs.lookahead_steps),
            opt_state=opt_state,
            surrogate=inputs.surrogate,
            terms=self.terms,
            truncate=self.truncate,
            checkpoint_every=self.checkpoint_every,
        )

    def finish(
        self,
        graph: PendingMetaGradient,
        outer: BatchDict,
        denominator: str,
        score_weight: float | None = None,
        magic_box: bool = False,
    ) -> Any:
        """The engine's :class:`~metagrad_rl.metagrad.MetaGradResult`: the validation batch's
        extrinsic loss taken back through the unroll (the score term when weighted)."""
        return graph.finish(
            outer, denominator=denominator, score_weight=score_weight, magic_box=magic_box
        )


def _lookahead_rounds(rec: Any, past: Sequence[Any], lookahead_steps: int) -> list[Round]:
    full = torch.arange(rec.batch["r_ex"].numel())
    return [Round(rec.batch, [full] * lookahead_steps)]


def _recorded_rounds(rec: Any, past: Sequence[Any], lookahead_steps: int) -> list[Round]:
    return [Round(r.batch, r.minibatches) for r in (*past, rec)]


def lookahead(terms: bool = True) -> Unroll:
    """A ``lookahead_steps``-step full-batch look-ahead from ``theta_k`` (LIRPG's), beside the
    real round."""
    return Unroll("lookahead", _lookahead_rounds, terms=terms)


def real_round(terms: bool = True, truncate: int | None = None) -> Unroll:
    """The real policy round, differentiably; ``truncate``: through its last steps only."""
    if truncate is not None and truncate < 0:
        raise ConfigError(f"truncate={truncate} is invalid: expected >= 0")
    return Unroll("round", _recorded_rounds, continues=True, terms=terms, truncate=truncate)


def last_steps(k: int) -> Unroll:
    """The real round through its last ``k`` inner steps (truncated backpropagation)."""
    return real_round(truncate=k)


def through_rounds(rounds: int) -> Unroll:
    """The last ``rounds`` policy rounds, re-simulated from the oldest one's stored ``theta`` at
    the current ``eta`` in the validation round (checkpointed reverse pass); the trainer's
    rounds run as plain ones."""
    if rounds < 2:
        raise ConfigError(f"rounds={rounds} is invalid: expected >= 2 (1 is real_round())")
    return Unroll(
        "round", _recorded_rounds, at_record=False, keeps=rounds - 1, checkpoint_every="auto"
    )


@dataclass(frozen=True)
class Score:
    """The score-function term of sampling ``tau_k`` from ``pi_{theta_k, eta}``.

    ``baseline(b)``: the baseline to use given the trainer's moving average ``b`` (``None``
    before any); ``magic_box``: through DiCE's magic box instead of the weighted log-likelihood.
    """

    kind: str
    baseline: Callable[[float | None], float]
    magic_box: bool = False

    def weight(self, ctx: MetaGradContext) -> float | None:
        """The term's weight on this validation round (``None``: no episode ended in it);
        logged as ``score_weight``."""
        w = ctx.score_weight_at(self.baseline(ctx.baseline))
        ctx.diagnostics["score_weight"] = 0.0 if w is None else w
        return w


def with_score(kind: str) -> Score:
    """``"baseline"`` (a moving-average baseline) or ``"magic_box"`` (DiCE, no baseline)."""
    if kind == "baseline":
        return Score(kind, lambda b: 0.0 if b is None else b)
    if kind == "magic_box":
        return Score(kind, lambda b: 0.0, magic_box=True)
    raise ConfigError(f"score={kind!r} is invalid: expected 'baseline' or 'magic_box'")


def _no_score_weight(baseline: float) -> float | None:
    raise ConfigError("this validation round offers no score weight (score_weight_at unset)")


@dataclass
class MetaGradContext:
    """What the validation round (Eq 24) offers an estimator, each part computed on use.

    ``result`` is the engine's :class:`~metagrad_rl.metagrad.MetaGradResult` once the unroll
    has finished (``None`` without one); ``eq17()`` evaluates Eq 17 at ``theta_{k+1}`` on the
    validation batch with the configured denominator (computed on first call, then cached).
    ``rec`` is the pending round, ``history`` the rounds kept before it, ``outer`` the
    validation batch, ``inputs`` what an unroll starts from, ``score_weight_at(b)`` the
    sampling-aware weight at baseline ``b`` (the trainer's moving average is ``baseline``),
    ``combine`` averages a result over the workers; pieces add log columns to
    ``diagnostics``.
    """

    result: Any
    eq17_fn: Callable[[], Params]
    rec: Any = None
    history: Sequence[Any] = ()
    outer: BatchDict | None = None
    denominator: str = "theta_k"
    inputs: UnrollInputs | None = None
    score_weight_at: Callable[[float], float | None] = _no_score_weight
    baseline: float | None = None
    combine: Callable[[Any], Any] = lambda result: result
    diagnostics: dict[str, float] = field(default_factory=dict)
    _eq17: Params | None = None

    def eq17(self) -> Params:
        if self._eq17 is None:
            self._eq17 = self.eq17_fn()
        return self._eq17


@dataclass(frozen=True)
class MetaGrad:
    """One ``--meta-grad`` choice: ``apply`` turns what :meth:`gradient` finished into the
    applied gradient and its named parts; ``unroll`` and ``score`` are its pieces (``None``:
    none); ``log_keys`` the ``progress.csv`` columns it fills; ``needs_cln``: Eq 17 (or Eq
    11/12) is in it, so it needs a policy conditioned on ``eta``."""

    name: str
    help: str
    apply: Callable[[MetaGradContext], tuple[Params, dict[str, Params]]]
    unroll: Unroll | None = None
    score: Score | None = None
    log_keys: tuple[str, ...] = ()
    needs_cln: bool = False

    def __post_init__(self) -> None:
        if self.unroll is not None and not isinstance(self.unroll, Unroll):
            raise ConfigError(
                f"meta-grad {self.name!r}: unroll={self.unroll!r} is invalid: expected an "
                "Unroll (lookahead(), real_round(), last_steps(k), through_rounds(R)) or None"
            )
        if self.unroll is None and self.score is not None:
            raise ConfigError(f"meta-grad {self.name!r}: a score term needs an unroll")

    def start_at_record(self, rec: Any, inputs: UnrollInputs | None) -> PendingMetaGradient | None:
        """The unroll of the round ``rec`` just recorded, when this estimator starts it then
        (its graph is kept until the validation round); else ``None``."""
        if self.unroll is None or not self.unroll.at_record:
            return None
        assert inputs is not None, "an unroll needs the trainer's UnrollInputs"
        return self.unroll.start(rec, (), inputs)

    def gradient(self, ctx: MetaGradContext) -> tuple[Params, dict[str, Params]]:
        """The gradient to step ``eta`` with on this validation round, and its named parts:
        the unroll (the one started at record, or started now: a resumed run or a multi-round
        estimator) finished on ``ctx.outer`` with the score's weight, then ``apply``."""
        if self.unroll is not None:
            weight = None if self.score is None else self.score.weight(ctx)
            assert ctx.inputs is not None and ctx.outer is not None
            graph = ctx.rec.graph or self.unroll.start(ctx.rec, ctx.history, ctx.inputs)
            magic_box = self.score is not None and self.score.magic_box
            result = self.unroll.finish(graph, ctx.outer, ctx.denominator, weight, magic_box)
            ctx.result = ctx.combine(result)
        return self.apply(ctx)

    @property
    def continues_from_unroll(self) -> bool:
        """``theta_{k+1}`` is its unroll's output (else the round is a plain, fused one)."""
        return self.unroll is not None and self.unroll.continues

    @property
    def keeps_rounds(self) -> int:
        """How many past policy rounds the trainer keeps for it (oldest dropped first)."""
        return 0 if self.unroll is None else self.unroll.keeps
