"""The linear layers of an AOT step read from in × out (K × N) copies of their weights.

Why: ``nn.Linear`` keeps its weight as out × in, so every product is ``x @ W.T``: on CPU, MKL's sgemm with a
transposed right operand is markedly slower at the small row counts of a cached step than the same product
from a contiguous K × N matrix (32 rows, K 128, N 512: 27.5 vs 19.5 µs; down projection K 512, N 128: 38 vs
20 µs; one thread). So an AOT package is exported with each ``nn.Linear`` standing in as a :class:`KNLinear`
over a transposed copy, computing the same product (to float rounding) with the faster layout.

The copies cost as much memory as the linear weights, so they are made only while those weights total at most
:data:`MAX_COPY_BYTES` (small models, where the layout matters most); a larger model keeps ``nn.Linear``. They
are built once per model and shared by its packages, and rebuilt when a weight changes (see
:func:`dkvcache.aot.AOTStep.check_weights`, which also watches in-place updates).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MAX_COPY_BYTES = 512 * 2**20


class KNLinear(nn.Module):
    """``linear(x)`` from a K × N copy of ``linear.weight`` (a buffer) and the original bias (shared)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight_kn", linear.weight.detach().t().contiguous())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.weight_kn)
        return out if self.bias is None else out + self.bias


def linear_bytes(model: nn.Module) -> int:
    """Bytes of every ``nn.Linear`` weight in ``model`` (what the copies would add)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


@contextmanager
def kn_linears(model: nn.Module, copies: dict[int, KNLinear]) -> Iterator[None]:
    """Inside the block every ``nn.Linear`` of ``model`` is replaced by its :class:`KNLinear` (taken from
    ``copies``, keyed by the linear's id, made there if missing); the originals are put back on exit."""
    swapped = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    if id(child) not in copies:
                        copies[id(child)] = KNLinear(child)
                    parent._modules[name] = copies[id(child)]
                    swapped.append((parent, name, child))
        yield
    finally:
        for parent, name, child in swapped:
            parent._modules[name] = child
