"""The data-parallel pieces (:mod:`metagrad_rl.distributed`), each against a one-process reference.

In-process tests cover what needs no peers (seeds, the moment merge, the identities in one
process). The rest runs in two spawned gloo workers on the loopback interface: one group of
processes computes every check of the working group (``infra``), another plays the faults
(``faults``); the tests compare what came back with the same computation done here on the
union of the workers' data.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from dist_helpers import run_workers, workers

from metagrad_rl.advantages import normalize
from metagrad_rl.distributed import (
    Moments,
    OutOfSyncError,
    WorkerLostError,
    all_reduce_sum,
    average_across_workers,
    average_gradients_,
    broadcast_from_rank0_,
    check_same_across_workers,
    combine_running_stats,
    gather_episode_returns,
    init_workers,
    merge_moments,
    moments_of,
    worker_seed,
)
from metagrad_rl.envs import RunningMeanStd
from metagrad_rl.errors import ConfigError

N = 2

# ------------------------------------------------------------------------------ one process


def test_worker_seed_keeps_the_run_seed_on_rank_0_and_differs_per_rank():
    assert worker_seed(7, 0) == 7
    seeds = {worker_seed(s, r) for s in range(20) for r in range(1, 17)}
    assert len(seeds) == 20 * 16  # distinct for every (seed, rank > 0)
    assert all(0 <= x < 2**62 and x > 2**40 for x in seeds)  # far from small run seeds
    assert worker_seed(3, 5) == worker_seed(3, 5)  # deterministic
    with pytest.raises(ConfigError):
        worker_seed(-1, 0)


def test_merge_moments_against_numpy_on_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.normal(2.0, 3.0, size=(n, 4)) for n in (1, 5, 17)]
    merged = merge_moments([Moments(p.mean(0), p.var(0), len(p)) for p in parts])
    everything = np.concatenate(parts)
    np.testing.assert_allclose(merged.mean, everything.mean(0), rtol=1e-13)
    np.testing.assert_allclose(merged.var, everything.var(0), rtol=1e-13)
    assert merged.n == len(everything)
    empty = Moments(np.zeros(4), np.zeros(4), 0.0)
    again = merge_moments([*[Moments(p.mean(0), p.var(0), len(p)) for p in parts], empty])
    np.testing.assert_allclose(again.var, merged.var, rtol=1e-15)


def test_every_helper_is_the_identity_in_one_process():
    with init_workers() as w:
        assert (w.rank, w.world_size, w.backend, w.is_main) == (0, 1, None, True)
        x = torch.randn(3, requires_grad=True)
        assert all_reduce_sum(x) is x
        tx = average_across_workers()
        updates = {"a": x}
        assert tx.update(updates, tx.init(updates), inplace=False)[0] is updates
        g = torch.randn(4)
        before = g.clone()
        average_gradients_([g])
        assert torch.equal(g, before)
        broadcast_from_rank0_([g])
        check_same_across_workers([g], "g")
        assert gather_episode_returns([1.0, 2.0]) == [1.0, 2.0]
        rms = RunningMeanStd((2,))
        since = moments_of(rms)
        rms.update(np.ones((3, 2)))
        expect = moments_of(rms)
        combine_running_stats(rms, since)
        assert np.array_equal(rms.mean, expect.mean) and rms.count == expect.n


def test_normalize_over_workers_in_one_process_matches_torch_std():
    """The two-sum statistics are ``torch.std``'s unbiased ones (the default path unchanged)."""
    x = torch.randn(9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64)
    local = normalize(x)
    pooled = normalize(x, sum_over_workers=lambda t: t)
    torch.testing.assert_close(pooled, local, rtol=0, atol=1e-14)
    torch.testing.assert_close(local, (x - x.mean()) / (x.std(correction=1) + 1e-8))
    (g_local,) = torch.autograd.grad((local * w).sum(), x)
    (g_pooled,) = torch.autograd.grad((pooled * w).sum(), x)
    torch.testing.assert_close(g_pooled, g_local, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------- data of the workers


def _x(rank: int) -> torch.Tensor:
    return torch.randn(4, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64)


def _v(rank: int) -> torch.Tensor:
    return torch.randn(4, generator=torch.Generator().manual_seed(20 + rank), dtype=torch.float64)


def _h(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Worker ``rank``'s "gradient": a nonlinear function of its own parameters."""
    return (rank + 1.0) * torch.sin(x) + x**2


def _f(y: torch.Tensor, rank: int) -> torch.Tensor:
    """Worker ``rank``'s loss of the averaged update."""
    return (rank + 1.0) * (y**3).sum() + torch.cos(y).sum()


def _adv(rank: int) -> torch.Tensor:  # unequal sizes: the union's statistics need none
    g = torch.Generator().manual_seed(30 + rank)
    return 2.0 + 3.0 * torch.randn(5 + 2 * rank, generator=g, dtype=torch.float64)


def _weights(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(40 + rank)
    return torch.randn(5 + 2 * rank, generator=g, dtype=torch.float64)


def _obs(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 2.0, size=(n, 3))


def _obs_chunks(rank: int, sync: int) -> list[np.ndarray]:
    """What worker ``rank`` adds to its normaliser before combine number ``sync``."""
    return [_obs(100 * sync + 10 * rank + i, 3 + i + rank) for i in range(3)]


def _infra(rank: int, n: int, init: str) -> dict:
    out: dict = {}
    assert init == "env://"
    with init_workers(timeout_s=30) as w:  # rank and size from torchrun's variables
        out["workers"] = (w.rank, w.world_size, w.backend, w.is_main)
        # second order through the averaged update
        x = _x(rank).requires_grad_(True)
        tx = average_across_workers()
        h = {"a": _h(x, rank)}
        y = tx.update(h, tx.init(h), inplace=False)[0]["a"]
        (g,) = torch.autograd.grad(_f(y, rank), x, create_graph=True)
        (hvp,) = torch.autograd.grad(g @ _v(rank), x)
        out["grad"], out["hvp"] = g.detach(), hvp
        # inplace=True (the non-differentiable use) averages into the update tensors
        plain = {"a": _h(_x(rank), rank)}
        tx.update(plain, tx.init(plain), inplace=True)
        out["inplace"] = plain["a"]
        # advantage normalisation over the union, and its gradient
        a = _adv(rank).requires_grad_(True)
        z = normalize(a, sum_over_workers=all_reduce_sum)
        (ga,) = torch.autograd.grad((z * _weights(rank)).sum(), a)
        out["normalized"], out["normalized_grad"] = z.detach(), ga
        # plain gradients averaged in place, two dtypes
        ts = [torch.full((2, 3), rank + 1.0), torch.arange(4, dtype=torch.float64) * (rank + 1)]
        average_gradients_(ts)
        out["averaged"] = ts
        # the running normaliser, combined twice
        rms = RunningMeanStd((3,))
        rms.update(_obs(0, 6))  # the same start on every worker
        since = moments_of(rms)
        for sync in range(2):
            for chunk in _obs_chunks(rank, sync):
                rms.update(chunk)
            since = combine_running_stats(rms, since)
        out["rms"] = (rms.mean.copy(), rms.var.copy(), rms.count)
        scalar = RunningMeanStd(())  # the reward scaler's: shape ()
        since = moments_of(scalar)
        for chunk in _obs_chunks(rank, 0):
            scalar.update(chunk[:, 0])
        combine_running_stats(scalar, since)
        out["scalar_rms"] = (float(scalar.mean), float(scalar.var), scalar.count)
        out["returns"] = gather_episode_returns([10.0 * rank + i for i in range(rank + 1)])
        p = torch.full((3,), float(rank))
        broadcast_from_rank0_([p])
        check_same_across_workers([p], "p")
        out["broadcast"] = p
        try:
            check_same_across_workers([torch.full((3,), float(rank))], "q")
            out["out_of_sync"] = None
        except OutOfSyncError as err:
            out["out_of_sync"] = str(err)
    return out


@pytest.fixture(scope="module")
def infra(tmp_path_factory):
    return run_workers(_infra, N, tmp_path_factory.mktemp("infra"), timeout_s=90, rendezvous="env")


def test_workers_know_their_rank(infra):
    assert [r["workers"] for r in infra] == [(0, 2, "gloo", True), (1, 2, "gloo", False)]


def test_average_across_workers_first_and_second_order_against_one_process(infra):
    """``F = sum_r f_r(mean_s h_s(x_s))``: gradient and Hessian-vector product, cross terms too."""
    xs = [_x(r).requires_grad_(True) for r in range(N)]
    y = sum(_h(x, r) for r, x in enumerate(xs)) / N
    F = sum(_f(y, r) for r in range(N))
    gs = torch.autograd.grad(F, xs, create_graph=True)
    hvps = torch.autograd.grad(sum(g @ _v(r) for r, g in enumerate(gs)), xs)
    for r in range(N):
        torch.testing.assert_close(infra[r]["grad"], gs[r].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(infra[r]["hvp"], hvps[r], rtol=1e-12, atol=1e-12)
    mean = sum(_h(_x(r), r) for r in range(N)) / N
    for r in range(N):
        torch.testing.assert_close(infra[r]["inplace"], mean, rtol=0, atol=1e-15)


def test_normalize_over_workers_equals_normalising_the_union(infra):
    parts = [_adv(r).requires_grad_(True) for r in range(N)]
    z = normalize(torch.cat(parts))
    grads = torch.autograd.grad((z * torch.cat([_weights(r) for r in range(N)])).sum(), parts)
    for r, zr in enumerate(z.detach().split([len(p) for p in parts])):
        torch.testing.assert_close(infra[r]["normalized"], zr, rtol=0, atol=1e-13)
        torch.testing.assert_close(infra[r]["normalized_grad"], grads[r], rtol=0, atol=1e-13)


def test_average_gradients_in_place(infra):
    for r in range(N):
        a, b = infra[r]["averaged"]
        assert torch.equal(a, torch.full((2, 3), 1.5))
        assert b.dtype == torch.float64 and torch.equal(b, torch.arange(4.0).double() * 1.5)


def test_combined_running_stats_equal_one_normaliser_that_saw_every_worker(infra):
    one = RunningMeanStd((3,))
    one.update(_obs(0, 6))
    for sync in range(2):
        for r in range(N):
            for chunk in _obs_chunks(r, sync):
                one.update(chunk)
    mean0, var0, count0 = infra[0]["rms"]
    np.testing.assert_allclose(mean0, one.mean, rtol=1e-12)
    np.testing.assert_allclose(var0, one.var, rtol=1e-12)
    assert count0 == pytest.approx(one.count, rel=1e-15)
    mean1, var1, count1 = infra[1]["rms"]  # every worker holds the same bits
    assert np.array_equal(mean0, mean1) and np.array_equal(var0, var1) and count0 == count1
    scalar = RunningMeanStd(())
    for r in range(N):
        for chunk in _obs_chunks(r, 0):
            scalar.update(chunk[:, 0])
    for r in range(N):
        mean, var, count = infra[r]["scalar_rms"]
        assert mean == pytest.approx(float(scalar.mean), rel=1e-12)
        assert var == pytest.approx(float(scalar.var), rel=1e-12)
        assert count == pytest.approx(scalar.count, rel=1e-15)


def test_episode_returns_reach_rank_0(infra):
    assert infra[0]["returns"] == [0.0, 10.0, 11.0]
    assert infra[1]["returns"] is None


def test_broadcast_and_the_out_of_sync_check(infra):
    assert all(torch.equal(r["broadcast"], torch.zeros(3)) for r in infra)
    for r in infra:
        assert r["out_of_sync"].startswith("q differs between workers 0 and 1")


# ------------------------------------------------------------------------------------ faults

HANG_TIMEOUT_S = 1.5


def _lost(fn) -> dict:
    t0 = time.monotonic()
    try:
        fn()
    except WorkerLostError as err:
        return {"error": str(err), "elapsed": time.monotonic() - t0}
    return {"error": None, "elapsed": time.monotonic() - t0}


def _faults(rank: int, n: int, init: str) -> dict:
    out = {}

    def hang() -> None:  # rank 1 stops answering for longer than the timeout
        with workers(rank, n, init, timeout_s=HANG_TIMEOUT_S, name="hang"):
            average_gradients_([torch.ones(2)])
            if rank == 1:
                time.sleep(2 * HANG_TIMEOUT_S)
            average_gradients_([torch.ones(2)])

    out["hang"] = _lost(hang)

    def missing() -> None:  # a third worker never joins the rendezvous
        with workers(rank, n + 1, init, timeout_s=HANG_TIMEOUT_S, name="missing"):
            pass

    out["missing"] = _lost(missing)

    def dies() -> None:  # rank 1 dies between two collectives
        with workers(rank, n, init, timeout_s=30, name="dies"):
            average_gradients_([torch.ones(2)])
            if rank == 1:
                os._exit(3)
            average_gradients_([torch.ones(2)])

    out["dies"] = _lost(dies)
    return out


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return run_workers(
        _faults, N, tmp_path_factory.mktemp("faults"), timeout_s=60, results_from=[0]
    )[0]


def _one_line(err: str | None, what: str = "lost the other workers") -> str:
    assert err is not None and "\n" not in err, err
    assert err.startswith(f"worker 0 of 2: {what}"), err
    return err


def test_a_hung_worker_is_one_error_line_after_the_timeout(faults):
    err = _one_line(faults["hang"]["error"])
    assert f"within {HANG_TIMEOUT_S:g} s" in err
    assert HANG_TIMEOUT_S * 0.9 < faults["hang"]["elapsed"] < HANG_TIMEOUT_S + 5


def test_a_worker_that_never_joins_is_one_error_line(faults):
    err = faults["missing"]["error"]
    assert err is not None and "\n" not in err, err
    assert err.startswith("worker 0 of 3: could not meet the other workers"), err
    assert faults["missing"]["elapsed"] < HANG_TIMEOUT_S + 5


def test_a_dead_worker_is_one_error_line_at_once(faults):
    _one_line(faults["dies"]["error"])
    assert faults["dies"]["elapsed"] < 10
