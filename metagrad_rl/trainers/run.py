"""The run around every trainer: setup, resume, checkpoints and logs (one copy for all algos).

A trainer's ``train`` is::

    ckpt = begin(ALGO, cfg, out, resume)          # checks, threads, seed; nothing written
    parts, state = build(cfg, lr_restart_of(ckpt, cfg))   # networks, optimizers, envs
    run = Run.open(ALGO, cfg, out, ckpt)          # run dir, config.json, logger
    if ckpt is not None: state.load(ckpt, parts)
    while run.keep_going(state.iteration, state.global_step, stop_at_step):
        ... the algorithm's named steps ...
        run.log(state.global_step, row, progress)
        run.maybe_checkpoint(state.iteration, payload)
    run.checkpoint(payload)
    return run.finish(collector, fields, state.global_step, state.iteration, recent)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metagrad_rl import config as C
from metagrad_rl.checkpoint import load_checkpoint, save_checkpoint
from metagrad_rl.errors import ConfigError
from metagrad_rl.rundir import (
    CHECKPOINT_FILE,
    TENSORBOARD_DIR,
    RunLogger,
    prepare_run_dir,
    resume_checkpoint,
    write_run_config,
    write_summary,
)
from metagrad_rl.trainers import parallel

Progress = Callable[[int, dict[str, Any]], None]

#: Fields that may differ between a run and its ``--resume``.
RESUMABLE_CHANGES = ("total_steps", "checkpoint_every", "torch_threads", "device", "tensorboard")


def check_tensorboard() -> None:
    """``--tensorboard`` needs the optional ``tensorboard`` package (a one-line error if absent)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tensorboard=True needs the tensorboard package, which is not installed: "
            "pip install 'metagrad_rl[tensorboard]' (progress.csv is written either way)"
        )


class TensorBoard:
    """The scalars of each ``progress.csv`` row as TensorBoard events in ``<run>/tensorboard``.

    On resume, events after the resumed step are dropped (``purge_step``), as the CSV's rows are.
    """

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1  # rows after the checkpoint
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge)

    def log(self, global_step: int, row: Mapping[str, Any]) -> None:
        for k, v in row.items():
            if k != "global_step" and isinstance(v, int | float) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, global_step)

    def close(self) -> None:
        self.writer.close()


def check_resume_config(saved: Mapping[str, Any], config: Any) -> None:
    """A resumed run keeps its hyperparameters; only :data:`RESUMABLE_CHANGES` may differ."""
    now = C.to_dict(config)
    for k, v in saved.items():
        if k not in RESUMABLE_CHANGES and now.get(k) != v:
            raise ConfigError(
                f"--{k.replace('_', '-')}={now.get(k)!r} differs from the resumed run's {v!r}: "
                f"a resumed run may change only {', '.join(RESUMABLE_CHANGES)}"
            )


def check_new_steps(ckpt: Mapping[str, Any], cfg: Any, out: str | Path) -> None:
    """A resume must ask for at least one more iteration than the checkpoint has done."""
    done = int(ckpt["global_step"])
    if cfg.num_iterations <= int(ckpt["iteration"]):
        raise ConfigError(
            f"--total-steps={cfg.total_steps} asks for no new steps: the run in {str(out)!r} "
            f"has done {done} (rollouts of {cfg.batch_size}); pass --total-steps >= "
            f"{done + cfg.batch_size} to extend it"
        )


def lr_restart_of(ckpt: Mapping[str, Any] | None, cfg: Any) -> int:
    """Where the resumed run's annealing starts: unchanged, or here if ``total_steps`` changed.

    Extending (or shortening) ``--total-steps`` restarts the linear annealing at the resumed
    iteration: the step size goes back to ``--lr`` and reaches 0 at the new total
    (:func:`metagrad_rl.trainers.common.annealed_lr`).
    """
    if ckpt is None:
        return 0
    if int(ckpt["config"]["total_steps"]) == cfg.total_steps:
        return int(ckpt.get("lr_restart", 0))
    return int(ckpt["iteration"])


def begin(algo: str, cfg: Any, out: str | Path, resume: bool) -> dict[str, Any] | None:
    """Before any work: the checkpoint to resume (checked against ``cfg``) or ``None``; sets
    torch's threads and seed (so that the trainer's setup initialises networks the same way).

    With several workers rank 0 reads and checks the checkpoint and sends each worker its part
    (:meth:`~metagrad_rl.trainers.parallel.Parallel.scatter_checkpoint`)."""
    par = parallel.current()

    def load() -> dict[str, Any] | None:
        ckpt = load_checkpoint(resume_checkpoint(out)) if resume else None
        if ckpt is not None:
            if ckpt.get("algo", algo) != algo:
                raise ConfigError(
                    f"algo={algo!r} differs from the resumed run's {ckpt.get('algo')!r}"
                )
            check_resume_config(ckpt["config"], cfg)
            check_new_steps(ckpt, cfg, out)
            par.check_workers(ckpt, str(out))
        return ckpt

    ckpt = par.scatter_checkpoint(par.main_first(load))
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    par.same_memory_budget()
    return ckpt


@dataclass
class Run:
    """An open run directory: its algo, config, logger and the checkpoint being resumed."""

    algo: str
    cfg: Any
    path: Path
    logger: RunLogger | None
    """``None`` on the workers other than rank 0: only rank 0 writes files."""
    ckpt: dict[str, Any] | None
    lr_restart: int = 0
    """The iteration at which the learning-rate annealing (re)started (:func:`lr_restart_of`)."""
    par: parallel.Parallel = field(default_factory=parallel.Parallel)
    start: float = field(default_factory=time.perf_counter)
    """When this process opened the run (``wall_time`` adds the resumed checkpoint's)."""
    tensorboard: TensorBoard | None = None
    """The ``--tensorboard`` writer (rank 0 only), or ``None``."""

    @classmethod
    def open(cls, algo: str, cfg: Any, out: str | Path, ckpt: dict[str, Any] | None) -> Run:
        """Prepares ``out`` (after :func:`begin` and the trainer's setup), writes
        ``config.json`` and opens ``progress.csv`` (cut back to the checkpoint on resume);
        on rank 0 only when there are several workers."""
        par = parallel.current()
        step = int(ckpt["global_step"]) if ckpt is not None else None

        def open_dir() -> tuple[Path, RunLogger, TensorBoard | None]:
            path = prepare_run_dir(out, ckpt is not None)
            write_run_config(path, algo, C.to_dict(cfg))
            board = TensorBoard(path, step) if getattr(cfg, "tensorboard", False) else None
            return path, RunLogger(path, resume_step=step), board

        opened = par.main_first(open_dir)
        path, logger, board = opened if opened is not None else (Path(out), None, None)
        return cls(algo, cfg, path, logger, ckpt, lr_restart_of(ckpt, cfg), par, tensorboard=board)

    def keep_going(self, iteration: int, global_step: int, stop_at_step: int | None) -> bool:
        """``True`` while iterations remain and ``stop_at_step`` (an interruption) is not hit."""
        if stop_at_step is not None and global_step >= stop_at_step:
            return False
        return bool(iteration < self.cfg.num_iterations)

    def log(self, global_step: int, row: dict[str, Any], progress: Progress | None) -> None:
        """Appends one ``progress.csv`` row (with ``steps_per_sec``) and reports it (rank 0)."""
        if self.logger is None:
            return
        if self.par.num_workers > 1:  # steps summed over the workers
            row = {**row, "all_workers_step": global_step * self.par.num_workers}
        full = self.logger.log(global_step, self.cfg.batch_size, row)
        if self.tensorboard is not None:
            self.tensorboard.log(global_step, full)
        if progress is not None:
            progress(global_step, full)

    def checkpoint(self, payload: Mapping[str, Any]) -> None:
        """Writes ``checkpoint.pt`` atomically (algo and config are added); with several
        workers every worker calls it and rank 0 writes all workers' states."""
        meta = {"algo": self.algo, "config": C.to_dict(self.cfg), "wall_time_s": self.wall_time()}
        full = self.par.gather_checkpoint({**meta, **payload})
        if full is not None:
            save_checkpoint(self.path / CHECKPOINT_FILE, full)

    def wall_time(self) -> float:
        """Seconds of training so far: this process's, plus those the resumed checkpoint had
        counted (the time between a run's last checkpoint and its stop is not counted)."""
        before = float(self.ckpt.get("wall_time_s", 0.0)) if self.ckpt is not None else 0.0
        return before + time.perf_counter() - self.start

    def maybe_checkpoint(self, iteration: int, payload: Callable[[], Mapping[str, Any]]) -> None:
        """Checkpoints every ``checkpoint_every`` iterations (``payload`` is built only then)."""
        every = self.cfg.checkpoint_every
        if every and iteration % every == 0:
            self.checkpoint(payload())

    def finish(
        self,
        collector: Any,
        fields: Mapping[str, Any],
        global_step: int,
        iteration: int,
        recent: list[float],
    ) -> dict[str, Any]:
        """The run's summary; written to ``summary.json`` (atomically) only if it finished."""
        finished = iteration >= self.cfg.num_iterations
        summary = {
            "algo": self.algo,
            "env": self.cfg.env,
            "seed": self.cfg.seed,
            **fields,
            "global_step": global_step,
            "finished": finished,
            "mean_return_last_20_episodes": float(np.mean(recent)) if recent else None,
            "wall_time_s": self.wall_time(),
        }
        if self.par.num_workers > 1:
            summary["num_workers"] = self.par.num_workers
            summary["parallel"] = self.par.mode
        if finished and self.logger is not None:
            write_summary(self.path, summary)
        if self.tensorboard is not None:
            self.tensorboard.close()
        collector.envs.close()
        return summary
