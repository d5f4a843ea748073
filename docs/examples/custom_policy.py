"""Your own policy: register it in ``POLICIES``, train it with PPO on Hopper-v5, evaluate it.

A policy is anything with the :class:`metagrad_rl.networks.Policy` protocol: a
``conditioning`` attribute, ``named_parameters()``, and ``log_prob``, ``entropy`` and
``sampler`` as pure functions of an explicit parameter dict ``theta``. Its factory takes
``(obs_dim, act_dim, hidden, conditioning, cond_dim)``; once registered, ``policy="relu"`` in
a config builds it and ``evaluate`` rebuilds it from a checkpoint by that name.

Run it: ``.venv/bin/python docs/examples/custom_policy.py OUT_DIR`` (about a minute at the
defaults below; the test runs it with ``total_steps=128``).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from metagrad_rl.errors import ConfigError
from metagrad_rl.evaluate import evaluate_checkpoint
from metagrad_rl.networks import POLICIES, gaussian_entropy, gaussian_log_prob
from metagrad_rl.trainers import ALGOS


class ReluGaussian(nn.Module):
    """``N(mu(s), diag(exp(2 log_std)))`` with a ReLU MLP mean (the built-in one is tanh)."""

    def __init__(self, obs_dim, act_dim, hidden, conditioning, cond_dim):
        super().__init__()
        if conditioning != "none":
            raise ConfigError(f"ReluGaussian has no conditioning={conditioning!r}: use none")
        self.conditioning = conditioning
        sizes, layers = [obs_dim, *hidden], []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mu = nn.Sequential(*layers, nn.Linear(sizes[-1], act_dim))
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs):
        return self.mu(obs)

    def log_prob(self, theta, obs, act, cond):
        mean = functional_call(self, dict(theta), (obs,))
        return gaussian_log_prob(mean, theta["log_std"], act)

    def entropy(self, theta):
        return gaussian_entropy(theta["log_std"])

    def sampler(self, theta, cond):
        """What the rollout calls each step: ``mean(obs) + std * noise`` on numpy arrays."""
        frozen = {k: v.detach().float().cpu() for k, v in theta.items()}

        @torch.no_grad()
        def mean(obs):
            return functional_call(self, frozen, (torch.from_numpy(obs),)).numpy()

        return SimpleNamespace(mean=mean, std=np.exp(frozen["log_std"].numpy()))


POLICIES["relu"] = ReluGaussian


def main(out: str, total_steps: int = 20480, num_steps: int = 2048, episodes: int = 3, **kw):
    ppo = ALGOS["ppo"]
    config = ppo.config_cls(
        env="Hopper-v5",
        policy="relu",
        total_steps=total_steps,
        num_steps=num_steps,
        seed=1,
        **kw,
    )
    summary = ppo.train(config, out)
    returns = evaluate_checkpoint(out, episodes=episodes)
    print(f"{summary['global_step']} steps; evaluation returns: {np.round(returns, 1)}")
    return {"summary": summary, "returns": returns}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/custom-policy-example")
