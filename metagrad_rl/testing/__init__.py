"""Exactly solvable test beds for the meta-gradient engine and its estimators.

:mod:`metagrad_rl.testing.tabular` is a tiny tabular MDP in which every expectation over sampled
batches is a finite sum, so the true meta-gradient and each estimator's expectation and variance
are computed exactly by enumeration (no Monte Carlo noise). See ``docs/estimators.md``.
"""

from metagrad_rl.testing import tabular
from metagrad_rl.testing.tabular import *  # noqa: F403 - the test beds, re-exported

__all__ = ["tabular", *tabular.__all__]
