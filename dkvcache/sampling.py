"""Logits → (token, confidence) and the per-step transfer rules of Dream and LLaDA.

Everything works on the step's *candidates*: a (B, m) set of still-masked positions with logits (B, m, V),
padded across rows with a validity mask. Confidence definitions (higher = decode earlier):
  maskgit_plus (= LLaDA low_confidence)  probability of the chosen token
  topk_margin                            top-1 minus top-2 probability
  entropy                                sum p log p (negative entropy)
  random (= LLaDA random)                 uniform noise
  origin                                 Dream's random order: each candidate unmasks with prob 1 - s/t
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dkvcache import rng

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "random")
REMASKING_ALIASES = {"low_confidence": "maskgit_plus", "random": "random"}
# "paper": stop at the first candidate failing (k+1)(1 − c_k) ≤ f. "fast_dllm": Fast-dLLM's code, which also
# accepts the last candidate when it is the one that fails.
FACTOR_RULES = ("paper", "fast_dllm")


@dataclass(frozen=True)
class Family:
    """How a model family turns logits into decisions (taken from each original implementation).

    shift_logits:    Dream predicts token j from position j-1 (AR initialisation); LLaDA from position j.
    schedule:        "linspace" = Dream's k = int(m * (1 - s/t)); "quota" = LLaDA's per-block transfer counts.
    llada_confidence: LLaDA takes argmax of the logits and float64 softmax of the *untempered* logits for the
                     confidence; Dream takes both from the softmax of the filtered, tempered logits in the
                     logits dtype.
    """

    name: str
    shift_logits: bool
    schedule: str
    llada_confidence: bool


DREAM = Family("dream", shift_logits=True, schedule="linspace", llada_confidence=False)
LLADA = Family("llada", shift_logits=False, schedule="quota", llada_confidence=True)
FAMILIES = {"dream": DREAM, "llada": LLADA}


def filter_logits(logits: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Nucleus (top_p < 1) then top-k filtering; removed entries get the dtype's most negative value."""
    lowest = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, sorted_idx, remove), lowest)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, lowest)
    return logits


def _confidence_from_probs(probs: torch.Tensor, x0: torch.Tensor, alg: str) -> torch.Tensor:
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if alg == "entropy":
        return torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return probs.gather(-1, x0[..., None]).squeeze(-1)


def propose_tokens(
    logits: torch.Tensor,
    *,
    family: Family,
    alg: str,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    row_seeds: torch.Tensor,
    step: int | torch.Tensor,
    offsets: torch.Tensor,
    banned_ids: Sequence[int] = (),
    push_last_ids: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token proposal and confidence for every candidate.

    logits (B, m, V); offsets (B, m) the candidates' offsets in the generated region (noise coordinates).
    banned_ids: tokens that can never be proposed (LLaDA ``logits_eos_inf``).
    push_last_ids: tokens whose probability mass is removed from the confidence, so positions proposing them
    are decoded last (LLaDA ``confidence_eos_eot_inf``).
    """
    if banned_ids:
        logits = logits.clone()
        logits[..., list(banned_ids)] = float("-inf")
    tempered = logits / temperature if temperature > 0 else logits
    tempered = filter_logits(tempered, top_p, top_k)
    if temperature > 0:
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        noise = rng.gumbel(row_seeds[:, None, None], rng.STREAM_TOKENS, step, offsets[..., None], vocab)
        x0 = (tempered.double() + noise).argmax(dim=-1)
    elif family.llada_confidence:
        x0 = tempered.argmax(dim=-1)
    else:
        x0 = None  # Dream at temperature 0: argmax of the probabilities (ties resolved as the original)

    if alg == "random":
        if x0 is None:
            x0 = tempered.argmax(dim=-1)
        return x0, rng.hash_uniform(row_seeds[:, None], rng.STREAM_REMASK, step, offsets)

    conf_logits = logits.double() if family.llada_confidence else tempered
    if push_last_ids:
        conf_logits = conf_logits.clone()
        conf_logits[..., list(push_last_ids)] = float("-inf")
    probs = torch.softmax(conf_logits, dim=-1)
    if x0 is None:
        best, x0 = probs.max(dim=-1)
        if alg in ("maskgit_plus", "origin"):
            return x0, best
    return x0, _confidence_from_probs(probs, x0, alg)


def select_top(conf: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the ``k[b]`` most confident valid candidates (ties: leftmost first). Returns (B, m) bool."""
    conf = conf.masked_fill(~valid, float("-inf"))
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(conf.shape[1], device=conf.device).expand_as(order).contiguous()
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return (rank < k[:, None]) & valid


def select_sampled(conf: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, alg_temp: float,
                   row_seeds: torch.Tensor, step: int, offsets: torch.Tensor) -> torch.Tensor:
    """``alg_temp > 0``: k positions drawn without replacement from softmax(conf / alg_temp) (Gumbel top-k)."""
    noise = rng.gumbel(row_seeds[:, None], rng.STREAM_ORDER, step, offsets)
    return select_top(conf.double() / alg_temp + noise, valid, k)


def linspace_ratios(steps: int, eps: float, device: torch.device | None = None) -> torch.Tensor:
    """Dream's per-step fractions (steps,) ``1 - s/t`` of a block, with float32 timesteps linspace(1, eps)."""
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    return 1 - timesteps[1:] / timesteps[:-1]


def linspace_count(masked: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Dream's count per row at a step that is not the block's last: int(m * (1 - s/t)) in float32 (the last
    step transfers everything: the schedule does not call this there)."""
    return (masked.to(torch.float32) * ratio).floor().long()


def origin_transfer(valid: torch.Tensor, step_in_block: int, steps: int, eps: float, row_seeds: torch.Tensor,
                    step: int, offsets: torch.Tensor) -> torch.Tensor:
    """Dream ``origin``: every candidate unmasks independently with probability 1 - s/t (1 at the last step)."""
    if step_in_block >= steps - 1:
        return valid
    timesteps = torch.linspace(1, eps, steps + 1, device=valid.device)
    p = (1 - timesteps[step_in_block + 1] / timesteps[step_in_block]).double()
    return (rng.hash_uniform(row_seeds[:, None], rng.STREAM_TRANSFER, step, offsets) < p) & valid


def llada_quota(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's per-block transfer counts (B, steps): n // steps each, the remainder on the first steps."""
    base, rem = masked // steps, masked % steps
    extra = torch.arange(steps, device=masked.device)[None, :] < rem[:, None]
    return base[:, None] + extra.long()


def parallel_count(conf: torch.Tensor, valid: torch.Tensor, threshold: float | None,
                   factor: float | None, factor_rule: str = "paper") -> torch.Tensor:
    """How many of the most confident valid candidates Fast-dLLM's parallel decoding transfers, per row (B,).

    threshold τ: the most confident one plus every other with confidence ≥ τ (equality accepted).
    factor f: sorted confidences c_1 ≥ c_2 ≥ …; the first is always taken, the k-th (k ≥ 2) while
    (k + 1)(1 − c_k) ≤ f, i.e. c_k ≥ 1 − f/(k+1) (Theorem 1 of the paper, scaled by f); stop at the first failure.
    With ``factor_rule="paper"`` we also stop when that failure is the last candidate; ``"fast_dllm"`` then
    accepts all, as the original code. A row without candidates transfers 0.
    """
    ranked, order = torch.sort(conf.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True)
    return prefix_count(ranked, valid.gather(1, order), threshold, factor, factor_rule)


def prefix_count(ordered: torch.Tensor, valid: torch.Tensor, threshold: float | None,
                 factor: float | None, factor_rule: str = "paper") -> torch.Tensor:
    """Length of the longest prefix of already-ordered scores (B, m) passing the threshold or factor rule.

    The first entry always passes (at least one token per step); the count never exceeds the valid entries.
    On confidence-sorted scores this is :func:`parallel_count`; AR decoding applies it in position order.
    """
    if threshold is not None:
        passes = ordered >= threshold
    else:
        k = torch.arange(1, ordered.shape[1] + 1, device=ordered.device, dtype=ordered.dtype)
        passes = ordered >= 1 - factor / (k + 1)
    passes[:, :1] = True
    count = torch.minimum(passes.long().cumprod(1).sum(1), valid.sum(1))
    if threshold is None and factor_rule == "fast_dllm":
        n = valid.sum(1)
        count = torch.where(count == n - 1, n, count)
    return count


def entropy_bound_count(entropies: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """EB-sampler: how many leading entries of score-ordered candidates (B, m) to transfer.

    With H_(1), H_(2), … the entropies in score order, counts the i with Σ_{j≤i} H_(j) − max_{j≤i} H_(j) ≤ γ
    (a prefix: the left side never decreases). The running max is taken along the candidates (the original
    took it over the batch, so for one row it tested Σ_{j<i} H_(j) ≤ γ). ``valid`` must be a prefix.
    """
    h = entropies.masked_fill(~valid, 0.0)
    excess = h.cumsum(1) - h.cummax(1).values
    return ((excess <= gamma) & valid).sum(1)


def token_distribution(logits: torch.Tensor, *, family: Family, temperature: float, top_p: float | None,
                       top_k: int | None, banned_ids: Sequence[int] = ()) -> torch.Tensor:
    """The float64 distributions (B, m, V) the confidences are read from (see :func:`propose_tokens`).

    LLaDA: softmax of the untempered logits; Dream: softmax of the filtered, tempered logits. Used by the
    decoders that need whole distributions (EB-sampler entropies, KLASS divergences, WINO verification).
    """
    if banned_ids:
        logits = logits.clone()
        logits[..., list(banned_ids)] = float("-inf")
    if not family.llada_confidence:
        logits = filter_logits(logits / temperature if temperature > 0 else logits, top_p, top_k)
    return torch.softmax(logits.double(), dim=-1)
