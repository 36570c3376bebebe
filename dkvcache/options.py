"""Every argument of ``diffusion_generate``: names, documented defaults, and validation before any compute."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dkvcache.sampling import ALGS, FACTOR_RULES, REMASKING_ALIASES
from dkvcache.validate import check_bool, check_int, check_number, check_seed, fail

# compile="aot": AOTInductor, one C++ call a step (CPU; what compile=True means there). compile="inductor":
# torch.compile per bucketed shape (CUDA graphs on CUDA; what compile=True means there). See dkvcache.capture.
COMPILE_MODES = ("aot", "inductor")


@dataclass
class GenerationOptions:
    """Resolved options of one ``diffusion_generate`` call (see the README's API table).

    Defaults that depend on the model family are filled by :func:`resolve_options`:
      Dream: max_new_tokens 20 (the original's max_length=20 rule), steps 512, alg "origin", one block.
      LLaDA: gen_length 128, steps 128, alg "maskgit_plus" (= remasking "low_confidence"), block = gen length.
    Parallel decoding (Fast-dLLM): ``threshold`` τ transfers the most confident candidate plus every candidate
    of the current block with confidence ≥ τ; ``factor`` f transfers the longest confidence-sorted prefix with
    (k+1)(1 − c_k) ≤ f. As in Fast-dLLM, the rule alone decides: the step schedule is not used and a block
    loops until it has no MASK left, so ``steps`` plays no part (same tokens and forwards as the original).
    ``schedule_floor=True`` (opt-in, not in the original) keeps the schedule as a floor instead: each step
    transfers max(schedule count, rule count), so a block takes at most steps / num_blocks forwards.
    ``factor_rule="fast_dllm"`` also accepts the last candidate when it alone fails the factor rule (the
    original code's behaviour); the default ``"paper"`` stops at the first failure. With threshold/factor and
    no ``alg``, Dream uses ``"maskgit_plus"``. ``alg="confidence_threshold"`` (Fast-dLLM's Dream name) is
    ``alg="maskgit_plus"`` with ``threshold`` defaulting to 0.9.
    ``progress=True``: a tqdm bar over the denoising steps (off by default; the example scripts turn it on).
    ``compile=True``: the model forward and head of each step captured. On CPU that is ``"aot"``: both as one
    AOTInductor package per call signature, run as one C++ call a step (``dkvcache.aot``); on CUDA
    ``"inductor"``: ``torch.compile`` per bucketed shape under CUDA graphs. Either can be asked for by name.
    Compile time is reported as ``stats["compile_s"]``. Strategies or decoders that cannot be captured run
    eagerly with a one-line notice (see ``dkvcache.capture``).
    Certainty prior (d2Cache): ``sigma`` > 0 ranks masked positions by confidence × certainty density
    (``dkvcache.density``) instead of confidence alone; threshold/factor then compare that score. Small sigma
    decodes nearly left to right, a huge sigma is plain confidence decoding. None or 0 = off.
    The original Dream silently sampled with top_k=50 and temperature 1.0 when they were omitted (legacy
    transformers config attributes); here omitted means off. To reproduce that behaviour pass
    ``temperature=1.0, top_k=50``.
    Decoding strategies (``dkvcache.decoders``, docs/decoders.md): ``decoding`` in "vanilla", "pc_sampler"
    (``pc_frequencies``, ``clip_alpha`` 10), "klass" (``kl_threshold``, ``conf_threshold``: its authors' per
    family, LLaDA 0.015 / 0.6, Dream 0.001 / 0.9; ``kl_history_length`` 2),
    "eb_sampler" (``gamma`` 0.001), "wino" (``wide_in_thres`` 0.7, ``narrow_out_thres`` 0.9; no cache), "ar".
    A knob left None takes that default for its own decoding; a knob of another decoding is rejected. For
    decodings other than vanilla the default ``alg`` is "maskgit_plus" (Dream's "origin" has no confidence).
    """

    max_new_tokens: int = 0
    steps: int = 0
    eps: float = 1e-3
    block_length: int | None = None
    alg: str = "maskgit_plus"
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float | None = None
    cfg_scale: float = 0.0
    threshold: float | None = None
    factor: float | None = None
    schedule_floor: bool = False
    compile: bool | str = False
    progress: bool = False
    factor_rule: str = "paper"
    sigma: float | None = None
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    num_return_sequences: int = 1
    output_history: bool = False
    return_dict_in_generate: bool = False
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    seed: Any = None
    generator: torch.Generator | None = None
    eos_early_stop: bool = False
    full_logits: bool = False
    use_cache: bool = False
    cache_type: str = "none"
    dual_cache: bool | None = None
    cache_options: dict = field(default_factory=dict)
    generation_tokens_hook_func: Callable | None = None
    generation_logits_hook_func: Callable | None = None
    decoding: str = "vanilla"
    clip_alpha: float | None = None
    pc_frequencies: Any = None
    kl_threshold: float | None = None
    kl_history_length: int | None = None
    conf_threshold: float | None = None
    gamma: float | None = None
    wide_in_thres: float | None = None
    narrow_out_thres: float | None = None

    @property
    def banned_ids(self) -> list[int]:
        """Tokens never proposed: MASK itself (writing it would leave a "decoded" position masked; the originals
        allow it, it only shows on untrained weights) and EOS under ``logits_eos_inf``."""
        return [self.mask_token_id] + ([self.eos_token_id] if self.logits_eos_inf else [])

    @property
    def push_last_ids(self) -> list[int]:
        """Tokens whose mass is removed from the confidence under ``confidence_eos_eot_inf`` (decoded last)."""
        if not self.confidence_eos_eot_inf:
            return []
        return [t for t in (self.eos_token_id, self.eot_token_id) if t is not None]

    @property
    def parallel(self) -> bool:
        """Fast-dLLM parallel decoding is on (``threshold`` or ``factor`` given)."""
        return self.threshold is not None or self.factor is not None

    @property
    def rule_decides(self) -> bool:
        """The parallel rule alone decides each step's transfers: no step schedule, a block runs until done."""
        return self.parallel and not self.schedule_floor


# temperature / cfg_scale beyond this are numerically meaningless (a 1e6 temperature is already uniform) and
# overflow float32 logits arithmetic into NaN, which decoded nothing.
MAX_SCALE = 1e6

_FAMILY_DEFAULTS = {
    "dream": {"max_new_tokens": 20, "steps": 512, "alg": "origin"},
    "llada": {"max_new_tokens": 128, "steps": 128, "alg": "maskgit_plus"},
}
_OPTION_NAMES = {f.name for f in dataclasses.fields(GenerationOptions)} - {"cache_options"}
# The originals' names: LLaDA's gen_length / remasking, dKV-Cache's LLaDA enable_cache / cache_reloading_step.
_ALIASES = {"gen_length": "max_new_tokens", "remasking": "alg", "enable_cache": "use_cache",
            "cache_reloading_step": "cache_steps"}


def _config_values(generation_config: Any) -> dict:
    if generation_config is None:
        return {}
    if isinstance(generation_config, dict):
        items = generation_config
    elif isinstance(generation_config, GenerationOptions):
        items = dataclasses.asdict(generation_config)
    else:
        items = {n: getattr(generation_config, n) for n in _OPTION_NAMES | set(_ALIASES) | {"max_length"}
                 if hasattr(generation_config, n)}
    return {k: v for k, v in items.items() if v is not None}


def resolve_options(family: str, config: Any, prompt_length: int, generation_config: Any,
                    kwargs: dict, strategy_options: dict[str, set[str]],
                    block_defaults: dict[str, int] | None = None,
                    decoding_knobs: dict[str, dict[str, Any]] | None = None,
                    switches: dict[str, dict[bool, str]] | None = None) -> GenerationOptions:
    """Merge family defaults, ``generation_config`` and kwargs; validate the generic options; raise on any bad one.

    strategy_options: for every registered cache strategy, the option names it accepts.
    block_defaults: strategies that are block-wise by nature and the block_length they use when none is given.
    decoding_knobs: every registered decoding with its own knobs and their defaults.
    switches: boolean aliases that pick a strategy (Fast-dLLM's ``dual_cache``: True → "dual", False → "prefix").
    Strategy- and decoder-specific rules are their owners' ``check`` (see :func:`dkvcache.resolve.resolve`).
    """
    merged = dict(_config_values(generation_config))
    merged.update(kwargs)
    if merged.get("alg") == "confidence_threshold":
        merged["alg"] = "maskgit_plus"
        if merged.get("threshold") is None:
            merged["threshold"] = 0.9
    for alias, name in _ALIASES.items():
        if alias in merged:
            value = merged.pop(alias)
            if alias == "remasking":
                if value not in REMASKING_ALIASES:
                    raise fail("remasking", value, repr(sorted(REMASKING_ALIASES)))
                value = REMASKING_ALIASES[value]
            if name in kwargs and kwargs[name] is not None and kwargs[name] != value:
                raise ValueError(f"diffusion_generate: {alias}={value!r} conflicts with {name}={kwargs[name]!r}")
            merged.setdefault(name, value)
    cache_keys = set().union(*strategy_options.values()) if strategy_options else set()
    unknown = sorted(set(merged) - _OPTION_NAMES - cache_keys - {"max_length"})
    if unknown:
        raise ValueError(f"diffusion_generate: unknown argument(s) {unknown}; see GenerationOptions for the "
                         "allowed names")
    cache_options = {k: merged.pop(k) for k in list(merged) if k in cache_keys and k not in _OPTION_NAMES}
    max_length = merged.pop("max_length", None)
    opts = GenerationOptions(**{k: v for k, v in merged.items() if v is not None})
    opts.cache_options = cache_options
    defaults = _FAMILY_DEFAULTS[family]
    if merged.get("max_new_tokens") is None:
        if max_length is not None:
            check_int("max_length", max_length, 1)
            if max_length <= prompt_length:
                raise fail("max_length", max_length, f"more than the prompt length {prompt_length}")
            opts.max_new_tokens = max_length - prompt_length
        else:
            opts.max_new_tokens = defaults["max_new_tokens"]
    if merged.get("steps") is None:
        opts.steps = defaults["steps"]
    if merged.get("alg") is None:  # threshold/factor compare probabilities: Fast-dLLM's Dream call uses maskgit_plus
        parallel = opts.threshold is not None or opts.factor is not None
        opts.alg = defaults["alg"] if opts.decoding == "vanilla" and not parallel else "maskgit_plus"
    for name in ("mask_token_id", "pad_token_id", "eos_token_id"):
        if getattr(opts, name) is None:
            setattr(opts, name, getattr(config, name, None))
    if opts.eot_token_id is None and family == "llada" and config.vocab_size > 126348:
        opts.eot_token_id = 126348  # LLaDA-8B's <|eot_id|>
    _validate_cache(opts, strategy_options, switches or {})
    if opts.block_length is None and (block_defaults or {}).get(opts.cache_type):
        opts.block_length = min(block_defaults[opts.cache_type], opts.max_new_tokens)
    _validate(opts)
    _validate_decoding(opts, decoding_knobs or {"vanilla": {}})
    return opts


def _validate(opts: GenerationOptions) -> None:
    check_int("max_new_tokens", opts.max_new_tokens, 1)
    check_int("steps", opts.steps, 1)
    check_number("eps", opts.eps, 0.0, 1.0, low_open=True)
    check_int("block_length", opts.block_length, 1, allow_none=True)
    if opts.alg not in ALGS:
        raise fail("alg", opts.alg, repr(list(ALGS)) + " (or remasking in ['low_confidence', 'random'])")
    check_number("temperature", opts.temperature, 0.0, MAX_SCALE)
    check_number("top_p", opts.top_p, 0.0, 1.0, allow_none=True, low_open=True)
    check_int("top_k", opts.top_k, 1, allow_none=True)
    check_number("alg_temp", opts.alg_temp, 0.0, float("inf"), allow_none=True)
    check_number("cfg_scale", opts.cfg_scale, 0.0, MAX_SCALE)
    check_number("threshold", opts.threshold, float("-inf"), float("inf"), allow_none=True)
    check_number("factor", opts.factor, 0.0, float("inf"), allow_none=True, low_open=True)
    if (opts.threshold is not None or opts.factor is not None) and opts.alg in ("origin", "entropy"):
        raise ValueError(f"diffusion_generate: threshold/factor compare confidences with probabilities, so they "
                         f"need alg in ['maskgit_plus', 'topk_margin', 'random'], got alg={opts.alg!r}")
    check_number("sigma", opts.sigma, 0.0, float("inf"), allow_none=True)
    if opts.sigma and opts.alg in ("origin", "entropy"):
        raise ValueError(f"diffusion_generate: sigma (certainty prior) multiplies non-negative confidences; use "
                         f"alg in ['maskgit_plus', 'topk_margin', 'random'], got alg={opts.alg!r}")
    if opts.threshold is not None and opts.factor is not None:
        raise ValueError("diffusion_generate: pass threshold or factor, not both")
    if opts.factor_rule not in FACTOR_RULES:
        raise fail("factor_rule", opts.factor_rule, repr(list(FACTOR_RULES)))
    check_int("num_return_sequences", opts.num_return_sequences, 1)
    for name in ("logits_eos_inf", "confidence_eos_eot_inf", "output_history", "return_dict_in_generate",
                 "eos_early_stop", "full_logits", "use_cache", "schedule_floor", "progress"):
        check_bool(name, getattr(opts, name))
    if not isinstance(opts.compile, bool) and opts.compile not in COMPILE_MODES:
        raise fail("compile", opts.compile, f"True, False or one of {list(COMPILE_MODES)}")
    if opts.mask_token_id is None:
        raise ValueError("diffusion_generate: mask_token_id is unknown; set it in the model config or pass it")
    check_int("mask_token_id", opts.mask_token_id, 0)
    if opts.pad_token_id is not None and opts.pad_token_id == opts.mask_token_id:
        raise ValueError("diffusion_generate: pad_token_id equals mask_token_id; pads would be regenerated")
    if (opts.logits_eos_inf or opts.confidence_eos_eot_inf) and opts.eos_token_id is None:
        raise ValueError("diffusion_generate: logits_eos_inf / confidence_eos_eot_inf need eos_token_id")
    if opts.eos_early_stop and opts.eos_token_id is None:
        raise ValueError("diffusion_generate: eos_early_stop needs eos_token_id")
    if opts.block_length is not None:
        if opts.max_new_tokens % opts.block_length:
            raise fail("block_length", opts.block_length, f"a divisor of max_new_tokens={opts.max_new_tokens}")
        blocks = opts.max_new_tokens // opts.block_length
        if opts.steps % blocks:
            raise fail("steps", opts.steps, f"a multiple of the number of blocks ({blocks})")
    for name in ("generation_tokens_hook_func", "generation_logits_hook_func"):
        hook = getattr(opts, name)
        if hook is not None and not callable(hook):
            raise TypeError(f"diffusion_generate: {name} must be callable, got {type(hook).__name__}")
    if opts.generator is not None and not isinstance(opts.generator, torch.Generator):
        raise TypeError(f"diffusion_generate: generator must be a torch.Generator, got {type(opts.generator).__name__}")
    check_seed(opts.seed)


def _validate_decoding(opts: GenerationOptions, knobs_by_decoding: dict[str, dict[str, Any]]) -> None:
    """``decoding`` and its knobs: reject foreign knobs and fill the decoding's defaults (the decoder's own
    ``check`` validates their ranges)."""
    if opts.decoding not in knobs_by_decoding:
        raise fail("decoding", opts.decoding, repr(list(knobs_by_decoding)))
    own = knobs_by_decoding[opts.decoding]
    for owner, knobs in knobs_by_decoding.items():
        for knob in knobs:
            if knob not in own and getattr(opts, knob) is not None:
                raise ValueError(f"diffusion_generate: {knob} is an option of decoding={owner!r}, not of "
                                 f"decoding={opts.decoding!r}")
    for knob, default in own.items():
        if getattr(opts, knob) is None:
            setattr(opts, knob, default)


def _validate_cache(opts: GenerationOptions, strategy_options: dict[str, set[str]],
                    switches: dict[str, dict[bool, str]]) -> None:
    check_bool("use_cache", opts.use_cache)
    for switch, choice in switches.items():  # e.g. Fast-dLLM's dual_cache=True/False
        value = getattr(opts, switch, None)
        if value is None:
            continue
        check_bool(switch, value)
        if opts.use_cache:
            wanted = choice[value]
            if opts.cache_type not in ("none", None, wanted):
                raise ValueError(f"diffusion_generate: {switch}={value} conflicts with cache_type={opts.cache_type!r}")
            opts.cache_type = wanted
    if not opts.use_cache:
        if opts.cache_type not in ("none", None):
            raise ValueError(f"diffusion_generate: cache_type={opts.cache_type!r} needs use_cache=True")
        opts.cache_type = "none"
    elif opts.cache_type in ("none", None):
        cached = sorted(n for n in strategy_options if n != "none")
        if not cached:
            raise ValueError("diffusion_generate: use_cache=True but no cache strategy is registered yet")
        opts.cache_type = cached[0] if "decoded" not in cached else "decoded"
    if opts.cache_type not in strategy_options:
        raise fail("cache_type", opts.cache_type, repr(sorted(strategy_options)))
    accepted = strategy_options[opts.cache_type]
    stray = sorted(set(opts.cache_options) - accepted)
    if stray:
        owners = {k: sorted(n for n, names in strategy_options.items() if k in names) for k in stray}
        raise ValueError(f"diffusion_generate: {stray} do not apply to cache_type={opts.cache_type!r} "
                         f"(they belong to {owners})")
