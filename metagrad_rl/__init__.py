"""metagrad_rl: exact higher-order meta-gradients for learning intrinsic rewards.

See README.md and docs/equations.md for the map from the paper's equations to functions.
"""

from metagrad_rl.errors import ConfigError
from metagrad_rl.networks import (
    ConditionalLayerNorm,
    Critic,
    GaussianPolicy,
    IntrinsicReward,
    cln_condition,
    intrinsic_reward,
    policy_log_prob,
)

__version__ = "0.1.0"

__all__ = [
    "ConditionalLayerNorm",
    "ConfigError",
    "Critic",
    "GaussianPolicy",
    "IntrinsicReward",
    "cln_condition",
    "intrinsic_reward",
    "policy_log_prob",
]
