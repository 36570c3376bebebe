"""``diffusion_generate(..., compile=True)``: the model forward of every step compiled once per shape.

The step's shapes are static by construction: the fed set is a fixed-width index tensor whose width is a bucket
(``dkvcache.indexing.bucket``) or known in advance (prefix/dual), and the K/V buffers are preallocated. So the
layer stack traces into one graph with no break (``fullgraph=True``) and is compiled per (batch, length, fed
width): a handful of shapes per call. On CPU ``torch.compile`` (inductor) fuses the layer stack; on CUDA the same
call uses ``mode="reduce-overhead"`` (CUDA graphs). Compile/capture time is reported separately in ``stats``
(``compile_s``, ``compiled_shapes``), never mixed into the timed generation.

Not captured (eager, with a one-line notice): strategies that install a per-layer hook with data-dependent row
sets or need attention probabilities (``dllm``: per-row recompute sets chosen inside each layer; ``d2``: the
rollout's attention probabilities reduced in a layer hook), decoders that extend the input (``wino``), and calls
with generation hooks or ``full_logits``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

# The torch.compile backend; tests may switch it to "aot_eager" (same graph capture, no code generation).
BACKEND = "inductor"
# One code object (partial_forward) is compiled for every (model, batch, length, fed width): more than dynamo's
# default 8 versions. Each is a bucketed shape, so the count stays bounded.
RECOMPILE_LIMIT = 256
_NOTICED: set[str] = set()


def blocker(strategy: Any, has_extension: bool, opts: Any) -> str | None:
    """Why this call's forward cannot be captured (None = it can)."""
    if strategy.layer_hook() is not None or strategy.wants_attention:
        return (f"cache_type={opts.cache_type!r} runs a per-layer hook (data-dependent rows or attention "
                "probabilities)")
    if has_extension:
        return f"decoding={opts.decoding!r} appends a data-dependent extension to the input"
    if opts.full_logits or opts.generation_logits_hook_func or opts.generation_tokens_hook_func:
        return "full_logits / generation hooks need the whole (B, L, V) logits in Python"
    return None


def notice(reason: str) -> None:
    """Say once per reason that the call runs eagerly."""
    if reason not in _NOTICED:
        _NOTICED.add(reason)
        warnings.warn(f"diffusion_generate(compile=True): running eagerly because {reason}", stacklevel=4)


class CompiledForward:
    """The model's ``partial_forward`` compiled per shape, with the compile time of new shapes accounted."""

    def __init__(self, model: Any) -> None:
        device = next(model.parameters()).device
        mode = "reduce-overhead" if device.type == "cuda" else None
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
        self.fn = torch.compile(model.partial_forward, fullgraph=True, dynamic=False, backend=BACKEND, mode=mode)
        self.backend = BACKEND
        self.shapes: set[tuple] = set()

    def __call__(self, stats: dict, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                 fed_idx: torch.Tensor | None, kv: Any) -> torch.Tensor:
        key = (tuple(ids.shape), None if fed_idx is None else tuple(fed_idx.shape), kv is None)
        if key in self.shapes:
            return self.fn(ids, positions, key_valid, fed_idx=fed_idx, kv=kv)
        start = time.perf_counter()
        out = self.fn(ids, positions, key_valid, fed_idx=fed_idx, kv=kv)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        stats["compile_s"] = stats.get("compile_s", 0.0) + time.perf_counter() - start
        stats["compiled_shapes"] = stats.get("compiled_shapes", 0) + 1
        self.shapes.add(key)
        return out


def compiled_forward(model: Any) -> CompiledForward:
    """The model's compiled forward (built on first use, kept on the model; rebuilt if the backend changed)."""
    existing = getattr(model, "_dkvcache_compiled", None)
    if existing is None or existing.backend != BACKEND:
        existing = CompiledForward(model)
        object.__setattr__(model, "_dkvcache_compiled", existing)  # a plain attribute, not a submodule
    return existing
