"""How accurate, how expensive and how useful is each meta-gradient term?

Four sections, each printing a table and writing ``<section>.csv``/``<section>.json`` (raw
numbers) and PNG plots under ``--out``:

``accuracy``
    Trains a CLN agent on Hopper-v5 and, at several meta-steps, recomputes every term of the
    meta-gradient exactly on the batches the trainer stored (the policy round ``tau_k`` with its
    minibatch order and optimizer state, the validation batch ``tau_{k+1}``): Eq 11-14, the
    total, Eq 17, and how well the cheap estimators (Eq 17 alone, LIRPG = Eq 13 alone, the
    three-term Eq 17 + 12 + 13; each also through the trainer's one-step look-ahead) point
    along the exact total. With ``R = 2`` rounds (the two last stored rounds) Eq 14 is non-zero.
``cost``
    Hopper-v5-sized networks (obs 11, act 3, 64-64 CLN policy, 64-64 reward net with an
    8-wide bottleneck, float32, batch 2048, 10 epochs x 32 minibatches), one torch thread:
    wall time (repetitions interleaved, medians) and peak memory (each estimator in a fresh
    subprocess) of a plain PPO round, Eq 17, the exact total, the four-term split, the explicit
    ``torch.func`` SGD recursion and the Eq 12 product, against the issue's targets; and how the
    exact total grows with the unrolled steps and rounds.
``learning``
    Learning curves (Figures 4, 5 and 6 of the paper) and final returns from run directories of
    ``benchmarks/learning_runs.sh``; without them, a tiny set of runs of its own.
``bias``
    Bias and variance of the plain, sampling-aware and DiCE estimators on the exact tabular
    test bed, and, on Hopper-v5, the variance of the sampling-aware estimator against the plain
    one over independent rollouts from one fixed training state.

One module per section in ``benchmarks/termbench/`` (``accuracy``, ``cost``, ``learning``,
``bias``), with the shared output helpers (``common``) and plotting (``plots``); this file is the
command line and re-exports the functions the tests use.

Usage::

    .venv/bin/python benchmarks/compare_terms.py                       # small default (minutes)
    .venv/bin/python benchmarks/compare_terms.py --full                # the long version
    .venv/bin/python benchmarks/compare_terms.py --sections cost --out bench_out/cost
"""

from __future__ import annotations

import sys

from termbench.accuracy import (
    ESTIMATORS,
    accuracy_tables,
    checkpoint_indices,
    plot_accuracy,
    run_accuracy,
    terms_at,
)
from termbench.bias import (
    mujoco_draws,
    mujoco_table,
    run_tabular,
    tabular_table,
    variance_rows,
)
from termbench.common import (
    FULL,
    SECTIONS,
    SMALL,
    Budget,
    Row,
    cos,
    env_dims,
    fmt,
    markdown,
    nets_for,
    write_rows,
)
from termbench.cost import (
    CostSetup,
    cost_tables,
    cost_targets,
    plot_cost,
    probe,
    probe_main,
    run_cost,
    target,
)
from termbench.learning import (
    curve_end,
    learning_table,
    learning_tables,
    plot_groups,
    run_groups,
    run_learning,
    tiny_runs,
)
from termbench.main import main
from termbench.plots import pyplot, save_png

__all__ = [
    "ESTIMATORS",
    "FULL",
    "SECTIONS",
    "SMALL",
    "Budget",
    "CostSetup",
    "Row",
    "accuracy_tables",
    "checkpoint_indices",
    "cos",
    "cost_tables",
    "cost_targets",
    "curve_end",
    "env_dims",
    "fmt",
    "learning_table",
    "learning_tables",
    "main",
    "markdown",
    "mujoco_draws",
    "mujoco_table",
    "nets_for",
    "plot_accuracy",
    "plot_cost",
    "plot_groups",
    "probe",
    "probe_main",
    "pyplot",
    "run_accuracy",
    "run_cost",
    "run_groups",
    "run_learning",
    "run_tabular",
    "save_png",
    "tabular_table",
    "target",
    "terms_at",
    "tiny_runs",
    "variance_rows",
    "write_rows",
]

if __name__ == "__main__":
    sys.exit(main())
