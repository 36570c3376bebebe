"""dLLM-Cache (Liu et al., 2025): prompt and response features refreshed at different intervals, with V-verify
adaptive partial updates. Spec: ../shared/spec/d2cache-and-dllmcache.md §3.

Every position flows through every layer, but a layer recomputes only some rows and adds cached sublayer outputs
for the others. Per layer it keeps K/V (in the shared buffers), the attention output after the output projection
and the FFN output. At forward t (counted within the block; the original counts over the whole call, which is
the same with one block but would tie a row's schedule to the rows it is batched with under parallel decoding):
  prompt rows  [0, P) are recomputed when t % kp == 0,
  response rows [P, L) when t % kr == 0,
  layer 0 always recomputes everything (as the original, commit 1ef9d03).
Between response refreshes, V-verify recomputes ⌊rou·G⌋ response rows per row and layer: the value vectors of
all response rows are recomputed (cheap: one projection) and written to the cache; the rows whose new value is
least similar (cosine) to the cached one get fresh keys, attention and FFN.

``fed_fraction`` in ``stats`` is, for this strategy, the rows recomputed per layer ÷ all rows, averaged over layers
and forwards (every position still enters the embedding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dkvcache.caches.base import CacheStrategy, StepPlan, register_strategy
from dkvcache.caches.dkv import _positive_int
from dkvcache.partial_forward import ForwardContext, attention_sublayer, rows_context
from dkvcache.state import DecodeState

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
    def check(cls, options: dict, family: str, opts) -> None:
        for name in ("kp", "kr"):
            if options.get(name) is not None:
                _positive_int(name, options[name], cls.name)
        rou = options.get("rou", 0.25)
        if isinstance(rou, bool) or not isinstance(rou, (int, float)) or not 0 <= rou <= 1:
            raise ValueError(f"diffusion_generate: rou={rou!r} is invalid; allowed: a number in [0, 1]")
        if options.get("dllm_preset") is not None:
            resolve_preset(options["dllm_preset"], family)

    def begin(self, state: DecodeState) -> None:
        kp, kr = resolve_preset(self.preset, state.family.name) if self.preset else (50, 2)
        self.kp = self.kp or kp
        self.kr = self.kr or kr
        n_layers = len(state.model._layers())
        self.attn_out: list[torch.Tensor | None] = [None] * n_layers
        self.ffn_out: list[torch.Tensor | None] = [None] * n_layers
        self.prompt_length = state.prompt_length
        self.forward_index = -1
        self.rows_recomputed = 0
        self.rows_total = 0

    def plan(self, state: DecodeState) -> StepPlan:
        # Forwards are counted within the block (the original counts over the call; identical with one block),
        # so every block starts with a full refresh and a row that waited for slower rows equals its single run.
        self.forward_index = state.step_in_block
        self.refresh_prompt = self.forward_index % self.kp == 0
        self.refresh_response = self.forward_index % self.kr == 0
        return StepPlan(fed_idx=None, use_kv=True, refresh=self.refresh_prompt and self.refresh_response)

    def layer_hook(self):
        return self._layer

    def _layer(self, index: int, layer, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        first = self.attn_out[index] is None
        prompt = self.refresh_prompt or index == 0 or first
        response = self.refresh_response or index == 0 or first
        length, start = x.shape[1], self.prompt_length
        self.rows_total += length
        if prompt and response:
            self.rows_recomputed += length
            return self._all_rows(layer, x, ctx, index)
        parts = []
        if prompt:
            parts.append(torch.arange(start, device=x.device).expand(x.shape[0], -1))
        if response:
            parts.append(torch.arange(start, length, device=x.device).expand(x.shape[0], -1))
        elif self.rou > 0:
            parts.append(self._verify_values(layer, x, ctx, index))
        rows = torch.cat(parts, dim=1) if parts else x.new_zeros((x.shape[0], 0), dtype=torch.long)
        self.rows_recomputed += rows.shape[1]
        return self._some_rows(layer, x, ctx, index, rows)

    def _all_rows(self, layer, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        attn = attention_sublayer(layer, layer.attn_norm(x), ctx, index)
        hidden = x + attn
        ffn = layer.mlp(layer.mlp_norm(hidden))
        self.attn_out[index], self.ffn_out[index] = attn, ffn
        return hidden + ffn

    def _some_rows(self, layer, x: torch.Tensor, ctx: ForwardContext, index: int, rows: torch.Tensor) -> torch.Tensor:
        attn_out, ffn_out = self.attn_out[index], self.ffn_out[index]
        if rows.shape[1]:
            gather = rows[..., None].expand(-1, -1, x.shape[-1])
            fresh = attention_sublayer(layer, layer.attn_norm(x.gather(1, gather)), rows_context(ctx, rows), index)
            attn_out.scatter_(1, gather, fresh)
            hidden = x + attn_out
            ffn_out.scatter_(1, gather, layer.mlp(layer.mlp_norm(hidden.gather(1, gather))))
        else:
            hidden = x + attn_out
        return hidden + ffn_out

    def _verify_values(self, layer, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        """V-verify: refresh every response value vector, return the ⌊rou·G⌋ least similar response rows."""
        start, length = self.prompt_length, x.shape[1]
        batch, heads, _, head_dim = ctx.kv.values[index].shape
        v_new = layer.project_v(layer.attn_norm(x[:, start:]))
        cached = ctx.kv.values[index][:, :, start:length]
        v_old = cached.transpose(1, 2).reshape(batch, length - start, heads * head_dim)
        rows = least_similar_rows(v_new, v_old, int(self.rou * (length - start))) + start
        ctx.kv.values[index][:, :, start:length] = v_new.view(batch, length - start, heads, head_dim).transpose(1, 2)
        return rows

    def stats(self) -> dict:
        fraction = self.rows_recomputed / max(self.rows_total, 1)
        return {**super().stats(), "fed_fraction": fraction, "recompute_fraction": fraction, "kp": self.kp,
                "kr": self.kr, "rou": self.rou}
