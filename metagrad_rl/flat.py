"""One flat vector for all of ``theta``: fewer, larger ops in the unroll.

The unroll's cost on small networks is per-op overhead, paid once per parameter tensor by the
optimizer's update and again by its backward. :class:`FlatLayout` packs ``theta`` into one
vector that the TorchOpt transformation updates, and hands the loss functions a dict of views
of it. For element-wise optimizers (SGD, momentum, Adam, RMSProp) and global-norm clipping the
updates are identical to the per-tensor ones; an optimizer that treats parameter tensors
differently (masks, per-tensor norms) needs ``flat_params=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torchopt
from torch import Tensor

from metagrad_rl.errors import ConfigError

FLAT_KEY = "theta"


class FlatLayout:
    """Names, shapes and sizes of a parameter dict, to pack and unpack one flat vector."""

    def __init__(self, like: Mapping[str, Tensor]) -> None:
        dtypes = {v.dtype for v in like.values()}
        devices = {v.device for v in like.values()}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ConfigError(
                f"theta mixes dtypes {sorted(map(str, dtypes))} / devices "
                f"{sorted(map(str, devices))}: flat_params needs one dtype and device "
                "(or pass flat_params=False)"
            )
        self.names = list(like)
        self.shapes = [tuple(like[k].shape) for k in self.names]
        self.sizes = [like[k].numel() for k in self.names]

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([params[k].reshape(-1) for k in self.names])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        parts = torch.split(vec, self.sizes)
        return {k: p.view(s) for k, p, s in zip(self.names, parts, self.shapes)}

    def _leaf_order(self) -> list[int]:
        """Indices of ``names`` in the order TorchOpt's pytree flattens a dict (sorted keys)."""
        index: Any = {k: i for i, k in enumerate(self.names)}
        leaves, _ = torchopt.pytree.tree_flatten(index)
        return [int(i) for i in leaves]

    def _map_state(self, state: Any, convert: Any) -> Any:
        if isinstance(state, list):
            out = convert(state)
            return out if out is not None else [self._map_state(v, convert) for v in state]
        if isinstance(state, tuple):
            items = [self._map_state(v, convert) for v in state]
            return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
        if isinstance(state, Mapping):
            return {k: self._map_state(v, convert) for k, v in state.items()}
        return state

    def flatten_state(self, state: Any) -> Any:
        """An optimizer state for per-tensor ``theta`` -> the state for the flat vector.

        TorchOpt keeps per-parameter state as lists of leaves in pytree order: a list of
        tensors shaped like the parameters becomes one flat tensor, a list of equal scalar
        counts one count.
        """
        order = self._leaf_order()
        shapes = [self.shapes[i] for i in order]

        def convert(leaves: list) -> list | None:
            if len(leaves) != len(order) or not all(isinstance(t, Tensor) for t in leaves):
                return None
            if [tuple(t.shape) for t in leaves] == shapes:
                by_name = {self.names[i]: t for i, t in zip(order, leaves)}
                return [self.flatten(by_name)]
            if all(t.dim() == 0 for t in leaves):
                return [leaves[0]]
            return None

        return self._map_state(state, convert)

    def unflatten_state(self, state: Any) -> Any:
        """The inverse of :meth:`flatten_state`."""
        order = self._leaf_order()
        total = sum(self.sizes)

        def convert(leaves: list) -> list | None:
            if len(leaves) != 1 or not isinstance(leaves[0], Tensor):
                return None
            t = leaves[0]
            if t.dim() == 1 and t.numel() == total:
                views = self.unflatten(t)
                return [views[self.names[i]] for i in order]
            if t.dim() == 0:
                return [t] * len(order)
            return None

        return self._map_state(state, convert)
