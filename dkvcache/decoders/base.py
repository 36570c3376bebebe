"""The decoder contract: what a step knows (:class:`StepView`), the base :class:`Decoder` (vanilla confidence
decoding) and the registry. A decoder plugs into the one denoising loop (``dkvcache.generation``) at most at four
points: extra fed tokens (``extension``), a confidence adjustment (``confidence``), the choice of the candidates
to unmask (``choose``) and after the write (``after_write``). It declares its own knobs with their defaults
(``defaults``), whether it supports classifier-free guidance (``supports_cfg``), and checks its compatibility
with the other options in ``check`` — before any compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from dkvcache.commit import CommitSettings, raised_count, vanilla_choice
from dkvcache.registry import Registry
from dkvcache.sampling import (
    Family,
    origin_transfer,
    select_sampled,
    token_distribution,
)

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions
    from dkvcache.state import DecodeState


@dataclass
class StepView:
    """What one step knows about its candidates (B, m): positions, validity, which have fresh logits,
    offsets in the generated region, logits (B, m, V), proposals, confidences and scores (after the prior)."""

    state: DecodeState
    cand_pos: torch.Tensor
    cand_valid: torch.Tensor
    decodable: torch.Tensor
    offsets: torch.Tensor
    logits: torch.Tensor
    x0: torch.Tensor
    conf: torch.Tensor
    banned_ids: Sequence[int] = ()
    score: torch.Tensor | None = None
    shadow: torch.Tensor | None = None  # WINO: hidden states of the shadow block (B, block, d)
    _probs: torch.Tensor | None = field(default=None, repr=False)

    def probs(self) -> torch.Tensor:
        """float64 distributions (B, m, V) of the candidates (computed once, on demand)."""
        if self._probs is None:
            opts = self.state.opts
            self._probs = token_distribution(self.logits, family=self.state.family, temperature=opts.temperature,
                                             top_p=opts.top_p, top_k=opts.top_k, banned_ids=self.banned_ids)
        return self._probs


@dataclass
class Extension:
    """Extra tokens fed after the sequence (B, n) with their rotary positions, and the per-query key mask
    (1, L + n, L + n) of the extended forward."""

    ids: torch.Tensor
    positions: torch.Tensor
    extra_mask: torch.Tensor


class Decoder:
    """``decoding="vanilla"``: confidence decoding, the base every other decoder refines."""

    name: ClassVar[str] = "vanilla"
    defaults: ClassVar[dict[str, Any]] = {}  # this decoding's own knobs and their defaults
    supports_cfg: ClassVar[bool] = True
    ranks_by_confidence: ClassVar[bool] = False  # needs a confidence per candidate (rejects alg="origin")
    allows_alg_temp: ClassVar[bool] = True  # sampled positions (alg_temp > 0) make sense with its rule
    own_parallel_rule: ClassVar[str | None] = None  # the knob that replaces threshold/factor, if any

    @classmethod
    def check(cls, opts: GenerationOptions) -> None:
        """Compatibility of this decoding with the other options; raise ValueError/TypeError before compute."""
        prefix = f"diffusion_generate: decoding={cls.name!r}"
        if cls.ranks_by_confidence and opts.alg == "origin":
            raise ValueError(f"{prefix} ranks candidates by confidence; alg='origin' (Dream's random order) has "
                             "none. Use alg='maskgit_plus' (the default for decodings other than vanilla)")
        if not cls.allows_alg_temp and opts.alg_temp:
            raise ValueError(f"{prefix} chooses the candidates by its own rule; alg_temp (sampled positions) "
                             "applies to decoding='vanilla' and 'pc_sampler' only")
        if cls.own_parallel_rule and opts.parallel:
            raise ValueError(f"{prefix} has its own parallel rule ({cls.own_parallel_rule}); pass "
                             "threshold/factor with decoding='vanilla', 'klass' or 'ar'")

    def __init__(self, opts: GenerationOptions, family: Family, model: Any = None) -> None:
        self.opts = opts
        self.family = family

    def extension(self, state: DecodeState) -> Extension | None:
        """Tokens to append to this step's input (None = the sequence alone)."""
        return None

    def confidence(self, step: StepView) -> torch.Tensor:
        """The confidences the scores are made of (B, m)."""
        return step.conf

    def vanilla_count(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        """The schedule's count, raised by threshold/factor parallel decoding when set (the loop passes a zero
        count when the rule alone decides)."""
        opts = self.opts
        return raised_count(step.score, step.decodable, count, opts.threshold, opts.factor, opts.factor_rule)

    def choose(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        """Which candidates to unmask (B, m) bool; ``count`` (B,) is the schedule's count."""
        if self.opts.alg == "origin":  # Dream's random order: no ranking, each candidate by its own coin
            state = step.state
            return origin_transfer(step.cand_valid, state.step_in_block, state.steps_in_block, self.opts.eps,
                                   state.row_seeds, state.noise_step, step.offsets) & step.decodable
        if self.opts.alg_temp:
            state = step.state
            return select_sampled(step.score, step.decodable, self.vanilla_count(step, count), self.opts.alg_temp,
                                  state.row_seeds, state.noise_step, step.offsets)
        opts = self.opts
        return vanilla_choice(step.score, step.decodable, count, opts.threshold, opts.factor, opts.factor_rule)

    def commit_settings(self) -> CommitSettings | None:
        """The settings under which a compiled step may choose and write itself (:mod:`dkvcache.commit`): only
        for the plain vanilla rule (no subclass refinement, no random order or sampled positions, no prior);
        None otherwise."""
        opts = self.opts
        if type(self) is not Decoder or opts.alg == "origin" or opts.alg_temp or opts.sigma:
            return None
        return CommitSettings.of(opts.threshold, opts.factor, opts.factor_rule, opts.mask_token_id)

    def after_write(self, step: StepView, transfer: torch.Tensor, x_before: torch.Tensor) -> None:
        """Bookkeeping once the chosen tokens are written into ``state.x``."""

    def stats(self) -> dict:
        return {"decoding": self.name}


_REGISTRY: Registry[Decoder] = Registry("decoding")


def register_decoder(cls: type[Decoder]) -> type[Decoder]:
    """Class decorator: make a decoder available as ``decoding=cls.name`` (names are unique)."""
    return _REGISTRY.register(cls)


def get_decoder(name: str) -> type[Decoder]:
    """The decoder class registered as ``name`` (ValueError naming the allowed ones otherwise)."""
    return _REGISTRY.get(name)


def decoding_knobs() -> dict[str, dict[str, Any]]:
    """Every registered decoding and its own knobs with their defaults."""
    return {name: dict(cls.defaults) for name, cls in _REGISTRY.classes.items()}


def make_decoder(opts: GenerationOptions, family: Family, model: Any) -> Decoder:
    """The decoder of one ``diffusion_generate`` call (fresh per call: KLASS and WINO keep per-call state)."""
    return get_decoder(opts.decoding)(opts, family, model)


register_decoder(Decoder)
