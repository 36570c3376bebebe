"""The certainty density of d2Cache (Eq. 3 of the paper, as its code computes it).

D(i) = Σ_j e_j φ(i − j) / Σ_d φ(d), φ(d) = exp(−d² / 2σ²), over j ∈ [−G, 2G) and d ∈ [−3G, 3G), where e_j = 1 left of
the generated region (the prompt side counts as known), e_j = known_j inside it, and e_j = known_{G−1} right of it
(the right boundary counts as known once the last position is decoded). D ∈ [0, 1]; high near decoded tokens.
Computed as a direct float64 convolution (exact; the original's FFT leaves ~1e−7 noise, sometimes negative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def certainty_density(known: torch.Tensor, sigma: float) -> torch.Tensor:
    """Density (B, G) float64 for ``known`` (B, G) bool (True = decoded) and kernel width ``sigma`` > 0."""
    batch, gen = known.shape
    device = known.device
    left = torch.ones(batch, gen, dtype=torch.float64, device=device)
    right = known[:, -1:].double().expand(batch, gen)
    extended = torch.cat([left, known.double(), right], dim=1)  # j = −G … 2G−1
    offsets = torch.arange(-3 * gen, 3 * gen, device=device, dtype=torch.float64)
    total = torch.exp(-offsets**2 / (2 * sigma**2)).sum()
    distance = torch.arange(-(3 * gen - 1), 3 * gen, device=device, dtype=torch.float64)
    kernel = torch.exp(-distance**2 / (2 * sigma**2))  # symmetric, so correlation = convolution
    # output i ∈ [0, G) ↔ extended index i + G; the kernel spans every j of the extended row
    out = F.conv1d(extended[:, None], kernel[None, None], padding=3 * gen - 1)[:, 0]
    return out[:, gen:2 * gen] / total


def certainty_prior(conf: torch.Tensor, known: torch.Tensor, offsets: torch.Tensor,
                    sigma: float | None) -> torch.Tensor:
    """The score candidates are ranked by: ``conf`` (B, m) times the density at their ``offsets`` (B, m) in the
    generated region, whose decoded positions are ``known`` (B, G); ``conf`` itself when ``sigma`` is off."""
    if not sigma:
        return conf
    density = certainty_density(known, sigma)
    return conf.double() * density.gather(1, offsets.clamp(max=density.shape[1] - 1))  # pads: any column
