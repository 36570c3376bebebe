"""dKV-Cache: exact reductions, hand-computed fed sets (the one-step delay), staleness, batching, validation."""

from __future__ import annotations

import pytest
import torch

from dkvcache.caches.dkv import cacheable, uncacheable
from tests.conftest import left_pad, random_prompts, tiny_dream, tiny_llada

PROMPTS = [random_prompts(1, 9, seed=21)[0], random_prompts(1, 4, seed=22)[0], random_prompts(1, 7, seed=23)[0]]
DREAM_CACHES = [
    dict(cache_type="decoded", shift_type="un", cache_steps=3),
    dict(cache_type="decoded", shift_type="un_right", cache_steps=3),
    dict(cache_type="prefill"),
    dict(cache_type="pd", shift_type="un", cache_steps=3),
    dict(cache_type="pd", shift_type="un_right", cache_steps=2),
]
LLADA_CACHES = [
    dict(cache_type="decoded", cache_steps=3),
    dict(cache_type="decoded", cache_steps=3, cache_across_blocks=True),
    dict(cache_type="prefill"),
    dict(cache_type="pd", cache_steps=2),
    dict(cache_type="greedy", cache_steps=3, window_size=0, remasking="random"),
    dict(cache_type="greedy", cache_steps=2, window_size=2, remasking="random"),
]


def _name(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


def _record_fed(model, monkeypatch):
    """Wrap partial_forward to record each step's fed positions (None = all)."""
    fed = []
    original = model.partial_forward

    def recording(*args, **kwargs):
        idx = kwargs.get("fed_idx")
        length = args[0].shape[1]
        fed.append(None if idx is None else [sorted(p for p in row.tolist() if p < length) for row in idx])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "partial_forward", recording)
    return fed


@pytest.mark.parametrize("kwargs", DREAM_CACHES, ids=_name)
def test_dream_padded_rows_equal_single_runs(dream, kwargs):
    ids, mask = left_pad(PROMPTS)
    common = dict(max_new_tokens=10, steps=10, alg="entropy", use_cache=True, **kwargs)
    batch = dream.diffusion_generate(ids, attention_mask=mask, **common)
    for i, prompt in enumerate(PROMPTS):
        single = dream.diffusion_generate(prompt[None], **common)
        assert torch.equal(batch[i, ids.shape[1]:], single[0, len(prompt):]), i


@pytest.mark.parametrize("kwargs", LLADA_CACHES, ids=_name)
def test_llada_padded_rows_equal_single_runs(llada, kwargs):
    ids, mask = left_pad(PROMPTS)
    common = dict(gen_length=12, steps=12, block_length=4, use_cache=True, **kwargs)
    batch = llada.diffusion_generate(ids, attention_mask=mask, seed=5, **common)
    for i, prompt in enumerate(PROMPTS):
        single = llada.diffusion_generate(prompt[None], seed=5 + i, **common)
        assert torch.equal(batch[i, ids.shape[1]:], single[0, len(prompt):]), i


def test_ragged_rows_the_original_could_not_batch(dream):
    """un_right and alg='origin' give different fed counts per row (the original crashed on view(B, -1))."""
    ids, mask = left_pad(PROMPTS)
    for extra in (dict(shift_type="un_right", alg="entropy"), dict(shift_type="un", alg="origin")):
        common = dict(max_new_tokens=10, steps=10, use_cache=True, cache_type="decoded", cache_steps=4, **extra)
        batch = dream.diffusion_generate(ids, attention_mask=mask, seed=9, **common)
        for i, prompt in enumerate(PROMPTS):
            assert torch.equal(batch[i, ids.shape[1]:],
                               dream.diffusion_generate(prompt[None], seed=9 + i, **common)[0, len(prompt):])


@pytest.mark.parametrize("shift_type", ["un", "un_right"])
def test_dream_refresh_every_step_is_no_cache(dream, shift_type):
    ids, mask = left_pad(PROMPTS)
    common = dict(max_new_tokens=10, steps=10, alg="maskgit_plus", return_dict_in_generate=True)
    plain = dream.diffusion_generate(ids, attention_mask=mask, **common)
    cached = dream.diffusion_generate(ids, attention_mask=mask, use_cache=True, cache_type="decoded", cache_steps=1,
                                      shift_type=shift_type, **common)
    assert torch.equal(plain.sequences, cached.sequences) and cached.stats["fed_fraction"] == 1.0


def test_llada_refresh_every_step_is_no_cache(llada):
    ids, mask = left_pad(PROMPTS)
    common = dict(gen_length=12, steps=12, block_length=4)
    plain = llada.diffusion_generate(ids, attention_mask=mask, **common)
    for across in (False, True):
        cached = llada.diffusion_generate(ids, attention_mask=mask, use_cache=True, cache_type="decoded",
                                          cache_steps=1, cache_across_blocks=across, **common)
        assert torch.equal(plain, cached)


def test_pd_refreshing_every_step_is_prefill(dream):
    ids, mask = left_pad(PROMPTS)
    common = dict(max_new_tokens=10, steps=10, alg="entropy", use_cache=True)
    assert torch.equal(dream.diffusion_generate(ids, attention_mask=mask, cache_type="pd", cache_steps=1, **common),
                       dream.diffusion_generate(ids, attention_mask=mask, cache_type="prefill", **common))


@pytest.mark.parametrize("kwargs", [dict(cache_type="decoded", shift_type="un"), dict(cache_type="prefill"),
                                    dict(cache_type="pd")], ids=_name)
def test_staleness_happens(kwargs):
    """With reuse the tokens change on a random 2-layer model (a strategy that never caches would not)."""
    model = tiny_dream(layers=2, seed=4)
    ids, mask = left_pad(PROMPTS)
    common = dict(max_new_tokens=12, steps=12, alg="entropy", return_dict_in_generate=True)
    plain = model.diffusion_generate(ids, attention_mask=mask, **common)
    cached = model.diffusion_generate(ids, attention_mask=mask, use_cache=True, cache_steps=4, **kwargs, **common)
    assert not torch.equal(plain.sequences, cached.sequences)
    assert cached.stats["fed_fraction"] < 0.8


def test_dream_decoded_fed_counts_by_hand(dream, monkeypatch):
    """P=2, G=4, steps=4 (decodes 0, 1, 1, 2 tokens), 'un', no refresh after step 0.
    Step 0 full (6). Then prv = C_init = [1,0,0,0,0,0] → feed 5; prv = rule(X_0) = [1,0,0,0,0,1] → feed 4;
    prv = rule(X_1) adds the left neighbour of the one decoded token → feed 3."""
    fed = _record_fed(dream, monkeypatch)
    out = dream.diffusion_generate(torch.tensor([[5, 6]]), max_new_tokens=4, steps=4, alg="entropy", use_cache=True,
                                   cache_type="decoded", cache_steps=8, shift_type="un", return_dict_in_generate=True)
    assert fed[0] is None and [len(f[0]) for f in fed[1:]] == [5, 4, 3]
    assert fed[1] == [[1, 2, 3, 4, 5]] and fed[2] == [[1, 2, 3, 4]]
    assert out.stats["fed_fraction"] == 18 / 24 and out.stats["refreshes"] == 1


def test_llada_decoded_delay_by_hand(llada, monkeypatch):
    """A token decoded at step t is fed at t+1 and read from the cache from t+2 until the next refresh.
    LLaDA timeline per block: step 0 plain, step 1 rebuild, then cached (cache_steps=8)."""
    fed = _record_fed(llada, monkeypatch)
    out = llada.diffusion_generate(torch.tensor([[5, 6]]), gen_length=4, steps=4, block_length=4, use_cache=True,
                                   cache_type="decoded", cache_steps=8, output_history=True,
                                   return_dict_in_generate=True)
    assert fed[0] is None and fed[1] is None
    decoded_at = {}
    for step, x in enumerate(out.history):
        for pos in range(2, 6):
            if x[0, pos] != 63 and pos not in decoded_at:
                decoded_at[pos] = step
    for step in (2, 3):
        expected = [p for p in range(6) if p >= 2 and decoded_at[p] >= step - 1]
        assert fed[step][0] == expected
    assert [len(f[0]) if f else 6 for f in fed] == [6, 6, 3, 2]
    assert out.stats["fed_fraction"] == 17 / 24


def test_greedy_feeds_the_active_set(llada, monkeypatch):
    """Block 8, one token per step: W=0 feeds 2 (next + just decoded), W=2 feeds 4, W=3 feeds 5 (as the
    original) while enough masked neighbours remain (the first cached steps); never more."""
    for window, size in ((0, 2), (2, 4), (3, 5)):
        fed = _record_fed(llada, monkeypatch)
        llada.diffusion_generate(PROMPTS[0][None], gen_length=8, steps=8, block_length=8, use_cache=True,
                                 cache_type="greedy", cache_steps=100, window_size=window, remasking="random", seed=1)
        assert fed[0] is None and [len(f[0]) for f in fed[1:4]] == [size] * 3
        assert all(len(f[0]) <= size for f in fed[1:])
        monkeypatch.undo()


def test_original_names_and_defaults(llada, dream):
    ids = PROMPTS[0][None]
    ours = llada.diffusion_generate(ids, gen_length=8, steps=8, block_length=4, use_cache=True, cache_type="decoded",
                                    cache_steps=2)
    assert torch.equal(ours, llada.diffusion_generate(ids, gen_length=8, steps=8, block_length=4, enable_cache=True,
                                                      cache_reloading_step=2))
    out = dream.diffusion_generate(ids, max_new_tokens=8, steps=8, alg="entropy", use_cache=True,
                                   return_dict_in_generate=True)
    assert out.stats["cache_type"] == "decoded" and out.stats["cache_steps"] == 4
    assert out.stats["shift_type"] == "un_right"  # ours; the original's default 'un' on request


def test_across_blocks_reuses_more(llada):
    common = dict(gen_length=16, steps=16, block_length=4, use_cache=True, cache_type="decoded", cache_steps=8,
                  return_dict_in_generate=True)
    per_block = llada.diffusion_generate(PROMPTS[0][None], **common)
    across = llada.diffusion_generate(PROMPTS[0][None], cache_across_blocks=True, **common)
    assert across.stats["fed_fraction"] < per_block.stats["fed_fraction"]
    assert per_block.stats["refreshes"] == 8 and across.stats["refreshes"] == 3  # steps 0, 1 and 8


BAD = [
    (dict(cache_type="decoded", cache_steps=0), ValueError, "cache_steps"),
    (dict(cache_type="decoded", cache_steps=1.5), TypeError, "cache_steps"),  # wrong type: TypeError everywhere
    (dict(cache_type="decoded", shift_type="left"), ValueError, "shift_type"),
    (dict(cache_type="decoded", shift_type="right"), ValueError, "right"),
    (dict(cache_type="bogus"), ValueError, "cache_type"),
    (dict(cache_type="prefill", window_size=2), ValueError, "window_size"),
    (dict(cache_type="greedy"), ValueError, "greedy"),
    (dict(cache_type="decoded", cfg_scale=1.0), ValueError, "cfg_scale"),
    (dict(cache_type="decoded", cache_across_blocks="yes"), TypeError, "cache_across_blocks"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_cache_arguments(dream, kwargs, error, match):
    with pytest.raises(error, match=match):
        dream.diffusion_generate(PROMPTS[0][None], max_new_tokens=4, steps=4, use_cache=True, **kwargs)


def test_llada_rejects_dream_shift_rules_and_greedy_needs_random(llada):
    with pytest.raises(ValueError, match="shift_type"):
        llada.diffusion_generate(PROMPTS[0][None], gen_length=4, steps=4, use_cache=True, shift_type="un")
    with pytest.raises(ValueError, match="remasking='random'"):
        llada.diffusion_generate(PROMPTS[0][None], gen_length=4, steps=4, use_cache=True, cache_type="greedy")


def test_gqa_and_deeper_models_cache_exactly_at_refresh_every_step():
    ids, mask = left_pad(PROMPTS)
    common = dict(max_new_tokens=8, steps=8, alg="entropy", attention_mask=mask)
    for model in (tiny_dream(layers=3, kv_heads=1, seed=7), tiny_llada(layers=3, kv_heads=4, seed=8)):
        plain = model.diffusion_generate(ids, **common)
        cached = model.diffusion_generate(ids, use_cache=True, cache_type="decoded", cache_steps=1, **common)
        assert torch.equal(plain, cached)


@pytest.mark.parametrize("shift_type", ["un", "un_right", "right"])
@pytest.mark.parametrize("initial", [False, True])
def test_uncacheable_is_the_complement_of_the_shift_rule(shift_type, initial):
    """What a cached step feeds, computed directly, equals the complement of the documented rule C (and, before
    step 0, the originals' plain left shift at the last slot)."""
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        decoded = torch.rand(3, 9, generator=generator) < 0.5
        cached = cacheable(decoded, shift_type)
        if initial and shift_type != "right":
            cached[:, -1] = decoded[:, -1]
        assert torch.equal(uncacheable(~decoded, shift_type, initial=initial), ~cached)
