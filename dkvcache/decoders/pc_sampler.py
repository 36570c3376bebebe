"""PC-sampler (position- and frequency-calibrated decoding): the unigram debias of the confidences."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from dkvcache.decoders.base import Decoder, StepView, register_decoder
from dkvcache.sampling import Family
from dkvcache.unigram import load_unigram_table
from dkvcache.validate import check_number

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions


@register_decoder
class PCSampler(Decoder):
    """PC-sampler's unigram debias: conf' = min(−c·log(f(x0) + 1e−10), clip_alpha).

    c is the ``alg``'s confidence (the probability of x0 for maskgit_plus, the top-1 − top-2 margin for
    topk_margin), so the debias is applied *after* the alg and never silently dropped (the reference computed
    it and then overwrote it for every alg but maskgit_plus). ``threshold``/``factor`` compare the debiased
    score, which lies in [0, clip_alpha].
    """

    name = "pc_sampler"
    defaults = {"clip_alpha": 10.0, "pc_frequencies": None}
    ranks_by_confidence = True

    @classmethod
    def check(cls, opts: GenerationOptions) -> None:
        super().check(opts)
        prefix = f"diffusion_generate: decoding={cls.name!r}"
        check_number("clip_alpha", opts.clip_alpha, 0.0, float("inf"), low_open=True)
        if opts.alg not in ("maskgit_plus", "topk_margin"):
            raise ValueError(f"{prefix} scales a probability-like confidence by −log(frequency); it needs alg "
                             f"in ['maskgit_plus', 'topk_margin'], got alg={opts.alg!r}")
        source = opts.pc_frequencies
        if source is None:
            raise ValueError(f"{prefix} needs pc_frequencies: a (vocab,) tensor of unigram frequencies or a "
                             "JSON path (see dkvcache.unigram.build_unigram_table)")
        if not isinstance(source, (torch.Tensor, str, os.PathLike)):
            raise TypeError("diffusion_generate: pc_frequencies must be a torch.Tensor or a path to a JSON file, "
                            f"got {type(source).__name__}")

    def __init__(self, opts: GenerationOptions, family: Family, model: Any = None) -> None:
        super().__init__(opts, family, model)
        sizes = {getattr(model.config, n, None) for n in ("vocab_size", "embedding_size")} - {None}
        self.table = load_unigram_table(opts.pc_frequencies, max(sizes))
        if self.table.shape[0] not in sizes:
            raise ValueError(f"diffusion_generate: pc_frequencies has {self.table.shape[0]} entries; the model's "
                             f"vocabulary has {sorted(sizes)}")

    def confidence(self, step: StepView) -> torch.Tensor:
        table = self.table.to(step.x0.device)
        if table.shape[0] < step.logits.shape[-1]:  # embedding rows beyond the vocabulary: never seen
            table = torch.cat([table, table.min().expand(step.logits.shape[-1] - table.shape[0])])
        self.table = table
        bias = -torch.log(table[step.x0] + 1e-10)
        return torch.clamp(step.conf.double() * bias, max=self.opts.clip_alpha)
