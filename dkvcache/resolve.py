"""``resolve``: every argument of a ``diffusion_generate`` call completed and checked, before any compute.

Generic options are merged and validated by :mod:`dkvcache.options`; each cache strategy and each decoder then
checks what it owns (its knobs, its compatibility rules). ``diffusion_generate`` and ``dkvcache.bench`` both use
this one function, so a setting the benchmark accepts is one the API accepts.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from dkvcache import caches, decoders
from dkvcache.options import GenerationOptions, resolve_options


def resolve(model: Any, prompt_length: int, generation_config: Any = None, **kwargs: Any) -> GenerationOptions:
    """The resolved options of ``model.diffusion_generate(inputs (B, prompt_length), generation_config, **kwargs)``.

    Raises ValueError/TypeError naming the argument and the allowed values for any bad or incompatible one.
    """
    family = model.diffusion_family
    opts = resolve_options(family, model.config, prompt_length, generation_config, kwargs,
                           caches.available_strategies(), caches.default_block_lengths(),
                           decoders.decoding_knobs(), caches.switches())
    _check_special_ids(model, opts)
    strategy = caches.get_strategy(opts.cache_type)
    decoder = decoders.get_decoder(opts.decoding)
    strategy.check(opts.cache_options, family, opts)
    decoder.check(opts)
    if opts.cfg_scale > 0:
        if not strategy.supports_cfg:
            raise ValueError(f"diffusion_generate: cfg_scale > 0 is not supported with cache_type={opts.cache_type!r}; "
                             "use cfg_scale=0 or use_cache=False")
        if not decoder.supports_cfg:
            raise ValueError(f"diffusion_generate: cfg_scale > 0 is not supported with decoding={opts.decoding!r}")
    return opts


def vocabulary_size(model: Any) -> int:
    """Rows of the input embedding: every token id must be below this."""
    return model.get_input_embeddings().weight.shape[0]


def _check_special_ids(model: Any, opts: GenerationOptions) -> None:
    size = vocabulary_size(model)
    for name in ("mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id"):
        value = getattr(opts, name)
        if value is not None and not 0 <= value < size:
            raise ValueError(f"diffusion_generate: {name}={value} is outside the model's vocabulary [0, {size})")


_WARNED_LENGTH: set[tuple[int, int]] = set()


def check_inputs_fit(model: Any, inputs: Any, opts: GenerationOptions) -> None:
    """Token ids inside the vocabulary (padded positions included: they are embedded too), before any compute;
    a one-time warning when prompt + new tokens exceed the positions the model was trained for."""
    size = vocabulary_size(model)
    low, high = torch.stack(torch.aminmax(inputs)).tolist()  # one host read
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise ValueError(f"diffusion_generate: inputs hold token id {bad}, outside the model's vocabulary "
                         f"[0, {size}) (padded positions included: pad with pad_token_id)")
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "max_sequence_length", None)
    total = inputs.shape[1] + opts.max_new_tokens
    if limit and total > limit and (total, limit) not in _WARNED_LENGTH:
        _WARNED_LENGTH.add((total, limit))
        warnings.warn(f"diffusion_generate: prompt + max_new_tokens = {total} exceeds the {limit} positions this "
                      "model was trained for; quality past that length is not guaranteed", stacklevel=4)
