"""Dicts of tensors (``Params``: ``theta``, ``eta``, their gradients): the helpers every module
shares, and the names of the meta-gradient's terms.

One home for each: :func:`add` (sum key by key), :func:`take` (one minibatch of a dict of
batched tensors), :func:`detach`/:func:`detach_state`, :func:`flatten` (one vector in key
order), :func:`cosine` and :func:`all_finite`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torchopt
from torch import Tensor

Params = dict[str, Tensor]
#: A batch the engine hands to a problem: named tensors (the rollout's NamedTuple is
#: :class:`metagrad_rl.rollout.Batch`).
BatchDict = Mapping[str, Tensor]

#: The terms of the exact meta-gradient ``dL_out/deta`` (Eq 11-14), in the paper's order.
TERMS = ("eq11", "eq12", "eq13", "eq14")
#: Every named part a meta-gradient result may carry: its total, Eq 11-14, Eq 17, the score term.
PARTS = ("total", *TERMS, "eq17", "score")


def add(*trees: Mapping[str, Tensor]) -> Params:
    """The key-by-key sum of dicts with the keys of the first (``0 + a + b + ...``)."""
    return {k: sum(d[k] for d in trees) for k in trees[0]}  # type: ignore[misc]


def take(data: Mapping[str, Tensor], idx: Tensor) -> Params:
    """Rows ``idx`` of each tensor of ``data`` (0-d ones, per-batch quantities, as they are)."""
    return {k: v if v.dim() == 0 else v[idx] for k, v in data.items()}


def detach(params: Mapping[str, Tensor]) -> Params:
    """The same tensors cut from the graph (no copy)."""
    return {k: v.detach() for k, v in params.items()}


def detach_state(state: Any) -> Any:
    """An optimizer state (any pytree) with every tensor detached."""
    return torchopt.pytree.tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, state)


def clone_state(state: Any) -> Any:
    """An optimizer state (any pytree) with every tensor detached and copied (a step in place
    on the copy leaves ``state`` as it was)."""
    return torchopt.pytree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, Tensor) else x, state
    )


def flatten(grads: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a dict of tensors into one vector (in the dict's key order)."""
    return torch.cat([g.reshape(-1) for g in grads.values()])


def cosine(a: Tensor, b: Tensor) -> float:
    """The cosine of two vectors; ``nan`` when either is zero."""
    na, nb = a.norm(), b.norm()
    return float("nan") if na == 0 or nb == 0 else float(a @ b / (na * nb))


def all_finite(params: Mapping[str, Tensor]) -> bool:
    """Whether every entry of every tensor in ``params`` is finite (one device sync)."""
    return bool(torch.stack([torch.isfinite(v).all() for v in params.values()]).all())
