"""``metagrad-rl train --nproc N [--parallel MODE]``: how many workers, run which way.

``--parallel rollout`` (the default with ``--nproc``, fastest on one machine: see
``docs/distributed.md``) keeps one learner process and spawns ``N - 1`` rollout workers
(:mod:`.rollout_workers`); ``--parallel allreduce`` starts ``N`` whole trainers here, as
``torchrun --standalone --nproc-per-node N`` would (:func:`launch_local`), which is also the mode
of a run under ``torchrun`` itself (several machines, or GPUs with NCCL).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from metagrad_rl.errors import ConfigError
from metagrad_rl.trainers.parallel import MODE_KEY, MODES, NUM_WORKERS_KEY

#: ``--parallel`` without a value and without a run to resume.
DEFAULT_MODE = "rollout"


def add_worker_flags(train: argparse.ArgumentParser) -> None:
    """``--nproc``, ``--parallel`` and ``--worker-timeout``."""
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="run N data-parallel workers on this machine, each its own envs and seed; "
        "--num-steps and --total-steps count one worker's steps (default: 1; with --resume, "
        "as many as the resumed run had)",
    )
    train.add_argument(
        "--parallel",
        choices=MODES,
        default=None,
        help="how the --nproc workers run: rollout (N processes sample, one learner updates "
        "on the union of their batches; the fastest on one machine) or allreduce (N trainers "
        "averaging every minibatch gradient, what `torchrun --nproc-per-node N -m metagrad_rl "
        "train ...` starts; for several machines or GPUs). The same numbers either way "
        "(default: rollout; with --resume, the resumed run's)",
    )
    train.add_argument(
        "--worker-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="with several workers: seconds to wait for a worker that died or hangs before "
        "stopping with one error line (default: %(default)s)",
    )


def workers_of(args: argparse.Namespace) -> tuple[int, str]:
    """``(N, mode)`` of ``train``'s flags: given, else the resumed run's, else ``(1, rollout)``;
    a one-line :class:`ConfigError` for values that cannot run."""
    torchrun = "WORLD_SIZE" in os.environ
    nproc, mode = args.nproc, getattr(args, "parallel", None)
    if args.resume and not torchrun and (nproc is None or mode is None):
        saved_n, saved_mode = resumed_workers(args.out)
        nproc = saved_n if nproc is None else nproc
        mode = saved_mode if mode is None else mode
    nproc = 1 if nproc is None else nproc
    if nproc < 1:
        raise ConfigError(f"--nproc={nproc} is invalid: expected a positive int")
    if not args.worker_timeout > 0:
        raise ConfigError(f"--worker-timeout={args.worker_timeout} is invalid: expected > 0")
    if torchrun:
        if nproc > 1:
            raise ConfigError(
                f"--nproc={nproc} starts workers itself: under torchrun (WORLD_SIZE is set) "
                "leave it out and give torchrun --nproc-per-node instead"
            )
        if mode == "rollout":
            raise ConfigError(
                "--parallel rollout runs in one process: under torchrun (WORLD_SIZE is set) "
                "the workers all-reduce (leave --parallel out, or give --parallel allreduce)"
            )
        return 1, "allreduce"
    return nproc, mode or DEFAULT_MODE


def resumed_workers(out: str) -> tuple[int | None, str | None]:
    """How many workers wrote the checkpoint ``--resume`` continues, and in which mode
    (``None`` when there is none yet: the resume then fails with its own one-line error)."""
    from metagrad_rl.checkpoint import load_checkpoint
    from metagrad_rl.rundir import resume_checkpoint

    try:
        path = resume_checkpoint(out)
    except ConfigError:
        return None, None
    ckpt = load_checkpoint(path)
    n = int(ckpt.get(NUM_WORKERS_KEY, 1))
    return n, str(ckpt.get(MODE_KEY, "allreduce")) if n > 1 else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def launch_local(nproc: int, argv: Sequence[str], timeout_s: float) -> int:
    """Runs ``python -m metagrad_rl <argv>`` as ``nproc`` workers on this machine.

    What ``torchrun --standalone --nproc-per-node N`` would start: each worker gets torchrun's
    variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, and
    ``MASTER_ADDR=127.0.0.1`` with a free ``MASTER_PORT``; gloo on the loopback interface).
    Workers print their own (one-line) errors. Once one worker fails, the others have
    ``timeout_s`` + 30 s to stop (they fail at their next collective) before they are killed.
    Returns the first failing worker's exit code, or 0.
    """
    import signal
    import subprocess
    import sys
    import time

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)

    port = _free_port()
    cmd = [sys.executable, "-m", "metagrad_rl", *argv]
    procs = []
    for r in range(nproc):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
        }
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs.append(subprocess.Popen(cmd, env=env))
    code, deadline = 0, None
    try:
        while any(p.poll() is None for p in procs):
            for p in procs:
                rc = p.poll()
                if rc is not None and rc != 0 and code == 0:
                    code, deadline = rc, time.monotonic() + timeout_s + 30.0
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.05)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the workers (files stay whole)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        code, deadline = 130, time.monotonic() + 10.0
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if code == 0:
        code = next((p.returncode for p in procs if p.returncode), 0)
    return 128 - code if code < 0 else code  # a signal -N as the shell reports it: 128 + N
