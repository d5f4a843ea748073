"""The cotangents that the checkpointed reverse pass (:mod:`metagrad_rl.recompute`) carries.

An :class:`Adjoint` is one cotangent on its way back through the recomputed unroll -- the outer
loss's, or the score term's -- with what it has gathered so far: the adjoint of the parameters
being updated (``gx``), of the optimizer state's leaves (``gstate``), of each round's prepared
data (``gdata``, pulled back through ``prepare`` at the round's start) and the gradient along
each path of ``eta`` (``eta``, one dict per field of :class:`~metagrad_rl.meta_problem.EtaPaths`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad_rl.meta_problem import EtaPaths
from metagrad_rl.pytree import Params

#: Index of each path of ``eta`` in :class:`EtaPaths` (outer, policy, reward, early).
OUTER, POLICY, REWARD, EARLY = range(4)


@dataclass
class Adjoint:
    """One cotangent carried back through the unroll (the outer loss's, or the score's)."""

    gx: Params
    gstate: dict[int, Tensor]
    gdata: dict[int, dict[str, Tensor]]
    eta: list[Params]
    inject: list[Params] | None

    @classmethod
    def of(cls, loss: Tensor, x_n: Params, paths: EtaPaths) -> Adjoint:
        """The outer loss's gradient w.r.t. ``theta_{k+1}`` (``x_n``) and ``eta``'s outer path."""
        names = list(x_n)
        eta_in = unique_leaves([(OUTER, paths[OUTER])])
        inputs = [x_n[k] for k in names] + [t for _, _, t in eta_in]
        ct = cls({}, {}, {}, [zeros_like(p) for p in paths], None)
        gs = grad_or_zeros(loss, inputs)
        ct.gx = {k: gs[i] for i, k in enumerate(names)}
        ct.add_eta(eta_in, gs[len(names) :])
        return ct

    @classmethod
    def of_score(
        cls, objective: Tensor, xs: list[Params], paths: EtaPaths, x_final: Params
    ) -> Adjoint:
        """The score objective's gradient w.r.t. each round start (``xs``) and every path of
        ``eta``; it enters the reverse pass at the round starts (zero at ``x_final``)."""
        eta_in = unique_leaves(list(enumerate(paths)))
        flat_x = [t for x in xs for t in x.values()]
        gs = grad_or_zeros(objective, flat_x + [t for _, _, t in eta_in])
        inject, i = [], 0
        for x in xs:
            inject.append({k: gs[i + n] for n, k in enumerate(x)})
            i += len(x)
        ct = cls(zeros_like(x_final), {}, {}, [], inject)
        ct.eta = [zeros_like(p) for p in paths]
        ct.add_eta(eta_in, gs[i:])
        return ct

    def state_cotangent(self, i: int) -> Tensor | None:
        """The adjoint of state leaf ``i`` (``None`` at the unroll's end: the outer loss does
        not read the optimizer state)."""
        return self.gstate.get(i)

    def add_data(self, r: int, grads: Mapping[str, Tensor]) -> None:
        have = self.gdata.setdefault(r, {})
        for k, g in grads.items():
            have[k] = g if k not in have else have[k] + g

    def add_eta(self, eta_in: list[tuple[int, str, Tensor]], grads: Sequence[Tensor]) -> None:
        for (path, name, _), g in zip(eta_in, grads):
            self.eta[path][name] = self.eta[path][name] + g


def unique_leaves(groups: list[tuple[int, Params]]) -> list[tuple[int, str, Tensor]]:
    """``(path, name, tensor)`` for each distinct tensor (a shared ``eta`` counted once)."""
    seen: set[int] = set()
    out = []
    for path, params in groups:
        for name, t in params.items():
            if id(t) not in seen and t.requires_grad:
                seen.add(id(t))
                out.append((path, name, t))
    return out


def grad_or_zeros(loss: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    if not inputs:
        return []
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs)]


def zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}
