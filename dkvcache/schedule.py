"""The block schedule: how many tokens each step of a block transfers. The one place it is computed.

LLaDA ("quota"): n // steps per step, the remainder on the first steps, fixed at the block start.
Dream ("linspace"): int(m · (1 − s/t)) of the m still-masked candidates with float32 timesteps, everything at the
block's last step. With ``threshold``/``factor`` and no ``schedule_floor`` there is no schedule (``steps`` is
None): the parallel rule decides alone and a block runs until it has no MASK.
Strategies read it from ``state.schedule`` (d2Cache plans the next step's decodable floor from it; greedy its
active set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dkvcache.sampling import linspace_count, linspace_ratios, llada_quota


@dataclass(frozen=True)
class BlockSchedule:
    """Counts of the current block. ``steps`` None: no schedule (the parallel rule decides).

    quota: (B, steps) LLaDA counts drawn at the block start from each row's masked count (None for Dream).
    ratios: (steps,) Dream's float32 fractions 1 - s/t of each step, computed once (None for LLaDA).
    """

    kind: str
    steps: int | None
    eps: float
    quota: torch.Tensor | None = None
    ratios: torch.Tensor | None = None

    @classmethod
    def start(cls, kind: str, steps: int | None, eps: float, masked_in_block: torch.Tensor) -> BlockSchedule:
        """The schedule of a block whose rows hold ``masked_in_block`` (B,) MASK tokens at its start."""
        if steps is None:
            return cls(kind, steps, eps)
        if kind == "quota":
            return cls(kind, steps, eps, quota=llada_quota(masked_in_block, steps))
        return cls(kind, steps, eps, ratios=linspace_ratios(steps, eps, masked_in_block.device))

    def count(self, step: int, masked: torch.Tensor) -> torch.Tensor:
        """(B,) tokens to transfer at ``step`` when rows hold ``masked`` (B,) candidates; zeros without a schedule
        (the rule's own minimum of one then applies)."""
        if self.steps is None:
            return torch.zeros_like(masked)
        if self.quota is not None:
            return self.quota[:, min(step, self.steps - 1)]
        if step >= self.steps - 1:
            return masked
        return linspace_count(masked, self.ratios[step])

    def fresh_count(self, masked: torch.Tensor) -> torch.Tensor:
        """(B,) the count of step 0 of a new block whose rows hold ``masked`` (B,) MASK tokens."""
        if self.steps is None:
            return torch.zeros_like(masked)
        if self.kind == "quota":
            return llada_quota(masked, self.steps)[:, 0]
        return self.count(0, masked)
