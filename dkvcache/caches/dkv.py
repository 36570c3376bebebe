"""dKV-Cache (Ma et al., 2025): delayed K/V caching for diffusion LMs, as buffer plans.

Every variant only decides which positions are fed; the others' K/V come from the buffers. Terms:
  d[j]   position j holds a decoded (non-MASK) token.
  C      the positions whose K/V may be cached, given the tokens so far (the "shift rule").
  prv    the positions cached (not fed) in the current step.
Timeline of ``decoded`` (the one-step delay): a token decoded at step t is fed at t+1 with its identity visible,
and read from the cache from t+2 until the next refresh. In buffer form: feed ``~prv``; after the step
``prv ← C``, ``C ← rule(x)``. Positions that enter the cache keep the K/V computed while they were last fed.
(The code keeps the complements, ``~C`` and ``~prv``: what a step feeds, in fewer ops a step.)

Variants (dKV-Cache paper §3 and its code):
  decoded  refresh (full forward) every ``cache_steps`` steps. Dream counts steps over the whole call; LLaDA
           restarts every block (full forward at block step 0, rebuild at step 1 and every multiple of
           ``cache_steps``) unless ``cache_across_blocks=True``.
  prefill  the prompt's K/V (all but the last prompt token for Dream) from step 0 only; every later step feeds
           the rest.
  pd       prefill + decoded: refreshes recompute everything except that prompt part.
  greedy   (LLaDA, ``remasking="random"``) the decoding order is drawn once per block, so the next step's
           tokens are known: feed only them, the tokens just decoded and ``window_size`` masked neighbours each;
           full forward every ``cache_steps`` steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dkvcache import rng
from dkvcache.caches.base import CacheStrategy, StepOutcome, StepPlan, register_strategy
from dkvcache.state import DecodeState
from dkvcache.validate import check_bool, check_choice, check_int

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions

SHIFT_TYPES = ("un", "un_right", "right")


def cacheable(decoded: torch.Tensor, shift_type: str) -> torch.Tensor:
    """The shift rule: which positions' K/V may be cached once the tokens ``decoded`` (B, L) are final.

    un        C[j] = d[j+1], C[L-1] = d[0]: position j's query is only needed to predict token j+1 (Dream),
              so it is dropped as soon as j+1 is decoded, even while j itself is MASK (most aggressive; the
              original's default).
    un_right  C[j] = d[j] and d[j+1], C[L-1] = C[L-2]: cached once its own token and its prediction are final
              (Dream's default here: 'un' keeps a still-MASK token's K/V, so the token's identity stays
              invisible until the next refresh; on the chain task that costs 22-95 points, docs/accuracy.md).
    right     C[j] = d[j]: for models without the logit shift (LLaDA).
    """
    if shift_type == "right":
        return decoded.clone()
    nxt = torch.cat([decoded[:, 1:], decoded[:, :1]], dim=1)
    if shift_type == "un":
        return nxt
    both = decoded & nxt
    both[:, -1] = both[:, -2]
    return both


def uncacheable(masked: torch.Tensor, shift_type: str, initial: bool = False) -> torch.Tensor:
    """``~cacheable(~masked, shift_type)`` (what a cached step feeds), in 0–4 ops instead of 8: with
    m = ``masked``, ~C[j] = m[j] (right), m[j+1] (un), m[j] or m[j+1] (un_right), the same wrap at L−1.
    ``initial``: before step 0 the originals use the plain left shift for the last slot (no wrap-around)."""
    if shift_type == "right":
        return masked
    feed = masked.roll(-1, dims=1)
    if shift_type == "un_right":
        feed = feed | masked
        feed[:, -1] = feed[:, -2]
    if initial:
        feed[:, -1] = masked[:, -1]
    return feed




class _ShiftRuleCache(CacheStrategy):
    """Shared option handling of the variants that use a shift rule."""

    option_names = frozenset({"cache_steps", "shift_type"})
    default_steps = 4

    def __init__(self, cache_steps: int | None = None, shift_type: str | None = None, **options) -> None:
        super().__init__(**options)
        self.cache_steps = cache_steps or self.default_steps
        self.shift_type = shift_type
        self.feed_next: torch.Tensor | None = None  # ~C
        self.feed_now: torch.Tensor | None = None  # ~prv (None: no cache yet, a full forward)

    @classmethod
    def check(cls, options: dict, family: str, opts: GenerationOptions) -> None:
        check_int("cache_steps", options.get("cache_steps"), 1, allow_none=True)
        shift = options.get("shift_type")
        if shift is not None:
            check_choice("shift_type", shift, SHIFT_TYPES)
        if family == "dream" and shift == "right":
            raise ValueError(
                "diffusion_generate: shift_type='right' is not valid for Dream: Dream reads token j+1's logits at "
                "position j, so caching a decoded position's query leaves its right neighbour without logits (the "
                "original then samples from NaN and writes token 0). Use 'un_right' (the default: cache a position "
                "once its token and its prediction are final) or 'un' (the original's default, most aggressive).")
        if family == "llada" and shift not in (None, "right"):
            raise ValueError(f"diffusion_generate: shift_type={shift!r} needs Dream's logit shift; LLaDA predicts "
                             "token j at position j, so its cache rule is 'right' (the default)")

    def begin(self, state: DecodeState) -> None:
        if self.shift_type is None:
            self.shift_type = "un_right" if state.family.shift_logits else "right"
        self.feed_next = uncacheable(state.masked(), self.shift_type, initial=True)
        self.feed_now = None

    def after_step(self, state: DecodeState, outcome: StepOutcome) -> None:
        self.feed_now = self.feed_next
        self.feed_next = uncacheable(state.masked(), self.shift_type)

    def stats(self) -> dict:
        return {**super().stats(), "cache_steps": self.cache_steps, "shift_type": self.shift_type}


@register_strategy
class DecodedCache(_ShiftRuleCache):
    """dKV-Cache-Decode: decoded tokens (and the prompt) cached one step after decoding, refreshed periodically."""

    name = "decoded"
    option_names = frozenset({"cache_steps", "shift_type", "cache_across_blocks"})

    def __init__(self, cache_across_blocks: bool = False, **options) -> None:
        super().__init__(**options)
        self.across_blocks = cache_across_blocks
        self.llada_timeline = False

    @classmethod
    def check(cls, options: dict, family: str, opts: GenerationOptions) -> None:
        super().check(options, family, opts)
        check_bool("cache_across_blocks", options.get("cache_across_blocks", False))

    def begin(self, state: DecodeState) -> None:
        super().begin(state)
        self.llada_timeline = not state.family.shift_logits and not self.across_blocks

    def begin_block(self, state: DecodeState) -> None:
        if self.llada_timeline:  # the original LLaDA sampler starts every block without a cache
            self.feed_next = uncacheable(state.masked(), self.shift_type, initial=True)
            self.feed_now = None

    def _step_index(self, state: DecodeState) -> int:
        # Counted within the block (Dream's single block: the original's global count), so every block starts
        # with a refresh: a row that waited for slower rows (parallel decoding) then carries no state of its own
        # wait, and equals its single run. Across blocks only when asked for (documented as not batch-exact).
        return state.global_step if self.across_blocks else state.step_in_block

    def plan(self, state: DecodeState) -> StepPlan:
        i = self._step_index(state)
        if self.llada_timeline or not state.family.shift_logits:
            # LLaDA: step 0 plain, step 1 rebuild, multiples of cache_steps rebuild
            full = i <= 1 or i % self.cache_steps == 0
        else:
            full = i % self.cache_steps == 0
        if full or self.feed_now is None:
            self.feed_now = None
            return StepPlan(fed_idx=None, use_kv=True, refresh=True)
        return StepPlan(fed_mask=self.feed_now, use_kv=True)


def _prompt_part(state: DecodeState) -> torch.Tensor:
    """P*: the prompt positions whose K/V prefill keeps (Dream: all but the last prompt token, whose output
    predicts the first generated token; LLaDA: the whole prompt)."""
    keep = torch.zeros_like(state.key_valid)
    end = state.prompt_length - 1 if state.family.shift_logits else state.prompt_length
    keep[:, :end] = True
    return keep


@register_strategy
class PrefillCache(CacheStrategy):
    """dKV-Cache-Prefill: the prompt's K/V computed at step 0 and reused for the whole call."""

    name = "prefill"
    option_names = frozenset({"cache_steps", "shift_type"})  # accepted (the original script passes them), unused

    def begin(self, state: DecodeState) -> None:
        self.fed_after_step0 = ~_prompt_part(state)

    def plan(self, state: DecodeState) -> StepPlan:
        if state.global_step == 0:
            return StepPlan(fed_idx=None, use_kv=True, refresh=True)
        return StepPlan(fed_mask=self.fed_after_step0, use_kv=True)


@register_strategy
class PrefillDecodedCache(_ShiftRuleCache):
    """dKV-Cache-PD: prefill's frozen prompt plus the delayed decode cache; refreshes skip the prompt part."""

    name = "pd"

    def begin(self, state: DecodeState) -> None:
        super().begin(state)
        self.prompt_part = _prompt_part(state)

    def plan(self, state: DecodeState) -> StepPlan:
        if state.global_step == 0:
            self.feed_now = None
            return StepPlan(fed_idx=None, use_kv=True, refresh=True)
        # refreshes counted within the block, so each block starts with one (see DecodedCache._step_index)
        if state.step_in_block % self.cache_steps == 0 or self.feed_now is None:
            self.feed_now = None
            return StepPlan(fed_mask=~self.prompt_part, use_kv=True, refresh=True)
        return StepPlan(fed_mask=self.feed_now, use_kv=True)


def _set_where(mask: torch.Tensor, positions: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``mask`` (B, L) with ``positions`` (B, k) set where ``where`` (B, k): a scatter, no host sync."""
    length = mask.shape[1]
    padded = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)
    padded.scatter_(1, positions.masked_fill(~where, length), True)
    return padded[:, :length]


@register_strategy
class GreedyCache(CacheStrategy):
    """dKV-Cache-Greedy (LLaDA): a pre-drawn order per block; cached steps feed only the active set."""

    name = "greedy"
    option_names = frozenset({"cache_steps", "window_size", "greedy_block_orders"})

    def __init__(self, cache_steps: int | None = None, window_size: int = 0,
                 greedy_block_orders: list | None = None, **options) -> None:
        super().__init__(**options)
        self.cache_steps = cache_steps or 2
        self.window = window_size
        self.injected_orders = greedy_block_orders
        self.active: torch.Tensor | None = None

    @classmethod
    def check(cls, options: dict, family: str, opts: GenerationOptions) -> None:
        if family != "llada":
            raise ValueError("diffusion_generate: cache_type='greedy' needs a model without the logit shift "
                             "(LLaDA); for Dream use 'decoded', 'prefill' or 'pd'")
        if opts.alg != "random":
            raise ValueError("diffusion_generate: cache_type='greedy' decodes in an order drawn in advance, so it "
                             f"needs remasking='random' (alg='random'), got alg={opts.alg!r}")
        if opts.decoding != "vanilla":
            raise ValueError(f"diffusion_generate: decoding={opts.decoding!r} chooses its own decoding order, but "
                             "cache_type='greedy' feeds only the tokens of an order drawn in advance; use "
                             "decoding='vanilla' with it")
        if opts.rule_decides:
            raise ValueError("diffusion_generate: cache_type='greedy' plans each step's active set from the step "
                             "schedule, which threshold/factor decoding does not use; drop threshold/factor or pass "
                             "schedule_floor=True")
        check_int("cache_steps", options.get("cache_steps"), 1, allow_none=True)
        check_int("window_size", options.get("window_size", 0), 0)

    def begin_block(self, state: DecodeState) -> None:
        """Draw (or take the injected) decoding order of this block as a per-position priority."""
        start, end = state.block_start, state.block_end
        priority = torch.full(state.x.shape, float("-inf"), dtype=torch.float64, device=state.x.device)
        if self.injected_orders is not None:
            order = torch.as_tensor(self.injected_orders[state.block_index], device=state.x.device)
            ranks = torch.arange(order.shape[1], 0, -1, device=order.device, dtype=torch.float64)
            priority.scatter_(1, order, ranks.expand(order.shape[0], -1).contiguous())
        else:
            offsets = torch.arange(start, end, device=state.x.device) - state.prompt_length
            priority[:, start:end] = rng.hash_uniform(state.row_seeds[:, None], rng.STREAM_ORDER,
                                                      state.block_index, offsets[None, :])
        self.priority = priority
        self.active = None

    def confidence(self, state: DecodeState, cand_pos: torch.Tensor) -> torch.Tensor | None:
        return self.priority.gather(1, cand_pos.clamp(max=state.length - 1))

    def plan(self, state: DecodeState) -> StepPlan:
        i = state.step_in_block
        if i % self.cache_steps == 0 or self.active is None:
            return StepPlan(fed_idx=None, use_kv=True, refresh=True)
        return StepPlan(fed_mask=self.active, use_kv=True)

    def after_step(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Active set of the next step: its tokens, the tokens just decoded, and their masked neighbours."""
        i, schedule = state.step_in_block, state.schedule
        if i + 1 >= schedule.steps:
            self.active = None
            return
        mask_id = state.mask_id
        masked_before = outcome.x_before == mask_id
        just_decoded = masked_before & (state.x != mask_id)
        still = state.masked()
        ranked = self.priority.masked_fill(~still, float("-inf"))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
        count = schedule.quota[:, i + 1]
        width = min(state.block_end - state.block_start, order.shape[1])  # ≥ any count, known without a sync
        upcoming = order[:, :width]
        upcoming_valid = torch.arange(width, device=order.device)[None, :] < count[:, None]
        active = _set_where(just_decoded, upcoming, upcoming_valid)
        if self.window > 0:
            active = self._add_windows(active, upcoming, upcoming_valid, masked_before)
        self.active = active

    def _add_windows(self, active: torch.Tensor, centres: torch.Tensor, centres_valid: torch.Tensor,
                     eligible_base: torch.Tensor) -> torch.Tensor:
        """For each centre (in order), up to ``window`` masked, not-yet-active neighbours, searched
        alternately left and right outward (p-1, p+1, p-2, p+2, …), across block boundaries."""
        batch, length = active.shape
        distance = torch.arange(1, length, device=active.device)
        offsets = torch.stack([-distance, distance], dim=1).reshape(-1)  # -1, +1, -2, +2, ...
        for k in range(centres.shape[1]):  # one pass per token slot of the step (vectorised over rows)
            probe = centres[:, k:k + 1] + offsets[None, :]
            inside = (probe >= 0) & (probe < length)
            probe_safe = probe.clamp(0, length - 1)
            eligible = inside & eligible_base.gather(1, probe_safe) & ~active.gather(1, probe_safe)
            take = eligible & (eligible.long().cumsum(1) <= self.window) & centres_valid[:, k:k + 1]
            active = _set_where(active, probe_safe, take)
        return active

    def stats(self) -> dict:
        return {**super().stats(), "cache_steps": self.cache_steps, "window_size": self.window}

