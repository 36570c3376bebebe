"""ML-GSAI/LLaDA's ``generate`` with the original signature, a thin wrapper over the one loop.

Fast-dLLM's functions (``(x, nfe)`` results) are in :mod:`dkvcache.fast_dllm`; its prefix/dual functions are
re-exported here under their own names.
"""

from __future__ import annotations

from typing import Any

import torch

from dkvcache.fast_dllm import generate_with_dual_cache, generate_with_prefix_cache
from dkvcache.generation import generate as _generate

__all__ = ["generate", "generate_with_prefix_cache", "generate_with_dual_cache"]


@torch.no_grad()
def generate(model: Any, prompt: torch.Tensor, attention_mask: torch.Tensor | None = None, steps: int = 128,
             gen_length: int = 128, block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = "low_confidence", mask_id: int | None = None, logits_eos_inf: bool = False,
             confidence_eos_eot_inf: bool = False, **kwargs: Any) -> torch.Tensor:
    """``generate(model, prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id)``
    as in ML-GSAI/LLaDA's generate.py; returns x (B, P + gen_length).

    ``mask_id=None`` takes the model config's mask token (126336 for LLaDA-8B, the original's hard-coded
    default). Extra keyword arguments (``use_cache``, ``cache_type``, ``seed`` …) go to ``diffusion_generate``.
    """
    return _generate(model, prompt, attention_mask=attention_mask, steps=steps, gen_length=gen_length,
                     block_length=block_length, temperature=temperature, cfg_scale=cfg_scale, remasking=remasking,
                     mask_token_id=mask_id, logits_eos_inf=logits_eos_inf,
                     confidence_eos_eot_inf=confidence_eos_eot_inf, **kwargs)
