"""``diffusion_generate``: argument checks and the one denoising loop shared by every model and strategy.

Step order (the only place it lives): plan (strategy) → partial forward → logits at the candidates only →
propose tokens → choose which to transfer (schedule / threshold) → write → bookkeeping (strategy) → hooks.
The decoding strategy (``dkvcache.decoders``) plugs in at: extra fed tokens (WINO's shadow block), confidence
adjustment (PC-sampler), the transfer choice (every decoder) and after the write (WINO's re-masking).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm
from transformers.utils import ModelOutput

from dkvcache import aot, caches, capture
from dkvcache.caches.base import StepOutcome
from dkvcache.commit import CommitSettings, rule_value, write_tokens
from dkvcache.decoders import Decoder, StepView, make_decoder
from dkvcache.density import certainty_prior
from dkvcache.head import HeadSettings, candidate_sources, combine_cfg, propose, step_head
from dkvcache.indexing import bucket, fixed_indices, slots_of
from dkvcache.options import GenerationOptions
from dkvcache.partial_forward import rotary_cos_sin
from dkvcache.resolve import check_inputs_fit, resolve
from dkvcache.rng import resolve_row_seeds
from dkvcache.sampling import FAMILIES
from dkvcache.schedule import BlockSchedule
from dkvcache.state import DecodeState


@dataclass
class DiffusionOutput(ModelOutput):
    """``return_dict_in_generate=True`` result.

    sequences (B, L): prompt + generation. history: ``x`` after every step (``output_history=True``).
    stats: steps, forwards, tokens per forward, fed fraction, wall time, tokens/s … (see README).
    """

    sequences: torch.Tensor | None = None
    history: list | None = None
    stats: dict | None = None


class DiffusionGenerationMixin:
    """Adds ``diffusion_generate`` to a model implementing ``PartialForwardMixin`` and ``diffusion_family``."""

    @torch.no_grad()
    def diffusion_generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None,
                           **kwargs: Any) -> torch.Tensor | DiffusionOutput:
        """Denoise ``max_new_tokens`` MASK tokens after the (left-padded) prompt ``inputs`` (B, P).

        Same signature as the original Dream ``diffusion_generate``; LLaDA's argument names (``gen_length``,
        ``remasking``, ``cfg_scale`` …) work too. Returns the (B, P + max_new_tokens) sequences, or a
        :class:`DiffusionOutput` with ``return_dict_in_generate=True``. See :class:`GenerationOptions`.
        """
        return generate(self, inputs, generation_config, **kwargs)


def _check_inputs(inputs: Any, attention_mask: Any) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.dtype != torch.long:
        raise TypeError("diffusion_generate: inputs must be a (batch, prompt_length) torch.long tensor, got "
                        f"{type(inputs).__name__}{'' if not isinstance(inputs, torch.Tensor) else tuple(inputs.shape)}")
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError(f"diffusion_generate: inputs must be non-empty, got shape {tuple(inputs.shape)}")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != inputs.shape:
        raise ValueError("diffusion_generate: attention_mask must be a tensor shaped like inputs "
                         f"{tuple(inputs.shape)}")
    am = attention_mask.long()
    if ((am != 0) & (am != 1)).any():
        raise ValueError("diffusion_generate: attention_mask must hold only 0 and 1")
    if (am[:, 1:] < am[:, :-1]).any():
        raise ValueError("diffusion_generate: attention_mask must be left-padded (zeros before ones in every row); "
                         "tokenize with padding_side='left'")
    if (am.sum(1) == 0).any():
        raise ValueError("diffusion_generate: every row of attention_mask needs at least one real token")


def _build_state(model: Any, family, opts: GenerationOptions, inputs: torch.Tensor,
                 attention_mask: torch.Tensor | None, generation_mask: torch.Tensor | None = None) -> DecodeState:
    device = model.device
    inputs = inputs.to(device)
    if opts.num_return_sequences > 1:
        inputs = inputs.repeat_interleave(opts.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(opts.num_return_sequences, dim=0)
    batch, prompt_length = inputs.shape
    gen = torch.full((batch, opts.max_new_tokens), opts.mask_token_id, dtype=torch.long, device=device)
    if generation_mask is not None:  # columns after a row's end: padding, never decoded, never attended to
        generation_mask = generation_mask.to(device).bool()
        gen = torch.where(generation_mask, gen, opts.pad_token_id if opts.pad_token_id is not None else 0)
        attention_mask = torch.ones_like(inputs) if attention_mask is None else attention_mask
    x = torch.cat([inputs, gen], dim=1)
    if attention_mask is None:
        key_valid = torch.ones_like(x, dtype=torch.bool)
        positions = torch.arange(x.shape[1], device=device).expand(batch, -1).contiguous()
    else:
        tail = torch.ones_like(gen, dtype=torch.bool) if generation_mask is None else generation_mask
        key_valid = torch.cat([attention_mask.to(device).bool(), tail], dim=1)
        positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
    if ((inputs == opts.mask_token_id) & key_valid[:, :prompt_length]).any():
        raise ValueError(f"diffusion_generate: inputs contain mask_token_id={opts.mask_token_id}; only the "
                         "appended generation region is denoised (infilling is not supported)")
    seeds = resolve_row_seeds(opts.seed, opts.generator, batch, device)
    head = HeadSettings(family=family, alg=opts.alg, temperature=opts.temperature, top_p=opts.top_p,
                        top_k=opts.top_k, banned_ids=tuple(opts.banned_ids), push_last_ids=tuple(opts.push_last_ids),
                        cfg_scale=opts.cfg_scale, length=x.shape[1], batch=batch)
    return DecodeState(model=model, family=family, opts=opts, x=x, positions=positions, key_valid=key_valid,
                       prompt_length=prompt_length, row_seeds=seeds, head_settings=head)


def generate(model: Any, inputs: torch.Tensor | None, generation_config: Any = None,
             **kwargs: Any) -> torch.Tensor | DiffusionOutput:
    """Function form of :meth:`DiffusionGenerationMixin.diffusion_generate`."""
    session = GenerationSession(model, inputs, generation_config, **kwargs)
    while not session.done:
        session.step()
    return session.result()


class GenerationSession:
    """One ``diffusion_generate`` call advanced a step at a time (what a server interleaves with other calls).

    The arguments are those of ``diffusion_generate`` and are checked here, before any compute. ``step()`` runs
    one denoising step and returns the end position of the block it finished (``None`` mid-block); a finished
    block's tokens never change again. ``result()`` gives what ``diffusion_generate`` returns.
    ``generation_mask`` (B, max_new_tokens), False after a row's own end: lets rows with fewer tokens left share
    a batch (the columns are padding: not decoded, not attended to).
    """

    def __init__(self, model: Any, inputs: torch.Tensor | None, generation_config: Any = None,
                 generation_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        _check_inputs(inputs, attention_mask)
        family = FAMILIES[model.diffusion_family]
        opts = resolve(model, inputs.shape[1], generation_config, **kwargs)
        check_inputs_fit(model, inputs, opts)
        self.strategy = caches.get_strategy(opts.cache_type)(**opts.cache_options)
        self.decoder = make_decoder(opts, family, model)
        if generation_mask is not None and (not isinstance(generation_mask, torch.Tensor)
                                            or generation_mask.shape != (inputs.shape[0], opts.max_new_tokens)):
            raise ValueError("GenerationSession: generation_mask must be a (batch, max_new_tokens) tensor")
        capture_mode = capture.mode(opts.compile, model.device)
        self.state = _build_state(model, family, opts, inputs, attention_mask, generation_mask)
        self.state.capture_mode = capture_mode
        self.opts = opts
        self.history: list = []
        self.done = False
        self._start_time = time.perf_counter()
        self._steps = _denoise_steps(self.state, self.strategy, self.decoder, self.history)
        self._seconds: float | None = None

    @property
    def prompt_length(self) -> int:
        """Columns before the generated region (the left-padded prompt)."""
        return self.state.prompt_length

    @property
    def sequences(self) -> torch.Tensor:
        """(B, prompt_length + max_new_tokens): the current tokens (MASK where not decoded yet)."""
        return self.state.x

    def step(self) -> int | None:
        """One denoising step; the end column of the block it completed, or None. Sets ``done`` at the end."""
        if self.done:
            raise RuntimeError("GenerationSession.step: the generation is already done")
        completed = next(self._steps)
        if completed == self.state.length:  # the last block (or every row ended): nothing is left to decode
            self._finish()
        return completed

    def _finish(self) -> None:
        self.done = True
        if _static_kv(self.state):
            capture.release_kv(self.state.model, self.state.kv)
        if self.state.x.device.type == "cuda":
            torch.cuda.synchronize(self.state.x.device)
        elapsed = time.perf_counter() - self._start_time
        self._seconds = elapsed - self.state.capture_stats.get("compile_s", 0.0)

    def result(self) -> torch.Tensor | DiffusionOutput:
        """The sequences, or a :class:`DiffusionOutput` with ``return_dict_in_generate=True``."""
        if not self.done:
            raise RuntimeError("GenerationSession.result: call step() until done first")
        opts, state = self.opts, self.state
        stats = _stats(state, self.strategy, self._seconds)
        if opts.compile:
            stats.update({"compiled": state.capture_blocker is None, "compiled_choice": state.commit is not None,
                          "compile_s": 0.0, "compiled_shapes": 0, "loaded_packages": 0, **state.capture_stats})
        stats.update(self.decoder.stats())
        if not opts.return_dict_in_generate:
            return state.x
        return DiffusionOutput(sequences=state.x, history=self.history if opts.output_history else None,
                               stats=stats)


def _blocks(state: DecodeState) -> list[tuple[int, int, int | None]]:
    """(start, end, steps) of every block; steps is None when the parallel rule alone decides (no schedule)."""
    opts = state.opts
    block = opts.block_length or opts.max_new_tokens
    n_blocks = opts.max_new_tokens // block
    per_block = None if opts.rule_decides else opts.steps // n_blocks
    start = state.prompt_length
    return [(start + b * block, start + (b + 1) * block, per_block) for b in range(n_blocks)]


# With the rule deciding, every step transfers at least one decodable candidate per unfinished row; a block that
# is still not done after this many steps per position means a strategy starves the loop of fresh predictions.
_RULE_STEPS_PER_POSITION = 8


def _denoise_steps(state: DecodeState, strategy: caches.CacheStrategy, decoder: Decoder,
                   history: list) -> Iterator[int | None]:
    """The denoising loop as a generator: yields after every step, the block's end column when it completed."""
    opts = state.opts
    if opts.generation_tokens_hook_func is not None:
        state.x = opts.generation_tokens_hook_func(None, state.x, None)
    strategy.begin(state)
    if state.capture_mode is not None:
        state.capture_blocker = capture.blocker(strategy, type(decoder).extension is not Decoder.extension, opts)
        if state.capture_blocker is not None:
            capture.notice(state.capture_blocker)
            state.capture_mode = None
        else:
            if state.capture_mode == "aot":
                aot.aot_step(state.model).check_weights()
                state.prompt_length_data = torch.tensor(state.prompt_length, device=state.x.device)
                state.unpadded = bool(state.key_valid.all())  # no padded key: a package without a mask
            state.commit = _commit_settings(strategy, decoder)
            state.rule_value = rule_value(opts.threshold, opts.factor, state.x.device)
    bar = tqdm(total=None if opts.rule_decides else opts.steps, desc="denoising", unit="step", leave=False,
               disable=not opts.progress, dynamic_ncols=True)
    blocks = _blocks(state)
    for block_index, (block_start, block_end, steps) in enumerate(blocks):
        state.block_index = block_index
        state.block_start, state.block_end, state.steps_in_block = block_start, block_end, steps
        state.schedule = BlockSchedule.start(state.family.schedule, steps, opts.eps,
                                             state.masked()[:, block_start:block_end].sum(1))
        strategy.begin_block(state)
        limit = steps if steps is not None else _RULE_STEPS_PER_POSITION * (block_end - block_start)
        for i in range(limit):
            state.step_in_block = i
            if not _step(state, strategy, decoder):
                break
            state.global_step += 1
            bar.update(1)
            if opts.output_history:
                history.append(state.x.clone())
            if i + 1 < limit:
                yield None
        else:
            if steps is None and state.masked()[:, block_start:block_end].any():
                raise RuntimeError(f"diffusion_generate: block {block_index} still has MASK tokens after {limit} "
                                   f"steps of threshold/factor decoding with cache_type={opts.cache_type!r}: "
                                   "the strategy never fed the positions that predict them")
        ended = opts.eos_early_stop and _all_rows_ended(state, block_end)
        if ended:
            tail = state.x[:, block_end:]
            state.x[:, block_end:] = torch.where(tail == opts.mask_token_id, opts.eos_token_id, tail)
        if ended or block_index == len(blocks) - 1:
            bar.close()
            yield state.length
            return
        yield block_end


def _commit_settings(strategy: caches.CacheStrategy, decoder: Decoder) -> CommitSettings | None:
    """Whether the compiled step (either mode) can also choose and write: the plain vanilla rule, and a strategy
    that keeps the sampler's confidences (dKV greedy replaces them with its own order)."""
    if type(strategy).confidence is not caches.CacheStrategy.confidence:
        return None
    return decoder.commit_settings()


def _all_rows_ended(state: DecodeState, block_end: int) -> bool:
    region = state.x[:, state.prompt_length:block_end]
    return bool((region == state.opts.eos_token_id).any(dim=1).all())


def _width(state: DecodeState, n: int, cap: int) -> int:
    """The index width for ``n`` entries: exact when eager; a power-of-two bucket (≤ ``cap``) under
    ``torch.compile``, which compiles per shape; at least ``aot.MIN_WIDTH`` for an AOT step, whose widths are
    dynamic. Padding entries point at the scratch slot and never change a result."""
    if state.capture_mode == "inductor":
        return bucket(n, cap)
    if state.capture_mode == "aot":
        return max(n, aot.MIN_WIDTH)
    return n


def _step(state: DecodeState, strategy: caches.CacheStrategy, decoder: Decoder) -> bool:
    """One denoising step of the current block. Returns False when the block has nothing left to decode."""
    opts, length = state.opts, state.length
    candidates = state.x[:, state.block_start: state.block_end] == opts.mask_token_id  # the block's MASK tokens
    plan = strategy.plan(state)
    # The step's one host synchronisation: how many candidates (0 = the block is done) and fed positions the
    # widest row has (under torch.compile rounded up to a bucket, so the step only ever sees a few shapes).
    cand_counts = candidates.sum(1)
    counts = [cand_counts.max()]
    if plan.fed_mask is not None:
        fed_per_row = plan.fed_mask.sum(1)
        counts += [fed_per_row.max(), fed_per_row.sum()]
    counts += [value.long() for value in plan.reads.values()]
    widths = torch.stack(counts).tolist()
    if widths[0] == 0:
        return False  # the plan is discarded (plans are side-effect safe)
    if plan.reads:
        plan.read_values = dict(zip(plan.reads, widths[len(widths) - len(plan.reads):], strict=True))
        plan.refresh = bool(plan.read_values.get("refresh", plan.refresh))
        widths = widths[: len(widths) - len(plan.reads)]
    block_width = state.block_end - state.block_start
    cand_pos, cand_valid = fixed_indices(candidates, _width(state, widths[0], block_width), length,
                                         start=state.block_start)
    if plan.fed_mask is not None:
        plan.fed_idx = fixed_indices(plan.fed_mask, _width(state, widths[1], length), length)[0]
        plan.fed_count = widths[2]
    state.refreshes += int(plan.refresh)
    if state.commit is not None and state.capture_mode == "aot":  # one C++ call: forward, head, choice, write
        x_before = state.x
        state.x, transfer, conf = _aot_forward_and_head(state, plan, decoder, cand_pos, cand_valid,
                                                        count=state.schedule.count(state.step_in_block, cand_counts))
        strategy.after_step(state, StepOutcome(plan.fed_idx, cand_pos, cand_valid, conf, transfer, x_before))
        return True
    source, offsets = candidate_sources(cand_pos, cand_valid, state.prompt_length, state.head_settings)
    full = shadow = None
    if state.commit is not None:  # compile="inductor": the compiled head also chooses and writes
        count = state.schedule.count(state.step_in_block, cand_counts)
        x_before = state.x
        hidden, _ = _forward(state, strategy, plan, decoder)
        noise_step = torch.tensor(state.noise_step, device=cand_pos.device)
        state.x, transfer, conf = capture.compiled_head_and_commit(state.model)(
            state.capture_stats, hidden, plan.fed_idx, source, cand_valid, offsets, state.row_seeds, noise_step,
            state.head_settings, x_before, cand_pos, count, state.rule_value, state.commit)
        strategy.after_step(state, StepOutcome(plan.fed_idx, cand_pos, cand_valid, conf, transfer, x_before))
        return True
    if state.capture_mode == "aot":
        logits, decodable, x0, conf = _aot_forward_and_head(state, plan, decoder, cand_pos, cand_valid)
    else:
        hidden, shadow = _forward(state, strategy, plan, decoder)
        if opts.full_logits or opts.generation_logits_hook_func or opts.generation_tokens_hook_func:
            logits, full = _logits_everywhere(state, hidden, plan, cand_pos)
            decodable = cand_valid  # a candidate whose source position was not fed this step has no prediction
            if plan.fed_idx is not None:
                decodable = cand_valid & (slots_of(plan.fed_idx, length).gather(1, source) >= 0)
            x0, conf = propose(logits, offsets, state.row_seeds, state.noise_step, state.head_settings)
        elif state.capture_mode == "inductor":
            noise_step = torch.tensor(state.noise_step, device=cand_pos.device)  # data, so no recompile per step
            logits, decodable, x0, conf = capture.compiled_head(state.model)(
                state.capture_stats, hidden, plan.fed_idx, source, cand_valid, offsets, state.row_seeds, noise_step,
                state.head_settings)
        else:
            logits, decodable, x0, conf = step_head(state.model, hidden, plan.fed_idx, source, cand_valid, offsets,
                                                    state.row_seeds, state.noise_step, state.head_settings)
    override = strategy.confidence(state, cand_pos)
    raw_conf = conf if override is None else override
    step = StepView(state, cand_pos, cand_valid, decodable, offsets, logits, x0, raw_conf, opts.banned_ids,
                    shadow=shadow)
    step.conf = decoder.confidence(step)
    step.score = certainty_prior(step.conf, ~state.masked()[:, state.prompt_length:], offsets, opts.sigma)
    transfer = decoder.choose(step, state.schedule.count(state.step_in_block, cand_counts))

    x_before = state.x  # the write below makes a new tensor, so this stays the pre-step sequences
    state.x = write_tokens(state.x, cand_pos, transfer, x0, opts.mask_token_id)
    decoder.after_write(step, transfer, x_before)
    strategy.after_step(state, StepOutcome(plan.fed_idx, cand_pos, cand_valid, step.conf, transfer, x_before))
    if opts.generation_tokens_hook_func is not None:
        state.x = opts.generation_tokens_hook_func(state.global_step, state.x, full)
    return True


def _model_inputs(state: DecodeState, plan: caches.StepPlan, decoder: Decoder) -> tuple:
    """(ids, positions, key_valid, extra_mask, extension, kv) of this step's forward: the sequence, extended by
    the decoder's tokens (WINO's shadow block) and doubled for classifier-free guidance when asked."""
    opts = state.opts
    ids, positions, key_valid = state.x, state.positions, state.key_valid
    extension = decoder.extension(state)
    extra_mask = None
    if extension is not None:
        ids = torch.cat([ids, extension.ids], dim=1)
        positions = torch.cat([positions, extension.positions], dim=1)
        key_valid = torch.cat([key_valid, torch.ones_like(extension.ids, dtype=torch.bool)], dim=1)
        extra_mask = extension.extra_mask
    if opts.cfg_scale > 0:
        unconditional = ids.clone()
        unconditional[:, : state.prompt_length] = opts.mask_token_id  # the prompt (pads included) is masked
        ids = torch.cat([ids, unconditional])
        positions = torch.cat([positions, positions])
        key_valid = torch.cat([key_valid, key_valid])
    kv = None
    if plan.use_kv:
        if state.kv is None:
            state.kv = (capture.step_kv(state.model, ids.shape[0], state.length) if _static_kv(state)
                        else state.model.allocate_kv(ids.shape[0], state.length))
        kv = state.kv
    return ids, positions, key_valid, extra_mask, extension, kv


def _forward_scope() -> Any:
    """The profiler scope dkvcache.overhead counts per-layer calls in; a no-op when nothing is profiling."""
    return record_function("dkvcache.forward") if torch.autograd._profiler_enabled() else nullcontext()


def _static_kv(state: DecodeState) -> bool:
    """CUDA graphs (compile on CUDA) need the K/V buffers at fixed, static-marked addresses."""
    return state.capture_mode == "inductor" and state.x.device.type == "cuda"


def _count_forward(state: DecodeState, ids: torch.Tensor, plan: caches.StepPlan) -> None:
    state.forwards += 1
    state.full_positions += ids.numel()
    if plan.fed_idx is None:
        state.fed_full += ids.numel()
    elif plan.fed_count is not None:  # both CFG halves feed the set
        state.fed_full += plan.fed_count * (ids.shape[0] // state.batch)
    else:  # padding entries (= L) are not fed positions
        state.fed_counts.append((plan.fed_idx < state.length).sum() * (ids.shape[0] // state.batch))


def _forward(state: DecodeState, strategy: caches.CacheStrategy, plan: caches.StepPlan,
             decoder: Decoder) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the model on the plan's fed positions (both CFG halves when cfg_scale > 0).

    Returns the hidden states of the fed positions and, when the decoder appends tokens (WINO's shadow block,
    no cache), theirs separately.
    """
    model = state.model
    ids, positions, key_valid, extra_mask, extension, kv = _model_inputs(state, plan, decoder)
    with _forward_scope():
        if state.capture_mode == "inductor":
            hidden = capture.compiled_forward(model)(state.capture_stats, ids, positions, key_valid, plan.fed_idx, kv)
        else:
            hidden = model.partial_forward(ids, positions, key_valid, fed_idx=plan.fed_idx, kv=kv,
                                           layer_hook=strategy.layer_hook(),
                                           want_attn_probs=strategy.wants_attention, extra_mask=extra_mask)
    _count_forward(state, ids, plan)
    if extension is not None:
        return hidden[:, : state.length], hidden[:, state.length:]
    return hidden, None


def _aot_forward_and_head(state: DecodeState, plan: caches.StepPlan, decoder: Decoder, cand_pos: torch.Tensor,
                          cand_valid: torch.Tensor, count: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """compile="aot": the forward and the head as one AOTInductor call (see :mod:`dkvcache.aot`); with
    ``state.commit`` the vanilla choice and the write too (then the schedule's ``count`` is given)."""
    ids, positions, key_valid, _, _, kv = _model_inputs(state, plan, decoder)
    noise_step = torch.tensor(state.noise_step, device=ids.device)
    if state.rotary is None:  # once per call: positions never move (and no decoder extension is ever captured)
        state.rotary = rotary_cos_sin(positions, state.model._head_dim, state.model._rope_theta)
    with _forward_scope():
        out = aot.aot_step(state.model)(state.capture_stats, ids, positions, key_valid, plan.fed_idx, kv,
                                        state.rotary, cand_pos, cand_valid, state.prompt_length_data,
                                        state.row_seeds, noise_step, state.head_settings, state.commit, count,
                                        state.rule_value, all_keys_valid=state.unpadded)
    _count_forward(state, ids, plan)
    return out


def _logits_everywhere(state: DecodeState, hidden: torch.Tensor, plan: caches.StepPlan,
                       cand_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's (B, L, V) logits (-inf where not fed, shifted for Dream), for hooks and benchmarks.

    Returns (candidate logits (B, m, V), full logits (B, L, V)).
    """
    logits = combine_cfg(state.model.logits_from_hidden(hidden), state.opts.cfg_scale)
    if plan.fed_idx is not None:
        full = logits.new_full((state.batch, state.length + 1, logits.shape[-1]), float("-inf"))
        full.scatter_(1, plan.fed_idx[..., None].expand(-1, -1, logits.shape[-1]), logits)
        logits = full[:, : state.length]
    if state.family.shift_logits:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    if state.opts.generation_logits_hook_func is not None:
        logits = state.opts.generation_logits_hook_func(state.global_step, state.x, logits)
    picked = logits.gather(1, cand_pos.clamp(max=state.length - 1)[..., None].expand(-1, -1, logits.shape[-1]))
    return picked, logits


def response_lengths(sequences: torch.Tensor, prompt_length: int, eos_token_id: int | None) -> torch.Tensor:
    """Generated tokens per row up to (not including) the first EOS: the one rule every tokens/s uses."""
    generated = sequences[:, prompt_length:]
    if eos_token_id is None:
        return torch.full((sequences.shape[0],), generated.shape[1], dtype=torch.long)
    is_eos = generated == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.long().argmax(1), generated.shape[1])
    return first.cpu()


def _stats(state: DecodeState, strategy: caches.CacheStrategy, seconds: float) -> dict:
    tokens = response_lengths(state.x, state.prompt_length, state.opts.eos_token_id)
    total = int(tokens.sum())
    forwards = max(state.forwards, 1)
    fed = state.fed_positions()
    return {
        "steps": state.global_step,
        "forwards": state.forwards,
        "response_tokens": tokens.tolist(),
        "tokens_per_forward": total / (state.batch * forwards),
        "fed_positions": fed,
        "fed_fraction": fed / max(state.full_positions, 1),
        "wall_time_s": seconds,
        "tokens_per_s": total / seconds if seconds > 0 else float("nan"),
        "cache_type": state.opts.cache_type,
        "block_length": state.opts.block_length or state.opts.max_new_tokens,
        "refreshes": state.refreshes,
        **strategy.stats(),
    }
