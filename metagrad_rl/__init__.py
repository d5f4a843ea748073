"""metagrad_rl: exact higher-order meta-gradients for learning intrinsic rewards.

The bilevel problem in file order: networks (CLN policy, intrinsic reward, critics) ->
rollout and advantages -> PPO losses -> inner unroll -> meta-gradient terms and estimators ->
trainers -> CLI. ``docs/equations.md`` maps every equation of the paper to its function.
"""

from metagrad_rl.distributed import all_reduce_sum, average_across_workers
from metagrad_rl.errors import ConfigError, DivergenceError
from metagrad_rl.explicit import (
    explicit_sgd_terms,
    mixed_second_order_product,
)
from metagrad_rl.jacobian import SpectralNorm, round_spectral_norm, spectral_norm
from metagrad_rl.memory import MemoryBudgetError, check_unroll_memory
from metagrad_rl.meta_problem import (
    EtaPaths,
    InnerSurrogate,
    MetaProblem,
    Round,
    minibatch_indices,
)
from metagrad_rl.metagrad import (
    MetaGradResult,
    PendingMetaGradient,
    eq17_gradient,
    meta_gradient,
    start_meta_gradient,
)
from metagrad_rl.networks import (
    ConditionalLayerNorm,
    Critic,
    GaussianPolicy,
    IntrinsicReward,
    cln_condition,
    intrinsic_reward,
    policy_log_prob,
)
from metagrad_rl.optim import clip_grad_norm, graph_cuts
from metagrad_rl.options import MetaGradOptions
from metagrad_rl.problems import ppo_meta_problem
from metagrad_rl.score_function import magic_box, score_function_term
from metagrad_rl.unroll import meta_objective, unroll
from metagrad_rl.verify import VerificationReport, verify_meta_gradient

__version__ = "0.1.0"

__all__ = [
    "ConditionalLayerNorm",
    "ConfigError",
    "DivergenceError",
    "Critic",
    "EtaPaths",
    "GaussianPolicy",
    "InnerSurrogate",
    "IntrinsicReward",
    "MemoryBudgetError",
    "MetaGradOptions",
    "MetaGradResult",
    "MetaProblem",
    "PendingMetaGradient",
    "Round",
    "SpectralNorm",
    "VerificationReport",
    "all_reduce_sum",
    "average_across_workers",
    "check_unroll_memory",
    "clip_grad_norm",
    "cln_condition",
    "eq17_gradient",
    "explicit_sgd_terms",
    "graph_cuts",
    "intrinsic_reward",
    "magic_box",
    "meta_gradient",
    "meta_objective",
    "minibatch_indices",
    "mixed_second_order_product",
    "policy_log_prob",
    "ppo_meta_problem",
    "round_spectral_norm",
    "score_function_term",
    "spectral_norm",
    "start_meta_gradient",
    "unroll",
    "verify_meta_gradient",
]
