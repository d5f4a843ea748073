"""A float32 numpy copy of the Gaussian policy's mean for the rollout's per-step sampling.

An env step costs ~100 us and a small torch forward about as much again, so the collector
samples from :class:`NumpyPolicy` (refreshed once per rollout, exact up to float rounding);
``GaussianPolicy.sampler`` builds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from metagrad_rl.errors import ConfigError

if TYPE_CHECKING:
    from metagrad_rl.networks import GaussianPolicy


class NumpyPolicy:
    """A float32 numpy copy of :class:`GaussianPolicy`'s mean and std for per-step sampling.

    With CLN the conditioning ``cond`` is fixed during a rollout, so the gain ``f_c(eta)`` and
    bias ``h_c(eta)`` are evaluated once here and the norm becomes a LayerNorm.
    """

    def __init__(
        self, policy: GaussianPolicy, theta: Mapping[str, Tensor], cond: Tensor | None = None
    ) -> None:
        def arr(t: Tensor) -> np.ndarray:
            return t.detach().to(torch.float32).cpu().numpy().copy()

        self.layers: list[tuple[np.ndarray, np.ndarray]] = []
        for idx, m in enumerate(policy.body):
            if isinstance(m, nn.Linear):
                w, b = theta[f"body.{idx}.weight"], theta[f"body.{idx}.bias"]
                self.layers.append((arr(w).T.copy(), arr(b)))
            elif not isinstance(m, nn.Tanh):  # pragma: no cover - guards future layouts
                raise TypeError(f"NumpyPolicy cannot mirror layer {m!r}")
        self.last = (arr(theta["last.weight"]).T.copy(), arr(theta["last.bias"]))
        self.norm: tuple[np.ndarray, np.ndarray, float] | None = None
        with torch.no_grad():
            if policy.conditioning == "cln":
                if cond is None:
                    raise ConfigError("a CLN policy needs cond=cln_condition(eta)")
                c = cond.detach().to(theta["norm.gain_map.weight"].dtype)
                g = theta["norm.gain_map.weight"] @ c + theta["norm.gain_map.bias"]
                b = theta["norm.bias_map.weight"] @ c + theta["norm.bias_map.bias"]
                eps = float(policy.norm.eps)  # type: ignore[arg-type]
                self.norm = (arr(g), arr(b), eps)
            elif policy.conditioning == "layernorm":
                eps = float(policy.norm.eps)  # type: ignore[arg-type]
                self.norm = (arr(theta["norm.weight"]), arr(theta["norm.bias"]), eps)
        self.mean_w = arr(theta["mean.weight"]).T.copy()
        self.mean_b = arr(theta["mean.bias"])
        self.std = np.exp(arr(theta["log_std"]))

    def mean(self, obs: np.ndarray) -> np.ndarray:
        """The action mean ``mu(s)`` for a batch ``[B, obs_dim]`` of float32 observations."""
        h = obs
        for w, b in self.layers:
            h = np.tanh(h @ w + b)
        h = h @ self.last[0] + self.last[1]
        if self.norm is not None:
            g, b, eps = self.norm
            inv_n = np.float32(1.0 / h.shape[-1])  # sums times 1/n: ndarray.mean costs 2x more
            d = h - h.sum(axis=-1, keepdims=True) * inv_n
            var = (d * d).sum(axis=-1, keepdims=True) * inv_n
            h = d / np.sqrt(var + eps) * g + b
        return np.tanh(h) @ self.mean_w + self.mean_b
