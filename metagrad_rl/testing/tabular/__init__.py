"""A tabular MDP in which the meta-gradient and every estimator's moments are exact.

The bilevel problem of the paper (Section 3.2, Eq 6-14) in miniature, in float64:

- a tabular MDP (``S`` states, ``A`` actions, horizon ``H``), fixed initial distribution ``p0``,
  transitions ``P[s, a, s']`` and extrinsic reward ``r_ex[s, a]``, all drawn from a seed;
- ``eta`` is the intrinsic-reward table, ``r_in[s, a] = eta[s, a]``; the inner loop learns from
  ``r_mix = r_ex_coef r_ex + r_in_coef r_in``;
- a softmax policy with a CLN-like conditioning on ``eta`` (Eq 20-22 in spirit),

  .. math:: \\mathrm{logits}_{\\theta,\\eta}(s) = g_s(\\eta)\\,\\theta[s] + b_s(\\eta), \\quad
            g(\\eta) = 1 + c \\tanh(G\\,\\mathrm{vec}\\,\\eta), \\quad
            b(\\eta) = c\\, B\\,\\mathrm{vec}\\,\\eta

  with fixed random maps ``G``, ``B``; ``conditioned=False`` gives ``logits = theta`` exactly;
- ``K`` inner rounds (:func:`inner_round`): round ``k`` learns from a batch ``tau_k`` of ``B``
  trajectories drawn from ``pi_{theta_k, eta}`` with ``inner_steps`` gradient steps of the
  (unclipped or clipped) PPO surrogate with reward-to-go advantages of ``r_mix`` (Eq 7; one step
  is exactly the policy gradient). The sampling distribution is a stop-gradient *for theta*,
  but ``theta_{k+1}(tau, eta)`` follows ``eta`` through the conditioning, the advantages, the
  ratio's denominator ``pi_{theta_k(eta), eta}`` and ``theta_k(eta)``.

With ``N = (S A)^H`` trajectories there are ``N^(B K)`` batch sequences; :func:`enumerate_batches`
lists them all, so ``M(eta) = E[J_ex(theta_K(tau, eta), eta)]`` (:func:`meta_objective`) is a
finite sum whose weights are differentiable in ``eta``, and its autograd is the *true*
meta-gradient (:func:`true_meta_gradient`). Every estimator of :mod:`metagrad_rl.score_function` is
evaluated per draw (:func:`estimator_draws`); weighting the draws by their (detached)
probabilities gives its exact mean and covariance (:func:`exact_moments`), and
:func:`monte_carlo_moments` samples instead. Tensors carry one leading *draw* dimension ``D``.
"""

from metagrad_rl.testing.tabular.mdp import (
    DTYPE,
    TabularConfig,
    TabularMDP,
    TabularProblem,
    Trajectories,
    enumerate_trajectories,
    extrinsic_return,
    extrinsic_return_by_enumeration,
    make_mdp,
    make_problem,
    mixed_reward,
    policy_log_probs,
)
from metagrad_rl.testing.tabular.moments import (
    DEFAULT_ROWS,
    ESTIMATORS,
    NAMED_BASELINES,
    Baseline,
    EstimatorDraws,
    Moments,
    bias_variance_table,
    estimator_draws,
    exact_moments,
    monte_carlo_moments,
    relative_bias,
)
from metagrad_rl.testing.tabular.rounds import (
    Batches,
    RoundResult,
    Unrolled,
    enumerate_batches,
    inner_round,
    meta_objective,
    reward_to_go,
    sample_batches,
    true_meta_gradient,
    unroll,
)

__all__ = [
    "DEFAULT_ROWS",
    "DTYPE",
    "ESTIMATORS",
    "NAMED_BASELINES",
    "Baseline",
    "Batches",
    "EstimatorDraws",
    "Moments",
    "RoundResult",
    "TabularConfig",
    "TabularMDP",
    "TabularProblem",
    "Trajectories",
    "Unrolled",
    "bias_variance_table",
    "enumerate_batches",
    "enumerate_trajectories",
    "estimator_draws",
    "exact_moments",
    "extrinsic_return",
    "extrinsic_return_by_enumeration",
    "inner_round",
    "make_mdp",
    "make_problem",
    "meta_objective",
    "mixed_reward",
    "monte_carlo_moments",
    "policy_log_probs",
    "relative_bias",
    "reward_to_go",
    "sample_batches",
    "true_meta_gradient",
    "unroll",
]
