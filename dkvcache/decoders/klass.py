"""KLASS (KL-adaptive stability sampling): unmask the confident candidates whose distribution stopped moving."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dkvcache.decoders.base import Decoder, StepView, register_decoder
from dkvcache.sampling import Family, parallel_count, select_top
from dkvcache.validate import check_int, check_number

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions

KL_EPS = 1e-12
# Per family, the (kl_threshold, conf_threshold) KLASS's authors run (their GSM8K scripts: LLaDA 0.015 / 0.6,
# Dream 0.001 / 0.9); a knob left unset takes its family's value.
AUTHORS_SETTINGS = {"llada": (0.015, 0.6), "dream": (0.001, 0.9)}


@register_decoder
class Klass(Decoder):
    """KLASS: unmask the confident candidates whose distribution has stopped moving.

    Per candidate, the last ``kl_history_length`` values of KL(p_t ‖ p_{t−1}) (float64, eps 1e−12; a position
    without a previous distribution — first step in its block, or no fresh logits last step — counts as
    infinitely unstable). Stable = every value < ``kl_threshold``; only stable candidates with a score ≥
    ``conf_threshold`` qualify (the paper's "stable, high-confidence predictions"; unset, both thresholds take
    the authors' values for the family, ``AUTHORS_SETTINGS``; ``conf_threshold=0`` = stability alone). With
    ``threshold``/``factor`` that set is filtered by that rule too. Every qualifying candidate is unmasked, and at
    least the vanilla count (the highest scores fill up); a row with none is exactly vanilla, so
    ``kl_threshold=0`` ≡ vanilla.
    (The reference selected the stable set with no rule and a minimum of 0 when threshold/factor were unset,
    which is always empty, so its default was plain top-k.)
    Memory: previous distributions are kept only for the current block's candidates, (B, m, V) float64 —
    never (B, G, V); decoded positions and finished blocks are dropped.
    """

    name = "klass"
    defaults = {"kl_threshold": None, "kl_history_length": 2, "conf_threshold": None}  # None: the family's
    ranks_by_confidence = True
    allows_alg_temp = False

    @classmethod
    def check(cls, opts: GenerationOptions) -> None:
        super().check(opts)
        check_number("kl_threshold", opts.kl_threshold, 0.0, float("inf"), allow_none=True)
        check_number("conf_threshold", opts.conf_threshold, float("-inf"), float("inf"), allow_none=True)
        check_int("kl_history_length", opts.kl_history_length, 1)
        if opts.alg == "entropy":
            raise ValueError("diffusion_generate: decoding='klass' compares confidences with conf_threshold, a "
                             "probability; use alg in ['maskgit_plus', 'topk_margin', 'random'], got alg='entropy'")

    def __init__(self, opts: GenerationOptions, family: Family, model: Any = None) -> None:
        super().__init__(opts, family, model)
        kl, conf = AUTHORS_SETTINGS[family.name]
        self.kl_threshold = kl if opts.kl_threshold is None else opts.kl_threshold
        self.conf_threshold = conf if opts.conf_threshold is None else opts.conf_threshold
        self.prev: tuple[torch.Tensor, ...] | None = None  # positions, probs, had-fresh-logits, KL history

    def stable(self, step: StepView) -> torch.Tensor:
        probs, ok, pos = step.probs(), step.decodable, step.cand_pos.contiguous()
        batch, m, vocab = probs.shape
        history = self.opts.kl_history_length
        kl = torch.full((batch, m), float("inf"), dtype=torch.float64, device=probs.device)
        hist = torch.full((batch, m, history), float("inf"), dtype=torch.float64, device=probs.device)
        if self.prev is not None:
            prev_pos, prev_probs, prev_ok, prev_hist = self.prev
            idx = torch.searchsorted(prev_pos, pos).clamp(max=prev_pos.shape[1] - 1)
            hit = (prev_pos.gather(1, idx) == pos) & prev_ok.gather(1, idx) & ok
            q = prev_probs.gather(1, idx[..., None].expand(-1, -1, vocab))
            div = (probs * (torch.log(probs + KL_EPS) - torch.log(q + KL_EPS))).sum(-1).clamp(min=0)
            kl = torch.where(hit, div, kl)
            hist = torch.where(hit[..., None], prev_hist.gather(1, idx[..., None].expand(-1, -1, history)), hist)
        hist = torch.cat([hist[..., 1:], kl[..., None]], dim=-1)
        self.prev = (pos, probs, ok, hist)
        return (hist < self.kl_threshold).all(-1) & ok

    def choose(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        score, opts = step.score, self.opts
        stable = self.stable(step) & (score >= self.conf_threshold)
        if opts.threshold is not None:
            stable = stable & (score >= opts.threshold)
        elif opts.factor is not None:
            stable = select_top(score, stable, parallel_count(score, stable, None, opts.factor, opts.factor_rule))
        count = torch.maximum(stable.sum(1), self.vanilla_count(step, count))
        return select_top(score.masked_fill(stable, float("inf")), step.decodable, count)

    def stats(self) -> dict:
        return {**super().stats(), "kl_threshold": self.kl_threshold, "conf_threshold": self.conf_threshold}
