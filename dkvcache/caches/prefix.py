"""Fast-dLLM's block-wise caches (Wu et al., 2025): prefix cache and dual cache.

Decoding is semi-autoregressive over blocks. The first step of every block is a full forward that refreshes all
K/V and already decodes (it is step 0 of the block). Later steps of the block feed
  prefix: the block and everything after it (the masked suffix is recomputed every step),
  dual:   the block only (the suffix K/V stay as the block-start forward left them),
and read the prefix (prompt + finished blocks) from the buffers. ``cache_steps=N`` adds a full refresh every N
steps inside a block (not in the original; off by default).

Dream predicts token j at position j−1, so the position just before the block is fed too: its fresh query gives
the block's first token a prediction at every step. (The original instead forced that token from the block-start
forward without any confidence test and switched any ``alg`` to entropy; we do neither.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dkvcache.caches.base import CacheStrategy, StepPlan, register_strategy
from dkvcache.state import DecodeState
from dkvcache.validate import check_int

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions


class _BlockCache(CacheStrategy):
    option_names = frozenset({"cache_steps"})
    default_block_length = 32
    feeds_suffix = True

    def __init__(self, cache_steps: int | None = None, **options) -> None:
        super().__init__(**options)
        self.cache_steps = cache_steps
        self.block_fed: tuple[int, torch.Tensor] | None = None  # (block start, the fed set of its later steps)

    @classmethod
    def check(cls, options: dict, family: str, opts: GenerationOptions) -> None:
        check_int("cache_steps", options.get("cache_steps"), 1, allow_none=True)

    def plan(self, state: DecodeState) -> StepPlan:
        i = state.step_in_block
        if i == 0 or (self.cache_steps is not None and i % self.cache_steps == 0):
            return StepPlan(fed_idx=None, use_kv=True, refresh=True)
        if self.block_fed is None or self.block_fed[0] != state.block_start:  # one set per block, built once
            start = state.block_start - (1 if state.family.shift_logits else 0)
            end = state.length if self.feeds_suffix else state.block_end
            fed = torch.arange(start, end, device=state.x.device).expand(state.batch, -1)
            self.block_fed = (state.block_start, fed)
        fed = self.block_fed[1]
        return StepPlan(fed_idx=fed, use_kv=True, fed_count=fed.numel())

    def stats(self) -> dict:
        return {**super().stats(), "cache_steps": self.cache_steps}


@register_strategy
class PrefixCache(_BlockCache):
    """Fast-dLLM PrefixCache: reuse the prefix's K/V within a block, recompute the block and the suffix."""

    name = "prefix"
    switch = ("dual_cache", False)  # Fast-dLLM's Dream call: use_cache=True, dual_cache=False


@register_strategy
class DualCache(_BlockCache):
    """Fast-dLLM DualCache: reuse prefix and suffix K/V within a block, recompute only the block."""

    name = "dual"
    switch = ("dual_cache", True)
    feeds_suffix = False

