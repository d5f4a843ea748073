"""The ``--meta-grad`` registry: one :class:`MetaGrad` entry per estimator of ``dJ_ex/deta``.

An entry is built from the pieces of :mod:`metagrad_rl.trainers.meta_grad_pieces` (imported
here too): an :class:`Unroll` (:func:`lookahead`, :func:`real_round`, :func:`last_steps`,
:func:`through_rounds`, or ``None``), an optional :class:`Score` (:func:`with_score`) and
``apply``. The pieces start and finish themselves; the bilevel trainer
(:mod:`metagrad_rl.trainers.bilevel`) only calls :meth:`MetaGrad.start_at_record` and
:meth:`MetaGrad.gradient`.

A new kind of estimator is one new :class:`Unroll` or :class:`MetaGrad` (``docs/estimators.md``,
"Adding an estimator"); the CLI's ``--meta-grad`` choices, the docs table and
``benchmarks/compare_terms`` read :data:`META_GRADS`.
"""

from __future__ import annotations

from metagrad_rl.errors import ConfigError
from metagrad_rl.pytree import TERMS, Params, add
from metagrad_rl.trainers.meta_grad_pieces import (
    MetaGrad,
    MetaGradContext,
    Score,
    Unroll,
    UnrollInputs,
    last_steps,
    lookahead,
    real_round,
    through_rounds,
    with_score,
)

__all__ = [
    "META_GRADS",
    "MetaGrad",
    "MetaGradContext",
    "Score",
    "Unroll",
    "UnrollInputs",
    "get",
    "last_steps",
    "lookahead",
    "markdown_table",
    "multi_round",
    "real_round",
    "register",
    "subset",
    "through_rounds",
    "truncated",
    "unregister",
    "with_score",
]

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
