"""Rollout workers feeding one learner (:mod:`metagrad_rl.trainers.rollout_workers`).

What "the same number" means here. In the rollout mode the learner is one process on the
union of the workers' data, so its update and meta-gradient are the union's by construction;
what can be wrong is the construction: which samples form a union minibatch, how PPO
normalises the advantages, how the normalisers merge. So:

- float64, no envs: :func:`union_schedule` puts worker ``r``'s sample ``t n + i`` where the
  union batch holds it, for ``n = 1`` and ``n = 2`` env copies; PPO's loss on a union minibatch
  with per-worker normalisation has the gradient the all-reduce workers average, to 1e-12 (and
  a union-wide normalisation does not: the negative control). The bilevel problem's union
  statistics are proven in ``tests/test_distributed_exact.py``, whose single process now takes
  its minibatches from :func:`union_schedule`.
- the trainers on Hopper-v5, 2 workers: the rollout mode and the all-reduce mode (two gloo
  processes) hold the same ``theta``, ``eta`` and critics and apply the same meta-gradients, for
  PPO, CLN ``eq17`` and CLN ``exact``, to float32 round-off (the union's sums run in another
  order than the all-reduce's), and see the same episodes, bit for bit;
- a rollout run stopped and resumed writes the uninterrupted run's CSV bit for bit;
- a worker that dies is one :class:`WorkerLostError` line at once; bad combinations of flags
  are one line each.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import run_workers, workers

from metagrad_rl.checkpoint import load_checkpoint
from metagrad_rl.distributed import WorkerLostError
from metagrad_rl.errors import ConfigError
from metagrad_rl.networks import Critic, GaussianPolicy, params_of
from metagrad_rl.pytree import flatten
from metagrad_rl.trainers import bilevel, ppo
from metagrad_rl.trainers.common import Minibatch, PPOCoefs, ppo_loss
from metagrad_rl.trainers.rollout_workers import UnionCollector, rollout_workers, union_schedule
from metagrad_rl.unroll import minibatch_indices

TINY = dict(env="Hopper-v5", num_steps=64, num_minibatches=2, update_epochs=2, seed=3)
CONFIGS = {
    "ppo": lambda: ppo.PPOConfig(total_steps=256, **TINY),
    "cln-eq17": lambda: bilevel.CLNConfig(total_steps=256, meta_grad="eq17", **TINY),
    "cln-exact": lambda: bilevel.CLNConfig(total_steps=256, meta_grad="exact", **TINY),
}


# ------------------------------------------------------------------ float64, no envs
@pytest.mark.parametrize("num_envs", [1, 2])
def test_union_schedule_puts_each_workers_sample_where_the_union_batch_holds_it(num_envs):
    t_steps, n_workers = 6, 3
    gens = [torch.Generator().manual_seed(10 + r) for r in range(n_workers)]
    own = [minibatch_indices(t_steps * num_envs, 2, 3, g) for g in gens]
    # worker r's batch [T, n]: the value says (worker, flat index) of each sample
    batches = [
        100 * r + torch.arange(t_steps * num_envs).reshape(t_steps, num_envs)
        for r in range(n_workers)
    ]
    union = torch.cat(batches, dim=1).reshape(-1)  # env columns side by side, flattened
    sched = union_schedule(own, num_envs)
    assert len(sched) == len(own[0])
    for j, idx in enumerate(sched):
        expected = torch.cat([batches[r].reshape(-1)[own[r][j]] for r in range(n_workers)])
        assert torch.equal(union[idx], expected)


def _ppo_data(gen: torch.Generator, m: int, obs_dim: int = 3, act_dim: int = 2) -> Minibatch:
    return Minibatch(
        obs=torch.randn(m, obs_dim, generator=gen, dtype=torch.float64),
        act=torch.randn(m, act_dim, generator=gen, dtype=torch.float64),
        old_logp=-2.0 + 0.3 * torch.randn(m, generator=gen, dtype=torch.float64),
        adv=0.5 + 2.0 * torch.randn(m, generator=gen, dtype=torch.float64),
        returns=torch.randn(m, generator=gen, dtype=torch.float64),
        old_values=torch.randn(m, generator=gen, dtype=torch.float64),
    )


def _ppo_grad(policy, critic, params, mb: Minibatch, coefs: PPOCoefs) -> torch.Tensor:
    theta = {k: v.clone().requires_grad_(True) for k, v in params[0].items()}
    crit = {k: v.clone().requires_grad_(True) for k, v in params[1].items()}
    loss, _ = ppo_loss(policy, critic, theta, crit, mb, coefs)
    grads = torch.autograd.grad(loss, [*theta.values(), *crit.values()])
    return torch.cat([g.reshape(-1) for g in grads])


def test_ppo_loss_on_the_union_minibatch_has_the_gradient_the_workers_average():
    torch.manual_seed(0)
    policy, critic = GaussianPolicy(3, 2, (8,), "none").double(), Critic(3, (8,)).double()
    params = (params_of(policy), params_of(critic))
    gens = [torch.Generator().manual_seed(r) for r in range(2)]
    parts = [_ppo_data(g, 7) for g in gens]
    union = Minibatch(*(torch.cat(xs) for xs in zip(*parts)))
    coefs = PPOCoefs(clip_coef=0.1)  # some ratios clip: old_logp is far from logp
    averaged = sum(_ppo_grad(policy, critic, params, p, coefs) for p in parts) / 2
    grouped = _ppo_grad(policy, critic, params, union, coefs._replace(norm_groups=2))
    torch.testing.assert_close(grouped, averaged, rtol=1e-12, atol=1e-14)
    pooled = _ppo_grad(policy, critic, params, union, coefs)  # one normalisation: not the same
    assert (pooled - averaged).abs().max() > 1e-6


# ------------------------------------------------------------------ the trainers, both modes
def _train(name: str, out: Path, **kw):
    metas: list[torch.Tensor] = []

    def record(step: bilevel.MetaStep) -> None:
        metas.append(flatten(step.grad))

    cfg = CONFIGS[name]()
    if name == "ppo":
        summary = ppo.train(cfg, out, **kw)
    else:
        summary = bilevel.train(cfg, out, on_meta_step=record, **kw)
    return {"summary": summary, "metas": metas}


def _allreduce(rank: int, n: int, init: str, root: str) -> dict:
    with workers(rank, n, init, timeout_s=120.0):
        return {name: _train(name, Path(root) / f"allreduce-{name}") for name in CONFIGS}


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    (ar,) = run_workers(_allreduce, 2, root / "rdv", str(root), timeout_s=400.0, results_from=[0])
    ro = {}
    with rollout_workers(2):
        for name in CONFIGS:
            ro[name] = _train(name, root / f"rollout-{name}")
        cut = root / "rollout-cut"
        _train("cln-exact", cut, stop_at_step=128)
        _train("cln-exact", cut, resume=True)
    return root, ar, ro


def _rows(run: Path) -> list[dict]:
    with open(run / "progress.csv") as f:
        return list(csv.DictReader(f))


def _leaves(tree: object) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree.reshape(-1)]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in _leaves(tree[k])]
    return []


def _state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "checkpoint.pt")
    keys = [k for k in ("params", "theta", "eta", "critics") if k in ckpt]
    return {k: torch.cat(_leaves(ckpt[k])) for k in keys}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rollout_mode_holds_what_the_allreduce_mode_holds(modes, name):
    root, ar, ro = modes
    a, b = _state(root / f"rollout-{name}"), _state(root / f"allreduce-{name}")
    assert a.keys() == b.keys() and a
    for k in a:  # float32, 4 iterations: the union's sums run in another order
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ra, rb = _rows(root / f"rollout-{name}"), _rows(root / f"allreduce-{name}")
    for col in ("global_step", "all_workers_step", "episodes", "episodic_return"):
        assert [r[col] for r in ra] == [r[col] for r in rb], col  # the same episodes
    assert ro[name]["summary"]["parallel"] == "rollout"
    assert ar[name]["summary"]["parallel"] == "allreduce"
    assert ro[name]["summary"]["num_workers"] == ar[name]["summary"]["num_workers"] == 2


@pytest.mark.parametrize("name", ["cln-eq17", "cln-exact"])
def test_rollout_mode_applies_the_allreduce_modes_meta_gradients(modes, name):
    _, ar, ro = modes
    assert len(ro[name]["metas"]) == len(ar[name]["metas"]) == 3
    for x, y in zip(ro[name]["metas"], ar[name]["metas"], strict=True):
        scale = float(y.abs().max())
        assert scale > 0
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * scale)


def test_a_stopped_and_resumed_rollout_run_writes_the_uninterrupted_csv(modes):
    root, _, _ = modes

    def rows(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in _rows(run)]

    assert rows(root / "rollout-cut") == rows(root / "rollout-cln-exact")
    a, b = _state(root / "rollout-cut"), _state(root / "rollout-cln-exact")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = load_checkpoint(root / "rollout-cut" / "checkpoint.pt")
    assert ckpt["parallel"] == "rollout" and ckpt["num_workers"] == 2
    assert len(ckpt["collector"]["workers"]) == 2 and len(ckpt["rollout_update_gens"]) == 1


# ------------------------------------------------------------------ faults and flags
def test_a_dead_rollout_worker_is_one_line_at_once():
    cfg = ppo.PPOConfig(total_steps=128, **TINY)
    collector = UnionCollector(cfg, 2, timeout_s=60.0)
    try:
        net = GaussianPolicy(11, 3, (8,), "none")
        sampler = net.sampler(params_of(net), None)
        bufs, _ = collector.collect(sampler, 8)
        assert bufs["obs"].shape == (8, 2, 11)
        os.kill(collector.remotes[0].proc.pid, signal.SIGKILL)
        with pytest.raises(WorkerLostError) as err:
            collector.collect(sampler, 8)
        msg = str(err.value)
        assert "\n" not in msg and "rollout worker 1" in msg and "died" in msg, msg
    finally:
        collector.envs.close()


def test_rollout_workers_refuse_bad_counts():
    with pytest.raises(ConfigError, match="expected a positive int"), rollout_workers(0):
        pass


def _cli(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    if env is None:
        full.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "metagrad_rl", *argv],
        capture_output=True,
        text=True,
        env=full,
        timeout=300,
    )


def test_cli_rollout_runs_resume_in_their_mode_and_refuse_another(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--out", str(out), "--no-progress"]
    first = base + ["--algo", "ppo", "--env", "InvertedPendulum-v5", "--num-steps", "64"]
    first += ["--num-minibatches", "2", "--update-epochs", "1", "--total-steps", "128"]
    r = _cli(first + ["--nproc", "2"])
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "checkpoint.pt")["parallel"] == "rollout"
    r = _cli(base + ["--resume", "--total-steps", "192", "--parallel", "allreduce"])
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "--parallel rollout" in err[0], err
    r = _cli(base + ["--resume", "--total-steps", "192"])  # the mode and N come from the run
    assert r.returncode == 0, r.stderr
    assert [int(x["global_step"]) for x in _rows(out)] == [64, 128, 192]
    r = _cli(["train", "--out", str(tmp_path / "t"), "--parallel", "rollout"], {"WORLD_SIZE": "1"})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "under torchrun" in err[0], err


# ------------------------------------------------------------------ the all-reduce mode's syncs
def _counted(rank: int, n: int, init: str, root: str) -> dict:
    """Collectives per training run, for 1 and 2 epochs (4 and 8 minibatch steps a round)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    calls = {"n": 0}
    os.environ["METAGRAD_MEMORY_BUDGET_GIB"] = "8"  # no budget all-reduce in the first run only

    def counting(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)

        return wrapped

    dist.all_reduce, funcol.all_reduce = counting(dist.all_reduce), counting(funcol.all_reduce)
    out = {}
    with workers(rank, n, init, timeout_s=120.0):
        for name in ("ppo", "cln-eq17", "cln-exact"):
            for epochs in (1, 2):
                cfg = CONFIGS[name]()
                cfg = type(cfg)(**{**cfg.__dict__, "update_epochs": epochs, "checkpoint_every": 0})
                calls["n"] = 0
                (ppo.train if name == "ppo" else bilevel.train)(cfg, Path(root) / f"{name}{epochs}")
                out[name, epochs] = calls["n"]
    return out


def test_allreduce_mode_takes_one_collective_per_minibatch_step(tmp_path):
    """A second epoch's minibatch steps cost exactly one all-reduce each (the union advantage
    statistics of a plain round are taken before it, in two for the whole round)."""
    (counts,) = run_workers(
        _counted, 2, tmp_path / "rdv", str(tmp_path), timeout_s=300.0, results_from=[0]
    )
    iterations, extra_steps = 4, TINY["num_minibatches"]
    for name in ("ppo", "cln-eq17", "cln-exact"):
        per_step = (counts[name, 2] - counts[name, 1]) / (iterations * extra_steps)
        # exact: the unrolled policy step and the separate critic step, one collective each
        assert per_step == (2.0 if name == "cln-exact" else 1.0), (name, counts)
