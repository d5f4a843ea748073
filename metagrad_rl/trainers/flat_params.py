"""Several modules' parameters as views of one flat leaf tensor (:class:`FlatParams`), so that
gradient clipping and Adam run on a single tensor (fast on CPU) while the networks still
receive ``{name: tensor}`` dicts; :func:`flat_grads` differentiates a loss with respect to them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from metagrad_rl.errors import ConfigError
from metagrad_rl.flat import FlatLayout
from metagrad_rl.pytree import Params


class FlatParams:
    """Named parameter groups stored in one flat tensor, for a fast single-tensor optimizer.

    ``FlatParams({"theta": params_of(policy), "critic": params_of(critic)})`` copies the
    tensors into :attr:`flat` (no grad). Two ways to read them:

    - :meth:`leaves` -- ``{group: {name: leaf}}``: leaf tensors (``requires_grad``) that share
      :attr:`flat`'s memory, so an in-place update of ``flat`` updates them. With
      :meth:`flat_grad` this is the fast path of the plain PPO update.
    - :meth:`views` -- differentiable views of any flat tensor (e.g. a ``theta'`` produced by a
      differentiable optimizer step).
    """

    def __init__(
        self, groups: Mapping[str, Mapping[str, Tensor]], device: torch.device | str = "cpu"
    ) -> None:
        self.groups = {g: list(params) for g, params in groups.items()}
        named = {f"{g}/{n}": p.detach() for g, params in groups.items() for n, p in params.items()}
        self.layout = FlatLayout(named)  # the one flatten of the project (metagrad_rl.flat)
        self.flat = self.layout.flatten(named).to(device, copy=True)
        self._leaves = self.views(self.flat.detach())
        for group in self._leaves.values():
            for t in group.values():
                t.requires_grad_(True)
        self._leaf_list = [t for group in self._leaves.values() for t in group.values()]

    def copy(self) -> FlatParams:
        """A new :class:`FlatParams` of the same groups with a copy of :attr:`flat`."""
        return FlatParams(self.state_dict(), self.flat.device)

    def leaves(self) -> dict[str, Params]:
        """``{group: {name: leaf}}`` sharing :attr:`flat`'s memory (see the class docstring)."""
        return self._leaves

    def flat_grad(self, loss: Tensor) -> Tensor:
        """``d loss / d flat`` through :meth:`leaves` (one flat tensor, in :attr:`flat`'s order)."""
        return flat_grads(loss, self)[0]

    def views(self, flat: Tensor | None = None) -> dict[str, Params]:
        """``{group: {name: view}}`` of ``flat`` (default: :attr:`flat`), differentiable."""
        parts = self.layout.unflatten(self.flat if flat is None else flat)
        return {g: {n: parts[f"{g}/{n}"] for n in names} for g, names in self.groups.items()}

    def state_dict(self) -> dict[str, Params]:
        """Detached copies of every group, keyed as the modules key them."""
        return {g: {k: v.detach().clone() for k, v in p.items()} for g, p in self.views().items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        named = {}
        for key, shape in zip(self.layout.names, self.layout.shapes):
            g, name = key.split("/", 1)
            t = state.get(g, {}).get(name)
            if t is None or tuple(t.shape) != tuple(shape):
                got = None if t is None else tuple(t.shape)
                raise ConfigError(
                    f"checkpoint parameter {g}.{name} has shape {got}: expected {tuple(shape)}"
                )
            named[key] = t
        with torch.no_grad():
            self.flat.copy_(self.layout.flatten(named))


def flat_grads(loss: Tensor, *params: FlatParams) -> list[Tensor]:
    """``d loss / d flat`` of several :class:`FlatParams` in one backward pass."""
    leaves = [t for p in params for t in p._leaf_list]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    out, i = [], 0
    for p in params:
        n = len(p._leaf_list)
        parts = [
            torch.zeros(t.numel(), device=t.device) if g is None else g.reshape(-1)
            for g, t in zip(grads[i : i + n], p._leaf_list)
        ]
        out.append(torch.cat(parts))
        i += n
    return out
