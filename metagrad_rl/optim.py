"""Differentiable optimizer pieces, and the check that an optimizer chain keeps its graph.

TorchOpt 0.7.3's ``torchopt.clip_grad_norm`` computes the global norm under ``torch.no_grad()``
and turns the clip factor into a Python float. Inside a differentiable unroll the factor is
then a constant, and whenever clipping fires the unrolled meta-gradient is not the derivative
of the update that actually ran: a clipped step ``g * c / |g|`` has the Jacobian
``(c / |g|) (I - g g^T / |g|^2)`` (the radial direction is projected out), not ``c / |g| I``.

:func:`clip_grad_norm` is the same transformation with the factor kept on the graph.
:func:`graph_cuts` names the pieces of a chain that leave the graph; the engine refuses them
(:func:`metagrad_rl.metagrad.meta_gradient`), and users can call it on their own chains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor

from metagrad_rl.errors import ConfigError

GradientTransformation = torchopt.base.GradientTransformation


class ClipByGlobalNormState(NamedTuple):
    """How often :func:`clip_grad_norm` scaled the update down: ``fired`` of ``steps`` updates.

    Counts only (integer tensors, off the graph); the clip itself is stateless.
    """

    fired: Tensor
    steps: Tensor


def clip_counts(state: Any) -> tuple[int, int]:
    """``(fired, steps)`` summed over every :class:`ClipByGlobalNormState` inside ``state``."""
    fired = steps = 0
    stack = [state]
    while stack:
        s = stack.pop()
        if isinstance(s, ClipByGlobalNormState):
            fired, steps = fired + int(s.fired.sum()), steps + int(s.steps.sum())
        elif isinstance(s, tuple | list):
            stack += list(s)
        elif isinstance(s, Mapping):
            stack += list(s.values())
    return fired, steps


def global_norm(updates: Any, norm_type: float = 2.0) -> Tensor:
    """The norm of all tensors of a pytree together, as one differentiable scalar.

    The 2-norm is ``sqrt`` of the sum of squares with the zero vector guarded, so that its
    first *and second* derivatives are finite there (``vector_norm``'s double backward at 0 is
    NaN, which would poison an unroll through an all-zero gradient).
    """
    leaves = [u for u in torchopt.pytree.tree_leaves(updates) if isinstance(u, Tensor)]
    if norm_type == math.inf:
        return torch.stack([u.abs().max() for u in leaves]).max()
    if norm_type == 2.0:
        return _guarded_sqrt(torch.stack([u.square().sum() for u in leaves]).sum())
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(u, norm_type) for u in leaves]), norm_type
    )


def _guarded_sqrt(sq: Tensor) -> Tensor:
    """``sqrt(sq)`` with finite first and second derivatives at ``sq = 0`` (0 there)."""
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, 1.0).sqrt(), 0.0)


def clip_grad_norm(
    max_norm: float,
    *,
    eps: float = 1e-6,
    norm_type: float = 2.0,
    segments: Sequence[int] | None = None,
) -> GradientTransformation:
    r"""Scale the updates by ``min(1, max_norm / (|g| + eps))``, ``|g|`` their global norm.

    The same values as ``torchopt.clip_grad_norm(max_norm)`` (and ``torch.nn.utils.
    clip_grad_norm_``), but the factor stays on the autograd graph, so a differentiable unroll
    through a clipped step is exact:

    .. math:: \frac{\partial}{\partial g}\Big(\frac{c\,g}{\lVert g\rVert + \epsilon}\Big)
              = \frac{c}{\lVert g\rVert + \epsilon}\Big(I - \frac{g g^\top}
                {\lVert g\rVert(\lVert g\rVert + \epsilon)}\Big)
              \quad\text{when clipping fires, } I \text{ otherwise.}

    Works inside ``torchopt.chain`` on a flat vector or a dict of tensors (the norm is global
    either way), with ``inplace`` True or False.

    ``segments=(n_1, n_2, ...)``: the updates are one flat vector made of consecutive parts of
    these sizes, and each part is clipped by its own norm -- the same numbers as one
    ``clip_grad_norm`` per part, in one optimizer step (the trainers' plain round steps the
    policy and the critics together this way, :func:`join_states`). The counts then hold one
    entry per part.
    """
    if not (isinstance(max_norm, int | float) and max_norm > 0 and math.isfinite(max_norm)):
        raise ConfigError(f"max_norm={max_norm!r} is invalid: expected a finite number > 0")
    if norm_type != math.inf and not norm_type > 0:
        raise ConfigError(f"norm_type={norm_type!r} is invalid: expected > 0 or math.inf")

    sizes = None if segments is None else [int(n) for n in segments]
    if sizes is not None and (not sizes or min(sizes) <= 0):
        raise ConfigError(f"segments={segments!r} is invalid: expected sizes > 0")

    def init_fn(params: Any) -> ClipByGlobalNormState:
        leaves = torchopt.pytree.tree_leaves(params)
        device = leaves[0].device if leaves else None
        shape = () if sizes is None else (len(sizes),)
        zero = torch.zeros(shape, dtype=torch.long, device=device)
        return ClipByGlobalNormState(zero, zero.clone())

    def update_fn(
        updates: Any, state: Any, *, params: Any = None, inplace: bool = True
    ) -> tuple[Any, Any]:
        if not torchopt.pytree.tree_leaves(updates):
            return updates, state
        if sizes is not None:
            return _clip_segments(updates, state, inplace, sizes, max_norm, eps, norm_type)
        scale = max_norm / (global_norm(updates, norm_type) + eps)
        factor = torch.clamp(scale, max=1.0)
        state = ClipByGlobalNormState(state.fired + (scale.detach() < 1.0).long(), state.steps + 1)
        if inplace:
            return torchopt.pytree.tree_map(lambda g: g.mul_(factor), updates), state
        return torchopt.pytree.tree_map(lambda g: g * factor, updates), state

    return GradientTransformation(init_fn, update_fn)


def _clip_segments(
    updates: Any,
    state: ClipByGlobalNormState,
    inplace: bool,
    sizes: list[int],
    max_norm: float,
    eps: float,
    norm_type: float,
) -> tuple[Any, ClipByGlobalNormState]:
    """:func:`clip_grad_norm` with ``segments``: each part of one flat vector by its norm."""
    leaves, spec = torchopt.pytree.tree_flatten(updates)
    if len(leaves) != 1 or leaves[0].dim() != 1 or leaves[0].numel() != sum(sizes):
        got = [tuple(t.shape) for t in leaves]
        raise ConfigError(
            f"clip_grad_norm(segments={sizes}) needs one flat vector of {sum(sizes)} "
            f"entries: got leaves shaped {got}"
        )
    parts = torch.split(leaves[0], sizes)
    if norm_type == 2.0:  # global_norm's guarded sqrt, for all parts at once
        norms = _guarded_sqrt(torch.stack([torch.dot(p, p) for p in parts]))
    else:
        norms = torch.stack([global_norm(p, norm_type) for p in parts])
    scales = max_norm / (norms + eps)
    factors = torch.clamp(scales, max=1.0).unbind()
    state = ClipByGlobalNormState(state.fired + (scales.detach() < 1.0).long(), state.steps + 1)
    if inplace:
        for p, f in zip(parts, factors):
            p.mul_(f)
        return updates, state
    out = torch.cat([p * f for p, f in zip(parts, factors)])
    return torchopt.pytree.tree_unflatten(spec, [out]), state


def join_states(a: Any, b: Any) -> Any:
    """Two optimizer states of the same chain on flat vectors -> the state of that chain with
    ``clip_grad_norm(segments=(len_a, len_b))`` on their concatenation.

    Per-entry tensors are concatenated, clip counts stacked; step counts must agree (they are
    the schedule's clock). :func:`split_state` is the inverse.
    """
    if isinstance(a, ClipByGlobalNormState):
        return ClipByGlobalNormState(
            torch.stack([a.fired, b.fired]), torch.stack([a.steps, b.steps])
        )
    if isinstance(a, Tensor):
        if a.dim() == 0:
            if not torch.equal(a, b):
                raise ConfigError(f"cannot join optimizer states at different counts {a} and {b}")
            return a
        return torch.cat([a, b])
    if isinstance(a, list):
        return [join_states(x, y) for x, y in zip(a, b, strict=True)]
    if isinstance(a, tuple):
        items = [join_states(x, y) for x, y in zip(a, b, strict=True)]
        return type(a)(*items) if hasattr(a, "_fields") else tuple(items)
    return a


def permute_state(state: Any, order: Tensor) -> Any:
    """An optimizer state of a flat vector ``x`` -> the state of ``x[order]``: every 1-d
    tensor of ``len(order)`` entries is indexed by ``order``; counts stay (Adam's moments are
    per entry, a global-norm clip does not see the order)."""
    n = order.numel()
    return torchopt.pytree.tree_map(
        lambda t: t[order] if isinstance(t, Tensor) and t.dim() == 1 and t.numel() == n else t,
        state,
    )


def split_state(state: Any, n: int) -> tuple[Any, Any]:
    """The inverse of :func:`join_states`: the first part has ``n`` entries (copies, not views)."""
    if isinstance(state, ClipByGlobalNormState):
        f, s = state.fired.unbind(), state.steps.unbind()
        return ClipByGlobalNormState(f[0], s[0]), ClipByGlobalNormState(f[1], s[1])
    if isinstance(state, Tensor):
        if state.dim() == 0:
            return state, state.clone()
        return state[:n].clone(), state[n:].clone()
    if isinstance(state, list | tuple):
        pairs = [split_state(x, n) for x in state]
        firsts, seconds = [p[0] for p in pairs], [p[1] for p in pairs]
        if isinstance(state, list):
            return firsts, seconds
        if hasattr(state, "_fields"):
            return type(state)(*firsts), type(state)(*seconds)
        return tuple(firsts), tuple(seconds)
    return state, state


#: ``(module, qualified name of update_fn) -> why it cuts the graph`` for transforms known to.
_GRAPH_CUTS = {
    ("torchopt.clip", "clip_grad_norm.<locals>.update_fn"): (
        "torchopt.clip_grad_norm computes the clip factor under no_grad as a Python float; "
        "use metagrad_rl.clip_grad_norm, the same clip with the factor on the graph"
    ),
    ("torchopt.transform.scale_by_adam", "_scale_by_accelerated_adam.<locals>.update_fn"): (
        "use_accelerated_op=True uses TorchOpt's C++ Adam, whose backward ignores eps and which "
        "does not load against this torch; use the default use_accelerated_op=False"
    ),
}


def _is_transform(x: Any) -> bool:
    return isinstance(x, torchopt.base.GradientTransformation)


def _children(tx: Any) -> list[GradientTransformation]:
    """The transformations a TorchOpt transformation is made of (chains, aliases' closures)."""
    found = list(getattr(tx, "transformations", ()) or ())
    for cell in getattr(tx.update, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if _is_transform(value):  # a NamedTuple itself: test it before tuples
            found.append(value)
        elif isinstance(value, (tuple, list)):  # noqa: UP038 - mypy rejects a union here
            found += [v for v in value if _is_transform(v)]
    return found


def transforms(tx: GradientTransformation) -> list[GradientTransformation]:
    """``tx`` and every transformation inside it, each once (chains, aliases' closures)."""
    out: list[GradientTransformation] = []
    stack, seen = [tx], set()
    while stack:
        t = stack.pop()
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
            stack += _children(t)
    return out


def closure_vars(fn: Any) -> dict[str, Any]:
    """The variables a TorchOpt ``update_fn`` closes over (its hyperparameters)."""
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    out = {}
    for name, cell in zip(names, getattr(fn, "__closure__", None) or ()):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    return out


def graph_cuts(tx: GradientTransformation) -> list[str]:
    """Why each part of ``tx`` that leaves the autograd graph does (empty: none known).

    Walks ``torchopt.chain`` and the chains inside TorchOpt's aliases (``adam``, ``adamw``, ...)
    and matches their update functions against the transforms known to cut the graph.
    """
    keys = [
        (getattr(t.update, "__module__", ""), getattr(t.update, "__qualname__", ""))
        for t in transforms(tx)
    ]
    return [_GRAPH_CUTS[k] for k in keys if k in _GRAPH_CUTS]


def sqrt_without_eps_root(tx: GradientTransformation) -> list[str]:
    """The parts of ``tx`` whose denominator is ``sqrt(v)`` with nothing added under the root.

    ``sqrt`` has no derivative at 0, and ``v`` is exactly 0 wherever every gradient so far was
    exactly 0 in that entry: a backward pass through such a step is ``inf * 0 = NaN``.
    TorchOpt's Adam family takes ``eps_root`` for this; RMSProp and its centred form have none.
    """
    out: list[str] = []
    for t in transforms(tx):
        qual = getattr(t.update, "__qualname__", "")
        if qual.startswith(("_scale_by_adam.", "_scale_by_accelerated_adam.")):
            if not closure_vars(t.update).get("eps_root", 0.0):
                out.append("Adam (eps_root=0)")
        elif qual.startswith(("_scale_by_rms.", "_scale_by_stddev.")):
            out.append(qual.split(".")[0].lstrip("_"))
    return out


def check_differentiable(tx: GradientTransformation, allow_graph_cuts: bool = False) -> list[str]:
    """Raise :class:`ConfigError` if ``tx`` holds a transform that cuts the graph.

    With ``allow_graph_cuts=True`` nothing is raised and the reasons are returned, so the
    caller can say in its result what was held constant.
    """
    cuts = graph_cuts(tx)
    if cuts and not allow_graph_cuts:
        raise ConfigError(
            "the inner optimizer is not differentiable, so the meta-gradient would not be exact: "
            + "; ".join(cuts)
            + " (or pass allow_graph_cuts=True to hold those factors constant knowingly)"
        )
    return cuts


# -- the inner optimizers --------------------------------------------------------------------------
def _adam(lr: Any, eps: float, eps_root: float) -> torchopt.base.GradientTransformation:
    return torchopt.adam(lr=lr, eps=eps, eps_root=eps_root)


def _sgd(lr: Any, eps: float, eps_root: float) -> torchopt.base.GradientTransformation:
    return torchopt.sgd(lr=lr)


def _momentum(lr: Any, eps: float, eps_root: float) -> torchopt.base.GradientTransformation:
    return torchopt.sgd(lr=lr, momentum=0.9)


def _rmsprop(lr: Any, eps: float, eps_root: float) -> torchopt.base.GradientTransformation:
    # the running mean of g^2 starts at eps_root > 0, so sqrt never sees 0 (differentiable)
    return torchopt.rmsprop(lr=lr, eps=eps, initial_scale=eps_root)


#: ``--inner-opt``: ``name -> (lr or schedule, eps, eps_root) -> transformation``, the update
#: after the gradient-norm clip (:func:`metagrad_rl.trainers.common.make_optimizer`). Every one
#: is TorchOpt's pure-Python, differentiable transformation: adam (``eps_root`` inside the
#: square root), plain sgd, sgd with momentum 0.9 and rmsprop (``alpha = 0.99``, its second
#: moment started at ``eps_root``). Add an entry to offer another.
INNER_OPTS: dict[str, Callable[[Any, float, float], torchopt.base.GradientTransformation]] = {
    "adam": _adam,
    "sgd": _sgd,
    "momentum": _momentum,
    "rmsprop": _rmsprop,
}
