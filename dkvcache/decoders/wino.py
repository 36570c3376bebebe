"""WINO (wide-in, narrow-out): unmask generously, re-mask what a leave-one-out shadow block doubts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dkvcache.decoders.base import Decoder, Extension, StepView, register_decoder
from dkvcache.indexing import fixed_indices, scatter_rows
from dkvcache.sampling import Family, select_top, token_distribution
from dkvcache.validate import check_number

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions
    from dkvcache.state import DecodeState


@register_decoder
class Wino(Decoder):
    """WINO (wide-in, narrow-out); ``cache_type="none"`` only.

    Each step feeds the sequence plus a *shadow* of the current block: LLaDA: MASK at every block position;
    Dream (logits of token j come from position j−1): a copy of the token at j−1. Real tokens never see the
    shadow; shadow entry i sees every real key except block position i (leave-one-out), and the other shadow
    entries (LLaDA, as the reference) or only itself (Dream, whose shadow tokens are real tokens). So the shadow
    predicts each decoded block token without seeing it.
    Wide-in: unmask candidates with score ≥ wide_in_thres, at most max(clamp(⌊0.7·#masked⌋, 5, 20), n) and at
    least n = max(schedule count, 1) (the top ones). Narrow-out: block tokens decoded *before* the step whose
    shadow probability is < narrow_out_thres are re-masked, lowest first, at most (#wide-in − n) of them —
    never prompt tokens or positions outside the block. Net progress ≥ n ≥ 1 token per step, so a block ends
    within its share of ``steps`` (the loop's hard cap) and the last step of the schedule finishes it.
    """

    name = "wino"
    defaults = {"wide_in_thres": 0.7, "narrow_out_thres": 0.9}
    supports_cfg = False
    ranks_by_confidence = True
    allows_alg_temp = False
    own_parallel_rule = "wide_in_thres"

    @classmethod
    def check(cls, opts: GenerationOptions) -> None:
        super().check(opts)
        prefix = f"diffusion_generate: decoding={cls.name!r}"
        check_number("wide_in_thres", opts.wide_in_thres, 0.0, 1.0)
        check_number("narrow_out_thres", opts.narrow_out_thres, 0.0, 1.0)
        if opts.cache_type != "none":
            raise ValueError(f"{prefix} supports cache_type='none' only (use_cache=False): every step appends a "
                             "shadow block with a leave-one-out mask and may re-mask decoded tokens, so no K/V "
                             f"of the block stays valid between steps; got cache_type={opts.cache_type!r}")
        if opts.alg == "entropy":
            raise ValueError(f"{prefix} compares scores with wide_in_thres, a probability; alg='entropy' is "
                             "negative. Use alg in ['maskgit_plus', 'topk_margin', 'random']")

    def __init__(self, opts: GenerationOptions, family: Family, model: Any = None) -> None:
        super().__init__(opts, family, model)
        self.floor: torch.Tensor | None = None
        self.remasked = 0

    def extension(self, state: DecodeState) -> Extension:
        start, end, length = state.block_start, state.block_end, state.length
        n, shift = end - start, int(self.family.shift_logits)
        positions = state.positions[:, start - shift:end - shift]
        ids = state.x[:, start - shift:end - shift] if shift else torch.full_like(positions, state.mask_id)
        eye = torch.eye(n, dtype=torch.bool, device=ids.device)
        mask = torch.ones(length + n, length + n, dtype=torch.bool, device=ids.device)
        mask[:length, length:] = False
        mask[length:, start:end] = ~eye
        if shift:
            mask[length:, length:] = eye
        return Extension(ids.clone(), positions, mask[None])

    def choose(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        n = torch.minimum(count.clamp(min=1), step.decodable.sum(1))
        wide = ((step.score >= self.opts.wide_in_thres) & step.decodable).sum(1)
        cap = torch.maximum((step.cand_valid.sum(1) * 0.7).long().clamp(5, 20), n)
        self.floor = n
        return select_top(step.score, step.decodable, torch.minimum(torch.maximum(wide, n), cap))

    def after_write(self, step: StepView, transfer: torch.Tensor, x_before: torch.Tensor) -> None:
        state = step.state
        start, end, length = state.block_start, state.block_end, state.length
        decoded = x_before != state.mask_id
        decoded[:, :start] = False
        decoded[:, end:] = False
        # The block's width, known without reading the data: no host synchronisation (padding entries are
        # never valid, so they are never re-masked).
        pos, valid = fixed_indices(decoded, end - start, length)
        slot = (pos - start).clamp(0, end - start - 1)
        hidden = step.shadow.gather(1, slot[..., None].expand(-1, -1, step.shadow.shape[-1]))
        opts = state.opts
        probs = token_distribution(state.model.logits_from_hidden(hidden), family=self.family,
                                   temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
                                   banned_ids=step.banned_ids)
        tokens = state.x.gather(1, pos.clamp(max=length - 1))
        p = probs.gather(-1, tokens[..., None]).squeeze(-1)
        limit = (transfer.sum(1) - self.floor).clamp(min=0)
        remask = select_top(-p, valid & (p < opts.narrow_out_thres), limit)
        self.remasked = self.remasked + remask.sum()  # a tensor: read once, in stats()
        state.x = torch.where(scatter_rows(remask, pos, length, False), state.mask_id, state.x)

    def stats(self) -> dict:
        return {**super().stats(), "remasked": int(self.remasked)}
