"""dkvcache: fast inference for diffusion language models (Dream, LLaDA) with exact, batched caches.

The model classes live in the top-level ``models`` package (drop-in replacements for the Hub code); they are
re-exported here lazily so that ``models`` and ``dkvcache`` never import each other in a cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DreamModel": "models.modeling_dream",
    "DreamConfig": "models.configuration_dream",
    "LLaDAModelLM": "models.modeling_llada",
    "LLaDAConfig": "models.configuration_llada",
    "generate": "dkvcache.llada_api",
    "generate_with_prefix_cache": "dkvcache.fast_dllm",
    "generate_with_dual_cache": "dkvcache.fast_dllm",
    "GenerationOptions": "dkvcache.options",
    "DiffusionOutput": "dkvcache.generation",
    "register_strategy": "dkvcache.caches",
    "available_strategies": "dkvcache.caches",
    "CacheStrategy": "dkvcache.caches",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dkvcache' has no attribute {name!r}")
