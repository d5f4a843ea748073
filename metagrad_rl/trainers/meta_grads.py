"""The ``--meta-grad`` registry: one :class:`MetaGrad` entry per estimator of ``dJ_ex/deta``.

An entry is built from small pieces, the way Optax chains transformations; the bilevel trainer
(:mod:`metagrad_rl.trainers.bilevel`) only calls them:

- an :class:`Unroll` -- what the estimator differentiates and when it starts:
  :func:`lookahead` (a ``lookahead_steps``-step full-batch look-ahead from ``theta_k``, beside
  the real round), :func:`real_round` (the real policy round itself; the trainer continues
  from its ``theta_{k+1}``), :func:`truncated` ``(k)`` (its last ``k`` inner steps) or
  :func:`through_rounds` ``(R)`` (the last ``R`` policy rounds re-simulated at the current
  ``eta`` by the checkpointed reverse pass); ``None``: no unroll (Eq 17);
- a :class:`Score` -- :func:`with_score` ``("baseline")`` (the sampling-aware score term with
  a moving-average baseline) or ``("magic_box")`` (the same term through DiCE's magic box);
- ``apply(ctx)``: the gradient to step ``eta`` with, and the named parts it is made of;
- ``log_keys``: the ``progress.csv`` columns it fills; ``needs_cln``: Eq 17 (or Eq 11/12)
  is in it, so it needs a policy conditioned on ``eta``.

A new kind of unroll is one new :class:`Unroll` (``docs/estimators.md``, "Adding an
estimator"); the CLI's ``--meta-grad`` choices, the docs table and
``benchmarks/compare_terms`` read :data:`META_GRADS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metagrad_rl.errors import ConfigError
from metagrad_rl.pytree import TERMS, Params, add
from metagrad_rl.unroll import Round


# -- the pieces --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unroll:
    """What an estimator differentiates, and when the trainer starts it.

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


def with_score(kind: str) -> Score:
    """``"baseline"`` (a moving-average baseline) or ``"magic_box"`` (DiCE, no baseline)."""
    if kind == "baseline":
        return Score(kind, lambda b: 0.0 if b is None else b)
    if kind == "magic_box":
        return Score(kind, lambda b: 0.0, magic_box=True)
    raise ConfigError(f"score={kind!r} is invalid: expected 'baseline' or 'magic_box'")


@dataclass
class MetaGradContext:
    """What an estimator's ``apply`` may read in the validation round (Eq 24).

    ``result`` is the engine's :class:`~metagrad_rl.metagrad.MetaGradResult` of the unroll
    (``None`` without one); ``eq17()`` evaluates Eq 17 at ``theta_{k+1}`` on the validation
    batch with the configured denominator (computed on first call, then cached).
    """

    result: Any
    eq17_fn: Callable[[], Params]
    _eq17: Params | None = None

    def eq17(self) -> Params:
        if self._eq17 is None:
            self._eq17 = self.eq17_fn()
        return self._eq17


@dataclass(frozen=True)
class MetaGrad:
    """One ``--meta-grad`` choice (see the module docstring for each field)."""

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

    @property
    def starts_at_record(self) -> bool:
        """Its unroll starts when the policy round is recorded (and is kept until Eq 24)."""
        return self.unroll is not None and self.unroll.at_record

    @property
    def continues_from_unroll(self) -> bool:
        """``theta_{k+1}`` is its unroll's output (else the round is a plain, fused one)."""
        return self.unroll is not None and self.unroll.continues

    @property
    def keeps_rounds(self) -> int:
        """How many past policy rounds the trainer keeps for it (oldest dropped first)."""
        return 0 if self.unroll is None else self.unroll.keeps


META_GRADS: dict[str, MetaGrad] = {}


def register(entry: MetaGrad, *, replace: bool = False) -> MetaGrad:
    """Adds ``entry`` to :data:`META_GRADS` (``--meta-grad <entry.name>`` then selects it)."""
    if entry.name in META_GRADS and not replace:
        raise ConfigError(f"meta-grad {entry.name!r} is registered already: pass replace=True")
    META_GRADS[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Removes an entry (tests that register a toy estimator clean up with this)."""
    META_GRADS.pop(name, None)


def get(name: str) -> MetaGrad:
    if name not in META_GRADS:
        raise ConfigError(f"meta_grad={name!r} is invalid: expected one of {', '.join(META_GRADS)}")
    return META_GRADS[name]


# -- the built-in estimators -----------------------------------------------------------------------
TERM_KEYS = ("norm_eq11", "norm_eq12", "norm_eq13", "norm_eq14", "norm_eq17", "norm_total")
#: Log columns of the estimators with a score term (``sampling-aware``, ``dice``).
SCORE_KEYS = ("norm_eq17", "norm_total", "norm_score", "score_weight")


def _eq17(ctx: MetaGradContext) -> tuple[Params, dict[str, Params]]:
    g = ctx.eq17()
    return g, {"eq17": g}


def _lirpg(ctx: MetaGradContext) -> tuple[Params, dict[str, Params]]:
    return ctx.result.eq13, {"eq13": ctx.result.eq13}


def _three_term(ctx: MetaGradContext) -> tuple[Params, dict[str, Params]]:
    g17, g12, g13 = ctx.eq17(), ctx.result.eq12, ctx.result.eq13
    return add(g17, g12, g13), {"eq17": g17, "eq12": g12, "eq13": g13}


def _exact(ctx: MetaGradContext) -> tuple[Params, dict[str, Params]]:
    return ctx.result.total, {"total": ctx.result.total}


def _with_score(ctx: MetaGradContext) -> tuple[Params, dict[str, Params]]:
    total, score = ctx.result.total, ctx.result.score
    if score is None:  # no episode ended in the validation batch: no J_hat, no score term
        score = {k: v.new_zeros(v.shape) for k, v in total.items()}
    return add(total, score), {"total": total, "score": score}


register(
    MetaGrad(
        "eq17",
        "the CLN best-response gradient at theta_{k+1}, no unroll (the paper's 1-term)",
        _eq17,
        log_keys=("norm_eq17",),
        needs_cln=True,
    )
)
register(
    MetaGrad(
        "lirpg",
        "Eq 13 alone through a lookahead_steps-step full-batch look-ahead (LIRPG)",
        _lirpg,
        unroll=lookahead(),
        log_keys=TERM_KEYS,
    )
)
register(
    MetaGrad(
        "three-term",
        "Eq 17 + Eq 12 + Eq 13, Eq 12/13 through the look-ahead (the paper's 3-term)",
        _three_term,
        unroll=lookahead(),
        log_keys=TERM_KEYS,
        needs_cln=True,
    )
)
register(
    MetaGrad(
        "exact",
        "the total derivative through the real policy round (Eq 11+12+13+14)",
        _exact,
        unroll=real_round(),
        log_keys=TERM_KEYS,
    )
)
register(
    MetaGrad(
        "sampling-aware",
        "exact plus the score term of sampling tau_k from pi_{theta_k, eta}, with a baseline",
        _with_score,
        unroll=real_round(terms=False),
        score=with_score("baseline"),
        log_keys=SCORE_KEYS,
    )
)
register(
    MetaGrad(
        "dice",
        "exact plus the score term through DiCE's magic box (no baseline)",
        _with_score,
        unroll=real_round(terms=False),
        score=with_score("magic_box"),
        log_keys=SCORE_KEYS,
    )
)


def truncated(k: int) -> MetaGrad:
    """``truncated-k<k>``: the total through the last ``k`` inner steps of the real round."""
    return MetaGrad(
        f"truncated-k{k}",
        f"the total derivative through the last {k} inner steps of the policy round "
        "(truncated backpropagation; theta before them held constant)",
        _exact,
        unroll=last_steps(k),
        log_keys=TERM_KEYS,
    )


def multi_round(rounds: int) -> MetaGrad:
    """``exact-r<R>``: the total through the last ``R`` policy rounds, re-simulated at the
    current ``eta`` by the checkpointed reverse pass (memory of about ``sqrt`` of the steps)."""
    return MetaGrad(
        f"exact-r{rounds}",
        f"the total derivative through the last {rounds} policy rounds, re-simulated from the "
        "oldest one's stored theta at the current eta (Eq 11-14, checkpointed reverse pass)",
        _exact,
        unroll=through_rounds(rounds),
        log_keys=TERM_KEYS,
    )


def subset(names: tuple[str, ...]) -> MetaGrad:
    """``terms-eqA+eqB``: the sum of the named terms of Eq 11-14 through the real round."""
    bad = [n for n in names if n not in TERMS]
    if bad or not names:
        raise ConfigError(f"terms {bad or list(names)} are invalid: expected some of eq11..eq14")

    def apply(ctx: MetaGradContext) -> tuple[Params, dict[str, Params]]:
        parts = {n: getattr(ctx.result, n) for n in names}
        return ctx.result.subset(names), parts

    return MetaGrad(
        "terms-" + "+".join(names),
        f"{' + '.join(n.replace('eq', 'Eq ') for n in names)} through the real policy round "
        "(a partial exact meta-gradient)",
        apply,
        unroll=real_round(),
        log_keys=TERM_KEYS,
        needs_cln=any(n in ("eq11", "eq12") for n in names),
    )


for _k in (1, 8, 32):
    register(truncated(_k))
register(multi_round(3))
# In the trainer's one-round unroll Eq 14 is 0: the subsets of Eq 11-13 are the partial ones.
for _names in (("eq13",), ("eq12", "eq13"), ("eq11", "eq13"), ("eq11", "eq12")):
    register(subset(_names))


def markdown_table() -> str:
    """The registry as the docs' table (``docs/equations.md`` holds this output; a test checks
    it is current)."""
    lines = [
        "| `--meta-grad` | applies to `eta` | unroll | Eq 11-14 split | score term | log columns |",
        "|---|---|---|---|---|---|",
    ]
    for m in META_GRADS.values():
        keys = ", ".join(f"`{k}`" for k in m.log_keys)
        lines.append(
            f"| `{m.name}` | {m.help} | {m.unroll.kind if m.unroll else 'none'} "
            f"| {'yes' if m.unroll and m.unroll.terms else 'no'} "
            f"| {m.score.kind if m.score else '-'} | {keys} |"
        )
    return "\n".join(lines)
