"""diffusion_generate: padded batch rows equal single runs, schedules, hooks, early stop, validation."""

from __future__ import annotations

import pytest
import torch

import dkvcache
from tests.conftest import MASK, PAD, left_pad, random_prompts

PROMPTS = [random_prompts(1, 9, seed=11)[0], random_prompts(1, 5, seed=12)[0], random_prompts(1, 7, seed=13)[0]]

DREAM_CASES = [
    dict(alg="entropy"),
    dict(alg="maskgit_plus"),
    dict(alg="topk_margin"),
    dict(alg="origin"),
    dict(alg="maskgit_plus", temperature=0.7, top_p=0.9, top_k=20),
    dict(alg="entropy", alg_temp=0.5),
    dict(alg="entropy", block_length=4),
]
LLADA_CASES = [
    dict(remasking="low_confidence"),
    dict(remasking="random"),
    dict(remasking="low_confidence", temperature=0.8),
    dict(remasking="low_confidence", cfg_scale=1.5),
    dict(remasking="low_confidence", block_length=12, steps=6, confidence_eos_eot_inf=True),
    dict(alg="entropy", logits_eos_inf=True),
]


def _check_rows_equal_single_runs(model, kwargs):
    ids, mask = left_pad(PROMPTS)
    batch = model.diffusion_generate(ids, attention_mask=mask, seed=100, **kwargs)
    width = ids.shape[1]
    for i, prompt in enumerate(PROMPTS):
        single = model.diffusion_generate(prompt[None], seed=100 + i, **kwargs)
        assert torch.equal(batch[i, width:], single[0, len(prompt):]), (i, kwargs)
        assert torch.equal(batch[i, width - len(prompt):width], prompt)
    assert (batch[:, width:] != MASK).all()


@pytest.mark.parametrize("kwargs", DREAM_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_dream_padded_rows_equal_single_runs(dream, kwargs):
    _check_rows_equal_single_runs(dream, dict(max_new_tokens=12, steps=12, **kwargs))


@pytest.mark.parametrize("kwargs", LLADA_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_llada_padded_rows_equal_single_runs(llada, kwargs):
    _check_rows_equal_single_runs(llada, dict(gen_length=12, steps=kwargs.pop("steps", 12),
                                              block_length=kwargs.pop("block_length", 4), **kwargs))


def test_sampling_really_samples(dream):
    ids = PROMPTS[0][None]
    runs = {tuple(dream.diffusion_generate(ids, max_new_tokens=10, steps=10, temperature=1.0, seed=s)[0].tolist())
            for s in range(4)}
    assert len(runs) > 1
    again = dream.diffusion_generate(ids, max_new_tokens=10, steps=10, temperature=1.0, seed=2)
    assert tuple(again[0].tolist()) in runs  # same seed, same sample


def _unmasked_per_step(history, start):
    counts, before = [], None
    for x in history:
        now = int((x[0, start:] != MASK).sum())
        counts.append(now - (before or 0))
        before = now
    return counts


def test_llada_transfers_exactly_the_quota(llada):
    out = llada.diffusion_generate(PROMPTS[0][None], gen_length=16, steps=6, block_length=8, output_history=True,
                                   return_dict_in_generate=True)
    assert _unmasked_per_step(out.history, 9) == [3, 3, 2, 3, 3, 2]
    first_block_done = out.history[2][0, 9:17]
    assert (first_block_done != MASK).all() and (out.history[2][0, 17:] == MASK).all()  # semi-AR order


def test_dream_schedule_and_blocks(dream):
    out = dream.diffusion_generate(PROMPTS[1][None], max_new_tokens=8, steps=8, alg="entropy",
                                   output_history=True, return_dict_in_generate=True)
    assert _unmasked_per_step(out.history, 5) == [0, 1, 1, 1, 1, 1, 1, 2]
    blocks = dream.diffusion_generate(PROMPTS[1][None], max_new_tokens=8, steps=8, block_length=4, alg="entropy",
                                      output_history=True, return_dict_in_generate=True)
    assert (blocks.history[3][0, 5:9] != MASK).all() and (blocks.history[3][0, 9:] == MASK).all()


@pytest.mark.parametrize("name", ["dream", "llada"])
def test_logits_only_where_needed_equals_full_logits(name, request):
    model = request.getfixturevalue(name)
    ids, mask = left_pad(PROMPTS)
    kwargs = dict(max_new_tokens=8, steps=8, block_length=4, alg="entropy")
    assert torch.equal(model.diffusion_generate(ids, attention_mask=mask, **kwargs),
                       model.diffusion_generate(ids, attention_mask=mask, full_logits=True, **kwargs))


def test_hooks_and_history(dream):
    seen = []

    def tokens_hook(step, x, logits):
        seen.append((step, None if logits is None else tuple(logits.shape)))
        return x

    def logits_hook(step, x, logits):
        logits = logits.clone()
        logits[..., 5] = 100.0  # force token 5 everywhere
        return logits

    out = dream.diffusion_generate(PROMPTS[0][None], max_new_tokens=6, steps=3, output_history=True,
                                   return_dict_in_generate=True, generation_tokens_hook_func=tokens_hook,
                                   generation_logits_hook_func=logits_hook)
    assert seen == [(None, None), (0, (1, 15, 64)), (1, (1, 15, 64)), (2, (1, 15, 64))]
    assert len(out.history) == 3 and (out.sequences[0, 9:] == 5).all()


def test_eos_early_stop_skips_the_remaining_blocks(llada):
    def eos_first(step, x, logits):
        logits = logits.clone()
        logits[..., PAD] = 50.0
        return logits

    kwargs = dict(gen_length=16, steps=16, block_length=4, return_dict_in_generate=True,
                  generation_logits_hook_func=eos_first)
    stopped = llada.diffusion_generate(PROMPTS[0][None], eos_early_stop=True, **kwargs)
    full = llada.diffusion_generate(PROMPTS[0][None], **kwargs)
    assert stopped.stats["forwards"] == 4 and full.stats["forwards"] == 16
    assert torch.equal(stopped.sequences, full.sequences)  # the tail is EOS either way here
    assert stopped.stats["response_tokens"] == [0]


def test_stats_and_output_forms(dream):
    out = dream.diffusion_generate(PROMPTS[0][None], max_new_tokens=8, steps=4, seed=3, return_dict_in_generate=True)
    stats = out.stats
    assert stats["forwards"] == 4 and stats["steps"] == 4 and stats["fed_fraction"] == 1.0
    assert stats["cache_type"] == "none" and stats["tokens_per_forward"] == stats["response_tokens"][0] / 4
    assert out.history is None
    tensor = dream.diffusion_generate(PROMPTS[0][None], max_new_tokens=8, steps=4, seed=3)
    assert torch.equal(tensor, out.sequences)
    repeated = dream.diffusion_generate(PROMPTS[0][None], max_new_tokens=8, steps=4, num_return_sequences=3,
                                        temperature=1.0, seed=0)
    assert repeated.shape == (3, 17) and len({tuple(r.tolist()) for r in repeated}) > 1


def test_length_arguments(dream, llada):
    assert dream.diffusion_generate(PROMPTS[0][None], steps=4).shape[1] == 9 + 20  # original default: 20 new
    assert dream.diffusion_generate(PROMPTS[0][None], max_length=15, steps=3).shape[1] == 15
    assert llada.diffusion_generate(PROMPTS[0][None], gen_length=8, steps=8).shape[1] == 17


def test_free_function_matches_method(llada):
    ids = PROMPTS[0][None]
    out = dkvcache.generate(llada, ids, steps=8, gen_length=8, block_length=4, temperature=0.0, cfg_scale=0.0,
                            remasking="low_confidence", mask_id=MASK)
    assert torch.equal(out, llada.diffusion_generate(ids, steps=8, gen_length=8, block_length=4))


BAD = [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(alg="greedy"), ValueError, "alg"),
    (dict(remasking="lowest"), ValueError, "remasking"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(block_length=5), ValueError, "block_length"),
    (dict(block_length=4, steps=3), ValueError, "steps"),
    (dict(bogus=1), ValueError, "bogus"),
    (dict(use_cache=True, cache_type="nope"), ValueError, "cache_type"),
    (dict(cache_type="none", use_cache="yes"), TypeError, "use_cache"),
    (dict(max_length=5), ValueError, "max_length"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(gen_length=8, max_new_tokens=12), ValueError, "gen_length"),
]


@pytest.mark.parametrize("kwargs,error,name", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments_fail_before_any_compute(dream, monkeypatch, kwargs, error, name):
    def no_compute(*args, **kw):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(dream, "partial_forward", no_compute)
    kwargs = {"max_new_tokens": 8, **kwargs} if "gen_length" not in kwargs and "max_length" not in kwargs else kwargs
    with pytest.raises(error, match=name):
        dream.diffusion_generate(PROMPTS[0][None], **kwargs)


def test_bad_inputs(dream):
    with pytest.raises(TypeError, match="inputs"):
        dream.diffusion_generate(PROMPTS[0], max_new_tokens=4)
    ids, mask = left_pad(PROMPTS[:2])
    with pytest.raises(ValueError, match="left-padded"):
        dream.diffusion_generate(ids, attention_mask=mask.flip(1), max_new_tokens=4)
    with pytest.raises(ValueError, match="mask_token_id"):
        dream.diffusion_generate(torch.tensor([[1, MASK, 2]]), max_new_tokens=4)
