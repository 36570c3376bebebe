"""Fast-dLLM: prefix/dual caches and threshold/factor parallel decoding (spec §3, property tests §4)."""

from __future__ import annotations

import pytest
import torch

from dkvcache import generate_with_dual_cache, generate_with_prefix_cache
from dkvcache.sampling import parallel_count
from tests.conftest import MASK, left_pad, random_prompts, tiny_dream, tiny_llada

PROMPTS = [random_prompts(1, 8, seed=31)[0], random_prompts(1, 3, seed=32)[0], random_prompts(1, 6, seed=33)[0]]


def _gen(model, ids, mask=None, **kwargs):
    """Same call for both families: Dream gets alg=maskgit_plus (a probability confidence) unless given."""
    if model.diffusion_family == "dream":
        kwargs.setdefault("alg", "maskgit_plus")
    kwargs.setdefault("max_new_tokens", 12)
    kwargs.setdefault("steps", kwargs["max_new_tokens"])
    kwargs.setdefault("block_length", 4)
    return model.diffusion_generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)


MODELS = {"dream": lambda layers=2: tiny_dream(layers=layers, seed=11),
          "llada": lambda layers=2: tiny_llada(layers=layers, seed=12)}


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refresh_every_step_is_no_cache(family, cache):
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    for extra in ({}, {"threshold": 0.05}):
        plain = _gen(model, ids, mask, **extra)
        cached = _gen(model, ids, mask, use_cache=True, cache_type=cache, cache_steps=1, **extra)
        assert torch.equal(plain.sequences, cached.sequences)
        assert cached.stats["fed_fraction"] == 1.0


@pytest.mark.parametrize("family", MODELS)
def test_one_layer_prefix_dual_and_no_cache_agree(family):
    """Layer-0 K/V depend only on token and position, and the suffix stays MASK inside a block: with one layer
    the caches are exact for the whole run; any mismatch would be a plumbing bug."""
    model = MODELS[family](layers=1)
    ids, mask = left_pad(PROMPTS)
    for extra in ({}, {"threshold": 0.1}, {"factor": 1.0}):
        plain = _gen(model, ids, mask, **extra).sequences
        fed = {}
        for cache in ("prefix", "dual"):
            cached = _gen(model, ids, mask, use_cache=True, cache_type=cache, **extra)
            assert torch.equal(plain, cached.sequences), (cache, extra)
            fed[cache] = cached.stats["fed_fraction"]
        assert fed["dual"] < fed["prefix"] < 1.0  # and the caches really skipped work


@pytest.mark.parametrize("family", MODELS)
def test_staleness_happens_with_two_layers(family):
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    plain = _gen(model, ids, mask, max_new_tokens=16).sequences
    for cache in ("prefix", "dual"):
        assert not torch.equal(plain, _gen(model, ids, mask, max_new_tokens=16, use_cache=True,
                                           cache_type=cache).sequences)


@pytest.mark.parametrize("family", MODELS)
def test_single_forward_cache_consistency(family):
    """Buffers built from a full forward of x: feeding [s, L) (prefix) or [s, e) (dual) gives the full forward's
    hidden states at those positions."""
    model = MODELS[family](layers=3)
    ids, mask = left_pad(PROMPTS)
    x = torch.cat([ids, torch.full((3, 8), MASK)], dim=1)
    x[:, ids.shape[1] + 1] = 7  # some decoded tokens inside the block
    key_valid = torch.cat([mask.bool(), torch.ones(3, 8, dtype=torch.bool)], dim=1)
    positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)
    start, end, length = ids.shape[1], ids.shape[1] + 4, x.shape[1]
    with torch.no_grad():
        kv = model.allocate_kv(3, length)
        full = model.partial_forward(x, positions, key_valid, kv=kv)
        for fed_range in (range(start, length), range(start, end)):
            fed = torch.tensor(list(fed_range)).expand(3, -1)
            part = model.partial_forward(x, positions, key_valid, fed_idx=fed, kv=kv)
            assert torch.allclose(part, full[:, fed_range.start:fed_range.stop], atol=1e-12)


@pytest.mark.parametrize("family", MODELS)
def test_threshold_extremes(family):
    model = MODELS[family]()
    ids = PROMPTS[0][None]
    one_per_step = _gen(model, ids, threshold=1.5, output_history=True)
    unmasked = [int((h != MASK).sum()) for h in one_per_step.history]
    assert [b - a for a, b in zip([8] + unmasked, unmasked)] == [1] * 12
    if family == "llada":  # its vanilla quota is one token per step here, so the runs coincide
        assert torch.equal(_gen(model, ids).sequences, one_per_step.sequences)
    whole_block = _gen(model, ids, threshold=0.0)
    assert whole_block.stats["forwards"] == 3 and (whole_block.sequences != MASK).all()
    for cache in ("prefix", "dual"):
        cached = _gen(model, ids, threshold=-1.0, use_cache=True, cache_type=cache)
        assert cached.stats["forwards"] == 3 and cached.stats["tokens_per_forward"] == 4.0


def test_threshold_set_is_monotone_and_keeps_the_best():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(4, 10, generator=gen, dtype=torch.float64)
    valid = torch.rand(4, 10, generator=gen) < 0.8
    previous = None
    for tau in (1.5, 0.9, 0.7, 0.5, 0.2, 0.0):
        count = parallel_count(conf, valid, tau, None)
        expected = ((conf >= tau) & valid).sum(1).clamp(min=1).clamp(max=valid.sum(1))
        assert torch.equal(count, expected)
        if previous is not None:
            assert (count >= previous).all()
        previous = count
    assert (parallel_count(conf, valid, 2.0, None) == 1).all()  # nothing reaches τ: the best one alone


def test_factor_rule_hand_cases():
    def count(values):
        conf = torch.tensor([values + [0.0] * (4 - len(values))], dtype=torch.float64)
        valid = torch.tensor([[True] * len(values) + [False] * (4 - len(values))])
        return int(parallel_count(conf, valid, None, 1.0))

    # thresholds with f = 1: rank 1 always, rank k ≥ 2 needs c ≥ 1 − 1/(k+1): 2/3, 3/4, 4/5
    assert count([0.99, 0.9, 0.5]) == 2  # fails at the last rank; the original accepted all 3 (documented fix)
    assert count([0.99, 0.5, 0.4, 0.2]) == 1
    assert count([0.99, 0.99, 0.5, 0.2]) == 2
    assert count([0.3]) == 1
    assert count([]) == 0  # a row whose block is done (the original hit an unbound variable)

    def original(values):
        conf = torch.tensor([values], dtype=torch.float64)
        return int(parallel_count(conf, torch.ones_like(conf, dtype=torch.bool), None, 1.0, "fast_dllm"))

    assert original([0.99, 0.9, 0.5]) == 3  # Fast-dLLM's code: a lone failure at the last rank is accepted
    assert original([0.99, 0.5, 0.4, 0.2]) == 1 and original([0.99, 0.99, 0.5, 0.2]) == 2
    assert original([0.99, 0.99, 0.99, 0.2]) == 4 and original([0.3]) == 1


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("extra", [dict(use_cache=True, cache_type="prefix"), dict(use_cache=True, cache_type="dual"),
                                   dict(threshold=0.2), dict(factor=2.0),
                                   dict(use_cache=True, cache_type="dual", threshold=0.2),
                                   dict(use_cache=True, cache_type="prefix", factor=2.0, temperature=0.8)],
                         ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_padded_rows_equal_single_runs(family, extra):
    """Under a threshold rows finish blocks at different times; a row's result must not depend on the others."""
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    batch = _gen(model, ids, mask, seed=40, **extra).sequences
    for i, prompt in enumerate(PROMPTS):
        single = _gen(model, prompt[None], seed=40 + i, **extra).sequences
        assert torch.equal(batch[i, ids.shape[1]:], single[0, len(prompt):]), i


def test_original_call_forms():
    dream, llada = MODELS["dream"](), MODELS["llada"]()
    ids = PROMPTS[0][None]
    out = dream.diffusion_generate(ids, max_new_tokens=64, steps=64, alg="confidence_threshold", threshold=0.9,
                                   block_length=32, use_cache=True, dual_cache=True, return_dict_in_generate=True)
    assert out.stats["cache_type"] == "dual" and out.stats["block_length"] == 32
    out = dream.diffusion_generate(ids, max_new_tokens=64, steps=64, alg="confidence_threshold", use_cache=True,
                                   dual_cache=False, return_dict_in_generate=True)
    assert out.stats["cache_type"] == "prefix" and out.stats["block_length"] == 32  # the default for these two
    for fn, cache in ((generate_with_prefix_cache, "prefix"), (generate_with_dual_cache, "dual")):
        x, nfe = fn(llada, ids, steps=16, gen_length=16, block_length=8, temperature=0.0, remasking="low_confidence",
                    mask_id=MASK, threshold=0.9)
        ref = llada.diffusion_generate(ids, steps=16, gen_length=16, block_length=8, threshold=0.9, use_cache=True,
                                       cache_type=cache, return_dict_in_generate=True)
        assert torch.equal(x, ref.sequences) and nfe == ref.stats["forwards"]


def test_in_block_refresh_and_validation():
    llada = MODELS["llada"]()
    ids = PROMPTS[0][None]
    out = _gen(llada, ids, use_cache=True, cache_type="dual", cache_steps=2)
    assert out.stats["refreshes"] == 3 * 2  # steps 0 and 2 of each of the 3 blocks
    with pytest.raises(ValueError, match="block_length"):
        llada.diffusion_generate(ids, gen_length=40, steps=40, use_cache=True, cache_type="dual")
    with pytest.raises(ValueError, match="threshold"):
        MODELS["dream"]().diffusion_generate(ids, max_new_tokens=8, alg="entropy", threshold=0.9)
    with pytest.raises(ValueError, match="not both"):
        llada.diffusion_generate(ids, gen_length=8, steps=8, threshold=0.9, factor=1.0)
    with pytest.raises(ValueError, match="dual_cache"):
        llada.diffusion_generate(ids, gen_length=8, steps=8, use_cache=True, cache_type="decoded", dual_cache=True)
    with pytest.raises(ValueError, match="factor_rule"):
        llada.diffusion_generate(ids, gen_length=8, steps=8, factor=1.0, factor_rule="original")
    with pytest.raises(TypeError, match="schedule_floor"):
        llada.diffusion_generate(ids, gen_length=8, steps=8, threshold=0.5, schedule_floor="yes")
    with pytest.raises(ValueError, match="schedule_floor"):
        llada.diffusion_generate(ids, gen_length=8, steps=8, remasking="random", threshold=0.5, use_cache=True,
                                 cache_type="greedy")


@pytest.mark.parametrize("family", MODELS)
def test_rule_decides_and_schedule_floor_caps(family):
    """threshold/factor: the rule alone decides (steps play no part, a block loops until done, as Fast-dLLM);
    schedule_floor=True: at least the schedule's count, so a block takes at most steps / num_blocks forwards."""
    model = MODELS[family]()
    ids = PROMPTS[0][None]
    for rule in (dict(threshold=1.5), dict(factor=0.01)):  # nothing passes: one token per forward
        few, many = _gen(model, ids, steps=3, **rule), _gen(model, ids, steps=12, **rule)
        assert torch.equal(few.sequences, many.sequences)
        assert few.stats["forwards"] == many.stats["forwards"] == 12
        capped = _gen(model, ids, steps=3, schedule_floor=True, **rule)
        assert capped.stats["forwards"] == 3 and (capped.sequences != MASK).all()


def test_dream_threshold_defaults_to_maskgit_plus():
    """Fast-dLLM's Dream call: threshold/factor without alg decode by probability (Dream's default, origin, has
    no confidence to compare)."""
    dream = MODELS["dream"]()
    ids = PROMPTS[0][None]
    implicit = dream.diffusion_generate(ids, max_new_tokens=8, steps=8, threshold=0.2)
    assert torch.equal(implicit, dream.diffusion_generate(ids, max_new_tokens=8, steps=8, threshold=0.2,
                                                          alg="maskgit_plus"))


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("cache", [dict(cache_type="decoded", cache_steps=3), dict(cache_type="pd", cache_steps=3),
                                   dict(cache_type="dllm", kp=5, kr=2), dict(cache_type="prefill"),
                                   dict(cache_type="d2")],
                         ids=lambda c: c["cache_type"])
def test_every_cache_with_threshold_keeps_rows_independent(family, cache):
    """Rows finish blocks at different steps under a threshold; a row that waited for the others still equals its
    single run (dKV/prefix/dual/d2 restart their schedule at each block; dLLM-Cache counts a row's own forwards)."""
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    extra = dict(use_cache=True, threshold={"dream": 0.1, "llada": 0.04}[family], **cache)
    batch = _gen(model, ids, mask, **extra)
    forwards = []
    for i, prompt in enumerate(PROMPTS):
        single = _gen(model, prompt[None], **extra)
        forwards.append(single.stats["forwards"])
        assert torch.equal(batch.sequences[i, ids.shape[1]:], single.sequences[0, len(prompt):]), i
    assert batch.stats["forwards"] > min(forwards)  # some row really waited for the others
