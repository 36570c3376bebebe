"""Decoding strategies (``diffusion_generate(decoding=...)``): vanilla, pc_sampler, klass, eb_sampler, wino, ar.

Each is one small class in its own file that registers itself with ``@register_decoder``; this package imports
them (one line per decoder). The contract is in :mod:`dkvcache.decoders.base`; the rules, the fixes relative to
the d2Cache framework and measurements are in docs/decoders.md. All rules are vectorised over the batch, so a
left-padded row equals its single run.
"""

from dkvcache.decoders import ar, eb_sampler, klass, pc_sampler, wino  # noqa: F401  (importing registers them)
from dkvcache.decoders.ar import AR
from dkvcache.decoders.base import (
    Decoder,
    Extension,
    StepView,
    decoding_knobs,
    get_decoder,
    make_decoder,
    register_decoder,
)
from dkvcache.decoders.eb_sampler import EBSampler
from dkvcache.decoders.klass import Klass
from dkvcache.decoders.pc_sampler import PCSampler
from dkvcache.decoders.wino import Wino
from dkvcache.unigram import build_unigram_table, load_unigram_table

__all__ = ["AR", "Decoder", "EBSampler", "Extension", "Klass", "PCSampler", "StepView", "Wino",
           "build_unigram_table", "decoding_knobs", "get_decoder", "load_unigram_table", "make_decoder",
           "register_decoder"]
