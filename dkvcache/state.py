"""The mutable state of one ``diffusion_generate`` call, shared by the loop and the cache strategy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dkvcache.head import HeadSettings
from dkvcache.options import GenerationOptions
from dkvcache.partial_forward import KVBuffers
from dkvcache.sampling import Family
from dkvcache.schedule import BlockSchedule


@dataclass
class DecodeState:
    """Sequences being denoised plus what a strategy needs to plan a step.

    x (B, L): prompt (left-padded) then the generated region [prompt_length, L).
    positions (B, L): rotary positions (left padding shifts them per row). key_valid (B, L): not a pad.
    Blocks: the loop sets block_start/block_end (absolute positions), step_in_block, steps_in_block (None when
    the parallel rule decides) and ``schedule``. What a step did reaches strategies as a ``StepOutcome``.
    """

    model: Any
    family: Family
    opts: GenerationOptions
    x: torch.Tensor
    positions: torch.Tensor
    key_valid: torch.Tensor
    prompt_length: int
    row_seeds: torch.Tensor
    head_settings: HeadSettings | None = None  # the options the step's head depends on (see dkvcache.head)
    block_index: int = 0
    block_start: int = 0
    block_end: int = 0
    step_in_block: int = 0
    steps_in_block: int | None = 0
    global_step: int = 0
    kv: KVBuffers | None = None
    forwards: int = 0
    full_positions: int = 0
    # Positions fed, for the stats: the plain count of full forwards and of fed sets whose size is known on the
    # host, plus a 0-d count per forward whose set is not (read once, at the end: no host sync per step, and no
    # fed set kept alive).
    fed_counts: list = field(default_factory=list)
    fed_full: int = 0
    refreshes: int = 0
    schedule: BlockSchedule | None = None  # the current block's transfer counts (set by the loop)
    capture_mode: str | None = None  # None (eager), "aot" or "inductor" (see dkvcache.capture.mode)
    capture_blocker: str | None = None  # compile=True: why this call runs eagerly (None = captured)
    commit: Any = None  # CommitSettings when the AOT step also chooses and writes (dkvcache.commit)
    rule_value: torch.Tensor | None = None  # its threshold/factor as data (dkvcache.commit.rule_value)
    # per-call inputs of the AOT step: cos/sin of every position of its forward (inside the package they would
    # be recomputed in every layer's fused kernels), the prompt length as data, whether no key is padding
    rotary: tuple | None = None
    prompt_length_data: torch.Tensor | None = None
    unpadded: bool = False
    capture_stats: dict = field(default_factory=dict)  # compile time of new shapes, excluded from wall time

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    @property
    def mask_id(self) -> int:
        return self.opts.mask_token_id

    @property
    def noise_step(self) -> int:
        """Noise coordinate of the step: (block, step in block), identical for a row in a batch and alone even
        when other rows take longer to finish a block (parallel decoding)."""
        return self.block_index * 1_000_003 + self.step_in_block

    def fed_positions(self) -> int:
        """Positions fed through the model so far, all forwards together (one host read)."""
        if not self.fed_counts:
            return self.fed_full
        return self.fed_full + int(torch.stack(self.fed_counts).sum())

    def masked(self) -> torch.Tensor:
        """(B, L) bool: positions still holding the MASK token."""
        return self.x == self.opts.mask_token_id
