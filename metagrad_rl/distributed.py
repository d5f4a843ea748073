r"""Data-parallel workers on ``torch.distributed``, and what keeps the meta-gradient exact.

The paper runs 4-16 MPI workers, each with its own environment copies and seed, and averages
their gradients before every step (``docs/distributed.md``). Here a worker is one process of a
``torch.distributed`` group (``torchrun``; gloo on CPU, NCCL on CUDA):

- :func:`average_across_workers` is a TorchOpt transformation whose all-reduce stays on the
  autograd graph (``torch.distributed._functional_collectives``), to put first in the inner
  optimizer chain. With it, and with minibatch statistics taken over the union of the workers'
  minibatches (:func:`all_reduce_sum`, passed to :func:`metagrad_rl.advantages.normalize` and
  :func:`metagrad_rl.problems.ppo_meta_problem` as ``sum_over_workers``), ``N`` workers on their
  minibatches ``j`` take exactly the step a single process takes on the union of those
  minibatches, and the average of their meta-gradients is the single process's meta-gradient:

  .. math:: \frac{1}{N}\sum_{r=1}^N \nabla \ell_r = \nabla\Big(\frac{1}{N}\sum_{r=1}^N \ell_r\Big)
            = \nabla \ell_{\cup}
            \quad\text{when every } \ell_r \text{ is a mean over } m \text{ samples}

  (``tests/test_distributed_exact.py``).
- Outside the unroll, plain collectives: :func:`average_gradients_` (PPO's and the critics'
  minibatch steps, the averaged meta-gradient of ``eta``), :func:`combine_running_stats` (the
  observation and reward normalisers), :func:`gather_episode_returns`,
  :func:`broadcast_from_rank0_`, :func:`check_same_across_workers`.
- :func:`init_workers` starts and ends the process group with a bounded timeout and turns a
  dead or hung peer into one :class:`WorkerLostError` line.

Every function here is the identity (or its single-process meaning) when no process group is
initialised or it has one member, so a trainer calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torchopt
from torch import Tensor

from metagrad_rl.errors import ConfigError
from metagrad_rl.moments import Moments, merge_moments, moments_of, new_since

#: Seconds a collective (or the rendezvous) waits for the other workers before it fails.
DEFAULT_TIMEOUT_S = 120.0

Group = Any  # a torch.distributed.ProcessGroup, or None for the default (world) group


class WorkerLostError(RuntimeError):
    """Another worker died or stopped answering: one line naming this worker and the cause."""


class OutOfSyncError(RuntimeError):
    """Tensors that every worker should hold identically differ between workers."""


def is_distributed(group: Group = None) -> bool:
    """Whether a process group is initialised and has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: Group = None) -> int:
    """The number of workers (1 without a process group)."""
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group: Group = None) -> int:
    """This worker's rank (0 without a process group)."""
    return dist.get_rank(group) if is_distributed(group) else 0


def _group(group: Group) -> Any:
    return dist.group.WORLD if group is None else group


# ------------------------------------------------------------------------------------ seeds


def worker_seed(seed: int, rank: int) -> int:
    """The seed of worker ``rank`` in a run seeded ``seed``.

    Rank 0 keeps ``seed`` itself, so a one-worker run is the single-process run. Other ranks get
    a 62-bit number drawn from ``numpy.random.SeedSequence(seed, spawn_key=(rank,))``: distinct
    for every ``(seed, rank)`` and, with overwhelming probability, far from ``seed + i`` for the
    small offsets ``i`` a trainer adds (env copies, action noise, minibatch order).
    """
    if not (isinstance(seed, int) and seed >= 0 and isinstance(rank, int) and rank >= 0):
        raise ConfigError(f"worker_seed({seed!r}, {rank!r}) is invalid: expected non-negative ints")
    if rank == 0:
        return seed
    words = np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 30) ^ int(words[1])


# ----------------------------------------------------------- differentiable (inside the unroll)


def all_reduce_sum(x: Tensor, group: Group = None) -> Tensor:
    """``sum_r x_r`` over the workers, on the autograd graph (``x`` itself in one process).

    The backward of a sum over workers is the sum over workers of the incoming gradients, so
    when every worker differentiates its own loss ``l_r``, each receives the gradient of
    ``sum_r l_r`` with respect to its inputs; the collective is recorded under
    ``create_graph=True`` too, so higher derivatives are right as well. Every worker must make
    the same calls in the same order, forward and backward.
    """
    if not is_distributed(group):
        return x
    out = funcol.all_reduce(x, "sum", _group(group))
    return funcol.wait_tensor(out)


def average_across_workers(group: Group = None) -> torchopt.base.GradientTransformation:
    """A TorchOpt transformation: the mean of the updates over the workers, differentiably.

    Put it first in the inner optimizer chain, so that clipping and Adam see the averaged
    gradient and every worker takes the same step::

        torchopt.chain(average_across_workers(), metagrad_rl.clip_grad_norm(0.5),
                       torchopt.adam(3e-4, eps_root=1e-8))

    One all-reduce per update (all tensors in one buffer). Stateless; the identity in one
    process. With ``inplace=True`` the averaged values are written into the update tensors.
    """

    def init_fn(params: Any) -> torchopt.base.EmptyState:
        return torchopt.base.EmptyState()

    def update_fn(
        updates: Any, state: Any, *, params: Any = None, inplace: bool = True
    ) -> tuple[Any, Any]:
        if not is_distributed(group):
            return updates, state
        leaves, spec = torchopt.pytree.tree_flatten(updates)
        if not leaves:
            return updates, state
        n = dist.get_world_size(group)
        flat = torch.cat([g.reshape(-1) for g in leaves])
        mean = all_reduce_sum(flat, group) / n
        parts = [p.view_as(g) for p, g in zip(mean.split([g.numel() for g in leaves]), leaves)]
        if inplace:
            for g, p in zip(leaves, parts):
                g.copy_(p)
            return updates, state
        return torchopt.pytree.tree_unflatten(spec, parts), state

    return torchopt.base.GradientTransformation(init_fn, update_fn)


# -------------------------------------------------------------- plain (outside the unroll)


def _comm_device(group: Group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_gradients_(tensors: Sequence[Tensor | None], group: Group = None) -> None:
    """Replace each tensor by its mean over the workers, in place (no autograd).

    For the plain minibatch steps (PPO's policy and critics: ``[p.grad for p in params]``)
    and for the meta-gradient of ``eta`` each worker computed. One all-reduce per dtype.
    """
    if any(t is None for t in tensors):
        raise ConfigError(
            "average_gradients_ got None: every worker must pass the same tensors "
            "(give parameters without a gradient a zero gradient first)"
        )
    if not is_distributed(group):
        return
    n = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        assert t is not None
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        flat /= n
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            with torch.no_grad():
                t.copy_(part.view_as(t))


def broadcast_from_rank0_(tensors: Sequence[Tensor], group: Group = None) -> None:
    """Overwrite every worker's tensors with rank 0's, in place (e.g. network weights)."""
    if not is_distributed(group):
        return
    src = dist.get_global_rank(_group(group), 0)
    for t in tensors:
        with torch.no_grad():
            buf = t.detach().contiguous()
            dist.broadcast(buf, src=src, group=group)
            t.copy_(buf)


def check_same_across_workers(tensors: Sequence[Tensor], name: str, group: Group = None) -> None:
    """Raise :class:`OutOfSyncError` unless every worker holds bit-identical ``tensors``."""
    if not is_distributed(group):
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    flat = flat.to(_comm_device(group))
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, flat, group=group)
    for r, p in enumerate(parts[1:], start=1):
        if not torch.equal(p, parts[0]):
            diff = float((p - parts[0]).abs().max())
            raise OutOfSyncError(
                f"{name} differs between workers 0 and {r} (max abs difference {diff:.3g}): "
                "every update must be averaged across workers before it is applied"
            )


def gather_episode_returns(returns: Sequence[float], group: Group = None) -> list[float] | None:
    """Every worker's finished-episode returns, on rank 0 (rank order); ``None`` elsewhere.

    The lists may have different lengths. In one process: the returns themselves.
    """
    values = [float(x) for x in returns]
    if not is_distributed(group):
        return values
    me, n = dist.get_rank(group), dist.get_world_size(group)
    out: list[Any] | None = [None] * n if me == 0 else None
    dst = dist.get_global_rank(_group(group), 0)
    dist.gather_object(values, out, dst=dst, group=group)
    return None if out is None else [x for part in out for x in part]


# --------------------------------------------------------------------------- normalisers


def combine_running_stats(rms: Any, since: Moments, group: Group = None) -> Moments:
    """Give every worker's ``RunningMeanStd`` the statistics of all workers' data.

    ``since`` is :func:`moments_of` ``rms`` at the previous combine (identical on every worker;
    at the start, the freshly made normaliser's). Each worker's data added since then is
    recovered from ``rms``, gathered, and merged onto ``since`` in rank order, so every worker
    ends with the same bits: the moments of the union, as a single process that had seen every
    worker's data would hold them (to float64 round-off). Returns the new ``since``. As in the
    MPI versions of PPO, call it once per iteration (e.g. after collecting); between combines
    each worker normalises with the shared statistics plus its own new data.
    """
    now = moments_of(rms)
    if is_distributed(group):
        new = new_since(now, since)
        shape = now.mean.shape
        vec = torch.from_numpy(
            np.concatenate([[new.n], new.mean.reshape(-1), new.var.reshape(-1)])
        ).to(_comm_device(group))
        parts = [torch.empty_like(vec) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, vec, group=group)
        d = int(np.prod(shape))
        news = []
        for p in parts:
            a = p.cpu().numpy()
            news.append(Moments(a[1 : 1 + d].reshape(shape), a[1 + d :].reshape(shape), a[0]))
        now = merge_moments([since, *news])
    rms.mean, rms.var, rms.count = now.mean.copy(), now.var.copy(), float(now.n)
    return moments_of(rms)


# ------------------------------------------------------------------ process group lifetime


class Workers(NamedTuple):
    """This process's place in the group: what :func:`init_workers` yields."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None: one process, no process group
    device: torch.device
    timeout_s: float

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an int") from None


_GLOO_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # gloo's "[/path/file.cc:123] " prefix


def _is_comm_failure(err: BaseException) -> bool:
    if isinstance(err, dist.DistError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and any(
        s in msg for s in ("gloo", "Gloo", "NCCL", "c10d", "Connection reset", "Connection closed")
    )


def _lost_message(w: Workers, err: BaseException, joined: bool) -> str:
    first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    first = _GLOO_PREFIX.sub("", first.strip())
    if len(first) > 200:
        first = first[:200] + "..."
    what = (
        "lost the other workers (one died, or did not answer"
        if joined
        else "could not meet the other workers (one did not start, or the address is unreachable,"
    )
    return f"worker {w.rank} of {w.world_size}: {what} within {w.timeout_s:g} s): {first}"


@contextlib.contextmanager
def init_workers(
    device: str | torch.device = "cpu",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> Iterator[Workers]:
    """Join the process group for the ``with`` block and leave it at the end.

    ``rank`` and ``world_size`` default to torchrun's ``RANK`` and ``WORLD_SIZE`` (and
    ``init_method`` to ``env://``, i.e. ``MASTER_ADDR``/``MASTER_PORT``); without them, or with
    one worker, no process group is made and every helper here is the identity. The backend is
    gloo for a CPU ``device`` and NCCL for CUDA (the worker uses ``cuda:LOCAL_RANK``). Every
    collective and the rendezvous give up after ``timeout_s``; a failure of the group inside the
    block (a peer that died or hangs) is re-raised as one :class:`WorkerLostError` line.
    """
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s={timeout_s!r} is invalid: expected > 0")
    n = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    me = _env_int("RANK", 0) if rank is None else rank
    local = _env_int("LOCAL_RANK", me)
    if not (n >= 1 and 0 <= me < n):
        raise ConfigError(f"rank {me} of world size {n} is invalid: expected 0 <= rank < size")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if n > 1 else 0)
    if n == 1:
        yield Workers(0, 1, 0, None, dev, float(timeout_s))
        return
    if dist.is_initialized():
        raise ConfigError("a torch.distributed process group is initialised already")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    w = Workers(me, n, local, backend, dev, float(timeout_s))
    failed = joined = False
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend,
            init_method=init_method or "env://",
            rank=me,
            world_size=n,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        joined = True
        yield w
    except Exception as err:
        # At the rendezvous every RuntimeError is a missing peer or an unreachable address
        # (gloo's FileStore says only "Wait timeout").
        if not (_is_comm_failure(err) or (not joined and isinstance(err, RuntimeError))):
            raise
        failed = True
        raise WorkerLostError(_lost_message(w, err, joined)) from err
    finally:
        # NCCL's teardown can block on a broken communicator; gloo's returns at once.
        if dist.is_initialized() and not (failed and backend == "nccl"):
            dist.destroy_process_group()


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Moments",
    "OutOfSyncError",
    "WorkerLostError",
    "Workers",
    "all_reduce_sum",
    "average_across_workers",
    "average_gradients_",
    "broadcast_from_rank0_",
    "check_same_across_workers",
    "combine_running_stats",
    "gather_episode_returns",
    "init_workers",
    "is_distributed",
    "merge_moments",
    "moments_of",
    "rank",
    "world_size",
    "worker_seed",
]
