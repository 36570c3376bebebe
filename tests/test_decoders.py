"""Decoding strategies (dkvcache.decoders): PC-sampler, KLASS, EB-sampler, WINO, AR on the one loop.

Spec: d2cache-and-dllmcache.md §4.2–4.7, bugs §6.1 i/j/k, property tests §7 items 15–18.
"""

from __future__ import annotations

import json

import pytest
import torch

from dkvcache import caches
from dkvcache.decoders import Wino, build_unigram_table, load_unigram_table
from dkvcache.generation import _build_state
from dkvcache.resolve import resolve
from dkvcache.sampling import FAMILIES, entropy_bound_count
from tests.conftest import MASK, VOCAB, left_pad, random_prompts, tiny_dream, tiny_llada

PROMPTS = [random_prompts(1, 7, seed=41)[0], random_prompts(1, 3, seed=42)[0], random_prompts(1, 5, seed=43)[0]]
MODELS = {"dream": tiny_dream(seed=21), "llada": tiny_llada(seed=22)}
UNIFORM = torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)
SKEWED = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3, 0)
# Every registered strategy (d2Cache too once registered) but greedy, whose pre-drawn order excludes them.
CACHES = sorted(set(caches.available_strategies()) - {"greedy"})


def _gen(model, ids, mask=None, cache="none", **kwargs):
    kwargs.setdefault("max_new_tokens", 8)
    kwargs.setdefault("steps", kwargs["max_new_tokens"])
    kwargs.setdefault("block_length", 4)
    if cache != "none":
        kwargs.update(use_cache=True, cache_type=cache)
    return model.diffusion_generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)


def _rows_equal_single_runs(model, cache="none", **kwargs):
    ids, mask = left_pad(PROMPTS)
    batch = _gen(model, ids, mask, cache, seed=100, **kwargs)
    width = ids.shape[1]
    assert (batch.sequences[:, width:] != MASK).all()
    for i, prompt in enumerate(PROMPTS):
        single = _gen(model, prompt[None], None, cache, seed=100 + i, **kwargs)
        assert (single.sequences != MASK).all()
        assert torch.equal(batch.sequences[i, width:], single.sequences[0, len(prompt):]), (i, cache, kwargs)
    return batch


DECODINGS = {
    "pc_sampler": dict(pc_frequencies=SKEWED),
    "klass": dict(kl_threshold=0.3),
    "eb_sampler": dict(gamma=3.0),
    "ar": dict(threshold=0.15),
}


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("decoding", DECODINGS)
def test_padded_rows_equal_single_runs_with_every_cache(family, decoding):
    for cache in CACHES:
        _rows_equal_single_runs(MODELS[family], cache, decoding=decoding, **DECODINGS[decoding])


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("kwargs", [
    dict(alg="maskgit_plus", threshold=0.3, sigma=2.0, max_new_tokens=12, block_length=12),  # rows drift apart
    dict(decoding="klass", kl_threshold=0.5, temperature=0.8, top_k=20),
    dict(decoding="klass", kl_threshold=0.5, factor=1.0),
    dict(decoding="pc_sampler", pc_frequencies=SKEWED, alg="topk_margin", threshold=1.0, sigma=3.0),
    dict(decoding="eb_sampler", gamma=3.0, sigma=2.0, max_new_tokens=12, block_length=12),
    dict(decoding="ar", max_new_tokens=12, steps=6, block_length=6),
    dict(decoding="wino"),
    dict(decoding="wino", wide_in_thres=0.0, narrow_out_thres=1.0, max_new_tokens=12, block_length=12),
    dict(decoding="wino", wide_in_thres=0.1, narrow_out_thres=0.95, sigma=5.0, temperature=0.5),
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items() if a != "pc_frequencies"))
def test_padded_rows_equal_single_runs_more_settings(family, kwargs):
    _rows_equal_single_runs(MODELS[family], **kwargs)


# --- EB-sampler ---------------------------------------------------------------------------------------------

def test_entropy_bound_running_max_is_over_the_sequence():
    """Bug §6.1 i: H = (0.5, 0.1, 0.2), γ = 0.15: excess (0, 0.1, 0.3) → 2. The reference's batch-dim cummax
    made it Σ_{j<i} H (0, 0.5, 0.6) → 1."""
    h = torch.tensor([[0.5, 0.1, 0.2], [0.5, 0.1, 0.2]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    assert entropy_bound_count(h, valid, 0.15).tolist() == [2, 2]
    assert entropy_bound_count(h, valid, 0.0).tolist() == [1, 1]
    assert entropy_bound_count(h, valid, float("inf")).tolist() == [3, 2]
    assert entropy_bound_count(h, torch.zeros_like(valid), 1.0).tolist() == [0, 0]


@pytest.mark.parametrize("family", MODELS)
def test_eb_gamma_zero_one_token_per_step_gamma_inf_whole_block(family):
    model, (ids, mask) = MODELS[family], left_pad(PROMPTS)
    out = _gen(model, ids, mask, decoding="eb_sampler", gamma=0.0, output_history=True)
    frames = [torch.cat([ids, torch.full((3, 8), MASK)], 1)] + out.history
    for before, after in zip(frames, frames[1:]):
        assert ((before == MASK) & (after != MASK)).sum(1).tolist() == [1, 1, 1]
    out = _gen(model, ids, mask, decoding="eb_sampler", gamma=float("inf"))
    assert out.stats["forwards"] == 2 and (out.sequences != MASK).all()


# --- KLASS --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("extra", [{}, {"threshold": 0.3}, {"factor": 1.0}, {"cache": "dual"},
                                   {"temperature": 0.7, "top_p": 0.9, "seed": 3}, {"sigma": 2.0}])
def test_klass_with_zero_threshold_is_vanilla(family, extra):
    model, (ids, mask) = MODELS[family], left_pad(PROMPTS)
    extra = dict(extra, alg="maskgit_plus", max_new_tokens=12, block_length=6)
    vanilla = _gen(model, ids, mask, **extra)
    klass = _gen(model, ids, mask, decoding="klass", kl_threshold=0.0, **extra)
    assert torch.equal(vanilla.sequences, klass.sequences)


@pytest.mark.parametrize("family", MODELS)
def test_klass_rule_transfers_the_confident_stable_set(family):
    """Bug §6.1 j: without threshold/factor the reference's stable set was always empty (plain top-k). Here
    every stable candidate with a score ≥ conf_threshold is unmasked: with everything stable after
    kl_history_length steps and no confidence floor, a block takes history + 1 forwards; a longer history waits
    longer; a floor nothing reaches is vanilla."""
    model, (ids, mask) = MODELS[family], left_pad(PROMPTS)
    kwargs = dict(max_new_tokens=12, block_length=12, decoding="klass", kl_threshold=1e9)
    assert _gen(model, ids, mask, conf_threshold=0.0, **kwargs).stats["forwards"] == 3
    assert _gen(model, ids, mask, conf_threshold=0.0, kl_history_length=4, **kwargs).stats["forwards"] == 5
    vanilla = _gen(model, ids, mask, max_new_tokens=12, block_length=12, alg="maskgit_plus")
    assert vanilla.stats["forwards"] == 12
    assert torch.equal(_gen(model, ids, mask, conf_threshold=1.01, **kwargs).sequences, vanilla.sequences)


@pytest.mark.parametrize("family", MODELS)
def test_klass_defaults_are_its_authors_per_family(family):
    """Unset, kl_threshold and conf_threshold take the values KLASS's authors run for the family (stats say
    which); explicit values win."""
    model, (ids, mask) = MODELS[family], left_pad(PROMPTS)
    out = _gen(model, ids, mask, max_new_tokens=12, block_length=12, decoding="klass")
    expected = {"llada": (0.015, 0.6), "dream": (0.001, 0.9)}[family]
    assert (out.stats["kl_threshold"], out.stats["conf_threshold"]) == expected
    explicit = _gen(model, ids, mask, max_new_tokens=12, block_length=12, decoding="klass", kl_threshold=0.2,
                    conf_threshold=0.0)
    assert (explicit.stats["kl_threshold"], explicit.stats["conf_threshold"]) == (0.2, 0.0)


# --- AR -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("extra", [{}, {"threshold": 0.1}, {"factor": 2.0, "cache": "prefix"}, {"steps": 6},
                                   {"block_length": 12, "sigma": 1.0, "cache": "decoded"}])
def test_ar_decodes_strictly_left_to_right(family, extra):
    model, (ids, mask) = MODELS[family], left_pad(PROMPTS)
    out = _gen(model, ids, mask, decoding="ar", max_new_tokens=12, output_history=True, **extra)
    for frame in out.history:
        decoded = (frame[:, ids.shape[1]:] != MASK).long()
        assert (decoded[:, 1:] <= decoded[:, :-1]).all()  # no decoded token right of a mask
    assert (out.sequences != MASK).all()
    if not extra:  # one token per step: the reference unmasked the whole run (a block per forward)
        assert out.stats["forwards"] == 12


# --- PC-sampler ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("extra", [{}, {"alg": "topk_margin"}, {"cache": "prefix", "block_length": 8},
                                   {"max_new_tokens": 12, "block_length": 12, "steps": 6}])
def test_pc_sampler_uniform_table_is_vanilla(family, extra):
    model, (ids, mask) = MODELS[family], left_pad(PROMPTS)
    extra = {"alg": "maskgit_plus", **extra}
    vanilla = _gen(model, ids, mask, **extra).sequences
    assert torch.equal(vanilla, _gen(model, ids, mask, decoding="pc_sampler", pc_frequencies=UNIFORM,
                                     **extra).sequences)
    skewed = _gen(model, ids, mask, decoding="pc_sampler", pc_frequencies=SKEWED, clip_alpha=50.0, **extra)
    assert not torch.equal(vanilla, skewed.sequences)  # the debias is applied, also after topk_margin (bug k)


class _CharTokenizer:
    """A stand-in tokenizer: one id per character (ord % 50)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 50 for c in text]}

    def __len__(self):
        return 50


def test_unigram_table_build_save_load(tmp_path, dream):
    text = tmp_path / "corpus.txt"
    text.write_text("abca\nbc\n", encoding="utf-8")
    table = build_unigram_table(_CharTokenizer(), text, vocab_size=VOCAB, json_path=tmp_path / "t.json")
    ids = {c: ord(c) % 50 for c in "abc\n"}
    total = 8  # a b c a \n b c \n
    assert table[ids["a"]] == 2 / total and table[ids["\n"]] == 2 / total
    assert table[0] == 1 / total and table.shape == (VOCAB,)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["num_token"] == total and saved["p_baseline_dict"][str(ids["b"])] == 2
    assert torch.equal(load_unigram_table(tmp_path / "t.json", VOCAB), table)
    (tmp_path / "flat.json").write_text(json.dumps({str(k): v for k, v in saved["p_baseline_dict"].items()}))
    assert torch.equal(load_unigram_table(tmp_path / "flat.json", VOCAB), table)
    ids_, mask = left_pad(PROMPTS)
    by_path = _gen(dream, ids_, mask, decoding="pc_sampler", pc_frequencies=str(tmp_path / "t.json"))
    by_tensor = _gen(dream, ids_, mask, decoding="pc_sampler", pc_frequencies=table)
    assert torch.equal(by_path.sequences, by_tensor.sequences)


# --- WINO ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("kwargs", [dict(wide_in_thres=0.0, narrow_out_thres=1.0),
                                    dict(wide_in_thres=0.0, narrow_out_thres=1.0, steps=6),
                                    dict(wide_in_thres=0.0, narrow_out_thres=0.95, temperature=0.7, seed=1)])
def test_wino_remasks_only_decoded_block_tokens_and_terminates(family, kwargs):
    model, (ids, mask) = MODELS[family], left_pad(PROMPTS)
    kwargs = {"max_new_tokens": 12, "steps": 12, "block_length": 12, **kwargs}
    out = _gen(model, ids, mask, decoding="wino", output_history=True, **kwargs)
    width, block = ids.shape[1], kwargs["block_length"]
    frames = [torch.cat([ids, torch.full((3, 12), MASK)], 1)] + out.history
    remasked = 0
    for before, after in zip(frames, frames[1:]):
        assert torch.equal(after[:, :width], ids)
        changed_to_mask = (before != MASK) & (after == MASK)
        remasked += int(changed_to_mask.sum())
        for row in range(3):  # re-masked positions lie in the block being decoded (the leftmost unfinished)
            cols = changed_to_mask[row].nonzero().flatten()
            if cols.numel():
                first_masked = int((before[row, width:] == MASK).nonzero()[0])
                start = width + first_masked // block * block
                assert ((cols >= start) & (cols < start + block)).all()
        progress = ((before == MASK).sum(1) - (after == MASK).sum(1))
        assert ((progress >= 1) | ((before[:, width:] != MASK).all(1))).all()  # net progress while unfinished
    assert remasked == out.stats["remasked"] > 0
    assert (out.sequences != MASK).all() and out.stats["forwards"] <= kwargs["steps"]


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_wino_shadow_is_leave_one_out(family):
    """One layer: a shadow entry's output does not depend on the block token it verifies, and real tokens
    never see the shadow (their hidden states equal a plain forward)."""
    model = (tiny_dream if family == "dream" else tiny_llada)(layers=1, seed=7)
    ids, mask = left_pad(PROMPTS)
    opts = resolve(model, ids.shape[1], max_new_tokens=8, decoding="wino")
    state = _build_state(model, FAMILIES[family], opts, ids, mask)
    start = state.prompt_length
    state.block_start, state.block_end = start, start + 8
    state.x[:, start:start + 8] = torch.arange(8) + 3  # a decoded block
    wino = Wino(opts, FAMILIES[family])

    def run(x):
        state.x = x
        ext = wino.extension(state)
        hidden = model.partial_forward(torch.cat([x, ext.ids], 1), torch.cat([state.positions, ext.positions], 1),
                                       torch.cat([state.key_valid, torch.ones_like(ext.ids, dtype=torch.bool)], 1),
                                       extra_mask=ext.extra_mask)
        return hidden[:, :state.length], hidden[:, state.length:]

    x = state.x.clone()
    real, shadow = run(x)
    assert torch.allclose(real, model.partial_forward(x, state.positions, state.key_valid), atol=1e-12)
    for i in range(8):
        changed = x.clone()
        changed[:, start + i] = 40
        real2, shadow2 = run(changed)
        assert torch.allclose(shadow2[:, i], shadow[:, i], atol=1e-12)
        assert not torch.allclose(real2, real)


# --- validation ---------------------------------------------------------------------------------------------

BAD = [
    (dict(decoding="greedy"), ValueError, "decoding"),
    (dict(decoding="eb_sampler", gamma=-1.0), ValueError, "gamma"),
    (dict(gamma=0.1), ValueError, "gamma"),
    (dict(decoding="klass", kl_history_length=0), ValueError, "kl_history_length"),
    (dict(decoding="klass", kl_history_length=1.5), TypeError, "kl_history_length"),
    (dict(decoding="klass", kl_threshold="x"), TypeError, "kl_threshold"),
    (dict(decoding="klass", conf_threshold="x"), TypeError, "conf_threshold"),
    (dict(decoding="klass", alg="entropy"), ValueError, "conf_threshold"),
    (dict(conf_threshold=0.5), ValueError, "conf_threshold is an option of decoding='klass'"),
    (dict(decoding="wino", wide_in_thres=1.5), ValueError, "wide_in_thres"),
    (dict(decoding="wino", use_cache=True, cache_type="dual"), ValueError, "cache_type='none' only"),
    (dict(decoding="wino", threshold=0.9), ValueError, "wide_in_thres"),
    (dict(decoding="wino", cfg_scale=1.0), ValueError, "cfg_scale"),
    (dict(decoding="pc_sampler"), ValueError, "pc_frequencies"),
    (dict(decoding="pc_sampler", pc_frequencies=3), TypeError, "pc_frequencies"),
    (dict(decoding="pc_sampler", pc_frequencies=UNIFORM[:10]), ValueError, "pc_frequencies"),
    (dict(decoding="pc_sampler", pc_frequencies=UNIFORM * 100), ValueError, "pc_frequencies"),
    (dict(decoding="pc_sampler", pc_frequencies="/nonexistent.json"), ValueError, "pc_frequencies"),
    (dict(decoding="pc_sampler", pc_frequencies=UNIFORM, alg="entropy"), ValueError, "alg"),
    (dict(decoding="pc_sampler", pc_frequencies=UNIFORM, clip_alpha=0), ValueError, "clip_alpha"),
    (dict(decoding="eb_sampler", threshold=0.9), ValueError, "gamma"),
    (dict(decoding="klass", alg_temp=0.5), ValueError, "alg_temp"),
    (dict(decoding="ar", alg="origin"), ValueError, "origin"),
    (dict(decoding="ar", kl_threshold=0.1), ValueError, "kl_threshold"),
]


@pytest.mark.parametrize("kwargs,error,name", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_decoding_arguments_fail_before_any_compute(dream, monkeypatch, kwargs, error, name):
    def no_compute(*args, **kw):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(dream, "partial_forward", no_compute)
    with pytest.raises(error, match=name):
        dream.diffusion_generate(PROMPTS[0][None], max_new_tokens=8, **kwargs)


def test_greedy_cache_is_rejected_with_other_decodings(llada):
    with pytest.raises(ValueError, match="greedy"):
        llada.diffusion_generate(PROMPTS[0][None], gen_length=8, steps=8, remasking="random", use_cache=True,
                                 cache_type="greedy", decoding="ar")


def test_defaults_and_stats(dream):
    out = _gen(dream, PROMPTS[0][None], decoding="klass")
    assert out.stats["decoding"] == "klass"
    opts = resolve(dream, 3, decoding="wino")
    assert (opts.alg, opts.wide_in_thres, opts.narrow_out_thres, opts.gamma) == ("maskgit_plus", 0.7, 0.9, None)
    opts = resolve(dream, 3)
    assert (opts.decoding, opts.alg, opts.kl_threshold) == ("vanilla", "origin", None)
