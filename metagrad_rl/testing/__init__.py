"""Exactly solvable test beds for the meta-gradient engine and its estimators.

:mod:`metagrad_rl.testing.tabular` is a tiny tabular MDP in which every expectation over sampled
batches is a finite sum, so the true meta-gradient and each estimator's expectation and variance
are computed exactly by enumeration (no Monte Carlo noise). See ``docs/estimators.md``.
"""

from metagrad_rl.testing.tabular import (
    ESTIMATORS,
    Batches,
    EstimatorDraws,
    Moments,
    TabularConfig,
    TabularMDP,
    TabularProblem,
    bias_variance_table,
    enumerate_batches,
    estimator_draws,
    exact_moments,
    extrinsic_return,
    extrinsic_return_by_enumeration,
    inner_round,
    make_mdp,
    make_problem,
    meta_objective,
    monte_carlo_moments,
    policy_log_probs,
    relative_bias,
    sample_batches,
    true_meta_gradient,
    unroll,
)

__all__ = [
    "ESTIMATORS",
    "Batches",
    "EstimatorDraws",
    "Moments",
    "TabularConfig",
    "TabularMDP",
    "TabularProblem",
    "bias_variance_table",
    "enumerate_batches",
    "estimator_draws",
    "exact_moments",
    "extrinsic_return",
    "extrinsic_return_by_enumeration",
    "inner_round",
    "make_mdp",
    "make_problem",
    "meta_objective",
    "monte_carlo_moments",
    "policy_log_probs",
    "relative_bias",
    "sample_batches",
    "true_meta_gradient",
    "unroll",
]
