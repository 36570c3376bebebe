"""d2Cache (Jiang et al., 2025): token-level K/V caching chosen by a certainty prior and attention rollout.

Step 0 is a full forward. After every step the strategy picks the positions fed at the next step; every other
position's K/V is read from the buffers (no periodic refresh):
  Stage 1  masked positions ranked by certainty × certainty density (width ``d2_sigma``) inside the search
           window, current block first: the top min(max(current_k, next step's transfer count), #masked in the
           window); Dream feeds the position before each (query j−1 predicts token j; P−1 for the first one).
           Plus every position decoded in this step (its token changed, so its K/V must be recomputed).
  Stage 2  the attention-rollout nucleus: the largest prefix of the remaining (non-pad) positions, sorted by
           influence, whose normalised influence sums to ≤ ``rollout_p`` (at least one).
  inflate  ``inflate_w`` > 0 also feeds every gap of ≤ ``inflate_w`` between two fed positions.
The loop only decodes candidates whose source position was fed (the original gave the others all-zero logits, a
1/V confidence and token 0), so Stage 1 includes at least the next step's transfer count: the schedule can always
be met and no MASK is ever left behind.

Certainty of a position: the latest confidence it got while its prediction was fresh (source fed), refreshed
every step (the original meant to, but an operator-precedence bug froze them); ``d2_frozen_confidence=True``
keeps the first one instead (the published behaviour: the step-0 confidences with one block).
``alg="entropy"`` confidences (−H ≤ 0) enter as exp(−H) so that a higher density always ranks higher. Positions
never predicted yet (later blocks) count as certainty 1.
Decoders (``decoding=``) choose among the decodable candidates; ``decoding="ar"`` can only unmask the leftmost
masked run, so Stage 1 then ranks by position instead (leftmost first). The certainty prior of *decoding*
(``sigma``) is the loop's and composes with this cache unchanged.

Rollout (Eqs. 6–9) without any T×T matrix: with Ā the head-mean attention of a layer's fed queries and
W = rownormalize(E + I) (E = I with the fed rows replaced by Ā), the influence c = 1ᵀ C with C = W_L ⋯ W_1, so
c is obtained by pushing the row vector 1ᵀ backwards through the layers: vᵀ ← vᵀ W_l, where
vᵀW = v ⊙ (1 − ½·fed) + ½ Σ_{i fed} v_i Ā_i. Cost per step O(layers · n · T) for n fed queries (O(layers · T²)
at step 0), against the original's O(layers · T³) (B, T, T) matmuls; ``rollout_matrix`` is that reference form.
The probabilities come from the attention function of the fed queries only (explicit softmax, any model, no
``attn_implementation="eager"``); a layer hook reduces them to the head mean at once, so per step the strategy
holds layers × (B, n, T) values. Every other strategy keeps SDPA.

Batches: rows are ragged (the original topped every row up to the largest selection), pads are never fed nor
selected, and a row with nothing left in the current block (parallel decoding finished it early) feeds nothing
and keeps its selection, so a padded batch row equals its single run. The batch still runs max-row-count queries
per step (padding entries write to the scratch slot and are never read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dkvcache.caches.base import CacheStrategy, StepOutcome, StepPlan, register_strategy
from dkvcache.density import certainty_density
from dkvcache.indexing import slots_of
from dkvcache.partial_forward import ForwardContext, LayerHook, compute_dtype, layer_forward
from dkvcache.state import DecodeState
from dkvcache.validate import check_bool, check_int, check_number

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions


def _ranks(key: torch.Tensor) -> torch.Tensor:
    """Rank of every entry of each row under a stable descending sort (0 = largest; ties: leftmost first)."""
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(key.shape[1], device=key.device).expand_as(order).contiguous()
    return torch.empty_like(order).scatter_(1, order, ranks)


def _fed_mask(fed_idx: torch.Tensor, fed_valid: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T) bool: positions fed (padding entries of ``fed_idx`` and invalid queries excluded)."""
    mask = torch.zeros(fed_idx.shape[0], length + 1, dtype=torch.bool, device=fed_idx.device)
    mask.scatter_(1, fed_idx.masked_fill(~fed_valid, length), True)
    return mask[:, :length]


def rollout_influence(means: list[torch.Tensor], fed_idx: torch.Tensor, fed_valid: torch.Tensor) -> torch.Tensor:
    """Influence c_j = Σ_i C_ij (B, T) of the rollout C = W_L ⋯ W_1 of one forward.

    means: per layer the head-mean attention (B, n, T) of the n fed queries; fed_idx (B, n) their positions;
    fed_valid (B, n) which entries are real queries (padding and pad tokens give identity rows).
    """
    length = means[0].shape[-1]
    v = torch.ones(fed_idx.shape[0], length, dtype=means[0].dtype, device=fed_idx.device)
    keep = 1.0 - 0.5 * _fed_mask(fed_idx, fed_valid, length).to(v.dtype)
    gather = fed_idx.clamp(max=length - 1)
    half = 0.5 * fed_valid.to(v.dtype)
    for mean in reversed(means):
        pushed = v.gather(1, gather) * half
        v = v * keep + torch.bmm(pushed[:, None, :], mean)[:, 0]
    return v


def rollout_matrix(means: list[torch.Tensor], fed_idx: torch.Tensor, fed_valid: torch.Tensor) -> torch.Tensor:
    """The reference rollout C (B, T, T) of Eqs. 6–9 in O(layers · T³): C ← rownormalize(E + I) · C from I."""
    batch, _, length = means[0].shape
    eye = torch.eye(length, dtype=means[0].dtype, device=fed_idx.device).expand(batch, -1, -1)
    rows = fed_idx.masked_fill(~fed_valid, length)
    c = eye.clone()
    for mean in means:
        e = torch.cat([eye, eye.new_zeros(batch, 1, length)], dim=1)
        e = e.scatter(1, rows[..., None].expand(-1, -1, length), mean)[:, :length]
        w = e + eye
        c = (w / w.sum(-1, keepdim=True)) @ c
    return c


def nucleus(scores: torch.Tensor, candidates: torch.Tensor, p: float) -> torch.Tensor:
    """(B, T) bool: per row the largest prefix of the candidates sorted by score (descending, leftmost first on
    ties) whose scores, normalised over the candidates, sum to ≤ ``p``; at least one when any candidate exists."""
    s = scores.masked_fill(~candidates, 0).clamp(min=0)
    total = s.sum(1, keepdim=True)
    s = torch.where(total > 0, s / total.clamp(min=torch.finfo(s.dtype).tiny), s)
    key = s.masked_fill(~candidates, float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True)
    cumulative = order.values.masked_fill(order.values == float("-inf"), 0).cumsum(1)
    keep_sorted = cumulative <= p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(candidates).scatter_(1, order.indices, keep_sorted)
    return keep & candidates


def stage_one(score: torch.Tensor, masked: torch.Tensor, block_length: int, current_k: int,
              need: torch.Tensor) -> torch.Tensor:
    """Stage 1 over the generated region (B, G): the masked positions to make decodable at the next step.

    The current block is the row's block holding its first masked position; the search window runs from its
    start to the end of the first block where ≥ ``current_k`` masked positions have been counted. Picks the
    top min(max(current_k, need), #masked in the window) by ``score`` (≥ 0), current block first.
    """
    gen = masked.shape[1]
    off = torch.arange(gen, device=masked.device)[None, :]
    first = torch.where(masked.any(1), masked.long().argmax(1), gen)[:, None]
    start = first // block_length * block_length
    in_block = (off >= start) & (off < start + block_length)
    reach = (masked & (off >= start)).long().cumsum(1) >= current_k
    end0 = torch.where(reach.any(1), reach.long().argmax(1), gen - 1)[:, None]
    window = masked & (off >= start) & (off < (end0 // block_length + 1) * block_length)
    boost = 2 * score.masked_fill(~window, 0).amax(1, keepdim=True) + 1  # any block score beats the rest
    key = (score + boost * in_block).masked_fill(~window, float("-inf"))
    count = torch.minimum(need.clamp(min=current_k), window.sum(1))
    return (_ranks(key) < count[:, None]) & window


def inflate(selected: torch.Tensor, width: int) -> torch.Tensor:
    """Add every unselected position lying between two selected ones at distance ≤ ``width``."""
    length = selected.shape[1]
    idx = torch.arange(length, device=selected.device).expand_as(selected)
    prev = torch.where(selected, idx, -1).cummax(1).values
    nxt = torch.where(selected, idx, length).flip(1).cummin(1).values.flip(1)
    return selected | ((prev >= 0) & (nxt < length) & (nxt - prev <= width))


@register_strategy
class D2Cache(CacheStrategy):
    """d2Cache: feed Stage-1 (certainty prior) ∪ just-decoded ∪ Stage-2 (rollout nucleus) positions each step.

    Options: current_k (int ≥ 1, default 32), d2_sigma (> 0, 10.0), rollout_p (in [0, 1], 0.1), inflate_w
    (int ≥ 0; default 0 with one block and no parallel decoding, else 4), d2_frozen_confidence (bool, False).
    """

    name = "d2"
    option_names = frozenset({"current_k", "d2_sigma", "rollout_p", "inflate_w", "d2_frozen_confidence"})
    wants_attention = True

    defaults = {"current_k": 32, "d2_sigma": 10.0, "rollout_p": 0.1, "d2_frozen_confidence": False}

    def __init__(self, current_k: int | None = None, d2_sigma: float | None = None, rollout_p: float | None = None,
                 inflate_w: int | None = None, d2_frozen_confidence: bool | None = None, **options) -> None:
        super().__init__(**options)
        given = {"current_k": current_k, "d2_sigma": d2_sigma, "rollout_p": rollout_p,
                 "d2_frozen_confidence": d2_frozen_confidence}
        value = {k: self.defaults[k] if v is None else v for k, v in given.items()}  # None = the default
        self.current_k, self.d2_sigma, self.rollout_p = value["current_k"], value["d2_sigma"], value["rollout_p"]
        self.frozen, self.inflate_w = value["d2_frozen_confidence"], inflate_w
        self.means: list[torch.Tensor] = []

    @classmethod
    def check(cls, options: dict, family: str, opts: GenerationOptions) -> None:
        options = {**cls.defaults, **{k: v for k, v in options.items() if v is not None}}
        check_int("current_k", options["current_k"], 1)
        check_number("d2_sigma", options["d2_sigma"], 0.0, float("inf"), low_open=True)
        check_number("rollout_p", options["rollout_p"], 0.0, 1.0)
        check_int("inflate_w", options.get("inflate_w"), 0, allow_none=True)
        check_bool("d2_frozen_confidence", options["d2_frozen_confidence"])
        if opts.alg == "origin":
            raise ValueError("diffusion_generate: cache_type='d2' needs confidence-ranked decoding; alg='origin' "
                             "may decode any masked position, so every one would have to be recomputed each step. "
                             "Use alg in ['maskgit_plus', 'topk_margin', 'entropy', 'random']")

    def begin(self, state: DecodeState) -> None:
        opts = state.opts
        self.block_length = opts.block_length or opts.max_new_tokens
        if self.inflate_w is None:
            semi_ar = self.block_length < opts.max_new_tokens
            self.inflate_w = 4 if semi_ar or opts.threshold is not None or opts.factor is not None else 0
        self.left_to_right = getattr(opts, "decoding", "vanilla") == "ar"
        gen = opts.max_new_tokens
        self.conf = torch.ones(state.batch, gen, dtype=torch.float64, device=state.x.device)
        self.seen = torch.zeros(state.batch, gen, dtype=torch.bool, device=state.x.device)
        self.selection: torch.Tensor | None = None
        self.stage2_total = torch.zeros((), dtype=torch.long, device=state.x.device)

    def plan(self, state: DecodeState) -> StepPlan:
        self.means = []
        if self.selection is None:
            return StepPlan(fed_idx=None, use_kv=True, refresh=True)
        active = state.masked()[:, state.block_start:state.block_end].any(1)  # rows with candidates
        return StepPlan(fed_mask=self.selection & active[:, None], use_kv=True)

    def layer_hook(self) -> LayerHook:
        return self._layer

    def _layer(self, index: int, layer, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The standard block; its attention probabilities are reduced to the head mean (B, n, T) at once."""
        hidden = layer_forward(layer, hidden, ctx, index)
        probs = ctx.attn_probs.pop()
        length = ctx.key_valid.shape[1] - 1
        self.means.append(probs[..., :length].mean(1, dtype=compute_dtype(probs.dtype)))
        return hidden

    def after_step(self, state: DecodeState, outcome: StepOutcome) -> None:
        length = state.length
        fed_idx = outcome.fed_idx
        if fed_idx is None:
            fed_idx = torch.arange(length, device=state.x.device).expand(state.batch, -1)
            fed_valid = state.key_valid
        else:
            fed_valid = fed_idx < length
        self._update_confidence(state, outcome, fed_idx)
        influence = rollout_influence(self.means, fed_idx, fed_valid)
        self.means = []
        selection, extra = self._select(state, outcome.x_before, influence)
        active = outcome.valid.any(1)[:, None]  # rows idle this step keep their selection
        self.selection = selection if self.selection is None else torch.where(active, selection, self.selection)
        self.stage2_total = self.stage2_total + (extra & active).sum()

    def _update_confidence(self, state: DecodeState, outcome: StepOutcome, fed_idx: torch.Tensor) -> None:
        """Store the certainty of every candidate whose prediction was fresh (its source position was fed)."""
        length = state.length
        cand, valid = outcome.candidates, outcome.valid
        source = cand - 1 if state.family.shift_logits else cand
        fresh = valid & (slots_of(fed_idx, length).gather(1, torch.where(valid, source, length)) >= 0)
        if self.frozen:
            offsets = (cand - state.prompt_length).clamp(0, self.conf.shape[1] - 1)
            fresh = fresh & ~self.seen.gather(1, offsets)
        conf = outcome.confidence.double()
        certainty = conf.exp() if state.opts.alg == "entropy" else conf.clamp(min=0)
        offsets = torch.where(fresh, cand - state.prompt_length, self.conf.shape[1])
        pad = self.conf.new_zeros(state.batch, 1)
        self.conf = torch.cat([self.conf, pad], 1).scatter(1, offsets, certainty)[:, :-1]
        self.seen = torch.cat([self.seen, pad.bool()], 1).scatter(1, offsets, True)[:, :-1]

    def _next_need(self, state: DecodeState, masked: torch.Tensor) -> torch.Tensor:
        """(B,) the schedule's transfer count of each row's next decoding step (the decodable floor)."""
        schedule = state.schedule
        if schedule.steps is None:  # the parallel rule decides: it always takes the top candidate
            return masked.any(1).long()
        gen, block = masked.shape[1], self.block_length
        first = torch.where(masked.any(1), masked.long().argmax(1), gen)
        start = first // block * block
        in_block = masked.reshape(masked.shape[0], -1, block).sum(2)
        n_block = in_block.gather(1, (start // block).clamp(max=gen // block - 1)[:, None])[:, 0]
        i = state.step_in_block + 1
        same = (start + state.prompt_length == state.block_start) & (i < schedule.steps)
        return torch.where(same, schedule.count(i, n_block), schedule.fresh_count(n_block))

    def _select(self, state: DecodeState, x_before: torch.Tensor,
                influence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions (B, L) to feed at the next step, and those Stage 2 added."""
        prompt, mask_id = state.prompt_length, state.mask_id
        masked = state.masked()[:, prompt:]
        if self.left_to_right:  # decoding="ar" unmasks only the leftmost run: rank by position
            score = torch.linspace(1, 0, masked.shape[1], dtype=torch.float64, device=masked.device).expand_as(masked)
        else:
            score = self.conf * certainty_density(~masked, self.d2_sigma)
        picked = stage_one(score, masked, self.block_length, self.current_k, self._next_need(state, masked))
        selected = torch.zeros_like(state.key_valid)
        if state.family.shift_logits:
            selected[:, prompt - 1:-1] = picked
        else:
            selected[:, prompt:] = picked
        selected |= (x_before == mask_id) & (state.x != mask_id)  # decoded this step
        extra = nucleus(influence, state.key_valid & ~selected, self.rollout_p)
        selected = selected | extra
        if self.inflate_w:
            selected = inflate(selected, self.inflate_w)
        return selected & state.key_valid, extra

    def stats(self) -> dict:
        return {**super().stats(), "current_k": self.current_k, "d2_sigma": self.d2_sigma,
                "rollout_p": self.rollout_p, "inflate_w": self.inflate_w,
                "d2_frozen_confidence": self.frozen, "stage2_selected": int(self.stage2_total)}


@register_strategy
class D2CacheAlias(D2Cache):
    """``cache_type="d2cache"``: the d2Cache framework's name for ``"d2"``."""

    name = "d2cache"
