"""What the trainers do differently with ``N`` data-parallel workers (issue 10).

A trainer asks :func:`current` for the :class:`Parallel` of this process and calls its methods
unconditionally: without a ``torch.distributed`` process group (or with a group of one) every
method is the single-process no-op, so a one-worker run is today's run bit for bit. With ``N``
workers (``torchrun --nproc-per-node N -m metagrad_rl train ...`` or ``metagrad-rl train
--nproc N``):

- seeds: worker ``r`` seeds its envs, action noise and minibatch order with
  :func:`~metagrad_rl.distributed.worker_seed` ``(seed, r)``; the networks are built from the
  run's seed on every worker and broadcast from rank 0 (:meth:`Parallel.sync_`);
- optimizers: :meth:`Parallel.averaged` puts
  :func:`~metagrad_rl.distributed.average_across_workers` first in a TorchOpt chain, so every
  minibatch gradient (policy and critics) is averaged before clipping and Adam -- inside the
  differentiable unroll too, where the bilevel problem also takes its advantage statistics
  over the union (:attr:`Parallel.sum_over_workers`); the meta-gradient of ``eta`` is
  averaged (the score term summed) by :meth:`Parallel.combine_meta`;
- normalisers: :meth:`Parallel.combine_normalisers` merges the observation and reward
  statistics once per iteration, right after the rollout;
- logs: :meth:`Parallel.union_episodes` gives every worker every worker's finished episodes;
  only rank 0 writes files (:class:`~metagrad_rl.trainers.run.Run`);
- checkpoints: :meth:`Parallel.gather_checkpoint` puts every rank's env, normaliser, RNG and
  pending-round state into rank 0's one atomic write; :meth:`Parallel.resumed` gives each
  rank its part of the checkpoint rank 0 read; a different ``N`` is a one-line error.

``--total-steps``, ``--num-steps`` and ``global_step`` count one worker's steps; ``N`` workers
sample ``N`` times as many (the ``all_workers_step`` column of ``progress.csv``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchopt
from torch import Tensor

from metagrad_rl.distributed import (
    Moments,
    all_reduce_sum,
    average_across_workers,
    average_gradients_,
    broadcast_from_rank0_,
    check_same_across_workers,
    combine_running_stats,
    is_distributed,
    worker_seed,
)
from metagrad_rl.envs import RunningMeanStd
from metagrad_rl.errors import ConfigError
from metagrad_rl.pytree import PARTS
from metagrad_rl.rollout import EpisodeStats

#: Checkpoint entries that differ between workers (the rest is the same on every worker).
PER_RANK_KEYS = ("collector", "update_gen", "torch_rng", "pending")
#: Checkpoint entry: one dict of :data:`PER_RANK_KEYS` per rank (runs with ``N > 1``).
WORKERS_KEY = "workers"
#: Checkpoint entry: the number of workers the run was trained with (absent: 1).
NUM_WORKERS_KEY = "num_workers"
#: Checkpoint entry: how its workers were run, "allreduce" or "rollout" (absent: "allreduce").
MODE_KEY = "parallel"
#: The ways to run ``N`` workers: ``N`` trainers meeting at an all-reduce in every minibatch
#: step, or ``N`` rollout workers feeding one learner (:mod:`.rollout_workers`).
MODES = ("rollout", "allreduce")

_factory: Callable[[], Parallel] | None = None


class PeerConfigError(ConfigError):
    """Rank 0's :class:`ConfigError`, raised on the other workers too (the CLI prints it once)."""


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def plain_sum(x: Tensor) -> Tensor:
    """``x`` summed over the workers by a plain all-reduce (a copy, off the graph)."""
    y = x.detach().clone()
    dist.all_reduce(y)
    return y


def _average_plain() -> torchopt.base.GradientTransformation:
    """:func:`~metagrad_rl.distributed.average_across_workers` by a plain all-reduce (no
    autograd): the mean of the updates over the workers, written into them."""

    def init_fn(params: Any) -> torchopt.base.EmptyState:
        return torchopt.base.EmptyState()

    def update_fn(
        updates: Any, state: Any, *, params: Any = None, inplace: bool = True
    ) -> tuple[Any, Any]:
        leaves, spec = torchopt.pytree.tree_flatten(updates)
        if any(t.requires_grad for t in leaves):
            raise ConfigError("a plain average of updates that are differentiated: use averaged()")
        if not inplace:
            leaves = [t.clone() for t in leaves]
            updates = torchopt.pytree.tree_unflatten(spec, leaves)
        average_gradients_(leaves)
        return updates, state

    return torchopt.base.GradientTransformation(init_fn, update_fn)


def minibatch_generator(seed: int) -> torch.Generator:
    """The minibatch-order generator of a worker seeded ``seed`` (both trainers)."""
    return torch.Generator().manual_seed(seed + 2_000_003)


def _fresh_moments(rms: Any) -> Moments:
    fresh = RunningMeanStd(np.shape(rms.mean))
    return Moments(fresh.mean.copy(), fresh.var.copy(), float(fresh.count))


@dataclass
class Parallel:
    """This process's worker: rank, world size and the normaliser statistics last combined."""

    rank: int = 0
    world_size: int = 1
    since: dict[str, Moments] = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_workers(self) -> int:
        """The workers whose data make one update (the all-reduce mode's world size)."""
        return self.world_size

    @property
    def mode(self) -> str:
        """``"allreduce"`` (with one process too) or ``"rollout"`` (:data:`MODES`)."""
        return "allreduce"

    @property
    def norm_groups(self) -> int:
        """PPO normalises a minibatch's advantages in this many equal parts (one per worker
        whose samples it holds): 1 here, where each worker holds its own minibatch."""
        return 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that writes files and reports progress."""
        return self.rank == 0

    # -- setup ------------------------------------------------------------------------------
    def seed(self, seed: int) -> int:
        """This worker's seed of envs, action noise and minibatch order (rank 0: ``seed``)."""
        return worker_seed(seed, self.rank)

    def make_collector(self, cfg: Any) -> Any:
        """This worker's envs and normalisers (:func:`~metagrad_rl.trainers.common.collector_for`
        with :meth:`seed`)."""
        from metagrad_rl.trainers.common import collector_for

        return collector_for(cfg, self.seed(cfg.seed))

    def update_generator(self, seed: int) -> torch.Generator:
        """This worker's minibatch-order generator (:func:`minibatch_generator`)."""
        return minibatch_generator(self.seed(seed))

    def schedule(
        self, n: int, epochs: int, num_minibatches: int, gen: torch.Generator
    ) -> list[Tensor]:
        """A round's minibatch order over this worker's ``n`` samples
        (:func:`~metagrad_rl.unroll.minibatch_indices`)."""
        from metagrad_rl.unroll import minibatch_indices

        return minibatch_indices(n, epochs, num_minibatches, gen)

    def averaged(self, tx: torchopt.base.GradientTransformation, plain: bool = False) -> Any:
        """``tx`` behind :func:`~metagrad_rl.distributed.average_across_workers` (``tx`` alone
        in one process). ``plain``: for updates that are never differentiated (PPO, the
        critics, a plain policy round), the same average by a plain all-reduce, which costs
        about a third of the autograd-aware one; the optimizer state is the same."""
        if not self.distributed:
            return tx
        return torchopt.chain(_average_plain() if plain else average_across_workers(), tx)

    @property
    def plain_sum_over_workers(self) -> Callable[[Tensor], Tensor] | None:
        """:attr:`sum_over_workers` off the autograd graph (for a plain policy round, whose
        advantages are constants: ``eta`` is not differentiated there)."""
        return plain_sum if self.distributed else None

    @property
    def sum_over_workers(self) -> Callable[[Tensor], Tensor] | None:
        """The differentiable sum for union minibatch statistics (``None`` in one process)."""
        return all_reduce_sum if self.distributed else None

    def sync_(self, tensors: Sequence[Tensor]) -> None:
        """Rank 0's values into every worker's ``tensors`` (networks at the start)."""
        broadcast_from_rank0_(list(tensors))

    def check_same(self, tensors: Sequence[Tensor], name: str) -> None:
        """:class:`~metagrad_rl.distributed.OutOfSyncError` unless all workers agree bitwise."""
        check_same_across_workers(list(tensors), name)

    def same_memory_budget(self) -> None:
        """Give every worker the same unroll memory budget (the smallest, split among the
        workers of a machine), so that none alone stops with ``MemoryBudgetError``."""
        if not self.distributed or os.environ.get("METAGRAD_MEMORY_BUDGET_GIB"):
            return
        from metagrad_rl.memory import GIB, default_budget_bytes

        mine = default_budget_bytes()
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)))
        value = torch.tensor([float("inf") if mine is None else mine / local], dtype=torch.float64)
        value = value.to(_comm_device())
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        if torch.isfinite(value).all():
            os.environ["METAGRAD_MEMORY_BUDGET_GIB"] = repr(float(value) / GIB)

    # -- every iteration --------------------------------------------------------------------
    def combine_normalisers(self, collector: Any) -> None:
        """Every worker's observation and reward statistics merged (once per iteration)."""
        if not self.distributed:
            return
        for name, norm in (("obs", collector.obs_norm), ("rew", collector.rew_scaler)):
            since = self.since.get(name) or _fresh_moments(norm.rms)
            self.since[name] = combine_running_stats(norm.rms, since)

    def resumed(self, ckpt: Mapping[str, Any], collector: Any) -> None:
        """After loading a checkpoint: its (combined) statistics are the last combine's."""
        from metagrad_rl.distributed import moments_of

        self.since = {"obs": moments_of(collector.obs_norm.rms)}
        self.since["rew"] = moments_of(collector.rew_scaler.rms)

    def union_episodes(self, episodes: EpisodeStats) -> EpisodeStats:
        """The episodes every worker finished this iteration, in rank order, on every worker."""
        if not self.distributed:
            return episodes
        mine = (list(map(float, episodes.returns)), list(map(int, episodes.lengths)))
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        return EpisodeStats([x for p in parts for x in p[0]], [x for p in parts for x in p[1]])

    def union_std(self, x: Tensor) -> Tensor:
        """The unbiased std of the union of every worker's ``x`` (``x.std()`` in one process)."""
        if not self.distributed:
            return x.std()
        x = x.detach().reshape(-1).to(torch.float64)
        total, n = all_reduce_sum(torch.stack([x.sum(), x.new_tensor(float(x.numel()))])).unbind()
        ss = all_reduce_sum((x - total / n).square().sum())
        return (ss / (n - 1)).sqrt()

    def combine_meta(self, result: Any) -> Any:
        """A meta-gradient result with every term averaged over the workers and the score term
        summed (``log p(tau)`` of the union is the sum of the workers'; the weight is the
        same on every worker); one all-reduce."""
        if not self.distributed or result is None:
            return result
        present = [(n, getattr(result, n)) for n in PARTS if getattr(result, n) is not None]
        tensors = [t for _, d in present for t in d.values()]
        average_gradients_(tensors)
        if result.score is not None:
            for t in result.score.values():
                t.mul_(self.world_size)
        return result

    def average_(self, grads: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """``grads`` averaged over the workers, in place (returned for chaining)."""
        if self.distributed:
            average_gradients_(list(grads.values()))
        return grads

    # -- files ------------------------------------------------------------------------------
    def main_first(self, fn: Callable[[], Any], share: bool = False) -> Any:
        """``fn()`` on rank 0; a :class:`ConfigError` there is raised on every worker. With
        ``share`` the result is sent to every worker (else the others get ``None``)."""
        if not self.distributed:
            return fn()
        box: list[Any] = [None]
        result = None
        if self.is_main:
            try:
                result = fn()
                box[0] = ("ok", result if share else None)
            except ConfigError as err:
                box[0] = ("error", str(err))
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise PeerConfigError(value)
        return result if self.is_main else value

    def gather_checkpoint(self, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        """The checkpoint of all workers on rank 0 (``None`` elsewhere).

        Rank 0's own entries stay where a one-worker checkpoint has them (``evaluate`` reads
        them); :data:`WORKERS_KEY` holds every rank's :data:`PER_RANK_KEYS`.
        """
        full = dict(payload)
        if not self.distributed:
            return full
        mine = {k: payload[k] for k in PER_RANK_KEYS if k in payload}
        parts: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, parts, dst=0)
        if not self.is_main:
            return None
        full[WORKERS_KEY] = parts
        full[NUM_WORKERS_KEY] = self.world_size
        full[MODE_KEY] = self.mode
        return full

    def check_workers(self, ckpt: Mapping[str, Any], where: str) -> None:
        """A one-line error unless ``ckpt`` was written by as many workers as this run has."""
        saved = int(ckpt.get(NUM_WORKERS_KEY, 1))
        mode = str(ckpt.get(MODE_KEY, "allreduce"))
        if saved != self.num_workers:
            raise ConfigError(
                f"the run in {where!r} was trained with {saved} worker(s), this one has "
                f"{self.num_workers}: resume it with the same number (metagrad-rl train "
                f"--nproc {saved} --parallel {mode})"
            )
        if saved > 1 and mode != self.mode:
            raise ConfigError(
                f"the run in {where!r} was trained with --parallel {mode}, this one runs "
                f"--parallel {self.mode}: resume it in the same mode (--parallel {mode})"
            )

    def scatter_checkpoint(self, ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
        """Rank 0's loaded checkpoint, as each rank's own: the shared entries broadcast, the
        :data:`PER_RANK_KEYS` of rank ``r`` scattered to it. ``None`` stays ``None``."""
        if not self.distributed:
            return ckpt
        box: list[Any] = [None]
        if self.is_main:
            assert ckpt is not None or box[0] is None
            box[0] = None if ckpt is None else {k: v for k, v in ckpt.items() if k != WORKERS_KEY}
        dist.broadcast_object_list(box, src=0)
        shared = box[0]
        if shared is None:
            return None
        mine: list[Any] = [None]
        parts = ckpt[WORKERS_KEY] if self.is_main and ckpt is not None else None
        dist.scatter_object_list(mine, parts, src=0)
        return {**shared, **mine[0]}


def current() -> Parallel:
    """The :class:`Parallel` of this process: a worker of the process group, the learner of
    :func:`~metagrad_rl.trainers.rollout_workers.rollout_workers`, or one process alone."""
    if _factory is not None:
        return _factory()
    if not is_distributed():
        return Parallel()
    return Parallel(dist.get_rank(), dist.get_world_size())


def set_current_factory(factory: Callable[[], Parallel] | None) -> Callable[[], Parallel] | None:
    """Makes :func:`current` return ``factory()`` (``None``: the default); returns the previous
    factory (:func:`~metagrad_rl.trainers.rollout_workers.rollout_workers` sets it)."""
    global _factory
    previous, _factory = _factory, factory
    return previous
