"""Log-partition estimators for RBMs at a compute budget counted in energy evaluations.

Importance sampling and bridge sampling with a tractable proposal (a NADE distilled from the
RBM), the block-Gibbs AIS baseline, and exact enumeration for small models (METHODS.md 5.8).
"""

from kdtfp.estimators.ais import annealed_importance_sampling, base_rate_bias, temperature_schedule
from kdtfp.estimators.partition import (
    LogZEstimate,
    bridge_sampling,
    exact_enumeration,
    importance_sampling,
)

__all__ = [
    "LogZEstimate",
    "annealed_importance_sampling",
    "base_rate_bias",
    "bridge_sampling",
    "exact_enumeration",
    "importance_sampling",
    "temperature_schedule",
]
