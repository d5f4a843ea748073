"""The computations the ``cost`` section measures, on a Hopper-v5-sized CLN problem.

:class:`CostSetup` is the problem on random data (fixed seed) with each computation as a method
(a plain policy round, the trainer's PPO update, Eq 17, the exact total, the Eq 11-14 split, the
engine and the explicit recursion on SGD); :func:`estimator_fns` names them for the tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchopt
from torch import Tensor

from metagrad_rl.explicit import explicit_sgd_terms
from metagrad_rl.metagrad import (
    eq17_gradient,
    meta_gradient,
)
from metagrad_rl.networks import (
    Critic,
    cln_condition,
    params_of,
)
from metagrad_rl.rollout import policy_outputs
from metagrad_rl.trainers.bilevel import (
    CLNConfig,
    build_problem,
    policy_optimizer,
)
from metagrad_rl.trainers.common import (
    FlatParams,
    Minibatch,
    PPOCoefs,
    make_optimizer,
    ppo_update,
)
from metagrad_rl.unroll import EtaPaths, InnerSurrogate, Round, minibatch_indices, unroll
from termbench.common import nets_for

OBS_DIM, ACT_DIM, BATCH, EPOCHS, MINIBATCHES = 11, 3, 2048, 10, 32


class CostSetup:
    """A Hopper-sized CLN problem on random data (fixed seed): what every estimator works on."""

    def __init__(self, seed: int = 0, steps: int | None = None, rounds: int = 1) -> None:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self.cfg = CLNConfig(
            env="Hopper-v5",
            num_steps=BATCH,
            update_epochs=EPOCHS,
            num_minibatches=MINIBATCHES,
            total_steps=BATCH * 100,
        )
        self.policy, self.reward = nets_for(self.cfg, OBS_DIM, ACT_DIM)
        self.critic = Critic(OBS_DIM, self.cfg.hidden)
        self.theta = {k: v.detach().clone() for k, v in params_of(self.policy).items()}
        self.eta = {k: v.detach().clone() for k, v in params_of(self.reward).items()}
        self.problem = build_problem(self.cfg, self.policy, self.reward)
        self.tx = policy_optimizer(self.cfg)
        self.state = self.tx.init(self.theta)
        self.cond = cln_condition(self.eta).detach()
        self.rounds = [self._round(gen, steps) for _ in range(rounds)]
        self.outer = self._outer(gen)

    def _act(self, obs: Tensor, gen: torch.Generator) -> Tensor:
        with torch.no_grad():
            mean, log_std = policy_outputs(self.policy, self.theta, obs, self.cond)
            return mean + log_std.exp() * torch.randn(mean.shape, generator=gen)

    def _round(self, gen: torch.Generator, steps: int | None) -> Round:
        obs = torch.randn(BATCH, 1, OBS_DIM, generator=gen)
        ends = torch.zeros(BATCH, 1)
        ends[torch.randint(0, BATCH, (8,), generator=gen)] = 1.0
        batch = {
            "obs": obs,
            "act": self._act(obs, gen),
            "r_ex": torch.randn(BATCH, 1, generator=gen) * 0.1,
            "v_mix": torch.randn(BATCH, 1, generator=gen),
            "v_mix_next": torch.randn(BATCH, 1, generator=gen),
            "terminated": ends.clone(),
            "episode_end": ends,
        }
        mbs = minibatch_indices(BATCH, EPOCHS, MINIBATCHES, gen)
        return Round(batch, mbs if steps is None else mbs[:steps])

    def _outer(self, gen: torch.Generator) -> dict[str, Tensor]:
        obs = torch.randn(BATCH, OBS_DIM, generator=gen)
        return {"obs": obs, "act": self._act(obs, gen), "adv_ex": torch.randn(BATCH, generator=gen)}

    # ---- the timed computations ----------------------------------------------------------------
    def plain_round(self) -> Any:
        """The CLN trainer's own plain policy round (``unroll(..., create_graph=False)``)."""
        return unroll(
            self.problem,
            self.tx,
            self.theta,
            EtaPaths.shared(self.eta),
            self.rounds,
            self.state,
            InnerSurrogate(self.cfg.surrogate),
            create_graph=False,
        )

    def eq17(self) -> Any:
        return eq17_gradient(self.problem, self.theta, self.eta, self.outer)

    def _meta(self, terms: bool, measure_memory: bool) -> Any:
        return meta_gradient(
            self.problem,
            self.tx,
            self.theta,
            self.eta,
            self.rounds,
            self.outer,
            opt_state=self.state,
            terms=terms,
            measure_memory=measure_memory,
        )

    def exact_total(self, measure_memory: bool = False) -> Any:
        return self._meta(False, measure_memory)

    def four_terms(self, measure_memory: bool = False) -> Any:
        return self._meta(True, measure_memory)

    def sgd_rounds(self, steps: int) -> list[Round]:
        return [Round(self.rounds[0].batch, list(self.rounds[0].minibatches)[:steps])]

    def engine_sgd(self, steps: int) -> Any:
        return meta_gradient(
            self.problem,
            torchopt.sgd(1e-3),
            self.theta,
            self.eta,
            self.sgd_rounds(steps),
            self.outer,
            terms=True,
        )

    def explicit_sgd(self, steps: int) -> Any:
        return explicit_sgd_terms(
            self.problem, 1e-3, self.theta, self.eta, self.sgd_rounds(steps), self.outer
        )

    def ppo_trainer_update(self) -> Callable[[], Any]:
        """The PPO trainer's ``ppo_update`` (policy *and* critic, one flat Adam) on a round."""
        params = FlatParams({"theta": self.theta, "critic": params_of(self.critic)})
        flat0 = params.flat.clone()
        n = BATCH
        b = self.rounds[0].batch
        with torch.no_grad():
            mean, log_std = policy_outputs(self.policy, self.theta, b["obs"], self.cond)
            from metagrad_rl.networks import gaussian_log_prob

            logp = gaussian_log_prob(mean, log_std, b["act"]).reshape(n)
        data = Minibatch(
            obs=b["obs"].reshape(n, -1),
            act=b["act"].reshape(n, -1),
            old_logp=logp,
            adv=torch.randn(n),
            returns=torch.randn(n),
            old_values=b["v_mix"].reshape(n),
        )
        tx = make_optimizer(3e-4, EPOCHS * MINIBATCHES, 100)

        def run() -> Any:
            with torch.no_grad():
                params.flat.copy_(flat0)
            return ppo_update(
                self.policy,
                self.critic,
                params,
                tx,
                tx.init((params.flat,)),
                data,
                PPOCoefs(),
                minibatch_indices(n, EPOCHS, MINIBATCHES, torch.Generator().manual_seed(0)),
                self.cond,
            )

        return run

    def inner_loss_fn(self) -> tuple[Callable[..., Tensor], dict[str, Tensor]]:
        """``f(theta, eta)``: the inner loss of the first minibatch (``eta``: the conditioning)."""
        rnd = self.rounds[0]
        with torch.no_grad():
            data = self.problem.prepare(
                rnd.batch, eta_reward=self.eta, theta_old=self.theta, eta_policy_old=self.eta
            )
        mb = {k: v[rnd.minibatches[0]] for k, v in data.items()}

        def f(theta: Mapping[str, Tensor], eta: Mapping[str, Tensor]) -> Tensor:
            return self.problem.inner_loss(theta, mb, eta_policy=eta)

        return f, mb


def estimator_fns(s: CostSetup, explicit_steps: int) -> dict[str, Callable[[], Any]]:
    """The timed computations of the cost table, by name."""
    return {
        "plain_round": s.plain_round,
        "ppo_update": s.ppo_trainer_update(),
        "eq17": s.eq17,
        "exact_total": s.exact_total,
        "four_terms": s.four_terms,
        f"engine_sgd_{explicit_steps}": lambda: s.engine_sgd(explicit_steps),
        f"explicit_sgd_{explicit_steps}": lambda: s.explicit_sgd(explicit_steps),
    }
