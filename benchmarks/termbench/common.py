"""Shared pieces of the compare_terms benchmark: sections, budgets, table and file output."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metagrad_rl.checkpoint import atomic_write_bytes, atomic_write_json
from metagrad_rl.envs import make_env
from metagrad_rl.networks import (
    GaussianPolicy,
    IntrinsicReward,
)
from metagrad_rl.pytree import cosine as cos  # noqa: F401  (re-exported)
from metagrad_rl.trainers import bilevel
from metagrad_rl.trainers.meta_grads import META_GRADS, get

#: The benchmarks folder, and the command line every section's subprocess re-enters.
BENCHMARKS = Path(__file__).resolve().parents[1]
ENTRY_POINT = BENCHMARKS / "compare_terms.py"
SECTIONS = ("accuracy", "cost", "learning", "bias")
#: Sections run only when named in ``--sections`` (longer than the default's 5-minute budget).
OPT_IN_SECTIONS = ("accuracy-cost", "horizon", "horizon-science", "mixed-mode")
GIB = 1024**3
Row = dict[str, Any]


# =================================================================================================
# Budgets: the small default and --full
# =================================================================================================
@dataclass(frozen=True)
class Budget:
    """How much of each section to run."""

    acc_steps: int
    """Environment steps of the CLN run whose stored batches the accuracy section re-uses."""
    acc_checkpoints: int
    """Meta-steps at which every term is recomputed (spread evenly over the run)."""
    cost_reps: int
    """Interleaved repetitions of each timed computation (medians are reported)."""
    explicit_steps: int
    """Inner steps of the explicit torch.func SGD recursion (and the engine on SGD beside it)."""
    scaling: tuple[tuple[int, int], ...]
    """(inner steps per round, rounds) of the exact total's growth curve."""
    learn_steps: int
    """Steps of each tiny learning run (used when no learning_runs.sh runs exist)."""
    learn_seeds: tuple[int, ...]
    learn_meta_grads: tuple[str, ...]
    """``--meta-grad`` entries of the tiny learning runs (checked against the registry)."""
    mujoco_draws: int
    """Independent (tau_k, tau_k+1) draws of the MuJoCo variance experiment."""
    tabular_batch_sizes: tuple[int, ...]


def registered(*names: str) -> tuple[str, ...]:
    """``names`` of the ``--meta-grad`` registry, in its order (an unknown name is an error)."""
    for name in names:
        get(name)
    return tuple(n for n in META_GRADS if n in names)


SMALL = Budget(
    acc_steps=20_480,
    acc_checkpoints=3,
    cost_reps=5,
    explicit_steps=8,
    scaling=((1, 1), (10, 1), (40, 1), (160, 1), (320, 1), (320, 2), (320, 3)),
    learn_steps=6_144,
    learn_seeds=(1, 2),
    learn_meta_grads=registered("eq17", "lirpg", "three-term", "exact"),
    mujoco_draws=8,
    tabular_batch_sizes=(1, 2, 4),
)
FULL = Budget(
    acc_steps=100_352,
    acc_checkpoints=8,
    cost_reps=11,
    explicit_steps=32,
    scaling=((1, 1), (10, 1), (40, 1), (160, 1), (320, 1), (320, 2), (320, 3)),
    learn_steps=6_144,
    learn_seeds=(1, 2, 3),
    learn_meta_grads=registered("eq17", "lirpg", "three-term", "exact", "sampling-aware"),
    mujoco_draws=32,
    tabular_batch_sizes=(1, 2, 4, 8),
)


# =================================================================================================
# Output helpers
# =================================================================================================
def write_rows(out: Path, name: str, rows: Sequence[Row], extra: Mapping[str, Any] | None = None):
    """``name.csv`` (a line per row) and ``name.json`` (``{"rows": ..., **extra}``), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / f"{name}.csv", buf.getvalue().encode())
    atomic_write_json(out / f"{name}.json", {"rows": list(rows), **(extra or {})})
    return out / f"{name}.csv", out / f"{name}.json"


def fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def markdown(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def env_dims(env_id: str) -> tuple[int, int]:
    env = make_env(env_id)
    try:
        return int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
    finally:
        env.close()


def nets_for(cfg: bilevel.BilevelConfig, obs_dim: int, act_dim: int):
    """Fresh modules with the trainer's architecture (the engine only needs their layout)."""
    reward = IntrinsicReward(obs_dim, act_dim, cfg.reward_hidden, cfg.bottleneck)
    policy = GaussianPolicy(
        obs_dim, act_dim, cfg.hidden, conditioning=cfg.conditioning, cond_dim=reward.condition_dim
    )
    return policy, reward
