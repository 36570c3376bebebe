"""Cache strategies. Importing this package registers every built-in strategy."""

from dkvcache.caches import (
    dkv,  # noqa: F401  (registers decoded, prefill, pd, greedy)
    prefix,  # noqa: F401  (registers prefix, dual)
)
from dkvcache.caches.base import (
    CacheStrategy,
    StepPlan,
    available_strategies,
    default_block_lengths,
    get_strategy,
    register_strategy,
)

__all__ = ["CacheStrategy", "StepPlan", "available_strategies", "default_block_lengths", "get_strategy",
           "register_strategy"]
