"""Cache strategies. Importing this package registers every built-in strategy."""

from dkvcache.caches import (  # noqa: F401  (importing registers them)
    d2,  # d2, d2cache
    dkv,  # decoded, prefill, pd, greedy
    dllm,  # dllm
    prefix,  # prefix, dual
)
from dkvcache.caches.base import (
    CacheStrategy,
    StepPlan,
    available_strategies,
    default_block_lengths,
    get_strategy,
    register_strategy,
    switches,
)

__all__ = ["CacheStrategy", "StepPlan", "available_strategies", "default_block_lengths", "get_strategy",
           "register_strategy", "switches"]
