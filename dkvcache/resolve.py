"""``resolve``: every argument of a ``diffusion_generate`` call completed and checked, before any compute.

Generic options are merged and validated by :mod:`dkvcache.options`; each cache strategy and each decoder then
checks what it owns (its knobs, its compatibility rules). ``diffusion_generate`` and ``dkvcache.bench`` both use
this one function, so a setting the benchmark accepts is one the API accepts.
"""

from __future__ import annotations

from typing import Any

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
