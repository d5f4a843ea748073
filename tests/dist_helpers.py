"""Start a test's worker function in ``N`` spawned processes on gloo, loopback only, bounded.

``run_workers(fn, n, tmp_path, *args)`` runs ``fn(rank, n, init_method, *args)`` in ``n``
processes (``spawn``: nothing is inherited but ``sys.path`` and the environment), with a
``file://`` rendezvous in ``tmp_path`` (or torchrun's variables on 127.0.0.1) and gloo bound to
the loopback interface. Each process's
return value comes back through ``torch.save``; an exception comes back as its traceback and
fails the test; a process still running at the deadline is killed and fails the test too, so a
test never hangs.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from metagrad_rl.distributed import init_workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn: Callable[..., Any], rank: int, n: int, init: str, out: str, args: tuple) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    if init.startswith("env://"):  # what torchrun sets
        port = init.removeprefix("env://")
        init = "env://"
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(n),
        )
    torch.set_num_threads(1)
    try:
        result = fn(rank, n, init, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def workers(rank: int, n: int, init: str, timeout_s: float = 30.0, name: str = ""):
    """:func:`init_workers` on the test's rendezvous file (``name``: another file beside it)."""
    if name:
        init = f"{init}-{name}"
    return init_workers(init_method=init, rank=rank, world_size=n, timeout_s=timeout_s)


def run_workers(
    fn: Callable[..., Any],
    n: int,
    tmp_path: Path,
    *args: Any,
    timeout_s: float = 60.0,
    ranks: Sequence[int] | None = None,
    results_from: Sequence[int] | None = None,
    rendezvous: str = "file",
) -> list[Any]:
    """``[fn(r, n, init, *args) for r in results_from]``, each rank in its own process.

    ``ranks`` are the ranks started (default: all ``n``); ``results_from`` those that must
    return a result (default: all started) -- the others may die, as a fault test needs.
    ``rendezvous="env"`` sets torchrun's variables (``MASTER_ADDR=127.0.0.1``, a free
    ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and passes ``init="env://"``.
    """
    ranks = list(range(n)) if ranks is None else list(ranks)
    wanted = ranks if results_from is None else list(results_from)
    out = Path(tmp_path) / "results"
    out.mkdir(parents=True, exist_ok=True)
    if rendezvous == "env":
        init = f"env://{_free_port()}"
    else:
        init = f"file://{Path(tmp_path) / 'rendezvous'}"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_entry, args=(fn, r, n, init, str(out), args), daemon=True)
        for r in ranks
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in zip(ranks, procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    errors = [
        f"rank {r}:\n{(out / f'rank{r}.err').read_text()}"
        for r in wanted
        if (out / f"rank{r}.err").exists()
    ]
    if any(r in wanted for r in hung):
        errors.append(f"ranks {hung} still running after {timeout_s} s: killed")
    for r, p in zip(ranks, procs):
        if r in wanted and not (out / f"rank{r}.pt").exists() and p.exitcode != 1:
            errors.append(f"rank {r} exited with code {p.exitcode} and no result")
    if errors:
        raise AssertionError("worker processes failed:\n" + "\n".join(errors))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in wanted]
