"""Fast-dLLM's LLaDA functions with its signatures and ``(x, nfe)`` results, as thin wrappers over the one loop.

``from dkvcache.fast_dllm import generate, generate_with_prefix_cache, generate_with_dual_cache`` replaces
``from generate import …`` in Fast-dLLM's llada scripts. With ``threshold`` or ``factor`` the rule alone decides
(``steps`` plays no part, a block runs until it has no MASK), so tokens and ``nfe`` equal the original's for any
``steps`` (tests/test_parity_fastdllm.py). ``dkvcache.generate`` is ML-GSAI/LLaDA's ``generate`` (returns ``x``).
"""

from __future__ import annotations

from typing import Any

import torch

from dkvcache.generation import generate as _generate


def _run(cache_type: str, model: Any, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int,
         temperature: float, remasking: str, mask_id: int | None, threshold: float | None, factor: float | None,
         **kwargs: Any) -> tuple[torch.Tensor, int]:
    cache = {"use_cache": False} if cache_type == "none" else {"use_cache": True, "cache_type": cache_type}
    out = _generate(model, prompt, steps=steps, gen_length=gen_length, block_length=block_length,
                    temperature=temperature, remasking=remasking, mask_token_id=mask_id, threshold=threshold,
                    factor=factor, return_dict_in_generate=True, **cache, **kwargs)
    return out.sequences, out.stats["forwards"]


@torch.no_grad()
def generate(model: Any, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128, block_length: int = 128,
             temperature: float = 0.0, remasking: str = "low_confidence", mask_id: int | None = None,
             threshold: float | None = None, factor: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's ``generate`` (no cache, optional parallel decoding): returns ``(x, nfe)``."""
    return _run("none", model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id, threshold,
                factor, **kwargs)


@torch.no_grad()
def generate_with_prefix_cache(model: Any, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
                               block_length: int = 128, temperature: float = 0.0, remasking: str = "low_confidence",
                               mask_id: int | None = None, threshold: float | None = None,
                               factor: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's ``generate_with_prefix_cache``: returns ``(x, nfe)``. Any batch size; ``attention_mask=`` works."""
    return _run("prefix", model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                threshold, factor, **kwargs)


@torch.no_grad()
def generate_with_dual_cache(model: Any, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
                             block_length: int = 128, temperature: float = 0.0, remasking: str = "low_confidence",
                             mask_id: int | None = None, threshold: float | None = None,
                             factor: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's ``generate_with_dual_cache``: returns ``(x, nfe)``. Any batch size; ``attention_mask=`` works."""
    return _run("dual", model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                threshold, factor, **kwargs)
