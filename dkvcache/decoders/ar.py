"""AR order: a bidirectional model decoding strictly left to right."""

from __future__ import annotations

import torch

from dkvcache.decoders.base import Decoder, StepView, register_decoder
from dkvcache.sampling import prefix_count


@register_decoder
class AR(Decoder):
    """Left-to-right decoding with a bidirectional model: only the contiguous run of candidates starting at
    the block's first masked position may be unmasked; its first ``count`` (the schedule's count) are. With
    ``threshold``/``factor`` the longest prefix of the run passing the rule (at least one; at least the
    schedule's count with ``schedule_floor``). (The reference, without threshold, unmasked the whole run — a
    block per forward.)"""

    name = "ar"
    ranks_by_confidence = True
    allows_alg_temp = False

    def choose(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        index = torch.arange(step.cand_pos.shape[1], device=step.cand_pos.device)
        run = (step.cand_pos == step.cand_pos[:, :1] + index) & step.decodable
        run = run.long().cumprod(1).bool()
        if self.opts.threshold is not None or self.opts.factor is not None:
            ranked = step.score.masked_fill(~run, float("-inf"))
            count = torch.maximum(count, prefix_count(ranked, run, self.opts.threshold, self.opts.factor,
                                                      self.opts.factor_rule))
        return run & (index[None, :] < count[:, None])
