"""The building blocks shared by the Dream and LLaDA models: RMSNorm, rotary embeddings and the partial forward.

A *partial forward* runs the transformer over a per-row subset of positions ("fed" positions) while every layer
reads the keys/values of all other positions from preallocated buffers. Strategies (caches) decide which
positions are fed; this module only knows how to run them. See the README's design section.

Numerics: norms and rotary embeddings are computed in ``promote(model dtype, float32)``. For bf16/fp32 models this
is exactly what the original Dream/LLaDA code does; float64 models stay float64 throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and rotary embeddings are computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """Root-mean-square norm without bias (Qwen2 / OLMo style)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        work = compute_dtype(dtype)
        h = hidden if work == dtype else hidden.to(work)  # skip no-op casts: each is a dispatched call
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (h if work == dtype else h.to(dtype))


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (…, head_dim) for integer positions, half-split (NeoX) layout, in float32.

    Float32 like the originals: the angles themselves are the reference's, whatever the model dtype.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate_in_model_dtype: bool) -> torch.Tensor:
    """Rotate ``x`` (B, H, n, D) by cos/sin (B, 1, n, D).

    ``rotate_in_model_dtype=True`` is Dream's rule (cos/sin cast to the model dtype, rotation in that dtype);
    ``False`` is LLaDA's rule (rotation in float32 or better, cast back).
    """
    dtype = x.dtype
    work = dtype if rotate_in_model_dtype else compute_dtype(dtype)
    if cos.dtype != work:
        cos, sin = cos.to(work), sin.to(work)
    if work == dtype:
        return x * cos + _rotate_half(x) * sin
    xw = x.to(work)
    return (xw * cos + _rotate_half(xw) * sin).to(dtype)


class KVBuffers:
    """Per-layer post-RoPE key/value buffers of shape (B, n_kv_heads, L + 1, head_dim).

    Slot ``L`` is a scratch slot: padded entries of a ragged fed set write there, and its key is never attended.
    Keys are stored after rotation because positions never move, so rotating once is exact.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, length: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, n_kv_heads, length + 1, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.length = length

    @classmethod
    def wrap(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVBuffers:
        """Buffers over existing per-layer tensors (B, Hkv, L + 1, D), not copied (a compiled step's inputs)."""
        buffers = cls.__new__(cls)
        buffers.keys, buffers.values, buffers.length = keys, values, keys[0].shape[2] - 1
        return buffers

    def update(self, layer: int, index: torch.Tensor | None, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store fresh k/v (B, Hkv, n, D) at the positions ``index`` (the fed positions expanded to k's shape,
        :meth:`ForwardContext.scatter_index`; ``None``: all L positions, in order); return every layer
        key/value (B, Hkv, L + 1, D) to attend over."""
        if index is None:
            self.keys[layer][:, :, : self.length] = k
            self.values[layer][:, :, : self.length] = v
        else:
            self.keys[layer].scatter_(2, index, k)
            self.values[layer].scatter_(2, index, v)
        return self.keys[layer], self.values[layer]

    def cached_values(self, layer: int, start: int, end: int) -> torch.Tensor:
        """The stored values of positions [start, end) (B, Hkv, end − start, D) (a view)."""
        return self.values[layer][:, :, start:end]

    def refresh_values(self, layer: int, start: int, v: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrite the values of positions [start, start + n) with ``v`` (B, Hkv, n, D) in batch rows ``rows``
        (B,) bool only, keeping their keys (dLLM-Cache's V-verify)."""
        end = start + v.shape[2]
        cached = self.values[layer][:, :, start:end]
        self.values[layer][:, :, start:end] = torch.where(rows[:, None, None, None], v, cached)


class DecoderLayer(Protocol):
    """What a transformer block must offer the partial forward and layer hooks (Dream's and LLaDA's do)."""

    head_dim: int
    rotate_in_model_dtype: bool  # Dream rotates in the model dtype, LLaDA in float32

    def attn_norm(self, h: torch.Tensor) -> torch.Tensor: ...
    def mlp_norm(self, h: torch.Tensor) -> torch.Tensor: ...
    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def project_v(self, x: torch.Tensor) -> torch.Tensor: ...
    def project_out(self, attn: torch.Tensor) -> torch.Tensor: ...
    def mlp(self, h: torch.Tensor) -> torch.Tensor: ...


class DiffusionBackbone(Protocol):
    """What a model must offer :class:`PartialForwardMixin` (Dream's and LLaDA's classes do)."""

    config: Any

    def _embed(self, ids: torch.Tensor) -> torch.Tensor: ...
    def _layers(self) -> nn.ModuleList: ...
    def _final_norm(self, h: torch.Tensor) -> torch.Tensor: ...
    def _lm_head(self, h: torch.Tensor) -> torch.Tensor: ...


# A per-layer override: (layer index, layer, hidden (B, n, d), context) -> new hidden. Strategies that need
# more than "one fed subset through every layer" (dLLM-Cache) install one; everything else uses `layer_forward`.
LayerHook = Callable[[int, DecoderLayer, torch.Tensor, "ForwardContext"], torch.Tensor]


@dataclass
class ForwardContext:
    """Everything a layer needs for one (partial) forward.

    positions:  (B, n) rotary positions of the fed tokens.
    fed_idx:    (B, n) sequence positions of the fed tokens, or None when every position is fed in order.
    key_valid:  (B, Lk) which keys may be attended (Lk = L + 1 with buffers, n without).
    kv:         buffers to write fresh K/V into and attend over; None = attend over the fed tokens only.
    want_attn_probs: record softmax attention probabilities of the fed queries (per layer, (B, H, n, Lk)).
    extra_mask: optional (B or 1, n, Lk) per-query key mask ANDed with key_valid (WINO's leave-one-out shadow).
    all_keys_valid: the caller guarantees key_valid is True for every real position (no padding, no extra
        mask): attention then runs over the sequence's keys without a mask (SDPA's faster unmasked path).
    """

    positions: torch.Tensor
    fed_idx: torch.Tensor | None
    key_valid: torch.Tensor
    kv: KVBuffers | None = None
    layer_hook: LayerHook | None = None
    want_attn_probs: bool = False
    attn_probs: list = field(default_factory=list)
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    extra_mask: torch.Tensor | None = None
    all_keys_valid: bool = False
    # Per-forward tables shared by every layer (built once, not once per layer): rotary cos/sin per work dtype
    # as (B, 1, n, D), and the attention mask (B, 1, 1 or n, Lk).
    cache: dict = field(default_factory=dict)

    def rotary(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin as (B, 1, n, D) in ``dtype``."""
        if dtype not in self.cache:
            self.cache[dtype] = (self.cos[:, None].to(dtype), self.sin[:, None].to(dtype))
        return self.cache[dtype]

    def scatter_index(self, k: torch.Tensor) -> torch.Tensor | None:
        """``fed_idx`` expanded to the fresh keys' shape (B, Hkv, n, D), the K/V buffers' scatter index (built
        once per forward; kept here, not on the buffers, so a compiled forward carries no state between calls)."""
        if self.fed_idx is None:
            return None
        if "scatter" not in self.cache:
            self.cache["scatter"] = self.fed_idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        return self.cache["scatter"]

    def attn_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Which keys each query may attend: the key-padding mask, ANDed with ``extra_mask`` when given. With a
        ``dtype``, as the additive mask SDPA would build from it on every call (0 / −inf), built once here."""
        if "mask" not in self.cache:
            mask = self.key_valid[:, None, None, :]
            if self.extra_mask is not None:
                mask = mask & self.extra_mask[:, None]
            self.cache["mask"] = mask
        if dtype is None:
            return self.cache["mask"]
        if ("additive", dtype) not in self.cache:
            zero = torch.zeros((), dtype=dtype, device=self.key_valid.device)
            self.cache[("additive", dtype)] = torch.where(self.cache["mask"], zero, float("-inf"))
        return self.cache[("additive", dtype)]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bidirectional attention of q (B, H, n, D) over k/v (B, Hkv, Lk, D) with a key mask (B, 1, 1 or n, Lk), or
    none when every key may be attended (not with ``want_probs``).

    Only keys are masked, never query rows, so no row is ever fully masked (no NaN from pad rows).
    With ``want_probs`` the probabilities are computed explicitly for these queries (d2Cache's rollout needs
    them); otherwise SDPA runs, with GQA handled by the kernel instead of repeating K/V heads.
    The mask is :meth:`ForwardContext.attn_mask` (boolean with ``want_probs``, else additive): key padding, ANDed
    with an optional per-query mask whose caller keeps at least one key per query (WINO's shadow queries always
    see the prompt).
    """
    if not want_probs:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        return out, None
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    scores = scores.masked_fill(~mask, float("-inf"))  # want_probs: a boolean mask
    probs = torch.softmax(scores, dim=-1)
    return probs @ v, probs


def attention_sublayer(layer: nn.Module, normed: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
    """Attention of one layer for the fed tokens: project, rotate, store K/V, attend, project out."""
    batch, n, _ = normed.shape
    q, k, v = layer.project_qkv(normed)
    q = q.view(batch, n, -1, layer.head_dim).transpose(1, 2)
    k = k.view(batch, n, -1, layer.head_dim).transpose(1, 2)
    v = v.view(batch, n, -1, layer.head_dim).transpose(1, 2)
    work = q.dtype if layer.rotate_in_model_dtype else compute_dtype(q.dtype)
    cos, sin = ctx.rotary(work)
    q = apply_rotary(q, cos, sin, layer.rotate_in_model_dtype)
    k = apply_rotary(k, cos, sin, layer.rotate_in_model_dtype)
    if ctx.kv is not None:
        k, v = ctx.kv.update(index, ctx.scatter_index(k), k, v)
    if ctx.all_keys_valid:  # nothing to mask but the scratch slot, which is left out
        keys = ctx.kv.length if ctx.kv is not None else k.shape[2]
        k, v, mask = k[:, :, :keys], v[:, :, :keys], None
    else:
        mask = ctx.attn_mask(None if ctx.want_attn_probs else q.dtype)
    out, probs = attention(q, k, v, mask, ctx.want_attn_probs)
    if probs is not None:
        ctx.attn_probs.append(probs)
    out = out.transpose(1, 2).reshape(batch, n, -1)
    return layer.project_out(out)


def rows_context(ctx: ForwardContext, rows: torch.Tensor) -> ForwardContext:
    """The context for recomputing only ``rows`` (B, n) of a forward over every position (padding entries = L).

    Used by layer hooks that recompute a subset of rows inside a full-length forward (dLLM-Cache).
    """
    safe = rows.clamp(max=ctx.positions.shape[1] - 1)
    index = safe[..., None].expand(-1, -1, ctx.cos.shape[-1])
    extra = None
    if ctx.extra_mask is not None:
        extra = ctx.extra_mask.expand(rows.shape[0], -1, -1)
        extra = extra.gather(1, safe[..., None].expand(-1, -1, extra.shape[-1]))
    return ForwardContext(positions=ctx.positions.gather(1, safe), fed_idx=rows, key_valid=ctx.key_valid, kv=ctx.kv,
                          want_attn_probs=ctx.want_attn_probs, attn_probs=ctx.attn_probs,
                          cos=ctx.cos.gather(1, index), sin=ctx.sin.gather(1, index), extra_mask=extra)


def layer_forward(layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
    """The standard pre-norm block: h += Attn(norm1(h)); h += MLP(norm2(h))."""
    hidden = hidden + attention_sublayer(layer, layer.attn_norm(hidden), ctx, index)
    return hidden + layer.mlp(layer.mlp_norm(hidden))


def run_layers(layers: nn.ModuleList, hidden: torch.Tensor, ctx: ForwardContext, head_dim: int,
               theta: float) -> torch.Tensor:
    """Run every layer over the fed tokens; a strategy's layer hook replaces the standard block when set."""
    if ctx.cos is None:
        ctx.cos, ctx.sin = rotary_cos_sin(ctx.positions, head_dim, theta)
    for index, layer in enumerate(layers):
        if ctx.layer_hook is not None:
            hidden = ctx.layer_hook(index, layer, hidden, ctx)
        else:
            hidden = layer_forward(layer, hidden, ctx, index)
    return hidden


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions for a left-padded batch: real tokens count from 0, pads get 0 (they are never attended)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PartialForwardMixin:
    """Gives a model (with ``embed``, ``layers``, ``final_norm``, ``lm_head_module``) the two forwards of dkvcache.

    Subclasses provide ``_embed(ids)``, ``_layers()``, ``_final_norm(h)``, ``_lm_head(h)`` (see
    :class:`DiffusionBackbone`; layers follow :class:`DecoderLayer`); their config provides ``rope_theta``,
    ``head_dim`` and ``num_key_value_heads``.
    """

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self._layers())

    @property
    def _rope_theta(self) -> float:
        return float(self.config.rope_theta)

    @property
    def _head_dim(self) -> int:
        return self.config.head_dim

    @property
    def _n_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    def allocate_kv(self, batch: int, length: int) -> KVBuffers:
        """Buffers for a partial forward over sequences of ``length`` positions."""
        param = next(self.parameters())
        return KVBuffers(self.num_layers, batch, self._n_kv_heads, length, self._head_dim,
                         param.device, param.dtype)

    def partial_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                        fed_idx: torch.Tensor | None = None, kv: KVBuffers | None = None,
                        layer_hook: LayerHook | None = None, want_attn_probs: bool = False,
                        attn_probs_out: list | None = None, extra_mask: torch.Tensor | None = None,
                        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                        all_keys_valid: bool = False) -> torch.Tensor:
        """Run the fed positions through the model; return their hidden states before the final norm.

        input_ids, positions, key_valid: (B, L) for the whole sequence.
        fed_idx: (B, n) positions to feed; padding entries must equal ``L`` (the scratch slot). None = all.
        kv: K/V buffers (from ``allocate_kv``). Fresh K/V of fed positions are written there and every query
            attends over all buffered keys. None = a plain forward over the fed tokens only (needs fed_idx=None).
        extra_mask: optional (B or 1, n, L) bool, which keys each fed query may see, ANDed with key_valid
            (default None: the key-padding mask alone, the fast path).
        rotary: optional (cos, sin) of every position, (B, L, head_dim), as :func:`rotary_cos_sin` gives them
            for ``positions``; the fed rows are gathered instead of recomputed (a compiled step passes them:
            inductor would otherwise recompute the angles inside every layer's fused kernels).
        all_keys_valid: the caller guarantees ``key_valid`` is all True (no padding); attention then runs
            without a mask (an AOT step built for unpadded inputs passes it). Not with ``extra_mask`` or
            ``want_attn_probs``.
        Returns (B, n, hidden) or (B, L, hidden).
        """
        if all_keys_valid and (extra_mask is not None or want_attn_probs):
            raise ValueError("partial_forward: all_keys_valid=True runs attention without a mask; it cannot be "
                             "combined with extra_mask or want_attn_probs")
        length = input_ids.shape[1]
        cos, sin = rotary if rotary is not None else (None, None)
        if fed_idx is None:
            ids, pos = input_ids, positions
        else:
            if kv is None:
                raise ValueError("partial_forward: fed_idx needs kv buffers (pass kv=model.allocate_kv(...))")
            gather_idx = fed_idx.clamp(max=length - 1)
            ids, pos = input_ids.gather(1, gather_idx), positions.gather(1, gather_idx)
            if rotary is not None:
                rows = gather_idx[..., None].expand(-1, -1, cos.shape[-1])
                cos, sin = cos.gather(1, rows), sin.gather(1, rows)
        if kv is not None:
            keys_ok = torch.cat([key_valid, key_valid.new_zeros(key_valid.shape[0], 1)], dim=1)
            if extra_mask is not None:  # the scratch slot is never attended
                extra_mask = torch.cat([extra_mask, extra_mask.new_zeros(*extra_mask.shape[:2], 1)], dim=2)
        else:
            keys_ok = key_valid
        ctx = ForwardContext(positions=pos, fed_idx=fed_idx, key_valid=keys_ok, kv=kv, layer_hook=layer_hook,
                             want_attn_probs=want_attn_probs, extra_mask=extra_mask, cos=cos, sin=sin,
                             all_keys_valid=all_keys_valid)
        hidden = run_layers(self._layers(), self._embed(ids), ctx, self._head_dim, self._rope_theta)
        if attn_probs_out is not None:  # for analysis; a layer hook may consume them first (d2Cache does)
            attn_probs_out.extend(ctx.attn_probs)
        return hidden

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on the given hidden states only (the sampler asks for the few rows it needs)."""
        return self._lm_head(self._final_norm(hidden))

    def _plain_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        hidden = self.partial_forward(input_ids, position_ids, attention_mask)
        return self.logits_from_hidden(hidden)
