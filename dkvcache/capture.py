"""``compile="inductor"`` (what ``compile=True`` means on CUDA): the model forward and the head of every step
compiled per shape with ``torch.compile``; also where ``compile`` is resolved and uncapturable calls are named.
(On CPU ``compile=True`` is the AOT step, :mod:`dkvcache.aot`.)

The step's shapes are static by construction: the fed set is a fixed-width index tensor whose width is a bucket
(``dkvcache.indexing.bucket``) or known in advance (prefix/dual), and the K/V buffers are preallocated. So the
layer stack traces into one graph with no break (``fullgraph=True``) and is compiled per (batch, length, fed
width): a handful of shapes per call. On CPU ``torch.compile`` (inductor) fuses the layer stack; on CUDA the same
call uses ``mode="reduce-overhead"`` (CUDA graphs). The step's head (``dkvcache.head``: logits at the
candidates, proposals and confidences) is a second compiled graph per shape. Compile/capture time is reported
separately in ``stats`` (``compile_s``, ``compiled_shapes``), never mixed into the timed generation.

On CUDA the K/V buffers a compiled forward writes into are marked as static addresses and kept on the model
between calls (:func:`step_kv`): CUDA graphs replay over fixed memory, and ``torch.compile`` skips CUDA graphs for
a graph that mutates an input that is not a static address (``torch/_inductor/cudagraph_utils.py``,
``check_for_mutation``; transformers' ``StaticCache`` marks its buffers for the same reason).

Not captured (eager, with a one-line notice): strategies that install a per-layer hook with data-dependent row
sets or need attention probabilities (``dllm``: per-row recompute sets chosen inside each layer; ``d2``: the
rollout's attention probabilities reduced in a layer hook), decoders that extend the input (``wino``), and calls
with generation hooks or ``full_logits``.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any

import torch

from dkvcache.commit import CommitSettings, step_head_and_commit
from dkvcache.head import HeadSettings, step_head

# The torch.compile backend; tests may switch it to "aot_eager" (same graph capture, no code generation).
BACKEND = "inductor"
# One code object (partial_forward) is compiled for every (model, batch, length, fed width): more than dynamo's
# default 8 versions. Each is a bucketed shape, so the count stays bounded.
RECOMPILE_LIMIT = 256
_NOTICED: set[str] = set()


def mode(option: bool | str, device: torch.device) -> str | None:
    """The capture a call's ``compile`` option asks for on ``device``: None (eager), "aot" (AOTInductor, see
    :mod:`dkvcache.aot`; what ``True`` means on CPU) or "inductor" (``torch.compile`` per bucketed shape; CUDA
    graphs on CUDA, what ``True`` means there)."""
    if option is False:
        return None
    if option is True:
        return "inductor" if device.type == "cuda" else "aot"
    if option == "aot" and device.type != "cpu":
        raise ValueError(f"diffusion_generate: compile='aot' runs on CPU; on {device.type} use compile=True "
                         "(CUDA graphs) or compile='inductor'")
    return option


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


class Compiled:
    """``fn`` compiled per shape (one graph each, no break), with the compile time of new shapes accounted."""

    def __init__(self, fn: Any, device: torch.device, cuda_graphs: bool) -> None:
        mode = "reduce-overhead" if cuda_graphs and device.type == "cuda" else None
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
        self.fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=BACKEND, mode=mode)
        self.backend = BACKEND
        self.shapes: set[tuple] = set()

    def __call__(self, stats: dict, *args: Any) -> Any:
        key = tuple(_shape_key(a) for a in args)
        if key in self.shapes:
            return self.fn(*args)
        start = time.perf_counter()
        out = self.fn(*args)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        stats["compile_s"] = stats.get("compile_s", 0.0) + time.perf_counter() - start
        stats["compiled_shapes"] = stats.get("compiled_shapes", 0) + 1
        self.shapes.add(key)
        return out


class _KVPool:
    """One set of static-address K/V buffers per (batch, length) for a model, lent to one call at a time."""

    def __init__(self) -> None:
        self.free: dict[tuple[int, int], Any] = {}

    def take(self, model: Any, batch: int, length: int) -> Any:
        kv = self.free.pop((batch, length), None)
        if kv is None:
            kv = model.allocate_kv(batch, length)
            for tensor in (*kv.keys, *kv.values):
                torch._dynamo.mark_static_address(tensor)
        else:  # nothing reads a position before a call writes it; zeroed anyway so no call sees another's data
            for tensor in (*kv.keys, *kv.values):
                tensor.zero_()
        return kv

    def give_back(self, kv: Any, batch: int, length: int) -> None:
        self.free[(batch, length)] = kv


def step_kv(model: Any, batch: int, length: int) -> Any:
    """K/V buffers for a captured call on CUDA: static addresses, reused by the next call of the same shape once
    this one has finished (a call still running — e.g. another interleaved session — gets its own set)."""
    pool = getattr(model, "_dkvcache_kv_pool", None)
    if pool is None:
        pool = _KVPool()
        object.__setattr__(model, "_dkvcache_kv_pool", pool)
    return pool.take(model, batch, length)


def release_kv(model: Any, kv: Any) -> None:
    """A finished call's buffers from :func:`step_kv` go back to the model's pool."""
    pool = getattr(model, "_dkvcache_kv_pool", None)
    if pool is not None and kv is not None:
        pool.give_back(kv, kv.keys[0].shape[0], kv.length)


def _shape_key(arg: Any) -> Any:
    """What makes a new graph: tensor shapes and the call's settings (K/V buffers follow from the shapes)."""
    if isinstance(arg, torch.Tensor):
        return tuple(arg.shape)
    if arg is None or isinstance(arg, (HeadSettings, CommitSettings)):
        return arg
    return type(arg).__name__


def _cached(model: Any, attribute: str, build: Any) -> Compiled:
    """A compiled function kept on the model (a plain attribute, not a submodule); rebuilt if the backend changed."""
    existing = getattr(model, attribute, None)
    if existing is None or existing.backend != BACKEND:
        existing = build()
        object.__setattr__(model, attribute, existing)
    return existing


def compiled_forward(model: Any) -> Compiled:
    """``model.partial_forward(ids, positions, key_valid, fed_idx, kv)`` compiled (CUDA graphs on CUDA)."""
    device = next(model.parameters()).device
    return _cached(model, "_dkvcache_compiled", lambda: Compiled(model.partial_forward, device, cuda_graphs=True))


def compiled_head(model: Any) -> Compiled:
    """:func:`dkvcache.head.step_head` for this model compiled. Its outputs live on in the step's decoder (and,
    for some decoders, across steps), so on CUDA it is fused but not replayed from a graph's static buffers."""
    device = next(model.parameters()).device
    return _cached(model, "_dkvcache_compiled_head",
                   lambda: Compiled(functools.partial(step_head, model), device, cuda_graphs=False))


def compiled_head_and_commit(model: Any) -> Compiled:
    """:func:`dkvcache.commit.step_head_and_commit` for this model compiled: the head, the vanilla choice and the
    write as one graph (the plain vanilla rule's step ends there)."""
    device = next(model.parameters()).device
    return _cached(model, "_dkvcache_compiled_commit",
                   lambda: Compiled(functools.partial(step_head_and_commit, model), device, cuda_graphs=False))
