"""The plug-in registries: unique names, clear lookups, and the extension contract a new plug-in gets."""

from __future__ import annotations

import pytest

from dkvcache.caches import CacheStrategy, available_strategies, get_strategy, register_strategy
from dkvcache.decoders import Decoder, decoding_knobs, get_decoder, register_decoder


def test_duplicate_names_are_refused():
    class Impostor(CacheStrategy):
        name = "dual"

    class Rival(Decoder):
        name = "klass"

    with pytest.raises(ValueError, match="cache_type='dual' is already registered"):
        register_strategy(Impostor)
    with pytest.raises(ValueError, match="decoding='klass' is already registered"):
        register_decoder(Rival)
    assert get_strategy("dual") is not Impostor and get_decoder("klass") is not Rival


def test_lookups_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"cache_type='nope' is invalid; allowed: \[.*'dual'"):
        get_strategy("nope")
    with pytest.raises(ValueError, match=r"decoding='nope' is invalid; allowed: \[.*'wino'"):
        get_decoder("nope")
    assert {"none", "decoded", "prefix", "dual", "dllm", "d2"} <= set(available_strategies())
    assert decoding_knobs()["eb_sampler"] == {"gamma": 1e-3}
