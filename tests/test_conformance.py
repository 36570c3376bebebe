"""Conformance of every registered cache strategy, through the public API only.

Matrix: every name in ``dkvcache.caches.available_strategies()`` × both families × two decoding modes
  one_per_step  steps = max_new_tokens, no threshold: the schedule transfers one token per step and row (LLaDA;
                Dream's float32 schedule gives 0, 1, 1, 2 per block of 4, as the original);
  threshold     Fast-dLLM's rule decides, with a τ at which the three prompts finish their blocks after different
                numbers of steps (rows wait for each other; ``test_modes_do_what_they_say`` keeps that true).
Combinations a strategy rejects by design are listed in ``INVALID``: they must raise ValueError naming the
offending argument before any compute, and are skipped by the other checks. For each valid combination:
  (1) no MASK is left, (2) every row of a left-padded batch equals its single run exactly (float64), (3) ``stats``
  is sane, (4) every StepPlan keeps its contract, (5) the strategy's "refresh every step" knob reproduces the
  run without cache.
"""

from __future__ import annotations

import pytest
import torch

from dkvcache import caches, generation
from tests.conftest import MASK, left_pad, random_prompts, tiny_dream, tiny_llada

PROMPTS = [random_prompts(1, 8, seed=31)[0], random_prompts(1, 3, seed=32)[0], random_prompts(1, 6, seed=33)[0]]
NEW, BLOCK, SEED = 12, 4, 40
FAMILIES = ("dream", "llada")
MODES = ("one_per_step", "threshold")
STRATEGIES = sorted(caches.available_strategies())
# τ per family (tiny random models give low confidences); greedy's confidences are its pre-drawn uniform order.
THRESHOLD = {"dream": 0.15, "llada": 0.03}
GREEDY_THRESHOLD = 0.5

# Settings a strategy needs to be usable at all (greedy decodes in an order drawn in advance).
STRATEGY_KWARGS = {"greedy": dict(alg="random")}
MODE_KWARGS = {("greedy", "threshold"): dict(threshold=GREEDY_THRESHOLD, schedule_floor=True)}

# (strategy, family, mode) rejected by design → the argument the ValueError must name. Anything not listed must
# run, anything listed must be rejected: a silent change either way fails test_rejected_before_compute.
INVALID = {
    ("greedy", "dream", "one_per_step"): "cache_type",  # greedy needs LLaDA (no logit shift)
    ("greedy", "dream", "threshold"): "cache_type",
}
# Further rejections of otherwise valid strategies: (strategy, family, mode, kwargs replacing the defaults, name).
REJECTED = [
    ("greedy", "llada", "one_per_step", dict(alg="maskgit_plus"), "alg"),  # needs remasking="random"
    ("greedy", "llada", "threshold", dict(alg="random", threshold=GREEDY_THRESHOLD), "schedule_floor"),
    ("d2", "dream", "one_per_step", dict(alg="origin"), "alg"),  # Dream's own default: no confidence to rank
    ("d2cache", "dream", "one_per_step", dict(alg="origin"), "alg"),
    ("decoded", "dream", "one_per_step", dict(shift_type="right"), "shift_type"),
    ("pd", "llada", "one_per_step", dict(shift_type="un"), "shift_type"),
]
# The knob that makes the strategy refresh everything at every step, and the run that must give the same tokens:
# "none" (the run without cache), a strategy name, or "replay" (tokens checked against full forwards step by step).
# None = the strategy has no such knob.
REFRESH = {
    "none": None,
    "decoded": (dict(cache_steps=1), "none"),
    "prefix": (dict(cache_steps=1), "none"),
    "dual": (dict(cache_steps=1), "none"),
    "dllm": (dict(kp=1, kr=1), "none"),
    # pd keeps prefill's prompt K/V from step 0 frozen on every refresh (by design): with 2 layers the prompt's
    # layer-1 K/V depend on the generated tokens, so refreshing every step equals prefill, not the plain run.
    "pd": (dict(cache_steps=1), "prefill"),
    # greedy's order is drawn once per block from its own stream; alg="random" without cache draws new scores at
    # every step, so the orders differ by design. With full forwards every step, each token it writes must be the
    # argmax of the full (no-cache) logits of the sequence before that step.
    "greedy": (dict(cache_steps=1), "replay"),
    "prefill": None,  # the prompt's K/V are computed once, at step 0; no refresh knob
    "d2": None,  # no periodic refresh (step 0 only)
    "d2cache": None,
}
ALIASES = {"d2cache": "d2"}
MATRIX = [(s, f, m) for s in STRATEGIES for f in FAMILIES for m in MODES]
VALID = [c for c in MATRIX if c not in INVALID]


def _ids(case):
    return "-".join(case)


@pytest.fixture(scope="module")
def models():
    return {"dream": tiny_dream(seed=11), "llada": tiny_llada(seed=12)}


def _kwargs(strategy: str, family: str, mode: str, **extra) -> dict:
    kwargs = dict(max_new_tokens=NEW, steps=NEW, block_length=BLOCK, return_dict_in_generate=True)
    if family == "dream":
        kwargs["alg"] = "maskgit_plus"  # Dream's default (origin) has no confidence to compare
    if mode == "threshold":
        kwargs["threshold"] = THRESHOLD[family]
    if strategy != "none":
        kwargs.update(use_cache=True, cache_type=strategy)
    kwargs.update(STRATEGY_KWARGS.get(strategy, {}))
    kwargs.update(MODE_KWARGS.get((strategy, mode), {}))
    kwargs.update(extra)
    return kwargs


def _capture_plans(monkeypatch: pytest.MonkeyPatch, strategy: str, plans: list) -> None:
    """Record (fed_idx copy, use_kv, refresh, B, L) of every step that runs, as the loop resolved its plan (a
    ``fed_mask`` turned into a bucketed ``fed_idx``; plans discarded at a finished block are not steps)."""
    original = generation._forward

    def forward(state, strategy_, plan, decoder):
        fed = None if plan.fed_idx is None else plan.fed_idx.clone()
        plans.append((fed, plan.use_kv, plan.refresh, state.batch, state.length))
        return original(state, strategy_, plan, decoder)

    monkeypatch.setattr(generation, "_forward", forward)


class _Run:
    def __init__(self, out, plans):
        self.out, self.plans = out, plans


def _run(models, strategy, family, mode, ids, mask=None, seed=SEED, **extra) -> _Run:
    plans: list = []
    with pytest.MonkeyPatch.context() as mp:
        _capture_plans(mp, strategy, plans)
        out = models[family].diffusion_generate(ids, attention_mask=mask, seed=seed, output_history=True,
                                                **_kwargs(strategy, family, mode, **extra))
    return _Run(out, plans)


@pytest.fixture(scope="module")
def results(models):
    """``results(case)``: the batch run and the three single runs of a valid combination, computed once."""
    cache: dict = {}

    def get(case) -> tuple[_Run, list[_Run]]:
        if case not in cache:
            ids, mask = left_pad(PROMPTS)
            batch = _run(models, *case, ids, mask)
            singles = [_run(models, *case, p[None], seed=SEED + i) for i, p in enumerate(PROMPTS)]
            cache[case] = (batch, singles)
        return cache[case]

    return get


def test_tables_cover_every_registered_strategy():
    """A new strategy must be classified here (refresh knob, invalid combinations) before it passes."""
    assert set(REFRESH) == set(STRATEGIES)
    assert {s for s, *_ in INVALID} | {s for s, *_ in REJECTED} <= set(STRATEGIES)
    assert set(ALIASES) | set(ALIASES.values()) <= set(STRATEGIES)


@pytest.mark.parametrize("case", MATRIX, ids=_ids)
def test_rejected_before_compute(models, results, case, monkeypatch):
    """Exactly the combinations in INVALID are rejected, with a ValueError naming an argument, before compute."""
    strategy, family, mode = case
    model = models[family]
    ids, mask = left_pad(PROMPTS)
    if case not in INVALID:
        assert results(case)[0].out.stats["forwards"] > 0  # it runs
        return

    def no_compute(*args, **kwargs):
        raise AssertionError("the model ran before the combination was rejected")

    monkeypatch.setattr(model, "partial_forward", no_compute)
    monkeypatch.setattr(model, "forward", no_compute)
    with pytest.raises(ValueError, match=INVALID[case]):
        model.diffusion_generate(ids, attention_mask=mask, seed=SEED, **_kwargs(strategy, family, mode))


@pytest.mark.parametrize("strategy, family, mode, extra, name", REJECTED, ids=lambda v: str(v) if isinstance(v, str)
                         else ",".join(f"{k}={x}" for k, x in v.items()))
def test_further_rejections_before_compute(models, strategy, family, mode, extra, name, monkeypatch):
    model = models[family]
    kwargs = _kwargs(strategy, family, mode)
    kwargs.pop("threshold", None)
    kwargs.pop("schedule_floor", None)
    kwargs.update(extra)

    def no_compute(*args, **kw):
        raise AssertionError("the model ran before the combination was rejected")

    monkeypatch.setattr(model, "partial_forward", no_compute)
    with pytest.raises(ValueError, match=name):
        model.diffusion_generate(PROMPTS[0][None], **kwargs)


def _masked_per_step(run: _Run) -> torch.Tensor:
    """(steps, B) MASKs left in the generated region after each step."""
    width = left_pad(PROMPTS)[0].shape[1]
    return torch.stack([(h[:, width:] == MASK).sum(1) for h in run.out.history])


@pytest.mark.parametrize("family", FAMILIES)
def test_modes_do_what_they_say(results, family):
    """threshold: rows finish blocks at different steps (so waiting rows are exercised), in every block;
    one_per_step: the schedule's counts, without cache."""
    ids, mask = left_pad(PROMPTS)
    width = ids.shape[1]
    for strategy in ("none", "greedy") if family == "llada" else ("none",):
        history = torch.stack(results((strategy, family, "threshold"))[0].out.history)  # (S, B, L)
        for b in range(NEW // BLOCK):
            block = history[:, :, width + b * BLOCK:width + (b + 1) * BLOCK]
            done_at = (block != MASK).all(-1).long().argmax(0)  # first step at which each row's block is done
            assert len(set(done_at.tolist())) > 1, (strategy, b, done_at)
    masked = _masked_per_step(results(("none", family, "one_per_step"))[0])
    if family == "llada":  # one token per step
        expected = torch.arange(NEW - 1, -1, -1)
    else:  # Dream's int(m·(1 − s/t)) with float32 timesteps and eps = 1e-3: 0 at a block's first step, 2 at its last
        expected = torch.tensor([12, 11, 10, 8, 8, 7, 6, 4, 4, 3, 2, 0])
    assert torch.equal(masked, expected[:, None].expand(-1, len(PROMPTS)))


@pytest.mark.parametrize("case", VALID, ids=_ids)
def test_no_mask_left(results, case):
    batch, singles = results(case)
    assert not (batch.out.sequences == MASK).any()
    for single in singles:
        assert not (single.out.sequences == MASK).any()


@pytest.mark.parametrize("case", [c for c in VALID if c[2] == "one_per_step"], ids=_ids)
def test_schedule_is_met(results, case):
    """Without a threshold every strategy makes the schedule's count decodable at every step: the number of
    MASKs left after each step is that of the run without cache."""
    plain = results(("none", case[1], "one_per_step"))[0]
    assert torch.equal(_masked_per_step(results(case)[0]), _masked_per_step(plain))


@pytest.mark.parametrize("case", VALID, ids=_ids)
def test_padded_rows_equal_single_runs(results, case):
    batch, singles = results(case)
    width = left_pad(PROMPTS)[0].shape[1]
    for i, (prompt, single) in enumerate(zip(PROMPTS, singles)):
        assert torch.equal(batch.out.sequences[i, width:], single.out.sequences[0, len(prompt):]), i


@pytest.mark.parametrize("case", VALID, ids=_ids)
def test_stats(results, case):
    strategy, family, mode = case
    for run in (results(case)[0], *results(case)[1]):
        stats = run.out.stats
        assert stats["cache_type"] == strategy
        assert isinstance(stats["forwards"], int) and stats["forwards"] == len(run.plans) >= NEW // BLOCK
        assert 0 < stats["fed_fraction"] <= 1
        assert stats["refreshes"] == sum(refresh for _, _, refresh, _, _ in run.plans) <= stats["forwards"]
        fed = sum(b * length if idx is None else int((idx < length).sum()) for idx, _, _, b, length in run.plans)
        full = sum(b * length for _, _, _, b, length in run.plans)
        if strategy != "dllm":  # dLLM-Cache feeds everything and reports the rows its layers recompute instead
            assert stats["fed_fraction"] == pytest.approx(fed / full, rel=1e-12)
        if strategy == "none":
            assert stats["fed_fraction"] == 1.0 and stats["refreshes"] == 0
        else:  # it caches: a refresh at step 0 at least
            assert stats["refreshes"] >= 1
            if mode == "one_per_step":  # and with 4 steps a block it really skips work
                assert stats["fed_fraction"] < 1.0


@pytest.mark.parametrize("case", VALID, ids=_ids)
def test_step_plans(results, case):
    """fed_idx is None or (B, n) long, strictly ascending over its real entries, padded with L at the end."""
    strategy = case[0]
    batch, singles = results(case)
    for run in (batch, *singles):
        for fed, use_kv, refresh, b, length in run.plans:
            if strategy == "none":
                assert fed is None and not use_kv and not refresh
            if fed is None:
                continue
            assert use_kv  # a partial feed reads the others' K/V from the buffers
            assert fed.dtype == torch.long and fed.dim() == 2 and fed.shape[0] == b, fed.shape
            assert ((fed >= 0) & (fed <= length)).all()
            real = fed < length
            # real entries first, then only padding: the mask is non-increasing along the row
            assert (real[:, :-1] | ~real[:, 1:]).all(), fed
            steps = fed[:, 1:] - fed[:, :-1]
            assert ((steps > 0) | ~real[:, 1:]).all(), fed  # strictly ascending where both are real
            assert (fed[~real] == length).all()


def _replay_greedy(model, run: _Run, ids, mask) -> None:
    """Each step's new tokens are the argmax (MASK excluded) of a full forward of the sequence before the step."""
    previous = torch.cat([ids, torch.full((ids.shape[0], NEW), MASK)], dim=1)
    attention = None if mask is None else torch.cat([mask, torch.ones(ids.shape[0], NEW, dtype=mask.dtype)], 1)
    for x in run.out.history:
        with torch.no_grad():
            logits = model(previous, attention_mask=attention).logits
        logits[..., MASK] = float("-inf")
        new = (previous == MASK) & (x != MASK)
        assert new.any()
        assert torch.equal(x[new], logits.argmax(-1)[new])
        previous = x


@pytest.mark.parametrize("case", [c for c in VALID if REFRESH[c[0]] is not None], ids=_ids)
def test_refresh_every_step_is_no_cache(models, case):
    strategy, family, mode = case
    knob, reference = REFRESH[strategy]
    ids, mask = left_pad(PROMPTS)
    refreshed = _run(models, strategy, family, mode, ids, mask, **knob)
    stats = refreshed.out.stats
    assert stats["refreshes"] == stats["forwards"]  # every step refreshes
    if reference == "replay":
        _replay_greedy(models[family], refreshed, ids, mask)
        return
    extra = STRATEGY_KWARGS.get(strategy, {}) if reference == "none" else {}
    expected = _run(models, reference, family, mode, ids, mask, **extra)
    assert torch.equal(refreshed.out.sequences, expected.out.sequences)


@pytest.mark.parametrize("alias, target", ALIASES.items())
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_aliases_give_identical_runs(results, alias, target, family, mode):
    a, b = results((alias, family, mode)), results((target, family, mode))
    for x, y in zip((a[0], *a[1]), (b[0], *b[1])):
        assert torch.equal(x.out.sequences, y.out.sequences)
        assert x.out.stats["forwards"] == y.out.stats["forwards"]
        assert x.out.stats["fed_fraction"] == y.out.stats["fed_fraction"]
