"""The vanilla rule's choice and write as pure tensor functions, shared by the eager loop and the captured step.

Vanilla confidence decoding chooses the ``count`` most confident decodable candidates (raised by Fast-dLLM's
threshold/factor rule when set) and writes their proposals into the sequences. The eager loop does this after the
model call; when the call's decoder is the plain vanilla rule, ``compile=True`` folds the same functions into the
compiled step (:class:`CommitSettings` given), so a step costs one compiled call and no Python tensor ops after it:
on the tiny checkpoints those ~40 small ops took as long as a transformer layer, and on a GPU each is a kernel
launch outside the captured graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dkvcache.head import HeadSettings, step_head
from dkvcache.indexing import scatter_rows
from dkvcache.sampling import parallel_count, select_top


@dataclass(frozen=True)
class CommitSettings:
    """The vanilla rule's options of one call that a compiled step is specialised to. ``rule``: "schedule",
    "threshold" or "factor"; the threshold or factor value itself is data (:func:`rule_value`), so one compiled
    step serves every value."""

    rule: str
    factor_rule: str
    mask_token_id: int

    @classmethod
    def of(cls, threshold: float | None, factor: float | None, factor_rule: str,
           mask_token_id: int) -> CommitSettings:
        rule = "threshold" if threshold is not None else "factor" if factor is not None else "schedule"
        return cls(rule, factor_rule, mask_token_id)


def rule_value(threshold: float | None, factor: float | None, device: torch.device) -> torch.Tensor:
    """The threshold or factor as a 0-d float64 tensor (0 when neither is set). Compared with float32 scores it
    is rounded to float32 exactly as the Python float is, so the choice is the same."""
    value = threshold if threshold is not None else factor if factor is not None else 0.0
    return torch.tensor(value, dtype=torch.float64, device=device)


def raised_count(score: torch.Tensor, decodable: torch.Tensor, count: torch.Tensor, threshold: float | None,
                 factor: float | None, factor_rule: str) -> torch.Tensor:
    """The schedule's ``count`` (B,), raised by Fast-dLLM's threshold/factor rule when one is set."""
    if threshold is None and factor is None:
        return count
    return torch.maximum(count, parallel_count(score, decodable, threshold, factor, factor_rule))


def vanilla_choice(score: torch.Tensor, decodable: torch.Tensor, count: torch.Tensor, threshold: float | None,
                   factor: float | None, factor_rule: str) -> torch.Tensor:
    """Which candidates (B, m) to unmask: the :func:`raised_count` best scores among the decodable ones."""
    return select_top(score, decodable, raised_count(score, decodable, count, threshold, factor, factor_rule))


def write_tokens(x: torch.Tensor, cand_pos: torch.Tensor, transfer: torch.Tensor, x0: torch.Tensor,
                 mask_token_id: int) -> torch.Tensor:
    """The sequences (B, L) with the transferred candidates' proposals written at their positions (a new tensor;
    padding candidates point at L and are dropped)."""
    length = x.shape[1]
    new_tokens = scatter_rows(torch.where(transfer, x0, mask_token_id), cand_pos, length, mask_token_id)
    written = scatter_rows(transfer, cand_pos, length, False)
    return torch.where(written, new_tokens, x)


def commit(x: torch.Tensor, cand_pos: torch.Tensor, decodable: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor,
           count: torch.Tensor, value: torch.Tensor, s: CommitSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla choice then write: (new sequences (B, L), transfer (B, m)). ``value``: :func:`rule_value`."""
    threshold = value if s.rule == "threshold" else None
    factor = value if s.rule == "factor" else None
    transfer = vanilla_choice(conf, decodable, count, threshold, factor, s.factor_rule)
    return write_tokens(x, cand_pos, transfer, x0, s.mask_token_id), transfer


def step_head_and_commit(model, hidden: torch.Tensor, fed_idx: torch.Tensor | None, source: torch.Tensor,
                         cand_valid: torch.Tensor, offsets: torch.Tensor, row_seeds: torch.Tensor,
                         step: torch.Tensor, s: HeadSettings, x: torch.Tensor, cand_pos: torch.Tensor,
                         count: torch.Tensor, value: torch.Tensor,
                         cs: CommitSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dkvcache.head.step_head` then :func:`commit`: (new sequences (B, L), transfer (B, m), confidences
    (B, m)) -- what a compiled step returns for the plain vanilla rule."""
    _, decodable, x0, conf = step_head(model, hidden, fed_idx, source, cand_valid, offsets, row_seeds, step, s)
    x_new, transfer = commit(x, cand_pos, decodable, x0, conf, count, value, cs)
    return x_new, transfer, conf
