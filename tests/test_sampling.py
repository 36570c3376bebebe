"""Hand-checked cases for the sampler pieces (spec: vanilla-and-fast-dllm.md §1.2, §1.7, §2.4–2.5)."""

from __future__ import annotations

import math

import pytest
import torch

from dkvcache import rng
from dkvcache.sampling import (
    DREAM,
    LLADA,
    filter_logits,
    linspace_ratios,
    llada_quota,
    propose_tokens,
    select_sampled,
    select_top,
)
from dkvcache.schedule import BlockSchedule


def test_llada_quota_matches_the_original_examples():
    assert llada_quota(torch.tensor([32]), 12).tolist() == [[3] * 8 + [2] * 4]
    assert llada_quota(torch.tensor([32]), 32).tolist() == [[1] * 32]
    assert llada_quota(torch.tensor([5, 8]), 4).tolist() == [[2, 1, 1, 1], [2, 2, 2, 2]]


def _dream_schedule(masked: int, steps: int) -> list[int]:
    schedule = BlockSchedule.start("linspace", steps, 1e-3, torch.tensor([masked]))
    counts = []
    for i in range(steps):
        k = int(schedule.count(i, torch.tensor([masked])))
        counts.append(k)
        masked -= k
    return counts


@pytest.mark.parametrize("steps", [2, 7, 32, 256])
@pytest.mark.parametrize("eps", [1e-3, 0.05])
def test_dream_ratios_once_per_block_equal_the_per_step_formula(steps, eps):
    """The block's ratios computed once equal Dream's per-step float32 1 - s/t (two 0-d tensors) bit for bit."""
    timesteps = torch.linspace(1, eps, steps + 1)
    per_step = torch.stack([1 - timesteps[i + 1] / timesteps[i] for i in range(steps)])
    assert torch.equal(linspace_ratios(steps, eps), per_step)


def test_dream_linspace_counts_floor_in_float32():
    assert _dream_schedule(32, 32) == [0] + [1] * 30 + [2]
    assert _dream_schedule(256, 256) == [0] + [1] * 254 + [2]
    counts = _dream_schedule(256, 128)
    assert counts[0] == 1 and counts[-1] == 3 and set(counts[1:-1]) == {2} and sum(counts) == 256


def test_select_top_per_row_counts_ties_and_validity():
    conf = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.3, 0.2, 0.8, 0.7]])
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    chosen = select_top(conf, valid, torch.tensor([1, 3]))
    assert chosen.tolist() == [[False, True, False, False], [True, False, True, True]]  # tie → leftmost


def test_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    low = torch.finfo(logits.dtype).min
    assert (filter_logits(logits, None, 2)[0, 2:] == low).all()
    probs = torch.softmax(logits, -1)[0]  # 0.644, 0.237, 0.087, 0.032
    kept = filter_logits(logits, float(probs[0] + 0.01), None)[0] > low
    assert kept.tolist() == [True, True, False, False]  # the token crossing top_p is kept
    assert (filter_logits(logits, 1.0, None) == logits).all()


def _one(alg, family=DREAM, **kw):
    logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]], dtype=torch.float64)
    defaults = dict(family=family, alg=alg, temperature=0.0, top_p=None, top_k=None,
                    row_seeds=torch.tensor([7]), step=0, offsets=torch.tensor([[0, 1]]))
    defaults.update(kw)
    return logits, propose_tokens(logits, **defaults)


@pytest.mark.parametrize("family", [DREAM, LLADA])
def test_confidence_definitions(family):
    logits, (x0, conf) = _one("maskgit_plus", family)
    probs = torch.softmax(logits, -1)
    assert x0.tolist() == [[0, 2]]
    assert torch.allclose(conf, probs.max(-1).values)
    _, (_, margin) = _one("topk_margin", family)
    top2 = probs.topk(2, -1).values
    assert torch.allclose(margin, top2[..., 0] - top2[..., 1])
    _, (_, neg_entropy) = _one("entropy", family)
    assert torch.allclose(neg_entropy, (probs * torch.log(probs + 1e-10)).sum(-1))


def test_eos_options():
    _, (x0, _) = _one("maskgit_plus", LLADA, banned_ids=[0])
    assert x0[0, 0] == 1  # the argmax (token 0) is banned, the next best wins
    _, (x0, conf) = _one("maskgit_plus", LLADA, push_last_ids=[2])
    assert x0[0, 1] == 2 and conf[0, 1] == 0  # still proposed, but decoded last
    expected = 1 / (1 + math.exp(-1))  # token 0 renormalised without token 2
    assert conf[0, 0].item() == pytest.approx(expected)


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64).expand(1, 4000, 3)
    x0, conf = propose_tokens(logits, family=LLADA, alg="maskgit_plus", temperature=1.0, top_p=None, top_k=None,
                              row_seeds=torch.tensor([3]), step=5, offsets=torch.arange(4000)[None])
    freq = torch.bincount(x0[0], minlength=3).double() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0, 0], -1), atol=0.03)
    assert torch.allclose(conf, torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0])


def test_hash_uniform_is_deterministic_and_uniform():
    seeds = torch.tensor([1, 2])[:, None]
    u = rng.hash_uniform(seeds, 0, torch.arange(20000)[None])
    assert torch.equal(u, rng.hash_uniform(seeds, 0, torch.arange(20000)[None]))
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01 and not torch.equal(u[0], u[1])
    assert rng.resolve_row_seeds(5, None, 3, torch.device("cpu")).tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="one per row"):
        rng.resolve_row_seeds([1, 2], None, 3, torch.device("cpu"))


def test_alg_temp_selection():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.3]], dtype=torch.float64)
    valid = torch.ones_like(conf, dtype=torch.bool)
    cold = select_sampled(conf, valid, torch.tensor([2]), 1e-6, torch.tensor([1]), 0, torch.arange(4)[None])
    assert cold.tolist() == [[False, True, True, False]]  # alg_temp → 0 is top-k
    hot = [select_sampled(conf, valid, torch.tensor([1]), 100.0, torch.tensor([s]), 0, torch.arange(4)[None])
           for s in range(200)]
    assert len({tuple(h[0].tolist()) for h in hot}) == 4  # every position gets drawn sometimes


def test_certainty_density_matches_direct_evaluation():
    import math

    from dkvcache.density import certainty_density

    gen, sigma = 9, 2.5
    known = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0, 1], [0] * 9, [1] * 9], dtype=torch.bool)

    def direct(row):
        e = {j: 1.0 for j in range(-gen, 0)}
        e.update({j: float(row[j]) for j in range(gen)})
        e.update({j: float(row[-1]) for j in range(gen, 2 * gen)})
        total = sum(math.exp(-d * d / (2 * sigma**2)) for d in range(-3 * gen, 3 * gen))
        return [sum(e[j] * math.exp(-((i - j) ** 2) / (2 * sigma**2)) for j in e) / total for i in range(gen)]

    density = certainty_density(known, sigma)
    assert torch.allclose(density, torch.tensor([direct(r) for r in known.tolist()], dtype=torch.float64),
                          atol=1e-12)
    assert (density >= 0).all() and (density <= 1).all()
    assert (density[1, 1:] < density[1, :-1]).all()  # nothing decoded: decays away from the prompt


def test_certainty_prior_decoding_order():
    """Small sigma decodes left to right; a huge sigma is plain confidence decoding."""
    from tests.conftest import MASK, random_prompts, tiny_llada

    model = tiny_llada(seed=5)
    ids = random_prompts(1, 6, seed=50)
    common = dict(gen_length=12, steps=12, block_length=12, output_history=True, return_dict_in_generate=True)
    ordered = model.diffusion_generate(ids, sigma=0.5, **common)
    decoded_order = []
    for before, after in zip([torch.full((1, 18), MASK)] + ordered.history, ordered.history):
        decoded_order += [p for p in range(12) if before[0, 6 + p] == MASK and after[0, 6 + p] != MASK]
    assert decoded_order == list(range(12))
    plain = model.diffusion_generate(ids, **common)
    huge = model.diffusion_generate(ids, sigma=1e6, **common)
    assert torch.equal(plain.sequences, huge.sequences)
