"""Counter-based random numbers: noise as a pure function of (row seed, stream, step, position, …).

Why not ``torch.rand``: a shared stream makes a row's samples depend on the other rows of the batch (and on how
many positions each step draws for), so a padded batch row could never equal its single run under sampling.
Hashing the coordinates gives every row its own reproducible noise, identical on CPU and CUDA, whatever the
batch shape. Contract: row ``i`` of a call with ``seed=s`` draws from row seed ``s + i``; the same prompt run
alone with ``seed=s + i`` reproduces it (``seed=[…]`` sets every row's seed explicitly).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so (x < 2**32) * c never overflows int64.
_C1 = 0x7FEB352D
_C2 = 0x5BD1E995
_GOLDEN = 0x9E3779B9

# Streams keep the different uses of randomness independent of each other.
STREAM_TOKENS = 1
STREAM_TRANSFER = 2
STREAM_ORDER = 3
STREAM_REMASK = 4


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def hash_uniform(row_seed: torch.Tensor, *coords: torch.Tensor | int) -> torch.Tensor:
    """Uniform float64 in (0, 1), broadcast over ``row_seed`` and the integer coordinates.

    ``row_seed`` must be shaped so it broadcasts against the coordinates (e.g. (B, 1, 1) for (B, m, V) noise).
    """
    h = _mix32(row_seed.long())
    for c in coords:
        c = torch.as_tensor(c, dtype=torch.long, device=row_seed.device)
        h = _mix32(h ^ _mix32(c + _GOLDEN))
    return (h.double() + 0.5) / 4294967296.0


def gumbel(row_seed: torch.Tensor, *coords: torch.Tensor | int) -> torch.Tensor:
    """Standard Gumbel noise (float64) from :func:`hash_uniform`."""
    return -torch.log(-torch.log(hash_uniform(row_seed, *coords)))


def resolve_row_seeds(seed, generator, batch: int, device: torch.device) -> torch.Tensor:
    """Per-row seeds (B,) int64 from ``seed`` (int or list of ints), a ``torch.Generator`` or torch's global RNG."""
    if seed is not None:
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch:
                raise ValueError(f"seed: a list of seeds needs one per row ({batch}), got {len(seed)}")
            values = [int(s) for s in seed]
        else:
            values = [int(seed) + i for i in range(batch)]
        return torch.tensor(values, dtype=torch.long, device=device) & _M32
    base = torch.randint(0, 2**31 - 1, (1,), generator=generator).item()
    return (torch.arange(batch, dtype=torch.long, device=device) + base) & _M32
