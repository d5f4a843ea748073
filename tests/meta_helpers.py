"""Tiny float64 bilevel problems shared by the meta-gradient tests (~500 parameters)."""

from __future__ import annotations

import torch
import torchopt

from metagrad_rl.networks import GaussianPolicy, IntrinsicReward, params_of
from metagrad_rl.problems import ppo_meta_problem
from metagrad_rl.unroll import Round, minibatch_indices

OBS, ACT = 3, 2


def make_nets(conditioning: str = "cln", seed: int = 0):
    torch.manual_seed(seed)
    reward = IntrinsicReward(OBS, ACT, hidden=(6,), bottleneck=2).double()
    policy = GaussianPolicy(
        OBS, ACT, hidden=(6, 6), conditioning=conditioning, cond_dim=reward.condition_dim
    ).double()
    # A non-trivial policy: larger mean head and CLN maps than the init, so that every
    # path carries signal.
    with torch.no_grad():
        policy.mean.weight.normal_(0.0, 0.5)
        if conditioning == "cln":
            policy.norm.gain_map.weight.normal_(0.0, 0.3)
            policy.norm.bias_map.weight.normal_(0.0, 0.3)
    return policy, reward


def round_batch(gen: torch.Generator, T: int = 10) -> dict[str, torch.Tensor]:
    term = torch.zeros(T, dtype=torch.float64)
    end = torch.zeros(T, dtype=torch.float64)
    term[3] = 1.0
    end[3] = 1.0
    end[7] = 1.0  # a truncation
    return {
        "obs": torch.randn(T, OBS, generator=gen, dtype=torch.float64),
        "act": torch.randn(T, ACT, generator=gen, dtype=torch.float64),
        "r_ex": torch.randn(T, generator=gen, dtype=torch.float64),
        "v_mix": torch.randn(T, generator=gen, dtype=torch.float64),
        "v_mix_next": torch.randn(T, generator=gen, dtype=torch.float64),
        "terminated": term,
        "episode_end": end,
    }


def outer_batch(gen: torch.Generator, B: int = 12) -> dict[str, torch.Tensor]:
    return {
        "obs": torch.randn(B, OBS, generator=gen, dtype=torch.float64),
        "act": torch.randn(B, ACT, generator=gen, dtype=torch.float64),
        "adv_ex": torch.randn(B, generator=gen, dtype=torch.float64),
    }


def make_setup(
    conditioning: str = "cln",
    n_rounds: int = 1,
    steps: int = 2,
    seed: int = 0,
    r_ex_coef: float = 0.5,
    clip: float = 0.2,
):
    """(problem, theta, eta, rounds, outer) for a tiny problem with ``steps`` steps a round."""
    policy, reward = make_nets(conditioning, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rounds = []
    for _ in range(n_rounds):
        mbs = minibatch_indices(10, epochs=steps, num_minibatches=1, generator=gen)
        rounds.append(Round(round_batch(gen), mbs[:steps]))
    problem = ppo_meta_problem(
        policy, reward, r_ex_coef=r_ex_coef, r_in_coef=1.0, clip=clip, ent_coef=0.01
    )
    theta = {k: v.detach() for k, v in params_of(policy).items()}
    eta = {k: v.detach() for k, v in params_of(reward).items()}
    return problem, theta, eta, rounds, outer_batch(gen)


OPTIMIZERS = {
    "sgd": lambda: torchopt.sgd(0.05),
    "adam": lambda: torchopt.adam(0.01, eps_root=1e-10),
}


def inner_gradient_norms(problem, tx, theta, eta, rounds):
    """Global norm of every inner gradient along a plain unroll with ``tx`` (no clipping)."""
    from metagrad_rl.pytree import take
    from metagrad_rl.unroll import EtaPaths, prepare_round

    th = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    state, norms = tx.init(th), []
    for rnd in rounds:
        data = prepare_round(problem, rnd.batch, th, eta, eta, "paper")
        data = {k: v.detach() for k, v in data.items()}
        for idx in rnd.minibatches:
            loss = problem.inner_loss(th, take(data, idx), eta_policy=EtaPaths.shared(eta).policy)
            g = dict(zip(th, torch.autograd.grad(loss, list(th.values()))))
            norms.append(float(torch.cat([v.flatten() for v in g.values()]).norm()))
            upd, state = tx.update(g, state, params=th, inplace=False)
            th = {k: (th[k] + upd[k]).detach().requires_grad_(True) for k in th}
    return norms
