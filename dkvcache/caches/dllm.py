"""dLLM-Cache (Liu et al., 2025): prompt and response features refreshed at different intervals, with V-verify
adaptive partial updates (the dLLM-Cache paper and its hooks, as ported by the d2Cache framework).

Every position flows through every layer, but a layer recomputes only some rows and adds cached sublayer outputs
for the others. Per layer it keeps K/V (in the shared buffers), the attention output after the output projection
and the FFN output. At a row's forward t (counted over the whole call, across blocks, as the original):
  prompt rows  [0, P) are recomputed when t % kp == 0,
  response rows [P, L) when t % kr == 0,
  layer 0 always recomputes everything (as the original, commit 1ef9d03).
Between response refreshes, V-verify recomputes ⌊rou·G⌋ response rows per row and layer: the value vectors of
all response rows are recomputed (cheap: one projection) and written to the cache; the rows whose new value is
least similar (cosine) to the cached one get fresh keys, attention and FFN.

Batches: t counts each row's *own* forwards, those where it still has a MASK in its current block. Under parallel
decoding a row that finished its block waits while others finish theirs; during that wait it recomputes only
layer 0 (a function of its unchanged tokens) and leaves every other cached feature alone, so it resumes exactly
where its single run would (padded rows == single runs, tested).

``fed_fraction`` in ``stats`` is, for this strategy, the rows recomputed per layer ÷ all rows, averaged over layers
and forwards (every position still enters the embedding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dkvcache.caches.base import CacheStrategy, StepPlan, register_strategy
from dkvcache.indexing import fixed_indices
from dkvcache.partial_forward import ForwardContext, LayerHook, attention_sublayer, rows_context
from dkvcache.state import DecodeState
from dkvcache.validate import check_int, check_number

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions

# (kp, kr) per task for {family}-{base|inst}, from the d2Cache framework's gen_args (= the d2Cache paper's
# Table 3 and the dLLM-Cache scripts).
PRESETS: dict[str, dict[str, tuple[int, int]]] = {
    "gsm8k": {"llada-base": (25, 5), "llada-inst": (50, 7), "dream-base": (100, 8), "dream-inst": (25, 2)},
    "humaneval": {"llada-base": (50, 5), "llada-inst": (25, 5), "dream-base": (5, 1), "dream-inst": (50, 1)},
    "math-500": {"llada-base": (50, 8), "llada-inst": (50, 1), "dream-base": (100, 4), "dream-inst": (50, 1)},
    "mbpp": {"llada-base": (25, 4), "llada-inst": (100, 5), "dream-base": (25, 8), "dream-inst": (10, 8)},
    "gpqa": {"llada-base": (100, 8), "llada-inst": (50, 6), "dream-base": (100, 8), "dream-inst": (10, 8)},
    "mmlu_pro": {"llada-base": (100, 6), "llada-inst": (50, 3), "dream-base": (25, 2), "dream-inst": (5, 1)},
}
PRESETS["gsm8k_cot"] = PRESETS["gsm8k"]
FALLBACK = (50, 4)  # the framework's value for tasks outside the table


def resolve_preset(preset: str, family: str) -> tuple[int, int]:
    """``"gsm8k"`` (instruct model) or ``"base/gsm8k"`` / ``"inst/gsm8k"`` → (kp, kr) for this model family."""
    variant, _, task = preset.rpartition("/")
    variant = variant or "inst"
    if variant not in ("base", "inst") or task not in PRESETS:
        raise ValueError(f"diffusion_generate: dllm_preset={preset!r} is invalid; allowed: a task in "
                         f"{sorted(PRESETS)}, optionally prefixed by 'base/' or 'inst/' (default inst)")
    return PRESETS[task][f"{family}-{variant}"]


def _with_scratch(features: torch.Tensor) -> torch.Tensor:
    """(B, L, d) → (B, L + 1, d) with a zero scratch row at L."""
    return torch.cat([features, features.new_zeros(features.shape[0], 1, features.shape[2])], dim=1)


def least_similar_rows(v_new: torch.Tensor, v_old: torch.Tensor, count: int) -> torch.Tensor:
    """Per batch row, the ``count`` positions (ascending) whose new value vectors (B, G, d) have the lowest cosine
    similarity to the cached ones."""
    similarity = F.cosine_similarity(v_new, v_old, dim=-1)
    picked = torch.topk(similarity, count, dim=1, largest=False).indices
    return picked.sort(dim=1).values


@register_strategy
class DLLMCache(CacheStrategy):
    """dLLM-Cache through a per-layer hook: the same model code path as every other strategy."""

    name = "dllm"
    option_names = frozenset({"kp", "kr", "rou", "dllm_preset"})

    def __init__(self, kp: int | None = None, kr: int | None = None, rou: float = 0.25,
                 dllm_preset: str | None = None, **options) -> None:
        super().__init__(**options)
        self.kp, self.kr, self.rou, self.preset = kp, kr, rou, dllm_preset

    @classmethod
    def check(cls, options: dict, family: str, opts: GenerationOptions) -> None:
        for name in ("kp", "kr"):
            check_int(name, options.get(name), 1, allow_none=True)
        check_number("rou", options.get("rou", 0.25), 0.0, 1.0)
        if options.get("dllm_preset") is not None:
            resolve_preset(options["dllm_preset"], family)

    def begin(self, state: DecodeState) -> None:
        kp, kr = resolve_preset(self.preset, state.family.name) if self.preset else (50, 2)
        self.kp = self.kp or kp
        self.kr = self.kr or kr
        n_layers = state.model.num_layers
        # Cached sublayer outputs (B, L + 1, d): slot L is a scratch row for padded index entries.
        self.attn_out: list[torch.Tensor | None] = [None] * n_layers
        self.ffn_out: list[torch.Tensor | None] = [None] * n_layers
        self.prompt_length = state.prompt_length
        self.own_forwards = torch.zeros(state.batch, dtype=torch.long, device=state.x.device)
        self.rows_recomputed = torch.zeros((), dtype=torch.long, device=state.x.device)
        self.rows_total = 0

    def plan(self, state: DecodeState) -> StepPlan:
        active = state.masked()[:, state.block_start:state.block_end].any(1)
        t = self.own_forwards
        self.prompt_rows = active & (t % self.kp == 0)
        self.response_rows = active & (t % self.kr == 0)
        self.verify_rows = active & ~self.response_rows if self.rou > 0 else torch.zeros_like(active)
        self.own_forwards = t + active.long()
        # Everything the layer hook branches on, read with the step's one host synchronisation: whether any row
        # verifies, whether every position is recomputed, and the widest row's recompute count (the rows' sets
        # are disjoint parts: prompt, response, or the response's ⌊rou·G⌋ least similar values).
        prompt, response = state.prompt_length, state.length - state.prompt_length
        verify_k = int(self.rou * response)
        full = self.prompt_rows & (self.response_rows | (self.verify_rows & (verify_k >= response)))
        width = (self.prompt_rows * prompt + self.response_rows * response + self.verify_rows * verify_k).max()
        reads = {"refresh": (self.prompt_rows & self.response_rows | ~active).all(),
                 "verify": self.verify_rows.any(), "full": full.all(), "width": width}
        self.plan_now = StepPlan(fed_idx=None, use_kv=True, reads=reads)
        return self.plan_now

    def layer_hook(self) -> LayerHook:
        return self._layer

    def _layer(self, index: int, layer, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, length = x.shape[:2]
        self.rows_total += batch * length
        if index == 0 or self.attn_out[index] is None:
            self.rows_recomputed += batch * length
            return self._all_rows(layer, x, ctx, index)
        start = self.prompt_length
        recompute = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
        recompute[:, :start] = self.prompt_rows[:, None]
        recompute[:, start:] = self.response_rows[:, None]
        values = self.plan_now.read_values
        if values["verify"]:
            recompute |= self._verify_values(layer, x, ctx, index)
        self.rows_recomputed += recompute.sum()
        if values["full"]:
            return self._all_rows(layer, x, ctx, index)
        rows = fixed_indices(recompute, values["width"], length)[0]
        return self._some_rows(layer, x, ctx, index, rows)

    def _all_rows(self, layer, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        attn = attention_sublayer(layer, layer.attn_norm(x), ctx, index)
        hidden = x + attn
        ffn = layer.mlp(layer.mlp_norm(hidden))
        self.attn_out[index], self.ffn_out[index] = _with_scratch(attn), _with_scratch(ffn)
        return hidden + ffn

    def _some_rows(self, layer, x: torch.Tensor, ctx: ForwardContext, index: int, rows: torch.Tensor) -> torch.Tensor:
        """Recompute ``rows`` (B, n; padding entries = L write to the scratch row) and reuse the rest."""
        length = x.shape[1]
        attn_out, ffn_out = self.attn_out[index], self.ffn_out[index]
        if rows.shape[1]:
            safe = rows.clamp(max=length - 1)[..., None].expand(-1, -1, x.shape[-1])
            target = rows[..., None].expand(-1, -1, x.shape[-1])
            fresh = attention_sublayer(layer, layer.attn_norm(x.gather(1, safe)), rows_context(ctx, rows), index)
            attn_out.scatter_(1, target, fresh)
            hidden = x + attn_out[:, :length]
            ffn_out.scatter_(1, target, layer.mlp(layer.mlp_norm(hidden.gather(1, safe))))
        else:
            hidden = x + attn_out[:, :length]
        return hidden + ffn_out[:, :length]

    def _verify_values(self, layer, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        """V-verify for the rows in ``verify_rows``: refresh their response value vectors in the cache and
        return (B, L) the ⌊rou·G⌋ least similar response positions of each of those rows."""
        start, length = self.prompt_length, x.shape[1]
        cached = ctx.kv.cached_values(index, start, length)
        batch, heads, _, head_dim = cached.shape
        v_new = layer.project_v(layer.attn_norm(x[:, start:]))
        v_old = cached.transpose(1, 2).reshape(batch, length - start, heads * head_dim)
        picked = least_similar_rows(v_new, v_old, int(self.rou * (length - start))) + start
        rows = self.verify_rows
        ctx.kv.refresh_values(index, start, v_new.view(batch, length - start, heads, head_dim).transpose(1, 2), rows)
        out = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
        out.scatter_(1, picked, True)
        return out & rows[:, None]

    def stats(self) -> dict:
        fraction = int(self.rows_recomputed) / max(self.rows_total, 1)
        return {**super().stats(), "fed_fraction": fraction, "recompute_fraction": fraction, "kp": self.kp,
                "kr": self.kr, "rou": self.rou}

