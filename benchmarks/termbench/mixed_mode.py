"""Section ``mixed-mode``: forward-over-reverse against reverse-over-reverse in the segments.

On the trainer's own stored Hopper-v5 CLN rounds (as section ``horizon``: 320 clipped-Adam
steps per round, 73k policy parameters, float32, one thread), the full Eq 11-14 split through
the last R = 1 and R = 3 rounds by the checkpointed reverse pass (``checkpoint_every="auto"``)
with the Hessian products of each recomputed step taken two ways, side by side in one run:

- ``reverse`` (``second_order="reverse"``, the default): the segment re-run with
  ``create_graph=True``, one ``torch.autograd.grad`` through it (reverse-over-reverse);
- ``forward`` (``second_order="forward"``): each step pulled back through the optimizer first
  order and through the gradient by ``torch.func.jvp`` of the joint inner gradient
  (forward-over-reverse, as MixFlow-MG; :mod:`metagrad_rl.mixed_mode`).

Each computation runs in a fresh subprocess (peak RSS above its baseline after a warm-up),
``reps`` times, the two modes interleaved; medians are reported with their ratio, the largest
relative difference of any term between the modes, and the machine's load average.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from metagrad_rl.pytree import TERMS, flatten
from termbench.common import Row, markdown
from termbench.horizon import Stored, record_rounds, run_probe

ROUNDS = (1, 3)
MODES = ("checkpointed", "forward")  # probe modes of horizon.MODE_KW: reverse, forward
LABEL = {"checkpointed": "reverse", "forward": "forward"}


def _rounds_file(out: Path, seed: int, window: int, progress: bool) -> Path:
    """The stored rounds: a file of :func:`~termbench.horizon.record_rounds` already in
    ``out`` (e.g. copied from the horizon section's output), else a fresh CLN run."""
    found = sorted(out.glob("rounds_meta*.pt"))
    if found:
        return found[-1]
    (path,) = record_rounds(out, seed=seed, window=window, progress=progress)
    return path


def _max_rel_diff(a: dict, b: dict) -> float:
    rels = [
        float((flatten(a[n]) - flatten(b[n])).norm()) / float(flatten(a[n]).norm())
        for n in ("total", *TERMS)
        if float(flatten(a[n]).norm()) > 0
    ]
    return max(rels)


def run_mixed_mode(
    out: Path,
    *,
    seed: int = 1,
    rounds: Sequence[int] = ROUNDS,
    reps: int = 3,
    progress: bool = True,
) -> tuple[list[Row], dict]:
    """Reverse against forward second-order products, side by side (module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    path = _rounds_file(out, seed, max(rounds), progress)
    stored = Stored(path)
    rows: list[Row] = []
    load = {"before": os.getloadavg()}
    for r in tqdm(rounds, desc="mixed-mode: R", disable=not progress):
        got: dict[str, list[Row]] = {m: [] for m in MODES}
        for _ in range(reps):
            for m in MODES:
                got[m].append(run_probe(path, r, m, out))
        steps = sum(len(x.minibatches) for x in stored.last(r)[2])
        row: Row = {"R": r, "inner_steps": steps, "reps": reps}
        for m in MODES:
            name = LABEL[m]
            row[f"{name}_s"] = statistics.median(p["wall_s"] for p in got[m])
            row[f"{name}_mib"] = statistics.median(
                p["rss_peak_delta_bytes"] / 2**20 for p in got[m]
            )
            row[f"{name}_s_all"] = [p["wall_s"] for p in got[m]]
        row["time_ratio_forward_over_reverse"] = row["forward_s"] / row["reverse_s"]
        row["memory_ratio_forward_over_reverse"] = row["forward_mib"] / row["reverse_mib"]
        row["max_rel_diff"] = _max_rel_diff(
            got["checkpointed"][0]["result"], got["forward"][0]["result"]
        )
        row["norm_total"] = float(flatten(got["checkpointed"][0]["result"]["total"]).norm())
        row["loadavg_1min"] = os.getloadavg()[0]
        rows.append(row)
    load["after"] = os.getloadavg()
    meta = {
        "env": "Hopper-v5",
        "seed": seed,
        "rounds_file": path.name,
        "checkpoint_every": "auto",
        "threads": 1,
        "cpu_count": os.cpu_count(),
        "loadavg": load,
    }
    return rows, meta


def mixed_mode_table(rows: Sequence[Row], meta: dict) -> str:
    header = ["R", "inner steps", "reverse s", "forward s", "time forward / reverse",
              "reverse MiB", "forward MiB", "max rel diff", "load (1 min)"]  # fmt: skip
    body = [
        [r["R"], r["inner_steps"], r["reverse_s"], r["forward_s"],
         r["time_ratio_forward_over_reverse"], r["reverse_mib"], r["forward_mib"],
         f"{r['max_rel_diff']:.1e}", f"{r['loadavg_1min']:.1f}"]
        for r in rows
    ]  # fmt: skip
    load = meta["loadavg"]
    return (
        "Checkpointed reverse pass (k = auto), Hessian products reverse-over-reverse against "
        f"forward-over-reverse; medians of {rows[0]['reps'] if rows else 0} interleaved runs, "
        "peak RSS above the baseline of a fresh subprocess:\n"
        + markdown(body, header)
        + f"\n\nload average (1, 5, 15 min) before {tuple(round(x, 1) for x in load['before'])}, "
        f"after {tuple(round(x, 1) for x in load['after'])} on {meta['cpu_count']} cores"
    )
