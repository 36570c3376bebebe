"""Turning per-row boolean masks into padded index tensors (the ragged sets every step works with)."""

from __future__ import annotations

import torch


def ragged_indices(mask: torch.Tensor, pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where ``mask`` (B, L) is True, per row in ascending order, padded to the largest row.

    Returns ``(idx (B, n), valid (B, n))``; padding entries hold ``pad_value``. One host sync (for n).
    """
    n = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    return fixed_indices(mask, n, pad_value)


def bucket(n: int, cap: int) -> int:
    """The padded width for ``n`` entries: the next power of two (≥ 1), at most ``cap``. Few distinct widths keep
    compiled/captured steps to a handful of shapes; padding entries cost a little compute, never a result."""
    if n <= 0:
        return 0
    return min(1 << (n - 1).bit_length(), cap)


def fixed_indices(mask: torch.Tensor, width: int, pad_value: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`ragged_indices` but with a given ``width`` (≥ every row's count): no host sync. ``start``: the
    position of the mask's first column (a mask over one block gives sequence positions)."""
    if width > mask.shape[1]:  # wider than the mask itself: the extra entries are padding
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
    # A stable sort of "not selected" puts the selected columns first, each group in ascending order.
    order = torch.sort(mask.logical_not().to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = mask.gather(1, order)
    if start:
        order = order + start
    return torch.where(valid, order, pad_value), valid


def slots_of(fed_idx: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of a fed set: (B, L + 1) mapping each position to its slot in ``fed_idx``, or -1 if not fed."""
    batch, n = fed_idx.shape
    inverse = torch.full((batch, length + 1), -1, dtype=torch.long, device=fed_idx.device)
    inverse.scatter_(1, fed_idx, torch.arange(n, device=fed_idx.device).expand(batch, n).contiguous())
    inverse[:, length] = -1
    return inverse


def scatter_rows(values: torch.Tensor, idx: torch.Tensor, length: int, fill) -> torch.Tensor:
    """Dense (B, L) tensor with ``values`` (B, m) placed at ``idx`` (B, m); entries equal to ``length`` are dropped."""
    out = torch.full((values.shape[0], length + 1), fill, dtype=values.dtype, device=values.device)
    out.scatter_(1, idx, values)
    return out[:, :length]
