"""Rollout workers: ``N`` collectors in ``N`` processes feeding one learner (issue 18).

The all-reduce mode (:mod:`metagrad_rl.trainers.parallel`) runs ``N`` whole trainers that meet
at a collective in every minibatch step. With networks this small that collective costs about
as much as the step it serves (1-2 ms of gloo latency against ~1 ms of compute), so on one
machine every extra worker made training slower. This mode moves the parallelism to where the
time is independent: worker ``r`` owns exactly what rank ``r`` of the all-reduce mode owns --
its envs, action-noise RNG and normalisers, seeded with
:func:`~metagrad_rl.distributed.worker_seed` ``(seed, r)`` -- and samples its ``T`` steps in its
own process from a copy of the policy's sampler sent once per iteration. Worker 0 is the
learner's own collector; workers ``1..N-1`` are spawned processes. The learner then updates
once on the union:

- the batch is the workers' batches side by side as env columns (``[T, N n, ...]``);
- minibatch ``j`` is the union of the workers' minibatches ``j``, each drawn from that worker's
  own minibatch generator (:func:`union_schedule`), so a loss that is a mean over the union
  minibatch is the mean of the workers' losses: the same step, and the same meta-gradient, as
  the all-reduce mode's average -- here by construction, with no collective at all;
- PPO normalises each worker's part of a minibatch on its own, as each all-reduce worker does
  (:attr:`RolloutParallel.norm_groups`); the bilevel problem takes its statistics over the
  union, as the all-reduce mode's ``sum_over_workers`` does;
- the normalisers are merged after every rollout exactly as
  :func:`~metagrad_rl.distributed.combine_running_stats` merges them (same arithmetic, same
  order), and the episodes are reported in worker order.

Communication is one message each way per worker and iteration (the sampler out; the buffers,
episodes and normaliser moments back) plus one with the merged moments. Checkpoints hold every
worker's collector and minibatch generator; ``--resume`` continues exactly. A worker that dies
or hangs is one :class:`~metagrad_rl.distributed.WorkerLostError` line.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import pickle
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metagrad_rl.distributed import (
    Moments,
    WorkerLostError,
    merge_moments,
    moments_of,
    new_since,
    worker_seed,
)
from metagrad_rl.errors import ConfigError
from metagrad_rl.rollout import Collector, EpisodeStats
from metagrad_rl.trainers import parallel
from metagrad_rl.trainers.common import collector_for
from metagrad_rl.unroll import minibatch_indices

#: Checkpoint entry: the minibatch generators' states of workers ``1..N-1``.
GENS_KEY = "rollout_update_gens"
#: Seconds the learner waits for a worker's reply before it calls the worker lost.
DEFAULT_TIMEOUT_S = 300.0


# ------------------------------------------------------------------ the worker process
def _send(conn: Any, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _serve(conn: Any, cfg: Any, seed: int) -> None:
    """A rollout worker's loop: build the collector, then answer the learner's requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the learner's to handle
    torch.set_num_threads(1)
    try:
        collector = collector_for(cfg, seed)
    except Exception as err:  # noqa: BLE001 - reported to the learner as one line
        _send(conn, ("error", f"{type(err).__name__}: {err}"))
        return
    _send(conn, ("ok", None))
    while True:
        try:
            cmd, *args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the learner is gone
            return
        try:
            if cmd == "close":
                collector.envs.close()
                _send(conn, ("ok", None))
                return
            _send(conn, ("ok", _handle(collector, cmd, args)))
        except Exception as err:  # noqa: BLE001 - reported to the learner as one line
            _send(conn, ("error", f"{type(err).__name__}: {err}"))


def _handle(collector: Collector, cmd: str, args: Sequence[Any]) -> Any:
    if cmd == "collect":
        bufs, episodes = collector.collect(*args)
        return bufs, episodes, _moments(collector)
    if cmd == "set_moments":
        _set_moments(collector, args[0])
        return None
    if cmd == "state":
        return collector.state_dict()
    if cmd == "load":
        return collector.load_state_dict(args[0])
    raise ValueError(f"unknown rollout-worker request {cmd!r}")


def _moments(collector: Collector) -> dict[str, Moments]:
    return {
        "obs": moments_of(collector.obs_norm.rms),
        "rew": moments_of(collector.rew_scaler.rms),
    }


def _set_moments(collector: Collector, moments: dict[str, Moments]) -> None:
    for name, norm in (("obs", collector.obs_norm), ("rew", collector.rew_scaler)):
        m = moments[name]
        norm.rms.mean, norm.rms.var, norm.rms.count = m.mean.copy(), m.var.copy(), float(m.n)


# ------------------------------------------------------------------ the learner's side
class _Remote:
    """The learner's handle on rollout worker ``rank`` (a spawned process and its pipe)."""

    def __init__(self, ctx: Any, rank: int, cfg: Any, timeout_s: float) -> None:
        self.rank, self.timeout_s = rank, timeout_s
        self.conn, child = ctx.Pipe()
        seed = worker_seed(cfg.seed, rank)
        self.proc = ctx.Process(target=_serve, args=(child, cfg, seed), daemon=True)
        self.proc.start()
        child.close()

    def ask(self, *msg: Any) -> None:
        try:
            _send(self.conn, msg)
        except (BrokenPipeError, OSError) as err:
            raise self._lost(str(msg[0])) from err

    def answer(self, what: str) -> Any:
        deadline = time.monotonic() + self.timeout_s
        while not self.conn.poll(0.2):
            if not self.proc.is_alive() and not self.conn.poll(0):
                raise self._lost(what)
            if time.monotonic() > deadline:
                raise WorkerLostError(
                    f"rollout worker {self.rank} (pid {self.proc.pid}) sent nothing for "
                    f"{self.timeout_s:.0f} s during {what}"
                )
        try:
            status, value = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as err:
            raise self._lost(what) from err
        if status == "error":
            raise WorkerLostError(f"rollout worker {self.rank} failed during {what}: {value}")
        return value

    def _lost(self, what: str) -> WorkerLostError:
        self.proc.join(timeout=1.0)
        code = self.proc.exitcode
        how = "is gone" if code is None else f"died (exit code {code})"
        pid = self.proc.pid
        return WorkerLostError(f"rollout worker {self.rank} (pid {pid}) {how} during {what}")

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.ask("close")
                self.answer("close")
            self.proc.join(timeout=5.0)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.conn.close()


@dataclass
class UnionEnvs:
    """What the trainers read of a collector's envs, for the union of the workers' envs."""

    obs_dim: int
    act_dim: int
    num_envs: int
    closers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers.clear()


class UnionCollector:
    """``N`` workers' collectors as one (:class:`~metagrad_rl.rollout.Collector`'s interface):
    worker 0 here, workers ``1..N-1`` in their own processes."""

    def __init__(self, cfg: Any, num_workers: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        ctx = mp.get_context("spawn")
        self.remotes = [_Remote(ctx, r, cfg, timeout_s) for r in range(1, num_workers)]
        try:
            self.local = collector_for(cfg, worker_seed(cfg.seed, 0))
            for remote in self.remotes:
                remote.answer("start-up")
        except BaseException:
            self._close_remotes()
            raise
        self.obs_norm, self.rew_scaler = self.local.obs_norm, self.local.rew_scaler
        env = self.local.envs
        self.envs = UnionEnvs(env.obs_dim, env.act_dim, env.num_envs * num_workers)
        self.envs.closers += [env.close, self._close_remotes]
        self.since = {k: _fresh(m) for k, m in _moments(self.local).items()}

    @property
    def num_workers(self) -> int:
        return 1 + len(self.remotes)

    def collect(self, policy_np: Any, num_steps: int) -> tuple[dict, EpisodeStats]:
        """Every worker's ``num_steps`` steps (in parallel), side by side as env columns."""
        for remote in self.remotes:
            remote.ask("collect", policy_np, num_steps)
        bufs, episodes = self.local.collect(policy_np, num_steps)
        parts = [(bufs, episodes, _moments(self.local))]
        parts += [remote.answer("collect") for remote in self.remotes]
        self._combine([p[2] for p in parts])
        union = {k: np.concatenate([p[0][k] for p in parts], axis=1) for k in bufs}
        returns = [x for p in parts for x in p[1].returns]
        lengths = [x for p in parts for x in p[1].lengths]
        return union, EpisodeStats(returns, lengths)

    def _combine(self, moments: Sequence[dict[str, Moments]]) -> None:
        """:func:`~metagrad_rl.distributed.combine_running_stats`'s merge, in worker order."""
        merged = {}
        for name, since in self.since.items():
            news = [new_since(m[name], since) for m in moments]
            merged[name] = merge_moments([since, *news])
        _set_moments(self.local, merged)
        for remote in self.remotes:
            remote.ask("set_moments", merged)
        for remote in self.remotes:
            remote.answer("set_moments")
        self.since = _moments(self.local)

    def state_dict(self) -> dict[str, Any]:
        """Every worker's :meth:`~metagrad_rl.rollout.Collector.state_dict`, in worker order."""
        for remote in self.remotes:
            remote.ask("state")
        states = [self.local.state_dict()] + [r.answer("checkpoint") for r in self.remotes]
        return {"workers": states}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restores :meth:`state_dict`; ``True`` when every worker's envs were restored exactly."""
        states = state.get("workers") if isinstance(state, dict) else None
        if not isinstance(states, list) or len(states) != self.num_workers:
            got = "one process's" if states is None else f"{len(states)} workers'"
            raise ConfigError(
                f"the checkpoint holds {got} collector state: expected {self.num_workers} "
                "rollout workers' (resume with the number of workers the run was trained with)"
            )
        for remote, s in zip(self.remotes, states[1:], strict=True):
            remote.ask("load", s)
        exact = self.local.load_state_dict(states[0])
        exact = all([exact] + [r.answer("resume") for r in self.remotes])
        self.since = _moments(self.local)
        return exact

    def _close_remotes(self) -> None:
        for remote in self.remotes:
            remote.close()


def _fresh(m: Moments) -> Moments:
    """The moments of a freshly made normaliser of ``m``'s shape (the first merge's base)."""
    from metagrad_rl.envs import RunningMeanStd

    fresh = RunningMeanStd(np.shape(m.mean))
    return Moments(fresh.mean.copy(), fresh.var.copy(), float(fresh.count))


# ------------------------------------------------------------------ the union's minibatches
def union_schedule(schedules: Sequence[Sequence[Tensor]], num_envs: int) -> list[Tensor]:
    """The union's minibatch order: minibatch ``j`` = the workers' minibatches ``j``.

    ``schedules[r]`` indexes worker ``r``'s flattened ``[T, n]`` batch (``k = t n + i``); in
    the union batch ``[T, N n]`` that sample is ``t N n + r n + i``. Worker ``r``'s samples
    come ``r``-th in each union minibatch (the order PPO's per-worker normalisation uses).
    """
    width = len(schedules) * num_envs

    def place(r: int, k: Tensor) -> Tensor:
        return (k // num_envs) * width + r * num_envs + k % num_envs

    return [torch.cat([place(r, k) for r, k in enumerate(js)]) for js in zip(*schedules)]


@dataclass
class RolloutParallel(parallel.Parallel):
    """The :class:`~metagrad_rl.trainers.parallel.Parallel` of a learner with ``N`` rollout
    workers: one process for every collective (each is the identity), ``N`` workers' data."""

    workers: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    num_envs: int = 1
    gens: list[torch.Generator] = field(default_factory=list)

    @property
    def num_workers(self) -> int:
        return self.workers

    @property
    def mode(self) -> str:
        return "rollout"

    @property
    def norm_groups(self) -> int:
        return self.workers

    def make_collector(self, cfg: Any) -> Any:
        self.num_envs = cfg.num_envs
        return UnionCollector(cfg, self.workers, self.timeout_s)

    def update_generator(self, seed: int) -> torch.Generator:
        others = range(1, self.workers)
        self.gens = [parallel.minibatch_generator(worker_seed(seed, r)) for r in others]
        return parallel.minibatch_generator(seed)

    def schedule(
        self, n: int, epochs: int, num_minibatches: int, gen: torch.Generator
    ) -> list[Tensor]:
        own = [minibatch_indices(n, epochs, num_minibatches, g) for g in (gen, *self.gens)]
        return union_schedule(own, self.num_envs)

    def gather_checkpoint(self, payload: Any) -> dict[str, Any]:
        full = dict(payload)
        full[GENS_KEY] = [g.get_state() for g in self.gens]
        full[parallel.NUM_WORKERS_KEY] = self.workers
        full[parallel.MODE_KEY] = self.mode
        return full

    def resumed(self, ckpt: Any, collector: Any) -> None:
        for g, s in zip(self.gens, ckpt[GENS_KEY], strict=True):
            g.set_state(s)


@contextlib.contextmanager
def rollout_workers(n: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Within this block the trainers run ``n`` rollout workers feeding one learner.

    ``with rollout_workers(2): ppo.train(cfg, out)`` samples twice ``cfg.batch_size`` steps per
    iteration in two processes and updates once on the union (``metagrad-rl train --nproc 2``
    does this). ``n = 1`` is the plain single-process run.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"rollout_workers({n!r}) is invalid: expected a positive int")
    if n > 1 and parallel.is_distributed():
        raise ConfigError(
            "rollout workers inside a torch.distributed group: use one mode at a time "
            "(--parallel rollout in one process, or --parallel allreduce under torchrun)"
        )
    learner = RolloutParallel(workers=n, timeout_s=timeout_s)  # one per block: its generators
    previous = parallel.set_current_factory((lambda: learner) if n > 1 else None)
    try:
        yield
    finally:
        parallel.set_current_factory(previous)
