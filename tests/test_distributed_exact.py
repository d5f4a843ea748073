"""Two workers' meta-gradient against one process's on the union of their minibatches (gloo).

Issue 10's exactness claim, in float64. Each of the two workers has its own round batches
``b_r`` (``T = 10`` steps), its own minibatch schedule (2 epochs of 2 minibatches of 5) and its
own outer batch (12 samples). The single process stacks the workers' round batches as two env
columns (``[T, 2]``); its minibatch ``j`` is the union of the workers' minibatches ``j`` (10
samples) and its outer batch the union of theirs (24). Everyone runs the trainer's inner chain
-- :func:`~metagrad_rl.distributed.average_across_workers`, ``metagrad_rl.clip_grad_norm``
(firing on some steps, not all) and Adam with ``eps_root`` -- with advantage normalisation on.
The workers take the normalisation's mean and std over the union
(``sum_over_workers=all_reduce_sum``); the single process is today's code (its own
``x.std()``).

What "equal" means: a worker's losses are means over its own samples. With equal sizes and
shared normalisation statistics, the mean of the workers' losses is the union's loss, so the
averaged inner gradient is the union's gradient (every worker holds the union's
``theta_{j+1}``), and the average of the workers' meta-gradients -- the total, Eq 11-14 and
Eq 17 -- is the union's. The sampling-aware score term differentiates ``log p(tau)``, a *sum*
over the batch, so the workers' score terms add up to the union's. Normalising each worker's
advantages on its own breaks the equality (the negative control).
"""

from __future__ import annotations

import pytest
import torch
import torchopt
from dist_helpers import run_workers, workers
from meta_helpers import make_nets, outer_batch, round_batch

from metagrad_rl.distributed import all_reduce_sum, average_across_workers, average_gradients_
from metagrad_rl.metagrad import start_meta_gradient
from metagrad_rl.networks import params_of
from metagrad_rl.optim import clip_counts, clip_grad_norm
from metagrad_rl.problems import ppo_meta_problem
from metagrad_rl.pytree import TERMS, flatten
from metagrad_rl.trainers.rollout_workers import union_schedule
from metagrad_rl.unroll import Round, minibatch_indices

N_WORKERS, T, EPOCHS, MINIBATCHES, B = 2, 10, 2, 2, 12
#: name -> (rounds R, meta_gradient options); the last also checks the other surrogate and
#: denominator, and a per-tensor (not flat) inner update.
CASES = {
    "R=1": (1, {}),
    "R=2": (2, {}),
    "R=2-detached": (2, dict(surrogate="detached", denominator="theta_k+1", flat_params=False)),
    # the checkpointed reverse pass (segments of 3 steps: across the rounds' 4 steps), whose
    # recomputed segments and prepare run the collectives again, forward and backward
    "R=2-checkpointed": (2, dict(checkpoint_every=3)),
}
MAX_NORM = 1.0  # the inner gradient norms here are 0.5-3.1: clipping fires on some steps
SCORE_WEIGHT = 0.7
GRADS = (*TERMS, "total", "eq17", "score")
TOL = 1e-10


def _problem(sum_over_workers):
    policy, reward = make_nets("cln", seed=0)
    problem = ppo_meta_problem(
        policy,
        reward,
        r_ex_coef=0.5,
        r_in_coef=1.0,
        clip=0.2,
        ent_coef=0.01,
        sum_over_workers=sum_over_workers,
    )
    theta = {k: v.detach() for k, v in params_of(policy).items()}
    eta = {k: v.detach() for k, v in params_of(reward).items()}
    return problem, theta, eta


def _worker_data(rank: int, n_rounds: int):
    """Worker ``rank``'s rounds (its own batches and minibatch schedule) and outer batch."""
    gen = torch.Generator().manual_seed(100 + rank)
    rounds = [
        Round(round_batch(gen, T), minibatch_indices(T, EPOCHS, MINIBATCHES, gen))
        for _ in range(n_rounds)
    ]
    return rounds, outer_batch(gen, B)


def _union_data(n_rounds: int):
    """The workers' batches as env columns; minibatch ``j`` = the union of the workers' ``j``."""
    parts = [_worker_data(r, n_rounds) for r in range(N_WORKERS)]
    rounds = []
    for k in range(n_rounds):
        batches = [p[0][k].batch for p in parts]
        batch = {key: torch.stack([b[key] for b in batches], dim=1) for key in batches[0]}
        # what the rollout learner does: step t of worker r sits at t * N + r in [T, N]
        mbs = union_schedule([p[0][k].minibatches for p in parts], num_envs=1)
        rounds.append(Round(batch, mbs))
    outer = {key: torch.cat([p[1][key] for p in parts]) for key in parts[0][1]}
    return rounds, outer


def _optimizer():
    return torchopt.chain(
        average_across_workers(), clip_grad_norm(MAX_NORM), torchopt.adam(0.01, eps_root=1e-8)
    )


def _meta_gradient(problem, theta, eta, rounds, outer, options) -> dict:
    options = dict(options)
    denominator = options.pop("denominator", "theta_k")
    pending = start_meta_gradient(
        problem, _optimizer(), theta, eta, rounds, memory_budget_bytes=2**40, **options
    )
    res = pending.finish(outer, denominator=denominator, score_weight=SCORE_WEIGHT)
    out = {g: getattr(res, g) for g in GRADS}
    out.update(
        theta_next=res.theta_next, outer_loss=res.outer_loss, clip=clip_counts(res.opt_state)
    )
    return out


def _averaged(res: dict, n: int) -> dict:
    """What the trainer applies: the workers' mean of each gradient, the sum of the score's."""
    for g in GRADS:
        average_gradients_(list(res[g].values()))
    res["score"] = {k: v * n for k, v in res["score"].items()}
    loss = torch.tensor([res["outer_loss"]], dtype=torch.float64)
    average_gradients_([loss])
    res["outer_loss"] = float(loss)
    return res


def _worker(rank: int, n: int, init: str) -> dict:
    out: dict = {}
    with workers(rank, n, init):
        for case, (n_rounds, options) in CASES.items():
            rounds, outer = _worker_data(rank, n_rounds)
            res = _meta_gradient(*_problem(all_reduce_sum), rounds, outer, options)
            out[case] = _averaged(res, n)
            # the negative control: each worker normalises its advantages on its own
            local = _meta_gradient(*_problem(None), rounds, outer, options)
            out[("local", case)] = _averaged(local, n)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    per_worker = run_workers(_worker, N_WORKERS, tmp_path_factory.mktemp("exact"), timeout_s=180)
    reference = {  # one process, the stored graph
        case: _meta_gradient(*_problem(None), *_union_data(n_rounds), _stored(options))
        for case, (n_rounds, options) in CASES.items()
    }
    return per_worker, reference


def _stored(options: dict) -> dict:
    return {k: v for k, v in options.items() if k != "checkpoint_every"}


def _max_err(a: dict, b: dict) -> float:
    return float((flatten(a) - flatten(b)).abs().max())


@pytest.mark.parametrize("case", CASES)
def test_two_workers_meta_gradient_equals_one_process_on_the_union(results, case):
    per_worker, reference = results
    ref, n_rounds = reference[case], CASES[case][0]
    fired, steps = ref["clip"]
    assert steps == n_rounds * EPOCHS * MINIBATCHES and 0 < fired < steps, ref["clip"]
    for rank, w in enumerate(per_worker):
        res = w[case]
        assert res["clip"] == ref["clip"], rank
        assert _max_err(res["theta_next"], ref["theta_next"]) < TOL, rank
        for g in GRADS:
            assert flatten(ref[g]).norm() > 1e-3 or (g == "eq14" and n_rounds == 1), g
            assert _max_err(res[g], ref[g]) < TOL, (rank, g, _max_err(res[g], ref[g]))
        assert res["outer_loss"] == pytest.approx(ref["outer_loss"], abs=TOL)
    # every worker holds the same parameters, bit for bit
    first = flatten(per_worker[0][case]["theta_next"])
    assert all(torch.equal(flatten(w[case]["theta_next"]), first) for w in per_worker)


@pytest.mark.parametrize("case", CASES)
def test_local_advantage_normalisation_breaks_the_equality(results, case):
    """The negative control: without statistics over the union the test above would fail."""
    per_worker, reference = results
    local = per_worker[0][("local", case)]
    assert _max_err(local["total"], reference[case]["total"]) > 1e-4
    assert _max_err(local["theta_next"], reference[case]["theta_next"]) > 1e-6


def test_checkpointed_workers_equal_the_stored_graph_workers(results):
    """Each worker's checkpointed result is its stored-graph result (to 1e-12 relative)."""
    per_worker, _ = results
    for w in per_worker:
        stored, ckpt = w["R=2"], w["R=2-checkpointed"]
        assert torch.equal(flatten(stored["theta_next"]), flatten(ckpt["theta_next"]))
        for g in GRADS:
            a, b = flatten(stored[g]), flatten(ckpt[g])
            assert float((a - b).norm()) <= 1e-12 * float(a.norm()), g
