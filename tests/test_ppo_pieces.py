"""PPO loss pieces against values worked by hand, and the TorchOpt update against torch.optim."""

from __future__ import annotations

import math

import numpy as np
import torch

from metagrad_rl.networks import Critic, GaussianPolicy, params_of
from metagrad_rl.ppo import clipped_surrogate_loss, surrogate_stats, value_loss
from metagrad_rl.trainers.common import (
    FlatParams,
    Minibatch,
    PPOCoefs,
    make_optimizer,
    ppo_loss,
    ppo_update,
)
from metagrad_rl.unroll import minibatch_indices


def test_clipped_surrogate_by_hand():
    # ratios 1, 1.5, 0.5 with advantages 1, 1, -1 and clip 0.2:
    # min(rA, clip(r)A) = 1, min(1.5, 1.2) = 1.2, min(-0.5, -0.8) = -0.8 -> mean 1.4 / 3
    logp = torch.tensor([0.0, math.log(1.5), math.log(0.5)])
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss = clipped_surrogate_loss(logp, torch.zeros(3), adv, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(-1.4 / 3))


def test_surrogate_stats_by_hand():
    logp = torch.tensor([0.0, math.log(1.5), math.log(0.5)])
    stats = surrogate_stats(logp, torch.zeros(3), clip=0.2)
    kl = (0.0 + (0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 3
    torch.testing.assert_close(stats.approx_kl, torch.tensor(kl))
    torch.testing.assert_close(stats.clip_fraction, torch.tensor(2 / 3))


def test_value_loss_by_hand():
    v, old, ret = torch.tensor([1.0, 3.0]), torch.tensor([0.5, 2.0]), torch.tensor([2.0, 2.0])
    torch.testing.assert_close(value_loss(v, ret), torch.tensor(0.5))
    # clipped values 0.7, 2.2 -> squared errors max(1, 1.69), max(1, 0.04) -> 0.5 * 2.69 / 2
    torch.testing.assert_close(value_loss(v, ret, old, clip=0.2), torch.tensor(0.5 * 2.69 / 2))


def _nets():
    torch.manual_seed(0)
    return GaussianPolicy(3, 2, (8, 8), conditioning="none"), Critic(3, (8, 8))


def _data(b=16):
    g = torch.Generator().manual_seed(1)
    return Minibatch(
        obs=torch.randn(b, 3, generator=g),
        act=torch.randn(b, 2, generator=g),
        old_logp=torch.randn(b, generator=g) - 3.0,
        adv=torch.randn(b, generator=g),
        returns=torch.randn(b, generator=g),
        old_values=torch.randn(b, generator=g),
    )


def test_ppo_update_against_torch_optim_adam_with_clipping():
    """Flat TorchOpt chain(clip_grad_norm, adam) == torch.optim.Adam + clip_grad_norm_."""
    policy, critic = _nets()
    data, coefs = _data(), PPOCoefs(ent_coef=0.01)
    ref_pol, ref_crit = _nets()
    opt = torch.optim.Adam(
        list(ref_pol.parameters()) + list(ref_crit.parameters()), lr=1e-2, eps=1e-5
    )
    mbs = minibatch_indices(16, 2, 4, torch.Generator().manual_seed(7))  # 2 epochs x 4
    for idx in mbs:  # the same minibatch order as ppo_update
        mb = Minibatch(*(x[idx] for x in data))
        loss, _ = ppo_loss(ref_pol, ref_crit, params_of(ref_pol), params_of(ref_crit), mb, coefs)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            list(ref_pol.parameters()) + list(ref_crit.parameters()), 0.05
        )
        opt.step()

    params = FlatParams({"theta": params_of(policy), "critic": params_of(critic)})
    tx = make_optimizer(1e-2, 8, 1, anneal_lr=False, max_grad_norm=0.05, eps=1e-5)
    state = tx.init((params.flat,))
    ppo_update(policy, critic, params, tx, state, data, coefs, mbs)
    got = params.views()
    for k, v in params_of(ref_pol).items():
        torch.testing.assert_close(got["theta"][k], v.detach(), rtol=1e-5, atol=1e-6)
    for k, v in params_of(ref_crit).items():
        torch.testing.assert_close(got["critic"][k], v.detach(), rtol=1e-5, atol=1e-6)


def test_linear_annealing_matches_cleanrl():
    from metagrad_rl.trainers.common import linear_schedule

    s = linear_schedule(3e-4, updates_per_iteration=10, num_iterations=4, anneal=True)
    lrs = [float(s(torch.tensor(c))) for c in (0, 9, 10, 39)]
    np.testing.assert_allclose(lrs, [3e-4, 3e-4, 3e-4 * 0.75, 3e-4 * 0.25], rtol=1e-6)
