"""The strategy interface every cache implements, and the registry that finds them by name.

A strategy decides, before each step, which positions are fed through the model (the rest is read from the K/V
buffers), and does its bookkeeping after the step. It never touches layers' internals; strategies that need a
per-layer decision install a layer hook (see ``dkvcache.partial_forward.LayerHook``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from dkvcache.partial_forward import LayerHook
from dkvcache.registry import Registry

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions
    from dkvcache.state import DecodeState


@dataclass
class StepPlan:
    """What to feed this step: ``fed_mask`` or ``fed_idx`` (neither = every position).

    fed_mask: (B, L) bool, the positions to feed; the loop turns it into a ``fed_idx`` whose width is a bucket
              (a power of two) read in the step's one host sync. Prefer it for per-row ragged sets.
    fed_idx: (B, n) positions, ascending per row, padding entries equal to the sequence length L; for sets whose
             width is known without looking at the data (prefix/dual: the block, the suffix).
    fed_count: with ``fed_idx``, its real (non-padding) entries over all rows when the strategy knows the number
             without reading data (the loop counts them otherwise).
    use_kv:  read/write the K/V buffers (False only for strategies that never cache).
    refresh: this step recomputes everything the cache holds (counted in ``stats``).
    reads:   0-dim integer/bool tensors the strategy needs as Python values this step (a layer hook's branch or
             width); the loop reads them in the step's one host synchronisation into ``read_values``, before the
             forward. A read named ``"refresh"`` sets ``refresh``.
    A plan must be safe to discard: the loop may find the block finished after planning and not run the step.
    """

    fed_idx: torch.Tensor | None = None
    fed_mask: torch.Tensor | None = None
    fed_count: int | None = None
    use_kv: bool = False
    refresh: bool = False
    reads: dict[str, torch.Tensor] = field(default_factory=dict)
    read_values: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StepOutcome:
    """What one step did, handed to :meth:`CacheStrategy.after_step` (read-only; in the spirit of the d2Cache
    framework's ``on_step_end(frame, delta)``).

    fed_idx:    (B, n) positions fed this step (padding = L), or None when every position was fed.
    candidates: (B, m) the still-masked positions of the block considered (padding = L), ``valid`` (B, m).
    confidence: (B, m) their confidences (after a decoder's adjustment, e.g. PC-sampler; before the prior).
    transfer:   (B, m) which candidates were unmasked.
    x_before:   (B, L) the sequences before the write (``state.x`` holds them after).
    """

    fed_idx: torch.Tensor | None
    candidates: torch.Tensor
    valid: torch.Tensor
    confidence: torch.Tensor
    transfer: torch.Tensor
    x_before: torch.Tensor


class CacheStrategy:
    """Base class: feeds every position every step (no cache). Subclasses override what they need."""

    name: ClassVar[str] = "none"
    option_names: ClassVar[frozenset[str]] = frozenset()
    default_block_length: ClassVar[int | None] = None  # block-wise strategies: used when none is given
    wants_attention: ClassVar[bool] = False  # ask the forward for attention probabilities of the fed queries
    supports_cfg: ClassVar[bool] = False  # classifier-free guidance doubles the batch: only no cache handles it
    switch: ClassVar[tuple[str, bool] | None] = None  # a boolean alias selecting this strategy: (option, value)

    def __init__(self, **options) -> None:
        """Options are the names in ``option_names``, already validated by :meth:`check`."""

    @classmethod
    def check(cls, options: dict, family: str, opts: GenerationOptions) -> None:
        """Validate this strategy's options (raise ValueError/TypeError) before any compute."""

    def begin(self, state: DecodeState) -> None:
        """Called once per generate call, after the state is built."""

    def begin_block(self, state: DecodeState) -> None:
        """Called at the start of every block (``state.block_start``/``block_end`` are set)."""

    def plan(self, state: DecodeState) -> StepPlan:
        """Which positions to feed at ``state.step_in_block``."""
        return StepPlan()

    def after_step(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Bookkeeping once the step's tokens are written into ``state.x``."""

    def confidence(self, state: DecodeState, cand_pos: torch.Tensor) -> torch.Tensor | None:
        """Optional (B, m) scores replacing the sampler's confidences (greedy: its pre-drawn order)."""
        return None

    def layer_hook(self) -> LayerHook | None:
        """An optional per-layer override for the next forward (None = the standard block)."""
        return None

    def stats(self) -> dict:
        """Strategy-specific entries for ``DiffusionOutput.stats`` (the loop adds forwards, refreshes …)."""
        return {}


_REGISTRY: Registry[CacheStrategy] = Registry("cache_type")


def register_strategy(cls: type[CacheStrategy]) -> type[CacheStrategy]:
    """Class decorator: make a strategy available as ``cache_type=cls.name`` (names are unique)."""
    return _REGISTRY.register(cls)


def get_strategy(name: str) -> type[CacheStrategy]:
    """The strategy class registered as ``name`` (ValueError naming the allowed ones otherwise)."""
    return _REGISTRY.get(name)


def available_strategies() -> dict[str, frozenset[str]]:
    """Registered strategy names and the option names each accepts."""
    return {name: cls.option_names for name, cls in _REGISTRY.classes.items()}


def default_block_lengths() -> dict[str, int]:
    """Strategies that are block-wise by nature, with the block_length they use when the caller gives none."""
    return {name: cls.default_block_length for name, cls in _REGISTRY.classes.items() if cls.default_block_length}


def switches() -> dict[str, dict[bool, str]]:
    """Boolean aliases that select a strategy, e.g. ``{"dual_cache": {True: "dual", False: "prefix"}}``."""
    out: dict[str, dict[bool, str]] = {}
    for name, cls in _REGISTRY.classes.items():
        if cls.switch is not None:
            option, value = cls.switch
            out.setdefault(option, {})[value] = name
    return out


class NoCache(CacheStrategy):
    """``cache_type="none"``: every position fed every step."""

    supports_cfg = True


register_strategy(NoCache)
