"""EB-sampler: an entropy bound decides how many of the best candidates a step unmasks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dkvcache.decoders.base import Decoder, StepView, register_decoder
from dkvcache.sampling import entropy_bound_count, select_top
from dkvcache.validate import check_number

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions


@register_decoder
class EBSampler(Decoder):
    """EB-sampler: sort candidates by score; with H_(i) their entropies in that order, unmask the i with
    Σ_{j≤i} H_(j) − max_{j≤i} H_(j) ≤ gamma (running max along the candidates; the reference took it over the
    batch), clamped to [schedule count, candidates]. gamma = 0: one token per step (plus zero-entropy ties);
    gamma = inf: every candidate.

    The max term exempts the last candidate taken, whatever its entropy: besides the near-certain candidates a
    step always unmasks the next one. Sampled, that is a draw from its own marginal (the bound's premise); greedy
    (temperature 0), it is that marginal's argmax, a guess when the model is unsure -- on the chain task the
    first wrong state of every failing row was such a token, up to ln 5 nats (docs/accuracy.md)."""

    name = "eb_sampler"
    defaults = {"gamma": 1e-3}
    ranks_by_confidence = True
    allows_alg_temp = False
    own_parallel_rule = "gamma"

    @classmethod
    def check(cls, opts: GenerationOptions) -> None:
        super().check(opts)
        check_number("gamma", opts.gamma, 0.0, float("inf"), finite=False)  # inf: the whole block per step

    def choose(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        ranked = step.score.masked_fill(~step.decodable, float("-inf"))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # select_top's order
        entropy = torch.special.entr(step.probs()).sum(-1)
        eb = entropy_bound_count(entropy.gather(1, order), step.decodable.gather(1, order), self.opts.gamma)
        return select_top(step.score, step.decodable, torch.maximum(eb, count))
