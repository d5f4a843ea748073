"""Networks of the paper (Section 3.3, Eq 20-22), all callable functionally.

Every network is an ``nn.Module`` whose parameters are read from an explicit dict with
:func:`torch.func.functional_call`, because the meta-gradient engine differentiates through
them with ``theta`` (policy) and ``eta`` (intrinsic reward) held outside the modules:

- :class:`IntrinsicReward` -- ``r_eta(s, a)``: an MLP on ``concat[s, a]``, then a small linear
  *bottleneck* with no activation, then a linear head (``tanh`` output, as LIRPG).
- :func:`cln_condition` -- the flattened weights and biases of ``r_eta``'s last two layers
  (bottleneck and head): the input ``eta`` of the best-response maps ``f_c``, ``h_c``.
- :class:`ConditionalLayerNorm` -- Eq 20-22: LayerNorm whose gain ``g = f_c(eta)`` and bias
  ``b = h_c(eta)`` are affine maps of that vector. Its maps belong to ``theta``.
- :class:`GaussianPolicy` -- tanh MLP, last hidden layer normalised by CLN (``"cln"``), by a
  plain LayerNorm (``"layernorm"``) or not at all (``"none"``), state-independent log-std.
- :class:`Critic` -- a value network, used for extrinsic and intrinsic (mixed) returns.
- :class:`Policy` -- what the engine's problem, the rollout and the trainers need of a policy
  (log-probability, entropy, a fast no-grad sampler); :class:`GaussianPolicy` is one, and
  :data:`POLICIES` names the ones ``train --policy`` can build.

Naming follows ``docs/conventions.md``: ``theta`` is a dict of policy parameters, ``eta`` a dict
of intrinsic-reward parameters, keyed as ``module.named_parameters()`` keys them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from metagrad_rl.errors import ConfigError
from metagrad_rl.numpy_policy import NumpyPolicy
from metagrad_rl.pytree import Params

#: Keys of ``eta`` that condition the policy (the reward net's last two layers, Fig. 2-3).
CONDITION_KEYS = ("bottleneck.weight", "bottleneck.bias", "head.weight", "head.bias")
CONDITIONINGS = ("cln", "layernorm", "none")
LOG_2PI = math.log(2.0 * math.pi)


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [_orthogonal(nn.Linear(n_in, n_out), math.sqrt(2.0)), nn.Tanh()]
    return nn.Sequential(*layers)


def _apply_mlp(seq: nn.Sequential, prefix: str, p: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``seq(x)`` with the parameters ``p`` (keys ``prefix.i.weight``, ``prefix.i.bias``) for a
    stack of ``Linear`` and ``Tanh`` layers: what ``functional_call`` computes, op for op, but
    without swapping the module's parameters in and out (a third of its time at these sizes)."""
    for i, m in enumerate(seq):
        if isinstance(m, nn.Linear):
            x = F.linear(x, p[f"{prefix}.{i}.weight"], p[f"{prefix}.{i}.bias"])
        elif isinstance(m, nn.Tanh):
            x = torch.tanh(x)
        else:  # pragma: no cover - guarded by _plain_mlp
            raise TypeError(f"_apply_mlp cannot apply layer {m!r}")
    return x


def _plain_mlp(seq: nn.Module) -> bool:
    return isinstance(seq, nn.Sequential) and all(isinstance(m, (nn.Linear, nn.Tanh)) for m in seq)


def _check_sizes(name: str, sizes: Sequence[int]) -> None:
    if len(sizes) == 0 or any((not isinstance(h, int)) or h <= 0 for h in sizes):
        raise ConfigError(f"{name}={tuple(sizes)!r} is invalid: expected one or more positive ints")


def params_of(module: nn.Module | Policy) -> Params:
    """The module's parameters as a plain dict (the tensors themselves, not copies)."""
    return dict(module.named_parameters())


class IntrinsicReward(nn.Module):
    """``r_eta(s, a) = out_act(head(bottleneck(mlp(concat[s, a]))))``.

    The bottleneck is linear with no activation (the paper's Fig. 2): its weights and the
    head's are what conditions the policy. ``output="tanh"`` bounds the reward as LIRPG does.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (64, 64),
        bottleneck: int = 8,
        output: str = "tanh",
    ) -> None:
        super().__init__()
        _check_sizes("reward hidden", hidden)
        if not isinstance(bottleneck, int) or bottleneck <= 0:
            raise ConfigError(f"bottleneck={bottleneck!r} is invalid: expected a positive int")
        if bottleneck > hidden[-1]:
            raise ConfigError(
                f"bottleneck={bottleneck} is wider than its input layer ({hidden[-1]} units): "
                f"expected 1 <= bottleneck <= {hidden[-1]}"
            )
        if output not in ("tanh", "linear"):
            raise ConfigError(f"reward output={output!r} is invalid: expected 'tanh' or 'linear'")
        self.output = output
        self.body = _mlp([obs_dim + act_dim, *hidden])
        self.bottleneck = _orthogonal(nn.Linear(hidden[-1], bottleneck), 1.0)
        self.head = _orthogonal(nn.Linear(bottleneck, 1), 1.0)

    @property
    def condition_dim(self) -> int:
        """Length of :func:`cln_condition` for this network."""
        return sum(p.numel() for n, p in self.named_parameters() if n in CONDITION_KEYS)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        z = self.head(self.bottleneck(self.body(torch.cat([obs, act], dim=-1)))).squeeze(-1)
        return torch.tanh(z) if self.output == "tanh" else z


def cln_condition(eta: Mapping[str, Tensor]) -> Tensor:
    """The CLN input: ``concat[vec(W_bottleneck), b_bottleneck, vec(W_head), b_head]``.

    A pure function of ``eta``; it is how ``eta`` reaches the policy (Eq 21-22).
    """
    missing = [k for k in CONDITION_KEYS if k not in eta]
    if missing:
        raise ConfigError(
            f"eta lacks {missing}: expected the keys of IntrinsicReward.named_parameters()"
        )
    return torch.cat([eta[k].reshape(-1) for k in CONDITION_KEYS])


def condition_for(conditioning: str, eta: Mapping[str, Tensor] | None) -> Tensor | None:
    """A policy's conditioning input at ``eta``: :func:`cln_condition` for a ``"cln"`` policy,
    ``None`` for any other (or without ``eta``). The one place that decides it."""
    return cln_condition(eta) if conditioning == "cln" and eta is not None else None


class ConditionalLayerNorm(nn.Module):
    r"""Conditional Layer Normalization, Eq 20-22 (activation ``f`` applied by the caller).

    .. math:: \mathrm{CLN}(a \mid \eta) = \frac{g}{\sigma}\odot(a-\mu) + b,\quad
              g = W_g c(\eta) + b_g,\quad b = W_b c(\eta) + b_b

    ``gain_map`` and ``bias_map`` are affine maps of the conditioning vector ``c``
    (:func:`cln_condition`). With zero weights CLN is LayerNorm with gain ``b_g`` and bias
    ``b_b``. Weights start small (``init_scale / sqrt(cond_dim)``) so that the policy reacts to
    ``eta`` from the first update; the gain's bias starts at 1.
    """

    def __init__(
        self, num_features: int, cond_dim: int, eps: float = 1e-5, init_scale: float = 0.1
    ) -> None:
        super().__init__()
        self.eps = eps
        self.gain_map = nn.Linear(cond_dim, num_features)
        self.bias_map = nn.Linear(cond_dim, num_features)
        std = init_scale / math.sqrt(cond_dim)
        for m, b0 in ((self.gain_map, 1.0), (self.bias_map, 0.0)):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.constant_(m.bias, b0)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        # one fused op: (x - mean) / sqrt(var + eps) * gain + bias, var the biased variance
        # (tests/test_networks_cln.py checks it against that formula, and its derivatives)
        return cln_apply(x, self.gain_map(cond), self.bias_map(cond), self.eps)


def cln_apply(x: Tensor, gain: Tensor, bias: Tensor, eps: float) -> Tensor:
    """CLN's normalisation with a given gain and bias (one for all rows, or one per row)."""
    if gain.dim() == 1:
        return F.layer_norm(x, x.shape[-1:], gain, bias, eps)
    mu = x.mean(dim=-1, keepdim=True)  # a condition per row: the formula itself
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return gain * ((x - mu) * torch.rsqrt(var + eps)) + bias


class Sampler(Protocol):
    """A no-grad snapshot of a policy for per-step acting: ``mean(obs) + std * noise``."""

    std: Any

    def mean(self, obs: Any) -> Any: ...


@runtime_checkable
class Policy(Protocol):
    """What the engine's problem, the rollout and the trainers need of a policy.

    ``theta`` is always an explicit dict of the policy's parameters (keyed as
    ``named_parameters()``); ``cond`` is ``cln_condition(eta)`` when ``conditioning == "cln"``
    and ``None`` otherwise. No caller names the policy's parameters.
    """

    conditioning: str

    def named_parameters(self) -> Any: ...

    def log_prob(
        self, theta: Mapping[str, Tensor], obs: Tensor, act: Tensor, cond: Tensor | None
    ) -> Tensor:
        """``log pi(act | obs)`` summed over action dimensions, a pure function of ``theta``."""
        ...

    def entropy(self, theta: Mapping[str, Tensor]) -> Tensor:
        """The entropy (mean over states where it depends on them; here state-independent)."""
        ...

    def sampler(self, theta: Mapping[str, Tensor], cond: Tensor | None) -> Sampler:
        """A fast float32 numpy (or no-grad) copy for the rollout's per-step sampling."""
        ...


class GaussianPolicy(nn.Module):
    """``pi_{theta, eta}(a|s) = N(mu(s), diag(exp(2 log_std)))``, state-independent log-std.

    Layout: ``tanh MLP -> Linear -> norm -> tanh -> mean``; ``norm`` is CLN
    (``conditioning="cln"``, needs ``cond_dim``), a plain LayerNorm or identity (``"none"``).
    Orthogonal init with gain sqrt(2) and a mean head with gain 0.01 (CleanRL's PPO details).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (64, 64),
        conditioning: str = "cln",
        cond_dim: int | None = None,
        init_log_std: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sizes("policy hidden", hidden)
        if conditioning not in CONDITIONINGS:
            raise ConfigError(
                f"conditioning={conditioning!r} is invalid: expected one of {CONDITIONINGS}"
            )
        if conditioning == "cln" and (cond_dim is None or cond_dim <= 0):
            raise ConfigError(f"cond_dim={cond_dim!r} is invalid: CLN needs a positive int")
        self.conditioning = conditioning
        self.body = _mlp([obs_dim, *hidden[:-1]])
        self.last = _orthogonal(nn.Linear(([obs_dim, *hidden])[-2], hidden[-1]), math.sqrt(2.0))
        self.norm: nn.Module
        if conditioning == "cln":
            assert cond_dim is not None
            self.norm = ConditionalLayerNorm(hidden[-1], cond_dim)
        elif conditioning == "layernorm":
            self.norm = nn.LayerNorm(hidden[-1])
        else:
            self.norm = nn.Identity()
        self.mean = _orthogonal(nn.Linear(hidden[-1], act_dim), 0.01)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))

    def forward(self, obs: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(mean, log_std)``; ``cond`` is required exactly when conditioning is CLN."""
        h = self.last(self.body(obs))
        if self.conditioning == "cln":
            if cond is None:
                raise ConfigError("a CLN policy needs cond=cln_condition(eta)")
            h = self.norm(h, cond)
        else:
            h = self.norm(h)
        return self.mean(torch.tanh(h)), self.log_std

    def log_prob(
        self, theta: Mapping[str, Tensor], obs: Tensor, act: Tensor, cond: Tensor | None
    ) -> Tensor:
        c = cond if self.conditioning == "cln" else None
        if type(self).forward is GaussianPolicy.forward and _plain_mlp(self.body):
            mean, log_std = self._forward_with(theta, obs, c)
        else:  # a subclass with its own forward or layers
            mean, log_std = functional_call(self, dict(theta), (obs, c))
        return gaussian_log_prob(mean, log_std, act)

    def _forward_with(
        self, theta: Mapping[str, Tensor], obs: Tensor, cond: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` with ``theta`` in place of the module's parameters, op for op."""
        h = _apply_mlp(self.body, "body", theta, obs)  # type: ignore[arg-type]
        h = F.linear(h, theta["last.weight"], theta["last.bias"])
        if self.conditioning == "cln":
            if cond is None:
                raise ConfigError("a CLN policy needs cond=cln_condition(eta)")
            gain = F.linear(cond, theta["norm.gain_map.weight"], theta["norm.gain_map.bias"])
            bias = F.linear(cond, theta["norm.bias_map.weight"], theta["norm.bias_map.bias"])
            h = cln_apply(h, gain, bias, self.norm.eps)  # type: ignore[arg-type]
        elif self.conditioning == "layernorm":
            norm: nn.LayerNorm = self.norm  # type: ignore[assignment]
            h = F.layer_norm(
                h, norm.normalized_shape, theta["norm.weight"], theta["norm.bias"], norm.eps
            )
        return F.linear(torch.tanh(h), theta["mean.weight"], theta["mean.bias"]), theta["log_std"]

    def entropy(self, theta: Mapping[str, Tensor]) -> Tensor:
        return gaussian_entropy(theta["log_std"])

    def sampler(self, theta: Mapping[str, Tensor], cond: Tensor | None) -> Sampler:
        return NumpyPolicy(self, theta, cond)


def gaussian_policy(
    obs_dim: int, act_dim: int, hidden: Sequence[int], conditioning: str, cond_dim: int | None
) -> GaussianPolicy:
    return GaussianPolicy(obs_dim, act_dim, hidden, conditioning=conditioning, cond_dim=cond_dim)


#: ``train --policy NAME``: ``factory(obs_dim, act_dim, hidden, conditioning, cond_dim)``.
POLICIES: dict[str, Callable[..., Policy]] = {"gaussian": gaussian_policy}


class Critic(nn.Module):
    """``V(s)``: tanh MLP with a linear head (orthogonal init, head gain 1)."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        _check_sizes("critic hidden", hidden)
        self.body = _mlp([obs_dim, *hidden])
        self.head = _orthogonal(nn.Linear(hidden[-1], 1), 1.0)

    def forward(self, obs: Tensor) -> Tensor:
        return self.head(self.body(obs)).squeeze(-1)

    def values(self, params: Mapping[str, Tensor], obs: Tensor) -> Tensor:
        """``V(obs)`` as a pure function of ``params`` (what ``functional_call`` gives)."""
        if type(self).forward is Critic.forward and _plain_mlp(self.body):
            h = _apply_mlp(self.body, "body", params, obs)  # type: ignore[arg-type]
            return F.linear(h, params["head.weight"], params["head.bias"]).squeeze(-1)
        return functional_call(self, dict(params), (obs,))


def gaussian_log_prob(mean: Tensor, log_std: Tensor, act: Tensor) -> Tensor:
    """``log N(act; mean, exp(log_std)^2)`` summed over action dimensions."""
    z = (act - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)


def gaussian_entropy(log_std: Tensor) -> Tensor:
    """Entropy of a diagonal Gaussian (independent of the state)."""
    return (log_std + 0.5 * (1.0 + LOG_2PI)).sum(-1)


def policy_log_prob(
    policy: Policy,
    theta: Mapping[str, Tensor],
    obs: Tensor,
    act: Tensor,
    eta: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """``log pi_{theta, eta}(act | obs)`` as a pure function of ``theta`` and ``eta``.

    ``eta`` is used only by a CLN policy (through :func:`cln_condition`); it may be ``None``
    for an unconditioned one.
    """
    return policy.log_prob(theta, obs, act, condition_for(policy.conditioning, eta))


def intrinsic_reward(
    reward_net: IntrinsicReward, eta: Mapping[str, Tensor], obs: Tensor, act: Tensor
) -> Tensor:
    """``r_eta(obs, act)`` as a pure function of ``eta``."""
    return functional_call(reward_net, dict(eta), (obs, act))
