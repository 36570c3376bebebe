"""d2Cache: exact reductions, selection math (spec §7 items 6, 8, 11–14, 20), bug fixes 6.1 a/b/e, batching."""

from __future__ import annotations

import pytest
import torch

import dkvcache.caches.d2  # noqa: F401  (registers "d2" / "d2cache" until the package imports it)
from dkvcache.caches.d2 import D2Cache, inflate, nucleus, rollout_influence, rollout_matrix, stage_one
from tests.conftest import MASK, left_pad, random_prompts, tiny_dream, tiny_llada

PROMPTS = [random_prompts(1, 8, seed=41)[0], random_prompts(1, 3, seed=42)[0], random_prompts(1, 6, seed=43)[0]]
MODELS = {"dream": lambda layers=2: tiny_dream(layers=layers, seed=11),
          "llada": lambda layers=2: tiny_llada(layers=layers, seed=12)}
IDLE_THRESHOLD = {"dream": 0.2, "llada": 0.04}  # the tiny models finish block 1 at steps (3, 5, 1) / (1, 7, 7)
SETTINGS = [
    {},
    dict(current_k=2, rollout_p=0.3, inflate_w=2, block_length=4),
    dict(current_k=3, sigma=10.0),
    dict(current_k=2, threshold=0.1, block_length=8, steps=16),
    dict(current_k=8, threshold="idle", block_length=8, steps=16),  # rows finish block 1 at different steps
    dict(current_k=4, d2_frozen_confidence=True, temperature=0.7, seed=5),
]


def _gen(model, ids, mask=None, **kwargs):
    kwargs.setdefault("alg", "maskgit_plus")
    kwargs.setdefault("max_new_tokens", 16)
    kwargs.setdefault("steps", kwargs["max_new_tokens"])
    return model.diffusion_generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)


def _d2(model, ids, mask=None, **kwargs):
    return _gen(model, ids, mask, use_cache=True, cache_type="d2", **kwargs)


def _name(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


def _record(model, monkeypatch):
    """Record every forward's fed positions (None = all) and whether it asked for attention probabilities."""
    calls = []
    original = model.partial_forward

    def recording(*args, **kwargs):
        idx, length = kwargs.get("fed_idx"), args[0].shape[1]
        fed = None if idx is None else [set(p for p in row.tolist() if p < length) for row in idx]
        calls.append((fed, kwargs.get("want_attn_probs", False)))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "partial_forward", recording)
    return calls


def _select_everything(self, state, x_before, influence):
    return state.key_valid.clone(), torch.zeros_like(state.key_valid)


# ----------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("extra", [{}, dict(block_length=4), dict(threshold=0.1), dict(sigma=10.0)], ids=_name)
def test_full_selection_every_step_is_no_cache(family, extra, monkeypatch):
    """§7.6: with every position selected, the partial forward (explicit-softmax attention, buffers, ragged
    plumbing) decodes exactly as no cache."""
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    plain = _gen(model, ids, mask, **extra)
    monkeypatch.setattr(D2Cache, "_select", _select_everything)
    calls = _record(model, monkeypatch)
    cached = _d2(model, ids, mask, **extra)
    assert torch.equal(plain.sequences, cached.sequences)
    assert calls[0][0] is None and all(fed is not None for fed, _ in calls[1:])  # really the partial path
    assert all(want for _, want in calls)


@pytest.mark.parametrize("family", MODELS)
def test_step_zero_is_the_no_cache_forward(family, monkeypatch):
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    plain = _gen(model, ids, mask, output_history=True)
    calls = _record(model, monkeypatch)
    cached = _d2(model, ids, mask, output_history=True)
    assert calls[0][0] is None and cached.stats["refreshes"] == 1
    assert torch.equal(plain.history[0], cached.history[0])
    # the probabilities path gives the SDPA hidden states
    x, key_valid = plain.history[0], torch.cat([mask.bool(), torch.ones(3, 16, dtype=torch.bool)], 1)
    positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)
    kv = model.allocate_kv(3, x.shape[1])
    probs: list = []
    with torch.no_grad():
        sdpa = model.partial_forward(x, positions, key_valid, kv=kv)
        explicit = model.partial_forward(x, positions, key_valid, kv=kv, want_attn_probs=True, attn_probs_out=probs)
    torch.testing.assert_close(explicit, sdpa, rtol=1e-10, atol=1e-10)
    assert len(probs) == 2 and probs[0].shape == (3, 4, x.shape[1], x.shape[1] + 1)


@pytest.mark.parametrize("family", MODELS)
def test_staleness_happens_with_the_defaults(family):
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    plain = _gen(model, ids, mask, max_new_tokens=24)
    cached = _d2(model, ids, mask, max_new_tokens=24)
    assert not torch.equal(plain.sequences, cached.sequences)
    assert cached.stats["fed_fraction"] < 0.6
    assert not (cached.sequences == MASK).any()


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("kwargs", SETTINGS, ids=_name)
def test_padded_rows_equal_single_runs(family, kwargs):
    """§7.20 without any top-up: ragged selections, pads never fed, idle rows feed nothing."""
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    if kwargs.get("threshold") == "idle":
        kwargs = dict(kwargs, threshold=IDLE_THRESHOLD[family])
    batch = _d2(model, ids, mask, **kwargs).sequences
    for i, prompt in enumerate(PROMPTS):
        single_kwargs = dict(kwargs, seed=kwargs["seed"] + i) if "seed" in kwargs else kwargs
        single = _d2(model, prompt[None], **single_kwargs).sequences
        assert torch.equal(batch[i, ids.shape[1]:], single[0, len(prompt):]), i


def test_alias_and_attention_only_for_d2(dream, monkeypatch):
    ids, mask = left_pad(PROMPTS)
    calls = _record(dream, monkeypatch)
    for cache in ("none", "prefix", "decoded"):
        _gen(dream, ids, mask, use_cache=cache != "none", cache_type=cache)
    assert not any(want for _, want in calls)
    a = _d2(dream, ids, mask, current_k=3).sequences
    b = _gen(dream, ids, mask, use_cache=True, cache_type="d2cache", current_k=3).sequences
    assert torch.equal(a, b) and all(want for _, want in calls[-2:])


# ------------------------------------------------------------------------------------- bookkeeping (§7.8, 14)


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("kwargs", [dict(current_k=2), dict(current_k=1, block_length=8, steps=4)], ids=_name)
def test_only_fed_sources_decode_and_decoded_tokens_are_refed(family, kwargs, monkeypatch):
    """Bug 6.1 b fixed: a token is written only where its source (Dream: j−1) was fed; every token written at a
    step is fed at the next step; the schedule still completes (current_k below the per-step count)."""
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    calls = _record(model, monkeypatch)
    out = _d2(model, ids, mask, output_history=True, **kwargs)
    shift = 1 if family == "dream" else 0
    frames = [torch.cat([ids, torch.full((3, 16), MASK)], 1)] + out.history
    assert not (out.sequences == MASK).any()
    assert out.stats["fed_fraction"] < 0.7
    for t in range(1, len(frames)):
        fed = calls[t - 1][0]
        written = (frames[t - 1] == MASK) & (frames[t] != MASK)
        for b, j in written.nonzero().tolist():
            if fed is not None:
                assert j - shift in fed[b], (t, b, j)
            if t < len(calls) and (frames[t][b] == MASK).any():
                assert j in calls[t][0][b], (t, b, j)  # refreshed with its new token


def test_stage_one_window_counts_and_block_first():
    """§7.14: min(k, #masked in window) masked positions inside [block start, search end], block ranked first;
    ``need`` raises the count to the schedule's floor."""
    gen = torch.Generator().manual_seed(0)
    masked = torch.ones(3, 16, dtype=torch.bool)
    masked[0, :4] = False  # block 1 is current
    masked[1, :4] = False
    masked[1, 5:8] = False  # one masked left in block 1
    masked[2] = False
    masked[2, 14] = True
    score = torch.rand(3, 16, generator=gen, dtype=torch.float64)
    need = torch.zeros(3, dtype=torch.long)
    picked = stage_one(score, masked, block_length=4, current_k=3, need=need)
    assert not (picked & ~masked).any()
    assert picked[0, 4:8].sum() == 3 and picked[0].sum() == 3  # window = block 1: top-3 there
    assert set(picked[0].nonzero()[:, 0].tolist()) == set((score[0, 4:8].argsort(descending=True)[:3] + 4).tolist())
    # row 1: the only masked position of block 1 first, then the best two of block 2 (window grows to block 2)
    assert picked[1, 4] and picked[1].sum() == 3 and picked[1, 8:12].sum() == 2
    assert picked[2].sum() == 1 and picked[2, 14]
    more = stage_one(score, masked, 4, 1, torch.tensor([4, 1, 1]))
    assert more[0].sum() == 4 and more[0, 4:8].all()
    one_block = stage_one(score, masked, 16, 5, need)
    best = score[0].masked_fill(~masked[0], -1).argsort(descending=True)[:5]
    assert set(one_block[0].nonzero()[:, 0].tolist()) == set(best.tolist())


# ------------------------------------------------------------------------------------- rollout (§7.11) and nucleus


def _random_means(batch, n, length, layers, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.softmax(3 * torch.randn(batch, n, length, generator=gen, dtype=torch.float64), -1)
            for _ in range(layers)]


def test_rollout_rows_sum_to_one_and_influence_is_its_column_sums():
    batch, length, layers = 2, 9, 3
    fed_idx = torch.tensor([[0, 2, 3, 7, 9], [1, 4, 8, 9, 9]])  # 9 = padding entries
    fed_valid = fed_idx < length
    fed_valid[0, 1] = False  # an invalid query (a pad token) is an identity row too
    means = _random_means(batch, 5, length, layers, seed=1)
    c_matrix = rollout_matrix(means, fed_idx, fed_valid)
    torch.testing.assert_close(c_matrix.sum(-1), torch.ones(batch, length, dtype=torch.float64))
    for b in range(batch):  # rows of positions never fed stay identity rows
        for j in set(range(length)) - {int(p) for p, ok in zip(fed_idx[b], fed_valid[b]) if ok}:
            assert torch.equal(c_matrix[b, j], torch.eye(length, dtype=torch.float64)[j])
    influence = rollout_influence(means, fed_idx, fed_valid)
    torch.testing.assert_close(influence, c_matrix.sum(1))
    torch.testing.assert_close(influence.sum(1), torch.full((batch,), float(length), dtype=torch.float64))
    # a full forward (every position fed) as well
    full_idx = torch.arange(length).expand(batch, -1)
    full_means = _random_means(batch, length, length, layers, seed=2)
    ones = torch.ones(batch, length, dtype=torch.bool)
    torch.testing.assert_close(rollout_influence(full_means, full_idx, ones),
                               rollout_matrix(full_means, full_idx, ones).sum(1))


def test_identity_attention_gives_unit_influence():
    length = 7
    full_idx = torch.arange(length).expand(2, -1)
    eye = [torch.eye(length, dtype=torch.float64).expand(2, -1, -1) for _ in range(3)]
    ones = torch.ones(2, length, dtype=torch.bool)
    assert torch.equal(rollout_matrix(eye, full_idx, ones), torch.eye(length, dtype=torch.float64).expand(2, -1, -1))
    assert torch.equal(rollout_influence(eye, full_idx, ones), torch.ones(2, length, dtype=torch.float64))


def test_nucleus_properties():
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(4, 12, generator=gen, dtype=torch.float64)
    candidates = torch.rand(4, 12, generator=gen) < 0.6
    candidates[3] = False
    for p in (0.0, 0.1, 0.3, 0.7, 1.0):
        kept = nucleus(scores, candidates, p)
        assert not (kept & ~candidates).any()
        for b in range(3):
            s = scores[b].masked_fill(~candidates[b], float("-inf"))
            order = s.argsort(descending=True)[: int(candidates[b].sum())]
            count = int(kept[b].sum())
            assert count >= 1 and set(order[:count].tolist()) == set(kept[b].nonzero()[:, 0].tolist())  # a prefix
            mass = scores[b, order].cumsum(0) / scores[b, order].sum()
            assert count == max(1, int((mass <= p + 1e-12).sum()))
            if p == 0.0:
                assert count == 1 and kept[b, order[0]]
        assert not kept[3].any()


def test_inflate_fills_small_gaps_only():
    sel = torch.zeros(1, 14, dtype=torch.bool)
    sel[0, [1, 3, 9, 10]] = True
    assert inflate(sel, 2)[0].nonzero()[:, 0].tolist() == [1, 2, 3, 9, 10]
    assert inflate(sel, 6)[0].nonzero()[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


# ------------------------------------------------------------------------------ confidence cache (bug 6.1 a)


@pytest.mark.parametrize("frozen", [False, True])
def test_confidence_cache_refresh_and_frozen(llada, frozen, monkeypatch):
    """Refreshed: still-masked positions recomputed at a step get that step's confidence. Frozen (the published
    behaviour): the value first seen (step 0 with one block) is kept."""
    snapshots = []
    original = D2Cache.after_step

    def spy(self, state, outcome):
        original(self, state, outcome)
        snapshots.append((self.conf.clone(), state.masked()[:, state.prompt_length:].clone(),
                          outcome.candidates.clone(), outcome.confidence.clone()))

    monkeypatch.setattr(D2Cache, "after_step", spy)
    ids = PROMPTS[0][None]
    _d2(llada, ids, current_k=4, d2_frozen_confidence=frozen)
    first = snapshots[0][0]
    torch.testing.assert_close(first, snapshots[0][3].double())  # step 0: every candidate is fresh
    changed = False
    for conf, masked, _, _ in snapshots[1:]:
        still = masked[0]
        if frozen:
            assert torch.equal(conf[0, still], first[0, still])
        else:
            changed |= not torch.equal(conf[0, still], first[0, still])
    assert frozen or changed


# ------------------------------------------------------------------------------------------- options


def test_d2_with_certainty_prior_decoding(dream):
    """``sigma`` (decoding order) composes with d2's own ``d2_sigma`` (selection): batch ≡ single is covered
    above; here small sigma still decodes left to right with one token per step under the cache."""
    prompt = PROMPTS[0][None]
    out = _d2(dream, prompt, sigma=0.3, current_k=2, output_history=True)
    decoded_at = torch.stack([h[0, prompt.shape[1]:] == MASK for h in out.history]).sum(0)  # steps still masked
    assert decoded_at.tolist() == sorted(decoded_at.tolist()) and not (out.sequences == MASK).any()
    assert out.stats["d2_sigma"] == 10.0 and out.stats["inflate_w"] == 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(current_k=0), ValueError, "current_k"),
    (dict(current_k=2.5), TypeError, "current_k"),  # a wrong type is a TypeError everywhere (as steps=2.5)
    (dict(d2_sigma=0), ValueError, "d2_sigma"),
    (dict(d2_sigma="x"), TypeError, "d2_sigma"),
    (dict(rollout_p=1.5), ValueError, "rollout_p"),
    (dict(inflate_w=-1), ValueError, "inflate_w"),
    (dict(d2_frozen_confidence=1), TypeError, "d2_frozen_confidence"),
    (dict(alg="origin"), ValueError, "origin"),
])
def test_bad_arguments(dream, kwargs, error, match):
    with pytest.raises(error, match=match):
        _d2(dream, PROMPTS[0][None], **kwargs)


def test_full_logits_mode_keeps_unfed_positions_undecodable(dream):
    """The original's full (B, L, V) logits path (hooks, benchmarks) gives the same tokens: positions that were
    not fed this step can never be unmasked there either."""
    ids = PROMPTS[0][None]
    assert torch.equal(_d2(dream, ids).sequences, _d2(dream, ids, full_logits=True).sequences)


def test_inflate_default_with_blocks_or_parallel_decoding(llada):
    ids = PROMPTS[0][None]
    assert _d2(llada, ids).stats["inflate_w"] == 0
    assert _d2(llada, ids, block_length=8).stats["inflate_w"] == 4
    assert _d2(llada, ids, threshold=0.5).stats["inflate_w"] == 4


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("decoding", ["ar", "klass", "eb_sampler"])
def test_decoding_strategies_compose(family, decoding):
    """The decoders choose among the decodable candidates: the schedule still completes (AR: Stage 1 ranks by
    position, since AR can only unmask the leftmost run) and padded rows equal single runs."""
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    kwargs = dict(decoding=decoding, current_k=2, block_length=8, d2_sigma=1e3)  # flat density: conf ranks
    batch = _d2(model, ids, mask, output_history=True, **kwargs)
    assert not (batch.sequences == MASK).any() and batch.stats["fed_fraction"] < 0.7
    if decoding == "ar":  # never stalls: the schedule's count every step, as without a cache
        plain = _gen(model, ids, mask, output_history=True, **{k: kwargs[k] for k in ("decoding", "block_length")})
        assert [(h == MASK).sum(1).tolist() for h in batch.history] == \
            [(h == MASK).sum(1).tolist() for h in plain.history]
    for i, prompt in enumerate(PROMPTS):
        single = _d2(model, prompt[None], **kwargs).sequences
        assert torch.equal(batch.sequences[i, ids.shape[1]:], single[0, len(prompt):]), i
