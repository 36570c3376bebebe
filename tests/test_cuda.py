"""GPU checks (bf16, CUDA SDPA). They skip on machines without CUDA, such as CI."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import left_pad, random_prompts, tiny_dream, tiny_llada

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 + CUDA SDPA checks)")

PROMPTS = [random_prompts(1, 12, seed=61)[0], random_prompts(1, 5, seed=62)[0]]


@pytest.mark.parametrize("builder", [tiny_dream, tiny_llada])
@pytest.mark.parametrize("cache", [dict(), dict(use_cache=True, cache_type="decoded"),
                                   dict(use_cache=True, cache_type="dual", threshold=0.5)])
def test_bf16_cuda_padded_batch_is_finite_and_close_to_single_runs(builder, cache):
    model = builder(layers=2).to("cuda", torch.bfloat16)
    ids, mask = left_pad(PROMPTS)
    common = dict(max_new_tokens=8, steps=8, block_length=4, return_dict_in_generate=True, **cache)
    if model.diffusion_family == "dream":
        common["alg"] = "maskgit_plus"
    with torch.no_grad():
        logits = model(ids.cuda(), attention_mask=mask.cuda()).logits
    assert torch.isfinite(logits[mask.cuda().bool()]).all()  # pad query rows never make NaN leak
    batch = model.diffusion_generate(ids.cuda(), attention_mask=mask.cuda(), **common).sequences.cpu()
    agree = 0
    for i, prompt in enumerate(PROMPTS):
        single = model.diffusion_generate(prompt[None].cuda(), **common).sequences.cpu()
        agree += int((batch[i, ids.shape[1]:] == single[0, len(prompt):]).sum())
    assert agree >= 0.75 * 2 * 8  # bf16: batch shape changes summation order, so "close", not equal


def test_cuda_matches_cpu_in_float64():
    model = tiny_dream(layers=2)
    ids, mask = left_pad(PROMPTS)
    common = dict(max_new_tokens=8, steps=8, alg="entropy", use_cache=True, cache_type="decoded")
    cpu = model.diffusion_generate(ids, attention_mask=mask, **common)
    gpu = model.to("cuda").diffusion_generate(ids.cuda(), attention_mask=mask.cuda(), **common).cpu()
    assert torch.equal(cpu, gpu)


@pytest.mark.parametrize("builder", [tiny_dream, tiny_llada])
@pytest.mark.parametrize("cache", [dict(use_cache=True, cache_type="dual"),
                                   dict(use_cache=True, cache_type="decoded", cache_steps=2)])
def test_compile_on_cuda_replays_cuda_graphs_with_the_eager_tokens(builder, cache):
    """compile=True on CUDA is torch.compile under CUDA graphs: float64 tokens equal eager, no CUDA-graph skip
    (the K/V buffers it writes are static addresses), a second call reuses the pooled buffers, and the vanilla
    rule's choice and write run in the compiled head."""
    model = builder(layers=2).to("cuda")
    ids, mask = left_pad(PROMPTS)
    ids, mask = ids.cuda(), mask.cuda()
    common = dict(max_new_tokens=8, steps=8, block_length=4, alg="maskgit_plus", return_dict_in_generate=True,
                  **cache)
    eager = model.diffusion_generate(ids, attention_mask=mask, **common)
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    first = model.diffusion_generate(ids, attention_mask=mask, compile=True, **common)
    again = model.diffusion_generate(ids, attention_mask=mask, compile=True, **common)
    assert torch.equal(eager.sequences, first.sequences) and torch.equal(eager.sequences, again.sequences)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips
    assert again.stats["compiled_shapes"] == 0 and again.stats["compiled_choice"]  # the choice is in the graph
