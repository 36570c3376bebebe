"""LLaDA's free-function API with the original signatures, as thin wrappers over the one loop."""

from __future__ import annotations

from typing import Any

import torch

from dkvcache.generation import generate as _generate


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


def _fast_dllm(cache_type: str, model: Any, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int,
               temperature: float, remasking: str, mask_id: int | None, threshold: float | None,
               factor: float | None, **kwargs: Any) -> tuple[torch.Tensor, int]:
    out = _generate(model, prompt, steps=steps, gen_length=gen_length, block_length=block_length,
                    temperature=temperature, remasking=remasking, mask_token_id=mask_id, threshold=threshold,
                    factor=factor, use_cache=True, cache_type=cache_type, return_dict_in_generate=True, **kwargs)
    return out.sequences, out.stats["forwards"]


@torch.no_grad()
def generate_with_prefix_cache(model: Any, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
                               block_length: int = 128, temperature: float = 0.0, remasking: str = "low_confidence",
                               mask_id: int | None = None, threshold: float | None = None,
                               factor: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's ``generate_with_prefix_cache``: returns ``(x, nfe)``. Any batch size; ``attention_mask=`` works."""
    return _fast_dllm("prefix", model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                      threshold, factor, **kwargs)


@torch.no_grad()
def generate_with_dual_cache(model: Any, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
                             block_length: int = 128, temperature: float = 0.0, remasking: str = "low_confidence",
                             mask_id: int | None = None, threshold: float | None = None,
                             factor: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's ``generate_with_dual_cache``: returns ``(x, nfe)``. Any batch size; ``attention_mask=`` works."""
    return _fast_dllm("dual", model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                      threshold, factor, **kwargs)
