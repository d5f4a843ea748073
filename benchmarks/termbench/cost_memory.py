"""Peak memory, as the ``cost`` section measures it: each computation in a fresh process.

:func:`probe` re-enters ``compare_terms.py --probe NAME`` in a subprocess, where
:func:`probe_main` sets the problem up, runs the one computation and reports its peak resident
memory above the post-setup baseline (:func:`peak_rss_bytes`) and, for the engine's
computations, the bytes its autograd graph saved.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

from termbench.common import ENTRY_POINT, Row
from termbench.cost_setup import CostSetup, estimator_fns


def peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` (Linux), else ``ru_maxrss``.

    ``ru_maxrss`` of a process started by a large parent starts at the parent's RSS (Linux keeps
    it across fork and exec), which hides the child's own peak; ``VmHWM`` belongs to the
    process's own address space.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe_main(name: str, steps: int | None, rounds: int, seed: int, explicit_steps: int) -> Row:
    """Runs in a subprocess: peak RSS of one computation above the post-setup baseline."""
    torch.set_num_threads(1)
    s = CostSetup(seed, steps, rounds)
    fns = estimator_fns(s, explicit_steps)
    base = peak_rss_bytes()
    base_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    fns[name]()
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    peak_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row: Row = {
        "name": name,
        "steps": steps,
        "rounds": rounds,
        "rss_base_bytes": base,
        "rss_peak_delta_bytes": peak - base,
        "ru_maxrss_delta_bytes": peak_ru - base_ru,
        "wall_s_probe": wall,
    }
    if name in ("exact_total", "four_terms"):
        res = getattr(s, name)(measure_memory=True)
        row["graph_bytes"] = res.diagnostics["graph_bytes"]
    return row


def probe(name: str, steps: int | None, rounds: int, seed: int, explicit_steps: int) -> Row:
    cmd = [
        sys.executable,
        str(ENTRY_POINT),
        "--probe",
        name,
        "--seed",
        str(seed),
        "--probe-rounds",
        str(rounds),
        "--probe-explicit-steps",
        str(explicit_steps),
    ]
    if steps is not None:
        cmd += ["--probe-steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"memory probe {name} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
