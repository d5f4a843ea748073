"""The built-in bilevel problem: PPO inner round on intrinsic advantages, PPO outer round.

:func:`ppo_meta_problem` returns a :class:`~metagrad_rl.meta_problem.MetaProblem` for any
:class:`~metagrad_rl.networks.Policy` (e.g. the CLN-conditioned or plain
:class:`~metagrad_rl.networks.GaussianPolicy`; only the protocol is used, its ``entropy``
included) and an :class:`~metagrad_rl.networks.IntrinsicReward`:

- ``prepare`` (once per round, Eq 13 path): ``r_mix = r_ex_coef r_ex + r_in_coef r_eta(s, a)``,
  differentiable GAE with the mixed critic's values held constant (as LIRPG does), and the
  ratio's denominator ``log pi_{theta_old, eta_old}(a|s)``;
- ``inner_loss`` (Eq 23): PPO-clip on the intrinsic advantages (normalised per minibatch),
  minus an optional entropy bonus; ``eta_policy`` conditions the policy (Eq 12 path);
- ``outer_loss`` (Eq 24): PPO-clip on the extrinsic advantages of the validation batch with
  a detached denominator ``pi_{theta_den, eta_den}`` (``eta_policy``: Eq 11 path).

Round batches are time-major dicts with keys :data:`ROUND_KEYS`; outer batches are flat dicts
with keys :data:`OUTER_KEYS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor

from metagrad_rl.advantages import first_sums, gae, normalize, normalize_by_sums, second_sum
from metagrad_rl.errors import ConfigError
from metagrad_rl.meta_problem import MetaProblem
from metagrad_rl.networks import IntrinsicReward, Policy, intrinsic_reward, policy_log_prob
from metagrad_rl.ppo import clipped_surrogate_loss

#: Keys of a round batch (time-major ``[T]`` or ``[T, N]``; obs/act with a feature dim).
ROUND_KEYS = ("obs", "act", "r_ex", "v_mix", "v_mix_next", "terminated", "episode_end")
#: Keys of an outer (validation) batch (flat ``[B]``; obs/act with a feature dim).
OUTER_KEYS = ("obs", "act", "adv_ex")


def _require(name: str, batch: Mapping[str, Tensor], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ConfigError(f"{name} lacks keys {missing}: expected {list(keys)}")


def ppo_meta_problem(
    policy: Policy,
    reward_net: IntrinsicReward,
    *,
    gamma: float = 0.99,
    lam: float = 0.95,
    clip: float = 0.2,
    r_ex_coef: float = 0.0,
    r_in_coef: float = 1.0,
    ent_coef: float = 0.0,
    normalize_advantages: bool = True,
    sum_over_workers: Callable[[Tensor], Tensor] | None = None,
) -> MetaProblem:
    """The paper's bilevel PPO problem for ``policy`` and ``reward_net`` (see module doc).

    ``sum_over_workers`` (e.g. :func:`metagrad_rl.distributed.all_reduce_sum`) takes the
    advantage normalisation's mean and std over the union of the data-parallel workers'
    minibatches (inner loss) and outer batches (outer loss); ``None``: each its own.
    """
    if not 0.0 < clip < 1.0:
        raise ConfigError(f"clip={clip} is invalid: expected 0 < clip < 1")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ConfigError(f"gamma={gamma}, lam={lam} are invalid: expected values in [0, 1]")
    norm = partial(normalize, sum_over_workers=sum_over_workers) if normalize_advantages else None
    union = None
    if sum_over_workers is not None and normalize_advantages:
        union = _union_sums(sum_over_workers)
    return MetaProblem(
        prepare=_prepare(policy, reward_net, gamma, lam, r_ex_coef, r_in_coef),
        inner_loss=_inner_loss(policy, clip, ent_coef, norm),
        outer_loss=_outer_loss(policy, clip, norm),
        theta_spec={k: tuple(v.shape) for k, v in policy.named_parameters()},
        eta_spec={k: tuple(v.shape) for k, v in reward_net.named_parameters()},
        log_likelihood=_log_likelihood(policy),
        minibatch_data=union,
    )


#: Advantage normalisation (``None``: the advantages as they are).
Normalize = Callable[[Tensor], Tensor] | None


def _flat(x: Tensor, feature: bool) -> Tensor:
    """A time-major ``[T, N, ...]`` tensor as one sample dimension (a feature dim kept)."""
    return x.reshape(-1, x.shape[-1]) if feature else x.reshape(-1)


def _prepare(
    policy: Policy,
    reward_net: IntrinsicReward,
    gamma: float,
    lam: float,
    r_ex_coef: float,
    r_in_coef: float,
) -> Callable[..., dict[str, Tensor]]:
    """``prepare``: the mixed reward's GAE advantages (Eq 13 path) and the ratio's denominator."""

    def prepare(
        batch: Mapping[str, Tensor],
        *,
        eta_reward: Mapping[str, Tensor],
        theta_old: Mapping[str, Tensor],
        eta_policy_old: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        _require("round batch", batch, ROUND_KEYS)
        obs, act = _flat(batch["obs"], True), _flat(batch["act"], True)
        r_mix = batch["r_ex"] * r_ex_coef
        if r_in_coef != 0.0:
            r_in = intrinsic_reward(reward_net, eta_reward, obs, act).reshape(batch["r_ex"].shape)
            r_mix = r_mix + r_in_coef * r_in
        adv_in = gae(
            r_mix,
            batch["v_mix"],
            batch["v_mix_next"],
            batch["terminated"],
            batch["episode_end"],
            gamma,
            lam,
        )
        old_logp = policy_log_prob(policy, theta_old, obs, act, eta_policy_old)
        return {"obs": obs, "act": act, "adv_in": adv_in.reshape(-1), "old_logp": old_logp}

    return prepare


#: The keys of :func:`_union_sums`' per-minibatch entries.
UNION_SUMS = ("adv_first_sums", "adv_second_sum")


def _union_sums(sum_over_workers: Callable[[Tensor], Tensor]) -> Callable[..., list]:
    """``minibatch_data``: the union advantage sums of every minibatch of a round in two
    collectives (``[sum, count]`` of each, then each's ``sum (x - mean)^2``), instead of two
    per inner step; the arithmetic of :func:`~metagrad_rl.advantages.normalize`'s."""

    def minibatch_data(
        data: Mapping[str, Tensor], minibatches: list[Tensor]
    ) -> list[dict[str, Tensor]]:
        advs = [data["adv_in"][idx] for idx in minibatches]
        firsts = sum_over_workers(torch.stack([first_sums(a) for a in advs])).unbind()
        seconds = torch.stack([second_sum(a, f) for a, f in zip(advs, firsts, strict=True)])
        pairs = zip(firsts, sum_over_workers(seconds).unbind(), strict=True)
        return [{UNION_SUMS[0]: f, UNION_SUMS[1]: s} for f, s in pairs]

    return minibatch_data


def _inner_loss(
    policy: Policy, clip: float, ent_coef: float, norm: Normalize
) -> Callable[..., Tensor]:
    """``inner_loss`` (Eq 23): PPO-clip on the intrinsic advantages, minus the entropy bonus."""

    def inner_loss(
        theta: Mapping[str, Tensor], mb: Mapping[str, Tensor], *, eta_policy: Mapping[str, Tensor]
    ) -> Tensor:
        logp = policy_log_prob(policy, theta, mb["obs"], mb["act"], eta_policy)
        adv = mb["adv_in"]
        if UNION_SUMS[0] in mb:  # the union's statistics, taken for the round at once
            adv = normalize_by_sums(adv, mb[UNION_SUMS[0]], mb[UNION_SUMS[1]])
        elif norm is not None:
            adv = norm(adv)
        loss = clipped_surrogate_loss(logp, mb["old_logp"], adv, clip)
        if ent_coef:
            loss = loss - ent_coef * policy.entropy(theta)
        return loss

    return inner_loss


def _outer_loss(policy: Policy, clip: float, norm: Normalize) -> Callable[..., Tensor]:
    """``outer_loss`` (Eq 24): PPO-clip on the extrinsic advantages, detached denominator."""

    def outer_loss(
        theta: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
        *,
        eta_policy: Mapping[str, Tensor],
        theta_den: Mapping[str, Tensor],
        eta_den: Mapping[str, Tensor],
    ) -> Tensor:
        _require("outer batch", batch, OUTER_KEYS)
        logp = policy_log_prob(policy, theta, batch["obs"], batch["act"], eta_policy)
        old_logp = policy_log_prob(policy, theta_den, batch["obs"], batch["act"], eta_den)
        adv = batch["adv_ex"] if norm is None else norm(batch["adv_ex"])
        return clipped_surrogate_loss(logp, old_logp.detach(), adv, clip)

    return outer_loss


def _log_likelihood(policy: Policy) -> Callable[..., Tensor]:
    """``log_likelihood``: the round batch's actions' log-probability, summed."""

    def log_likelihood(
        theta: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
        *,
        eta_policy: Mapping[str, Tensor],
    ) -> Tensor:
        obs, act = _flat(batch["obs"], True), _flat(batch["act"], True)
        return policy_log_prob(policy, theta, obs, act, eta_policy).sum()

    return log_likelihood
