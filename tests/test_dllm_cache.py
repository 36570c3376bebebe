"""dLLM-Cache: exact reductions, schedule, V-verify, ρ = 0 reuse, staleness, batching, presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dkvcache.caches.dllm import DLLMCache, least_similar_rows
from tests.conftest import MASK, left_pad, random_prompts, tiny_dream, tiny_llada

PROMPTS = [random_prompts(1, 9, seed=41)[0], random_prompts(1, 5, seed=42)[0], random_prompts(1, 7, seed=43)[0]]
MODELS = {"dream": lambda: tiny_dream(layers=3, seed=13), "llada": lambda: tiny_llada(layers=3, seed=14)}
# Thresholds at which these prompts finish their blocks after different numbers of forwards (rows wait).
RAGGED_THRESHOLD = {"dream": 0.2, "llada": 0.04}


def _run(model, ids, mask=None, **kwargs):
    kwargs = dict(max_new_tokens=12, steps=12, alg="maskgit_plus", return_dict_in_generate=True, **kwargs)
    return model.diffusion_generate(ids, attention_mask=mask, **kwargs)


def _capture(monkeypatch):
    """Keep a handle on the strategy instance of the next call."""
    instances = []
    original = DLLMCache.begin

    def begin(self, state):
        instances.append(self)
        original(self, state)

    monkeypatch.setattr(DLLMCache, "begin", begin)
    return instances


@pytest.mark.parametrize("family", MODELS)
def test_refresh_every_step_is_no_cache(family):
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    plain = _run(model, ids, mask).sequences
    for extra in (dict(kp=1, kr=1, rou=0.25), dict(kp=1, kr=1, rou=0.0), dict(kp=1, kr=7, rou=1.0)):
        out = _run(model, ids, mask, use_cache=True, cache_type="dllm", **extra)
        assert torch.equal(plain, out.sequences), extra


@pytest.mark.parametrize("family", MODELS)
def test_staleness_and_fed_fraction_by_hand(family):
    """3 layers, P=9, G=12, 12 forwards, kp=50, kr=4, rou=.25: forward 0 recomputes all 3×21 rows; layer 0
    always 21; layers 1-2 recompute the 12 response rows at forwards 4 and 8 and ⌊.25·12⌋ = 3 otherwise.
    (63 + 11·21 + 2·2·12 + 9·2·3) / (12·3·21) = 396/756."""
    model = MODELS[family]()
    ids = PROMPTS[0][None]
    plain = _run(model, ids).sequences
    out = _run(model, ids, use_cache=True, cache_type="dllm", kp=50, kr=4, rou=0.25)
    assert out.stats["fed_fraction"] == pytest.approx(396 / 756)
    assert not torch.equal(plain, out.sequences)  # stale features change the tokens (3 layers, kr=4)
    for prompt in PROMPTS[1:]:  # and not by luck of one prompt
        stale = _run(model, prompt[None], use_cache=True, cache_type="dllm", kp=50, kr=4).sequences
        assert not torch.equal(stale, _run(model, prompt[None]).sequences)


@pytest.mark.parametrize("family", MODELS)
def test_padded_rows_equal_single_runs(family):
    model = MODELS[family]()
    ids, mask = left_pad(PROMPTS)
    ragged = dict(kp=3, kr=2, rou=0.5, block_length=4, threshold=RAGGED_THRESHOLD[family])
    for extra in (dict(kp=50, kr=4, rou=0.25), ragged):
        batch = _run(model, ids, mask, use_cache=True, cache_type="dllm", **extra).sequences
        for i, prompt in enumerate(PROMPTS):
            single = _run(model, prompt[None], use_cache=True, cache_type="dllm", **extra).sequences
            assert torch.equal(batch[i, ids.shape[1]:], single[0, len(prompt):]), (i, extra)


def test_schedule_kp3_kr2(monkeypatch):
    instances = _capture(monkeypatch)
    seen = []
    original = DLLMCache.plan

    def plan(self, state):
        result = original(self, state)
        seen.append((bool(self.prompt_rows[0]), bool(self.response_rows[0])))
        return result

    monkeypatch.setattr(DLLMCache, "plan", plan)
    _run(MODELS["llada"](), PROMPTS[0][None], use_cache=True, cache_type="dllm", kp=3, kr=2)
    assert [t for t, (p, _) in enumerate(seen) if p] == [0, 3, 6, 9]
    assert [t for t, (_, r) in enumerate(seen) if r] == [0, 2, 4, 6, 8, 10]
    assert instances[0].kp == 3 and instances[0].kr == 2
    # Forwards are counted over the whole call, as the original: blocks do not restart the schedule
    # (12 forwards in blocks of 3: a restart would refresh the prompt at 0, 3, 6, 9 as well, so use kp=5).
    seen.clear()
    _run(MODELS["llada"](), PROMPTS[0][None], use_cache=True, cache_type="dllm", kp=5, kr=4, block_length=3)
    assert [t for t, (p, _) in enumerate(seen) if p] == [0, 5, 10]
    assert [t for t, (_, r) in enumerate(seen) if r] == [0, 4, 8]


def test_waiting_row_keeps_its_own_count(monkeypatch):
    """Under a threshold a row that finished its block early waits; its forward count does not advance."""
    counts = []
    original = DLLMCache.plan

    def plan(self, state):
        result = original(self, state)
        counts.append(self.own_forwards.tolist())
        return result

    monkeypatch.setattr(DLLMCache, "plan", plan)
    ids, mask = left_pad(PROMPTS)
    out = _run(MODELS["dream"](), ids, mask, use_cache=True, cache_type="dllm", kp=3, kr=2, block_length=4,
               threshold=RAGGED_THRESHOLD["dream"])
    final = torch.tensor(counts[-1])
    assert final.max() == out.stats["forwards"]
    assert (final < out.stats["forwards"]).any()  # some row waited, so its own count is smaller


def test_rou_zero_reuses_response_rows_bit_for_bit(monkeypatch):
    """Between response refreshes, layers ≥ 1 keep the response rows of their attention/FFN caches untouched
    (prompt refreshes only touch prompt rows); layer 0 is always recomputed."""
    instances = _capture(monkeypatch)
    snapshots = []

    fed_tokens = [torch.cat([PROMPTS[0], torch.full((12,), MASK)])[None]]  # the input of each forward

    def tokens_hook(step, x, logits):
        if instances and instances[0].attn_out[1] is not None:
            strategy = instances[0]
            snapshots.append([(a.clone(), f.clone()) for a, f in zip(strategy.attn_out, strategy.ffn_out)])
            fed_tokens.append(x.clone())
        return x

    _run(MODELS["dream"](), PROMPTS[0][None], use_cache=True, cache_type="dllm", kp=3, kr=5, rou=0.0,
         generation_tokens_hook_func=tokens_hook)
    start = 9
    for step in range(1, len(snapshots)):
        refreshed = step % 5 == 0
        for layer in (1, 2):
            for now, before in zip(snapshots[step][layer], snapshots[step - 1][layer]):
                same = torch.equal(now[:, start:], before[:, start:])
                assert same != refreshed, (step, layer)
    layer0_changes = [not torch.equal(snapshots[s][0][0][:, start:], snapshots[s - 1][0][0][:, start:])
                      for s in range(1, len(snapshots))]
    token_changes = [not torch.equal(fed_tokens[s], fed_tokens[s - 1]) for s in range(1, len(snapshots))]
    assert layer0_changes == token_changes  # layer 0 follows every decoded token, and only them
    assert 0 < sum(token_changes) < len(token_changes)  # Dream's floor schedule decodes nothing at some steps


def test_v_verify_selects_lowest_cosine_and_refreshes_every_value(monkeypatch):
    checked = []
    original = DLLMCache._verify_values

    def verify(self, layer, x, ctx, index):
        start, length = self.prompt_length, x.shape[1]
        old = ctx.kv.values[index][:, :, start:length].clone()
        picked = original(self, layer, x, ctx, index)
        assert self.verify_rows.all()  # no row refreshes its response here, none waits
        rows = torch.nonzero(picked)[:, 1].view(picked.shape[0], -1)
        batch, heads, _, dim = old.shape
        fresh = layer.project_v(layer.attn_norm(x[:, start:]))
        stored = ctx.kv.values[index][:, :, start:length].transpose(1, 2).reshape(batch, -1, heads * dim)
        assert torch.allclose(stored, fresh)  # every response value refreshed
        similarity = F.cosine_similarity(fresh, old.transpose(1, 2).reshape(batch, -1, heads * dim), dim=-1)
        count = int(self.rou * (length - start))
        assert rows.shape == (batch, count)
        chosen = similarity.gather(1, rows - start)
        rest = similarity.scatter(1, rows - start, float("inf"))
        assert (chosen.max(1).values <= rest.min(1).values).all()  # exactly the lowest-cosine rows
        checked.append(index)
        return picked

    monkeypatch.setattr(DLLMCache, "_verify_values", verify)
    ids, mask = left_pad(PROMPTS)
    _run(MODELS["llada"](), ids, mask, use_cache=True, cache_type="dllm", kp=50, kr=6, rou=0.4)
    assert len(checked) == 2 * 10  # layers 1-2 at the 10 forwards that refresh nothing


def test_least_similar_rows_unit():
    old = torch.eye(4, dtype=torch.float64)[None].repeat(2, 1, 1)
    new = old.clone()
    new[0, 2] = torch.tensor([1.0, 0, 0, 0])  # orthogonal to its old value
    new[1, 0] = -old[1, 0]
    assert least_similar_rows(new, old, 1).tolist() == [[2], [0]]


def test_presets_and_validation():
    llada, dream = MODELS["llada"](), MODELS["dream"]()
    ids = PROMPTS[0][None]
    assert _run(llada, ids, use_cache=True, cache_type="dllm", dllm_preset="gsm8k").stats["kp"] == 50
    base = _run(llada, ids, use_cache=True, cache_type="dllm", dllm_preset="base/gsm8k").stats
    assert (base["kp"], base["kr"]) == (25, 5)
    inst = _run(dream, ids, use_cache=True, cache_type="dllm", dllm_preset="inst/humaneval", kr=3).stats
    assert (inst["kp"], inst["kr"]) == (50, 3)  # explicit knobs win over the preset
    default = _run(dream, ids, use_cache=True, cache_type="dllm").stats
    assert (default["kp"], default["kr"], default["rou"]) == (50, 2, 0.25)
    for bad, match in ((dict(rou=1.5), "rou"), (dict(kp=0), "kp"), (dict(dllm_preset="squad"), "dllm_preset"),
                       (dict(cfg_scale=1.0), "cfg_scale")):
        with pytest.raises(ValueError, match=match):
            _run(llada, ids, use_cache=True, cache_type="dllm", **bad)
