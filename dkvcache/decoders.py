"""The d2Cache framework's decoding strategies as small plug-ins of the one denoising loop.

``diffusion_generate(decoding=...)``: vanilla, pc_sampler, klass, eb_sampler, wino, ar. The loop
(``dkvcache.generation._step``) computes logits, proposals and confidences for the still-masked candidates of the
current block, then asks the decoder: ``confidence`` (pc_sampler's debias), ``choose`` (which candidates to
unmask, given the schedule's count), and, for WINO, ``extension`` (the shadow block fed after the sequence with a
leave-one-out mask) and ``after_write`` (re-masking). All rules are vectorised over the batch (no per-row loops),
so a left-padded row equals its single run. Rules, fixes relative to the reference and measurements:
docs/decoders.md.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from dkvcache.indexing import ragged_indices, scatter_rows
from dkvcache.sampling import (
    Family,
    entropy_bound_count,
    origin_transfer,
    parallel_count,
    prefix_count,
    select_sampled,
    select_top,
    token_distribution,
)

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions
    from dkvcache.state import DecodeState

# Every decoding and its own knobs with their defaults (the reference's yaml values); a knob of another
# decoding is rejected. Filled into GenerationOptions by ``resolve_options``.
DECODING_KNOBS: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "pc_sampler": {"clip_alpha": 10.0, "pc_frequencies": None},
    "klass": {"kl_threshold": 0.01, "kl_history_length": 2},
    "eb_sampler": {"gamma": 1e-3},
    "wino": {"wide_in_thres": 0.7, "narrow_out_thres": 0.9},
    "ar": {},
}
KL_EPS = 1e-12


@dataclass
class StepView:
    """What one step knows about its candidates (B, m): positions, validity, which have fresh logits,
    offsets in the generated region, logits (B, m, V), proposals, confidences and scores (after the prior)."""

    state: DecodeState
    cand_pos: torch.Tensor
    cand_valid: torch.Tensor
    decodable: torch.Tensor
    offsets: torch.Tensor
    logits: torch.Tensor
    x0: torch.Tensor
    conf: torch.Tensor
    banned_ids: Sequence[int] = ()
    score: torch.Tensor | None = None
    shadow: torch.Tensor | None = None  # WINO: hidden states of the shadow block (B, block, d)
    _probs: torch.Tensor | None = field(default=None, repr=False)

    def probs(self) -> torch.Tensor:
        """float64 distributions (B, m, V) of the candidates (computed once, on demand)."""
        if self._probs is None:
            opts = self.state.opts
            self._probs = token_distribution(self.logits, family=self.state.family, temperature=opts.temperature,
                                             top_p=opts.top_p, top_k=opts.top_k, banned_ids=self.banned_ids)
        return self._probs


@dataclass
class Extension:
    """Extra tokens fed after the sequence (B, n) with their rotary positions, and the per-query key mask
    (1, L + n, L + n) of the extended forward."""

    ids: torch.Tensor
    positions: torch.Tensor
    extra_mask: torch.Tensor


class Decoder:
    """``decoding="vanilla"``: confidence decoding, the base every other decoder refines."""

    name: ClassVar[str] = "vanilla"

    def __init__(self, opts: GenerationOptions, family: Family, model: Any = None) -> None:
        self.opts = opts
        self.family = family

    def extension(self, state: DecodeState) -> Extension | None:
        """Tokens to append to this step's input (None = the sequence alone)."""
        return None

    def confidence(self, step: StepView) -> torch.Tensor:
        """The confidences the scores are made of (B, m)."""
        return step.conf

    def vanilla_count(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        """The schedule's count, raised by threshold/factor parallel decoding when set (the loop passes a zero
        count when the rule alone decides)."""
        opts = self.opts
        if opts.parallel:
            return torch.maximum(count, parallel_count(step.score, step.decodable, opts.threshold, opts.factor,
                                                       opts.factor_rule))
        return count

    def choose(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        """Which candidates to unmask (B, m) bool; ``count`` (B,) is the schedule's count."""
        if self.opts.alg == "origin":  # Dream's random order: no ranking, each candidate by its own coin
            state = step.state
            return origin_transfer(step.cand_valid, state.step_in_block, state.steps_in_block, self.opts.eps,
                                   state.row_seeds, state.noise_step, step.offsets) & step.decodable
        count = self.vanilla_count(step, count)
        if self.opts.alg_temp:
            state = step.state
            return select_sampled(step.score, step.decodable, count, self.opts.alg_temp, state.row_seeds,
                                  state.noise_step, step.offsets)
        return select_top(step.score, step.decodable, count)

    def after_write(self, step: StepView, transfer: torch.Tensor, x_before: torch.Tensor) -> None:
        """Bookkeeping once the chosen tokens are written into ``state.x``."""

    def stats(self) -> dict:
        return {"decoding": self.name}


class PCSampler(Decoder):
    """PC-sampler's unigram debias: conf' = min(−c·log(f(x0) + 1e−10), clip_alpha).

    c is the ``alg``'s confidence (the probability of x0 for maskgit_plus, the top-1 − top-2 margin for
    topk_margin), so the debias is applied *after* the alg and never silently dropped (the reference computed
    it and then overwrote it for every alg but maskgit_plus). ``threshold``/``factor`` compare the debiased
    score, which lies in [0, clip_alpha].
    """

    name = "pc_sampler"

    def __init__(self, opts: GenerationOptions, family: Family, model: Any = None) -> None:
        super().__init__(opts, family, model)
        sizes = {getattr(model.config, n, None) for n in ("vocab_size", "embedding_size")} - {None}
        self.table = load_unigram_table(opts.pc_frequencies, max(sizes))
        if self.table.shape[0] not in sizes:
            raise ValueError(f"diffusion_generate: pc_frequencies has {self.table.shape[0]} entries; the model's "
                             f"vocabulary has {sorted(sizes)}")

    def confidence(self, step: StepView) -> torch.Tensor:
        table = self.table.to(step.x0.device)
        if table.shape[0] < step.logits.shape[-1]:  # embedding rows beyond the vocabulary: never seen
            table = torch.cat([table, table.min().expand(step.logits.shape[-1] - table.shape[0])])
        self.table = table
        bias = -torch.log(table[step.x0] + 1e-10)
        return torch.clamp(step.conf.double() * bias, max=self.opts.clip_alpha)


class Klass(Decoder):
    """KLASS: unmask the candidates whose distribution has stopped moving.

    Per candidate, the last ``kl_history_length`` values of KL(p_t ‖ p_{t−1}) (float64, eps 1e−12; a position
    without a previous distribution — first step in its block, or no fresh logits last step — counts as
    infinitely unstable). Stable = every value < ``kl_threshold``. With ``threshold``/``factor`` the stable set
    is filtered by that rule. Every stable candidate is unmasked, and at least the vanilla count (the highest
    scores fill up); a row with nothing stable is exactly vanilla, so ``kl_threshold=0`` ≡ vanilla.
    (The reference selected the stable set with no rule and a minimum of 0 when threshold/factor were unset,
    which is always empty, so its default was plain top-k.)
    Memory: previous distributions are kept only for the current block's candidates, (B, m, V) float64 —
    never (B, G, V); decoded positions and finished blocks are dropped.
    """

    name = "klass"

    def __init__(self, opts: GenerationOptions, family: Family, model: Any = None) -> None:
        super().__init__(opts, family, model)
        self.prev: tuple[torch.Tensor, ...] | None = None  # positions, probs, had-fresh-logits, KL history

    def stable(self, step: StepView) -> torch.Tensor:
        probs, ok, pos = step.probs(), step.decodable, step.cand_pos.contiguous()
        batch, m, vocab = probs.shape
        history = self.opts.kl_history_length
        kl = torch.full((batch, m), float("inf"), dtype=torch.float64, device=probs.device)
        hist = torch.full((batch, m, history), float("inf"), dtype=torch.float64, device=probs.device)
        if self.prev is not None:
            prev_pos, prev_probs, prev_ok, prev_hist = self.prev
            idx = torch.searchsorted(prev_pos, pos).clamp(max=prev_pos.shape[1] - 1)
            hit = (prev_pos.gather(1, idx) == pos) & prev_ok.gather(1, idx) & ok
            q = prev_probs.gather(1, idx[..., None].expand(-1, -1, vocab))
            div = (probs * (torch.log(probs + KL_EPS) - torch.log(q + KL_EPS))).sum(-1).clamp(min=0)
            kl = torch.where(hit, div, kl)
            hist = torch.where(hit[..., None], prev_hist.gather(1, idx[..., None].expand(-1, -1, history)), hist)
        hist = torch.cat([hist[..., 1:], kl[..., None]], dim=-1)
        self.prev = (pos, probs, ok, hist)
        return (hist < self.opts.kl_threshold).all(-1) & ok

    def choose(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        stable, score, opts = self.stable(step), step.score, self.opts
        if opts.threshold is not None:
            stable = stable & (score >= opts.threshold)
        elif opts.factor is not None:
            stable = select_top(score, stable, parallel_count(score, stable, None, opts.factor, opts.factor_rule))
        count = torch.maximum(stable.sum(1), self.vanilla_count(step, count))
        return select_top(score.masked_fill(stable, float("inf")), step.decodable, count)


class EBSampler(Decoder):
    """EB-sampler: sort candidates by score; with H_(i) their entropies in that order, unmask the i with
    Σ_{j≤i} H_(j) − max_{j≤i} H_(j) ≤ gamma (running max along the candidates; the reference took it over the
    batch), clamped to [schedule count, candidates]. gamma = 0: one token per step (plus zero-entropy ties);
    gamma = inf: every candidate."""

    name = "eb_sampler"

    def choose(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        ranked = step.score.masked_fill(~step.decodable, float("-inf"))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # select_top's order
        entropy = torch.special.entr(step.probs()).sum(-1)
        eb = entropy_bound_count(entropy.gather(1, order), step.decodable.gather(1, order), self.opts.gamma)
        return select_top(step.score, step.decodable, torch.maximum(eb, count))


class AR(Decoder):
    """Left-to-right decoding with a bidirectional model: only the contiguous run of candidates starting at
    the block's first masked position may be unmasked; its first ``count`` (the schedule's count) are. With
    ``threshold``/``factor`` the longest prefix of the run passing the rule (at least one; at least the
    schedule's count with ``schedule_floor``). (The reference, without threshold, unmasked the whole run — a
    block per forward.)"""

    name = "ar"

    def choose(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        index = torch.arange(step.cand_pos.shape[1], device=step.cand_pos.device)
        run = (step.cand_pos == step.cand_pos[:, :1] + index) & step.decodable
        run = run.long().cumprod(1).bool()
        if self.opts.threshold is not None or self.opts.factor is not None:
            ranked = step.score.masked_fill(~run, float("-inf"))
            count = torch.maximum(count, prefix_count(ranked, run, self.opts.threshold, self.opts.factor,
                                                      self.opts.factor_rule))
        return run & (index[None, :] < count[:, None])


class Wino(Decoder):
    """WINO (wide-in, narrow-out); ``cache_type="none"`` only.

    Each step feeds the sequence plus a *shadow* of the current block: LLaDA: MASK at every block position;
    Dream (logits of token j come from position j−1): a copy of the token at j−1. Real tokens never see the
    shadow; shadow entry i sees every real key except block position i (leave-one-out), and the other shadow
    entries (LLaDA, as the reference) or only itself (Dream, whose shadow tokens are real tokens). So the shadow
    predicts each decoded block token without seeing it.
    Wide-in: unmask candidates with score ≥ wide_in_thres, at most max(clamp(⌊0.7·#masked⌋, 5, 20), n) and at
    least n = max(schedule count, 1) (the top ones). Narrow-out: block tokens decoded *before* the step whose
    shadow probability is < narrow_out_thres are re-masked, lowest first, at most (#wide-in − n) of them —
    never prompt tokens or positions outside the block. Net progress ≥ n ≥ 1 token per step, so a block ends
    within its share of ``steps`` (the loop's hard cap) and the last step of the schedule finishes it.
    """

    name = "wino"

    def __init__(self, opts: GenerationOptions, family: Family, model: Any = None) -> None:
        super().__init__(opts, family, model)
        self.floor: torch.Tensor | None = None
        self.remasked = 0

    def extension(self, state: DecodeState) -> Extension:
        start, end, length = state.block_start, state.block_end, state.length
        n, shift = end - start, int(self.family.shift_logits)
        positions = state.positions[:, start - shift:end - shift]
        ids = state.x[:, start - shift:end - shift] if shift else torch.full_like(positions, state.mask_id)
        eye = torch.eye(n, dtype=torch.bool, device=ids.device)
        mask = torch.ones(length + n, length + n, dtype=torch.bool, device=ids.device)
        mask[:length, length:] = False
        mask[length:, start:end] = ~eye
        if shift:
            mask[length:, length:] = eye
        return Extension(ids.clone(), positions, mask[None])

    def choose(self, step: StepView, count: torch.Tensor) -> torch.Tensor:
        n = torch.minimum(count.clamp(min=1), step.decodable.sum(1))
        wide = ((step.score >= self.opts.wide_in_thres) & step.decodable).sum(1)
        cap = torch.maximum((step.cand_valid.sum(1) * 0.7).long().clamp(5, 20), n)
        self.floor = n
        return select_top(step.score, step.decodable, torch.minimum(torch.maximum(wide, n), cap))

    def after_write(self, step: StepView, transfer: torch.Tensor, x_before: torch.Tensor) -> None:
        state = step.state
        start, end, length = state.block_start, state.block_end, state.length
        decoded = x_before != state.mask_id
        decoded[:, :start] = False
        decoded[:, end:] = False
        pos, valid = ragged_indices(decoded, pad_value=length)
        if pos.shape[1] == 0:
            return
        slot = (pos - start).clamp(0, end - start - 1)
        hidden = step.shadow.gather(1, slot[..., None].expand(-1, -1, step.shadow.shape[-1]))
        opts = state.opts
        probs = token_distribution(state.model.logits_from_hidden(hidden), family=self.family,
                                   temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
                                   banned_ids=step.banned_ids)
        tokens = state.x.gather(1, pos.clamp(max=length - 1))
        p = probs.gather(-1, tokens[..., None]).squeeze(-1)
        limit = (transfer.sum(1) - self.floor).clamp(min=0)
        remask = select_top(-p, valid & (p < opts.narrow_out_thres), limit)
        self.remasked += int(remask.sum())
        state.x = torch.where(scatter_rows(remask, pos, length, False), state.mask_id, state.x)

    def stats(self) -> dict:
        return {**super().stats(), "remasked": self.remasked}


DECODERS: dict[str, type[Decoder]] = {cls.name: cls for cls in (Decoder, PCSampler, Klass, EBSampler, AR, Wino)}


def check_decoding(opts: GenerationOptions) -> None:
    """Compatibility of ``decoding`` with the other options (knob types/ranges are checked by options.py)."""
    name = opts.decoding
    if name == "vanilla":
        return
    prefix = f"diffusion_generate: decoding={name!r}"
    if opts.cache_type == "greedy":
        raise ValueError(f"{prefix} chooses its own decoding order, but cache_type='greedy' feeds only the "
                         "tokens of an order drawn in advance; use decoding='vanilla' with it")
    if name == "wino" and opts.cache_type != "none":
        raise ValueError(f"{prefix} supports cache_type='none' only (use_cache=False): every step appends a "
                         "shadow block with a leave-one-out mask and may re-mask decoded tokens, so no K/V of "
                         f"the block stays valid between steps; got cache_type={opts.cache_type!r}")
    if name == "wino" and opts.cfg_scale > 0:
        raise ValueError(f"{prefix} does not support cfg_scale > 0")
    if opts.alg == "origin":
        raise ValueError(f"{prefix} ranks candidates by confidence; alg='origin' (Dream's random order) has "
                         "none. Use alg='maskgit_plus' (the default for decodings other than vanilla)")
    if name == "pc_sampler":
        if opts.alg not in ("maskgit_plus", "topk_margin"):
            raise ValueError(f"{prefix} scales a probability-like confidence by −log(frequency); it needs alg "
                             f"in ['maskgit_plus', 'topk_margin'], got alg={opts.alg!r}")
        source = opts.pc_frequencies
        if source is None:
            raise ValueError(f"{prefix} needs pc_frequencies: a (vocab,) tensor of unigram frequencies or a "
                             "JSON path (see dkvcache.decoders.build_unigram_table)")
        if not isinstance(source, (torch.Tensor, str, os.PathLike)):
            raise TypeError("diffusion_generate: pc_frequencies must be a torch.Tensor or a path to a JSON file, "
                            f"got {type(source).__name__}")
        return
    if opts.alg_temp:
        raise ValueError(f"{prefix} chooses the candidates by its own rule; alg_temp (sampled positions) "
                         "applies to decoding='vanilla' and 'pc_sampler' only")
    if name in ("eb_sampler", "wino") and (opts.threshold is not None or opts.factor is not None):
        raise ValueError(f"{prefix} has its own parallel rule ({'gamma' if name == 'eb_sampler' else 'wide_in_thres'}"
                         "); pass threshold/factor with decoding='vanilla', 'klass' or 'ar'")
    if name == "wino" and opts.alg == "entropy":
        raise ValueError(f"{prefix} compares scores with wide_in_thres, a probability; alg='entropy' is "
                         "negative. Use alg in ['maskgit_plus', 'topk_margin', 'random']")


def make_decoder(opts: GenerationOptions, family: Family, model: Any) -> Decoder:
    """The decoder of one ``diffusion_generate`` call (fresh per call: KLASS and WINO keep per-call state)."""
    return DECODERS[opts.decoding](opts, family, model)


def load_unigram_table(source: torch.Tensor | str | os.PathLike, vocab_size: int) -> torch.Tensor:
    """Unigram frequencies (vocab_size,) float64 from a tensor, or from a JSON file holding either the
    reference's ``{"num_token": N, "p_baseline_dict": {id: count}}`` or ``{id: count}`` (N = their sum,
    an optional "num_token" overriding it). Unseen tokens get 1/N."""
    if isinstance(source, torch.Tensor):
        table = source.detach().to("cpu", torch.float64)
        if table.dim() != 1 or not torch.isfinite(table).all() or (table < 0).any() or (table > 1).any():
            raise ValueError("diffusion_generate: pc_frequencies must be a 1-D tensor of frequencies in [0, 1] "
                             "(count / total); build one with dkvcache.decoders.build_unigram_table")
        return table
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"diffusion_generate: pc_frequencies={path!r} is not a file")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    counts = data.get("p_baseline_dict", {k: v for k, v in data.items() if k != "num_token"})
    total = data.get("num_token", sum(counts.values()))
    ids = torch.tensor([int(k) for k in counts], dtype=torch.long)
    if total <= 0 or (ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size)):
        raise ValueError(f"diffusion_generate: pc_frequencies file {path!r} has token ids outside "
                         f"[0, {vocab_size}) or no tokens")
    table = torch.full((vocab_size,), 1.0 / total, dtype=torch.float64)
    table[ids] = torch.tensor([float(v) for v in counts.values()], dtype=torch.float64) / total
    return table


def build_unigram_table(tokenizer: Any, text_path: str | os.PathLike, vocab_size: int | None = None,
                        json_path: str | os.PathLike | None = None) -> torch.Tensor:
    """Unigram frequencies (vocab,) of the tokenizer's ids over a text file (line by line, no special
    tokens): count / total, unseen tokens 1 / total. With ``json_path`` also saved in the reference's format
    ``{"num_token": N, "p_baseline_dict": {id: count}}`` (loadable as ``pc_frequencies=json_path``)."""
    counts: Counter = Counter()
    with open(text_path, encoding="utf-8") as handle:
        for line in handle:
            counts.update(tokenizer(line, add_special_tokens=False)["input_ids"])
    total = sum(counts.values())
    if total == 0:
        raise ValueError(f"build_unigram_table: {text_path!r} holds no tokens")
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump({"num_token": total, "p_baseline_dict": {str(k): v for k, v in sorted(counts.items())}},
                      handle)
    size = vocab_size or max(len(tokenizer), max(counts) + 1)
    if max(counts) >= size:
        raise ValueError(f"build_unigram_table: token id {max(counts)} is outside vocab_size={size}")
    table = torch.full((size,), 1.0 / total, dtype=torch.float64)
    table[list(counts)] = torch.tensor(list(counts.values()), dtype=torch.float64) / total
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dkvcache.decoders --tokenizer DIR --text FILE --out FILE.json``: a PC-sampler table."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (a Hub layout)")
    parser.add_argument("--text", required=True, help="a plain-text corpus file")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    import models  # noqa: F401  (registers DreamTokenizer)

    table = build_unigram_table(AutoTokenizer.from_pretrained(args.tokenizer), args.text, json_path=args.out)
    print(f"wrote {args.out} (vocab {table.shape[0]})")


if __name__ == "__main__":
    main()
