"""The step's head: logits at the candidates only, then every candidate's proposed token and confidence.

A pure function of tensors plus a frozen :class:`HeadSettings` (the call's constant options), so
``compile=True`` can capture it as one graph per shape next to the model forward (``dkvcache.capture``): on a
small model or at batch 1 its ~40 small kernels cost as much as several transformer layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dkvcache.indexing import slots_of
from dkvcache.sampling import Family, propose_tokens


@dataclass(frozen=True)
class HeadSettings:
    """The options of one call the head depends on (constant for the call; a compiled head guards on them)."""

    family: Family
    alg: str
    temperature: float
    top_p: float | None
    top_k: int | None
    banned_ids: tuple[int, ...]
    push_last_ids: tuple[int, ...]
    cfg_scale: float
    length: int  # L, the sequence length (the scratch slot of a fed set is L)
    batch: int  # B, rows before classifier-free guidance doubles them


def combine_cfg(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance: the conditional and unconditional halves of the batch combined."""
    if cfg_scale <= 0:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


def candidate_sources(cand_pos: torch.Tensor, cand_valid: torch.Tensor, prompt_length: int | torch.Tensor,
                      s: HeadSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, offsets) of the candidates (B, m): the position whose logits predict each (its left neighbour
    under Dream's logit shift; padding entries point at the scratch slot L) and its offset in the generated
    region (what the sampling noise is keyed by). ``prompt_length`` may be a 0-d tensor (a compiled step's data)."""
    source = cand_pos - 1 if s.family.shift_logits else cand_pos
    return torch.where(cand_valid, source, s.length), (cand_pos - prompt_length).clamp(min=0)


def candidate_logits(model, hidden: torch.Tensor, fed_idx: torch.Tensor | None, source: torch.Tensor,
                     cand_valid: torch.Tensor, s: HeadSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, m, V) computed only at the candidates' source positions (B, m), and which are decodable.

    A candidate whose source position was not fed this step has no fresh prediction: it is not decodable.
    """
    if fed_idx is None:
        slots, decodable = source.clamp(max=s.length - 1), cand_valid
    else:
        slots = slots_of(fed_idx, s.length).gather(1, source)
        decodable = cand_valid & (slots >= 0)
        slots = slots.clamp(min=0)
    slots = slots.repeat(hidden.shape[0] // s.batch, 1)  # both CFG halves
    picked = hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1]))
    return combine_cfg(model.logits_from_hidden(picked), s.cfg_scale), decodable


def step_head(model, hidden: torch.Tensor, fed_idx: torch.Tensor | None, source: torch.Tensor,
              cand_valid: torch.Tensor, offsets: torch.Tensor, row_seeds: torch.Tensor, step: int | torch.Tensor,
              s: HeadSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (B, m, V), decodable (B, m), proposed tokens (B, m), confidences (B, m)) of the candidates.

    ``step`` is the noise coordinate; a compiled head takes it as a 0-d tensor so it is data, not a constant.
    """
    logits, decodable = candidate_logits(model, hidden, fed_idx, source, cand_valid, s)
    return (logits, decodable, *propose(logits, offsets, row_seeds, step, s))


def propose(logits: torch.Tensor, offsets: torch.Tensor, row_seeds: torch.Tensor, step: int | torch.Tensor,
            s: HeadSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dkvcache.sampling.propose_tokens` under the call's settings: (tokens (B, m), confidences (B, m))."""
    return propose_tokens(logits, family=s.family, alg=s.alg, temperature=s.temperature, top_p=s.top_p,
                          top_k=s.top_k, row_seeds=row_seeds, step=step, offsets=offsets, banned_ids=s.banned_ids,
                          push_last_ids=s.push_last_ids)
